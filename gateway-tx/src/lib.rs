//! gateway-tx: the low-side gateway of weir.
//!
//! ```text
//!  spool_dir ──▶ ingest ──▶ policy ──▶ objects (sled + payload files)
//!                                          │
//!                              carousel ◀──┘ ──▶ FEC ──▶ seal (HMAC) ──▶ pacing ──▶ link
//! ```
//!
//! One module per stage: [`config`], [`ingest`], [`policy`], [`objects`],
//! [`carousel`], [`pacing`], [`link`], plus [`status`] (`status.json`) and
//! the appliance surface: [`appliance`] (faults, the state disk guard, the
//! status LEDs) and [`console`] (the serial console's commands).
//! [`run`] starts the stages on threads of their own and returns once
//! shutdown was asked for and the state is flushed; the LEDs go dark last.

// statvfs, for the state disk's free space, has no safe wrapper in std.
#[allow(unsafe_code)]
pub mod appliance;
pub mod carousel;
pub mod config;
pub mod console;
pub mod ingest;
pub mod link;
pub mod objects;
pub mod pacing;
pub mod policy;
pub mod status;

use anyhow::Context;
use appliance::{Fault, Faults, Lights, Movement};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_host::{Console, FrameSink, Leds, Shutdown};

/// The link LED stays on while frames went out this recently.
const LINK_WINDOW: Duration = Duration::from_secs(3);
/// The activity LED blinks while shard frames went out this recently.
const ACTIVITY_WINDOW: Duration = Duration::from_secs(2);

/// The body of one stage thread.
type StageFn = Box<dyn FnOnce(&Shutdown) -> anyhow::Result<()> + Send>;

pub use config::TxConfig;

/// Runs the sender on the configured link until `shutdown` is triggered.
pub fn run(config: TxConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    config.validate().context("configuration")?;
    let sink = link::open_sink(&config.link)?;
    run_with_sink(config, shutdown, sink)
}

/// Runs the sender on a given frame sink (tests and harnesses capture
/// frames this way). Blocks until shutdown; returns the first stage error,
/// which also stops the other stages.
pub fn run_with_sink(
    config: TxConfig,
    shutdown: Shutdown,
    sink: Box<dyn FrameSink>,
) -> anyhow::Result<()> {
    let key = config.key().context("auth.key_file")?;
    if sink.max_frame_len() < config.link.datagram_size {
        anyhow::bail!(
            "link.datagram_size {} exceeds what the link carries ({} bytes)",
            config.link.datagram_size,
            sink.max_frame_len()
        );
    }
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state_dir {}", config.state_dir.display()))?;
    let store = Arc::new(
        objects::ObjectStore::open(&config.state_dir).with_context(|| {
            format!("opening the object store in {}", config.state_dir.display())
        })?,
    );
    let session_id = store.begin_session().context("starting a session")?;
    tracing::info!(
        session_id,
        key_id = key.id(),
        "gateway-tx starting\n{}",
        config.summary()
    );
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
    let ingestor = ingest::Ingestor::new(&config, store.clone(), queue_tx, board.clone())?
        .with_faults(faults.clone());
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
    let console = config.console.as_ref().and_then(|c| {
        let commands = console::TxCommands {
            board: board.clone(),
            control: control.clone(),
            store: store.clone(),
            faults: faults.clone(),
            key_id,
            passes: config.carousel.passes,
        };
        // A broken console must not stop images from crossing.
        Console::spawn(
            &c.device,
            c.baud,
            "tx",
            env!("CARGO_PKG_VERSION"),
            Arc::new(commands),
            shutdown.clone(),
        )
        .inspect_err(
            |e| tracing::error!(error = %e, "serial console unavailable; running without it"),
        )
        .ok()
    });
    let panel_inputs = {
        let board = board.clone();
        let faults = faults.clone();
        let mut frames = Movement::default();
        let mut shards = Movement::default();
        let mut errors = Movement::default();
        move || {
            let now = Instant::now();
            let s = board.snapshot();
            frames.observe(s.wire.frames, now);
            shards.observe(s.wire.shard_frames, now);
            errors.observe(s.wire.link_errors, now);
            let up = frames.moved_within(LINK_WINDOW, now);
            if !up && errors.moved_within(LINK_WINDOW, now) {
                let why = s.wire.last_link_error.as_deref().unwrap_or("sends fail");
                faults.raise(Fault::LinkFailing, format!("link failing: {why}"));
            } else {
                faults.clear(Fault::LinkFailing);
            }
            let fault = faults.reason();
            board.update(|st| {
                st.link.up = up;
                st.fault.clone_from(&fault);
            });
            Lights {
                link: up,
                activity: !s.paused && shards.moved_within(ACTIVITY_WINDOW, now),
                fault,
            }
        }
    };

    let status_path = config.status_path();
    let stage = |name: &'static str, shutdown: Shutdown, f: StageFn| {
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let r = f(&shutdown);
                if let Err(e) = &r {
                    tracing::error!(stage = name, error = %format!("{e:#}"), "stage failed; stopping");
                    shutdown.trigger();
                }
                r
            })
            .with_context(|| format!("spawning the {name} thread"))
    };
    let threads = vec![
        (
            "ingest",
            stage(
                "ingest",
                shutdown.clone(),
                Box::new(move |s| ingestor.run(s)),
            )?,
        ),
        (
            "carousel",
            stage(
                "carousel",
                shutdown.clone(),
                Box::new(move |s| carousel.run(s).map_err(Into::into)),
            )?,
        ),
        (
            "status",
            stage(
                "status",
                shutdown.clone(),
                Box::new(move |s| loop {
                    if let Err(e) = board.write(&status_path) {
                        tracing::warn!(path = %status_path.display(), error = %e, "writing status.json failed");
                    }
                    if s.sleep(Duration::from_secs(1)) {
                        let _ = board.write(&status_path);
                        return Ok(());
                    }
                }),
            )?,
        ),
        (
            "panel",
            stage("panel", shutdown.clone(), {
                let leds = leds.clone();
                Box::new(move |s| {
                    appliance::run_panel(leds.as_deref(), s, panel_inputs);
                    Ok(())
                })
            })?,
        ),
    ];
    let mut first_error = None;
    for (name, t) in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e.context(format!("{name} stage")));
            }
            Err(_) => {
                shutdown.trigger();
                first_error.get_or_insert(anyhow::anyhow!("{name} thread panicked"));
            }
        }
    }
    let flushed = store.commit().context("flushing state");
    // Dark only once the state is safe: a lit power LED means "do not pull".
    if let Some(l) = &leds {
        l.all_off();
    }
    if let Some(c) = console {
        c.join();
    }
    flushed?;
    tracing::info!(session_id, "gateway-tx stopped; state flushed");
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
