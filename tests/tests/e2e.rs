//! End to end: both gateways as real processes, a real registry on
//! loopback, and the lossy one-way link between them. Each test says what
//! it proves; each is bounded in time and stops by itself.

use anyhow::{Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weir_proto::{Body, FrameKind, FrameSealer, Heartbeat, Key};
use weir_test_support::{scrape, tools};
use weir_tests::diode::{
    kernel_udp_drops, kernel_udp_queued, Blackout, BurstLoss, Diode, DiodeConfig, DiodeHandle,
};
use weir_tests::imagegen::{self, DockerFlavor, LayerSpec};
use weir_tests::pair::{
    expect_within, layout_lists, rx_counter, Site, SiteOptions, Target, TEST_SECRET,
};
use weir_tests::registry::Registry;

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(150);

/// The registry, or a skip outside CI; in CI a missing registry is a
/// failure (the launcher's rule).
fn registry() -> Option<Registry> {
    Registry::start().expect("starting docker-registry")
}

fn layers(sizes: &[u64]) -> Vec<LayerSpec> {
    sizes.iter().map(|&size| LayerSpec { size }).collect()
}

fn diode_to(site: &Site, f: impl FnOnce(&mut DiodeConfig)) -> Result<DiodeHandle> {
    let mut cfg = DiodeConfig::new("127.0.0.1:0".parse()?, site.rx_addr);
    cfg.seed = 7;
    f(&mut cfg);
    Ok(Diode::spawn(cfg)?)
}

fn delivered(site: &Site, digest: &str) -> bool {
    site.rx_status().is_some_and(|s| {
        s["deliveries"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["manifest_digest"] == digest && d["state"] == "done")
    })
}

/// 1 and 7: every archive format crosses a link with loss, bursts,
/// corruption, duplicates and reordering, and the registry serves the
/// source's digests (the config digest for a docker-archive, whose layers
/// the sender compresses); the same image dropped again crosses once.
#[test]
fn every_format_crosses_a_faulty_link_with_digests_intact_and_a_redrop_crosses_once() -> Result<()>
{
    let Some(registry) = registry() else {
        return Ok(());
    };
    let opts = SiteOptions::default();
    let site = Site::new(Target::Registry(registry.url()), &opts)?;
    let work = site.dir.path();
    let docker = imagegen::docker_archive(
        work,
        "docker.tar",
        11,
        &layers(&[900_000, 300_000]),
        "quay.low.example:5000/team-a/app:1.0",
        DockerFlavor::Classic,
    )?;
    let oci = imagegen::oci_archive(
        work,
        "oci.tar",
        12,
        &layers(&[700_000, 200_000]),
        "team-b/svc:2.0",
    )?;
    let multi = imagegen::multiarch_oci_archive(
        work,
        "multi.tar",
        13,
        &[("linux", "amd64"), ("linux", "arm64")],
        &layers(&[400_000, 100_000]),
        "team-c/multi:3.0",
    )?;

    let mut rx = site.start_rx()?;
    let diode = diode_to(&site, |c| {
        c.loss = 0.03;
        c.burst = Some(BurstLoss {
            enter: 0.002,
            exit: 0.3,
            loss: 1.0,
        });
        c.corrupt = 0.002;
        c.duplicate = 0.01;
        c.reorder = 0.01;
    })?;
    site.write_tx_config(diode.local_addr(), &opts)?;
    let mut tx = site.start_tx()?;
    site.drop_image(&docker.path, "docker.tar")?;
    site.drop_image(&oci.path, "oci.tar")?;
    site.drop_image(&multi.path, "multi.tar")?;

    expect_within(
        "all three tags in the registry",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || {
            [
                ("team-a/app", "1.0"),
                ("team-b/svc", "2.0"),
                ("team-c/multi", "3.0"),
            ]
            .iter()
            .all(|(r, t)| matches!(registry.manifest_digest(r, t), Ok(Some(_))))
        },
    );

    let got = registry.verify_image("team-a/app", "1.0")?;
    assert_eq!(
        got.config_digests,
        vec![docker.config_digest.clone()],
        "docker-archive config digest"
    );
    let got = registry.verify_image("team-b/svc", "2.0")?;
    assert_eq!(
        Some(got.manifest_digest),
        oci.manifest_digest,
        "OCI manifest digest"
    );
    let mut want_blobs = oci.blob_digests.clone();
    want_blobs.sort();
    let mut have_blobs = got.blob_digests;
    have_blobs.sort();
    assert_eq!(
        have_blobs, want_blobs,
        "every OCI blob re-hashed from the registry"
    );
    let got = registry.verify_image("team-c/multi", "3.0")?;
    assert_eq!(
        Some(got.manifest_digest),
        multi.manifest_digest,
        "index digest"
    );
    assert_eq!(got.children, multi.children, "child manifests, in order");

    let faults = diode.stats().snapshot();
    assert!(
        faults.corrupted > 0 && faults.duplicated > 0 && faults.dropped_loss > 0,
        "{faults:?}"
    );
    // The sender keeps cycling: corrupted frames may all have come after the
    // receiver's last status; the counter catches up within a second.
    expect_within(
        "corrupted frames dropped by the tag check",
        Duration::from_secs(20),
        &mut [&mut tx, &mut rx],
        || rx_counter(&site, "frames_bad_tag") > 0,
    );

    // 7: the OCI image again, under another name: not sent again.
    site.drop_image(&oci.path, "oci-again.tar")?;
    expect_within(
        "the re-drop moved to done/ as already sent",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || {
            std::fs::read_to_string(site.spool.join("done/oci-again.tar.reason.json"))
                .is_ok_and(|t| t.contains("already-sent"))
        },
    );
    // status.json is rewritten every second: read one written after the
    // re-drop was handled, then the carousel must still hold three images.
    let handled_at = weir_host::clock::unix_ms() / 1000;
    expect_within(
        "a status.json written after the re-drop",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || {
            site.tx_status()
                .is_some_and(|s| s["updated_at"].as_u64() > Some(handled_at))
        },
    );
    let tx_status = site.tx_status().context("tx status")?;
    let tx_images = tx_status["images"].as_array().map(Vec::len);
    assert_eq!(
        tx_images,
        Some(3),
        "the re-drop added no image to the carousel: {tx_status:#}\n{}",
        tx.log_tail(40)
    );
    assert_eq!(
        registry.manifest_puts("team-b/svc", "2.0")?,
        1,
        "the tag was pushed once"
    );
    Ok(())
}

/// 2: a blackout longer than a whole pass: the image arrives by a later pass.
#[test]
fn a_blackout_longer_than_a_pass_is_bridged_by_a_later_pass() -> Result<()> {
    let opts = SiteOptions {
        rate_bps: 20_000_000,
        passes: 4,
        ..Default::default()
    };
    let out = tempfile::tempdir()?;
    let site = Site::new(Target::Layout(out.path().join("layout")), &opts)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        21,
        &layers(&[2_000_000]),
        "team-a/dark:1",
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;
    let mut rx = site.start_rx()?;
    // A pass of ~2.6 MB of frames at 20 Mb/s takes about 1 s; the blackout
    // covers the first four seconds from the sender's first datagram, so a
    // slow start cannot shrink what it swallows.
    let diode = diode_to(&site, |c| {
        c.blackouts = vec![Blackout {
            start: Duration::ZERO,
            duration: Duration::from_secs(4),
        }];
        c.blackouts_from_first_datagram = true;
    })?;
    site.write_tx_config(diode.local_addr(), &opts)?;
    let mut tx = site.start_tx()?;
    site.drop_image(&image.path, "img.tar")?;
    expect_within(
        "delivery into the layout",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || layout_lists(&out.path().join("layout"), &digest),
    );
    let c = diode.stats().snapshot();
    assert!(
        c.dropped_blackout > 1500,
        "the blackout swallowed at least a whole pass: {c:?}"
    );
    let pass = site
        .tx_status()
        .and_then(|s| s["pass"].as_u64())
        .unwrap_or(0);
    assert!(
        pass >= 1,
        "delivered by a pass after the first (tx pass {pass})"
    );
    Ok(())
}

/// 3: kill -9 of the receiver mid-transfer and of the sender mid-pass; both
/// restarted: the image is delivered and its tag pushed exactly once.
#[test]
fn kill_9_of_both_gateways_mid_transfer_still_delivers_each_tag_once() -> Result<()> {
    let Some(registry) = registry() else {
        return Ok(());
    };
    let opts = SiteOptions {
        rate_bps: 16_000_000,
        passes: 3,
        ..Default::default()
    };
    let site = Site::new(Target::Registry(registry.url()), &opts)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "big.tar",
        31,
        &layers(&[3_000_000, 3_000_000]),
        "team-a/crash:1",
    )?;
    let mut rx = site.start_rx()?;
    let diode = diode_to(&site, |c| c.loss = 0.02)?;
    site.write_tx_config(diode.local_addr(), &opts)?;
    let mut tx = site.start_tx()?;
    site.drop_image(&image.path, "big.tar")?;

    expect_within(
        "receiver mid-transfer",
        Duration::from_secs(60),
        &mut [&mut tx, &mut rx],
        || rx_counter(&site, "shards_stored") > 1500,
    );
    rx.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let mut rx = site.start_rx()?;
    expect_within(
        "sender mid-pass",
        Duration::from_secs(60),
        &mut [&mut tx, &mut rx],
        || {
            site.tx_status()
                .and_then(|s| s["wire"]["frames"].as_u64())
                .unwrap_or(0)
                > 3000
        },
    );
    tx.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let mut tx = site.start_tx()?;

    expect_within(
        "delivered after both crashes",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || matches!(registry.manifest_digest("team-a/crash", "1"), Ok(Some(_))),
    );
    let got = registry.verify_image("team-a/crash", "1")?;
    assert_eq!(Some(got.manifest_digest), image.manifest_digest);
    // Give a duplicate push the time it would need to show.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        registry.manifest_puts("team-a/crash", "1")?,
        1,
        "the tag was pushed once"
    );
    assert!(tx.is_running() && rx.is_running());
    Ok(())
}

/// 4: the registry is down while the image completes; started again later,
/// it gets the image.
#[test]
fn a_registry_down_while_images_complete_gets_them_once_it_is_back() -> Result<()> {
    let Some(mut registry) = registry() else {
        return Ok(());
    };
    let opts = SiteOptions::default();
    let site = Site::new(Target::Registry(registry.url()), &opts)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        41,
        &layers(&[1_000_000]),
        "team-a/patient:1",
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;
    registry.stop()?;
    let mut rx = site.start_rx()?;
    let diode = diode_to(&site, |c| c.loss = 0.03)?;
    site.write_tx_config(diode.local_addr(), &opts)?;
    let mut tx = site.start_tx()?;
    site.drop_image(&image.path, "img.tar")?;

    expect_within(
        "image complete, push failing",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || {
            rx_counter(&site, "images_complete") >= 1
                && rx_counter(&site, "push_attempts_failed") >= 1
        },
    );
    assert!(!delivered(&site, &digest));
    registry.restart()?;
    expect_within(
        "delivered once the registry is back",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || delivered(&site, &digest),
    );
    assert_eq!(
        registry.manifest_digest("team-a/patient", "1")?,
        Some(digest)
    );
    Ok(())
}

/// A one-way relay in front of the receiver that keeps copies of the first
/// frames it forwards, so a test can replay genuine frames.
struct Recorder {
    addr: SocketAddr,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    fn start(forward: SocketAddr, keep: usize) -> Result<Recorder> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let out = UdpSocket::bind("127.0.0.1:0")?;
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (frames.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let _ = out.send_to(&buf[..n], forward);
                    let mut kept = f.lock().unwrap();
                    if kept.len() < keep {
                        kept.push(buf[..n].to_vec());
                    }
                }
            }
        });
        Ok(Recorder { addr, frames, stop })
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends `frames` to gateway-rx's socket at `to` in runs its receive
/// buffer holds even at Debian's default `net.core.rmem_max`, each taken by
/// gateway-rx before the next is sent, so that every frame sent is one the
/// receiver must count. Returns the datagrams the kernel dropped at that
/// socket meanwhile (whoever sent them).
fn inject_drained(
    from: &UdpSocket,
    frames: &[Vec<u8>],
    to: SocketAddr,
    rx: &mut weir_tests::pair::Gateway,
) -> Result<u64> {
    let drops_before = kernel_udp_drops(to).context("gateway-rx's socket in /proc/net/udp")?;
    for run in frames.chunks(32) {
        for f in run {
            from.send_to(f, to)?;
        }
        expect_within(
            "gateway-rx's socket drained",
            Duration::from_secs(10),
            &mut [&mut *rx],
            || kernel_udp_queued(to) == Some(0),
        );
    }
    let drops_after = kernel_udp_drops(to).context("gateway-rx's socket in /proc/net/udp")?;
    Ok(drops_after.saturating_sub(drops_before))
}

/// 5 and 6: frames forged with a wrong key and under an unknown key id are
/// refused and counted while delivery goes on; replays of genuine frames,
/// sent once the image is delivered and the sender stopped, are refused and
/// counted each by its cause (a shard of an object the receiver holds whole
/// dropped unopened, any other frame as a replay); a drop the rules refuse
/// lands in rejected/ with its reason and never crosses.
#[test]
fn forged_and_replayed_frames_are_refused_and_refused_drops_never_cross() -> Result<()> {
    let rules = "namespaces:\n  - team-a\nrules:\n  - regex: 'team-a/.*:.*'\n    gate: High\n";
    let opts = SiteOptions {
        rules_yaml: Some(rules.into()),
        rate_bps: 20_000_000,
        ..Default::default()
    };
    let out = tempfile::tempdir()?;
    let layout = out.path().join("layout");
    let site = Site::new(Target::Layout(layout.clone()), &opts)?;
    let good = imagegen::oci_archive(
        site.dir.path(),
        "good.tar",
        51,
        &layers(&[1_500_000]),
        "team-a/app:1",
    )?;
    let refused = imagegen::oci_archive(
        site.dir.path(),
        "refused.tar",
        52,
        &layers(&[500_000]),
        "team-z/app:1",
    )?;
    let good_digest = good.manifest_digest.clone().context("digest")?;
    let refused_digest = refused.manifest_digest.clone().context("digest")?;
    // A clean Trivy report for the accepted image (a gate with no report fails closed).
    std::fs::write(
        site.spool.join("good.tar.scan.json"),
        r#"{"SchemaVersion":2,"ArtifactName":"team-a/app:1","Results":[{"Target":"app","Class":"os-pkgs","Type":"debian","Vulnerabilities":[{"VulnerabilityID":"CVE-1","Severity":"MEDIUM"}]}]}"#,
    )?;

    let mut rx = site.start_rx()?;
    const REPLAYED: u64 = 200;
    // Genuine frames a loaded loopback may drop before the replays arrive.
    const GENUINE_LOSS_ALLOWED: u64 = 5;
    let recorder = Recorder::start(site.rx_addr, REPLAYED as usize)?;
    site.write_tx_config(recorder.addr, &opts)?;
    let mut tx = site.start_tx()?;
    site.drop_image(&refused.path, "refused.tar")?;
    site.drop_image(&good.path, "good.tar")?;

    expect_within(
        "genuine frames recorded",
        Duration::from_secs(60),
        &mut [&mut tx, &mut rx],
        || recorder.frames.lock().unwrap().len() >= REPLAYED as usize,
    );
    let inject = UdpSocket::bind("127.0.0.1:0")?;
    let heartbeat = Body::Heartbeat(Heartbeat {
        uptime_s: 1,
        queued_objects: 0,
        pass: 0,
        config_fingerprint: 0,
        sent_frames: 0,
        ledger: None,
    });
    let mut forged = Vec::new();
    // Same key id as the real key, another secret: a forgery.
    let mut forger = FrameSealer::new(Key::from_bytes(1, &[0x66; 32])?, u64::MAX);
    for _ in 0..50 {
        let mut frame = Vec::new();
        forger.seal(&heartbeat, &mut frame);
        forged.push(frame);
    }
    // A key id the receiver does not hold.
    let mut stranger = FrameSealer::new(Key::from_bytes(9, &TEST_SECRET)?, u64::MAX);
    for _ in 0..30 {
        let mut frame = Vec::new();
        stranger.seal(&heartbeat, &mut frame);
        forged.push(frame);
    }
    // The sender's frames still arrive meanwhile, and a drop among them is
    // allowed; the counters below hold each forgery to account.
    inject_drained(&inject, &forged, site.rx_addr, &mut rx)?;
    expect_within(
        "good image delivered",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || layout_lists(&layout, &good_digest),
    );
    expect_within(
        "forgeries counted",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || rx_counter(&site, "frames_unknown_key") == 30,
    );
    assert_eq!(
        rx_counter(&site, "frames_bad_tag"),
        50,
        "exactly the forgeries failed the tag check"
    );

    // The replays: with the sender stopped and what it sent counted, every
    // frame the receiver counts from here on is one of them.
    tx.terminate(Duration::from_secs(20))?;
    let arrived = || {
        ["frames_accepted", "frames_replayed", "frames_held_unopened"]
            .iter()
            .map(|c| rx_counter(&site, c))
            .sum::<u64>()
    };
    let mut last = arrived();
    expect_within(
        "the sender's last frames counted",
        Duration::from_secs(20),
        &mut [&mut rx],
        || {
            std::thread::sleep(Duration::from_millis(1200));
            let now = arrived();
            std::mem::replace(&mut last, now) == now
        },
    );
    let before = |c: &str| rx_counter(&site, c);
    let (accepted, replayed, held) = (
        before("frames_accepted"),
        before("frames_replayed"),
        before("frames_held_unopened"),
    );
    // Each genuine frame is replayed twice. The image is delivered, so every
    // shard names an object held whole: dropped unopened, each copy. Any
    // other frame meets the replay window; one that a loaded loopback
    // dropped lets its first replay in as a first sight, which no receiver
    // could tell apart, and the second copies are refused whatever
    // happened to the first.
    let recorded = recorder.frames.lock().unwrap().clone();
    let shards = recorded
        .iter()
        .filter(|f| f.get(5) == Some(&(FrameKind::Shard as u8)))
        .count() as u64;
    let others = recorded.len() as u64 - shards;
    assert!(shards > 0 && others > 0, "{shards} shards, {others} others");
    for _ in 0..2 {
        let dropped = inject_drained(&inject, &recorded, site.rx_addr, &mut rx)?;
        assert_eq!(
            dropped, 0,
            "the kernel dropped replays at gateway-rx's socket"
        );
    }
    expect_within(
        "replays counted",
        Duration::from_secs(10),
        &mut [&mut rx],
        || {
            before("frames_held_unopened") - held == 2 * shards
                && (before("frames_replayed") - replayed) + (before("frames_accepted") - accepted)
                    == 2 * others
        },
    );
    let let_in = before("frames_accepted") - accepted;
    assert!(
        let_in <= GENUINE_LOSS_ALLOWED.min(others),
        "{let_in} replays accepted as first sights"
    );

    // 6: the refused drop, with its reason, never on the wire.
    let reason = std::fs::read_to_string(site.spool.join("rejected/refused.tar.reason.json"))
        .context("reason file beside the refused drop")?;
    let reason: serde_json::Value = serde_json::from_str(&reason)?;
    assert_eq!(reason["code"], "namespace-not-allowed", "{reason}");
    assert!(site.spool.join("rejected/refused.tar").exists());
    assert!(!layout_lists(&layout, &refused_digest));
    let rx_images = site.rx_status().context("rx status")?["images"].clone();
    assert!(
        !rx_images.to_string().contains(&refused_digest),
        "refused image reached the receiver: {rx_images}"
    );
    Ok(())
}

/// A free TCP port on 127.0.0.1 (free when asked).
fn free_tcp_addr() -> Result<SocketAddr> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?)
}

/// Both gateways serve `/metrics` while one image crosses into the
/// registry; each text passes `promtool check metrics` and counts what
/// happened: frames sent and accepted, the drop, the image complete, one
/// delivery, one push timed. SIGTERM still stops both cleanly.
#[test]
fn both_gateways_serve_metrics_that_promtool_accepts_and_that_count_the_crossing() -> Result<()> {
    let Some(promtool) = tools::or_skip(tools::PROMTOOL) else {
        return Ok(());
    };
    let Some(registry) = registry() else {
        return Ok(());
    };
    let (tx_metrics, rx_metrics) = (free_tcp_addr()?, free_tcp_addr()?);
    let opts = SiteOptions {
        passes: 1,
        tx_extra: format!("[metrics]\nlisten = \"{tx_metrics}\"\n"),
        rx_extra: format!("[metrics]\nlisten = \"{rx_metrics}\"\n"),
        ..SiteOptions::default()
    };
    let site = Site::new(Target::Registry(registry.url()), &opts)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        51,
        &layers(&[300_000]),
        "team-a/watched:1",
    )?;
    let mut rx = site.start_rx()?;
    // No diode: the sender sends straight to the receiver.
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut tx = site.start_tx()?;
    site.drop_image(&image.path, "img.tar")?;

    let delivered = "weir_rx_deliveries{target=\"registry\",state=\"done\"}";
    let mut rx_text = String::new();
    expect_within(
        "the delivery counted by gateway-rx's metrics",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || {
            rx_text = scrape::metrics(rx_metrics).unwrap_or_default();
            scrape::sample(&rx_text, delivered) == Some(1.0)
        },
    );
    // The sender's wire counters reach its status once a second.
    let mut tx_text = String::new();
    expect_within(
        "the drop counted by gateway-tx's metrics",
        Duration::from_secs(20),
        &mut [&mut tx, &mut rx],
        || {
            tx_text = scrape::metrics(tx_metrics).unwrap_or_default();
            scrape::sample(&tx_text, "weir_tx_drops_total{result=\"accepted\"}") == Some(1.0)
                && scrape::sample(&tx_text, "weir_tx_shard_frames_total").unwrap_or(0.0) > 0.0
        },
    );
    scrape::promtool_check(&promtool, &tx_text).context("gateway-tx's metrics")?;
    scrape::promtool_check(&promtool, &rx_text).context("gateway-rx's metrics")?;

    let tx_value = |series: &str| scrape::sample(&tx_text, series).unwrap_or(-1.0);
    assert!(tx_value("weir_tx_frames_total") > 0.0, "{tx_text}");
    assert!(
        tx_value("weir_tx_sent_bytes_total") > 300_000.0,
        "{tx_text}"
    );
    assert_eq!(tx_value("weir_tx_link_errors_total"), 0.0, "{tx_text}");
    assert!(tx_value("weir_tx_disk_free_bytes") > 0.0, "{tx_text}");
    let rx_value = |series: &str| scrape::sample(&rx_text, series).unwrap_or(-1.0);
    assert!(
        rx_value("weir_rx_frames_total{result=\"accepted\"}") > 0.0,
        "{rx_text}"
    );
    for (series, want) in [
        ("weir_rx_frames_total{result=\"bad_tag\"}", 0.0),
        ("weir_rx_frames_total{result=\"replayed\"}", 0.0),
        (
            "weir_rx_objects_total{kind=\"image\",result=\"verified\"}",
            1.0,
        ),
        ("weir_rx_images{state=\"complete\"}", 1.0),
        ("weir_rx_images_complete_total", 1.0),
        ("weir_rx_delivery_attempts_total{target=\"registry\"}", 1.0),
        ("weir_rx_delivery_failures_total{target=\"registry\"}", 0.0),
        (
            "weir_rx_push_duration_seconds_count{target=\"registry\"}",
            1.0,
        ),
        (
            "weir_rx_push_duration_seconds_bucket{target=\"registry\",le=\"+Inf\"}",
            1.0,
        ),
    ] {
        assert_eq!(rx_value(series), want, "{series} in\n{rx_text}");
    }
    assert!(rx_value("weir_rx_disk_free_bytes") > 0.0, "{rx_text}");
    assert_eq!(scrape::http_get(rx_metrics, "/")?.0, 404);
    assert!(registry.manifest_digest("team-a/watched", "1")?.is_some());

    for gw in [&mut tx, &mut rx] {
        let status = gw.terminate(Duration::from_secs(30))?;
        assert!(status.success(), "{} exited {status}", gw.name);
    }
    Ok(())
}
