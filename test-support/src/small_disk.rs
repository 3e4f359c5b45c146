//! A small tmpfs mounted on a directory for a test's life, unmounted when
//! dropped (also when the test fails): a state disk that fills, in bytes or
//! in inodes, without touching the machine's own. Mounting needs root:
//! elsewhere the test is skipped, except under `CI=true`, where it fails.

use std::io::Write;
use std::path::{Path, PathBuf};

pub struct SmallDisk(PathBuf);

impl SmallDisk {
    /// A tmpfs of `size` (e.g. `24m`) on `dir`; `None` (test skipped) where
    /// this process may not mount.
    pub fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        SmallDisk::mount_with(dir, &format!("size={size}"))
    }

    /// A tmpfs mounted with options `opts` (e.g. `size=24m,nr_inodes=3000`).
    pub fn mount_with(dir: &Path, opts: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let ci = crate::tools::is_ci(std::env::var_os("CI").as_deref());
            assert!(
                !ci,
                "cannot mount a tmpfs on {} (CI=true: this test must run as root)",
                dir.display()
            );
            eprintln!(
                "SKIPPED: cannot mount a tmpfs on {} (needs root)",
                dir.display()
            );
        }
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Bytes free.
    pub fn free(&self) -> u64 {
        weir_host::appliance::free_bytes(&self.0).unwrap_or(0)
    }

    /// Inodes free (0 if unknown).
    pub fn free_inodes(&self) -> u64 {
        weir_host::appliance::free_room(&self.0)
            .ok()
            .and_then(|r| r.inodes)
            .unwrap_or(0)
    }

    pub fn usage(&self) -> weir_host::appliance::DiskUsage {
        weir_host::appliance::disk_usage(&self.0).unwrap_or_default()
    }

    /// Fills the disk until `leave` bytes are free; returns the filler.
    pub fn fill_leaving(&self, leave: u64) -> std::io::Result<PathBuf> {
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler)?;
        let chunk = vec![0x5a_u8; 64 << 10];
        while self.free() > leave + chunk.len() as u64 {
            f.write_all(&chunk)?;
            f.flush()?;
        }
        Ok(filler)
    }

    /// Takes inodes with empty files until fewer than `leave` are free;
    /// returns the directory holding them.
    pub fn fill_inodes_leaving(&self, leave: u64) -> std::io::Result<PathBuf> {
        let filler = self.0.join("inode-filler");
        std::fs::create_dir_all(&filler)?;
        let mut n = 0u64;
        while self.free_inodes() >= leave {
            std::fs::File::create(filler.join(n.to_string()))?;
            n += 1;
        }
        Ok(filler)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
