//! The receiver's configuration: one TOML file, one serde type.
//! `[console]`, `[leds]`, `[metrics]`, the transport, the reading of the
//! file and the errors are shared with gateway-tx ([`weir_host::config`]).
//! Relative paths are taken relative to the directory of the configuration
//! file.
//!
//! The published keys and their defaults:
//!
//! ```toml
//! state_dir = "/var/lib/weir/rx"        # sled db, shard staging, blob store, status.json
//! state_min_free_mb = 64                # default; below it shards are dropped (counted),
//!                                       # fault "state disk full"; resumes 1 MiB above
//!
//! [link]
//! transport = "udp"                     # "udp", "serial" or "dir"
//! udp_listen = "0.0.0.0:7700"           # transport = "udp"
//! serial_device = "/dev/ttyS2"          # transport = "serial"
//! baud = 115200                         # default; 8N1
//! inbox_dir = "/var/spool/weir/inbox"   # transport = "dir": where the file diode delivers
//! datagram_size = 1400                  # default; largest frame accepted, bytes
//!
//! [[auth.keys]]                         # every key the sender may sign with
//! id = 1
//! file = "/etc/weir/keys/1.key"
//!
//! [delivery]
//! registry_url = "https://registry.high.example"   # http:// accepted too
//! ca_file = "/etc/weir/registry-ca.pem"            # optional, extra trusted CA (PEM)
//! username = "mirror"                              # optional, with password_file
//! password_file = "/etc/weir/registry.pass"        # optional
//! oci_layout = "/var/lib/weir/out"                 # optional; the target when no
//!                                                  # registry_url (default: state_dir/../out)
//! retry_max_seconds = 300       # default; backoff cap while the registry is down or 5xx
//! retry_refused_seconds = 1800  # default; retry period after a 4xx (auth, quota)
//! [[delivery.mapping]]          # optional; first matching prefix rewrites the repository
//! from = "library/"
//! to = "mirror/library/"
//!
//! [notify]
//! webhook_url = "http://chat.example/hooks/weir"   # optional; JSON POST per image
//! timeout_seconds = 10                             # default
//!
//! [retention]
//! keep_delivered_hours = 72       # default; a delivered image's objects (and
//!                                 # staging without a shard) stay this long;
//!                                 # fractions accepted
//! high_water_percent = 90         # default; past this share of the state disk
//!                                 # used, delivered images go early, oldest first
//! [ledger]
//! gap_alert_hours = 6             # default; an image the sender announced and this
//!                                 # side has not completed for this long is a gap
//! report_key_file = "/etc/weir/keys/report.key"    # optional; `gateway-rx report`
//!                                                  # signs with it (hex, mode 0600)
//! keep_records = 10000            # default; records of each chain always kept; older
//!                                 # ones delivered keep_delivered_hours ago are pruned
//!
//! [console]                       # optional; absent = no serial console
//! device = "/dev/ttyS1"
//! baud = 115200                   # default
//!
//! [leds]                          # optional; absent = no LEDs driven
//! base = "/sys/class/leds"        # default
//! power = "weir:power"            # defaults weir:power, weir:link,
//! link = "weir:link"              #   weir:activity, weir:fault; "" = none
//! activity = "weir:activity"
//! fault = "weir:fault"
//! hmac_fault_threshold = 100      # default; fault when more bad tags than
//!                                 # this arrived in the last minute
//!
//! [metrics]                       # optional; absent = no metrics endpoint
//! listen = "127.0.0.1:9464"       # Prometheus text format at GET /metrics
//! ```

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use weir_host::config::{
    base_dir, check_serial_link, default_baud, default_datagram_size, default_state_min_free_mb,
    parse_toml, read_toml, resolve, resolve_console_and_leds, resolve_opt,
};
pub use weir_host::config::{
    ConfigError, ConsoleConfig, LedsConfig, MetricsConfig, Transport, DEFAULT_BAUD,
    DEFAULT_DATAGRAM_SIZE, DEFAULT_HMAC_FAULT_THRESHOLD, DEFAULT_STATE_MIN_FREE_MB,
};
use weir_host::signatures::TrustedKeys;
use weir_proto::KeyRing;
/// Default cap of the backoff while a registry is down or answers 5xx.
pub const DEFAULT_RETRY_MAX_SECONDS: u64 = 300;
/// Default retry period after a 4xx: an operator has to fix something first.
pub const DEFAULT_RETRY_REFUSED_SECONDS: u64 = 1800;
/// Default time a webhook call may take before it is abandoned.
pub const DEFAULT_WEBHOOK_TIMEOUT_SECONDS: u64 = 10;

/// gateway-rx configuration (`gateway-rx --config FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RxConfig {
    /// Where all receiver state lives: `db/` (sled), `staging/` (shards being
    /// received), `blobs/sha256/` (verified objects), `status.json`.
    pub state_dir: PathBuf,
    /// While the disk of `state_dir` has less than this many MiB free,
    /// shards are not stored (frames are dropped and counted, the fault
    /// "state disk full" is raised): sled must always find room for its log.
    /// Storing resumes 1 MiB above it. 0 leaves only the reaction to a write
    /// that fails for want of space.
    #[serde(default = "default_state_min_free_mb")]
    pub state_min_free_mb: u64,
    pub link: LinkConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub notify: NotifyConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What is pruned from the state disk, and when (see
    /// [`crate::retention`]).
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// The serial console. Absent: no console.
    pub console: Option<ConsoleConfig>,
    /// The status LEDs and the fault threshold. Absent: no LEDs driven,
    /// faults still judged with the defaults and shown by `status`.
    pub leds: Option<LedsConfig>,
    /// The Prometheus endpoint. Absent: none.
    pub metrics: Option<MetricsConfig>,
    /// The file this configuration was read from, for error messages.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub transport: Transport,
    /// Address to receive datagrams on (transport = "udp").
    pub udp_listen: Option<SocketAddr>,
    /// Serial device the diode's line arrives on (transport = "serial").
    pub serial_device: Option<PathBuf>,
    /// Line rate of the serial device, 8N1.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Directory a file-transfer diode delivers batch files into
    /// (transport = "dir"); files are deleted once read.
    pub inbox_dir: Option<PathBuf>,
    /// Largest frame accepted, in bytes; longer datagrams are dropped.
    #[serde(default = "default_datagram_size")]
    pub datagram_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub keys: Vec<KeyFile>,
    /// Sender sessions are numbered from the sender's clock; one claiming to
    /// start more than this many hours ahead of the receiver's clock is
    /// refused, so a forged far-future session cannot make the real
    /// sender's sessions look old.
    #[serde(default = "default_max_session_ahead_hours")]
    pub max_session_ahead_hours: u64,
}

/// Default largest object (one blob) accepted: 64 GiB.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 64 << 30;
/// Default count of objects arriving at once (each holds two open files).
pub const DEFAULT_MAX_OBJECTS_IN_FLIGHT: usize = 1024;

/// `[limits]`: what a sender (even one holding the key) can make the
/// receiver hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest object; a longer one is refused before a byte is stored.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Objects arriving at once; past it the one longest without a shard
    /// is set aside (its shards come again with a later pass).
    #[serde(default = "default_max_objects_in_flight")]
    pub max_objects_in_flight: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
            max_objects_in_flight: DEFAULT_MAX_OBJECTS_IN_FLIGHT,
        }
    }
}

fn default_max_object_bytes() -> u64 {
    DEFAULT_MAX_OBJECT_BYTES
}

fn default_max_objects_in_flight() -> usize {
    DEFAULT_MAX_OBJECTS_IN_FLIGHT
}

/// Default hours a delivered image's objects stay in the blob store.
pub const DEFAULT_KEEP_DELIVERED_HOURS: f64 = 72.0;
/// Default share of the state disk in use above which delivered images are
/// pruned early, oldest first.
pub const DEFAULT_HIGH_WATER_PERCENT: u32 = 90;

/// `[retention]`: how long what was delivered stays on the state disk.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Hours an image's objects stay in the blob store once it is delivered
    /// to every target (and staging leftovers without a shard for as long).
    /// Fractions are accepted (0.5 = 30 minutes).
    #[serde(default = "default_keep_delivered_hours")]
    pub keep_delivered_hours: f64,
    /// Past this share of the state disk in use, delivered images are
    /// pruned before their time, the longest delivered first.
    #[serde(default = "default_high_water_percent")]
    pub high_water_percent: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_delivered_hours: DEFAULT_KEEP_DELIVERED_HOURS,
            high_water_percent: DEFAULT_HIGH_WATER_PERCENT,
        }
    }
}

/// Default time an announced image may stay incomplete before it is a gap.
pub const DEFAULT_GAP_ALERT_HOURS: f64 = 6.0;

/// `[ledger]`: the image ledger's gap alert and report key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Hours an image the sender's heartbeats announced may stay
    /// incomplete here before it is a gap (status, console, webhook event
    /// `missing`, fault LED). Fractions allowed.
    #[serde(default = "default_gap_alert_hours")]
    pub gap_alert_hours: f64,
    /// The key (hex, mode 0600, like the link keys) `gateway-rx report`
    /// HMACs its report under; gateway-tx checks it with the same key.
    pub report_key_file: Option<PathBuf>,
    /// Records of each chain always kept; older ones whose images were
    /// delivered to every target `[retention] keep_delivered_hours` ago
    /// are pruned, the last one kept as the chain's checkpoint.
    #[serde(default = "default_keep_records")]
    pub keep_records: u64,
}

fn default_keep_records() -> u64 {
    weir_proto::ledger::DEFAULT_KEEP_RECORDS
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            gap_alert_hours: DEFAULT_GAP_ALERT_HOURS,
            report_key_file: None,
            keep_records: default_keep_records(),
        }
    }
}

fn default_keep_delivered_hours() -> f64 {
    DEFAULT_KEEP_DELIVERED_HOURS
}

fn default_high_water_percent() -> u32 {
    DEFAULT_HIGH_WATER_PERCENT
}

fn default_gap_alert_hours() -> f64 {
    DEFAULT_GAP_ALERT_HOURS
}

/// Default bound on how far ahead of this clock a sender session may start.
pub const DEFAULT_MAX_SESSION_AHEAD_HOURS: u64 = 24;

fn default_max_session_ahead_hours() -> u64 {
    DEFAULT_MAX_SESSION_AHEAD_HOURS
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub id: u16,
    /// Hex secret, mode 0600 (see `weir_host::load_key`).
    pub file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// `http://host[:port]` or `https://host[:port]`; without it images go to
    /// the OCI layout directory.
    pub registry_url: Option<String>,
    /// Extra CA certificate (PEM) trusted for the registry.
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    /// File holding the registry password (one line; trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// OCI image layout directory. Used when there is no registry_url
    /// (default `state_dir/../out`), and in addition to the registry when set
    /// explicitly next to one.
    pub oci_layout: Option<PathBuf>,
    #[serde(default = "default_retry_max_seconds")]
    pub retry_max_seconds: u64,
    #[serde(default = "default_retry_refused_seconds")]
    pub retry_refused_seconds: u64,
    #[serde(default)]
    pub mapping: Vec<RepositoryMapping>,
    /// PEM public keys (ECDSA P-256): when set, an image is pushed only if
    /// a cosign signature among its referrers verifies under one of them.
    #[serde(default)]
    pub verify_signatures: Vec<PathBuf>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            registry_url: None,
            ca_file: None,
            username: None,
            password_file: None,
            oci_layout: None,
            retry_max_seconds: DEFAULT_RETRY_MAX_SECONDS,
            retry_refused_seconds: DEFAULT_RETRY_REFUSED_SECONDS,
            mapping: Vec::new(),
            verify_signatures: Vec::new(),
        }
    }
}

/// Rewrites a destination repository that starts with `from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryMapping {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub webhook_url: Option<String>,
    #[serde(default = "default_webhook_timeout_seconds")]
    pub timeout_seconds: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhook_url: None,
            timeout_seconds: DEFAULT_WEBHOOK_TIMEOUT_SECONDS,
        }
    }
}

fn default_retry_max_seconds() -> u64 {
    DEFAULT_RETRY_MAX_SECONDS
}
fn default_retry_refused_seconds() -> u64 {
    DEFAULT_RETRY_REFUSED_SECONDS
}
fn default_webhook_timeout_seconds() -> u64 {
    DEFAULT_WEBHOOK_TIMEOUT_SECONDS
}

/// A parsed `registry_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEndpoint {
    /// `host[:port]`, as a reference's registry part.
    pub host: String,
    /// Plain HTTP (`http://` URL).
    pub insecure: bool,
}

/// Registry credentials read from the configured files.
#[derive(Clone)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl RxConfig {
    /// Reads, parses and validates `path` (key files are loaded too).
    pub fn load(path: &Path) -> Result<RxConfig, ConfigError> {
        let mut config: RxConfig = read_toml(path)?;
        config.source = path.to_path_buf();
        config.resolve_paths(&base_dir(path));
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating; `path` is named in errors.
    pub fn parse(text: &str, path: &Path) -> Result<RxConfig, ConfigError> {
        let mut config: RxConfig = parse_toml(text, path)?;
        config.source = path.to_path_buf();
        Ok(config)
    }

    /// Makes relative paths relative to `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.state_dir);
        resolve_opt(base, &mut self.link.serial_device);
        resolve_opt(base, &mut self.link.inbox_dir);
        for k in &mut self.auth.keys {
            resolve(base, &mut k.file);
        }
        resolve_opt(base, &mut self.delivery.ca_file);
        resolve_opt(base, &mut self.delivery.password_file);
        resolve_opt(base, &mut self.delivery.oci_layout);
        for k in &mut self.delivery.verify_signatures {
            resolve(base, k);
        }
        resolve_opt(base, &mut self.ledger.report_key_file);
        resolve_console_and_leds(base, &mut self.console, &mut self.leds);
    }

    /// Bad tags within a minute above which the fault "HMAC failures" stands.
    pub fn hmac_fault_threshold(&self) -> u64 {
        self.leds
            .as_ref()
            .map_or(DEFAULT_HMAC_FAULT_THRESHOLD, LedsConfig::hmac_threshold)
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// The keys `[delivery] verify_signatures` names; None when unset.
    pub fn signature_keys(&self) -> Result<Option<TrustedKeys>, ConfigError> {
        if self.delivery.verify_signatures.is_empty() {
            return Ok(None);
        }
        TrustedKeys::load(&self.delivery.verify_signatures)
            .map(Some)
            .map_err(|e| self.invalid("delivery.verify_signatures", e.to_string()))
    }

    /// Checks every field that can be checked without starting anything.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(self.invalid("state_dir", "must not be empty"));
        }
        // Both are made at the start when missing; a file in the way would
        // stop the start, or the first delivery, long after the check.
        let layout = self.delivery.oci_layout.clone();
        for (field, dir) in [
            ("state_dir", Some(&self.state_dir)),
            ("delivery.oci_layout", layout.as_ref()),
        ] {
            if let Some(dir) = dir {
                weir_host::config::check_dir_to_make(dir).map_err(|e| self.invalid(field, e))?;
            }
        }
        match self.link.transport {
            Transport::Udp => {
                if self.link.udp_listen.is_none() {
                    return Err(
                        self.invalid("link.udp_listen", "required when link.transport = \"udp\"")
                    );
                }
            }
            Transport::Serial => {
                check_serial_link(self.link.serial_device.as_deref(), self.link.baud)
                    .map_err(|e| e.in_file(&self.source))?
            }
            Transport::Dir => match &self.link.inbox_dir {
                None => {
                    return Err(
                        self.invalid("link.inbox_dir", "required when link.transport = \"dir\"")
                    )
                }
                Some(dir) if !dir.is_dir() => {
                    return Err(self.invalid(
                        "link.inbox_dir",
                        format!("{} is not a directory", dir.display()),
                    ))
                }
                Some(_) => {}
            },
        }
        if self.limits.max_object_bytes == 0 {
            return Err(self.invalid("limits.max_object_bytes", "must be greater than 0"));
        }
        if self.limits.max_objects_in_flight == 0 {
            return Err(self.invalid("limits.max_objects_in_flight", "must be at least 1"));
        }
        if !(64..=65_507).contains(&self.link.datagram_size) {
            return Err(self.invalid(
                "link.datagram_size",
                format!("{} is outside 64..=65507", self.link.datagram_size),
            ));
        }
        let ring = self.key_ring()?;
        self.signature_keys()?;
        self.registry_endpoint()?;
        self.registry_credentials()?;
        if let Some(ca) = &self.delivery.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| self.invalid("delivery.ca_file", format!("{}: {e}", ca.display())))?;
            if !pem
                .windows(b"BEGIN CERTIFICATE".len())
                .any(|w| w == b"BEGIN CERTIFICATE")
            {
                return Err(self.invalid(
                    "delivery.ca_file",
                    format!("{}: no PEM certificate in it", ca.display()),
                ));
            }
            if self.delivery.registry_url.is_none() {
                return Err(self.invalid("delivery.ca_file", "set without delivery.registry_url"));
            }
        }
        if self.delivery.retry_max_seconds == 0 {
            return Err(self.invalid("delivery.retry_max_seconds", "must be at least 1"));
        }
        if self.delivery.retry_refused_seconds == 0 {
            return Err(self.invalid("delivery.retry_refused_seconds", "must be at least 1"));
        }
        for (i, m) in self.delivery.mapping.iter().enumerate() {
            if m.from.is_empty() {
                return Err(
                    self.invalid(&format!("delivery.mapping[{i}].from"), "must not be empty")
                );
            }
        }
        if let Some(url) = &self.notify.webhook_url {
            match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(u) => {
                    return Err(self.invalid(
                        "notify.webhook_url",
                        format!("scheme {:?} is not http or https", u.scheme()),
                    ))
                }
                Err(e) => return Err(self.invalid("notify.webhook_url", e.to_string())),
            }
        }
        if self.notify.timeout_seconds == 0 {
            return Err(self.invalid("notify.timeout_seconds", "must be at least 1"));
        }
        let hours = self.ledger.gap_alert_hours;
        if !(hours.is_finite() && hours > 0.0 && hours <= 100_000.0) {
            return Err(self.invalid(
                "ledger.gap_alert_hours",
                format!("{hours} is not a number of hours above 0 (at most 100000)"),
            ));
        }
        if self.ledger.keep_records == 0 {
            return Err(self.invalid("ledger.keep_records", "must be at least 1"));
        }
        if let Some(report) = self.report_key()? {
            if let Some(id) = ring.id_with_secret_of(&report) {
                return Err(self.invalid(
                    "ledger.report_key_file",
                    format!(
                        "holds the secret of link key {id} (auth.keys): the report key must be \
                         a key of its own, so that one leaked key cannot forge both"
                    ),
                ));
            }
        }
        if let Some(c) = &self.console {
            c.validate().map_err(|e| e.in_file(&self.source))?;
        }
        if let Some(m) = &self.metrics {
            m.validate().map_err(|e| e.in_file(&self.source))?;
        }
        let r = &self.retention;
        // At most ten years: beyond is surely a typo, and keeps the
        // milliseconds far from overflowing.
        if !(r.keep_delivered_hours.is_finite()
            && (0.0..=87_600.0).contains(&r.keep_delivered_hours))
        {
            return Err(self.invalid(
                "retention.keep_delivered_hours",
                format!("{} is outside 0..=87600", r.keep_delivered_hours),
            ));
        }
        if !(1..=100).contains(&r.high_water_percent) {
            return Err(self.invalid(
                "retention.high_water_percent",
                format!("{} is outside 1..=100", r.high_water_percent),
            ));
        }
        Ok(())
    }

    /// Loads every configured key.
    pub fn key_ring(&self) -> Result<KeyRing, ConfigError> {
        if self.auth.keys.is_empty() {
            return Err(self.invalid("auth.keys", "at least one key is required"));
        }
        let mut keys = Vec::with_capacity(self.auth.keys.len());
        for (i, k) in self.auth.keys.iter().enumerate() {
            let key = weir_host::load_key(k.id, &k.file)
                .map_err(|e| self.invalid(&format!("auth.keys[{i}].file"), e.to_string()))?;
            keys.push(key);
        }
        KeyRing::new(keys).map_err(|e| self.invalid("auth.keys", e.to_string()))
    }

    /// The ledger report key, if one is configured.
    pub fn report_key(&self) -> Result<Option<weir_proto::Key>, ConfigError> {
        self.ledger
            .report_key_file
            .as_deref()
            .map(|p| {
                weir_host::load_key(0, p)
                    .map_err(|e| self.invalid("ledger.report_key_file", e.to_string()))
            })
            .transpose()
    }

    /// The registry to push to, if any.
    pub fn registry_endpoint(&self) -> Result<Option<RegistryEndpoint>, ConfigError> {
        let Some(raw) = &self.delivery.registry_url else {
            return Ok(None);
        };
        let field = "delivery.registry_url";
        let url =
            reqwest::Url::parse(raw).map_err(|e| self.invalid(field, format!("{raw:?}: {e}")))?;
        let insecure = match url.scheme() {
            "http" => true,
            "https" => false,
            other => {
                return Err(self.invalid(field, format!("scheme {other:?} is not http or https")))
            }
        };
        if !(url.path().is_empty() || url.path() == "/") || url.query().is_some() {
            return Err(self.invalid(
                field,
                format!("{raw:?}: only scheme://host[:port] is accepted (no path)"),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.invalid(
                field,
                "put credentials in username/password_file, not the URL",
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| self.invalid(field, format!("{raw:?} has no host")))?;
        let host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        Ok(Some(RegistryEndpoint { host, insecure }))
    }

    /// Username and password when both are configured.
    pub fn registry_credentials(&self) -> Result<Option<RegistryCredentials>, ConfigError> {
        match (&self.delivery.username, &self.delivery.password_file) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(self.invalid(
                "delivery.password_file",
                "required when delivery.username is set",
            )),
            (None, Some(_)) => Err(self.invalid(
                "delivery.username",
                "required when delivery.password_file is set",
            )),
            (Some(user), Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    self.invalid("delivery.password_file", format!("{}: {e}", file.display()))
                })?;
                let password = text.trim_end_matches(['\r', '\n']).to_string();
                if password.is_empty() {
                    return Err(self.invalid(
                        "delivery.password_file",
                        format!("{} is empty", file.display()),
                    ));
                }
                Ok(Some(RegistryCredentials {
                    username: user.clone(),
                    password,
                }))
            }
        }
    }

    /// Where images are exported as an OCI layout, if anywhere: the
    /// configured directory, or `state_dir/../out` when there is no registry.
    pub fn layout_dir(&self) -> Option<PathBuf> {
        if let Some(dir) = &self.delivery.oci_layout {
            return Some(dir.clone());
        }
        if self.delivery.registry_url.is_some() {
            return None;
        }
        Some(match self.state_dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.join("out"),
            _ => self.state_dir.join("out"),
        })
    }

    /// The destination repository after mapping.
    pub fn map_repository(&self, repository: &str) -> String {
        for m in &self.delivery.mapping {
            if let Some(rest) = repository.strip_prefix(&m.from) {
                return format!("{}{}", m.to, rest);
            }
        }
        repository.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn write_config(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("rx.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    /// Why the configuration `body` is refused, as the error reads.
    fn refusal(dir: &Path, body: &str) -> String {
        RxConfig::load(&write_config(dir, body))
            .unwrap_err()
            .to_string()
    }

    fn minimal(dir: &Path) -> String {
        let key = key_file(dir, "1.key");
        format!(
            "state_dir = \"{}/state\"\n[link]\ntransport = \"udp\"\nudp_listen = \"127.0.0.1:7700\"\n\
             [[auth.keys]]\nid = 1\nfile = \"{}\"\n",
            dir.display(),
            key.display()
        )
    }

    /// Every path the file names is taken from the file's directory, not
    /// from where the gateway was started (`/` under systemd).
    #[test]
    fn relative_paths_are_taken_from_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("etc");
        std::fs::create_dir(&conf).unwrap();
        key_file(&conf, "1.key");
        std::fs::create_dir(conf.join("keys")).unwrap();
        std::fs::write(
            conf.join("keys/cosign.pub"),
            "-----BEGIN PUBLIC KEY-----\n\
             MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEvXgDDih1Jgpottp54XwdUdIZ+iA\n\
             0u1J5weQA4aAxKKym4QrKJ98oO2SXolrIXKtFKy2ELvaWtoJ26tUdxGsuw==\n\
             -----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let p = write_config(
            &conf,
            "state_dir = \"state\"\n[link]\ntransport = \"udp\"\nudp_listen = \"127.0.0.1:7700\"\n\
             [[auth.keys]]\nid = 1\nfile = \"1.key\"\n\
             [delivery]\noci_layout = \"out\"\nverify_signatures = [\"keys/cosign.pub\"]\n",
        );
        let c = RxConfig::load(&p).unwrap();
        assert_eq!(c.state_dir, conf.join("state"));
        assert_eq!(c.auth.keys[0].file, conf.join("1.key"));
        assert_eq!(c.delivery.oci_layout, Some(conf.join("out")));
        assert_eq!(
            c.delivery.verify_signatures,
            vec![conf.join("keys/cosign.pub")]
        );
    }

    #[test]
    fn limits_of_zero_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = minimal(dir.path());
        for key in ["max_object_bytes", "max_objects_in_flight"] {
            let err = refusal(dir.path(), &format!("{base}[limits]\n{key} = 0\n"));
            assert!(err.contains(&format!("limits.{key}")), "{key}: {err}");
        }
    }

    #[test]
    fn a_file_where_a_directory_goes_is_refused_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let base = minimal(dir.path());
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        let err = refusal(
            dir.path(),
            &base.replace(
                &format!("{}/state", dir.path().display()),
                &file.display().to_string(),
            ),
        );
        assert!(
            err.contains("state_dir") && err.contains("not a directory"),
            "{err}"
        );
        let err = refusal(
            dir.path(),
            &format!("{base}[delivery]\noci_layout = {file:?}\n"),
        );
        assert!(
            err.contains("delivery.oci_layout") && err.contains("not a directory"),
            "{err}"
        );
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_config(dir.path(), &minimal(dir.path()));
        let c = RxConfig::load(&p).unwrap();
        assert_eq!(c.link.datagram_size, 1400);
        assert_eq!(c.delivery.retry_max_seconds, 300);
        assert_eq!(c.delivery.retry_refused_seconds, 1800);
        assert_eq!(c.layout_dir(), Some(dir.path().join("out")));
        assert_eq!(c.registry_endpoint().unwrap(), None);
        assert_eq!(c.key_ring().unwrap().ids(), vec![1]);
        assert_eq!(c.ledger.gap_alert_hours, 6.0);
        assert!(c.report_key().unwrap().is_none());
    }

    #[test]
    fn ledger_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = minimal(dir.path());
        for bad in ["0", "-1", "nan", "inf"] {
            let err = refusal(
                dir.path(),
                &format!("{base}[ledger]\ngap_alert_hours = {bad}\n"),
            );
            assert!(err.contains("ledger.gap_alert_hours"), "{bad}: {err}");
        }
        let key = key_file(dir.path(), "report.key");
        std::fs::write(&key, "cd".repeat(32)).unwrap();
        let p = write_config(
            dir.path(),
            &format!("{base}[ledger]\ngap_alert_hours = 0.5\nreport_key_file = {key:?}\n"),
        );
        let c = RxConfig::load(&p).unwrap();
        assert_eq!(c.ledger.gap_alert_hours, 0.5);
        assert!(c.report_key().unwrap().is_some());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = RxConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("ledger.report_key_file") && err.contains("chmod 600"),
            "{err}"
        );
        // The link key, under another file name, is not a report key.
        let link_copy = key_file(dir.path(), "copy-of-1.key");
        let err = refusal(
            dir.path(),
            &format!("{base}[ledger]\nreport_key_file = {link_copy:?}\n"),
        );
        assert!(
            err.contains("ledger.report_key_file") && err.contains("link key 1"),
            "{err}"
        );
    }

    #[test]
    fn example_file_is_valid_in_form() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/rx.toml"))
                .unwrap();
        let c = RxConfig::parse(&text, Path::new("examples/rx.toml")).unwrap();
        assert_eq!(c.link.transport, Transport::Udp);
        assert_eq!(c.ledger.gap_alert_hours, DEFAULT_GAP_ALERT_HOURS);
        assert_eq!(
            c.registry_endpoint().unwrap(),
            Some(RegistryEndpoint {
                host: "registry.high.example".into(),
                insecure: false
            })
        );
    }

    #[test]
    fn unknown_key_is_refused_naming_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_config(
            dir.path(),
            &format!("{}\n[delivery]\nregistry = \"x\"\n", minimal(dir.path())),
        );
        let err = RxConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("rx.toml") && err.contains("registry"), "{err}");
    }

    #[test]
    fn udp_without_listen_address_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = minimal(dir.path()).replace("udp_listen = \"127.0.0.1:7700\"\n", "");
        let err = refusal(dir.path(), &text);
        assert!(err.contains("link.udp_listen"), "{err}");
    }

    #[test]
    fn serial_and_dir_transports_need_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let base = minimal(dir.path()).replace("udp_listen = \"127.0.0.1:7700\"\n", "");
        let load = |text: String| RxConfig::load(&write_config(dir.path(), &text));

        let serial = base.replace("\"udp\"", "\"serial\"");
        let err = load(serial.clone()).unwrap_err().to_string();
        assert!(err.contains("link.serial_device"), "{err}");
        let c =
            load(serial.replace("[link]\n", "[link]\nserial_device = \"/dev/ttyS1\"\n")).unwrap();
        assert_eq!(c.link.baud, 115_200);

        let d = base.replace("\"udp\"", "\"dir\"");
        let err = load(d.clone()).unwrap_err().to_string();
        assert!(err.contains("link.inbox_dir"), "{err}");
        let missing = d.replace("[link]\n", "[link]\ninbox_dir = \"/nonexistent/inbox\"\n");
        let err = load(missing).unwrap_err().to_string();
        assert!(
            err.contains("link.inbox_dir") && err.contains("not a directory"),
            "{err}"
        );
        let ok = d.replace(
            "[link]\n",
            &format!("[link]\ninbox_dir = \"{}\"\n", dir.path().display()),
        );
        assert_eq!(load(ok).unwrap().link.transport, Transport::Dir);
    }

    #[test]
    fn old_serial_baud_key_is_refused_for_baud() {
        let dir = tempfile::tempdir().unwrap();
        let text = minimal(dir.path()).replace(
            "[link]\n",
            "[link]\nserial_device = \"/dev/ttyS1\"\nserial_baud = 9600\n",
        );
        let err = refusal(dir.path(), &text);
        assert!(err.contains("serial_baud"), "{err}");
        let text = minimal(dir.path()).replace("[link]\n", "[link]\nbaud = 9600\n");
        let c = RxConfig::load(&write_config(dir.path(), &text)).unwrap();
        assert_eq!(c.link.baud, 9600);
    }

    #[test]
    fn console_and_leds_are_optional_with_documented_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let c = RxConfig::load(&write_config(dir.path(), &minimal(dir.path()))).unwrap();
        assert!(c.console.is_none() && c.leds.is_none());
        assert_eq!(c.state_min_free_mb, 64);
        let text = format!(
            "{}[console]\ndevice = \"/dev/ttyS1\"\n[leds]\nlink = \"\"\nhmac_fault_threshold = 5\n",
            minimal(dir.path())
        );
        let c = RxConfig::load(&write_config(dir.path(), &text)).unwrap();
        assert_eq!(c.console.unwrap().baud, 115_200);
        let leds = c.leds.unwrap();
        assert_eq!(leds.hmac_fault_threshold, Some(5));
        assert_eq!(leds.power, "weir:power");
        assert_eq!(leds.link, "");
        assert_eq!(leds.base, Path::new("/sys/class/leds"));
    }

    #[test]
    fn metrics_is_optional_and_a_bad_listen_address_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let c = RxConfig::load(&write_config(dir.path(), &minimal(dir.path()))).unwrap();
        assert!(c.metrics.is_none());
        let with =
            |listen: &str| format!("{}[metrics]\nlisten = \"{listen}\"\n", minimal(dir.path()));
        let c = RxConfig::load(&write_config(dir.path(), &with("127.0.0.1:9464"))).unwrap();
        assert_eq!(c.metrics.unwrap().listen, "127.0.0.1:9464");
        let err = refusal(dir.path(), &with("127.0.0.1"));
        assert!(
            err.contains("rx.toml") && err.contains("metrics.listen"),
            "{err}"
        );
        let err = refusal(
            dir.path(),
            &format!(
                "{}[metrics]\nlisten = \"127.0.0.1:1\"\nport = 2\n",
                minimal(dir.path())
            ),
        );
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn bad_key_file_names_the_key_field_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = minimal(dir.path()).replace("1.key", "missing.key");
        let err = refusal(dir.path(), &text);
        assert!(err.contains("auth.keys[0].file"), "{err}");
        assert!(err.contains("missing.key"), "{err}");
    }

    #[test]
    fn registry_url_forms() {
        let dir = tempfile::tempdir().unwrap();
        let with = |url: &str| {
            let text = format!(
                "{}[delivery]\nregistry_url = \"{url}\"\n",
                minimal(dir.path())
            );
            RxConfig::load(&write_config(dir.path(), &text))
        };
        let c = with("http://127.0.0.1:5000").unwrap();
        assert_eq!(
            c.registry_endpoint().unwrap(),
            Some(RegistryEndpoint {
                host: "127.0.0.1:5000".into(),
                insecure: true
            })
        );
        assert_eq!(c.layout_dir(), None);
        for bad in ["ftp://x", "https://x/v2/", "not a url"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("delivery.registry_url"), "{bad}: {err}");
        }
    }

    #[test]
    fn username_needs_password_file_and_password_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{}[delivery]\nusername = \"mirror\"\n", minimal(dir.path()));
        let err = refusal(dir.path(), &text);
        assert!(err.contains("delivery.password_file"), "{err}");

        let pass = dir.path().join("pass");
        std::fs::write(&pass, "s3cret\n").unwrap();
        let text = format!(
            "{}[delivery]\nusername = \"mirror\"\npassword_file = \"{}\"\n",
            minimal(dir.path()),
            pass.display()
        );
        let c = RxConfig::load(&write_config(dir.path(), &text)).unwrap();
        let creds = c.registry_credentials().unwrap().unwrap();
        assert_eq!(creds.password, "s3cret");
        assert!(!format!("{creds:?}").contains("s3cret"));
    }

    #[test]
    fn retention_takes_fractions_of_hours_and_refuses_bad_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let c = RxConfig::load(&write_config(dir.path(), &minimal(dir.path()))).unwrap();
        assert_eq!(c.retention, RetentionConfig::default());
        assert_eq!(c.retention.keep_delivered_hours, 72.0);
        assert_eq!(c.retention.high_water_percent, 90);
        let with = |body: &str| format!("{}[retention]\n{body}", minimal(dir.path()));
        let c = RxConfig::load(&write_config(
            dir.path(),
            &with("keep_delivered_hours = 0.001\nhigh_water_percent = 50\n"),
        ))
        .unwrap();
        assert_eq!(c.retention.keep_delivered_hours, 0.001);
        assert_eq!(c.retention.high_water_percent, 50);
        let c = RxConfig::load(&write_config(
            dir.path(),
            &with("keep_delivered_hours = 24\n"),
        ))
        .unwrap();
        assert_eq!(c.retention.keep_delivered_hours, 24.0);
        for (body, field) in [
            (
                "keep_delivered_hours = -1.0\n",
                "retention.keep_delivered_hours",
            ),
            (
                "keep_delivered_hours = nan\n",
                "retention.keep_delivered_hours",
            ),
            ("high_water_percent = 0\n", "retention.high_water_percent"),
            ("high_water_percent = 101\n", "retention.high_water_percent"),
            ("keep_days = 3\n", "keep_days"),
        ] {
            let err = refusal(dir.path(), &with(body));
            assert!(
                err.contains(field) && err.contains("rx.toml"),
                "{body}: {err}"
            );
        }
    }

    #[test]
    fn mapping_rewrites_first_matching_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}[[delivery.mapping]]\nfrom = \"library/\"\nto = \"mirror/\"\n[[delivery.mapping]]\nfrom = \"\"\nto = \"x\"\n",
            minimal(dir.path())
        );
        let err = refusal(dir.path(), &text);
        assert!(err.contains("delivery.mapping[1].from"), "{err}");
        let text = format!(
            "{}[[delivery.mapping]]\nfrom = \"library/\"\nto = \"mirror/\"\n",
            minimal(dir.path())
        );
        let c = RxConfig::load(&write_config(dir.path(), &text)).unwrap();
        assert_eq!(c.map_repository("library/alpine"), "mirror/alpine");
        assert_eq!(c.map_repository("team/app"), "team/app");
    }
}
