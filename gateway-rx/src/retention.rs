//! Retention: what leaves the state disk, and when.
//!
//! # What is pruned
//!
//! - **Objects in the blob store** (blobs and image objects) once no image
//!   that needs them is still owed to a target: an object stays while any
//!   image naming it is still arriving or has a delivery not yet done.
//!   Once every image naming it is delivered to every target, it goes
//!   `keep_delivered_hours` after the last of those deliveries. An object
//!   no image names (a blob whose image object has not arrived, an image
//!   object refused as invalid) goes that long after it was verified.
//! - **Earlier, under pressure**: while the state disk is more than
//!   `high_water_percent` used, delivered objects go before their time,
//!   the longest delivered first, until the disk is back under the mark, in
//!   bytes and in inodes (many small objects use up the inodes first).
//!   The same holds while the disk is short of where intake resumes
//!   (`state_min_free_mb` and the inode floor, plus their margins): on a
//!   small disk, or with a large `state_min_free_mb`, intake would
//!   otherwise stop before the mark is passed, with delivered objects
//!   kept that could make room. Nothing still owed goes, however full the
//!   disk: intake then stops at `state_min_free_mb` as before.
//! - **Records waiting with them**: an image ledger record waiting for its
//!   chain's first record leaves once its image object is gone.
//! - **Staging leftovers**: an object in the shard store that got no shard
//!   for `keep_delivered_hours` (its sender stopped sending it) is
//!   forgotten, records and files, by the store stage itself.
//!
//! # Crash safety: the record first, then the file
//!
//! A prune records the object as pruned ([`PrunedObjects`]) and forgets
//! its verified record in one commit (`rx.retention.pruned`), and only
//! then deletes the file. A crash between the two leaves a pruned object
//! whose file is still there; the image ledger's recovery (rule 0 in
//! [`crate::images`]) finishes the deletion before anything looks at the
//! blob store, so the object is never taken for one the ledger forgot.
//! The other order would leave a verified record naming a missing file.
//!
//! # Already delivered stays delivered
//!
//! The image record of a delivered image is kept (it is small): an image
//! once delivered is never queued again. A sender that keeps cycling the
//! image, or is told to `resend` it, sends objects the receiver pruned:
//! their ids are remembered for at least a day ([`TOMBSTONE_MIN_KEEP_MS`],
//! or `keep_delivered_hours` if longer), so their shards count as
//! duplicates instead of filling staging again. After that, such an object
//! is received and verified again, found to belong to delivered images
//! only, and pruned at the next pass: never delivered twice. A new image
//! that needs a pruned blob (a base layer shared with an image delivered
//! long ago) lifts the blob's mark when its image object is registered,
//! and the blob is taken again from the sender's next pass (the sender
//! owes a new image's shared blobs new passes).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weir_host::appliance::{
    disk_usage, free_room, human_bytes, DiskUsage, Room, INODE_RESUME_MARGIN, MIN_FREE_INODES,
    RESUME_MARGIN,
};
use weir_host::reload::ReloadReader;
use weir_host::Shutdown;
use weir_proto::{ObjectId, ObjectKind};

use crate::blobs::BlobStore;
use crate::config::RetentionConfig;
use crate::delivery::{DeliveryQueue, JobState, Target};
use crate::images::{ImageLedger, ImageRecord, ImageState, LedgerError};
use crate::state::{now_ms, StateDb, StateError};
use crate::status::Counters;

const PRUNED_TREE: &str = "pruned_objects";
/// Pruned objects are remembered at least this long, so a sender still
/// cycling their image does not make the receiver store them again.
pub const TOMBSTONE_MIN_KEEP_MS: u64 = 24 * 3600 * 1000;
/// How often the state disk is looked at for the high-water mark.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Passes come at least this often (and at most this rarely: see
/// [`pass_every`]).
const PASS_EVERY_MIN: Duration = Duration::from_secs(1);
const PASS_EVERY_MAX: Duration = Duration::from_secs(600);
/// Above the high-water mark a pass comes at most this often, so a disk
/// full of undelivered images is not rescanned every second.
const PASS_EVERY_ABOVE_HIGH_WATER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Blobs(#[from] crate::blobs::BlobStoreError),
}

/// The objects whose shards the shard store takes as duplicates: those in
/// the blob store, and those pruned from it and still remembered.
pub fn settled_objects(
    blobs: &BlobStore,
    pruned: &PrunedObjects,
) -> Result<std::collections::HashSet<ObjectId>, RetentionError> {
    let mut settled = blobs.ids()?;
    settled.extend(pruned.ids()?);
    Ok(settled)
}

/// What the shard store must learn about objects it takes as complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreNotice {
    /// An image now arriving needs this pruned object: take its shards.
    Wanted(ObjectId),
    /// A pruned object is forgotten: its shards are taken again (and the
    /// store's memory of it freed).
    Released(ObjectId),
}

/// `keep_delivered_hours` in milliseconds.
pub fn keep_ms(config: &RetentionConfig) -> u64 {
    (config.keep_delivered_hours.max(0.0) * 3_600_000.0) as u64
}

/// How often a full pass runs: often enough that nothing outlives its time
/// by much more than a quarter of it.
pub fn pass_every(config: &RetentionConfig) -> Duration {
    Duration::from_millis(keep_ms(config) / 4).clamp(PASS_EVERY_MIN, PASS_EVERY_MAX)
}

/// A pruned object, remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PrunedRecord {
    kind: ObjectKind,
    bytes: u64,
    pruned_ms: u64,
}

/// Objects pruned from the blob store (`pruned_objects` tree): what a
/// crash between record and file leaves to finish, and what the shard
/// store takes as complete.
#[derive(Clone)]
pub struct PrunedObjects {
    db: StateDb,
    tree: sled::Tree,
}

impl PrunedObjects {
    pub fn open(db: &StateDb) -> Result<PrunedObjects, StateError> {
        Ok(PrunedObjects {
            db: db.clone(),
            tree: db.tree(PRUNED_TREE)?,
        })
    }

    fn record(&self, id: &ObjectId, r: &PrunedRecord) -> Result<(), StateError> {
        let v = serde_json::to_vec(r).map_err(|e| self.db.corrupt(id.digest(), e))?;
        self.tree
            .insert(id.0, v)
            .map_err(|e| self.db.sled_error(e))?;
        Ok(())
    }

    /// Records `id` as pruned now, as retention does before it deletes
    /// the file; for the operator's `forget-image`. Not durable until the
    /// caller's commit.
    pub fn record_now(
        &self,
        id: &ObjectId,
        kind: ObjectKind,
        bytes: u64,
    ) -> Result<(), StateError> {
        self.record(
            id,
            &PrunedRecord {
                kind,
                bytes,
                pruned_ms: now_ms(),
            },
        )
    }

    pub fn contains(&self, id: &ObjectId) -> Result<bool, StateError> {
        self.tree
            .contains_key(id.0)
            .map_err(|e| self.db.sled_error(e))
    }

    /// Forgets that `id` was pruned (an image needs it again). Not durable
    /// until the caller's commit. True if it was pruned.
    pub fn lift(&self, id: &ObjectId) -> Result<bool, StateError> {
        Ok(self
            .tree
            .remove(id.0)
            .map_err(|e| self.db.sled_error(e))?
            .is_some())
    }

    /// Every pruned object still remembered, with when it was pruned.
    fn all(&self) -> Result<Vec<(ObjectId, PrunedRecord)>, StateError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let Ok(raw) = <[u8; 32]>::try_from(&k[..]) else {
                continue;
            };
            match serde_json::from_slice::<PrunedRecord>(&v) {
                Ok(r) => out.push((ObjectId(raw), r)),
                // Unreadable: forgetting it costs at most a re-received object.
                Err(_) => {
                    self.tree.remove(k).map_err(|e| self.db.sled_error(e))?;
                }
            }
        }
        Ok(out)
    }

    /// The ids, for the shard store's set of objects whose shards are
    /// duplicates.
    pub fn ids(&self) -> Result<Vec<ObjectId>, StateError> {
        Ok(self.all()?.into_iter().map(|(id, _)| id).collect())
    }

    /// Recovery: deletes the files of objects pruned before a crash cut the
    /// deletion short. Returns how many were finished.
    pub fn finish_deletions(&self, store: &BlobStore) -> Result<usize, StateError> {
        let mut finished = 0;
        for (id, _) in self.all()? {
            let path = store.path_of(&id);
            if !path.exists() {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    finished += 1;
                    tracing::warn!(object = %id,
                        "object pruned before a crash still had its file; deleted now");
                }
                Err(e) => {
                    return Err(StateError::Io {
                        path,
                        what: "removing a pruned object",
                        source: e,
                    })
                }
            }
        }
        Ok(finished)
    }
}

/// How the images holding an object stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// An image naming it is still arriving or still to deliver.
    Needed,
    /// Every image naming it is delivered; the last delivery ended then (ms).
    DeliveredAt(u64),
    /// No image names it.
    Unclaimed,
}

impl Holding {
    /// Adds one more image naming the object; `delivered_at` is `None`
    /// while that image is still owed.
    fn and(self, delivered_at: Option<u64>) -> Holding {
        match (self, delivered_at) {
            (Holding::Needed, _) | (_, None) => Holding::Needed,
            (Holding::DeliveredAt(a), Some(b)) => Holding::DeliveredAt(a.max(b)),
            (Holding::Unclaimed, Some(b)) => Holding::DeliveredAt(b),
        }
    }
}

/// An object in the blob store, as retention judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub id: ObjectId,
    pub kind: ObjectKind,
    /// What deleting its file frees (0 for a file also linked elsewhere,
    /// e.g. into an OCI layout on the same disk).
    pub frees: u64,
    /// Whether deleting its file frees an inode (not when the file is also
    /// linked elsewhere).
    pub frees_inode: bool,
    pub verified_ms: u64,
    pub holding: Holding,
}

/// How far the state disk is past its high-water mark: bytes, and inodes
/// (a disk can run out of either; many small objects fill the inodes
/// first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Excess {
    pub bytes: u64,
    pub inodes: u64,
}

impl Excess {
    pub fn is_some(&self) -> bool {
        self.bytes > 0 || self.inodes > 0
    }
}

/// What must be freed early on a disk in `usage` with `room` free for the
/// gateway: what is used past `high_water_percent`, or, if more, what
/// stands between `room` and where intake resumes (`min_free_bytes` and
/// the inode floor, each with its margin; `room` is what the intake guard
/// reads, without the blocks reserved for root), so that intake never
/// stops while delivered objects that could make room are kept.
pub fn pressure(
    usage: &DiskUsage,
    room: &Room,
    high_water_percent: u32,
    min_free_bytes: u64,
) -> Excess {
    let (bytes_short, inodes_short) = room.short_of(
        min_free_bytes.saturating_add(RESUME_MARGIN),
        MIN_FREE_INODES + INODE_RESUME_MARGIN,
    );
    Excess {
        bytes: usage.above_percent(high_water_percent).max(bytes_short),
        inodes: usage
            .inodes_above_percent(high_water_percent)
            .max(inodes_short),
    }
}

/// Why an object is pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneRule {
    /// Delivered (or unclaimed) for longer than `keep_delivered_hours`.
    KeptLongEnough,
    /// The state disk is past its high-water mark, or short of where
    /// intake resumes; delivered longest ago.
    HighWater,
}

impl PruneRule {
    pub fn name(self) -> &'static str {
        match self {
            PruneRule::KeptLongEnough => "kept long enough",
            PruneRule::HighWater => "state disk past its high-water mark",
        }
    }
}

/// Which objects to prune now: those kept long enough, then, while bytes
/// or inodes past the high-water mark must still be freed, delivered ones
/// by the time of their last delivery, oldest first. Nothing needed is
/// ever chosen.
pub fn plan(
    objects: &[StoredObject],
    now_ms: u64,
    keep_ms: u64,
    over_high_water: Excess,
) -> Vec<(ObjectId, PruneRule)> {
    let mut out = Vec::new();
    let mut to_free = over_high_water;
    let free = |to_free: &mut Excess, o: &StoredObject| {
        to_free.bytes = to_free.bytes.saturating_sub(o.frees);
        to_free.inodes = to_free.inodes.saturating_sub(u64::from(o.frees_inode));
    };
    let mut early = Vec::new();
    for o in objects {
        let since = match o.holding {
            Holding::Needed => continue,
            Holding::DeliveredAt(t) => t,
            Holding::Unclaimed => o.verified_ms,
        };
        if now_ms.saturating_sub(since) >= keep_ms {
            out.push((o.id, PruneRule::KeptLongEnough));
            free(&mut to_free, o);
        } else if let Holding::DeliveredAt(t) = o.holding {
            early.push((t, o));
        }
    }
    early.sort_by_key(|(t, o)| (*t, o.id.0));
    for (_, o) in early {
        if !to_free.is_some() {
            break;
        }
        out.push((o.id, PruneRule::HighWater));
        free(&mut to_free, o);
    }
    out
}

/// When an image was delivered to its last target, or `None` while it is
/// still arriving or owed to a target.
fn delivered_at(
    queue: &DeliveryQueue,
    id: &ObjectId,
    record: &ImageRecord,
) -> Result<Option<u64>, StateError> {
    if record.state != ImageState::Complete {
        return Ok(None);
    }
    // Delivered jobs are forgotten after a week; an image whose jobs are
    // all forgotten counts as delivered when it completed.
    let completed = record.complete_at_ms.unwrap_or(0);
    let mut at = None;
    for target in [Target::Registry, Target::OciLayout] {
        if let Some(job) = queue.get(target, id)? {
            if job.state == JobState::Pending {
                return Ok(None);
            }
            let done = job.done_ms.unwrap_or(completed);
            at = Some(at.map_or(done, |a: u64| a.max(done)));
        }
    }
    Ok(Some(at.unwrap_or(completed)))
}

/// An image holding an object, for the prune's log line.
#[derive(Debug, Clone, Default)]
struct HolderName {
    /// When the named image was delivered (`u64::MAX` while owed).
    at: u64,
    manifest_digest: String,
    reference: String,
    images: usize,
}

/// The retention stage: a pass now and then over the blob store and the
/// pruned objects.
pub struct Retention {
    pub ledger: Arc<ImageLedger>,
    pub blobs: BlobStore,
    pub queue: DeliveryQueue,
    pub pruned: PrunedObjects,
    pub db: StateDb,
    pub state_dir: PathBuf,
    pub policy: ReloadReader<RetentionConfig>,
    pub notices: Sender<StoreNotice>,
    pub counters: Arc<Counters>,
    /// `[ledger] keep_records`: the image ledger records of a chain kept
    /// whatever their age.
    pub keep_records: u64,
    /// Free bytes below which intake stops (`state_min_free_mb`).
    pub min_free_bytes: u64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassOutcome {
    pub pruned: usize,
    pub bytes: u64,
    pub forgotten: usize,
    /// Image ledger records pruned.
    pub records: u64,
}

impl Retention {
    /// Runs passes until shutdown.
    pub fn run(mut self, shutdown: &Shutdown) {
        let mut last_pass: Option<Instant> = None;
        let mut stuck_above = false;
        loop {
            let policy = **self.policy.get();
            let over = self.over_high_water(&policy);
            let due = match last_pass {
                None => true,
                Some(t) if over.is_some() => t.elapsed() >= PASS_EVERY_ABOVE_HIGH_WATER,
                Some(t) => t.elapsed() >= pass_every(&policy),
            };
            if due {
                last_pass = Some(Instant::now());
                match self.pass(&policy, over) {
                    Ok(outcome) => {
                        let still_over = outcome.pruned == 0 && over.is_some();
                        if still_over && !stuck_above {
                            tracing::warn!(over_by = %human_bytes(over.bytes), inodes_over = over.inodes,
                                high_water_percent = policy.high_water_percent,
                                min_free_mb = self.min_free_bytes >> 20,
                                "state disk past its high-water mark (or short of where intake resumes), and nothing delivered is left to prune");
                        }
                        stuck_above = still_over;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "retention pass failed; trying again later")
                    }
                }
            }
            if shutdown.sleep(DISK_CHECK_EVERY) {
                return;
            }
        }
    }

    /// Bytes and inodes used above the high-water mark, or short of where
    /// intake resumes if that asks more (0 when neither, or unknown).
    fn over_high_water(&self, policy: &RetentionConfig) -> Excess {
        match disk_usage(&self.state_dir).and_then(|u| Ok((u, free_room(&self.state_dir)?))) {
            Ok((u, room)) => pressure(&u, &room, policy.high_water_percent, self.min_free_bytes),
            Err(_) => Excess::default(),
        }
    }

    /// One pass: prune what is due, forget pruned objects remembered long
    /// enough.
    pub fn pass(
        &self,
        policy: &RetentionConfig,
        over_high_water: Excess,
    ) -> Result<PassOutcome, RetentionError> {
        let keep = keep_ms(policy);
        let now = now_ms();
        // Under the ledger's lock: no image registers or completes while
        // the pass decides and prunes, so what it judged unneeded stays so.
        let _writing = self.ledger.lock_writes();
        let records = self.prune_ledger(keep, now)?;
        let (objects, names) = self.stored_objects()?;
        let chosen = plan(&objects, now, keep, over_high_water);
        // Records waiting for their chain's first record leave with their
        // image object: pruned now, or before.
        let staying: HashSet<ObjectId> = {
            let going: HashSet<&ObjectId> = chosen.iter().map(|(id, _)| id).collect();
            objects
                .iter()
                .map(|o| o.id)
                .filter(|id| !going.contains(id))
                .collect()
        };
        let unwaited = self
            .ledger
            .chains()
            .forget_waiting_unless(&|id| staying.contains(id))?;
        if unwaited > 0 {
            tracing::info!(records = unwaited,
                "image ledger records that waited for their chain's first record forgotten with their \
                 pruned image objects");
        }
        let tombstone_keep = keep.max(TOMBSTONE_MIN_KEEP_MS);
        let expired: Vec<(ObjectId, PrunedRecord)> = self
            .pruned
            .all()?
            .into_iter()
            .filter(|(_, r)| now.saturating_sub(r.pruned_ms) >= tombstone_keep)
            .collect();
        if chosen.is_empty() && expired.is_empty() {
            if records > 0 || unwaited > 0 {
                self.db.commit("rx.retention.pruned")?;
            }
            return Ok(PassOutcome {
                records,
                ..Default::default()
            });
        }
        let by_id: HashMap<ObjectId, &StoredObject> = objects.iter().map(|o| (o.id, o)).collect();
        for (id, _) in &expired {
            self.pruned.lift(id)?;
        }
        for (id, _) in &chosen {
            let Some(o) = by_id.get(id) else { continue };
            let record = PrunedRecord {
                kind: o.kind,
                bytes: o.frees,
                pruned_ms: now,
            };
            self.pruned.record(id, &record)?;
            self.ledger.forget_verified(id)?;
        }
        // Recorded before any file goes: see the module doc.
        self.db.commit("rx.retention.pruned")?;
        let mut outcome = PassOutcome {
            forgotten: expired.len(),
            records,
            ..Default::default()
        };
        for (id, rule) in &chosen {
            let Some(o) = by_id.get(id) else { continue };
            let path = self.blobs.path_of(id);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    // Recorded as pruned: the next start finishes it.
                    tracing::error!(object = %id, path = %path.display(), error = %e,
                        "pruned object's file not deleted; retried at the next start");
                    continue;
                }
            }
            outcome.pruned += 1;
            outcome.bytes += o.frees;
            let name = names.get(id).cloned().unwrap_or_default();
            let held_for_h = match o.holding {
                Holding::DeliveredAt(t) => now.saturating_sub(t) as f64 / 3_600_000.0,
                _ => now.saturating_sub(o.verified_ms) as f64 / 3_600_000.0,
            };
            if name.images == 0 {
                tracing::info!(object = %id, kind = crate::shards::kind_name(o.kind),
                    bytes = o.frees, hours = held_for_h, rule = rule.name(),
                    "pruned from the blob store (no image names it)");
            } else {
                tracing::info!(digest = %name.manifest_digest, reference = %name.reference,
                    images = name.images, object = %id, kind = crate::shards::kind_name(o.kind),
                    bytes = o.frees, hours_since_delivery = held_for_h, rule = rule.name(),
                    "pruned from the blob store (image delivered)");
            }
        }
        Counters::add(&self.counters.objects_pruned, outcome.pruned as u64);
        Counters::add(&self.counters.bytes_pruned, outcome.bytes);
        for (id, _) in &expired {
            if !self.blobs.contains(id) {
                let _ = self.notices.send(StoreNotice::Released(*id));
            }
        }
        if outcome.pruned > 0 {
            tracing::info!(objects = outcome.pruned, bytes = %human_bytes(outcome.bytes),
                forgotten = outcome.forgotten, "retention pass");
        }
        Ok(outcome)
    }

    /// Prunes the image ledger's records of images delivered to every
    /// target `keep` ms ago (see [`crate::ledger`]); logged per chain with
    /// its new checkpoint. Not durable until the pass commits.
    fn prune_ledger(&self, keep: u64, now: u64) -> Result<u64, RetentionError> {
        let mut delivered: HashMap<String, u64> = HashMap::new();
        let mut failed = None;
        self.ledger.for_each_image(
            &mut |id, record| match delivered_at(&self.queue, &id, record) {
                Ok(Some(at)) => {
                    delivered.insert(id.digest(), at);
                }
                Ok(None) => {}
                Err(e) => failed = Some(e),
            },
        )?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        let pruned = self.ledger.chains().prune(
            self.keep_records,
            |r| {
                delivered
                    .get(&r.image)
                    .is_some_and(|at| now.saturating_sub(*at) >= keep)
            },
            now,
        )?;
        let mut count = 0;
        for (chain, records, checkpoint) in pruned {
            count += records;
            tracing::info!(chain = %chain, records, checkpoint_seq = checkpoint.seq,
                checkpoint_hash = %checkpoint.hash.short(),
                "image ledger records of delivered images pruned; the chain is checked from \
                 its checkpoint on");
        }
        Ok(count)
    }

    /// Every object in the blob store with how its images stand, and for
    /// each the image to name in the log (the last delivered one).
    #[allow(clippy::type_complexity)]
    fn stored_objects(
        &self,
    ) -> Result<(Vec<StoredObject>, HashMap<ObjectId, HolderName>), RetentionError> {
        let mut objects: HashMap<ObjectId, StoredObject> = HashMap::new();
        for (id, kind, verified_ms) in self.ledger.verified_objects()? {
            let Ok(meta) = std::fs::metadata(self.blobs.path_of(&id)) else {
                continue;
            };
            let frees_inode = meta.nlink() <= 1;
            let frees = if frees_inode {
                meta.blocks().saturating_mul(512)
            } else {
                0
            };
            objects.insert(
                id,
                StoredObject {
                    id,
                    kind,
                    frees,
                    frees_inode,
                    verified_ms,
                    holding: Holding::Unclaimed,
                },
            );
        }
        let mut names: HashMap<ObjectId, HolderName> = HashMap::new();
        let mut failed: Option<StateError> = None;
        self.ledger.for_each_image(&mut |image, record| {
            let delivered = match delivered_at(&self.queue, &image, record) {
                Ok(d) => d,
                Err(e) => {
                    failed.get_or_insert(e);
                    None
                }
            };
            let named = std::iter::once(image).chain(
                record
                    .blobs
                    .iter()
                    .filter_map(|(d, _)| ObjectId::from_digest(d).ok()),
            );
            for id in named {
                let Some(o) = objects.get_mut(&id) else {
                    continue;
                };
                o.holding = o.holding.and(delivered);
                let name = names.entry(id).or_default();
                name.images += 1;
                // An image still owed outranks any delivered one.
                let at = delivered.unwrap_or(u64::MAX);
                if name.manifest_digest.is_empty() || at >= name.at {
                    name.at = at;
                    name.manifest_digest.clone_from(&record.manifest_digest);
                    name.reference = record.reference();
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok((objects.into_values().collect(), names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RxConfig;
    use std::path::Path;
    use std::sync::mpsc;
    use weir_test_support::{sample_image, SampleImage};

    const H: u64 = 3_600_000;

    /// A receiver's durable state in a temporary directory, with a ledger
    /// delivering to the OCI layout only.
    struct Rig {
        dir: tempfile::TempDir,
        db: StateDb,
        blobs: BlobStore,
        queue: DeliveryQueue,
        ledger: Arc<ImageLedger>,
        notices: mpsc::Receiver<StoreNotice>,
        retention: Retention,
    }

    fn config(root: &Path) -> RxConfig {
        let text = format!(
            "state_dir = \"{}/state\"\n[link]\ntransport = \"udp\"\nudp_listen = \"127.0.0.1:0\"\n\
             [[auth.keys]]\nid = 1\nfile = \"/nonexistent\"\n",
            root.display()
        );
        RxConfig::parse(&text, Path::new("test.toml")).unwrap()
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("state/db")).unwrap();
        open_rig(dir, db)
    }

    /// The state as a restart finds it: everything opened again, the
    /// ledger's recheck run.
    fn restart(rig: Rig) -> Rig {
        let Rig { dir, db, .. } = rig;
        open_rig(dir, db)
    }

    fn open_rig(dir: tempfile::TempDir, db: StateDb) -> Rig {
        let blobs = BlobStore::open(&dir.path().join("state/blobs")).unwrap();
        let queue = DeliveryQueue::open(&db).unwrap();
        let counters = Arc::new(Counters::default());
        let (tx, notices) = mpsc::channel();
        let ledger = Arc::new(
            ImageLedger::open(
                &db,
                blobs.clone(),
                queue.clone(),
                &config(dir.path()),
                counters.clone(),
                None,
            )
            .unwrap()
            .with_store_notices(tx.clone()),
        );
        ledger.recheck().unwrap();
        let retention = Retention {
            ledger: ledger.clone(),
            blobs: blobs.clone(),
            queue: queue.clone(),
            pruned: PrunedObjects::open(&db).unwrap(),
            db: db.clone(),
            state_dir: dir.path().join("state"),
            policy: weir_host::reload::Reloadable::new(RetentionConfig::default()).reader(),
            notices: tx,
            counters,
            keep_records: 1,
            min_free_bytes: 0,
        };
        Rig {
            dir,
            db,
            blobs,
            queue,
            ledger,
            notices,
            retention,
        }
    }

    impl Rig {
        /// Every object of `img` verified, in the order the sender sends.
        fn receive(&self, img: &SampleImage) -> ObjectId {
            for (kind, bytes) in img.objects() {
                let id = self.blobs.insert_bytes(&bytes).unwrap();
                self.ledger.object_verified(id, kind, now_ms()).unwrap();
            }
            ObjectId::of_bytes(&img.image_bytes())
        }

        /// Marks the image's job done `hours_ago`.
        fn delivered(&self, image: &ObjectId, hours_ago: u64) {
            let mut job = self.queue.get(Target::OciLayout, image).unwrap().unwrap();
            job.state = JobState::Done;
            job.done_ms = Some(now_ms() - hours_ago * H);
            self.queue.save(&job).unwrap();
        }

        fn pass(&self, keep_hours: f64, over: u64) -> PassOutcome {
            let policy = RetentionConfig {
                keep_delivered_hours: keep_hours,
                ..RetentionConfig::default()
            };
            self.retention.pass(&policy, bytes(over)).unwrap()
        }

        fn held(&self, img: &SampleImage) -> Vec<bool> {
            img.objects()
                .iter()
                .map(|(_, b)| self.blobs.contains(&ObjectId::of_bytes(b)))
                .collect()
        }

        fn jobs(&self) -> usize {
            self.queue.all().unwrap().len()
        }
    }

    #[test]
    fn a_delivered_image_goes_after_keep_and_a_restart_or_a_resend_never_delivers_it_again() {
        let r = rig();
        let img = sample_image("team/app", &["1"], 2, 3000);
        let image = r.receive(&img);
        assert_eq!(r.jobs(), 1);
        // Still to deliver: kept, whatever the time and the disk.
        assert_eq!(r.pass(0.0, u64::MAX), PassOutcome::default());
        r.delivered(&image, 10);
        assert_eq!(r.pass(72.0, 0).pruned, 0, "delivered 10 h ago, kept 72 h");
        let out = r.pass(8.0, 0);
        assert_eq!(out.pruned, 4, "three blobs and the image object");
        assert!(r.held(&img).iter().all(|h| !h));
        assert!(r.retention.pruned.contains(&image).unwrap());

        // A restart finds nothing to recover and queues nothing.
        let r = restart(r);
        assert_eq!(r.jobs(), 1);
        assert!(r.held(&img).iter().all(|h| !h));
        // The sender sends the image again: verified, not delivered again.
        r.receive(&img);
        assert_eq!(r.jobs(), 1);
        let job = r.queue.get(Target::OciLayout, &image).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done);
        // ...and gone again at the next pass: its image is long delivered.
        assert_eq!(r.pass(8.0, 0).pruned, 4);
    }

    #[test]
    fn a_record_waiting_for_a_first_record_that_never_comes_leaves_with_its_pruned_image_object() {
        let r = rig();
        // Record 2 of a chain whose record 1 never reaches this receiver.
        let first = sample_image("team/app", &["1"], 1, 3000);
        let second = sample_image("team/app", &["2"], 1, 3000).following(&first.tm.ledger.head());
        let image = r.receive(&second);
        let chains = r.ledger.chains();
        assert_eq!(chains.waiting_chains().unwrap().len(), 1);
        // Not named by any image: it goes once kept, and its record with it.
        assert_eq!(r.pass(72.0, 0).pruned, 0);
        assert_eq!(chains.waiting_chains().unwrap().len(), 1);
        assert_eq!(r.pass(0.0, 0).pruned, 3, "config, layer and image object");
        assert!(r.retention.pruned.contains(&image).unwrap());
        assert!(chains.waiting_chains().unwrap().is_empty());
        // Also after a restart, from the database.
        let r = restart(r);
        assert!(r.ledger.chains().waiting_chains().unwrap().is_empty());

        // A record whose image object went before (an older build pruned it
        // and kept the record) goes at the next pass, with nothing to prune.
        let third = sample_image("team/app", &["3"], 1, 3000).following(&second.tm.ledger.head());
        let image = r.receive(&third);
        assert_eq!(r.ledger.chains().waiting_chains().unwrap().len(), 1);
        {
            let _writing = r.ledger.lock_writes();
            r.ledger.forget_verified(&image).unwrap();
        }
        assert_eq!(r.pass(72.0, 0).pruned, 0);
        assert!(r.ledger.chains().waiting_chains().unwrap().is_empty());
    }

    #[test]
    fn ledger_records_of_images_delivered_long_ago_are_pruned_to_a_checkpoint() {
        let r = rig();
        let first = sample_image("team/app", &["1"], 1, 3000);
        let second = sample_image("team/app", &["2"], 1, 3000).following(&first.tm.ledger.head());
        let third = sample_image("team/app", &["3"], 1, 3000).following(&second.tm.ledger.head());
        let images = [r.receive(&first), r.receive(&second), r.receive(&third)];
        r.delivered(&images[0], 100);
        r.delivered(&images[1], 10);
        r.delivered(&images[2], 100);
        // Image 2 not delivered long enough: the prune stops before it.
        assert_eq!(r.pass(72.0, 0).records, 1);
        let chains = r.ledger.chains();
        let chain = first.tm.ledger.chain;
        let start = chains.start_of(chain).unwrap().expect("a checkpoint");
        assert_eq!(start.checkpoint.map(|c| c.seq), Some(1));
        // Then image 2 goes; the newest record (keep_records = 1) stays.
        assert_eq!(r.pass(8.0, 0).records, 1);
        assert!(chains.get(chain, 2).unwrap().is_none());
        assert!(chains.get(chain, 3).unwrap().is_some());
        assert_eq!(chains.highest_contiguous(chain).unwrap(), 3);
        // Image 1 sent again after all that: never delivered again.
        let r = restart(r);
        r.receive(&first);
        assert_eq!(r.jobs(), 3);
    }

    #[test]
    fn a_crash_between_the_prune_record_and_the_file_is_finished_at_restart() {
        let r = rig();
        let img = sample_image("team/app", &["1"], 1, 3000);
        let image = r.receive(&img);
        r.delivered(&image, 100);
        // What `pass` does before the crash point: the record, committed.
        for (kind, bytes) in img.objects() {
            let id = ObjectId::of_bytes(&bytes);
            let record = PrunedRecord {
                kind,
                bytes: bytes.len() as u64,
                pruned_ms: now_ms(),
            };
            r.retention.pruned.record(&id, &record).unwrap();
            r.ledger.forget_verified(&id).unwrap();
        }
        r.db.commit("test").unwrap();
        assert!(r.held(&img).iter().all(|h| *h), "the files are still there");

        let r = restart(r);
        assert!(
            r.held(&img).iter().all(|h| !h),
            "deleted, not adopted again"
        );
        assert!(r.ledger.verified_objects().unwrap().is_empty());
        assert_eq!(r.jobs(), 1, "nothing queued again");
        assert_eq!(r.pass(0.0, 0).pruned, 0);
    }

    #[test]
    fn a_new_image_needing_a_pruned_blob_lifts_it_and_completes_when_it_comes_again() {
        let r = rig();
        // Two images of one layer each: the same layer bytes (only the
        // configs differ), a base shared across days.
        let first = sample_image("team/a", &["1"], 1, 3000);
        let second = sample_image("team/b", &["1"], 1, 3000);
        let layer = first.blob_ids()[1];
        assert_eq!(layer, second.blob_ids()[1]);
        let image = r.receive(&first);
        r.delivered(&image, 100);
        assert_eq!(r.pass(72.0, 0).pruned, 3);
        assert!(r.notices.try_recv().is_err());

        // The second image's config and image object arrive; its layer was
        // pruned: it is wanted again, and the image waits for it.
        let config_id = r.blobs.insert_bytes(&second.blobs[0]).unwrap();
        r.ledger
            .object_verified(config_id, ObjectKind::Blob, now_ms())
            .unwrap();
        let second_image = r.blobs.insert_bytes(&second.image_bytes()).unwrap();
        let done = r
            .ledger
            .object_verified(second_image, ObjectKind::Image, now_ms())
            .unwrap();
        assert!(done.is_empty());
        assert_eq!(r.notices.try_recv(), Ok(StoreNotice::Wanted(layer)));
        assert!(!r.retention.pruned.contains(&layer).unwrap());
        // Nothing of an image still arriving goes, however full the disk.
        assert_eq!(r.pass(0.0, u64::MAX).pruned, 0);
        assert!(r.blobs.contains(&config_id) && r.blobs.contains(&second_image));

        r.blobs.insert_bytes(&second.blobs[1]).unwrap();
        let done = r
            .ledger
            .object_verified(layer, ObjectKind::Blob, now_ms())
            .unwrap();
        assert_eq!(done, vec![second_image]);
        assert_eq!(r.jobs(), 2);
    }

    #[test]
    fn past_the_high_water_mark_delivered_images_go_oldest_first_and_owed_ones_stay() {
        let r = rig();
        let old = sample_image("team/old", &["1"], 1, 20_000);
        let recent = sample_image("team/recent", &["1"], 1, 30_000);
        let owed = sample_image("team/owed", &["1"], 1, 40_000);
        let (a, b) = (r.receive(&old), r.receive(&recent));
        r.receive(&owed);
        r.delivered(&a, 5);
        r.delivered(&b, 1);
        // Well within keep; one byte over the mark: the oldest image goes.
        let out = r.pass(72.0, 1);
        assert_eq!(out.pruned, 1, "the object delivered longest ago");
        let out = r.pass(72.0, 1 << 30);
        assert_eq!(out.pruned, 5, "the rest of both delivered images");
        assert!(r.held(&old).iter().all(|h| !h));
        assert!(r.held(&recent).iter().all(|h| !h));
        assert!(r.held(&owed).iter().all(|h| *h));
        assert!(out.bytes > 0);
    }

    #[test]
    fn pruned_objects_are_forgotten_after_a_day_and_the_store_told() {
        let r = rig();
        let img = sample_image("team/app", &["1"], 1, 3000);
        let image = r.receive(&img);
        r.delivered(&image, 100);
        r.pass(0.0, 0);
        assert_eq!(r.retention.pruned.ids().unwrap().len(), 3);
        // Age the records by a day.
        for (id, mut rec) in r.retention.pruned.all().unwrap() {
            rec.pruned_ms -= TOMBSTONE_MIN_KEEP_MS;
            r.retention.pruned.record(&id, &rec).unwrap();
        }
        assert_eq!(r.pass(0.0, 0).forgotten, 3);
        assert!(r.retention.pruned.ids().unwrap().is_empty());
        let released: Vec<StoreNotice> = r.notices.try_iter().collect();
        assert_eq!(released.len(), 3);
        assert!(released.contains(&StoreNotice::Released(image)));
        drop(r.dir);
    }

    fn id(n: u8) -> ObjectId {
        ObjectId([n; 32])
    }

    fn obj(n: u8, frees: u64, holding: Holding) -> StoredObject {
        StoredObject {
            id: id(n),
            kind: ObjectKind::Blob,
            frees,
            frees_inode: true,
            verified_ms: 0,
            holding,
        }
    }

    fn bytes(n: u64) -> Excess {
        Excess {
            bytes: n,
            inodes: 0,
        }
    }

    #[test]
    fn what_is_still_owed_is_kept_however_full_the_disk() {
        let objects = [obj(1, 100, Holding::Needed)];
        assert!(plan(&objects, 1000 * H, 0, bytes(u64::MAX)).is_empty());
    }

    #[test]
    fn delivered_objects_go_once_kept_long_enough() {
        let objects = [
            obj(1, 10, Holding::DeliveredAt(0)),
            obj(2, 10, Holding::DeliveredAt(50 * H)),
            obj(3, 10, Holding::Needed),
        ];
        assert_eq!(
            plan(&objects, 72 * H, 72 * H, bytes(0)),
            vec![(id(1), PruneRule::KeptLongEnough)]
        );
        assert!(plan(&objects, 72 * H - 1, 72 * H, bytes(0)).is_empty());
    }

    #[test]
    fn unclaimed_objects_go_that_long_after_they_were_verified() {
        let mut o = obj(1, 10, Holding::Unclaimed);
        o.verified_ms = 10 * H;
        assert!(plan(std::slice::from_ref(&o), 81 * H, 72 * H, bytes(0)).is_empty());
        assert_eq!(
            plan(std::slice::from_ref(&o), 82 * H, 72 * H, bytes(0)),
            vec![(id(1), PruneRule::KeptLongEnough)]
        );
        // Not early under pressure: its image may yet arrive.
        assert!(plan(std::slice::from_ref(&o), 11 * H, 72 * H, bytes(u64::MAX)).is_empty());
    }

    #[test]
    fn past_the_high_water_mark_the_longest_delivered_go_first_until_enough_is_freed() {
        let objects = [
            obj(1, 40, Holding::DeliveredAt(3 * H)),
            obj(2, 40, Holding::DeliveredAt(H)),
            obj(3, 40, Holding::DeliveredAt(2 * H)),
            obj(4, 40, Holding::Needed),
        ];
        assert_eq!(
            plan(&objects, 4 * H, 72 * H, bytes(50)),
            vec![(id(2), PruneRule::HighWater), (id(3), PruneRule::HighWater)]
        );
        assert!(plan(&objects, 4 * H, 72 * H, bytes(0)).is_empty());
        // Objects due anyway count toward what must be freed.
        let mut due = objects.to_vec();
        due.push(obj(5, 60, Holding::DeliveredAt(0)));
        assert_eq!(
            plan(&due, 80 * H, 80 * H - 1, bytes(50)),
            vec![(id(5), PruneRule::KeptLongEnough)]
        );
    }

    #[test]
    fn past_the_high_water_mark_in_inodes_delivered_objects_go_until_enough_inodes_are_freed() {
        let mut linked = obj(1, 0, Holding::DeliveredAt(H));
        linked.frees_inode = false;
        let objects = [
            linked,
            obj(2, 1, Holding::DeliveredAt(2 * H)),
            obj(3, 1, Holding::DeliveredAt(3 * H)),
            obj(4, 1, Holding::DeliveredAt(4 * H)),
            obj(5, 1, Holding::Needed),
        ];
        let inodes = |n| Excess {
            bytes: 0,
            inodes: n,
        };
        // The file also linked elsewhere goes first (longest delivered) but
        // frees no inode, so two more go.
        assert_eq!(
            plan(&objects, 5 * H, 72 * H, inodes(2)),
            vec![
                (id(1), PruneRule::HighWater),
                (id(2), PruneRule::HighWater),
                (id(3), PruneRule::HighWater)
            ]
        );
        // Bytes and inodes both owed: the longer of the two runs.
        assert_eq!(
            plan(
                &objects,
                5 * H,
                72 * H,
                Excess {
                    bytes: 3,
                    inodes: 1
                }
            )
            .len(),
            4
        );
        assert!(plan(&objects, 5 * H, 72 * H, inodes(u64::MAX))
            .iter()
            .all(|(i, _)| *i != id(5)));
    }

    #[test]
    fn a_disk_short_of_where_intake_resumes_is_under_pressure_below_its_high_water_mark() {
        const MIB: u64 = 1 << 20;
        // 1 GiB, half used, 20,000 inodes, 18,500 used: under a 90 % mark
        // in bytes, 500 inodes past it.
        let usage = DiskUsage {
            total: 1024 * MIB,
            used: 512 * MIB,
            inodes_total: 20_000,
            inodes_used: 18_500,
        };
        // What the gateway may use: 50 MiB of the 512 free are reserved
        // for root.
        let room = Room {
            bytes: 462 * MIB,
            inodes: Some(1500),
        };
        let floor_inodes = MIN_FREE_INODES + INODE_RESUME_MARGIN;
        let loose = pressure(&usage, &room, 90, 64 * MIB);
        assert_eq!(loose.bytes, 0, "462 MiB free is far above 64 MiB");
        assert_eq!(loose.inodes, 500.max(floor_inodes - 1500));
        // A floor above what is free to the gateway: the shortfall to
        // where intake resumes, margin included, though the mark is not
        // reached and the reserved blocks would cover it.
        let tight = pressure(&usage, &room, 90, 500 * MIB);
        assert_eq!(tight.bytes, 500 * MIB + RESUME_MARGIN - 462 * MIB);
        // With room to spare in both, nothing.
        let roomy = DiskUsage {
            inodes_used: 1000,
            ..usage
        };
        let roomy_room = Room {
            inodes: Some(19_000),
            ..room
        };
        assert!(!pressure(&roomy, &roomy_room, 90, 64 * MIB).is_some());
        // A filesystem that counts no inodes owes none.
        let uncounted = DiskUsage {
            inodes_total: 0,
            inodes_used: 0,
            ..usage
        };
        let no_inodes = Room {
            inodes: None,
            ..room
        };
        assert_eq!(pressure(&uncounted, &no_inodes, 90, 64 * MIB).inodes, 0);
    }

    #[test]
    fn an_object_is_needed_while_any_image_naming_it_is_owed() {
        assert_eq!(
            Holding::Unclaimed.and(Some(5)).and(Some(9)),
            Holding::DeliveredAt(9)
        );
        assert_eq!(Holding::DeliveredAt(9).and(None), Holding::Needed);
        assert_eq!(Holding::Needed.and(Some(1)), Holding::Needed);
    }

    #[test]
    fn pass_period_follows_the_keep_time_within_bounds() {
        let mut c = RetentionConfig::default();
        assert_eq!(pass_every(&c), PASS_EVERY_MAX);
        c.keep_delivered_hours = 0.001;
        assert_eq!(keep_ms(&c), 3_600);
        assert_eq!(pass_every(&c), PASS_EVERY_MIN);
    }
}
