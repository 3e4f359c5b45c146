//! Peak memory of gateway-rx while one large blob arrives (the goal
//! is at most 64 MiB RSS for a 4 GiB blob), and the rate it took it at.
//!
//! `cargo bench -p gateway-rx --bench rx_rss`
//!
//! Environment: `WEIR_RSS_BYTES` (blob size, default 4 GiB),
//! `WEIR_RSS_RATE_MBPS` (sender pace in MB/s on the wire, default 60),
//! `WEIR_RSS_DIR` (work directory; needs about 2.3 × the size free).
//! The gateway runs as its own process on loopback UDP and exports to an OCI
//! layout; its VmHWM (peak resident set) is read from /proc at the end.

// libc::kill stops the receiver process the bench started; std has no SIGTERM.
#![allow(unsafe_code)]

use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weir_host::{FrameSink, UdpSink};
use weir_proto::{
    interleave, BlobRef, BlockCodec, Body, Destination, FecParams, FrameSealer, Key, ManifestBytes,
    ObjectHeader, ObjectId, ObjectKind, Origin, ShardFrame, TransferManifest, Verdict,
};

const SECRET: [u8; 32] = [5; 32];
/// Blocks interleaved together on the wire.
const WINDOW: u32 = 64;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Block `b` of the blob: a fast deterministic fill.
fn fill_block(b: u32, buf: &mut [u8]) {
    let mut x = (b as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Paces sends to a byte rate.
struct Pacer {
    start: Instant,
    bytes: u64,
    rate: u64,
}

impl Pacer {
    fn wait(&mut self, n: usize) {
        self.bytes += n as u64;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

struct Sender {
    sealer: FrameSealer,
    sink: UdpSink,
    fec: FecParams,
    codec: BlockCodec,
    pacer: Pacer,
    frame: Vec<u8>,
}

impl Sender {
    fn header(&mut self, id: ObjectId, kind: ObjectKind, len: u64) {
        let h = ObjectHeader {
            id,
            kind,
            len,
            sha256: id.0,
            fec: self.fec,
        };
        self.sealer.seal(&Body::ObjectHeader(h), &mut self.frame);
        self.sink.send(&[&self.frame]).expect("send");
    }

    /// One pass over an object whose block b is produced by `block(b, buf)`.
    fn pass(&mut self, id: ObjectId, kind: ObjectKind, len: u64, block: &dyn Fn(u32, &mut [u8])) {
        self.header(id, kind, len);
        let blocks = self.fec.blocks_for(len);
        let mut data = vec![0u8; self.fec.block_bytes() as usize];
        let mut group = 0;
        while group < blocks {
            let end = (group + WINDOW).min(blocks);
            let mut encoded: Vec<Vec<Vec<u8>>> = Vec::with_capacity((end - group) as usize);
            for b in group..end {
                let n = self.fec.block_len(len, b);
                block(b, &mut data[..n]);
                let mut shards = Vec::new();
                self.codec.encode(&data[..n], &mut shards).expect("encode");
                encoded.push(shards);
            }
            let mut batch: Vec<Vec<u8>> = Vec::with_capacity(64);
            for (rel, i) in interleave(end - group, self.fec.total_shards(), WINDOW) {
                let body = Body::Shard(ShardFrame {
                    object: id,
                    kind,
                    object_len: len,
                    fec: self.fec,
                    block: group + rel,
                    index: i,
                    payload: &encoded[rel as usize][i as usize],
                });
                self.sealer.seal(&body, &mut self.frame);
                batch.push(self.frame.clone());
                if batch.len() == 64 {
                    self.flush(&mut batch);
                }
            }
            self.flush(&mut batch);
            group = end;
        }
    }

    fn flush(&mut self, batch: &mut Vec<Vec<u8>>) {
        if batch.is_empty() {
            return;
        }
        let refs: Vec<&[u8]> = batch.iter().map(|f| f.as_slice()).collect();
        self.sink.send(&refs).expect("send");
        let bytes: usize = batch.iter().map(|f| f.len()).sum();
        self.pacer.wait(bytes);
        batch.clear();
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn status(state: &std::path::Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(state.join("status.json")).ok()?).ok()
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let size = env_u64("WEIR_RSS_BYTES", 4 << 30);
    let rate = env_u64("WEIR_RSS_RATE_MBPS", 60) * 1_000_000;
    let work = match std::env::var_os("WEIR_RSS_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("work directory");
    let root = work.path();
    let fec = FecParams::for_datagram(1400, 32, 8).expect("fec");

    eprintln!("rx_rss: hashing the {size}-byte blob to describe it");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; fec.block_bytes() as usize];
    for b in 0..fec.blocks_for(size) {
        let n = fec.block_len(size, b);
        fill_block(b, &mut buf[..n]);
        hasher.update(&buf[..n]);
    }
    let layer_id = ObjectId(hasher.finalize().into());
    let config_bytes =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let config_id = ObjectId::of_bytes(&config_bytes);
    let manifest_bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_id.digest(), "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_id.digest(), "size": size}],
    }))
    .expect("json");
    let destination = Destination {
        repository: "bench/big".into(),
        tags: vec!["1".into()],
    };
    let manifest_digest = ObjectId::of_bytes(&manifest_bytes).digest();
    let verdict = Verdict {
        rule: None,
        gate: None,
        worst_severity: None,
        signature: None,
        summary: "bench".into(),
    };
    let ledger = weir_test_support::genesis_record(weir_proto::ledger::RecordFields {
        manifest_digest: manifest_digest.clone(),
        destination: destination.clone(),
        source: "bench".into(),
        verdict: verdict.clone(),
        accepted_at: 0,
    });
    let tm = TransferManifest {
        destination,
        manifest: ManifestBytes {
            digest: manifest_digest,
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: manifest_bytes,
        },
        children: vec![],
        referrers: vec![],
        blobs: vec![
            BlobRef {
                digest: config_id.digest(),
                size: config_bytes.len() as u64,
                media_type: "application/vnd.oci.image.config.v1+json".into(),
            },
            BlobRef {
                digest: layer_id.digest(),
                size,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            },
        ],
        origin: Origin {
            source: "bench".into(),
            source_reference: None,
            ingested_at: 0,
        },
        verdict,
        ledger,
    };
    let image_bytes = tm.to_object_bytes();
    let image_id = ObjectId::of_bytes(&image_bytes);

    let addr: SocketAddr = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("port");
    let key_path = root.join("1.key");
    std::fs::write(&key_path, hex::encode(SECRET)).expect("key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config = root.join("rx.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}/state\"\n[link]\ntransport = \"udp\"\nudp_listen = \"{addr}\"\n\
             [[auth.keys]]\nid = 1\nfile = \"{}\"\n",
            root.display(),
            key_path.display()
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway-rx"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("gateway-rx starts");
    let pid = child.id();
    let state = root.join("state");
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&state).is_none() {
        assert!(Instant::now() < deadline, "gateway-rx did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let key = Key::from_bytes(1, &SECRET).expect("key");
    let mut tx = Sender {
        sealer: FrameSealer::new(key, 1),
        sink: UdpSink::connect(addr, 1400).expect("sink"),
        fec,
        codec: BlockCodec::new(fec).expect("codec"),
        pacer: Pacer {
            start: Instant::now(),
            bytes: 0,
            rate,
        },
        frame: Vec::new(),
    };
    let start = Instant::now();
    let mut passes = 0;
    let mut peak_rss_seen = 0;
    loop {
        passes += 1;
        eprintln!("rx_rss: pass {passes}");
        let small = |bytes: &[u8]| {
            let bytes = bytes.to_vec();
            move |b: u32, out: &mut [u8]| {
                let start = (b as u64 * fec.block_bytes()) as usize;
                out.copy_from_slice(&bytes[start..start + out.len()]);
            }
        };
        tx.pass(
            config_id,
            ObjectKind::Blob,
            config_bytes.len() as u64,
            &small(&config_bytes),
        );
        tx.pass(
            image_id,
            ObjectKind::Image,
            image_bytes.len() as u64,
            &small(&image_bytes),
        );
        tx.pass(layer_id, ObjectKind::Blob, size, &fill_block);
        // Let the receiver finish what it has; another pass once it stalls.
        let mut done = false;
        let mut last = String::new();
        let mut last_change = Instant::now();
        while last_change.elapsed() < Duration::from_secs(20) {
            peak_rss_seen = peak_rss_seen.max(proc_status_kib(pid, "VmRSS:").unwrap_or(0));
            let Some(s) = status(&state) else { continue };
            if s["counters"]["pushes_done"] == 1 {
                done = true;
                break;
            }
            let progress = format!("{} {}", s["receiving"], s["counters"]);
            if progress != last {
                last = progress;
                last_change = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if done || passes == 5 {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let s = status(&state).unwrap_or_default();
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    println!(
        "rx_rss: {} MiB blob, {} pass(es), {:.1} s, {:.1} MB/s of object data; gateway-rx peak RSS (VmHWM) {:.1} MiB \
         (sampled VmRSS max {:.1} MiB); frames lost ~{}, blocks repaired {}, delivered: {}",
        size >> 20,
        passes,
        seconds,
        size as f64 / seconds / 1e6,
        hwm as f64 / 1024.0,
        peak_rss_seen as f64 / 1024.0,
        s["counters"]["frames_lost_estimate"],
        s["counters"]["blocks_repaired"],
        s["counters"]["pushes_done"] == 1,
    );
}
