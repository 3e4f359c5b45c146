//! Sample images as the receiver gets them: a transfer manifest and the
//! bytes of every blob it names, from a seed (single-arch, and a
//! multi-arch index). OCI archives and layouts on disk come from
//! `weir-imagegen`, re-exported as [`crate::imagegen`].

use weir_proto::ledger::{ChainId, LedgerHead, RecordFields};
use weir_proto::{
    BlobRef, ChainRecord, Destination, ManifestBytes, ObjectId, ObjectKind, Origin,
    TransferManifest, Verdict,
};

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

    /// The same image as record `head.seq + 1` of `head`'s chain (the image
    /// object changes with it).
    pub fn following(mut self, head: &LedgerHead) -> SampleImage {
        self.tm.ledger = head.next(record_fields(&self.tm));
        self
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

/// What a ledger record says of `tm`.
pub fn record_fields(tm: &TransferManifest) -> RecordFields {
    RecordFields {
        manifest_digest: tm.manifest.digest.clone(),
        destination: tm.destination.clone(),
        source: tm.origin.source.clone(),
        verdict: tm.verdict.clone(),
        accepted_at: tm.origin.ingested_at,
    }
}

/// The first record of a chain of its own, named after the image: each
/// sample image is accepted by a receiver as a new chain (as from a sender
/// whose state was lost), unless [`SampleImage::following`] numbers it
/// into another chain.
pub fn genesis_record(fields: RecordFields) -> ChainRecord {
    let id = ObjectId::of_bytes(
        format!(
            "{} {}",
            fields.manifest_digest,
            fields.destination.display()
        )
        .as_bytes(),
    );
    let mut chain = [0u8; 8];
    chain.copy_from_slice(&id.0[..8]);
    LedgerHead::empty(ChainId(u64::from_be_bytes(chain))).next(fields)
}

fn transfer(
    repo: &str,
    tags: &[&str],
    manifest: ManifestBytes,
    children: Vec<ManifestBytes>,
    blobs: Vec<BlobRef>,
) -> TransferManifest {
    let destination = Destination {
        repository: repo.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    };
    let origin = Origin {
        source: "test".into(),
        source_reference: None,
        ingested_at: 0,
    };
    let verdict = Verdict {
        rule: None,
        gate: None,
        worst_severity: None,
        signature: None,
        summary: "test".into(),
    };
    let ledger = genesis_record(RecordFields {
        manifest_digest: manifest.digest.clone(),
        destination: destination.clone(),
        source: origin.source.clone(),
        verdict: verdict.clone(),
        accepted_at: origin.ingested_at,
    });
    TransferManifest {
        destination,
        manifest,
        children,
        blobs,
        referrers: Vec::new(),
        origin,
        verdict,
        ledger,
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
