//! Wires the receiver's stages together and runs them until shutdown.
//!
//! Threads: the link (receive; the tag check on up to four `rx-verify-N`
//! threads, the replay check in receive order on `rx-admit`; see
//! [`crate::stages::link`]), the store (this thread: shard batches and
//! commits), the decoder (Reed-Solomon repair), the finishers (sha256,
//! blob store, image completion; up to four `rx-finisher-N`, each object on
//! one), retention (pruning what was delivered,
//! [`crate::retention`]), the reload watcher (SIGHUP, when the binary runs
//! it; [`crate::reload`]), the status writer, the LED panel, the image
//! ledger's watch, the serial console and the metrics endpoint (if
//! configured), and a small tokio runtime for delivery. One module per
//! stage under [`crate::stages`].
//!
//! Shutdown goes in steps, so that nothing is lost and the LEDs go dark
//! last: the store closes its intake and commits; the link and the
//! workers stop; their last results are committed; delivery ends; the
//! reporting stops; the database is flushed; then the LEDs and the console.

use anyhow::Context;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use weir_host::reload::{ReloadSource, Reloadable};
use weir_host::stages::Stages;
use weir_host::Shutdown;
use weir_proto::ChainId;

use crate::appliance::{Faults, Intake, StateDisk};
use crate::blobs::BlobStore;
use crate::config::RxConfig;
use crate::delivery::DeliveryQueue;
use crate::images::ImageLedger;
use crate::ledger::HeldChains;
use crate::reload::RxReloader;
use crate::retention::{settled_objects, PrunedObjects, Retention, StoreNotice};
use crate::shards::{ShardStore, Work};
use crate::stages::deliver::DeliverStage;
use crate::stages::report::{self, Reporter};
use crate::stages::store::{DiskWatch, StagingUpkeep, StoreStage};
use crate::stages::{decode, finish, link};
use crate::state::{StateDb, StateError};
use crate::status::{Counters, SenderStatus};
use crate::verify::{SessionBook, Verifier};

pub use crate::stages::report::status;

/// Verified frame batches queued between the link and the store: about
/// 11 MiB of 1400-byte frames, enough to ride out an fsync.
const INBOUND_BATCHES: usize = 32;

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
    run_with_reloads(config, shutdown, None)
}

/// [`run`], reading `reloads.file` again whenever `reloads.requests` asks
/// (SIGHUP; see [`crate::reload`]).
pub fn run_with_reloads(
    config: RxConfig,
    shutdown: Shutdown,
    reloads: Option<ReloadSource>,
) -> anyhow::Result<()> {
    let keys = Reloadable::new(config.key_ring()?);
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state_dir {}", config.state_dir.display()))?;
    let db = StateDb::open(&db_dir(&config))?;
    let blobs = BlobStore::open(&blobs_dir(&config))?;
    let counters = Arc::new(Counters::default());
    let queue = DeliveryQueue::open(&db)?;
    let wake = Arc::new(Notify::new());
    let (notices, notices_rx) = mpsc::channel();
    let recovered = recover(&config, &db, &blobs, &queue, &counters, &wake, &notices)?;
    let (ledger, store) = (recovered.ledger, recovered.store);

    let delivery = DeliverStage::start(
        &config,
        queue.clone(),
        blobs.clone(),
        counters.clone(),
        wake,
    )?;
    let (source, listening) = link::open_source(&config)?;
    tracing::info!(listening = %listening, state_dir = %config.state_dir.display(),
        targets = ?crate::delivery::targets(&config).iter().map(|t| t.name()).collect::<Vec<_>>(),
        "gateway-rx started");
    let verifier = Verifier::new(
        (*keys.current()).clone(),
        Some(SessionBook::open(&db)?),
        counters.clone(),
    )?
    .with_session_horizon_hours(config.auth.max_session_ahead_hours)
    .with_key_updates(keys.reader());
    let sender = Arc::new(Mutex::new(None::<SenderStatus>));
    let (inbound_tx, inbound) = mpsc::sync_channel(INBOUND_BATCHES);
    let (result_tx, results) = mpsc::channel();
    let (decode, decode_rx) = mpsc::channel();

    // Intake: stopped first, once the store no longer takes frames.
    let mut intake = Stages::new(&shutdown);
    intake.spawn("rx-link", {
        let (sender, size) = (sender.clone(), config.link.datagram_size);
        let held = store.held();
        move |s| {
            let workers = link::verify_workers();
            link::receive(
                source,
                verifier,
                held,
                size,
                workers,
                inbound_tx,
                sender,
                s.clone(),
            )
            .context("starting the frame verification threads")
        }
    })?;
    intake.spawn("rx-decoder", {
        let result_tx = result_tx.clone();
        move |s| {
            decode::run_decoder(decode_rx, result_tx, s);
            Ok(())
        }
    })?;
    let names = finish::finisher_names();
    let (finishers, inboxes) = finish::Finishers::new(names.len());
    for (&name, inbox) in names.iter().zip(inboxes) {
        intake.spawn(name, {
            let (blobs, ledger, counters) = (blobs.clone(), ledger.clone(), counters.clone());
            let result_tx = result_tx.clone();
            move |s| {
                finish::run_finisher(inbox, result_tx, blobs, ledger, counters, s);
                Ok(())
            }
        })?;
    }
    drop(result_tx);
    let retention = Reloadable::new(config.retention);
    let pruning = Retention {
        ledger: ledger.clone(),
        blobs,
        queue: queue.clone(),
        pruned: recovered.pruned,
        db: db.clone(),
        state_dir: config.state_dir.clone(),
        policy: retention.reader(),
        notices,
        counters: counters.clone(),
        keep_records: config.ledger.keep_records,
        min_free_bytes: config.state_min_free_mb.saturating_mul(1 << 20),
    };
    intake.spawn("rx-retention", move |s| {
        pruning.run(s);
        Ok(())
    })?;

    // Reporting: stopped last, once the state it shows is settled.
    let board = Arc::new(Mutex::new(store.progress()));
    let reporter = Arc::new(Reporter {
        state_dir: config.state_dir.clone(),
        counters: counters.clone(),
        board: board.clone(),
        ledger: ledger.clone(),
        queue,
        sender,
        listening,
        faults: Arc::new(Faults::default()),
        gauge: Default::default(),
        gap_alert_hours: config.ledger.gap_alert_hours,
    });
    let metrics_listen = Reloadable::new(config.metrics.clone());
    let reporting = report::start_reporting(
        &config,
        &reporter,
        keys.clone(),
        &metrics_listen,
        delivery.stats(),
        delivery.webhook_switch(),
        &shutdown,
    )?;
    if let Some(reloads) = reloads {
        let mut reloader = RxReloader {
            file: reloads.file,
            running: config.clone(),
            keys,
            ledger,
            webhook: delivery.webhook_switch(),
            leds: reporting.leds.clone(),
            retention: retention.clone(),
            metrics_listen,
        };
        intake.spawn("rx-reload", move |s| {
            reloads.requests.serve(s, || drop(reloader.reload()));
            Ok(())
        })?;
    }

    let disk = StateDisk::new(&config.state_dir, config.state_min_free_mb, Intake::Shards);
    let mut store = StoreStage {
        store,
        disk: DiskWatch::new(disk, reporter.faults.clone(), counters.clone()),
        inbound,
        results,
        decode,
        finish: finishers,
        board,
        upkeep: StagingUpkeep::new(notices_rx, retention.reader(), counters),
    };
    store.dispatch(recovered.work);
    let settling = store.run(&shutdown);
    delivery.ask_to_stop();
    let intake_stopped = intake.join();
    settling.settle();
    delivery.stop();
    let reporting_stopped = reporting.stages.join();
    let flushed = db.commit("rx.stopped");
    // Dark only once the state is safe: a lit power LED means "do not pull".
    if let Some(l) = &reporting.leds {
        l.all_off();
    }
    if let Some(c) = reporting.console {
        c.join();
    }
    flushed?;
    // The last word: everything above is flushed.
    report::last_word(&reporter);
    tracing::info!("gateway-rx stopped");
    intake_stopped.and(reporting_stopped)
}

/// The durable state as a restart finds it, recovered.
struct Recovered {
    ledger: Arc<ImageLedger>,
    store: ShardStore,
    /// Blocks to decode and objects to finish, left over from the last run.
    work: Vec<Work>,
    pruned: PrunedObjects,
}

/// Opens the image ledger and the shard store in the order recovery needs
/// (see [`crate::images`]): the ledger's recheck first (it finishes prunes
/// a crash cut short and records what the blob store holds), then the
/// shard store, which releases the staging of objects already verified.
fn recover(
    config: &RxConfig,
    db: &StateDb,
    blobs: &BlobStore,
    queue: &DeliveryQueue,
    counters: &Arc<Counters>,
    wake: &Arc<Notify>,
    notices: &mpsc::Sender<StoreNotice>,
) -> anyhow::Result<Recovered> {
    let ledger = ImageLedger::open(
        db,
        blobs.clone(),
        queue.clone(),
        config,
        counters.clone(),
        Some(wake.clone()),
    )?
    .with_store_notices(notices.clone());
    let resumed = ledger.recheck()?;
    if !resumed.is_empty() {
        tracing::info!(images = resumed.len(), "images completed at restart");
    }
    let pruned = PrunedObjects::open(db)?;
    let (store, work) = ShardStore::open_with_limits(
        db,
        &staging_dir(config),
        settled_objects(blobs, &pruned)?,
        counters.clone(),
        config.limits.into(),
    )?;
    Ok(Recovered {
        ledger: Arc::new(ledger),
        store,
        work,
        pruned,
    })
}

/// Forgets the newest sender session remembered for `key_id` (every key
/// id if None); returns what was forgotten. Refuses while a gateway runs on
/// this state directory.
pub fn forget_session(config: &RxConfig, key_id: Option<u16>) -> anyhow::Result<Vec<(u16, u64)>> {
    let db = StateDb::open_now(&db_dir(config)).with_context(|| {
        format!(
            "opening {} (stop gateway-rx first)",
            db_dir(config).display()
        )
    })?;
    let gone = SessionBook::open(&db)?.forget(key_id)?;
    db.commit("rx.operator.forget-session")?;
    for (key_id, session) in &gone {
        tracing::warn!(
            key_id,
            session_id = session,
            "sender session forgotten by the operator"
        );
    }
    Ok(gone)
}

/// The state database of a gateway that is not running; `why` says, when
/// one runs, why the command waits for it to stop.
fn open_stopped(config: &RxConfig, why: &str) -> anyhow::Result<StateDb> {
    match StateDb::open_now(&db_dir(config)) {
        Ok(db) => Ok(db),
        Err(StateError::Locked { .. }) => anyhow::bail!(
            "gateway-rx runs and holds {}: stop it first ({why})",
            db_dir(config).display()
        ),
        Err(e) => {
            Err(anyhow::Error::from(e).context(format!("opening {}", db_dir(config).display())))
        }
    }
}

/// `forget-image`: the operator gives up on the images of
/// `manifest_digest` still receiving (see
/// [`ImageLedger::forget_receiving`]). Refuses while a gateway runs on this
/// state directory. Returns the references of the images forgotten.
pub fn forget_image(config: &RxConfig, manifest_digest: &str) -> anyhow::Result<Vec<String>> {
    let db = open_stopped(
        config,
        "an image is forgotten with the gateway stopped, so that no blob of it is verified meanwhile",
    )?;
    let ledger = ImageLedger::open(
        &db,
        BlobStore::open(&blobs_dir(config))?,
        DeliveryQueue::open(&db)?,
        config,
        Arc::default(),
        None,
    )?;
    let gone = ledger.forget_receiving(manifest_digest)?;
    let mut references = Vec::new();
    for (image, record) in gone {
        tracing::warn!(digest = %record.manifest_digest, reference = %record.reference(), image = %image,
            blobs = record.blobs.len(),
            "OPERATOR: image still receiving forgotten; its image object is pruned and its blobs \
             are left to retention");
        references.push(record.reference());
    }
    Ok(references)
}

/// `ledger accept`: the operator trusts `chain` from record `from` on, its
/// first record never to come (see [`crate::ledger`]). Refuses while a
/// gateway runs on this state directory; the images waiting are admitted
/// at the gateway's next start. Returns the images of the chain waiting
/// now from `from` on.
pub fn accept_chain(config: &RxConfig, chain: ChainId, from: u64) -> anyhow::Result<u64> {
    let db = open_stopped(
        config,
        "the chain is accepted with the gateway stopped, and its waiting images are admitted \
         when it starts again",
    )?;
    let chains = HeldChains::open(&db)?;
    let waiting = chains
        .waiting_chains()?
        .into_iter()
        .find(|w| w.chain == chain);
    chains
        .accept_from(chain, from, crate::state::now_ms())
        .with_context(|| format!("chain {chain} not accepted"))?;
    db.commit("rx.operator.ledger-accept")?;
    let admitted = waiting.map_or(0, |w| w.images);
    tracing::warn!(chain = %chain, from_seq = from, images_waiting = admitted,
        "OPERATOR: image ledger chain {chain} accepted from seq {from} without its first \
         record; its records from seq {from} on are admitted (the waiting ones when \
         gateway-rx starts), the ones below it never");
    Ok(admitted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::StatusReport;
    use std::net::SocketAddr;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::{Duration, Instant};
    use weir_host::reload::ReloadSource;
    use weir_proto::Key;
    use weir_proto::ObjectId;
    use weir_test_support::{
        registry_or_skip, sample_image, sample_index, SampleImage, TestRegistry, TestSender,
    };

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

    fn free_tcp_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// The metrics endpoint at `addr` shows the counters of `report` (read
    /// before it: counters only grow, and nothing moves once delivered).
    fn assert_metrics_agree(addr: SocketAddr, report: &StatusReport) {
        use weir_test_support::scrape::{self, sample};
        let text = scrape::metrics(addr).unwrap();
        let c = &report.counters;
        for (series, want) in [
            ("weir_rx_frames_total{result=\"bad_tag\"}", c.frames_bad_tag),
            (
                "weir_rx_frames_total{result=\"unknown_key\"}",
                c.frames_unknown_key,
            ),
            ("weir_rx_blocks_repaired_total", c.blocks_repaired),
            ("weir_rx_objects_total{kind=\"blob\",result=\"failed\"}", 1),
            ("weir_rx_images{state=\"complete\"}", 1),
            (
                "weir_rx_deliveries{target=\"oci-layout\",state=\"done\"}",
                1,
            ),
            ("weir_rx_delivery_attempts_total{target=\"oci-layout\"}", 1),
            (
                "weir_rx_push_duration_seconds_count{target=\"oci-layout\"}",
                1,
            ),
        ] {
            assert_eq!(
                sample(&text, series),
                Some(want as f64),
                "{series} in\n{text}"
            );
        }
        let accepted = sample(&text, "weir_rx_frames_total{result=\"accepted\"}").unwrap();
        assert!(accepted >= c.frames_accepted as f64, "{text}");
        if let Some(promtool) =
            weir_test_support::tools::or_skip(weir_test_support::tools::PROMTOOL)
        {
            scrape::promtool_check(&promtool, &text).unwrap();
        }
        assert_eq!(scrape::http_get(addr, "/").unwrap().0, 404);
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
            Self::start_reloading(config, None)
        }

        /// Started as the binary starts it, taking reloads from `reloads`.
        fn start_reloading(config: &RxConfig, reloads: Option<ReloadSource>) -> Running {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .try_init();
            let shutdown = Shutdown::new();
            let thread = std::thread::spawn({
                let config = config.clone();
                let shutdown = shutdown.clone();
                move || run_with_reloads(config, shutdown, reloads)
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
        let metrics = free_tcp_port();
        let config = write_config(
            dir.path(),
            addr,
            &format!("[metrics]\nlisten = \"{metrics}\"\n"),
        );
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
        assert_metrics_agree(metrics, &report);
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

    /// The state a crash leaves between the finisher's rename into the blob
    /// store and the image ledger's commit: every object verified on disk,
    /// none recorded. The restarted gateway delivers the image with no frame
    /// sent again.
    #[test]
    fn objects_verified_on_disk_but_never_recorded_are_delivered_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_udp_port();
        let config = write_config(dir.path(), addr, "");
        let img = sample_image("team/app", &["3.0"], 2, 40_000);
        let store = BlobStore::open(&blobs_dir(&config)).unwrap();
        for (_, bytes) in img.objects() {
            store.insert_bytes(&bytes).unwrap();
        }
        let gw = Running::start(&config);
        let report = gw.wait_for("delivery of the recovered image", |r| {
            r.counters.pushes_done == 1
        });
        assert_eq!(report.counters.images_complete, 1);
        assert_eq!(report.counters.frames_accepted, 0);
        let out = dir.path().join("out");
        assert_eq!(
            layout_names(&out),
            vec![("team/app:3.0".to_string(), img.tm.manifest.digest.clone())]
        );
        assert_layout_blobs_hash(&out, &img);
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

    /// A sender holding the HMAC key signs image objects whose ledger
    /// records contradict the chain the receiver holds: another image as
    /// record 2, and a record 3 that skips record 2. Both are refused and
    /// counted, and their images never land; the genuine chain goes on. A
    /// head announcing record 3 before it arrives is a gap (fault) once
    /// `gap_alert_hours` pass, cleared when record 3's image completes.
    #[test]
    fn forged_ledger_records_are_refused_and_their_images_never_land() {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_udp_port();
        // About a second.
        let config = write_config(dir.path(), addr, "[ledger]\ngap_alert_hours = 0.0003\n");
        let gw = Running::start(&config);
        let mut tx = TestSender::new(key(), 6000, addr, 1400, 8, 4);
        let genesis = sample_image("team/a", &["1"], 1, 3_000);
        let chain = genesis.tm.ledger.chain;
        let second = sample_image("team/a", &["2"], 1, 3_000).following(&genesis.tm.ledger.head());
        let third = sample_image("team/a", &["3"], 1, 3_000).following(&second.tm.ledger.head());
        let sent = |tx: &mut TestSender, img: &SampleImage| {
            tx.pass(&img.objects());
        };
        sent(&mut tx, &genesis);
        sent(&mut tx, &second);
        gw.wait_for("the genuine records delivered", |r| {
            r.counters.pushes_done == 2
        });

        let forged = sample_image("evil/x", &["2"], 1, 3_000).following(&genesis.tm.ledger.head());
        let mut skipping =
            sample_image("evil/x", &["3"], 1, 3_000).following(&genesis.tm.ledger.head());
        skipping.tm.ledger.seq = 3;
        sent(&mut tx, &forged);
        sent(&mut tx, &skipping);
        let r = gw.wait_for("both forged records refused", |r| {
            r.counters.ledger_records_refused == 2
        });
        assert_eq!(r.counters.images_complete, 2, "{:#?}", r.counters);
        let ledger = r.ledger.unwrap();
        assert_eq!(ledger.records_refused, 2);

        tx.heartbeat(Some(third.tm.ledger.head()));
        let r = gw.wait_for("a gap for record 3", |r| {
            r.ledger.as_ref().is_some_and(|l| l.missing == 1)
        });
        assert!(
            r.render().contains("ledger gaps: 1 images"),
            "{}",
            r.render()
        );
        let ledger = r.ledger.unwrap();
        assert_eq!(ledger.chain, Some(chain));
        assert_eq!((ledger.head_announced, ledger.highest_contiguous), (3, 2));
        assert_eq!((ledger.gaps[0].from, ledger.gaps[0].to), (3, 3));
        let fault = gw.wait_for("the ledger fault", |r| r.fault.is_some()).fault;
        assert!(fault.unwrap().contains("ledger gap"));

        sent(&mut tx, &third);
        let r = gw.wait_for("record 3 delivered and the gap cleared", |r| {
            r.counters.pushes_done == 3
                && r.fault.is_none()
                && r.ledger.as_ref().is_some_and(|l| l.missing == 0)
        });
        assert_eq!(r.ledger.unwrap().highest_contiguous, 3);
        let mut names: Vec<String> = layout_names(&dir.path().join("out"))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.sort();
        assert_eq!(names, vec!["team/a:1", "team/a:2", "team/a:3"]);
        gw.stop();

        // Stopped: the refusals and the chain are in the database.
        let offline = status(&config).unwrap();
        let ledger = offline.ledger.unwrap();
        assert_eq!((ledger.records_refused, ledger.highest_contiguous), (2, 3));
        let verified = crate::ledger::report::verify(&config).unwrap();
        assert!(verified.bad.is_none(), "{:?}", verified.bad);
        assert_eq!(verified.chains, vec![(chain, 3)]);
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

    /// A second key added to the file and a reload: the sender signing
    /// with it is accepted without a restart. A later edit that does not
    /// validate changes nothing: the key stays accepted.
    #[test]
    fn a_reload_adds_a_key_without_a_restart_and_a_bad_edit_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_udp_port();
        let config = write_config(dir.path(), addr, "");
        let requests = weir_host::reload::ReloadRequests::new();
        let reloads = ReloadSource {
            file: config.source.clone(),
            requests: requests.clone(),
        };
        let gw = Running::start_reloading(&config, Some(reloads));
        let second = [9u8; 32];
        let mut tx = TestSender::new(Key::from_bytes(2, &second).unwrap(), 6000, addr, 1400, 8, 2);
        let first = sample_image("team/rekeyed", &["1"], 1, 5_000);
        tx.pass(&first.objects());
        gw.wait_for("key 2 refused as unknown", |r| {
            r.counters.frames_unknown_key > 0
        });

        let key_path = dir.path().join("2.key");
        std::fs::write(&key_path, hex::encode(second)).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let good = std::fs::read_to_string(&config.source).unwrap()
            + &format!("[[auth.keys]]\nid = 2\nfile = \"{}\"\n", key_path.display());
        std::fs::write(&config.source, &good).unwrap();
        requests.request();
        gw.wait_or(
            "delivery signed with the reloaded key",
            Duration::from_secs(60),
            |r| r.counters.pushes_done == 1,
            &mut every_few_seconds(|| {
                tx.pass(&first.objects());
            }),
        );

        std::fs::write(
            &config.source,
            good + "[retention]\nhigh_water_percent = 0\n",
        )
        .unwrap();
        requests.request();
        let later = sample_image("team/rekeyed", &["2"], 1, 6_000);
        gw.wait_or(
            "delivery after a refused edit",
            Duration::from_secs(60),
            |r| r.counters.pushes_done == 2,
            &mut every_few_seconds(|| {
                tx.pass(&later.objects());
            }),
        );
        let names = layout_names(&dir.path().join("out"));
        assert_eq!(names.len(), 2, "{names:?}");
        gw.stop();
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
