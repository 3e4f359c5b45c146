//! A tar archive indexed in place: where each member's bytes are, so that
//! layers are read as byte ranges of the drop file and never loaded whole.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest JSON member (manifest, index, config) read into memory.
pub const MAX_JSON_MEMBER: u64 = 16 << 20;
/// Symlinks followed before giving up (loops, absurd chains).
const MAX_LINK_HOPS: usize = 16;
/// Bytes of header and extension records (GNU long names and links, PAX)
/// read for one member. Real ones take a few KiB; the tar crate reads an
/// extension record into memory whole, so a hostile archive claiming a
/// 256 MiB long name must be stopped while it is being read.
pub const MAX_HEADER_BYTES_PER_MEMBER: u64 = 1 << 20;
/// Members indexed: an image archive has a few per blob, and each one
/// indexed costs memory however small the drop.
pub const MAX_MEMBERS: usize = 200_000;
/// Bytes of member names (and link targets) kept in the index.
const MAX_NAME_BYTES: usize = 64 << 20;
/// Metadata read into memory from one drop, all JSON members together: a
/// drop naming one 16 MiB member over and over must not make ingest read
/// (and keep) it each time.
pub const MAX_METADATA_BYTES: u64 = 128 << 20;

/// Why an archive cannot be read; the drop is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("reading archive {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is gzip-compressed; drop the uncompressed tar (docker save / skopeo write one)")]
    Compressed(PathBuf),
    /// A member's bytes could not be read: the drop is named with the
    /// member, so a truncated layer is found without unpacking the tar.
    #[error("reading member {member:?} of archive {path}: {source}")]
    MemberIo {
        path: PathBuf,
        member: String,
        #[source]
        source: std::io::Error,
    },
    #[error("archive has no member {0:?}")]
    Missing(String),
    #[error("member {0:?}: {1}")]
    Member(String, String),
    #[error("{0}")]
    Format(String),
}

#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Symlink(String),
    HardLink(String),
}

/// A seekable tar file and the position of every member.
pub struct TarIndex {
    file: File,
    path: PathBuf,
    members: HashMap<String, Member>,
    /// Bytes `read_small` has read so far.
    metadata_read: AtomicU64,
}

/// Archive paths compare without `./` and trailing `/`.
pub fn normalize(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// The archive as the tar crate reads it while indexing: member data is
/// skipped by seeking, so what is read is headers and extension records,
/// and those are bounded per member.
struct HeaderBudget<'a> {
    file: &'a File,
    read_for_member: Rc<Cell<u64>>,
}

impl Read for HeaderBudget<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let used = self.read_for_member.get();
        let left = MAX_HEADER_BYTES_PER_MEMBER.saturating_sub(used);
        if left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "a member's headers and extension records (GNU long name, PAX) \
                     exceed {MAX_HEADER_BYTES_PER_MEMBER} bytes"
                ),
            ));
        }
        let want = buf.len().min(left as usize);
        let n = (&*self.file).read(&mut buf[..want])?;
        self.read_for_member.set(used + n as u64);
        Ok(n)
    }
}

impl Seek for HeaderBudget<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        (&*self.file).seek(pos)
    }
}

impl TarIndex {
    /// Walks the headers only: seeking over every member's data.
    pub fn open(path: &Path) -> Result<TarIndex, ArchiveError> {
        let io = |source| ArchiveError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Not through a link, and never a FIFO or device (whose open or
        // read could block intake for good): the file the spool listing
        // saw may have been replaced since.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(io)?;
        if !file.metadata().map_err(io)?.is_file() {
            return Err(ArchiveError::Format(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mut magic = [0u8; 2];
        if file.read_at(&mut magic, 0).map_err(io)? == 2 && magic == [0x1f, 0x8b] {
            return Err(ArchiveError::Compressed(path.to_path_buf()));
        }
        let mut members = HashMap::new();
        let mut name_bytes = 0usize;
        {
            let read_for_member = Rc::new(Cell::new(0));
            let mut archive = tar::Archive::new(HeaderBudget {
                file: &file,
                read_for_member: read_for_member.clone(),
            });
            for entry in archive.entries_with_seek().map_err(io)? {
                let entry = entry.map_err(io)?;
                read_for_member.set(0);
                let name = entry.path().map_err(io)?.to_string_lossy().into_owned();
                let name = normalize(&name);
                let member = match entry.header().entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => Member::File {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    },
                    tar::EntryType::Symlink => {
                        let target = entry
                            .link_name()
                            .map_err(io)?
                            .map(|t| t.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        // Relative to the link's own directory.
                        let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                        let joined = if target.starts_with('/') {
                            target
                        } else {
                            format!("{dir}/{target}")
                        };
                        Member::Symlink(normalize(&joined))
                    }
                    tar::EntryType::Link => {
                        let target = entry
                            .link_name()
                            .map_err(io)?
                            .map(|t| t.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        Member::HardLink(normalize(&target))
                    }
                    // Directories and metadata entries hold no bytes we need.
                    _ => continue,
                };
                name_bytes += name.len()
                    + match &member {
                        Member::Symlink(t) | Member::HardLink(t) => t.len(),
                        Member::File { .. } => 0,
                    };
                if members.len() >= MAX_MEMBERS || name_bytes > MAX_NAME_BYTES {
                    return Err(ArchiveError::Format(format!(
                        "{}: more than {MAX_MEMBERS} members or {MAX_NAME_BYTES} bytes of \
                         member names; an image archive has a few members per blob",
                        path.display()
                    )));
                }
                members.insert(name, member);
            }
        }
        Ok(TarIndex {
            file,
            path: path.to_path_buf(),
            members,
            metadata_read: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The archive as opened and indexed (its name may lead elsewhere
    /// since).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn contains(&self, name: &str) -> bool {
        self.members.contains_key(&normalize(name))
    }

    /// Offset and size of a member's bytes, following links.
    pub fn locate(&self, name: &str) -> Result<(u64, u64), ArchiveError> {
        let mut current = normalize(name);
        for _ in 0..MAX_LINK_HOPS {
            match self.members.get(&current) {
                None => return Err(ArchiveError::Missing(current)),
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Symlink(t)) | Some(Member::HardLink(t)) => current = t.clone(),
            }
        }
        Err(ArchiveError::Member(
            name.to_string(),
            "too many links (a loop?)".into(),
        ))
    }

    /// A reader over one member's bytes.
    pub fn reader(&self, name: &str) -> Result<MemberReader<'_>, ArchiveError> {
        let (offset, size) = self.locate(name)?;
        Ok(MemberReader {
            file: &self.file,
            pos: offset,
            end: offset + size,
        })
    }

    pub fn size(&self, name: &str) -> Result<u64, ArchiveError> {
        Ok(self.locate(name)?.1)
    }

    /// A failed read of member `name`'s bytes.
    pub fn member_io(&self, name: &str, source: std::io::Error) -> ArchiveError {
        ArchiveError::MemberIo {
            path: self.path.clone(),
            member: name.to_string(),
            source,
        }
    }

    /// A small member (JSON) read whole; refuses anything over the limit.
    pub fn read_small(&self, name: &str) -> Result<Vec<u8>, ArchiveError> {
        let (_, size) = self.locate(name)?;
        if size > MAX_JSON_MEMBER {
            return Err(ArchiveError::Member(
                name.to_string(),
                format!("{size} bytes, more than the {MAX_JSON_MEMBER} allowed for metadata"),
            ));
        }
        let read = self
            .metadata_read
            .load(Ordering::Relaxed)
            .saturating_add(size);
        if read > MAX_METADATA_BYTES {
            return Err(ArchiveError::Member(
                name.to_string(),
                format!(
                    "the metadata read from this archive would pass {MAX_METADATA_BYTES} bytes \
                     (a manifest or index naming the same members over and over?)"
                ),
            ));
        }
        self.metadata_read.store(read, Ordering::Relaxed);
        let mut out = Vec::with_capacity(size as usize);
        self.reader(name)?
            .read_to_end(&mut out)
            .map_err(|source| self.member_io(name, source))?;
        Ok(out)
    }
}

/// Reads a byte range of the archive file with positioned reads.
pub struct MemberReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for MemberReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the archive ends inside this member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(dir: &Path) -> PathBuf {
        let path = dir.join("t.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("./a/data.bin", &[7u8; 3000]);
        add("b.json", b"{}");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_cksum();
        b.append_link(&mut h, "c/layer.tar", "../a/data.bin")
            .unwrap();
        b.finish().unwrap();
        path
    }

    /// A GNU long name record claiming 256 MiB (sparse zeros on disk): the
    /// index refuses it after reading a bounded part, instead of holding
    /// the whole name in memory.
    #[test]
    fn a_huge_gnu_long_name_is_refused_while_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.tar");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        let claimed: u64 = 256 << 20;
        h.set_size(claimed);
        h.set_mode(0o644);
        h.set_cksum();
        let f = File::create(&path).unwrap();
        f.write_all_at(h.as_bytes(), 0).unwrap();
        f.set_len(512 + claimed + 2048).unwrap();
        let err = TarIndex::open(&path).err().expect("a hostile long name");
        assert!(err.to_string().contains("exceed"), "{err}");
    }

    #[test]
    fn members_read_as_ranges_and_links_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let idx = TarIndex::open(&build(dir.path())).unwrap();
        let mut v = Vec::new();
        idx.reader("c/layer.tar")
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        assert_eq!(v, vec![7u8; 3000]);
        assert_eq!(idx.read_small("./b.json").unwrap(), b"{}");
        assert!(matches!(idx.locate("nope"), Err(ArchiveError::Missing(_))));
    }

    /// An archive cut short inside a member (a copy that stopped, with its
    /// mtime kept) is refused with the member named.
    #[test]
    fn a_member_cut_short_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(100_000);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "blobs/sha256/layer", &[3u8; 100_000][..])
            .unwrap();
        b.finish().unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(60_000)
            .unwrap();
        let idx = TarIndex::open(&path).unwrap();
        let e = idx
            .reader("blobs/sha256/layer")
            .unwrap()
            .read_to_end(&mut Vec::new())
            .map_err(|source| idx.member_io("blobs/sha256/layer", source))
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("\"blobs/sha256/layer\"") && text.contains("ends inside"),
            "{text}"
        );
    }

    #[test]
    fn compressed_archive_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.tar.gz");
        std::fs::write(&p, [0x1f, 0x8b, 8, 0]).unwrap();
        let e = TarIndex::open(&p).err().unwrap();
        assert!(e.to_string().contains("uncompressed"), "{e}");
    }

    /// A drop naming one metadata member over and over (the same config
    /// for every entry of a manifest.json, say) is refused once the
    /// metadata read from it passes the budget, not read without end.
    #[test]
    fn metadata_read_from_one_drop_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let big = vec![b' '; 8 << 20];
        let mut h = tar::Header::new_gnu();
        h.set_size(big.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "config.json", &big[..]).unwrap();
        b.finish().unwrap();
        let idx = TarIndex::open(&path).unwrap();
        let fits = (MAX_METADATA_BYTES / big.len() as u64) as usize;
        for _ in 0..fits {
            idx.read_small("config.json").unwrap();
        }
        let e = idx.read_small("config.json").unwrap_err();
        assert!(e.to_string().contains("over and over"), "{e}");
    }

    /// The spool's name may lead somewhere else by the time it is opened:
    /// a symlink is not followed, and a FIFO is refused without blocking.
    #[test]
    fn a_drop_that_is_a_symlink_or_a_fifo_is_refused_without_following_or_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let real = build(dir.path());
        let link = dir.path().join("link.tar");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(TarIndex::open(&link).is_err());
        let fifo = dir.path().join("fifo.tar");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let e = TarIndex::open(&fifo).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("./a//b/"), "a/b");
        assert_eq!(normalize("a/../b"), "b");
        assert_eq!(normalize("/x"), "x");
    }
}
