//! Signatures in cosign's format, made and checked by a library the
//! gateways do not use: keys from `openssl`, simple-signing payloads signed
//! and verified (ECDSA P-256/SHA-256) by Python's `cryptography` (Debian's
//! `python3-cryptography`). Debian's skopeo is built without sigstore, so
//! this is the independent signer and checker of the signature tests.
//!
//! Also the artifacts that hang off an image: the `.sig` tag manifest with
//! its `dev.cosignproject.cosign/signature` annotation, and an SBOM as an
//! OCI 1.1 artifact with a `subject`.

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const SIGNER: &str = r#"
import base64, json, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.exceptions import InvalidSignature

cmd = sys.argv[1]
if cmd == "sign":
    key = serialization.load_pem_private_key(open(sys.argv[2], "rb").read(), password=None)
    payload = open(sys.argv[3], "rb").read()
    sig = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    sys.stdout.write(base64.b64encode(sig).decode())
elif cmd == "verify":
    key = serialization.load_pem_public_key(open(sys.argv[2], "rb").read())
    payload = open(sys.argv[3], "rb").read()
    sig = base64.b64decode(sys.argv[4])
    try:
        key.verify(sig, payload, ec.ECDSA(hashes.SHA256()))
        print("verified")
    except InvalidSignature:
        print("invalid")
        sys.exit(1)
"#;

/// The media type of a simple-signing payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation that carries the signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A Python that has `cryptography`: Debian's first (where
/// `python3-cryptography` installs it), then whatever `python3` is on PATH.
/// None (after saying what to install) to skip; panics under `CI=true`.
pub fn python_or_skip() -> Option<PathBuf> {
    for candidate in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(candidate)
            .args(["-c", "import cryptography"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(PathBuf::from(candidate));
        }
    }
    let message = "python3 with the cryptography module not found; install it with: apt-get install -y python3-cryptography";
    if crate::tools::is_ci(std::env::var_os("CI").as_deref()) {
        panic!("{message} (CI=true: a missing tool fails the test instead of skipping it)");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// An ECDSA P-256 key pair made by openssl.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private: PathBuf,
    pub public: PathBuf,
}

impl KeyPair {
    /// `openssl ecparam -genkey` + `openssl ec -pubout` into `dir`.
    pub fn generate(dir: &Path, name: &str) -> Result<KeyPair> {
        let private = dir.join(format!("{name}.key"));
        let public = dir.join(format!("{name}.pub"));
        run(Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(&private))?;
        run(Command::new("openssl")
            .args(["ec", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public))?;
        Ok(KeyPair { private, public })
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A manifest with the blobs it names: what a test puts into a registry or
/// an OCI layout.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub manifest: Vec<u8>,
    pub digest: String,
    pub media_type: String,
    pub blobs: Vec<Vec<u8>>,
}

/// A cosign signature of `image_digest`, signed by `key`.
#[derive(Debug, Clone)]
pub struct Signature {
    pub payload: Vec<u8>,
    /// Base64 of the DER ECDSA signature.
    pub signature: String,
    /// The `.sig` tag manifest and its blobs.
    pub artifact: Artifact,
}

/// The simple-signing payload cosign writes for `image_digest`.
pub fn payload(identity: &str, image_digest: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "critical": {
            "identity": {"docker-reference": identity},
            "image": {"docker-manifest-digest": image_digest},
            "type": "cosign container image signature"
        },
        "optional": null
    }))
    .expect("json")
}

/// Signs `image_digest` with `key` (Python `cryptography`) and builds the
/// `.sig` manifest cosign would push.
pub fn sign(
    python: &Path,
    work: &Path,
    key: &KeyPair,
    identity: &str,
    image_digest: &str,
) -> Result<Signature> {
    let payload = payload(identity, image_digest);
    let payload_path = work.join(format!("payload-{}.json", &sha256(&payload)[7..19]));
    std::fs::write(&payload_path, &payload)?;
    let signature = run(Command::new(python)
        .args(["-c", SIGNER, "sign"])
        .arg(&key.private)
        .arg(&payload_path))?;
    let artifact = signature_artifact(&payload, &signature);
    Ok(Signature {
        payload,
        signature,
        artifact,
    })
}

/// Whether `signature` over `payload` verifies under `public` (Python
/// `cryptography`, not the gateways' code).
pub fn verify(
    python: &Path,
    work: &Path,
    public: &Path,
    payload: &[u8],
    signature: &str,
) -> Result<bool> {
    let payload_path = work.join(format!("check-{}.json", &sha256(payload)[7..19]));
    std::fs::write(&payload_path, payload)?;
    let out = Command::new(python)
        .args(["-c", SIGNER, "verify"])
        .arg(public)
        .arg(&payload_path)
        .arg(signature)
        .output()?;
    Ok(out.status.success())
}

/// The `.sig` manifest: a config naming the payload and one
/// simple-signing layer annotated with the signature.
pub fn signature_artifact(payload: &[u8], signature: &str) -> Artifact {
    let config = serde_json::to_vec(&json!({
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": [sha256(payload)]}
    }))
    .expect("json");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len()
        },
        "layers": [{
            "mediaType": SIMPLE_SIGNING,
            "digest": sha256(payload),
            "size": payload.len(),
            "annotations": {SIGNATURE_ANNOTATION: signature}
        }]
    }))
    .expect("json");
    Artifact {
        digest: sha256(&manifest),
        media_type: OCI_MANIFEST.into(),
        manifest,
        blobs: vec![config, payload.to_vec()],
    }
}

/// An SPDX SBOM attached to a manifest as an OCI 1.1 artifact (`subject`
/// names it).
pub fn sbom_artifact(
    subject_digest: &str,
    subject_size: u64,
    subject_media_type: &str,
    name: &str,
) -> Artifact {
    let sbom = serde_json::to_vec(&json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": name,
        "packages": [{"name": name, "SPDXID": "SPDXRef-Package", "versionInfo": "1.0"}]
    }))
    .expect("json");
    let empty = b"{}".to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/spdx+json",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": sha256(&empty),
            "size": 2
        },
        "layers": [{
            "mediaType": "application/spdx+json",
            "digest": sha256(&sbom),
            "size": sbom.len()
        }],
        "subject": {
            "mediaType": subject_media_type,
            "digest": subject_digest,
            "size": subject_size
        },
        "annotations": {"org.opencontainers.image.created": "2026-11-30T00:00:00Z"}
    }))
    .expect("json");
    Artifact {
        digest: sha256(&manifest),
        media_type: OCI_MANIFEST.into(),
        manifest,
        blobs: vec![empty, sbom],
    }
}

/// Adds `artifacts` to an OCI layout directory: their blobs and manifests
/// under `blobs/sha256/`, and an index.json entry each (named `ref_name`
/// when given, as cosign tags are).
pub fn add_to_layout(dir: &Path, artifacts: &[(&Artifact, Option<&str>)]) -> Result<()> {
    let blobs = dir.join("blobs").join("sha256");
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    for (a, ref_name) in artifacts {
        for b in a.blobs.iter().chain(std::iter::once(&a.manifest)) {
            std::fs::write(blobs.join(&sha256(b)[7..]), b)?;
        }
        let mut entry = json!({
            "mediaType": a.media_type,
            "digest": a.digest,
            "size": a.manifest.len()
        });
        if let Some(name) = ref_name {
            entry["annotations"] = json!({"org.opencontainers.image.ref.name": name});
        }
        index["manifests"]
            .as_array_mut()
            .context("index.json has no manifests array")?
            .push(entry);
    }
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// Tars an OCI layout directory into an OCI archive file (a drop).
pub fn tar_layout(dir: &Path, out: &Path) -> Result<()> {
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .args(["oci-layout", "index.json", "blobs"]))?;
    Ok(())
}
