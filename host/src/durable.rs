//! Writes that survive a power cut, not only a crash.
//!
//! A file is durable once its bytes are fsynced; its name is durable once
//! the directory holding the name is fsynced. A rename is the only way to
//! make a whole file appear at once, so a file that must never be seen half
//! written goes: temporary name, write, fsync, rename, fsync of the
//! directory ([`write_atomically`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// fsyncs a directory, so that names created, renamed or removed in it
/// survive a power cut.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The temporary name [`write_atomically`] writes `path` under first: a
/// hidden sibling, so it lands on the same filesystem and a listing that
/// skips dot files never sees it.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `path` whole or not at all: under a temporary name, fsynced,
/// renamed into place, and the directory fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = temporary_sibling(path);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Replaces `path` whole without an fsync: for views rewritten every
/// second (status files), where a reader must never see half a file but
/// a power cut may lose the last version.
pub fn replace_quickly(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary_sibling(path);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// fsyncs every file below `root`, then every directory from the bottom
/// up, so that both the bytes and the names are durable. A file removed
/// between listing and opening is skipped: it no longer needs syncing.
pub fn fsync_tree(root: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fsync_tree(&path)?;
        } else if kind.is_file() {
            match File::open(&path) {
                Ok(f) => f.sync_all()?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    fsync_dir(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_leaves_the_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marker.json");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("marker.json")]);
    }

    #[test]
    fn a_quick_replace_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        replace_quickly(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert!(!temporary_sibling(&path).exists());
    }

    #[test]
    fn a_tree_is_synced_down_to_its_deepest_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/c"), b"x").unwrap();
        std::fs::write(dir.path().join("top"), b"y").unwrap();
        fsync_tree(dir.path()).unwrap();
        assert!(fsync_tree(&dir.path().join("missing")).is_err());
    }
}
