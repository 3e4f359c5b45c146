use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;

use serde_json::Value;

use super::*;

/// An archive read back with the `tar` crate: regular files and symlinks.
#[derive(Default)]
struct Unpacked {
    files: BTreeMap<String, Vec<u8>>,
    links: BTreeMap<String, String>,
    order: Vec<String>,
}

impl Unpacked {
    fn read(path: &Path) -> Unpacked {
        let mut out = Unpacked::default();
        let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            out.order.push(name.clone());
            match entry.header().entry_type() {
                tar::EntryType::Regular => {
                    let mut bytes = Vec::new();
                    entry.read_to_end(&mut bytes).unwrap();
                    assert_eq!(bytes.len() as u64, entry.header().size().unwrap());
                    assert!(
                        out.files.insert(name.clone(), bytes).is_none(),
                        "{name} twice"
                    );
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name().unwrap().unwrap();
                    out.links
                        .insert(name, target.to_string_lossy().into_owned());
                }
                tar::EntryType::Directory => {}
                other => panic!("unexpected entry type {other:?} for {name}"),
            }
        }
        out
    }

    /// Reads a file, following a symlink relative to its directory.
    fn file(&self, path: &str) -> &[u8] {
        if let Some(target) = self.links.get(path) {
            let dir = Path::new(path).parent().unwrap();
            let resolved = normalize(&dir.join(target));
            return self.file(&resolved);
        }
        self.files
            .get(path)
            .unwrap_or_else(|| panic!("no {path} in archive"))
    }

    fn json(&self, path: &str) -> Value {
        serde_json::from_slice(self.file(path)).unwrap()
    }

    fn blob(&self, digest: &str) -> &[u8] {
        let bytes = self.file(&oci_blob_path(digest));
        assert_eq!(
            sha256_digest(bytes),
            digest,
            "blob content matches its name"
        );
        bytes
    }
}

fn normalize(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    parts.join("/")
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// The random files inside a layer tar: (path, size).
fn layer_files(tar_bytes: &[u8]) -> Vec<(String, u64)> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.header().entry_type() == tar::EntryType::Regular)
        .map(|e| (e.path().unwrap().display().to_string(), e.size()))
        .collect()
}

fn file_digest(path: &Path) -> String {
    sha256_digest(&std::fs::read(path).unwrap())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

const LAYERS: [LayerSpec; 3] = [
    LayerSpec { size: 300_000 },
    LayerSpec { size: 1 },
    LayerSpec { size: 70_000 },
];

/// Checks an OCI image manifest in `archive` against the report, re-hashing
/// every blob, and returns the manifest.
fn check_oci_manifest(archive: &Unpacked, digest: &str, platform: &PlatformImage) -> Value {
    let manifest: Value = serde_json::from_slice(archive.blob(digest)).unwrap();
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    assert_eq!(
        manifest["config"]["digest"],
        platform.config_digest.as_str()
    );
    let config: Value = serde_json::from_slice(archive.blob(&platform.config_digest)).unwrap();
    assert_eq!(config["os"], platform.platform.os.as_str());
    assert_eq!(
        config["architecture"],
        platform.platform.architecture.as_str()
    );
    assert_eq!(
        strings(&config["rootfs"]["diff_ids"]),
        platform.layer_diff_ids
    );
    assert_eq!(
        config["history"].as_array().unwrap().len(),
        platform.layer_diff_ids.len()
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), platform.layer_diff_ids.len());
    for (i, layer) in layers.iter().enumerate() {
        let digest = layer["digest"].as_str().unwrap();
        assert_eq!(digest, platform.layer_digests[i]);
        let blob = archive.blob(digest);
        assert_eq!(layer["size"].as_u64().unwrap(), blob.len() as u64);
        let tar_bytes = match layer["mediaType"].as_str().unwrap() {
            "application/vnd.oci.image.layer.v1.tar+gzip" => gunzip(blob),
            "application/vnd.oci.image.layer.v1.tar" => blob.to_vec(),
            other => panic!("layer media type {other}"),
        };
        assert_eq!(sha256_digest(&tar_bytes), platform.layer_diff_ids[i]);
    }
    manifest
}

#[test]
fn oci_archive_round_trips_and_every_digest_matches() {
    let dir = tempfile::tempdir().unwrap();
    let image = oci_archive(dir.path(), "app.tar", 11, &LAYERS, "team-a/app:1.0").unwrap();
    assert_eq!(image.path, dir.path().join("app.tar"));
    assert_eq!(image.reference, "team-a/app:1.0");
    let archive = Unpacked::read(&image.path);
    assert_eq!(
        archive.json("oci-layout"),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = archive.json("index.json");
    assert_eq!(index["schemaVersion"], 2);
    let top = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(top["mediaType"], OCI_MANIFEST);
    assert_eq!(top["digest"], image.manifest_digest.as_deref().unwrap());
    assert_eq!(top["annotations"][REF_NAME], "team-a/app:1.0");
    let manifest_bytes = archive.blob(image.manifest_digest.as_deref().unwrap());
    assert_eq!(top["size"].as_u64().unwrap(), manifest_bytes.len() as u64);

    let manifest = check_oci_manifest(
        &archive,
        image.manifest_digest.as_deref().unwrap(),
        &image.platforms[0],
    );
    assert!(manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"));
    // Every blob the report names is in the archive, and nothing else is.
    let mut expected: Vec<String> = image
        .blob_digests
        .iter()
        .map(|d| oci_blob_path(d))
        .collect();
    expected.push(oci_blob_path(image.manifest_digest.as_deref().unwrap()));
    expected.sort();
    let stored: Vec<String> = archive
        .files
        .keys()
        .filter(|k| k.starts_with("blobs/"))
        .cloned()
        .collect();
    assert_eq!(stored, expected);
    assert_eq!(image.blob_digests.len(), 4, "config + 3 layers");

    // The layer holds the requested number of random bytes.
    let layer0 = gunzip(archive.blob(&image.layer_digests[0]));
    assert_eq!(
        layer_files(&layer0),
        vec![("weir/layer0.bin".to_string(), 300_000)]
    );
    // Entry order as skopeo writes an oci-archive: blobs, then index.json
    // and oci-layout at the end.
    let n = archive.order.len();
    assert_eq!(&archive.order[..2], ["blobs/", "blobs/sha256/"]);
    assert_eq!(&archive.order[n - 2..], ["index.json", "oci-layout"]);
}

#[test]
fn uncompressed_oci_layers_have_their_diff_id_as_digest() {
    let dir = tempfile::tempdir().unwrap();
    let image = oci_archive_uncompressed(dir.path(), "big.tar", 3, &LAYERS, "bench/big:1").unwrap();
    assert_eq!(image.layer_digests, image.layer_diff_ids);
    let archive = Unpacked::read(&image.path);
    let manifest = check_oci_manifest(
        &archive,
        image.manifest_digest.as_deref().unwrap(),
        &image.platforms[0],
    );
    assert!(manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar"));
}

#[test]
fn same_seed_gives_a_byte_identical_archive_and_other_seeds_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let a = oci_archive(dir.path(), "a.tar", 5, &LAYERS, "team-a/app:1.0").unwrap();
    let b = oci_archive(dir.path(), "b.tar", 5, &LAYERS, "team-a/app:1.0").unwrap();
    let c = oci_archive(dir.path(), "c.tar", 6, &LAYERS, "team-a/app:1.0").unwrap();
    assert_eq!(file_digest(&a.path), file_digest(&b.path));
    assert_eq!(a.manifest_digest, b.manifest_digest);
    assert_ne!(a.manifest_digest, c.manifest_digest);
    assert!(a
        .layer_diff_ids
        .iter()
        .all(|d| !c.layer_diff_ids.contains(d)));
    for flavor in [
        DockerFlavor::Classic,
        DockerFlavor::Skopeo,
        DockerFlavor::OciInDocker,
    ] {
        let x = docker_archive(dir.path(), "x.tar", 9, &LAYERS, "team-a/app:1.0", flavor).unwrap();
        let x_digest = file_digest(&x.path);
        let y = docker_archive(dir.path(), "y.tar", 9, &LAYERS, "team-a/app:1.0", flavor).unwrap();
        assert_eq!(x_digest, file_digest(&y.path), "{flavor:?}");
    }
    let m1 = multiarch_oci_archive(
        dir.path(),
        "m1.tar",
        2,
        &[("linux", "amd64"), ("linux", "arm64")],
        &LAYERS,
        "t/m:1",
    )
    .unwrap();
    let m2 = multiarch_oci_archive(
        dir.path(),
        "m2.tar",
        2,
        &[("linux", "amd64"), ("linux", "arm64")],
        &LAYERS,
        "t/m:1",
    )
    .unwrap();
    assert_eq!(file_digest(&m1.path), file_digest(&m2.path));
}

#[test]
fn images_from_one_seed_share_their_common_layers_across_formats() {
    let dir = tempfile::tempdir().unwrap();
    let small = oci_archive_uncompressed(dir.path(), "s.tar", 4, &LAYERS[..1], "t/s:1").unwrap();
    let big = docker_archive(
        dir.path(),
        "b.tar",
        4,
        &LAYERS,
        "t/b:1",
        DockerFlavor::Classic,
    )
    .unwrap();
    assert_eq!(small.layer_diff_ids[0], big.layer_diff_ids[0]);
    assert_eq!(small.layer_digests[0], big.layer_digests[0]);
    assert_ne!(small.config_digest, big.config_digest);
}

#[test]
fn docker_classic_archive_has_legacy_layout_and_matching_config() {
    let dir = tempfile::tempdir().unwrap();
    let options = ImageOptions {
        repeated_layers: vec![0],
        ..ImageOptions::default()
    };
    let image = docker_archive_with(
        dir.path(),
        "d.tar",
        1,
        &LAYERS,
        "team-a/app:1.0",
        DockerFlavor::Classic,
        &options,
    )
    .unwrap();
    assert_eq!(image.manifest_digest, None);
    assert_eq!(image.layer_diff_ids.len(), 4);
    assert_eq!(image.layer_diff_ids[0], image.layer_diff_ids[3]);
    let archive = Unpacked::read(&image.path);
    let manifest = archive.json("manifest.json");
    let entry = &manifest[0];
    assert_eq!(strings(&entry["RepoTags"]), vec!["team-a/app:1.0"]);
    let config_path = entry["Config"].as_str().unwrap();
    assert_eq!(
        config_path,
        format!("{}.json", hex_of(&image.config_digest))
    );
    assert_eq!(
        sha256_digest(archive.file(config_path)),
        image.config_digest
    );
    let config = archive.json(config_path);
    assert_eq!(strings(&config["rootfs"]["diff_ids"]), image.layer_diff_ids);
    let layers = strings(&entry["Layers"]);
    assert_eq!(layers.len(), 4);
    for (path, diff_id) in layers.iter().zip(&image.layer_diff_ids) {
        assert!(path.ends_with("/layer.tar"), "{path}");
        assert_eq!(&sha256_digest(archive.file(path)), diff_id);
        let id = path.trim_end_matches("/layer.tar");
        assert_eq!(archive.file(&format!("{id}/VERSION")), b"1.0");
        assert_eq!(archive.json(&format!("{id}/json"))["id"], id);
    }
    // The repeated layer is a symlink to its first copy, as docker writes it.
    assert_eq!(
        archive.links.get(&layers[3]).map(String::as_str),
        Some(format!("../{}", layers[0]).as_str())
    );
    assert_ne!(layers[0], layers[3], "a repeated layer gets its own v1 id");
    let top = layers[3].trim_end_matches("/layer.tar");
    assert_eq!(archive.json("repositories")["team-a/app"]["1.0"], top);
    assert_eq!(image.blob_digests.len(), 4, "config + 3 distinct layers");
}

#[test]
fn skopeo_flavor_stores_each_layer_once_by_diff_id_and_qualifies_repo_tags() {
    let dir = tempfile::tempdir().unwrap();
    let options = ImageOptions {
        repeated_layers: vec![1],
        ..ImageOptions::default()
    };
    let image = docker_archive_with(
        dir.path(),
        "s.tar",
        1,
        &LAYERS,
        "team-a/app:1.0",
        DockerFlavor::Skopeo,
        &options,
    )
    .unwrap();
    assert_eq!(image.reference, "docker.io/team-a/app:1.0");
    let archive = Unpacked::read(&image.path);
    let entry = &archive.json("manifest.json")[0];
    assert_eq!(
        strings(&entry["RepoTags"]),
        vec!["docker.io/team-a/app:1.0"]
    );
    let layers = strings(&entry["Layers"]);
    let expected: Vec<String> = image
        .layer_diff_ids
        .iter()
        .map(|d| format!("{}.tar", hex_of(d)))
        .collect();
    assert_eq!(layers, expected);
    assert_eq!(layers[1], layers[3]);
    for (path, diff_id) in layers.iter().zip(&image.layer_diff_ids) {
        assert_eq!(&sha256_digest(archive.file(path)), diff_id);
    }
    // Stored once; the legacy directories point at it through symlinks.
    let tars = archive.files.keys().filter(|k| k.ends_with(".tar")).count();
    assert_eq!(tars, 3);
    assert_eq!(archive.links.len(), 4);
    for (link, target) in &archive.links {
        assert!(link.ends_with("/layer.tar"));
        assert!(layers.contains(&target.trim_start_matches("../").to_string()));
    }
    let config_path = entry["Config"].as_str().unwrap();
    assert_eq!(
        sha256_digest(archive.file(config_path)),
        image.config_digest
    );
    assert!(archive.json("repositories")["docker.io/team-a/app"]["1.0"].is_string());
}

#[test]
fn oci_in_docker_flavor_is_both_an_oci_layout_and_a_docker_archive() {
    let dir = tempfile::tempdir().unwrap();
    let image = docker_archive(
        dir.path(),
        "o.tar",
        1,
        &LAYERS,
        "team-a/app:1.0",
        DockerFlavor::OciInDocker,
    )
    .unwrap();
    let archive = Unpacked::read(&image.path);
    let entry = &archive.json("manifest.json")[0];
    assert_eq!(strings(&entry["RepoTags"]), vec!["team-a/app:1.0"]);
    assert_eq!(entry["Config"], oci_blob_path(&image.config_digest));
    let layers = strings(&entry["Layers"]);
    for (path, diff_id) in layers.iter().zip(&image.layer_diff_ids) {
        assert_eq!(path, &oci_blob_path(diff_id));
        assert_eq!(&sha256_digest(archive.file(path)), diff_id);
    }
    let index = archive.json("index.json");
    let top = &index["manifests"][0];
    assert_eq!(top["digest"], image.manifest_digest.as_deref().unwrap());
    assert_eq!(top["annotations"][REF_NAME], "1.0");
    assert_eq!(
        top["annotations"][CONTAINERD_NAME],
        "docker.io/team-a/app:1.0"
    );
    check_oci_manifest(
        &archive,
        image.manifest_digest.as_deref().unwrap(),
        &image.platforms[0],
    );
}

#[test]
fn multiarch_archive_has_an_index_of_platform_manifests_sharing_layer_zero() {
    let dir = tempfile::tempdir().unwrap();
    let platforms = [
        ("linux", "amd64"),
        ("linux", "arm64/v8"),
        ("linux", "s390x"),
    ];
    let image = multiarch_oci_archive(
        dir.path(),
        "m.tar",
        8,
        &platforms,
        &LAYERS,
        "team-a/multi:2",
    )
    .unwrap();
    assert_eq!(image.manifest_media_type.as_deref(), Some(OCI_INDEX));
    assert_eq!(image.children.len(), 3);
    let archive = Unpacked::read(&image.path);
    let top = &archive.json("index.json")["manifests"][0];
    assert_eq!(top["mediaType"], OCI_INDEX);
    assert_eq!(top["digest"], image.manifest_digest.as_deref().unwrap());
    assert_eq!(top["annotations"][REF_NAME], "team-a/multi:2");
    let index: Value =
        serde_json::from_slice(archive.blob(image.manifest_digest.as_deref().unwrap())).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    for ((entry, child), platform) in entries.iter().zip(&image.children).zip(&image.platforms) {
        assert_eq!(entry["digest"], child.as_str());
        assert_eq!(platform.manifest_digest.as_deref(), Some(child.as_str()));
        assert_eq!(entry["platform"]["os"], "linux");
        assert_eq!(
            entry["platform"]["architecture"],
            platform.platform.architecture.as_str()
        );
        check_oci_manifest(&archive, child, platform);
    }
    assert_eq!(entries[1]["platform"]["variant"], "v8");
    let shared = &image.platforms[0].layer_digests[0];
    assert!(image
        .platforms
        .iter()
        .all(|p| &p.layer_digests[0] == shared));
    assert_ne!(
        image.platforms[0].layer_digests[2],
        image.platforms[1].layer_digests[2]
    );
    // 3 configs + 1 shared layer + 2 platform layers each.
    assert_eq!(image.blob_digests.len(), 3 + 1 + 3 * 2);
}

#[test]
fn tag_only_ref_name_adds_the_containerd_name() {
    let dir = tempfile::tempdir().unwrap();
    let options = ImageOptions {
        ref_name: RefName::TagOnly,
        ..ImageOptions::default()
    };
    let image =
        oci_archive_with(dir.path(), "t.tar", 1, &LAYERS[..1], "alpine:3", &options).unwrap();
    let archive = Unpacked::read(&image.path);
    let annotations = &archive.json("index.json")["manifests"][0]["annotations"];
    assert_eq!(annotations[REF_NAME], "3");
    assert_eq!(annotations[CONTAINERD_NAME], "docker.io/library/alpine:3");
}

#[test]
fn layout_dir_holds_the_same_files_as_the_archive() {
    let dir = tempfile::tempdir().unwrap();
    let archived = oci_archive(dir.path(), "a.tar", 21, &LAYERS, "team-a/app:1.0").unwrap();
    let layout = oci_layout_dir(dir.path(), "layout", 21, &LAYERS, "team-a/app:1.0").unwrap();
    assert_eq!(layout.manifest_digest, archived.manifest_digest);
    let archive = Unpacked::read(&archived.path);
    for (path, bytes) in &archive.files {
        assert_eq!(
            &std::fs::read(layout.path.join(path)).unwrap(),
            bytes,
            "{path}"
        );
    }
    let on_disk = std::fs::read_dir(layout.path.join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(on_disk, archived.blob_digests.len() + 1);
    // Nothing but the finished outputs is left in the directory.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["a.tar", "layout"]);
}

#[test]
fn large_layers_are_split_into_parts_and_stream() {
    // 1 GiB + 1 byte: two files in the layer tar; also checks the archive
    // header rewritten after streaming carries the right size.
    let dir = tempfile::tempdir().unwrap();
    let size = (1u64 << 30) + 1;
    let image =
        oci_archive_uncompressed(dir.path(), "big.tar", 1, &[LayerSpec { size }], "b/big:1")
            .unwrap();
    let mut archive = tar::Archive::new(std::fs::File::open(&image.path).unwrap());
    let layer_path = oci_blob_path(&image.layer_digests[0]);
    let mut found = false;
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().to_string_lossy() == layer_path {
            let mut inner = tar::Archive::new(entry);
            let parts: Vec<(String, u64)> = inner
                .entries()
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.header().entry_type() == tar::EntryType::Regular)
                .map(|e| (e.path().unwrap().display().to_string(), e.size()))
                .collect();
            assert_eq!(
                parts,
                vec![
                    ("weir/layer0.part0.bin".to_string(), 1 << 30),
                    ("weir/layer0.part1.bin".to_string(), 1)
                ]
            );
            found = true;
        }
    }
    assert!(found);
}

#[test]
fn bad_arguments_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let options = ImageOptions {
        repeated_layers: vec![5],
        ..ImageOptions::default()
    };
    let err = oci_archive_with(dir.path(), "x.tar", 1, &LAYERS, "t/x:1", &options).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(oci_archive(dir.path(), "y.tar", 1, &LAYERS, "t/x").is_err());
    assert!(multiarch_oci_archive(dir.path(), "z.tar", 1, &[], &LAYERS, "t/x:1").is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// --- skopeo, when installed ----------------------------------------------

fn skopeo() -> Option<&'static str> {
    let found = Command::new("skopeo").arg("--version").output().is_ok();
    if !found {
        eprintln!("skopeo not installed (apt-get install skopeo): skipping skopeo checks");
    }
    found.then_some("skopeo")
}

fn skopeo_inspect(args: &[&str]) -> Value {
    serde_json::from_slice(&skopeo_inspect_bytes(args)).unwrap()
}

fn skopeo_inspect_bytes(args: &[&str]) -> Vec<u8> {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .arg("inspect")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `skopeo copy SRC dir:OUT` reads and digests every blob it copies.
fn skopeo_copy_reads_every_blob(spec: &str, out: &Path) {
    let status = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--all", spec])
        .arg(format!("dir:{}", out.display()))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "skopeo copy {spec}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

#[test]
fn skopeo_accepts_every_format() {
    let Some(_) = skopeo() else { return };
    let dir = tempfile::tempdir().unwrap();

    let oci = oci_archive(dir.path(), "oci.tar", 1, &LAYERS, "team-a/app:1.0").unwrap();
    let spec = format!("oci-archive:{}", oci.path.display());
    let raw = skopeo_inspect_bytes(&["--raw", &spec]);
    assert_eq!(
        &sha256_digest(&raw),
        oci.manifest_digest.as_deref().unwrap()
    );
    let info = skopeo_inspect(&[&spec]);
    assert_eq!(info["Digest"], oci.manifest_digest.as_deref().unwrap());
    assert_eq!(strings(&info["Layers"]), oci.layer_digests);
    // Full-reference annotation: selectable by name too.
    let named = format!("oci-archive:{}:team-a/app:1.0", oci.path.display());
    assert_eq!(
        skopeo_inspect(&[&named])["Digest"],
        oci.manifest_digest.as_deref().unwrap()
    );

    let tag_only = ImageOptions {
        ref_name: RefName::TagOnly,
        ..ImageOptions::default()
    };
    let tagged = oci_archive_with(
        dir.path(),
        "tag.tar",
        1,
        &LAYERS,
        "team-a/app:1.0",
        &tag_only,
    )
    .unwrap();
    let named = format!("oci-archive:{}:1.0", tagged.path.display());
    assert_eq!(
        skopeo_inspect(&[&named])["Digest"],
        tagged.manifest_digest.as_deref().unwrap()
    );

    let layout = oci_layout_dir(dir.path(), "layout", 1, &LAYERS, "team-a/app:1.0").unwrap();
    let spec = format!("oci:{}", layout.path.display());
    assert_eq!(
        skopeo_inspect(&[&spec])["Digest"],
        layout.manifest_digest.as_deref().unwrap()
    );

    let multi = multiarch_oci_archive(
        dir.path(),
        "multi.tar",
        1,
        &[("linux", "amd64"), ("linux", "arm64")],
        &LAYERS,
        "team-a/multi:1",
    )
    .unwrap();
    let spec = format!("oci-archive:{}", multi.path.display());
    let raw = skopeo_inspect_bytes(&["--raw", &spec]);
    assert_eq!(
        &sha256_digest(&raw),
        multi.manifest_digest.as_deref().unwrap()
    );
    let arm = skopeo_inspect(&["--override-arch", "arm64", &spec]);
    // skopeo reports the index digest and the arm64 child's layers.
    assert_eq!(arm["Digest"], multi.manifest_digest.as_deref().unwrap());
    assert_eq!(arm["Architecture"], "arm64");
    assert_eq!(strings(&arm["Layers"]), multi.platforms[1].layer_digests);

    for flavor in [
        DockerFlavor::Classic,
        DockerFlavor::Skopeo,
        DockerFlavor::OciInDocker,
    ] {
        let options = ImageOptions {
            repeated_layers: vec![0],
            ..ImageOptions::default()
        };
        let image = docker_archive_with(
            dir.path(),
            "docker.tar",
            1,
            &LAYERS,
            "team-a/app:1.0",
            flavor,
            &options,
        )
        .unwrap();
        let spec = format!("docker-archive:{}", image.path.display());
        let raw = skopeo_inspect(&["--raw", &spec]);
        assert_eq!(
            raw["config"]["digest"],
            image.config_digest.as_str(),
            "{flavor:?}"
        );
        let info = skopeo_inspect(&[&spec]);
        assert_eq!(strings(&info["Layers"]), image.layer_diff_ids, "{flavor:?}");
        skopeo_copy_reads_every_blob(&spec, &dir.path().join(format!("{flavor:?}")));
    }
    for image in [&oci, &tagged, &multi] {
        let spec = format!("oci-archive:{}", image.path.display());
        let name = image
            .path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        skopeo_copy_reads_every_blob(&spec, &dir.path().join(format!("{name}.dir")));
    }
}
