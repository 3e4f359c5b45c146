//! The sender end to end on a captured link: frames verify, objects rebuild
//! with the FEC codec, passes resume after a restart.

mod common;

use common::{key, start, CaptureSink, Setup};
use gateway_tx::carousel::group_span;
use gateway_tx::objects::ObjectStore;
use std::collections::HashSet;
use std::time::Duration;
use weir_host::Shutdown;
use weir_imagegen::{DockerFlavor, LayerSpec};
use weir_proto::{ObjectId, TransferManifest};
use weir_test_support::{wait_for, Reassembler};

const LIMIT: Duration = Duration::from_secs(60);

fn status(setup: &Setup) -> Option<serde_json::Value> {
    let bytes = std::fs::read(setup.config.state_dir.join("status.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[test]
fn frames_rebuild_every_object_of_the_image_despite_loss() {
    let mut setup = Setup::new();
    // No idle cycling: the capture stays small once the passes are done.
    setup.config.carousel.retention_hours = 0;
    setup.config.link.rate_bps = 200_000_000;
    let img = weir_imagegen::docker_archive(
        &setup.staging(),
        "app.tar",
        21,
        &[LayerSpec { size: 300_000 }, LayerSpec { size: 20_000 }],
        "team-a/app:1",
        DockerFlavor::Skopeo,
    )
    .unwrap();
    setup.drop_file(&img.path, "app.tar");
    let shutdown = Shutdown::new();
    let sink = CaptureSink::new();
    let sender = start(setup.config.clone(), shutdown.clone(), sink.clone());
    let done = wait_for("both passes of every object", LIMIT, || {
        let s = status(&setup)?;
        let images = s["images"].as_array()?;
        (images.len() == 1 && images[0]["passes_done"] == 2 && s["queue"]["objects"] == 0)
            .then_some(s)
    });
    shutdown.trigger();
    sender.join().unwrap().unwrap();
    assert_eq!(done["images"][0]["percent"], 100.0);
    assert!(done["wire"]["frames"].as_u64().unwrap() > 0);

    let frames = sink.take();
    let mut rx = Reassembler::new(key());
    // 20 % of shard frames lost: parity (4 of 12) and the second pass cover it.
    rx.feed(&frames, 20);
    let images = rx.image_objects();
    assert_eq!(images.len(), 1);
    let tm =
        TransferManifest::from_object_bytes(&rx.object(&images[0]).expect("image object rebuilds"))
            .unwrap();
    assert_eq!(tm.destination.display(), "team-a/app:1");
    let m: serde_json::Value = serde_json::from_slice(&tm.manifest.bytes).unwrap();
    assert_eq!(m["config"]["digest"], img.config_digest.as_str());
    for b in &tm.blobs {
        let id = ObjectId::from_digest(&b.digest).unwrap();
        let bytes = rx
            .object(&id)
            .unwrap_or_else(|| panic!("blob {} rebuilds", b.digest));
        assert_eq!(bytes.len() as u64, b.size);
    }
    // Headers repeat, heartbeats flow, the image object is sent before and
    // after the blobs of each pass.
    for b in &tm.blobs {
        let id = ObjectId::from_digest(&b.digest).unwrap();
        assert!(
            rx.headers[&id] >= 2,
            "{} headers for {}",
            rx.headers[&id],
            b.digest
        );
    }
    assert!(rx.heartbeats >= 1);
    // Objects shorter than a block cross in blocks of their own size, not
    // padded to k shards.
    let configured = setup.config.fec_params().unwrap();
    for (id, (_, len, fec, _)) in &rx.shards {
        assert_eq!(*fec, configured.for_object(*len), "{id}");
    }
    let (_, len, fec, _) = &rx.shards[&images[0]];
    assert!(
        fec.data_shards < configured.data_shards,
        "image object of {len} B sent as {fec:?}"
    );
    let firsts: Vec<ObjectId> = rx
        .order
        .iter()
        .filter(|s| s.block == 0 && s.index == 0)
        .map(|s| s.object)
        .collect();
    assert_eq!(firsts.first(), Some(&images[0]));
    assert_eq!(firsts.last(), Some(&images[0]));
    assert_eq!(
        firsts.iter().filter(|o| **o == images[0]).count(),
        4,
        "before and after, two passes"
    );
}

#[test]
fn restart_mid_pass_resumes_where_it_stopped() {
    let mut setup = Setup::new();
    setup.config.carousel.retention_hours = 0;
    let img = weir_imagegen::oci_archive_uncompressed(
        &setup.staging(),
        "big.tar",
        5,
        &[LayerSpec { size: 3_000_000 }],
        "team-a/big:1",
    )
    .unwrap();
    let layer = ObjectId::from_digest(&img.layer_digests[0]).unwrap();
    setup.drop_file(&img.path, "big.tar");

    // First run: stopped by the link after 1500 frames, well inside pass 0
    // of the 3 MB layer (about 290 blocks of 12 shards).
    let shutdown = Shutdown::new();
    let sink = CaptureSink::stopping_after(1500, shutdown.clone());
    start(setup.config.clone(), shutdown, sink.clone())
        .join()
        .unwrap()
        .unwrap();
    let mut first = Reassembler::new(key());
    first.feed(&sink.take(), 0);
    let sent_first: HashSet<u32> = first
        .order
        .iter()
        .filter(|s| s.object == layer)
        .map(|s| s.block)
        .collect();
    assert!(!sent_first.is_empty());
    let store = ObjectStore::open(&setup.config.state_dir).unwrap();
    let saved = store.progress(&layer).unwrap().unwrap();
    let len = store.payload(&layer).unwrap().unwrap().len;
    drop(store);
    assert_eq!(saved.passes_done, 0);
    assert!(saved.next_group > 0, "{saved:?}");
    let fec = setup.config.fec_params().unwrap();
    let (resume_at, _) = group_span(
        fec.blocks_for(len),
        setup.config.carousel.window_blocks,
        saved.next_group,
    );
    assert!(sent_first.contains(&0) && sent_first.contains(&(resume_at - 1)));

    // Second run: the layer continues from its saved group, not from block 0.
    let shutdown = Shutdown::new();
    let sink = CaptureSink::stopping_after(300, shutdown.clone());
    start(setup.config.clone(), shutdown, sink.clone())
        .join()
        .unwrap()
        .unwrap();
    let mut second = Reassembler::new(key());
    second.feed(&sink.take(), 0);
    let session_1 = first.order[0].session;
    assert!(
        second.order.iter().all(|s| s.session > session_1),
        "a new, later session"
    );
    let resumed: Vec<u32> = second
        .order
        .iter()
        .filter(|s| s.object == layer)
        .map(|s| s.block)
        .collect();
    assert_eq!(
        resumed.first(),
        Some(&resume_at),
        "the layer resumes at its saved group"
    );
    assert!(
        resumed.iter().all(|b| *b >= resume_at),
        "nothing before the saved group is resent"
    );
}

#[test]
fn idle_link_keeps_cycling_the_retained_image() {
    let mut setup = Setup::new();
    setup.config.carousel.passes = 1;
    setup.config.link.rate_bps = 100_000_000;
    let img = weir_imagegen::oci_archive(
        &setup.staging(),
        "s.tar",
        8,
        &[LayerSpec { size: 10_000 }],
        "team-a/small:1",
    )
    .unwrap();
    setup.drop_file(&img.path, "s.tar");
    let shutdown = Shutdown::new();
    // One pass is a few dozen frames; 2000 frames are many idle passes.
    let sink = CaptureSink::stopping_after(2000, shutdown.clone());
    start(setup.config.clone(), shutdown, sink.clone())
        .join()
        .unwrap()
        .unwrap();
    let mut rx = Reassembler::new(key());
    rx.feed(&sink.take(), 0);
    let layer = ObjectId::from_digest(&img.layer_digests[0]).unwrap();
    let passes = rx
        .order
        .iter()
        .filter(|s| s.object == layer && s.block == 0 && s.index == 0)
        .count();
    assert!(passes >= 3, "only {passes} passes of the layer");
    let store = ObjectStore::open(&setup.config.state_dir).unwrap();
    assert!(store.progress(&layer).unwrap().unwrap().passes_done >= 3);
}

#[test]
fn heartbeats_flow_when_there_is_nothing_to_send() {
    let setup = Setup::new();
    let shutdown = Shutdown::new();
    let sink = CaptureSink::new();
    let sender = start(setup.config.clone(), shutdown.clone(), sink.clone());
    wait_for("a heartbeat", LIMIT, || (sink.len() >= 2).then_some(()));
    shutdown.trigger();
    sender.join().unwrap().unwrap();
    let mut rx = Reassembler::new(key());
    rx.feed(&sink.take(), 0);
    assert!(rx.heartbeats >= 2);
    assert!(rx.order.is_empty());
    let s = status(&setup).expect("status.json written");
    assert_eq!(s["state"], "idle");
}
