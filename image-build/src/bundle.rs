//! The update bundle: a RAUC bundle (verity format) holding the root slot's
//! squashfs, signed, and checked against the keyring the image trusts.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::role::Role;
use crate::tool;

/// The key and certificate bundles are signed with, and the keyring (CA
/// certificates) the appliance accepts bundles from.
#[derive(Debug, Clone, Serialize)]
pub struct Signing {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub keyring: PathBuf,
    /// True when image-build made them (development only).
    pub generated: bool,
}

const CERT: &str = "signing.cert.pem";
const KEY: &str = "signing.key.pem";
const KEYRING: &str = "keyring.pem";

/// The signing material in `dir`: `signing.cert.pem`, `signing.key.pem`,
/// `keyring.pem`. When none of them exists, a development CA and signing
/// certificate are generated there (RSA, so signatures are deterministic);
/// when only some exist, that is an error rather than a silent new key.
pub fn signing_material(dir: &Path) -> anyhow::Result<Signing> {
    let paths = [dir.join(CERT), dir.join(KEY), dir.join(KEYRING)];
    let present = paths.iter().filter(|p| p.exists()).count();
    let generated = match present {
        3 => false,
        0 => {
            generate_development_keys(dir)?;
            true
        }
        _ => bail!(
            "{}: has some of {CERT}, {KEY}, {KEYRING} but not all; \
             provide all three or none (to generate a development set)",
            dir.display()
        ),
    };
    let [cert, key, keyring] = paths;
    Ok(Signing {
        cert,
        key,
        keyring,
        generated,
    })
}

fn generate_development_keys(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    tracing::warn!(
        dir = %dir.display(),
        "generating a development signing key and CA: for tests only, do not ship images that trust it"
    );
    // ca.key.pem stays beside the keyring: it signs the next signing
    // certificate.
    let csr = dir.join("signing.csr");
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        tool::captured(Command::new("openssl").args(args).current_dir(dir))
            .map(|_| ())
            .context("generating development signing keys (openssl)")
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:3072",
        "-nodes",
        "-keyout",
        "ca.key.pem",
        "-out",
        KEYRING,
        "-days",
        "36500",
        "-subj",
        "/O=weir/CN=weir development CA",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:3072",
        "-nodes",
        "-keyout",
        KEY,
        "-out",
        "signing.csr",
        "-subj",
        "/O=weir/CN=weir development bundle signing",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "signing.csr",
        "-CA",
        KEYRING,
        "-CAkey",
        "ca.key.pem",
        "-set_serial",
        "2",
        "-days",
        "36500",
        "-out",
        CERT,
    ])?;
    std::fs::remove_file(&csr).ok();
    Ok(())
}

/// RAUC's bundle manifest.
pub fn rauc_manifest(role: Role, version: &str, build: &str) -> String {
    format!(
        "\
[update]
compatible={compatible}
version={version}
build={build}
description=weir {bin} root filesystem

[bundle]
format=verity

[image.rootfs]
filename=rootfs.squashfs
",
        compatible = role.compatible(),
        bin = role.binary_name(),
    )
}

/// What `rauc info` says about a bundle (the parts that are checked).
#[derive(Debug, Deserialize)]
pub struct BundleInfo {
    pub compatible: String,
    pub version: String,
    pub images: Vec<std::collections::BTreeMap<String, ImageInfo>>,
}

#[derive(Debug, Deserialize)]
pub struct ImageInfo {
    pub filename: String,
    pub checksum: String,
    pub size: u64,
}

/// Builds the bundle at `out` from the root filesystem image, then reads it
/// back with `rauc info --keyring` and checks that it carries the rootfs
/// with the expected checksum.
#[allow(clippy::too_many_arguments)]
pub fn build(
    role: Role,
    version: &str,
    build_id: &str,
    rootfs: &Path,
    rootfs_sha256: &str,
    signing: &Signing,
    work: &Path,
    out: &Path,
    epoch: u64,
) -> anyhow::Result<BundleInfo> {
    let content = work.join("bundle");
    let _ = std::fs::remove_dir_all(&content);
    std::fs::create_dir_all(&content).with_context(|| format!("creating {}", content.display()))?;
    std::fs::write(
        content.join("manifest.raucm"),
        rauc_manifest(role, version, build_id),
    )
    .context("writing the bundle manifest")?;
    // A hard link: the squashfs is hundreds of MiB.
    let image = content.join("rootfs.squashfs");
    std::fs::hard_link(rootfs, &image)
        .or_else(|_| std::fs::copy(rootfs, &image).map(|_| ()))
        .with_context(|| format!("placing {} in the bundle", rootfs.display()))?;
    let _ = std::fs::remove_file(out);
    tool::captured(
        Command::new("rauc")
            .arg("bundle")
            .arg(format!("--cert={}", signing.cert.display()))
            .arg(format!("--key={}", signing.key.display()))
            .arg(format!("--keyring={}", signing.keyring.display()))
            .arg(&content)
            .arg(out)
            .env("SOURCE_DATE_EPOCH", epoch.to_string()),
    )
    .context("building the RAUC bundle")?;
    std::fs::remove_dir_all(&content).ok();

    let info = verify(out, &signing.keyring)?;
    if info.compatible != role.compatible() {
        bail!(
            "{}: compatible is {:?}, expected {:?}",
            out.display(),
            info.compatible,
            role.compatible()
        );
    }
    let rootfs_image = info
        .images
        .iter()
        .find_map(|m| m.get("rootfs"))
        .with_context(|| format!("{}: no rootfs image in the bundle", out.display()))?;
    if info.version != version {
        bail!(
            "{}: version is {:?}, expected {version:?}",
            out.display(),
            info.version
        );
    }
    let rootfs_size = std::fs::metadata(rootfs)
        .with_context(|| format!("reading {}", rootfs.display()))?
        .len();
    if rootfs_image.filename != "rootfs.squashfs" || rootfs_image.size != rootfs_size {
        bail!(
            "{}: rootfs image is {} ({} bytes), expected rootfs.squashfs ({rootfs_size} bytes)",
            out.display(),
            rootfs_image.filename,
            rootfs_image.size
        );
    }
    if rootfs_image.checksum != rootfs_sha256 {
        bail!(
            "{}: rootfs checksum {} differs from the built {}",
            out.display(),
            rootfs_image.checksum,
            rootfs_sha256
        );
    }
    Ok(info)
}

/// `rauc info --keyring`: checks the signature against the keyring and
/// returns the bundle's manifest.
pub fn verify(bundle: &Path, keyring: &Path) -> anyhow::Result<BundleInfo> {
    let json = tool::captured(
        Command::new("rauc")
            .arg("info")
            .arg(format!("--keyring={}", keyring.display()))
            .arg("--output-format=json")
            .arg(bundle),
    )
    .with_context(|| {
        format!(
            "verifying {} against {}",
            bundle.display(),
            keyring.display()
        )
    })?;
    serde_json::from_str(&json)
        .with_context(|| format!("reading `rauc info` of {}", bundle.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names_the_role_and_the_rootfs_image() {
        let m = rauc_manifest(Role::Rx, "0.1.0", "1747699200");
        assert!(m.contains("compatible=weir-rx\n"));
        assert!(m.contains("version=0.1.0\n"));
        assert!(m.contains("format=verity\n"));
        assert!(m.contains("[image.rootfs]\nfilename=rootfs.squashfs\n"));
    }

    #[test]
    fn partial_signing_material_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY), "key").unwrap();
        let err = signing_material(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not all"), "{err}");
    }

    #[test]
    fn rauc_info_json_is_understood() {
        let json = r#"{"compatible":"weir-rx","version":"0.1.0","description":null,"build":null,"hooks":[],
          "images":[{"rootfs":{"variant":null,"filename":"rootfs.squashfs","checksum":"ab","size":3,"hooks":[],"adaptive":[]}}]}"#;
        let info: BundleInfo = serde_json::from_str(json).unwrap();
        assert_eq!(info.images[0]["rootfs"].checksum, "ab");
        assert_eq!(info.images[0]["rootfs"].size, 3);
        assert_eq!(info.images[0]["rootfs"].filename, "rootfs.squashfs");
    }

    /// A bundle signed with generated keys verifies against their keyring
    /// and not against another CA.
    #[test]
    fn bundle_verifies_against_its_keyring_only() {
        if tool::find("rauc").is_none()
            || tool::find("openssl").is_none()
            || tool::find("mksquashfs").is_none()
        {
            eprintln!("skipped: rauc/openssl/mksquashfs missing (apt-get install rauc openssl squashfs-tools)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let signing = signing_material(&dir.path().join("keys")).unwrap();
        assert!(signing.generated);
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "weir-rx\n").unwrap();
        // RAUC wants a slot image larger than one block: add bytes that do
        // not compress.
        let mut x: u32 = 1;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(tree.join("etc/noise"), noise).unwrap();
        let rootfs = dir.path().join("rootfs.squashfs");
        crate::filesystem::squashfs(&tree, &rootfs, 1_747_699_200).unwrap();
        let sha = crate::manifest::sha256_file(&rootfs).unwrap();
        let out = dir.path().join("weir-rx.raucb");
        let info = build(
            Role::Rx,
            "0.1.0",
            "test",
            &rootfs,
            &sha,
            &signing,
            dir.path(),
            &out,
            1_747_699_200,
        )
        .unwrap();
        assert_eq!(info.version, "0.1.0");

        let other = signing_material(&dir.path().join("other")).unwrap();
        let err = verify(&out, &other.keyring).unwrap_err();
        assert!(format!("{err:#}").contains("rauc"), "{err:#}");
        // The same material is reused, not regenerated.
        let again = signing_material(&dir.path().join("keys")).unwrap();
        assert!(!again.generated);
    }
}
