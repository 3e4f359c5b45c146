//! Ingest: the file drop. Watches `spool_dir`, reads each eligible archive,
//! asks the policy, writes the blobs into the object store, commits the
//! images to the queue and moves the drop to `done/` or `rejected/`.
//!
//! A drop is eligible once renamed into place: names starting with `.` or
//! ending in `.partial` are in flight and never opened; `<drop>.scan.json`
//! (its scan report) and `*.reason.json` are never drops themselves. Put the
//! scan report in place before renaming the archive in.
//!
//! Crash safety: blobs land as whole files before anything refers to them;
//! the queue entries, "sent" marks, audit entry and a drop record land in one
//! sled transaction; only then is the drop moved. A restart finds either no
//! record (and redoes the drop; blobs already stored are reused) or the
//! record (and only finishes the move).
//!
//! A full state disk stops intake instead: while the disk holds less than
//! `state_min_free_mb`, or after a write failed for want of space (until
//! space frees), no drop is read; the drops wait in the spool, and the
//! fault "state disk full" is raised.

pub mod archive;
pub mod formats;
pub mod reference;
mod watch;

use crate::appliance::{is_disk_full, Fault, Faults, Intake, StateDisk};
use crate::config::{Mapping, ReferrersMode, TxConfig};
use crate::objects::{
    unix_now, AcceptedImage, AuditEntry, DropCommit, DropRecord, ImageRecord, ObjectStore,
    StoreError,
};
use crate::policy::{decide, ReasonCode, Refusal, ReportState, Rules, Subject};
use crate::reload::IntakeSettings;
use crate::status::StatusBoard;
use archive::TarIndex;
use formats::{DropError, LayerCompression};
use reference::ImageRef;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_host::durable::fsync_dir;
use weir_host::reload::ReloadReader;
use weir_host::Shutdown;
use weir_proto::referrers::is_attachment_tag;
use weir_proto::{Destination, Origin};

/// After a failure on our side (disk full...), a drop waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Whether a spool entry name is a drop to read.
pub fn is_drop_name(name: &str) -> bool {
    !(name.starts_with('.')
        || name.ends_with(".partial")
        || name.ends_with(".scan.json")
        || name.ends_with(".reason.json"))
}

/// What became of one drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropOutcome {
    /// New images queued (their records).
    Accepted(Vec<ImageRecord>),
    /// Every image in it was sent before: moved to done/ with that reason.
    AlreadySent(String),
    Rejected(Refusal),
    /// A restart found it committed; only the move to done/ was left.
    Finished,
    /// Shutdown came mid-way; the drop stays in the spool for next time.
    Interrupted,
    /// It did not read as an archive, and it changed while it was read or
    /// was written moments ago (a file copied into the spool instead of
    /// renamed in): it stays in the spool and is read again, not rejected
    /// half-written.
    StillChanging,
}

/// The spool directory and its two outboxes.
#[derive(Debug, Clone)]
pub struct Spool {
    pub dir: PathBuf,
    pub done: PathBuf,
    pub rejected: PathBuf,
}

impl Spool {
    pub fn new(dir: &Path) -> std::io::Result<Spool> {
        let s = Spool {
            dir: dir.to_path_buf(),
            done: dir.join("done"),
            rejected: dir.join("rejected"),
        };
        std::fs::create_dir_all(&s.done)?;
        std::fs::create_dir_all(&s.rejected)?;
        Ok(s)
    }

    /// Eligible drops, oldest first.
    pub fn eligible(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut found = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_file() {
                continue; // done/, rejected/, symlinks, sockets
            }
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(file = ?name, "spool file name is not UTF-8; ignored");
                continue;
            };
            if !is_drop_name(name) {
                continue;
            }
            let modified = e.metadata().and_then(|m| m.modified()).ok();
            found.push((modified, e.path()));
        }
        found.sort();
        Ok(found.into_iter().map(|(_, p)| p).collect())
    }

    pub fn report_path(drop: &Path) -> PathBuf {
        let mut name = drop.file_name().unwrap_or_default().to_os_string();
        name.push(".scan.json");
        drop.with_file_name(name)
    }
}

/// The ingest stage.
pub struct Ingestor {
    spool: Spool,
    store: Arc<ObjectStore>,
    rules: Option<Rules>,
    mappings: Vec<Mapping>,
    referrers: ReferrersMode,
    compression: LayerCompression,
    poll: Duration,
    queue: Sender<ImageRecord>,
    status: StatusBoard,
    retry_at: HashMap<PathBuf, Instant>,
    disk: StateDisk,
    faults: Arc<Faults>,
    /// Rules and mappings a configuration reload sets.
    settings: Option<ReloadReader<IntakeSettings>>,
    watch: watch::SpoolWatch,
    /// How long after its last write a drop that does not read as an
    /// archive is left to settle before it is rejected.
    settle: Duration,
}

/// A file copied into the spool (not renamed in) is read while it is
/// still written; it reads as a broken archive until it is whole.
const SETTLE: Duration = Duration::from_secs(2);

impl Ingestor {
    pub fn new(
        config: &TxConfig,
        store: Arc<ObjectStore>,
        queue: Sender<ImageRecord>,
        status: StatusBoard,
    ) -> anyhow::Result<Ingestor> {
        use anyhow::Context;
        let spool = Spool::new(&config.spool_dir)
            .with_context(|| format!("creating spool_dir {}", config.spool_dir.display()))?;
        let rules = match &config.policy.rules_file {
            Some(p) => Some(Rules::load(p)?),
            None => None,
        };
        Ok(Ingestor {
            spool,
            store,
            rules,
            mappings: config.mapping.clone(),
            referrers: config.policy.referrers,
            compression: LayerCompression {
                kind: config.ingest.compression,
                level: config.ingest.gzip_level,
            },
            poll: Duration::from_millis(config.ingest.poll_interval_ms),
            queue,
            status,
            retry_at: HashMap::new(),
            disk: StateDisk::new(&config.state_dir, config.state_min_free_mb, Intake::Spool),
            faults: Arc::new(Faults::default()),
            settings: None,
            watch: watch::SpoolWatch::new(&config.spool_dir),
            settle: SETTLE,
        })
    }

    /// How long a drop that does not read as an archive must have gone
    /// unwritten before it is rejected (2 s unless set).
    pub fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
    }

    /// Takes the rules and mappings a reload sets, from the next drop on.
    pub fn with_settings(mut self, settings: ReloadReader<IntakeSettings>) -> Self {
        self.settings = Some(settings);
        self
    }

    fn pick_up_settings(&mut self) {
        if let Some(new) = self.settings.as_mut().and_then(|s| s.changed()) {
            self.rules.clone_from(&new.rules);
            self.mappings.clone_from(&new.mappings);
            self.referrers = new.referrers;
            tracing::info!(
                rules = new.rules.is_some(),
                mappings = new.mappings.len(),
                "file drops are judged by the reloaded rules and mappings"
            );
        }
    }

    /// Raises the state disk fault on `faults` (shared with the LEDs and
    /// the console) instead of a private set.
    pub fn with_faults(mut self, faults: Arc<Faults>) -> Self {
        self.faults = faults;
        self
    }

    /// Whether intake may go on; raises or clears the state disk fault.
    fn disk_has_room(&mut self) -> bool {
        match self.disk.check() {
            Ok(()) => {
                if self.faults.is_raised(Fault::StateDiskFull) {
                    tracing::info!(state_dir = %self.disk.dir().display(), "state disk has room again; intake resumes");
                    self.faults.clear(Fault::StateDiskFull);
                }
                true
            }
            Err(full) => {
                if !self.faults.is_raised(Fault::StateDiskFull) {
                    tracing::error!(reason = %full, "intake stopped; drops wait in the spool");
                }
                self.faults.raise(Fault::StateDiskFull, full.to_string());
                false
            }
        }
    }

    /// Takes drops from the spool until shutdown.
    pub fn run(mut self, shutdown: &Shutdown) -> anyhow::Result<()> {
        tracing::info!(spool = %self.spool.dir.display(), "watching the spool directory");
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            if let Err(e) = self.poll_once(shutdown) {
                tracing::error!(error = %e, spool = %self.spool.dir.display(), "listing the spool failed");
            }
            // A drop renamed into place wakes intake at once; the listing
            // every `poll` catches anything the watch could not tell.
            if self.watch.wait(self.poll, shutdown) {
                return Ok(());
            }
        }
    }

    /// Processes every eligible drop once; returns the outcomes.
    pub fn poll_once(
        &mut self,
        shutdown: &Shutdown,
    ) -> std::io::Result<Vec<(PathBuf, DropOutcome)>> {
        let mut outcomes = Vec::new();
        self.pick_up_settings();
        if !self.disk_has_room() {
            return Ok(outcomes);
        }
        for path in self.spool.eligible()? {
            if shutdown.is_triggered() {
                break;
            }
            if self
                .retry_at
                .get(&path)
                .is_some_and(|t| Instant::now() < *t)
            {
                continue;
            }
            self.status.ingest(|s| s.current = Some(file_name(&path)));
            let result = self.ingest_file(&path, shutdown);
            self.status.ingest(|s| s.current = None);
            match result {
                Ok(outcome) => {
                    self.retry_at.remove(&path);
                    self.status
                        .ingest(|s| s.record(&file_name(&path), &outcome));
                    outcomes.push((path, outcome));
                }
                Err(e) if is_disk_full(&e) => {
                    let full = self.disk.out_of_space();
                    tracing::error!(file = %path.display(), error = %e, reason = %full,
                        "state disk short of room while ingesting (reason says bytes or inodes); the drop stays in the spool until it has room again");
                    self.faults.raise(Fault::StateDiskFull, full.to_string());
                    break;
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e,
                        "ingest failed on this side; the drop stays and is retried");
                    self.retry_at.insert(path, Instant::now() + RETRY_AFTER);
                }
            }
        }
        Ok(outcomes)
    }

    /// Ingests one drop. Errors are failures on this side only; anything
    /// wrong with the drop is an outcome. A shutdown mid-way leaves the drop
    /// in the spool ([`DropOutcome::Interrupted`]).
    pub fn ingest_file(
        &mut self,
        path: &Path,
        shutdown: &Shutdown,
    ) -> Result<DropOutcome, StoreError> {
        let source = file_name(path);
        let meta = std::fs::metadata(path).map_err(|e| StoreError::Io {
            what: "inspecting drop",
            path: path.to_path_buf(),
            source: e,
        })?;
        let modified_ns = modified_ns(&meta);
        if let Some(rec) = self.store.drop_record(&source)? {
            if rec.size == meta.len() && rec.modified_ns == modified_ns {
                let Some((code, message)) = rec.refused else {
                    tracing::info!(file = %source, "drop was committed before a restart; finishing its move");
                    self.finish(path, &self.spool.done.clone(), None)?;
                    self.store.forget_drop(&source)?;
                    return Ok(DropOutcome::Finished);
                };
                // Its verdict stands: judged again, its scan report might
                // be gone already.
                let code = ReasonCode::parse(&code).unwrap_or(ReasonCode::BadArchive);
                tracing::info!(file = %source, code = %code,
                    "drop was refused before a restart; finishing its move");
                let refusal = Refusal::new(code, message);
                let to = if code == ReasonCode::AlreadySent {
                    self.spool.done.clone()
                } else {
                    self.spool.rejected.clone()
                };
                self.finish(path, &to, Some(&refusal))?;
                self.store.forget_drop(&source)?;
                return Ok(if code == ReasonCode::AlreadySent {
                    DropOutcome::AlreadySent(refusal.message)
                } else {
                    DropOutcome::Rejected(refusal)
                });
            }
            self.store.forget_drop(&source)?;
        }
        tracing::info!(file = %source, bytes = meta.len(), "ingesting drop");
        match self.accept(path, &source, meta.len(), modified_ns, shutdown) {
            Ok(outcome) => Ok(outcome),
            Err(DropError::Store(e)) => Err(e),
            Err(DropError::Interrupted) => {
                tracing::info!(file = %source, "ingest interrupted by shutdown; the drop stays in the spool");
                Ok(DropOutcome::Interrupted)
            }
            Err(e @ (DropError::Archive(_) | DropError::Corrupt(_)))
                if changing(path, &meta, self.settle) =>
            {
                tracing::warn!(file = %source, error = %e,
                    "drop does not read as an archive and was written moments ago (still being \
                     copied? rename finished archives into the spool); it is read again once it \
                     stops changing");
                Ok(DropOutcome::StillChanging)
            }
            Err(DropError::Archive(e)) => self.reject(
                path,
                &source,
                Refusal::new(ReasonCode::BadArchive, e.to_string()),
            ),
            Err(DropError::Corrupt(m)) => {
                self.reject(path, &source, Refusal::new(ReasonCode::CorruptArchive, m))
            }
        }
    }

    fn accept(
        &mut self,
        path: &Path,
        source: &str,
        size: u64,
        modified_ns: u64,
        shutdown: &Shutdown,
    ) -> Result<DropOutcome, DropError> {
        let index = TarIndex::open(path)?;
        let plans = formats::plan(&index)?;
        let report = ReportState::for_drop(&Spool::report_path(path));

        // References and policy, before a byte of blob is written.
        let mut decided = Vec::with_capacity(plans.len());
        for plan in &plans {
            let mut refs = Vec::new();
            for r in &plan.references {
                match ImageRef::parse(r) {
                    Ok(x) => {
                        // A mapping can lengthen a name past what registries take.
                        let dest = x.mapped(&self.mappings);
                        if let Err(e) = weir_proto::check_repository(&dest.repository) {
                            return self.refuse(
                                path,
                                source,
                                ReasonCode::NoReference,
                                format!("reference {r:?} maps to an unusable destination: {e}"),
                            );
                        }
                        // The receiver writes these tags for the image they
                        // name and refuses an image under one.
                        if x.tag.as_deref().is_some_and(is_attachment_tag) {
                            return self.refuse(
                                path,
                                source,
                                ReasonCode::NoReference,
                                format!(
                                    "reference {r:?} has the form of a signature or referrers \
                                     tag, which is not an image's"
                                ),
                            );
                        }
                        refs.push((r.clone(), x))
                    }
                    Err(e) => {
                        return self.refuse(path, source, ReasonCode::NoReference, e.to_string())
                    }
                }
            }
            if self.referrers == ReferrersMode::Require && plan.referrers.is_empty() {
                return self.refuse(
                    path,
                    source,
                    ReasonCode::ReferrersMissing,
                    format!(
                        "image {} has no signature, attestation or SBOM in the drop, and [policy] referrers = \"require\"",
                        plan.config_digests.join(", ")
                    ),
                );
            }
            if refs.is_empty() {
                return self.refuse(
                    path,
                    source,
                    ReasonCode::NoReference,
                    format!(
                        "image {} carries no usable reference (RepoTags or {})",
                        plan.config_digests.join(", "),
                        "org.opencontainers.image.ref.name"
                    ),
                );
            }
            // Every reference must pass; the first one's verdict travels.
            let mut verdicts = Vec::with_capacity(refs.len());
            for (_, r) in &refs {
                let name = r.name();
                let subject = Subject {
                    name: &name,
                    namespace: r.namespace(),
                    config_digests: &plan.config_digests,
                    signatures: &plan.signatures,
                };
                match decide(self.rules.as_ref(), &subject, &report) {
                    Ok(v) => verdicts.push(v),
                    Err(refusal) => return Ok(self.reject(path, source, refusal)?),
                }
            }
            decided.push((plan, refs, verdicts.swap_remove(0)));
        }

        // Blobs into the store; then one image object per destination repository.
        let ingested_at = unix_now();
        let mut new_images = Vec::new();
        let mut all_refs = Vec::new();
        let mut digests = Vec::new();
        for (plan, refs, verdict) in decided {
            let carry = self.referrers != ReferrersMode::Drop;
            let stored =
                formats::store_image(shutdown, &index, &self.store, self.compression, plan, carry)?;
            digests.push(stored.manifest.digest.clone());
            let mut by_repo: BTreeMap<String, (Vec<String>, String)> = BTreeMap::new();
            for (raw, r) in &refs {
                let dest = r.mapped(&self.mappings);
                let e = by_repo
                    .entry(dest.repository.clone())
                    .or_insert_with(|| (Vec::new(), raw.clone()));
                if let Some(t) = dest.tag {
                    if !e.0.contains(&t) {
                        e.0.push(t);
                    }
                }
            }
            for (repository, (tags, raw)) in by_repo {
                let references: Vec<String> = if tags.is_empty() {
                    vec![repository.clone()]
                } else {
                    tags.iter().map(|t| format!("{repository}:{t}")).collect()
                };
                all_refs.extend(references.iter().cloned());
                let mut fresh = false;
                for r in &references {
                    if self.store.sent(&stored.manifest.digest, r)?.is_none() {
                        fresh = true;
                    }
                }
                if !fresh {
                    tracing::info!(file = %source, digest = %stored.manifest.digest, destination = %references.join(", "),
                        "image already sent to this destination; not queued again");
                    continue;
                }
                new_images.push(AcceptedImage {
                    destination: Destination {
                        repository: repository.clone(),
                        tags,
                    },
                    manifest: stored.manifest.clone(),
                    children: stored.children.clone(),
                    blobs: stored.blobs.clone(),
                    referrers: stored.referrers.clone(),
                    origin: Origin {
                        source: source.to_string(),
                        source_reference: Some(raw),
                        ingested_at,
                    },
                    verdict: verdict.clone(),
                    references,
                });
            }
        }

        if new_images.is_empty() {
            let message = format!(
                "every image in this drop ({}) was already sent as {}",
                all_refs.join(", "),
                digests.join(", ")
            );
            let reason = Refusal::new(ReasonCode::AlreadySent, message.clone());
            self.record_refusal(
                path,
                source,
                &reason,
                AuditEntry {
                    at: ingested_at,
                    source: source.to_string(),
                    outcome: "already-sent".into(),
                    code: Some(ReasonCode::AlreadySent.as_str().into()),
                    message: message.clone(),
                    references: all_refs,
                    manifest_digests: digests,
                },
            )?;
            self.finish(path, &self.spool.done.clone(), Some(&reason))?;
            self.store.forget_drop(source)?;
            return Ok(DropOutcome::AlreadySent(message));
        }

        let message = new_images
            .iter()
            .map(|i| format!("{} as {}", i.destination.display(), i.manifest.digest))
            .collect::<Vec<_>>()
            .join("; ");
        let new_images = self.store.commit_drop(&DropCommit {
            source: source.to_string(),
            // Its images are named by the commit, once their objects exist.
            drop: Some(DropRecord {
                size,
                modified_ns,
                images: Vec::new(),
                refused: None,
            }),
            images: new_images,
            audit: AuditEntry {
                at: ingested_at,
                source: source.to_string(),
                outcome: "accepted".into(),
                code: None,
                message,
                references: all_refs,
                manifest_digests: digests,
            },
        })?;
        for img in &new_images {
            tracing::info!(file = %source, digest = %img.manifest_digest, image = %img.image,
                destination = %img.destination, blobs = img.blobs.len(),
                bytes = img.blobs.iter().map(|b| b.size).sum::<u64>(), "image accepted and queued");
            // The carousel also reads the queue at start; a closed channel
            // only means it is stopping.
            let _ = self.queue.send(img.clone());
        }
        self.finish(path, &self.spool.done.clone(), None)?;
        self.store.forget_drop(source)?;
        Ok(DropOutcome::Accepted(new_images))
    }

    fn refuse(
        &mut self,
        path: &Path,
        source: &str,
        code: ReasonCode,
        message: String,
    ) -> Result<DropOutcome, DropError> {
        Ok(self.reject(path, source, Refusal::new(code, message))?)
    }

    fn reject(
        &mut self,
        path: &Path,
        source: &str,
        refusal: Refusal,
    ) -> Result<DropOutcome, StoreError> {
        tracing::warn!(file = %source, code = %refusal.code, reason = %refusal.message, "drop rejected");
        self.record_refusal(
            path,
            source,
            &refusal,
            AuditEntry {
                at: unix_now(),
                source: source.to_string(),
                outcome: "rejected".into(),
                code: Some(refusal.code.as_str().into()),
                message: refusal.message.clone(),
                references: Vec::new(),
                manifest_digests: Vec::new(),
            },
        )?;
        self.finish(path, &self.spool.rejected.clone(), Some(&refusal))?;
        self.store.forget_drop(source)?;
        Ok(DropOutcome::Rejected(refusal))
    }

    /// Records the verdict on the drop as it is now (size and modification
    /// time) with its audit entry, before anything moves: the audit entry
    /// is written once, and a restart finishes the same verdict.
    fn record_refusal(
        &self,
        path: &Path,
        source: &str,
        refusal: &Refusal,
        audit: AuditEntry,
    ) -> Result<(), StoreError> {
        let meta = std::fs::metadata(path).map_err(|e| StoreError::Io {
            what: "inspecting drop",
            path: path.to_path_buf(),
            source: e,
        })?;
        let record = DropRecord {
            size: meta.len(),
            modified_ns: modified_ns(&meta),
            images: Vec::new(),
            refused: Some((refusal.code.as_str().to_string(), refusal.message.clone())),
        };
        self.store.record_refusal(source, &record, &audit)
    }

    /// Moves the drop (and its scan report) into `dest_dir`, with a reason
    /// file when there is a reason, written before the move.
    fn finish(
        &self,
        path: &Path,
        dest_dir: &Path,
        reason: Option<&Refusal>,
    ) -> Result<(), StoreError> {
        let io = |what, p: &Path| {
            let p = p.to_path_buf();
            move |source| StoreError::Io {
                what,
                path: p,
                source,
            }
        };
        let name = unique_name(dest_dir, &kept_name(&file_name(path)));
        let target = dest_dir.join(&name);
        if let Some(r) = reason {
            let body = serde_json::json!({
                "code": r.code.as_str(),
                "message": r.message,
                "source": file_name(path),
                "at": unix_now(),
            });
            let reason_path = dest_dir.join(format!("{name}.reason.json"));
            weir_host::durable::write_atomically(&reason_path, body.to_string().as_bytes())
                .map_err(io("writing reason file", &reason_path))?;
        }
        let report = Spool::report_path(path);
        if report.exists() {
            let report_target = dest_dir.join(format!("{name}.scan.json"));
            std::fs::rename(&report, &report_target).map_err(io("moving scan report", &report))?;
        }
        std::fs::rename(path, &target).map_err(io("moving drop", path))?;
        for dir in [dest_dir, &self.spool.dir] {
            fsync_dir(dir).map_err(io("syncing directory", dir))?;
        }
        weir_host::crash::crash_point("tx.spool.moved");
        Ok(())
    }
}

/// A drop's modification time in ns since the epoch (0 if unknown): with
/// its size, what tells a restart it is the drop a record speaks of.
fn modified_ns(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Whether the file at `path` changed since `before` was taken, or was
/// last written less than `settle` ago.
fn changing(path: &Path, before: &std::fs::Metadata, settle: Duration) -> bool {
    std::fs::metadata(path).is_ok_and(|now| {
        let modified = now.modified().ok();
        now.len() != before.len()
            || modified != before.modified().ok()
            || modified
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age < settle)
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Longest name a drop keeps in done/ and rejected/: room is left for
/// `.N`, `.reason.json` and the temporary file written before it, within
/// the 255 bytes a file name may have.
const KEPT_NAME_BYTES: usize = 200;

/// The drop's name as moved, cut on a character boundary when longer than
/// [`KEPT_NAME_BYTES`] (the reason file keeps the whole name as `source`).
fn kept_name(name: &str) -> String {
    weir_proto::names::cut_to(name, KEPT_NAME_BYTES).to_string()
}

/// `name`, or `name.1`, `name.2`... if a drop of that name was moved before.
fn unique_name(dir: &Path, name: &str) -> String {
    if !dir.join(name).exists() {
        return name.to_string();
    }
    (1u32..)
        .map(|i| format!("{name}.{i}"))
        .find(|n| !dir.join(n).exists())
        .unwrap_or_else(|| name.to_string())
}
