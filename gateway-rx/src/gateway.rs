//! Wires the stages together and runs them until shutdown.
//!
//! Threads: the link (receive + verify), the store (this thread: shard
//! batches and commits), the decoder (Reed-Solomon repair), the finisher
//! (sha256, blob store, image completion), the status writer, the LED
//! panel, the serial console (if configured), and a small tokio runtime
//! for delivery.
//!
//! A full state disk stops the store, not the gateway: while the disk of
//! state_dir holds less than `state_min_free_mb` (or after a write failed
//! for want of space, until space frees) verified frames are dropped and
//! counted, nothing is written, and the fault "state disk full" stands.
//! The bitmap never claimed a shard that is not on disk, so nothing is
//! corrupted, and later passes bring the dropped shards again.

use anyhow::Context;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use weir_host::{Console, Leds, Shutdown};
use weir_proto::{Codecs, ObjectId, ObjectKind};

use crate::appliance::{is_disk_full, CounterWindow, Fault, Faults, Lights, Movement, StateDisk};
use crate::blobs::{BlobStore, BlobStoreError, RunningDigest, RunningDigests};
use crate::config::RxConfig;
use crate::delivery::{Delivery, DeliveryQueue};
use crate::images::ImageLedger;
use crate::link::{self, Inbound};
use crate::shards::{self, DecodeJob, DigestJob, FinishJob, ShardStore, Work};
use crate::state::{now_ms, StateDb};
use crate::status::{Counters, ObjectProgress, SenderStatus, StatusReport};
use crate::verify::{SessionBook, Verifier};

/// Verified frame batches queued between the link and the store: about
/// 11 MiB of 1400-byte frames, enough to ride out an fsync.
const INBOUND_BATCHES: usize = 32;
/// Longest the store waits for frames before looking at its other work.
const STORE_POLL: Duration = Duration::from_millis(20);
/// How often the status file is written, and the counters logged.
const STATUS_EVERY: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the store looks at the state disk's free space.
const DISK_CHECK_EVERY: Duration = Duration::from_millis(250);
/// The link LED stays on while a frame was accepted this recently.
const LINK_WINDOW: Duration = Duration::from_secs(3);
/// The activity LED blinks while shards were stored (or images delivered)
/// this recently.
const ACTIVITY_WINDOW: Duration = Duration::from_secs(2);
/// Bad tags are counted over this window against `hmac_fault_threshold`.
const HMAC_WINDOW: Duration = Duration::from_secs(60);
/// Frames per second are measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// How often failing deliveries are looked up for the fault.
const DELIVERY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The link as the panel judged it last, for the report and the console.
#[derive(Debug, Clone, Copy, Default)]
struct LinkGauge {
    up: bool,
    frames_per_s: f64,
}

/// What the decoder and finisher report back to the store.
enum WorkResult {
    Decoded {
        object: ObjectId,
        generation: u64,
        block: u32,
        rebuilt: Result<Vec<u16>, String>,
    },
    Finished {
        object: ObjectId,
        generation: u64,
        outcome: FinishOutcome,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinishOutcome {
    Verified,
    Failed,
    Interrupted,
}

/// Directory layout under state_dir.
pub fn db_dir(config: &RxConfig) -> std::path::PathBuf {
    config.state_dir.join("db")
}
pub fn blobs_dir(config: &RxConfig) -> std::path::PathBuf {
    config.state_dir.join("blobs")
}
pub fn staging_dir(config: &RxConfig) -> std::path::PathBuf {
    config.state_dir.join("staging")
}

/// Runs the receiver until `shutdown` is triggered; returns with every
/// state change flushed. Blocking; owns its tokio runtime for delivery.
pub fn run(config: RxConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    let keys = config.key_ring()?;
    // Ids only: the console lists them, never the keys.
    let key_ids = keys.ids();
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state_dir {}", config.state_dir.display()))?;
    let db = StateDb::open(&db_dir(&config))?;
    let blobs = BlobStore::open(&blobs_dir(&config))?;
    let counters = Arc::new(Counters::default());
    let queue = DeliveryQueue::open(&db)?;
    let wake = Arc::new(Notify::new());
    let ledger = Arc::new(ImageLedger::open(
        &db,
        blobs.clone(),
        queue.clone(),
        &config,
        counters.clone(),
        Some(wake.clone()),
    )?);
    let resumed = ledger.recheck()?;
    if !resumed.is_empty() {
        tracing::info!(images = resumed.len(), "images completed at restart");
    }
    let complete = blobs.ids()?;
    let (mut store, initial_work) =
        ShardStore::open(&db, &staging_dir(&config), complete, counters.clone())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("rx-delivery")
        .enable_all()
        .build()
        .context("starting the delivery runtime")?;
    let delivery = {
        let _entered = runtime.enter();
        Arc::new(
            Delivery::from_config(&config, queue.clone(), blobs.clone(), counters.clone())
                .context("setting up delivery")?,
        )
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let delivery_task = runtime.spawn({
        let delivery = delivery.clone();
        let wake = wake.clone();
        async move { delivery.run(wake, stop_rx).await }
    });

    let (source, listening) = link::open_source(&config)?;
    tracing::info!(listening = %listening, state_dir = %config.state_dir.display(),
        targets = ?crate::delivery::targets(&config).iter().map(|t| t.name()).collect::<Vec<_>>(),
        "gateway-rx started");
    let verifier = Verifier::new(keys, Some(SessionBook::open(&db)?), counters.clone())?;
    let sender = Arc::new(Mutex::new(None::<SenderStatus>));
    let (inbound_tx, inbound_rx) = mpsc::sync_channel::<Vec<Inbound>>(INBOUND_BATCHES);
    let (result_tx, result_rx) = mpsc::channel::<WorkResult>();
    let (decode_tx, decode_rx) = mpsc::channel::<DecodeJob>();
    let (finish_tx, finish_rx) = mpsc::channel::<FinisherJob>();

    let link_thread = spawn("rx-link", {
        let sender = sender.clone();
        let shutdown = shutdown.clone();
        let size = config.link.datagram_size;
        move || link::receive(source, verifier, size, inbound_tx, sender, shutdown)
    })?;
    let decoder_thread = spawn("rx-decoder", {
        let result_tx = result_tx.clone();
        let shutdown = shutdown.clone();
        move || run_decoder(decode_rx, result_tx, shutdown)
    })?;
    let finisher_thread = spawn("rx-finisher", {
        let blobs = blobs.clone();
        let ledger = ledger.clone();
        let counters = counters.clone();
        let shutdown = shutdown.clone();
        move || run_finisher(finish_rx, result_tx, blobs, ledger, counters, shutdown)
    })?;
    let faults = Arc::new(Faults::default());
    let gauge = Arc::new(Mutex::new(LinkGauge::default()));
    let board = Arc::new(Mutex::new(store.progress()));
    let reporter = Arc::new(Reporter {
        state_dir: config.state_dir.clone(),
        counters: counters.clone(),
        board: board.clone(),
        ledger: ledger.clone(),
        queue: queue.clone(),
        sender: sender.clone(),
        listening: listening.clone(),
        faults: faults.clone(),
        gauge: gauge.clone(),
    });
    let status_thread = spawn("rx-status", {
        let reporter = reporter.clone();
        let shutdown = shutdown.clone();
        move || reporter.run(shutdown)
    })?;
    let leds = config
        .leds
        .as_ref()
        .map(|l| Arc::new(Leds::new(&l.base, l.names())));
    let panel_thread = spawn("rx-panel", {
        let leds = leds.clone();
        let shutdown = shutdown.clone();
        let inputs = PanelInputs::new(
            counters.clone(),
            queue.clone(),
            faults.clone(),
            gauge.clone(),
            config.leds.clone().unwrap_or_default().hmac_fault_threshold,
        );
        move || crate::appliance::run_panel(leds.as_deref(), &shutdown, inputs.into_reader())
    })?;
    let console = match &config.console {
        None => None,
        Some(c) => {
            let commands = crate::console::RxCommands {
                report: Box::new({
                    let reporter = reporter.clone();
                    move || reporter.report(true)
                }),
                faults: faults.clone(),
                key_ids: key_ids.clone(),
            };
            // A broken console must not stop images from arriving.
            Console::spawn(
                &c.device,
                c.baud,
                "rx",
                env!("CARGO_PKG_VERSION"),
                Arc::new(commands),
                shutdown.clone(),
            )
            .inspect_err(
                |e| tracing::error!(error = %e, "serial console unavailable; running without it"),
            )
            .ok()
        }
    };

    let dispatch = |work: Vec<Work>| {
        for w in work {
            // The receiving threads outlive the store loop; a send can only
            // fail during shutdown, when the work is redone after restart.
            let _ = match w {
                Work::Decode(job) => decode_tx.send(job).map_err(drop),
                Work::Digest(job) => finish_tx.send(FinisherJob::Digest(job)).map_err(drop),
                Work::Finish(job) => finish_tx.send(FinisherJob::Finish(job)).map_err(drop),
            };
        }
    };
    dispatch(initial_work);

    // The store loop.
    let mut last_board = Instant::now();
    let mut disk = DiskWatch::new(
        StateDisk::new(&config.state_dir, config.state_min_free_mb),
        faults.clone(),
        counters.clone(),
    );
    while !shutdown.is_triggered() {
        disk.check_now_and_then(&mut store);
        let wait = store
            .commit_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(STORE_POLL)
            .min(STORE_POLL);
        match inbound_rx.recv_timeout(wait) {
            Ok(frames) => disk.store_or_drop(&mut store, frames),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if !shutdown.is_triggered() {
                    tracing::error!("link thread ended; stopping");
                    shutdown.trigger();
                }
            }
        }
        // Drain what else is waiting, without blocking.
        while let Ok(frames) = inbound_rx.try_recv() {
            disk.store_or_drop(&mut store, frames);
            if store.should_commit() {
                break;
            }
        }
        while let Ok(result) = result_rx.try_recv() {
            apply_result(&mut store, result);
        }
        if !disk.full && store.should_commit() {
            let shards = store.pending_len();
            match store.commit() {
                Ok(work) => dispatch(work),
                Err(e) if is_disk_full(&e) => disk.ran_out(&e, shards),
                Err(e) => {
                    tracing::error!(error = %e, "shard batch not committed; its shards come again with the next pass")
                }
            }
        }
        if last_board.elapsed() >= Duration::from_millis(500) {
            *board.lock().unwrap_or_else(|e| e.into_inner()) = store.progress();
            last_board = Instant::now();
        }
    }

    tracing::info!("gateway-rx stopping");
    let _ = stop_tx.send(true);
    drop(inbound_rx);
    if disk.full {
        disk.drop_pending(&mut store);
    }
    if let Err(e) = store.commit() {
        tracing::error!(error = %e, "last shard batch not committed");
    }
    drop(decode_tx);
    drop(finish_tx);
    for (name, t) in [
        ("link", link_thread),
        ("decoder", decoder_thread),
        ("finisher", finisher_thread),
    ] {
        if t.join().is_err() {
            tracing::error!(thread = name, "thread panicked");
        }
    }
    while let Ok(result) = result_rx.try_recv() {
        apply_result(&mut store, result);
    }
    if let Err(e) = store.commit() {
        tracing::error!(error = %e, "last decoded shards not committed");
    }
    *board.lock().unwrap_or_else(|e| e.into_inner()) = store.progress();
    let _ = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), delivery_task).await });
    runtime.shutdown_timeout(Duration::from_secs(2));
    for (name, t) in [("status", status_thread), ("panel", panel_thread)] {
        if t.join().is_err() {
            tracing::error!(thread = name, "thread panicked");
        }
    }
    let flushed = db.commit();
    // Dark only once the state is safe: a lit power LED means "do not pull".
    if let Some(l) = &leds {
        l.all_off();
    }
    if let Some(c) = console {
        c.join();
    }
    flushed?;
    // The last word: everything above is flushed.
    let report = reporter.report(false);
    reporter.log(&report);
    if let Err(e) = report.write(&config.state_dir) {
        tracing::warn!(error = %e, "status file not written");
    }
    tracing::info!("gateway-rx stopped");
    Ok(())
}

/// The store loop's view of the state disk: whether shards may be written,
/// and the fault when not.
struct DiskWatch {
    disk: StateDisk,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
    full: bool,
    last_check: Option<Instant>,
}

impl DiskWatch {
    fn new(disk: StateDisk, faults: Arc<Faults>, counters: Arc<Counters>) -> Self {
        DiskWatch {
            disk,
            faults,
            counters,
            full: false,
            last_check: None,
        }
    }

    /// Looks at the free space every `DISK_CHECK_EVERY`.
    fn check_now_and_then(&mut self, store: &mut ShardStore) {
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < DISK_CHECK_EVERY)
        {
            return;
        }
        self.last_check = Some(Instant::now());
        match self.disk.check() {
            Ok(()) if self.full => {
                self.full = false;
                self.faults.clear(Fault::StateDiskFull);
                tracing::info!("state disk has room again; storing shards");
            }
            Ok(()) => {}
            Err(full) => {
                if !self.full {
                    tracing::error!(reason = %full, "state disk full; verified frames are dropped until space frees");
                    self.full = true;
                    self.drop_pending(store);
                }
                self.faults.raise(Fault::StateDiskFull, full.to_string());
            }
        }
    }

    /// A commit failed for want of space: its shards were not claimed.
    fn ran_out(&mut self, err: &dyn std::error::Error, shards: usize) {
        let full = self.disk.out_of_space();
        tracing::error!(error = %err, reason = %full,
            "state disk full; shard batch not stored, frames are dropped until space frees");
        Counters::add(&self.counters.frames_dropped_disk_full, shards as u64);
        self.faults.raise(Fault::StateDiskFull, full.to_string());
        self.full = true;
        self.last_check = Some(Instant::now());
    }

    fn drop_pending(&self, store: &mut ShardStore) {
        let n = store.discard_pending();
        Counters::add(&self.counters.frames_dropped_disk_full, n as u64);
    }

    /// Stores verified frames, or drops and counts them while the disk is full.
    fn store_or_drop(&mut self, store: &mut ShardStore, frames: Vec<Inbound>) {
        if self.full {
            Counters::add(&self.counters.frames_dropped_disk_full, frames.len() as u64);
            return;
        }
        for f in frames {
            let result = match f {
                Inbound::Shard(s) => store.accept(s).map(drop),
                Inbound::Header(h) => store.announce(h.id, h.kind, h.len, h.fec),
            };
            match result {
                Ok(()) => {}
                Err(e) if is_disk_full(&e) => {
                    let shards = store.pending_len();
                    store.discard_pending();
                    self.ran_out(&e, shards + 1);
                    // The rest of the batch is dropped too.
                    return;
                }
                Err(e) => tracing::error!(error = %e, "shard not stored"),
            }
        }
    }
}

/// What the panel thread reads to judge the LEDs and the faults it owns
/// (HMAC failures, failing deliveries).
struct PanelInputs {
    counters: Arc<Counters>,
    queue: DeliveryQueue,
    faults: Arc<Faults>,
    gauge: Arc<Mutex<LinkGauge>>,
    hmac_threshold: u64,
    frames: Movement,
    moving: Movement,
    bad_tags: CounterWindow,
    rate: CounterWindow,
    last_delivery_check: Option<Instant>,
}

impl PanelInputs {
    fn new(
        counters: Arc<Counters>,
        queue: DeliveryQueue,
        faults: Arc<Faults>,
        gauge: Arc<Mutex<LinkGauge>>,
        hmac_threshold: u64,
    ) -> Self {
        PanelInputs {
            counters,
            queue,
            faults,
            gauge,
            hmac_threshold,
            frames: Movement::default(),
            moving: Movement::default(),
            bad_tags: CounterWindow::new(HMAC_WINDOW),
            rate: CounterWindow::new(RATE_WINDOW),
            last_delivery_check: None,
        }
    }

    fn into_reader(mut self) -> impl FnMut() -> Lights {
        move || self.read()
    }

    fn read(&mut self) -> Lights {
        let now = Instant::now();
        let c = self.counters.snapshot();
        self.frames.observe(c.frames_accepted, now);
        self.rate.observe(c.frames_accepted, now);
        self.moving.observe(
            c.shards_stored + c.blocks_complete + c.blobs_verified + c.pushes_done,
            now,
        );
        self.bad_tags.observe(c.frames_bad_tag, now);
        let bad = self.bad_tags.growth();
        if bad > self.hmac_threshold {
            self.faults.raise(
                Fault::HmacFailures,
                format!(
                    "HMAC failures: {bad} frames failed their tag in the last minute \
                     (threshold {}): forged or damaged frames, or a key mismatch",
                    self.hmac_threshold
                ),
            );
        } else {
            self.faults.clear(Fault::HmacFailures);
        }
        if self
            .last_delivery_check
            .is_none_or(|t| t.elapsed() >= DELIVERY_CHECK_EVERY)
        {
            self.last_delivery_check = Some(now);
            self.judge_deliveries();
        }
        let up = self.frames.moved_within(LINK_WINDOW, now);
        *self.gauge.lock().unwrap_or_else(|e| e.into_inner()) = LinkGauge {
            up,
            frames_per_s: self.rate.per_second(),
        };
        Lights {
            link: up,
            activity: self.moving.moved_within(ACTIVITY_WINDOW, now),
            fault: self.faults.reason(),
        }
    }

    fn judge_deliveries(&self) {
        let jobs = match self.queue.all() {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::debug!(error = %e, "delivery queue unreadable for the fault check");
                return;
            }
        };
        let failing: Vec<_> = jobs
            .iter()
            .map(|j| j.view())
            .filter(|v| v.state == "failing")
            .collect();
        match failing.first() {
            None => self.faults.clear(Fault::DeliveryFailing),
            Some(first) => {
                let more = match failing.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                };
                self.faults.raise(
                    Fault::DeliveryFailing,
                    format!(
                        "delivery failing: {} -> {}: {}{more}",
                        first.reference,
                        first.target,
                        first.last_error.as_deref().unwrap_or("no answer")
                    ),
                );
            }
        }
    }
}

fn spawn<F: FnOnce() + Send + 'static>(
    name: &str,
    f: F,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .with_context(|| format!("starting thread {name}"))
}

fn apply_result(store: &mut ShardStore, result: WorkResult) {
    match result {
        WorkResult::Decoded {
            object,
            generation,
            block,
            rebuilt,
        } => match rebuilt {
            Ok(indices) => store.decoded(object, generation, block, indices),
            Err(e) => {
                tracing::warn!(object = %object, block, error = %e, "block not rebuilt; waiting for more shards");
                store.decode_failed(object, generation, block);
            }
        },
        WorkResult::Finished {
            object,
            generation,
            outcome,
        } => {
            let r = match outcome {
                FinishOutcome::Verified => store.finished(object, generation, true),
                FinishOutcome::Failed => store.finished(object, generation, false),
                FinishOutcome::Interrupted => {
                    store.finish_interrupted(object);
                    Ok(())
                }
            };
            if let Err(e) = r {
                tracing::error!(object = %object, error = %e, "staging cleanup failed");
            }
        }
    }
}

fn run_decoder(jobs: Receiver<DecodeJob>, results: Sender<WorkResult>, shutdown: Shutdown) {
    let mut codecs = Codecs::default();
    while let Ok(job) = jobs.recv() {
        if shutdown.is_triggered() {
            break; // the bitmap is the truth: undecoded blocks are found again at restart
        }
        let rebuilt = codecs
            .get(job.fec)
            .map_err(|e| e.to_string())
            .and_then(|codec| shards::decode_block(&job, codec).map_err(|e| e.to_string()));
        let result = WorkResult::Decoded {
            object: job.object,
            generation: job.generation,
            block: job.block,
            rebuilt,
        };
        if results.send(result).is_err() {
            break;
        }
    }
}

/// The finisher's work, in the order the store handed it out: an object's
/// digest jobs come before its finish.
enum FinisherJob {
    Digest(DigestJob),
    Finish(FinishJob),
}

fn run_finisher(
    jobs: Receiver<FinisherJob>,
    results: Sender<WorkResult>,
    blobs: BlobStore,
    ledger: Arc<ImageLedger>,
    counters: Arc<Counters>,
    shutdown: Shutdown,
) {
    let mut running = RunningDigests::default();
    let stop = || shutdown.is_triggered();
    while let Ok(job) = jobs.recv() {
        let job = match job {
            FinisherJob::Digest(d) => {
                let file = &d.files.data;
                if let Err(e) = running.advance(d.object, d.generation, file, d.upto, &stop) {
                    tracing::warn!(digest = %d.object, error = %e, path = %d.files.data_path.display(),
                        "hashing ahead failed; the finish hashes the whole object");
                }
                continue;
            }
            FinisherJob::Finish(job) => job,
        };
        let digest = running.take(&job.object, job.generation);
        let outcome = finish(&job, digest, &blobs, &ledger, &counters, &shutdown);
        let result = WorkResult::Finished {
            object: job.object,
            generation: job.generation,
            outcome,
        };
        if results.send(result).is_err() {
            break;
        }
    }
}

/// Checks a whole object's sha256 and moves it into the blob store; then
/// tells the image ledger.
fn finish(
    job: &FinishJob,
    digest: RunningDigest,
    blobs: &BlobStore,
    ledger: &ImageLedger,
    counters: &Counters,
    shutdown: &Shutdown,
) -> FinishOutcome {
    let kind = shards::kind_name(job.kind);
    let (verified, failed) = match job.kind {
        ObjectKind::Blob => (&counters.blobs_verified, &counters.blobs_failed),
        ObjectKind::Image => (
            &counters.image_objects_verified,
            &counters.image_objects_failed,
        ),
    };
    // Drop the padding of the last block: the file becomes the object.
    if let Err(e) = job.files.data.set_len(job.len) {
        tracing::error!(digest = %job.object, kind, error = %e, path = %job.files.data_path.display(),
            "cannot trim staged object");
        return FinishOutcome::Failed;
    }
    let hashed_ahead = digest.hashed();
    match blobs.adopt_hashed(&job.files.data_path, &job.object, digest, &|| {
        shutdown.is_triggered()
    }) {
        Ok(len) => {
            Counters::add(verified, 1);
            tracing::info!(digest = %job.object, kind, len, hashed_ahead,
                seconds_from_first_frame = now_ms().saturating_sub(job.first_seen_ms) as f64 / 1000.0,
                "object verified");
            if let Err(e) = ledger.object_verified(job.object, job.kind, job.first_seen_ms) {
                if job.kind == ObjectKind::Image {
                    Counters::add(&counters.image_objects_failed, 1);
                }
                tracing::error!(digest = %job.object, kind, error = %e, "verified object not usable");
            }
            FinishOutcome::Verified
        }
        Err(BlobStoreError::Interrupted { .. }) => FinishOutcome::Interrupted,
        Err(e @ BlobStoreError::Mismatch { .. }) => {
            Counters::add(failed, 1);
            tracing::warn!(digest = %job.object, kind, error = %e,
                "object failed its sha256; discarded, waiting for the next pass");
            FinishOutcome::Failed
        }
        Err(e) => {
            Counters::add(failed, 1);
            tracing::error!(digest = %job.object, kind, error = %e,
                "object could not enter the blob store; discarded, waiting for the next pass");
            FinishOutcome::Failed
        }
    }
}

/// Writes status.json every second and logs the counters every ten.
struct Reporter {
    state_dir: std::path::PathBuf,
    counters: Arc<Counters>,
    board: Arc<Mutex<Vec<ObjectProgress>>>,
    ledger: Arc<ImageLedger>,
    queue: DeliveryQueue,
    sender: Arc<Mutex<Option<SenderStatus>>>,
    listening: String,
    faults: Arc<Faults>,
    gauge: Arc<Mutex<LinkGauge>>,
}

impl Reporter {
    fn run(&self, shutdown: Shutdown) {
        let mut last_log = Instant::now();
        while !shutdown.sleep(STATUS_EVERY) {
            let report = self.report(true);
            if let Err(e) = report.write(&self.state_dir) {
                tracing::warn!(error = %e, "status file not written");
            }
            if last_log.elapsed() >= LOG_EVERY {
                self.log(&report);
                last_log = Instant::now();
            }
        }
    }

    fn log(&self, report: &StatusReport) {
        let c = &report.counters;
        tracing::info!(
            frames_accepted = c.frames_accepted,
            bad_tag = c.frames_bad_tag,
            unknown_key = c.frames_unknown_key,
            replayed = c.frames_replayed,
            malformed = c.frames_malformed,
            duplicate = c.shards_duplicate,
            loss_estimate = c.frames_lost_estimate,
            expected = c.frames_expected,
            blocks_repaired = c.blocks_repaired,
            blobs_verified = c.blobs_verified,
            blobs_failed = c.blobs_failed,
            images_complete = c.images_complete,
            pushes_pending = report.pushes_pending,
            pushes_failing = report.pushes_failing,
            pushes_done = c.pushes_done,
            "counters"
        );
    }

    fn report(&self, running: bool) -> StatusReport {
        let receiving = self.board.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let images = self.ledger.progress(&receiving).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "image progress unavailable");
            Vec::new()
        });
        let jobs = self.queue.all().unwrap_or_default();
        let gauge = *self.gauge.lock().unwrap_or_else(|e| e.into_inner());
        StatusReport {
            written_at_ms: now_ms(),
            running,
            pid: Some(std::process::id()),
            listening: Some(self.listening.clone()),
            link_up: running && gauge.up,
            frames_per_s: if running { gauge.frames_per_s } else { 0.0 },
            fault: self.faults.reason(),
            counters: self.counters.snapshot(),
            pushes_pending: count_state(&jobs, |s| s != "done"),
            pushes_failing: count_state(&jobs, |s| s == "failing"),
            sender: self
                .sender
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            receiving,
            images,
            deliveries: delivery_views(&jobs),
        }
    }
}

fn count_state(jobs: &[crate::delivery::DeliveryJob], f: impl Fn(&str) -> bool) -> u64 {
    jobs.iter().filter(|j| f(&j.view().state)).count() as u64
}

/// Deliveries for the report: all waiting ones and the most recent done.
fn delivery_views(jobs: &[crate::delivery::DeliveryJob]) -> Vec<crate::status::DeliveryView> {
    const RECENT_DONE: usize = 20;
    let mut done: Vec<_> = jobs.iter().filter(|j| j.done_ms.is_some()).collect();
    done.sort_by_key(|j| std::cmp::Reverse(j.done_ms));
    let mut out: Vec<_> = jobs
        .iter()
        .filter(|j| j.done_ms.is_none())
        .map(|j| j.view())
        .collect();
    out.extend(done.into_iter().take(RECENT_DONE).map(|j| j.view()));
    out
}

/// The status of a gateway: from status.json while it runs (sled admits one
/// process), or built from its database when it is stopped.
pub fn status(config: &RxConfig) -> anyhow::Result<StatusReport> {
    let db = match StateDb::open_now(&db_dir(config)) {
        Ok(db) => db,
        Err(crate::state::StateError::Locked { .. }) => {
            return StatusReport::read(&config.state_dir)?.with_context(|| {
                format!(
                    "gateway-rx holds {} but has not written {} yet",
                    db_dir(config).display(),
                    config.state_dir.join(crate::status::STATUS_FILE).display()
                )
            });
        }
        Err(e) => return Err(e.into()),
    };
    let blobs = BlobStore::open(&blobs_dir(config))?;
    let queue = DeliveryQueue::open(&db)?;
    let ledger = ImageLedger::open(
        &db,
        blobs,
        queue.clone(),
        config,
        Arc::new(Counters::default()),
        None,
    )?;
    let receiving = shards::progress_from_db(&db)?;
    let images = ledger.progress(&receiving)?;
    let jobs = queue.all()?;
    let last = StatusReport::read(&config.state_dir)
        .ok()
        .flatten()
        .unwrap_or_default();
    Ok(StatusReport {
        written_at_ms: now_ms(),
        running: false,
        pid: None,
        listening: None,
        link_up: false,
        frames_per_s: 0.0,
        // What the gateway reported last, before it stopped.
        fault: last.fault,
        counters: last.counters,
        pushes_pending: count_state(&jobs, |s| s != "done"),
        pushes_failing: count_state(&jobs, |s| s == "failing"),
        sender: last.sender,
        receiving,
        images,
        deliveries: delivery_views(&jobs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        registry_or_skip, sample_image, sample_index, SampleImage, TestRegistry, TestSender,
    };
    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use weir_proto::Key;

    const SECRET: [u8; 32] = [7; 32];

    fn key() -> Key {
        Key::from_bytes(1, &SECRET).unwrap()
    }

    fn free_udp_port() -> SocketAddr {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// A config in `root` listening on `addr`, with `extra` appended.
    fn write_config(root: &Path, addr: SocketAddr, extra: &str) -> RxConfig {
        write_config_link(
            root,
            &format!("transport = \"udp\"\nudp_listen = \"{addr}\"\n"),
            extra,
        )
    }

    /// A config in `root` with the given `[link]` lines.
    fn write_config_link(root: &Path, link: &str, extra: &str) -> RxConfig {
        let key_path = root.join("1.key");
        std::fs::write(&key_path, hex::encode(SECRET)).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = root.join("rx.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}/state\"\n[link]\n{link}\
                 [[auth.keys]]\nid = 1\nfile = \"{}\"\n{extra}",
                root.display(),
                key_path.display()
            ),
        )
        .unwrap();
        RxConfig::load(&path).unwrap()
    }

    struct Running {
        shutdown: Shutdown,
        thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
        state_dir: std::path::PathBuf,
    }

    impl Running {
        fn start(config: &RxConfig) -> Running {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .try_init();
            let shutdown = Shutdown::new();
            let thread = std::thread::spawn({
                let config = config.clone();
                let shutdown = shutdown.clone();
                move || run(config, shutdown)
            });
            let r = Running {
                shutdown,
                thread: Some(thread),
                state_dir: config.state_dir.clone(),
            };
            r.wait_for("the first status report", |s| {
                s.running && s.listening.is_some()
            });
            r
        }

        fn report(&self) -> Option<StatusReport> {
            StatusReport::read(&self.state_dir).ok().flatten()
        }

        /// Waits (bounded) until the status file satisfies `cond`.
        fn wait_for(&self, what: &str, cond: impl Fn(&StatusReport) -> bool) -> StatusReport {
            self.wait_or(what, Duration::from_secs(60), cond, &mut || {})
        }

        /// Like `wait_for`, calling `meanwhile` (e.g. another pass) between checks.
        fn wait_or(
            &self,
            what: &str,
            limit: Duration,
            cond: impl Fn(&StatusReport) -> bool,
            meanwhile: &mut dyn FnMut(),
        ) -> StatusReport {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(r) = self.report() {
                    if cond(&r) {
                        return r;
                    }
                }
                let finished = self.thread.as_ref().is_some_and(|t| t.is_finished());
                assert!(!finished, "the gateway stopped while waiting for {what}");
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}: {:#?}",
                    self.report()
                );
                meanwhile();
                std::thread::sleep(Duration::from_millis(200));
            }
        }

        fn stop(mut self) -> StatusReport {
            self.shutdown.trigger();
            let result = self.thread.take().unwrap().join().unwrap();
            result.unwrap();
            let report = self.report().unwrap();
            assert!(!report.running);
            report
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.shutdown.trigger();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn layout_names(out: &Path) -> Vec<(String, String)> {
        let Ok(bytes) = std::fs::read(out.join("index.json")) else {
            return vec![];
        };
        let index: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["annotations"][crate::delivery::layout::REF_NAME]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    e["digest"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn assert_layout_blobs_hash(out: &Path, img: &SampleImage) {
        for id in img.blob_ids() {
            let bytes = std::fs::read(out.join("blobs/sha256").join(id.hex())).unwrap();
            assert_eq!(ObjectId::of_bytes(&bytes), id);
        }
    }

    /// Drives the receiver through every counter's cause at once: 10 %
    /// periodic loss (sequence gaps, repaired blocks), an authentic but
    /// corrupted shard (a blob fails its sha256 and waits for the next
    /// pass), forged, unknown-key, replayed and garbage frames, and repeated
    /// passes (duplicates). The image still arrives, once.
    #[test]
    fn lossy_passes_deliver_to_the_layout_and_every_counter_has_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_udp_port();
        let config = write_config(dir.path(), addr, "");
        let gw = Running::start(&config);
        let img = sample_image("team/app", &["1.0"], 2, 150_000);
        let objects = img.objects();
        let victim = img.blob_ids()[1];
        let mut tx = TestSender::new(key(), 1000, addr, 1400, 8, 4);

        // Pass 1: one frame in 16 lost (a fixed pseudo-random choice), but
        // never block 0 index 0, which for one blob carries wrong bytes under
        // a valid tag.
        let lost = |n: u64| (n.wrapping_add(11).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) == 0;
        let first = tx.seal(
            &objects,
            &mut |n, shard| shard == Some((0, 0)) || !lost(n),
            &mut |id, b, i, payload| {
                if *id == victim && b == 0 && i == 0 {
                    payload[0] ^= 0xff;
                }
            },
        );
        tx.send(&first);
        // Noise beside the real traffic.
        let mut forger = TestSender::new(
            Key::from_bytes(1, &[9; 32]).unwrap(),
            1000,
            addr,
            1400,
            8,
            4,
        );
        let mut stranger =
            TestSender::new(Key::from_bytes(5, &SECRET).unwrap(), 1000, addr, 1400, 8, 4);
        let forged = forger.seal(&objects[..1], &mut |n, _| n < 3, &mut |_, _, _, _| {});
        let unknown = stranger.seal(&objects[..1], &mut |n, _| n < 2, &mut |_, _, _, _| {});
        tx.send(&forged);
        tx.send(&unknown);
        tx.send(&first[..4]); // replayed
        tx.send(&[b"WEIR but not a frame at all, and too short".to_vec()]);

        // Pass 1 alone completes every object (blocks repaired from parity);
        // the tampered blob fails its sha256.
        let after_first = gw.wait_for("pass 1 processed", |r| {
            r.counters.blobs_failed == 1
                && r.counters.blobs_verified == 2
                && r.counters.image_objects_verified == 1
        });
        assert!(
            after_first.counters.blocks_repaired > 0,
            "{:#?}",
            after_first.counters
        );
        assert_eq!(after_first.counters.images_complete, 0);

        let out = dir.path().join("out");
        let report = gw.wait_or(
            "the image in the OCI layout",
            Duration::from_secs(90),
            |r| r.counters.pushes_done == 1,
            &mut || {
                tx.pass(&objects);
            },
        );
        let c = &report.counters;
        assert!(c.frames_accepted > 0);
        assert_eq!(c.frames_bad_tag, forged.len() as u64, "{c:#?}");
        assert_eq!(c.frames_unknown_key, unknown.len() as u64, "{c:#?}");
        assert!(c.frames_replayed >= 4, "{c:#?}");
        assert!(c.frames_malformed >= 1, "{c:#?}");
        assert!(c.shards_duplicate > 0, "{c:#?}");
        assert!(
            c.frames_lost_estimate > 0 && c.frames_expected > c.frames_lost_estimate,
            "{c:#?}"
        );
        assert!(c.blocks_repaired > 0, "{c:#?}");
        assert_eq!(c.blobs_failed, 1, "{c:#?}");
        assert_eq!(c.blobs_verified, 3, "{c:#?}");
        assert_eq!(c.image_objects_verified, 1, "{c:#?}");
        assert_eq!(c.images_complete, 1, "{c:#?}");
        assert_eq!((report.pushes_pending, report.pushes_failing), (0, 0));
        assert_eq!(report.images[0].state, "complete");
        assert_eq!(report.images[0].percent, 100.0);
        assert_eq!(report.deliveries[0].state, "done");

        assert_eq!(
            layout_names(&out),
            vec![("team/app:1.0".to_string(), img.tm.manifest.digest.clone())]
        );
        assert_layout_blobs_hash(&out, &img);
        // While the gateway holds the database, `status` reads its report.
        let live = status(&config).unwrap();
        assert!(live.running && live.pid == Some(std::process::id()));
        assert!(
            live.render()
                .contains("team/app:1.0 complete: 3/3 blobs, 100.0%"),
            "{}",
            live.render()
        );
        let report = gw.stop();
        assert_eq!(report.counters.pushes_done, 1);
    }

    /// Half a pass, a stop, a restart, and the other half: the shards
    /// claimed before the stop are used (they are not sent again).
    #[test]
    fn restart_mid_transfer_keeps_claimed_shards() {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_udp_port();
        let config = write_config(dir.path(), addr, "");
        let img = sample_image("team/app", &["2.0"], 3, 60_000);
        let mut tx = TestSender::new(key(), 2000, addr, 1400, 8, 2);
        let frames = tx.seal(&img.objects(), &mut |_, _| true, &mut |_, _, _, _| {});
        let (first, second) = frames.split_at(frames.len() / 2);

        let gw = Running::start(&config);
        tx.send(first);
        let shard_frames = first
            .iter()
            .filter(|f| f[5] == weir_proto::FrameKind::Shard as u8)
            .count() as u64;
        // Stored, or not needed (parity of a block whose data is all in).
        let report = gw.wait_for("the first half stored", |r| {
            r.counters.shards_stored + r.counters.shards_duplicate == shard_frames
        });
        assert_eq!(report.counters.pushes_done, 0);
        let stopped = gw.stop();
        assert!(!stopped.receiving.is_empty());

        // Offline status reads the database.
        let offline = status(&config).unwrap();
        assert!(!offline.running);
        assert_eq!(offline.receiving, stopped.receiving);
        assert!(offline.render().contains("objects arriving"));

        let gw = Running::start(&config);
        tx.send(second);
        let report = gw.wait_for("delivery after restart", |r| r.counters.pushes_done == 1);
        assert_eq!(report.counters.images_complete, 1);
        assert_eq!(
            layout_names(&dir.path().join("out")),
            vec![("team/app:2.0".to_string(), img.tm.manifest.digest.clone())]
        );
        assert_layout_blobs_hash(&dir.path().join("out"), &img);
        gw.stop();
    }

    #[test]
    fn multi_arch_image_reaches_registry_and_layout_with_the_source_digest() {
        let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let addr = free_udp_port();
        let out = dir.path().join("layout");
        let config = write_config(
            dir.path(),
            addr,
            &format!(
                "[delivery]\nregistry_url = \"http://{}\"\noci_layout = \"{}\"\n",
                reg.addr(),
                out.display()
            ),
        );
        let gw = Running::start(&config);
        let img = sample_index("team/multi", &["v1", "latest"]);
        let mut tx = TestSender::new(key(), 3000, addr, 1400, 16, 4);
        gw.wait_or(
            "both deliveries",
            Duration::from_secs(90),
            |r| r.counters.pushes_done == 2,
            &mut || {
                tx.pass(&img.objects());
            },
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(crate::delivery::tests::assert_served(
            &reg,
            "team/multi",
            &img.tm,
        ));
        assert_eq!(reg.manifest_puts("team/multi", "v1"), 1);
        assert_eq!(reg.manifest_puts("team/multi", "latest"), 1);
        let mut names = layout_names(&out);
        names.sort();
        assert_eq!(
            names,
            vec![
                (
                    "team/multi:latest".to_string(),
                    img.tm.manifest.digest.clone()
                ),
                ("team/multi:v1".to_string(), img.tm.manifest.digest.clone()),
            ]
        );
        gw.stop();
    }

    /// Sends a pass through `send` at most every few seconds while waiting.
    fn every_few_seconds(mut send: impl FnMut()) -> impl FnMut() {
        let mut last: Option<Instant> = None;
        move || {
            if last.is_none_or(|t| t.elapsed() > Duration::from_secs(3)) {
                send();
                last = Some(Instant::now());
            }
        }
    }

    #[test]
    fn dir_transport_delivers_from_an_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let config = write_config_link(
            dir.path(),
            &format!("transport = \"dir\"\ninbox_dir = \"{}\"\n", inbox.display()),
            "",
        );
        let gw = Running::start(&config);
        let img = sample_image("team/dir", &["1"], 2, 20_000);
        let mut tx = TestSender::sealer_only(key(), 4000, 1400, 8, 2);
        let mut sink =
            weir_host::DirSink::new(&inbox, 1 << 20, Duration::from_millis(100)).unwrap();
        let objects = img.objects();
        gw.wait_or(
            "delivery from the inbox",
            Duration::from_secs(60),
            |r| r.counters.pushes_done == 1,
            &mut every_few_seconds(|| {
                let frames = tx.seal(&objects, &mut |_, _| true, &mut |_, _, _, _| {});
                let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
                weir_host::FrameSink::send(&mut sink, &refs).unwrap();
                sink.flush().unwrap();
            }),
        );
        let out = dir.path().join("out");
        assert_eq!(
            layout_names(&out),
            vec![("team/dir:1".to_string(), img.tm.manifest.digest.clone())]
        );
        assert_layout_blobs_hash(&out, &img);
        gw.stop();
    }

    #[test]
    fn serial_transport_delivers_over_a_pty_pair() {
        if !Path::new("/usr/bin/socat").exists() {
            eprintln!("SKIPPED: socat not found; install it with: apt-get install -y socat");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (tx_dev, rx_dev) = (dir.path().join("tx.pty"), dir.path().join("rx.pty"));
        let mut socat = std::process::Command::new("/usr/bin/socat")
            .arg(format!("pty,raw,echo=0,link={}", tx_dev.display()))
            .arg(format!("pty,raw,echo=0,link={}", rx_dev.display()))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(tx_dev.exists() && rx_dev.exists()) {
            assert!(Instant::now() < deadline, "socat made no pty pair");
            std::thread::sleep(Duration::from_millis(20));
        }
        let config = write_config_link(
            dir.path(),
            &format!(
                "transport = \"serial\"\nserial_device = \"{}\"\nbaud = 230400\n",
                rx_dev.display()
            ),
            "",
        );
        let gw = Running::start(&config);
        let img = sample_image("team/serial", &["1"], 1, 4_000);
        let mut tx = TestSender::sealer_only(key(), 5000, 1400, 4, 2);
        let mut sink = weir_host::SerialSink::open(&tx_dev, 230_400, 1400).unwrap();
        let objects = img.objects();
        gw.wait_or(
            "delivery over the serial line",
            Duration::from_secs(60),
            |r| r.counters.pushes_done == 1,
            &mut every_few_seconds(|| {
                let frames = tx.seal(&objects, &mut |_, _| true, &mut |_, _, _, _| {});
                let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
                weir_host::FrameSink::send(&mut sink, &refs).unwrap();
            }),
        );
        assert_layout_blobs_hash(&dir.path().join("out"), &img);
        gw.stop();
        let _ = socat.kill();
        let _ = socat.wait();
    }
}
