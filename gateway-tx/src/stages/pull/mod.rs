//! Pull: the sender's second intake. Polls source registries by the sync
//! list, gates each selected image on the same rules as a drop, streams its
//! manifests and blobs into the object store, and queues it for the
//! carousel exactly as a drop is queued.
//!
//! ```text
//!  sync.yaml ──▶ poll entry ──▶ tags (listed, filtered) ──▶ manifest digest
//!                   │                                          │ sent or refused before? skip
//!                   ▼                                          ▼
//!            source registry ◀── blobs streamed ◀── policy (rules, scan)
//!                                     │
//!                                     ▼
//!                   object store ──▶ image committed ──▶ carousel
//! ```
//!
//! What crosses once: every (manifest digest, destination) queued is marked
//! sent in the same record file drops use, so a drop and a pull of the same
//! image cross once, a tag moved to a new digest crosses again, and a tag
//! deleted at the source changes nothing on the high side. A refused image
//! is remembered with the fingerprint of the rules and scanner settings
//! that refused it, and tried again only when its digest or those change.
//!
//! Crash safety is the drop's: blobs land as whole files (hashed on the
//! way) before anything names them, and the image record, its sent marks
//! and its audit entry land in one transaction. A fetch cut half way
//! leaves no queue entry; its blobs already stored are reused next poll.
//!
//! `platforms` keeps only the listed platforms of an index. That is a new
//! index, with a new digest, which is what crosses and what the high side
//! gets; the log says so.

mod referrers;
pub mod scan;
pub mod source;
pub mod sync;

use crate::appliance::{Fault, Faults};
use crate::config::{ReferrersMode, Scanner, TxConfig};
use crate::ingest::formats::{MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST};
use crate::objects::{
    unix_now, AcceptedImage, AuditEntry, ImageRecord, ObjectStore, PullRefusal, StoreError,
};
use crate::policy::{decide, ReasonCode, Refusal, ReportState, Rules, SignatureEvidence, Subject};
use crate::reload::IntakeSettings;
use crate::status::{PullEntryStatus, PullStatus, SourceRegistryStatus, StatusBoard};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use source::{FetchedManifest, SourceError, SourceRegistries, SourceRegistry};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use sync::{Platform, Selection, SyncEntry, SyncList};
use weir_host::reload::ReloadReader;
use weir_host::Shutdown;
use weir_proto::referrers::is_attachment_tag;
use weir_proto::{BlobRef, Destination, ManifestBytes, ObjectId, Origin};

/// Polls in a row a registry may fail before the fault is raised.
pub const FAULT_AFTER_FAILURES: u64 = 3;
/// A poll that failed for the registry's sake is tried again this soon at
/// the latest (sooner when the entry's interval is shorter).
const RETRY_FAILED: Duration = Duration::from_secs(30);
/// How often the stage looks for due entries and a changed sync file.
const TICK: Duration = Duration::from_millis(500);
/// Most manifests an index may name; the receiver holds no more either.
const MAX_CHILDREN: usize = 1024;
/// Most blobs one image may name (the receiver's bound).
const MAX_BLOBS: usize = weir_proto::MAX_BLOBS_PER_IMAGE;
/// Blobs of one image fetched at once; the registry's `max_concurrent`
/// bounds the requests actually in flight.
const PARALLEL_BLOBS: usize = 4;

/// Where pulled images' scan reports come from.
#[derive(Debug, Clone)]
enum ScanSource {
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    Quay,
}

/// What became of one selected image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullOutcome {
    Queued(ImageRecord),
    AlreadySent,
    Refused(Refusal),
    /// Refused before under the same rules; not tried again.
    RefusedBefore,
}

/// Why a selected image could not be decided this poll.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PullError {
    /// Whether the registry itself failed (down, credentials refused): the
    /// entry's other images would fail the same way.
    fn is_registry_failure(&self) -> bool {
        matches!(
            self,
            PullError::Source(
                SourceError::Unavailable { .. }
                    | SourceError::Unauthorized { .. }
                    | SourceError::Setup { .. }
            )
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

struct EntryState {
    next: Instant,
    status: PullEntryStatus,
}

/// The pull stage.
pub struct Puller {
    sync_path: PathBuf,
    sync: SyncList,
    sync_stamp: Option<FileStamp>,
    sync_error: Option<String>,
    default_interval: Duration,
    scanner: Option<ScanSource>,
    registries: SourceRegistries,
    store: Arc<ObjectStore>,
    rules: Option<Rules>,
    /// Rules file and scanner settings, hashed: a refusal under other
    /// rules is tried again.
    rules_fingerprint: String,
    /// `[policy] referrers`.
    referrers: ReferrersMode,
    queue: Sender<ImageRecord>,
    board: StatusBoard,
    faults: Arc<Faults>,
    entries: HashMap<String, EntryState>,
    registry_health: BTreeMap<String, SourceRegistryStatus>,
    /// Rules, sync file and interval a configuration reload sets.
    settings: Option<ReloadReader<IntakeSettings>>,
}

/// Rules file and scanner settings, hashed: what a refusal is kept under.
fn rules_fingerprint(
    rules_bytes: &[u8],
    scanner: &Option<ScanSource>,
    referrers: ReferrersMode,
) -> String {
    let mut h = Sha256::new();
    h.update(rules_bytes);
    h.update(format!("{scanner:?} {referrers:?}"));
    hex::encode(&h.finalize()[..16])
}

impl Puller {
    /// The stage, when `[pull]` is configured.
    pub fn new(
        config: &TxConfig,
        store: Arc<ObjectStore>,
        queue: Sender<ImageRecord>,
        board: StatusBoard,
        faults: Arc<Faults>,
    ) -> anyhow::Result<Option<Puller>> {
        use anyhow::Context;
        let Some(pull) = &config.pull else {
            return Ok(None);
        };
        let sync = SyncList::load(&pull.sync_file).context("pull.sync_file")?;
        let sync_stamp = stamp(&pull.sync_file);
        let registries = SourceRegistries::new(&config.registry).context("registry")?;
        let rules = match &config.policy.rules_file {
            Some(p) => Some(Rules::load(p)?),
            None => None,
        };
        let scanner = match (pull.scanner, &pull.scan_command) {
            (Some(Scanner::Quay), _) => Some(ScanSource::Quay),
            (_, Some(argv)) => Some(ScanSource::Command {
                argv: argv.clone(),
                timeout: Duration::from_secs(pull.scan_timeout_s),
            }),
            (Some(Scanner::Command), None) | (None, None) => None,
        };
        let rules_bytes = match &config.policy.rules_file {
            Some(p) => std::fs::read(p).unwrap_or_default(),
            None => Vec::new(),
        };
        let referrers = config.policy.referrers;
        let rules_fingerprint = rules_fingerprint(&rules_bytes, &scanner, referrers);
        Ok(Some(Puller {
            sync_path: pull.sync_file.clone(),
            sync,
            sync_stamp,
            sync_error: None,
            default_interval: Duration::from_secs(pull.interval_s),
            scanner,
            registries,
            store,
            rules,
            rules_fingerprint,
            referrers,
            queue,
            board,
            faults,
            entries: HashMap::new(),
            registry_health: BTreeMap::new(),
            settings: None,
        }))
    }

    /// Takes the rules, sync file and poll interval a reload sets.
    pub fn with_settings(mut self, settings: ReloadReader<IntakeSettings>) -> Self {
        self.settings = Some(settings);
        self
    }

    fn pick_up_settings(&mut self) {
        let Some(new) = self.settings.as_mut().and_then(|s| s.changed()) else {
            return;
        };
        self.rules.clone_from(&new.rules);
        self.referrers = new.referrers;
        self.rules_fingerprint = rules_fingerprint(&new.rules_bytes, &self.scanner, new.referrers);
        if let Some(path) = new.sync_file.as_ref().filter(|p| **p != self.sync_path) {
            tracing::info!(sync_file = %path.display(), "pull: following another sync file");
            self.sync_path = path.clone();
            // Read at the next look, whatever its stamp.
            self.sync_stamp = None;
        }
        if !new.pull_interval.is_zero() {
            self.default_interval = new.pull_interval;
        }
        tracing::info!(
            interval_s = self.default_interval.as_secs(),
            "pull: the reloaded rules, sync file and interval are in force"
        );
    }

    /// Polls every entry when due until shutdown.
    pub fn run(mut self, shutdown: &Shutdown) -> anyhow::Result<()> {
        tracing::info!(sync_file = %self.sync_path.display(), entries = self.sync.entries.len(),
            "pull mode: following the sync list");
        self.publish();
        loop {
            self.pick_up_settings();
            self.reload_if_changed();
            let due: Vec<SyncEntry> = self
                .sync
                .entries
                .iter()
                .filter(|e| {
                    self.entries
                        .get(&entry_key(e))
                        .is_none_or(|s| Instant::now() >= s.next)
                })
                .cloned()
                .collect();
            for entry in due {
                if shutdown.is_triggered() {
                    return Ok(());
                }
                if self.faults.is_raised(Fault::StateDiskFull) {
                    // Ingest watches the disk; a pull would only fail.
                    break;
                }
                self.poll_entry(&entry, shutdown);
                self.publish();
            }
            if shutdown.sleep(TICK) {
                return Ok(());
            }
        }
    }

    /// Re-reads the sync file when it changed; a version that does not
    /// validate is refused and the list in force stays.
    fn reload_if_changed(&mut self) {
        let now = stamp(&self.sync_path);
        if now == self.sync_stamp {
            return;
        }
        self.sync_stamp = now;
        match SyncList::load(&self.sync_path) {
            Ok(list) => {
                tracing::info!(sync_file = %self.sync_path.display(), entries = list.entries.len(),
                    "sync list changed; the new list is in force");
                self.sync = list;
                self.sync_error = None;
                let keys: std::collections::HashSet<String> =
                    self.sync.entries.iter().map(entry_key).collect();
                self.entries.retain(|k, _| keys.contains(k));
            }
            Err(e) => {
                tracing::error!(error = %e,
                    "the edited sync file is refused; the previous list stays in force");
                self.sync_error = Some(e.to_string());
            }
        }
        self.publish();
    }

    /// One poll of one entry: list, filter, resolve, and pull what is new.
    pub fn poll_entry(&mut self, entry: &SyncEntry, shutdown: &Shutdown) {
        let registry = self.registries.get(&entry.source.host);
        let interval = entry.interval.unwrap_or(self.default_interval);
        let mut st = PullEntryStatus {
            name: entry.name.clone(),
            source: entry.source_text.clone(),
            destination: entry.destination.name(),
            last_poll: Some(unix_now()),
            ..Default::default()
        };
        if let Some(prev) = self.entries.get(&entry_key(entry)) {
            st.queued_total = prev.status.queued_total;
            st.refused_total = prev.status.refused_total;
        }
        tracing::debug!(entry = %entry.name, source = %entry.source_text, "polling");
        let mut registry_failure: Option<String> = None;
        let mut failed = false;
        match self.selected_tags(entry, &registry, &mut st, shutdown) {
            Err(e) => {
                if e.is_registry_failure() {
                    registry_failure = Some(e.to_string());
                }
                tracing::warn!(entry = %entry.name, source = %entry.source_text, error = %e,
                    "listing the source failed; the entry is polled again later");
                st.last_error = Some(e.to_string());
                failed = true;
            }
            Ok(selected) => {
                for (reference, dest_tag) in selected {
                    if shutdown.is_triggered() {
                        return;
                    }
                    match self.pull_image(entry, &registry, &reference, &dest_tag, shutdown) {
                        Ok(PullOutcome::Queued(_)) => {
                            st.queued += 1;
                            st.queued_total += 1;
                        }
                        Ok(PullOutcome::AlreadySent) => st.already_sent += 1,
                        Ok(PullOutcome::Refused(_)) => {
                            st.refused += 1;
                            st.refused_total += 1;
                        }
                        Ok(PullOutcome::RefusedBefore) => st.refused += 1,
                        Err(PullError::Source(SourceError::Cancelled)) => return,
                        Err(e) => {
                            st.failed += 1;
                            failed = true;
                            tracing::warn!(entry = %entry.name, source = %entry.source_text,
                                reference = %reference, error = %e,
                                "pulling the image failed; nothing of it is queued, it is tried again next poll");
                            st.last_error = Some(e.to_string());
                            if let PullError::Store(s) = &e {
                                if crate::appliance::is_disk_full(s) {
                                    self.faults.raise(
                                        Fault::StateDiskFull,
                                        format!("state disk full while pulling: {s}"),
                                    );
                                    break;
                                }
                            }
                            if e.is_registry_failure() {
                                registry_failure = Some(e.to_string());
                                break;
                            }
                        }
                    }
                }
            }
        }
        self.record_registry(registry.host(), registry_failure);
        let wait = if failed {
            interval.min(RETRY_FAILED)
        } else {
            interval
        };
        st.next_poll = Some(unix_now() + wait.as_secs());
        self.entries.insert(
            entry_key(entry),
            EntryState {
                next: Instant::now() + wait,
                status: st,
            },
        );
    }

    /// The (source reference, destination tag) pairs an entry selects now.
    fn selected_tags(
        &self,
        entry: &SyncEntry,
        registry: &SourceRegistry,
        st: &mut PullEntryStatus,
        shutdown: &Shutdown,
    ) -> Result<Vec<(String, String)>, PullError> {
        let dest_tag = entry.destination.tag.clone();
        Ok(match &entry.selection {
            Selection::Tag(t) => {
                st.tags_seen = 1;
                st.selected = 1;
                vec![(t.clone(), dest_tag.unwrap_or_else(|| t.clone()))]
            }
            Selection::Digest(d) => {
                st.tags_seen = 1;
                st.selected = 1;
                vec![(d.clone(), dest_tag.unwrap_or_else(|| "latest".into()))]
            }
            Selection::Follow(filter) => {
                let tags = registry.list_tags(&entry.source.repository, shutdown)?;
                st.tags_seen = tags.len() as u64;
                let selected: Vec<(String, String)> = tags
                    .into_iter()
                    // Signature and referrer tags cross with their image.
                    .filter(|t| !is_attachment_tag(t) && filter.selects(t))
                    .map(|t| (t.clone(), t))
                    .collect();
                st.selected = selected.len() as u64;
                selected
            }
        })
    }

    /// Resolves, gates, fetches and queues one image.
    pub fn pull_image(
        &self,
        entry: &SyncEntry,
        registry: &SourceRegistry,
        reference: &str,
        dest_tag: &str,
        shutdown: &Shutdown,
    ) -> Result<PullOutcome, PullError> {
        let repo = &entry.source.repository;
        let source_ref = if reference.starts_with("sha256:") {
            format!("{}/{repo}@{reference}", entry.source.host)
        } else {
            format!("{}/{repo}:{reference}", entry.source.host)
        };
        let destination = format!("{}:{dest_tag}", entry.destination.repository);
        let top = registry.manifest(repo, reference, shutdown)?;
        let source_digest = top.digest.clone();
        let refuse_early = |code, message: String| -> Result<PullOutcome, PullError> {
            self.refuse(
                &source_ref,
                &source_digest,
                &destination,
                Refusal::new(code, message),
            )
        };
        let doc: ManifestDoc = match serde_json::from_slice(&top.bytes) {
            Ok(d) => d,
            Err(e) => {
                return refuse_early(
                    ReasonCode::UnsupportedImage,
                    format!("manifest {source_digest} is not a JSON image manifest: {e}"),
                )
            }
        };
        // The index (filtered by platform) is known before any child is
        // fetched: what was sent or refused before is skipped at once.
        let (manifest, child_refs) = if doc.is_index(&top.media_type) {
            let all = doc.manifests.clone().unwrap_or_default();
            if all.len() > MAX_CHILDREN {
                return refuse_early(
                    ReasonCode::UnsupportedImage,
                    format!("index {source_digest} names {} manifests; at most {MAX_CHILDREN} are carried", all.len()),
                );
            }
            match &entry.platforms {
                None => (as_manifest_bytes(&top), all),
                Some(platforms) => {
                    let kept: Vec<Descriptor> = all
                        .iter()
                        .filter(|d| d.platform.as_ref().is_some_and(|p| p.is_one_of(platforms)))
                        .cloned()
                        .collect();
                    if kept.is_empty() {
                        return refuse_early(
                            ReasonCode::UnsupportedImage,
                            format!(
                                "index {source_digest} has no manifest for {}",
                                platforms
                                    .iter()
                                    .map(|p| p.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        );
                    }
                    if kept.len() == all.len() {
                        (as_manifest_bytes(&top), all)
                    } else {
                        let bytes = filtered_index(&top.bytes, &kept)?;
                        let m = ManifestBytes {
                            digest: sha256_digest(&bytes),
                            media_type: top.media_type.clone(),
                            bytes,
                        };
                        tracing::info!(entry = %entry.name, source = %source_ref, source_digest = %source_digest,
                            digest = %m.digest, kept = kept.len(), of = all.len(),
                            "platforms kept of the index: a new index with a new digest crosses in its place");
                        (m, kept)
                    }
                }
            }
        } else {
            (as_manifest_bytes(&top), Vec::new())
        };
        let digest = manifest.digest.clone();
        if self.store.sent(&digest, &destination)?.is_some() {
            tracing::debug!(source = %source_ref, digest = %digest, destination = %destination,
                "already sent to this destination");
            return Ok(PullOutcome::AlreadySent);
        }
        if let Some(r) = self.store.pull_refusal(&digest, &destination)? {
            if r.rules == self.rules_fingerprint {
                return Ok(PullOutcome::RefusedBefore);
            }
        }
        let refuse = |code, message: String| -> Result<PullOutcome, PullError> {
            self.refuse(
                &source_ref,
                &digest,
                &destination,
                Refusal::new(code, message),
            )
        };

        // Children, then the blobs every kept manifest names.
        let mut children = Vec::with_capacity(child_refs.len());
        let mut image_docs = Vec::new();
        for c in &child_refs {
            let fetched = registry.manifest(repo, &c.digest, shutdown)?;
            let child: ManifestDoc = match serde_json::from_slice(&fetched.bytes) {
                Ok(d) => d,
                Err(e) => {
                    return refuse(
                        ReasonCode::UnsupportedImage,
                        format!("manifest {} of index {source_digest}: {e}", c.digest),
                    )
                }
            };
            if child.is_index(&fetched.media_type) {
                return refuse(
                    ReasonCode::UnsupportedImage,
                    format!(
                        "nested index {} inside index {source_digest} is not supported",
                        c.digest
                    ),
                );
            }
            children.push(as_manifest_bytes(&fetched));
            image_docs.push(child);
        }
        if child_refs.is_empty() {
            image_docs.push(doc);
        }
        let mut blobs: Vec<BlobRef> = Vec::new();
        let mut config_digests = Vec::new();
        for m in &image_docs {
            let Some(config) = &m.config else {
                return refuse(
                    ReasonCode::UnsupportedImage,
                    format!(
                        "a manifest of {source_digest} has no config (schema 1 is not carried)"
                    ),
                );
            };
            config_digests.push(config.digest.clone());
            for b in std::iter::once(config).chain(m.layers.iter()) {
                if blobs.iter().any(|x| x.digest == b.digest) {
                    continue;
                }
                if ObjectId::from_digest(&b.digest).is_err() {
                    return refuse(
                        ReasonCode::UnsupportedImage,
                        format!("blob digest {:?} is not sha256:<64 hex>", b.digest),
                    );
                }
                blobs.push(BlobRef {
                    digest: b.digest.clone(),
                    size: b.size,
                    media_type: b.media_type.clone().unwrap_or_default(),
                });
            }
        }
        if blobs.len() > MAX_BLOBS {
            return refuse(
                ReasonCode::UnsupportedImage,
                format!(
                    "{} blobs; at most {MAX_BLOBS} are carried per image",
                    blobs.len()
                ),
            );
        }

        // Referrers of what crosses: a platform-filtered index is a new
        // manifest no source referrer speaks of; its children still are.
        let subjects: Vec<String> = std::iter::once(&manifest)
            .filter(|m| m.digest == source_digest)
            .chain(children.iter())
            .map(|m| m.digest.clone())
            .collect();
        let found = referrers::discover(registry, repo, &digest, &subjects, &blobs, shutdown)?;
        if self.referrers == ReferrersMode::Require && found.referrers.is_empty() {
            return refuse(
                ReasonCode::ReferrersMissing,
                format!(
                    "{source_digest} has no signature, attestation or SBOM in the source, and [policy] referrers = \"require\""
                ),
            );
        }

        // The policy, on the source reference, before a byte of blob.
        let source_name = match reference.starts_with("sha256:") {
            true => repo.clone(),
            false => format!("{repo}:{reference}"),
        };
        let verdict = match &self.rules {
            None => decide(
                None,
                &subject(&source_name, &config_digests, &found.signatures),
                &ReportState::Missing,
            ),
            Some(rules) => {
                let report = self.scan(registry, entry, &source_ref, &source_digest, shutdown);
                if shutdown.is_triggered() {
                    return Err(SourceError::Cancelled.into());
                }
                decide(
                    Some(rules),
                    &subject(&source_name, &config_digests, &found.signatures),
                    &report,
                )
            }
        };
        let verdict = match verdict {
            Ok(v) => v,
            Err(refusal) => {
                return self.refuse(&source_ref, &digest, &destination, refusal);
            }
        };

        let carried = match self.referrers {
            ReferrersMode::Drop => Vec::new(),
            ReferrersMode::Carry | ReferrersMode::Require => {
                blobs.extend(found.blobs.iter().cloned());
                found.referrers
            }
        };
        if blobs.len() > MAX_BLOBS {
            return refuse(
                ReasonCode::UnsupportedImage,
                format!(
                    "{} blobs with its referrers'; at most {MAX_BLOBS} are carried per image",
                    blobs.len()
                ),
            );
        }
        if let Some(refusal) = self.fetch_blobs(registry, repo, &blobs, shutdown)? {
            return self.refuse(&source_ref, &digest, &destination, refusal);
        }

        let ingested_at = unix_now();
        let image = AcceptedImage {
            destination: Destination {
                repository: entry.destination.repository.clone(),
                tags: vec![dest_tag.to_string()],
            },
            manifest: manifest.clone(),
            children,
            blobs: blobs.clone(),
            referrers: carried,
            origin: Origin {
                source: source_ref.clone(),
                source_reference: Some(source_ref.clone()),
                ingested_at,
            },
            verdict,
            references: vec![destination.clone()],
        };
        let record = self.store.commit_pulled(
            image,
            AuditEntry {
                at: ingested_at,
                source: source_ref.clone(),
                outcome: "accepted".into(),
                code: None,
                message: format!("{destination} as {digest}"),
                references: vec![destination.clone()],
                manifest_digests: vec![digest.clone()],
            },
        )?;
        tracing::info!(entry = %entry.name, source = %source_ref, digest = %digest, image = %record.image,
            destination = %destination, blobs = blobs.len(), bytes = blobs.iter().map(|b| b.size).sum::<u64>(),
            "image pulled and queued");
        // The carousel also reads the queue at start; a closed channel only
        // means it is stopping.
        let _ = self.queue.send(record.clone());
        Ok(PullOutcome::Queued(record))
    }

    /// Streams the blobs the store lacks into it, several at a time (the
    /// registry's own limit still holds). The first failure stops the
    /// others; what they wrote is thrown away. A blob whose bytes do not
    /// match its descriptor is a refusal, not a failure.
    fn fetch_blobs(
        &self,
        registry: &SourceRegistry,
        repo: &str,
        blobs: &[BlobRef],
        shutdown: &Shutdown,
    ) -> Result<Option<Refusal>, PullError> {
        let mut missing = Vec::new();
        for b in blobs {
            let id = ObjectId::from_digest(&b.digest).map_err(|_| SourceError::Protocol {
                host: registry.host().to_string(),
                message: format!("bad digest {}", b.digest),
            })?;
            if !self.store.reuse(&id) {
                missing.push((id, b));
            }
        }
        if missing.is_empty() {
            return Ok(None);
        }
        let stop = Shutdown::new();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let workers = missing.len().min(PARALLEL_BLOBS);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let done_tx = done_tx.clone();
                let (stop, next, missing) = (&stop, &next, &missing);
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((id, b)) = missing.get(i) else {
                        return;
                    };
                    if stop.is_triggered() {
                        return;
                    }
                    let result = self.fetch_blob(registry, repo, id, b, stop);
                    let failed = !matches!(result, Ok(None));
                    let _ = done_tx.send(result);
                    if failed {
                        return;
                    }
                });
            }
            drop(done_tx);
            let mut outcome: Result<Option<Refusal>, PullError> = Ok(None);
            loop {
                match done_rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(Ok(None)) => {}
                    Ok(other) => {
                        stop.trigger();
                        // The first failure is the one to report; a
                        // worker stopped by it only says "cancelled".
                        if matches!(outcome, Ok(None)) {
                            outcome = other;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if shutdown.is_triggered() {
                            stop.trigger();
                            outcome = Err(SourceError::Cancelled.into());
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            outcome
        })
    }

    fn fetch_blob(
        &self,
        registry: &SourceRegistry,
        repo: &str,
        id: &ObjectId,
        b: &BlobRef,
        stop: &Shutdown,
    ) -> Result<Option<Refusal>, PullError> {
        let mut writer = self.store.writer()?;
        let mut bounded = Bounded {
            inner: &mut writer,
            left: b.size,
        };
        let got = match registry.blob(repo, &b.digest, &mut bounded, stop) {
            Err(SourceError::Write { source, .. })
                if source.kind() == std::io::ErrorKind::FileTooLarge =>
            {
                return Ok(Some(Refusal::new(
                    ReasonCode::DigestMismatch,
                    format!(
                        "blob {} is longer than the {} bytes its descriptor says",
                        b.digest, b.size
                    ),
                )))
            }
            other => other?,
        };
        if got != b.size {
            return Ok(Some(Refusal::new(
                ReasonCode::DigestMismatch,
                format!(
                    "blob {} is {got} bytes, its descriptor says {}",
                    b.digest, b.size
                ),
            )));
        }
        match writer.finish(Some(id)) {
            Ok(obj) => {
                tracing::debug!(digest = %obj.id, size = obj.len, "blob pulled");
                Ok(None)
            }
            Err(StoreError::DigestMismatch { expected, got }) => Ok(Some(Refusal::new(
                ReasonCode::DigestMismatch,
                format!("blob {expected} arrived with digest {got}"),
            ))),
            Err(e) => Err(e.into()),
        }
    }

    fn scan(
        &self,
        registry: &SourceRegistry,
        entry: &SyncEntry,
        source_ref: &str,
        source_digest: &str,
        shutdown: &Shutdown,
    ) -> ReportState {
        match &self.scanner {
            None => ReportState::Missing,
            Some(ScanSource::Command { argv, timeout }) => {
                scan::run_scan_command(argv, source_ref, source_digest, *timeout, shutdown)
            }
            Some(ScanSource::Quay) => {
                scan::quay_report(registry, &entry.source.repository, source_digest, shutdown)
            }
        }
    }

    fn refuse(
        &self,
        source_ref: &str,
        digest: &str,
        destination: &str,
        refusal: Refusal,
    ) -> Result<PullOutcome, PullError> {
        tracing::warn!(source = %source_ref, digest = %digest, destination = %destination,
            code = %refusal.code, reason = %refusal.message,
            "pulled image refused; not tried again until its digest or the rules change");
        let at = unix_now();
        self.store.refuse_pull(
            digest,
            destination,
            &PullRefusal {
                code: refusal.code.as_str().into(),
                message: refusal.message.clone(),
                rules: self.rules_fingerprint.clone(),
                at,
            },
            &AuditEntry {
                at,
                source: source_ref.to_string(),
                outcome: "rejected".into(),
                code: Some(refusal.code.as_str().into()),
                message: refusal.message.clone(),
                references: vec![destination.to_string()],
                manifest_digests: vec![digest.to_string()],
            },
        )?;
        Ok(PullOutcome::Refused(refusal))
    }

    /// Tracks a registry's health; raises the fault after several failed
    /// polls in a row, clears it when every registry answers again.
    fn record_registry(&mut self, host: &str, failure: Option<String>) {
        let h = self
            .registry_health
            .entry(host.to_string())
            .or_insert_with(|| SourceRegistryStatus {
                host: host.to_string(),
                ..Default::default()
            });
        match failure {
            None => {
                if h.failures_in_a_row >= FAULT_AFTER_FAILURES {
                    tracing::info!(registry = %host, "source registry answers again");
                }
                h.reachable = true;
                h.failures_in_a_row = 0;
                h.last_error = None;
            }
            Some(message) => {
                h.reachable = false;
                h.failures_in_a_row += 1;
                h.last_error = Some(message);
            }
        }
        let failing: Vec<String> = self
            .registry_health
            .values()
            .filter(|h| h.failures_in_a_row >= FAULT_AFTER_FAILURES)
            .map(|h| {
                format!(
                    "source registry {} failing: {}",
                    h.host,
                    h.last_error.as_deref().unwrap_or("no answer")
                )
            })
            .collect();
        if failing.is_empty() {
            self.faults.clear(Fault::SourceRegistryFailing);
        } else {
            self.faults
                .raise(Fault::SourceRegistryFailing, failing.join("; "));
        }
    }

    fn publish(&self) {
        let mut entries: Vec<PullEntryStatus> = self
            .sync
            .entries
            .iter()
            .map(|e| match self.entries.get(&entry_key(e)) {
                Some(s) => s.status.clone(),
                None => PullEntryStatus {
                    name: e.name.clone(),
                    source: e.source_text.clone(),
                    destination: e.destination.name(),
                    ..Default::default()
                },
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let status = PullStatus {
            sync_file: self.sync_path.display().to_string(),
            sync_error: self.sync_error.clone(),
            entries,
            registries: self.registry_health.values().cloned().collect(),
        };
        self.board.update(|s| s.pull = Some(status));
    }
}

/// A writer that refuses bytes past what the blob's descriptor announced,
/// so a source sending more cannot fill the state disk.
pub(crate) struct Bounded<'a, W: std::io::Write> {
    pub(crate) inner: &'a mut W,
    pub(crate) left: u64,
}

impl<W: std::io::Write> std::io::Write for Bounded<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "more bytes than the descriptor announced",
            ));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn subject<'a>(
    name: &'a str,
    config_digests: &'a [String],
    signatures: &'a SignatureEvidence,
) -> Subject<'a> {
    Subject {
        name,
        namespace: name.split_once('/').map(|(ns, _)| ns).unwrap_or(""),
        config_digests,
        signatures,
    }
}

fn entry_key(e: &SyncEntry) -> String {
    format!("{} {} {}", e.name, e.source_text, e.destination.name())
}

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    std::fs::metadata(path).ok().map(|m| FileStamp {
        len: m.len(),
        modified: m.modified().ok(),
    })
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn as_manifest_bytes(m: &FetchedManifest) -> ManifestBytes {
    ManifestBytes {
        digest: m.digest.clone(),
        media_type: m.media_type.clone(),
        bytes: m.bytes.clone(),
    }
}

/// The index with only `kept` in its `manifests`; every other field as it
/// was. Same input, same bytes: a filtered index keeps one digest across
/// polls.
fn filtered_index(bytes: &[u8], kept: &[Descriptor]) -> Result<Vec<u8>, PullError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| SourceError::Protocol {
            host: String::new(),
            message: format!("index is not JSON: {e}"),
        })?;
    let keep: std::collections::HashSet<&str> = kept.iter().map(|d| d.digest.as_str()).collect();
    if let Some(list) = v.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        list.retain(|d| {
            d.get("digest")
                .and_then(|x| x.as_str())
                .is_some_and(|x| keep.contains(x))
        });
    }
    serde_json::to_vec(&v).map_err(|e| {
        PullError::Source(SourceError::Protocol {
            host: String::new(),
            message: format!("re-encoding the index: {e}"),
        })
    })
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<DescriptorPlatform>,
}

#[derive(Debug, Clone, Deserialize)]
struct DescriptorPlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl DescriptorPlatform {
    fn is_one_of(&self, platforms: &[Platform]) -> bool {
        platforms
            .iter()
            .any(|p| p.matches(&self.os, &self.architecture, self.variant.as_deref()))
    }
}

#[derive(Debug, Clone, Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

impl ManifestDoc {
    fn is_index(&self, content_type: &str) -> bool {
        let mt = self.media_type.as_deref().unwrap_or(content_type);
        match mt {
            MT_OCI_INDEX | MT_DOCKER_LIST => true,
            MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => false,
            _ => self.manifests.is_some() && self.config.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filtered_index_keeps_only_the_listed_platforms_and_one_digest() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":1,"platform":{"os":"linux","architecture":"amd64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bb","size":1,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#;
        let doc: ManifestDoc = serde_json::from_slice(index).unwrap();
        assert!(doc.is_index(""));
        let amd64 = Platform::parse("linux/amd64").unwrap();
        let kept: Vec<Descriptor> = doc
            .manifests
            .unwrap()
            .into_iter()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.is_one_of(std::slice::from_ref(&amd64)))
            })
            .collect();
        assert_eq!(kept.len(), 1);
        let a = filtered_index(index, &kept).unwrap();
        let b = filtered_index(index, &kept).unwrap();
        assert_eq!(a, b, "the same index filters to the same bytes");
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(v["manifests"][0]["digest"], "sha256:aa");
        assert_eq!(v["mediaType"], "application/vnd.oci.image.index.v1+json");
    }

    #[test]
    fn a_manifest_is_told_from_an_index_by_media_type_or_shape() {
        let m: ManifestDoc =
            serde_json::from_str(r#"{"config":{"digest":"sha256:aa","size":1},"layers":[]}"#)
                .unwrap();
        assert!(!m.is_index(MT_DOCKER_MANIFEST));
        assert!(!m.is_index(""));
        let i: ManifestDoc = serde_json::from_str(r#"{"manifests":[]}"#).unwrap();
        assert!(i.is_index(""));
        assert!(i.is_index(MT_DOCKER_LIST));
    }
}
