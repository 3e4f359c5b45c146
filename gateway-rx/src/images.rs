//! Images: an image is complete when its image object (a transfer manifest)
//! and every blob it names are verified in the blob store. Completion
//! queues one delivery per target, durably, and exactly once.
//!
//! # Recovery
//!
//! The finisher renames a verified object into the blob store before this
//! ledger records it, and a crash (or power cut) can fall between the two.
//! So the ledger never trusts its own records to be complete: at open,
//! [`ImageLedger::recheck`] rebuilds what it owes from what is durably on
//! disk, before the shard store forgets the staging of objects that are in
//! the blob store. The rules, in the order they run:
//!
//! 0. An object recorded as pruned ([`crate::retention`]) whose file is
//!    still in the blob store (a crash between the prune's commit and the
//!    deletion) is deleted now: it is not one the ledger forgot.
//! 1. An object in the blob store that the ledger has no record of is
//!    recorded now. Its kind is read from its bytes: an image object is one
//!    that decodes as a transfer manifest whose manifest bytes hash to their
//!    digests (no layer can pass that by chance); anything else is a blob.
//! 2. A verified image object without an image record is registered.
//! 3. An image still receiving whose blobs are all in the store completes:
//!    its delivery jobs are queued (idempotently) and made durable before
//!    the image is marked complete, so a complete image always had its jobs
//!    (delivered ones are later pruned as history, never re-queued).
//!
//! Retention prunes objects of delivered images only, and keeps the image
//! records: an image once delivered is never queued again, even when its
//! objects are received again later. A new image that names a pruned blob
//! lifts the blob's prune mark as it registers, so its shards are taken
//! again.
//!
//! Below the ledger, the delivery queue resumes every job not done; above
//! it, the shard store resumes every object whose staging it claimed.
//!
//! # The image ledger's records
//!
//! Every image object carries its record in the sender's image ledger
//! ([`crate::ledger`]). Registering an image admits its record first (an
//! image whose names are refused next still holds its place in the chain:
//! a gap, not a broken chain): an image whose record is refused is not
//! registered (never delivered), one whose chain has not started here waits
//! unregistered until the chain's first record arrives. A completed image
//! marks its record complete before its commit point; at open, rule 3 also
//! marks the records of complete images.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use weir_proto::{ObjectId, ObjectKind, TransferManifest};

use crate::blobs::BlobStore;
use crate::config::RxConfig;
use crate::delivery::queue::JobFor;
use crate::delivery::{DeliveryJob, DeliveryQueue, Target};
use crate::ledger::{Admission, ChainPosition, HeldChains};
use crate::retention::{PrunedObjects, StoreNotice};
use crate::state::{now_ms, StateDb, StateError};
pub use crate::status::ImageState;
use crate::status::{Counters, ImageProgress, ObjectProgress};

const IMAGES_TREE: &str = "images";
const VERIFIED_TREE: &str = "verified_objects";
/// Complete images listed in the status besides those still arriving.
const RECENT_COMPLETE: usize = 20;
/// Largest image object read: a transfer manifest is a few hundred bytes
/// per blob plus the manifests themselves. A larger one is refused unread.
pub const MAX_IMAGE_OBJECT_BYTES: u64 = 16 << 20;
pub use weir_proto::MAX_BLOBS_PER_IMAGE;
/// Most tags one image may carry to its destination.
pub const MAX_TAGS_PER_IMAGE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("image object {image}: {reason}")]
    Invalid { image: String, reason: String },
    #[error("image object {image}: {source}")]
    Store {
        image: String,
        #[source]
        source: crate::blobs::BlobStoreError,
    },
}

/// What the ledger keeps of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:` id of the image object.
    pub image: String,
    /// Destination repository after mapping.
    pub repository: String,
    pub tags: Vec<String>,
    pub manifest_digest: String,
    /// (digest, size) of every blob the image needs.
    pub blobs: Vec<(String, u64)>,
    pub state: ImageState,
    pub first_frame_ms: u64,
    pub complete_at_ms: Option<u64>,
    /// Its record in the sender's image ledger.
    #[serde(default)]
    pub ledger: Option<ChainPosition>,
}

impl ImageRecord {
    pub fn reference(&self) -> String {
        match self.tags.first() {
            Some(t) => format!("{}:{}", self.repository, t),
            None => format!("{}@{}", self.repository, self.manifest_digest),
        }
    }
}

/// When an object was first seen and verified; `claimed` once an image's
/// completion counted it, so a base layer shared with a later image does
/// not make that image look days old.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct VerifiedObject {
    kind: ObjectKind,
    first_seen_ms: u64,
    verified_ms: u64,
    claimed: bool,
}

/// The images the receiver knows of and their completion.
pub struct ImageLedger {
    db: StateDb,
    images: sled::Tree,
    verified: sled::Tree,
    store: BlobStore,
    queue: DeliveryQueue,
    targets: Vec<Target>,
    /// Replaced by a configuration reload; applies to images registered
    /// from then on.
    mapping: Mutex<Vec<(String, String)>>,
    counters: Arc<Counters>,
    wake: Option<Arc<Notify>>,
    pruned: PrunedObjects,
    /// Held by whoever changes images or verified objects: the finisher's
    /// completions and retention's prunes never interleave.
    writes: Mutex<()>,
    /// Where the shard store hears that a pruned object is wanted again.
    notices: Option<Sender<StoreNotice>>,
    chains: Arc<HeldChains>,
    /// Which records the status and each verified blob read; `None` until
    /// first needed. Records are kept for good (the ledger answers for
    /// every image it ever held), so neither reads them all.
    index: Mutex<Option<RecordIndex>>,
}

/// The images still receiving, and the most recently completed ones, of
/// the image records; loaded from the tree once, then kept by `put`.
#[derive(Debug, Default)]
struct RecordIndex {
    receiving: std::collections::BTreeSet<ObjectId>,
    /// The [`RECENT_COMPLETE`] latest to complete: (complete_at_ms, id),
    /// newest first.
    recent: Vec<(u64, ObjectId)>,
}

impl RecordIndex {
    fn note(&mut self, id: ObjectId, record: &ImageRecord) {
        self.recent.retain(|(_, i)| *i != id);
        match record.state {
            ImageState::Receiving => {
                self.receiving.insert(id);
            }
            ImageState::Complete => {
                self.receiving.remove(&id);
                // Without a time (never written so) it counts as newest.
                self.recent
                    .push((record.complete_at_ms.unwrap_or(u64::MAX), id));
                self.recent
                    .sort_by_key(|&(at, i)| (std::cmp::Reverse(at), i));
                self.recent.truncate(RECENT_COMPLETE);
            }
        }
    }

    /// Every image in the index: the receiving, then the recent complete.
    fn ids(&self) -> Vec<ObjectId> {
        let recent = self.recent.iter().map(|&(_, id)| id);
        self.receiving.iter().copied().chain(recent).collect()
    }
}

fn mapping_pairs(config: &RxConfig) -> Vec<(String, String)> {
    config
        .delivery
        .mapping
        .iter()
        .map(|m| (m.from.clone(), m.to.clone()))
        .collect()
}

/// What registering an image object came to.
enum Registered {
    Image(ImageRecord),
    /// Its record waits for its chain's first record.
    Waiting,
    /// Its record was refused, or its names may not be delivered.
    NotDelivered,
}

impl ImageLedger {
    pub fn open(
        db: &StateDb,
        store: BlobStore,
        queue: DeliveryQueue,
        config: &RxConfig,
        counters: Arc<Counters>,
        wake: Option<Arc<Notify>>,
    ) -> Result<ImageLedger, LedgerError> {
        Ok(ImageLedger {
            db: db.clone(),
            images: db.tree(IMAGES_TREE)?,
            verified: db.tree(VERIFIED_TREE)?,
            store,
            queue,
            targets: crate::delivery::targets(config),
            mapping: Mutex::new(mapping_pairs(config)),
            counters,
            wake,
            pruned: PrunedObjects::open(db)?,
            writes: Mutex::new(()),
            notices: None,
            chains: Arc::new(HeldChains::open(db)?),
            index: Mutex::new(None),
        })
    }

    /// Tells the shard store (through `notices`) when a pruned object is
    /// wanted again.
    pub fn with_store_notices(mut self, notices: Sender<StoreNotice>) -> Self {
        self.notices = Some(notices);
        self
    }

    /// Takes `config`'s `[[delivery.mapping]]` for images registered from
    /// now on (a reload).
    pub fn set_mapping(&self, config: &RxConfig) {
        *self.mapping.lock().unwrap_or_else(|e| e.into_inner()) = mapping_pairs(config);
    }

    /// Keeps the ledger's records still while held (see `writes`).
    pub fn lock_writes(&self) -> MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The records of the sender's image ledger this receiver holds.
    pub fn chains(&self) -> &Arc<HeldChains> {
        &self.chains
    }

    fn map_repository(&self, repository: &str) -> String {
        let mapping = self.mapping.lock().unwrap_or_else(|e| e.into_inner());
        for (from, to) in mapping.iter() {
            if let Some(rest) = repository.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        repository.to_string()
    }

    /// An object entered the blob store. Returns the images this completed.
    pub fn object_verified(
        &self,
        id: ObjectId,
        kind: ObjectKind,
        first_seen_ms: u64,
    ) -> Result<Vec<ObjectId>, LedgerError> {
        let _writing = self.lock_writes();
        let mut wanted = Vec::new();
        let v = VerifiedObject {
            kind,
            first_seen_ms,
            verified_ms: now_ms(),
            claimed: false,
        };
        let value = serde_json::to_vec(&v).map_err(|e| self.db.corrupt(id.digest(), e))?;
        // Keep an existing record: it may be claimed already.
        let _ = self
            .verified
            .compare_and_swap(&id.0[..], None as Option<&[u8]>, Some(value))
            .map_err(|e| self.db.sled_error(e))?;
        let mut completed = Vec::new();
        match kind {
            ObjectKind::Image => {
                self.register_and_complete(id, first_seen_ms, &mut completed, &mut wanted)?
            }
            ObjectKind::Blob => {
                let digest = id.digest();
                for (image, record) in self.receiving()? {
                    if record.blobs.iter().any(|(d, _)| *d == digest)
                        && self.try_complete(image, record)?
                    {
                        completed.push(image);
                    }
                }
            }
        }
        self.db.commit("rx.ledger.object-recorded")?;
        self.notify_wanted(wanted);
        Ok(completed)
    }

    /// Tells the shard store to take shards of these pruned objects again;
    /// called once their lifted marks are durable.
    fn notify_wanted(&self, wanted: Vec<ObjectId>) {
        if let Some(n) = &self.notices {
            for id in wanted {
                let _ = n.send(StoreNotice::Wanted(id));
            }
        }
    }

    /// Registers an image object and completes its image if it can; then
    /// the same for the images its ledger record released (they waited for
    /// this chain's first record). An error of the first is returned; of
    /// the released ones, logged.
    fn register_and_complete(
        &self,
        id: ObjectId,
        first_seen_ms: u64,
        completed: &mut Vec<ObjectId>,
        wanted: &mut Vec<ObjectId>,
    ) -> Result<(), LedgerError> {
        let mut work = vec![(id, first_seen_ms)];
        let mut first = true;
        while let Some((id, seen)) = work.pop() {
            let registered = match self.register(id, seen, wanted) {
                Ok(r) => r,
                Err(e) if first => return Err(e),
                Err(e) => {
                    tracing::error!(image = %id, error = %e, "image object cannot be delivered");
                    continue;
                }
            };
            first = false;
            let (registered, released) = registered;
            if let Registered::Image(record) = registered {
                if record.state == ImageState::Receiving && self.try_complete(id, record)? {
                    completed.push(id);
                }
            }
            // Popped in seq order.
            work.extend(released.into_iter().rev());
        }
        Ok(())
    }

    /// Records a newly verified image object, admitting its ledger record.
    /// Blobs it names that were pruned are wanted again: their marks are
    /// lifted and they are added to `wanted`.
    fn register(
        &self,
        id: ObjectId,
        first_seen_ms: u64,
        wanted: &mut Vec<ObjectId>,
    ) -> Result<(Registered, Vec<(ObjectId, u64)>), LedgerError> {
        if let Some(existing) = self.get(&id)? {
            return Ok((Registered::Image(existing), Vec::new()));
        }
        let invalid = |reason: String| LedgerError::Invalid {
            image: id.digest(),
            reason,
        };
        let store_err = |source| LedgerError::Store {
            image: id.digest(),
            source,
        };
        let len = self.store.len_of(&id).map_err(store_err)?;
        if len > MAX_IMAGE_OBJECT_BYTES {
            return Err(invalid(format!(
                "{len} bytes, more than the {MAX_IMAGE_OBJECT_BYTES} an image object may have"
            )));
        }
        let bytes = self.store.read_object(&id).map_err(store_err)?;
        let tm = image_object(&bytes).map_err(invalid)?;
        // The record first: an image refused below for its names still
        // holds its place in the chain (a gap, not a broken chain), and the
        // images waiting for its chain are released.
        let (position, released) = match self.chains.admit(&tm, id, first_seen_ms, now_ms())? {
            Admission::Held { position, released } => (position, released),
            Admission::Waiting => {
                tracing::warn!(digest = %tm.manifest.digest, image = %id,
                    chain = %tm.ledger.chain, seq = tm.ledger.seq,
                    "image waits for the first record of its image ledger chain, which this \
                     receiver does not hold yet");
                return Ok((Registered::Waiting, Vec::new()));
            }
            Admission::Pruned => {
                tracing::debug!(digest = %tm.manifest.digest, image = %id,
                    chain = %tm.ledger.chain, seq = tm.ledger.seq,
                    "image ledger record at or below its chain's checkpoint: delivered and \
                     pruned before, not delivered again");
                return Ok((Registered::NotDelivered, Vec::new()));
            }
            Admission::Refused { reason, new } => {
                if new {
                    Counters::add(&self.counters.ledger_records_refused, 1);
                    tracing::error!(digest = %tm.manifest.digest, image = %id,
                        chain = %tm.ledger.chain, seq = tm.ledger.seq,
                        destination = %tm.destination.display(), reason = %reason,
                        "image ledger record refused; the image is not delivered");
                } else {
                    tracing::debug!(digest = %tm.manifest.digest, image = %id, reason = %reason,
                        "image ledger record refused before");
                }
                return Ok((Registered::NotDelivered, Vec::new()));
            }
        };
        let (repository, blobs) = match self.deliverable(&tm) {
            Ok(checked) => checked,
            Err(reason) if !released.is_empty() => {
                tracing::error!(digest = %tm.manifest.digest, image = %id, error = %reason,
                    "image object cannot be delivered");
                return Ok((Registered::NotDelivered, released));
            }
            Err(reason) => return Err(invalid(reason)),
        };
        // Digests were checked by `deliverable`.
        let ids: Vec<ObjectId> = blobs
            .iter()
            .filter_map(|(d, _)| ObjectId::from_digest(d).ok())
            .collect();
        let record = ImageRecord {
            image: id.digest(),
            repository,
            tags: tm.destination.tags.clone(),
            manifest_digest: tm.manifest.digest.clone(),
            blobs,
            state: ImageState::Receiving,
            first_frame_ms: first_seen_ms,
            complete_at_ms: None,
            ledger: Some(position),
        };
        tracing::info!(digest = %record.manifest_digest, image = %record.image,
            reference = %record.reference(), blobs = record.blobs.len(),
            source = %tm.origin.source, chain = %position.chain, seq = position.seq,
            "image object verified");
        self.put(&id, &record)?;
        for blob in ids {
            if self.pruned.lift(&blob)? {
                tracing::info!(digest = %record.manifest_digest, object = %blob,
                    "blob pruned after an earlier image's delivery is needed again; taken from the next pass");
                wanted.push(blob);
            }
        }
        Ok((Registered::Image(record), released))
    }

    /// The mapped repository and the blobs of an image object whose names
    /// and counts may reach a registry and the layout; why not otherwise.
    fn deliverable(&self, tm: &TransferManifest) -> Result<(String, Vec<(String, u64)>), String> {
        let repository = self.map_repository(&tm.destination.repository);
        // Names become registry paths and layout refs: a compromised sender
        // must not reach either with a name the spec does not allow.
        weir_proto::check_repository(&repository).map_err(|e| e.to_string())?;
        if tm.destination.tags.len() > MAX_TAGS_PER_IMAGE {
            return Err(format!(
                "{} tags, more than the {MAX_TAGS_PER_IMAGE} an image may carry",
                tm.destination.tags.len()
            ));
        }
        for tag in &tm.destination.tags {
            weir_proto::check_tag(tag).map_err(|e| e.to_string())?;
            // Signature and referrers-fallback tags are written by this
            // receiver for the images they name; an image under one would
            // replace another image's signature or referrers list.
            if weir_proto::referrers::is_attachment_tag(tag) {
                return Err(format!(
                    "tag {tag} has the form of a signature or referrers tag, which only the \
                     receiver writes for the image it names"
                ));
            }
        }
        if tm.blobs.len() > MAX_BLOBS_PER_IMAGE {
            return Err(format!(
                "{} blobs, more than the {MAX_BLOBS_PER_IMAGE} an image may name",
                tm.blobs.len()
            ));
        }
        // Each blob once: a manifest may name a layer twice, and the
        // record is kept for as long as the image is remembered.
        let mut blobs: Vec<(String, u64)> = Vec::with_capacity(tm.blobs.len());
        let mut sizes: HashMap<ObjectId, u64> = HashMap::with_capacity(tm.blobs.len());
        for b in &tm.blobs {
            let id = ObjectId::from_digest(&b.digest).map_err(|e| e.to_string())?;
            match sizes.insert(id, b.size) {
                None => blobs.push((id.digest(), b.size)),
                Some(size) if size == b.size => {}
                Some(size) => {
                    return Err(format!(
                        "blob {id} is named with two sizes, {size} and {} bytes",
                        b.size
                    ))
                }
            }
        }
        // Referrers become tags and referrers-list entries: bounded, and
        // only of this image's manifests.
        tm.check_referrers().map_err(|e| e.to_string())?;
        Ok((repository, blobs))
    }

    fn get(&self, id: &ObjectId) -> Result<Option<ImageRecord>, LedgerError> {
        match self.images.get(id.0).map_err(|e| self.db.sled_error(e))? {
            None => Ok(None),
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(|e| self.db.corrupt(id.digest(), e))?,
            )),
        }
    }

    fn put(&self, id: &ObjectId, record: &ImageRecord) -> Result<(), LedgerError> {
        let v = serde_json::to_vec(record).map_err(|e| self.db.corrupt(id.digest(), e))?;
        self.images
            .insert(id.0, v)
            .map_err(|e| self.db.sled_error(e))?;
        // Not loaded yet: the load will read this record from the tree.
        if let Some(index) = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            index.note(*id, record);
        }
        Ok(())
    }

    /// The records of the images in the index (loaded from every record
    /// the first time), in the index's order.
    fn indexed(&self) -> Result<Vec<(ObjectId, ImageRecord)>, LedgerError> {
        let ids = {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            if index.is_none() {
                let mut loaded = RecordIndex::default();
                self.for_each_image(&mut |id, record| loaded.note(id, record))?;
                *index = Some(loaded);
            }
            index.as_ref().map(RecordIndex::ids).unwrap_or_default()
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(record) = self.get(&id)? {
                out.push((id, record));
            }
        }
        Ok(out)
    }

    /// The records `keep` picks.
    fn records_where(
        &self,
        keep: impl Fn(&ImageRecord) -> bool,
    ) -> Result<Vec<(ObjectId, ImageRecord)>, LedgerError> {
        let mut out = Vec::new();
        self.for_each_image(&mut |id, record| {
            if keep(record) {
                out.push((id, record.clone()));
            }
        })?;
        Ok(out)
    }

    fn receiving(&self) -> Result<Vec<(ObjectId, ImageRecord)>, LedgerError> {
        Ok(self
            .indexed()?
            .into_iter()
            .filter(|(_, r)| r.state == ImageState::Receiving)
            .collect())
    }

    /// Completes the image if all its blobs are verified: queues its
    /// deliveries (idempotently, so a crash and a second call change
    /// nothing), then marks it complete.
    fn try_complete(&self, id: ObjectId, mut record: ImageRecord) -> Result<bool, LedgerError> {
        let mut needed = Vec::with_capacity(record.blobs.len());
        for (digest, _) in &record.blobs {
            let blob = ObjectId::from_digest(digest).map_err(|e| LedgerError::Invalid {
                image: record.image.clone(),
                reason: e.to_string(),
            })?;
            if !self.store.contains(&blob) {
                return Ok(false);
            }
            needed.push(blob);
        }
        // The first frame of this image: its image object and the blobs no
        // earlier image accounted for.
        let mut first = record.first_frame_ms;
        for blob in needed.iter().chain(std::iter::once(&id)) {
            if let Some(v) = self
                .verified
                .get(blob.0)
                .map_err(|e| self.db.sled_error(e))?
            {
                if let Ok(mut vo) = serde_json::from_slice::<VerifiedObject>(&v) {
                    if !vo.claimed {
                        first = first.min(vo.first_seen_ms);
                        vo.claimed = true;
                        let v = serde_json::to_vec(&vo)
                            .map_err(|e| self.db.corrupt(blob.digest(), e))?;
                        self.verified
                            .insert(blob.0, v)
                            .map_err(|e| self.db.sled_error(e))?;
                    }
                }
            }
        }
        let now = now_ms();
        for &target in &self.targets {
            self.queue.enqueue(&new_job(&record, target, first, now))?;
        }
        // Jobs durable before the image says complete.
        self.db.commit("rx.ledger.jobs-queued")?;
        if let Some(position) = &record.ledger {
            self.chains.complete(position, &id, now)?;
        }
        record.state = ImageState::Complete;
        record.first_frame_ms = first;
        record.complete_at_ms = Some(now);
        self.put(&id, &record)?;
        self.db.commit("rx.ledger.image-complete")?;
        Counters::add(&self.counters.images_complete, 1);
        tracing::info!(
            digest = %record.manifest_digest, image = %record.image, reference = %record.reference(),
            blobs = record.blobs.len(), seconds_from_first_frame = now.saturating_sub(first) as f64 / 1000.0,
            targets = ?self.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "image complete; queued for delivery"
        );
        if let Some(w) = &self.wake {
            w.notify_one();
        }
        Ok(true)
    }

    /// Rebuilds at startup what the ledger owes from what is on disk (the
    /// rules are in the module doc). Returns the images this completed.
    pub fn recheck(&self) -> Result<Vec<ObjectId>, LedgerError> {
        let _writing = self.lock_writes();
        let mut wanted = Vec::new();
        self.pruned.finish_deletions(&self.store)?;
        self.adopt_unrecorded_objects()?;
        let mut completed = Vec::new();
        // By id, each record read when its turn comes: every image ever
        // delivered is here, and a record may name thousands of blobs.
        let mut ids = Vec::new();
        self.for_each_image(&mut |id, r| {
            if r.state == ImageState::Receiving || r.ledger.is_some() {
                ids.push(id);
            }
        })?;
        for id in ids {
            let Some(record) = self.get(&id)? else {
                continue;
            };
            match (record.state, record.ledger) {
                (ImageState::Receiving, _) => {
                    if self.try_complete(id, record)? {
                        completed.push(id);
                    }
                }
                // A crash between the record's completion and the image's.
                (ImageState::Complete, Some(position)) => {
                    let at = record.complete_at_ms.unwrap_or_else(now_ms);
                    self.chains.complete(&position, &id, at)?;
                }
                (ImageState::Complete, None) => {}
            }
        }
        // Image objects verified but not registered (a crash in between, or
        // an invalid one, which is reported again).
        for item in self.verified.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let Ok(raw) = <[u8; 32]>::try_from(&k[..]) else {
                continue;
            };
            let id = ObjectId(raw);
            let Ok(vo) = serde_json::from_slice::<VerifiedObject>(&v) else {
                continue;
            };
            if vo.kind != ObjectKind::Image
                || self
                    .images
                    .contains_key(id.0)
                    .map_err(|e| self.db.sled_error(e))?
            {
                continue;
            }
            if let Err(e) =
                self.register_and_complete(id, vo.first_seen_ms, &mut completed, &mut wanted)
            {
                tracing::error!(image = %id, error = %e, "image object cannot be delivered")
            }
        }
        self.db.commit("rx.ledger.recovered")?;
        self.notify_wanted(wanted);
        Ok(completed)
    }

    /// The operator gives up on the images of `manifest_digest` still
    /// receiving (a blob that never comes: a sender that stopped, or a
    /// compromised one naming blobs it never sends). Each one's record goes
    /// and its image object is pruned as retention prunes (recorded in one
    /// commit, then the file deleted), so its blobs no longer hold the
    /// disk: retention takes those no other image names. Its record in the
    /// sender's image ledger stays (the image never arrived). Sent again
    /// once the pruned mark lapses, the image object registers anew.
    /// Complete images are left alone. Returns the images forgotten.
    pub fn forget_receiving(
        &self,
        manifest_digest: &str,
    ) -> Result<Vec<(ObjectId, ImageRecord)>, LedgerError> {
        let _writing = self.lock_writes();
        let gone = self.records_where(|r| {
            r.state == ImageState::Receiving && r.manifest_digest == manifest_digest
        })?;
        if gone.is_empty() {
            return Ok(gone);
        }
        for (id, _) in &gone {
            self.images
                .remove(id.0)
                .map_err(|e| self.db.sled_error(e))?;
            self.verified
                .remove(id.0)
                .map_err(|e| self.db.sled_error(e))?;
            let bytes = self.store.len_of(id).unwrap_or(0);
            self.pruned.record_now(id, ObjectKind::Image, bytes)?;
        }
        // Rebuilt from the records when next needed.
        *self.index.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.db.commit("rx.operator.forget-image")?;
        for (id, _) in &gone {
            let path = self.store.path_of(id);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    // Recorded as pruned: the next start finishes it.
                    tracing::error!(image = %id, path = %path.display(), error = %e,
                        "forgotten image object's file not deleted; retried at the next start");
                }
            }
        }
        Ok(gone)
    }

    /// Every verified object on record: id, kind, when it was verified.
    pub fn verified_objects(&self) -> Result<Vec<(ObjectId, ObjectKind, u64)>, LedgerError> {
        let mut out = Vec::new();
        for item in self.verified.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let Ok(raw) = <[u8; 32]>::try_from(&k[..]) else {
                continue;
            };
            if let Ok(vo) = serde_json::from_slice::<VerifiedObject>(&v) {
                out.push((ObjectId(raw), vo.kind, vo.verified_ms));
            }
        }
        Ok(out)
    }

    /// Forgets a verified object (retention pruned it). Not durable until
    /// the caller's commit; the caller holds [`ImageLedger::lock_writes`].
    pub fn forget_verified(&self, id: &ObjectId) -> Result<(), LedgerError> {
        self.verified
            .remove(id.0)
            .map_err(|e| self.db.sled_error(e))?;
        Ok(())
    }

    /// Calls `f` with every image record, one at a time.
    pub fn for_each_image(
        &self,
        f: &mut dyn FnMut(ObjectId, &ImageRecord),
    ) -> Result<(), LedgerError> {
        for item in self.images.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let Ok(raw) = <[u8; 32]>::try_from(&k[..]) else {
                continue;
            };
            let record: ImageRecord =
                serde_json::from_slice(&v).map_err(|e| self.db.corrupt(hex::encode(&k), e))?;
            f(ObjectId(raw), &record);
        }
        Ok(())
    }

    /// Rule 1: objects the finisher moved into the blob store while the
    /// ledger never heard of them (a crash between the rename and the
    /// ledger's commit).
    fn adopt_unrecorded_objects(&self) -> Result<(), LedgerError> {
        let ids = self.store.ids().map_err(|source| LedgerError::Store {
            image: "(blob store)".into(),
            source,
        })?;
        for id in ids {
            if self
                .verified
                .contains_key(id.0)
                .map_err(|e| self.db.sled_error(e))?
            {
                continue;
            }
            let kind = self.kind_on_disk(&id);
            let path = self.store.path_of(&id);
            let verified_ms = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or_else(now_ms, |d| d.as_millis() as u64);
            let v = VerifiedObject {
                kind,
                first_seen_ms: verified_ms,
                verified_ms,
                claimed: false,
            };
            let value = serde_json::to_vec(&v).map_err(|e| self.db.corrupt(id.digest(), e))?;
            self.verified
                .insert(id.0, value)
                .map_err(|e| self.db.sled_error(e))?;
            tracing::warn!(object = %id, kind = crate::shards::kind_name(kind),
                "object in the blob store unknown to the image ledger (a crash after it was verified); recorded now");
        }
        Ok(())
    }

    /// Whether a stored object is an image object, judged by its bytes.
    fn kind_on_disk(&self, id: &ObjectId) -> ObjectKind {
        let small = self
            .store
            .len_of(id)
            .is_ok_and(|len| len <= MAX_IMAGE_OBJECT_BYTES);
        let is_image = small
            && self
                .store
                .read_object(id)
                .is_ok_and(|bytes| image_object(&bytes).is_ok());
        if is_image {
            ObjectKind::Image
        } else {
            ObjectKind::Blob
        }
    }

    /// Per-image progress: verified blobs, plus the share of blobs still
    /// arriving.
    pub fn progress(&self, arriving: &[ObjectProgress]) -> Result<Vec<ImageProgress>, LedgerError> {
        let by_id: HashMap<&str, &ObjectProgress> =
            arriving.iter().map(|o| (o.id.as_str(), o)).collect();
        let mut all = self.indexed()?;
        all.sort_by_key(|(_, r)| std::cmp::Reverse(r.complete_at_ms.unwrap_or(u64::MAX)));
        let mut out = Vec::new();
        let mut complete_shown = 0;
        for (_, r) in all {
            if r.state == ImageState::Complete {
                if complete_shown == RECENT_COMPLETE {
                    continue;
                }
                complete_shown += 1;
            }
            let mut p = ImageProgress {
                image: r.image.clone(),
                reference: r.reference(),
                manifest_digest: r.manifest_digest.clone(),
                blobs_total: r.blobs.len() as u64,
                blobs_done: 0,
                // Sizes are the sender's claims: summed without overflow.
                bytes_total: r.blobs.iter().fold(0u64, |t, (_, s)| t.saturating_add(*s)),
                bytes_done: 0,
                percent: 0.0,
                passes_seen: 0.0,
                state: r.state,
                first_frame_ms: r.first_frame_ms,
                complete_at_ms: r.complete_at_ms,
            };
            for (digest, size) in &r.blobs {
                let done = r.state == ImageState::Complete
                    || ObjectId::from_digest(digest).is_ok_and(|id| self.store.contains(&id));
                if done {
                    p.blobs_done += 1;
                    p.bytes_done = p.bytes_done.saturating_add(*size);
                } else if let Some(o) = by_id.get(digest.as_str()) {
                    p.bytes_done = p.bytes_done.saturating_add(o.bytes_done().min(*size));
                    p.passes_seen = p.passes_seen.max(o.passes_seen);
                }
            }
            p.percent = if p.bytes_total > 0 {
                100.0 * p.bytes_done as f64 / p.bytes_total as f64
            } else if p.blobs_total > 0 {
                100.0 * p.blobs_done as f64 / p.blobs_total as f64
            } else {
                100.0
            };
            out.push(p);
        }
        Ok(out)
    }
}

/// Decodes an image object and checks that every manifest it carries
/// hashes to its digest.
fn image_object(bytes: &[u8]) -> Result<TransferManifest, String> {
    let tm = TransferManifest::from_object_bytes(bytes)
        .map_err(|e| format!("not a transfer manifest: {e}"))?;
    for m in tm.children.iter().chain(std::iter::once(&tm.manifest)) {
        if ObjectId::from_digest(&m.digest).ok() != Some(ObjectId::of_bytes(&m.bytes)) {
            return Err(format!("manifest bytes do not hash to {}", m.digest));
        }
    }
    Ok(tm)
}

fn new_job(record: &ImageRecord, target: Target, first_frame_ms: u64, now: u64) -> DeliveryJob {
    let what = JobFor {
        image: record.image.clone(),
        target,
        repository: &record.repository,
        tags: &record.tags,
        manifest_digest: &record.manifest_digest,
        first_frame_ms,
    };
    DeliveryJob::pending(what, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::tests::sample_image;
    use std::path::Path;

    fn config(root: &Path, extra: &str) -> RxConfig {
        let text = format!(
            "state_dir = \"{}/state\"\n[link]\ntransport = \"udp\"\nudp_listen = \"127.0.0.1:0\"\n\
             [[auth.keys]]\nid = 1\nfile = \"/nonexistent\"\n{extra}",
            root.display()
        );
        RxConfig::parse(&text, Path::new("test.toml")).unwrap()
    }

    struct Rig {
        _dir: tempfile::TempDir,
        db: StateDb,
        store: BlobStore,
        queue: DeliveryQueue,
        counters: Arc<Counters>,
        config: RxConfig,
    }

    fn rig(extra: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let queue = DeliveryQueue::open(&db).unwrap();
        let config = config(dir.path(), extra);
        Rig {
            _dir: dir,
            db,
            store,
            queue,
            counters: Arc::new(Counters::default()),
            config,
        }
    }

    impl Rig {
        fn ledger(&self) -> ImageLedger {
            ImageLedger::open(
                &self.db,
                self.store.clone(),
                self.queue.clone(),
                &self.config,
                self.counters.clone(),
                None,
            )
            .unwrap()
        }
    }

    #[test]
    fn image_completes_when_its_object_and_every_blob_are_verified_in_any_order() {
        let r = rig("[delivery]\nregistry_url = \"http://127.0.0.1:1\"\noci_layout = \"/tmp/x\"\n[[delivery.mapping]]\nfrom = \"team/\"\nto = \"mirror/\"\n");
        let ledger = r.ledger();
        // Blobs are built in a scratch store so "verified" can be staged one by one.
        let scratch_dir = tempfile::tempdir().unwrap();
        let scratch = BlobStore::open(scratch_dir.path()).unwrap();
        let (tm, blob_ids) = sample_image(&scratch, "team/app", &["1.0"], 2, 500);
        scratch.insert_bytes(&tm.to_object_bytes()).unwrap();
        let verify = |id: &ObjectId, kind| {
            r.store
                .insert_bytes(&scratch.read_object(id).unwrap())
                .unwrap();
            ledger.object_verified(*id, kind, 1000).unwrap()
        };
        // One blob first, then the image object, then the rest.
        assert!(verify(&blob_ids[0], ObjectKind::Blob).is_empty());
        let image = ObjectId::of_bytes(&tm.to_object_bytes());
        assert!(verify(&image, ObjectKind::Image).is_empty());
        assert!(verify(&blob_ids[1], ObjectKind::Blob).is_empty());
        assert_eq!(verify(&blob_ids[2], ObjectKind::Blob), vec![image]);
        assert_eq!(
            r.counters
                .images_complete
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let jobs = r.queue.all().unwrap();
        assert_eq!(jobs.len(), 2, "one job per target");
        for j in &jobs {
            assert_eq!(j.repository, "mirror/app");
            assert_eq!(j.manifest_digest, tm.manifest.digest);
        }
        // Completing again (a crash replay) queues nothing new.
        assert!(ledger.recheck().unwrap().is_empty());
        assert_eq!(r.queue.all().unwrap().len(), 2);
        let progress = ledger.progress(&[]).unwrap();
        assert_eq!(progress[0].state, "complete");
        assert_eq!(progress[0].blobs_done, 3);
        assert_eq!(progress[0].percent, 100.0);
    }

    #[test]
    fn the_operator_forgets_an_image_still_receiving_and_never_a_complete_one() {
        let r = rig("");
        let ledger = r.ledger();
        let scratch_dir = tempfile::tempdir().unwrap();
        let scratch = BlobStore::open(scratch_dir.path()).unwrap();
        let verify = |bytes: &[u8], kind| {
            let id = r.store.insert_bytes(bytes).unwrap();
            ledger.object_verified(id, kind, 1000).unwrap();
            id
        };
        // Its image object and one blob; the other two never come.
        let (tm, blob_ids) = sample_image(&scratch, "team/app", &["1.0"], 2, 500);
        let image = verify(&tm.to_object_bytes(), ObjectKind::Image);
        let blob = verify(
            &scratch.read_object(&blob_ids[0]).unwrap(),
            ObjectKind::Blob,
        );
        // Another image, complete.
        let (done, done_blobs) = sample_image(&scratch, "team/done", &["1.0"], 1, 300);
        for id in &done_blobs {
            verify(&scratch.read_object(id).unwrap(), ObjectKind::Blob);
        }
        let done_image = verify(&done.to_object_bytes(), ObjectKind::Image);
        assert_eq!(ledger.receiving().unwrap().len(), 1);

        assert!(ledger
            .forget_receiving(&done.manifest.digest)
            .unwrap()
            .is_empty());
        assert!(r.store.contains(&done_image));
        let gone = ledger.forget_receiving(&tm.manifest.digest).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, image);
        assert!(ledger.receiving().unwrap().is_empty());
        assert!(!r.store.contains(&image), "its image object is pruned");
        assert!(ledger.pruned.contains(&image).unwrap());
        assert!(r.store.contains(&blob), "its blobs are left to retention");
        assert!(!ledger
            .verified_objects()
            .unwrap()
            .iter()
            .any(|(id, _, _)| *id == image));

        // A restart does not bring it back, and the complete one stays.
        drop(ledger);
        let ledger = r.ledger();
        ledger.recheck().unwrap();
        assert!(ledger.receiving().unwrap().is_empty());
        assert_eq!(ledger.progress(&[]).unwrap().len(), 1);
        assert!(ledger
            .forget_receiving(&tm.manifest.digest)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_crash_between_last_blob_and_completion_is_completed_at_restart() {
        let r = rig("");
        let ledger = r.ledger();
        let (tm, _) = sample_image(&r.store, "team/app", &["1.0"], 1, 100);
        // The image object entered the store, but the process died before
        // the ledger heard of it.
        let image = r.store.insert_bytes(&tm.to_object_bytes()).unwrap();
        let v = serde_json::to_vec(&VerifiedObject {
            kind: ObjectKind::Image,
            first_seen_ms: 5,
            verified_ms: 6,
            claimed: false,
        })
        .unwrap();
        ledger.verified.insert(image.0, v).unwrap();
        assert_eq!(ledger.recheck().unwrap(), vec![image]);
        assert_eq!(r.queue.all().unwrap().len(), 1);
    }

    /// The finisher renamed the image object (and every blob) into the blob
    /// store, then the process died before the ledger's commit: nothing in
    /// sled knows of them. Opening again delivers the image.
    #[test]
    fn objects_in_the_blob_store_the_ledger_never_recorded_complete_at_open() {
        let r = rig("");
        let (tm, blob_ids) = sample_image(&r.store, "team/app", &["1.0"], 2, 300);
        let image = r.store.insert_bytes(&tm.to_object_bytes()).unwrap();
        let ledger = r.ledger();
        assert_eq!(ledger.recheck().unwrap(), vec![image]);
        let jobs = r.queue.all().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].manifest_digest, tm.manifest.digest);
        assert_eq!(jobs[0].repository, "team/app");
        // Kinds were told apart by content.
        let kind = |id: &ObjectId| {
            let v = ledger.verified.get(id.0).unwrap().unwrap();
            serde_json::from_slice::<VerifiedObject>(&v).unwrap().kind
        };
        assert_eq!(kind(&image), ObjectKind::Image);
        for b in &blob_ids {
            assert_eq!(kind(b), ObjectKind::Blob);
        }
        // A second open finds nothing more to do and queues nothing twice.
        drop(ledger);
        assert!(r.ledger().recheck().unwrap().is_empty());
        assert_eq!(r.queue.all().unwrap().len(), 1);
    }

    /// Blobs recorded at open wait for their image object like any other.
    #[test]
    fn unrecorded_blobs_alone_complete_nothing_until_their_image_arrives() {
        let r = rig("");
        let (tm, _) = sample_image(&r.store, "team/app", &["1.0"], 1, 300);
        let ledger = r.ledger();
        assert!(ledger.recheck().unwrap().is_empty());
        assert!(r.queue.all().unwrap().is_empty());
        let image = r.store.insert_bytes(&tm.to_object_bytes()).unwrap();
        assert_eq!(
            ledger.object_verified(image, ObjectKind::Image, 0).unwrap(),
            vec![image]
        );
        assert_eq!(r.queue.all().unwrap().len(), 1);
    }

    /// A sender holding the HMAC key can sign any image object: names that
    /// would escape the layout or reach a registry unchecked, and counts
    /// that would hold the delivery thread, are refused before anything is
    /// queued.
    #[test]
    fn hostile_image_objects_are_refused_before_delivery() {
        let r = rig("");
        let ledger = r.ledger();
        let (tm, _) = sample_image(&r.store, "team/app", &["1.0"], 1, 100);
        let mut cases: Vec<(&str, TransferManifest)> = Vec::new();
        for repo in ["../../x", "/tmp/x", "team/app\0", "Team/App"] {
            let mut t = tm.clone();
            t.destination.repository = repo.to_string();
            cases.push(("is not lowercase components", t));
        }
        let mut t = tm.clone();
        t.destination.repository = "a".repeat(10_000);
        cases.push(("longer than 255", t));
        for tag in ["../x", "a/b", "", "x\0"] {
            let mut t = tm.clone();
            t.destination.tags = vec![tag.to_string()];
            cases.push(("tag", t));
        }
        let mut t = tm.clone();
        t.destination.tags = (0..100_000).map(|i| format!("t{i}")).collect();
        cases.push(("tags, more than", t));
        // Under another image's signature tag, it would replace it.
        let victim = ObjectId::of_bytes(b"a signed image").hex();
        for tag in [format!("sha256-{victim}.sig"), format!("sha256-{victim}")] {
            let mut t = tm.clone();
            t.destination.tags = vec![tag];
            cases.push(("has the form of a signature or referrers tag", t));
        }
        let mut t = tm.clone();
        let mut twice = t.blobs[0].clone();
        twice.size += 1;
        t.blobs.push(twice);
        cases.push(("is named with two sizes", t));
        let mut t = tm.clone();
        t.blobs[0].digest = t.blobs[0]
            .digest
            .to_uppercase()
            .replace("SHA256:", "sha256:");
        cases.push(("not a sha256 digest", t));
        let mut t = tm.clone();
        t.blobs = (0..=MAX_BLOBS_PER_IMAGE as u64)
            .map(|i| weir_proto::BlobRef {
                digest: ObjectId::of_bytes(&i.to_le_bytes()).digest(),
                size: 1,
                media_type: "application/octet-stream".into(),
            })
            .collect();
        cases.push(("blobs, more than", t));
        // Referrers that would push a tag or a list entry for another image.
        let sig = |subject: &str, attachment: weir_proto::Attachment, body: &str| {
            let bytes = body.as_bytes().to_vec();
            weir_proto::Referrer {
                subject: subject.to_string(),
                attachment,
                manifest: weir_proto::ManifestBytes {
                    digest: ObjectId::of_bytes(&bytes).digest(),
                    media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                    bytes,
                },
            }
        };
        let other = ObjectId::of_bytes(b"someone else's image").digest();
        let own = tm.manifest.digest.clone();
        let own_tag = weir_proto::referrers::cosign_tag(&own, "sig").unwrap();
        let other_tag = weir_proto::referrers::cosign_tag(&other, "sig").unwrap();
        let mut t = tm.clone();
        t.referrers = vec![sig(
            &other,
            weir_proto::Attachment::Tag(other_tag.clone()),
            "{}",
        )];
        cases.push(("neither the image nor one of its children", t));
        let mut t = tm.clone();
        t.referrers = vec![sig(&own, weir_proto::Attachment::Tag(other_tag), "{}")];
        cases.push(("is not a cosign tag of its subject", t));
        let mut t = tm.clone();
        let names_other = format!(r#"{{"subject":{{"digest":"{other}","size":1}}}}"#);
        t.referrers = vec![sig(&own, weir_proto::Attachment::Subject, &names_other)];
        cases.push(("its subject field says", t));
        let mut t = tm.clone();
        let missing_blob = format!(
            r#"{{"layers":[{{"digest":"{}","size":1}}]}}"#,
            ObjectId::of_bytes(b"not carried").digest()
        );
        t.referrers = vec![sig(
            &own,
            weir_proto::Attachment::Tag(own_tag.clone()),
            &missing_blob,
        )];
        cases.push(("which the image object does not carry", t));
        let mut t = tm.clone();
        t.referrers = (0..=weir_proto::referrers::MAX_REFERRERS)
            .map(|i| {
                sig(
                    &own,
                    weir_proto::Attachment::Tag(own_tag.clone()),
                    &format!("{{\"n\":{i}}}"),
                )
            })
            .collect();
        cases.push(("referrers, more than", t));
        for (i, (want, mut t)) in cases.into_iter().enumerate() {
            // Each signed as the first record of a chain of its own: the
            // record is held, the names are what is refused.
            t.ledger =
                weir_test_support::genesis_record(weir_test_support::images::record_fields(&t));
            t.ledger.chain = weir_proto::ChainId(1000 + i as u64);
            let image = r.store.insert_bytes(&t.to_object_bytes()).unwrap();
            match ledger.object_verified(image, ObjectKind::Image, 0) {
                Err(err) => assert!(err.to_string().contains(want), "{want}: {err}"),
                // Past the bounds of a ledger record too: refused there.
                Ok(completed) => assert!(
                    completed.is_empty() && ["longer than 255", "tags, more than"].contains(&want),
                    "{want}"
                ),
            }
        }
        assert_eq!(
            r.counters
                .ledger_records_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert!(r.queue.all().unwrap().is_empty());
        // The legitimate image still completes beside them.
        let image = r.store.insert_bytes(&tm.to_object_bytes()).unwrap();
        assert_eq!(
            ledger.object_verified(image, ObjectKind::Image, 0).unwrap(),
            vec![image]
        );
    }

    /// A manifest may name one layer twice; the record keeps it once, so a
    /// record is no larger than the blobs it waits for.
    #[test]
    fn a_blob_named_twice_is_recorded_once_and_the_image_completes() {
        let r = rig("");
        let ledger = r.ledger();
        let (mut tm, _) = sample_image(&r.store, "team/app", &["1.0"], 1, 100);
        let named = tm.blobs.len();
        let again: Vec<_> = tm.blobs.clone();
        for _ in 0..1000 {
            tm.blobs.extend(again.iter().cloned());
        }
        tm.ledger =
            weir_test_support::genesis_record(weir_test_support::images::record_fields(&tm));
        let image = r.store.insert_bytes(&tm.to_object_bytes()).unwrap();
        assert_eq!(
            ledger.object_verified(image, ObjectKind::Image, 0).unwrap(),
            vec![image]
        );
        let mut kept = Vec::new();
        ledger
            .for_each_image(&mut |_, record| kept.push(record.blobs.len()))
            .unwrap();
        assert_eq!(kept, vec![named]);
    }

    #[test]
    fn an_image_object_whose_manifest_bytes_do_not_match_is_refused() {
        let r = rig("");
        let ledger = r.ledger();
        let (mut tm, _) = sample_image(&r.store, "team/app", &["1.0"], 1, 100);
        tm.manifest.bytes.push(b' ');
        let image = r.store.insert_bytes(&tm.to_object_bytes()).unwrap();
        let err = ledger
            .object_verified(image, ObjectKind::Image, 0)
            .unwrap_err();
        assert!(err.to_string().contains("do not hash"), "{err}");
        assert!(r.queue.all().unwrap().is_empty());
    }

    #[test]
    fn the_status_lists_the_images_receiving_and_the_latest_complete_after_a_restart_too() {
        let r = rig("");
        let ledger = r.ledger();
        let scratch_dir = tempfile::tempdir().unwrap();
        let scratch = BlobStore::open(scratch_dir.path()).unwrap();
        let mut complete = Vec::new();
        for i in 0..RECENT_COMPLETE + 5 {
            let (tm, blob_ids) =
                sample_image(&scratch, &format!("team/app{i}"), &["1"], 1, 100 + i);
            let image = r.store.insert_bytes(&tm.to_object_bytes()).unwrap();
            ledger.object_verified(image, ObjectKind::Image, 0).unwrap();
            for b in &blob_ids {
                r.store
                    .insert_bytes(&scratch.read_object(b).unwrap())
                    .unwrap();
                ledger.object_verified(*b, ObjectKind::Blob, 0).unwrap();
            }
            complete.push(tm.manifest.digest.clone());
            // Completion times a millisecond apart at least, so "latest" is one order.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let (waiting, _) = sample_image(&scratch, "team/late", &["1"], 1, 50);
        let image = r.store.insert_bytes(&waiting.to_object_bytes()).unwrap();
        ledger.object_verified(image, ObjectKind::Image, 0).unwrap();
        let expected: Vec<String> = std::iter::once(waiting.manifest.digest.clone())
            .chain(complete.iter().rev().take(RECENT_COMPLETE).cloned())
            .collect();
        let listed = |l: &ImageLedger| -> Vec<String> {
            l.progress(&[])
                .unwrap()
                .into_iter()
                .map(|p| p.manifest_digest)
                .collect()
        };
        assert_eq!(listed(&ledger), expected);
        // The receiving image completes once its blobs are verified.
        drop(ledger);
        let ledger = r.ledger();
        assert_eq!(listed(&ledger), expected, "the same after a restart");
        let blobs: Vec<ObjectId> = waiting
            .blobs
            .iter()
            .map(|b| ObjectId::from_digest(&b.digest).unwrap())
            .collect();
        let mut done = Vec::new();
        for b in &blobs {
            r.store
                .insert_bytes(&scratch.read_object(b).unwrap())
                .unwrap();
            done.extend(ledger.object_verified(*b, ObjectKind::Blob, 0).unwrap());
        }
        assert_eq!(done, vec![image]);
        let now = listed(&ledger);
        assert_eq!(now.len(), RECENT_COMPLETE);
        assert_eq!(now[0], waiting.manifest.digest, "the latest complete first");
    }

    #[test]
    fn progress_counts_arriving_blobs_partly() {
        let r = rig("");
        let ledger = r.ledger();
        let scratch_dir = tempfile::tempdir().unwrap();
        let scratch = BlobStore::open(scratch_dir.path()).unwrap();
        let (tm, blob_ids) = sample_image(&scratch, "team/app", &["1.0"], 1, 1000);
        let image = r.store.insert_bytes(&tm.to_object_bytes()).unwrap();
        ledger.object_verified(image, ObjectKind::Image, 0).unwrap();
        r.store
            .insert_bytes(&scratch.read_object(&blob_ids[0]).unwrap())
            .unwrap();
        ledger
            .object_verified(blob_ids[0], ObjectKind::Blob, 0)
            .unwrap();
        let layer = &tm.blobs[1];
        let arriving = ObjectProgress {
            id: layer.digest.clone(),
            kind: "blob".into(),
            len: layer.size,
            blocks_total: 4,
            blocks_complete: 2,
            shards_held: 10,
            passes_seen: 1.5,
            first_seen_ms: 0,
        };
        let p = &ledger.progress(&[arriving]).unwrap()[0];
        assert_eq!((p.blobs_done, p.blobs_total), (1, 2));
        assert_eq!(p.bytes_done, tm.blobs[0].size + layer.size / 2);
        assert_eq!(p.passes_seen, 1.5);
        assert_eq!(p.state, "receiving");
    }
}
