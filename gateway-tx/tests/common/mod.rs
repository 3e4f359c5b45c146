//! Shared by gateway-tx's integration tests: a configuration in a temporary
//! directory, a frame sink that captures frames in memory, and a receiver
//! side (FrameOpener + BlockCodec) that rebuilds objects from them.

#![allow(dead_code)]

use gateway_tx::config::{
    AuthConfig, CarouselConfig, Compression, FecConfig, IngestConfig, LinkConfig, PolicyConfig,
    Transport, TxConfig,
};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_host::{FrameSink, LinkError, Shutdown};
use weir_proto::{BlockCodec, Body, FecParams, FrameOpener, Key, KeyRing, ObjectId, ObjectKind};

pub const SECRET: [u8; 32] = [0x42; 32];

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: TxConfig,
}

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("1.key");
        std::fs::write(&key_file, hex::encode(SECRET)).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = TxConfig {
            state_dir: dir.path().join("state"),
            spool_dir: dir.path().join("spool"),
            // Tests fill no disk; the guard only needs to let them through.
            state_min_free_mb: 0,
            link: LinkConfig {
                transport: Transport::Udp,
                udp_peer: Some("127.0.0.1:9".parse().unwrap()),
                serial_device: None,
                baud: 115_200,
                outbox_dir: None,
                max_file_bytes: 1 << 20,
                max_file_age_ms: 1000,
                // Fast enough that pacing never slows a test down much.
                rate_bps: 4_000_000_000,
                datagram_size: 1400,
                frame_overhead_bytes: 0,
            },
            auth: AuthConfig {
                key_id: 1,
                key_file,
            },
            fec: FecConfig {
                data_shards: 8,
                parity_shards: 4,
            },
            carousel: CarouselConfig {
                passes: 2,
                retention_hours: 1,
                window_blocks: 4,
                header_every: 16,
            },
            ingest: IngestConfig {
                compression: Compression::Gzip,
                gzip_level: 1,
                poll_interval_ms: 20,
            },
            policy: PolicyConfig::default(),
            mapping: Vec::new(),
            console: None,
            leds: None,
        };
        std::fs::create_dir_all(&config.spool_dir).unwrap();
        Setup { dir, config }
    }

    pub fn spool(&self) -> &Path {
        &self.config.spool_dir
    }

    /// Where test images are generated before being moved into the spool.
    pub fn staging(&self) -> PathBuf {
        let p = self.dir.path().join("staging");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn with_rules(mut self, yaml: &str) -> Self {
        let p = self.dir.path().join("rules.yaml");
        std::fs::write(&p, yaml).unwrap();
        self.config.policy.rules_file = Some(p);
        self
    }

    /// Moves a generated archive into the spool under `name` (a rename, as
    /// operators are told to do).
    pub fn drop_file(&self, from: &Path, name: &str) -> PathBuf {
        let to = self.spool().join(name);
        std::fs::rename(from, &to).unwrap();
        to
    }
}

pub fn key() -> Key {
    Key::from_bytes(1, &SECRET).unwrap()
}

/// Keeps every frame sent; can stop the sender after a number of frames.
#[derive(Clone)]
pub struct CaptureSink {
    pub frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop_after: Option<(usize, Shutdown)>,
}

impl CaptureSink {
    pub fn new() -> Self {
        CaptureSink {
            frames: Arc::new(Mutex::new(Vec::new())),
            stop_after: None,
        }
    }

    /// Triggers `shutdown` once `n` frames were captured.
    pub fn stopping_after(n: usize, shutdown: Shutdown) -> Self {
        CaptureSink {
            frames: Arc::new(Mutex::new(Vec::new())),
            stop_after: Some((n, shutdown)),
        }
    }

    pub fn len(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap())
    }
}

impl FrameSink for CaptureSink {
    fn send(&mut self, frames: &[&[u8]]) -> Result<(), LinkError> {
        let mut all = self.frames.lock().unwrap();
        all.extend(frames.iter().map(|f| f.to_vec()));
        if let Some((n, s)) = &self.stop_after {
            if all.len() >= *n {
                s.trigger();
            }
        }
        Ok(())
    }

    fn max_frame_len(&self) -> usize {
        1400
    }
}

/// Shard frames as the receiver sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenShard {
    pub session: u64,
    pub object: ObjectId,
    pub block: u32,
    pub index: u16,
}

/// What the receiver holds of one object: kind, length, FEC layout, shards.
pub type HeldObject = (ObjectKind, u64, FecParams, BTreeMap<(u32, u16), Vec<u8>>);

/// The receiving side, reduced to what the tests check: frames verified,
/// shards kept, objects rebuilt with the FEC codec and checked by sha256.
#[derive(Default)]
pub struct Reassembler {
    pub shards: HashMap<ObjectId, HeldObject>,
    pub headers: HashMap<ObjectId, u64>,
    pub heartbeats: u64,
    pub order: Vec<SeenShard>,
}

impl Reassembler {
    /// Verifies and files every frame; discards shard frames with
    /// probability `loss_percent` (seeded, so the test is repeatable), so
    /// rebuilding needs parity and repeated passes.
    pub fn feed(&mut self, frames: &[Vec<u8>], loss_percent: u64) {
        let opener = FrameOpener::new(KeyRing::new(vec![key()]).unwrap());
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for f in frames {
            let frame = opener.open(f).expect("every frame verifies");
            match frame.body {
                Body::Heartbeat(_) => self.heartbeats += 1,
                Body::ObjectHeader(h) => {
                    assert_eq!(h.sha256, h.id.0);
                    *self.headers.entry(h.id).or_default() += 1;
                }
                Body::Shard(s) => {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    self.order.push(SeenShard {
                        session: frame.header.session_id,
                        object: s.object,
                        block: s.block,
                        index: s.index,
                    });
                    if rng % 100 < loss_percent {
                        continue;
                    }
                    let e = self
                        .shards
                        .entry(s.object)
                        .or_insert_with(|| (s.kind, s.object_len, s.fec, BTreeMap::new()));
                    e.3.insert((s.block, s.index), s.payload.to_vec());
                }
            }
        }
    }

    /// The object's bytes if every block can be rebuilt and the sha256 matches.
    pub fn object(&self, id: &ObjectId) -> Option<Vec<u8>> {
        let (_, len, fec, shards) = self.shards.get(id)?;
        let codec = BlockCodec::new(*fec).unwrap();
        let mut out = Vec::with_capacity(*len as usize);
        for b in 0..fec.blocks_for(*len) {
            let mut slots: Vec<Option<Vec<u8>>> = (0..fec.total_shards())
                .map(|i| shards.get(&(b, i)).cloned())
                .collect();
            codec.reconstruct_data(&mut slots).ok()?;
            let data: Vec<u8> = slots[..fec.data_shards as usize]
                .iter()
                .flat_map(|s| s.clone().unwrap_or_default())
                .collect();
            out.extend_from_slice(&data[..fec.block_len(*len, b)]);
        }
        (ObjectId::of_bytes(&out) == *id).then_some(out)
    }

    pub fn image_objects(&self) -> Vec<ObjectId> {
        self.shards
            .iter()
            .filter(|(_, v)| v.0 == ObjectKind::Image)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Polls `f` until it returns Some, failing the test after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the sender on a thread with the given sink.
pub fn start(
    config: TxConfig,
    shutdown: Shutdown,
    sink: CaptureSink,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || gateway_tx::run_with_sink(config, shutdown, Box::new(sink)))
}

pub fn reason(path: &Path) -> serde_json::Value {
    let mut name = path.file_name().unwrap().to_os_string();
    name.push(".reason.json");
    let p = path.with_file_name(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}
