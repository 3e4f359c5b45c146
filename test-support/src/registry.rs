//! A real registry (Debian's `docker-registry`, i.e. distribution 2.x) on a
//! free loopback port with temporary storage, and the read-side calls tests
//! check deliveries with. The binary is looked up on `PATH` (or named by
//! `WEIR_REGISTRY_BIN`); when it is missing a test skips, except under
//! `CI=true`, where it fails (see [`crate::tools`]).
//!
//! [`Registry`] is the launcher, with `Result`s for the harness and the demo;
//! [`TestRegistry`] wraps it for unit tests that panic on a broken fixture.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::skopeo::Access;
use crate::tls::TestCerts;
use crate::tools::{self, MissingTool, DOCKER_REGISTRY};

/// Overrides the binary (e.g. an upstream `registry` build elsewhere).
pub const REGISTRY_BIN_ENV: &str = "WEIR_REGISTRY_BIN";
/// How long `start`/`restart` wait for `GET /v2/` to answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// bcrypt of "right-password" (cost 4), for htpasswd tests.
pub const RIGHT_PASSWORD_BCRYPT: &str =
    "$2b$04$CPy7H9Vs5MNr3MKu0Bh9GuYMu4CRIn1.9wnHdK0W6xZHv/UzNI6ua";

/// Every manifest type the pair moves, for `Accept`.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// How a [`Registry`] is configured.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Storage maintenance read-only mode: pushes get a 4xx.
    pub read_only: bool,
    /// (user, bcrypt hash): basic authentication through an htpasswd file.
    pub htpasswd: Option<(String, String)>,
    /// (user, password): basic authentication through an htpasswd file
    /// whose line is made here ([`htpasswd_line`]). The launcher's own
    /// read-back calls and [`Registry::access`] use these credentials.
    pub basic_auth: Option<(String, String)>,
    /// Serve https with this server certificate; the launcher's read-back
    /// calls trust its CA.
    pub tls: Option<TestCerts>,
}

impl RegistryOptions {
    /// Basic authentication for `user` with `password`.
    pub fn with_basic_auth(user: &str, password: &str) -> RegistryOptions {
        RegistryOptions {
            basic_auth: Some((user.to_string(), password.to_string())),
            ..RegistryOptions::default()
        }
    }
}

/// An htpasswd line (`user:$2b$04$...`) for distribution's `htpasswd`
/// auth. Cost 4, the lowest bcrypt takes: the registry checks the password
/// on every request, and tests make many.
pub fn htpasswd_line(user: &str, password: &str) -> Result<String> {
    if user.contains(':') || user.contains('\n') {
        bail!("htpasswd user {user:?}: no ':' or newline allowed");
    }
    let hash = bcrypt::hash(password, 4).context("bcrypt hash of the test password")?;
    Ok(format!("{user}:{hash}"))
}

/// A running `docker-registry serve` child. Killed on drop; its storage
/// (a temporary directory) is removed then too.
pub struct Registry {
    bin: PathBuf,
    addr: SocketAddr,
    work: TempDir,
    options: RegistryOptions,
    child: Option<Child>,
    client: RegistryClient,
    /// While stopped, a socket bound to the port (not listening, so
    /// connections are refused): no other test is handed the port before
    /// the restart binds it again.
    hold: Option<socket2::Socket>,
}

/// A manifest as the registry serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryManifest {
    /// `Content-Type` of the response.
    pub media_type: String,
    /// `Docker-Content-Digest` of the response.
    pub digest: String,
    pub bytes: Vec<u8>,
}

/// An image read back from the registry with every digest re-computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedImage {
    /// Digest of the manifest (or index) the tag points at.
    pub manifest_digest: String,
    pub media_type: String,
    /// Child manifest digests of an index, in index order.
    pub children: Vec<String>,
    /// Config digests (one per image manifest).
    pub config_digests: Vec<String>,
    /// Every distinct config and layer blob, in manifest order.
    pub blob_digests: Vec<String>,
}

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// The registry binary: `bin_override` (the value of [`REGISTRY_BIN_ENV`])
/// when set, else `docker-registry` on `path`; missing, the
/// [`tools::decide`] rule applies.
pub fn find_binary(
    bin_override: Option<&OsStr>,
    path: Option<&OsStr>,
    ci: Option<&OsStr>,
) -> Result<Option<PathBuf>, MissingTool> {
    if let Some(bin) = bin_override {
        return Ok(Some(PathBuf::from(bin)));
    }
    tools::decide(DOCKER_REGISTRY, path, ci)
}

fn free_loopback_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Binds `addr` without listening, with `SO_REUSEADDR` as the registry
/// (Go) binds its listener: the registry can bind the port again while
/// this is held, and an ephemeral bind elsewhere passes it over.
fn hold_port(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Why a spawn failed: an early exit (e.g. the port was taken meanwhile)
/// is worth a retry on another port, a timeout is not.
enum SpawnFailure {
    Exited(anyhow::Error),
    Other(anyhow::Error),
}

impl From<SpawnFailure> for anyhow::Error {
    fn from(f: SpawnFailure) -> Self {
        match f {
            SpawnFailure::Exited(e) | SpawnFailure::Other(e) => e,
        }
    }
}

impl Registry {
    /// Starts a registry on a free 127.0.0.1 port and waits (at most
    /// [`READY_TIMEOUT`]) until `GET /v2/` answers. Returns `None`, after
    /// saying how to install it, when the binary is missing, so a test can
    /// skip; under `CI=true` a missing binary is an error instead.
    pub fn start() -> Result<Option<Registry>> {
        Registry::start_with(RegistryOptions::default())
    }

    /// [`start`](Self::start) with read-only storage or authentication.
    pub fn start_with(options: RegistryOptions) -> Result<Option<Registry>> {
        let bin_override = std::env::var_os(REGISTRY_BIN_ENV);
        let found = if bin_override.is_some() {
            find_binary(bin_override.as_deref(), None, None)?
        } else {
            tools::find(DOCKER_REGISTRY)?
        };
        let Some(bin) = found else {
            return Ok(None);
        };
        let work = tempfile::Builder::new()
            .prefix("weir-registry-")
            .tempdir()
            .context("creating the registry's temporary directory")?;
        let storage = work.path().join("storage");
        fs::create_dir(&storage).with_context(|| format!("creating {}", storage.display()))?;
        let addr = free_loopback_port()?;
        let mut registry = Registry {
            bin,
            addr,
            work,
            options,
            child: None,
            client: RegistryClient::new(&format!("http://{addr}")),
            hold: None,
        };
        registry.client = registry.make_client()?;
        // A port found free by binding :0 can be taken again before the
        // registry binds it: retry a few times on early exit.
        let mut attempts = 1;
        loop {
            match registry.spawn() {
                Ok(()) => return Ok(Some(registry)),
                Err(SpawnFailure::Exited(_)) if attempts < 5 => {
                    attempts += 1;
                    registry.addr = free_loopback_port()?;
                    registry.client = registry.make_client()?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` when serving TLS)
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The options the registry runs with.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// How skopeo reaches this registry: its host, the credentials of
    /// `basic_auth`, and the CA of `tls` (plain http without it).
    pub fn access(&self) -> Access {
        Access {
            host: self.host(),
            creds: self.options.basic_auth.clone(),
            cert_dir: self.options.tls.as_ref().map(|t| t.cert_dir.clone()),
        }
    }

    /// A read-back client for this registry: over https trusting the
    /// test CA when serving TLS, with the `basic_auth` credentials.
    fn make_client(&self) -> Result<RegistryClient> {
        let client = match &self.options.tls {
            Some(tls) => RegistryClient::with_ca_file(&self.url(), &tls.ca_cert)?,
            None => RegistryClient::new(&self.url()),
        };
        Ok(match &self.options.basic_auth {
            Some((user, password)) => client.with_basic_auth(user, password),
            None => client,
        })
    }

    /// `127.0.0.1:PORT`, the host part of references to this registry
    /// (`docker://127.0.0.1:PORT/team-a/app:1.0`).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The registry's storage root (kept across `stop`/`restart`).
    pub fn storage_dir(&self) -> PathBuf {
        self.work.path().join("storage")
    }

    /// Everything the registry printed, across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.work.path().join("registry.log")
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the registry (SIGKILL: an outage, not a clean shutdown). The
    /// port and storage are kept for [`restart`](Self::restart).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // ESRCH (already exited) is fine; wait reaps it either way.
            let _ = child.kill();
            child
                .wait()
                .context("waiting for docker-registry to exit")?;
            self.hold = hold_port(self.addr).ok();
        }
        Ok(())
    }

    /// Starts the registry again on the same port with the same storage
    /// (stops it first if it is running) and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
            .map_err(anyhow::Error::from)
            .with_context(|| format!("restarting docker-registry on {}", self.addr))
    }

    /// Restarts the registry with changed options (same port and storage).
    pub fn restart_with(&mut self, change: impl FnOnce(&mut RegistryOptions)) -> Result<()> {
        self.stop()?;
        change(&mut self.options);
        self.client = self.make_client()?;
        self.restart()
    }

    fn write_config(&self) -> Result<PathBuf> {
        let mut htpasswd = String::new();
        if let Some((user, hash)) = &self.options.htpasswd {
            htpasswd.push_str(&format!("{user}:{hash}\n"));
        }
        if let Some((user, password)) = &self.options.basic_auth {
            htpasswd.push_str(&htpasswd_line(user, password)?);
            htpasswd.push('\n');
        }
        let auth = if htpasswd.is_empty() {
            String::new()
        } else {
            let file = self.work.path().join("htpasswd");
            fs::write(&file, htpasswd).with_context(|| format!("writing {}", file.display()))?;
            format!(
                "auth:\n  htpasswd:\n    realm: weir-test\n    path: {}\n",
                file.display()
            )
        };
        let tls = match &self.options.tls {
            Some(tls) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                tls.cert.display(),
                tls.key.display()
            ),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: {read_only}\n\
             http:\n  addr: {addr}\n  secret: weir-test-harness\n{tls}{auth}",
            storage = self.storage_dir().display(),
            read_only = self.options.read_only,
            addr = self.addr,
        );
        let path = self.work.path().join("config.yml");
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn spawn(&mut self) -> Result<(), SpawnFailure> {
        let config = self.write_config().map_err(SpawnFailure::Other)?;
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .and_then(|f| Ok((f.try_clone()?, f)))
            .with_context(|| format!("opening {}", log_path.display()))
            .map_err(SpawnFailure::Other)?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.0))
            .stderr(Stdio::from(log.1))
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))
            .map_err(SpawnFailure::Other)?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(SpawnFailure::Exited(anyhow!(
                        "docker-registry on {} exited with {status}; log tail:\n{}",
                        self.addr,
                        self.log_tail()
                    )));
                }
            }
            // 401: ready, and asking for the htpasswd credentials.
            if let Ok(response) = self.client.get("/v2/", None) {
                if matches!(response.status().as_u16(), 200 | 401) {
                    self.hold = None;
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let _ = self.stop();
                return Err(SpawnFailure::Other(anyhow!(
                    "docker-registry on {} did not answer GET /v2/ within {READY_TIMEOUT:?}; log tail:\n{}",
                    self.addr,
                    self.log_tail()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The registry's access log (all lines so far, across restarts).
    pub fn access_log(&self) -> Result<Vec<AccessLogEntry>> {
        let path = self.log_path();
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(text.lines().filter_map(parse_access_line).collect())
    }

    /// How many times `repo:tag` was pushed successfully (`PUT` of the
    /// manifest by tag answered 201): "each tag pushed once".
    pub fn manifest_puts(&self, repo: &str, tag: &str) -> Result<usize> {
        let path = format!("/v2/{repo}/manifests/{tag}");
        Ok(self
            .access_log()?
            .iter()
            .filter(|e| e.method == "PUT" && e.path == path && e.status == 201)
            .count())
    }
}

/// Read-only access to any registry by URL: what the tests and the demo
/// check delivery with. [`Registry`] derefs to one for the registry it runs.
pub struct RegistryClient {
    base: String,
    http: ureq::Agent,
    /// `Authorization` header value, when credentials were given.
    authorization: Option<String>,
}

fn agent(tls: Option<ureq::tls::TlsConfig>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_connect(Some(Duration::from_secs(2)))
        .timeout_global(Some(Duration::from_secs(300)));
    if let Some(tls) = tls {
        config = config.tls_config(tls);
    }
    config.build().into()
}

impl RegistryClient {
    /// A client for `url` (`http://host:port`, no trailing slash needed;
    /// `https://` trusts the built-in web roots only).
    pub fn new(url: &str) -> RegistryClient {
        RegistryClient {
            base: url.trim_end_matches('/').to_string(),
            http: agent(None),
            authorization: None,
        }
    }

    /// A client for an `https://` `url` whose certificate chains to the CA
    /// in `ca_file` (PEM), and to nothing else.
    pub fn with_ca_file(url: &str, ca_file: &std::path::Path) -> Result<RegistryClient> {
        let pem = fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        let ca = ureq::tls::Certificate::from_pem(&pem)
            .with_context(|| format!("{}: not a PEM certificate", ca_file.display()))?;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                ca,
            ])))
            .build();
        Ok(RegistryClient {
            base: url.trim_end_matches('/').to_string(),
            http: agent(Some(tls)),
            authorization: None,
        })
    }

    /// The same client sending basic credentials with every request.
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> RegistryClient {
        let token = base64(format!("{user}:{password}").as_bytes());
        self.authorization = Some(format!("Basic {token}"));
        self
    }

    /// `GET /v2/`: the status and the body (a registry's error JSON on 401).
    pub fn ping(&self) -> Result<(u16, String)> {
        let response = self.get("/v2/", None)?;
        let status = response.status().as_u16();
        let mut body = String::new();
        response
            .into_body()
            .into_reader()
            .take(64 * 1024)
            .read_to_string(&mut body)
            .with_context(|| format!("reading GET {}", self.api("/v2/")))?;
        Ok((status, body))
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn api(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str, accept: Option<&str>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut request = self.http.get(self.api(path));
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        request
            .call()
            .with_context(|| format!("GET {}", self.api(path)))
    }

    fn head(&self, path: &str, accept: Option<&str>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut request = self.http.head(self.api(path));
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        request
            .call()
            .with_context(|| format!("HEAD {}", self.api(path)))
    }

    /// The digest a tag resolves to (`HEAD` with every manifest type
    /// accepted, `Docker-Content-Digest`), or None when the tag is absent.
    pub fn manifest_digest(&self, repo: &str, tag: &str) -> Result<Option<String>> {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let response = self.head(&path, Some(MANIFEST_ACCEPT))?;
        match response.status().as_u16() {
            200 => Ok(Some(
                header(&response, "Docker-Content-Digest")
                    .with_context(|| format!("HEAD {path}: no Docker-Content-Digest"))?,
            )),
            404 => Ok(None),
            status => bail!("HEAD {path}: status {status}"),
        }
    }

    /// Polls [`manifest_digest`](Self::manifest_digest) until the tag exists
    /// (returns its digest) or `timeout` passes (an error).
    pub fn wait_for_tag(&self, repo: &str, tag: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            // A registry that is restarting refuses connections: keep polling.
            if let Ok(Some(digest)) = self.manifest_digest(repo, tag) {
                return Ok(digest);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{repo}:{tag} did not appear in {} within {timeout:?}",
                    self.base
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Uploads a blob (monolithic: `POST` then `PUT ?digest=`).
    pub fn put_blob(&self, repo: &str, bytes: &[u8]) -> Result<String> {
        let digest = crate::cosign::sha256(bytes);
        let path = format!("/v2/{repo}/blobs/uploads/");
        let mut request = self.http.post(self.api(&path));
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let response = request
            .send_empty()
            .with_context(|| format!("POST {path}"))?;
        if response.status().as_u16() != 202 {
            anyhow::bail!("POST {path}: {}", response.status());
        }
        let location = header(&response, "Location").context("upload without Location")?;
        let location = if location.starts_with('/') {
            self.api(&location)
        } else {
            location
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={digest}");
        let mut request = self
            .http
            .put(&url)
            .header("Content-Type", "application/octet-stream");
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let response = request.send(bytes).with_context(|| format!("PUT {url}"))?;
        if response.status().as_u16() != 201 {
            anyhow::bail!("PUT blob {digest} into {repo}: {}", response.status());
        }
        Ok(digest)
    }

    /// Puts manifest bytes under `reference` (a tag or their digest).
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let mut request = self
            .http
            .put(self.api(&path))
            .header("Content-Type", media_type);
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let mut response = request.send(bytes).with_context(|| format!("PUT {path}"))?;
        if response.status().as_u16() != 201 {
            let body = response.body_mut().read_to_string().unwrap_or_default();
            anyhow::bail!("PUT {path}: {}: {body}", response.status());
        }
        Ok(())
    }

    /// Pushes an artifact's blobs and manifest, by tag or by digest.
    pub fn push_artifact(
        &self,
        repo: &str,
        artifact: &crate::cosign::Artifact,
        tag: Option<&str>,
    ) -> Result<()> {
        for b in &artifact.blobs {
            self.put_blob(repo, b)?;
        }
        self.put_manifest(
            repo,
            tag.unwrap_or(&artifact.digest),
            &artifact.media_type,
            &artifact.manifest,
        )
    }

    /// A manifest by tag or digest, as served.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<RegistryManifest> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let response = self.get(&path, Some(MANIFEST_ACCEPT))?;
        let status = response.status().as_u16();
        if status != 200 {
            bail!("GET {path}: status {status}");
        }
        let media_type = header(&response, "Content-Type")
            .with_context(|| format!("GET {path}: no Content-Type"))?;
        let digest = header(&response, "Docker-Content-Digest")
            .with_context(|| format!("GET {path}: no Docker-Content-Digest"))?;
        let mut bytes = Vec::new();
        response
            .into_body()
            .into_reader()
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading GET {path}"))?;
        Ok(RegistryManifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// Whether the repository holds the blob (`HEAD`).
    pub fn blob_exists(&self, repo: &str, digest: &str) -> Result<bool> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        match self.head(&path, None)?.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            status => bail!("HEAD {path}: status {status}"),
        }
    }

    /// A whole blob in memory (small blobs: configs, test layers).
    pub fn blob(&self, repo: &str, digest: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.read_blob(repo, digest, &mut bytes)?;
        Ok(bytes)
    }

    /// Streams a blob through sha256: (`sha256:<hex>`, length). Memory stays
    /// flat whatever the size.
    pub fn blob_sha256(&self, repo: &str, digest: &str) -> Result<(String, u64)> {
        let mut hasher = HashingSink(Sha256::new());
        let len = self.read_blob(repo, digest, &mut hasher)?;
        Ok((format!("sha256:{}", hex::encode(hasher.0.finalize())), len))
    }

    fn read_blob(&self, repo: &str, digest: &str, out: &mut dyn io::Write) -> Result<u64> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let response = self.get(&path, None)?;
        let status = response.status().as_u16();
        if status != 200 {
            bail!("GET {path}: status {status}");
        }
        io::copy(&mut response.into_body().into_reader(), out)
            .with_context(|| format!("reading GET {path}"))
    }

    /// Tags of a repository (empty when it does not exist).
    pub fn tags(&self, repo: &str) -> Result<Vec<String>> {
        let path = format!("/v2/{repo}/tags/list");
        let response = self.get(&path, None)?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(Vec::new()),
            status => bail!("GET {path}: status {status}"),
        }
        let list: serde_json::Value = read_json(response, &path)?;
        Ok(string_array(&list["tags"]))
    }

    /// Repositories in the registry.
    pub fn catalog(&self) -> Result<Vec<String>> {
        let path = "/v2/_catalog";
        let response = self.get(path, None)?;
        let status = response.status().as_u16();
        if status != 200 {
            bail!("GET {path}: status {status}");
        }
        let list: serde_json::Value = read_json(response, path)?;
        Ok(string_array(&list["repositories"]))
    }

    /// Reads the image a tag (or digest) names and re-computes every digest:
    /// the manifest bytes against `Docker-Content-Digest`, each child
    /// manifest of an index, and every config and layer blob (streamed),
    /// with its size checked against its descriptor. Fails on the first
    /// mismatch, naming it.
    pub fn verify_image(&self, repo: &str, reference: &str) -> Result<VerifiedImage> {
        let top = self.get_manifest(repo, reference)?;
        let top_digest = check_manifest_bytes(repo, reference, &top)?;
        let mut verified = VerifiedImage {
            manifest_digest: top_digest,
            media_type: top.media_type.clone(),
            children: Vec::new(),
            config_digests: Vec::new(),
            blob_digests: Vec::new(),
        };
        let doc: serde_json::Value = serde_json::from_slice(&top.bytes)
            .with_context(|| format!("{repo}:{reference}: manifest is not JSON"))?;
        if INDEX_TYPES.contains(&top.media_type.as_str()) {
            for child in doc["manifests"].as_array().into_iter().flatten() {
                let digest = child["digest"]
                    .as_str()
                    .with_context(|| format!("{repo}:{reference}: index entry without digest"))?;
                let manifest = self.get_manifest(repo, digest)?;
                check_manifest_bytes(repo, digest, &manifest)?;
                let child_doc: serde_json::Value = serde_json::from_slice(&manifest.bytes)
                    .with_context(|| format!("{repo}@{digest}: manifest is not JSON"))?;
                self.verify_image_blobs(repo, digest, &child_doc, &mut verified)?;
                verified.children.push(digest.to_string());
            }
        } else {
            self.verify_image_blobs(repo, reference, &doc, &mut verified)?;
        }
        Ok(verified)
    }

    fn verify_image_blobs(
        &self,
        repo: &str,
        reference: &str,
        manifest: &serde_json::Value,
        verified: &mut VerifiedImage,
    ) -> Result<()> {
        let config = &manifest["config"];
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        for (i, descriptor) in std::iter::once(config).chain(layers.iter()).enumerate() {
            let what = if i == 0 {
                "config".to_string()
            } else {
                format!("layer {}", i - 1)
            };
            let digest = descriptor["digest"]
                .as_str()
                .with_context(|| format!("{repo}:{reference}: {what} without digest"))?;
            let size = descriptor["size"].as_u64();
            if i == 0 {
                verified.config_digests.push(digest.to_string());
            }
            if verified.blob_digests.iter().any(|d| d == digest) {
                continue;
            }
            let (actual, len) = self.blob_sha256(repo, digest)?;
            if actual != digest {
                bail!("{repo}:{reference}: {what} {digest} re-hashes to {actual}");
            }
            if size.is_some_and(|s| s != len) {
                bail!(
                    "{repo}:{reference}: {what} {digest} is {len} bytes, descriptor says {size:?}"
                );
            }
            verified.blob_digests.push(digest.to_string());
        }
        Ok(())
    }
}

impl std::ops::Deref for Registry {
    type Target = RegistryClient;
    fn deref(&self) -> &RegistryClient {
        &self.client
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A [`Registry`] for unit tests: every call panics when the fixture
/// breaks, and [`addr`](Self::addr) is the `host:port` string image
/// references take.
pub struct TestRegistry {
    registry: Registry,
}

/// A running registry, or None (after saying how to install it) when the
/// binary is missing; under `CI=true` a missing binary fails the test.
pub fn registry_or_skip(options: &RegistryOptions) -> Option<TestRegistry> {
    Registry::start_with(options.clone())
        .unwrap_or_else(|e| panic!("{e:#}"))
        .map(|registry| TestRegistry { registry })
}

impl TestRegistry {
    pub fn default_options() -> RegistryOptions {
        RegistryOptions::default()
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        self.registry.host()
    }

    /// The launcher underneath, for its read-back calls.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Starts the registry again on the same port and storage.
    pub fn start(&mut self) {
        assert!(!self.registry.is_running(), "registry already running");
        self.registry.restart().unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub fn stop(&mut self) {
        self.registry.stop().unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub fn restart_with(&mut self, change: impl FnOnce(&mut RegistryOptions)) {
        self.registry
            .restart_with(change)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// How many times the registry accepted a manifest PUT for `repo:tag`
    /// (from its access log).
    pub fn manifest_puts(&self, repo: &str, tag: &str) -> usize {
        self.registry
            .manifest_puts(repo, tag)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// Standard base64 with padding (RFC 4648), for the basic auth header.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct HashingSink(Sha256);

impl io::Write for HashingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn read_json(response: ureq::http::Response<ureq::Body>, path: &str) -> Result<serde_json::Value> {
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading GET {path}"))?;
    serde_json::from_slice(&bytes).with_context(|| format!("GET {path}: not JSON"))
}

fn string_array(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// Checks the served bytes hash to the served digest; returns the digest.
fn check_manifest_bytes(repo: &str, reference: &str, m: &RegistryManifest) -> Result<String> {
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&m.bytes)));
    if actual != m.digest {
        bail!(
            "{repo}:{reference}: manifest bytes hash to {actual}, registry says {}",
            m.digest
        );
    }
    Ok(actual)
}

/// `127.0.0.1 - - [date] "PUT /v2/x/manifests/1 HTTP/1.1" 201 0 "" "ua"`
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let mut quoted = line.split('"');
    let _client = quoted.next()?;
    let request = quoted.next()?;
    let after = quoted.next()?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    parts.next()?.strip_prefix("HTTP/")?;
    let status = after.split_whitespace().next()?.parse().ok()?;
    Some(AccessLogEntry {
        method,
        path,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::skopeo;
    use std::path::Path;
    use weir_imagegen::{multiarch_oci_layout_dir, oci_layout_dir, LayerSpec};

    const LAYERS: [LayerSpec; 2] = [LayerSpec { size: 200_000 }, LayerSpec { size: 5_000 }];

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn parses_access_log_lines() {
        let line = r#"127.0.0.1 - - [23/Nov/2026:11:53:43 +0000] "PUT /v2/team-a/multi/manifests/1 HTTP/1.1" 201 0 "" "skopeo/1.9.3""#;
        assert_eq!(
            parse_access_line(line),
            Some(AccessLogEntry {
                method: "PUT".into(),
                path: "/v2/team-a/multi/manifests/1".into(),
                status: 201
            })
        );
        assert_eq!(
            parse_access_line(r#"time="x" level=info msg="response completed""#),
            None
        );
    }

    #[test]
    fn base64_matches_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(
            base64(b"mirror:right-password"),
            "bWlycm9yOnJpZ2h0LXBhc3N3b3Jk"
        );
    }

    #[test]
    fn htpasswd_lines_hold_a_bcrypt_of_the_password() {
        let line = htpasswd_line("mirror", "right-password").unwrap();
        let (user, hash) = line.split_once(':').unwrap();
        assert_eq!(user, "mirror");
        assert!(hash.starts_with("$2"), "{hash}");
        assert!(bcrypt::verify("right-password", hash).unwrap());
        assert!(!bcrypt::verify("wrong-password", hash).unwrap());
        assert!(htpasswd_line("a:b", "x").is_err());
    }

    /// What pull mode's wrong-password test relies on: the registry refuses
    /// a wrong password with 401 and its own message, and serves the right one.
    #[test]
    fn an_htpasswd_registry_refuses_a_wrong_password_and_serves_the_right_one() {
        let options = RegistryOptions::with_basic_auth("mirror", "right-password");
        let Some(registry) = Registry::start_with(options).unwrap() else {
            return;
        };
        let (status, _) = registry.ping().unwrap();
        assert_eq!(status, 200, "the launcher's own client has the password");
        let url = registry.url();
        let wrong = RegistryClient::new(&url).with_basic_auth("mirror", "wrong-password");
        let (status, body) = wrong.ping().unwrap();
        assert_eq!(status, 401);
        assert!(body.contains("authentication required"), "{body}");
        assert!(
            wrong.manifest_digest("team-a/app", "1").is_err(),
            "401 is no answer"
        );
        let (status, _) = RegistryClient::new(&url).ping().unwrap();
        assert_eq!(status, 401, "no credentials, no access");
        let right = RegistryClient::new(&url).with_basic_auth("mirror", "right-password");
        assert_eq!(right.ping().unwrap().0, 200);
        assert_eq!(right.manifest_digest("team-a/app", "1").unwrap(), None);
        let statuses: Vec<u16> = registry
            .access_log()
            .unwrap()
            .iter()
            .map(|e| e.status)
            .collect();
        assert!(statuses.contains(&401), "{statuses:?}");
    }

    #[test]
    fn a_tls_registry_is_trusted_through_the_test_ca_only() {
        let dir = tempfile::tempdir().unwrap();
        let Some(certs) = crate::tls::certs_or_skip(dir.path()).unwrap() else {
            return;
        };
        let options = RegistryOptions {
            tls: Some(certs.clone()),
            ..RegistryOptions::with_basic_auth("mirror", "right-password")
        };
        let Some(registry) = Registry::start_with(options).unwrap() else {
            return;
        };
        assert!(registry.url().starts_with("https://127.0.0.1:"));
        assert_eq!(registry.ping().unwrap().0, 200);
        let trusting = RegistryClient::with_ca_file(&registry.url(), &certs.ca_cert)
            .unwrap()
            .with_basic_auth("mirror", "right-password");
        assert_eq!(trusting.ping().unwrap().0, 200);
        let err = RegistryClient::new(&registry.url())
            .ping()
            .expect_err("a client without the test CA must not connect");
        assert!(
            format!("{err:#}").contains("GET https://127.0.0.1"),
            "{err:#}"
        );
        let plain = RegistryClient::new(&format!("http://{}", registry.host()));
        assert!(
            !matches!(plain.ping(), Ok((200, _))),
            "plain http must not be served"
        );
    }

    #[test]
    fn empty_registry_answers_and_knows_no_tag() {
        let Some(registry) = Registry::start().unwrap() else {
            return;
        };
        assert!(registry.url().starts_with("http://127.0.0.1:"));
        assert_eq!(registry.catalog().unwrap(), Vec::<String>::new());
        assert_eq!(registry.tags("team-a/app").unwrap(), Vec::<String>::new());
        assert_eq!(registry.manifest_digest("team-a/app", "1.0").unwrap(), None);
        assert!(registry.get_manifest("team-a/app", "1.0").is_err());
        let absent = format!("sha256:{}", "0".repeat(64));
        assert!(!registry.blob_exists("team-a/app", &absent).unwrap());
        let waited = registry.wait_for_tag("team-a/app", "1.0", Duration::from_millis(300));
        assert!(waited.is_err());
    }

    #[test]
    fn serves_a_loaded_image_with_its_source_digests() {
        let Some(registry) = Registry::start().unwrap() else {
            return;
        };
        if !skopeo::available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = oci_layout_dir(dir.path(), "app", 1, &LAYERS, "team-a/app:1.0").unwrap();
        skopeo::push(
            &format!("oci:{}", image.path.display()),
            &registry,
            "team-a/app:1.0",
        )
        .unwrap();

        let digest = registry.manifest_digest("team-a/app", "1.0").unwrap();
        assert_eq!(digest, image.manifest_digest);
        let manifest = registry.get_manifest("team-a/app", "1.0").unwrap();
        assert_eq!(
            manifest.media_type,
            "application/vnd.oci.image.manifest.v1+json"
        );
        let verified = registry.verify_image("team-a/app", "1.0").unwrap();
        assert_eq!(Some(verified.manifest_digest), image.manifest_digest);
        assert_eq!(verified.config_digests, vec![image.config_digest.clone()]);
        assert_eq!(
            sorted(verified.blob_digests),
            sorted(image.blob_digests.clone())
        );
        let config = registry.blob("team-a/app", &image.config_digest).unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&config).is_ok());
        let (layer, len) = registry
            .blob_sha256("team-a/app", &image.layer_digests[0])
            .unwrap();
        assert_eq!(layer, image.layer_digests[0]);
        assert!(len > 0);
        assert_eq!(registry.tags("team-a/app").unwrap(), vec!["1.0"]);
        assert_eq!(registry.catalog().unwrap(), vec!["team-a/app"]);
        assert_eq!(registry.manifest_puts("team-a/app", "1.0").unwrap(), 1);
    }

    #[test]
    fn verifies_a_multiarch_index_and_every_child() {
        let Some(registry) = Registry::start().unwrap() else {
            return;
        };
        if !skopeo::available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let platforms = [("linux", "amd64"), ("linux", "arm64")];
        let image =
            multiarch_oci_layout_dir(dir.path(), "m", 2, &platforms, &LAYERS, "team-a/multi:2")
                .unwrap();
        skopeo::push(
            &format!("oci:{}", image.path.display()),
            &registry,
            "team-a/multi:2",
        )
        .unwrap();
        let verified = registry.verify_image("team-a/multi", "2").unwrap();
        assert_eq!(
            Some(verified.manifest_digest.clone()),
            image.manifest_digest
        );
        assert_eq!(
            verified.media_type,
            "application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(verified.children, image.children);
        assert_eq!(
            sorted(verified.blob_digests),
            sorted(image.blob_digests.clone())
        );
    }

    #[test]
    fn verify_image_catches_a_corrupted_blob() {
        let Some(registry) = Registry::start().unwrap() else {
            return;
        };
        if !skopeo::available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = oci_layout_dir(dir.path(), "app", 4, &LAYERS, "team-a/app:1.0").unwrap();
        skopeo::push(
            &format!("oci:{}", image.path.display()),
            &registry,
            "team-a/app:1.0",
        )
        .unwrap();
        let hex = image.layer_digests[1].trim_start_matches("sha256:");
        let data = registry
            .storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut bytes = fs::read(&data).unwrap();
        bytes[100] ^= 0xff;
        fs::write(&data, bytes).unwrap();
        let err = registry
            .verify_image("team-a/app", "1.0")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&image.layer_digests[1]), "{err}");
        assert!(err.contains("re-hashes"), "{err}");
    }

    #[test]
    fn stop_and_restart_keep_port_and_storage() {
        let Some(mut registry) = Registry::start().unwrap() else {
            return;
        };
        if !skopeo::available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = oci_layout_dir(dir.path(), "app", 5, &LAYERS, "team-a/app:1.0").unwrap();
        let src = format!("oci:{}", image.path.display());
        skopeo::push(&src, &registry, "team-a/app:1.0").unwrap();
        let url = registry.url();

        registry.stop().unwrap();
        assert!(!registry.is_running());
        assert!(
            registry.manifest_digest("team-a/app", "1.0").is_err(),
            "down means down"
        );
        assert!(skopeo::push(&src, &registry, "team-a/app:2.0").is_err());

        registry.restart().unwrap();
        assert!(registry.is_running());
        assert_eq!(registry.url(), url);
        assert_eq!(
            registry.manifest_digest("team-a/app", "1.0").unwrap(),
            image.manifest_digest
        );
        assert_eq!(
            registry.manifest_puts("team-a/app", "1.0").unwrap(),
            1,
            "log kept across restarts"
        );
    }

    #[test]
    fn drop_kills_the_registry() {
        let Some(mut registry) = Registry::start().unwrap() else {
            return;
        };
        let pid = registry.child.as_ref().map(Child::id).unwrap();
        assert!(registry.is_running());
        let addr = registry.addr();
        drop(registry);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "registry process {pid} still there"
        );
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "port still answers"
        );
    }

    #[test]
    fn the_launcher_fails_under_ci_without_docker_registry_on_path() {
        let empty = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([empty.path()]).unwrap();
        let err = find_binary(None, Some(&path), Some(OsStr::new("true"))).unwrap_err();
        assert!(
            err.to_string()
                .contains("apt-get install -y docker-registry"),
            "{err}"
        );
        assert_eq!(find_binary(None, Some(&path), None), Ok(None));
        let named = OsStr::new("/opt/registry/bin/registry");
        assert_eq!(
            find_binary(Some(named), Some(&path), Some(OsStr::new("true"))),
            Ok(Some(PathBuf::from(named)))
        );
    }

    /// A registry test, run again as a child with `CI=true` and a `PATH`
    /// without `docker-registry`, fails; with `CI` unset it skips and passes.
    #[test]
    fn a_registry_test_fails_under_ci_without_docker_registry_on_path() {
        let empty = tempfile::tempdir().unwrap();
        let run = |ci: Option<&str>| {
            let mut child = Command::new(std::env::current_exe().unwrap());
            child
                .args([
                    "--exact",
                    "registry::tests::empty_registry_answers_and_knows_no_tag",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("PATH", empty.path())
                .env_remove(REGISTRY_BIN_ENV)
                .env_remove("CI");
            if let Some(ci) = ci {
                child.env("CI", ci);
            }
            child.output().unwrap()
        };
        let in_ci = run(Some("true"));
        let out = String::from_utf8_lossy(&in_ci.stdout).into_owned()
            + &String::from_utf8_lossy(&in_ci.stderr);
        assert!(!in_ci.status.success(), "passed under CI=true:\n{out}");
        assert!(out.contains("1 failed"), "{out}");
        assert!(out.contains("apt-get install -y docker-registry"), "{out}");

        let outside = run(None);
        let out = String::from_utf8_lossy(&outside.stdout).into_owned()
            + &String::from_utf8_lossy(&outside.stderr);
        assert!(outside.status.success(), "{out}");
        assert!(out.contains("1 passed"), "{out}");
        assert!(out.contains("SKIPPED: docker-registry not found"), "{out}");
    }
}
