//! The build manifest: what went into an image and what came out, and the
//! SHA256SUMS file over the outputs.

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

use crate::debian::{Package, Release};
use crate::disk::Layout;
use crate::role::Role;

pub const FORMAT: u32 = 1;

#[derive(Debug, Serialize)]
pub struct BuildManifest {
    /// Version of this manifest's layout.
    pub format: u32,
    pub role: Role,
    /// The gateway's version (`<binary> --version`).
    pub version: String,
    pub source_date_epoch: u64,
    pub inputs: Inputs,
    pub kernel: String,
    /// Every package in the root filesystem (`dpkg -l` on the appliance).
    pub packages: Vec<Package>,
    pub layout: Layout,
    pub outputs: Vec<Output>,
}

#[derive(Debug, Serialize)]
pub struct Inputs {
    pub binary: FileDigest,
    pub release: Release,
    /// Packages asked for on top of minbase.
    pub packages_requested: Vec<String>,
    /// Paths dpkg left out of the root filesystem.
    pub path_excludes: Vec<String>,
    /// Files provisioned on the data partition (sha256 only, never
    /// contents).
    pub data: Vec<FileDigest>,
    /// The keyring the image trusts for updates.
    pub keyring: FileDigest,
    pub image_build_version: String,
    /// Versions of the host packages that wrote the outputs.
    pub host_tools: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileDigest {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Serialize)]
pub struct Output {
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub what: &'static str,
}

/// The SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn digest(path: &Path, shown_as: &str) -> anyhow::Result<FileDigest> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    Ok(FileDigest {
        path: shown_as.to_string(),
        sha256: sha256_file(path)?,
        size,
    })
}

/// `sha256sum -c` format, sorted by file name.
pub fn sha256sums(outputs: &[(String, String)]) -> String {
    let mut sorted: Vec<_> = outputs.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
        .iter()
        .map(|(file, sha)| format!("{sha}  {file}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_file_matches_the_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let d = digest(&p, "f").unwrap();
        assert_eq!(d.size, 3);
    }

    #[test]
    fn sha256sums_is_sorted_and_in_coreutils_format() {
        let s = sha256sums(&[
            ("b.img".into(), "22".into()),
            ("a.json".into(), "11".into()),
        ]);
        assert_eq!(s, "11  a.json\n22  b.img\n");
    }
}
