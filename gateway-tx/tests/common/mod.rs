//! Shared by gateway-tx's integration tests: a configuration in a temporary
//! directory and a frame sink that captures frames in memory. The receiver
//! side that rebuilds objects from them is `weir_test_support::Reassembler`.

#![allow(dead_code)]

use gateway_tx::config::{
    AuthConfig, CarouselConfig, Compression, FecConfig, IngestConfig, LinkConfig, PolicyConfig,
    Transport, TxConfig,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use weir_host::{FrameSink, LinkError, Shutdown};
use weir_proto::Key;

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
            metrics: None,
            pull: None,
            registry: Vec::new(),
            ledger: Default::default(),
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
