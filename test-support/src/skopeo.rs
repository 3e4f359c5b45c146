//! `skopeo`, to load generated layouts into a registry and to read images
//! the way other tools do. Tests that need it skip without it, except under
//! `CI=true`, where they fail (see [`crate::tools`]).

use std::path::{Path, PathBuf};
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
/// registry then serves the manifest digest the source has. A registry
/// with credentials or TLS is reached with them ([`Registry::access`]).
pub fn push(src: &str, registry: &Registry, repo_tag: &str) -> Result<()> {
    push_to(src, &registry.access(), repo_tag).map(|_| ())
}

/// How skopeo reaches a registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// `host:port`, as references write it.
    pub host: String,
    /// (user, password) for `--dest-creds`/`--creds`.
    pub creds: Option<(String, String)>,
    /// A directory holding the CA as `ca.crt`: https, verified against it.
    /// None: plain http (`--dest-tls-verify=false`).
    pub cert_dir: Option<PathBuf>,
}

impl Access {
    /// The transport, TLS and credential flags for one side of a command
    /// (`prefix` "dest-" for copy's destination, "" for inspect/delete).
    fn flags(&self, prefix: &str) -> Vec<String> {
        let mut args = Vec::new();
        match &self.cert_dir {
            Some(dir) => {
                args.push(format!("--{prefix}tls-verify=true"));
                args.push(format!("--{prefix}cert-dir={}", dir.display()));
            }
            None => args.push(format!("--{prefix}tls-verify=false")),
        }
        if let Some((user, password)) = &self.creds {
            args.push(format!("--{prefix}creds={user}:{password}"));
        }
        args
    }
}

/// Copies `src` (an `oci:`, `oci-archive:` or `docker-archive:` source) to
/// `repo_tag` in the registry `to` describes, all platforms, digests
/// preserved; returns the manifest digest skopeo wrote. Pushing to a tag
/// that exists moves it.
pub fn push_to(src: &str, to: &Access, repo_tag: &str) -> Result<String> {
    let scratch = tempfile::tempdir().context("a directory for skopeo's digest file")?;
    let digest_file = scratch.path().join("digest");
    let mut args: Vec<String> = vec!["copy".into(), "-q".into(), "--all".into()];
    args.push("--preserve-digests".into());
    args.push(format!("--digestfile={}", digest_file.display()));
    args.extend(to.flags("dest-"));
    args.push(src.into());
    args.push(format!("docker://{}/{repo_tag}", to.host));
    run(&args)?;
    let digest = std::fs::read_to_string(&digest_file)
        .with_context(|| format!("reading skopeo's digest file after pushing {repo_tag}"))?;
    let digest = digest.trim().to_string();
    if !digest.starts_with("sha256:") {
        bail!("skopeo wrote {digest:?} as the digest of {repo_tag}");
    }
    Ok(digest)
}

/// [`push_to`] of an OCI archive the harness wrote (`imagegen`).
pub fn push_archive(archive: &Path, to: &Access, repo_tag: &str) -> Result<String> {
    push_to(&format!("oci-archive:{}", archive.display()), to, repo_tag)
}

/// Moves `repo_tag` from the image `from_digest` to the OCI archive's
/// image; returns the new digest. Fails when the tag would not move (the
/// archive holds the same image), so a test cannot believe it moved a tag
/// that stayed put.
pub fn move_tag(archive: &Path, to: &Access, repo_tag: &str, from_digest: &str) -> Result<String> {
    let digest = push_archive(archive, to, repo_tag)?;
    if digest == from_digest {
        bail!("{repo_tag} did not move: the archive holds the same image {digest}");
    }
    Ok(digest)
}

/// Deletes the manifest `repo_tag` points at (`skopeo delete`): the tag,
/// and any other tag on the same manifest, disappears. The registry must
/// allow deletes (the launcher's registries do).
pub fn delete_tag(to: &Access, repo_tag: &str) -> Result<()> {
    let mut args: Vec<String> = vec!["delete".into()];
    args.extend(to.flags(""));
    args.push(format!("docker://{}/{repo_tag}", to.host));
    run(&args).map(|_| ())
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

    /// The pull tests' fixture: archives pushed with credentials over TLS
    /// keep their digests; a tag moves; a deleted tag is gone.
    #[test]
    fn pushes_archives_with_credentials_over_tls_and_moves_and_deletes_tags() {
        if !available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let Some(certs) = crate::tls::certs_or_skip(&dir.path().join("tls")).unwrap() else {
            return;
        };
        let options = crate::RegistryOptions {
            tls: Some(certs),
            ..crate::RegistryOptions::with_basic_auth("mirror", "right-password")
        };
        let Some(registry) = Registry::start_with(options).unwrap() else {
            return;
        };
        let layers = [weir_imagegen::LayerSpec { size: 20_000 }];
        let one = weir_imagegen::oci_archive(dir.path(), "1.tar", 1, &layers, "t/a:1").unwrap();
        let two = weir_imagegen::oci_archive(dir.path(), "2.tar", 2, &layers, "t/a:2").unwrap();
        let access = registry.access();
        assert!(access.cert_dir.is_some() && access.creds.is_some());

        let d1 = push_archive(&one.path, &access, "team-a/app:1").unwrap();
        assert_eq!(Some(d1.clone()), one.manifest_digest);
        assert_eq!(
            registry.manifest_digest("team-a/app", "1").unwrap(),
            Some(d1.clone())
        );
        let wrong = Access {
            creds: Some(("mirror".into(), "wrong-password".into())),
            ..access.clone()
        };
        let err = push_archive(&two.path, &wrong, "team-a/app:1").unwrap_err();
        assert!(format!("{err:#}").contains("skopeo copy"), "{err:#}");

        let err = move_tag(&one.path, &access, "team-a/app:1", &d1).unwrap_err();
        assert!(err.to_string().contains("did not move"), "{err}");
        let d2 = move_tag(&two.path, &access, "team-a/app:1", &d1).unwrap();
        assert_eq!(Some(d2.clone()), two.manifest_digest);
        assert_eq!(
            registry.manifest_digest("team-a/app", "1").unwrap(),
            Some(d2)
        );

        delete_tag(&access, "team-a/app:1").unwrap();
        assert_eq!(registry.manifest_digest("team-a/app", "1").unwrap(), None);
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
