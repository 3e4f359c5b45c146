//! Running the pair for longer than a test: retention keeps the receiver's
//! state disk from filling while images keep crossing, and SIGHUP reloads
//! the configuration of either gateway (a good file applied, a bad one
//! refused with its file and field named; the metrics endpoint moved,
//! closed and opened). Both gateways are real
//! processes; each test is bounded in time and stops by itself.

use anyhow::{Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use weir_test_support::scrape;
use weir_test_support::small_disk::SmallDisk;
use weir_tests::imagegen::{self, LayerSpec};
use weir_tests::pair::{
    expect_within, layout_lists, rx_counter, write_key, Site, SiteLinks, SiteOptions, Target,
};

fn layers(sizes: &[u64]) -> Vec<LayerSpec> {
    sizes.iter().map(|&size| LayerSpec { size }).collect()
}

fn log_has(log: &Path, needles: &[&str]) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().any(|l| needles.iter().all(|n| l.contains(n)))
}

/// Rules letting through any image of `namespaces`, no scan report asked.
fn rules_allowing(namespaces: &[&str]) -> String {
    format!(
        "namespaces: [{}]\nrules:\n  - regex: '.*'\n",
        namespaces.join(", ")
    )
}

/// A pair whose receiver's state disk is a 64 MiB tmpfs, delivering into
/// an OCI layout, with `rx_extra` in rx.toml and `state_min_free_mb` set;
/// it watches how full the disk gets. None (the test skips) where no
/// tmpfs can be mounted.
struct SmallRxDisk {
    // Dropped after the site's gateways, in field order.
    disk: SmallDisk,
    site: Site,
    opts: SiteOptions,
    layout: std::path::PathBuf,
    _out: tempfile::TempDir,
    peak: f64,
}

impl SmallRxDisk {
    fn new(rx_extra: &str, min_free_mb: u64) -> Result<Option<SmallRxDisk>> {
        let out = tempfile::tempdir()?;
        let layout = out.path().join("layout");
        let opts = SiteOptions {
            rate_bps: 80_000_000,
            tx_extra: "[ingest]\npoll_interval_ms = 100\n".into(),
            rx_extra: rx_extra.into(),
            ..Default::default()
        };
        let links = SiteLinks {
            rx_top: format!("state_min_free_mb = {min_free_mb}"),
            ..Default::default()
        };
        let site = Site::with_links(Target::Layout(layout.clone()), &opts, links)?;
        let Some(disk) = SmallDisk::mount(&site.rx_state, "64m") else {
            return Ok(None);
        };
        Ok(Some(SmallRxDisk {
            disk,
            site,
            opts,
            layout,
            _out: out,
            peak: 0.0,
        }))
    }

    /// Drops `img` as `name` and waits (120 s at most) until it is in the
    /// layout.
    fn deliver(
        &mut self,
        img: &imagegen::GeneratedImage,
        name: &str,
        tx: &mut weir_tests::pair::Gateway,
        rx: &mut weir_tests::pair::Gateway,
    ) -> Result<()> {
        let digest = img.manifest_digest.clone().context("digest")?;
        self.site.drop_image(&img.path, name)?;
        let (disk, layout, peak) = (&self.disk, &self.layout, &mut self.peak);
        expect_within(
            &format!("{name} delivered"),
            Duration::from_secs(120),
            &mut [tx, rx],
            || {
                *peak = peak.max(disk.usage().percent_used());
                layout_lists(layout, &digest)
            },
        );
        Ok(())
    }
}

/// Retention on a 64 MiB state disk: five images of about 20 MB cross one
/// after another, 100 MB in all. Delivered images are pruned as the disk
/// passes its high-water mark (50 %), and the rest once kept for
/// `keep_delivered_hours` (0.002 h, about 7 s): every image arrives, no
/// frame is ever dropped for a full disk, and the blob store ends empty.
/// Meanwhile the sender keeps cycling the images already sent: their
/// pruned objects are not stored again.
#[test]
fn a_small_state_disk_keeps_taking_new_images_as_delivered_ones_are_pruned() -> Result<()> {
    let Some(mut small) = SmallRxDisk::new(
        "[retention]\nkeep_delivered_hours = 0.002\nhigh_water_percent = 50\n",
        4,
    )?
    else {
        return Ok(());
    };
    let site = &small.site;
    let mut images = Vec::new();
    for n in 0..5u64 {
        let img = imagegen::oci_archive(
            site.dir.path(),
            &format!("img{n}.tar"),
            100 + n,
            &layers(&[10_000_000, 10_000_000]),
            &format!("team-a/big{n}:1"),
        )?;
        images.push(img);
    }
    let mut rx = site.start_rx()?;
    site.write_tx_config(site.rx_addr, &small.opts)?;
    let mut tx = site.start_tx()?;
    for (n, img) in images.iter().enumerate() {
        small.deliver(img, &format!("img{n}.tar"), &mut tx, &mut rx)?;
    }
    let (site, disk, mut peak) = (&small.site, &small.disk, small.peak);
    // Kept long enough: everything delivered leaves the blob store.
    let blobs = site.rx_state.join("blobs/sha256");
    expect_within(
        "the blob store emptied",
        Duration::from_secs(60),
        &mut [&mut tx, &mut rx],
        || {
            peak = peak.max(disk.usage().percent_used());
            std::fs::read_dir(&blobs).is_ok_and(|d| d.count() == 0)
        },
    );
    // Let the sender cycle the pruned images a while: nothing is stored.
    let stored = rx_counter(site, "shards_stored");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        rx_counter(site, "shards_stored"),
        stored,
        "pruned objects came back"
    );
    assert!(rx_counter(site, "shards_duplicate") > 0);
    assert_eq!(
        rx_counter(site, "frames_dropped_disk_full"),
        0,
        "the disk filled"
    );
    assert!(
        rx_counter(site, "objects_pruned") >= 20,
        "4 objects per image"
    );
    assert!(peak < 95.0, "state disk peaked at {peak:.0} %");
    assert!(log_has(
        &rx.log,
        &["pruned from the blob store", "digest=sha256:"]
    ));
    assert!(log_has(
        &rx.log,
        &[
            "pruned from the blob store",
            "rule=\"state disk past its high-water mark\""
        ]
    ));
    eprintln!("state disk peak {peak:.0} % of 64 MiB; 100 MB crossed");
    tx.kill9();
    rx.kill9();
    Ok(())
}

/// A floor above the high-water mark: on a 64 MiB state disk with
/// `state_min_free_mb = 30`, intake stops with about half the disk used,
/// long before a 99 % mark. Delivered objects kept for an hour would then
/// hold the room a second image needs. Retention counts the shortfall to
/// where intake resumes as pressure too, so the first image's objects go
/// and the second is delivered.
#[test]
fn a_state_disk_short_of_its_free_floor_prunes_delivered_objects_below_the_mark() -> Result<()> {
    let Some(mut small) = SmallRxDisk::new(
        "[retention]\nkeep_delivered_hours = 1\nhigh_water_percent = 99\n",
        30,
    )?
    else {
        return Ok(());
    };
    let mut rx = small.site.start_rx()?;
    small
        .site
        .write_tx_config(small.site.rx_addr, &small.opts)?;
    let mut tx = small.site.start_tx()?;
    for n in 0..2u64 {
        let img = imagegen::oci_archive(
            small.site.dir.path(),
            &format!("floor{n}.tar"),
            300 + n,
            &layers(&[10_000_000, 10_000_000]),
            &format!("team-a/floor{n}:1"),
        )?;
        small.deliver(&img, &format!("floor{n}.tar"), &mut tx, &mut rx)?;
    }
    let (site, peak) = (&small.site, small.peak);
    assert!(
        rx_counter(site, "objects_pruned") >= 1,
        "nothing was pruned, yet both images fit only if the first one's objects went"
    );
    assert!(log_has(
        &rx.log,
        &[
            "pruned from the blob store",
            "rule=\"state disk past its high-water mark\""
        ]
    ));
    assert!(peak < 99.0, "state disk peaked at {peak:.0} %");
    eprintln!("state disk peak {peak:.0} % of 64 MiB, floor 30 MiB free");
    tx.kill9();
    rx.kill9();
    Ok(())
}

/// SIGHUP on both sides. The receiver starts with key 1 while the sender
/// signs with key 2: frames are refused as an unknown key. Key 2 added to
/// rx.toml and a SIGHUP: the image is delivered, no restart. An edit of
/// rx.toml that does not validate is refused, naming file and field, and
/// the receiver goes on with what it had (key 2 included). The sender's
/// rules allow team-a only: a team-b drop is rejected; a rules file that
/// does not parse is refused on SIGHUP; rules allowing team-b and a SIGHUP,
/// and the same archive dropped again is accepted and delivered.
#[test]
fn sighup_applies_a_good_configuration_and_refuses_a_bad_one_on_both_sides() -> Result<()> {
    let out = tempfile::tempdir()?;
    let layout = out.path().join("layout");
    let opts = SiteOptions {
        rate_bps: 20_000_000,
        tx_extra: "[ingest]\npoll_interval_ms = 100\n".into(),
        rules_yaml: Some(rules_allowing(&["team-a"])),
        ..Default::default()
    };
    let site = Site::new(Target::Layout(layout.clone()), &opts)?;
    let work = site.dir.path();
    let key2 = work.join("2.key");
    write_key(&key2, b"the second key, added by reload!")?;
    site.write_tx_config(site.rx_addr, &opts)?;
    let tx_toml = std::fs::read_to_string(&site.tx_config)?
        .replace("key_id = 1", "key_id = 2")
        .replace(&site.key.display().to_string(), &key2.display().to_string());
    std::fs::write(&site.tx_config, tx_toml)?;
    let a = imagegen::oci_archive(work, "a.tar", 31, &layers(&[200_000]), "team-a/app:1")?;
    let b = imagegen::oci_archive(work, "b.tar", 32, &layers(&[200_000]), "team-b/svc:1")?;
    let (a_digest, b_digest) = (
        a.manifest_digest.clone().context("digest")?,
        b.manifest_digest.clone().context("digest")?,
    );
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;
    let (rx_log, tx_log) = (rx.log.clone(), tx.log.clone());

    site.drop_image(&b.path, "b.tar")?;
    site.drop_image(&a.path, "a.tar")?;
    expect_within(
        "team-b refused, team-a sent with key 2 and refused as unknown",
        Duration::from_secs(60),
        &mut [&mut tx, &mut rx],
        || {
            site.spool.join("rejected/b.tar").exists()
                && site.spool.join("done/a.tar").exists()
                && rx_counter(&site, "frames_unknown_key") > 100
        },
    );
    assert!(!layout_lists(&layout, &a_digest));

    // The receiver: key 2 added, then SIGHUP.
    let good_rx = std::fs::read_to_string(&site.rx_config)?
        + &format!(
            "\n[[auth.keys]]\nid = 2\nfile = {:?}\n",
            key2.display().to_string()
        );
    std::fs::write(&site.rx_config, &good_rx)?;
    rx.reload();
    expect_within(
        "delivery with the reloaded key",
        Duration::from_secs(90),
        &mut [&mut tx, &mut rx],
        || layout_lists(&layout, &a_digest),
    );
    assert!(
        log_has(&rx.log, &["configuration reloaded", "auth.keys"]),
        "{}",
        rx.log_tail(20)
    );

    // A bad edit: refused, file and field named; nothing changes.
    std::fs::write(
        &site.rx_config,
        good_rx.clone() + "[retention]\nhigh_water_percent = 0\n",
    )?;
    rx.reload();
    expect_within(
        "the bad rx.toml refused",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || {
            log_has(
                &rx_log,
                &[
                    "configuration not reloaded",
                    "rx.toml",
                    "retention.high_water_percent",
                ],
            )
        },
    );

    // The sender: a rules file that does not parse, then one that allows team-b.
    let rules = work.join("rules.yaml");
    std::fs::write(&rules, "namespaces: [team-a, team-b\nrules: []\n")?;
    tx.reload();
    expect_within(
        "the bad rules refused",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || {
            log_has(
                &tx_log,
                &["configuration not reloaded", "policy.rules_file"],
            )
        },
    );
    std::fs::write(&rules, rules_allowing(&["team-a", "team-b"]))?;
    tx.reload();
    expect_within(
        "the new rules in force",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || log_has(&tx_log, &["configuration reloaded: policy.rules_file"]),
    );
    site.drop_image(&b.path, "b-again.tar")?;
    let started = Instant::now();
    expect_within(
        "the team-b drop accepted and delivered (key 2 still accepted)",
        Duration::from_secs(90),
        &mut [&mut tx, &mut rx],
        || site.spool.join("done/b-again.tar").exists() && layout_lists(&layout, &b_digest),
    );
    eprintln!(
        "team-b delivered {:.1?} after the reload",
        started.elapsed()
    );
    assert!(rx.is_running() && tx.is_running());
    tx.terminate(Duration::from_secs(20))?;
    rx.terminate(Duration::from_secs(20))?;
    Ok(())
}

fn free_tcp_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Whether `addr` serves `/metrics` with `family` in it.
fn serves_metrics(addr: SocketAddr, family: &str) -> bool {
    scrape::metrics(addr).is_ok_and(|text| text.contains(family))
}

fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err()
}

/// SIGHUP moves the metrics endpoint of both gateways: a new
/// `[metrics] listen` port serves `/metrics` and the old one no longer
/// accepts connections, with no restart. A port that cannot be bound is
/// logged naming `[metrics] listen` and the endpoint stays where it was; an
/// address that does not parse is refused with the whole file; `[metrics]`
/// removed closes the endpoint.
#[test]
fn sighup_moves_the_metrics_endpoint_of_both_gateways() -> Result<()> {
    let out = tempfile::tempdir()?;
    let (tx_old, rx_old) = (free_tcp_addr()?, free_tcp_addr()?);
    let opts = SiteOptions {
        tx_extra: format!("[metrics]\nlisten = \"{tx_old}\"\n"),
        rx_extra: format!("[metrics]\nlisten = \"{rx_old}\"\n"),
        ..Default::default()
    };
    let site = Site::new(Target::Layout(out.path().join("layout")), &opts)?;
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;
    let sides = [
        ("rx", site.rx_config.clone(), rx_old, "weir_rx_build_info"),
        ("tx", site.tx_config.clone(), tx_old, "weir_tx_build_info"),
    ];
    expect_within(
        "both endpoints serving at their first address",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || sides.iter().all(|(_, _, a, f)| serves_metrics(*a, f)),
    );

    // A new port in each file, then SIGHUP.
    let mut moved = Vec::new();
    for (_, file, old, _) in &sides {
        let new = free_tcp_addr()?;
        let text = std::fs::read_to_string(file)?.replace(&old.to_string(), &new.to_string());
        std::fs::write(file, text)?;
        moved.push(new);
    }
    rx.reload();
    tx.reload();
    expect_within(
        "the new ports serve /metrics, the old ones are closed",
        Duration::from_secs(20),
        &mut [&mut tx, &mut rx],
        || {
            sides.iter().zip(&moved).all(|((_, _, old, family), new)| {
                serves_metrics(*new, family) && refuses_connections(*old)
            })
        },
    );
    for (gw, name) in [(&rx, "rx"), (&tx, "tx")] {
        assert!(
            log_has(&gw.log, &["configuration reloaded", "metrics.listen"]),
            "{name}: {}",
            gw.log_tail(20)
        );
        assert!(
            !log_has(&gw.log, &["restart to apply", "metrics"]),
            "{name}: {}",
            gw.log_tail(20)
        );
    }

    // A port another process holds: logged naming the field; the endpoint
    // stays where it was.
    let holder = TcpListener::bind("127.0.0.1:0")?;
    let busy = holder.local_addr()?;
    let rx_file = &site.rx_config;
    let rx_moved = std::fs::read_to_string(rx_file)?;
    std::fs::write(
        rx_file,
        rx_moved.replace(&moved[0].to_string(), &busy.to_string()),
    )?;
    rx.reload();
    let rx_log = rx.log.clone();
    expect_within(
        "the unbindable port named in the log",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || {
            log_has(
                &rx_log,
                &["[metrics] listen", &busy.to_string(), "cannot be bound"],
            )
        },
    );
    assert!(serves_metrics(moved[0], "weir_rx_build_info"));

    // An address that does not parse: the whole file is refused.
    std::fs::write(
        rx_file,
        rx_moved.replace(&moved[0].to_string(), "localhost-9464"),
    )?;
    rx.reload();
    expect_within(
        "the bad address refused with the file",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || {
            log_has(
                &rx_log,
                &["configuration not reloaded", "rx.toml", "metrics.listen"],
            )
        },
    );
    assert!(serves_metrics(moved[0], "weir_rx_build_info"));

    // [metrics] removed from tx.toml: the sender's endpoint closes.
    let tx_text = std::fs::read_to_string(&site.tx_config)?;
    let without: String = tx_text
        .lines()
        .filter(|l| *l != "[metrics]" && !l.starts_with("listen = "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, tx_text);
    std::fs::write(&site.tx_config, without)?;
    tx.reload();
    expect_within(
        "the sender's endpoint closed",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || refuses_connections(moved[1]),
    );
    drop(holder);
    assert!(rx.is_running() && tx.is_running());
    tx.terminate(Duration::from_secs(20))?;
    rx.terminate(Duration::from_secs(20))?;
    Ok(())
}
