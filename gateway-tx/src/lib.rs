//! gateway-tx: the low-side gateway of weir.
//!
//! ```text
//!  spool_dir ──▶ ingest ──┐
//!                         ├──▶ policy ──▶ objects (sled + payload files)
//!  registries ──▶ pull ───┘                │
//!                              carousel ◀──┘ ──▶ FEC ──▶ seal (HMAC) ──▶ pacing ──▶ emit (link)
//! ```
//!
//! One module per stage under [`stages`]: [`ingest`] and [`pull`], [`policy`],
//! [`carousel`], [`link`] (the emit stage) and the report stage
//! (`status.json`, LEDs, console, metrics endpoint). The durable state stays apart:
//! [`objects`] (the object store) and [`status`] (the status board);
//! [`config`] and [`pacing`] serve the stages; [`appliance`] holds the
//! sender's faults, [`console`] the serial console's commands and
//! [`metrics`] the Prometheus families.
//! [`run`] starts the stages on threads of their own and returns once
//! shutdown was asked for and the state is flushed; the LEDs go dark last.

// statvfs, for the state disk's free space, has no safe wrapper in std.
#[allow(unsafe_code)]
pub mod appliance;
pub mod config;
pub mod console;
pub mod ledger;
pub mod metrics;
pub mod objects;
pub mod pacing;
pub mod reconcile;
pub mod reload;
pub mod stages;
pub mod status;

pub use stages::emit as link;
pub use stages::{carousel, ingest, policy, pull};

use anyhow::Context;
use appliance::Faults;
use std::sync::Arc;
use weir_host::reload::{ReloadSource, Reloadable};
use weir_host::stages::Stages;
use weir_host::{FrameSink, Leds, Shutdown};

pub use config::TxConfig;

/// Runs the sender on the configured link until `shutdown` is triggered.
pub fn run(config: TxConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    run_with_reloads(config, shutdown, None)
}

/// [`run`], reading `reloads.file` again whenever `reloads.requests` asks
/// (SIGHUP; see [`reload`]).
pub fn run_with_reloads(
    config: TxConfig,
    shutdown: Shutdown,
    reloads: Option<ReloadSource>,
) -> anyhow::Result<()> {
    config.validate().context("configuration")?;
    let sink = link::open_sink(&config.link)?;
    run_stages(config, shutdown, sink, reloads)
}

/// Runs the sender on a given frame sink (tests and harnesses capture
/// frames this way). Blocks until shutdown; returns the first stage error,
/// which also stops the other stages.
pub fn run_with_sink(
    config: TxConfig,
    shutdown: Shutdown,
    sink: Box<dyn FrameSink>,
) -> anyhow::Result<()> {
    run_stages(config, shutdown, sink, None)
}

fn run_stages(
    config: TxConfig,
    shutdown: Shutdown,
    sink: Box<dyn FrameSink>,
    reloads: Option<ReloadSource>,
) -> anyhow::Result<()> {
    let key = config.key().context("auth.key_file")?;
    if sink.max_frame_len() < config.link.datagram_size {
        anyhow::bail!(
            "link.datagram_size {} exceeds what the link carries ({} bytes)",
            config.link.datagram_size,
            sink.max_frame_len()
        );
    }
    // Bound before anything starts, so that a port in use fails the start.
    let metrics_endpoint = weir_host::metrics::bind_configured(config.metrics.as_ref())?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state_dir {}", config.state_dir.display()))?;
    let store = Arc::new(
        objects::ObjectStore::open(&config.state_dir).with_context(|| {
            format!("opening the object store in {}", config.state_dir.display())
        })?,
    );
    let session_id = store.begin_session().context("starting a session")?;
    tracing::info!(session_id, key_id = key.id(), "gateway-tx starting");
    // One line each, so that each says what it is wherever logs are read.
    for line in config.summary().lines().filter(|l| !l.trim().is_empty()) {
        tracing::info!("config: {}", line.trim_end());
    }
    let pacing = config.pacing();
    if let Some(asked) = pacing.clamped_from {
        tracing::warn!(
            rate_bps = asked,
            baud = config.link.baud,
            pacing_bps = pacing.rate_bps,
            "link.rate_bps exceeds what the serial line carries (baud/10 bytes/s, COBS framing \
             counted); pacing to the line instead"
        );
    }

    let board = status::StatusBoard::new();
    board.update(|s| {
        s.link.transport = config.link.transport.to_string();
        s.link.target = config.link_target();
    });
    let faults = Arc::new(Faults::default());
    let control = Arc::new(carousel::CarouselControl::default());
    let (queue_tx, queue_rx) = std::sync::mpsc::channel();
    let settings = carousel::CarouselSettings::from_config(&config, &key)?;
    let intake =
        Reloadable::new(reload::IntakeSettings::from_config(&config).context("policy.rules_file")?);
    let puller = pull::Puller::new(
        &config,
        store.clone(),
        queue_tx.clone(),
        board.clone(),
        faults.clone(),
    )?
    .map(|p| p.with_settings(intake.reader()));
    let ingestor = ingest::Ingestor::new(&config, store.clone(), queue_tx, board.clone())?
        .with_faults(faults.clone())
        .with_settings(intake.reader());
    let key_id = key.id();
    let carousel = carousel::Carousel::new(
        settings,
        store.clone(),
        sink,
        key,
        session_id,
        queue_rx,
        board.clone(),
    )?
    .with_control(control.clone());
    let leds = config
        .leds
        .as_ref()
        .map(|l| Arc::new(Leds::new(&l.base, l.names())));
    let commands = console::TxCommands {
        board: board.clone(),
        control: control.clone(),
        store: store.clone(),
        faults: faults.clone(),
        key_id,
        passes: config.carousel.passes,
    };
    let console = stages::report::start_console(&config, commands, &shutdown);

    let status_path = config.status_path();
    let mut stages = Stages::new(&shutdown);
    stages.spawn("ingest", move |s| ingestor.run(s))?;
    if let Some(puller) = puller {
        stages.spawn("pull", move |s| puller.run(s))?;
    }
    stages.spawn("carousel", move |s| carousel.run(s).map_err(Into::into))?;
    stages.spawn("status", {
        let board = board.clone();
        move |s| {
            stages::report::write_status(&board, &status_path, s);
            Ok(())
        }
    })?;
    // Always running: a reload may turn the endpoint on, off, or move it.
    let metrics_listen = Reloadable::new(config.metrics.clone());
    stages.spawn("metrics", {
        let metrics = metrics::TxMetrics::new(board.clone(), config.state_dir.clone());
        let listen = metrics_listen.reader();
        move |s| {
            weir_host::metrics::serve_following(metrics_endpoint, listen, s, || metrics.render());
            Ok(())
        }
    })?;
    stages.spawn("panel", {
        let (leds, read) = (leds.clone(), stages::report::panel_inputs(board, faults));
        move |s| {
            appliance::run_panel(leds.as_deref(), s, read);
            Ok(())
        }
    })?;
    if let Some(reloads) = reloads {
        let mut reloader = reload::TxReloader {
            file: reloads.file,
            running: config.clone(),
            intake,
            leds: leds.clone(),
            metrics_listen,
        };
        stages.spawn("reload", move |s| {
            reloads.requests.serve(s, || drop(reloader.reload()));
            Ok(())
        })?;
    }
    let stopped = stages.join();
    let flushed = store.commit("tx.stopped").context("flushing state");
    // Dark only once the state is safe: a lit power LED means "do not pull".
    if let Some(l) = &leds {
        l.all_off();
    }
    if let Some(c) = console {
        c.join();
    }
    flushed?;
    tracing::info!(session_id, "gateway-tx stopped; state flushed");
    stopped
}

/// Every crash point of the sender (see `weir_host::crash`), roughly in the
/// order an image meets them. A test aborts the gateway at each in turn and
/// checks that the image is still delivered once after a restart.
pub const CRASH_POINTS: &[&str] = &[
    "tx.session.begun",
    "tx.objects.payload-stored",
    "tx.ingest.drop-committed",
    "tx.spool.moved",
    "tx.carousel.image-added",
    "tx.ingest.audit-appended",
    "tx.carousel.resend-armed",
    "tx.carousel.pruned",
    "tx.carousel.stopped",
    "tx.stopped",
];

#[cfg(test)]
mod crash_point_list {
    /// A commit point or step added to the code without being listed here
    /// would never be walked by the crash test.
    #[test]
    fn crash_points_lists_every_point_in_the_code() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        weir_host::crash::assert_points_listed(&src, super::CRASH_POINTS);
    }
}
