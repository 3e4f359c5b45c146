//! The image ledger end to end: both gateways as real processes, the
//! one-way link between them, images delivered into an OCI layout.
//!
//! - one image's frames never arrive (a diode filter drops its image
//!   object in every pass): the receiver raises a gap (status, fault,
//!   webhook `missing`), its signed report carried back makes
//!   `gateway-tx reconcile` name that image (and refuse the report once a
//!   byte of it changed), and a later pass brings the image and clears it;
//! - the chain survives SIGKILL of each side mid-transfer (the next image
//!   follows the last one), both `ledger verify` commands find it intact,
//!   and a sender whose state was lost starts a new chain the receiver
//!   accepts with its first record;
//! - a receiver whose state was lost while the sender's chain is past its
//!   first record: a new image waits, status names its chain, and the
//!   operator's `gateway-rx ledger accept` lets it be delivered.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weir_tests::diode::{Diode, DiodeConfig, DiodeHandle, FilterHandle, ObjectFilter};
use weir_tests::imagegen::{self, GeneratedImage, LayerSpec};
use weir_tests::pair::{
    gateway_bin, layout_lists, wait_until, write_key, Gateway, Site, SiteOptions, Target,
};

const LIMIT: Duration = Duration::from_secs(90);

fn image(site: &Site, name: &str, seed: u64, reference: &str) -> Result<GeneratedImage> {
    sized_image(site, name, seed, reference, 120_000)
}

fn sized_image(
    site: &Site,
    name: &str,
    seed: u64,
    reference: &str,
    size: u64,
) -> Result<GeneratedImage> {
    imagegen::oci_archive(
        site.dir.path(),
        &format!("{name}.tar"),
        seed,
        &[LayerSpec { size }],
        reference,
    )
    .map_err(Into::into)
}

fn digest(img: &GeneratedImage) -> String {
    img.manifest_digest.clone().unwrap_or_default()
}

/// Fails with both gateways' logs when `cond` does not hold in time.
fn expect(what: &str, gws: &mut [&mut Gateway], cond: impl FnMut() -> bool) {
    if !wait_until(LIMIT, cond) {
        let logs: Vec<String> = gws
            .iter_mut()
            .map(|g| format!("--- {}\n{}", g.name, g.log_tail(40)))
            .collect();
        panic!("{what}: not within {LIMIT:?}\n{}", logs.join("\n"));
    }
}

fn rx_ledger(site: &Site) -> serde_json::Value {
    site.rx_status()
        .map(|s| s["ledger"].clone())
        .unwrap_or_default()
}

/// The image object id gateway-tx gave the image sent to `destination`.
fn tx_image_object(site: &Site, destination: &str) -> Option<String> {
    site.tx_status()?["images"]
        .as_array()?
        .iter()
        .find(|i| i["destination"] == destination)
        .and_then(|i| i["image"].as_str().map(str::to_string))
}

fn run(bin: &str, args: &[&str]) -> Result<Output> {
    Command::new(gateway_bin(bin)?)
        .args(args)
        .output()
        .with_context(|| format!("running {bin} {args:?}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An HTTP endpoint that takes every POST and keeps its JSON body.
fn webhook() -> Result<(String, Arc<Mutex<Vec<serde_json::Value>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let Ok(mut writer) = stream.try_clone() else {
                continue;
            };
            let mut reader = BufReader::new(stream);
            // Requests on this connection until it closes.
            loop {
                let mut len = 0usize;
                let mut line = String::new();
                let mut got_any = false;
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    got_any = true;
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                if !got_any {
                    break;
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    break;
                }
                if let Ok(v) = serde_json::from_slice(&body) {
                    kept.lock().unwrap_or_else(|e| e.into_inner()).push(v);
                }
                let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            }
        }
    });
    Ok((url, bodies))
}

struct LedgerSite {
    site: Site,
    _layout_dir: tempfile::TempDir,
    layout: PathBuf,
    filter: Arc<ObjectFilter>,
    _diode: DiodeHandle,
}

/// A site whose configs name a report key, with `rx_ledger` in rx.toml's
/// `[ledger]` and `rx_more` after it, behind a diode with an object filter.
fn ledger_site(rx_ledger: &str, rx_more: &str) -> Result<LedgerSite> {
    let layout_dir = tempfile::tempdir()?;
    let layout = layout_dir.path().join("layout");
    let rate_bps = 20_000_000;
    let site = Site::new(
        Target::Layout(layout.clone()),
        &SiteOptions {
            rate_bps,
            ..Default::default()
        },
    )?;
    let report_key = site.dir.path().join("report.key");
    write_key(&report_key, b"weir ledger report key, 32 bytes!")?;
    let key_line = format!("report_key_file = {:?}\n", report_key.display().to_string());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&site.rx_config)?
        .write_all(format!("\n[ledger]\n{rx_ledger}{key_line}{rx_more}").as_bytes())?;
    let filter = Arc::new(ObjectFilter::default());
    let mut cfg = DiodeConfig::new("127.0.0.1:0".parse()?, site.rx_addr);
    cfg.filter = Some(FilterHandle(filter.clone()));
    let diode = Diode::spawn(cfg)?;
    site.write_tx_config(
        diode.local_addr(),
        &SiteOptions {
            rate_bps,
            tx_extra: format!("\n[ledger]\n{key_line}"),
            ..Default::default()
        },
    )?;
    Ok(LedgerSite {
        site,
        _layout_dir: layout_dir,
        layout,
        filter,
        _diode: diode,
    })
}

/// One image whose image object never arrives: a gap raised (status, fault,
/// webhook `missing`), named by `reconcile` from the receiver's signed
/// report, the report refused once changed, and the gap cleared when a
/// later pass brings the image.
#[test]
fn a_missing_image_raises_a_gap_is_named_by_reconcile_and_clears_when_a_later_pass_brings_it(
) -> Result<()> {
    let (hook, notices) = webhook()?;
    // 0.001 h: 3.6 s. Records of images delivered that long ago are
    // pruned down to a checkpoint (the newest one kept): no gap for them,
    // and reconcile counts them delivered.
    let s = ledger_site(
        "gap_alert_hours = 0.001\nkeep_records = 1\n",
        &format!(
            "\n[notify]\nwebhook_url = {hook:?}\n\n[retention]\nkeep_delivered_hours = 0.001\n"
        ),
    )?;
    let site = &s.site;
    let first = image(site, "first", 61, "ledger/first:1")?;
    let lost = image(site, "lost", 62, "ledger/lost:1")?;
    let later = image(site, "later", 63, "ledger/later:1")?;
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;

    // The chain's first record arrives (a new chain starts with it).
    site.drop_image(&first.path, "first.tar")?;
    expect("the first image delivered", &mut [&mut tx, &mut rx], || {
        layout_lists(&s.layout, &digest(&first))
    });
    // No image object passes until the lost one's id is known; then only
    // its frames are dropped, in every pass.
    s.filter.drop_image_objects(true);
    site.drop_image(&lost.path, "lost.tar")?;
    let mut lost_object = None;
    expect("the lost image accepted", &mut [&mut tx, &mut rx], || {
        lost_object = tx_image_object(site, "ledger/lost:1");
        lost_object.is_some()
    });
    let lost_object = lost_object.context("image object id")?;
    let mut id = [0u8; 32];
    hex::decode_to_slice(lost_object.trim_start_matches("sha256:"), &mut id)?;
    s.filter.drop_object(id);
    s.filter.drop_image_objects(false);
    site.drop_image(&later.path, "later.tar")?;
    expect("the later image delivered", &mut [&mut tx, &mut rx], || {
        layout_lists(&s.layout, &digest(&later))
    });

    // Announced as record 2 and never complete: a gap, once 3.6 s passed.
    expect(
        "a gap for record 2, the fault raised",
        &mut [&mut tx, &mut rx],
        || {
            let st = site.rx_status().unwrap_or_default();
            let l = &st["ledger"];
            l["missing"] == 1
                && l["gaps"][0]["from"] == 2
                && l["head_announced"] == 3
                && st["fault"].as_str().unwrap_or("").contains("ledger gap")
        },
    );
    let status = site.rx_status().context("rx status")?;
    assert_eq!(status["ledger"]["highest_contiguous"], 1, "{status:#}");
    expect("the webhook told of it", &mut [&mut tx, &mut rx], || {
        notices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|n| n["event"] == "missing" && n["missing"]["from"] == 2)
    });

    // The report, carried back: reconcile names the lost image only.
    let report = site.dir.path().join("report.json");
    let rx_config = site.rx_config.display().to_string();
    let tx_config = site.tx_config.display().to_string();
    let report_arg = report.display().to_string();
    let out = run(
        "gateway-rx",
        &["report", "--config", &rx_config, "--out", &report_arg],
    )?;
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        "gateway-tx",
        &["reconcile", "--config", &tx_config, &report_arg],
    )?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        printed.contains(&format!(
            "never arrived (1):\n  seq 2 {} ledger/lost:1 from lost.tar, accepted ",
            digest(&lost)
        )),
        "{}",
        text(&out)
    );
    assert!(!printed.contains("ledger/later:1 from"), "{}", text(&out));
    assert!(printed.contains("delivered: 2 of 3"), "{}", text(&out));

    // A report changed by one character is refused.
    let original = std::fs::read_to_string(&report)?;
    let forged = original.replacen("\"head\": 3", "\"head\": 1", 1);
    assert_ne!(forged, original);
    let forged_path = site.dir.path().join("forged.json");
    std::fs::write(&forged_path, forged)?;
    let out = run(
        "gateway-tx",
        &[
            "reconcile",
            "--config",
            &tx_config,
            &forged_path.display().to_string(),
        ],
    )?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HMAC does not verify"),
        "{}",
        text(&out)
    );

    // A later pass brings the image: the gap and the fault clear.
    s.filter.release();
    expect(
        "the lost image delivered, the gap cleared",
        &mut [&mut tx, &mut rx],
        || {
            let st = site.rx_status().unwrap_or_default();
            layout_lists(&s.layout, &digest(&lost))
                && st["ledger"]["missing"] == 0
                && st["ledger"]["highest_contiguous"] == 3
                && st["fault"].is_null()
        },
    );
    expect(
        "the copy the report reads is current",
        &mut [&mut tx, &mut rx],
        || {
            let _ = run(
                "gateway-rx",
                &["report", "--config", &rx_config, "--out", &report_arg],
            );
            run(
                "gateway-tx",
                &["reconcile", "--config", &tx_config, &report_arg],
            )
            .is_ok_and(|o| o.status.success())
        },
    );
    let out = run(
        "gateway-tx",
        &["reconcile", "--config", &tx_config, &report_arg],
    )?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("delivered: 3 of 3"),
        "{}",
        text(&out)
    );
    assert!(tx.terminate(Duration::from_secs(20))?.success());
    assert!(rx.terminate(Duration::from_secs(20))?.success());
    // The receiver pruned its delivered records to a checkpoint, and its
    // chain still verifies from it.
    let rx_log = std::fs::read_to_string(&rx.log)?;
    assert!(
        rx_log.contains("image ledger records of delivered images pruned"),
        "{}",
        rx.log_tail(40)
    );
    let out = run("gateway-rx", &["ledger", "verify", "--config", &rx_config])?;
    assert!(out.status.success(), "{}", text(&out));
    Ok(())
}

/// The chain across SIGKILL of each side mid-transfer, both `ledger verify`
/// commands, and a sender whose state was lost starting a new chain.
#[test]
fn the_ledger_survives_a_crash_of_each_side_and_a_lost_sender_starts_a_new_chain() -> Result<()> {
    let s = ledger_site("", "")?;
    let site = &s.site;
    // Image 1 takes a few seconds a pass (20 Mb/s): the crashes fall in it.
    let imgs: Vec<GeneratedImage> = (0..4)
        .map(|i| {
            let size = if i == 1 { 6_000_000 } else { 120_000 };
            sized_image(
                site,
                &format!("img{i}"),
                70 + i,
                &format!("crash/img{i}:1"),
                size,
            )
        })
        .collect::<Result<_>>()?;
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;
    site.drop_image(&imgs[0].path, "img0.tar")?;
    expect("image 0 delivered", &mut [&mut tx, &mut rx], || {
        layout_lists(&s.layout, &digest(&imgs[0]))
    });
    let mut chain = serde_json::Value::Null;
    expect(
        "the sender's ledger head in its status",
        &mut [&mut tx, &mut rx],
        || {
            chain = site.tx_status().unwrap_or_default()["ledger"]["chain"].clone();
            chain.is_string()
        },
    );

    // Image 1 accepted and on its way when both sides die.
    site.drop_image(&imgs[1].path, "img1.tar")?;
    expect("image 1 accepted", &mut [&mut tx, &mut rx], || {
        tx_image_object(site, "crash/img1:1").is_some()
    });
    assert!(
        !layout_lists(&s.layout, &digest(&imgs[1])),
        "image 1 crossed before the crash"
    );
    rx.kill9();
    tx.kill9();
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;
    expect(
        "image 1 delivered after both crashes",
        &mut [&mut tx, &mut rx],
        || layout_lists(&s.layout, &digest(&imgs[1])),
    );
    site.drop_image(&imgs[2].path, "img2.tar")?;
    expect(
        "image 2 delivered, the chain contiguous",
        &mut [&mut tx, &mut rx],
        || {
            let l = rx_ledger(site);
            layout_lists(&s.layout, &digest(&imgs[2]))
                && l["highest_contiguous"] == 3
                && l["head_announced"] == 3
        },
    );
    let l = rx_ledger(site);
    assert_eq!(l["chain"], chain, "{l:#}");
    assert_eq!(l["head_announced"], 3, "{l:#}");
    assert_eq!(l["records_refused"], 0, "{l:#}");
    expect("the sender's head at 3", &mut [&mut tx, &mut rx], || {
        site.tx_status().unwrap_or_default()["ledger"]["seq"] == 3
    });
    assert!(tx.terminate(Duration::from_secs(20))?.success());
    assert!(rx.terminate(Duration::from_secs(20))?.success());

    // Stopped: both sides re-check their stored chain.
    let tx_config = site.tx_config.display().to_string();
    let rx_config = site.rx_config.display().to_string();
    let out = run("gateway-tx", &["ledger", "verify", "--config", &tx_config])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 records, 1..3 intact"),
        "{}",
        text(&out)
    );
    let out = run("gateway-rx", &["ledger", "verify", "--config", &rx_config])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 records checked"),
        "{}",
        text(&out)
    );

    // The sender's state is lost: a new chain, accepted with its first record.
    std::fs::remove_dir_all(&site.tx_state)?;
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;
    site.drop_image(&imgs[3].path, "img3.tar")?;
    expect(
        "image 3 delivered on a new chain",
        &mut [&mut tx, &mut rx],
        || {
            let l = rx_ledger(site);
            layout_lists(&s.layout, &digest(&imgs[3]))
                && l["chain"] != chain
                && l["highest_contiguous"] == 1
        },
    );
    expect(
        "the receiver follows the sender's new chain",
        &mut [&mut tx, &mut rx],
        || site.tx_status().unwrap_or_default()["ledger"]["chain"] == rx_ledger(site)["chain"],
    );
    let log = std::fs::read_to_string(&rx.log)?;
    assert!(
        log.contains("sender started a new image ledger chain"),
        "{}",
        rx.log_tail(40)
    );
    assert!(tx.terminate(Duration::from_secs(20))?.success());
    assert!(rx.terminate(Duration::from_secs(20))?.success());
    let out = run("gateway-rx", &["ledger", "verify", "--config", &rx_config])?;
    assert!(out.status.success(), "{}", text(&out));
    Ok(())
}

/// The receiver's state is wiped while the sender's chain is past its
/// first record (the diode drops record 1's image object from then on, as
/// if it had left the sender's retention): a new image waits, `status`
/// names its chain and lowest seq; `ledger accept` is refused while the
/// gateway runs and for a malformed chain id, then, gateway stopped,
/// accepts the chain from that seq, and the image is delivered at the next
/// start with the source's digest.
#[test]
fn a_receiver_that_lost_its_state_delivers_a_waiting_chain_once_the_operator_accepts_it(
) -> Result<()> {
    let s = ledger_site("", "")?;
    let site = &s.site;
    let first = image(site, "first", 81, "accept/first:1")?;
    let second = image(site, "second", 82, "accept/second:1")?;
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;
    site.drop_image(&first.path, "first.tar")?;
    expect("the first image delivered", &mut [&mut tx, &mut rx], || {
        layout_lists(&s.layout, &digest(&first))
    });
    let mut chain = String::new();
    let mut first_object = None;
    expect(
        "the sender's chain and first image object",
        &mut [&mut tx, &mut rx],
        || {
            chain = site.tx_status().unwrap_or_default()["ledger"]["chain"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            first_object = tx_image_object(site, "accept/first:1");
            !chain.is_empty() && first_object.is_some()
        },
    );
    let mut id = [0u8; 32];
    hex::decode_to_slice(
        first_object
            .context("image object id")?
            .trim_start_matches("sha256:"),
        &mut id,
    )?;
    s.filter.drop_object(id);

    // The receiver's state is lost.
    assert!(rx.terminate(Duration::from_secs(20))?.success());
    std::fs::remove_dir_all(&site.rx_state)?;
    let mut rx = site.start_rx()?;
    site.drop_image(&second.path, "second.tar")?;
    expect(
        "the second image waits, status names its chain",
        &mut [&mut tx, &mut rx],
        || {
            let l = rx_ledger(site);
            l["waiting_chains"][0]["chain"] == chain.as_str()
                && l["waiting_chains"][0]["lowest_seq"] == 2
                && l["waiting_chains"][0]["images"] == 1
        },
    );
    assert!(!layout_lists(&s.layout, &digest(&second)));

    let rx_config = site.rx_config.display().to_string();
    let accept = |chain: &str| {
        run(
            "gateway-rx",
            &[
                "ledger", "accept", "--config", &rx_config, "--chain", chain, "--from", "2",
            ],
        )
    };
    let out = accept(&chain)?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{}",
        text(&out)
    );
    assert!(rx.terminate(Duration::from_secs(20))?.success());
    let out = accept("not-a-chain")?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--chain"),
        "{}",
        text(&out)
    );
    // Stopped, the status names the chain in words too.
    let out = run("gateway-rx", &["status", "--config", &rx_config])?;
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("ledger accept --chain {chain} --from 2")),
        "{}",
        text(&out)
    );
    let out = accept(&chain)?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("chain {chain} accepted from seq 2")),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("OPERATOR"),
        "{}",
        text(&out)
    );

    let mut rx = site.start_rx()?;
    expect(
        "the second image delivered, nothing waits",
        &mut [&mut tx, &mut rx],
        || {
            let l = rx_ledger(site);
            layout_lists(&s.layout, &digest(&second))
                && l["waiting_for_first_record"] == 0
                && l["highest_contiguous"] == 2
        },
    );
    assert!(tx.terminate(Duration::from_secs(20))?.success());
    assert!(rx.terminate(Duration::from_secs(20))?.success());
    let out = run("gateway-rx", &["ledger", "verify", "--config", &rx_config])?;
    assert!(out.status.success(), "{}", text(&out));
    Ok(())
}
