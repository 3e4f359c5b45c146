//! The content-addressed store of verified objects: `blobs/sha256/<hex>`.
//!
//! A file enters only after its bytes hashed to its name, and it enters by
//! rename (fsynced, directory fsynced), so the store never holds a partial
//! or unverified object: presence in the store is what "verified" means,
//! across restarts too.

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use weir_proto::ObjectId;

use crate::state::fsync_dir;

/// Read size while hashing: large enough for full-speed sha256, small
/// enough to keep memory flat.
const HASH_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlobStoreError {
    #[error("blob store {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("object {expected}: content hashes to {actual} ({len} bytes); discarded")]
    Mismatch {
        expected: String,
        actual: String,
        len: u64,
    },
    #[error("object {expected}: hashing stopped because the gateway is stopping")]
    Interrupted { expected: String },
}

/// Verified objects by sha256.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the store under `root`; files left in `tmp/` by a
    /// crash are removed.
    pub fn open(root: &Path) -> Result<BlobStore, BlobStoreError> {
        let store = BlobStore {
            root: root.to_path_buf(),
        };
        for dir in [store.sha_dir(), store.tmp_dir()] {
            std::fs::create_dir_all(&dir).map_err(|e| store.io(&dir, "creating directory", e))?;
        }
        let tmp = store.tmp_dir();
        let entries = std::fs::read_dir(&tmp).map_err(|e| store.io(&tmp, "listing", e))?;
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(store)
    }

    fn io(&self, path: &Path, what: &'static str, source: std::io::Error) -> BlobStoreError {
        BlobStoreError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }

    fn sha_dir(&self) -> PathBuf {
        self.root.join("sha256")
    }

    /// Scratch space on the store's file system, for copies that are then
    /// renamed in.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the object lives once verified.
    pub fn path_of(&self, id: &ObjectId) -> PathBuf {
        self.sha_dir().join(id.hex())
    }

    pub fn contains(&self, id: &ObjectId) -> bool {
        self.path_of(id).is_file()
    }

    /// Size of a stored object.
    pub fn len_of(&self, id: &ObjectId) -> Result<u64, BlobStoreError> {
        let p = self.path_of(id);
        std::fs::metadata(&p)
            .map(|m| m.len())
            .map_err(|e| self.io(&p, "reading size", e))
    }

    pub fn open_object(&self, id: &ObjectId) -> Result<File, BlobStoreError> {
        let p = self.path_of(id);
        File::open(&p).map_err(|e| self.io(&p, "opening", e))
    }

    pub fn read_object(&self, id: &ObjectId) -> Result<Vec<u8>, BlobStoreError> {
        let p = self.path_of(id);
        std::fs::read(&p).map_err(|e| self.io(&p, "reading", e))
    }

    /// Every object in the store.
    pub fn ids(&self) -> Result<HashSet<ObjectId>, BlobStoreError> {
        let dir = self.sha_dir();
        let mut out = HashSet::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| self.io(&dir, "listing", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.io(&dir, "listing", e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(id) = ObjectId::from_digest(&format!("sha256:{name}")) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// Moves `file` (exactly the object's bytes) into the store if its sha256
    /// is `id`; otherwise leaves it where it is and says what it hashed to.
    /// `stop` is polled while hashing so a large object does not hold up a
    /// shutdown. The file must be on the store's file system.
    pub fn adopt(
        &self,
        file: &Path,
        id: &ObjectId,
        stop: &dyn Fn() -> bool,
    ) -> Result<u64, BlobStoreError> {
        self.adopt_hashed(file, id, RunningDigest::default(), stop)
    }

    /// Like [`adopt`](Self::adopt), with the file's first `digest.hashed()`
    /// bytes already hashed into `digest` (while the object arrived); only
    /// the rest is read. The caller vouches that those bytes did not change.
    pub fn adopt_hashed(
        &self,
        file: &Path,
        id: &ObjectId,
        mut digest: RunningDigest,
        stop: &dyn Fn() -> bool,
    ) -> Result<u64, BlobStoreError> {
        let f = File::open(file).map_err(|e| self.io(file, "opening", e))?;
        let len = f
            .metadata()
            .map_err(|e| self.io(file, "reading metadata", e))?
            .len();
        if digest.hashed() > len {
            digest = RunningDigest::default();
        }
        let complete = digest
            .advance(&f, len, stop)
            .map_err(|e| self.io(file, "hashing", e))?;
        if !complete {
            return Err(BlobStoreError::Interrupted {
                expected: id.digest(),
            });
        }
        let actual = digest.finish();
        if actual != *id {
            return Err(BlobStoreError::Mismatch {
                expected: id.digest(),
                actual: actual.digest(),
                len,
            });
        }
        f.sync_all().map_err(|e| self.io(file, "fsync", e))?;
        drop(f);
        let dest = self.path_of(id);
        std::fs::rename(file, &dest).map_err(|e| self.io(&dest, "renaming into the store", e))?;
        let dir = self.sha_dir();
        fsync_dir(&dir).map_err(|e| self.io(&dir, "fsync", e))?;
        Ok(len)
    }

    /// Stores bytes already in memory (small objects, tests).
    pub fn insert_bytes(&self, bytes: &[u8]) -> Result<ObjectId, BlobStoreError> {
        let id = ObjectId::of_bytes(bytes);
        if self.contains(&id) {
            return Ok(id);
        }
        let tmp = self
            .tmp_dir()
            .join(format!("{}.{}", id.hex(), std::process::id()));
        std::fs::write(&tmp, bytes).map_err(|e| self.io(&tmp, "writing", e))?;
        self.adopt(&tmp, &id, &|| false)?;
        Ok(id)
    }
}

/// Bytes hashed between two hand-backs of their page cache.
const RECYCLE_EVERY: u64 = 8 << 20;
/// The largest unit the page cache holds a file's bytes in (a PMD folio).
const LARGEST_FOLIO: u64 = 2 << 20;

/// Hands the page cache of `file`'s bytes `from..to` back to the kernel
/// (whole pages only; dirty ones are left to writeback). The receiver
/// writes each staged byte once and reads it once to hash it, so the
/// pages are of no more use, and freed right away they are what its next
/// writes get. Left cached, the next writes take fresh pages instead,
/// which on a virtual machine that returns free memory to its host cost
/// up to nine times as much CPU to fill (2.8–3.5 against 0.38 CPU-s per
/// GiB on the development machine): the largest share of the receiver's
/// CPU.
// posix_fadvise has no safe wrapper in std.
#[allow(unsafe_code)]
fn drop_cached(file: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    if to <= from {
        return;
    }
    // The kernel drops whole folios only (up to 2 MiB on ext4): the one
    // the last call's range ended inside is dropped now, once hashed.
    let from = from / LARGEST_FOLIO * LARGEST_FOLIO;
    // SAFETY: plain syscall on a descriptor this function borrows.
    let r = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            from as libc::off_t,
            (to - from) as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::from_raw_os_error(r), "page cache not handed back");
    }
}

/// The sha256 of a file's first bytes, carried forward as more of the file
/// becomes final: an object arriving in order is mostly hashed by the time
/// its last block lands.
#[derive(Clone, Default)]
pub struct RunningDigest {
    hasher: Sha256,
    hashed: u64,
}

impl RunningDigest {
    /// Bytes hashed so far (from offset 0).
    pub fn hashed(&self) -> u64 {
        self.hashed
    }

    /// Hashes `file` from where the digest stands up to `upto`. Returns
    /// false if `stop` said so midway (what was hashed stays hashed).
    pub fn advance(
        &mut self,
        file: &File,
        upto: u64,
        stop: &dyn Fn() -> bool,
    ) -> std::io::Result<bool> {
        let mut buf = vec![0u8; HASH_BUFFER.min((upto.saturating_sub(self.hashed)) as usize)];
        let mut behind = self.hashed;
        while self.hashed < upto {
            if stop() {
                return Ok(false);
            }
            if self.hashed - behind >= RECYCLE_EVERY {
                drop_cached(file, behind, self.hashed);
                behind = self.hashed;
            }
            let want = buf.len().min((upto - self.hashed) as usize);
            let n = match file.read_at(&mut buf[..want], self.hashed) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("file ends at {} bytes, {upto} expected", self.hashed),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.hasher.update(&buf[..n]);
            self.hashed += n as u64;
        }
        drop_cached(file, behind, self.hashed);
        Ok(true)
    }

    pub fn finish(self) -> ObjectId {
        ObjectId(self.hasher.finalize().into())
    }
}

/// The running digests of the objects arriving, each for one generation of
/// its object: a restarted object starts over.
#[derive(Default)]
pub struct RunningDigests(std::collections::HashMap<ObjectId, (u64, RunningDigest)>);

impl RunningDigests {
    /// Hashes `object`'s file further, up to `upto`. Returns false if
    /// `stop` said so midway.
    pub fn advance(
        &mut self,
        object: ObjectId,
        generation: u64,
        file: &File,
        upto: u64,
        stop: &dyn Fn() -> bool,
    ) -> std::io::Result<bool> {
        let (g, digest) = self
            .0
            .entry(object)
            .or_insert((generation, RunningDigest::default()));
        if *g != generation {
            (*g, *digest) = (generation, RunningDigest::default());
        }
        let r = digest.advance(file, upto, stop);
        if r.is_err() {
            // Whatever was read, the finish hashes the whole file instead.
            self.0.remove(&object);
        }
        r
    }

    /// The digest so far of this generation of `object` (empty if none),
    /// forgotten here.
    pub fn take(&mut self, object: &ObjectId, generation: u64) -> RunningDigest {
        self.0
            .remove(object)
            .filter(|(g, _)| *g == generation)
            .map(|(_, d)| d)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `bytes` arrived in `dir`, as the shard stage leaves one.
    fn incoming(dir: &Path, bytes: &[u8]) -> PathBuf {
        let f = dir.join("incoming");
        std::fs::write(&f, bytes).unwrap();
        f
    }

    #[test]
    fn verified_file_enters_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let f = incoming(dir.path(), b"layer bytes");
        let id = ObjectId::of_bytes(b"layer bytes");
        assert!(!store.contains(&id));
        assert_eq!(store.adopt(&f, &id, &|| false).unwrap(), 11);
        assert!(store.contains(&id));
        assert!(!f.exists());
        assert_eq!(store.read_object(&id).unwrap(), b"layer bytes");
        assert_eq!(store.ids().unwrap(), HashSet::from([id]));
    }

    #[test]
    fn mismatching_file_is_refused_and_named_by_both_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let f = incoming(dir.path(), b"corrupted");
        let id = ObjectId::of_bytes(b"original");
        let err = store.adopt(&f, &id, &|| false).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, BlobStoreError::Mismatch { .. }));
        assert!(msg.contains(&id.digest()), "{msg}");
        assert!(
            msg.contains(&ObjectId::of_bytes(b"corrupted").digest()),
            "{msg}"
        );
        assert!(!store.contains(&id));
        assert!(store.ids().unwrap().is_empty());
    }

    #[test]
    fn stale_temporary_files_are_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        std::fs::write(store.tmp_dir().join("half"), b"x").unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[allow(unsafe_code)] // fstatfs has no safe wrapper in std.
    fn on_tmpfs(file: &File) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: fstatfs fills the zeroed struct it is given.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
        r == 0 && st.f_type == libc::TMPFS_MAGIC
    }

    /// Of the whole pages of `file`'s first `upto` bytes: how many are in
    /// the page cache, out of how many.
    #[allow(unsafe_code)] // mmap and mincore have no safe wrapper in std.
    fn cached_pages(file: &File, upto: u64) -> (usize, usize) {
        use std::os::fd::AsRawFd;
        let len = file.metadata().unwrap().len() as usize;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of a file this test owns,
        // unmapped before return; mincore only reads the mapping's state.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
            libc::munmap(map, len);
        }
        vec.truncate(upto as usize / page);
        (vec.iter().filter(|v| **v & 1 == 1).count(), vec.len())
    }

    #[test]
    fn hashed_bytes_leave_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(24u32 << 20)).map(|i| (i % 253) as u8).collect();
        let f = incoming(dir.path(), &bytes);
        let file = File::open(&f).unwrap();
        // Written back, so nothing is left dirty for the kernel to keep.
        file.sync_all().unwrap();
        let len = bytes.len() as u64;
        if on_tmpfs(&file) {
            eprintln!("skipped: on tmpfs the page cache is where the file lives");
            return;
        }
        assert_eq!(std::fs::read(&f).unwrap(), bytes);
        let (cached, pages) = cached_pages(&file, len);
        assert!(
            cached > pages / 2,
            "read back: {cached} of {pages} pages cached"
        );
        let mut digest = RunningDigest::default();
        // A folio the hashed bytes end inside stays (ext4 caches files in
        // folios of up to 2 MiB), readahead caches pages past them: those
        // before go.
        assert!(digest.advance(&file, len - 10_000, &|| false).unwrap());
        let (cached, pages) = cached_pages(&file, len - (4 << 20));
        assert!(
            cached <= 16,
            "hashed ahead: {cached} of {pages} pages still cached"
        );
        assert!(digest.advance(&file, len, &|| false).unwrap());
        let (cached, pages) = cached_pages(&file, len);
        assert!(
            cached <= 16,
            "hashed: {cached} of {pages} pages still cached"
        );
        assert_eq!(digest.finish(), ObjectId::of_bytes(&bytes));
    }

    #[test]
    fn a_digest_carried_forward_equals_the_whole_file_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let id = ObjectId::of_bytes(&bytes);
        let f = incoming(dir.path(), &bytes);
        let mut digest = RunningDigest::default();
        let file = File::open(&f).unwrap();
        for upto in [0, 1, 1 << 20, 1_500_001, 2_999_999] {
            assert!(digest.advance(&file, upto, &|| false).unwrap());
            assert_eq!(digest.hashed(), upto);
        }
        assert_eq!(
            store.adopt_hashed(&f, &id, digest, &|| false).unwrap(),
            bytes.len() as u64
        );
        assert_eq!(store.read_object(&id).unwrap(), bytes);
    }

    #[test]
    fn a_digest_of_other_bytes_is_caught_at_adoption() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let f = incoming(dir.path(), b"the first bytes changed after hashing");
        let mut digest = RunningDigest::default();
        let other = dir.path().join("other");
        std::fs::write(&other, b"THE FIRST").unwrap();
        digest
            .advance(&File::open(&other).unwrap(), 9, &|| false)
            .unwrap();
        let id = ObjectId::of_bytes(b"the first bytes changed after hashing");
        let err = store.adopt_hashed(&f, &id, digest, &|| false).unwrap_err();
        assert!(matches!(err, BlobStoreError::Mismatch { .. }), "{err}");
        assert!(f.exists() && !store.contains(&id));
    }

    #[test]
    fn hashing_stops_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let f = incoming(dir.path(), b"abc");
        let err = store
            .adopt(&f, &ObjectId::of_bytes(b"abc"), &|| true)
            .unwrap_err();
        assert!(matches!(err, BlobStoreError::Interrupted { .. }));
        assert!(f.exists());
    }
}
