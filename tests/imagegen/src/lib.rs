//! Test container images made from a seed, written as files on disk.
//!
//! Every layer is a tar holding seeded random bytes, generated in chunks and
//! hashed while it streams to disk: memory stays at a few buffers whatever
//! the image size (benchmarks make 1 GiB and 4 GiB images). The same seed
//! and arguments give a byte-identical archive.
//!
//! Layer `i` of size `s` made from seed `n` has the same bytes in every
//! image and every format, so two images made from one seed share the
//! layers they have in common (a shared base layer crosses the diode once).
//!
//! Archives are written as `.NAME.partial` beside the target and renamed
//! when complete, so a spool directory never shows a half-written file.
//!
//! Formats:
//! - [`docker_archive`] with a [`DockerFlavor`]: what `docker save`
//!   (classic and Docker >= 25) and `skopeo copy ... docker-archive:` write;
//!   layers are always uncompressed tars there.
//! - [`oci_archive`] / [`oci_archive_uncompressed`] / [`oci_layout_dir`]: an
//!   OCI image layout (tarred or not) whose `index.json` names one image
//!   manifest.
//! - [`multiarch_oci_archive`] / [`multiarch_oci_layout_dir`]: `index.json`
//!   names one image index (as `skopeo copy --all` writes) that lists one
//!   manifest per platform; layer 0 is shared by all platforms.
//!
//! `org.opencontainers.image.ref.name`: by default ([`RefName::Full`]) the
//! full reference as given, e.g. `team-a/app:1.0`, because that is the
//! only form from which a receiver can recover the repository. skopeo
//! writes whatever follows the path in `oci-archive:FILE:REF` (checked with
//! skopeo 1.9: `...:team-a/app:1.0` gives the full form, `...:1.0` the tag
//! only, which is what the OCI spec's examples and buildah use);
//! containerd and Docker >= 25 write the tag only plus
//! `io.containerd.image.name` with the qualified name. [`RefName::TagOnly`]
//! writes that last form (and [`DockerFlavor::OciInDocker`] always does).

mod layer;
mod model;
mod reference;
mod sink;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use layer::LayerCompression;
use layer::{write_layer, Hashed, LayerBlob, LayerContent};
use model::*;
pub use reference::ImageReference;
use sink::{DirSink, ImageSink, TarSink};

/// `created` of every config and history entry, fixed for determinism.
const CREATED: &str = "2024-01-01T00:00:00Z";
/// Same instant as [`CREATED`], as the mtime of every tar entry.
pub(crate) const FIXED_MTIME: u64 = 1_704_067_200;

/// One layer of a generated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// Bytes of random file content in the layer tar (the tar itself adds
    /// headers and padding: a few KiB).
    pub size: u64,
}

/// Which tool's docker-archive layout to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DockerFlavor {
    /// `docker save` before Docker 25: `<id>/layer.tar`, `<id>/json`,
    /// `<id>/VERSION`, `<config-hex>.json`, `manifest.json`,
    /// `repositories`. A repeated layer is a symlink to the first copy.
    Classic,
    /// `skopeo copy ... docker-archive:`: layers as `<diff-id-hex>.tar`,
    /// legacy `<id>/layer.tar` symlinks to them, RepoTags qualified with
    /// `docker.io/`.
    Skopeo,
    /// `docker save` from Docker >= 25: an OCI layout (`oci-layout`,
    /// `index.json`, `blobs/sha256/...`, uncompressed layers) plus
    /// `manifest.json` and `repositories` pointing into `blobs/`.
    OciInDocker,
}

/// How `org.opencontainers.image.ref.name` is written in `index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefName {
    /// The reference as given: `team-a/app:1.0` (or with its host).
    #[default]
    Full,
    /// Only the tag (`1.0`), as skopeo and buildah write it, plus
    /// `io.containerd.image.name` = `docker.io/team-a/app:1.0` as
    /// containerd and Docker >= 25 write it.
    TagOnly,
}

/// An OS/architecture pair; `architecture` may carry a variant after a
/// slash (`arm64/v8`, `arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str) -> Self {
        let (architecture, variant) = match architecture.split_once('/') {
            Some((a, v)) => (a.to_string(), Some(v.to_string())),
            None => (architecture.to_string(), None),
        };
        Self {
            os: os.to_string(),
            architecture,
            variant,
        }
    }

    fn scope(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }

    fn json(&self) -> PlatformJson {
        PlatformJson {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone(),
        }
    }
}

impl Default for Platform {
    fn default() -> Self {
        Self::new("linux", "amd64")
    }
}

/// Knobs beyond the common case; `Default` gives what the plain functions
/// use.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// OCI layer blobs: gzip (default) or plain tar. Docker archives always
    /// store plain tars; [`DockerFlavor::OciInDocker`] too, as Docker does.
    pub layer_compression: LayerCompression,
    pub ref_name: RefName,
    /// Layers listed again after the generated ones, by index into
    /// `layers`: `[0]` makes the image's layers `L0 L1 .. Ln L0`. The blob
    /// is stored once (docker Classic adds a symlink, as docker does).
    pub repeated_layers: Vec<usize>,
    /// Platform of a single-platform image (default linux/amd64).
    pub platform: Option<Platform>,
}

/// What one platform's image is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformImage {
    pub platform: Platform,
    /// Digest of this platform's image manifest as stored; None for
    /// docker-archive flavors that hold no manifest.
    pub manifest_digest: Option<String>,
    pub config_digest: String,
    /// sha256 of each uncompressed layer tar, in manifest order.
    pub layer_diff_ids: Vec<String>,
    /// Digest of each layer blob as stored (= diff id when uncompressed).
    pub layer_digests: Vec<String>,
}

/// A generated archive (or layout directory) and the digests a test checks
/// a delivery against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    /// The archive file (or layout directory).
    pub path: PathBuf,
    /// The reference as written in the archive, e.g. `team-a/app:1.0`
    /// (skopeo flavor: `docker.io/team-a/app:1.0`).
    pub reference: String,
    /// sha256 of the config blob bytes (first platform for multi-arch).
    pub config_digest: String,
    /// OCI archives and layouts: digest of the top manifest (single
    /// platform) or image index (multi-arch) as stored — what a registry
    /// must serve for the tag. [`DockerFlavor::OciInDocker`]: the OCI
    /// manifest Docker stores. Classic and Skopeo docker-archives: None.
    pub manifest_digest: Option<String>,
    /// Media type of that manifest or index.
    pub manifest_media_type: Option<String>,
    /// sha256 of each uncompressed layer tar (first platform for
    /// multi-arch), in order; a repeated layer appears again.
    pub layer_diff_ids: Vec<String>,
    /// Digest of each layer blob as stored, in order (first platform).
    pub layer_digests: Vec<String>,
    /// Every distinct config and layer blob in the archive, all platforms,
    /// in the order written. Docker-archives: config + uncompressed layers.
    /// Manifests and indexes are not included (see `manifest_digest` and
    /// `children`).
    pub blob_digests: Vec<String>,
    /// Multi-arch: each platform's manifest digest, in index order.
    pub children: Vec<String>,
    /// One entry per platform (one for single-platform images).
    pub platforms: Vec<PlatformImage>,
}

/// A docker-archive as `flavor` writes it. Layers are uncompressed tars.
pub fn docker_archive(
    dir: &Path,
    file_name: &str,
    seed: u64,
    layers: &[LayerSpec],
    reference: &str,
    flavor: DockerFlavor,
) -> io::Result<GeneratedImage> {
    docker_archive_with(
        dir,
        file_name,
        seed,
        layers,
        reference,
        flavor,
        &ImageOptions::default(),
    )
}

/// [`docker_archive`] with options (`layer_compression` is ignored: docker
/// archives hold plain tars).
pub fn docker_archive_with(
    dir: &Path,
    file_name: &str,
    seed: u64,
    layers: &[LayerSpec],
    reference: &str,
    flavor: DockerFlavor,
    options: &ImageOptions,
) -> io::Result<GeneratedImage> {
    let reference = ImageReference::parse(reference)?;
    let mut sink = TarSink::create(dir.join(file_name))?;
    let contents = single_platform_contents(seed, layers, &options.repeated_layers)?;
    let platform = options.platform.clone().unwrap_or_default();
    let mut image = match flavor {
        DockerFlavor::Classic => {
            write_docker_classic(&mut sink, seed, &contents, &reference, &platform)?
        }
        DockerFlavor::Skopeo => {
            write_docker_skopeo(&mut sink, seed, &contents, &reference, &platform)?
        }
        DockerFlavor::OciInDocker => {
            write_docker_oci(&mut sink, seed, &contents, &reference, &platform)?
        }
    };
    image.path = sink.finish()?;
    Ok(image)
}

/// An OCI archive (`oci-archive:`): gzip layers, `index.json` -> one image
/// manifest with `ref.name` = the full reference.
pub fn oci_archive(
    dir: &Path,
    file_name: &str,
    seed: u64,
    layers: &[LayerSpec],
    reference: &str,
) -> io::Result<GeneratedImage> {
    oci_archive_with(
        dir,
        file_name,
        seed,
        layers,
        reference,
        &ImageOptions::default(),
    )
}

/// [`oci_archive`] with uncompressed layers
/// (`application/vnd.oci.image.layer.v1.tar`): cheap to make, for large
/// benchmark images.
pub fn oci_archive_uncompressed(
    dir: &Path,
    file_name: &str,
    seed: u64,
    layers: &[LayerSpec],
    reference: &str,
) -> io::Result<GeneratedImage> {
    let options = ImageOptions {
        layer_compression: LayerCompression::None,
        ..ImageOptions::default()
    };
    oci_archive_with(dir, file_name, seed, layers, reference, &options)
}

pub fn oci_archive_with(
    dir: &Path,
    file_name: &str,
    seed: u64,
    layers: &[LayerSpec],
    reference: &str,
    options: &ImageOptions,
) -> io::Result<GeneratedImage> {
    let reference = ImageReference::parse(reference)?;
    let mut sink = TarSink::create(dir.join(file_name))?;
    let mut image = write_oci_single(&mut sink, seed, layers, &reference, options)?;
    image.path = sink.finish()?;
    Ok(image)
}

/// The same image as [`oci_archive`], as an unpacked OCI layout directory
/// `dir/name` (for `skopeo copy oci:DIR docker://...`).
pub fn oci_layout_dir(
    dir: &Path,
    name: &str,
    seed: u64,
    layers: &[LayerSpec],
    reference: &str,
) -> io::Result<GeneratedImage> {
    oci_layout_dir_with(dir, name, seed, layers, reference, &ImageOptions::default())
}

pub fn oci_layout_dir_with(
    dir: &Path,
    name: &str,
    seed: u64,
    layers: &[LayerSpec],
    reference: &str,
    options: &ImageOptions,
) -> io::Result<GeneratedImage> {
    let reference = ImageReference::parse(reference)?;
    let mut sink = DirSink::create(dir.join(name))?;
    let mut image = write_oci_single(&mut sink, seed, layers, &reference, options)?;
    image.path = sink.finish()?;
    Ok(image)
}

/// A multi-arch OCI archive: `index.json` -> image index -> one manifest
/// per `(os, arch)` platform. Layer 0 is the same blob on every platform;
/// the others differ per platform.
pub fn multiarch_oci_archive(
    dir: &Path,
    file_name: &str,
    seed: u64,
    platforms: &[(&str, &str)],
    layers: &[LayerSpec],
    reference: &str,
) -> io::Result<GeneratedImage> {
    multiarch_oci_archive_with(
        dir,
        file_name,
        seed,
        platforms,
        layers,
        reference,
        &ImageOptions::default(),
    )
}

/// [`multiarch_oci_archive`] with options (`platform` is ignored).
pub fn multiarch_oci_archive_with(
    dir: &Path,
    file_name: &str,
    seed: u64,
    platforms: &[(&str, &str)],
    layers: &[LayerSpec],
    reference: &str,
    options: &ImageOptions,
) -> io::Result<GeneratedImage> {
    let reference = ImageReference::parse(reference)?;
    let mut sink = TarSink::create(dir.join(file_name))?;
    let mut image = write_oci_multiarch(&mut sink, seed, platforms, layers, &reference, options)?;
    image.path = sink.finish()?;
    Ok(image)
}

/// [`multiarch_oci_archive`] as an unpacked layout directory (load it into
/// a registry with `skopeo copy --all oci:DIR docker://...`).
pub fn multiarch_oci_layout_dir(
    dir: &Path,
    name: &str,
    seed: u64,
    platforms: &[(&str, &str)],
    layers: &[LayerSpec],
    reference: &str,
) -> io::Result<GeneratedImage> {
    let reference = ImageReference::parse(reference)?;
    let mut sink = DirSink::create(dir.join(name))?;
    let options = ImageOptions::default();
    let mut image = write_oci_multiarch(&mut sink, seed, platforms, layers, &reference, &options)?;
    image.path = sink.finish()?;
    Ok(image)
}

// ---------------------------------------------------------------------------
// Assembly shared by the formats.

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn oci_blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", hex_of(digest))
}

fn to_json<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// The layer contents of a single-platform image, repeats included.
fn single_platform_contents(
    seed: u64,
    layers: &[LayerSpec],
    repeated: &[usize],
) -> io::Result<Vec<LayerContent>> {
    let mut contents: Vec<LayerContent> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| LayerContent::new(seed, "", i, l.size, format!("layer{i}")))
        .collect();
    append_repeats(&mut contents, layers.len(), repeated)?;
    Ok(contents)
}

fn append_repeats(
    contents: &mut Vec<LayerContent>,
    generated: usize,
    repeated: &[usize],
) -> io::Result<()> {
    for &r in repeated {
        let again = contents
            .get(r)
            .filter(|_| r < generated)
            .cloned()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("repeated_layers: index {r} but the image has {generated} layers"),
                )
            })?;
        contents.push(again);
    }
    Ok(())
}

fn config_bytes(seed: u64, platform: &Platform, diff_ids: &[String]) -> io::Result<Vec<u8>> {
    let config = ImageConfig {
        created: CREATED,
        architecture: platform.architecture.clone(),
        variant: platform.variant.clone(),
        os: platform.os.clone(),
        config: RuntimeConfig {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cmd: vec!["/weir/none".into()],
            working_dir: "/",
            labels: BTreeMap::from([("org.weir.imagegen.seed".to_string(), seed.to_string())]),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: diff_ids.to_vec(),
        },
        history: (0..diff_ids.len())
            .map(|i| History {
                created: CREATED,
                created_by: format!("weir-imagegen layer {i}"),
            })
            .collect(),
    };
    to_json(&config)
}

/// Blobs already in the output, so shared and repeated layers are stored
/// once, and the list of distinct config and layer blobs for the report.
#[derive(Default)]
struct BlobBook {
    layers: HashMap<[u8; 32], LayerBlob>,
    stored: HashSet<String>,
    config_and_layers: Vec<String>,
}

impl BlobBook {
    fn note_content_blob(&mut self, digest: &str) {
        if !self.config_and_layers.iter().any(|d| d == digest) {
            self.config_and_layers.push(digest.to_string());
        }
    }

    /// Streams a layer into `blobs/sha256/` unless the same content is
    /// already there.
    fn oci_layer<S: ImageSink>(
        &mut self,
        sink: &mut S,
        content: &LayerContent,
        compression: LayerCompression,
    ) -> io::Result<LayerBlob> {
        if let Some(blob) = self.layers.get(&content.key) {
            return Ok(blob.clone());
        }
        let blob = sink.streamed(|w| {
            let blob = write_layer(content, compression, w)?;
            Ok((oci_blob_path(&blob.blob.digest), blob))
        })?;
        self.stored.insert(blob.blob.digest.clone());
        self.note_content_blob(&blob.blob.digest);
        self.layers.insert(content.key, blob.clone());
        Ok(blob)
    }

    /// Stores a JSON blob under `blobs/sha256/` (once) and returns its digest.
    fn oci_json<S: ImageSink>(&mut self, sink: &mut S, bytes: &[u8]) -> io::Result<Hashed> {
        let digest = sha256_digest(bytes);
        if self.stored.insert(digest.clone()) {
            sink.file(&oci_blob_path(&digest), bytes)?;
        }
        Ok(Hashed {
            digest,
            len: bytes.len() as u64,
        })
    }
}

/// One platform's image written as OCI blobs.
struct OciPlatformImage {
    platform: Platform,
    manifest: Hashed,
    config: Hashed,
    layers: Vec<LayerBlob>,
}

impl OciPlatformImage {
    fn report(&self) -> PlatformImage {
        PlatformImage {
            platform: self.platform.clone(),
            manifest_digest: Some(self.manifest.digest.clone()),
            config_digest: self.config.digest.clone(),
            layer_diff_ids: self.layers.iter().map(|l| l.diff_id.clone()).collect(),
            layer_digests: self.layers.iter().map(|l| l.blob.digest.clone()).collect(),
        }
    }
}

fn write_oci_platform<S: ImageSink>(
    sink: &mut S,
    book: &mut BlobBook,
    seed: u64,
    platform: &Platform,
    contents: &[LayerContent],
    compression: LayerCompression,
) -> io::Result<OciPlatformImage> {
    let mut layers = Vec::with_capacity(contents.len());
    for content in contents {
        layers.push(book.oci_layer(sink, content, compression)?);
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = book.oci_json(sink, &config_bytes(seed, platform, &diff_ids)?)?;
    book.note_content_blob(&config.digest);
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config: Descriptor {
            media_type: OCI_CONFIG.into(),
            digest: config.digest.clone(),
            size: config.len,
            platform: None,
            annotations: BTreeMap::new(),
        },
        layers: layers
            .iter()
            .map(|l| Descriptor {
                media_type: l.compression.oci_media_type().into(),
                digest: l.blob.digest.clone(),
                size: l.blob.len,
                platform: None,
                annotations: BTreeMap::new(),
            })
            .collect(),
    };
    let manifest = book.oci_json(sink, &to_json(&manifest)?)?;
    Ok(OciPlatformImage {
        platform: platform.clone(),
        manifest,
        config,
        layers,
    })
}

fn ref_annotations(reference: &ImageReference, style: RefName) -> BTreeMap<String, String> {
    match style {
        RefName::Full => BTreeMap::from([(REF_NAME.to_string(), reference.full())]),
        RefName::TagOnly => BTreeMap::from([
            (REF_NAME.to_string(), reference.tag.clone()),
            (CONTAINERD_NAME.to_string(), reference.docker_qualified()),
        ]),
    }
}

// Entry order follows skopeo's oci-archive and Docker's save: blobs first,
// then index.json, then oci-layout. A reader must index the whole tar before
// it knows what the image is, as with docker save's trailing manifest.json.

fn begin_layout<S: ImageSink>(sink: &mut S) -> io::Result<()> {
    sink.directory("blobs/")?;
    sink.directory("blobs/sha256/")
}

fn write_index_json<S: ImageSink>(sink: &mut S, top: Descriptor) -> io::Result<()> {
    let index = ImageIndex {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests: vec![top],
    };
    sink.file("index.json", &to_json(&index)?)
}

fn write_oci_layout_file<S: ImageSink>(sink: &mut S) -> io::Result<()> {
    let layout = OciLayout {
        image_layout_version: "1.0.0",
    };
    sink.file("oci-layout", &to_json(&layout)?)
}

fn write_oci_single<S: ImageSink>(
    sink: &mut S,
    seed: u64,
    layers: &[LayerSpec],
    reference: &ImageReference,
    options: &ImageOptions,
) -> io::Result<GeneratedImage> {
    let contents = single_platform_contents(seed, layers, &options.repeated_layers)?;
    let platform = options.platform.clone().unwrap_or_default();
    let mut book = BlobBook::default();
    begin_layout(sink)?;
    let image = write_oci_platform(
        sink,
        &mut book,
        seed,
        &platform,
        &contents,
        options.layer_compression,
    )?;
    write_index_json(
        sink,
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: image.manifest.digest.clone(),
            size: image.manifest.len,
            platform: None,
            annotations: ref_annotations(reference, options.ref_name),
        },
    )?;
    write_oci_layout_file(sink)?;
    let report = image.report();
    Ok(GeneratedImage {
        path: PathBuf::new(),
        reference: reference.full(),
        config_digest: report.config_digest.clone(),
        manifest_digest: Some(image.manifest.digest.clone()),
        manifest_media_type: Some(OCI_MANIFEST.into()),
        layer_diff_ids: report.layer_diff_ids.clone(),
        layer_digests: report.layer_digests.clone(),
        blob_digests: book.config_and_layers,
        children: Vec::new(),
        platforms: vec![report],
    })
}

fn write_oci_multiarch<S: ImageSink>(
    sink: &mut S,
    seed: u64,
    platforms: &[(&str, &str)],
    layers: &[LayerSpec],
    reference: &ImageReference,
    options: &ImageOptions,
) -> io::Result<GeneratedImage> {
    if platforms.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "multi-arch image: no platforms given",
        ));
    }
    let mut book = BlobBook::default();
    begin_layout(sink)?;
    let mut images = Vec::with_capacity(platforms.len());
    for &(os, arch) in platforms {
        let platform = Platform::new(os, arch);
        let scope = platform.scope();
        let stem_prefix = scope.replace('/', "-");
        let mut contents: Vec<LayerContent> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == 0 {
                    LayerContent::new(seed, "shared", 0, l.size, "layer0".into())
                } else {
                    LayerContent::new(seed, &scope, i, l.size, format!("{stem_prefix}-layer{i}"))
                }
            })
            .collect();
        append_repeats(&mut contents, layers.len(), &options.repeated_layers)?;
        images.push(write_oci_platform(
            sink,
            &mut book,
            seed,
            &platform,
            &contents,
            options.layer_compression,
        )?);
    }
    let index = ImageIndex {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests: images
            .iter()
            .map(|image| Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: image.manifest.digest.clone(),
                size: image.manifest.len,
                platform: Some(image.platform.json()),
                annotations: BTreeMap::new(),
            })
            .collect(),
    };
    let index = book.oci_json(sink, &to_json(&index)?)?;
    write_index_json(
        sink,
        Descriptor {
            media_type: OCI_INDEX.into(),
            digest: index.digest.clone(),
            size: index.len,
            platform: None,
            annotations: ref_annotations(reference, options.ref_name),
        },
    )?;
    write_oci_layout_file(sink)?;
    let reports: Vec<PlatformImage> = images.iter().map(OciPlatformImage::report).collect();
    Ok(GeneratedImage {
        path: PathBuf::new(),
        reference: reference.full(),
        config_digest: reports[0].config_digest.clone(),
        manifest_digest: Some(index.digest),
        manifest_media_type: Some(OCI_INDEX.into()),
        layer_diff_ids: reports[0].layer_diff_ids.clone(),
        layer_digests: reports[0].layer_digests.clone(),
        blob_digests: book.config_and_layers,
        children: images.iter().map(|i| i.manifest.digest.clone()).collect(),
        platforms: reports,
    })
}

// ---------------------------------------------------------------------------
// docker-archive flavors.

/// The v1 layer id docker-archives use for their legacy directories: a
/// chain over the parent id and the diff id, so a repeated layer gets a new
/// id (as in `docker save`).
fn legacy_layer_id(parent: Option<&str>, diff_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"weir-imagegen v1 id\0");
    h.update(parent.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(diff_id.as_bytes());
    hex::encode(h.finalize())
}

/// `directory_entry`: docker writes one for `<id>/`, skopeo does not.
fn legacy_metadata<S: ImageSink>(
    sink: &mut S,
    id: &str,
    parent: Option<&str>,
    platform: &Platform,
    directory_entry: bool,
) -> io::Result<()> {
    if directory_entry {
        sink.directory(&format!("{id}/"))?;
    }
    sink.file(&format!("{id}/VERSION"), b"1.0")?;
    let json = to_json(&LegacyLayerJson {
        id: id.to_string(),
        parent: parent.map(str::to_string),
        created: CREATED,
        os: platform.os.clone(),
    })?;
    sink.file(&format!("{id}/json"), &json)
}

fn docker_report(
    reference: String,
    config: &Hashed,
    layers: &[LayerBlob],
    platform: &Platform,
    manifest_digest: Option<String>,
) -> GeneratedImage {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let mut blob_digests = vec![config.digest.clone()];
    for d in &diff_ids {
        if !blob_digests.contains(d) {
            blob_digests.push(d.clone());
        }
    }
    let manifest_media_type = manifest_digest.as_ref().map(|_| OCI_MANIFEST.to_string());
    GeneratedImage {
        path: PathBuf::new(),
        reference,
        config_digest: config.digest.clone(),
        manifest_digest: manifest_digest.clone(),
        manifest_media_type,
        layer_diff_ids: diff_ids.clone(),
        layer_digests: diff_ids.clone(),
        blob_digests,
        children: Vec::new(),
        platforms: vec![PlatformImage {
            platform: platform.clone(),
            manifest_digest,
            config_digest: config.digest.clone(),
            layer_diff_ids: diff_ids.clone(),
            layer_digests: diff_ids,
        }],
    }
}

fn write_docker_classic<S: ImageSink>(
    sink: &mut S,
    seed: u64,
    contents: &[LayerContent],
    reference: &ImageReference,
    platform: &Platform,
) -> io::Result<GeneratedImage> {
    let mut first_copy: HashMap<[u8; 32], (LayerBlob, String)> = HashMap::new();
    let mut layers = Vec::new();
    let mut layer_paths = Vec::new();
    let mut parent: Option<String> = None;
    for content in contents {
        let (blob, id) = match first_copy.get(&content.key) {
            Some((blob, first_id)) => {
                let id = legacy_layer_id(parent.as_deref(), &blob.diff_id);
                sink.symlink(
                    &format!("{id}/layer.tar"),
                    &format!("../{first_id}/layer.tar"),
                )?;
                (blob.clone(), id)
            }
            None => {
                let parent_id = parent.clone();
                let (blob, id) = sink.streamed(|w| {
                    let blob = write_layer(content, LayerCompression::None, w)?;
                    let id = legacy_layer_id(parent_id.as_deref(), &blob.diff_id);
                    Ok((format!("{id}/layer.tar"), (blob, id)))
                })?;
                first_copy.insert(content.key, (blob.clone(), id.clone()));
                (blob, id)
            }
        };
        legacy_metadata(sink, &id, parent.as_deref(), platform, true)?;
        layer_paths.push(format!("{id}/layer.tar"));
        layers.push(blob);
        parent = Some(id);
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config_bytes = config_bytes(seed, platform, &diff_ids)?;
    let config = Hashed {
        digest: sha256_digest(&config_bytes),
        len: config_bytes.len() as u64,
    };
    let config_path = format!("{}.json", hex_of(&config.digest));
    sink.file(&config_path, &config_bytes)?;
    let manifest = vec![DockerArchiveEntry {
        config: config_path,
        repo_tags: vec![reference.full()],
        layers: layer_paths,
    }];
    sink.file("manifest.json", &to_json(&manifest)?)?;
    if let Some(top) = parent {
        let repositories: Repositories = BTreeMap::from([(
            reference.name(),
            BTreeMap::from([(reference.tag.clone(), top)]),
        )]);
        sink.file("repositories", &to_json(&repositories)?)?;
    }
    Ok(docker_report(
        reference.full(),
        &config,
        &layers,
        platform,
        None,
    ))
}

fn write_docker_skopeo<S: ImageSink>(
    sink: &mut S,
    seed: u64,
    contents: &[LayerContent],
    reference: &ImageReference,
    platform: &Platform,
) -> io::Result<GeneratedImage> {
    let mut stored: HashMap<[u8; 32], LayerBlob> = HashMap::new();
    let mut layers = Vec::new();
    for content in contents {
        let blob = match stored.get(&content.key) {
            Some(blob) => blob.clone(),
            None => {
                let blob = sink.streamed(|w| {
                    let blob = write_layer(content, LayerCompression::None, w)?;
                    Ok((format!("{}.tar", hex_of(&blob.diff_id)), blob))
                })?;
                stored.insert(content.key, blob.clone());
                blob
            }
        };
        layers.push(blob);
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config_bytes = config_bytes(seed, platform, &diff_ids)?;
    let config = Hashed {
        digest: sha256_digest(&config_bytes),
        len: config_bytes.len() as u64,
    };
    let config_path = format!("{}.json", hex_of(&config.digest));
    sink.file(&config_path, &config_bytes)?;

    // skopeo also writes the legacy layout, with each `<id>/layer.tar` a
    // symlink to the `<diff-id>.tar` stored once.
    let mut parent: Option<String> = None;
    for layer in &layers {
        let id = legacy_layer_id(parent.as_deref(), &layer.diff_id);
        legacy_metadata(sink, &id, parent.as_deref(), platform, false)?;
        sink.symlink(
            &format!("{id}/layer.tar"),
            &format!("../{}.tar", hex_of(&layer.diff_id)),
        )?;
        parent = Some(id);
    }
    let qualified = reference.docker_qualified();
    let manifest = vec![DockerArchiveEntry {
        config: config_path,
        repo_tags: vec![qualified.clone()],
        layers: diff_ids
            .iter()
            .map(|d| format!("{}.tar", hex_of(d)))
            .collect(),
    }];
    sink.file("manifest.json", &to_json(&manifest)?)?;
    if let Some(top) = parent {
        let repositories: Repositories = BTreeMap::from([(
            reference.docker_qualified_name(),
            BTreeMap::from([(reference.tag.clone(), top)]),
        )]);
        sink.file("repositories", &to_json(&repositories)?)?;
    }
    Ok(docker_report(qualified, &config, &layers, platform, None))
}

fn write_docker_oci<S: ImageSink>(
    sink: &mut S,
    seed: u64,
    contents: &[LayerContent],
    reference: &ImageReference,
    platform: &Platform,
) -> io::Result<GeneratedImage> {
    let mut book = BlobBook::default();
    begin_layout(sink)?;
    let image = write_oci_platform(
        sink,
        &mut book,
        seed,
        platform,
        contents,
        LayerCompression::None,
    )?;
    write_index_json(
        sink,
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: image.manifest.digest.clone(),
            size: image.manifest.len,
            platform: None,
            annotations: ref_annotations(reference, RefName::TagOnly),
        },
    )?;
    let manifest = vec![DockerArchiveEntry {
        config: oci_blob_path(&image.config.digest),
        repo_tags: vec![reference.full()],
        layers: image
            .layers
            .iter()
            .map(|l| oci_blob_path(&l.blob.digest))
            .collect(),
    }];
    sink.file("manifest.json", &to_json(&manifest)?)?;
    write_oci_layout_file(sink)?;
    let mut parent: Option<String> = None;
    for layer in &image.layers {
        parent = Some(legacy_layer_id(parent.as_deref(), &layer.diff_id));
    }
    if let Some(top) = parent {
        let repositories: Repositories = BTreeMap::from([(
            reference.name(),
            BTreeMap::from([(reference.tag.clone(), top)]),
        )]);
        sink.file("repositories", &to_json(&repositories)?)?;
    }
    Ok(docker_report(
        reference.full(),
        &image.config,
        &image.layers,
        platform,
        Some(image.manifest.digest.clone()),
    ))
}

#[cfg(test)]
mod tests;
