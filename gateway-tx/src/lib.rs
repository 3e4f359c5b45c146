//! gateway-tx: the low-side gateway of weir.
//!
//! ```text
//!  spool_dir ──▶ ingest ──▶ policy ──▶ objects (sled + payload files)
//!                                          │
//!                              carousel ◀──┘ ──▶ FEC ──▶ seal (HMAC) ──▶ pacing ──▶ link
//! ```
//!
//! One module per stage: [`config`], [`ingest`], [`policy`], [`objects`],
//! [`carousel`], [`pacing`], [`link`], plus [`status`] (`status.json`).
//! [`run`] starts the stages on threads of their own and returns once
//! shutdown was asked for and the state is flushed.

pub mod carousel;
pub mod config;
pub mod ingest;
pub mod link;
pub mod objects;
pub mod pacing;
pub mod policy;
pub mod status;

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use weir_proto::{FrameSink, Shutdown};

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

    let board = status::StatusBoard::new();
    let (queue_tx, queue_rx) = std::sync::mpsc::channel();
    let settings = carousel::CarouselSettings::from_config(&config, &key)?;
    let ingestor = ingest::Ingestor::new(&config, store.clone(), queue_tx, board.clone())?;
    let carousel = carousel::Carousel::new(
        settings,
        store.clone(),
        sink,
        key,
        session_id,
        queue_rx,
        board.clone(),
    )?;

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
    store.commit().context("flushing state")?;
    tracing::info!(session_id, "gateway-tx stopped; state flushed");
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
