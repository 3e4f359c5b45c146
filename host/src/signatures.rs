//! Cosign signature checks: the sender's policy gate and the receiver's
//! check before it pushes use the same code and the same keys format.
//!
//! A signature counts when it is a layer of one of the image's referrers (a
//! cosign `.sig` tag, or an OCI 1.1 referrer) annotated with
//! `dev.cosignproject.cosign/signature`, whose payload is a sigstore
//! simple-signing document naming the image's digest in
//! `critical.image.docker-manifest-digest`, and whose ECDSA P-256/SHA-256
//! signature over the payload's exact bytes verifies under a trusted key.
//!
//! Nothing here fetches: the caller finds the payload bytes (in the drop,
//! the source registry or the blob store) and passes them in.

use base64::Engine;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use weir_proto::referrers::{
    Attachment, Referrer, ReferrerDoc, COSIGN_SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE,
};

/// Bytes a simple-signing payload may have; real ones are a few hundred.
pub const MAX_PAYLOAD_BYTES: u64 = 64 << 10;

/// Signatures looked at per image: a hostile referrer list cannot make a
/// check take long.
pub const MAX_SIGNATURES: usize = 64;

/// A public key signatures are checked against.
#[derive(Clone)]
pub struct TrustedKey {
    pub path: PathBuf,
    /// `sha256:<hex>` of the key's DER SubjectPublicKeyInfo.
    pub fingerprint: String,
    key: VerifyingKey,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.fingerprint, self.path.display())
    }
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Parse { path: PathBuf, why: String },
}

/// The keys a signature may verify under.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

impl TrustedKeys {
    /// Reads PEM public keys (`-----BEGIN PUBLIC KEY-----`, ECDSA P-256).
    pub fn load(paths: &[PathBuf]) -> Result<TrustedKeys, KeyLoadError> {
        let mut keys = Vec::with_capacity(paths.len());
        for path in paths {
            keys.push(load_key(path)?);
        }
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// `sha256:… (path), …`: what a refusal names as the keys tried.
    pub fn describe(&self) -> String {
        self.keys
            .iter()
            .map(|k| format!("{} ({})", k.fingerprint, k.path.display()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn load_key(path: &Path) -> Result<TrustedKey, KeyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyLoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |why: String| KeyLoadError::Parse {
        path: path.to_path_buf(),
        why,
    };
    let der = pem_body(&text, "PUBLIC KEY").map_err(parse)?;
    let key = VerifyingKey::from_public_key_der(&der).map_err(|e| {
        parse(format!(
            "not an ECDSA P-256 public key ({e}); only P-256 keys are supported"
        ))
    })?;
    Ok(TrustedKey {
        path: path.to_path_buf(),
        fingerprint: format!("sha256:{}", hex::encode(Sha256::digest(&der))),
        key,
    })
}

/// The DER bytes of the first PEM block labelled `label`.
fn pem_body(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text
        .find(&begin)
        .ok_or_else(|| format!("no {begin:?} block (a PEM public key is expected)"))?;
    let body = &text[start + begin.len()..];
    let stop = body
        .find(&end)
        .ok_or_else(|| format!("{begin:?} block without {end:?}"))?;
    let b64: String = body[..stop].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("PEM body is not base64: {e}"))
}

/// A signature layer found among an image's referrers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    /// Digest of the referrer manifest that holds it.
    pub referrer: String,
    /// `sha256:` digest of the payload blob.
    pub payload_digest: String,
    pub payload_size: u64,
    /// The annotation's value: base64 of the DER signature.
    pub signature: String,
}

/// The signature layers of the referrers that speak of `image_digest`.
pub fn signature_layers(image_digest: &str, referrers: &[Referrer]) -> Vec<SignatureLayer> {
    let mut out = Vec::new();
    for r in referrers.iter().filter(|r| r.subject == image_digest) {
        let may_sign = match &r.attachment {
            Attachment::Tag(tag) => tag.ends_with(".sig"),
            Attachment::Subject => true,
        };
        if !may_sign {
            continue;
        }
        let Ok(doc) = ReferrerDoc::parse(&r.manifest.bytes) else {
            continue;
        };
        for layer in &doc.layers {
            let Some(sig) = layer.annotations.get(COSIGN_SIGNATURE_ANNOTATION) else {
                continue;
            };
            if layer.media_type.as_deref() != Some(SIMPLE_SIGNING_MEDIA_TYPE) {
                continue;
            }
            out.push(SignatureLayer {
                referrer: r.manifest.digest.clone(),
                payload_digest: layer.digest.clone(),
                payload_size: layer.size,
                signature: sig.clone(),
            });
            if out.len() == MAX_SIGNATURES {
                return out;
            }
        }
    }
    out
}

/// What the signature check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureCheck {
    /// A signature verifies under this key.
    Verified { fingerprint: String, key: PathBuf },
    /// No signature speaks of the image.
    Missing,
    /// Signatures exist; none verifies. `why` says what each failed of.
    Invalid { why: String, tried: String },
}

impl SignatureCheck {
    /// The reason code of a refusal; None when verified.
    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            SignatureCheck::Verified { .. } => None,
            SignatureCheck::Missing => Some("signature-missing"),
            SignatureCheck::Invalid { .. } => Some("signature-invalid"),
        }
    }

    /// One line for logs, reasons and the ledger's verdict.
    pub fn describe(&self, image_digest: &str) -> String {
        match self {
            SignatureCheck::Verified { fingerprint, key } => {
                format!("signed: verified under {fingerprint} ({})", key.display())
            }
            SignatureCheck::Missing => {
                format!("no cosign signature speaks of {image_digest}")
            }
            SignatureCheck::Invalid { why, tried } => {
                format!("no signature of {image_digest} verifies: {why}; keys tried: {tried}")
            }
        }
    }
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: CriticalImage,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct CriticalImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// Checks the signatures found for `image_digest`. `payloads` holds, for
/// each layer of `layers` in order, its payload bytes or why they could not
/// be read.
pub fn check(
    image_digest: &str,
    layers: &[SignatureLayer],
    payloads: &[Result<Vec<u8>, String>],
    keys: &TrustedKeys,
) -> SignatureCheck {
    if layers.is_empty() {
        return SignatureCheck::Missing;
    }
    let mut failures = Vec::new();
    for (layer, payload) in layers.iter().zip(payloads) {
        match verify_one(image_digest, layer, payload, keys) {
            Ok(k) => {
                return SignatureCheck::Verified {
                    fingerprint: k.fingerprint.clone(),
                    key: k.path.clone(),
                }
            }
            Err(why) => failures.push(format!(
                "{} in {}: {why}",
                layer.payload_digest, layer.referrer
            )),
        }
    }
    SignatureCheck::Invalid {
        why: failures.join("; "),
        tried: if keys.is_empty() {
            "none configured".into()
        } else {
            keys.describe()
        },
    }
}

fn verify_one<'k>(
    image_digest: &str,
    layer: &SignatureLayer,
    payload: &Result<Vec<u8>, String>,
    keys: &'k TrustedKeys,
) -> Result<&'k TrustedKey, String> {
    let payload = payload
        .as_ref()
        .map_err(|e| format!("payload unreadable: {e}"))?;
    if payload.len() as u64 > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "payload of {} bytes, more than {MAX_PAYLOAD_BYTES}",
            payload.len()
        ));
    }
    let got = format!("sha256:{}", hex::encode(Sha256::digest(payload)));
    if got != layer.payload_digest {
        return Err(format!("payload bytes hash to {got}"));
    }
    let doc: SimpleSigning = serde_json::from_slice(payload)
        .map_err(|e| format!("payload is not a simple-signing document: {e}"))?;
    if let Some(kind) = &doc.critical.kind {
        if !kind.eq_ignore_ascii_case("cosign container image signature") {
            return Err(format!(
                "payload type {kind:?} is not a container image signature"
            ));
        }
    }
    if doc.critical.image.docker_manifest_digest != image_digest {
        return Err(format!(
            "payload signs {}, not this image",
            doc.critical.image.docker_manifest_digest
        ));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(layer.signature.trim())
        .map_err(|e| format!("signature annotation is not base64: {e}"))?;
    let signature = Signature::from_der(&raw)
        .or_else(|_| Signature::from_slice(&raw))
        .map_err(|_| "signature is neither DER nor raw ECDSA P-256".to_string())?;
    keys.keys
        .iter()
        .find(|k| k.key.verify(payload, &signature).is_ok())
        .ok_or_else(|| "does not verify under any trusted key".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    use weir_proto::ManifestBytes;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32].into()).unwrap()
    }

    fn write_pub(dir: &Path, name: &str, k: &SigningKey) -> PathBuf {
        let pem = k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn payload(digest: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "critical": {
                "identity": {"docker-reference": "registry.example/team-a/app"},
                "image": {"docker-manifest-digest": digest},
                "type": "cosign container image signature"
            },
            "optional": null
        }))
        .unwrap()
    }

    fn sig_referrer(image: &str, payload: &[u8], signature: &str) -> Referrer {
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(b"{}"), "size": 2},
            "layers": [{
                "mediaType": SIMPLE_SIGNING_MEDIA_TYPE,
                "digest": sha(payload),
                "size": payload.len(),
                "annotations": {COSIGN_SIGNATURE_ANNOTATION: signature}
            }]
        }))
        .unwrap();
        Referrer {
            subject: image.to_string(),
            attachment: Attachment::Tag(weir_proto::referrers::cosign_tag(image, "sig").unwrap()),
            manifest: ManifestBytes {
                digest: sha(&manifest),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes: manifest,
            },
        }
    }

    fn signed(k: &SigningKey, payload: &[u8]) -> String {
        let sig: Signature = k.sign(payload);
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
    }

    #[test]
    fn a_signature_verifies_under_its_key_and_not_under_another() {
        let dir = tempfile::tempdir().unwrap();
        let image = sha(b"image manifest");
        let p = payload(&image);
        let r = sig_referrer(&image, &p, &signed(&key(1), &p));
        let layers = signature_layers(&image, std::slice::from_ref(&r));
        assert_eq!(layers.len(), 1);

        let good = TrustedKeys::load(&[write_pub(dir.path(), "a.pub", &key(1))]).unwrap();
        let verdict = check(&image, &layers, &[Ok(p.clone())], &good);
        assert!(
            matches!(verdict, SignatureCheck::Verified { .. }),
            "{verdict:?}"
        );
        assert_eq!(verdict.reason_code(), None);

        let other = TrustedKeys::load(&[write_pub(dir.path(), "b.pub", &key(2))]).unwrap();
        let verdict = check(&image, &layers, &[Ok(p.clone())], &other);
        assert_eq!(verdict.reason_code(), Some("signature-invalid"));
        let text = verdict.describe(&image);
        assert!(text.contains(&other.keys()[0].fingerprint), "{text}");
        assert!(text.contains("b.pub"), "{text}");
    }

    #[test]
    fn a_payload_for_another_image_or_tampered_bytes_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let keys = TrustedKeys::load(&[write_pub(dir.path(), "a.pub", &key(1))]).unwrap();
        let image = sha(b"image manifest");
        // Signed properly, but for another image.
        let p = payload(&sha(b"another"));
        let r = sig_referrer(&image, &p, &signed(&key(1), &p));
        let layers = signature_layers(&image, std::slice::from_ref(&r));
        let verdict = check(&image, &layers, &[Ok(p)], &keys);
        assert!(
            verdict.describe(&image).contains("not this image"),
            "{verdict:?}"
        );
        // A payload that is not what the layer names.
        let p = payload(&image);
        let r = sig_referrer(&image, &p, &signed(&key(1), &p));
        let layers = signature_layers(&image, std::slice::from_ref(&r));
        let mut tampered = p.clone();
        tampered.push(b' ');
        let verdict = check(&image, &layers, &[Ok(tampered)], &keys);
        assert_eq!(verdict.reason_code(), Some("signature-invalid"));
        // A signature over other bytes.
        let r = sig_referrer(&image, &p, &signed(&key(1), b"other bytes"));
        let layers = signature_layers(&image, std::slice::from_ref(&r));
        let verdict = check(&image, &layers, &[Ok(p)], &keys);
        assert_eq!(verdict.reason_code(), Some("signature-invalid"));
    }

    #[test]
    fn no_signature_is_missing_and_sboms_are_not_signatures() {
        let image = sha(b"image manifest");
        assert_eq!(
            check(
                &image,
                &signature_layers(&image, &[]),
                &[],
                &TrustedKeys::default()
            ),
            SignatureCheck::Missing
        );
        let p = payload(&image);
        let mut r = sig_referrer(&image, &p, "AAAA");
        r.attachment = Attachment::Tag(weir_proto::referrers::cosign_tag(&image, "sbom").unwrap());
        assert!(signature_layers(&image, &[r]).is_empty());
    }

    #[test]
    fn key_files_that_are_not_p256_public_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pub");
        std::fs::write(&path, "hello").unwrap();
        let e = TrustedKeys::load(std::slice::from_ref(&path))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.pub") && e.contains("BEGIN PUBLIC KEY"),
            "{e}"
        );
        let e = TrustedKeys::load(&[dir.path().join("absent.pub")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.pub"), "{e}");
    }
}
