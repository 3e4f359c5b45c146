//! The object store: payload files plus the sled database of the sender.
//!
//! Payloads (blobs, image objects) are files `state_dir/objects/<hex>`,
//! written under `state_dir/objects/tmp/`, fsynced, renamed into place and
//! the directory fsynced: a file under its final name is always whole. A
//! blob that is a member of a dropped archive as it is (an OCI archive's
//! blobs, compressed layers) is not copied: the archive is hard-linked
//! into `state_dir/objects/archives/` (fsynced once) and the blob is a
//! small `objects/<hex>.extent` file naming that link, the offset and the
//! length, written the same way. Where the link cannot be made (the spool
//! on another file system) the blob is copied as before. sled
//! (`state_dir/db`) keeps only small records:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `images` | image object digest | [`ImageRecord`]: the queue, in ingest order |
//! | `progress` | object digest | [`ObjectProgress`]: passes done, position in the current pass |
//! | `sent` | `manifest digest` + ` ` + `repository:tag` | [`SentRecord`] |
//! | `audit` | u64 big-endian, increasing | [`AuditEntry`], append-only |
//! | `layers` | `gzip-6 <diff id>` | digest of the compressed layer |
//! | `drops` | drop file name | [`DropRecord`]: committed, not yet moved to done/ |
//! | `meta` | `session_id` | last session id, u64 big-endian |
//! | `ledger`, `meta` `ledger_chain` | see [`crate::ledger`] | the image ledger |
//!
//! Every accepted image is numbered in the image ledger when it is
//! committed ([`ObjectStore::commit_drop`]): the record goes inside the
//! image object, so the store, not the intake, writes that object.
//!
//! sled's own flush does not fsync on Linux, so every commit point calls
//! [`ObjectStore::commit`]: the host's [`StateDb::commit`], the one commit
//! point both gateways share.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use weir_host::durable::fsync_dir;
use weir_host::state::{StateDb, StateError};
use weir_proto::ledger::RecordFields;
use weir_proto::{
    BlobRef, Destination, FecParams, ManifestBytes, ObjectId, Origin, Referrer, TransferManifest,
    Verdict,
};

use crate::ledger::{IssuedRecord, LedgerChain};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state database: {0}")]
    Db(#[from] sled::Error),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("state database record {key}: {source}")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("content has digest {got}, expected {expected}")]
    DigestMismatch { expected: String, got: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where a payload's bytes are: its own file, or a range of a dropped
/// archive the store holds a hard link to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadSource {
    pub path: PathBuf,
    pub offset: u64,
    /// The payload's length (the file's, or the extent's).
    pub len: u64,
}

/// The content of an `<hex>.extent` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Extent {
    /// File name under `objects/archives/`.
    archive: String,
    offset: u64,
    len: u64,
}

/// Largest `.extent` file read: they are a line of JSON.
const MAX_EXTENT_FILE: u64 = 4096;

/// A sled transaction that could not commit.
fn transaction_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(s) => StoreError::Db(s),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Db(sled::Error::Unsupported("transaction aborted".into()))
        }
    }
}

/// A dropped archive hard-linked into the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedArchive {
    name: String,
    path: PathBuf,
}

/// One blob an image names, as the queue keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMember {
    pub digest: String,
    pub size: u64,
}

/// An image in the queue: its image object and the blobs it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Digest of the image object (the encoded transfer manifest).
    pub image: String,
    pub image_len: u64,
    pub manifest_digest: String,
    /// `repository:tag` at the destination (the first tag), for logs.
    pub destination: String,
    /// Every `repository:tag` (or bare repository) it is sent to.
    pub references: Vec<String>,
    /// Drop file it came from.
    pub source: String,
    /// Unix seconds.
    pub ingested_at: u64,
    /// Ingest order; round-robin follows it.
    pub seq: u64,
    pub blobs: Vec<BlobMember>,
}

/// Where an object stands in the carousel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectProgress {
    /// Whole passes sent, counted ones and idle ones.
    pub passes_done: u64,
    /// Passes this object is owed before it only cycles when idle.
    pub target: u64,
    /// Next group of blocks to send in the current pass.
    pub next_group: u32,
    /// The layout `next_group` refers to; another layout restarts the pass.
    pub fec: FecParams,
}

/// An image already queued for a destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentRecord {
    pub image: String,
    pub source: String,
    pub at: u64,
}

/// What happened to a drop; the audit log never forgets one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: u64,
    pub source: String,
    /// `accepted`, `rejected` or `already-sent`.
    pub outcome: String,
    pub code: Option<String>,
    pub message: String,
    /// Destination references.
    pub references: Vec<String>,
    pub manifest_digests: Vec<String>,
}

/// A drop whose images are committed, or whose refusal is: moving it (to
/// done/, or to rejected/ with its reason) is what remains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRecord {
    pub size: u64,
    pub modified_ns: u64,
    pub images: Vec<String>,
    /// Refused (or found already sent): its reason code and message, kept
    /// until it is moved, so a restart between the moves of its scan
    /// report and of itself finishes the same verdict, not one judged
    /// again without the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<(String, String)>,
}

/// A payload file written and in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredObject {
    pub id: ObjectId,
    pub len: u64,
}

/// An image intake accepted: its transfer manifest but for the ledger
/// record, which the store assigns as it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedImage {
    pub destination: Destination,
    /// The top-level manifest, or the index for a multi-arch image.
    pub manifest: ManifestBytes,
    pub children: Vec<ManifestBytes>,
    /// The blobs of the manifests and of the referrers, each once.
    pub blobs: Vec<BlobRef>,
    /// Signatures, attestations and SBOMs that cross with it.
    pub referrers: Vec<Referrer>,
    pub origin: Origin,
    pub verdict: Verdict,
    /// Every `repository:tag` (or bare repository) it is sent to.
    pub references: Vec<String>,
}

impl AcceptedImage {
    fn record_fields(&self) -> RecordFields {
        RecordFields {
            manifest_digest: self.manifest.digest.clone(),
            destination: self.destination.clone(),
            source: self.origin.source.clone(),
            verdict: self.verdict.clone(),
            accepted_at: self.origin.ingested_at,
        }
    }

    /// The image object's content, with its ledger record.
    fn transfer_manifest(&self, ledger: weir_proto::ChainRecord) -> TransferManifest {
        TransferManifest {
            destination: self.destination.clone(),
            manifest: self.manifest.clone(),
            children: self.children.clone(),
            blobs: self.blobs.clone(),
            referrers: self.referrers.clone(),
            origin: self.origin.clone(),
            verdict: self.verdict.clone(),
            ledger,
        }
    }
}

/// Everything intake commits for one accepted drop or pulled image,
/// landing together.
pub struct DropCommit {
    pub source: String,
    /// A drop's record (what is left is moving it to done/); a pull has
    /// no file to move. Its `images` are filled in by the commit.
    pub drop: Option<DropRecord>,
    pub images: Vec<AcceptedImage>,
    pub audit: AuditEntry,
}

pub struct ObjectStore {
    objects_dir: PathBuf,
    tmp_dir: PathBuf,
    db: StateDb,
    images: sled::Tree,
    progress: sled::Tree,
    sent: sled::Tree,
    audit: sled::Tree,
    layers: sled::Tree,
    drops: sled::Tree,
    meta: sled::Tree,
    pull_refusals: sled::Tree,
    ledger: LedgerChain,
    archives_dir: PathBuf,
    /// Archives linked by this process, by (device, inode) of the drop: the
    /// blobs of one drop share one link.
    linked: std::sync::Mutex<std::collections::HashMap<(u64, u64), LinkedArchive>>,
}

/// A pulled image the policy refused: not tried again until its digest or
/// the rules change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRefusal {
    pub code: String,
    pub message: String,
    /// Fingerprint of the rules (and scanner settings) that refused it.
    pub rules: String,
    pub at: u64,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain records of strings and numbers always serialize.
    serde_json::to_vec(v).unwrap_or_default()
}

fn from_json<T: for<'a> Deserialize<'a>>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Record {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn sent_key(manifest_digest: &str, destination: &str) -> String {
    format!("{manifest_digest} {destination}")
}

impl ObjectStore {
    /// Opens (or creates) the store under `state_dir`; drops leftovers of
    /// writes a crash interrupted.
    pub fn open(state_dir: &Path) -> Result<ObjectStore, StoreError> {
        let objects_dir = state_dir.join("objects");
        let tmp_dir = objects_dir.join("tmp");
        std::fs::create_dir_all(&tmp_dir).map_err(io("creating", &tmp_dir))?;
        if let Ok(entries) = std::fs::read_dir(&tmp_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let archives_dir = objects_dir.join("archives");
        std::fs::create_dir_all(&archives_dir).map_err(io("creating", &archives_dir))?;
        let db = StateDb::open(&state_dir.join("db"))?;
        let ledger = LedgerChain::open(&db, state_dir)?;
        Ok(ObjectStore {
            archives_dir,
            linked: Default::default(),
            ledger,
            images: db.tree("images")?,
            progress: db.tree("progress")?,
            sent: db.tree("sent")?,
            audit: db.tree("audit")?,
            layers: db.tree("layers")?,
            drops: db.tree("drops")?,
            meta: db.tree("meta")?,
            pull_refusals: db.tree("pull_refusals")?,
            db,
            objects_dir,
            tmp_dir,
        })
    }

    /// A commit point: flushes sled and fsyncs its files, so what was
    /// written survives a power cut, not only a crash.
    pub fn commit(&self, point: &'static str) -> Result<(), StoreError> {
        Ok(self.db.commit(point)?)
    }

    // ---- payload files ----

    pub fn object_path(&self, id: &ObjectId) -> PathBuf {
        self.objects_dir.join(id.hex())
    }

    fn extent_path(&self, id: &ObjectId) -> PathBuf {
        self.objects_dir.join(format!("{}.extent", id.hex()))
    }

    pub fn has_object(&self, id: &ObjectId) -> bool {
        self.object_path(id).is_file() || self.extent_path(id).is_file()
    }

    /// Where the payload's bytes are, if it is here. An extent file that
    /// does not parse or names something outside the archives folder is
    /// an error: the store wrote it.
    pub fn payload(&self, id: &ObjectId) -> Result<Option<PayloadSource>, StoreError> {
        let file = self.object_path(id);
        if let Ok(m) = std::fs::metadata(&file) {
            if m.is_file() {
                return Ok(Some(PayloadSource {
                    path: file,
                    offset: 0,
                    len: m.len(),
                }));
            }
        }
        let path = self.extent_path(id);
        let bytes = match File::open(&path) {
            Ok(f) => {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_EXTENT_FILE), &mut v)
                    .map_err(io("reading", &path))?;
                v
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let key = path.display().to_string();
        let extent: Extent = from_json(key.as_bytes(), &bytes)?;
        if extent.archive.is_empty()
            || extent.archive.contains('/')
            || extent.archive.starts_with('.')
        {
            return Err(StoreError::Io {
                what: "reading",
                path,
                source: std::io::Error::other(format!("archive name {:?}", extent.archive)),
            });
        }
        Ok(Some(PayloadSource {
            path: self.archives_dir.join(&extent.archive),
            offset: extent.offset,
            len: extent.len,
        }))
    }

    /// True if the payload is here; marks it as just used, so the sweep of
    /// unreferenced files (which spares recent ones) cannot take it while
    /// the ingest that reuses it has not committed yet.
    pub fn reuse(&self, id: &ObjectId) -> bool {
        [self.object_path(id), self.extent_path(id)]
            .iter()
            .any(|p| match std::fs::File::options().append(true).open(p) {
                Ok(f) => {
                    let _ = f.set_modified(std::time::SystemTime::now());
                    true
                }
                Err(_) => false,
            })
    }

    /// When the payload's file or extent was last written or reused.
    pub fn modified(&self, id: &ObjectId) -> Option<std::time::SystemTime> {
        [self.object_path(id), self.extent_path(id)]
            .iter()
            .find_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    }

    /// Payloads in the store: (id, modified time of its file or extent).
    pub fn stored_objects(&self) -> Result<Vec<(ObjectId, std::time::SystemTime)>, StoreError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.objects_dir).map_err(io("listing", &self.objects_dir))? {
            let e = e.map_err(io("listing", &self.objects_dir))?;
            let name = e.file_name();
            let Some(id) = name
                .to_str()
                .map(|n| n.strip_suffix(".extent").unwrap_or(n))
                .and_then(|n| ObjectId::from_digest(&format!("sha256:{n}")).ok())
            else {
                continue; // tmp/, archives/ and anything else
            };
            let modified = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::now());
            out.push((id, modified));
        }
        Ok(out)
    }

    /// Hard-links the archive `drop`, open as `opened`, into the store and
    /// makes its bytes durable, once per archive; `None` where no link can
    /// be made (another file system) or where the name no longer leads to
    /// the file that was opened and checked: the caller copies from
    /// `opened` instead.
    pub fn link_archive(
        &self,
        drop: &Path,
        opened: &File,
    ) -> Result<Option<LinkedArchive>, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let meta = opened.metadata().map_err(io("reading", drop))?;
        let key = (meta.dev(), meta.ino());
        let mut linked = self.linked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = linked.get(&key) {
            let same = std::fs::metadata(&l.path).is_ok_and(|m| (m.dev(), m.ino()) == key);
            if same {
                return Ok(Some(l.clone()));
            }
            linked.remove(&key);
        }
        if !meta.is_file() {
            return Ok(None);
        }
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{}-{n}.tar", unix_now(), std::process::id());
        let path = self.archives_dir.join(&name);
        if let Err(e) = std::fs::hard_link(drop, &path) {
            tracing::debug!(drop = %drop.display(), error = %e,
                "archive not linked into the state directory; its blobs are copied");
            return Ok(None);
        }
        // The spool's name may have been replaced (by a symlink, say)
        // since the drop was opened: keep the link only to that file.
        let linked_to = std::fs::symlink_metadata(&path).ok();
        if !linked_to.is_some_and(|m| m.is_file() && (m.dev(), m.ino()) == key) {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(drop = %drop.display(),
                "the drop's name no longer leads to the file that was checked; its blobs are copied");
            return Ok(None);
        }
        // The drop's bytes may still be in the page cache only.
        File::open(&path)
            .and_then(|f| f.sync_data())
            .map_err(io("syncing", &path))?;
        fsync_dir(&self.archives_dir).map_err(io("syncing directory", &self.archives_dir))?;
        let l = LinkedArchive { name, path };
        linked.insert(key, l.clone());
        Ok(Some(l))
    }

    /// Records that the payload `id` is `len` bytes at `offset` of a linked
    /// archive. The caller has checked the bytes hash to `id`.
    pub fn put_extent(
        &self,
        archive: &LinkedArchive,
        offset: u64,
        len: u64,
        id: &ObjectId,
    ) -> Result<StoredObject, StoreError> {
        if self.reuse(id) {
            return Ok(StoredObject { id: *id, len });
        }
        let extent = Extent {
            archive: archive.name.clone(),
            offset,
            len,
        };
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .tmp_dir
            .join(format!("{}-extent-{n}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&to_json(&extent))?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("writing", &tmp)(e));
        }
        let final_path = self.extent_path(id);
        std::fs::rename(&tmp, &final_path).map_err(io("renaming into", &final_path))?;
        fsync_dir(&self.objects_dir).map_err(io("syncing directory", &self.objects_dir))?;
        weir_host::crash::crash_point("tx.objects.payload-stored");
        Ok(StoredObject { id: *id, len })
    }

    /// Removes linked archives no extent names any more, once older than
    /// `grace` (an ingest links its archive before it writes the extents).
    /// Returns how many went.
    pub fn sweep_archives(&self, grace: std::time::Duration) -> Result<usize, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let mut named = std::collections::HashSet::new();
        for e in std::fs::read_dir(&self.objects_dir).map_err(io("listing", &self.objects_dir))? {
            let e = e.map_err(io("listing", &self.objects_dir))?;
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".extent")) else {
                continue;
            };
            let Ok(id) = ObjectId::from_digest(&format!("sha256:{hex}")) else {
                continue;
            };
            if let Ok(Some(src)) = self.payload(&id) {
                if let Some(f) = src.path.file_name() {
                    named.insert(f.to_os_string());
                }
            }
        }
        let now = unix_now() as i64;
        let mut removed = 0;
        for e in std::fs::read_dir(&self.archives_dir).map_err(io("listing", &self.archives_dir))? {
            let e = e.map_err(io("listing", &self.archives_dir))?;
            if named.contains(&e.file_name()) {
                continue;
            }
            // The link itself changed the inode's ctime: its age in the store.
            let age = e.metadata().map(|m| now - m.ctime()).unwrap_or(0);
            if age >= grace.as_secs() as i64 {
                let p = e.path();
                std::fs::remove_file(&p).map_err(io("removing", &p))?;
                let mut linked = self.linked.lock().unwrap_or_else(|e| e.into_inner());
                linked.retain(|_, l| l.path != p);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Starts writing a payload; the id is known once it is finished.
    pub fn writer(&self) -> Result<ObjectWriter, StoreError> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp_path = self.tmp_dir.join(format!("{}-{n}", std::process::id()));
        let file = File::create(&tmp_path).map_err(io("creating", &tmp_path))?;
        Ok(ObjectWriter {
            file: BufWriter::with_capacity(256 << 10, file),
            tmp_path,
            objects_dir: self.objects_dir.clone(),
            hasher: Sha256::new(),
            len: 0,
            renamed: false,
        })
    }

    /// Stores a small payload (an image object) from memory.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<StoredObject, StoreError> {
        let id = ObjectId::of_bytes(bytes);
        if self.reuse(&id) {
            return Ok(StoredObject {
                id,
                len: bytes.len() as u64,
            });
        }
        let mut w = self.writer()?;
        let tmp = w.tmp_path.clone();
        w.write_all(bytes).map_err(io("writing", &tmp))?;
        w.finish(Some(&id))
    }

    /// Deletes a payload file or extent (retention expired); a linked
    /// archive goes once no extent names it ([`sweep_archives`](Self::sweep_archives)).
    pub fn remove_object(&self, id: &ObjectId) -> Result<(), StoreError> {
        for p in [self.object_path(id), self.extent_path(id)] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("removing", &p)(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    // ---- session ----

    /// A new session id, greater than the last one, stored before use.
    pub fn begin_session(&self) -> Result<u64, StoreError> {
        let last = self
            .meta
            .get("session_id")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes);
        let id = weir_host::new_session_id(last);
        self.meta.insert("session_id", &id.to_be_bytes())?;
        self.commit("tx.session.begun")?;
        Ok(id)
    }

    // ---- queue ----

    /// Lands an accepted drop or pull: numbers each image in the image
    /// ledger and writes its image object (the record inside), then commits
    /// image records, ledger records, sent marks, the drop record and its
    /// audit entry, all or nothing, and a commit point. Returns the queue's
    /// records of the images, in order.
    pub fn commit_drop(&self, c: &DropCommit) -> Result<Vec<ImageRecord>, StoreError> {
        let audit_key = self.db.sled().generate_id()?.to_be_bytes();
        // Held until the head moves: one intake numbers at a time.
        let mut head_guard = self.ledger.lock();
        let mut head = *head_guard;
        let mut records = Vec::with_capacity(c.images.len());
        let mut issued = Vec::with_capacity(c.images.len());
        for img in &c.images {
            let record = head.next(img.record_fields());
            let object =
                self.put_bytes(&img.transfer_manifest(record.clone()).to_object_bytes())?;
            head = record.head();
            records.push(ImageRecord {
                image: object.id.digest(),
                image_len: object.len,
                manifest_digest: img.manifest.digest.clone(),
                destination: img.destination.display(),
                references: img.references.clone(),
                source: img.origin.source.clone(),
                ingested_at: img.origin.ingested_at,
                seq: self.next_seq()?,
                blobs: img
                    .blobs
                    .iter()
                    .map(|b| BlobMember {
                        digest: b.digest.clone(),
                        size: b.size,
                    })
                    .collect(),
            });
            issued.push(IssuedRecord {
                record,
                image: object.id.digest(),
            });
        }
        let drop = c.drop.clone().map(|mut d| {
            d.images = records.iter().map(|r| r.image.clone()).collect();
            d
        });
        let result: sled::transaction::TransactionResult<(), ()> = (
            &self.images,
            &self.sent,
            &self.drops,
            &self.audit,
            self.ledger.records_tree(),
        )
            .transaction(|(images, sent, drops, audit, ledger)| {
                for img in &records {
                    images.insert(img.image.as_bytes(), to_json(img))?;
                    let rec = SentRecord {
                        image: img.image.clone(),
                        source: c.source.clone(),
                        at: img.ingested_at,
                    };
                    for r in &img.references {
                        sent.insert(sent_key(&img.manifest_digest, r).as_bytes(), to_json(&rec))?;
                    }
                }
                for i in &issued {
                    let (key, value) = LedgerChain::entry(i);
                    ledger.insert(&key, value)?;
                }
                if let Some(d) = &drop {
                    drops.insert(c.source.as_bytes(), to_json(d))?;
                }
                audit.insert(&audit_key, to_json(&c.audit))?;
                Ok(())
            });
        result.map_err(transaction_error)?;
        self.commit("tx.ingest.drop-committed")?;
        self.ledger.committed(&mut head_guard, head);
        for i in &issued {
            tracing::info!(digest = %i.record.manifest_digest, image = %i.image,
                chain = %i.record.chain, seq = i.record.seq, hash = %i.record.hash().short(),
                destination = %i.record.destination.display(), "image numbered in the image ledger");
        }
        Ok(records)
    }

    /// Lands one pulled image (no drop file): [`ObjectStore::commit_drop`]
    /// for a single image; returns its queue record.
    pub fn commit_pulled(
        &self,
        image: AcceptedImage,
        audit: AuditEntry,
    ) -> Result<ImageRecord, StoreError> {
        let records = self.commit_drop(&DropCommit {
            source: image.origin.source.clone(),
            drop: None,
            images: vec![image],
            audit,
        })?;
        records.into_iter().next().ok_or_else(|| {
            StoreError::Db(sled::Error::Unsupported(
                "a commit of one image returned no record".into(),
            ))
        })
    }

    /// Prunes the image ledger's records beyond the newest `keep_records`
    /// whose images left the queue (retention over, passes done); see
    /// [`crate::ledger`]. Not durable until the caller's commit.
    pub fn prune_ledger(
        &self,
        keep_records: u64,
    ) -> Result<Option<(u64, weir_proto::ledger::Checkpoint)>, StoreError> {
        let queued: std::collections::HashSet<String> =
            self.images()?.into_iter().map(|r| r.image).collect();
        Ok(self.ledger.prune(
            keep_records,
            |issued| !queued.contains(&issued.image),
            weir_host::clock::unix_ms(),
        )?)
    }

    /// The image ledger's head, as heartbeats announce it.
    pub fn ledger_head(&self) -> weir_proto::LedgerHead {
        self.ledger.head()
    }

    /// The drop was moved to done/: nothing remains to finish.
    pub fn forget_drop(&self, source: &str) -> Result<(), StoreError> {
        self.drops.remove(source.as_bytes())?;
        Ok(())
    }

    pub fn drop_record(&self, source: &str) -> Result<Option<DropRecord>, StoreError> {
        match self.drops.get(source.as_bytes())? {
            Some(v) => Ok(Some(from_json(source.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Puts a queue record in place as it is, with no ledger record or
    /// sent mark: for tests of what reads the queue.
    #[cfg(test)]
    pub(crate) fn queue_record_for_test(&self, r: &ImageRecord) -> Result<(), StoreError> {
        self.images.insert(r.image.as_bytes(), to_json(r))?;
        self.commit("tx.ingest.drop-committed")
    }

    /// Every queued image, in ingest order.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.images.iter() {
            let (k, v) = kv?;
            out.push(from_json::<ImageRecord>(&k, &v)?);
        }
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }

    /// Next ingest sequence number: after every image ever queued.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.db.sled().generate_id()?)
    }

    /// Retention expired: the image leaves the queue (its sent marks stay).
    pub fn remove_image(&self, image: &str) -> Result<(), StoreError> {
        self.images.remove(image.as_bytes())?;
        Ok(())
    }

    pub fn progress(&self, id: &ObjectId) -> Result<Option<ObjectProgress>, StoreError> {
        let key = id.digest();
        match self.progress.get(key.as_bytes())? {
            Some(v) => Ok(Some(from_json(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Written at every group boundary; durable at sled's next flush (within
    /// half a second), which is what a crash can cost: that much resent.
    pub fn set_progress(&self, id: &ObjectId, p: &ObjectProgress) -> Result<(), StoreError> {
        self.progress.insert(id.digest().as_bytes(), to_json(p))?;
        Ok(())
    }

    pub fn remove_progress(&self, id: &ObjectId) -> Result<(), StoreError> {
        self.progress.remove(id.digest().as_bytes())?;
        Ok(())
    }

    // ---- sent images ----

    pub fn sent(
        &self,
        manifest_digest: &str,
        destination: &str,
    ) -> Result<Option<SentRecord>, StoreError> {
        let key = sent_key(manifest_digest, destination);
        match self.sent.get(key.as_bytes())? {
            Some(v) => Ok(Some(from_json(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    // ---- pull refusals ----

    pub fn pull_refusal(
        &self,
        manifest_digest: &str,
        destination: &str,
    ) -> Result<Option<PullRefusal>, StoreError> {
        let key = sent_key(manifest_digest, destination);
        match self.pull_refusals.get(key.as_bytes())? {
            Some(v) => Ok(Some(from_json(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Records a refused pull with its audit entry, then a commit point.
    pub fn refuse_pull(
        &self,
        manifest_digest: &str,
        destination: &str,
        refusal: &PullRefusal,
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let key = sent_key(manifest_digest, destination);
        self.pull_refusals
            .insert(key.as_bytes(), to_json(refusal))?;
        self.append_audit(audit)
    }

    // ---- audit ----

    /// Appends a refusal or an already-sent drop (accepts come with
    /// [`ObjectStore::commit_drop`]), then a commit point.
    /// Records a refused drop's verdict and its audit entry at once, before
    /// the drop is moved ([`DropRecord::refused`]).
    pub fn record_refusal(
        &self,
        source: &str,
        record: &DropRecord,
        entry: &AuditEntry,
    ) -> Result<(), StoreError> {
        let key = self.db.sled().generate_id()?.to_be_bytes();
        let result: sled::transaction::TransactionResult<(), ()> = (&self.drops, &self.audit)
            .transaction(|(drops, audit)| {
                drops.insert(source.as_bytes(), to_json(record))?;
                audit.insert(&key, to_json(entry))?;
                Ok(())
            });
        result.map_err(transaction_error)?;
        self.commit("tx.ingest.audit-appended")
    }

    pub fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let key = self.db.sled().generate_id()?.to_be_bytes();
        self.audit.insert(key, to_json(entry))?;
        self.commit("tx.ingest.audit-appended")
    }

    /// The audit log, oldest first.
    pub fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.audit.iter() {
            let (k, v) = kv?;
            out.push(from_json(&k, &v)?);
        }
        Ok(out)
    }

    // ---- compressed layer cache ----

    /// The compressed form of a layer made before, if its file is still here.
    pub fn cached_layer(&self, key: &str) -> Result<Option<StoredObject>, StoreError> {
        let Some(v) = self.layers.get(key.as_bytes())? else {
            return Ok(None);
        };
        let (digest, len): (String, u64) = from_json(key.as_bytes(), &v)?;
        let Ok(id) = ObjectId::from_digest(&digest) else {
            return Ok(None);
        };
        let on_disk = std::fs::metadata(self.object_path(&id))
            .map(|m| m.len())
            .ok();
        Ok((on_disk == Some(len) && self.reuse(&id)).then_some(StoredObject { id, len }))
    }

    pub fn cache_layer(&self, key: &str, obj: &StoredObject) -> Result<(), StoreError> {
        self.layers
            .insert(key.as_bytes(), to_json(&(obj.id.digest(), obj.len)))?;
        Ok(())
    }
}

/// Writes one payload under a temporary name, hashing as it goes.
pub struct ObjectWriter {
    file: BufWriter<File>,
    tmp_path: PathBuf,
    objects_dir: PathBuf,
    hasher: Sha256,
    len: u64,
    renamed: bool,
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl ObjectWriter {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fsyncs and renames into place. With `expected`, content of another
    /// digest is refused and thrown away.
    pub fn finish(mut self, expected: Option<&ObjectId>) -> Result<StoredObject, StoreError> {
        let id = ObjectId(std::mem::take(&mut self.hasher).finalize().into());
        if let Some(want) = expected {
            if *want != id {
                return Err(StoreError::DigestMismatch {
                    expected: want.digest(),
                    got: id.digest(),
                });
            }
        }
        self.file.flush().map_err(io("writing", &self.tmp_path))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(io("syncing", &self.tmp_path))?;
        let final_path = self.objects_dir.join(id.hex());
        std::fs::rename(&self.tmp_path, &final_path).map_err(io("renaming into", &final_path))?;
        self.renamed = true;
        fsync_dir(&self.objects_dir).map_err(io("syncing directory", &self.objects_dir))?;
        // A payload no committed drop names yet.
        weir_host::crash::crash_point("tx.objects.payload-stored");
        Ok(StoredObject { id, len: self.len })
    }
}

impl Drop for ObjectWriter {
    /// A writer given up on (error, refused content) leaves no file behind.
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A blob kept as a range of a hard-linked drop: readable where the
    /// store says, the same inode as the drop (no copy), shared by the
    /// blobs of one drop; removed with its extent, and the archive swept
    /// once nothing names it.
    #[test]
    fn a_blob_in_a_linked_archive_is_a_range_of_the_drop_not_a_copy() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(&dir.path().join("state")).unwrap();
        let drop = dir.path().join("drop.tar");
        std::fs::write(&drop, b"....blob-one....blob-two").unwrap();
        let opened = File::open(&drop).unwrap();
        let a = store.link_archive(&drop, &opened).unwrap().unwrap();
        assert_eq!(
            store.link_archive(&drop, &opened).unwrap().unwrap(),
            a,
            "one link per drop"
        );
        let one = ObjectId::of_bytes(b"blob-one");
        let two = ObjectId::of_bytes(b"blob-two");
        store.put_extent(&a, 4, 8, &one).unwrap();
        store.put_extent(&a, 16, 8, &two).unwrap();
        for (id, want) in [(one, b"blob-one"), (two, b"blob-two")] {
            assert!(store.has_object(&id));
            let src = store.payload(&id).unwrap().unwrap();
            assert_eq!(
                std::fs::metadata(&src.path).unwrap().ino(),
                std::fs::metadata(&drop).unwrap().ino()
            );
            let mut got = vec![0; src.len as usize];
            File::open(&src.path)
                .unwrap()
                .read_exact_at(&mut got, src.offset)
                .unwrap();
            assert_eq!(&got, want);
        }
        let listed: Vec<ObjectId> = store
            .stored_objects()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert!(listed.contains(&one) && listed.contains(&two));
        store.remove_object(&one).unwrap();
        assert!(!store.has_object(&one));
        assert_eq!(store.sweep_archives(std::time::Duration::ZERO).unwrap(), 0);
        store.remove_object(&two).unwrap();
        assert_eq!(
            store
                .sweep_archives(std::time::Duration::from_secs(3600))
                .unwrap(),
            0,
            "a link younger than the grace may belong to an ingest under way"
        );
        assert_eq!(store.sweep_archives(std::time::Duration::ZERO).unwrap(), 1);
        assert!(!a.path.exists() && drop.exists());
        // A hand-edited extent pointing outside the store is refused.
        std::fs::write(
            dir.path()
                .join(format!("state/objects/{}.extent", one.hex())),
            br#"{"archive":"../../etc/passwd","offset":0,"len":1}"#,
        )
        .unwrap();
        assert!(store.payload(&one).is_err());
    }

    /// The file sent is the file checked: a drop whose name was replaced
    /// after it was opened is not linked (the caller copies from the open
    /// file).
    #[test]
    fn an_archive_is_linked_only_while_its_name_leads_to_the_file_opened() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(&dir.path().join("state")).unwrap();
        let drop = dir.path().join("drop.tar");
        std::fs::write(&drop, b"checked bytes").unwrap();
        let opened = File::open(&drop).unwrap();
        // Swapped for a symlink to another file after it was opened.
        let elsewhere = dir.path().join("elsewhere.tar");
        std::fs::write(&elsewhere, b"other bytes").unwrap();
        std::fs::rename(&drop, dir.path().join("moved.tar")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &drop).unwrap();
        assert_eq!(store.link_archive(&drop, &opened).unwrap(), None);
        let archives: Vec<_> = std::fs::read_dir(dir.path().join("state/objects/archives"))
            .unwrap()
            .collect();
        assert!(archives.is_empty(), "no link left behind: {archives:?}");
        // Its own name back: linked.
        std::fs::remove_file(&drop).unwrap();
        std::fs::rename(dir.path().join("moved.tar"), &drop).unwrap();
        assert!(store.link_archive(&drop, &opened).unwrap().is_some());
    }

    #[test]
    fn payload_lands_whole_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let obj = w.finish(None).unwrap();
        assert_eq!(obj.id, ObjectId::of_bytes(b"hello world"));
        assert_eq!(
            std::fs::read(store.object_path(&obj.id)).unwrap(),
            b"hello world"
        );
        // Nothing left under a temporary name.
        assert_eq!(
            std::fs::read_dir(dir.path().join("objects/tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn wrong_content_is_refused_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"tampered").unwrap();
        let want = ObjectId::of_bytes(b"original");
        assert!(matches!(
            w.finish(Some(&want)),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(!store.has_object(&want));
        assert!(!store.has_object(&ObjectId::of_bytes(b"tampered")));
    }

    #[test]
    fn session_ids_increase_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = ObjectStore::open(dir.path())
            .unwrap()
            .begin_session()
            .unwrap();
        let b = ObjectStore::open(dir.path())
            .unwrap()
            .begin_session()
            .unwrap();
        assert!(b > a);
    }

    /// An accepted image of `repo:tag` whose manifest is `manifest`.
    pub(crate) fn accepted(repo: &str, tag: &str, manifest: &[u8], source: &str) -> AcceptedImage {
        AcceptedImage {
            destination: Destination {
                repository: repo.into(),
                tags: vec![tag.into()],
            },
            manifest: ManifestBytes {
                digest: ObjectId::of_bytes(manifest).digest(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes: manifest.to_vec(),
            },
            children: vec![],
            blobs: vec![],
            referrers: vec![],
            origin: Origin {
                source: source.into(),
                source_reference: None,
                ingested_at: 5,
            },
            verdict: Verdict {
                rule: None,
                gate: None,
                worst_severity: None,
                signature: None,
                summary: "ok".into(),
            },
            references: vec![format!("{repo}:{tag}")],
        }
    }

    pub(crate) fn audit(source: &str) -> AuditEntry {
        AuditEntry {
            at: 5,
            source: source.into(),
            outcome: "accepted".into(),
            code: None,
            message: "ok".into(),
            references: vec![],
            manifest_digests: vec![],
        }
    }

    fn image_object(store: &ObjectStore, record: &ImageRecord) -> TransferManifest {
        let id = ObjectId::from_digest(&record.image).unwrap();
        TransferManifest::from_object_bytes(&std::fs::read(store.object_path(&id)).unwrap())
            .unwrap()
    }

    #[test]
    fn drop_commit_lands_together_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let img = accepted("a/b", "1", b"manifest", "x.tar");
        let digest = img.manifest.digest.clone();
        let chain = {
            let store = ObjectStore::open(dir.path()).unwrap();
            let records = store
                .commit_drop(&DropCommit {
                    source: "x.tar".into(),
                    drop: Some(DropRecord {
                        size: 1,
                        modified_ns: 2,
                        images: vec![],
                        refused: None,
                    }),
                    images: vec![img],
                    audit: audit("x.tar"),
                })
                .unwrap();
            assert_eq!(records.len(), 1);
            store.ledger_head().chain
        };
        let store = ObjectStore::open(dir.path()).unwrap();
        let images = store.images().unwrap();
        assert_eq!(images.len(), 1);
        assert!(store.sent(&digest, "a/b:1").unwrap().is_some());
        assert!(store.sent(&digest, "a/b:2").unwrap().is_none());
        assert_eq!(
            store.drop_record("x.tar").unwrap().unwrap().images,
            vec![images[0].image.clone()]
        );
        assert_eq!(store.audit_entries().unwrap()[0].outcome, "accepted");
        // The record is inside the image object, and the head survived.
        let tm = image_object(&store, &images[0]);
        assert_eq!((tm.ledger.chain, tm.ledger.seq), (chain, 1));
        assert_eq!(tm.ledger.manifest_digest, digest);
        assert_eq!(tm.ledger.source, "x.tar");
        assert_eq!(store.ledger_head(), tm.ledger.head());
    }

    /// Both intakes number through the same chain, each record after the
    /// last, also when they commit at once from two threads.
    #[test]
    fn drops_and_pulls_are_numbered_in_one_chain_without_holes() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(ObjectStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..5 {
                        let img = accepted(
                            "team/app",
                            &format!("t{t}-{i}"),
                            format!("m{t}{i}").as_bytes(),
                            "src",
                        );
                        store.commit_pulled(img, audit("src")).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let verified = crate::ledger::verify(dir.path());
        // The gateway holds the database: verify reads the copy it keeps.
        let verified = verified.unwrap();
        assert!(verified.bad.is_none(), "{:?}", verified.bad);
        assert_eq!(verified.count, 10);
        assert_eq!(verified.head, Some(store.ledger_head()));
        let mut seqs: Vec<u64> = store
            .images()
            .unwrap()
            .iter()
            .map(|r| image_object(&store, r).ledger.seq)
            .collect();
        seqs.sort();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    }
}
