//! Every crash point of the receiver, one at a time: the gateway-rx binary
//! aborts there (as a kill -9 at that instant would stop it), restarts, and
//! the image still reaches the registry and the OCI layout exactly once with
//! the source's digests. A point the scenario never reaches fails the test,
//! and so does a point in the code that `CRASH_POINTS` does not list (see
//! the unit test beside the list).

mod common;

use common::{assert_delivered_once, key, setup_with, Gateway};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};
use weir_test_support::{registry_or_skip, sample_image, SampleImage, TestRegistry, TestSender};

/// Longest one point may take to be reached, and one image to be delivered.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn delivered(status: &serde_json::Value, targets: usize) -> bool {
    status["deliveries"]
        .as_array()
        .is_some_and(|d| d.len() == targets && d.iter().all(|j| j["state"] == "done"))
}

/// The layout names each tag once, at the source's digest, and holds every
/// blob with the bytes that hash to its name.
fn assert_in_layout_once(layout: &Path, img: &SampleImage) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    for tag in &img.tm.destination.tags {
        let name = format!("{}:{tag}", img.tm.destination.repository);
        let found: Vec<_> = entries
            .iter()
            .filter(|e| e["annotations"]["org.opencontainers.image.ref.name"] == name.as_str())
            .collect();
        assert_eq!(found.len(), 1, "{name} in {index:#}");
        assert_eq!(found[0]["digest"], img.tm.manifest.digest.as_str());
    }
    for id in img.blob_ids() {
        let bytes = std::fs::read(layout.join("blobs/sha256").join(id.hex())).unwrap();
        assert_eq!(weir_proto::ObjectId::of_bytes(&bytes), id);
    }
}

#[test]
fn every_crash_point_then_a_restart_delivers_the_image_once() {
    let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
        return;
    };
    let mut table = Vec::new();
    for (n, &point) in gateway_rx::CRASH_POINTS.iter().enumerate() {
        let started = Instant::now();
        let layout = tempfile::tempdir().unwrap();
        // Delivered objects are pruned a moment after delivery, so
        // retention runs (and its point is reached) within the walk.
        let s = setup_with(&format!(
            "[delivery]\nregistry_url = \"http://{}\"\noci_layout = \"{}\"\nretry_max_seconds = 2\n\
             [retention]\nkeep_delivered_hours = 0.0001\n",
            reg.addr(),
            layout.path().display()
        ));
        let repo = format!("crash/{}", point.replace('.', "-"));
        let img = sample_image(&repo, &["1", "latest"], 2, 40_000);
        let objects = img.objects();
        let mut tx = TestSender::new(key(), 100 + n as u64, s.addr, 1400, 8, 4);

        // Armed: passes until the process aborts. The first pass carries
        // one blob with a wrong byte under a valid tag, so that blob fails
        // its sha256 once and is discarded before a later pass fixes it. A
        // point behind delivery (the last commit at shutdown) is reached by
        // stopping the gateway; retention's prune, by waiting after delivery.
        let stop_when_delivered = !point.starts_with("rx.retention.");
        let mut gw = Gateway::spawn(&s, &[("WEIR_CRASH_AT", point)]);
        let victim = img.blob_ids()[1];
        let first = tx.seal(&objects, &mut |_, _| true, &mut |id, b, i, payload| {
            if *id == victim && b == 0 && i == 0 {
                payload[0] ^= 0xff;
            }
        });
        let mut first = Some(first);
        let deadline = Instant::now() + PHASE_LIMIT;
        let mut stopping = false;
        let status = loop {
            if let Some(status) = gw.exited() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{point}: not reached within {PHASE_LIMIT:?}"
            );
            if stop_when_delivered && !stopping && gw.status().is_some_and(|st| delivered(&st, 2)) {
                gw.sigterm();
                stopping = true;
            }
            let listening = gw.status().is_some_and(|st| st["running"] == true);
            if !listening {
                // Frames sent before the socket is bound are lost unseen.
            } else if let Some(frames) = first.take() {
                tx.send(&frames);
            } else if !stopping {
                tx.pass(&objects);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "{point}: the gateway ended with {status} instead of aborting there (point not reached?); log:\n{}",
            log_tail(&s.dir.path().join("gateway.log"))
        );

        // Restarted: whatever the crash left, the image arrives once.
        let gw = Gateway::start(&s);
        gw.wait_for(
            "delivery after the crash",
            PHASE_LIMIT,
            |st| delivered(st, 2),
            &mut || {
                tx.pass(&objects);
            },
        );
        assert_delivered_once(&reg, &img);
        assert_in_layout_once(layout.path(), &img);
        assert!(
            gw.terminate().success(),
            "{point}: clean stop after restart"
        );
        table.push((point, started.elapsed()));
    }
    for (point, took) in table {
        eprintln!("crash point {point:<32} delivered once after restart ({took:.1?})");
    }
}
