//! `skopeo`, to load generated layouts into a registry and to read images
//! the way other tools do. Tests that need it skip without it, except under
//! `CI=true`, where they fail (see [`crate::tools`]).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::registry::Registry;
use crate::tools;

/// Whether `skopeo` is on `PATH`; says how to install it when not, and
/// panics (fails the test) when it is missing under `CI=true`.
pub fn available() -> bool {
    tools::or_skip(tools::SKOPEO).is_some()
}

/// Options of [`copy_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// `--all`: every image of an index, not only the host's platform.
    pub all: bool,
    /// `--preserve-digests`: fail rather than rewrite a manifest.
    pub preserve_digests: bool,
}

/// `skopeo copy SRC DST` (e.g. `oci:DIR` to `docker://HOST/repo:tag`).
/// Plain HTTP to registries (they run on loopback) and no signature policy.
pub fn copy(src: &str, dst: &str) -> Result<()> {
    copy_with(src, dst, CopyOptions::default())
}

pub fn copy_with(src: &str, dst: &str, options: CopyOptions) -> Result<()> {
    let mut args: Vec<String> = vec!["copy".into(), "-q".into()];
    if src.starts_with("docker://") {
        args.push("--src-tls-verify=false".into());
    }
    if dst.starts_with("docker://") {
        args.push("--dest-tls-verify=false".into());
    }
    if options.all {
        args.push("--all".into());
    }
    if options.preserve_digests {
        args.push("--preserve-digests".into());
    }
    args.push(src.into());
    args.push(dst.into());
    run(&args).map(|_| ())
}

/// Loads an image (an `oci:`, `oci-archive:` or `docker-archive:` source)
/// into `registry` as `repo:tag`, all platforms, digests preserved: the
/// registry then serves the manifest digest the source has.
pub fn push(src: &str, registry: &Registry, repo_tag: &str) -> Result<()> {
    copy_with(
        src,
        &format!("docker://{}/{repo_tag}", registry.host()),
        CopyOptions {
            all: true,
            preserve_digests: true,
        },
    )
}

/// `skopeo inspect --raw SRC`: the manifest bytes exactly as stored.
pub fn inspect_raw(src: &str) -> Result<Vec<u8>> {
    let mut args: Vec<String> = vec!["inspect".into(), "--raw".into()];
    if src.starts_with("docker://") {
        args.push("--tls-verify=false".into());
    }
    args.push(src.into());
    run(&args)
}

fn run(args: &[String]) -> Result<Vec<u8>> {
    let bin = PathBuf::from("skopeo");
    let output = Command::new(&bin)
        .arg("--insecure-policy")
        .args(args)
        .output()
        .with_context(|| format!("running skopeo {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "skopeo {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_reports_skopeo_stderr() {
        if !available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = format!("oci:{}/nothing", dir.path().display());
        let out = format!("dir:{}/out", dir.path().display());
        let err = copy(&missing, &out).unwrap_err().to_string();
        assert!(err.contains("skopeo copy"), "{err}");
        assert!(err.contains("nothing"), "stderr names the source: {err}");
    }

    #[test]
    fn inspect_raw_returns_the_stored_manifest_bytes() {
        if !available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let layers = [weir_imagegen::LayerSpec { size: 1000 }];
        let image = weir_imagegen::oci_layout_dir(dir.path(), "l", 3, &layers, "t/a:1").unwrap();
        let raw = inspect_raw(&format!("oci:{}", image.path.display())).unwrap();
        let digest = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&raw))
        );
        assert_eq!(Some(digest), image.manifest_digest);
    }
}
