//! Filesystem images built from directories, without mounting anything:
//! squashfs for the read-only root, ext4 (`mkfs.ext4 -d`) for the
//! boot-state and data partitions. Both come out byte-identical for the
//! same tree and epoch.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tool;

/// The read-only root: xz-compressed squashfs (GRUB reads it to load the
/// kernel), every timestamp set to `epoch`.
pub fn squashfs(tree: &Path, out: &Path, epoch: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(out);
    tool::streamed(
        Command::new("mksquashfs")
            .arg(tree)
            .arg(out)
            .args(["-noappend", "-no-progress", "-comp", "xz", "-b", "256K"])
            .arg("-mkfs-time")
            .arg(epoch.to_string())
            .arg("-all-time")
            .arg(epoch.to_string())
            // mksquashfs refuses SOURCE_DATE_EPOCH next to the options.
            .env_remove("SOURCE_DATE_EPOCH"),
    )
    .with_context(|| format!("building {}", out.display()))
}

/// How an ext4 image is made.
pub struct Ext4<'a> {
    pub label: &'a str,
    pub uuid: &'a str,
    /// Seeds the directory hash (random by default, so it must be fixed).
    pub hash_seed: &'a str,
    pub size_mib: u64,
    /// Features turned off, e.g. those GRUB 2.06 cannot read.
    pub disabled_features: &'a [&'a str],
}

/// Builds an ext4 image of `tree` at `out`.
///
/// `mkfs.ext4 -d` copies each file's ctime from the source tree (e2fsprogs
/// 1.47.0 has no option against it), and a source file's ctime cannot be
/// set; so every inode's times are set to `epoch` afterwards with debugfs.
/// E2FSPROGS_FAKE_TIME fixes the superblock's own times.
pub fn ext4(tree: &Path, out: &Path, fs: &Ext4, epoch: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(out);
    let paths = tree_paths(tree)?;
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", fs.label, "-U", fs.uuid])
        .arg("-E")
        .arg(format!("hash_seed={},root_owner=0:0", fs.hash_seed));
    if !fs.disabled_features.is_empty() {
        let off: Vec<String> = fs
            .disabled_features
            .iter()
            .map(|f| format!("^{f}"))
            .collect();
        cmd.arg("-O").arg(off.join(","));
    }
    cmd.arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{}M", fs.size_mib))
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string());
    tool::captured(&mut cmd).with_context(|| format!("building {}", out.display()))?;

    let mut script = String::new();
    for p in std::iter::once("/".to_string()).chain(paths) {
        for field in ["atime", "ctime", "mtime", "crtime"] {
            script.push_str(&format!("set_inode_field \"{p}\" {field} @{epoch}\n"));
        }
    }
    let script_path = out.with_extension("debugfs");
    std::fs::write(&script_path, &script)
        .with_context(|| format!("writing {}", script_path.display()))?;
    let log = tool::captured(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(out)
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string()),
    )
    .with_context(|| format!("fixing timestamps in {}", out.display()))?;
    // debugfs reports a failed request on stdout and still exits 0.
    if let Some(line) = log.lines().find(|l| l.contains("set_inode_field:")) {
        bail!("debugfs on {}: {line}", out.display());
    }
    std::fs::remove_file(&script_path).ok();
    Ok(())
}

/// Every path under `tree`, as an absolute path inside the filesystem,
/// sorted. Names debugfs cannot take in a quoted argument are refused.
fn tree_paths(tree: &Path) -> anyhow::Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", dir.display()))?;
        entries.sort();
        for path in entries {
            let rel = path
                .strip_prefix(root)
                .expect("walked paths are under the root");
            let rel = rel
                .to_str()
                .with_context(|| format!("{}: file names must be UTF-8", path.display()))?;
            if rel.contains(['"', '\n', '\\']) {
                bail!(
                    "{}: file names must not contain quotes, backslashes or newlines",
                    path.display()
                );
            }
            out.push(format!("/{rel}"));
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(tree, tree, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_paths_are_sorted_absolute_and_refuse_quotes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("weir/keys")).unwrap();
        std::fs::write(dir.path().join("weir/rx.toml"), "x").unwrap();
        std::fs::write(dir.path().join("weir/keys/1.key"), "k").unwrap();
        assert_eq!(
            tree_paths(dir.path()).unwrap(),
            ["/weir", "/weir/keys", "/weir/keys/1.key", "/weir/rx.toml"]
        );
        std::fs::write(dir.path().join("bad\"name"), "x").unwrap();
        assert!(tree_paths(dir.path()).is_err());
    }

    /// Two images of the same tree, built at different times, are identical.
    #[test]
    fn ext4_images_of_the_same_tree_are_identical() {
        if tool::find("mkfs.ext4").is_none() || tool::find("debugfs").is_none() {
            eprintln!("skipped: mkfs.ext4/debugfs missing (apt-get install e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = Ext4 {
            label: "weir-data",
            uuid: "2f6e0c11-5b5b-4c3a-9e1d-000000000015",
            hash_seed: "2f6e0c11-5b5b-4c3a-9e1d-000000000025",
            size_mib: 8,
            disabled_features: &["orphan_file"],
        };
        let mut digests = Vec::new();
        for i in 0..2 {
            let tree = dir.path().join(format!("tree{i}"));
            std::fs::create_dir_all(tree.join("weir/keys")).unwrap();
            std::fs::write(tree.join("weir/rx.toml"), "state_dir = \"/x\"\n").unwrap();
            let out = dir.path().join(format!("fs{i}.ext4"));
            ext4(&tree, &out, &fs, 1_747_699_200).unwrap();
            digests.push(crate::manifest::sha256_file(&out).unwrap());
            // ctimes of the second tree differ by at least this much.
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        assert_eq!(digests[0], digests[1]);
    }
}
