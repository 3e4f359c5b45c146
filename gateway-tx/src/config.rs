//! The configuration of gateway-tx: one TOML file, one serde type.
//!
//! The published keys are the contract; everything else has a default,
//! documented on its field and in `examples/tx.toml`. Relative paths are
//! taken relative to the directory of the configuration file, so an example
//! works wherever it is checked out. `[console]`, `[leds]`, `[metrics]`,
//! the transport and the reading of the file are shared with gateway-rx
//! ([`weir_host::config`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use weir_host::config::{
    base_dir, check_serial_link, default_baud, default_datagram_size, default_state_min_free_mb,
    read_toml, resolve, resolve_console_and_leds, resolve_opt, FieldError,
};
pub use weir_host::config::{ConsoleConfig, LedsConfig, MetricsConfig, Transport};
use weir_proto::{FecParams, Key};

/// Largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

/// Everything gateway-tx needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxConfig {
    /// Where the object store lives: sled database, object payload files,
    /// `status.json`. Created when missing.
    pub state_dir: PathBuf,
    /// The file drop. Created when missing, with `done/` and `rejected/`.
    pub spool_dir: PathBuf,
    /// Intake stops, with the fault "state disk full", while the disk of
    /// `state_dir` has less than this many MiB free: sled must always find
    /// room for its log. Intake resumes 1 MiB above it. Default 64; 0 leaves
    /// only the reaction to a write that fails for want of space.
    #[serde(default = "default_state_min_free_mb")]
    pub state_min_free_mb: u64,
    pub link: LinkConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub fec: FecConfig,
    #[serde(default)]
    pub carousel: CarouselConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Repository prefix rewrites, source → destination; the longest
    /// matching `from` wins. None: the destination is the source path.
    #[serde(default)]
    pub mapping: Vec<Mapping>,
    /// The serial console. Absent: no console.
    #[serde(default)]
    pub console: Option<ConsoleConfig>,
    /// The status LEDs. Absent: no LEDs are driven (faults still show in
    /// status.json and on the console).
    #[serde(default)]
    pub leds: Option<LedsConfig>,
    /// The Prometheus endpoint. Absent: none.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Pull mode: images pulled from source registries by a sync list.
    /// Absent: only file drops.
    #[serde(default)]
    pub pull: Option<PullConfig>,
    /// Source registries pull mode talks to, one per host as the sync
    /// list's references write it. A host not listed is reached
    /// anonymously over https.
    #[serde(default)]
    pub registry: Vec<RegistryConfig>,
    /// The image ledger.
    #[serde(default)]
    pub ledger: LedgerConfig,
}

/// `[ledger]`: the image ledger's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// The key (hex, mode 0600, like the link key) gateway-rx HMACs its
    /// ledger report under; `reconcile` needs it. The same key on both
    /// sides, and not the link key.
    pub report_key_file: Option<PathBuf>,
    /// Newest records always kept; older ones whose images left the
    /// carousel (retention over, passes done) are pruned, the last one
    /// kept as the chain's checkpoint.
    #[serde(default = "default_keep_records")]
    pub keep_records: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            report_key_file: None,
            keep_records: default_keep_records(),
        }
    }
}

fn default_keep_records() -> u64 {
    weir_proto::ledger::DEFAULT_KEEP_RECORDS
}

/// `[pull]`: what to pull and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullConfig {
    /// The sync list (YAML; relative to the configuration file). Re-read
    /// when it changes; a new version that does not validate is refused and
    /// the previous one stays in force.
    pub sync_file: PathBuf,
    /// Seconds between polls of an entry that sets no `interval_s`.
    #[serde(default = "default_pull_interval_s")]
    pub interval_s: u64,
    /// Where the scan report of a pulled image comes from. Default
    /// `command` when `scan_command` is set, otherwise none (a rule with a
    /// gate then refuses with `no-scan-report`, as for a drop without one).
    #[serde(default)]
    pub scanner: Option<Scanner>,
    /// argv of a scanner printing its JSON report on stdout; `{ref}` and
    /// `{digest}` are replaced by the source reference and manifest digest.
    #[serde(default)]
    pub scan_command: Option<Vec<String>>,
    /// Seconds a scan may take before it is killed (the image is then
    /// refused with `bad-scan-report`, and tried again only once the rules
    /// or the scanner settings change).
    #[serde(default = "default_scan_timeout_s")]
    pub scan_timeout_s: u64,
}

/// The source of pulled images' scan reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scanner {
    /// `scan_command`'s stdout.
    Command,
    /// The source registry's Quay security API
    /// (`/api/v1/repository/<repo>/manifest/<digest>/security`).
    Quay,
}

/// `[[registry]]`: how to reach one source registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `host[:port]` exactly as the sync list's references write it.
    pub host: String,
    /// Basic credentials: `username` with the password in `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// Mode 0600 or stricter, like key files; one line.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A bearer token instead of username/password; mode 0600.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) the registry's TLS certificate chains to,
    /// instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// http instead of https (loopback tests, a registry behind a proxy).
    #[serde(default)]
    pub plain_http: bool,
    /// Requests in flight to this registry at most.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Requests started per second at most.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: f64,
}

fn default_pull_interval_s() -> u64 {
    600
}
fn default_scan_timeout_s() -> u64 {
    300
}
fn default_max_concurrent() -> u32 {
    4
}
fn default_requests_per_second() -> f64 {
    20.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// `udp`, `serial` or `dir`.
    pub transport: Transport,
    /// Receiver address for `udp`, e.g. `192.0.2.10:7700`. Required for udp.
    #[serde(default)]
    pub udp_peer: Option<SocketAddr>,
    /// The tty of the diode's serial line, e.g. `/dev/ttyS2`. Required for
    /// serial.
    #[serde(default)]
    pub serial_device: Option<PathBuf>,
    /// Line rate of the serial device, 8N1. Default 115200.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Directory a file-transfer diode takes batch files from. Required
    /// for dir; created when missing.
    #[serde(default)]
    pub outbox_dir: Option<PathBuf>,
    /// Largest batch file written into `outbox_dir`. Default 4 MiB.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: usize,
    /// A batch file is closed at the latest this long after its first frame.
    /// Default 5000.
    #[serde(default = "default_max_file_age_ms")]
    pub max_file_age_ms: u64,
    /// Wire bits per second, frame headers and tags included. Required.
    /// On serial, clamped to what the line carries (see [`TxConfig::pacing`]).
    pub rate_bps: u64,
    /// Bytes per frame on the wire. Default 1400 (fits a 1500-byte MTU).
    #[serde(default = "default_datagram_size")]
    pub datagram_size: usize,
    /// Bytes the transport adds per frame, counted against `rate_bps`.
    /// Default 0: the rate counts frame bytes. Set 28 for IPv4+UDP headers,
    /// 66 to also count Ethernet framing.
    #[serde(default)]
    pub frame_overhead_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Key id carried in every frame; the receiver must hold this id.
    pub key_id: u16,
    /// Hex key file, mode 0600, at least 32 bytes of secret.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FecConfig {
    /// k: data shards per block. Default 128: the more shards a block has,
    /// the closer its losses stay to the link's average, so less parity
    /// covers the unlucky blocks (see the README's performance section).
    #[serde(default = "default_data_shards")]
    pub data_shards: u16,
    /// m: parity shards per block (any k of k+m rebuild it). Default 20:
    /// a pass completes every block at up to about 5 % loss.
    #[serde(default = "default_parity_shards")]
    pub parity_shards: u16,
}

impl Default for FecConfig {
    fn default() -> Self {
        FecConfig {
            data_shards: default_data_shards(),
            parity_shards: default_parity_shards(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarouselConfig {
    /// Passes every object gets before it only cycles when idle. Default 3.
    #[serde(default = "default_passes")]
    pub passes: u32,
    /// How long after ingest an image keeps cycling on an idle link, and its
    /// payload stays on disk: past it, once its passes are done, the image
    /// leaves the queue and its payload files not named by another queued
    /// image are deleted (the sender's retention). Default 72 (a diode may
    /// be down for days).
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    /// Blocks interleaved together: a burst of B lost frames costs each
    /// block about B / window_blocks shards. Also the unit of round-robin
    /// between images. Default 8.
    #[serde(default = "default_window_blocks")]
    pub window_blocks: u32,
    /// Shard frames between repeats of the object header. Default 256: shard
    /// frames describe their object themselves, the header only carries its
    /// digest and kind early, so it need not cost more than 0.4 % of the wire.
    #[serde(default = "default_header_every")]
    pub header_every: u32,
}

impl Default for CarouselConfig {
    fn default() -> Self {
        CarouselConfig {
            passes: default_passes(),
            retention_hours: default_retention_hours(),
            window_blocks: default_window_blocks(),
            header_every: default_header_every(),
        }
    }
}

/// How uncompressed docker-archive layers cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`, deterministic output.
    Gzip,
    /// Layers cross as plain tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Default "gzip": the diode is the bottleneck.
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// 0..=9. Default 6.
    #[serde(default = "default_gzip_level")]
    pub gzip_level: u32,
    /// How often the spool directory is listed. Default 1000 ms.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            compression: default_compression(),
            gzip_level: default_gzip_level(),
            poll_interval_ms: default_poll_interval_ms(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Rules YAML (namespaces + rules with gates). None: every image passes.
    #[serde(default)]
    pub rules_file: Option<PathBuf>,
    /// What becomes of an image's signatures, attestations and SBOMs.
    #[serde(default)]
    pub referrers: ReferrersMode,
}

/// `[policy] referrers`: whether referrers cross with their image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferrersMode {
    /// They cross when the image has them.
    #[default]
    Carry,
    /// They cross, and an image without any is refused (`referrers-missing`).
    Require,
    /// They are read for the signature gate but do not cross.
    Drop,
}

/// Rewrites a repository prefix: `from = "team-a/"`, `to = "mirror/team-a/"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub from: String,
    pub to: String,
}

fn default_max_file_bytes() -> usize {
    4 << 20
}
fn default_max_file_age_ms() -> u64 {
    5000
}
fn default_data_shards() -> u16 {
    128
}
fn default_parity_shards() -> u16 {
    20
}
fn default_passes() -> u32 {
    3
}
fn default_retention_hours() -> u64 {
    72
}
fn default_window_blocks() -> u32 {
    8
}
fn default_header_every() -> u32 {
    256
}
fn default_compression() -> Compression {
    Compression::Gzip
}
fn default_gzip_level() -> u32 {
    6
}
fn default_poll_interval_ms() -> u64 {
    1000
}

/// Bytes a batch file adds around one frame: file header and record length.
pub const DIR_FILE_OVERHEAD: usize =
    weir_proto::framing::batch::FILE_HEADER_LEN + weir_proto::framing::batch::RECORD_PREFIX_LEN;

/// What the carousel paces to; see [`TxConfig::pacing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Bits per second of wire bytes (each frame plus `frame_overhead`).
    pub rate_bps: u64,
    /// Bytes counted per frame on top of the frame itself.
    pub frame_overhead: u32,
    /// The configured `rate_bps`, when it was lowered to fit the line.
    pub clamped_from: Option<u64>,
}

/// A configuration value that cannot work; names the field.
pub type ConfigError = FieldError;

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    FieldError::new(field, message)
}

impl TxConfig {
    /// Reads, parses and validates a configuration file. Errors name the
    /// file and the field.
    pub fn load(path: &Path) -> anyhow::Result<TxConfig> {
        let mut config: TxConfig = read_toml(path)?;
        config.resolve_paths(&base_dir(path));
        config.validate().map_err(|e| e.in_file(path))?;
        Ok(config)
    }

    /// Makes relative paths relative to `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.state_dir);
        resolve(base, &mut self.spool_dir);
        resolve(base, &mut self.auth.key_file);
        resolve_opt(base, &mut self.policy.rules_file);
        resolve_opt(base, &mut self.link.serial_device);
        resolve_opt(base, &mut self.link.outbox_dir);
        resolve_console_and_leds(base, &mut self.console, &mut self.leds);
        if let Some(p) = &mut self.pull {
            resolve(base, &mut p.sync_file);
        }
        for r in &mut self.registry {
            resolve_opt(base, &mut r.password_file);
            resolve_opt(base, &mut r.token_file);
            resolve_opt(base, &mut r.ca_file);
        }
        resolve_opt(base, &mut self.ledger.report_key_file);
    }

    /// The ledger report key, if one is configured.
    pub fn report_key(&self) -> Result<Option<Key>, weir_host::KeyFileError> {
        self.ledger
            .report_key_file
            .as_deref()
            .map(|p| weir_host::load_key(0, p))
            .transpose()
    }

    /// Checks every range and loads what must load (key, rules).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.link;
        if l.rate_bps == 0 {
            return Err(invalid("link.rate_bps", "must be greater than 0"));
        }
        match l.transport {
            Transport::Udp => match l.udp_peer {
                None => {
                    return Err(invalid(
                        "link.udp_peer",
                        "required when transport = \"udp\" (e.g. \"192.0.2.10:7700\")",
                    ))
                }
                Some(peer) if peer.port() == 0 || peer.ip().is_unspecified() => {
                    return Err(invalid(
                        "link.udp_peer",
                        format!("{peer} names no receiver: give its address and port"),
                    ))
                }
                Some(_) => {}
            },
            Transport::Serial => check_serial_link(l.serial_device.as_deref(), l.baud)?,
            Transport::Dir => {
                if l.outbox_dir.is_none() {
                    return Err(invalid(
                        "link.outbox_dir",
                        "required when transport = \"dir\"",
                    ));
                }
                let smallest = l.datagram_size + DIR_FILE_OVERHEAD;
                if l.max_file_bytes < smallest {
                    return Err(invalid(
                        "link.max_file_bytes",
                        format!(
                            "{} cannot hold one frame of datagram_size {} (at least {smallest})",
                            l.max_file_bytes, l.datagram_size
                        ),
                    ));
                }
                if l.max_file_age_ms == 0 {
                    return Err(invalid("link.max_file_age_ms", "must be at least 1"));
                }
            }
        }
        if let Some(c) = &self.console {
            c.validate()?;
        }
        if let Some(m) = &self.metrics {
            m.validate()?;
        }
        if self
            .leds
            .as_ref()
            .is_some_and(|l| l.hmac_fault_threshold.is_some())
        {
            return Err(invalid(
                "leds.hmac_fault_threshold",
                "only gateway-rx has it: the sender checks no tags",
            ));
        }
        if l.datagram_size > MAX_DATAGRAM {
            return Err(invalid(
                "link.datagram_size",
                format!(
                    "{} exceeds the UDP maximum of {MAX_DATAGRAM}",
                    l.datagram_size
                ),
            ));
        }
        let total = self.fec.data_shards as usize + self.fec.parity_shards as usize;
        if self.fec.data_shards == 0 {
            return Err(invalid("fec.data_shards", "must be at least 1"));
        }
        if total > weir_proto::fec::MAX_SHARDS_PER_BLOCK {
            return Err(invalid(
                "fec.parity_shards",
                format!(
                    "data_shards + parity_shards = {total}; at most {} fit one block",
                    weir_proto::fec::MAX_SHARDS_PER_BLOCK
                ),
            ));
        }
        self.fec_params()
            .map_err(|e| invalid("link.datagram_size", e.to_string()))?;
        let c = &self.carousel;
        if c.passes == 0 {
            return Err(invalid("carousel.passes", "must be at least 1"));
        }
        if c.window_blocks == 0 {
            return Err(invalid("carousel.window_blocks", "must be at least 1"));
        }
        if c.header_every == 0 {
            return Err(invalid("carousel.header_every", "must be at least 1"));
        }
        if self.ingest.gzip_level > 9 {
            return Err(invalid("ingest.gzip_level", "must be 0..=9"));
        }
        if self.ingest.poll_interval_ms == 0 {
            return Err(invalid("ingest.poll_interval_ms", "must be at least 1"));
        }
        for (field, dir) in [
            ("state_dir", &self.state_dir),
            ("spool_dir", &self.spool_dir),
        ] {
            weir_host::config::check_dir_to_make(dir).map_err(|e| invalid(field, e))?;
        }
        if self.spool_dir.starts_with(&self.state_dir)
            || self.state_dir.starts_with(&self.spool_dir)
        {
            return Err(invalid(
                "spool_dir",
                "spool_dir and state_dir must not contain one another",
            ));
        }
        let link_key = self
            .key()
            .map_err(|e| invalid("auth.key_file", e.to_string()))?;
        let report_key = self
            .report_key()
            .map_err(|e| invalid("ledger.report_key_file", e.to_string()))?;
        if report_key.is_some_and(|k| k.fingerprint() == link_key.fingerprint()) {
            return Err(invalid(
                "ledger.report_key_file",
                "holds the secret of the link key (auth.key_file): the report key must be a key \
                 of its own, so that one leaked key cannot forge both",
            ));
        }
        if self.ledger.keep_records == 0 {
            return Err(invalid("ledger.keep_records", "must be at least 1"));
        }
        if let Some(path) = &self.policy.rules_file {
            crate::policy::Rules::load(path)
                .map_err(|e| invalid("policy.rules_file", e.to_string()))?;
        }
        self.validate_pull()?;
        for m in &self.mapping {
            if m.from.is_empty() || m.from.starts_with('/') || m.to.starts_with('/') {
                return Err(invalid(
                    "mapping",
                    format!(
                        "from = {:?}, to = {:?}: from must be a non-empty repository prefix, \
                         neither may start with '/'",
                        m.from, m.to
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[pull]` and `[[registry]]`: ranges, the sync list, credential and
    /// CA files.
    fn validate_pull(&self) -> Result<(), ConfigError> {
        let mut hosts = std::collections::HashSet::new();
        for r in &self.registry {
            if !hosts.insert(r.host.as_str()) {
                return Err(invalid(
                    "registry.host",
                    format!("{:?} is listed twice", r.host),
                ));
            }
        }
        if !self.registry.is_empty() {
            crate::pull::source::SourceRegistries::new(&self.registry)
                .map_err(|e| invalid("registry", e.to_string()))?;
        }
        let Some(p) = &self.pull else {
            return Ok(());
        };
        if p.interval_s == 0 {
            return Err(invalid("pull.interval_s", "must be at least 1"));
        }
        if p.scan_timeout_s == 0 {
            return Err(invalid("pull.scan_timeout_s", "must be at least 1"));
        }
        match (&p.scanner, &p.scan_command) {
            (Some(Scanner::Command), None) => {
                return Err(invalid(
                    "pull.scan_command",
                    "required when scanner = \"command\"",
                ))
            }
            (Some(Scanner::Quay), Some(_)) => {
                return Err(invalid(
                    "pull.scan_command",
                    "is not run when scanner = \"quay\": keep one of the two",
                ))
            }
            (_, Some(argv)) if argv.is_empty() || argv[0].is_empty() => {
                return Err(invalid(
                    "pull.scan_command",
                    "must name a program: [\"trivy\", \"image\", ...]",
                ))
            }
            _ => {}
        }
        crate::pull::sync::SyncList::load(&p.sync_file)
            .map_err(|e| invalid("pull.sync_file", e.to_string()))?;
        Ok(())
    }

    /// The rate the carousel paces to. On a serial line it never exceeds
    /// what the line carries: 8N1 puts ten line bits on the wire per byte, and
    /// COBS framing adds a few bytes per frame, counted as frame overhead. A
    /// higher `rate_bps` is lowered to fit (and [`Pacing::clamped_from`]
    /// says so) rather than refused: the operator's intent, "as fast as the
    /// link allows", stands.
    pub fn pacing(&self) -> Pacing {
        let l = &self.link;
        match l.transport {
            Transport::Serial => {
                let line_bps = u64::from(l.baud / 10) * 8;
                let cobs =
                    weir_proto::framing::stream::max_encoded_len(l.datagram_size) - l.datagram_size;
                Pacing {
                    rate_bps: l.rate_bps.min(line_bps).max(1),
                    frame_overhead: l.frame_overhead_bytes.saturating_add(cobs as u32),
                    clamped_from: (l.rate_bps > line_bps).then_some(l.rate_bps),
                }
            }
            Transport::Udp | Transport::Dir => Pacing {
                rate_bps: l.rate_bps,
                frame_overhead: l.frame_overhead_bytes,
                clamped_from: None,
            },
        }
    }

    /// Where the link leads, for logs, `check-config` and the console.
    pub fn link_target(&self) -> String {
        let l = &self.link;
        let shown = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into())
        };
        match l.transport {
            Transport::Udp => format!(
                "udp to {}",
                l.udp_peer
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into())
            ),
            Transport::Serial => {
                format!("serial {} at {} baud", shown(&l.serial_device), l.baud)
            }
            Transport::Dir => format!(
                "dir outbox {} (files up to {} bytes, closed after {} ms)",
                shown(&l.outbox_dir),
                l.max_file_bytes,
                l.max_file_age_ms
            ),
        }
    }

    /// The FEC layout: S is the largest shard whose frame fits a datagram.
    pub fn fec_params(&self) -> Result<FecParams, weir_proto::FecError> {
        FecParams::for_datagram(
            self.link.datagram_size,
            self.fec.data_shards,
            self.fec.parity_shards,
        )
    }

    pub fn key(&self) -> Result<Key, weir_host::KeyFileError> {
        weir_host::load_key(self.auth.key_id, &self.auth.key_file)
    }

    /// Hash of what the receiver may want to compare (FEC layout, key),
    /// carried in heartbeats; reveals nothing of the key.
    pub fn fingerprint(&self, key: &Key) -> u64 {
        let mut h = Sha256::new();
        h.update(b"weir tx config v1");
        if let Ok(p) = self.fec_params() {
            h.update(p.data_shards.to_be_bytes());
            h.update(p.parity_shards.to_be_bytes());
            h.update(p.shard_size.to_be_bytes());
        }
        h.update(key.id().to_be_bytes());
        h.update(key.fingerprint());
        let d = h.finalize();
        u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8]))
    }

    /// Object payload files, the sled database and status.json live here.
    pub fn status_path(&self) -> PathBuf {
        self.state_dir.join("status.json")
    }

    /// A few lines for `check-config` and the startup log.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        use std::fmt::Write;
        let _ = writeln!(s, "state_dir      {}", self.state_dir.display());
        let _ = writeln!(s, "spool_dir      {}", self.spool_dir.display());
        let pacing = self.pacing();
        let _ = writeln!(
            s,
            "link           {}, {} bit/s{}, {}-byte frames (+{} overhead)",
            self.link_target(),
            pacing.rate_bps,
            match pacing.clamped_from {
                Some(asked) => format!(" (rate_bps {asked} lowered to what the line carries)"),
                None => String::new(),
            },
            self.link.datagram_size,
            pacing.frame_overhead
        );
        let _ = writeln!(
            s,
            "state disk     intake stops below {} MiB free",
            self.state_min_free_mb
        );
        if let Some(c) = &self.console {
            let _ = writeln!(
                s,
                "console        {} at {} baud",
                c.device.display(),
                c.baud
            );
        }
        if let Some(m) = &self.metrics {
            let _ = writeln!(s, "metrics        http://{}/metrics", m.listen.trim());
        }
        if let Some(l) = &self.leds {
            let _ = writeln!(
                s,
                "leds           {}: power {:?}, link {:?}, activity {:?}, fault {:?}",
                l.base.display(),
                l.power,
                l.link,
                l.activity,
                l.fault
            );
        }
        if let Ok(p) = self.fec_params() {
            let _ = writeln!(
                s,
                "fec            k={} m={} shard={} B, block={} B, parity overhead {:.1} %",
                p.data_shards,
                p.parity_shards,
                p.shard_size,
                p.block_bytes(),
                100.0 * p.parity_shards as f64 / p.data_shards as f64
            );
        }
        let c = &self.carousel;
        let _ = writeln!(
            s,
            "carousel       {} passes, retention {} h, window {} blocks, header every {} frames",
            c.passes, c.retention_hours, c.window_blocks, c.header_every
        );
        let _ = writeln!(
            s,
            "ingest         compression {:?} (level {}), poll every {} ms",
            self.ingest.compression, self.ingest.gzip_level, self.ingest.poll_interval_ms
        );
        match &self.policy.rules_file {
            Some(p) => match crate::policy::Rules::load(p) {
                Ok(r) => {
                    let _ = writeln!(
                        s,
                        "policy         {}: {} namespaces, {} rules",
                        p.display(),
                        r.namespaces.len(),
                        r.rules.len()
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "policy         {e}");
                }
            },
            None => {
                let _ = writeln!(s, "policy         no rules_file: every image passes");
            }
        }
        for m in &self.mapping {
            let _ = writeln!(s, "mapping        {} -> {}", m.from, m.to);
        }
        if let Some(p) = &self.pull {
            let entries = match crate::pull::sync::SyncList::load(&p.sync_file) {
                Ok(l) => format!("{} entries", l.entries.len()),
                Err(e) => e.to_string(),
            };
            let scan = match (&p.scanner, &p.scan_command) {
                (Some(Scanner::Quay), _) => "scan reports from the Quay security API".to_string(),
                (_, Some(argv)) => format!(
                    "scan command {:?} (at most {} s)",
                    argv.join(" "),
                    p.scan_timeout_s
                ),
                _ => "no scanner".to_string(),
            };
            let _ = writeln!(
                s,
                "pull           {}: {entries}; every {} s unless an entry says; {scan}",
                p.sync_file.display(),
                p.interval_s
            );
        }
        for r in &self.registry {
            let auth = match (&r.username, &r.token_file) {
                (Some(u), _) => format!("user {u}"),
                (None, Some(_)) => "bearer token".to_string(),
                (None, None) => "anonymous".to_string(),
            };
            let _ = writeln!(
                s,
                "registry       {} over {}, {auth}, {} in flight, {} requests/s{}",
                r.host,
                if r.plain_http { "http" } else { "https" },
                r.max_concurrent,
                r.requests_per_second,
                match &r.ca_file {
                    Some(c) => format!(", CA {}", c.display()),
                    None => String::new(),
                }
            );
        }
        if let Ok(k) = self.key() {
            let _ = writeln!(
                s,
                "auth           key id {} (fingerprint {}), config fingerprint {:016x}",
                k.id(),
                hex::encode(k.fingerprint()),
                self.fingerprint(&k)
            );
        }
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Writes a valid key file and returns its path.
    pub(crate) fn write_key(dir: &Path) -> PathBuf {
        let p = dir.join("1.key");
        std::fs::write(&p, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn published(dir: &Path) -> String {
        write_key(dir);
        r#"
state_dir = "state"
spool_dir = "spool"

[link]
transport = "udp"
udp_peer = "192.0.2.10:7700"
rate_bps = 100000000
datagram_size = 1400

[auth]
key_id = 1
key_file = "1.key"

[fec]
data_shards = 32
parity_shards = 8

[carousel]
passes = 3
"#
        .to_string()
    }

    /// The published configuration with another link than udp.
    fn with_link(dir: &Path, link: &str) -> String {
        published(dir).replace("transport = \"udp\"\nudp_peer = \"192.0.2.10:7700\"", link)
    }

    fn load_text(dir: &Path, text: &str) -> anyhow::Result<TxConfig> {
        let p = dir.join("tx.toml");
        std::fs::write(&p, text).unwrap();
        TxConfig::load(&p)
    }

    #[test]
    fn published_keys_load_with_documented_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let c = load_text(dir.path(), &published(dir.path())).unwrap();
        assert_eq!(c.link.rate_bps, 100_000_000);
        assert_eq!(c.link.udp_peer, Some("192.0.2.10:7700".parse().unwrap()));
        assert_eq!(c.carousel.passes, 3);
        assert_eq!(c.carousel.retention_hours, 72);
        assert_eq!(c.ingest.compression, Compression::Gzip);
        assert_eq!(c.state_dir, dir.path().join("state"));
        assert!(c.policy.rules_file.is_none());
        assert!(c.fec_params().unwrap().shard_size > 1200);
        assert!(c.report_key().unwrap().is_none());
    }

    #[test]
    fn a_report_key_file_is_resolved_and_held_to_the_key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("report.key");
        std::fs::write(&key, "cd".repeat(32)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "{}\n[ledger]\nreport_key_file = \"report.key\"\n",
            published(dir.path())
        );
        let c = load_text(dir.path(), &text).unwrap();
        assert_eq!(c.ledger.report_key_file, Some(key.clone()));
        assert!(c.report_key().unwrap().is_some());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = format!("{:#}", load_text(dir.path(), &text).unwrap_err());
        assert!(
            err.contains("ledger.report_key_file") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn a_udp_peer_that_names_no_receiver_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for peer in ["127.0.0.1:0", "0.0.0.0:7700"] {
            let text = with_link(
                dir.path(),
                &format!("transport = \"udp\"\nudp_peer = \"{peer}\""),
            );
            let err = format!("{:#}", load_text(dir.path(), &text).unwrap_err());
            assert!(err.contains("link.udp_peer"), "{peer}: {err}");
        }
    }

    #[test]
    fn a_state_or_spool_dir_that_cannot_be_made_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("blocker"), b"a file").unwrap();
        for (field, value, says) in [
            ("spool_dir", "blocker/deep/spool", "cannot be made"),
            ("state_dir", "blocker/state", "cannot be made"),
            ("state_dir", "blocker", "exists and is not a directory"),
        ] {
            let text = published(dir.path()).replace(
                &format!("{field} = \"{}\"", field.trim_end_matches("_dir")),
                &format!("{field} = \"{value}\""),
            );
            let err = format!("{:#}", load_text(dir.path(), &text).unwrap_err());
            assert!(err.contains(field) && err.contains(says), "{value}: {err}");
        }
        // A missing directory under a directory is fine: made at the start.
        let text =
            published(dir.path()).replace("spool_dir = \"spool\"", "spool_dir = \"a/b/spool\"");
        assert!(load_text(dir.path(), &text).is_ok());
    }

    #[test]
    fn the_link_key_is_refused_as_the_report_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}\n[ledger]\nreport_key_file = \"1.key\"\n",
            published(dir.path())
        );
        let err = format!("{:#}", load_text(dir.path(), &text).unwrap_err());
        assert!(
            err.contains("ledger.report_key_file") && err.contains("link key"),
            "{err}"
        );
    }

    #[test]
    fn metrics_is_optional_and_a_bad_listen_address_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let published = published(dir.path());
        assert!(load_text(dir.path(), &published).unwrap().metrics.is_none());
        let with = |listen: &str| format!("{published}\n[metrics]\nlisten = \"{listen}\"\n");
        let c = load_text(dir.path(), &with("127.0.0.1:9464")).unwrap();
        assert_eq!(c.metrics.as_ref().unwrap().listen, "127.0.0.1:9464");
        assert!(
            c.summary()
                .contains("metrics        http://127.0.0.1:9464/metrics"),
            "{}",
            c.summary()
        );
        let err = format!("{:#}", load_text(dir.path(), &with("9464")).unwrap_err());
        assert!(
            err.contains("tx.toml") && err.contains("metrics.listen"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_refused_naming_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = published(dir.path()).replace("passes = 3", "passes = 3\npasess = 4");
        let err = format!("{:#}", load_text(dir.path(), &text).unwrap_err());
        assert!(err.contains("tx.toml") && err.contains("pasess"), "{err}");
    }

    #[test]
    fn ranges_are_checked_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let base = published(dir.path());
        let cases = [
            ("rate_bps = 100000000", "rate_bps = 0", "link.rate_bps"),
            (
                "parity_shards = 8",
                "parity_shards = 240",
                "fec.parity_shards",
            ),
            (
                "datagram_size = 1400",
                "datagram_size = 40",
                "link.datagram_size",
            ),
            (
                "datagram_size = 1400",
                "datagram_size = 70000",
                "link.datagram_size",
            ),
            (
                "transport = \"udp\"",
                "transport = \"serial\"",
                "link.serial_device",
            ),
            (
                "transport = \"udp\"",
                "transport = \"dir\"",
                "link.outbox_dir",
            ),
            (
                "transport = \"udp\"",
                "transport = \"dir\"\noutbox_dir = \"out\"\nmax_file_bytes = 1000",
                "link.max_file_bytes",
            ),
            (
                "transport = \"udp\"",
                "transport = \"serial\"\nserial_device = \"/dev/ttyS2\"\nbaud = 0",
                "link.baud",
            ),
            ("key_id = 1", "key_id = 1\n", "none"),
        ];
        for (from, to, field) in cases {
            let r = load_text(dir.path(), &base.replace(from, to));
            if field == "none" {
                r.unwrap();
                continue;
            }
            let err = format!("{:#}", r.unwrap_err());
            assert!(err.contains(field) && err.contains("tx.toml"), "{err}");
        }
    }

    #[test]
    fn serial_link_loads_with_default_baud_and_paces_to_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let text = with_link(
            dir.path(),
            "transport = \"serial\"\nserial_device = \"tty\"",
        );
        let c = load_text(dir.path(), &text).unwrap();
        assert_eq!(c.link.baud, 115_200);
        assert_eq!(c.link.serial_device, Some(dir.path().join("tty")));
        // 100 Mbit/s cannot go down a 115200 baud line: 11 520 bytes/s.
        let p = c.pacing();
        assert_eq!(p.rate_bps, 11_520 * 8);
        assert_eq!(p.clamped_from, Some(100_000_000));
        let cobs = p.frame_overhead as usize;
        assert!((3..=16).contains(&cobs), "COBS overhead {cobs}");
        assert!(c.summary().contains("lowered to what the line carries"));
        // A rate under the line's is kept.
        let slow = load_text(
            dir.path(),
            &text.replace("rate_bps = 100000000", "rate_bps = 50000"),
        )
        .unwrap();
        assert_eq!(slow.pacing().rate_bps, 50_000);
        assert_eq!(slow.pacing().clamped_from, None);
    }

    #[test]
    fn dir_link_loads_with_documented_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let text = with_link(dir.path(), "transport = \"dir\"\noutbox_dir = \"outbox\"");
        let c = load_text(dir.path(), &text).unwrap();
        assert_eq!(c.link.outbox_dir, Some(dir.path().join("outbox")));
        assert_eq!(c.link.max_file_bytes, 4 << 20);
        assert_eq!(c.link.max_file_age_ms, 5000);
        assert_eq!(c.pacing().rate_bps, 100_000_000);
        assert!(c.link_target().starts_with("dir outbox"));
    }

    #[test]
    fn console_and_leds_are_optional_with_documented_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let published = published(dir.path());
        let c = load_text(dir.path(), &published).unwrap();
        assert!(c.console.is_none() && c.leds.is_none());
        assert_eq!(c.state_min_free_mb, 64);
        let text = format!(
            "{published}\n[console]\ndevice = \"/dev/ttyS1\"\n\n[leds]\nfault = \"red:fault\"\n"
        );
        let c = load_text(dir.path(), &text).unwrap();
        let console = c.console.unwrap();
        assert_eq!(console.device, Path::new("/dev/ttyS1"));
        assert_eq!(console.baud, 115_200);
        let leds = c.leds.unwrap();
        assert_eq!(leds.base, Path::new("/sys/class/leds"));
        assert_eq!(leds.power, "weir:power");
        assert_eq!(leds.fault, "red:fault");
        let text = format!("{published}\n[leds]\nhmac_fault_threshold = 5\n");
        let err = format!("{:#}", load_text(dir.path(), &text).unwrap_err());
        assert!(
            err.contains("hmac_fault_threshold"),
            "the sender checks no tags: {err}"
        );
    }

    #[test]
    fn unreadable_or_open_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = published(dir.path());
        std::fs::set_permissions(
            dir.path().join("1.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = format!("{:#}", load_text(dir.path(), &text).unwrap_err());
        assert!(
            err.contains("auth.key_file") && err.contains("chmod 600"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            load_text(dir.path(), &text.replace("1.key", "missing.key")).unwrap_err()
        );
        assert!(err.contains("missing.key"), "{err}");
    }

    #[test]
    fn example_file_is_valid() {
        // examples/tx.toml documents every key; it must parse (paths aside).
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tx.toml");
        let text = std::fs::read_to_string(&example).unwrap();
        let c: TxConfig = toml::from_str(&text).unwrap();
        assert_eq!(c.carousel.retention_hours, 72);
        assert_eq!(c.link.datagram_size, 1400);
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rules.yaml");
        crate::policy::Rules::load(&rules).unwrap();
        let sync = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sync.yaml");
        let list = crate::pull::sync::SyncList::load(&sync).unwrap();
        assert_eq!(list.entries.len(), 3);
    }

    #[test]
    fn pull_mode_keys_parse_and_a_bad_sync_file_is_refused_by_check_config() {
        let dir = tempfile::tempdir().unwrap();
        let key = write_key(dir.path());
        std::fs::write(
            dir.path().join("sync.yaml"),
            "repositories:\n  - source: 127.0.0.1:5001/team-b/svc\n    destination: mirror/svc\n    tags: {semver: 'not a range'}\n",
        )
        .unwrap();
        let text = format!(
            "state_dir = \"state\"\nspool_dir = \"spool\"\n[link]\ntransport = \"udp\"\n\
             udp_peer = \"127.0.0.1:9\"\nrate_bps = 1000000\n[auth]\nkey_id = 1\nkey_file = {key:?}\n\
             [pull]\nsync_file = \"sync.yaml\"\ninterval_s = 60\n\
             [[registry]]\nhost = \"127.0.0.1:5001\"\nplain_http = true\nmax_concurrent = 2\n\
             requests_per_second = 5\n"
        );
        let path = dir.path().join("tx.toml");
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", TxConfig::load(&path).unwrap_err());
        assert!(err.contains("tx.toml"), "{err}");
        assert!(err.contains("pull.sync_file"), "{err}");
        assert!(
            err.contains("sync.yaml: repositories[0].tags.semver"),
            "{err}"
        );
        std::fs::write(
            dir.path().join("sync.yaml"),
            "images:\n  - source: 127.0.0.1:5001/team-a/app:1.4\n    destination: team-a/app:1.4\n",
        )
        .unwrap();
        let c = TxConfig::load(&path).unwrap();
        let p = c.pull.as_ref().unwrap();
        assert_eq!(p.interval_s, 60);
        assert!(p.sync_file.is_absolute());
        assert_eq!(c.registry[0].max_concurrent, 2);
        assert!(c.summary().contains("pull           "), "{}", c.summary());
        // A scan command beside the Quay scanner would never run.
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "interval_s = 60\n",
            "interval_s = 60\nscanner = \"quay\"\nscan_command = [\"trivy\"]\n",
        );
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", TxConfig::load(&path).unwrap_err());
        assert!(
            err.contains("pull.scan_command") && err.contains("quay"),
            "{err}"
        );
    }
}
