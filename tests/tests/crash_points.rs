//! Every crash point of the sender, one at a time: gateway-tx aborts there
//! (as a kill -9 at that instant would stop it) while a real gateway-rx
//! receives, restarts, and the dropped image still lands in the receiver's
//! OCI layout exactly once with the source's digest, the drop in `done/`.
//! The receiver's own points are walked by gateway-rx's `crash_points` test.
//!
//! The scenario reaches every point: start-up (session, pruning), the drop
//! (payload stored, drop committed, spool moved, image added), a re-drop of
//! the same image (audited as already sent), an operator's `resend` on the
//! console, and a stop (the last commits).

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};
use weir_test_support::pty::{open_raw, PtyPair};
use weir_test_support::tools::{or_skip, SOCAT};
use weir_tests::imagegen::{self, LayerSpec};
use weir_tests::pair::{files_in, Site, SiteOptions, Target};

/// Longest one point may take to be reached, and the image to arrive.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

fn layout_entries(layout: &Path, digest: &str) -> usize {
    std::fs::read_to_string(layout.join("index.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map_or(0, |v| {
            v["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["digest"] == digest)
                .count()
        })
}

/// What the armed sender is driven through, step by step, until it aborts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Crossing,
    Redropped,
    ResendAsked,
    Stopping,
}

fn walk(point: &str, n: u64) -> Result<Duration> {
    let started = Instant::now();
    let layout_dir = tempfile::tempdir()?;
    let layout = layout_dir.path().join("layout");
    let opts = SiteOptions {
        passes: 2,
        // Images leave the carousel as soon as their passes are done, so
        // the pruning commit runs on every start.
        tx_extra: "retention_hours = 0\n".into(),
        ..Default::default()
    };
    let site = Site::new(Target::Layout(layout.clone()), &opts)?;
    let console = PtyPair::new(site.dir.path(), "console")?;
    let mut opts = opts;
    opts.tx_extra.push_str(&format!(
        "\n[console]\ndevice = {:?}\n",
        console.a.display().to_string()
    ));
    site.write_tx_config(site.rx_addr, &opts)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        500 + n,
        &[LayerSpec { size: 300_000 }],
        &format!("crash/{}:1", point.replace('.', "-")),
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx_with_env(&[("WEIR_CRASH_AT", point)])?;
    site.drop_image(&image.path, "img.tar")?;

    let mut step = Step::Crossing;
    let mut step_at = Instant::now();
    let deadline = Instant::now() + PHASE_LIMIT;
    let status = loop {
        if let Some(status) = tx.exit_status() {
            break status;
        }
        if !rx.is_running() {
            bail!("{point}: gateway-rx stopped: {}", rx.log_tail(20));
        }
        if Instant::now() > deadline {
            bail!(
                "{point}: not reached within {PHASE_LIMIT:?} (last step {step:?}): {}",
                tx.log_tail(20)
            );
        }
        let settled = step_at.elapsed() > Duration::from_secs(2);
        match step {
            Step::Crossing if layout_entries(&layout, &digest) > 0 => {
                site.drop_image(&image.path, "again.tar")?;
                (step, step_at) = (Step::Redropped, Instant::now());
            }
            Step::Redropped if settled && site.waiting_drops().is_empty() => {
                let mut port = open_raw(&console.b, Duration::from_secs(5))?;
                port.write_all(format!("resend {digest}\n").as_bytes())?;
                (step, step_at) = (Step::ResendAsked, Instant::now());
            }
            Step::ResendAsked if settled => {
                tx.signal_stop();
                (step, step_at) = (Step::Stopping, Instant::now());
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if status.signal() != Some(libc::SIGABRT) {
        bail!(
            "{point}: gateway-tx ended with {status} instead of aborting there: {}",
            tx.log_tail(20)
        );
    }

    // Restarted: whatever the crash left, the image arrives once.
    let mut tx = site.start_tx()?;
    let deadline = Instant::now() + PHASE_LIMIT;
    while layout_entries(&layout, &digest) == 0 || !site.waiting_drops().is_empty() {
        if Instant::now() > deadline || !tx.is_running() {
            bail!(
                "{point}: not delivered after the restart (waiting {:?}): {}",
                site.waiting_drops(),
                tx.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The drop was accepted (it sits in done/, never in rejected/)...
    let done = files_in(&site.spool.join("done"));
    let rejected = files_in(&site.spool.join("rejected"));
    if !done.iter().any(|f| f == "img.tar") || !rejected.is_empty() {
        bail!("{point}: drop not in done/ (done {done:?}, rejected {rejected:?})");
    }
    // ...and named once by the layout, whatever passes crossed twice.
    if layout_entries(&layout, &digest) != 1 {
        bail!("{point}: the layout names {digest} more than once");
    }
    tx.terminate(Duration::from_secs(30))?;
    rx.terminate(Duration::from_secs(30))?;
    Ok(started.elapsed())
}

#[test]
fn every_sender_crash_point_then_a_restart_delivers_the_image_once() -> Result<()> {
    if or_skip(SOCAT).is_none() {
        return Ok(());
    }
    let mut table = Vec::new();
    for (n, &point) in gateway_tx::CRASH_POINTS.iter().enumerate() {
        table.push((point, walk(point, n as u64)?));
    }
    for (point, took) in table {
        eprintln!("crash point {point:<28} delivered once after restart ({took:.1?})");
    }
    Ok(())
}
