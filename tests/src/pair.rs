//! Running the gateway pair as real processes, for end-to-end tests.
//!
//! Each test gets a [`Site`]: a temporary directory with a key, a spool, a
//! state directory per side, and config files written from the published
//! keys. Gateways run as child processes (so a test can `kill -9` them),
//! with their logs in the site directory; every child is killed on drop.

// libc::kill sends SIGTERM and SIGHUP to a gateway process; std can only SIGKILL.
#![allow(unsafe_code)]

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The directory cargo puts the workspace's binaries in (target/debug when
/// tests run from `cargo test`).
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe
        .parent()
        .context("test executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// `cargo`, for a build of the workspace's binaries from inside a test or
/// the bench, with the variables cargo set for this process taken out.
/// ring's build script reruns when `CARGO_MANIFEST_DIR` changes, so a
/// build that inherited this package's would rebuild everything above
/// ring, and the next build from a shell would rebuild it all again.
pub fn cargo_command() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_this_package = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
            || key == "CARGO_PRIMARY_PACKAGE";
        if set_for_this_package {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Path of a gateway binary, built once per test process so a plain
/// `cargo test -p weir-tests` works without a separate build step.
pub fn gateway_bin(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let release = bin_dir().map(|d| d.ends_with("release")).unwrap_or(false);
        let mut cmd = cargo_command();
        cmd.args([
            "build",
            "-q",
            "-p",
            "gateway-tx",
            "-p",
            "gateway-rx",
            "--bins",
        ]);
        if release {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build of the gateways failed: {s}")),
            Err(e) => Err(format!("running cargo build: {e}")),
        }
    });
    if let Err(e) = built {
        bail!("{e}");
    }
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!("{} not found after building", path.display());
    }
    Ok(path)
}

/// A free UDP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_udp_addr() -> Result<SocketAddr> {
    let s = UdpSocket::bind("127.0.0.1:0").context("binding a probe socket")?;
    s.local_addr().context("reading the probe address")
}

/// Polls `f` every 100 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `cond` up to `timeout`; if it never holds, fails the test
/// with `what` and the tail of each gateway's log.
pub fn expect_within(
    what: &str,
    timeout: Duration,
    gws: &mut [&mut Gateway],
    cond: impl FnMut() -> bool,
) {
    if !wait_until(timeout, cond) {
        let logs: Vec<String> = gws
            .iter_mut()
            .map(|g| {
                let running = g.is_running();
                format!("--- {} (running: {running})\n{}", g.name, g.log_tail(40))
            })
            .collect();
        panic!("{what}: not within {timeout:?}\n{}", logs.join("\n"));
    }
}

/// Whether the OCI layout at `dir` lists a manifest of `digest`.
pub fn layout_lists(dir: &Path, digest: &str) -> bool {
    std::fs::read_to_string(dir.join("index.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| {
            v["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["digest"] == digest)
        })
}

/// A counter of gateway-rx's status.json (0 until it is there).
pub fn rx_counter(site: &Site, name: &str) -> u64 {
    site.rx_status()
        .and_then(|s| s["counters"][name].as_u64())
        .unwrap_or(0)
}

/// Writes a hex key file with mode 0600, as an operator provisions it.
pub fn write_key(path: &Path, secret: &[u8]) -> Result<()> {
    std::fs::write(path, hex::encode(secret) + "\n")
        .with_context(|| format!("writing key {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod key {}", path.display()))
}

/// One running gateway process.
pub struct Gateway {
    pub name: &'static str,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Gateway {
    /// Starts `bin --config config`, logging to `log` (appended, so a
    /// restarted gateway's log follows the first one's).
    pub fn start(name: &'static str, config: &Path, log: &Path) -> Result<Gateway> {
        Self::start_with_env(name, config, log, &[])
    }

    /// Like [`Gateway::start`], with `env` added to the environment.
    pub fn start_with_env(
        name: &'static str,
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<Gateway> {
        let bin = gateway_bin(name)?;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().context("duplicating log handle")?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Gateway {
            name,
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// SIGKILL: the crash a power cut or OOM killer would cause.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit; returns its status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("gateway is not running")?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().context("waiting for the gateway")? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{} did not stop within {:?} of SIGTERM", self.name, timeout);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and returns at once.
    pub fn signal_stop(&self) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
    }

    /// SIGHUP: the gateway reads its configuration file again.
    pub fn reload(&self) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGHUP);
            }
        }
    }

    /// The exit status once the process has ended (it is reaped then).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// True while the process runs; an exited gateway is a test failure
    /// worth reporting with its log.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Where the receiver delivers.
pub enum Target {
    Registry(String),
    Layout(PathBuf),
}

/// What a site's config files say beyond the published UDP defaults: the
/// serial and dir transports, the appliance sections, top-level keys.
#[derive(Debug, Clone, Default)]
pub struct SiteLinks {
    /// Replaces `transport = "udp"` and `udp_listen` in rx.toml's `[link]`
    /// (e.g. `transport = "serial"\nserial_device = "..."\nbaud = 460800`).
    pub rx_link: Option<String>,
    /// Replaces `transport = "udp"` and `udp_peer` in tx.toml's `[link]`;
    /// may set `datagram_size` (otherwise 1400).
    pub tx_link: Option<String>,
    /// Top-level keys, before any table (e.g. `state_min_free_mb = 1`).
    pub rx_top: String,
    pub tx_top: String,
}

/// A test site: one directory holding both sides' files.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub spool: PathBuf,
    pub tx_state: PathBuf,
    pub rx_state: PathBuf,
    pub tx_config: PathBuf,
    pub rx_config: PathBuf,
    /// Where gateway-rx listens; the diode forwards here.
    pub rx_addr: SocketAddr,
    pub links: SiteLinks,
}

/// The knobs the end-to-end tests turn; everything else is default.
pub struct SiteOptions {
    pub rate_bps: u64,
    pub passes: u32,
    pub data_shards: u16,
    pub parity_shards: u16,
    pub rules_yaml: Option<String>,
    /// Extra TOML appended to tx.toml / rx.toml.
    pub tx_extra: String,
    pub rx_extra: String,
}

impl Default for SiteOptions {
    /// gateway-tx's own FEC defaults: the tests exercise what ships.
    fn default() -> Self {
        let fec = gateway_tx::config::FecConfig::default();
        SiteOptions {
            rate_bps: 40_000_000,
            passes: 3,
            data_shards: fec.data_shards,
            parity_shards: fec.parity_shards,
            rules_yaml: None,
            tx_extra: String::new(),
            rx_extra: String::new(),
        }
    }
}

pub const TEST_SECRET: [u8; 32] = *b"weir end-to-end test key 32 byte";

impl Site {
    /// Lays out the site and writes rx.toml; tx.toml is written by
    /// [`Site::write_tx_config`] once the diode's address is known.
    pub fn new(target: Target, opts: &SiteOptions) -> Result<Site> {
        Self::with_links(target, opts, SiteLinks::default())
    }

    /// Like [`Site::new`], with the transport and extra keys of `links`.
    pub fn with_links(target: Target, opts: &SiteOptions, links: SiteLinks) -> Result<Site> {
        let dir = tempfile::tempdir().context("creating the site directory")?;
        let key = dir.path().join("1.key");
        write_key(&key, &TEST_SECRET)?;
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool)?;
        let rx_addr = free_udp_addr()?;
        let site = Site {
            key,
            spool,
            tx_state: dir.path().join("tx-state"),
            rx_state: dir.path().join("rx-state"),
            tx_config: dir.path().join("tx.toml"),
            rx_config: dir.path().join("rx.toml"),
            rx_addr,
            dir,
            links,
        };
        let delivery = match &target {
            Target::Registry(url) => format!("registry_url = {url:?}\nretry_max_seconds = 2\n"),
            Target::Layout(p) => format!("oci_layout = {:?}\n", p.display().to_string()),
        };
        let link = match &site.links.rx_link {
            Some(l) => l.clone(),
            None => format!("transport = \"udp\"\nudp_listen = \"{}\"", site.rx_addr),
        };
        let rx = format!(
            "state_dir = {state:?}\n{top}\n\n[link]\n{link}\n\n\
             [[auth.keys]]\nid = 1\nfile = {key:?}\n\n[delivery]\n{delivery}\n{extra}",
            state = site.rx_state.display().to_string(),
            top = site.links.rx_top,
            key = site.key.display().to_string(),
            extra = opts.rx_extra,
        );
        std::fs::write(&site.rx_config, rx).context("writing rx.toml")?;
        Ok(site)
    }

    /// Writes tx.toml sending to `peer` (the diode's listening address), or
    /// over the link `links.tx_link` names (`peer` is then unused).
    pub fn write_tx_config(&self, peer: SocketAddr, opts: &SiteOptions) -> Result<()> {
        let policy = match &opts.rules_yaml {
            Some(yaml) => {
                let p = self.dir.path().join("rules.yaml");
                std::fs::write(&p, yaml).context("writing rules.yaml")?;
                format!("[policy]\nrules_file = {:?}\n", p.display().to_string())
            }
            None => String::new(),
        };
        let mut link = match &self.links.tx_link {
            Some(l) => l.clone(),
            None => format!("transport = \"udp\"\nudp_peer = \"{peer}\""),
        };
        if !link.contains("datagram_size") {
            link.push_str("\ndatagram_size = 1400");
        }
        let tx = format!(
            "state_dir = {state:?}\nspool_dir = {spool:?}\n{top}\n\n[link]\n{link}\n\
             rate_bps = {rate}\n\n\
             [auth]\nkey_id = 1\nkey_file = {key:?}\n\n[fec]\ndata_shards = {k}\nparity_shards = {m}\n\n\
             [carousel]\npasses = {passes}\n\n{policy}\n{extra}",
            state = self.tx_state.display().to_string(),
            spool = self.spool.display().to_string(),
            top = self.links.tx_top,
            rate = opts.rate_bps,
            key = self.key.display().to_string(),
            k = opts.data_shards,
            m = opts.parity_shards,
            passes = opts.passes,
            extra = opts.tx_extra,
        );
        std::fs::write(&self.tx_config, tx).context("writing tx.toml")
    }

    /// Starts gateway-rx and, on the default UDP link, returns once it
    /// holds its port: a sender started right after binds an ephemeral
    /// port of its own, which could otherwise be the one picked for the
    /// receiver before the receiver took it.
    pub fn start_rx(&self) -> Result<Gateway> {
        let mut rx = Gateway::start(
            "gateway-rx",
            &self.rx_config,
            &self.dir.path().join("rx.log"),
        )?;
        if self.links.rx_link.is_none() {
            let addr = self.rx_addr;
            // Read from /proc: a probe bind would hold the port for a moment
            // and could make the receiver's own bind fail.
            wait_until(Duration::from_secs(20), || {
                crate::diode::kernel_udp_drops(addr).is_some() || !rx.is_running()
            });
        }
        Ok(rx)
    }

    pub fn start_tx(&self) -> Result<Gateway> {
        self.start_tx_with_env(&[])
    }

    /// gateway-tx with `env` added (e.g. an armed crash point).
    pub fn start_tx_with_env(&self, env: &[(&str, &str)]) -> Result<Gateway> {
        Gateway::start_with_env(
            "gateway-tx",
            &self.tx_config,
            &self.dir.path().join("tx.log"),
            env,
        )
    }

    /// Drops an archive the way the convention asks: copied under a
    /// `.partial` name, then renamed into place.
    pub fn drop_image(&self, archive: &Path, name: &str) -> Result<PathBuf> {
        let partial = self.spool.join(format!("{name}.partial"));
        std::fs::copy(archive, &partial)
            .with_context(|| format!("copying {} into the spool", archive.display()))?;
        let dest = self.spool.join(name);
        std::fs::rename(&partial, &dest).context("renaming the drop into place")?;
        Ok(dest)
    }

    /// Drops still waiting in the spool: its plain files, not the done/
    /// and rejected/ folders.
    pub fn waiting_drops(&self) -> Vec<String> {
        files_in(&self.spool)
    }

    /// gateway-rx's status.json, parsed, if it exists yet.
    pub fn rx_status(&self) -> Option<serde_json::Value> {
        read_json(&self.rx_state.join("status.json"))
    }

    /// gateway-tx's status.json, parsed, if it exists yet.
    pub fn tx_status(&self) -> Option<serde_json::Value> {
        read_json(&self.tx_state.join("status.json"))
    }
}

/// A source registry as tx.toml's `[[registry]]` says how to reach it.
#[derive(Debug, Clone, Default)]
pub struct PullRegistry {
    /// `host:port` exactly as the sync list's references write it.
    pub host: String,
    pub username: Option<String>,
    /// Written beside tx.toml as `src<i>.pass` (mode 0600, as an operator
    /// provisions it) and named by a relative path.
    pub password: Option<String>,
    /// Copied beside tx.toml as `src<i>-ca.pem` and named by a relative path.
    pub ca_file: Option<PathBuf>,
    pub plain_http: bool,
    /// More keys of the table (e.g. `max_concurrent = 2`).
    pub extra: String,
}

/// tx.toml's `[pull]` and its `[[registry]]` tables.
#[derive(Debug, Clone)]
pub struct PullSetup {
    pub interval_s: u64,
    /// argv; `{ref}` and `{digest}` are the gateway's to replace.
    pub scan_command: Option<Vec<String>>,
    pub scan_timeout_s: Option<u64>,
    pub registries: Vec<PullRegistry>,
    /// More keys of `[pull]`.
    pub extra: String,
}

impl Default for PullSetup {
    /// A short poll period: the tests wait for polls.
    fn default() -> Self {
        PullSetup {
            interval_s: 2,
            scan_command: None,
            scan_timeout_s: None,
            registries: Vec::new(),
            extra: String::new(),
        }
    }
}

impl Site {
    /// The sync list tx.toml's `[pull] sync_file` names (`sync.yaml` beside it).
    pub fn sync_file(&self) -> PathBuf {
        self.dir.path().join("sync.yaml")
    }

    /// Replaces the sync list the way an editor saving it would leave it:
    /// written beside, then renamed over, so the gateway never reads half.
    pub fn write_sync_file(&self, yaml: &str) -> Result<()> {
        let partial = self.dir.path().join(".sync.yaml.partial");
        std::fs::write(&partial, yaml).context("writing the sync list")?;
        std::fs::rename(&partial, self.sync_file()).context("renaming the sync list into place")
    }

    /// The password file of the `index`th `[[registry]]`.
    pub fn password_file(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("src{index}.pass"))
    }

    /// Writes the password file of the `index`th `[[registry]]`, mode 0600.
    pub fn write_password(&self, index: usize, password: &str) -> Result<()> {
        let path = self.password_file(index);
        std::fs::write(&path, format!("{password}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", path.display()))
    }

    /// Writes the sync list and each registry's password and CA files, and
    /// returns the `[pull]` and `[[registry]]` TOML for
    /// [`SiteOptions::tx_extra`]. Files are named relative to tx.toml, as
    /// the configuration allows.
    pub fn pull_toml(&self, setup: &PullSetup, sync_yaml: &str) -> Result<String> {
        self.write_sync_file(sync_yaml)?;
        let mut toml = format!(
            "[pull]\nsync_file = \"sync.yaml\"\ninterval_s = {}\n",
            setup.interval_s
        );
        if let Some(argv) = &setup.scan_command {
            let words: Vec<String> = argv.iter().map(|w| toml_string(w)).collect();
            toml.push_str(&format!("scan_command = [{}]\n", words.join(", ")));
        }
        if let Some(timeout) = setup.scan_timeout_s {
            toml.push_str(&format!("scan_timeout_s = {timeout}\n"));
        }
        toml.push_str(&setup.extra);
        for (i, r) in setup.registries.iter().enumerate() {
            toml.push_str(&format!(
                "\n[[registry]]\nhost = {}\nplain_http = {}\n",
                toml_string(&r.host),
                r.plain_http
            ));
            if let Some(user) = &r.username {
                toml.push_str(&format!("username = {}\n", toml_string(user)));
            }
            if let Some(password) = &r.password {
                self.write_password(i, password)?;
                toml.push_str(&format!("password_file = \"src{i}.pass\"\n"));
            }
            if let Some(ca) = &r.ca_file {
                let name = format!("src{i}-ca.pem");
                std::fs::copy(ca, self.dir.path().join(&name))
                    .with_context(|| format!("copying {}", ca.display()))?;
                toml.push_str(&format!("ca_file = {}\n", toml_string(&name)));
            }
            toml.push_str(&r.extra);
        }
        Ok(toml)
    }

    /// gateway-tx's log so far (empty before it started).
    pub fn tx_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tx.log")).unwrap_or_default()
    }

    /// Runs `gateway-tx ARGS` to completion (e.g. `check-config`, `status`).
    pub fn run_tx_command(&self, args: &[&std::ffi::OsStr]) -> Result<std::process::Output> {
        let bin = gateway_bin("gateway-tx")?;
        Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", bin.display()))
    }
}

/// A TOML basic string (JSON's escapes are TOML's for what tests write).
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Names of the plain files in `dir` (an empty list if it cannot be read).
pub fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
