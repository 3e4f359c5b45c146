//! The transfer manifest: what an image object carries across the diode.
//!
//! An image crosses as one *image object* (this manifest, postcard-encoded)
//! plus one *blob object* per blob it names. The manifest keeps the source's
//! manifest bytes exactly, so the destination serves the same digest.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ledger::ChainRecord;
use crate::referrers::Referrer;

/// Identity of an object on the wire: the sha256 of the object's bytes.
///
/// For a blob object this is the blob's OCI digest, so a blob shared by two
/// images is one object and crosses once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// The id of a byte string: its sha256.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        ObjectId(Sha256::digest(bytes).into())
    }

    /// Parses an OCI digest `sha256:<64 hex>`, in lower case as the image
    /// spec writes it: names, references and layout paths are made from
    /// the digest as given, so one object must have one spelling.
    pub fn from_digest(digest: &str) -> Result<Self, DigestError> {
        let hex_part = digest
            .strip_prefix("sha256:")
            .filter(|h| h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| DigestError::of(digest))?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| DigestError::of(digest))?;
        Ok(ObjectId(out))
    }

    /// The OCI digest form, `sha256:<64 hex>`.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.0))
    }

    /// The bare 64-character hex form.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(&self.0[..6]))
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

/// Most blobs one image may name, its referrers' included (a multi-arch
/// index of many platforms has a few thousand at most): the sender carries
/// no more and the receiver takes no more.
pub const MAX_BLOBS_PER_IMAGE: usize = 16_384;

/// A string that is not an OCI `sha256:` digest.
#[derive(Debug, thiserror::Error)]
#[error("not a sha256 digest: {0:?}")]
pub struct DigestError(pub String);

impl DigestError {
    /// Quotes at most the start of what a peer sent.
    fn of(digest: &str) -> Self {
        DigestError(crate::names::shorten_to(digest, 80))
    }
}

/// What an object is, so the receiver knows what to do once it is whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ObjectKind {
    /// One OCI blob (layer or config).
    Blob = 0,
    /// A postcard-encoded [`TransferManifest`].
    Image = 1,
}

impl ObjectKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(ObjectKind::Blob),
            1 => Some(ObjectKind::Image),
            _ => None,
        }
    }
}

/// Where the image goes on the high side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// Repository path without registry host, e.g. `team-a/app`.
    pub repository: String,
    /// Tags to set on the manifest; may be empty (pushed by digest only).
    pub tags: Vec<String>,
}

impl Destination {
    /// `repository:tag` of the first tag, or `repository` alone.
    pub fn display(&self) -> String {
        match self.tags.first() {
            Some(t) => format!("{}:{}", self.repository, t),
            None => self.repository.clone(),
        }
    }
}

/// A manifest (or index) exactly as the source had it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBytes {
    /// `sha256:` digest of `bytes`.
    pub digest: String,
    /// The mediaType to send as Content-Type when pushing.
    pub media_type: String,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// One blob an image needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// `sha256:` digest of the blob.
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

/// Where the image came from on the low side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Drop file name, or source registry reference.
    pub source: String,
    /// The reference the source gave the image (RepoTags / ref.name), if any.
    pub source_reference: Option<String>,
    /// Unix seconds at ingest.
    pub ingested_at: u64,
}

/// The policy decision that let the image cross.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The rule regex that matched, if rules were configured.
    pub rule: Option<String>,
    /// The matching rule's severity gate (`Low`..`Critical`), if it has one.
    pub gate: Option<String>,
    /// The worst severity found in the scan report, if there was one.
    pub worst_severity: Option<String>,
    /// The signature check's result; None where none was asked for.
    pub signature: Option<String>,
    /// A one-line human summary.
    pub summary: String,
}

/// The image object: everything the receiver needs to publish one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferManifest {
    pub destination: Destination,
    /// The top-level manifest, or the index for a multi-arch image.
    pub manifest: ManifestBytes,
    /// For an index: the child manifests it names (pushed before the index).
    pub children: Vec<ManifestBytes>,
    /// Every blob the manifest, children and referrers name, each once.
    pub blobs: Vec<BlobRef>,
    /// Signatures, attestations and SBOMs of the image and its children
    /// (see [`crate::referrers`]); pushed after their subject.
    pub referrers: Vec<Referrer>,
    pub origin: Origin,
    pub verdict: Verdict,
    /// The image's record in its sender's image ledger (see
    /// [`crate::ledger`]): inside the object, so its sha256 and every
    /// frame's HMAC cover it.
    pub ledger: ChainRecord,
}

impl TransferManifest {
    /// Encodes as the bytes of an image object.
    pub fn to_object_bytes(&self) -> Vec<u8> {
        // postcard into a Vec cannot fail for these types.
        postcard::to_stdvec(self).expect("postcard encoding of TransferManifest")
    }

    /// Decodes an image object.
    pub fn from_object_bytes(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips() {
        let id = ObjectId::of_bytes(b"hello");
        let d = id.digest();
        assert_eq!(ObjectId::from_digest(&d).unwrap(), id);
        assert!(ObjectId::from_digest("sha512:00").is_err());
        assert!(ObjectId::from_digest("sha256:zz").is_err());
        // One spelling per object: the spec's lower case only.
        let upper = format!("sha256:{}", id.hex().to_uppercase());
        assert!(ObjectId::from_digest(&upper).is_err());
        let long = format!("sha256:{}", "é".repeat(10_000));
        let e = ObjectId::from_digest(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
    }
}
