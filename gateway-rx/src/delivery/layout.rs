//! Export into an OCI image layout directory (when there is no registry).
//!
//! Blobs (layers, configs, manifests) go in first, each under a temporary
//! name and renamed; index.json is replaced last by rename. A reader sees
//! the image either not at all or whole.

use serde_json::{json, Value};
use std::fs::File;
use std::path::{Path, PathBuf};
use weir_proto::{Attachment, ManifestBytes, ObjectId, Referrer, TransferManifest};

use super::DeliveryError;
use crate::blobs::BlobStore;
use weir_host::durable::{fsync_dir, write_atomically};

/// The annotation that names an image in index.json.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory.
pub struct LayoutExporter {
    dir: PathBuf,
}

impl LayoutExporter {
    pub fn new(dir: &Path) -> LayoutExporter {
        LayoutExporter {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs").join("sha256")
    }

    fn local(&self, what: &str, path: &Path, e: impl std::fmt::Display) -> DeliveryError {
        DeliveryError::local(format!(
            "oci layout {}: {what} {}: {e}",
            self.dir.display(),
            path.display()
        ))
    }

    /// Writes the image's blobs and manifests, then lists it in index.json
    /// under `repository:tag` for every tag (by digest alone when untagged).
    pub fn export(
        &self,
        manifest: &TransferManifest,
        repository: &str,
        tags: &[String],
        store: &BlobStore,
    ) -> Result<(), DeliveryError> {
        let blobs_dir = self.blobs_dir();
        std::fs::create_dir_all(&blobs_dir).map_err(|e| self.local("creating", &blobs_dir, e))?;
        self.write_layout_marker()?;
        for blob in &manifest.blobs {
            let id = ObjectId::from_digest(&blob.digest)
                .map_err(|e| DeliveryError::local(format!("manifest names {e}")))?;
            self.place_blob(&id, blob.size, store)?;
        }
        for m in manifest
            .children
            .iter()
            .chain(std::iter::once(&manifest.manifest))
        {
            self.place_manifest(m)?;
        }
        for r in &manifest.referrers {
            self.place_manifest(&r.manifest)?;
        }
        fsync_dir(&blobs_dir).map_err(|e| self.local("fsync", &blobs_dir, e))?;
        self.update_index(&manifest.manifest, repository, tags, &manifest.referrers)
    }

    fn write_layout_marker(&self) -> Result<(), DeliveryError> {
        let path = self.dir.join("oci-layout");
        if path.is_file() {
            return Ok(());
        }
        write_atomically(&path, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(|e| self.local("writing", &path, e))
    }

    /// Hard-links the verified blob in (no copy, same bytes), or copies it
    /// when the layout is on another file system.
    fn place_blob(&self, id: &ObjectId, size: u64, store: &BlobStore) -> Result<(), DeliveryError> {
        let dest = self.blobs_dir().join(id.hex());
        if std::fs::metadata(&dest)
            .map(|m| m.len() == size)
            .unwrap_or(false)
        {
            return Ok(());
        }
        let src = store.path_of(id);
        let have = store
            .len_of(id)
            .map_err(|e| DeliveryError::local(format!("blob {}: {e}", id.digest())))?;
        if have != size {
            return Err(DeliveryError::local(format!(
                "blob {} is {have} bytes in the blob store, the manifest says {size}",
                id.digest()
            )));
        }
        let tmp = self.blobs_dir().join(format!(".{}.tmp", id.hex()));
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(&src, &tmp).is_err() {
            std::fs::copy(&src, &tmp).map_err(|e| self.local("copying to", &tmp, e))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| self.local("fsync", &tmp, e))?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| self.local("renaming to", &dest, e))
    }

    fn place_manifest(&self, m: &ManifestBytes) -> Result<(), DeliveryError> {
        let id = ObjectId::from_digest(&m.digest)
            .map_err(|e| DeliveryError::local(format!("manifest digest: {e}")))?;
        if ObjectId::of_bytes(&m.bytes) != id {
            return Err(DeliveryError::local(format!(
                "manifest bytes do not hash to {}",
                m.digest
            )));
        }
        let dest = self.blobs_dir().join(id.hex());
        if dest.is_file() {
            return Ok(());
        }
        write_atomically(&dest, &m.bytes).map_err(|e| self.local("writing", &dest, e))
    }

    /// Lists the image under its names, then its referrers: a cosign tag
    /// as `repository:sha256-<hex>.sig`, an OCI referrer by digest with its
    /// artifact type and annotations (each listed once).
    fn update_index(
        &self,
        m: &ManifestBytes,
        repository: &str,
        tags: &[String],
        referrers: &[Referrer],
    ) -> Result<(), DeliveryError> {
        let path = self.dir.join("index.json");
        let mut index: Value = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| self.local("parsing", &path, e))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [],
            }),
            Err(e) => return Err(self.local("reading", &path, e)),
        };
        let names: Vec<Option<String>> = if tags.is_empty() {
            vec![None]
        } else {
            tags.iter()
                .map(|t| Some(format!("{repository}:{t}")))
                .collect()
        };
        let manifests = index
            .get_mut("manifests")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| self.local("reading", &path, "no \"manifests\" array"))?;
        for name in names {
            // A tag names one image: a newer image with the same tag replaces it.
            manifests.retain(|entry| {
                let entry_name = entry
                    .pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1")))
                    .and_then(Value::as_str);
                match &name {
                    Some(n) => entry_name != Some(n.as_str()),
                    None => {
                        !(entry_name.is_none()
                            && entry.get("digest").and_then(Value::as_str)
                                == Some(m.digest.as_str()))
                    }
                }
            });
            let mut entry = json!({
                "mediaType": m.media_type,
                "digest": m.digest,
                "size": m.bytes.len(),
            });
            if let Some(n) = name {
                entry["annotations"] = json!({ REF_NAME: n });
            }
            manifests.push(entry);
        }
        for r in referrers {
            let entry = match &r.attachment {
                Attachment::Tag(tag) => {
                    let name = format!("{repository}:{tag}");
                    manifests.retain(|e| {
                        e.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1")))
                            .and_then(Value::as_str)
                            != Some(name.as_str())
                    });
                    json!({
                        "mediaType": r.manifest.media_type,
                        "digest": r.manifest.digest,
                        "size": r.manifest.bytes.len(),
                        "annotations": { REF_NAME: name },
                    })
                }
                Attachment::Subject => {
                    let listed = manifests.iter().any(|e| {
                        e.get("digest").and_then(Value::as_str) == Some(r.manifest.digest.as_str())
                            && e.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1")))
                                .is_none()
                    });
                    if listed {
                        continue;
                    }
                    let mut entry = r
                        .list_entry()
                        .map_err(|e| DeliveryError::local(e.to_string()))?;
                    // In a layout's index a ref name is what tools resolve a
                    // name to. A referrer's own annotations come from the
                    // sender, and only names built from a checked repository
                    // and tag may appear: a referrer never names itself.
                    if let Some(a) = entry.get_mut("annotations").and_then(Value::as_object_mut) {
                        a.remove(REF_NAME);
                        if a.is_empty() {
                            if let Some(e) = entry.as_object_mut() {
                                e.remove("annotations");
                            }
                        }
                    }
                    entry
                }
            };
            manifests.push(entry);
        }
        let bytes =
            serde_json::to_vec_pretty(&index).map_err(|e| self.local("encoding", &path, e))?;
        write_atomically(&path, &bytes).map_err(|e| self.local("writing", &path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::tests::sample_image;

    #[test]
    fn exported_layout_is_readable_and_blobs_hash_to_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let (tm, _) = sample_image(&store, "team/app", &["1.0", "latest"], 3, 1000);
        let out = dir.path().join("out");
        let exporter = LayoutExporter::new(&out);
        exporter
            .export(&tm, "mirror/app", &tm.destination.tags, &store)
            .unwrap();

        let layout: Value =
            serde_json::from_slice(&std::fs::read(out.join("oci-layout")).unwrap()).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        let entries = index["manifests"].as_array().unwrap();
        let names: Vec<&str> = entries
            .iter()
            .map(|e| e["annotations"][REF_NAME].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["mirror/app:1.0", "mirror/app:latest"]);
        for e in entries {
            assert_eq!(e["digest"], tm.manifest.digest);
            assert_eq!(e["mediaType"], tm.manifest.media_type);
        }
        // Every file in blobs/sha256 hashes to its name; every blob is there.
        let mut count = 0;
        for entry in std::fs::read_dir(out.join("blobs/sha256")).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let bytes = std::fs::read(entry.path()).unwrap();
            assert_eq!(ObjectId::of_bytes(&bytes).hex(), name);
            count += 1;
        }
        assert_eq!(count, tm.blobs.len() + 1);
    }

    #[test]
    fn referrers_are_listed_beside_their_image_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let (mut tm, _) = sample_image(&store, "team/app", &["1.0"], 1, 100);
        let subject = tm.manifest.digest.clone();
        let manifest = |body: String| {
            let bytes = body.into_bytes();
            ManifestBytes {
                digest: ObjectId::of_bytes(&bytes).digest(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes,
            }
        };
        let tag = weir_proto::referrers::cosign_tag(&subject, "sig").unwrap();
        tm.referrers = vec![
            Referrer {
                subject: subject.clone(),
                attachment: Attachment::Tag(tag.clone()),
                manifest: manifest(r#"{"layers":[]}"#.into()),
            },
            Referrer {
                subject: subject.clone(),
                attachment: Attachment::Subject,
                manifest: manifest(format!(
                    r#"{{"artifactType":"application/spdx+json","subject":{{"digest":"{subject}","size":1}}}}"#
                )),
            },
        ];
        let out = dir.path().join("out");
        let exporter = LayoutExporter::new(&out);
        for _ in 0..2 {
            exporter
                .export(&tm, "mirror/app", &tm.destination.tags, &store)
                .unwrap();
        }
        let index: Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        let entries = index["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 3, "{index}");
        let sig = entries
            .iter()
            .find(|e| e["annotations"][REF_NAME] == format!("mirror/app:{tag}").as_str())
            .expect("the cosign tag is named");
        assert_eq!(sig["digest"], tm.referrers[0].manifest.digest);
        let sbom = entries
            .iter()
            .find(|e| e["digest"] == tm.referrers[1].manifest.digest.as_str())
            .expect("the OCI referrer is listed");
        assert_eq!(sbom["artifactType"], "application/spdx+json");
        for r in &tm.referrers {
            let id = ObjectId::from_digest(&r.manifest.digest).unwrap();
            assert_eq!(
                std::fs::read(out.join("blobs/sha256").join(id.hex())).unwrap(),
                r.manifest.bytes
            );
        }
    }

    #[test]
    fn a_referrer_cannot_name_itself_in_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let (mut tm, _) = sample_image(&store, "team/app", &["1.0"], 1, 100);
        let subject = tm.manifest.digest.clone();
        let bytes = format!(
            r#"{{"subject":{{"digest":"{subject}","size":1}},"annotations":{{"{REF_NAME}":"prod/app:latest","note":"kept"}}}}"#
        )
        .into_bytes();
        tm.referrers = vec![Referrer {
            subject: subject.clone(),
            attachment: Attachment::Subject,
            manifest: ManifestBytes {
                digest: ObjectId::of_bytes(&bytes).digest(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes,
            },
        }];
        tm.check_referrers().unwrap();
        let out = dir.path().join("out");
        LayoutExporter::new(&out)
            .export(&tm, "mirror/app", &tm.destination.tags, &store)
            .unwrap();
        let index: Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        let entries = index["manifests"].as_array().unwrap();
        let names: Vec<&str> = entries
            .iter()
            .filter_map(|e| e["annotations"][REF_NAME].as_str())
            .collect();
        assert_eq!(names, ["mirror/app:1.0"], "{index}");
        let listed = entries
            .iter()
            .find(|e| e["digest"] == tm.referrers[0].manifest.digest.as_str())
            .expect("the referrer is still listed");
        assert_eq!(listed["annotations"]["note"], "kept");
    }

    #[test]
    fn a_newer_image_with_the_same_tag_replaces_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let out = dir.path().join("out");
        let exporter = LayoutExporter::new(&out);
        let (a, _) = sample_image(&store, "team/app", &["1.0"], 1, 100);
        let (b, _) = sample_image(&store, "team/app", &["1.0"], 2, 100);
        let (c, _) = sample_image(&store, "team/other", &["1.0"], 1, 50);
        exporter
            .export(&a, "team/app", &a.destination.tags, &store)
            .unwrap();
        exporter
            .export(&c, "team/other", &c.destination.tags, &store)
            .unwrap();
        exporter
            .export(&b, "team/app", &b.destination.tags, &store)
            .unwrap();
        let index: Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        let entries: Vec<(String, String)> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["annotations"][REF_NAME].as_str().unwrap().to_string(),
                    e["digest"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                ("team/other:1.0".to_string(), c.manifest.digest.clone()),
                ("team/app:1.0".to_string(), b.manifest.digest.clone()),
            ]
        );
    }

    #[test]
    fn a_missing_blob_is_an_error_and_index_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let (tm, layer_ids) = sample_image(&store, "team/app", &["1.0"], 2, 100);
        std::fs::remove_file(store.path_of(&layer_ids[1])).unwrap();
        let out = dir.path().join("out");
        let err = LayoutExporter::new(&out)
            .export(&tm, "team/app", &tm.destination.tags, &store)
            .unwrap_err();
        assert!(
            err.message.contains(&layer_ids[1].digest()),
            "{}",
            err.message
        );
        assert!(!out.join("index.json").exists());
    }
}
