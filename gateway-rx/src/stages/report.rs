//! The report stage: status.json every second (and the counters in the
//! log), the LED panel's inputs and the faults it judges, the serial
//! console, the metrics endpoint, and the image ledger's watch beside
//! them; and the status of a stopped gateway, read from its database.

use anyhow::Context;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_host::config::MetricsConfig;
use weir_host::reload::Reloadable;
use weir_host::stages::Stages;
use weir_host::{Console, Leds, Shutdown};
use weir_proto::KeyRing;

use crate::appliance::{CounterWindow, Fault, Faults, Lights, Movement};
use crate::blobs::BlobStore;
use crate::config::RxConfig;
use crate::delivery::{DeliveryJob, DeliveryQueue, DeliveryStats};
use crate::gateway::{blobs_dir, db_dir};
use crate::images::ImageLedger;
use crate::shards;
use crate::stages::deliver::WebhookSwitch;
use crate::stages::ledger::LedgerWatch;
use crate::state::{now_ms, StateDb};
use crate::status::{
    Counters, DeliveryState, DeliveryView, ObjectProgress, SenderStatus, StatusReport,
};

/// How often the status file is written, and the counters logged.
const STATUS_EVERY: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);
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
pub struct LinkGauge {
    up: bool,
    frames_per_s: f64,
}

/// What the panel thread reads to judge the LEDs and the faults it owns
/// (HMAC failures, failing deliveries).
pub struct PanelInputs {
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
    pub fn new(
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

    pub fn into_reader(mut self) -> impl FnMut() -> Lights {
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
        let views: Vec<_> = jobs.iter().map(|j| j.view()).collect();
        match views.iter().find(|v| v.state == DeliveryState::Refused) {
            None => self.faults.clear(Fault::SignatureRefused),
            Some(first) => self.faults.raise(
                Fault::SignatureRefused,
                format!(
                    "image kept, not pushed: {} -> {}: {}",
                    first.reference,
                    first.target,
                    first
                        .last_error
                        .as_deref()
                        .unwrap_or("signature check failed")
                ),
            ),
        }
        let failing: Vec<_> = views
            .iter()
            .filter(|v| v.state == DeliveryState::Failing)
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

/// Writes status.json every second and logs the counters every ten.
pub struct Reporter {
    pub state_dir: std::path::PathBuf,
    pub counters: Arc<Counters>,
    pub board: Arc<Mutex<Vec<ObjectProgress>>>,
    pub ledger: Arc<ImageLedger>,
    pub queue: DeliveryQueue,
    pub sender: Arc<Mutex<Option<SenderStatus>>>,
    pub listening: String,
    pub faults: Arc<Faults>,
    pub gauge: Arc<Mutex<LinkGauge>>,
    pub gap_alert_hours: f64,
}

impl Reporter {
    pub fn run(&self, shutdown: &Shutdown) {
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

    pub fn log(&self, report: &StatusReport) {
        let c = &report.counters;
        tracing::info!(
            frames_accepted = c.frames_accepted,
            bad_tag = c.frames_bad_tag,
            unknown_key = c.frames_unknown_key,
            replayed = c.frames_replayed,
            held_unopened = c.frames_held_unopened,
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

    pub fn report(&self, running: bool) -> StatusReport {
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
            pushes_pending: count_state(&jobs, |s| s != DeliveryState::Done),
            pushes_failing: count_state(&jobs, |s| {
                matches!(s, DeliveryState::Failing | DeliveryState::Refused)
            }),
            sender: self
                .sender
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            receiving,
            images,
            deliveries: delivery_views(&jobs),
            ledger: ledger_view(&self.ledger, self.gap_alert_hours),
        }
    }
}

fn ledger_view(ledger: &ImageLedger, gap_alert_hours: f64) -> Option<crate::ledger::LedgerView> {
    match ledger.chains().view(now_ms(), gap_alert_hours) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "image ledger view unavailable");
            None
        }
    }
}

fn count_state(jobs: &[DeliveryJob], f: impl Fn(DeliveryState) -> bool) -> u64 {
    jobs.iter().filter(|j| f(j.view().state)).count() as u64
}

/// Deliveries for the report: all waiting ones and the most recent done.
fn delivery_views(jobs: &[DeliveryJob]) -> Vec<DeliveryView> {
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
        pushes_pending: count_state(&jobs, |s| s != DeliveryState::Done),
        pushes_failing: count_state(&jobs, |s| {
            matches!(s, DeliveryState::Failing | DeliveryState::Refused)
        }),
        sender: last.sender,
        receiving,
        images,
        deliveries: delivery_views(&jobs),
        ledger: ledger_view(&ledger, config.ledger.gap_alert_hours),
    })
}

/// The reporting stages, started: status.json, the LED panel, the
/// console, the metrics endpoint and the image ledger's watch. Stopped
/// last, once the state they show is settled.
pub struct Reporting {
    pub stages: Stages,
    pub leds: Option<Arc<Leds>>,
    pub console: Option<Console>,
}

/// Starts status.json, the LED panel, the console, the metrics endpoint
/// and the image ledger's watch on `reporter`.
pub fn start_reporting(
    config: &RxConfig,
    reporter: &Arc<Reporter>,
    keys: Arc<Reloadable<KeyRing>>,
    metrics_listen: &Arc<Reloadable<Option<MetricsConfig>>>,
    deliveries: Arc<DeliveryStats>,
    webhook: WebhookSwitch,
    shutdown: &Shutdown,
) -> anyhow::Result<Reporting> {
    let mut stages = Stages::new(shutdown);
    serve_metrics(config, metrics_listen, reporter, deliveries, &mut stages)?;
    stages.spawn("rx-status", {
        let reporter = reporter.clone();
        move |s| {
            reporter.run(s);
            Ok(())
        }
    })?;
    let leds = config
        .leds
        .as_ref()
        .map(|l| Arc::new(Leds::new(&l.base, l.names())));
    stages.spawn("rx-panel", {
        let leds = leds.clone();
        let inputs = PanelInputs::new(
            reporter.counters.clone(),
            reporter.queue.clone(),
            reporter.faults.clone(),
            reporter.gauge.clone(),
            config.hmac_fault_threshold(),
        );
        move |s| {
            crate::appliance::run_panel(leds.as_deref(), s, inputs.into_reader());
            Ok(())
        }
    })?;
    let watch = LedgerWatch {
        chains: reporter.ledger.chains().clone(),
        sender: reporter.sender.clone(),
        faults: reporter.faults.clone(),
        webhook,
        queue: reporter.queue.clone(),
        counters: reporter.counters.clone(),
        state_dir: reporter.state_dir.clone(),
        gap_alert_hours: reporter.gap_alert_hours,
    };
    stages.spawn("rx-ledger", move |s| {
        watch.run(s);
        Ok(())
    })?;
    let console = start_console(config, reporter, keys, shutdown);
    Ok(Reporting {
        stages,
        leds,
        console,
    })
}

/// Starts the serial console, if one is configured.
pub fn start_console(
    config: &RxConfig,
    reporter: &Arc<Reporter>,
    keys: Arc<Reloadable<KeyRing>>,
    shutdown: &Shutdown,
) -> Option<Console> {
    let commands = crate::console::RxCommands {
        report: Box::new({
            let reporter = reporter.clone();
            move || reporter.report(true)
        }),
        faults: reporter.faults.clone(),
        // Ids only: the console lists them, never the keys.
        key_ids: Box::new(move || keys.current().ids()),
    };
    let role = "rx";
    weir_host::appliance::start_console(config.console.as_ref(), role, Arc::new(commands), shutdown)
}

/// Binds the metrics endpoint, if `[metrics]` is configured, and serves it
/// among `stages` until shutdown, following `listen` as reloads set it (on,
/// off, another address). A port that cannot be bound at start is an error.
pub fn serve_metrics(
    config: &RxConfig,
    listen: &Arc<Reloadable<Option<MetricsConfig>>>,
    reporter: &Arc<Reporter>,
    deliveries: Arc<DeliveryStats>,
    stages: &mut Stages,
) -> anyhow::Result<()> {
    let endpoint = weir_host::metrics::bind_configured(config.metrics.as_ref())?;
    let metrics = crate::metrics::RxMetrics::new(config, reporter.clone(), deliveries);
    let listen = listen.reader();
    stages.spawn("rx-metrics", move |s| {
        weir_host::metrics::serve_following(endpoint, listen, s, || metrics.render());
        Ok(())
    })
}

/// Writes the last report, once everything is flushed.
pub fn last_word(reporter: &Reporter) {
    let report = reporter.report(false);
    reporter.log(&report);
    if let Err(e) = report.write(&reporter.state_dir) {
        tracing::warn!(error = %e, "status file not written");
    }
}
