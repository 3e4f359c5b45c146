//! Where an image's files go: entries of a tar archive, or files of a
//! directory. Both take content-addressed entries whose name is known only
//! after their bytes are streamed.

use std::fs::{self, File};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::FIXED_MTIME;

const BLOCK: u64 = 512;

fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

pub(crate) trait ImageSink {
    fn directory(&mut self, path: &str) -> io::Result<()>;
    fn file(&mut self, path: &str, bytes: &[u8]) -> io::Result<()>;
    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()>;
    /// Streams an entry through `produce`, which writes the bytes and
    /// returns the entry's path (derived from their digest).
    fn streamed<T>(
        &mut self,
        produce: impl FnOnce(&mut dyn Write) -> io::Result<(String, T)>,
    ) -> io::Result<T>;
}

/// A tar archive written under a temporary name and renamed into place by
/// `finish`, so a spool watcher never sees it half written.
pub(crate) struct TarSink {
    out: BufWriter<File>,
    partial: PathBuf,
    target: PathBuf,
}

impl TarSink {
    pub fn create(target: PathBuf) -> io::Result<Self> {
        let partial = partial_path(&target)?;
        let file = File::create(&partial).map_err(|e| named(&partial, e))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, file),
            partial,
            target,
        })
    }

    fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> io::Result<tar::Header> {
        let mut h = tar::Header::new_ustar();
        h.set_path(path)?;
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(FIXED_MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h.set_cksum();
        Ok(h)
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = len % BLOCK;
        if rem != 0 {
            self.out
                .write_all(&[0u8; BLOCK as usize][..(BLOCK - rem) as usize])?;
        }
        Ok(())
    }

    /// Writes the end-of-archive marker, syncs and renames into place.
    pub fn finish(mut self) -> io::Result<PathBuf> {
        let mut end = || -> io::Result<()> {
            self.out.write_all(&[0u8; 2 * BLOCK as usize])?;
            self.out.flush()?;
            self.out.get_ref().sync_all()
        };
        end().map_err(|e| named(&self.partial, e))?;
        fs::rename(&self.partial, &self.target).map_err(|e| named(&self.target, e))?;
        Ok(self.target.clone())
    }
}

impl ImageSink for TarSink {
    fn directory(&mut self, path: &str) -> io::Result<()> {
        let h = Self::header(path, tar::EntryType::Directory, 0o755, 0)?;
        self.out.write_all(h.as_bytes())
    }

    fn file(&mut self, path: &str, bytes: &[u8]) -> io::Result<()> {
        let h = Self::header(path, tar::EntryType::Regular, 0o644, bytes.len() as u64)?;
        self.out.write_all(h.as_bytes())?;
        self.out.write_all(bytes)?;
        self.pad(bytes.len() as u64)
    }

    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let mut h = Self::header(path, tar::EntryType::Symlink, 0o777, 0)?;
        h.set_link_name(target)?;
        h.set_cksum();
        self.out.write_all(h.as_bytes())
    }

    fn streamed<T>(
        &mut self,
        produce: impl FnOnce(&mut dyn Write) -> io::Result<(String, T)>,
    ) -> io::Result<T> {
        // Reserve the header block, stream the data, then go back and write
        // the header once the name (a digest) and size are known: one pass,
        // no temporary copy of the blob.
        let header_at = self.out.stream_position()?;
        self.out.write_all(&[0u8; BLOCK as usize])?;
        let data_at = header_at + BLOCK;
        let (path, value) = produce(&mut self.out)?;
        let end = self.out.stream_position()?;
        let len = end - data_at;
        self.pad(len)?;
        let resume_at = self.out.stream_position()?;
        let h = Self::header(&path, tar::EntryType::Regular, 0o644, len)?;
        self.out.seek(SeekFrom::Start(header_at))?;
        self.out.write_all(h.as_bytes())?;
        self.out.seek(SeekFrom::Start(resume_at))?;
        Ok(value)
    }
}

impl Drop for TarSink {
    fn drop(&mut self) {
        // After a failure, leave no partial archive behind (after `finish`
        // the partial path no longer exists and this is a no-op).
        let _ = fs::remove_file(&self.partial);
    }
}

/// An unpacked directory, built under a temporary name and renamed.
pub(crate) struct DirSink {
    partial: PathBuf,
    target: PathBuf,
    next_temp: u64,
}

impl DirSink {
    pub fn create(target: PathBuf) -> io::Result<Self> {
        let partial = partial_path(&target)?;
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| named(&partial, e))?;
        }
        fs::create_dir_all(&partial).map_err(|e| named(&partial, e))?;
        Ok(Self {
            partial,
            target,
            next_temp: 0,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.partial.join(rel.trim_end_matches('/'))
    }

    pub fn finish(self) -> io::Result<PathBuf> {
        if self.target.exists() {
            fs::remove_dir_all(&self.target).map_err(|e| named(&self.target, e))?;
        }
        fs::rename(&self.partial, &self.target).map_err(|e| named(&self.target, e))?;
        Ok(self.target.clone())
    }
}

impl ImageSink for DirSink {
    fn directory(&mut self, path: &str) -> io::Result<()> {
        let p = self.path(path);
        fs::create_dir_all(&p).map_err(|e| named(&p, e))
    }

    fn file(&mut self, path: &str, bytes: &[u8]) -> io::Result<()> {
        let p = self.path(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| named(parent, e))?;
        }
        fs::write(&p, bytes).map_err(|e| named(&p, e))
    }

    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let p = self.path(path);
        std::os::unix::fs::symlink(target, &p).map_err(|e| named(&p, e))
    }

    fn streamed<T>(
        &mut self,
        produce: impl FnOnce(&mut dyn Write) -> io::Result<(String, T)>,
    ) -> io::Result<T> {
        let temp = self.partial.join(format!(".stream-{}", self.next_temp));
        self.next_temp += 1;
        let file = File::create(&temp).map_err(|e| named(&temp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let (path, value) = produce(&mut out)?;
        out.flush().map_err(|e| named(&temp, e))?;
        drop(out);
        let p = self.path(&path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| named(parent, e))?;
        }
        fs::rename(&temp, &p).map_err(|e| named(&p, e))?;
        Ok(value)
    }
}

impl Drop for DirSink {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.partial);
    }
}

/// `.NAME.partial` beside the target: hidden and suffixed, so spool
/// scanners that skip dot files or `.partial` names ignore it.
fn partial_path(target: &Path) -> io::Result<PathBuf> {
    let name = target.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file name", target.display()),
        )
    })?;
    let mut partial = std::ffi::OsString::from(".");
    partial.push(name);
    partial.push(".partial");
    Ok(target.with_file_name(partial))
}
