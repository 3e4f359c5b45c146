//! Referrers: manifests that speak about an image — signatures,
//! attestations, SBOMs, vulnerability reports.
//!
//! Two ways of attaching one exist in registries, and both cross:
//!
//! - cosign's tags in the image's repository: `sha256-<hex>.sig`, `.att`,
//!   `.sbom`, where `<hex>` is the subject's digest;
//! - OCI 1.1: a manifest whose `subject` descriptor names the image, listed
//!   by the registry's referrers API or, where the registry lacks it, in an
//!   index tagged `sha256-<hex>` (the referrers tag schema).
//!
//! A referrer crosses inside its subject's image object (so it crosses only
//! with what it speaks of, under the same HMAC) and its blobs are among the
//! image's blobs (so they dedup like any other). What a receiver may be sent
//! is bounded here: how many referrers, how large each manifest, which tag
//! names, which subjects.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::manifest::{ManifestBytes, ObjectId, TransferManifest};

/// The suffixes cosign gives its tags: signatures, attestations, SBOMs.
pub const COSIGN_SUFFIXES: [&str; 3] = ["sig", "att", "sbom"];

/// Referrers an image object may carry (over the image and its children).
pub const MAX_REFERRERS: usize = 256;

/// Bytes a referrer manifest may have.
pub const MAX_REFERRER_MANIFEST_BYTES: usize = 1 << 20;

/// The layer annotation that holds a cosign signature (base64).
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// The media type of a sigstore simple-signing payload.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";

/// How a referrer is attached to its subject at the source, and so at the
/// destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Attachment {
    /// A cosign tag in the image's repository, e.g. `sha256-<hex>.sig`.
    Tag(String),
    /// An OCI 1.1 manifest whose `subject` is the image.
    Subject,
}

/// One referrer of an image or of one of its children.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Referrer {
    /// `sha256:` digest of the manifest it speaks of.
    pub subject: String,
    pub attachment: Attachment,
    /// The referrer's manifest exactly as the source had it.
    pub manifest: ManifestBytes,
}

/// A referrer that breaks the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferrerError {
    #[error("{count} referrers, more than the {MAX_REFERRERS} an image object may carry")]
    TooMany { count: usize },
    #[error("referrer manifest {digest} is {len} bytes, more than {MAX_REFERRER_MANIFEST_BYTES}")]
    TooLarge { digest: String, len: usize },
    #[error("referrer manifest bytes do not hash to {digest}")]
    DigestMismatch { digest: String },
    #[error(
        "referrer {digest} speaks of {subject}, which is neither the image nor one of its children"
    )]
    StraySubject { digest: String, subject: String },
    #[error("referrer {digest}: tag {tag:?} is not a cosign tag of its subject {subject}")]
    BadTag {
        digest: String,
        tag: String,
        subject: String,
    },
    #[error(
        "referrer {digest}: its subject field says {found:?}, the image object says {subject}"
    )]
    SubjectMismatch {
        digest: String,
        subject: String,
        found: Option<String>,
    },
    #[error("referrer {digest}: {why}")]
    Unreadable { digest: String, why: String },
    #[error("referrer {digest} names blob {blob}, which the image object does not carry")]
    MissingBlob { digest: String, blob: String },
}

/// `sha256-<hex>`: the referrers tag schema's tag for `digest`.
pub fn fallback_tag(digest: &str) -> Option<String> {
    let id = ObjectId::from_digest(digest).ok()?;
    Some(format!("sha256-{}", id.hex()))
}

/// `sha256-<hex>.<suffix>`: cosign's tag for `digest`.
pub fn cosign_tag(digest: &str, suffix: &str) -> Option<String> {
    Some(format!("{}.{suffix}", fallback_tag(digest)?))
}

/// Whether a tag is an attachment (a cosign tag or a referrers index)
/// rather than an image of its own: such tags cross with their subject,
/// never as images.
pub fn is_attachment_tag(tag: &str) -> bool {
    let Some(rest) = tag.strip_prefix("sha256-") else {
        return false;
    };
    let (hex_part, suffix) = match rest.split_once('.') {
        Some((h, s)) => (h, Some(s)),
        None => (rest, None),
    };
    hex_part.len() == 64
        && hex_part.bytes().all(|b| b.is_ascii_hexdigit())
        && suffix.is_none_or(|s| COSIGN_SUFFIXES.contains(&s))
}

/// A descriptor as a referrer manifest gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DescriptorDoc {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The fields of a referrer manifest that matter here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReferrerDoc {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub config: Option<DescriptorDoc>,
    #[serde(default)]
    pub layers: Vec<DescriptorDoc>,
    #[serde(default)]
    pub subject: Option<DescriptorDoc>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl ReferrerDoc {
    pub fn parse(bytes: &[u8]) -> Result<ReferrerDoc, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The blobs the manifest names: its config and its layers.
    pub fn blobs(&self) -> impl Iterator<Item = &DescriptorDoc> {
        self.config.iter().chain(self.layers.iter())
    }

    /// The artifact type a referrers list gives it: `artifactType`, or the
    /// config's media type (as the distribution spec says).
    pub fn listed_artifact_type(&self) -> Option<&str> {
        self.artifact_type
            .as_deref()
            .or(self.config.as_ref().and_then(|c| c.media_type.as_deref()))
    }
}

impl Referrer {
    /// This referrer's entry in a referrers list (the API's answer or the
    /// fallback tag's index).
    pub fn list_entry(&self) -> Result<serde_json::Value, ReferrerError> {
        let doc =
            ReferrerDoc::parse(&self.manifest.bytes).map_err(|e| ReferrerError::Unreadable {
                digest: self.manifest.digest.clone(),
                why: e.to_string(),
            })?;
        let mut entry = serde_json::json!({
            "mediaType": self.manifest.media_type,
            "digest": self.manifest.digest,
            "size": self.manifest.bytes.len(),
        });
        if let Some(t) = doc.listed_artifact_type() {
            entry["artifactType"] = serde_json::Value::from(t);
        }
        if !doc.annotations.is_empty() {
            entry["annotations"] = serde_json::json!(doc.annotations);
        }
        Ok(entry)
    }
}

impl TransferManifest {
    /// Checks every referrer against the contract: bounded, its bytes
    /// hashing to its digest, speaking of the image or one of its children,
    /// attached by a tag of that subject or by a `subject` field naming it,
    /// and every blob it names carried by the image object.
    pub fn check_referrers(&self) -> Result<(), ReferrerError> {
        // A set, not a scan per blob named: a referrer of 1 MiB can name
        // tens of thousands of blobs, and the image up to its blob limit.
        let carried: std::collections::HashSet<&str> =
            self.blobs.iter().map(|b| b.digest.as_str()).collect();
        if self.referrers.len() > MAX_REFERRERS {
            return Err(ReferrerError::TooMany {
                count: self.referrers.len(),
            });
        }
        for r in &self.referrers {
            let digest = r.manifest.digest.clone();
            if r.manifest.bytes.len() > MAX_REFERRER_MANIFEST_BYTES {
                return Err(ReferrerError::TooLarge {
                    digest,
                    len: r.manifest.bytes.len(),
                });
            }
            if ObjectId::from_digest(&digest).ok() != Some(ObjectId::of_bytes(&r.manifest.bytes)) {
                return Err(ReferrerError::DigestMismatch { digest });
            }
            let known_subject = std::iter::once(&self.manifest)
                .chain(self.children.iter())
                .any(|m| m.digest == r.subject);
            if !known_subject {
                return Err(ReferrerError::StraySubject {
                    digest,
                    subject: r.subject.clone(),
                });
            }
            let doc =
                ReferrerDoc::parse(&r.manifest.bytes).map_err(|e| ReferrerError::Unreadable {
                    digest: digest.clone(),
                    why: e.to_string(),
                })?;
            match &r.attachment {
                Attachment::Tag(tag) => {
                    let fits = COSIGN_SUFFIXES
                        .iter()
                        .any(|s| cosign_tag(&r.subject, s).as_deref() == Some(tag.as_str()));
                    if !fits {
                        return Err(ReferrerError::BadTag {
                            digest,
                            tag: tag.clone(),
                            subject: r.subject.clone(),
                        });
                    }
                }
                Attachment::Subject => {
                    let found = doc.subject.as_ref().map(|s| s.digest.clone());
                    if found.as_deref() != Some(r.subject.as_str()) {
                        return Err(ReferrerError::SubjectMismatch {
                            digest,
                            subject: r.subject.clone(),
                            found,
                        });
                    }
                }
            }
            for b in doc.blobs() {
                if !carried.contains(b.digest.as_str()) {
                    return Err(ReferrerError::MissingBlob {
                        digest,
                        blob: b.digest.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_tags_are_told_from_image_tags() {
        let hex = "ab".repeat(32);
        assert!(is_attachment_tag(&format!("sha256-{hex}")));
        assert!(is_attachment_tag(&format!("sha256-{hex}.sig")));
        assert!(is_attachment_tag(&format!("sha256-{hex}.sbom")));
        assert!(!is_attachment_tag(&format!("sha256-{hex}.txt")));
        assert!(!is_attachment_tag("sha256-abc.sig"));
        assert!(!is_attachment_tag("latest"));
        let digest = format!("sha256:{hex}");
        assert_eq!(
            cosign_tag(&digest, "att").as_deref(),
            Some(format!("sha256-{hex}.att").as_str())
        );
        assert_eq!(fallback_tag("sha256:zz"), None);
    }
}
