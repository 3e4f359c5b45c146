//! kill -9 of the gateway-rx binary while receiving and while delivering:
//! after a restart every image is still delivered, each tag put once.

mod common;

use common::{assert_delivered_once, counter, key, setup, Gateway};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use weir_test_support::{registry_or_skip, sample_image, TestRegistry, TestSender};

#[test]
fn kill_9_while_receiving_then_restart_delivers_once() {
    let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
        return;
    };
    let s = setup(&reg);
    let img = sample_image("team/app", &["1.0", "stable"], 4, 400_000);
    let mut tx = TestSender::new(key(), 10, s.addr, 1400, 16, 4);
    let frames = tx.seal(&img.objects(), &mut |_, _| true, &mut |_, _, _, _| {});

    let gw = Gateway::start(&s);
    // Send most of a pass from another thread and kill the gateway while
    // frames are still coming in.
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn({
        let frames = frames[..frames.len() * 3 / 4].to_vec();
        let mut tx = TestSender::new(key(), 10, s.addr, 1400, 16, 4);
        move || {
            for (i, chunk) in frames.chunks(256).enumerate() {
                tx.send(chunk);
                if i == 4 {
                    let _ = sent_tx.send(());
                }
            }
        }
    });
    sent_rx.recv().unwrap();
    gw.wait_for(
        "shards stored",
        Duration::from_secs(30),
        |st| counter(st, "shards_stored") > 0,
        &mut || {},
    );
    gw.kill_9();
    sender.join().unwrap();

    let gw = Gateway::start(&s);
    let st = gw.wait_for(
        "delivery after the kill",
        Duration::from_secs(120),
        |st| counter(st, "pushes_done") == 1,
        &mut || {
            tx.pass(&img.objects());
        },
    );
    assert_eq!(counter(&st, "blobs_failed"), 0, "{st:#}");
    assert_delivered_once(&reg, &img);
    assert!(gw.terminate().success());
}

#[test]
fn kill_9_with_a_push_waiting_then_restart_delivers_each_tag_once() {
    let Some(mut reg) = registry_or_skip(&TestRegistry::default_options()) else {
        return;
    };
    reg.stop();
    let s = setup(&reg);
    let img = sample_image("team/db", &["15", "latest"], 2, 100_000);
    let mut tx = TestSender::new(key(), 20, s.addr, 1400, 16, 4);

    let gw = Gateway::start(&s);
    gw.wait_for(
        "the image complete and its push failing",
        Duration::from_secs(60),
        |st| counter(st, "images_complete") == 1 && st["pushes_failing"] == 1,
        &mut || {
            tx.pass(&img.objects());
        },
    );
    gw.kill_9();
    reg.start();
    let gw = Gateway::start(&s);
    gw.wait_for(
        "delivery after the kill",
        Duration::from_secs(60),
        |st| counter(st, "pushes_done") == 1,
        &mut || {},
    );
    assert_delivered_once(&reg, &img);
    assert!(gw.terminate().success());
    // Stopped: the status command reads the database.
    let out = Command::new(env!("CARGO_BIN_EXE_gateway-rx"))
        .args(["status", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("team/db:15 complete: 3/3 blobs, 100.0%"),
        "{text}"
    );
    assert!(text.contains("delivered: 1"), "{text}");
}

#[test]
fn kill_9_right_after_completion_still_delivers_each_tag_once() {
    let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
        return;
    };
    let s = setup(&reg);
    // A large layer, so the kill likely lands while it is being pushed.
    let img = sample_image("team/big", &["1", "2"], 1, 24 << 20);
    let mut tx = TestSender::new(key(), 30, s.addr, 1400, 32, 8);
    let gw = Gateway::start(&s);
    gw.wait_for(
        "the image complete",
        Duration::from_secs(120),
        |st| counter(st, "images_complete") == 1,
        &mut || {
            if gw_status_done(&s.dir.path().join("state")) {
                return;
            }
            tx.pass(&img.objects());
        },
    );
    gw.kill_9();
    let gw = Gateway::start(&s);
    gw.wait_for(
        "delivery after the kill",
        Duration::from_secs(60),
        |st| counter(st, "pushes_done") >= 1 || st["deliveries"][0]["state"] == "done",
        &mut || {},
    );
    assert_delivered_once(&reg, &img);
    assert!(gw.terminate().success());
}

fn gw_status_done(state_dir: &Path) -> bool {
    std::fs::read(state_dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|s| counter(&s, "images_complete") == 1)
}
