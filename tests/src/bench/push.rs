//! The reference for the push figure: `skopeo copy` of the same image from
//! an OCI layout directory into a registry of its own (a registry that
//! already held the blobs would skip them), digests preserved, timed as a
//! whole process.

use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;
use weir_tests::registry::Registry;

/// Seconds `skopeo copy oci:LAYOUT docker://REGISTRY/repo:tag` took; checks
/// the registry then serves the expected manifest digest.
pub fn skopeo_seconds(
    layout: &Path,
    registry: &Registry,
    repo: &str,
    tag: &str,
    digest: &str,
) -> Result<f64> {
    let t = Instant::now();
    weir_tests::skopeo::push(
        &format!("oci:{}", layout.display()),
        registry,
        &format!("{repo}:{tag}"),
    )?;
    let seconds = t.elapsed().as_secs_f64();
    match registry.manifest_digest(repo, tag)? {
        Some(d) if d == digest => Ok(seconds),
        other => bail!(
            "after skopeo copy the registry serves {other:?} for {repo}:{tag}, expected {digest}"
        ),
    }
}
