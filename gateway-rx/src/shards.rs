//! The shard store: verified shards on disk, per-block bitmaps in sled.
//!
//! Per object two staging files under `state_dir/staging/`:
//!
//! - `<hex>.data`: the object itself, padded to whole blocks. Data shard `i`
//!   of block `b` lives at `(b·k + i)·S`, which is exactly where its bytes
//!   belong in the object (the code is systematic), so a block that lost no
//!   data shard needs no decoding and no second write;
//! - `<hex>.parity`: parity shard `k + j` of block `b` at `(b·m + j)·S`.
//!
//! Shards are written in batches: payloads go to the files, the files are
//! fsynced, and only then the blocks' bitmaps are claimed in sled and
//! committed (on `rx-commit`, while the store takes the next frames; what
//! a claim finished is handed out once committed). The claim takes a
//! value only the fsync makes (`durable`), so a bitmap never claims a
//! shard that is not durably on disk; after a crash the bitmap is the
//! truth and anything written past it is simply received again. The
//! writing happens on the `rx-writer` thread and the fsync on `rx-sync`
//! (one for every batch written while the last one ran) while the store
//! takes the next batch's frames (landing bytes in the page cache is the
//! costliest step of the receiver's path); batches are claimed in the
//! order they were handed over, and a batch's shards stay queued until its
//! claim is committed, so their duplicates are not written twice.
//!
//! Which shards are held or queued, which blocks are complete, decodable or
//! being decoded, and where each object is in its life is the protocol's
//! block assembly ([`ObjectAssembly`]); this store keeps what touches disk
//! and sled. A block whose data shards are all in is complete. One that has
//! any `k` distinct shards (from whichever passes) but misses data shards
//! goes to the decoder thread ([`decode_block`]), which rebuilds the missing
//! data shards into the data file; the store then claims them like received
//! ones. An object whose blocks are all complete goes to the finisher, which
//! checks its sha256 and moves the data file into the blob store.
//!
//! Memory: a few batches of payloads (4 MiB each: the one filling and those
//! the writer has yet to write; a written batch waiting for its fsync
//! keeps only its shards' keys), most of them still in the receive buffers
//! they arrived in ([`Payload`]: a bounded number lent at once), and two
//! bits per shard of the objects in flight; nothing grows with object size
//! but those bitmaps.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_host::crash::crash_point;
use weir_proto::assembly::{self, BlockBitmap, ObjectAssembly, ObjectState, BLOCKS_PER_CHUNK};
use weir_proto::{BlockCodec, FecParams, ObjectId, ObjectKind, ShardFrame};

use crate::state::{now_ms, StateDb, StateError};
use crate::status::{Counters, ObjectProgress};
use commit::{Committed, Committer};
pub use durable::RebuiltShards;
use durable::{Durable, Failed, Writer};
pub use held::{HeldObjects, HeldView};
pub use payload::{LentBuffer, Payload, ReceiveBuffers};

mod commit;
mod durable;
mod held;
mod payload;

/// Commit when this many payload bytes wait.
pub const BATCH_BYTES: usize = 4 << 20;
/// Commit at the latest this long after the first shard of a batch.
pub const BATCH_WAIT: Duration = Duration::from_millis(50);
/// Hash an arriving object's data file ahead each time this many more
/// leading bytes are final, so its finish reads only the tail.
const DIGEST_STEP: u64 = 16 << 20;

const OBJECTS_TREE: &str = "staging_objects";
/// Bitmaps by object and chunk ([`BLOCKS_PER_CHUNK`] blocks a value).
const BLOCKS_TREE: &str = "staging_bitmaps";
/// Keys removed per sled batch when an object leaves staging.
const REMOVE_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ShardStoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the shard writer thread is gone")]
    WriterGone,
    #[error("staging file {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> ShardStoreError + 'a {
    move |source| ShardStoreError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// One verified shard; its payload its own or a slice of the buffer it
/// was received into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIn {
    pub object: ObjectId,
    pub kind: ObjectKind,
    pub object_len: u64,
    pub fec: FecParams,
    pub block: u32,
    pub index: u16,
    pub payload: Payload,
}

impl ShardIn {
    /// The shard of `s` with `payload` for its bytes.
    pub fn with_payload(s: &ShardFrame<'_>, payload: Payload) -> ShardIn {
        ShardIn {
            object: s.object,
            kind: s.kind,
            object_len: s.object_len,
            fec: s.fec,
            block: s.block,
            index: s.index,
            payload,
        }
    }
}

impl From<&ShardFrame<'_>> for ShardIn {
    /// The shard with a copy of its payload.
    fn from(s: &ShardFrame<'_>) -> Self {
        ShardIn::with_payload(s, Payload::Owned(s.payload.to_vec()))
    }
}

/// What became of a shard offered to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// New: queued for the next commit.
    Queued,
    /// Held already, queued already, or its object is complete.
    Duplicate,
    /// Its object's length or FEC parameters changed: the object restarted.
    Conflict,
}

/// An object's staging record in sled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ObjectRecord {
    kind: ObjectKind,
    len: u64,
    fec: FecParams,
    first_seen_ms: u64,
    /// Shard frames received for it, duplicates included.
    receptions: u64,
    /// When the last commit that took a shard of it ran (0 in records
    /// written before it was kept: then `first_seen_ms` stands in).
    #[serde(default)]
    last_shard_ms: u64,
}

/// The two staging files of one object, shared with the decoder and finisher.
#[derive(Debug)]
pub struct StagingFiles {
    pub data: File,
    pub parity: File,
    pub data_path: PathBuf,
    pub parity_path: PathBuf,
}

/// A block with at least k shards but missing data shards.
#[derive(Debug, Clone)]
pub struct DecodeJob {
    pub object: ObjectId,
    pub generation: u64,
    pub fec: FecParams,
    pub block: u32,
    /// Indices of the shards durably held.
    pub held: Vec<u16>,
    pub files: Arc<StagingFiles>,
}

/// An object whose blocks are all complete: to be hashed and stored.
#[derive(Debug, Clone)]
pub struct FinishJob {
    pub object: ObjectId,
    pub generation: u64,
    pub kind: ObjectKind,
    pub len: u64,
    pub first_seen_ms: u64,
    pub files: Arc<StagingFiles>,
}

/// The leading blocks of an object that are final: the finisher hashes
/// its data file up to `upto` ahead of the finish.
#[derive(Debug, Clone)]
pub struct DigestJob {
    pub object: ObjectId,
    pub generation: u64,
    pub upto: u64,
    pub files: Arc<StagingFiles>,
}

/// Work the store hands to other threads.
#[derive(Debug, Clone)]
pub enum Work {
    Decode(DecodeJob),
    Digest(DigestJob),
    Finish(FinishJob),
}

struct LiveObject {
    record: ObjectRecord,
    generation: u64,
    /// The store's commit count when the object last got a shard.
    touched: u64,
    files: Arc<StagingFiles>,
    /// Held and queued shards, decodes out, the final prefix, finishing.
    assembly: ObjectAssembly,
    /// Bitmaps of blocks claimed in sled and not yet committed, with the
    /// claim's ticket: the next claim of the block builds on them, while
    /// the assembly waits for the commit.
    claiming: HashMap<u32, (u64, BlockBitmap)>,
    record_dirty: bool,
}

impl LiveObject {
    /// `block`'s claimed bitmap, to add a batch's shards to.
    fn bitmap_of(&self, block: u32) -> BlockBitmap {
        if let Some((_, map)) = self.claiming.get(&block) {
            return *map;
        }
        let mut map = [0u8; assembly::MAX_BITMAP_LEN];
        map[..self.assembly.bitmap_len()].copy_from_slice(self.assembly.block_bitmap(block));
        map
    }

    /// The claimed bitmaps of `chunk`'s blocks: the value kept in sled.
    fn chunk_value(&self, chunk: u32) -> Vec<u8> {
        let mut value = self.assembly.chunk_bitmaps(chunk).to_vec();
        for (block, (_, map)) in &self.claiming {
            if block / BLOCKS_PER_CHUNK == chunk {
                self.assembly.put_in_chunk(&mut value, *block, map);
            }
        }
        value
    }

    fn decode_job(&self, id: ObjectId, block: u32, held: Vec<u16>) -> DecodeJob {
        DecodeJob {
            object: id,
            generation: self.generation,
            fec: self.record.fec,
            block,
            held,
            files: self.files.clone(),
        }
    }

    fn progress(&self, id: &ObjectId) -> ObjectProgress {
        progress_of(
            id,
            &self.record,
            self.assembly.blocks_complete() as u64,
            self.assembly.shards_held(),
        )
    }
}

fn progress_of(
    id: &ObjectId,
    r: &ObjectRecord,
    blocks_complete: u64,
    shards_held: u64,
) -> ObjectProgress {
    let blocks_total = r.fec.blocks_for(r.len) as u64;
    let per_pass = blocks_total * r.fec.total_shards() as u64;
    ObjectProgress {
        id: id.digest(),
        kind: kind_name(r.kind).to_string(),
        len: r.len,
        blocks_total,
        blocks_complete,
        shards_held,
        passes_seen: if per_pass == 0 {
            0.0
        } else {
            r.receptions as f64 / per_pass as f64
        },
        first_seen_ms: r.first_seen_ms,
    }
}

pub fn kind_name(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Blob => "blob",
        ObjectKind::Image => "image",
    }
}

fn chunk_key(id: &ObjectId, chunk: u32) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(&id.0);
    k[32..].copy_from_slice(&chunk.to_be_bytes());
    k
}

struct PendingShard {
    object: ObjectId,
    /// The object's generation when the shard was queued: a batch claimed
    /// after its object started over must not claim into the new files.
    generation: u64,
    block: u32,
    index: u16,
    payload: Payload,
}

/// A batch with the writer.
struct InFlight {
    /// The decoder's shards, claimed with the batch.
    rebuilt: Vec<RebuiltBlock>,
    shards: usize,
    /// (generation, block, index) of each shard in the batch.
    keys: Vec<(u64, u32, u16)>,
    /// Written in place (no writer thread): its outcome already.
    done: Option<Result<Durable, Failed>>,
}

/// A batch not made durable, or not claimed: none of its shards count.
#[derive(Debug)]
pub struct BatchFailed {
    pub error: ShardStoreError,
    /// Shards in the batch.
    pub shards: usize,
}

struct RebuiltBlock {
    object: ObjectId,
    generation: u64,
    block: u32,
    shards: RebuiltShards,
}

/// Each block's bitmap a claim puts in sled, with its object's generation.
type ClaimBitmaps = HashMap<(ObjectId, u32), (u64, BlockBitmap)>;

/// A batch claimed in sled, waiting for the commit that covers it.
struct Claiming {
    ticket: u64,
    bitmaps: ClaimBitmaps,
    /// The decoder's shards claimed with the batch.
    rebuilt: Vec<RebuiltBlock>,
    /// The batch's shards, queued until the commit.
    pending: Vec<PendingShard>,
    /// Shards written (and claimed), and dropped unwritten.
    stored: usize,
    dropped: usize,
}

/// A batch's bitmaps, committed to sled: what memory takes next. Made only
/// by `ShardStore::take_committed`, from a [`Committed`] that covers it.
struct Claimed {
    bitmaps: ClaimBitmaps,
}

/// What one object may make the store hold. A sender holding the key can
/// claim any length and FEC layout, so both are checked before a staging
/// file is sized or a bitmap allocated, and the objects arriving at once
/// (each holds two open files) are bounded too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLimits {
    pub max_object_bytes: u64,
    pub max_objects_in_flight: usize,
}

impl ObjectLimits {
    /// Why an object of this kind, length and layout is refused, if it is.
    pub fn refusal(&self, kind: ObjectKind, len: u64, fec: FecParams) -> Option<String> {
        if !fec.is_valid() {
            return Some("FEC parameters out of range".into());
        }
        if kind == ObjectKind::Image && len > crate::images::MAX_IMAGE_OBJECT_BYTES {
            return Some(format!(
                "an image object of {len} bytes, more than {}",
                crate::images::MAX_IMAGE_OBJECT_BYTES
            ));
        }
        if len > self.max_object_bytes {
            return Some(format!(
                "{len} bytes, more than limits.max_object_bytes ({})",
                self.max_object_bytes
            ));
        }
        let Some(blocks) = fec.checked_blocks_for(len) else {
            return Some("more blocks than a shard frame can number".into());
        };
        // Held and queued bitmaps.
        let bookkeeping = blocks as u64 * 2 * assembly::bitmap_len(fec) as u64;
        if bookkeeping > MAX_BOOKKEEPING_BYTES {
            return Some(format!(
                "{blocks} blocks of {} shards need {bookkeeping} bytes of bookkeeping, more than {MAX_BOOKKEEPING_BYTES}",
                fec.total_shards()
            ));
        }
        None
    }
}

impl From<crate::config::LimitsConfig> for ObjectLimits {
    fn from(c: crate::config::LimitsConfig) -> Self {
        ObjectLimits {
            max_object_bytes: c.max_object_bytes,
            // At least one, or nothing could ever arrive.
            max_objects_in_flight: c.max_objects_in_flight.max(1),
        }
    }
}

impl Default for ObjectLimits {
    fn default() -> Self {
        ObjectLimits {
            max_object_bytes: crate::config::DEFAULT_MAX_OBJECT_BYTES,
            max_objects_in_flight: crate::config::DEFAULT_MAX_OBJECTS_IN_FLIGHT,
        }
    }
}

/// Bookkeeping one object may need in memory (held and queued bitmaps):
/// 64 GiB under the default FEC takes about 15 MiB.
const MAX_BOOKKEEPING_BYTES: u64 = 64 << 20;
/// Refused objects remembered so each is logged once, not per frame.
const REFUSED_REMEMBERED: usize = 1024;

/// Shards of objects in flight, on disk, claimed in sled.
pub struct ShardStore {
    db: StateDb,
    objects: sled::Tree,
    blocks: sled::Tree,
    dir: PathBuf,
    /// Objects in the blob store: their shards are duplicates.
    complete: HeldObjects,
    live: HashMap<ObjectId, LiveObject>,
    pending: Vec<PendingShard>,
    pending_bytes: usize,
    pending_since: Option<Instant>,
    /// Batches with the writer, oldest first: what each claims besides its
    /// own shards once durable.
    in_flight: std::collections::VecDeque<InFlight>,
    /// None when no thread could be had: batches are written in place.
    writer: Option<Writer>,
    /// Batches with the writer whose payloads are still in memory.
    unlanded: usize,
    /// Data shards the decoder rebuilt, to claim at the next commit.
    rebuilt: Vec<RebuiltBlock>,
    /// Staging files were created since the last commit: fsync the directory.
    dir_dirty: bool,
    /// Work found outside a commit, handed out with the next one.
    ready: Vec<Work>,
    next_generation: u64,
    /// Bytes of final prefix per digest job.
    digest_step: u64,
    counters: Arc<Counters>,
    limits: ObjectLimits,
    /// Objects refused already (logged once each).
    refused: HashSet<ObjectId>,
    /// Commits so far: when each live object last got a shard, in commits.
    commits: u64,
    /// Claims applied to sled, oldest first, waiting for their commit.
    claiming: std::collections::VecDeque<Claiming>,
    committer: Committer,
    next_ticket: u64,
}

impl ShardStore {
    /// Opens the store in `dir` and reloads what earlier runs claimed.
    /// `complete` lists the objects already in the blob store. Returns the
    /// work left over: blocks to decode, objects to finish.
    pub fn open(
        db: &StateDb,
        dir: &Path,
        complete: impl IntoIterator<Item = ObjectId>,
        counters: Arc<Counters>,
    ) -> Result<(ShardStore, Vec<Work>), ShardStoreError> {
        Self::open_with_limits(db, dir, complete, counters, ObjectLimits::default())
    }

    /// [`open`](Self::open) under `limits`: records past them (a hostile
    /// sender's, kept by an earlier run) are forgotten, and at most
    /// `max_objects_in_flight` objects, the newest, are reloaded.
    pub fn open_with_limits(
        db: &StateDb,
        dir: &Path,
        complete: impl IntoIterator<Item = ObjectId>,
        counters: Arc<Counters>,
        limits: ObjectLimits,
    ) -> Result<(ShardStore, Vec<Work>), ShardStoreError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir, "creating directory"))?;
        let mut store = ShardStore {
            db: db.clone(),
            objects: db.tree(OBJECTS_TREE)?,
            blocks: db.tree(BLOCKS_TREE)?,
            dir: dir.to_path_buf(),
            complete: HeldObjects::new(complete),
            live: HashMap::default(),
            pending: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
            in_flight: Default::default(),
            writer: Writer::spawn(),
            unlanded: 0,
            rebuilt: Vec::new(),
            dir_dirty: false,
            ready: Vec::new(),
            next_generation: 1,
            digest_step: DIGEST_STEP,
            counters,
            limits,
            refused: HashSet::default(),
            commits: 0,
            claiming: Default::default(),
            committer: Committer::spawn(db),
            next_ticket: 0,
        };
        let mut work = Vec::new();
        let mut records = Vec::new();
        for item in store.objects.iter() {
            let (k, v) = item.map_err(|e| db.sled_error(e))?;
            let Ok(raw) = <[u8; 32]>::try_from(&k[..]) else {
                continue;
            };
            let id = ObjectId(raw);
            match serde_json::from_slice::<ObjectRecord>(&v) {
                Ok(r) if limits.refusal(r.kind, r.len, r.fec).is_none() => records.push((id, r)),
                // A record we cannot use: drop it, the shards come again.
                _ => store.forget(&id)?,
            }
        }
        if records.len() > limits.max_objects_in_flight {
            records.sort_by_key(|(_, r)| std::cmp::Reverse(r.first_seen_ms));
            for (id, _) in records.split_off(limits.max_objects_in_flight) {
                Counters::add(&store.counters.objects_evicted, 1);
                store.forget(&id)?;
            }
            tracing::warn!(kept = records.len(),
                "more objects were arriving than limits.max_objects_in_flight; the newest are resumed");
        }
        for (id, record) in records {
            if store.complete.contains(&id) {
                // Verified before a crash cut the cleanup short.
                store.forget(&id)?;
                continue;
            }
            store.reload(id, record, &mut work)?;
        }
        store.remove_orphan_files()?;
        store.db.commit("rx.shards.opened")?;
        Ok((store, work))
    }

    /// Staging files whose object has no record: created just before a
    /// crash, before their first commit.
    fn remove_orphan_files(&self) -> Result<(), ShardStoreError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io_err(&self.dir, "listing"))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let hex_part = name.split('.').next().unwrap_or("");
            let known = ObjectId::from_digest(&format!("sha256:{hex_part}"))
                .is_ok_and(|id| self.live.contains_key(&id));
            if !known {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn paths(&self, id: &ObjectId) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{}.data", id.hex())),
            self.dir.join(format!("{}.parity", id.hex())),
        )
    }

    fn open_files(
        &self,
        id: &ObjectId,
        record: &ObjectRecord,
        create: bool,
    ) -> Result<StagingFiles, ShardStoreError> {
        let (data_path, parity_path) = self.paths(id);
        let blocks = record.fec.blocks_for(record.len) as u64;
        let s = record.fec.shard_size as u64;
        let open = |p: &Path, len: u64| -> Result<File, ShardStoreError> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(p)
                .map_err(io_err(p, "opening"))?;
            // Sparse: only written shards take space.
            if f.metadata().map_err(io_err(p, "reading size"))?.len() < len {
                f.set_len(len).map_err(io_err(p, "sizing"))?;
            }
            Ok(f)
        };
        let data = open(&data_path, blocks * record.fec.data_shards as u64 * s)?;
        let parity = open(&parity_path, blocks * record.fec.parity_shards as u64 * s)?;
        Ok(StagingFiles {
            data,
            parity,
            data_path,
            parity_path,
        })
    }

    fn new_live(&mut self, record: ObjectRecord, files: StagingFiles) -> LiveObject {
        let generation = self.next_generation;
        self.next_generation += 1;
        LiveObject {
            assembly: ObjectAssembly::new(record.fec, record.len),
            record,
            generation,
            touched: self.commits,
            files: Arc::new(files),
            claiming: HashMap::default(),
            record_dirty: false,
        }
    }

    /// Rebuilds an object's state from sled after a restart; the files must
    /// still be there and long enough for every claimed shard, or the
    /// object starts over.
    fn reload(
        &mut self,
        id: ObjectId,
        record: ObjectRecord,
        work: &mut Vec<Work>,
    ) -> Result<(), ShardStoreError> {
        let (data_path, parity_path) = self.paths(&id);
        let blocks = record.fec.blocks_for(record.len) as u64;
        let s = record.fec.shard_size as u64;
        let intact = |p: &Path, shards: u64| {
            std::fs::metadata(p)
                .map(|m| m.len() >= blocks * shards * s)
                .unwrap_or(false)
        };
        if !intact(&data_path, record.fec.data_shards as u64)
            || !intact(&parity_path, record.fec.parity_shards as u64)
        {
            tracing::warn!(object = %id, "staging files missing or short; the object starts over");
            self.forget(&id)?;
            return Ok(());
        }
        let files = self.open_files(&id, &record, false)?;
        let mut live = self.new_live(record, files);
        for item in self.blocks.scan_prefix(id.0) {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let Ok(c) = <[u8; 4]>::try_from(&k[32..]) else {
                continue;
            };
            // A value that does not fit is not ours to trust: those shards
            // come again.
            live.assembly.restore_chunk(u32::from_be_bytes(c), &v);
        }
        for block in 0..live.assembly.blocks() {
            if let Some(held) = live.assembly.start_decoding(block) {
                work.push(Work::Decode(live.decode_job(id, block, held)));
            }
        }
        if live.assembly.begin_finish() {
            work.push(Work::Finish(finish_job(&id, &live)));
        }
        tracing::info!(object = %id, blocks = live.assembly.blocks(),
            complete = live.assembly.blocks_complete(), shards = live.assembly.shards_held(),
            "resuming object from staging");
        self.live.insert(id, live);
        Ok(())
    }

    /// Removes an object's records and files (not yet committed).
    fn forget(&mut self, id: &ObjectId) -> Result<(), ShardStoreError> {
        self.live.remove(id);
        self.pending.retain(|p| p.object != *id);
        self.rebuilt.retain(|r| r.object != *id);
        let mut batch = sled::Batch::default();
        batch.remove(&id.0[..]);
        self.objects
            .apply_batch(batch)
            .map_err(|e| self.db.sled_error(e))?;
        // Without its record the bitmaps are ignored, so they need not go
        // in one batch.
        let keys: Vec<sled::IVec> = self
            .blocks
            .scan_prefix(id.0)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.db.sled_error(e))?;
        for group in keys.chunks(REMOVE_BATCH) {
            let mut batch = sled::Batch::default();
            for k in group {
                batch.remove(k.clone());
            }
            self.blocks
                .apply_batch(batch)
                .map_err(|e| self.db.sled_error(e))?;
        }
        let (d, p) = self.paths(id);
        let _ = std::fs::remove_file(d);
        let _ = std::fs::remove_file(p);
        Ok(())
    }

    /// The objects held whole, as the verifiers see them: they drop a
    /// later pass's shards of these unopened.
    pub fn held(&self) -> HeldView {
        self.complete.view()
    }

    /// Whether the object is in the blob store already (or was pruned
    /// from it after its images were delivered).
    pub fn is_complete(&self, id: &ObjectId) -> bool {
        self.complete.contains(id)
    }

    /// Takes shards of `id` again: a pruned object an arriving image needs,
    /// or one retention no longer remembers.
    pub fn admit_again(&mut self, id: &ObjectId) {
        self.complete.remove(id);
    }

    /// Forgets the objects in staging that got no shard for `idle_ms` (as
    /// of `now_ms`), records and files, except those being rebuilt or
    /// verified. Their sender stopped sending them; should it send them
    /// again, they start over. Returns each forgotten object with its
    /// kind and length.
    pub fn release_idle(
        &mut self,
        idle_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<(ObjectId, ObjectKind, u64)>, ShardStoreError> {
        let idle: Vec<(ObjectId, ObjectKind, u64)> = self
            .live
            .iter()
            .filter(|(_, l)| {
                !matches!(
                    l.assembly.state(),
                    ObjectState::Decoding | ObjectState::Finishing
                )
            })
            .filter(|(_, l)| {
                // A shard taken since the last commit is progress too.
                let last = l.record.last_shard_ms.max(l.record.first_seen_ms);
                !l.record_dirty && now_ms.saturating_sub(last) >= idle_ms
            })
            .map(|(id, l)| (*id, l.record.kind, l.record.len))
            .collect();
        for (id, _, _) in &idle {
            // Not committed here: a crash brings the records back without
            // their files, and the reload starts such an object over.
            self.forget(id)?;
        }
        Ok(idle)
    }

    /// Registers an object announced by its header, so progress shows it
    /// before its first shard.
    pub fn announce(
        &mut self,
        id: ObjectId,
        kind: ObjectKind,
        len: u64,
        fec: FecParams,
    ) -> Result<(), ShardStoreError> {
        if self.complete.contains(&id) || self.live.contains_key(&id) {
            return Ok(());
        }
        if self.refuse(&id, kind, len, fec) {
            return Ok(());
        }
        self.create(id, kind, len, fec)
    }

    /// Whether an object of this layout is past the limits; counts and logs
    /// (once per object) when it is.
    fn refuse(&mut self, id: &ObjectId, kind: ObjectKind, len: u64, fec: FecParams) -> bool {
        let Some(why) = self.limits.refusal(kind, len, fec) else {
            return false;
        };
        Counters::add(&self.counters.objects_refused, 1);
        if self.refused.len() >= REFUSED_REMEMBERED {
            self.refused.clear();
        }
        if self.refused.insert(*id) {
            tracing::warn!(object = %id, kind = kind_name(kind), len, fec = ?fec,
                reason = %why, "object refused: nothing is stored for it");
        }
        true
    }

    /// Makes room for one more object when `max_objects_in_flight` arrive
    /// already: the one longest without a shard goes (not one being rebuilt
    /// or verified). False when none can go.
    fn make_room(&mut self) -> Result<bool, ShardStoreError> {
        if self.live.len() < self.limits.max_objects_in_flight {
            return Ok(true);
        }
        let stalest = self
            .live
            .iter()
            .filter(|(_, l)| {
                !matches!(
                    l.assembly.state(),
                    ObjectState::Decoding | ObjectState::Finishing
                )
            })
            .min_by_key(|(_, l)| l.touched)
            .map(|(id, _)| *id);
        let Some(id) = stalest else {
            return Ok(false);
        };
        Counters::add(&self.counters.objects_evicted, 1);
        tracing::warn!(object = %id, in_flight = self.live.len(),
            "too many objects arriving at once; the one longest without a shard is set aside (a later pass brings it again)");
        self.forget(&id)?;
        Ok(true)
    }

    fn create(
        &mut self,
        id: ObjectId,
        kind: ObjectKind,
        len: u64,
        fec: FecParams,
    ) -> Result<(), ShardStoreError> {
        if !self.make_room()? {
            // Every object in flight is being rebuilt or verified.
            Counters::add(&self.counters.objects_refused, 1);
            return Ok(());
        }
        let now = now_ms();
        let record = ObjectRecord {
            kind,
            len,
            fec,
            first_seen_ms: now,
            receptions: 0,
            last_shard_ms: now,
        };
        let files = self.open_files(&id, &record, true)?;
        let mut live = self.new_live(record, files);
        live.record_dirty = true;
        self.dir_dirty = true;
        self.pending_since.get_or_insert_with(Instant::now);
        tracing::info!(object = %id, kind = kind_name(kind), len, blocks = live.assembly.blocks(),
            k = fec.data_shards, m = fec.parity_shards, shard_size = fec.shard_size, "new object arriving");
        self.live.insert(id, live);
        Ok(())
    }

    /// Queues one shard for the next commit, unless it is a duplicate.
    pub fn accept(&mut self, shard: ShardIn) -> Result<Accepted, ShardStoreError> {
        if self.complete.contains(&shard.object) {
            Counters::add(&self.counters.shards_duplicate, 1);
            return Ok(Accepted::Duplicate);
        }
        let mut outcome = Accepted::Queued;
        if let Some(live) = self.live.get(&shard.object) {
            let r = &live.record;
            if r.len != shard.object_len || r.fec != shard.fec || r.kind != shard.kind {
                if live.assembly.state() == ObjectState::Finishing {
                    // Its bytes are being verified; the old layout stands.
                    Counters::add(&self.counters.shards_conflicting, 1);
                    return Ok(Accepted::Conflict);
                }
                tracing::warn!(object = %shard.object, old_len = r.len, new_len = shard.object_len,
                    old_fec = ?r.fec, new_fec = ?shard.fec,
                    "object's length or FEC parameters changed; restarting it");
                Counters::add(&self.counters.shards_conflicting, 1);
                self.forget(&shard.object)?;
                outcome = Accepted::Conflict;
            }
        }
        if !self.live.contains_key(&shard.object) {
            if self.refuse(&shard.object, shard.kind, shard.object_len, shard.fec) {
                return Ok(Accepted::Duplicate);
            }
            self.create(shard.object, shard.kind, shard.object_len, shard.fec)?;
        }
        let commits = self.commits;
        let Some(live) = self.live.get_mut(&shard.object) else {
            return Ok(Accepted::Duplicate);
        };
        live.touched = commits;
        live.record.receptions += 1;
        live.record_dirty = true;
        // The frame layer checked block and index against the parameters.
        if shard.payload.len() != live.record.fec.shard_size as usize {
            return Ok(Accepted::Duplicate);
        }
        match live.assembly.queue(shard.block, shard.index) {
            Ok(true) => {}
            Ok(false) => {
                Counters::add(&self.counters.shards_duplicate, 1);
                return Ok(Accepted::Duplicate);
            }
            Err(_) => return Ok(Accepted::Duplicate),
        }
        let generation = live.generation;
        self.pending_bytes += shard.payload.len();
        self.pending_since.get_or_insert_with(Instant::now);
        self.pending.push(PendingShard {
            object: shard.object,
            generation,
            block: shard.block,
            index: shard.index,
            payload: shard.payload,
        });
        Ok(outcome)
    }

    /// Drops the shards waiting for the next commit, unclaimed (the state
    /// disk is full): they come again with a later pass. Returns how many.
    pub fn discard_pending(&mut self) -> usize {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        self.unqueue(&pending);
        pending.len()
    }

    /// Whether a commit is due. Reception counts alone never force one:
    /// they ride along with the next.
    pub fn should_commit(&self) -> bool {
        self.pending_bytes >= BATCH_BYTES
            || self
                .pending_since
                .is_some_and(|t| t.elapsed() >= BATCH_WAIT)
    }

    /// When the current batch must be committed at the latest.
    pub fn commit_deadline(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + BATCH_WAIT)
    }

    /// Writes the batch, fsyncs the files, then claims the shards in sled
    /// and commits the claim, together with any batch still with the writer
    /// or waiting for its commit. Returns blocks to decode and objects to
    /// finish.
    pub fn commit(&mut self) -> Result<Vec<Work>, ShardStoreError> {
        self.start_commit();
        let mut work = Vec::new();
        let mut failed = None;
        while let Some(done) = self.claim_next(true) {
            match done {
                Ok(w) => work.extend(w),
                Err(f) => failed = Some(f.error),
            }
        }
        while let Some(done) = self.take_committed(true) {
            match done {
                Ok(w) => work.extend(w),
                Err(f) => failed = Some(f.error),
            }
        }
        match failed {
            None => Ok(work),
            Some(e) => {
                // Claimed batches' work is not lost with the failed one's.
                self.ready.append(&mut work);
                Err(e)
            }
        }
    }

    /// Hands the pending batch to the writer, which writes and fsyncs it
    /// while the store takes the next frames; [`claim_next`](Self::claim_next)
    /// claims it once durable. Its shards stay queued until then, so
    /// their duplicates are not queued again.
    pub fn start_commit(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let rebuilt = std::mem::take(&mut self.rebuilt);
        self.pending_bytes = 0;
        self.pending_since = None;
        self.commits += 1;
        let new_files_in = self.dir_dirty.then(|| self.dir.clone());
        self.dir_dirty = false;
        // Should the writer die with the batch, these leave the queue.
        let keys = pending
            .iter()
            .map(|p| (p.generation, p.block, p.index))
            .collect();
        let batch = durable::plan(pending, &self.live, new_files_in);
        let shards = batch.len();
        let inline = match &self.writer {
            Some(w) => w.send(batch).err(),
            None => Some(batch),
        };
        if inline.is_none() {
            self.unlanded += 1;
        }
        let done = inline.map(|batch| {
            if self.writer.take().is_some() {
                tracing::warn!("the writer thread is gone; the store writes its batches itself");
            }
            batch.write()
        });
        self.in_flight.push_back(InFlight {
            rebuilt,
            shards,
            keys,
            done,
        });
    }

    /// Batches handed to the writer and not yet claimed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Batches with the writer whose payloads it has not written yet: what
    /// they hold in memory is what bounds how many the store hands over.
    pub fn unlanded(&mut self) -> usize {
        let landed = self
            .writer
            .as_ref()
            .map_or(self.unlanded, |w| w.landed(false));
        self.unlanded = self.unlanded.saturating_sub(landed);
        self.unlanded
    }

    /// Waits until the writer has written one more batch (at once when it
    /// has none, or is gone).
    pub fn wait_landed(&mut self) {
        if self.unlanded == 0 {
            return;
        }
        let landed = match &self.writer {
            Some(w) => w.landed(true),
            None => 0,
        };
        // Nothing landed while waiting: the writer is gone, and its
        // batches are failed when claimed.
        self.unlanded = if landed == 0 {
            0
        } else {
            self.unlanded.saturating_sub(landed)
        };
    }

    /// Claims in sled the oldest batch with the writer once it is durable
    /// (with `wait`, waits for it), and asks for the commit that makes the
    /// claim count: [`take_committed`](Self::take_committed) takes it then.
    /// None when there is none, or it is not done; the work returned is
    /// what was found outside a claim.
    pub fn claim_next(&mut self, wait: bool) -> Option<Result<Vec<Work>, BatchFailed>> {
        let front = self.in_flight.front_mut()?;
        let done = match front.done.take() {
            Some(done) => done,
            None => {
                match self.writer.as_ref().and_then(|w| w.next_done(wait)) {
                    Some(done) => done,
                    None if self.writer.is_some() && !wait => return None,
                    None => {
                        // The thread is gone with the batch: write the next
                        // ones here.
                        if self.writer.take().is_some() {
                            tracing::error!("the shard writer thread is gone; the store writes its batches itself");
                        }
                        Err(Failed {
                            error: ShardStoreError::WriterGone,
                        })
                    }
                }
            }
        };
        let InFlight {
            rebuilt,
            shards,
            keys,
            ..
        } = self.in_flight.pop_front()?;
        let error = match done {
            Ok(durable) => {
                crash_point("rx.shards.payload-written");
                match self.claim_in_sled(&durable, &rebuilt) {
                    Ok(bitmaps) => {
                        self.await_commit(durable, rebuilt, bitmaps);
                        return Some(Ok(std::mem::take(&mut self.ready)));
                    }
                    Err(error) => {
                        self.unqueue(&durable.into_pending());
                        error
                    }
                }
            }
            Err(failed) => {
                self.unqueue_keys(&keys);
                failed.error
            }
        };
        // Not claimed: the rebuilt blocks are decoded again.
        self.stop_decoding(&rebuilt);
        Some(Err(BatchFailed { error, shards }))
    }

    /// Claims applied to sled and not yet taken as committed.
    pub fn claiming(&self) -> usize {
        self.claiming.len()
    }

    /// Numbers a claim just applied to sled, lets later claims of its
    /// blocks build on its bitmaps, and asks for the commit that covers it.
    fn await_commit(
        &mut self,
        durable: Durable,
        rebuilt: Vec<RebuiltBlock>,
        bitmaps: ClaimBitmaps,
    ) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        for ((id, block), (generation, map)) in &bitmaps {
            if let Some(live) = self
                .live
                .get_mut(id)
                .filter(|l| l.generation == *generation)
            {
                live.claiming.insert(*block, (ticket, *map));
            }
        }
        let dropped = durable.dropped();
        self.claiming.push_back(Claiming {
            ticket,
            bitmaps,
            rebuilt,
            stored: durable.len() - dropped,
            dropped,
            pending: durable.into_pending(),
        });
        self.committer.ask(ticket);
    }

    /// Takes into memory the claims the next commit covers (with `wait`,
    /// waits for it), and returns what became decodable, hashable ahead,
    /// or complete; when that commit failed, none of them counts and their
    /// shards come again. None when no claim waits, or no commit came.
    pub fn take_committed(&mut self, wait: bool) -> Option<Result<Vec<Work>, BatchFailed>> {
        if self.claiming.is_empty() {
            return None;
        }
        let committed: Committed = self.committer.next(wait)?;
        let mut covered = Vec::new();
        while let Some(c) = self.claiming.pop_front_if(|c| committed.covers(c.ticket)) {
            covered.push(c);
        }
        for c in &covered {
            for ((id, block), (generation, _)) in &c.bitmaps {
                if let Some(live) = self
                    .live
                    .get_mut(id)
                    .filter(|l| l.generation == *generation)
                {
                    if live
                        .claiming
                        .get(block)
                        .is_some_and(|(t, _)| *t == c.ticket)
                    {
                        live.claiming.remove(block);
                    }
                }
            }
            self.unqueue(&c.pending);
        }
        match committed.result() {
            Ok(()) => {
                let mut work = Vec::new();
                for c in covered {
                    Counters::add(&self.counters.shards_stored, c.stored as u64);
                    Counters::add(&self.counters.shards_duplicate, c.dropped as u64);
                    let claimed = Claimed { bitmaps: c.bitmaps };
                    work.append(&mut self.take_claimed(claimed, &c.rebuilt));
                }
                work.append(&mut self.ready);
                Some(Ok(work))
            }
            Err(error) => {
                for c in &covered {
                    self.stop_decoding(&c.rebuilt);
                }
                let shards = covered.iter().map(|c| c.stored + c.dropped).sum();
                Some(Err(BatchFailed {
                    error: error.into(),
                    shards,
                }))
            }
        }
    }

    /// Rebuilt blocks not claimed are decoded again.
    fn stop_decoding(&mut self, rebuilt: &[RebuiltBlock]) {
        for r in rebuilt {
            if let Some(live) = self.live.get_mut(&r.object) {
                if live.generation == r.generation {
                    live.assembly.stop_decoding(r.block);
                }
            }
        }
    }

    /// Whatever happened, a claimed or failed batch is no longer queued;
    /// shards not claimed come again with the next pass.
    fn unqueue(&mut self, pending: &[PendingShard]) {
        for p in pending {
            if let Some(live) = self.live.get_mut(&p.object) {
                if live.generation == p.generation {
                    live.assembly.unqueue(p.block, p.index);
                }
            }
        }
    }

    /// [`unqueue`](Self::unqueue) by (generation, block, index).
    fn unqueue_keys(&mut self, keys: &[(u64, u32, u16)]) {
        let by_generation: HashMap<u64, ObjectId> = self
            .live
            .iter()
            .map(|(id, l)| (l.generation, *id))
            .collect();
        for &(generation, block, index) in keys {
            if let Some(live) = by_generation
                .get(&generation)
                .and_then(|id| self.live.get_mut(id))
            {
                live.assembly.unqueue(block, index);
            }
        }
    }

    /// Applies to sled (not yet committed) the bitmaps with the batch's
    /// durable shards and the decoder's rebuilt ones added, and the
    /// objects' records.
    fn claim_in_sled(
        &mut self,
        durable: &Durable,
        rebuilt: &[RebuiltBlock],
    ) -> Result<ClaimBitmaps, ShardStoreError> {
        let mut bitmaps: ClaimBitmaps = HashMap::default();
        for p in durable.shards() {
            let Some(live) = self
                .live
                .get(&p.object)
                .filter(|l| l.generation == p.generation)
            else {
                continue;
            };
            let (_, map) = bitmaps
                .entry((p.object, p.block))
                .or_insert_with(|| (live.generation, live.bitmap_of(p.block)));
            assembly::set_shard(map, p.index);
        }
        for r in rebuilt {
            let Some(live) = self.live.get(&r.object) else {
                continue;
            };
            if live.generation != r.generation {
                continue;
            }
            let (_, map) = bitmaps
                .entry((r.object, r.block))
                .or_insert_with(|| (live.generation, live.bitmap_of(r.block)));
            for &i in r.shards.indices() {
                assembly::set_shard(map, i);
            }
        }
        let mut chunks: HashMap<(ObjectId, u32), Vec<u8>> = HashMap::default();
        for ((id, block), (_, map)) in &bitmaps {
            let Some(live) = self.live.get(id) else {
                continue;
            };
            let chunk = block / BLOCKS_PER_CHUNK;
            let value = chunks
                .entry((*id, chunk))
                .or_insert_with(|| live.chunk_value(chunk));
            live.assembly.put_in_chunk(value, *block, map);
        }
        let mut blocks_batch = sled::Batch::default();
        for ((id, chunk), value) in chunks {
            blocks_batch.insert(&chunk_key(&id, chunk)[..], value);
        }
        let mut objects_batch = sled::Batch::default();
        let now = now_ms();
        for (id, live) in self.live.iter_mut().filter(|(_, l)| l.record_dirty) {
            live.record.last_shard_ms = now;
            let v =
                serde_json::to_vec(&live.record).map_err(|e| self.db.corrupt(id.digest(), e))?;
            objects_batch.insert(&id.0[..], v);
            live.record_dirty = false;
        }
        // The record first: blocks without a record would be orphans.
        self.objects
            .apply_batch(objects_batch)
            .map_err(|e| self.db.sled_error(e))?;
        self.blocks
            .apply_batch(blocks_batch)
            .map_err(|e| self.db.sled_error(e))?;
        Ok(bitmaps)
    }

    /// Takes the claimed bitmaps into memory; returns what became
    /// decodable, hashable ahead, or complete.
    fn take_claimed(&mut self, claimed: Claimed, rebuilt: &[RebuiltBlock]) -> Vec<Work> {
        self.stop_decoding(rebuilt);
        let mut work = Vec::new();
        let mut objects_touched: HashSet<ObjectId> = HashSet::default();
        for ((id, block), (generation, map)) in claimed.bitmaps {
            // An object that started over since the claim takes none of it.
            let Some(live) = self
                .live
                .get_mut(&id)
                .filter(|l| l.generation == generation)
            else {
                continue;
            };
            let was_complete = live.assembly.data_complete(block);
            live.assembly.replace_block(block, &map);
            if live.assembly.data_complete(block) {
                if !was_complete {
                    Counters::add(&self.counters.blocks_complete, 1);
                }
            } else if let Some(held) = live.assembly.start_decoding(block) {
                work.push(Work::Decode(live.decode_job(id, block, held)));
            }
            objects_touched.insert(id);
        }
        for id in objects_touched {
            let Some(live) = self.live.get_mut(&id) else {
                continue;
            };
            if let Some(upto) = live.assembly.hash_ahead(self.digest_step) {
                work.push(Work::Digest(DigestJob {
                    object: id,
                    generation: live.generation,
                    upto,
                    files: live.files.clone(),
                }));
            }
            if live.assembly.begin_finish() {
                work.push(Work::Finish(finish_job(&id, live)));
            }
        }
        work
    }

    /// The decoder rebuilt (and fsynced) these data shards of a block.
    pub fn decoded(
        &mut self,
        object: ObjectId,
        generation: u64,
        block: u32,
        rebuilt: RebuiltShards,
    ) {
        let Some(live) = self.live.get(&object) else {
            return;
        };
        if live.generation != generation {
            return;
        }
        Counters::add(&self.counters.blocks_repaired, 1);
        self.rebuilt.push(RebuiltBlock {
            object,
            generation,
            block,
            shards: rebuilt,
        });
        self.pending_since.get_or_insert_with(Instant::now);
    }

    /// The decoder could not rebuild the block; it waits for more shards,
    /// unless they came meanwhile and the object is whole.
    pub fn decode_failed(&mut self, object: ObjectId, generation: u64, block: u32) {
        let Some(live) = self.live.get_mut(&object) else {
            return;
        };
        if live.generation != generation {
            return;
        }
        live.assembly.stop_decoding(block);
        if live.assembly.begin_finish() {
            self.ready.push(Work::Finish(finish_job(&object, live)));
            self.pending_since.get_or_insert_with(Instant::now);
        }
    }

    /// The finisher's verdict: `verified` moves the object to the complete
    /// set; otherwise its shards are discarded and it starts over with the
    /// next pass.
    pub fn finished(
        &mut self,
        object: ObjectId,
        generation: u64,
        verified: bool,
    ) -> Result<(), ShardStoreError> {
        if verified {
            self.complete.insert(object);
            self.forget(&object)?;
            return Ok(());
        }
        match self.live.get_mut(&object) {
            // A verdict on an earlier generation says nothing of this one.
            Some(live) if live.generation == generation => {
                self.forget(&object)?;
                self.db.commit("rx.shards.mismatch-discarded")?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The finisher stopped before a verdict (shutdown): it is asked again
    /// after restart.
    pub fn finish_interrupted(&mut self, object: ObjectId) {
        if let Some(live) = self.live.get_mut(&object) {
            live.assembly.finish_interrupted();
        }
    }

    /// Progress of every object in flight.
    pub fn progress(&self) -> Vec<ObjectProgress> {
        let mut out: Vec<ObjectProgress> = self.live.iter().map(|(id, l)| l.progress(id)).collect();
        out.sort_by_key(|p| p.first_seen_ms);
        out
    }

    /// Shards queued but not yet committed.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

fn finish_job(id: &ObjectId, live: &LiveObject) -> FinishJob {
    FinishJob {
        object: *id,
        generation: live.generation,
        kind: live.record.kind,
        len: live.record.len,
        first_seen_ms: live.record.first_seen_ms,
        files: live.files.clone(),
    }
}

/// Progress of the objects in staging, read from the database of a stopped
/// gateway.
pub fn progress_from_db(db: &StateDb) -> Result<Vec<ObjectProgress>, ShardStoreError> {
    let objects = db.tree(OBJECTS_TREE)?;
    let blocks = db.tree(BLOCKS_TREE)?;
    let mut out = Vec::new();
    for item in objects.iter() {
        let (k, v) = item.map_err(|e| db.sled_error(e))?;
        let Ok(raw) = <[u8; 32]>::try_from(&k[..]) else {
            continue;
        };
        let id = ObjectId(raw);
        let Ok(r) = serde_json::from_slice::<ObjectRecord>(&v) else {
            continue;
        };
        let bitmap_len = assembly::bitmap_len(r.fec);
        let (mut complete, mut held) = (0u64, 0u64);
        for item in blocks.scan_prefix(id.0) {
            let (_, chunk) = item.map_err(|e| db.sled_error(e))?;
            for map in chunk.chunks(bitmap_len) {
                held += map.iter().map(|b| b.count_ones() as u64).sum::<u64>();
                if assembly::data_bits_set(map, r.fec.data_shards) {
                    complete += 1;
                }
            }
        }
        out.push(progress_of(&id, &r, complete, held));
    }
    out.sort_by_key(|p| p.first_seen_ms);
    Ok(out)
}

/// Why a block could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("block {block}: {source}")]
    Fec {
        block: u32,
        #[source]
        source: weir_proto::FecError,
    },
    #[error(transparent)]
    Io(#[from] ShardStoreError),
}

/// Rebuilds a block's missing data shards from any k held shards and writes
/// them (fsynced) where they belong in the data file. Returns the indices
/// rebuilt. Runs on the decoder thread.
pub fn decode_block(job: &DecodeJob, codec: &BlockCodec) -> Result<RebuiltShards, DecodeError> {
    let f = job.fec;
    let (k, m, s) = (
        f.data_shards as usize,
        f.parity_shards as usize,
        f.shard_size as usize,
    );
    let files = &job.files;
    let mut shards: Vec<Option<Vec<u8>>> = vec![None; k + m];
    // Data shards first (no arithmetic needed for them), then parity.
    let mut chosen: Vec<u16> = job
        .held
        .iter()
        .copied()
        .filter(|&i| (i as usize) < k)
        .collect();
    chosen.extend(job.held.iter().copied().filter(|&i| (i as usize) >= k));
    chosen.truncate(k);
    for &i in &chosen {
        let mut buf = vec![0u8; s];
        let i = i as usize;
        if i < k {
            let off = (job.block as u64 * k as u64 + i as u64) * s as u64;
            files
                .data
                .read_exact_at(&mut buf, off)
                .map_err(io_err(&files.data_path, "reading shard"))?;
        } else {
            let off = (job.block as u64 * m as u64 + (i - k) as u64) * s as u64;
            files
                .parity
                .read_exact_at(&mut buf, off)
                .map_err(io_err(&files.parity_path, "reading shard"))?;
        }
        shards[i] = Some(buf);
    }
    let missing: Vec<u16> = (0..k as u16)
        .filter(|i| shards[*i as usize].is_none())
        .collect();
    codec
        .reconstruct_data(&mut shards)
        .map_err(|source| DecodeError::Fec {
            block: job.block,
            source,
        })?;
    for &i in &missing {
        let Some(bytes) = &shards[i as usize] else {
            continue;
        };
        let off = (job.block as u64 * k as u64 + i as u64) * s as u64;
        files
            .data
            .write_all_at(bytes, off)
            .map_err(io_err(&files.data_path, "writing rebuilt shard"))?;
    }
    Ok(RebuiltShards::sync(files, missing)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::blobs::{BlobStore, RunningDigests};
    use std::sync::atomic::Ordering;
    use weir_test_support::bytes_from;

    /// Every shard of `bytes` as the sender would cut it.
    pub(crate) fn shards_of(bytes: &[u8], kind: ObjectKind, fec: FecParams) -> Vec<ShardIn> {
        let codec = BlockCodec::new(fec).unwrap();
        let id = ObjectId::of_bytes(bytes);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for block in 0..fec.blocks_for(bytes.len() as u64) {
            let start = (block as u64 * fec.block_bytes()) as usize;
            let len = fec.block_len(bytes.len() as u64, block);
            codec.encode(&bytes[start..start + len], &mut buf).unwrap();
            for (index, payload) in buf.iter().enumerate() {
                out.push(ShardIn {
                    object: id,
                    kind,
                    object_len: bytes.len() as u64,
                    fec,
                    block,
                    index: index as u16,
                    payload: payload.clone().into(),
                });
            }
        }
        out
    }

    struct Rig {
        dir: tempfile::TempDir,
        counters: Arc<Counters>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig {
                dir: tempfile::tempdir().unwrap(),
                counters: Arc::new(Counters::default()),
            }
        }

        fn open(&self) -> (ShardStore, Vec<Work>, StateDb) {
            let db = StateDb::open(&self.dir.path().join("db")).unwrap();
            let (mut s, w) = ShardStore::open(
                &db,
                &self.dir.path().join("staging"),
                HashSet::default(),
                self.counters.clone(),
            )
            .unwrap();
            // Every final block goes to the running digest at once, so the
            // tests cover hashing ahead.
            s.digest_step = 1;
            (s, w, db)
        }

        fn count(&self, c: &std::sync::atomic::AtomicU64) -> u64 {
            c.load(Ordering::Relaxed)
        }
    }

    fn staging_files(rig: &Rig) -> usize {
        std::fs::read_dir(rig.dir.path().join("staging"))
            .unwrap()
            .count()
    }

    /// One shard of an object that claims `len` bytes under `fec`.
    fn claim(id: u8, kind: ObjectKind, len: u64, fec: FecParams) -> ShardIn {
        ShardIn {
            object: ObjectId([id; 32]),
            kind,
            object_len: len,
            fec,
            block: 0,
            index: 0,
            payload: vec![0; fec.shard_size as usize].into(),
        }
    }

    /// A sender holding the key can claim any length and layout: a block
    /// count past 32 bits, bitmaps of many GiB, an image object of a TiB,
    /// a blob past `max_object_bytes`. Each is refused and counted before a
    /// file is made or a bitmap allocated; a legitimate object still lands.
    #[test]
    fn lengths_and_layouts_past_the_limits_are_refused_before_anything_is_made() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let tiny = FecParams::new(1, 1, 1).unwrap();
        let wide = FecParams::new(128, 128, 1).unwrap();
        let usual = FecParams::new(8, 4, 1000).unwrap();
        let hostile = [
            claim(1, ObjectKind::Blob, (u32::MAX as u64 + 1) * 2, tiny),
            claim(2, ObjectKind::Blob, 60 << 30, wide),
            claim(3, ObjectKind::Image, 1 << 40, usual),
            claim(4, ObjectKind::Blob, (64 << 30) + 1, usual),
        ];
        for shard in hostile {
            assert_eq!(store.accept(shard).unwrap(), Accepted::Duplicate);
        }
        store
            .announce(ObjectId([5; 32]), ObjectKind::Blob, u64::MAX, usual)
            .unwrap();
        assert_eq!(rig.count(&rig.counters.objects_refused), 5);
        assert_eq!(staging_files(&rig), 0);
        assert!(store.progress().is_empty());
        let bytes = bytes_from(9, 5000);
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        for shard in shards_of(&bytes, ObjectKind::Blob, usual) {
            store.accept(shard).unwrap();
        }
        assert_eq!(
            drive(&mut store, Vec::new(), &blobs),
            vec![ObjectId::of_bytes(&bytes)]
        );
    }

    /// One shard each for many object ids: at most `max_objects_in_flight`
    /// are kept (two files each), the ones longest without a shard go, and
    /// a restart reloads no more than the limit either.
    #[test]
    fn objects_in_flight_are_bounded_and_the_stalest_set_aside() {
        let rig = Rig::new();
        let limits = ObjectLimits {
            max_object_bytes: 1 << 30,
            max_objects_in_flight: 3,
        };
        let open = |rig: &Rig| {
            let db = StateDb::open(&rig.dir.path().join("db")).unwrap();
            let (s, _) = ShardStore::open_with_limits(
                &db,
                &rig.dir.path().join("staging"),
                HashSet::default(),
                rig.counters.clone(),
                limits,
            )
            .unwrap();
            (s, db)
        };
        let fec = FecParams::new(8, 4, 100).unwrap();
        {
            let (mut store, _db) = open(&rig);
            for id in 1..=10u8 {
                store
                    .accept(claim(id, ObjectKind::Blob, 10_000, fec))
                    .unwrap();
                store.commit().unwrap();
            }
            assert_eq!(store.progress().len(), 3);
            assert_eq!(staging_files(&rig), 6);
            assert_eq!(rig.count(&rig.counters.objects_evicted), 7);
            let kept: HashSet<String> = store.progress().into_iter().map(|p| p.id).collect();
            for id in 8..=10u8 {
                assert!(kept.contains(&ObjectId([id; 32]).digest()), "{kept:?}");
            }
        }
        // A store written under a larger limit: only the limit is reloaded.
        let (mut store, _db) = open(&rig);
        assert_eq!(store.progress().len(), 3);
        store
            .accept(claim(11, ObjectKind::Blob, 10_000, fec))
            .unwrap();
        store.commit().unwrap();
        assert_eq!(store.progress().len(), 3);
    }

    /// Runs decode and finish work like the gateway's threads do; returns the
    /// verified objects' bytes.
    fn drive(store: &mut ShardStore, mut work: Vec<Work>, blobs: &BlobStore) -> Vec<ObjectId> {
        let mut done = Vec::new();
        let mut running = RunningDigests::default();
        loop {
            work.extend(store.commit().unwrap());
            if work.is_empty() {
                return done;
            }
            for w in std::mem::take(&mut work) {
                match w {
                    Work::Decode(job) => {
                        let codec = BlockCodec::new(job.fec).unwrap();
                        let rebuilt = decode_block(&job, &codec).unwrap();
                        store.decoded(job.object, job.generation, job.block, rebuilt);
                    }
                    Work::Digest(job) => {
                        let before = job.files.data.metadata().unwrap().len();
                        assert!(job.upto <= before);
                        let file = &job.files.data;
                        let ok =
                            running.advance(job.object, job.generation, file, job.upto, &|| false);
                        assert!(ok.unwrap());
                    }
                    Work::Finish(job) => {
                        job.files.data.set_len(job.len).unwrap();
                        let digest = running.take(&job.object, job.generation);
                        let ok = blobs
                            .adopt_hashed(&job.files.data_path, &job.object, digest, &|| false)
                            .is_ok();
                        store.finished(job.object, job.generation, ok).unwrap();
                        if ok {
                            done.push(job.object);
                        }
                    }
                }
            }
        }
    }

    fn fec(k: u16, m: u16, s: u32) -> FecParams {
        FecParams::new(k, m, s).unwrap()
    }

    #[test]
    fn intact_object_completes_without_decoding() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(1, 10_000);
        let p = fec(4, 2, 100);
        for s in shards_of(&bytes, ObjectKind::Blob, p)
            .into_iter()
            .filter(|s| s.index < 4)
        {
            assert_eq!(store.accept(s).unwrap(), Accepted::Queued);
        }
        let done = drive(&mut store, vec![], &blobs);
        assert_eq!(done, vec![ObjectId::of_bytes(&bytes)]);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
        assert_eq!(rig.count(&rig.counters.blocks_repaired), 0);
        assert_eq!(
            rig.count(&rig.counters.blocks_complete),
            p.blocks_for(10_000) as u64
        );
        assert!(store.progress().is_empty());
        // Staging files are gone once the object is in the blob store.
        assert_eq!(
            std::fs::read_dir(rig.dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
    }

    /// Blocks that are final in order are hashed ahead: the digest jobs
    /// cover the leading final blocks, never a block still missing data,
    /// and the finish completes the same sha256.
    #[test]
    fn leading_final_blocks_are_hashed_ahead() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(9, 10_000);
        let p = fec(4, 2, 100);
        let all = shards_of(&bytes, ObjectKind::Blob, p);
        // Blocks 0..10 whole, block 10 without its data shard 1, then 11..20.
        let (first, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|s| s.block < 20);
        for s in first.iter().filter(|s| !(s.block == 10 && s.index == 1)) {
            store.accept(s.clone()).unwrap();
        }
        let work = store.commit().unwrap();
        let digests: Vec<u64> = work
            .iter()
            .filter_map(|w| match w {
                Work::Digest(d) => Some(d.upto),
                _ => None,
            })
            .collect();
        // Block 10 has 5 of 6 shards, so it went to the decoder and holds
        // the prefix at 10 blocks until it is rebuilt.
        assert_eq!(digests, vec![10 * p.block_bytes()]);
        for s in rest {
            store.accept(s).unwrap();
        }
        let done = drive(&mut store, work, &blobs);
        assert_eq!(done, vec![ObjectId::of_bytes(&bytes)]);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    /// A staging disk that fills mid-batch: the commit fails as "disk
    /// full" (the gateway stops storing on that), no shard is claimed, and
    /// shards discarded while the disk is full are not half-claimed either:
    /// once there is room, the same shards are taken as new.
    #[test]
    fn a_full_staging_disk_fails_the_commit_as_disk_full_and_claims_nothing() {
        let rig = Rig::new();
        let staging = rig.dir.path().join("staging");
        let Some(_disk) = weir_test_support::small_disk::SmallDisk::mount(&staging, "256k") else {
            return;
        };
        let (mut store, _, _db) = rig.open();
        let bytes = bytes_from(9, 600_000);
        let all = shards_of(&bytes, ObjectKind::Blob, fec(8, 2, 1000));
        for s in &all {
            store.accept(s.clone()).unwrap();
        }
        let Err(err) = store.commit() else {
            panic!("600 KB do not fit in 256 KiB");
        };
        assert!(crate::appliance::is_disk_full(&err), "{err}");
        assert_eq!(rig.count(&rig.counters.shards_stored), 0);
        assert!(store.progress().iter().all(|p| p.shards_held == 0));
        // Shards queued while full are discarded, unclaimed...
        for s in all.iter().take(5) {
            assert_eq!(store.accept(s.clone()).unwrap(), Accepted::Queued);
        }
        assert_eq!(store.discard_pending(), 5);
        assert_eq!(store.pending_len(), 0);
        // ...and are new again afterwards, not duplicates.
        assert_eq!(store.accept(all[0].clone()).unwrap(), Accepted::Queued);
    }

    #[test]
    fn any_k_shards_of_each_block_rebuild_the_object() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(2, 7_777);
        let p = fec(5, 3, 64);
        // Drop a different set of 3 shards in every block, data shards included.
        for s in shards_of(&bytes, ObjectKind::Blob, p) {
            let drop = (s.index as u32 + s.block) % 8 < 3;
            if !drop {
                store.accept(s).unwrap();
            }
        }
        let done = drive(&mut store, vec![], &blobs);
        assert_eq!(done.len(), 1);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
        assert!(rig.count(&rig.counters.blocks_repaired) > 0);
    }

    #[test]
    fn shards_from_two_lossy_passes_add_up() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(3, 5_000);
        let p = fec(4, 1, 50);
        let all = shards_of(&bytes, ObjectKind::Blob, p);
        // Pass 1 loses indices 0 and 1 of every block: 3 of 5 held, k = 4.
        for s in all.iter().filter(|s| s.index > 1) {
            store.accept(s.clone()).unwrap();
        }
        assert!(drive(&mut store, vec![], &blobs).is_empty());
        // Pass 2 loses indices 1..5: only index 0 arrives, the 4th shard.
        for s in all.iter() {
            let outcome = store.accept(s.clone()).unwrap();
            if s.index == 0 {
                assert_eq!(outcome, Accepted::Queued);
            }
        }
        let done = drive(&mut store, vec![], &blobs);
        assert_eq!(done.len(), 1);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    #[test]
    fn duplicates_are_counted_within_a_batch_across_passes_and_after_completion() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(4, 300);
        let all = shards_of(&bytes, ObjectKind::Blob, fec(2, 1, 100));
        store.accept(all[0].clone()).unwrap();
        assert_eq!(store.accept(all[0].clone()).unwrap(), Accepted::Duplicate); // same batch
        store.commit().unwrap();
        assert_eq!(store.accept(all[0].clone()).unwrap(), Accepted::Duplicate); // held
        for s in &all[1..] {
            store.accept(s.clone()).unwrap();
        }
        drive(&mut store, vec![], &blobs);
        assert_eq!(store.accept(all[1].clone()).unwrap(), Accepted::Duplicate); // complete
                                                                                // Both blocks had all their data shards in the second batch: their
                                                                                // parity was never needed, so never written.
        assert_eq!(rig.count(&rig.counters.shards_duplicate), 3 + 2);
        assert_eq!(rig.count(&rig.counters.shards_stored), all.len() as u64 - 2);
    }

    /// A staging leftover (its sender stopped sending it) is forgotten
    /// after the idle time, files and records; one still getting shards
    /// stays. A restart does not bring the forgotten one back.
    #[test]
    fn objects_idle_for_the_keep_time_leave_staging() {
        let rig = Rig::new();
        let (mut store, _, db) = rig.open();
        let (idle, busy) = (bytes_from(5, 3000), bytes_from(6, 3000));
        let idle_shards = shards_of(&idle, ObjectKind::Blob, fec(4, 2, 100));
        let busy_shards = shards_of(&busy, ObjectKind::Blob, fec(4, 2, 100));
        store.accept(idle_shards[0].clone()).unwrap();
        store.accept(busy_shards[0].clone()).unwrap();
        store.commit().unwrap();
        assert_eq!(staging_files(&rig), 4);
        let later = now_ms() + 10_000;
        assert!(store.release_idle(20_000, later).unwrap().is_empty());
        // A shard of one of them, not yet committed, counts as progress.
        store.accept(busy_shards[1].clone()).unwrap();
        let gone = store.release_idle(5_000, later).unwrap();
        assert_eq!(
            gone,
            vec![(ObjectId::of_bytes(&idle), ObjectKind::Blob, 3000)]
        );
        assert_eq!(staging_files(&rig), 2);
        store.commit().unwrap();
        drop(store);
        drop(db);
        let (store, _, _db) = rig.open();
        assert_eq!(store.progress().len(), 1);
        assert_eq!(store.progress()[0].id, ObjectId::of_bytes(&busy).digest());
    }

    /// A pruned object's shards are duplicates until it is wanted again.
    #[test]
    fn an_object_admitted_again_is_stored_again() {
        let rig = Rig::new();
        let db = StateDb::open(&rig.dir.path().join("db")).unwrap();
        let bytes = bytes_from(7, 300);
        let id = ObjectId::of_bytes(&bytes);
        let (mut store, _) = ShardStore::open(
            &db,
            &rig.dir.path().join("staging"),
            [id],
            rig.counters.clone(),
        )
        .unwrap();
        let shards = shards_of(&bytes, ObjectKind::Blob, fec(2, 1, 100));
        assert_eq!(
            store.accept(shards[0].clone()).unwrap(),
            Accepted::Duplicate
        );
        store.admit_again(&id);
        assert_eq!(store.accept(shards[0].clone()).unwrap(), Accepted::Queued);
    }

    #[test]
    fn changed_parameters_restart_the_object() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(5, 1000);
        let old = shards_of(&bytes, ObjectKind::Blob, fec(4, 2, 100));
        for s in old.iter().take(5) {
            store.accept(s.clone()).unwrap();
        }
        store.commit().unwrap();
        let new = shards_of(&bytes, ObjectKind::Blob, fec(3, 1, 120));
        assert_eq!(store.accept(new[0].clone()).unwrap(), Accepted::Conflict);
        assert_eq!(rig.count(&rig.counters.shards_conflicting), 1);
        for s in new.into_iter().skip(1) {
            store.accept(s).unwrap();
        }
        let done = drive(&mut store, vec![], &blobs);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    /// Batches handed over one after another, none claimed meanwhile: the
    /// writer lets go of each one's payloads once written (the store may
    /// hand over more), their fsyncs may be shared, and each is claimed in
    /// turn; the object comes out byte for byte.
    #[test]
    fn batches_written_ahead_of_their_fsync_are_claimed_in_order_and_whole() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(5, 4000);
        let shards = shards_of(&bytes, ObjectKind::Blob, fec(4, 2, 100));
        let batches = shards.len().div_ceil(3);
        for chunk in shards.chunks(3) {
            for s in chunk {
                store.accept(s.clone()).unwrap();
            }
            store.start_commit();
        }
        assert_eq!(store.in_flight(), batches);
        while store.unlanded() > 0 {
            store.wait_landed();
        }
        let mut work = Vec::new();
        for _ in 0..batches {
            work.extend(store.claim_next(true).expect("a batch in flight").unwrap());
        }
        assert_eq!(store.in_flight(), 0);
        let done = drive(&mut store, work, &blobs);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    /// A claim made while an earlier one waits for its commit builds on
    /// it, so sled ends with both batches' shards; memory takes them, and
    /// the finish is handed out, only once a commit covers them; their
    /// duplicates are not queued meanwhile.
    #[test]
    fn a_claim_builds_on_one_not_yet_committed_and_memory_waits_for_the_commit() {
        let rig = Rig::new();
        let (mut store, _, db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(7, 400);
        let data: Vec<ShardIn> = shards_of(&bytes, ObjectKind::Blob, fec(4, 2, 100))
            .into_iter()
            .filter(|s| s.index < 4)
            .collect();
        assert_eq!(data.len(), 4, "one block of four data shards");
        for half in data.chunks(2) {
            for s in half {
                store.accept(s.clone()).unwrap();
            }
            store.start_commit();
            let work = store.claim_next(true).expect("a batch in flight").unwrap();
            assert!(work.is_empty(), "nothing is handed out before the commit");
        }
        assert_eq!(store.claiming(), 2);
        let id = ObjectId::of_bytes(&bytes);
        assert_eq!(store.live[&id].assembly.shards_held(), 0);
        assert_eq!(store.accept(data[0].clone()).unwrap(), Accepted::Duplicate);
        assert_eq!(progress_from_db(&db).unwrap()[0].shards_held, 4);
        let mut work = Vec::new();
        while let Some(done) = store.take_committed(true) {
            work.extend(done.unwrap());
        }
        assert_eq!(store.live[&id].assembly.shards_held(), 4);
        assert!(
            matches!(work[..], [Work::Finish(_)]),
            "the object is finished once committed"
        );
        let done = drive(&mut store, work, &blobs);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    /// A batch still with the writer when its object starts over claims
    /// nothing into the new files; the new layout's shards complete the
    /// object byte for byte, and shards queued meanwhile are not queued
    /// twice.
    #[test]
    fn a_batch_with_the_writer_claims_nothing_of_a_restarted_object() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(9, 1000);
        let old = shards_of(&bytes, ObjectKind::Blob, fec(4, 2, 100));
        store.accept(old[0].clone()).unwrap();
        store.start_commit();
        assert_eq!(store.in_flight(), 1);
        // Queued while the batch is with the writer: a duplicate.
        assert_eq!(store.accept(old[0].clone()).unwrap(), Accepted::Duplicate);
        let new = shards_of(&bytes, ObjectKind::Blob, fec(3, 1, 120));
        assert_eq!(store.accept(new[0].clone()).unwrap(), Accepted::Conflict);
        let work = store.claim_next(true).expect("a batch in flight").unwrap();
        assert!(work.is_empty());
        let id = ObjectId::of_bytes(&bytes);
        assert_eq!(
            store.live[&id].assembly.shards_held(),
            0,
            "the old layout's shard is not claimed into the new files"
        );
        assert!(store.live[&id]
            .assembly
            .is_queued(new[0].block, new[0].index));
        for s in new.into_iter().skip(1) {
            store.accept(s).unwrap();
        }
        let done = drive(&mut store, vec![], &blobs);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    /// A crash mid-batch (the store dropped without committing): after
    /// reopening, what was committed is claimed and on disk byte for byte;
    /// the uncommitted batch is not claimed; resending completes the object.
    #[test]
    fn kill_mid_batch_keeps_committed_shards_and_claims_nothing_else() {
        let rig = Rig::new();
        // 313 blocks: their bitmaps span two sled chunks.
        let bytes = bytes_from(6, 20_000);
        let p = fec(4, 2, 16);
        assert!(p.blocks_for(20_000) > BLOCKS_PER_CHUNK);
        let all = shards_of(&bytes, ObjectKind::Blob, p);
        let (first, rest) = all.split_at(all.len() / 2);
        {
            let (mut store, _, _db) = rig.open();
            for s in first {
                store.accept(s.clone()).unwrap();
            }
            store.commit().unwrap();
            for s in rest.iter().take(50) {
                store.accept(s.clone()).unwrap();
            }
            assert_eq!(store.pending_len(), 50);
            // Dropped here: the 50 pending shards never reach a commit.
        }
        let (mut store, work, _db) = rig.open();
        let progress = store.progress();
        assert_eq!(progress.len(), 1);
        // Claimed: every data shard, and parity only of blocks still
        // missing data shards (the others' parity is never needed).
        let k = p.data_shards;
        let data_in_first = |block: u32| {
            first
                .iter()
                .filter(|s| s.block == block && s.index < k)
                .count()
        };
        let claimed: Vec<&ShardIn> = first
            .iter()
            .filter(|s| s.index < k || data_in_first(s.block) < k as usize)
            .collect();
        assert!(claimed.len() < first.len());
        assert_eq!(progress[0].shards_held, claimed.len() as u64);
        // Every claimed shard is on disk as sent.
        let staging = rig.dir.path().join("staging");
        let id = ObjectId::of_bytes(&bytes);
        let data = std::fs::read(staging.join(format!("{}.data", id.hex()))).unwrap();
        let parity = std::fs::read(staging.join(format!("{}.parity", id.hex()))).unwrap();
        let s = p.shard_size as usize;
        for sh in claimed {
            let (k, m) = (p.data_shards as usize, p.parity_shards as usize);
            let (file, off) = if (sh.index as usize) < k {
                (&data, (sh.block as usize * k + sh.index as usize) * s)
            } else {
                (&parity, (sh.block as usize * m + sh.index as usize - k) * s)
            };
            assert_eq!(
                &file[off..off + s],
                &sh.payload[..],
                "block {} index {}",
                sh.block,
                sh.index
            );
        }
        // The first half did not claim any of the second half.
        for sh in rest.iter().take(50) {
            assert_eq!(store.accept(sh.clone()).unwrap(), Accepted::Queued);
        }
        for sh in rest.iter().skip(50) {
            store.accept(sh.clone()).unwrap();
        }
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let done = drive(&mut store, work, &blobs);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    /// A crash after a block became decodable: the reopened store hands the
    /// decode (and then the finish) out again.
    #[test]
    fn reopened_store_resumes_decodes_and_finishes() {
        let rig = Rig::new();
        let bytes = bytes_from(7, 3000);
        let p = fec(4, 2, 100);
        {
            let (mut store, _, _db) = rig.open();
            for s in shards_of(&bytes, ObjectKind::Blob, p)
                .into_iter()
                .filter(|s| s.index != 1)
            {
                store.accept(s).unwrap();
            }
            let work = store.commit().unwrap();
            assert!(work.iter().all(|w| matches!(w, Work::Decode(_))) && !work.is_empty());
            // Dropped before any decode ran.
        }
        let (mut store, work, _db) = rig.open();
        assert_eq!(work.len(), p.blocks_for(3000) as usize);
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let done = drive(&mut store, work, &blobs);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    #[test]
    fn object_whole_while_its_decode_failed_is_still_finished() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let shards = shards_of(&bytes_from(12, 150), ObjectKind::Blob, fec(2, 1, 100));
        store.accept(shards[1].clone()).unwrap();
        store.accept(shards[2].clone()).unwrap();
        let work = store.commit().unwrap();
        let Some(Work::Decode(job)) = work.first() else {
            panic!("{work:?}")
        };
        // The missing data shard arrives while the decode is out...
        store.accept(shards[0].clone()).unwrap();
        assert!(
            store.commit().unwrap().is_empty(),
            "no finish while a decode is out"
        );
        // ...and the decode fails: the object is whole, so it is finished anyway.
        store.decode_failed(job.object, job.generation, job.block);
        let work = store.commit().unwrap();
        assert!(matches!(work.as_slice(), [Work::Finish(_)]), "{work:?}");
    }

    #[test]
    fn staging_files_without_a_committed_record_are_removed_at_restart() {
        let rig = Rig::new();
        let bytes = bytes_from(11, 1000);
        {
            let (mut store, _, _db) = rig.open();
            for s in shards_of(&bytes, ObjectKind::Blob, fec(4, 2, 100))
                .into_iter()
                .take(3)
            {
                store.accept(s).unwrap();
            }
            // Files exist now; the process dies before the first commit.
            assert_eq!(
                std::fs::read_dir(rig.dir.path().join("staging"))
                    .unwrap()
                    .count(),
                2
            );
        }
        let (store, _, _db) = rig.open();
        assert!(store.progress().is_empty());
        assert_eq!(
            std::fs::read_dir(rig.dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn missing_staging_file_at_restart_starts_the_object_over() {
        let rig = Rig::new();
        let bytes = bytes_from(8, 1000);
        let p = fec(4, 2, 100);
        let id = ObjectId::of_bytes(&bytes);
        {
            let (mut store, _, _db) = rig.open();
            for s in shards_of(&bytes, ObjectKind::Blob, p).into_iter().take(4) {
                store.accept(s).unwrap();
            }
            store.commit().unwrap();
        }
        std::fs::remove_file(
            rig.dir
                .path()
                .join("staging")
                .join(format!("{}.data", id.hex())),
        )
        .unwrap();
        let (store, work, _db) = rig.open();
        assert!(work.is_empty());
        assert!(
            store.progress().is_empty(),
            "claims without their file must go"
        );
    }

    #[test]
    fn corrupt_object_is_discarded_and_the_next_pass_completes_it() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        let bytes = bytes_from(9, 2000);
        let p = fec(4, 2, 100);
        let good = shards_of(&bytes, ObjectKind::Blob, p);
        // A shard whose payload is wrong but which passed the tag (a sender
        // bug, or a disk that flipped a bit): the object fails its sha256.
        for mut s in good.clone() {
            if s.block == 1 && s.index == 2 {
                let mut bytes = s.payload.to_vec();
                bytes[7] ^= 0xff;
                s.payload = bytes.into();
            }
            store.accept(s).unwrap();
        }
        assert!(drive(&mut store, vec![], &blobs).is_empty());
        assert!(
            store.progress().is_empty(),
            "the corrupt object's shards are discarded"
        );
        for s in good {
            store.accept(s).unwrap();
        }
        let done = drive(&mut store, vec![], &blobs);
        assert_eq!(blobs.read_object(&done[0]).unwrap(), bytes);
    }

    #[test]
    fn empty_object_crosses() {
        let rig = Rig::new();
        let (mut store, _, _db) = rig.open();
        let blobs = BlobStore::open(&rig.dir.path().join("blobs")).unwrap();
        for s in shards_of(b"", ObjectKind::Blob, fec(2, 1, 16)) {
            store.accept(s).unwrap();
        }
        let done = drive(&mut store, vec![], &blobs);
        assert_eq!(done, vec![ObjectId::of_bytes(b"")]);
        assert_eq!(blobs.len_of(&done[0]).unwrap(), 0);
    }

    #[test]
    fn offline_progress_matches_the_live_view() {
        let rig = Rig::new();
        let bytes = bytes_from(10, 40_000);
        let live_view;
        {
            let (mut store, _, _db) = rig.open();
            for s in shards_of(&bytes, ObjectKind::Image, fec(4, 2, 32))
                .into_iter()
                .step_by(2)
            {
                store.accept(s).unwrap();
            }
            store.commit().unwrap();
            live_view = store.progress();
        }
        let db = StateDb::open(&rig.dir.path().join("db")).unwrap();
        assert_eq!(progress_from_db(&db).unwrap(), live_view);
        assert_eq!(live_view[0].kind, "image");
    }
}
