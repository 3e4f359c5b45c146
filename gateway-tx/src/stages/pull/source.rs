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
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, warn};
use ureq::config::RedirectAuthHeaders;
use ureq::http::{HeaderMap, Response};
use ureq::tls::{parse_pem, Certificate, PemItem, RootCerts, TlsConfig};
use ureq::Body;
use weir_host::Shutdown;
use weir_proto::pacing::TokenBucket;

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
    /// Keyed by [`canonical_host`], so `docker.io` and its aliases share one
    /// client, limits and token cache.
    registries: Mutex<HashMap<String, Arc<SourceRegistry>>>,
}

impl SourceRegistries {
    /// Checks every `[[registry]]` (credential files readable and private,
    /// CA file parses) and builds a client for each.
    pub fn new(configs: &[RegistryConfig]) -> Result<SourceRegistries, SourceError> {
        let mut registries = HashMap::new();
        for config in configs {
            let key = canonical_host(&config.host);
            if registries.contains_key(&key) {
                return Err(SourceError::Setup {
                    host: config.host.clone(),
                    message: "configured twice".into(),
                });
            }
            registries.insert(key, Arc::new(SourceRegistry::from_config(config)?));
        }
        Ok(SourceRegistries {
            registries: Mutex::new(registries),
        })
    }

    /// The client for `host`: the configured one, or an anonymous https
    /// client made on first use.
    pub fn get(&self, host: &str) -> Arc<SourceRegistry> {
        let mut registries = self.registries.lock().unwrap_or_else(|e| e.into_inner());
        registries
            .entry(canonical_host(host))
            .or_insert_with(|| Arc::new(SourceRegistry::anonymous(host)))
            .clone()
    }
}

/// What a request of a source registry authenticates with.
enum Credentials {
    Anonymous,
    Basic { username: String, password: String },
    Token(String),
}

/// A bearer token a registry's token realm issued.
struct CachedToken {
    token: String,
    /// Somewhat before the realm's `expires_in`, so it is not sent stale.
    expires: Instant,
}

/// Bearer tokens by scope, and which scope each repository asked for.
#[derive(Default)]
struct TokenCache {
    by_scope: HashMap<String, CachedToken>,
    scope_of: HashMap<String, String>,
}

/// One source registry: its HTTP agent, credentials and limits.
pub struct SourceRegistry {
    host: String,
    /// `https` or `http`.
    scheme: &'static str,
    /// `host[:port]` requests go to (`registry-1.docker.io` for `docker.io`).
    endpoint: String,
    docker_hub: bool,
    agent: ureq::Agent,
    credentials: Credentials,
    tokens: Mutex<TokenCache>,
    slots: Slots,
    pacer: Mutex<TokenBucket>,
    /// `n` of the first tag list request; None lets the registry choose.
    page_size: Option<u32>,
    /// The waits between attempts after a transient failure; its length is
    /// the number of retries.
    backoff: Vec<Duration>,
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
        let repo = self.repository(repository)?;
        let mut path = format!("/v2/{repo}/tags/list");
        if let Some(n) = self.page_size {
            path.push_str(&format!("?n={n}"));
        }
        let mut tags = Vec::new();
        let mut pages = 0usize;
        loop {
            pages += 1;
            if pages > MAX_TAG_PAGES {
                return Err(self.protocol(format!(
                    "tag list of {repo}: more than {MAX_TAG_PAGES} pages"
                )));
            }
            let target = Target {
                url: self.url(&path),
                accept: Some("application/json"),
                auth: Auth::Registry(&repo),
                what: format!("repository {repo}"),
            };
            let (page, next) = self.call(&target, cancel, |response| {
                let next = next_link(
                    response
                        .headers()
                        .get_all("link")
                        .iter()
                        .filter_map(|v| v.to_str().ok()),
                );
                let body = self.read_bounded(response, MAX_DOCUMENT_BYTES, &target.url)?;
                let list: TagList = serde_json::from_slice(&body).map_err(|e| {
                    Failure::Fatal(self.protocol(format!("tag list of {repo} is not JSON: {e}")))
                })?;
                Ok((list.tags.unwrap_or_default(), next))
            })?;
            tags.extend(page);
            if tags.len() > MAX_TAGS {
                return Err(self.protocol(format!("{repo} has more than {MAX_TAGS} tags")));
            }
            let Some(link) = next else {
                return Ok(tags);
            };
            let next_path = self.resolve_link(&link, &path)?;
            if next_path == path {
                return Err(self.protocol(format!(
                    "tag list of {repo}: the next page link points at the same page"
                )));
            }
            path = next_path;
        }
    }

    /// The manifest (or index) `reference` (a tag or a digest) points at.
    pub fn manifest(
        &self,
        repository: &str,
        reference: &str,
        cancel: &Shutdown,
    ) -> Result<FetchedManifest, SourceError> {
        let repo = self.repository(repository)?;
        // A tag never holds ':', a digest always does.
        let asked_digest = if reference.contains(':') {
            check_digest(reference).map_err(|m| self.protocol(m))?;
            if !reference.starts_with("sha256:") {
                return Err(self.protocol(format!(
                    "{repo}@{reference}: only sha256 digests can be checked"
                )));
            }
            Some(reference)
        } else {
            weir_proto::check_tag(reference).map_err(|e| self.protocol(e.to_string()))?;
            None
        };
        let separator = if asked_digest.is_some() { '@' } else { ':' };
        let target = Target {
            url: self.url(&format!("/v2/{repo}/manifests/{reference}")),
            accept: Some(MANIFEST_ACCEPT),
            auth: Auth::Registry(&repo),
            what: format!("manifest {repo}{separator}{reference}"),
        };
        self.call(&target, cancel, |response| {
            let content_type = header(response.headers(), "content-type")
                .map(|v| media_type_of(&v))
                .filter(|v| !v.is_empty());
            let served_digest = header(response.headers(), "docker-content-digest");
            let bytes = self.read_bounded(response, MAX_MANIFEST_BYTES, &target.url)?;
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
            let mismatch = |what: &str, expected: &str| {
                Failure::Fatal(self.protocol(format!(
                    "{}: the bytes served hash to {digest}, {what} {expected}",
                    target.what
                )))
            };
            if let Some(expected) = asked_digest {
                if expected != digest {
                    return Err(mismatch("not to the digest asked for,", expected));
                }
            }
            if let Some(served) = served_digest.as_deref().map(str::trim) {
                // Only a sha256 can be compared; another algorithm's
                // digest of the same bytes is not wrong.
                if served.starts_with("sha256:") && served != digest {
                    return Err(mismatch("Docker-Content-Digest says", served));
                }
            }
            let media_type = match content_type {
                Some(t) if !GENERIC_TYPES.contains(&t.as_str()) => t,
                other => match document_media_type(&bytes) {
                    Some(t) => t,
                    None => other.ok_or_else(|| {
                        Failure::Fatal(self.protocol(format!(
                            "{}: neither a Content-Type nor a mediaType",
                            target.what
                        )))
                    })?,
                },
            };
            Ok(FetchedManifest {
                digest,
                media_type,
                bytes,
            })
        })
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
        let repo = self.repository(repository)?;
        check_digest(digest).map_err(|m| self.protocol(m))?;
        let target = Target {
            url: self.url(&format!("/v2/{repo}/blobs/{digest}")),
            accept: None,
            auth: Auth::Registry(&repo),
            what: format!("blob {repo}@{digest}"),
        };
        let mut buf = vec![0u8; BLOB_CHUNK];
        let mut written = 0u64;
        self.call(&target, cancel, |response| {
            let expected = response.body().content_length();
            let mut reader = response.into_body().into_reader();
            loop {
                if cancel.is_triggered() {
                    return Err(Failure::Fatal(SourceError::Cancelled));
                }
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // Nothing stored yet: the request can simply be made
                    // again. Once bytes are out, the caller must start over.
                    Err(e) if written == 0 => {
                        return Err(Failure::Transient {
                            reason: format!("reading {}: {e}", target.what),
                            retry_after: None,
                        })
                    }
                    Err(e) => {
                        return Err(Failure::Fatal(self.unavailable(format!(
                            "{} cut after {written} bytes: {e}",
                            target.what
                        ))))
                    }
                };
                out.write_all(&buf[..n]).map_err(|source| {
                    Failure::Fatal(SourceError::Write {
                        host: self.host.clone(),
                        source,
                    })
                })?;
                written += n as u64;
            }
            if let Some(len) = expected {
                if written != len {
                    return Err(Failure::Fatal(self.unavailable(format!(
                        "{} ended after {written} of {len} bytes",
                        target.what
                    ))));
                }
            }
            out.flush().map_err(|source| {
                Failure::Fatal(SourceError::Write {
                    host: self.host.clone(),
                    source,
                })
            })?;
            Ok(written)
        })
    }

    /// The referrers list (an OCI index) the registry's referrers API gives
    /// for `digest`; None when the registry has no such API (it answers
    /// 404), and the caller falls back to the `sha256-<hex>` tag.
    pub fn referrers(
        &self,
        repository: &str,
        digest: &str,
        cancel: &Shutdown,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        let repo = self.repository(repository)?;
        check_digest(digest).map_err(|m| self.protocol(m))?;
        let target = Target {
            url: self.url(&format!("/v2/{repo}/referrers/{digest}")),
            accept: Some("application/vnd.oci.image.index.v1+json"),
            auth: Auth::Registry(&repo),
            what: format!("referrers of {repo}@{digest}"),
        };
        match self.call(&target, cancel, |response| {
            self.read_bounded(response, MAX_MANIFEST_BYTES, &target.url)
        }) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(SourceError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A JSON document from another API of the same host (the Quay
    /// security API), with the same credentials and limits; at most
    /// [`MAX_DOCUMENT_BYTES`].
    pub fn get_document(
        &self,
        path_and_query: &str,
        cancel: &Shutdown,
    ) -> Result<Vec<u8>, SourceError> {
        let path = if path_and_query.starts_with('/') {
            path_and_query.to_string()
        } else {
            format!("/{path_and_query}")
        };
        // The path is appended to this host's origin: it must not name
        // another host ("//elsewhere") or carry what a URL cannot.
        if path.starts_with("//")
            || path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#' || c == '\\')
        {
            return Err(self.protocol(format!("not a path: {path:?}")));
        }
        let target = Target {
            url: self.url(&path),
            accept: Some("application/json"),
            auth: Auth::Registry(""),
            what: path.clone(),
        };
        self.call(&target, cancel, |response| {
            self.read_bounded(response, MAX_DOCUMENT_BYTES, &target.url)
        })
    }
}

/// Bounds of what a registry may make us do or hold.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while waiting for or reading an answer. Not a bound on
/// the whole body: blobs may take hours on a slow uplink.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Blobs are copied through one buffer of this size.
const BLOB_CHUNK: usize = 256 << 10;
const MAX_TAGS: usize = 100_000;
const MAX_TAG_PAGES: usize = 10_000;
/// The longest `Retry-After` honoured; a registry asking for more gets
/// asked again sooner, and the caller sees its wish in the error.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];
/// How much of an error answer is read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;
/// How much of an error answer's text a message quotes.
const MESSAGE_CHARS: usize = 300;
const MAX_TOKEN_BYTES: usize = 1 << 20;
/// A token realm's default lifetime (the token spec's minimum).
const DEFAULT_TOKEN_SECONDS: u64 = 60;
/// Content types that say nothing of a manifest's kind: the document's
/// own `mediaType` is taken instead.
const GENERIC_TYPES: [&str; 3] = ["application/json", "text/plain", "application/octet-stream"];

#[derive(serde::Deserialize)]
struct TagList {
    tags: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// One request: where, what it accepts, which credentials.
struct Target<'a> {
    url: String,
    accept: Option<&'a str>,
    auth: Auth<'a>,
    /// What a 404 did not find, and what messages name.
    what: String,
}

enum Auth<'a> {
    /// The registry's own API: the configured credentials, or the bearer
    /// token cached for this repository; a `401` challenge is answered.
    Registry(&'a str),
    /// A token realm: exactly this `Authorization`, no challenge answered.
    Fixed(Option<String>),
}

/// Why an attempt failed: worth another attempt, or final.
enum Failure {
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    Fatal(SourceError),
}

impl SourceRegistry {
    fn from_config(config: &RegistryConfig) -> Result<SourceRegistry, SourceError> {
        let host = config.host.clone();
        let setup = |message: String| SourceError::Setup {
            host: host.clone(),
            message,
        };
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "/@?#\\".contains(c))
        {
            return Err(setup(format!("host {host:?} is not host[:port]")));
        }
        if config.max_concurrent == 0 {
            return Err(setup("max_concurrent must be at least 1".into()));
        }
        if !(config.requests_per_second.is_finite() && config.requests_per_second > 0.0) {
            return Err(setup("requests_per_second must be greater than 0".into()));
        }
        let credentials = match (&config.username, &config.password_file, &config.token_file) {
            (None, None, None) => Credentials::Anonymous,
            (Some(username), Some(password_file), None) => {
                if username.is_empty()
                    || username.contains(':')
                    || username.chars().any(char::is_control)
                {
                    return Err(setup(format!(
                        "username {username:?} cannot be sent (empty, ':' or a control character)"
                    )));
                }
                let password = read_password(password_file).map_err(setup)?;
                Credentials::Basic {
                    username: username.clone(),
                    password,
                }
            }
            (None, None, Some(token_file)) => {
                Credentials::Token(read_token(token_file).map_err(setup)?)
            }
            (None, Some(_), _) => return Err(setup("password_file without username".into())),
            (Some(_), None, None) => return Err(setup("username without password_file".into())),
            (_, _, Some(_)) => {
                return Err(setup(
                    "either username with password_file, or token_file, not both".into(),
                ))
            }
        };
        let roots = match &config.ca_file {
            Some(path) => Some(read_ca_file(path).map_err(setup)?),
            None => None,
        };
        Ok(SourceRegistry::build(
            &host,
            config.plain_http,
            credentials,
            roots,
            config.max_concurrent,
            config.requests_per_second,
        ))
    }

    /// The client for a host no `[[registry]]` names: https, anonymous,
    /// the default limits.
    fn anonymous(host: &str) -> SourceRegistry {
        SourceRegistry::build(host, false, Credentials::Anonymous, None, 4, 20.0)
    }

    fn build(
        host: &str,
        plain_http: bool,
        credentials: Credentials,
        roots: Option<Vec<Certificate<'static>>>,
        max_concurrent: u32,
        requests_per_second: f64,
    ) -> SourceRegistry {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("weir-gateway-tx/", env!("CARGO_PKG_VERSION")))
            .timeout_resolve(Some(CONNECT_TIMEOUT))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .timeout_per_write(Some(READ_TIMEOUT))
            // Blobs redirect to storage elsewhere: credentials stay with
            // the registry (ureq drops them on a redirect to another host).
            .redirect_auth_headers(RedirectAuthHeaders::SameHost)
            // An https registry must not be downgraded by a redirect or a
            // token realm.
            .https_only(!plain_http);
        if let Some(roots) = roots {
            config = config.tls_config(
                TlsConfig::builder()
                    .root_certs(RootCerts::new_with_certs(&roots))
                    .build(),
            );
        }
        let agent = ureq::Agent::new_with_config(config.build());
        let key = canonical_host(host);
        let docker_hub = key == "docker.io";
        let endpoint = if docker_hub {
            "registry-1.docker.io".to_string()
        } else {
            host.to_string()
        };
        // A burst of at most one second's worth, and never more than can
        // be in flight at once: "requests per second" holds over any second.
        let burst = requests_per_second.min(f64::from(max_concurrent)).max(1.0);
        SourceRegistry {
            host: host.to_string(),
            scheme: if plain_http { "http" } else { "https" },
            endpoint,
            docker_hub,
            agent,
            credentials,
            tokens: Mutex::new(TokenCache::default()),
            slots: Slots::new(max_concurrent),
            pacer: Mutex::new(TokenBucket::with_byte_rate(
                requests_per_second,
                burst,
                Instant::now(),
            )),
            page_size: None,
            backoff: BACKOFF.to_vec(),
        }
    }

    /// Asks for tag lists `n` at a time (the registry may still choose).
    #[cfg(test)]
    fn set_page_size(&mut self, n: Option<u32>) {
        self.page_size = n;
    }

    /// Replaces the waits between retries (tests make them short).
    #[cfg(test)]
    fn set_backoff(&mut self, backoff: Vec<Duration>) {
        self.backoff = backoff;
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}://{}{path_and_query}", self.scheme, self.endpoint)
    }

    fn protocol(&self, message: String) -> SourceError {
        SourceError::Protocol {
            host: self.host.clone(),
            message,
        }
    }

    fn unavailable(&self, message: String) -> SourceError {
        SourceError::Unavailable {
            host: self.host.clone(),
            message,
            retry_after: None,
        }
    }

    /// Checks a repository name; Docker Hub's one-component names live
    /// under `library/`.
    fn repository(&self, repository: &str) -> Result<String, SourceError> {
        weir_proto::check_repository(repository).map_err(|e| self.protocol(e.to_string()))?;
        if self.docker_hub && !repository.contains('/') {
            Ok(format!("library/{repository}"))
        } else {
            Ok(repository.to_string())
        }
    }

    /// The path and query of a `Link` target, which must stay on this
    /// registry: the next request carries its credentials.
    fn resolve_link(&self, link: &str, current: &str) -> Result<String, SourceError> {
        if let Some(query) = link.strip_prefix('?') {
            let path = current.split('?').next().unwrap_or(current);
            return Ok(format!("{path}?{query}"));
        }
        if link.starts_with('/') && !link.starts_with("//") {
            return Ok(link.to_string());
        }
        let (scheme, rest) = match link.split_once("://") {
            Some((scheme, rest)) => (scheme, rest),
            None => match link.strip_prefix("//") {
                Some(rest) => (self.scheme, rest),
                None => return Err(self.protocol(format!("next page link {link:?} is not a URL"))),
            },
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if !scheme.eq_ignore_ascii_case(self.scheme)
            || !authority.eq_ignore_ascii_case(&self.endpoint)
        {
            return Err(self.protocol(format!(
                "next page link {link:?} leaves {}://{}",
                self.scheme, self.endpoint
            )));
        }
        if path.starts_with('?') {
            return Ok(format!("/{path}"));
        }
        Ok(path.to_string())
    }

    /// Waits for a free slot and for the pace, then holds the slot until
    /// the guard drops (after the answer's body is read).
    fn start_request(&self, cancel: &Shutdown) -> Result<SlotGuard<'_>, SourceError> {
        let slot = self.slots.acquire(cancel)?;
        let delay = self
            .pacer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reserve(1, Instant::now());
        if !delay.is_zero() && cancel.sleep(delay) {
            return Err(SourceError::Cancelled);
        }
        Ok(slot)
    }

    /// The `Authorization` a request of the registry's own API carries.
    fn authorization(&self, key: &str) -> Option<String> {
        if let Credentials::Token(token) = &self.credentials {
            return Some(format!("Bearer {token}"));
        }
        if let Some(token) = self.cached_token(key) {
            return Some(format!("Bearer {token}"));
        }
        self.basic_authorization()
    }

    fn basic_authorization(&self) -> Option<String> {
        match &self.credentials {
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                base64(format!("{username}:{password}").as_bytes())
            )),
            _ => None,
        }
    }

    fn cached_token(&self, key: &str) -> Option<String> {
        let cache = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let scope = cache.scope_of.get(key)?;
        let cached = cache.by_scope.get(scope)?;
        (cached.expires > Instant::now()).then(|| cached.token.clone())
    }

    /// Makes one request, retrying what is worth retrying, and hands a
    /// 2xx answer to `read` while the request's slot is held.
    fn call<T>(
        &self,
        target: &Target<'_>,
        cancel: &Shutdown,
        mut read: impl FnMut(Response<Body>) -> Result<T, Failure>,
    ) -> Result<T, SourceError> {
        let mut failures = 0usize;
        let mut challenged = false;
        loop {
            if cancel.is_triggered() {
                return Err(SourceError::Cancelled);
            }
            let slot = self.start_request(cancel)?;
            let authorization = match &target.auth {
                Auth::Registry(key) => self.authorization(key),
                Auth::Fixed(value) => value.clone(),
            };
            debug!(host = %self.host, url = %target.url, "GET");
            let mut request = self.agent.get(&target.url);
            if let Some(accept) = target.accept {
                request = request.header("Accept", accept);
            }
            if let Some(authorization) = &authorization {
                request = request.header("Authorization", authorization);
            }
            let failure = match request.call() {
                Err(e) => transport_failure(&self.host, &target.url, e),
                Ok(response) => {
                    let status = response.status().as_u16();
                    match status {
                        200..=299 => match read(response) {
                            Ok(value) => return Ok(value),
                            Err(failure) => failure,
                        },
                        401 => {
                            let challenges = challenges_of(response.headers());
                            let message = refusal_message(response);
                            drop(slot);
                            let answered = match &target.auth {
                                Auth::Registry(key) if !challenged => {
                                    challenged = true;
                                    self.answer(&challenges, key, authorization.as_deref(), cancel)?
                                }
                                _ => false,
                            };
                            if answered {
                                continue;
                            }
                            return Err(SourceError::Unauthorized {
                                host: self.host.clone(),
                                message,
                            });
                        }
                        403 => {
                            return Err(SourceError::Unauthorized {
                                host: self.host.clone(),
                                message: refusal_message(response),
                            })
                        }
                        404 => {
                            return Err(SourceError::NotFound {
                                host: self.host.clone(),
                                what: target.what.clone(),
                            })
                        }
                        // A 503 may say when to come back, as a 429 does.
                        429 | 500..=599 => Failure::Transient {
                            retry_after: header(response.headers(), "retry-after")
                                .and_then(|v| parse_retry_after(&v, SystemTime::now())),
                            reason: refusal_message(response),
                        },
                        _ => {
                            return Err(self.protocol(format!(
                                "GET {}: {}",
                                target.url,
                                refusal_message(response)
                            )))
                        }
                    }
                }
            };
            drop(slot);
            let (reason, retry_after) = match failure {
                Failure::Fatal(e) => return Err(e),
                Failure::Transient {
                    reason,
                    retry_after,
                } => (reason, retry_after),
            };
            let Some(backoff) = self.backoff.get(failures) else {
                return Err(SourceError::Unavailable {
                    host: self.host.clone(),
                    message: format!("GET {}: {reason}", target.url),
                    retry_after,
                });
            };
            failures += 1;
            let wait = retry_after.map_or(*backoff, |d| d.min(MAX_RETRY_AFTER));
            warn!(
                host = %self.host,
                url = %target.url,
                attempt = failures,
                wait_ms = wait.as_millis() as u64,
                reason = %reason,
                "source registry request failed, retrying"
            );
            if cancel.sleep(wait) {
                return Err(SourceError::Cancelled);
            }
        }
    }

    /// Answers a `401`'s challenges; true when the request is worth making
    /// again (a token was fetched, or basic credentials were not sent yet).
    fn answer(
        &self,
        challenges: &[Challenge],
        key: &str,
        sent: Option<&str>,
        cancel: &Shutdown,
    ) -> Result<bool, SourceError> {
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            if let Credentials::Token(_) = self.credentials {
                // The configured token is all we have: it was refused.
                return Ok(false);
            }
            self.fetch_token(bearer, key, cancel)?;
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let basic = self.basic_authorization();
            if basic.is_some() && basic.as_deref() != sent {
                // A cached bearer token was sent; the registry wants the
                // basic credentials now.
                let mut cache = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
                cache.scope_of.remove(key);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Fetches a token from a `Bearer` challenge's realm and caches it for
    /// its scope and for `key`'s requests.
    fn fetch_token(
        &self,
        challenge: &Challenge,
        key: &str,
        cancel: &Shutdown,
    ) -> Result<(), SourceError> {
        let realm = challenge
            .param("realm")
            .ok_or_else(|| self.protocol("a Bearer challenge without a realm".into()))?;
        let has_scheme = |scheme: &str| {
            realm
                .get(..scheme.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
        };
        let https = has_scheme("https://");
        if !(https || has_scheme("http://")) {
            return Err(self.protocol(format!("token realm {realm:?} is not an http(s) URL")));
        }
        let scope = challenge.param("scope").unwrap_or("").to_string();
        let mut url = realm.to_string();
        let mut separator = if realm.contains('?') { '&' } else { '?' };
        if let Some(service) = challenge.param("service") {
            url.push_str(&format!("{separator}service={}", percent_encode(service)));
            separator = '&';
        }
        for s in scope.split_whitespace() {
            url.push_str(&format!("{separator}scope={}", percent_encode(s)));
            separator = '&';
        }
        let basic = self.basic_authorization();
        // Basic credentials cross plain http only where the registry itself
        // was configured for it.
        let basic = if https || self.scheme == "http" {
            basic
        } else {
            if basic.is_some() {
                warn!(host = %self.host, realm, "token realm is plain http: asking it anonymously");
            }
            None
        };
        let target = Target {
            url,
            accept: Some("application/json"),
            auth: Auth::Fixed(basic),
            what: format!("token realm {realm}"),
        };
        let (token, seconds) = self.call(&target, cancel, |response| {
            let body = self.read_bounded(response, MAX_TOKEN_BYTES, &target.url)?;
            let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
                Failure::Fatal(self.protocol(format!("{}: answer is not JSON: {e}", target.what)))
            })?;
            let token = answer
                .token
                .filter(|t| !t.is_empty())
                .or(answer.access_token)
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| {
                    Failure::Fatal(self.protocol(format!("{}: no usable token", target.what)))
                })?;
            Ok((token, answer.expires_in.unwrap_or(DEFAULT_TOKEN_SECONDS)))
        })?;
        debug!(host = %self.host, scope = %scope, seconds, "bearer token fetched");
        // Renewed a tenth early, so a token does not expire in flight.
        let lifetime = Duration::from_secs(seconds.clamp(1, 86_400)).mul_f64(0.9);
        let now = Instant::now();
        let mut cache = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        cache.by_scope.retain(|_, t| t.expires > now);
        cache.by_scope.insert(
            scope.clone(),
            CachedToken {
                token,
                expires: now + lifetime,
            },
        );
        cache.scope_of.insert(key.to_string(), scope);
        Ok(())
    }

    /// The body of a 2xx answer, at most `limit` bytes.
    fn read_bounded(
        &self,
        response: Response<Body>,
        limit: usize,
        url: &str,
    ) -> Result<Vec<u8>, Failure> {
        let too_large = || {
            Failure::Fatal(self.protocol(format!("GET {url}: answer larger than {limit} bytes")))
        };
        if response
            .body()
            .content_length()
            .is_some_and(|n| n > limit as u64)
        {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        response
            .into_body()
            .into_reader()
            .take(limit as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::Transient {
                reason: format!("reading the answer: {e}"),
                retry_after: None,
            })?;
        if bytes.len() > limit {
            return Err(too_large());
        }
        Ok(bytes)
    }
}

/// Sorts a failure to get an answer: TLS and URL problems do not go away
/// by asking again, the rest (refused, reset, timed out, DNS) may.
fn transport_failure(host: &str, url: &str, e: ureq::Error) -> Failure {
    let fatal = |message: String| {
        Failure::Fatal(SourceError::Protocol {
            host: host.to_string(),
            message,
        })
    };
    match e {
        ureq::Error::Tls(_) | ureq::Error::Pem(_) | ureq::Error::Rustls(_) => {
            fatal(format!("GET {url}: TLS: {e}"))
        }
        ureq::Error::BadUri(_)
        | ureq::Error::Http(_)
        | ureq::Error::RequireHttpsOnly(_)
        | ureq::Error::TooManyRedirects
        | ureq::Error::RedirectFailed
        | ureq::Error::InvalidProxyUrl => fatal(format!("GET {url}: {e}")),
        e => Failure::Transient {
            reason: e.to_string(),
            retry_after: None,
        },
    }
}

/// `docker.io` and the names Docker Hub is also known by are one registry;
/// hosts compare case-insensitively.
fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// A counting semaphore: requests in flight to one registry.
struct Slots {
    max: u32,
    in_flight: Mutex<u32>,
    freed: Condvar,
}

struct SlotGuard<'a>(&'a Slots);

impl Slots {
    fn new(max: u32) -> Slots {
        Slots {
            max: max.max(1),
            in_flight: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self, cancel: &Shutdown) -> Result<SlotGuard<'_>, SourceError> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if cancel.is_triggered() {
                return Err(SourceError::Cancelled);
            }
            if *in_flight < self.max {
                *in_flight += 1;
                return Ok(SlotGuard(self));
            }
            // Shutdown has a condvar of its own: look at it now and then.
            in_flight = self
                .freed
                .wait_timeout(in_flight, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.0.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *in_flight = in_flight.saturating_sub(1);
        self.0.freed.notify_one();
    }
}

/// Reads a credential file that only its owner may read.
fn read_private(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{shown} is readable by group or others (mode {mode:o}); run: chmod 600 {shown}"
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))
}

/// One line; its newline is not part of the password.
fn read_password(path: &Path) -> Result<String, String> {
    let text = read_private(path)?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if password.contains(['\n', '\r']) {
        return Err(format!("{} holds more than one line", path.display()));
    }
    Ok(password.to_string())
}

fn read_token(path: &Path) -> Result<String, String> {
    let text = read_private(path)?;
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{} must hold one token of visible ASCII characters",
            path.display()
        ));
    }
    Ok(token.to_string())
}

fn read_ca_file(path: &Path) -> Result<Vec<Certificate<'static>>, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("ca_file {shown}: {e}"))?;
    let mut certs = Vec::new();
    for item in parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => {}
            Err(e) => return Err(format!("ca_file {shown}: {e}")),
        }
    }
    if certs.is_empty() {
        return Err(format!("ca_file {shown} holds no PEM certificate"));
    }
    Ok(certs)
}

/// A tag list's next page, from `Link` header values:
/// `<url>; rel="next"` among possibly several links.
fn next_link<'a>(values: impl Iterator<Item = &'a str>) -> Option<String> {
    for value in values {
        let mut rest = value;
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let close = after.find('>')?;
            let target = after[..close].trim();
            let params_and_more = &after[close + 1..];
            // The link's parameters run to the next link (a ',' outside
            // quotes) or the end.
            let mut end = params_and_more.len();
            let mut quoted = false;
            for (i, c) in params_and_more.char_indices() {
                match c {
                    '"' => quoted = !quoted,
                    ',' if !quoted => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let params = &params_and_more[..end];
            let is_next = params.split(';').any(|p| {
                let Some((name, value)) = p.split_once('=') else {
                    return false;
                };
                name.trim().eq_ignore_ascii_case("rel")
                    && value
                        .trim()
                        .trim_matches('"')
                        .split_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            });
            if is_next && !target.is_empty() {
                return Some(target.to_string());
            }
            rest = &params_and_more[end..];
        }
    }
    None
}

/// One `WWW-Authenticate` challenge: its scheme (lowercase) and params.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn challenges_of(headers: &HeaderMap) -> Vec<Challenge> {
    headers
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_challenges)
        .collect()
}

/// Parses `Bearer realm="..",service="..",scope="a:b:pull,push", Basic
/// realm=".."`: a token followed by `=` is a parameter of the challenge
/// before it, any other token starts a new challenge.
fn parse_challenges(value: &str) -> Vec<Challenge> {
    let b = value.as_bytes();
    let mut out: Vec<Challenge> = Vec::new();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    while i < b.len() {
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t' || b[i] == b',') {
            i += 1;
        }
        let start = i;
        while i < b.len() && !matches!(b[i], b' ' | b'\t' | b',' | b'=') {
            i += 1;
        }
        let token = &value[start..i];
        skip_space(&mut i);
        if i < b.len() && b[i] == b'=' {
            i += 1;
            // A token68 (`Negotiate abc==`) ends in '='s: not a parameter.
            let token68 = i >= b.len() || matches!(b[i], b'=' | b',' | b' ' | b'\t');
            if token68 {
                while i < b.len() && b[i] == b'=' {
                    i += 1;
                }
            }
            if token68 || token.is_empty() || out.is_empty() {
                continue;
            }
            skip_space(&mut i);
            let mut param = String::new();
            if i < b.len() && b[i] == b'"' {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    let ch_len = value[i..].chars().next().map_or(1, char::len_utf8);
                    param.push_str(&value[i..i + ch_len]);
                    i += ch_len;
                }
                i += 1;
            } else {
                let s = i;
                while i < b.len() && !matches!(b[i], b' ' | b'\t' | b',') {
                    i += 1;
                }
                param.push_str(&value[s..i]);
            }
            if let Some(last) = out.last_mut() {
                last.params.push((token.to_ascii_lowercase(), param));
            }
        } else if !token.is_empty() {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: Vec::new(),
            });
        }
    }
    out
}

/// `Retry-After`: delay-seconds or an HTTP-date (IMF-fixdate), as a wait
/// from `now`.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A number too large to parse is still "a long time".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = parse_http_date(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`
fn parse_http_date(value: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [weekday, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    if !weekday.ends_with(',') {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let day: i64 = day.parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<&str> = time.split(':').collect();
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    let (h, m, s): (i64, i64, i64) = (h.parse().ok()?, m.parse().ok()?, s.parse().ok()?);
    if !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What a refusal or failure says, for errors and logs: distribution's
/// `{"errors":[{"code","message"}]}` as `CODE: message`, otherwise the
/// status and the start of the body.
fn refusal_message(response: Response<Body>) -> String {
    let status = response.status();
    let mut body = Vec::new();
    // The message is best effort: a body that cannot be read says nothing.
    let _ = response
        .into_body()
        .into_reader()
        .take(MAX_ERROR_BODY as u64)
        .read_to_end(&mut body);
    describe_refusal(status.as_u16(), status.canonical_reason(), &body)
}

fn describe_refusal(status: u16, reason: Option<&str>, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ApiError>,
    }
    #[derive(serde::Deserialize)]
    struct ApiError {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(doc) = serde_json::from_slice::<Errors>(body) {
        let parts: Vec<String> = doc
            .errors
            .iter()
            .filter_map(|e| match (e.code.as_deref(), e.message.as_deref()) {
                (Some(c), Some(m)) if !m.is_empty() => Some(format!("{c}: {m}")),
                (Some(c), _) => Some(c.to_string()),
                (None, Some(m)) => Some(m.to_string()),
                (None, None) => None,
            })
            .collect();
        if !parts.is_empty() {
            return shorten(&parts.join("; "));
        }
    }
    let status_line = match reason {
        Some(reason) => format!("HTTP {status} {reason}"),
        None => format!("HTTP {status}"),
    };
    let text = String::from_utf8_lossy(body);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        status_line
    } else {
        shorten(&format!("{status_line}: {text}"))
    }
}

/// At most [`MESSAGE_CHARS`] characters of what a registry said, printable.
fn shorten(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MESSAGE_CHARS)
        .collect();
    if text.chars().count() > MESSAGE_CHARS {
        out.push('…');
    }
    out
}

/// A `Content-Type` without its parameters.
fn media_type_of(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The `mediaType` a manifest or index declares.
fn document_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Declared {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Declared>(bytes)
        .ok()?
        .media_type
        .filter(|t| !t.is_empty())
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `algorithm:encoded` as the OCI spec writes digests.
fn check_digest(digest: &str) -> Result<(), String> {
    let ok = digest.split_once(':').is_some_and(|(algorithm, encoded)| {
        !algorithm.is_empty()
            && !encoded.is_empty()
            && encoded.len() <= 256
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
            && encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b))
    });
    let sha256_ok = !digest.starts_with("sha256:")
        || digest.len() == 71
            && digest[7..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok && sha256_ok {
        Ok(())
    } else {
        Err(format!("{:?} is not a digest", shorten(digest)))
    }
}

/// Query parameter values: everything but the unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Standard base64 with padding, for basic credentials.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::thread;
    use weir_test_support::imagegen::{oci_layout_dir, LayerSpec};
    use weir_test_support::{registry_or_skip, skopeo, RegistryOptions, RIGHT_PASSWORD_BCRYPT};

    // ---- pure parsing ----

    #[test]
    fn next_link_finds_rel_next_among_links() {
        let one = ["</v2/a/tags/list?last=b&n=1>; rel=\"next\""];
        assert_eq!(
            next_link(one.into_iter()).as_deref(),
            Some("/v2/a/tags/list?last=b&n=1")
        );
        let several = [
            "<https://r.example/v2/a/tags/list?n=2>; rel=\"first\", <https://r.example/v2/a/tags/list?last=x,y&n=2>; title=\"a, b\"; rel=next",
        ];
        assert_eq!(
            next_link(several.into_iter()).as_deref(),
            Some("https://r.example/v2/a/tags/list?last=x,y&n=2")
        );
        let split = [
            "<http://h/prev>; rel=\"prev\"",
            "<http://h/next>; REL=\"last next\"",
        ];
        assert_eq!(
            next_link(split.into_iter()).as_deref(),
            Some("http://h/next")
        );
        assert_eq!(next_link(["<x>; rel=\"prev\""].into_iter()), None);
        assert_eq!(next_link(["garbage <unclosed; rel=next"].into_iter()), None);
        assert_eq!(next_link(std::iter::empty()), None);
    }

    #[test]
    fn challenges_parse_with_commas_in_quotes_and_several_schemes() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#;
        let parsed = parse_challenges(hub);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].scheme, "bearer");
        assert_eq!(
            parsed[0].param("realm"),
            Some("https://auth.docker.io/token")
        );
        assert_eq!(parsed[0].param("service"), Some("registry.docker.io"));
        assert_eq!(
            parsed[0].param("scope"),
            Some("repository:samalba/my-app:pull,push")
        );

        let two = r#"Basic realm="weir \"test\"", charset=UTF-8, Bearer realm=https://a/token , error="insufficient_scope""#;
        let parsed = parse_challenges(two);
        assert_eq!(parsed.len(), 2, "{parsed:?}");
        assert_eq!(parsed[0].scheme, "basic");
        assert_eq!(parsed[0].param("realm"), Some("weir \"test\""));
        assert_eq!(parsed[0].param("charset"), Some("UTF-8"));
        assert_eq!(parsed[1].scheme, "bearer");
        assert_eq!(parsed[1].param("realm"), Some("https://a/token"));
        assert_eq!(parsed[1].param("error"), Some("insufficient_scope"));

        // A token68 is no parameter; stray separators do not loop.
        let odd = parse_challenges("Negotiate abc==, Basic realm=r, ,=x=");
        let schemes: Vec<&str> = odd.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["negotiate", "basic"]);
        assert!(odd[0].params.is_empty(), "{odd:?}");
        assert_eq!(odd[1].param("realm"), Some("r"));
        assert!(parse_challenges("").is_empty());
        assert_eq!(
            parse_challenges(r#"Bearer realm="unterminated"#)[0].param("realm"),
            Some("unterminated")
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(
            parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_164_800))
        );
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "Sun, 06 Nov 1994 08:49:37 CET",
            "Sun 06 Nov 1994 08:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 8:49 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn refusals_quote_the_registry_error_codes() {
        let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":[{"Type":"repository"}]},{"code":"DENIED"}]}"#;
        assert_eq!(
            describe_refusal(401, Some("Unauthorized"), body),
            "UNAUTHORIZED: authentication required; DENIED"
        );
        assert_eq!(
            describe_refusal(
                503,
                Some("Service Unavailable"),
                b"<html>\n  down  for\tmaintenance</html>"
            ),
            "HTTP 503 Service Unavailable: <html> down for maintenance</html>"
        );
        assert_eq!(describe_refusal(418, None, b""), "HTTP 418");
        assert_eq!(
            describe_refusal(500, Some("Internal Server Error"), br#"{"errors":[]}"#),
            "HTTP 500 Internal Server Error: {\"errors\":[]}"
        );
        let long = describe_refusal(502, Some("Bad Gateway"), "x\u{7}".repeat(1000).as_bytes());
        assert_eq!(long.chars().count(), MESSAGE_CHARS + 1);
        assert!(long.ends_with('…') && !long.contains('\u{7}'), "{long}");
    }

    #[test]
    fn encodings_for_headers_and_queries() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:p\xffss"), "dXNlcjpw/3Nz");
        assert_eq!(
            percent_encode("repository:a/b:pull,push ~x"),
            "repository%3Aa%2Fb%3Apull%2Cpush%20~x"
        );
        assert_eq!(
            media_type_of("Application/JSON; charset=utf-8"),
            "application/json"
        );
        assert_eq!(
            document_media_type(
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#
            )
            .as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(document_media_type(b"not json"), None);
    }

    #[test]
    fn digests_and_names_are_checked_before_a_request() {
        let sha = format!("sha256:{}", "ab".repeat(32));
        assert!(check_digest(&sha).is_ok());
        assert!(check_digest(&format!("sha512:{}", "ab".repeat(64))).is_ok());
        for bad in [
            "sha256:abc",
            "sha256:",
            ":abc",
            "abc",
            "sha256:../../x",
            &format!("sha256:{}", "AB".repeat(32)),
        ] {
            assert!(check_digest(bad).is_err(), "{bad}");
        }
        let r = SourceRegistry::anonymous("127.0.0.1:9");
        let cancel = Shutdown::new();
        let bad = r.manifest("team/app", "../x", &cancel).unwrap_err();
        assert!(matches!(bad, SourceError::Protocol { .. }), "{bad}");
        let bad = r.list_tags("Team/App", &cancel).unwrap_err();
        assert!(matches!(bad, SourceError::Protocol { .. }), "{bad}");
        let bad = r.get_document("//elsewhere/x", &cancel).unwrap_err();
        assert!(matches!(bad, SourceError::Protocol { .. }), "{bad}");
        let bad = r
            .manifest("team/app", &format!("sha512:{}", "ab".repeat(64)), &cancel)
            .unwrap_err();
        assert!(bad.to_string().contains("sha256"), "{bad}");
    }

    #[test]
    fn links_must_stay_on_the_registry() {
        let r = SourceRegistry::anonymous("reg.example:5000");
        let cur = "/v2/a/tags/list?n=1";
        let ok = |l: &str| r.resolve_link(l, cur).unwrap();
        assert_eq!(ok("/v2/a/tags/list?last=x"), "/v2/a/tags/list?last=x");
        assert_eq!(ok("?last=x&n=1"), "/v2/a/tags/list?last=x&n=1");
        assert_eq!(
            ok("https://REG.example:5000/v2/a/tags/list?last=x"),
            "/v2/a/tags/list?last=x"
        );
        assert_eq!(
            ok("//reg.example:5000/v2/a/tags/list?last=y"),
            "/v2/a/tags/list?last=y"
        );
        for bad in [
            "https://evil.example/v2/a/tags/list",
            "http://reg.example:5000/v2/a/tags/list",
            "//evil.example/x",
            "v2/a/tags/list",
        ] {
            assert!(
                matches!(r.resolve_link(bad, cur), Err(SourceError::Protocol { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn docker_hub_aliases_share_one_client() {
        let registries = SourceRegistries::new(&[]).unwrap();
        let hub = registries.get("docker.io");
        assert!(Arc::ptr_eq(&hub, &registries.get("index.docker.io")));
        assert!(Arc::ptr_eq(&hub, &registries.get("Registry-1.Docker.IO")));
        assert_eq!(hub.host(), "docker.io");
        assert_eq!(hub.url("/v2/"), "https://registry-1.docker.io/v2/");
        assert_eq!(hub.repository("alpine").unwrap(), "library/alpine");
        assert_eq!(hub.repository("team/app").unwrap(), "team/app");
        let quay = registries.get("quay.io");
        assert!(!Arc::ptr_eq(&hub, &quay));
        assert!(Arc::ptr_eq(&quay, &registries.get("quay.io")));
        assert_eq!(quay.url("/v2/"), "https://quay.io/v2/");
        assert_eq!(quay.repository("alpine").unwrap(), "alpine");
    }

    #[test]
    fn clients_are_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<SourceRegistries>();
        shared::<SourceRegistry>();
        shared::<SourceError>();
    }

    #[test]
    fn slots_bound_requests_in_flight() {
        let slots = Arc::new(Slots::new(2));
        let cancel = Shutdown::new();
        let a = slots.acquire(&cancel).unwrap();
        let _b = slots.acquire(&cancel).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let slots = slots.clone();
            let cancel = cancel.clone();
            thread::spawn(move || {
                let got = slots.acquire(&cancel).is_ok();
                tx.send(got).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a third slot was handed out"
        );
        drop(a);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        waiter.join().unwrap();
        assert_eq!(*slots.in_flight.lock().unwrap(), 1);

        // A waiter gives up when the gateway stops.
        let full = Slots::new(1);
        let _held = full.acquire(&cancel).unwrap();
        let stopper = cancel.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            stopper.trigger();
        });
        assert!(matches!(full.acquire(&cancel), Err(SourceError::Cancelled)));
        t.join().unwrap();
    }

    // ---- configuration ----

    fn config(host: &str) -> RegistryConfig {
        RegistryConfig {
            host: host.to_string(),
            username: None,
            password_file: None,
            token_file: None,
            ca_file: None,
            plain_http: true,
            max_concurrent: 4,
            requests_per_second: 1000.0,
        }
    }

    fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn setup_error(configs: &[RegistryConfig]) -> String {
        match SourceRegistries::new(configs) {
            Err(e @ SourceError::Setup { .. }) => e.to_string(),
            Err(e) => panic!("not a setup error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn a_password_file_open_to_others_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("reg.example");
        c.username = Some("weir".into());
        c.password_file = Some(write_file(
            dir.path(),
            "registry.password",
            "secret\n",
            0o644,
        ));
        let err = setup_error(&[c]);
        assert!(
            err.contains("registry.password") && err.contains("644") && err.contains("chmod 600"),
            "{err}"
        );
        assert!(err.contains("reg.example"), "{err}");

        let mut c = config("reg.example");
        c.token_file = Some(write_file(dir.path(), "registry.token", "tok\n", 0o640));
        let err = setup_error(&[c]);
        assert!(err.contains("registry.token"), "{err}");

        let mut c = config("reg.example");
        c.token_file = Some(dir.path().to_path_buf());
        let err = setup_error(&[c]);
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn credential_files_are_read_and_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("reg.example");
        c.username = Some("weir".into());
        c.password_file = Some(write_file(dir.path(), "pw", "s3 cret\r\n", 0o600));
        let r = SourceRegistry::from_config(&c).unwrap();
        assert_eq!(
            r.authorization("team/app").as_deref(),
            Some(format!("Basic {}", base64(b"weir:s3 cret")).as_str())
        );
        let mut c = config("reg.example");
        c.token_file = Some(write_file(dir.path(), "tok", "  abc.def-ghi\n", 0o400));
        let r = SourceRegistry::from_config(&c).unwrap();
        assert_eq!(r.authorization("x").as_deref(), Some("Bearer abc.def-ghi"));
        assert_eq!(SourceRegistry::anonymous("h").authorization("x"), None);

        let mut c = config("reg.example");
        c.username = Some("weir".into());
        c.password_file = Some(write_file(dir.path(), "two", "a\nb\n", 0o600));
        assert!(setup_error(&[c]).contains("more than one line"));
        let mut c = config("reg.example");
        c.username = Some("weir".into());
        c.password_file = Some(write_file(dir.path(), "empty", "\n", 0o600));
        assert!(setup_error(&[c]).contains("empty"));
    }

    #[test]
    fn credentials_must_be_one_kind_and_limits_must_allow_requests() {
        let dir = tempfile::tempdir().unwrap();
        let pw = write_file(dir.path(), "pw", "x\n", 0o600);
        let tok = write_file(dir.path(), "tok", "x\n", 0o600);

        let mut c = config("a");
        c.password_file = Some(pw.clone());
        assert!(setup_error(&[c]).contains("password_file without username"));
        let mut c = config("a");
        c.username = Some("u".into());
        assert!(setup_error(&[c]).contains("username without password_file"));
        let mut c = config("a");
        c.username = Some("u".into());
        c.password_file = Some(pw.clone());
        c.token_file = Some(tok.clone());
        assert!(setup_error(&[c]).contains("not both"));
        let mut c = config("a");
        c.username = Some("u:v".into());
        c.password_file = Some(pw);
        assert!(setup_error(&[c]).contains("cannot be sent"));

        let mut c = config("a");
        c.max_concurrent = 0;
        assert!(setup_error(&[c]).contains("max_concurrent"));
        for rps in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut c = config("a");
            c.requests_per_second = rps;
            assert!(setup_error(&[c]).contains("requests_per_second"), "{rps}");
        }
        assert!(setup_error(&[config("a/b")]).contains("host[:port]"));
        assert!(setup_error(&[config("docker.io"), config("index.docker.io")]).contains("twice"));

        let mut c = config("a");
        c.ca_file = Some(write_file(
            dir.path(),
            "ca.pem",
            "not a certificate\n",
            0o644,
        ));
        let err = setup_error(&[c]);
        assert!(
            err.contains("ca.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        let mut c = config("a");
        c.ca_file = Some(dir.path().join("missing.pem"));
        assert!(setup_error(&[c]).contains("missing.pem"));

        let mut c = config("a");
        c.max_concurrent = 1;
        c.requests_per_second = 0.5;
        assert!(SourceRegistries::new(&[c, config("b:5000")]).is_ok());
    }

    // ---- a canned HTTP server, for what a real registry does not do on demand ----

    /// A request as the canned server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        target: String,
        headers: Vec<(String, String)>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    struct Canned {
        addr: String,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Canned {
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    /// Answers each connection with what `handler` returns for its request
    /// (the request's index among all, and the server's address), then
    /// closes it.
    fn canned(handler: impl Fn(&Seen, usize, &str) -> Vec<u8> + Send + 'static) -> Canned {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, server_addr) = (seen.clone(), addr.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(match stream.try_clone() {
                    Ok(s) => s,
                    Err(_) => continue,
                });
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((n, v)) = h.split_once(':') {
                        headers.push((n.trim().to_string(), v.trim().to_string()));
                    }
                }
                let request = Seen { target, headers };
                let index = {
                    let mut log = log.lock().unwrap();
                    log.push(request.clone());
                    log.len() - 1
                };
                let _ = stream.write_all(&handler(&request, index, &server_addr));
                let _ = stream.flush();
            }
        });
        Canned { addr, seen }
    }

    fn answer(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (n, v) in headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(body);
        out
    }

    /// A plain-http client of the canned server with short backoffs.
    fn client_of(server: &Canned, change: impl FnOnce(&mut RegistryConfig)) -> SourceRegistry {
        let mut c = config(&server.addr);
        change(&mut c);
        let mut r = SourceRegistry::from_config(&c).unwrap();
        r.set_backoff(vec![Duration::from_millis(20); 3]);
        r
    }

    #[test]
    fn quay_security_reports_are_read_from_the_source_host() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let report = br#"{"status":"scanned","data":{"Layer":{"Features":[{"Name":"openssl","Vulnerabilities":[{"Name":"CVE-1","Severity":"High"}]}]}}}"#;
        let server = canned(move |_, _, _| {
            answer("200 OK", &[("Content-Type", "application/json")], report)
        });
        let client = client_of(&server, |_| {});
        let state =
            crate::pull::scan::quay_report(&client, "team-a/app", &digest, &Shutdown::new());
        match state {
            crate::policy::ReportState::Read(s) => {
                assert_eq!(s.worst, Some(crate::policy::Severity::High));
            }
            other => panic!("expected a read report, got {other:?}"),
        }
        let seen = server.seen();
        assert_eq!(
            seen[0].target,
            format!(
                "/api/v1/repository/team-a/app/manifest/{digest}/security?vulnerabilities=true"
            )
        );
        let pending =
            canned(|_, _, _| answer("200 OK", &[], br#"{"status":"queued","data":null}"#));
        let client = client_of(&pending, |_| {});
        let state =
            crate::pull::scan::quay_report(&client, "team-a/app", &digest, &Shutdown::new());
        assert!(
            matches!(&state, crate::policy::ReportState::Unreadable(m) if m.contains("Quay")),
            "{state:?}"
        );
    }

    #[test]
    fn waits_out_retry_after_then_succeeds() {
        let server = canned(|_, i, _| match i {
            0 => answer(
                "429 Too Many Requests",
                &[("Retry-After", "1")],
                b"slow down",
            ),
            _ => answer(
                "200 OK",
                &[("Content-Type", "application/json")],
                b"{\"ok\":true}",
            ),
        });
        let r = client_of(&server, |_| {});
        let started = Instant::now();
        let doc = r.get_document("/api/v1/x?y=1", &Shutdown::new()).unwrap();
        let took = started.elapsed();
        assert_eq!(doc, b"{\"ok\":true}");
        assert!(
            took >= Duration::from_millis(950),
            "{took:?}: Retry-After not honoured"
        );
        assert!(took < Duration::from_secs(10), "{took:?}");
        let seen = server.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].target, "/api/v1/x?y=1");
    }

    #[test]
    fn backs_off_on_5xx_then_succeeds_or_gives_up() {
        let server = canned(|_, i, _| match i {
            0 => answer("503 Service Unavailable", &[], b"busy"),
            1 => answer("502 Bad Gateway", &[], b""),
            _ => answer("200 OK", &[], b"{}"),
        });
        let r = client_of(&server, |_| {});
        assert_eq!(r.get_document("/d", &Shutdown::new()).unwrap(), b"{}");
        assert_eq!(server.seen().len(), 3);

        let server = canned(|_, _, _| {
            answer(
                "500 Internal Server Error",
                &[],
                br#"{"errors":[{"code":"UNKNOWN","message":"storage backend down"}]}"#,
            )
        });
        let r = client_of(&server, |_| {});
        match r.manifest("team/app", "1.0", &Shutdown::new()) {
            Err(SourceError::Unavailable {
                message,
                retry_after: None,
                ..
            }) => assert!(
                message.contains("UNKNOWN: storage backend down"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(server.seen().len(), 4, "one attempt and three retries");

        // Nobody listening: the same, without a status.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let mut r = SourceRegistry::from_config(&config(&addr)).unwrap();
        r.set_backoff(vec![Duration::from_millis(10)]);
        let err = r.list_tags("team/app", &Shutdown::new()).unwrap_err();
        assert!(matches!(err, SourceError::Unavailable { .. }), "{err}");
    }

    #[test]
    fn a_long_retry_after_is_cut_short_by_shutdown_and_reported() {
        let server =
            canned(|_, _, _| answer("429 Too Many Requests", &[("Retry-After", "30")], b""));
        let r = client_of(&server, |_| {});
        let cancel = Shutdown::new();
        let stopper = cancel.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            stopper.trigger();
        });
        let started = Instant::now();
        let err = r.get_document("/d", &cancel).unwrap_err();
        assert!(matches!(err, SourceError::Cancelled), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        t.join().unwrap();

        // Without retries left, the registry's wish reaches the caller.
        let mut r = client_of(&server, |_| {});
        r.set_backoff(Vec::new());
        match r.get_document("/d", &Shutdown::new()) {
            Err(SourceError::Unavailable { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(30)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_blob_cut_mid_way_is_unavailable_and_not_retried() {
        let digest = format!("sha256:{}", "0".repeat(64));
        let server = canned(|_, _, _| {
            let mut r =
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n".to_vec();
            r.extend_from_slice(&[7u8; 100]);
            r
        });
        let r = client_of(&server, |_| {});
        let mut out = Vec::new();
        let err = r
            .blob("team/app", &digest, &mut out, &Shutdown::new())
            .unwrap_err();
        assert!(matches!(err, SourceError::Unavailable { .. }), "{err}");
        assert_eq!(out, vec![7u8; 100], "what arrived was written");
        assert_eq!(
            server.seen().len(),
            1,
            "a blob with bytes out is not asked again"
        );

        // A writer that fails is the caller's problem, not the registry's.
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let server = canned(|_, _, _| answer("200 OK", &[], b"blob bytes"));
        let r = client_of(&server, |_| {});
        let err = r
            .blob("team/app", &digest, &mut Full, &Shutdown::new())
            .unwrap_err();
        assert!(matches!(err, SourceError::Write { .. }), "{err}");
        assert!(err.to_string().contains(&server.addr), "{err}");

        let cancel = Shutdown::new();
        cancel.trigger();
        let err = r
            .blob("team/app", &digest, &mut Vec::new(), &cancel)
            .unwrap_err();
        assert!(matches!(err, SourceError::Cancelled), "{err}");
    }

    #[test]
    fn answers_a_bearer_challenge_at_its_realm_and_caches_the_token() {
        let manifest =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        let server = canned(move |req, _, addr| {
            if req.target.starts_with("/token") {
                return answer("200 OK", &[], br#"{"token":"t0k3n","expires_in":300}"#);
            }
            if req.header("authorization") == Some("Bearer t0k3n") {
                return answer("200 OK", &[("Content-Type", "application/json")], manifest);
            }
            let challenge = format!(
                r#"Bearer realm="http://{addr}/token",service="svc",scope="repository:team/app:pull""#
            );
            answer(
                "401 Unauthorized",
                &[("WWW-Authenticate", &challenge)],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let pw = write_file(dir.path(), "pw", "secret\n", 0o600);
        let r = client_of(&server, |c| {
            c.username = Some("weir".into());
            c.password_file = Some(pw);
        });
        let cancel = Shutdown::new();
        let m = r.manifest("team/app", "1.0", &cancel).unwrap();
        assert_eq!(m.bytes, manifest);
        // No useful Content-Type: the document's own mediaType.
        assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(
            m.digest,
            format!("sha256:{}", hex::encode(Sha256::digest(manifest)))
        );
        r.manifest("team/app", "2.0", &cancel).unwrap();

        let seen = server.seen();
        let targets: Vec<&str> = seen.iter().map(|s| s.target.as_str()).collect();
        assert_eq!(
            targets,
            [
                "/v2/team/app/manifests/1.0",
                "/token?service=svc&scope=repository%3Ateam%2Fapp%3Apull",
                "/v2/team/app/manifests/1.0",
                "/v2/team/app/manifests/2.0",
            ]
        );
        let basic = format!("Basic {}", base64(b"weir:secret"));
        assert_eq!(
            seen[0].header("authorization"),
            Some(basic.as_str()),
            "basic sent up front"
        );
        assert_eq!(
            seen[1].header("authorization"),
            Some(basic.as_str()),
            "the realm gets the basic credentials"
        );
        assert_eq!(
            seen[3].header("authorization"),
            Some("Bearer t0k3n"),
            "the token is reused"
        );
        assert!(seen[0]
            .header("accept")
            .is_some_and(|a| a.contains("image.index")));
    }

    #[test]
    fn refusals_carry_the_registry_message() {
        let server = canned(|req, _, addr| {
            if req.target.starts_with("/token") {
                return answer("200 OK", &[], br#"{"access_token":"anon"}"#);
            }
            if req.target.contains("/forbidden/") {
                return answer("403 Forbidden", &[], br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#);
            }
            if req.target.contains("/basic/") {
                return answer(
                    "401 Unauthorized",
                    &[("WWW-Authenticate", r#"Basic realm="r""#)],
                    b"go away",
                );
            }
            let challenge = format!(r#"Bearer realm="http://{addr}/token",service="svc""#);
            answer(
                "401 Unauthorized",
                &[("WWW-Authenticate", &challenge)],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad token"}]}"#,
            )
        });
        let r = client_of(&server, |_| {});
        let cancel = Shutdown::new();
        let unauthorized = |e: SourceError| match e {
            SourceError::Unauthorized { message, .. } => message,
            other => panic!("{other}"),
        };
        let m = unauthorized(r.list_tags("team/forbidden/app", &cancel).unwrap_err());
        assert_eq!(m, "DENIED: requested access to the resource is denied");
        let m = unauthorized(r.list_tags("team/basic/app", &cancel).unwrap_err());
        assert_eq!(m, "HTTP 401 Unauthorized: go away");
        // Anonymous token fetched, still refused: one token, then give up.
        let before = server.seen().len();
        let m = unauthorized(r.list_tags("team/app", &cancel).unwrap_err());
        assert_eq!(m, "UNAUTHORIZED: bad token");
        let seen = &server.seen()[before..];
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(
            seen[1].header("authorization"),
            None,
            "anonymous at the realm"
        );
        assert_eq!(seen[2].header("authorization"), Some("Bearer anon"));

        // A configured token that is refused is not swapped for another.
        let dir = tempfile::tempdir().unwrap();
        let tok = write_file(dir.path(), "tok", "mine\n", 0o600);
        let r = client_of(&server, |c| c.token_file = Some(tok));
        let before = server.seen().len();
        unauthorized(r.list_tags("team/app", &cancel).unwrap_err());
        assert_eq!(server.seen().len() - before, 1);
    }

    #[test]
    fn a_manifest_that_does_not_hash_to_its_digest_is_refused() {
        let body = br#"{"schemaVersion":2}"#.to_vec();
        let real = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        let other = format!("sha256:{}", "1".repeat(64));
        let (served, answered) = (body.clone(), other.clone());
        let server = canned(move |req, _, _| {
            let ct = (
                "Content-Type",
                "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
            );
            if req.target.ends_with("/lying") {
                answer(
                    "200 OK",
                    &[ct, ("Docker-Content-Digest", &answered)],
                    &served,
                )
            } else {
                answer("200 OK", &[ct], &served)
            }
        });
        let r = client_of(&server, |_| {});
        let cancel = Shutdown::new();
        let m = r.manifest("team/app", &real, &cancel).unwrap();
        assert_eq!(m.digest, real);
        assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
        let err = r.manifest("team/app", &other, &cancel).unwrap_err();
        assert!(
            matches!(err, SourceError::Protocol { .. }) && err.to_string().contains(&other),
            "{err}"
        );
        let err = r.manifest("team/app", "lying", &cancel).unwrap_err();
        assert!(err.to_string().contains("Docker-Content-Digest"), "{err}");
        assert_eq!(server.seen().len(), 3, "a wrong digest is not asked again");

        let big = canned(|_, _, _| answer("200 OK", &[], &vec![b' '; MAX_MANIFEST_BYTES + 1]));
        let r = client_of(&big, |_| {});
        let err = r.manifest("team/app", "1.0", &cancel).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn requests_are_paced() {
        let server = canned(|_, _, _| answer("200 OK", &[], b"{}"));
        let r = client_of(&server, |c| {
            c.max_concurrent = 1;
            c.requests_per_second = 5.0;
        });
        let started = Instant::now();
        for _ in 0..4 {
            r.get_document("/d", &Shutdown::new()).unwrap();
        }
        // One at once, then one every 200 ms.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(550), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn lists_tags_page_by_page_following_relative_and_absolute_links() {
        let server = canned(|req, _, addr| {
            let (tags, link) = match req.target.as_str() {
                "/v2/team/app/tags/list?n=1" => (
                    r#"["a"]"#,
                    "</v2/team/app/tags/list?last=a&n=1>; rel=\"next\"".to_string(),
                ),
                "/v2/team/app/tags/list?last=a&n=1" => (
                    r#"["b"]"#,
                    format!("<http://{addr}/v2/team/app/tags/list?last=b&n=1>; rel=\"next\""),
                ),
                "/v2/team/app/tags/list?last=b&n=1" => (r#"["c"]"#, String::new()),
                "/v2/team/empty/tags/list?n=1" => ("null", String::new()),
                _ => return answer("404 Not Found", &[], b""),
            };
            let body = format!(r#"{{"name":"team/app","tags":{tags}}}"#);
            let headers: Vec<(&str, &str)> = if link.is_empty() {
                Vec::new()
            } else {
                vec![("Link", link.as_str())]
            };
            answer("200 OK", &headers, body.as_bytes())
        });
        let mut r = client_of(&server, |_| {});
        r.set_page_size(Some(1));
        let cancel = Shutdown::new();
        assert_eq!(r.list_tags("team/app", &cancel).unwrap(), ["a", "b", "c"]);
        let targets: Vec<String> = server.seen().into_iter().map(|s| s.target).collect();
        assert_eq!(
            targets,
            [
                "/v2/team/app/tags/list?n=1",
                "/v2/team/app/tags/list?last=a&n=1",
                "/v2/team/app/tags/list?last=b&n=1",
            ]
        );
        assert!(r.list_tags("team/empty", &cancel).unwrap().is_empty());
        let err = r.list_tags("team/none", &cancel).unwrap_err();
        assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
    }

    #[test]
    fn tag_pages_that_loop_or_leave_the_host_are_refused() {
        let server = canned(|req, _, _| {
            let link = if req.target.contains("/loop/") {
                "</v2/team/loop/tags/list>; rel=\"next\""
            } else {
                "<http://elsewhere.example/v2/team/away/tags/list?last=a>; rel=\"next\""
            };
            answer("200 OK", &[("Link", link)], br#"{"name":"x","tags":["a"]}"#)
        });
        let r = client_of(&server, |_| {});
        let cancel = Shutdown::new();
        let err = r.list_tags("team/loop", &cancel).unwrap_err();
        assert!(err.to_string().contains("same page"), "{err}");
        let err = r.list_tags("team/away", &cancel).unwrap_err();
        assert!(err.to_string().contains("leaves"), "{err}");
    }

    // ---- Debian's docker-registry ----

    const LAYERS: [LayerSpec; 2] = [LayerSpec { size: 300_000 }, LayerSpec { size: 5_000 }];

    /// Pushes a generated image as `repo:first`; returns it.
    fn push_image(
        registry: &weir_test_support::Registry,
        dir: &Path,
        repo_tag: &str,
    ) -> weir_test_support::imagegen::GeneratedImage {
        let image = oci_layout_dir(dir, "img", 11, &LAYERS, repo_tag).unwrap();
        skopeo::push(&format!("oci:{}", image.path.display()), registry, repo_tag).unwrap();
        image
    }

    /// Tags `repo`'s manifest `digest` again as `tag`, the way a client
    /// pushing the same image under another tag does.
    fn put_tag(registry: &weir_test_support::Registry, repo: &str, digest: &str, tag: &str) {
        let m = registry.get_manifest(repo, digest).unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder().proxy(None).build().into();
        agent
            .put(format!("{}/v2/{repo}/manifests/{tag}", registry.url()))
            .header("Content-Type", &m.media_type)
            .send(&m.bytes[..])
            .unwrap();
    }

    #[test]
    fn lists_tags_of_a_real_registry() {
        let Some(test_registry) = registry_or_skip(&RegistryOptions::default()) else {
            return;
        };
        if !skopeo::available() {
            return;
        }
        let registry = test_registry.registry();
        let dir = tempfile::tempdir().unwrap();
        let image = push_image(registry, dir.path(), "team-a/app:1.0");
        let digest = image.manifest_digest.clone().unwrap();
        put_tag(registry, "team-a/app", &digest, "2.0");
        put_tag(registry, "team-a/app", &digest, "3.0");

        let mut r = SourceRegistry::from_config(&config(&test_registry.addr())).unwrap();
        r.set_page_size(Some(1));
        let cancel = Shutdown::new();
        let mut tags = r.list_tags("team-a/app", &cancel).unwrap();
        tags.sort();
        assert_eq!(tags, ["1.0", "2.0", "3.0"]);
        // distribution 2.x answers every tag at once whatever `n` says
        // (paging came with 3.0): the canned server covers the paging.
        r.set_page_size(None);
        assert_eq!(r.list_tags("team-a/app", &cancel).unwrap().len(), 3);
        let err = r.list_tags("team-a/nothing", &cancel).unwrap_err();
        assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("team-a/nothing"), "{err}");
    }

    #[test]
    fn fetches_manifests_and_streams_blobs_from_a_real_registry() {
        let Some(test_registry) = registry_or_skip(&RegistryOptions::default()) else {
            return;
        };
        if !skopeo::available() {
            return;
        }
        let registry = test_registry.registry();
        let dir = tempfile::tempdir().unwrap();
        let image = push_image(registry, dir.path(), "team-a/app:1.0");
        let digest = image.manifest_digest.clone().unwrap();

        let registries = SourceRegistries::new(&[config(&test_registry.addr())]).unwrap();
        let r = registries.get(&test_registry.addr());
        let cancel = Shutdown::new();
        let by_tag = r.manifest("team-a/app", "1.0", &cancel).unwrap();
        assert_eq!(by_tag.digest, digest);
        assert_eq!(
            by_tag.media_type,
            "application/vnd.oci.image.manifest.v1+json"
        );
        let by_digest = r.manifest("team-a/app", &digest, &cancel).unwrap();
        assert_eq!(by_digest, by_tag);

        for blob in &image.blob_digests {
            let mut hasher = HashingWriter(Sha256::new(), 0);
            let n = r.blob("team-a/app", blob, &mut hasher, &cancel).unwrap();
            assert_eq!(n, hasher.1);
            assert_eq!(
                &format!("sha256:{}", hex::encode(hasher.0.finalize())),
                blob
            );
        }
        let big = &image.layer_digests[0];
        let mut out = Vec::new();
        assert!(r.blob("team-a/app", big, &mut out, &cancel).unwrap() >= 1000);

        let absent = format!("sha256:{}", "0".repeat(64));
        for err in [
            r.manifest("team-a/app", "9.9", &cancel).unwrap_err(),
            r.manifest("team-a/app", &absent, &cancel).unwrap_err(),
            r.manifest("team-a/none", "1.0", &cancel).unwrap_err(),
            r.blob("team-a/app", &absent, &mut Vec::new(), &cancel)
                .unwrap_err(),
        ] {
            assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
        }
    }

    #[test]
    fn basic_credentials_against_a_real_registry() {
        let options = RegistryOptions {
            htpasswd: Some(("weir".into(), RIGHT_PASSWORD_BCRYPT.into())),
            ..RegistryOptions::default()
        };
        let Some(test_registry) = registry_or_skip(&options) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let with_password = |password: &str| {
            let mut c = config(&test_registry.addr());
            c.username = Some("weir".into());
            c.password_file = Some(write_file(dir.path(), "pw", password, 0o600));
            SourceRegistry::from_config(&c).unwrap()
        };
        let cancel = Shutdown::new();
        // Let in: the repository is merely absent.
        let err = with_password("right-password\n")
            .list_tags("team-a/app", &cancel)
            .unwrap_err();
        assert!(matches!(err, SourceError::NotFound { .. }), "{err}");
        for r in [
            with_password("wrong-password\n"),
            SourceRegistry::from_config(&config(&test_registry.addr())).unwrap(),
        ] {
            match r.list_tags("team-a/app", &cancel) {
                Err(SourceError::Unauthorized { message, .. }) => {
                    assert!(message.contains("UNAUTHORIZED"), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    struct HashingWriter(Sha256, u64);

    impl Write for HashingWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            self.1 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
