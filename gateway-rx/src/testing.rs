//! Test support, shared by the unit tests and (through `#[path]`) the
//! integration tests, so it uses nothing of this crate:
//!
//! - Debian's docker-registry on a free loopback port with temporary
//!   storage, stopped when dropped;
//! - sample images (single-arch and a multi-arch index) from a seed;
//! - a minimal sender: seals object headers and interleaved shards with the
//!   proto API and sends them over UDP, paced, dropping what a test asks.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weir_host::{FrameSink, UdpSink};
use weir_proto::{
    interleave, BlobRef, BlockCodec, Body, Destination, FecParams, FrameSealer, Key, ManifestBytes,
    ObjectHeader, ObjectId, ObjectKind, Origin, ShardFrame, TransferManifest, Verdict,
};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// bcrypt of "right-password" (cost 4), for htpasswd tests.
pub const RIGHT_PASSWORD_BCRYPT: &str =
    "$2b$04$CPy7H9Vs5MNr3MKu0Bh9GuYMu4CRIn1.9wnHdK0W6xZHv/UzNI6ua";

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Storage maintenance read-only mode: pushes get a 4xx.
    pub read_only: bool,
    /// (user, password): basic authentication through an htpasswd file.
    pub htpasswd: Option<(String, String)>,
}

pub struct TestRegistry {
    dir: tempfile::TempDir,
    port: u16,
    options: RegistryOptions,
    child: Option<Child>,
}

/// A running registry, or None with a message when the binary is missing.
pub fn registry_or_skip(options: &RegistryOptions) -> Option<TestRegistry> {
    if !std::path::Path::new(REGISTRY_BIN).exists() {
        eprintln!("SKIPPED: {REGISTRY_BIN} not found; install it with: apt-get install -y docker-registry");
        return None;
    }
    Some(TestRegistry::start_new(options.clone()))
}

impl TestRegistry {
    pub fn default_options() -> RegistryOptions {
        RegistryOptions::default()
    }

    pub fn start_new(options: RegistryOptions) -> TestRegistry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let mut reg = TestRegistry {
            dir: tempfile::tempdir().expect("temporary directory"),
            port,
            options,
            child: None,
        };
        reg.start();
        reg
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn write_config(&self) -> PathBuf {
        let storage = self.dir.path().join("storage");
        let auth = match &self.options.htpasswd {
            Some((user, hash)) => {
                let file = self.dir.path().join("htpasswd");
                std::fs::write(&file, format!("{user}:{hash}\n")).expect("htpasswd file");
                format!(
                    "auth:\n  htpasswd:\n    realm: weir-test\n    path: {}\n",
                    file.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: {}\n\
             http:\n  addr: 127.0.0.1:{}\n{}",
            storage.display(),
            self.options.read_only,
            self.port,
            auth
        );
        let path = self.dir.path().join("config.yml");
        std::fs::write(&path, config).expect("registry config");
        path
    }

    /// Starts the registry (again) on the same port and storage.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "registry already running");
        let config = self.write_config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("registry log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("docker-registry starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "registry did not answer on {}; log:\n{}",
                self.addr(),
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(self.addr()) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart_with(&mut self, change: impl FnOnce(&mut RegistryOptions)) {
        self.stop();
        change(&mut self.options);
        self.start();
    }

    /// How many times the registry accepted a manifest PUT for `repo:tag`
    /// (from its access log).
    pub fn manifest_puts(&self, repo: &str, tag: &str) -> usize {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let needle = format!("\"PUT /v2/{repo}/manifests/{tag} HTTP/1.1\" 201");
        log.lines().filter(|l| l.contains(&needle)).count()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Deterministic bytes from a seed.
pub fn bytes_from(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An image and the bytes of every blob it names (in `tm.blobs` order).
#[derive(Debug, Clone)]
pub struct SampleImage {
    pub tm: TransferManifest,
    pub blobs: Vec<Vec<u8>>,
}

impl SampleImage {
    pub fn image_bytes(&self) -> Vec<u8> {
        self.tm.to_object_bytes()
    }

    pub fn image_id(&self) -> ObjectId {
        ObjectId::of_bytes(&self.image_bytes())
    }

    pub fn blob_ids(&self) -> Vec<ObjectId> {
        self.blobs.iter().map(|b| ObjectId::of_bytes(b)).collect()
    }

    /// Every object that crosses for this image: the blobs, then the image object.
    pub fn objects(&self) -> Vec<(ObjectKind, Vec<u8>)> {
        let mut out: Vec<(ObjectKind, Vec<u8>)> = self
            .blobs
            .iter()
            .map(|b| (ObjectKind::Blob, b.clone()))
            .collect();
        out.push((ObjectKind::Image, self.image_bytes()));
        out
    }
}

fn blob_ref(bytes: &[u8], media_type: &str) -> BlobRef {
    BlobRef {
        digest: ObjectId::of_bytes(bytes).digest(),
        size: bytes.len() as u64,
        media_type: media_type.into(),
    }
}

fn oci_manifest(config: &BlobRef, layers: &[BlobRef]) -> ManifestBytes {
    let desc = |b: &BlobRef| serde_json::json!({"mediaType": b.media_type, "digest": b.digest, "size": b.size});
    let value = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc(config),
        "layers": layers.iter().map(desc).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&value).expect("json");
    ManifestBytes {
        digest: ObjectId::of_bytes(&bytes).digest(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        bytes,
    }
}

fn transfer(
    repo: &str,
    tags: &[&str],
    manifest: ManifestBytes,
    children: Vec<ManifestBytes>,
    blobs: Vec<BlobRef>,
) -> TransferManifest {
    TransferManifest {
        destination: Destination {
            repository: repo.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        },
        manifest,
        children,
        blobs,
        origin: Origin {
            source: "test".into(),
            source_reference: None,
            ingested_at: 0,
        },
        verdict: Verdict {
            rule: None,
            worst_severity: None,
            summary: "test".into(),
        },
    }
}

/// A single-arch OCI image: a config naming `repo` and the layer count, and
/// `layers` layers, layer i seeded by i (so images share their first layers).
pub fn sample_image(repo: &str, tags: &[&str], layers: usize, size: usize) -> SampleImage {
    let config_json = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"layers":{layers},"repo":"{repo}"}}"#
    );
    let mut blobs = vec![config_json.into_bytes()];
    for i in 0..layers {
        blobs.push(bytes_from(i as u64 + 1, size + i));
    }
    let config = blob_ref(&blobs[0], "application/vnd.oci.image.config.v1+json");
    let layer_refs: Vec<BlobRef> = blobs[1..]
        .iter()
        .map(|b| blob_ref(b, "application/vnd.oci.image.layer.v1.tar"))
        .collect();
    let manifest = oci_manifest(&config, &layer_refs);
    let mut refs = vec![config];
    refs.extend(layer_refs);
    SampleImage {
        tm: transfer(repo, tags, manifest, vec![], refs),
        blobs,
    }
}

/// A two-platform OCI index.
pub fn sample_index(repo: &str, tags: &[&str]) -> SampleImage {
    let mut children = Vec::new();
    let mut refs = Vec::new();
    let mut blobs = Vec::new();
    let mut entries = Vec::new();
    for (n, arch) in ["amd64", "arm64"].iter().enumerate() {
        let config_bytes = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        )
        .into_bytes();
        let layer_bytes = bytes_from(100 + n as u64, 3000);
        let config = blob_ref(&config_bytes, "application/vnd.oci.image.config.v1+json");
        let layer = blob_ref(&layer_bytes, "application/vnd.oci.image.layer.v1.tar");
        let m = oci_manifest(&config, std::slice::from_ref(&layer));
        entries.push(serde_json::json!({
            "mediaType": m.media_type, "digest": m.digest, "size": m.bytes.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
        children.push(m);
        refs.push(config);
        refs.push(layer);
        blobs.push(config_bytes);
        blobs.push(layer_bytes);
    }
    let index_bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .expect("json");
    let index = ManifestBytes {
        digest: ObjectId::of_bytes(&index_bytes).digest(),
        media_type: "application/vnd.oci.image.index.v1+json".into(),
        bytes: index_bytes,
    };
    SampleImage {
        tm: transfer(repo, tags, index, children, refs),
        blobs,
    }
}

/// Alters a shard payload before sealing: (object, block, index, payload).
pub type Tamper<'a> = &'a mut dyn FnMut(&ObjectId, u32, u16, &mut Vec<u8>);

/// A sender reduced to what a receiver test needs.
pub struct TestSender {
    sealer: FrameSealer,
    /// None: a sender that only seals (the test carries the frames itself).
    sink: Option<UdpSink>,
    pub fec: FecParams,
    /// Frames sealed, in order; a test picks which to send.
    frame: Vec<u8>,
}

impl TestSender {
    pub fn new(
        key: Key,
        session_id: u64,
        peer: SocketAddr,
        datagram_size: usize,
        k: u16,
        m: u16,
    ) -> TestSender {
        TestSender {
            sink: Some(UdpSink::connect(peer, datagram_size).expect("udp sink")),
            ..Self::sealer_only(key, session_id, datagram_size, k, m)
        }
    }

    /// A sender that seals frames for another transport.
    pub fn sealer_only(
        key: Key,
        session_id: u64,
        datagram_size: usize,
        k: u16,
        m: u16,
    ) -> TestSender {
        TestSender {
            sealer: FrameSealer::new(key, session_id),
            sink: None,
            fec: FecParams::for_datagram(datagram_size, k, m).expect("fec params"),
            frame: Vec::new(),
        }
    }

    /// Seals one pass over `objects`: each object's header, then its shards
    /// interleaved. Every frame is sealed (so skipped ones leave sequence
    /// gaps, as real loss does) but kept only if `keep(n, shard)` for its
    /// running number n and (block, index) (None for a header). `tamper` may
    /// alter a shard payload before sealing.
    pub fn seal(
        &mut self,
        objects: &[(ObjectKind, Vec<u8>)],
        keep: &mut dyn FnMut(u64, Option<(u32, u16)>) -> bool,
        tamper: Tamper<'_>,
    ) -> Vec<Vec<u8>> {
        let codec = BlockCodec::new(self.fec).expect("codec");
        let mut kept = Vec::new();
        let mut n = 0u64;
        let mut shards = Vec::new();
        for (kind, bytes) in objects {
            let id = ObjectId::of_bytes(bytes);
            let len = bytes.len() as u64;
            let header = ObjectHeader {
                id,
                kind: *kind,
                len,
                sha256: id.0,
                fec: self.fec,
            };
            self.sealer
                .seal(&Body::ObjectHeader(header), &mut self.frame);
            if keep(n, None) {
                kept.push(self.frame.clone());
            }
            n += 1;
            let blocks = self.fec.blocks_for(len);
            let mut encoded: Vec<Vec<Vec<u8>>> = Vec::with_capacity(blocks as usize);
            for b in 0..blocks {
                let start = (b as u64 * self.fec.block_bytes()) as usize;
                let blen = self.fec.block_len(len, b);
                codec
                    .encode(&bytes[start..start + blen], &mut shards)
                    .expect("encode");
                encoded.push(shards.clone());
            }
            for (b, i) in interleave(blocks, self.fec.total_shards(), 8) {
                let mut payload = encoded[b as usize][i as usize].clone();
                tamper(&id, b, i, &mut payload);
                let body = Body::Shard(ShardFrame {
                    object: id,
                    kind: *kind,
                    object_len: len,
                    fec: self.fec,
                    block: b,
                    index: i,
                    payload: &payload,
                });
                self.sealer.seal(&body, &mut self.frame);
                if keep(n, Some((b, i))) {
                    kept.push(self.frame.clone());
                }
                n += 1;
            }
        }
        kept
    }

    /// Seals and sends one whole pass; returns the frames.
    pub fn pass(&mut self, objects: &[(ObjectKind, Vec<u8>)]) -> Vec<Vec<u8>> {
        let frames = self.seal(objects, &mut |_, _| true, &mut |_, _, _, _| {});
        self.send(&frames);
        frames
    }

    /// Sends frames as they are, paced so loopback buffers keep up.
    pub fn send(&mut self, frames: &[Vec<u8>]) {
        for chunk in frames.chunks(64) {
            let refs: Vec<&[u8]> = chunk.iter().map(|f| f.as_slice()).collect();
            self.sink
                .as_mut()
                .expect("a UDP sender")
                .send(&refs)
                .expect("udp send");
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}
