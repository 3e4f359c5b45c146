//! The configuration pieces both gateways share: reading the TOML file,
//! the errors (each names the file, and the field where there is one), the
//! link transport, `[console]`, `[leds]`, `[metrics]`, the state disk
//! floor, and how a relative path is resolved: against the directory of
//! the configuration file, so a configuration works wherever it is checked
//! out and whatever the working directory of the process.
//!
//! Each gateway keeps its own top-level type (`TxConfig`, `RxConfig`) with
//! the keys only it has; the TOML keys of both stay as they were.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default largest frame, in bytes: an Ethernet MTU less IP/UDP headers,
/// rounded.
pub const DEFAULT_DATAGRAM_SIZE: usize = 1400;
/// Default serial line rate (8N1), of the link and of the console.
pub const DEFAULT_BAUD: u32 = 115_200;
/// Default free space (MiB) of the state disk below which intake stops.
pub const DEFAULT_STATE_MIN_FREE_MB: u64 = 64;
/// Default count of bad tags within a minute above which the receiver
/// raises its fault.
pub const DEFAULT_HMAC_FAULT_THRESHOLD: u64 = 100;

pub fn default_datagram_size() -> usize {
    DEFAULT_DATAGRAM_SIZE
}
pub fn default_baud() -> u32 {
    DEFAULT_BAUD
}
pub fn default_state_min_free_mb() -> u64 {
    DEFAULT_STATE_MIN_FREE_MB
}

/// Why a configuration was refused; every variant names the file, and the
/// field where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// toml's message carries line, column and the offending key.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

/// A field that cannot work, found where the file is not known; the file
/// is added with [`FieldError::in_file`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn in_file(self, path: &Path) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            field: self.field,
            reason: self.reason,
        }
    }
}

/// Reads and parses a TOML configuration file, without validating it.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses TOML text; `path` is named in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The directory relative paths in the file at `path` are taken from.
pub fn base_dir(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Makes `path` relative to `base` when it is relative.
pub fn resolve(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

/// Like [`resolve`], for an optional path.
pub fn resolve_opt(base: &Path, path: &mut Option<PathBuf>) {
    if let Some(p) = path {
        resolve(base, p);
    }
}

/// Makes the paths of the optional `[console]` and `[leds]` tables, which
/// both gateways have, relative to `base`.
pub fn resolve_console_and_leds(
    base: &Path,
    console: &mut Option<ConsoleConfig>,
    leds: &mut Option<LedsConfig>,
) {
    if let Some(c) = console {
        c.resolve_paths(base);
    }
    if let Some(l) = leds {
        l.resolve_paths(base);
    }
}

/// How frames cross the diode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Serial,
    Dir,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Serial => "serial",
            Transport::Dir => "dir",
        })
    }
}

/// A directory the gateway makes at its start when missing: it may exist
/// (as a directory), or be creatable, its nearest existing ancestor a
/// directory. A file in the way would stop the start long after the check.
pub fn check_dir_to_make(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        return match dir.is_dir() {
            true => Ok(()),
            false => Err(format!("{} exists and is not a directory", dir.display())),
        };
    }
    match dir.ancestors().skip(1).find(|a| a.exists()) {
        Some(a) if !a.is_dir() => Err(format!(
            "{} cannot be made: {} is not a directory",
            dir.display(),
            a.display()
        )),
        _ => Ok(()),
    }
}

/// The checks of a serial link both ends make: a device, and a line rate.
pub fn check_serial_link(device: Option<&Path>, baud: u32) -> Result<(), FieldError> {
    if device.is_none() {
        return Err(FieldError::new(
            "link.serial_device",
            "required when link.transport = \"serial\" (e.g. \"/dev/ttyS2\")",
        ));
    }
    if baud == 0 {
        return Err(FieldError::new("link.baud", "must be above 0"));
    }
    Ok(())
}

/// `[console]`: a line-command prompt on a tty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The console's tty, e.g. `/dev/ttyS1`. Required.
    pub device: PathBuf,
    /// Line rate, 8N1. Default 115200.
    #[serde(default = "default_baud")]
    pub baud: u32,
}

impl ConsoleConfig {
    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.device);
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.baud == 0 {
            return Err(FieldError::new("console.baud", "must be above 0"));
        }
        Ok(())
    }
}

/// `[leds]`: status LEDs through the Linux LED class. An LED that is
/// missing is logged once and skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedsConfig {
    /// Default `/sys/class/leds`.
    #[serde(default = "default_leds_base")]
    pub base: PathBuf,
    /// LED class names under `base`; "" for an LED the box lacks.
    /// Defaults `weir:power`, `weir:link`, `weir:activity`, `weir:fault`.
    #[serde(default = "default_led_power")]
    pub power: String,
    #[serde(default = "default_led_link")]
    pub link: String,
    #[serde(default = "default_led_activity")]
    pub activity: String,
    #[serde(default = "default_led_fault")]
    pub fault: String,
    /// Receiver only: the fault "HMAC failures" stands while more frames
    /// than this failed their tag in the last minute (forgery, a damaged
    /// line, a wrong key). Default 100. The sender checks no tags and
    /// refuses the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_fault_threshold: Option<u64>,
}

impl Default for LedsConfig {
    fn default() -> Self {
        LedsConfig {
            base: default_leds_base(),
            power: default_led_power(),
            link: default_led_link(),
            activity: default_led_activity(),
            fault: default_led_fault(),
            hmac_fault_threshold: None,
        }
    }
}

impl LedsConfig {
    pub fn names(&self) -> crate::LedNames {
        crate::LedNames {
            power: self.power.clone(),
            link: self.link.clone(),
            activity: self.activity.clone(),
            fault: self.fault.clone(),
        }
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        resolve(base, &mut self.base);
    }

    /// The bad-tag count that raises the receiver's fault.
    pub fn hmac_threshold(&self) -> u64 {
        self.hmac_fault_threshold
            .unwrap_or(DEFAULT_HMAC_FAULT_THRESHOLD)
    }
}

/// `[metrics]`: the Prometheus endpoint (`GET /metrics`). Absent: none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `address:port` to listen on, e.g. `127.0.0.1:9464`. Required.
    pub listen: String,
}

impl MetricsConfig {
    /// The address to listen on; an error names `metrics.listen`.
    pub fn listen_addr(&self) -> Result<SocketAddr, FieldError> {
        self.listen.trim().parse().map_err(|_| {
            FieldError::new(
                "metrics.listen",
                format!(
                    "{:?} is not an IP address and port (e.g. \"127.0.0.1:9464\" or \"[::1]:9464\")",
                    self.listen
                ),
            )
        })
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        self.listen_addr().map(|_| ())
    }
}

fn default_leds_base() -> PathBuf {
    PathBuf::from("/sys/class/leds")
}
fn default_led_power() -> String {
    "weir:power".into()
}
fn default_led_link() -> String {
    "weir:link".into()
}
fn default_led_activity() -> String {
    "weir:activity".into()
}
fn default_led_fault() -> String {
    "weir:fault".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_to_make_must_not_have_a_file_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_dir_to_make(dir.path()).is_ok());
        assert!(check_dir_to_make(&dir.path().join("new/deeper")).is_ok());
        let err = check_dir_to_make(&file).unwrap_err();
        assert!(err.ends_with("exists and is not a directory"), "{err}");
        let err = check_dir_to_make(&file.join("sub/dir")).unwrap_err();
        assert_eq!(
            err,
            format!(
                "{} cannot be made: {} is not a directory",
                file.join("sub/dir").display(),
                file.display()
            )
        );
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        state_dir: PathBuf,
        #[serde(default)]
        console: Option<ConsoleConfig>,
        #[serde(default)]
        leds: Option<LedsConfig>,
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "state_dir = \"state\"\n[console]\ndevice = \"tty\"\n[leds]\nbase = \"/sys/x\"\n",
        )
        .unwrap();
        let mut c: Sample = read_toml(&path).unwrap();
        let base = base_dir(&path);
        resolve(&base, &mut c.state_dir);
        resolve_console_and_leds(&base, &mut c.console, &mut c.leds);
        let console = c.console.as_ref().unwrap();
        let leds = c.leds.as_ref().unwrap();
        assert_eq!(c.state_dir, dir.path().join("state"));
        assert_eq!(console.device, dir.path().join("tty"));
        assert_eq!(console.baud, DEFAULT_BAUD);
        assert_eq!(leds.base, Path::new("/sys/x"));
        assert_eq!(leds.hmac_threshold(), DEFAULT_HMAC_FAULT_THRESHOLD);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "state_dir = \"s\"\nstate_dri = \"t\"\n").unwrap();
        let err = read_toml::<Sample>(&path).unwrap_err().to_string();
        assert!(
            err.contains("gw.toml") && err.contains("state_dri"),
            "{err}"
        );
        let err = read_toml::<Sample>(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
        let err = ConsoleConfig {
            device: "tty".into(),
            baud: 0,
        }
        .validate()
        .unwrap_err()
        .in_file(&path)
        .to_string();
        assert!(
            err.contains("gw.toml") && err.contains("console.baud"),
            "{err}"
        );
        let err = check_serial_link(None, 9600).unwrap_err().to_string();
        assert!(err.contains("link.serial_device"), "{err}");
    }

    #[test]
    fn metrics_listen_is_an_address_and_port() {
        let ok = |listen: &str| MetricsConfig {
            listen: listen.into(),
        };
        assert_eq!(
            ok("127.0.0.1:9464").listen_addr().unwrap(),
            "127.0.0.1:9464".parse::<SocketAddr>().unwrap()
        );
        assert!(ok("[::1]:9464").validate().is_ok());
        for bad in [
            "",
            "127.0.0.1",
            "localhost:9464",
            "127.0.0.1:99999",
            ":9464",
        ] {
            let err = ok(bad).validate().unwrap_err().to_string();
            assert!(err.starts_with("metrics.listen: "), "{bad:?}: {err}");
        }
    }
}
