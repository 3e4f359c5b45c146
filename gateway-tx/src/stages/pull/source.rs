//! The source registries pull mode reads: the distribution API's tag list,
//! manifests and blobs, over https (or http where `plain_http` says so).
//!
//! Polite to the source: per registry at most `max_concurrent` requests in
//! flight and `requests_per_second` started; `429` waits out `Retry-After`,
//! `5xx` and timeouts back off and retry a few times before the error is
//! returned. Credentials: basic (`username` + `password_file`) or a bearer
//! token (`token_file`); a `401` with a `Bearer` challenge is answered at
//! its realm with the basic credentials, as registries expect.

use crate::config::RegistryConfig;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use weir_host::Shutdown;

/// Largest manifest or index fetched.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Largest tag list page, and largest Quay security report.
pub const MAX_DOCUMENT_BYTES: usize = 8 << 20;
/// Media types asked for when fetching a manifest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Why a request to a source registry failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// 401/403: wrong or missing credentials; the registry's own message.
    #[error("{host}: access refused: {message}")]
    Unauthorized { host: String, message: String },
    /// 404 on a repository, tag, manifest or blob.
    #[error("{host}: not found: {what}")]
    NotFound { host: String, what: String },
    /// Down, overloaded (5xx, 429 after retries), timed out, connection
    /// refused or cut mid-body: try again later.
    #[error("{host}: unavailable: {message}")]
    Unavailable {
        host: String,
        message: String,
        /// What the registry asked for, when it said (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// An answer that breaks the API or our bounds (too large, not JSON,
    /// a manifest whose bytes do not hash to the digest asked for).
    #[error("{host}: {message}")]
    Protocol { host: String, message: String },
    /// A TLS or credential file that cannot be used.
    #[error("registry {host}: {message}")]
    Setup { host: String, message: String },
    /// Writing the fetched bytes failed on our side (disk full...).
    #[error("storing what {host} sent: {source}")]
    Write {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted by shutdown")]
    Cancelled,
}

/// A manifest or index as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedManifest {
    /// `sha256:` of `bytes`, checked against the digest asked for (when a
    /// digest was asked for) and against `Docker-Content-Digest` when the
    /// registry sends one.
    pub digest: String,
    /// The response's `Content-Type` (or the document's `mediaType`).
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// Every source registry, by host.
pub struct SourceRegistries {
    registries: std::sync::Mutex<std::collections::HashMap<String, Arc<SourceRegistry>>>,
    configs: Vec<RegistryConfig>,
}

impl SourceRegistries {
    /// Checks every `[[registry]]` (credential files readable and private,
    /// CA file parses) and builds a client for each.
    pub fn new(configs: &[RegistryConfig]) -> Result<SourceRegistries, SourceError> {
        todo!("{configs:?}")
    }

    /// The client for `host`: the configured one, or an anonymous https
    /// client made on first use.
    pub fn get(&self, host: &str) -> Arc<SourceRegistry> {
        todo!(
            "{host}{}{}",
            self.configs.len(),
            self.registries.lock().is_ok()
        )
    }
}

/// One source registry: its HTTP agent, credentials and limits.
pub struct SourceRegistry {
    host: String,
}

impl SourceRegistry {
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Every tag of `repository`, following `Link` pagination.
    pub fn list_tags(
        &self,
        repository: &str,
        cancel: &Shutdown,
    ) -> Result<Vec<String>, SourceError> {
        todo!("{repository}{}", cancel.is_triggered())
    }

    /// The manifest (or index) `reference` (a tag or a digest) points at.
    pub fn manifest(
        &self,
        repository: &str,
        reference: &str,
        cancel: &Shutdown,
    ) -> Result<FetchedManifest, SourceError> {
        todo!("{repository}{reference}{}", cancel.is_triggered())
    }

    /// Streams blob `digest` into `out` in bounded chunks (memory does not
    /// grow with the blob); returns the bytes written. The caller hashes
    /// what it stores. A cut connection is [`SourceError::Unavailable`]
    /// (the caller discards what was written).
    pub fn blob(
        &self,
        repository: &str,
        digest: &str,
        out: &mut dyn Write,
        cancel: &Shutdown,
    ) -> Result<u64, SourceError> {
        let _ = out;
        todo!("{repository}{digest}{}", cancel.is_triggered())
    }

    /// A JSON document from another API of the same host (the Quay
    /// security API), with the same credentials and limits; at most
    /// [`MAX_DOCUMENT_BYTES`].
    pub fn get_document(
        &self,
        path_and_query: &str,
        cancel: &Shutdown,
    ) -> Result<Vec<u8>, SourceError> {
        todo!("{path_and_query}{}", cancel.is_triggered())
    }
}
