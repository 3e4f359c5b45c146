//! The file drop end to end, without the link: archives of every format in,
//! objects and queue entries out; refusals and their reason files.

mod common;

use common::{reason, Setup};
use flate2::read::GzDecoder;
use gateway_tx::ingest::{DropOutcome, Ingestor};
use gateway_tx::objects::{AuditEntry, DropRecord, ImageRecord, ObjectStore};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use weir_host::Shutdown;
use weir_imagegen::{DockerFlavor, ImageOptions, LayerSpec, RefName};
use weir_proto::{ObjectId, TransferManifest};

struct Harness {
    setup: Setup,
    store: Arc<ObjectStore>,
    ingestor: Ingestor,
    queue: Receiver<ImageRecord>,
}

impl Harness {
    fn new(setup: Setup) -> Harness {
        std::fs::create_dir_all(&setup.config.state_dir).unwrap();
        let store = Arc::new(ObjectStore::open(&setup.config.state_dir).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let mut ingestor =
            Ingestor::new(&setup.config, store.clone(), tx, Default::default()).unwrap();
        // Bad drops written just now are judged at once here.
        ingestor.set_settle(std::time::Duration::ZERO);
        Harness {
            setup,
            store,
            ingestor,
            queue: rx,
        }
    }

    fn poll(&mut self) -> Vec<(PathBuf, DropOutcome)> {
        self.ingestor.poll_once(&Shutdown::new()).unwrap()
    }

    /// Polls once and expects exactly one drop to be accepted.
    fn accept_one(&mut self) -> Vec<ImageRecord> {
        let out = self.poll();
        assert_eq!(out.len(), 1, "{out:?}");
        match &out[0].1 {
            DropOutcome::Accepted(images) => images.clone(),
            other => panic!("expected acceptance, got {other:?}"),
        }
    }

    fn refuse_one(&mut self) -> (PathBuf, String) {
        let out = self.poll();
        assert_eq!(out.len(), 1, "{out:?}");
        match &out[0].1 {
            DropOutcome::Rejected(r) => {
                let moved = self
                    .setup
                    .spool()
                    .join("rejected")
                    .join(out[0].0.file_name().unwrap());
                (moved, r.code.as_str().to_string())
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn object(&self, digest: &str) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let id = ObjectId::from_digest(digest).unwrap();
        // A payload file, or a range of the linked archive.
        let src = self.store.payload(&id).unwrap().unwrap();
        let mut bytes = vec![0; src.len as usize];
        std::fs::File::open(&src.path)
            .unwrap()
            .read_exact_at(&mut bytes, src.offset)
            .unwrap();
        bytes
    }

    fn manifest(&self, image: &ImageRecord) -> TransferManifest {
        TransferManifest::from_object_bytes(&self.object(&image.image)).unwrap()
    }

    fn stage(&self) -> PathBuf {
        self.setup.staging()
    }
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A drop's size and modification time (ns), as a drop record keeps them.
fn stamp(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    let ns = meta
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (meta.len(), ns)
}

fn layers() -> Vec<LayerSpec> {
    vec![LayerSpec { size: 150_000 }, LayerSpec { size: 40_000 }]
}

#[test]
fn docker_archives_of_every_flavour_keep_the_config_byte_for_byte() {
    for (i, flavor) in [
        DockerFlavor::Classic,
        DockerFlavor::Skopeo,
        DockerFlavor::OciInDocker,
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = Harness::new(Setup::new());
        let options = ImageOptions {
            repeated_layers: vec![0],
            ..Default::default()
        };
        let img = weir_imagegen::docker_archive_with(
            &h.stage(),
            "app.tar",
            7 + i as u64,
            &layers(),
            "team-a/app:1.0",
            flavor,
            &options,
        )
        .unwrap();
        let dropped = h.setup.drop_file(&img.path, "app.tar");
        let images = h.accept_one();
        assert_eq!(images.len(), 1);
        let tm = h.manifest(&images[0]);
        assert_eq!(tm.destination.repository, "team-a/app", "{flavor:?}");
        assert_eq!(tm.destination.tags, vec!["1.0".to_string()]);

        // The config crosses byte for byte: its digest is the image id.
        let m: serde_json::Value = serde_json::from_slice(&tm.manifest.bytes).unwrap();
        assert_eq!(
            m["config"]["digest"],
            img.config_digest.as_str(),
            "{flavor:?}"
        );
        assert_eq!(sha(&h.object(&img.config_digest)), img.config_digest);
        assert_eq!(tm.manifest.digest, sha(&tm.manifest.bytes));
        assert_eq!(images[0].manifest_digest, tm.manifest.digest);

        // Layers are gzip now; each decompresses to its diff id, in order,
        // the repeated layer included.
        let manifest_layers = m["layers"].as_array().unwrap();
        assert_eq!(manifest_layers.len(), img.layer_diff_ids.len());
        for (layer, diff_id) in manifest_layers.iter().zip(&img.layer_diff_ids) {
            assert_eq!(
                layer["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
            let blob = h.object(layer["digest"].as_str().unwrap());
            assert_eq!(blob.len() as u64, layer["size"].as_u64().unwrap());
            let mut plain = Vec::new();
            GzDecoder::new(&blob[..]).read_to_end(&mut plain).unwrap();
            assert_eq!(&sha(&plain), diff_id, "{flavor:?}");
        }
        // Every blob the image names is stored under its digest, once.
        assert_eq!(tm.blobs.len(), 1 + layers().len());
        for b in &tm.blobs {
            assert_eq!(sha(&h.object(&b.digest)), b.digest);
        }
        assert!(!dropped.exists());
        assert!(h.setup.spool().join("done/app.tar").exists());
        assert_eq!(h.queue.try_recv().unwrap(), images[0]);
    }
}

#[test]
fn oci_archive_crosses_with_every_digest_unchanged() {
    let mut h = Harness::new(Setup::new());
    let img = weir_imagegen::oci_archive(
        &h.stage(),
        "app.tar",
        3,
        &layers(),
        "quay.low.example:5000/team-a/app:2",
    )
    .unwrap();
    h.setup.drop_file(&img.path, "app.tar");
    let images = h.accept_one();
    let tm = h.manifest(&images[0]);
    assert_eq!(Some(tm.manifest.digest.clone()), img.manifest_digest);
    assert_eq!(sha(&tm.manifest.bytes), tm.manifest.digest);
    assert_eq!(
        Some(tm.manifest.media_type.clone()),
        img.manifest_media_type
    );
    assert_eq!(tm.destination.display(), "team-a/app:2");
    let mut ours: Vec<&str> = tm.blobs.iter().map(|b| b.digest.as_str()).collect();
    let mut theirs: Vec<&str> = img.blob_digests.iter().map(String::as_str).collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    for b in &tm.blobs {
        let bytes = h.object(&b.digest);
        assert_eq!(
            (sha(&bytes), bytes.len() as u64),
            (b.digest.clone(), b.size)
        );
    }
}

#[test]
fn multiarch_index_crosses_with_its_children() {
    let mut h = Harness::new(Setup::new());
    let img = weir_imagegen::multiarch_oci_archive(
        &h.stage(),
        "multi.tar",
        11,
        &[("linux", "amd64"), ("linux", "arm64/v8")],
        &layers(),
        "team-a/multi:3",
    )
    .unwrap();
    h.setup.drop_file(&img.path, "multi.tar");
    let images = h.accept_one();
    let tm = h.manifest(&images[0]);
    assert_eq!(Some(tm.manifest.digest.clone()), img.manifest_digest);
    assert_eq!(
        tm.manifest.media_type,
        "application/vnd.oci.image.index.v1+json"
    );
    let children: Vec<String> = tm.children.iter().map(|c| c.digest.clone()).collect();
    assert_eq!(children, img.children);
    for c in &tm.children {
        assert_eq!(sha(&c.bytes), c.digest);
    }
    let mut ours: Vec<&str> = tm.blobs.iter().map(|b| b.digest.as_str()).collect();
    let mut theirs: Vec<&str> = img.blob_digests.iter().map(String::as_str).collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    // The shared base layer is one blob.
    assert_eq!(ours.len(), theirs.len());
}

#[test]
fn tag_only_ref_name_uses_the_containerd_name_and_mapping_applies() {
    let mut setup = Setup::new();
    setup.config.mapping = vec![gateway_tx::config::Mapping {
        from: "team-a/".into(),
        to: "mirror/team-a/".into(),
    }];
    let mut h = Harness::new(setup);
    let options = ImageOptions {
        ref_name: RefName::TagOnly,
        ..Default::default()
    };
    let img = weir_imagegen::oci_archive_with(
        &h.stage(),
        "t.tar",
        5,
        &layers(),
        "team-a/app:4",
        &options,
    )
    .unwrap();
    h.setup.drop_file(&img.path, "t.tar");
    let images = h.accept_one();
    let tm = h.manifest(&images[0]);
    assert_eq!(tm.destination.display(), "mirror/team-a/app:4");
    assert_eq!(
        images[0].references,
        vec!["mirror/team-a/app:4".to_string()]
    );
}

#[test]
fn redropped_image_goes_to_done_as_already_sent_and_is_not_queued_again() {
    let mut h = Harness::new(Setup::new());
    let first = weir_imagegen::docker_archive(
        &h.stage(),
        "a.tar",
        9,
        &layers(),
        "team-a/app:1",
        DockerFlavor::Classic,
    )
    .unwrap();
    let again = weir_imagegen::docker_archive(
        &h.stage(),
        "b.tar",
        9,
        &layers(),
        "team-a/app:1",
        DockerFlavor::Classic,
    )
    .unwrap();
    h.setup.drop_file(&first.path, "app.tar");
    let images = h.accept_one();
    assert!(h.queue.try_recv().is_ok());
    // Same image, same name, dropped again: compression is deterministic,
    // so the manifest digest is the same and it is recognised.
    let dropped = h.setup.drop_file(&again.path, "app.tar");
    let out = h.poll();
    assert!(matches!(out[0].1, DropOutcome::AlreadySent(_)), "{out:?}");
    assert!(!dropped.exists());
    let moved = h.setup.spool().join("done/app.tar.1");
    assert!(moved.exists());
    assert_eq!(reason(&moved)["code"], "already-sent");
    assert!(reason(&moved)["message"]
        .as_str()
        .unwrap()
        .contains(&images[0].manifest_digest));
    assert!(h.queue.try_recv().is_err(), "not queued again");
    assert_eq!(h.store.images().unwrap().len(), 1);
    let audit: Vec<String> = h
        .store
        .audit_entries()
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(audit, vec!["accepted", "already-sent"]);
}

#[test]
fn same_image_to_a_new_tag_is_sent() {
    let mut h = Harness::new(Setup::new());
    let a = weir_imagegen::docker_archive(
        &h.stage(),
        "a.tar",
        9,
        &layers(),
        "team-a/app:1",
        DockerFlavor::Classic,
    )
    .unwrap();
    let b = weir_imagegen::docker_archive(
        &h.stage(),
        "b.tar",
        9,
        &layers(),
        "team-a/app:2",
        DockerFlavor::Classic,
    )
    .unwrap();
    h.setup.drop_file(&a.path, "a.tar");
    let first = h.accept_one();
    h.setup.drop_file(&b.path, "b.tar");
    let second = h.accept_one();
    assert_eq!(first[0].manifest_digest, second[0].manifest_digest);
    assert_eq!(second[0].references, vec!["team-a/app:2".to_string()]);
}

#[test]
fn files_in_flight_are_never_read() {
    let mut h = Harness::new(Setup::new());
    let spool = h.setup.spool().to_path_buf();
    for name in [
        ".app.tar",
        "app.tar.partial",
        "orphan.tar.scan.json",
        "x.reason.json",
    ] {
        std::fs::write(spool.join(name), b"not an archive at all").unwrap();
    }
    assert!(h.poll().is_empty());
    for name in [
        ".app.tar",
        "app.tar.partial",
        "orphan.tar.scan.json",
        "x.reason.json",
    ] {
        assert!(spool.join(name).exists(), "{name} was moved");
    }
    assert_eq!(
        std::fs::read_dir(spool.join("rejected")).unwrap().count(),
        0
    );
    assert!(h.store.audit_entries().unwrap().is_empty());
    // Renamed into place, it is read.
    let img =
        weir_imagegen::oci_archive(&h.stage(), "x.tar", 1, &layers(), "team-a/app:1").unwrap();
    std::fs::rename(&img.path, spool.join("app.tar.partial")).unwrap();
    assert!(h.poll().is_empty());
    std::fs::rename(spool.join("app.tar.partial"), spool.join("app.tar")).unwrap();
    h.accept_one();
}

#[test]
fn garbage_is_rejected_with_a_reason_file() {
    let mut h = Harness::new(Setup::new());
    std::fs::write(h.setup.spool().join("junk.tar"), vec![0u8; 10_000]).unwrap();
    let (moved, code) = h.refuse_one();
    assert_eq!(code, "bad-archive");
    assert!(moved.exists());
    let r = reason(&moved);
    assert_eq!(r["code"], "bad-archive");
    assert!(!r["message"].as_str().unwrap().is_empty());
    assert_eq!(h.store.audit_entries().unwrap()[0].outcome, "rejected");
}

/// A name near the 255-byte limit leaves no room for `.reason.json`: the
/// drop is still rejected once, with its reason file, under a shorter name
/// (the reason keeps the whole one), and not retried without end.
#[test]
fn a_drop_with_a_long_name_is_rejected_with_its_reason_under_a_shorter_name() {
    let mut h = Harness::new(Setup::new());
    let long = format!("{}.tar", "é".repeat(125));
    assert_eq!(long.len(), 254);
    std::fs::write(h.setup.spool().join(&long), vec![0u8; 10_000]).unwrap();
    let out = h.poll();
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(matches!(&out[0].1, DropOutcome::Rejected(r) if r.code.as_str() == "bad-archive"));
    let rejected = h.setup.spool().join("rejected");
    let mut names: Vec<String> = std::fs::read_dir(&rejected)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    let moved = rejected.join(&names[0]);
    assert!(
        names[0].len() <= 200 && long.starts_with(&names[0]),
        "{names:?}"
    );
    assert_eq!(names[1], format!("{}.reason.json", names[0]));
    let r = reason(&moved);
    assert_eq!(r["code"], "bad-archive");
    assert_eq!(r["source"], long.as_str());
    assert!(!h.setup.spool().join(&long).exists());
    assert!(h.poll().is_empty(), "nothing left to retry");
    assert_eq!(h.store.audit_entries().unwrap().len(), 1);
}

/// An image tagged like a signature (`sha256-<hex>.sig`) would replace
/// another image's signature on the high side, which refuses it: refused
/// here, where the person who dropped it sees why.
#[test]
fn an_image_tagged_like_a_signature_is_refused_with_no_reference() {
    let mut h = Harness::new(Setup::new());
    let tag = format!("sha256-{}.sig", "ab".repeat(32));
    let img = weir_imagegen::docker_archive(
        &h.stage(),
        "sig.tar",
        3,
        &layers(),
        &format!("team-a/app:{tag}"),
        DockerFlavor::Classic,
    )
    .unwrap();
    h.setup.drop_file(&img.path, "sig.tar");
    let (moved, code) = h.refuse_one();
    assert_eq!(code, "no-reference");
    let r = reason(&moved);
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("signature or referrers tag"),
        "{r}"
    );
}

/// A file copied into the spool (not renamed in, as the convention asks)
/// is read while it is still being written: it does not parse, but it was
/// written moments ago, so it stays in the spool instead of being rejected
/// half-written; once it stops changing it is judged as it is.
#[test]
fn a_drop_still_being_written_is_not_rejected_until_it_stops_changing() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut h = Harness::new(Setup::new());
    let settle = std::time::Duration::from_millis(500);
    h.ingestor.set_settle(settle);
    let path = h.setup.spool().join("copying.tar");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&[1u8; 700]).unwrap();
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        std::thread::spawn(move || {
            while writing.load(Ordering::Relaxed) {
                let _ = file.write_all(&[1u8; 16]);
            }
        })
    };
    let mut still = 0;
    for _ in 0..50 {
        let out = h.poll();
        assert_eq!(out.len(), 1, "{out:?}");
        match &out[0].1 {
            DropOutcome::StillChanging => still += 1,
            other => panic!("judged while it was being written: {other:?}"),
        }
        if still >= 3 {
            break;
        }
    }
    writing.store(false, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(still >= 3);
    assert!(!h.setup.spool().join("rejected/copying.tar").exists());
    std::thread::sleep(settle + std::time::Duration::from_millis(100));
    // Written to the end (and still garbage): rejected with its reason.
    let (moved, code) = h.refuse_one();
    assert_eq!(code, "bad-archive");
    assert_eq!(reason(&moved)["code"], "bad-archive");
}

/// A refusal is recorded before anything moves. A restart after the scan
/// report moved to rejected/ but before the drop did finishes the recorded
/// verdict (here `gate-exceeded`), instead of judging the drop again
/// without its report; the audit entry is not written twice.
#[test]
fn a_restart_between_the_moves_of_report_and_drop_keeps_the_verdict() {
    let mut h = Harness::new(Setup::new());
    let spool = h.setup.spool();
    let drop = spool.join("gated.tar");
    std::fs::write(&drop, vec![0u8; 10_000]).unwrap();
    let (size, modified_ns) = stamp(&drop);
    h.store
        .record_refusal(
            "gated.tar",
            &DropRecord {
                size,
                modified_ns,
                images: Vec::new(),
                refused: Some(("gate-exceeded".into(), "3 critical, at most 0".into())),
            },
            &AuditEntry {
                at: 1,
                source: "gated.tar".into(),
                outcome: "rejected".into(),
                code: Some("gate-exceeded".into()),
                message: "3 critical, at most 0".into(),
                references: Vec::new(),
                manifest_digests: Vec::new(),
            },
        )
        .unwrap();
    // The report had moved when the process stopped.
    std::fs::write(spool.join("rejected/gated.tar.scan.json"), b"{}").unwrap();
    let (moved, code) = h.refuse_one();
    assert_eq!(code, "gate-exceeded");
    let r = reason(&moved);
    assert_eq!(r["code"], "gate-exceeded");
    assert_eq!(r["message"], "3 critical, at most 0");
    assert_eq!(h.store.audit_entries().unwrap().len(), 1);
    assert_eq!(h.store.drop_record("gated.tar").unwrap(), None);
}

/// A hand-made OCI archive: no reference, or a blob stored under a wrong name.
fn handmade_oci(dir: &Path, ref_name: Option<&str>, corrupt: bool) -> PathBuf {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let layer = b"layer bytes".to_vec();
    let layer_digest = if corrupt {
        sha(b"other bytes")
    } else {
        sha(&layer)
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let mut desc = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha(&manifest),
        "size": manifest.len(),
    });
    if let Some(r) = ref_name {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": r});
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]}).to_string();
    let path = dir.join("hand.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut add = |name: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json".into(), index.as_bytes());
    for (digest, bytes) in [
        (sha(&config), &config),
        (layer_digest.clone(), &layer),
        (sha(&manifest), &manifest),
    ] {
        add(format!("blobs/sha256/{}", &digest[7..]), bytes);
    }
    b.finish().unwrap();
    path
}

#[test]
fn image_without_a_usable_reference_is_rejected() {
    let mut h = Harness::new(Setup::new());
    let p = handmade_oci(&h.stage(), None, false);
    h.setup.drop_file(&p, "noref.tar");
    let (moved, code) = h.refuse_one();
    assert_eq!(code, "no-reference");
    assert_eq!(reason(&moved)["code"], "no-reference");
    // A bare tag with no repository is not usable either.
    let p = handmade_oci(&h.stage(), Some("latest"), false);
    h.setup.drop_file(&p, "tagonly.tar");
    assert_eq!(h.refuse_one().1, "no-reference");
}

/// A docker archive whose config has no `rootfs.diff_ids` is refused:
/// nothing would check its layer files.
#[test]
fn a_docker_config_without_diff_ids_is_refused_naming_the_field() {
    let mut h = Harness::new(Setup::new());
    let path = h.stage().join("docker.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut hd = tar::Header::new_gnu();
        hd.set_size(data.len() as u64);
        hd.set_mode(0o644);
        hd.set_cksum();
        b.append_data(&mut hd, name, data).unwrap();
    };
    add(
        "manifest.json",
        br#"[{"Config":"c.json","RepoTags":["team-a/app:1"],"Layers":["l/layer.tar"]}]"#,
    );
    add("c.json", br#"{"architecture":"amd64","os":"linux"}"#);
    add("l/layer.tar", &[0u8; 1024]);
    b.finish().unwrap();
    h.setup.drop_file(&path, "docker.tar");
    let (moved, code) = h.refuse_one();
    assert_eq!(code, "bad-archive");
    let message = reason(&moved)["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("c.json") && message.contains("rootfs.diff_ids"),
        "{message}"
    );
    assert!(h.queue.try_recv().is_err());
}

#[test]
fn blob_that_contradicts_its_digest_is_rejected_and_not_stored() {
    let mut h = Harness::new(Setup::new());
    let p = handmade_oci(&h.stage(), Some("team-a/app:1"), true);
    h.setup.drop_file(&p, "bad.tar");
    let (moved, code) = h.refuse_one();
    assert_eq!(code, "corrupt-archive");
    assert_eq!(reason(&moved)["code"], "corrupt-archive");
    assert!(!h
        .store
        .has_object(&ObjectId::from_digest(&sha(b"other bytes")).unwrap()));
    assert!(h.queue.try_recv().is_err());
}

const GATED: &str = r#"
namespaces: [team-a]
rules:
  - regex: "team-a/app:.*"
    gate: High
"#;

#[test]
fn gate_without_report_is_rejected_and_with_a_clean_report_accepted() {
    let mut h = Harness::new(Setup::new().with_rules(GATED));
    let a = weir_imagegen::oci_archive(&h.stage(), "a.tar", 1, &layers(), "team-a/app:1").unwrap();
    h.setup.drop_file(&a.path, "a.tar");
    let (moved, code) = h.refuse_one();
    assert_eq!(code, "no-scan-report");
    assert_eq!(reason(&moved)["code"], "no-scan-report");

    // Trivy schema 2 report naming this image, worst severity High.
    let b = weir_imagegen::oci_archive(&h.stage(), "b.tar", 2, &layers(), "team-a/app:2").unwrap();
    let report = format!(
        r#"{{"SchemaVersion":2,"ArtifactName":"b.tar","ArtifactType":"container_image",
            "Metadata":{{"OS":{{"Family":"alpine","Name":"3.19.1"}},"ImageID":"{}"}},
            "Results":[{{"Target":"b.tar (alpine 3.19.1)","Class":"os-pkgs","Type":"alpine",
              "Vulnerabilities":[{{"VulnerabilityID":"CVE-2024-0001","Severity":"HIGH"}},
                                 {{"VulnerabilityID":"CVE-2024-0002","Severity":"LOW"}}]}}]}}"#,
        b.config_digest
    );
    std::fs::write(h.setup.spool().join("b.tar.scan.json"), &report).unwrap();
    h.setup.drop_file(&b.path, "b.tar");
    let images = h.accept_one();
    let tm = h.manifest(&images[0]);
    assert_eq!(tm.verdict.worst_severity.as_deref(), Some("High"));
    assert_eq!(tm.verdict.rule.as_deref(), Some("team-a/app:.*"));
    // The report travels to done/ with its drop.
    assert!(h.setup.spool().join("done/b.tar.scan.json").exists());

    // Critical exceeds the gate.
    let c = weir_imagegen::oci_archive(&h.stage(), "c.tar", 3, &layers(), "team-a/app:3").unwrap();
    let critical = report
        .replace("HIGH", "CRITICAL")
        .replace(&b.config_digest, &c.config_digest);
    std::fs::write(h.setup.spool().join("c.tar.scan.json"), critical).unwrap();
    h.setup.drop_file(&c.path, "c.tar");
    assert_eq!(h.refuse_one().1, "gate-exceeded");

    // Namespace not listed.
    let d = weir_imagegen::oci_archive(&h.stage(), "d.tar", 4, &layers(), "team-z/app:1").unwrap();
    h.setup.drop_file(&d.path, "d.tar");
    assert_eq!(h.refuse_one().1, "namespace-not-allowed");
    let audit = h.store.audit_entries().unwrap();
    assert_eq!(audit.len(), 4);
    assert_eq!(audit.iter().filter(|a| a.outcome == "rejected").count(), 3);
}

#[test]
fn restart_after_commit_only_finishes_the_move() {
    let mut h = Harness::new(Setup::new());
    let img =
        weir_imagegen::oci_archive(&h.stage(), "a.tar", 1, &layers(), "team-a/app:1").unwrap();
    let dropped = h.setup.drop_file(&img.path, "a.tar");
    // As if a crash hit between the sled commit and the rename.
    let (size, modified_ns) = stamp(&dropped);
    h.store
        .commit_drop(&gateway_tx::objects::DropCommit {
            source: "a.tar".into(),
            drop: Some(DropRecord {
                size,
                modified_ns,
                images: vec![],
                refused: None,
            }),
            images: vec![],
            audit: gateway_tx::objects::AuditEntry {
                at: 0,
                source: "a.tar".into(),
                outcome: "accepted".into(),
                code: None,
                message: String::new(),
                references: vec![],
                manifest_digests: vec![],
            },
        })
        .unwrap();
    let out = h.poll();
    assert_eq!(out[0].1, DropOutcome::Finished);
    assert!(h.setup.spool().join("done/a.tar").exists());
    assert!(h.store.drop_record("a.tar").unwrap().is_none());
    assert!(h.queue.try_recv().is_err());
}

#[test]
fn shutdown_mid_ingest_leaves_the_drop_for_next_time() {
    let mut h = Harness::new(Setup::new());
    let img = weir_imagegen::docker_archive(
        &h.stage(),
        "a.tar",
        1,
        &layers(),
        "team-a/app:1",
        DockerFlavor::Classic,
    )
    .unwrap();
    let dropped = h.setup.drop_file(&img.path, "a.tar");
    let stopping = Shutdown::new();
    stopping.trigger();
    let outcome = h.ingestor.ingest_file(&dropped, &stopping).unwrap();
    assert_eq!(outcome, DropOutcome::Interrupted);
    assert!(dropped.exists());
    assert!(h.store.audit_entries().unwrap().is_empty());
    assert!(h.queue.try_recv().is_err());
    // Nothing half-written is left behind under a temporary name.
    let tmp = h.setup.config.state_dir.join("objects/tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
    // Next time it goes through.
    h.accept_one();
}
