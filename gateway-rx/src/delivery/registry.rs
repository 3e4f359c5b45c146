//! Pushing an image to the destination registry with oci-client.
//!
//! Blobs the registry lacks are streamed from the blob store in one PUT each
//! (monolithic push: never a whole layer in memory); manifests go up as the
//! exact bytes that crossed, so the digest is the source's; children of an
//! index go first, then the index, then each tag.

use bytes::{Bytes, BytesMut};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use weir_proto::referrers::fallback_tag;
use weir_proto::{BlobRef, ManifestBytes, ObjectId, Referrer};

use super::{DeliveryError, FailureKind};
use crate::blobs::BlobStore;
use crate::config::{RegistryCredentials, RegistryEndpoint};

/// Bytes read from a blob file per chunk of the upload stream.
const STREAM_CHUNK: usize = 256 << 10;

/// A configured destination registry.
pub struct RegistryPusher {
    client: Client,
    host: String,
    auth: RegistryAuth,
}

impl RegistryPusher {
    pub fn new(
        endpoint: &RegistryEndpoint,
        credentials: Option<&RegistryCredentials>,
        ca_file: Option<&Path>,
    ) -> Result<RegistryPusher, DeliveryError> {
        let mut extra_root_certificates = Vec::new();
        if let Some(ca) = ca_file {
            let data = std::fs::read(ca).map_err(|e| {
                DeliveryError::local(format!("delivery.ca_file {}: {e}", ca.display()))
            })?;
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: if endpoint.insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            use_monolithic_push: true,
            extra_root_certificates,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            // Covers the registry's own hashing of a large blob after the PUT.
            read_timeout: Some(Duration::from_secs(300)),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config)
            .map_err(|e| DeliveryError::local(format!("registry client: {e}")))?;
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        Ok(RegistryPusher {
            client,
            host: endpoint.host.clone(),
            auth,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn by_digest(&self, repository: &str, digest: &str) -> Reference {
        Reference::with_digest(
            self.host.clone(),
            repository.to_string(),
            digest.to_string(),
        )
    }

    fn by_tag(&self, repository: &str, tag: &str) -> Reference {
        Reference::with_tag(self.host.clone(), repository.to_string(), tag.to_string())
    }

    async fn prepare(&self) {
        self.client
            .store_auth_if_needed(&self.host, &self.auth)
            .await;
    }

    /// Uploads the blob unless the repository has it already; returns whether
    /// it was uploaded.
    pub async fn ensure_blob(
        &self,
        repository: &str,
        blob: &BlobRef,
        store: &BlobStore,
    ) -> Result<bool, DeliveryError> {
        self.prepare().await;
        let reference = self.by_digest(repository, &blob.digest);
        if self
            .client
            .blob_exists(&reference, &blob.digest)
            .await
            .map_err(|e| classify(&format!("checking blob {}", blob.digest), e))?
        {
            return Ok(false);
        }
        let id = ObjectId::from_digest(&blob.digest)
            .map_err(|e| DeliveryError::local(format!("manifest names {e}")))?;
        let path = store.path_of(&id);
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            DeliveryError::local(format!("blob {} ({}): {e}", blob.digest, path.display()))
        })?;
        let len = file
            .metadata()
            .await
            .map_err(|e| DeliveryError::local(format!("blob {}: {e}", path.display())))?
            .len();
        if len != blob.size {
            return Err(DeliveryError::local(format!(
                "blob {} is {len} bytes in the blob store, the manifest says {}",
                blob.digest, blob.size
            )));
        }
        self.client
            .push_blob_stream(&reference, file_stream(file), &blob.digest, Some(len))
            .await
            .map_err(|e| classify(&format!("uploading blob {}", blob.digest), e))?;
        Ok(true)
    }

    /// Puts manifest bytes as they are, addressed by their digest.
    pub async fn put_manifest(
        &self,
        repository: &str,
        manifest: &ManifestBytes,
    ) -> Result<(), DeliveryError> {
        self.prepare().await;
        let reference = self.by_digest(repository, &manifest.digest);
        self.put(&reference, manifest).await
    }

    /// Points `tag` at the manifest (the same bytes, so the same digest).
    pub async fn put_tag(
        &self,
        repository: &str,
        tag: &str,
        manifest: &ManifestBytes,
    ) -> Result<(), DeliveryError> {
        self.prepare().await;
        let reference = self.by_tag(repository, tag);
        self.put(&reference, manifest).await
    }

    async fn put(
        &self,
        reference: &Reference,
        manifest: &ManifestBytes,
    ) -> Result<(), DeliveryError> {
        let content_type = manifest.media_type.parse().map_err(|_| {
            DeliveryError::local(format!(
                "manifest {} has an unusable media type {:?}",
                manifest.digest, manifest.media_type
            ))
        })?;
        self.client
            .push_manifest_raw(reference, Bytes::from(manifest.bytes.clone()), content_type)
            .await
            .map_err(|e| {
                classify(
                    &format!("putting manifest {} as {reference}", manifest.digest),
                    e,
                )
            })?;
        Ok(())
    }

    /// Whether `tag` already names `digest` (a push that a crash interrupted
    /// may have set it); any doubt answers false, and the tag is put again.
    pub async fn tag_points_at(&self, repository: &str, tag: &str, digest: &str) -> bool {
        self.prepare().await;
        let reference = self.by_tag(repository, tag);
        matches!(
            self.client.fetch_manifest_digest(&reference, &self.auth).await,
            Ok(d) if d == digest
        )
    }
}

/// How a referrer came to be listed for its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferrerListing {
    /// The registry's referrers API (or an earlier delivery) lists it.
    Listed,
    /// The registry lacks the API: the `sha256-<hex>` tag's index now
    /// lists it, as the distribution spec's fallback says.
    FallbackTag,
}

impl RegistryPusher {
    /// Makes sure a referrer pushed by digest is listed for its subject:
    /// through the referrers API where the registry has one, otherwise by
    /// adding it to the index under the referrers tag (created when absent,
    /// never listing a manifest twice).
    pub async fn ensure_referrer_listed(
        &self,
        repository: &str,
        referrer: &Referrer,
    ) -> Result<ReferrerListing, DeliveryError> {
        self.prepare().await;
        let subject = self.by_digest(repository, &referrer.subject);
        let what = format!("referrers of {repository}@{}", referrer.subject);
        // A 404 from the API makes the client read the fallback tag
        // instead; either way a listed referrer is done.
        let listed = self
            .client
            .pull_referrers(&subject, None)
            .await
            .map_err(|e| classify(&format!("reading {what}"), e))?;
        if listed
            .manifests
            .iter()
            .any(|m| m.digest == referrer.manifest.digest)
        {
            return Ok(ReferrerListing::Listed);
        }
        let tag = fallback_tag(&referrer.subject).ok_or_else(|| {
            DeliveryError::local(format!(
                "referrer subject {:?} is not a digest",
                referrer.subject
            ))
        })?;
        let fallback = self.by_tag(repository, &tag);
        let mut index: Value = match self
            .client
            .pull_manifest_raw(&fallback, &self.auth, &[MT_OCI_INDEX])
            .await
        {
            Ok((bytes, _)) => serde_json::from_slice(&bytes).map_err(|e| DeliveryError {
                kind: FailureKind::Refused,
                message: format!("{repository}:{tag} is not a referrers index: {e}"),
            })?,
            Err(e) if is_not_found(&e) => json!({
                "schemaVersion": 2,
                "mediaType": MT_OCI_INDEX,
                "manifests": [],
            }),
            Err(e) => return Err(classify(&format!("reading {repository}:{tag}"), e)),
        };
        let entry = referrer
            .list_entry()
            .map_err(|e| DeliveryError::local(e.to_string()))?;
        let manifests = index
            .get_mut("manifests")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| DeliveryError {
                kind: FailureKind::Refused,
                message: format!(
                    "{repository}:{tag} holds a manifest, not a referrers index; {} is not listed",
                    referrer.manifest.digest
                ),
            })?;
        let digest = referrer.manifest.digest.as_str();
        if !manifests
            .iter()
            .any(|m| m.get("digest").and_then(Value::as_str) == Some(digest))
        {
            manifests.push(entry);
        }
        let bytes = serde_json::to_vec(&index)
            .map_err(|e| DeliveryError::local(format!("encoding {tag}: {e}")))?;
        let content_type = MT_OCI_INDEX
            .parse()
            .map_err(|_| DeliveryError::local("index media type"))?;
        self.client
            .push_manifest_raw(&fallback, Bytes::from(bytes), content_type)
            .await
            .map_err(|e| classify(&format!("putting {repository}:{tag}"), e))?;
        Ok(ReferrerListing::FallbackTag)
    }
}

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::ServerError { code: 404, .. } => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|err| {
            matches!(
                err.code,
                oci_client::errors::OciErrorCode::ManifestUnknown
                    | oci_client::errors::OciErrorCode::NameUnknown
            )
        }),
        _ => false,
    }
}

/// The file as a stream of chunks, read as the upload goes.
fn file_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<Bytes, OciDistributionError>> + Send + 'static {
    futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buf = BytesMut::with_capacity(STREAM_CHUNK);
        while buf.len() < STREAM_CHUNK {
            let n = file.read_buf(&mut buf).await?;
            if n == 0 {
                break;
            }
        }
        if buf.is_empty() {
            Ok(None)
        } else {
            Ok(Some((buf.freeze(), file)))
        }
    })
}

/// Sorts a registry error into "try again soon" (down, timeout, 5xx, 429)
/// or "someone must act" (other 4xx), keeping the registry's reason.
fn classify(what: &str, e: OciDistributionError) -> DeliveryError {
    let kind = match &e {
        OciDistributionError::RequestError(re) => match re.status() {
            Some(s) => status_kind(s.as_u16()),
            None => FailureKind::Unavailable,
        },
        OciDistributionError::ServerError { code, .. } => status_kind(*code),
        OciDistributionError::RegistryError { envelope, .. } => {
            let busy = envelope
                .errors
                .iter()
                .any(|err| matches!(err.code, oci_client::errors::OciErrorCode::Toomanyrequests));
            if busy {
                FailureKind::Unavailable
            } else {
                FailureKind::Refused
            }
        }
        OciDistributionError::IoError(_) => FailureKind::Unavailable,
        _ => FailureKind::Refused,
    };
    DeliveryError {
        kind,
        message: format!("{what}: {e}"),
    }
}

fn status_kind(code: u16) -> FailureKind {
    match code {
        408 | 429 => FailureKind::Unavailable,
        400..=499 => FailureKind::Refused,
        _ => FailureKind::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_sort_into_retry_schedules() {
        assert_eq!(status_kind(503), FailureKind::Unavailable);
        assert_eq!(status_kind(500), FailureKind::Unavailable);
        assert_eq!(status_kind(429), FailureKind::Unavailable);
        assert_eq!(status_kind(401), FailureKind::Refused);
        assert_eq!(status_kind(403), FailureKind::Refused);
        assert_eq!(status_kind(413), FailureKind::Refused);
    }
}
