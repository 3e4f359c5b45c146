//! The archive formats a drop may be, read in two steps: a *plan* from the
//! metadata alone (references, config digests; enough for the policy), then,
//! once the policy said yes, the blobs written into the object store.
//!
//! - docker-archive, any flavour (`docker save` `<id>/layer.tar`, skopeo
//!   `<digest>.tar` with symlinks, Docker ≥ 25 OCI-in-docker): read through
//!   `manifest.json`. Layers are uncompressed tars: they are compressed
//!   (deterministically) into a new OCI image manifest; the config blob is
//!   kept byte for byte, so the config digest (the image id) is unchanged.
//!   A layer that is already gzip or zstd crosses as it is.
//! - OCI archive (`oci-layout` + `index.json` + `blobs/`), including an
//!   index of platform manifests: everything crosses as it is, so every
//!   digest is unchanged.
//!   Entries of index.json that are referrers (a cosign tag, `ref.name`
//!   `sha256-<hex>.sig`, `.att` or `.sbom`; a manifest with a `subject`; a
//!   referrers index tagged `sha256-<hex>`) are not images: they cross with
//!   the image they speak of.

use super::archive::{ArchiveError, TarIndex};
use crate::config::Compression;
use crate::objects::{ObjectStore, StoreError, StoredObject};
use crate::policy::SignatureEvidence;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use weir_host::signatures::{signature_layers, MAX_PAYLOAD_BYTES};
use weir_host::Shutdown;
use weir_proto::referrers::{
    is_attachment_tag, ReferrerDoc, MAX_REFERRERS, MAX_REFERRER_MANIFEST_BYTES,
};
use weir_proto::{Attachment, BlobRef, ManifestBytes, ObjectId, Referrer, MAX_BLOBS_PER_IMAGE};

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const COPY_BUFFER: usize = 256 << 10;

/// Why the drop's content cannot become objects.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// Unreadable or not a format we know: `bad-archive`.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Content contradicts its own digests: `corrupt-archive`.
    #[error("{0}")]
    Corrupt(String),
    /// Our side failed (disk full...): the drop stays for a retry.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shutdown came first: the drop stays and is read again next start.
    #[error("interrupted by shutdown")]
    Interrupted,
}

fn format_err(msg: impl Into<String>) -> DropError {
    DropError::Archive(ArchiveError::Format(msg.into()))
}

/// Which kind of archive a drop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Docker,
    Oci,
}

/// One image of a drop, before any blob is written.
#[derive(Debug, Clone)]
pub struct ImagePlan {
    /// References as the archive gives them (RepoTags, ref.name).
    pub references: Vec<String>,
    /// Config digests: one, or one per platform.
    pub config_digests: Vec<String>,
    pub content: PlanContent,
    /// Referrers of the image and its children found in the drop.
    pub referrers: Vec<Referrer>,
    /// The blobs those referrers name (not among the image's own).
    pub referrer_blobs: Vec<BlobRef>,
    /// Signatures among the referrers, with their payloads.
    pub signatures: SignatureEvidence,
}

#[derive(Debug, Clone)]
pub enum PlanContent {
    Docker {
        config: Vec<u8>,
        /// Archive members of the layers, in order.
        layers: Vec<String>,
        /// From the config's rootfs; checked against uncompressed layers.
        diff_ids: Vec<String>,
    },
    Oci {
        manifest: ManifestBytes,
        children: Vec<ManifestBytes>,
        blobs: Vec<BlobRef>,
    },
}

/// An image whose blobs are all in the object store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub manifest: ManifestBytes,
    pub children: Vec<ManifestBytes>,
    /// The image's blobs and, when referrers cross, theirs.
    pub blobs: Vec<BlobRef>,
    pub referrers: Vec<Referrer>,
}

/// How docker-archive layers are compressed.
#[derive(Debug, Clone, Copy)]
pub struct LayerCompression {
    pub kind: Compression,
    pub level: u32,
}

impl LayerCompression {
    fn cache_key(&self, diff_id: &str) -> String {
        match self.kind {
            Compression::Gzip => format!("gzip-{} {diff_id}", self.level),
            Compression::None => format!("none {diff_id}"),
        }
    }
}

pub fn detect(index: &TarIndex) -> Result<ArchiveKind, DropError> {
    if index.contains("manifest.json") {
        Ok(ArchiveKind::Docker)
    } else if index.contains("index.json") {
        Ok(ArchiveKind::Oci)
    } else {
        Err(format_err(
            "neither a docker-archive (manifest.json) nor an OCI archive (index.json)",
        ))
    }
}

/// Reads the plans of every image in the drop.
pub fn plan(index: &TarIndex) -> Result<Vec<ImagePlan>, DropError> {
    match detect(index)? {
        ArchiveKind::Docker => plan_docker(index),
        ArchiveKind::Oci => plan_oci(index),
    }
}

// ---------------------------------------------------------------- docker

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize, Default)]
struct ImageConfig {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

fn plan_docker(index: &TarIndex) -> Result<Vec<ImagePlan>, DropError> {
    let bytes = index.read_small("manifest.json")?;
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&bytes).map_err(|e| format_err(format!("manifest.json: {e}")))?;
    if entries.is_empty() {
        return Err(format_err("manifest.json lists no image"));
    }
    let mut plans = Vec::with_capacity(entries.len());
    for e in entries {
        let config = index.read_small(&e.config)?;
        let config_digest = ObjectId::of_bytes(&config).digest();
        let parsed: ImageConfig = serde_json::from_slice(&config)
            .map_err(|err| format_err(format!("config {}: {err}", e.config)))?;
        let diff_ids = parsed.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        // The diff ids are all that ties a docker archive's layer files to
        // its image; without them a damaged layer would cross unnoticed,
        // and runtimes refuse such an image anyway.
        if diff_ids.is_empty() && !e.layers.is_empty() {
            return Err(format_err(format!(
                "config {} ({config_digest}): rootfs.diff_ids is missing or empty, so the {} \
                 layers manifest.json lists cannot be checked",
                e.config,
                e.layers.len()
            )));
        }
        if diff_ids.len() != e.layers.len() {
            return Err(DropError::Corrupt(format!(
                "config {config_digest} names {} diff_ids, manifest.json lists {} layers",
                diff_ids.len(),
                e.layers.len()
            )));
        }
        if e.layers.len() >= MAX_BLOBS_PER_IMAGE {
            return Err(format_err(format!(
                "manifest.json: an image of {} layers; at most {} blobs are carried per image",
                e.layers.len(),
                MAX_BLOBS_PER_IMAGE
            )));
        }
        for l in &e.layers {
            index.locate(l)?;
        }
        plans.push(ImagePlan {
            references: e.repo_tags.unwrap_or_default(),
            config_digests: vec![config_digest],
            content: PlanContent::Docker {
                config,
                layers: e.layers,
                diff_ids,
            },
            referrers: Vec::new(),
            referrer_blobs: Vec::new(),
            signatures: SignatureEvidence::default(),
        });
    }
    Ok(plans)
}

#[derive(Serialize)]
struct ManifestOut<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: DescriptorOut,
    layers: Vec<DescriptorOut>,
}

#[derive(Serialize)]
struct DescriptorOut {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
}

/// Compresses a docker-archive image's layers into the store and builds
/// its OCI manifest. Same archive, same settings: same manifest digest.
fn store_docker(
    cancel: &Shutdown,
    index: &TarIndex,
    store: &ObjectStore,
    compression: LayerCompression,
    config: &[u8],
    layers: &[String],
    diff_ids: &[String],
) -> Result<StoredImage, DropError> {
    let config_obj = store.put_bytes(config)?;
    let config_ref = BlobRef {
        digest: config_obj.id.digest(),
        size: config_obj.len,
        media_type: MT_OCI_CONFIG.to_string(),
    };
    let mut blobs = vec![config_ref.clone()];
    let mut out_layers = Vec::with_capacity(layers.len());
    // A member listed again (an empty layer, say) is compressed once.
    let mut stored: HashMap<(&str, Option<&String>), BlobRef> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::from([config_ref.digest.clone()]);
    for (i, member) in layers.iter().enumerate() {
        let key = (member.as_str(), diff_ids.get(i));
        let layer = match stored.get(&key) {
            Some(layer) => layer.clone(),
            None => {
                let layer = store_layer(cancel, index, store, compression, member, key.1)?;
                stored.insert(key, layer.clone());
                layer
            }
        };
        out_layers.push(DescriptorOut {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
        });
        if seen.insert(layer.digest.clone()) {
            blobs.push(layer);
        }
    }
    let manifest = ManifestOut {
        schema_version: 2,
        media_type: MT_OCI_MANIFEST,
        config: DescriptorOut {
            media_type: config_ref.media_type,
            digest: config_ref.digest,
            size: config_ref.size,
        },
        layers: out_layers,
    };
    // Field order is the struct's: the bytes are the same every time.
    let bytes = serde_json::to_vec(&manifest).map_err(|e| format_err(e.to_string()))?;
    Ok(StoredImage {
        manifest: ManifestBytes {
            digest: ObjectId::of_bytes(&bytes).digest(),
            media_type: MT_OCI_MANIFEST.to_string(),
            bytes,
        },
        children: Vec::new(),
        blobs,
        referrers: Vec::new(),
    })
}

/// Hashes what passes through: the uncompressed layer, to check its diff id.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn store_layer(
    cancel: &Shutdown,
    index: &TarIndex,
    store: &ObjectStore,
    compression: LayerCompression,
    member: &str,
    diff_id: Option<&String>,
) -> Result<BlobRef, DropError> {
    let archive_io = |source| DropError::Archive(index.member_io(member, source));
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut index.reader(member)?, &mut magic).map_err(archive_io)?;
    let already = match &magic[..n] {
        [0x1f, 0x8b, ..] => Some(MT_LAYER_GZIP),
        [0x28, 0xb5, 0x2f, 0xfd] => Some(MT_LAYER_ZSTD),
        _ => None,
    };
    if let Some(media_type) = already {
        let obj = copy_member(cancel, index, store, member, None)?;
        return Ok(blob_ref(obj, media_type));
    }
    let cache_key = diff_id.map(|d| compression.cache_key(d));
    if let Some(key) = &cache_key {
        if let Some(obj) = store.cached_layer(key)? {
            tracing::debug!(layer = member, digest = %obj.id, "layer compressed before; reusing");
            return Ok(blob_ref(obj, media_type_for(compression.kind)));
        }
    }
    let mut reader = HashingReader {
        inner: std::io::BufReader::with_capacity(COPY_BUFFER, index.reader(member)?),
        hasher: Sha256::new(),
    };
    let writer = store.writer()?;
    let tmp_err = |e: std::io::Error| {
        DropError::Store(StoreError::Io {
            what: "writing layer",
            path: member.into(),
            source: e,
        })
    };
    let writer = match compression.kind {
        Compression::Gzip => {
            // mtime 0 and no file name: the output depends on the input only.
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(255)
                .write(writer, flate2::Compression::new(compression.level));
            copy(cancel, &mut reader, &mut enc).map_err(|e| split_io(e, archive_io, tmp_err))?;
            enc.finish().map_err(tmp_err)?
        }
        Compression::None => {
            let mut w = writer;
            copy(cancel, &mut reader, &mut w).map_err(|e| split_io(e, archive_io, tmp_err))?;
            w
        }
    };
    let uncompressed = ObjectId(reader.hasher.finalize().into()).digest();
    if let Some(want) = diff_id {
        if *want != uncompressed {
            // `writer` is dropped unfinished: its temporary file goes too.
            return Err(DropError::Corrupt(format!(
                "layer {member} has diff id {uncompressed}, the config says {want}"
            )));
        }
    }
    let obj = writer.finish(None)?;
    if let Some(key) = &cache_key {
        store.cache_layer(key, &obj)?;
    }
    tracing::debug!(layer = member, diff_id = %uncompressed, digest = %obj.id, size = obj.len, "layer stored");
    Ok(blob_ref(obj, media_type_for(compression.kind)))
}

fn media_type_for(kind: Compression) -> &'static str {
    match kind {
        Compression::Gzip => MT_LAYER_GZIP,
        Compression::None => MT_LAYER_TAR,
    }
}

fn blob_ref(obj: StoredObject, media_type: &str) -> BlobRef {
    BlobRef {
        digest: obj.id.digest(),
        size: obj.len,
        media_type: media_type.to_string(),
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// An error while copying: which side failed decides whose fault it is.
enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
    Cancelled,
}

fn copy(cancel: &Shutdown, r: &mut impl Read, w: &mut impl Write) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0;
    loop {
        // A large layer takes a while; shutdown should not wait for it.
        if total % (64 << 20) < COPY_BUFFER as u64 && cancel.is_triggered() {
            return Err(CopyError::Cancelled);
        }
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        w.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
}

fn split_io(
    e: CopyError,
    read: impl FnOnce(std::io::Error) -> DropError,
    write: impl FnOnce(std::io::Error) -> DropError,
) -> DropError {
    match e {
        CopyError::Read(e) => read(e),
        CopyError::Write(e) => write(e),
        CopyError::Cancelled => DropError::Interrupted,
    }
}

/// Copies a member into the store as it is, checking `expected` if given.
/// Blobs hashed at once: each thread reads and hashes one whole blob, so
/// an image of several large layers is checked at the speed of the cores,
/// not of one.
const BLOB_THREADS: usize = 4;

/// Checks and stores each (member, digest) of `wanted`, several blobs at a
/// time. Once one fails no other starts; the error reported is the first
/// in the image's order of the blobs tried.
fn store_blobs(
    cancel: &Shutdown,
    index: &TarIndex,
    store: &ObjectStore,
    wanted: &[(String, ObjectId)],
) -> Result<(), DropError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, BLOB_THREADS)
        .min(wanted.len());
    if threads <= 1 {
        for (member, id) in wanted {
            let obj = copy_member(cancel, index, store, member, Some(id))?;
            tracing::debug!(digest = %obj.id, size = obj.len, "blob stored");
        }
        return Ok(());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let mut results: Vec<(usize, Result<(), DropError>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        // After a failure the drop is refused: no new blob.
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((member, id)) = wanted.get(i) else {
                            break;
                        };
                        let r = copy_member(cancel, index, store, member, Some(id)).map(|obj| {
                            tracing::debug!(digest = %obj.id, size = obj.len, "blob stored");
                        });
                        if r.is_err() {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        done.push((i, r));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().try_for_each(|(_, r)| r)
}

fn copy_member(
    cancel: &Shutdown,
    index: &TarIndex,
    store: &ObjectStore,
    member: &str,
    expected: Option<&ObjectId>,
) -> Result<StoredObject, DropError> {
    let mismatch = |got: &ObjectId, want: &ObjectId| {
        DropError::Corrupt(format!(
            "blob {member} has digest {}, its name says {}",
            got.digest(),
            want.digest()
        ))
    };
    // Sent from the drop's own bytes where the store can hold a link to it:
    // no copy, and one fsync of the archive instead of one per blob.
    if let Some(archive) = store.link_archive(index.path(), index.file())? {
        let (offset, size) = index.locate(member)?;
        let mut reader = HashingReader {
            inner: index.reader(member)?,
            hasher: Sha256::new(),
        };
        copy(cancel, &mut reader, &mut std::io::sink()).map_err(|e| {
            let source = match e {
                CopyError::Read(e) | CopyError::Write(e) => e,
                CopyError::Cancelled => return DropError::Interrupted,
            };
            DropError::Archive(index.member_io(member, source))
        })?;
        let id = ObjectId(reader.hasher.finalize().into());
        if let Some(want) = expected {
            if *want != id {
                return Err(mismatch(&id, want));
            }
        }
        return Ok(store.put_extent(&archive, offset, size, &id)?);
    }
    let mut reader = index.reader(member)?;
    let mut w = store.writer()?;
    copy(cancel, &mut reader, &mut w).map_err(|e| {
        split_io(
            e,
            |source| DropError::Archive(index.member_io(member, source)),
            |source| {
                DropError::Store(StoreError::Io {
                    what: "writing blob",
                    path: member.into(),
                    source,
                })
            },
        )
    })?;
    match w.finish(expected) {
        Err(StoreError::DigestMismatch { expected, got }) => Err(DropError::Corrupt(format!(
            "blob {member} has digest {got}, its name says {expected}"
        ))),
        other => Ok(other?),
    }
}

// ---------------------------------------------------------------- OCI

#[derive(Deserialize, Clone)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct IndexDoc {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

fn blob_member(digest: &str) -> Result<String, DropError> {
    let id = ObjectId::from_digest(digest)
        .map_err(|_| format_err(format!("digest {digest:?} is not sha256:<64 hex>")))?;
    Ok(format!("blobs/sha256/{}", id.hex()))
}

/// Reads a manifest or index blob and checks it against its descriptor.
fn read_verified(index: &TarIndex, d: &Descriptor) -> Result<Vec<u8>, DropError> {
    let bytes = index.read_small(&blob_member(&d.digest)?)?;
    let got = ObjectId::of_bytes(&bytes).digest();
    if got != d.digest {
        return Err(DropError::Corrupt(format!(
            "manifest blob {} has digest {got}",
            d.digest
        )));
    }
    if let Some(size) = d.size {
        if size != bytes.len() as u64 {
            return Err(DropError::Corrupt(format!(
                "manifest blob {} is {} bytes, its descriptor says {size}",
                d.digest,
                bytes.len()
            )));
        }
    }
    Ok(bytes)
}

fn is_index(d: &Descriptor, doc: &ManifestDoc) -> bool {
    let mt = d.media_type.as_deref().or(doc.media_type.as_deref());
    matches!(mt, Some(MT_OCI_INDEX) | Some(MT_DOCKER_LIST))
        || (mt.is_none() && doc.manifests.is_some())
}

fn media_type_of(d: &Descriptor, doc: &ManifestDoc, default: &str) -> String {
    d.media_type
        .clone()
        .or_else(|| doc.media_type.clone())
        .unwrap_or_else(|| default.to_string())
}

/// The references a descriptor in index.json gives.
fn oci_references(d: &Descriptor) -> Vec<String> {
    match (
        d.annotations.get(REF_NAME),
        d.annotations.get(CONTAINERD_NAME),
    ) {
        // A full reference in ref.name (what skopeo and docker write).
        (Some(r), _) if r.contains('/') || r.contains(':') => vec![r.clone()],
        // ref.name holds only the tag; containerd keeps the full name.
        (_, Some(full)) => vec![full.clone()],
        _ => Vec::new(),
    }
}

/// The tag part of a `ref.name`: `sha256-<hex>.sig` whether written alone
/// or as `repo:sha256-<hex>.sig`.
fn ref_tag(d: &Descriptor) -> Option<&str> {
    let name = d.annotations.get(REF_NAME)?;
    let last = name.rsplit('/').next().unwrap_or(name);
    Some(last.rsplit_once(':').map(|(_, t)| t).unwrap_or(last))
}

fn subject_of_tag(tag: &str) -> String {
    let hex_part = tag.trim_start_matches("sha256-");
    let hex_part = hex_part.split('.').next().unwrap_or(hex_part);
    format!("sha256:{hex_part}")
}

/// Reads a referrer manifest, bounded, checked against its descriptor.
fn read_referrer(index: &TarIndex, d: &Descriptor) -> Result<(Vec<u8>, ReferrerDoc), DropError> {
    let member = blob_member(&d.digest)?;
    let size = index.size(&member)?;
    if size > MAX_REFERRER_MANIFEST_BYTES as u64 {
        return Err(format_err(format!(
            "referrer manifest {} is {size} bytes, more than {MAX_REFERRER_MANIFEST_BYTES}",
            d.digest
        )));
    }
    let bytes = read_verified(index, d)?;
    let doc = ReferrerDoc::parse(&bytes)
        .map_err(|e| format_err(format!("referrer manifest {}: {e}", d.digest)))?;
    Ok((bytes, doc))
}

fn referrer(subject: String, attachment: Attachment, d: &Descriptor, bytes: Vec<u8>) -> Referrer {
    Referrer {
        subject,
        attachment,
        manifest: ManifestBytes {
            digest: d.digest.clone(),
            media_type: d
                .media_type
                .clone()
                .unwrap_or_else(|| MT_OCI_MANIFEST.to_string()),
            bytes,
        },
    }
}

/// Tells the referrers among index.json's entries from the images.
fn split_referrers(
    index: &TarIndex,
    entries: &[Descriptor],
) -> Result<(Vec<Descriptor>, Vec<Referrer>), DropError> {
    let mut images = Vec::new();
    let mut referrers: Vec<Referrer> = Vec::new();
    let add = |r: Referrer, all: &mut Vec<Referrer>| {
        if !all
            .iter()
            .any(|x| x.manifest.digest == r.manifest.digest && x.attachment == r.attachment)
        {
            all.push(r);
        }
    };
    for d in entries {
        match ref_tag(d).filter(|t| is_attachment_tag(t)) {
            Some(tag) if tag.contains('.') => {
                let (bytes, _) = read_referrer(index, d)?;
                let r = referrer(
                    subject_of_tag(tag),
                    Attachment::Tag(tag.to_string()),
                    d,
                    bytes,
                );
                add(r, &mut referrers);
            }
            Some(tag) => {
                // A referrers index kept by the tag schema: each entry is a
                // manifest whose subject is the tag's digest.
                let subject = subject_of_tag(tag);
                let listed: IndexDoc = serde_json::from_slice(&read_verified(index, d)?)
                    .map_err(|e| format_err(format!("referrers index {tag}: {e}")))?;
                for m in &listed.manifests {
                    let (bytes, doc) = read_referrer(index, m)?;
                    if doc.subject.as_ref().map(|s| s.digest.as_str()) == Some(subject.as_str()) {
                        add(
                            referrer(subject.clone(), Attachment::Subject, m, bytes),
                            &mut referrers,
                        );
                    }
                }
            }
            None => {
                let bytes = read_verified(index, d)?;
                match ReferrerDoc::parse(&bytes).ok().and_then(|doc| doc.subject) {
                    Some(subject) => {
                        if bytes.len() > MAX_REFERRER_MANIFEST_BYTES {
                            return Err(format_err(format!(
                                "referrer manifest {} is {} bytes, more than {MAX_REFERRER_MANIFEST_BYTES}",
                                d.digest,
                                bytes.len()
                            )));
                        }
                        add(
                            referrer(subject.digest, Attachment::Subject, d, bytes),
                            &mut referrers,
                        );
                    }
                    None => images.push(d.clone()),
                }
            }
        }
        if referrers.len() > MAX_REFERRERS {
            return Err(format_err(format!(
                "more than {MAX_REFERRERS} referrers in index.json"
            )));
        }
    }
    Ok((images, referrers))
}

/// Gives each plan the referrers that speak of it or of its children, the
/// blobs they name and the signatures among them.
fn attach_referrers(
    index: &TarIndex,
    plans: &mut [ImagePlan],
    referrers: Vec<Referrer>,
) -> Result<(), DropError> {
    let mut left = referrers;
    for plan in plans.iter_mut() {
        let PlanContent::Oci {
            manifest,
            children,
            blobs,
        } = &plan.content
        else {
            continue;
        };
        let subjects: Vec<&str> = std::iter::once(manifest.digest.as_str())
            .chain(children.iter().map(|c| c.digest.as_str()))
            .collect();
        let (mine, rest): (Vec<Referrer>, Vec<Referrer>) = left
            .into_iter()
            .partition(|r| subjects.contains(&r.subject.as_str()));
        left = rest;
        let mut referrer_blobs: Vec<BlobRef> = Vec::new();
        for r in &mine {
            let doc = ReferrerDoc::parse(&r.manifest.bytes)
                .map_err(|e| format_err(format!("referrer manifest {}: {e}", r.manifest.digest)))?;
            for b in doc.blobs() {
                if blobs
                    .iter()
                    .chain(referrer_blobs.iter())
                    .any(|x| x.digest == b.digest)
                {
                    continue;
                }
                let size = index.size(&blob_member(&b.digest)?)?;
                if size != b.size {
                    return Err(DropError::Corrupt(format!(
                        "blob {} of referrer {} is {size} bytes, its descriptor says {}",
                        b.digest, r.manifest.digest, b.size
                    )));
                }
                referrer_blobs.push(BlobRef {
                    digest: b.digest.clone(),
                    size,
                    media_type: b.media_type.clone().unwrap_or_default(),
                });
            }
        }
        let layers = signature_layers(&manifest.digest, &mine);
        let payloads = layers
            .iter()
            .map(|l| {
                let member = blob_member(&l.payload_digest).map_err(|e| e.to_string())?;
                match index.size(&member) {
                    Ok(n) if n > MAX_PAYLOAD_BYTES => Err(format!(
                        "payload of {n} bytes, more than {MAX_PAYLOAD_BYTES}"
                    )),
                    Ok(_) => index.read_small(&member).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            })
            .collect();
        plan.signatures = SignatureEvidence {
            image_digest: manifest.digest.clone(),
            layers,
            payloads,
        };
        plan.referrers = mine;
        plan.referrer_blobs = referrer_blobs;
    }
    for r in &left {
        tracing::warn!(referrer = %r.manifest.digest, subject = %r.subject,
            "referrer speaks of a manifest this drop does not hold; it does not cross");
    }
    Ok(())
}

fn plan_oci(index: &TarIndex) -> Result<Vec<ImagePlan>, DropError> {
    let bytes = index.read_small("index.json")?;
    let doc: IndexDoc =
        serde_json::from_slice(&bytes).map_err(|e| format_err(format!("index.json: {e}")))?;
    if doc.manifests.is_empty() {
        return Err(format_err("index.json lists no manifest"));
    }
    let (image_entries, referrers) = split_referrers(index, &doc.manifests)?;
    if image_entries.is_empty() {
        return Err(format_err("index.json lists only referrers, no image"));
    }
    let mut plans = Vec::new();
    for d in &image_entries {
        let top_bytes = read_verified(index, d)?;
        let top: ManifestDoc = serde_json::from_slice(&top_bytes)
            .map_err(|e| format_err(format!("manifest {}: {e}", d.digest)))?;
        let mut children = Vec::new();
        let mut image_manifests: Vec<ManifestDoc> = Vec::new();
        let top_media_type;
        if is_index(d, &top) {
            top_media_type = media_type_of(d, &top, MT_OCI_INDEX);
            for c in top.manifests.as_deref().unwrap_or_default() {
                let child_bytes = read_verified(index, c).map_err(|e| match e {
                    DropError::Archive(ArchiveError::Missing(_)) => format_err(format!(
                        "index {} names child manifest {} which the archive lacks",
                        d.digest, c.digest
                    )),
                    other => other,
                })?;
                let child: ManifestDoc = serde_json::from_slice(&child_bytes)
                    .map_err(|e| format_err(format!("manifest {}: {e}", c.digest)))?;
                if is_index(c, &child) {
                    return Err(format_err(format!(
                        "nested index {} inside index {} is not supported",
                        c.digest, d.digest
                    )));
                }
                children.push(ManifestBytes {
                    digest: c.digest.clone(),
                    media_type: media_type_of(c, &child, MT_OCI_MANIFEST),
                    bytes: child_bytes,
                });
                image_manifests.push(child);
            }
        } else {
            top_media_type = media_type_of(d, &top, MT_OCI_MANIFEST);
            image_manifests.push(top);
        }
        let mut blobs: Vec<BlobRef> = Vec::new();
        let mut listed: HashSet<&str> = HashSet::new();
        let mut config_digests = Vec::new();
        for m in &image_manifests {
            let config = m
                .config
                .as_ref()
                .ok_or_else(|| format_err(format!("a manifest of {} has no config", d.digest)))?;
            config_digests.push(config.digest.clone());
            for b in std::iter::once(config).chain(m.layers.iter()) {
                if !listed.insert(&b.digest) {
                    continue;
                }
                if blobs.len() >= MAX_BLOBS_PER_IMAGE {
                    return Err(format_err(format!(
                        "image {} names more than {MAX_BLOBS_PER_IMAGE} blobs, the most carried \
                         per image",
                        d.digest
                    )));
                }
                let member = blob_member(&b.digest)?;
                let size = index.size(&member)?;
                if b.size.is_some_and(|s| s != size) {
                    return Err(DropError::Corrupt(format!(
                        "blob {} is {size} bytes, its descriptor says {}",
                        b.digest,
                        b.size.unwrap_or_default()
                    )));
                }
                blobs.push(BlobRef {
                    digest: b.digest.clone(),
                    size,
                    media_type: b.media_type.clone().unwrap_or_default(),
                });
            }
        }
        plans.push(ImagePlan {
            references: oci_references(d),
            config_digests,
            content: PlanContent::Oci {
                manifest: ManifestBytes {
                    digest: d.digest.clone(),
                    media_type: top_media_type,
                    bytes: top_bytes,
                },
                children,
                blobs,
            },
            referrers: Vec::new(),
            referrer_blobs: Vec::new(),
            signatures: SignatureEvidence::default(),
        });
    }
    attach_referrers(index, &mut plans, referrers)?;
    Ok(plans)
}

/// Writes a planned image's blobs into the store (skipping those already
/// there), with its referrers' when they cross, and returns what the
/// transfer manifest needs.
pub fn store_image(
    cancel: &Shutdown,
    index: &TarIndex,
    store: &ObjectStore,
    compression: LayerCompression,
    plan: &ImagePlan,
    carry_referrers: bool,
) -> Result<StoredImage, DropError> {
    match &plan.content {
        PlanContent::Docker {
            config,
            layers,
            diff_ids,
        } => store_docker(cancel, index, store, compression, config, layers, diff_ids),
        PlanContent::Oci {
            manifest,
            children,
            blobs,
        } => {
            let mut blobs = blobs.clone();
            let mut referrers = Vec::new();
            if carry_referrers {
                blobs.extend(plan.referrer_blobs.iter().cloned());
                referrers.clone_from(&plan.referrers);
            }
            let mut wanted = Vec::new();
            for b in &blobs {
                let id = ObjectId::from_digest(&b.digest)
                    .map_err(|_| format_err(format!("bad digest {}", b.digest)))?;
                if !store.reuse(&id) {
                    wanted.push((blob_member(&b.digest)?, id));
                }
            }
            store_blobs(cancel, index, store, &wanted)?;
            Ok(StoredImage {
                manifest: manifest.clone(),
                children: children.clone(),
                blobs,
                referrers,
            })
        }
    }
}
