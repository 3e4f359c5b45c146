//! Finding an image's referrers in the source registry: cosign's tags
//! (`sha256-<hex>.sig`, `.att`, `.sbom`) and OCI 1.1 referrers, through the
//! referrers API or, where the registry lacks it, the `sha256-<hex>` tag
//! that the referrers tag schema keeps.
//!
//! A referrer that cannot be read or does not speak of its subject is left
//! behind with a warning rather than refusing the image: whoever can push
//! to the source could otherwise block any image by attaching junk.

use super::source::{SourceError, SourceRegistry};
use super::Bounded;
use crate::policy::SignatureEvidence;
use serde::Deserialize;
use weir_host::signatures::{signature_layers, MAX_PAYLOAD_BYTES};
use weir_host::Shutdown;
use weir_proto::referrers::{
    cosign_tag, fallback_tag, ReferrerDoc, COSIGN_SUFFIXES, MAX_REFERRERS,
    MAX_REFERRER_MANIFEST_BYTES,
};
use weir_proto::{Attachment, BlobRef, ManifestBytes, Referrer};

/// What the source holds about one image.
#[derive(Debug, Default)]
pub struct FoundReferrers {
    pub referrers: Vec<Referrer>,
    /// Blobs the referrers name that the image itself does not.
    pub blobs: Vec<BlobRef>,
    pub signatures: SignatureEvidence,
}

#[derive(Deserialize)]
struct ListedIndex {
    #[serde(default)]
    manifests: Vec<Listed>,
}

#[derive(Deserialize)]
struct Listed {
    digest: String,
}

/// The referrers of `image_digest` and of its children (`subjects` holds
/// all of them), with the blobs they need beyond `own_blobs`, and the
/// signatures of the image with their payloads.
pub fn discover(
    registry: &SourceRegistry,
    repo: &str,
    image_digest: &str,
    subjects: &[String],
    own_blobs: &[BlobRef],
    cancel: &Shutdown,
) -> Result<FoundReferrers, SourceError> {
    let mut found = FoundReferrers::default();
    for subject in subjects {
        for suffix in COSIGN_SUFFIXES {
            let Some(tag) = cosign_tag(subject, suffix) else {
                continue;
            };
            if let Some(m) = optional(registry.manifest(repo, &tag, cancel))? {
                push(
                    &mut found.referrers,
                    subject,
                    Attachment::Tag(tag),
                    as_bytes(m),
                );
            }
        }
        let listed = match registry.referrers(repo, subject, cancel)? {
            Some(bytes) => Some(bytes),
            None => match fallback_tag(subject) {
                Some(tag) => optional(registry.manifest(repo, &tag, cancel))?.map(|m| m.bytes),
                None => None,
            },
        };
        let Some(listed) = listed else { continue };
        let index: ListedIndex = match serde_json::from_slice(&listed) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(repository = %repo, subject = %subject, error = %e,
                    "referrers list unreadable; no OCI referrer of it crosses");
                continue;
            }
        };
        for entry in index.manifests.iter().take(MAX_REFERRERS) {
            let Some(m) = optional(registry.manifest(repo, &entry.digest, cancel))? else {
                continue;
            };
            let speaks_of_subject = ReferrerDoc::parse(&m.bytes)
                .ok()
                .and_then(|d| d.subject)
                .is_some_and(|s| s.digest == *subject);
            if !speaks_of_subject {
                tracing::warn!(repository = %repo, subject = %subject, referrer = %entry.digest,
                    "listed referrer does not name the subject it is listed for; left behind");
                continue;
            }
            push(
                &mut found.referrers,
                subject,
                Attachment::Subject,
                as_bytes(m),
            );
        }
    }
    found.referrers.retain(|r| {
        let ok = r.manifest.bytes.len() <= MAX_REFERRER_MANIFEST_BYTES
            && ReferrerDoc::parse(&r.manifest.bytes).is_ok();
        if !ok {
            tracing::warn!(repository = %repo, referrer = %r.manifest.digest,
                "referrer manifest too large or not JSON; left behind");
        }
        ok
    });
    if found.referrers.len() > MAX_REFERRERS {
        tracing::warn!(repository = %repo, image = %image_digest, count = found.referrers.len(),
            "more referrers than cross with one image; the first {MAX_REFERRERS} do");
        found.referrers.truncate(MAX_REFERRERS);
    }
    for r in &found.referrers {
        let Ok(doc) = ReferrerDoc::parse(&r.manifest.bytes) else {
            continue;
        };
        for b in doc.blobs() {
            if own_blobs
                .iter()
                .chain(found.blobs.iter())
                .any(|x| x.digest == b.digest)
            {
                continue;
            }
            found.blobs.push(BlobRef {
                digest: b.digest.clone(),
                size: b.size,
                media_type: b.media_type.clone().unwrap_or_default(),
            });
        }
    }
    let layers = signature_layers(image_digest, &found.referrers);
    let payloads = layers
        .iter()
        .map(|l| payload(registry, repo, &l.payload_digest, cancel))
        .collect::<Result<Vec<_>, _>>()?;
    found.signatures = SignatureEvidence {
        image_digest: image_digest.to_string(),
        layers,
        payloads,
    };
    Ok(found)
}

/// A signature's payload, bounded; what went wrong is the signature's
/// failure, not the pull's, unless the registry is down.
fn payload(
    registry: &SourceRegistry,
    repo: &str,
    digest: &str,
    cancel: &Shutdown,
) -> Result<Result<Vec<u8>, String>, SourceError> {
    let mut bytes = Vec::new();
    let mut bounded = Bounded {
        inner: &mut bytes,
        left: MAX_PAYLOAD_BYTES,
    };
    match registry.blob(repo, digest, &mut bounded, cancel) {
        Ok(_) => Ok(Ok(bytes)),
        Err(e @ (SourceError::Unavailable { .. } | SourceError::Cancelled)) => Err(e),
        Err(e) => Ok(Err(e.to_string())),
    }
}

fn optional<T>(r: Result<T, SourceError>) -> Result<Option<T>, SourceError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(SourceError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn as_bytes(m: super::source::FetchedManifest) -> ManifestBytes {
    ManifestBytes {
        digest: m.digest,
        media_type: m.media_type,
        bytes: m.bytes,
    }
}

fn push(all: &mut Vec<Referrer>, subject: &str, attachment: Attachment, manifest: ManifestBytes) {
    if all
        .iter()
        .any(|r| r.manifest.digest == manifest.digest && r.attachment == attachment)
    {
        return;
    }
    all.push(Referrer {
        subject: subject.to_string(),
        attachment,
        manifest,
    });
}
