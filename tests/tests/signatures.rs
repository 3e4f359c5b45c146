//! End to end, signatures and referrers: cosign signatures and an SBOM
//! cross with their image (from a file drop and from a source registry),
//! the signature gate refuses what is unsigned or signed by another key,
//! and the receiver's own check keeps an image whose signature was stripped
//! by a sender holding the link key out of the registry.
//!
//! Real parts: keys from openssl, signatures in cosign's format signed and
//! re-checked by Python's `cryptography` (never the gateways' code), Debian's
//! `docker-registry` as source and destination (it has no referrers API, so
//! the receiver keeps the referrers tag schema's index).

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use weir_test_support::cosign::{self, Artifact, KeyPair};
use weir_test_support::skopeo;
use weir_test_support::tools::{self, OPENSSL};
use weir_tests::imagegen::{self, GeneratedImage, LayerSpec};
use weir_tests::pair::{
    expect_within, Gateway, PullRegistry, PullSetup, Site, SiteOptions, Target,
};
use weir_tests::registry::{Registry, RegistryClient};

const CROSSING: Duration = Duration::from_secs(90);

/// Python with `cryptography`, openssl and a registry; None to skip.
fn parts() -> Option<(std::path::PathBuf, Registry)> {
    tools::or_skip(OPENSSL)?;
    let python = cosign::python_or_skip()?;
    let registry = Registry::start().expect("starting docker-registry")?;
    Some((python, registry))
}

fn layers(sizes: &[u64]) -> Vec<LayerSpec> {
    sizes.iter().map(|&size| LayerSpec { size }).collect()
}

/// The rules every test's sender runs: team-a's images need a signature by
/// `key`.
fn rules(key: &Path) -> String {
    format!(
        "namespaces: [team-a]\nrules:\n  - regex: 'team-a/.*'\n    require_signature:\n      keys: [{:?}]\n",
        key.display().to_string()
    )
}

/// An OCI layout of one image with `attached` (artifact, ref.name) added,
/// tarred into `name` under `dir`.
fn signed_archive(
    dir: &Path,
    name: &str,
    image: &GeneratedImage,
    attached: &[(&Artifact, Option<&str>)],
) -> Result<std::path::PathBuf> {
    cosign::add_to_layout(&image.path, attached)?;
    let out = dir.join(name);
    cosign::tar_layout(&image.path, &out)?;
    Ok(out)
}

fn manifest_size(layout: &Path, digest: &str) -> Result<u64> {
    let path = layout.join("blobs/sha256").join(&digest[7..]);
    Ok(std::fs::metadata(&path)
        .with_context(|| path.display().to_string())?
        .len())
}

/// The `sha256-<hex>` fallback tag's index in `repo`, as the destination
/// serves it.
fn referrers_index(client: &RegistryClient, repo: &str, subject: &str) -> Result<Value> {
    let tag = format!("sha256-{}", &subject[7..]);
    let m = client.get_manifest(repo, &tag)?;
    Ok(serde_json::from_slice(&m.bytes)?)
}

/// Whether `repo:tag` serves `digest`, its `.sig` tag is there and the
/// referrers index lists `sbom`.
fn crossed_with_referrers(
    dest: &RegistryClient,
    repo: &str,
    tag: &str,
    digest: &str,
    sig_tag: &str,
    sbom: &str,
) -> bool {
    let has = |tag: &str| dest.manifest_digest(repo, tag).ok().flatten();
    has(tag).as_deref() == Some(digest)
        && has(sig_tag).is_some()
        && referrers_index(dest, repo, digest).is_ok_and(|i| i.to_string().contains(sbom))
}

/// What an independent client checks at the destination: the `.sig` tag is
/// there with its digest unchanged, its payload verifies under `key` (and a
/// tampered copy does not), and the referrers list names the SBOM, which
/// is served byte for byte.
/// Python with `cryptography` and a scratch directory for its files.
struct Checker<'a> {
    python: &'a Path,
    work: &'a Path,
}

fn check_destination(
    checker: &Checker<'_>,
    dest: &RegistryClient,
    repo: &str,
    image_digest: &str,
    signature: &cosign::Signature,
    sbom: &Artifact,
    key: &KeyPair,
) -> Result<()> {
    let Checker { python, work } = *checker;
    let sig_tag = format!("sha256-{}.sig", &image_digest[7..]);
    assert_eq!(
        dest.manifest_digest(repo, &sig_tag)?,
        Some(signature.artifact.digest.clone()),
        "the .sig tag crossed with its digest unchanged"
    );
    let sig_manifest: Value = serde_json::from_slice(&dest.get_manifest(repo, &sig_tag)?.bytes)?;
    let layer = &sig_manifest["layers"][0];
    let payload_digest = layer["digest"].as_str().context("payload digest")?;
    let annotation = layer["annotations"][cosign::SIGNATURE_ANNOTATION]
        .as_str()
        .context("signature annotation")?;
    let payload = dest.blob(repo, payload_digest)?;
    assert!(
        cosign::verify(python, work, &key.public, &payload, annotation)?,
        "the signature at the destination verifies under the public key"
    );
    let mut tampered = payload.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    assert!(
        !cosign::verify(python, work, &key.public, &tampered, annotation)?,
        "a tampered payload does not verify (the checker can fail)"
    );

    let index = referrers_index(dest, repo, image_digest)?;
    let listed = index["manifests"]
        .as_array()
        .context("referrers index")?
        .iter()
        .find(|m| m["digest"] == sbom.digest.as_str())
        .with_context(|| format!("the SBOM {} is listed: {index}", sbom.digest))?;
    assert_eq!(listed["artifactType"], "application/spdx+json");
    let served = dest.get_manifest(repo, &sbom.digest)?;
    assert_eq!(
        served.bytes, sbom.manifest,
        "the SBOM manifest byte for byte"
    );
    let sbom_blob = &sbom.blobs[1];
    assert_eq!(&dest.blob(repo, &cosign::sha256(sbom_blob))?, sbom_blob);
    Ok(())
}

fn reason_of(site: &Site, name: &str) -> Result<Value> {
    let path = site.spool.join(format!("rejected/{name}.reason.json"));
    Ok(serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("{} (the refused drop's reason)", path.display()))?,
    )?)
}

/// A signed drop with an SBOM crosses with both, and both check out at the
/// destination; an unsigned drop lands in rejected/ with
/// `signature-missing`; one signed by another key with `signature-invalid`
/// naming the key tried.
#[test]
fn a_signed_drop_crosses_with_its_signature_and_sbom_and_unsigned_or_foreign_ones_are_refused(
) -> Result<()> {
    let Some((python, dest)) = parts() else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let w = work.path();
    let trusted = KeyPair::generate(w, "team-a")?;
    let foreign = KeyPair::generate(w, "someone-else")?;

    let signed = imagegen::oci_layout_dir(
        w,
        "signed",
        301,
        &layers(&[200_000, 50_000]),
        "team-a/app:1",
    )?;
    let digest = signed.manifest_digest.clone().context("digest")?;
    let signature = cosign::sign(&python, w, &trusted, "team-a/app", &digest)?;
    let media_type = signed.manifest_media_type.clone().context("media type")?;
    let sbom = cosign::sbom_artifact(
        &digest,
        manifest_size(&signed.path, &digest)?,
        &media_type,
        "app",
    );
    let sig_tag = format!("sha256-{}.sig", &digest[7..]);
    let signed_tar = signed_archive(
        w,
        "signed.tar",
        &signed,
        &[(&signature.artifact, Some(&sig_tag)), (&sbom, None)],
    )?;

    let unsigned = imagegen::oci_archive(
        w,
        "unsigned.tar",
        302,
        &layers(&[30_000]),
        "team-a/unsigned:1",
    )?;
    let other = imagegen::oci_layout_dir(w, "other", 303, &layers(&[30_000]), "team-a/other:1")?;
    let other_digest = other.manifest_digest.clone().context("digest")?;
    let other_sig = cosign::sign(&python, w, &foreign, "team-a/other", &other_digest)?;
    let other_tag = format!("sha256-{}.sig", &other_digest[7..]);
    let other_tar = signed_archive(
        w,
        "other.tar",
        &other,
        &[(&other_sig.artifact, Some(&other_tag))],
    )?;

    let opts = SiteOptions {
        rules_yaml: Some(rules(&trusted.public)),
        rx_extra: format!(
            "verify_signatures = [{:?}]\n",
            trusted.public.display().to_string()
        ),
        ..Default::default()
    };
    // rx_extra lands in rx.toml's [delivery] table.
    let site = Site::new(Target::Registry(dest.url()), &opts)?;
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;
    site.drop_image(&signed_tar, "signed.tar")?;
    site.drop_image(&unsigned.path, "unsigned.tar")?;
    site.drop_image(&other_tar, "other.tar")?;

    expect_within(
        "the signed image and its .sig tag delivered",
        CROSSING,
        &mut [&mut tx, &mut rx],
        || crossed_with_referrers(&dest, "team-a/app", "1", &digest, &sig_tag, &sbom.digest),
    );
    let checker = Checker {
        python: &python,
        work: w,
    };
    check_destination(
        &checker,
        &dest,
        "team-a/app",
        &digest,
        &signature,
        &sbom,
        &trusted,
    )?;

    let missing = reason_of(&site, "unsigned.tar")?;
    assert_eq!(missing["code"], "signature-missing", "{missing}");
    let invalid = reason_of(&site, "other.tar")?;
    assert_eq!(invalid["code"], "signature-invalid", "{invalid}");
    let message = invalid["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("keys tried: sha256:") && message.contains("team-a.pub"),
        "the refusal names the key fingerprints tried: {message}"
    );
    for repo in ["team-a/unsigned", "team-a/other"] {
        assert_eq!(
            dest.manifest_digest(repo, "1")?,
            None,
            "{repo} never crossed"
        );
    }
    Ok(())
}

/// A sender holding the link key that strips signatures in transit (here:
/// one configured to drop referrers and to check nothing) cannot get the
/// image into the registry: the receiver's `verify_signatures` keeps it,
/// says why in status and raises the fault.
#[test]
fn an_image_whose_signature_was_stripped_in_transit_is_kept_and_not_pushed() -> Result<()> {
    let Some((python, dest)) = parts() else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let w = work.path();
    let trusted = KeyPair::generate(w, "team-a")?;
    let image = imagegen::oci_layout_dir(w, "signed", 311, &layers(&[100_000]), "team-a/app:2")?;
    let digest = image.manifest_digest.clone().context("digest")?;
    let signature = cosign::sign(&python, w, &trusted, "team-a/app", &digest)?;
    let sig_tag = format!("sha256-{}.sig", &digest[7..]);
    let tar = signed_archive(
        w,
        "signed.tar",
        &image,
        &[(&signature.artifact, Some(&sig_tag))],
    )?;

    let opts = SiteOptions {
        tx_extra: "[policy]\nreferrers = \"drop\"\n".into(),
        rx_extra: format!(
            "verify_signatures = [{:?}]\n",
            trusted.public.display().to_string()
        ),
        ..Default::default()
    };
    let site = Site::new(Target::Registry(dest.url()), &opts)?;
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut rx = site.start_rx()?;
    let mut tx = site.start_tx()?;
    site.drop_image(&tar, "signed.tar")?;

    let refused = |site: &Site| {
        site.rx_status().and_then(|s| {
            s["deliveries"]
                .as_array()?
                .iter()
                .find(|d| d["manifest_digest"] == digest.as_str())
                .filter(|d| d["state"] == "refused")
                .map(|d| (d["last_error"].to_string(), s["fault"].to_string()))
        })
    };
    // The fault follows the refusal within a second or two.
    expect_within(
        "the image kept and refused by the receiver",
        CROSSING,
        &mut [&mut tx, &mut rx],
        || refused(&site).is_some_and(|(_, fault)| fault.contains("not pushed")),
    );
    let (error, fault) = refused(&site).context("refused delivery")?;
    assert!(error.contains("signature-missing"), "{error}");
    assert!(fault.contains("not pushed"), "{fault}");
    assert_eq!(
        dest.manifest_digest("team-a/app", "2")?,
        None,
        "never pushed"
    );
    // Kept, and checked again later rather than dropped.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        refused(&site).is_some(),
        "the refused image stays on record"
    );
    Ok(())
}

/// Pull mode: an image in the source registry with a cosign signature tag
/// and an SBOM listed under the referrers tag schema crosses with both.
#[test]
fn a_pulled_image_crosses_with_its_signature_and_sbom_from_the_source_registry() -> Result<()> {
    if !skopeo::available() {
        return Ok(());
    }
    let Some((python, dest)) = parts() else {
        return Ok(());
    };
    let source = Registry::start()
        .expect("starting the source docker-registry")
        .context("source registry")?;
    let work = tempfile::tempdir()?;
    let w = work.path();
    let trusted = KeyPair::generate(w, "team-a")?;

    let image = imagegen::oci_archive(w, "img.tar", 321, &layers(&[80_000]), "team-a/app:3")?;
    let digest = skopeo::push_archive(&image.path, &source.access(), "team-a/app:3")?;
    let media_type = image.manifest_media_type.clone().context("media type")?;
    let size = source.get_manifest("team-a/app", &digest)?.bytes.len() as u64;
    let signature = cosign::sign(&python, w, &trusted, "team-a/app", &digest)?;
    let sig_tag = format!("sha256-{}.sig", &digest[7..]);
    source.push_artifact("team-a/app", &signature.artifact, Some(&sig_tag))?;
    let sbom = cosign::sbom_artifact(&digest, size, &media_type, "app");
    source.push_artifact("team-a/app", &sbom, None)?;
    // distribution 2.x has no referrers API: list the SBOM the fallback way.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": sbom.media_type,
            "digest": sbom.digest,
            "size": sbom.manifest.len(),
            "artifactType": "application/spdx+json"
        }]
    }))?;
    source.put_manifest(
        "team-a/app",
        &format!("sha256-{}", &digest[7..]),
        "application/vnd.oci.image.index.v1+json",
        &index,
    )?;

    let mut opts = SiteOptions {
        rules_yaml: Some(rules(&trusted.public)),
        rx_extra: format!(
            "verify_signatures = [{:?}]\n",
            trusted.public.display().to_string()
        ),
        ..Default::default()
    };
    let site = Site::new(Target::Registry(dest.url()), &opts)?;
    let setup = PullSetup {
        registries: vec![PullRegistry {
            host: source.host(),
            plain_http: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    // The whole repository is followed: the signature and referrers tags
    // must cross with their image, never as images of their own.
    let sync = format!(
        "repositories:\n  - source: {}/team-a/app\n    destination: team-a/app\n",
        source.host()
    );
    opts.tx_extra.push_str(&site.pull_toml(&setup, &sync)?);
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut rx: Gateway = site.start_rx()?;
    let mut tx: Gateway = site.start_tx()?;

    expect_within(
        "the pulled image and its referrers delivered",
        CROSSING,
        &mut [&mut tx, &mut rx],
        || crossed_with_referrers(&dest, "team-a/app", "3", &digest, &sig_tag, &sbom.digest),
    );
    let checker = Checker {
        python: &python,
        work: w,
    };
    check_destination(
        &checker,
        &dest,
        "team-a/app",
        &digest,
        &signature,
        &sbom,
        &trusted,
    )?;
    // Only the image itself was taken as an image.
    let tags = dest.tags("team-a/app")?;
    assert!(
        tags.iter().all(|t| t == "3" || t.starts_with("sha256-")),
        "{tags:?}"
    );
    Ok(())
}
