//! Delivery: complete images to the destination registry and/or an OCI
//! layout directory, from a durable queue with retries.
//!
//! A registry that is down or answers 5xx is retried with exponential
//! backoff capped at `retry_max_seconds`, for as long as it takes and across
//! restarts; a 4xx (authentication, quota, refused name) is logged with the
//! registry's reason and retried every `retry_refused_seconds`. Nothing is
//! dropped. Tags are recorded one by one as the registry takes them, and an
//! attempt resumed after a crash first asks whether a tag is already set, so
//! each tag is put once.

pub mod layout;
pub mod notify;
pub mod queue;
pub mod registry;
pub mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use weir_host::signatures::{self, TrustedKeys};
use weir_proto::{Attachment, ObjectId, TransferManifest};

pub use layout::LayoutExporter;
pub use notify::{Notice, Notifier};
pub use queue::{DeliveryJob, DeliveryQueue, FailureKind, JobState, Target};
pub use registry::RegistryPusher;
pub use stats::{DeliveryStats, TargetStats};

use crate::blobs::BlobStore;
use crate::config::RxConfig;
use crate::state::{now_ms, StateError};
use crate::status::Counters;

/// Blobs of one image pushed at once.
const PARALLEL_BLOB_PUSHES: usize = 4;

/// A failed delivery attempt and the schedule it calls for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    pub kind: FailureKind,
    pub message: String,
}

impl DeliveryError {
    /// A problem on this side (configuration, store): someone must act, so
    /// it is retried on the slow schedule.
    pub fn local(message: impl Into<String>) -> Self {
        DeliveryError {
            kind: FailureKind::Refused,
            message: message.into(),
        }
    }
}

/// Delivered jobs are kept this long (for status and history), then forgotten.
const KEEP_DONE_MS: u64 = 7 * 24 * 3600 * 1000;
const PRUNE_EVERY_MS: u64 = 3600 * 1000;

/// The targets a configuration delivers to.
pub fn targets(config: &RxConfig) -> Vec<Target> {
    let mut out = Vec::new();
    if config.delivery.registry_url.is_some() {
        out.push(Target::Registry);
    }
    if config.layout_dir().is_some() {
        out.push(Target::OciLayout);
    }
    out
}

/// The webhook `notify` names, started (inside the tokio runtime).
fn webhook(notify: &crate::config::NotifyConfig) -> Result<Option<Notifier>, DeliveryError> {
    match &notify.webhook_url {
        Some(url) => Notifier::start(url.clone(), Duration::from_secs(notify.timeout_seconds))
            .map(Some)
            .map_err(|e| DeliveryError::local(format!("notify.webhook_url: {e}"))),
        None => Ok(None),
    }
}

/// What one successful delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliverySummary {
    pub blobs_uploaded: usize,
    pub blobs_present: usize,
}

/// Works the queue.
pub struct Delivery {
    queue: DeliveryQueue,
    store: BlobStore,
    registry: Option<RegistryPusher>,
    layout: Option<Arc<LayoutExporter>>,
    /// Replaced when a reload changes `[notify]`.
    notifier: std::sync::Mutex<Option<Notifier>>,
    retry_max_ms: u64,
    retry_refused_ms: u64,
    /// `[delivery] verify_signatures`: an image is pushed only if one of
    /// its cosign signatures verifies under these keys. Replaced on reload.
    signature_keys: std::sync::Mutex<Option<TrustedKeys>>,
    counters: Arc<Counters>,
    stats: Arc<DeliveryStats>,
}

impl Delivery {
    /// Builds the targets the configuration names. Must run inside the
    /// tokio runtime when a webhook is configured (it starts its task).
    pub fn from_config(
        config: &RxConfig,
        queue: DeliveryQueue,
        store: BlobStore,
        counters: Arc<Counters>,
    ) -> Result<Delivery, DeliveryError> {
        let cfg_err = |e: crate::config::ConfigError| DeliveryError::local(e.to_string());
        let registry = match config.registry_endpoint().map_err(cfg_err)? {
            Some(endpoint) => Some(RegistryPusher::new(
                &endpoint,
                config.registry_credentials().map_err(cfg_err)?.as_ref(),
                config.delivery.ca_file.as_deref(),
            )?),
            None => None,
        };
        let notifier = webhook(&config.notify)?;
        let signature_keys = config.signature_keys().map_err(cfg_err)?;
        Ok(Delivery {
            queue,
            store,
            registry,
            layout: config
                .layout_dir()
                .map(|d| Arc::new(LayoutExporter::new(&d))),
            notifier: std::sync::Mutex::new(notifier),
            retry_max_ms: config.delivery.retry_max_seconds * 1000,
            retry_refused_ms: config.delivery.retry_refused_seconds * 1000,
            signature_keys: std::sync::Mutex::new(signature_keys),
            counters,
            stats: Arc::new(DeliveryStats::default()),
        })
    }

    pub fn queue(&self) -> &DeliveryQueue {
        &self.queue
    }

    /// Attempts, failures and push durations per target since start.
    pub fn stats(&self) -> Arc<DeliveryStats> {
        self.stats.clone()
    }

    /// Posts to the webhook `notify` names from now on (none: no posts).
    /// Must run inside the tokio runtime (the new webhook starts its task);
    /// the old webhook's task ends once its queue is drained.
    pub fn set_webhook(&self, notify: &crate::config::NotifyConfig) -> Result<(), DeliveryError> {
        let notifier = webhook(notify)?;
        *self.notifier.lock().unwrap_or_else(|e| e.into_inner()) = notifier;
        Ok(())
    }

    /// Checks signatures under `keys` from the next attempt on (None: no
    /// check).
    pub fn set_signature_keys(&self, keys: Option<TrustedKeys>) {
        *self
            .signature_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = keys;
    }

    /// Runs until `stop` turns true; `wake` is notified when jobs are added.
    /// A push in flight at stop is abandoned and resumed after restart.
    pub async fn run(&self, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let mut last_prune = 0u64;
        loop {
            if *stop.borrow() {
                return;
            }
            if now_ms().saturating_sub(last_prune) >= PRUNE_EVERY_MS {
                match self.queue.prune_done(now_ms().saturating_sub(KEEP_DONE_MS)) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "forgot deliveries finished over a week ago"),
                    Err(e) => tracing::warn!(error = %e, "pruning old deliveries failed"),
                }
                last_prune = now_ms();
            }
            let next = match self.run_due(&mut stop).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, "delivery queue unreadable; trying again in 5 s");
                    Some(now_ms() + 5_000)
                }
            };
            // Wake at least every minute: a clock jump must not stall the queue.
            let wait = next
                .map(|t| t.saturating_sub(now_ms()))
                .unwrap_or(60_000)
                .min(60_000);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = wake.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Attempts every job that is due; returns when the next one falls due.
    pub async fn run_due(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<u64>, StateError> {
        loop {
            if *stop.borrow() {
                return Ok(None);
            }
            let pending = self.queue.pending()?;
            let now = now_ms();
            let Some(job) = pending.iter().find(|j| j.next_attempt_ms <= now).cloned() else {
                return Ok(pending.iter().map(|j| j.next_attempt_ms).min());
            };
            self.attempt(job, stop).await?;
        }
    }

    /// One attempt at one job, its outcome recorded durably.
    pub async fn attempt(
        &self,
        mut job: DeliveryJob,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), StateError> {
        job.attempts += 1;
        self.queue.save(&job)?;
        self.stats.attempt_started(job.target);
        let started = Instant::now();
        let outcome = tokio::select! {
            r = self.deliver(&mut job) => r,
            _ = stop.wait_for(|s| *s) => {
                tracing::info!(digest = %job.manifest_digest, reference = %job.reference(),
                    "delivery interrupted by shutdown; resumes after restart");
                return Ok(());
            }
        };
        let now = now_ms();
        let seconds = now.saturating_sub(job.first_frame_ms) as f64 / 1000.0;
        match outcome {
            Ok(summary) => {
                // Counted before the job is saved done: whoever reads the
                // queue (status, metrics) and sees it done sees its push
                // counted too.
                Counters::add(&self.counters.pushes_done, 1);
                self.stats.delivered(job.target, started.elapsed());
                job.state = JobState::Done;
                job.done_ms = Some(now);
                job.failure = None;
                job.last_error = None;
                self.queue.save(&job)?;
                tracing::info!(
                    digest = %job.manifest_digest, image = %job.image, reference = %job.reference(),
                    target = job.target.name(), blobs_uploaded = summary.blobs_uploaded,
                    blobs_present = summary.blobs_present, seconds_from_first_frame = seconds,
                    "image delivered"
                );
                self.notify(&job, "delivered", seconds, None);
            }
            Err(e) => {
                job.failures += 1;
                let delay = match e.kind {
                    FailureKind::Unavailable => {
                        let exp = (job.failures - 1).min(20);
                        (1000u64 << exp).min(self.retry_max_ms)
                    }
                    FailureKind::Refused | FailureKind::Unverified => self.retry_refused_ms,
                };
                job.next_attempt_ms = now + delay;
                let newly_failing = job.failure != Some(e.kind);
                job.failure = Some(e.kind);
                job.last_error = Some(e.message.clone());
                // As for a success: counted before the queue shows it.
                Counters::add(&self.counters.push_attempts_failed, 1);
                self.stats.attempt_failed(job.target);
                self.queue.save(&job)?;
                match e.kind {
                    FailureKind::Unavailable => tracing::warn!(
                        digest = %job.manifest_digest, reference = %job.reference(),
                        target = job.target.name(), attempts = job.attempts,
                        retry_in_s = delay / 1000, error = %e.message,
                        "delivery failed: target unavailable; will retry"
                    ),
                    FailureKind::Refused => tracing::error!(
                        digest = %job.manifest_digest, reference = %job.reference(),
                        target = job.target.name(), attempts = job.attempts,
                        retry_in_s = delay / 1000, reason = %e.message,
                        "delivery refused; will retry on the slow schedule"
                    ),
                    FailureKind::Unverified => tracing::error!(
                        digest = %job.manifest_digest, reference = %job.reference(),
                        target = job.target.name(), attempts = job.attempts,
                        retry_in_s = delay / 1000, reason = %e.message,
                        "image not pushed: its signature does not pass [delivery] verify_signatures; kept"
                    ),
                }
                if newly_failing {
                    let event = match e.kind {
                        FailureKind::Unverified => "refused",
                        _ => "failing",
                    };
                    self.notify(&job, event, seconds, Some(e.message));
                }
            }
        }
        Ok(())
    }

    /// The webhook's queue, if one is configured.
    pub fn notifier(&self) -> Option<Notifier> {
        self.notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn notify(&self, job: &DeliveryJob, event: &str, seconds: f64, error: Option<String>) {
        let notifier = self
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(n) = notifier else { return };
        let text = match &error {
            None => format!(
                "weir: {} delivered to {} ({}) {:.0}s after its first frame",
                job.reference(),
                job.target.name(),
                job.manifest_digest,
                seconds
            ),
            Some(err) => format!(
                "weir: delivering {} to {} is failing ({}): {err}",
                job.reference(),
                job.target.name(),
                job.manifest_digest
            ),
        };
        n.send(Notice {
            text,
            event: event.to_string(),
            reference: job.reference(),
            digest: job.manifest_digest.clone(),
            target: job.target.name().to_string(),
            seconds_from_first_frame: seconds,
            error,
            missing: None,
        });
    }

    async fn deliver(&self, job: &mut DeliveryJob) -> Result<DeliverySummary, DeliveryError> {
        let image = job.image_id().ok_or_else(|| {
            DeliveryError::local(format!("job names no image id: {:?}", job.image))
        })?;
        let tm = self.load_manifest(&image)?;
        let keys = self
            .signature_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(keys) = &keys {
            self.check_signature(&tm, keys)?;
        }
        match job.target {
            Target::Registry => self.push_to_registry(job, &tm).await,
            Target::OciLayout => {
                let layout = self
                    .layout
                    .clone()
                    .ok_or_else(|| DeliveryError::local("no oci_layout directory configured"))?;
                let store = self.store.clone();
                let repository = job.repository.clone();
                let tags = job.tags.clone();
                let blobs = tm.blobs.len();
                tokio::task::spawn_blocking(move || layout.export(&tm, &repository, &tags, &store))
                    .await
                    .map_err(|e| DeliveryError::local(format!("layout export task: {e}")))??;
                // The layout names the image; the job does not say so yet.
                weir_host::crash::crash_point("rx.layout.exported");
                job.tags_done = job.tags.clone();
                Ok(DeliverySummary {
                    blobs_uploaded: blobs,
                    blobs_present: 0,
                })
            }
        }
    }

    /// The receiver's own signature check: a sender holding the link key
    /// still cannot get an unsigned image pushed. The payloads are read
    /// from the blob store, where they arrived as blobs of the image.
    fn check_signature(
        &self,
        tm: &TransferManifest,
        keys: &TrustedKeys,
    ) -> Result<(), DeliveryError> {
        let digest = &tm.manifest.digest;
        let layers = signatures::signature_layers(digest, &tm.referrers);
        let payloads: Vec<Result<Vec<u8>, String>> = layers
            .iter()
            .map(|l| {
                let id = ObjectId::from_digest(&l.payload_digest).map_err(|e| e.to_string())?;
                match self.store.len_of(&id) {
                    Ok(n) if n > signatures::MAX_PAYLOAD_BYTES => Err(format!(
                        "payload of {n} bytes, more than {}",
                        signatures::MAX_PAYLOAD_BYTES
                    )),
                    Ok(_) => self.store.read_object(&id).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            })
            .collect();
        let found = signatures::check(digest, &layers, &payloads, keys);
        match found.reason_code() {
            None => {
                tracing::info!(digest = %digest, signature = %found.describe(digest),
                    "signature verified before the push");
                Ok(())
            }
            Some(code) => Err(DeliveryError {
                kind: FailureKind::Unverified,
                message: format!("{code}: {}", found.describe(digest)),
            }),
        }
    }

    fn load_manifest(&self, image: &ObjectId) -> Result<TransferManifest, DeliveryError> {
        let bytes = self
            .store
            .read_object(image)
            .map_err(|e| DeliveryError::local(format!("image object {}: {e}", image.digest())))?;
        let tm = TransferManifest::from_object_bytes(&bytes)
            .map_err(|e| DeliveryError::local(format!("image object {}: {e}", image.digest())))?;
        for m in tm.children.iter().chain(std::iter::once(&tm.manifest)) {
            if ObjectId::from_digest(&m.digest).ok() != Some(ObjectId::of_bytes(&m.bytes)) {
                return Err(DeliveryError::local(format!(
                    "image object {}: manifest bytes do not hash to {}",
                    image.digest(),
                    m.digest
                )));
            }
        }
        Ok(tm)
    }

    async fn push_to_registry(
        &self,
        job: &mut DeliveryJob,
        tm: &TransferManifest,
    ) -> Result<DeliverySummary, DeliveryError> {
        let reg = self
            .registry
            .as_ref()
            .ok_or_else(|| DeliveryError::local("no registry_url configured"))?;
        let repo = job.repository.clone();
        let mut summary = DeliverySummary::default();
        // Blobs go up a few at a time: one stream rarely fills the link to
        // the registry. Manifests wait until every blob is in.
        for group in tm.blobs.chunks(PARALLEL_BLOB_PUSHES) {
            let pushes: Vec<_> = group
                .iter()
                .map(|blob| reg.ensure_blob(&repo, blob, &self.store))
                .collect();
            for uploaded in futures_util::future::try_join_all(pushes).await? {
                if uploaded {
                    summary.blobs_uploaded += 1;
                } else {
                    summary.blobs_present += 1;
                }
            }
        }
        for child in &tm.children {
            reg.put_manifest(&repo, child).await?;
        }
        if job.tags.is_empty() {
            reg.put_manifest(&repo, &tm.manifest).await?;
        }
        // An earlier attempt that started may have set tags the record
        // does not show (a crash between the registry's answer and our save).
        let resumed = job.attempts > 1;
        for tag in job.tags.clone() {
            if job.tags_done.contains(&tag) {
                continue;
            }
            if resumed && reg.tag_points_at(&repo, &tag, &tm.manifest.digest).await {
                tracing::info!(digest = %tm.manifest.digest, repository = %repo, tag = %tag,
                    "tag already set by an interrupted attempt");
            } else {
                reg.put_tag(&repo, &tag, &tm.manifest).await?;
            }
            // The registry holds the tag; the job does not say so yet.
            weir_host::crash::crash_point("rx.registry.tag-set");
            job.tags_done.push(tag);
            self.queue
                .save(job)
                .map_err(|e| DeliveryError::local(e.to_string()))?;
        }
        // Referrers after their subject: a registry may refuse a manifest
        // whose subject it does not hold, and a reader finds no signature
        // of an image that is not there yet. Every step is idempotent, so an
        // interrupted attempt simply does them again.
        for r in &tm.referrers {
            match &r.attachment {
                Attachment::Tag(tag) => reg.put_tag(&repo, tag, &r.manifest).await?,
                Attachment::Subject => {
                    reg.put_manifest(&repo, &r.manifest).await?;
                    let how = reg.ensure_referrer_listed(&repo, r).await?;
                    tracing::debug!(digest = %tm.manifest.digest, referrer = %r.manifest.digest,
                        listing = ?how, "referrer listed for its subject");
                }
            }
        }
        if !tm.referrers.is_empty() {
            tracing::info!(digest = %tm.manifest.digest, repository = %repo,
                referrers = tm.referrers.len(), "referrers pushed after their image");
        }
        Ok(summary)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::StateDb;
    use oci_client::client::{ClientConfig, ClientProtocol};
    use oci_client::secrets::RegistryAuth;
    use oci_client::{Client, Reference};
    use std::path::Path;
    use weir_test_support::{registry_or_skip, TestRegistry};

    /// A sample image (see `weir_test_support::sample_image`) with its blobs already in
    /// `store`. Returns it and its blobs' ids.
    pub(crate) fn sample_image(
        store: &BlobStore,
        repo: &str,
        tags: &[&str],
        layers: usize,
        size: usize,
    ) -> (TransferManifest, Vec<ObjectId>) {
        let img = weir_test_support::sample_image(repo, tags, layers, size);
        let ids = img
            .blobs
            .iter()
            .map(|b| store.insert_bytes(b).unwrap())
            .collect();
        (img.tm, ids)
    }

    /// A two-platform index with its blobs in `store`.
    pub(crate) fn sample_index(store: &BlobStore, repo: &str, tags: &[&str]) -> TransferManifest {
        let img = weir_test_support::sample_index(repo, tags);
        for b in &img.blobs {
            store.insert_bytes(b).unwrap();
        }
        img.tm
    }

    pub(crate) fn job_for(tm: &TransferManifest, image: &ObjectId, target: Target) -> DeliveryJob {
        let what = super::queue::JobFor {
            image: image.digest(),
            target,
            repository: &tm.destination.repository,
            tags: &tm.destination.tags,
            manifest_digest: &tm.manifest.digest,
            first_frame_ms: now_ms(),
        };
        DeliveryJob::pending(what, now_ms())
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        db: StateDb,
        store: BlobStore,
        counters: Arc<Counters>,
        root: std::path::PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let db = StateDb::open(&root.join("state/db")).unwrap();
        let store = BlobStore::open(&root.join("state/blobs")).unwrap();
        Fixture {
            _dir: dir,
            db,
            store,
            counters: Arc::new(Counters::default()),
            root,
        }
    }

    fn config_for(root: &Path, extra: &str) -> RxConfig {
        let text = format!(
            "state_dir = \"{}/state\"\n[link]\ntransport = \"udp\"\nudp_listen = \"127.0.0.1:0\"\n\
             [[auth.keys]]\nid = 1\nfile = \"/nonexistent\"\n{extra}",
            root.display()
        );
        // Not validated: the key file is not needed for delivery.
        RxConfig::parse(&text, Path::new("test.toml")).unwrap()
    }

    fn registry_config(root: &Path, reg: &TestRegistry, extra: &str) -> RxConfig {
        config_for(
            root,
            &format!(
                "[delivery]\nregistry_url = \"http://{}\"\nretry_max_seconds = 300\nretry_refused_seconds = 1800\n{extra}",
                reg.addr()
            ),
        )
    }

    fn enqueue(f: &Fixture, tm: &TransferManifest, target: Target) -> ObjectId {
        let image = f.store.insert_bytes(&tm.to_object_bytes()).unwrap();
        let q = DeliveryQueue::open(&f.db).unwrap();
        assert!(q.enqueue(&job_for(tm, &image, target)).unwrap());
        image
    }

    fn pull_client() -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            platform_resolver: None,
            ..Default::default()
        })
    }

    /// Asserts the registry serves the manifest bytes under each tag and
    /// every blob re-hashes to its digest.
    pub(crate) async fn assert_served(reg: &TestRegistry, repo: &str, tm: &TransferManifest) {
        let client = pull_client();
        let auth = RegistryAuth::Anonymous;
        for tag in &tm.destination.tags {
            let r = Reference::with_tag(reg.addr(), repo.into(), tag.clone());
            let (bytes, digest) = client
                .pull_manifest_raw(&r, &auth, &[tm.manifest.media_type.as_str()])
                .await
                .unwrap();
            assert_eq!(digest, tm.manifest.digest, "tag {tag}");
            assert_eq!(&bytes[..], &tm.manifest.bytes[..]);
        }
        for child in &tm.children {
            let r = Reference::with_digest(reg.addr(), repo.into(), child.digest.clone());
            let (bytes, digest) = client
                .pull_manifest_raw(&r, &auth, &[child.media_type.as_str()])
                .await
                .unwrap();
            assert_eq!(
                (digest.as_str(), &bytes[..]),
                (child.digest.as_str(), &child.bytes[..])
            );
        }
        for blob in &tm.blobs {
            let r = Reference::with_digest(reg.addr(), repo.into(), blob.digest.clone());
            let mut out = Vec::new();
            client
                .pull_blob(&r, blob.digest.as_str(), &mut out)
                .await
                .unwrap();
            assert_eq!(ObjectId::of_bytes(&out).digest(), blob.digest);
        }
    }

    fn no_stop() -> (watch::Sender<bool>, watch::Receiver<bool>) {
        watch::channel(false)
    }

    #[tokio::test]
    async fn push_serves_the_same_manifest_digest_and_shared_blobs_go_once() {
        let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
            return;
        };
        let f = fixture();
        let config = registry_config(&f.root, &reg, "");
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        let (a, _) = sample_image(&f.store, "team/app", &["1.0", "latest"], 2, 40_000);
        let (b, _) = sample_image(&f.store, "team/app", &["2.0"], 3, 40_000);
        let ia = enqueue(&f, &a, Target::Registry);
        let (_tx, mut stop) = no_stop();
        assert_eq!(d.run_due(&mut stop).await.unwrap(), None);
        let job = d.queue().get(Target::Registry, &ia).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done, "{:?}", job.last_error);
        assert_eq!(job.tags_done, vec!["1.0", "latest"]);
        assert_served(&reg, "team/app", &a).await;

        // b shares layers 0 and 1 with a (same seeds); its config and layer 2 are new.
        let ib = enqueue(&f, &b, Target::Registry);
        let job = d.queue().get(Target::Registry, &ib).unwrap().unwrap();
        let tm = d.load_manifest(&ib).unwrap();
        let mut job_mut = job.clone();
        let summary = d.deliver(&mut job_mut).await.unwrap();
        assert_eq!(
            summary,
            DeliverySummary {
                blobs_uploaded: b.blobs.len() - 2,
                blobs_present: 2
            }
        );
        assert_served(&reg, "team/app", &tm).await;
        assert_eq!(
            f.counters
                .pushes_done
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn multi_arch_index_is_pushed_children_first() {
        let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
            return;
        };
        let f = fixture();
        let config = registry_config(&f.root, &reg, "");
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        let tm = sample_index(&f.store, "team/multi", &["v1"]);
        let image = enqueue(&f, &tm, Target::Registry);
        let (_tx, mut stop) = no_stop();
        d.run_due(&mut stop).await.unwrap();
        let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done, "{:?}", job.last_error);
        assert_served(&reg, "team/multi", &tm).await;
    }

    #[tokio::test]
    async fn registry_down_then_up_gets_the_image() {
        let Some(mut reg) = registry_or_skip(&TestRegistry::default_options()) else {
            return;
        };
        reg.stop();
        let f = fixture();
        let config = registry_config(&f.root, &reg, "");
        let d = Arc::new(
            Delivery::from_config(
                &config,
                DeliveryQueue::open(&f.db).unwrap(),
                f.store.clone(),
                f.counters.clone(),
            )
            .unwrap(),
        );
        let (tm, _) = sample_image(&f.store, "team/app", &["1.0"], 2, 10_000);
        let image = enqueue(&f, &tm, Target::Registry);

        let (stop_tx, stop) = watch::channel(false);
        let wake = Arc::new(Notify::new());
        let runner = tokio::spawn({
            let d = d.clone();
            let wake = wake.clone();
            async move { d.run(wake, stop).await }
        });
        // Wait for two failed attempts: the backoff schedule in action.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
            if job.failures >= 2 {
                assert_eq!(job.failure, Some(FailureKind::Unavailable));
                assert!(job.last_error.is_some());
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no retries seen: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        reg.start();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
            if job.state == JobState::Done {
                assert_eq!(job.failure, None);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not delivered after the registry came back: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop_tx.send(true).unwrap();
        runner.await.unwrap();
        assert_served(&reg, "team/app", &tm).await;
        // Every attempt counted, the failed ones too; one push timed.
        let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        let stats = d.stats();
        let registry = stats.of(Target::Registry);
        assert_eq!(registry.attempts(), u64::from(job.attempts));
        assert_eq!(registry.failures(), u64::from(job.failures));
        assert!(registry.failures() >= 2);
        assert_eq!(registry.push_duration().count, 1);
        assert_eq!(stats.of(Target::OciLayout).attempts(), 0);
    }

    #[tokio::test]
    async fn refused_push_is_kept_and_retried_on_the_slow_schedule() {
        let mut opts = TestRegistry::default_options();
        opts.read_only = true;
        let Some(mut reg) = registry_or_skip(&opts) else {
            return;
        };
        let f = fixture();
        let config = registry_config(&f.root, &reg, "");
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        let (tm, _) = sample_image(&f.store, "team/app", &["1.0"], 1, 1000);
        let image = enqueue(&f, &tm, Target::Registry);
        let (_tx, mut stop) = no_stop();
        let before = now_ms();
        let next = d.run_due(&mut stop).await.unwrap().unwrap();
        let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        assert_eq!(job.state, JobState::Pending);
        assert_eq!(job.failure, Some(FailureKind::Refused));
        let reason = job.last_error.clone().unwrap();
        assert!(reason.contains("405"), "{reason}");
        // Slow schedule: retry_refused_seconds (1800 s), not the 1 s first backoff.
        assert!(
            next >= before + 1_800_000,
            "next attempt in {} ms",
            next - before
        );
        assert_eq!(d.queue().counts().unwrap(), (1, 1));

        // The operator fixes the registry; the next attempt delivers.
        reg.restart_with(|o| o.read_only = false);
        let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        d.attempt(job, &mut stop).await.unwrap();
        let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done, "{:?}", job.last_error);
        assert_served(&reg, "team/app", &tm).await;
    }

    #[tokio::test]
    async fn credentials_from_password_file_are_used_and_wrong_ones_refused() {
        let mut opts = TestRegistry::default_options();
        opts.htpasswd = Some((
            "mirror".into(),
            weir_test_support::RIGHT_PASSWORD_BCRYPT.into(),
        ));
        let Some(reg) = registry_or_skip(&opts) else {
            return;
        };
        let f = fixture();
        let pass = f.root.join("pass");
        let (tm, _) = sample_image(&f.store, "team/app", &["1.0"], 1, 1000);
        let image = enqueue(&f, &tm, Target::Registry);
        let (_tx, mut stop) = no_stop();

        std::fs::write(&pass, "wrong-password\n").unwrap();
        let extra = format!(
            "username = \"mirror\"\npassword_file = \"{}\"\n",
            pass.display()
        );
        let config = registry_config(&f.root, &reg, &extra);
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        d.run_due(&mut stop).await.unwrap();
        let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        assert_eq!(
            job.failure,
            Some(FailureKind::Refused),
            "{:?}",
            job.last_error
        );
        assert!(
            job.last_error.as_deref().unwrap_or("").contains("401"),
            "{:?}",
            job.last_error
        );

        std::fs::write(&pass, "right-password\n").unwrap();
        let config = registry_config(&f.root, &reg, &extra);
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        d.attempt(job, &mut stop).await.unwrap();
        let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done, "{:?}", job.last_error);
    }

    #[tokio::test]
    async fn resumed_attempt_does_not_put_a_tag_already_set() {
        let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
            return;
        };
        let f = fixture();
        let config = registry_config(&f.root, &reg, "");
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        let (tm, _) = sample_image(&f.store, "team/app", &["1.0"], 1, 1000);
        let image = enqueue(&f, &tm, Target::Registry);
        let (_tx, mut stop) = no_stop();
        d.run_due(&mut stop).await.unwrap();
        let puts_before = reg.manifest_puts("team/app", "1.0");
        assert_eq!(puts_before, 1);

        // A crash after the registry took the tag but before the record said
        // so: the job is pending again with an attempt already started.
        let mut job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        job.state = JobState::Pending;
        job.tags_done.clear();
        d.queue().save(&job).unwrap();
        d.run_due(&mut stop).await.unwrap();
        let job = d.queue().get(Target::Registry, &image).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done);
        assert_eq!(job.tags_done, vec!["1.0"]);
        assert_eq!(
            reg.manifest_puts("team/app", "1.0"),
            1,
            "the tag was put again"
        );
    }

    #[tokio::test]
    async fn an_unsigned_image_is_kept_refused_and_goes_once_the_check_allows_it() {
        let f = fixture();
        let key = f.root.join("cosign.pub");
        std::fs::write(
            &key,
            "-----BEGIN PUBLIC KEY-----\n\
             MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEvXgDDih1Jgpottp54XwdUdIZ+iA\n\
             0u1J5weQA4aAxKKym4QrKJ98oO2SXolrIXKtFKy2ELvaWtoJ26tUdxGsuw==\n\
             -----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let config = config_for(
            &f.root,
            &format!(
                "[delivery]\nverify_signatures = [{:?}]\n",
                key.display().to_string()
            ),
        );
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        let (tm, _) = sample_image(&f.store, "team/app", &["1.0"], 1, 1000);
        let image = enqueue(&f, &tm, Target::OciLayout);
        let (_tx, mut stop) = no_stop();
        d.run_due(&mut stop).await.unwrap();
        let job = d.queue().get(Target::OciLayout, &image).unwrap().unwrap();
        assert_eq!(job.view().state, crate::status::DeliveryState::Refused);
        let error = job.last_error.clone().unwrap_or_default();
        assert!(error.starts_with("signature-missing: "), "{error}");
        assert!(!f.root.join("out/index.json").exists(), "nothing exported");

        // Keys removed by a reload: the kept image goes at its next attempt.
        d.set_signature_keys(None);
        let mut job = job;
        job.next_attempt_ms = 0;
        d.queue().save(&job).unwrap();
        d.run_due(&mut stop).await.unwrap();
        let job = d.queue().get(Target::OciLayout, &image).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done, "{:?}", job.last_error);
    }

    #[tokio::test]
    async fn layout_delivery_without_registry_goes_to_the_default_directory() {
        let f = fixture();
        let config = config_for(&f.root, "");
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        assert_eq!(targets(&config), vec![Target::OciLayout]);
        let (tm, _) = sample_image(&f.store, "team/app", &["1.0"], 2, 1000);
        let image = enqueue(&f, &tm, Target::OciLayout);
        let (_tx, mut stop) = no_stop();
        d.run_due(&mut stop).await.unwrap();
        let job = d.queue().get(Target::OciLayout, &image).unwrap().unwrap();
        assert_eq!(job.state, JobState::Done, "{:?}", job.last_error);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(f.root.join("out/index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], tm.manifest.digest);
        assert_eq!(
            index["manifests"][0]["annotations"][layout::REF_NAME],
            "team/app:1.0"
        );
    }

    #[tokio::test]
    async fn webhook_hears_of_delivery_and_a_dead_webhook_delays_nothing() {
        use std::io::{BufRead, BufReader, Read};
        // A one-shot HTTP server that records one POST body.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let hook = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            use std::io::Write;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            body
        });
        let f = fixture();
        let config = config_for(
            &f.root,
            &format!("[notify]\nwebhook_url = \"http://{hook}/hook\"\n"),
        );
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        let (tm, _) = sample_image(&f.store, "team/app", &["1.0"], 1, 100);
        enqueue(&f, &tm, Target::OciLayout);
        let (_tx, mut stop) = no_stop();
        d.run_due(&mut stop).await.unwrap();
        let body = tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["event"], "delivered");
        assert_eq!(v["digest"], tm.manifest.digest);
        assert_eq!(v["reference"], "team/app:1.0");
        assert!(v["text"].as_str().unwrap().contains("team/app:1.0"));
        assert!(v["seconds_from_first_frame"].as_f64().is_some());

        // A webhook address nobody answers: the delivery still completes.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = config_for(
            &f.root,
            &format!("[notify]\nwebhook_url = \"http://{dead}/hook\"\n"),
        );
        let d = Delivery::from_config(
            &config,
            DeliveryQueue::open(&f.db).unwrap(),
            f.store.clone(),
            f.counters.clone(),
        )
        .unwrap();
        let (tm2, _) = sample_image(&f.store, "team/app", &["2.0"], 2, 100);
        let image2 = enqueue(&f, &tm2, Target::OciLayout);
        d.run_due(&mut stop).await.unwrap();
        assert_eq!(
            d.queue()
                .get(Target::OciLayout, &image2)
                .unwrap()
                .unwrap()
                .state,
            JobState::Done
        );
    }
}
