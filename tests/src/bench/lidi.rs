//! The anchor users compare weir with: lidi (ANSSI's diode tool), file to file on
//! loopback, with its defaults (1500 MTU, RaptorQ blocks of 734,928 bytes,
//! 2 % repair), on the same archive the weir crossing moves.
//!
//! lidi is never a dependency of weir: the bench unpacks lidi's release
//! tarball (by default `../shared/anchors/lidi-2.1.1-8a9f7e0.tar.gz` from
//! the workspace root) into a cache folder outside the repository
//! (`$XDG_CACHE_HOME/weir-bench-lidi/<tarball>/`, else
//! `/tmp/weir-bench-lidi/<tarball>/`) and builds it there with `cargo build
//! --release` (its crates come from the registry as usual); a previous build
//! in that folder is reused.
//!
//! The chain, as lidi's docs describe it: `diode-send-file` → TCP →
//! `diode-send` → UDP → `diode-receive` → TCP → `diode-receive-file`
//! (`--max-files 1`, so it exits once the file is written). Timing: from the
//! moment `diode-send-file` is started with the file to the moment the
//! receiver's output file has the archive's full size (polled every 5 ms);
//! then the output's sha256 is compared with the archive's.
//!
//! lidi's "Tweaking parameters" page names the sysctls a receiver (and, for
//! high throughput, a sender) needs: `net.ipv4.udp_mem`, `net.core.rmem_max`,
//! `net.ipv4.udp_rmem_min`, `net.core.wmem_max`, `net.ipv4.udp_wmem_min`, all
//! at 97,536,000 (1500 MTU × 512 packets per block × 127 blocks).
//! [`LidiSysctls`] raises each that is lower for lidi's run and restores the
//! old values when dropped (or, through `machine`, when a signal ends the
//! bench).

use super::machine::{put_back_sysctl, raise_sysctl, sysctl_path};
use super::udpcast::sha256_file;
use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The value lidi's docs give for each of its sysctls.
const LIDI_BUFFER: u64 = 97_536_000;
/// Sysctls lidi's "Tweaking parameters" page names (`udp_mem` is a triple).
const LIDI_SYSCTLS: [&str; 5] = [
    "net.ipv4.udp_mem",
    "net.core.rmem_max",
    "net.ipv4.udp_rmem_min",
    "net.core.wmem_max",
    "net.ipv4.udp_wmem_min",
];
/// The binaries the file-to-file chain needs.
const BINS: [&str; 4] = [
    "diode-send",
    "diode-receive",
    "diode-send-file",
    "diode-receive-file",
];

/// lidi's source tarball, beside the workspace: `../shared/anchors/`
/// from the workspace root.
pub fn default_tarball() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    root.parent()
        .unwrap_or(&root)
        .join("shared/anchors/lidi-2.1.1-8a9f7e0.tar.gz")
}

fn cache_root() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("weir-bench-lidi"),
        _ => PathBuf::from("/tmp/weir-bench-lidi"),
    }
}

/// lidi's four binaries, built.
#[derive(Debug, Clone)]
pub struct LidiBins {
    pub dir: PathBuf,
    /// `lidi-2.1.1` (the tarball's top folder).
    pub version: String,
    /// Seconds the build took; None: a previous build was reused.
    pub built_s: Option<f64>,
}

impl LidiBins {
    fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// lidi's log lines without their colour escapes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Unpacks and builds lidi from `tarball` into the cache folder, or reuses
/// the build already there.
pub fn build(tarball: &Path) -> Result<LidiBins> {
    if !tarball.is_file() {
        bail!("lidi's tarball {} not found", tarball.display());
    }
    let stem = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".tar.gz").trim_end_matches(".tgz"))
        .context("tarball name")?
        .to_string();
    let home = cache_root().join(&stem);
    let target = home.join("target");
    let release = target.join("release");
    let source = |home: &Path| -> Option<PathBuf> {
        std::fs::read_dir(home)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("Cargo.toml").is_file())
    };
    let version = |src: &Path| {
        src.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("lidi")
            .to_string()
    };
    if BINS.iter().all(|b| release.join(b).is_file()) {
        if let Some(src) = source(&home) {
            return Ok(LidiBins {
                dir: release,
                version: version(&src),
                built_s: None,
            });
        }
    }
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    if source(&home).is_none() {
        let out = Command::new("tar")
            .arg("xzf")
            .arg(tarball)
            .arg("-C")
            .arg(&home)
            .output()
            .context("running tar")?;
        if !out.status.success() {
            bail!(
                "unpacking {}: {}",
                tarball.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let src = source(&home).context("the tarball holds no Cargo.toml folder")?;
    eprintln!(
        "lidi: building {} in {} (cargo build --release, its four binaries)...",
        version(&src),
        src.display()
    );
    let log_path = home.join("build.log");
    let log = std::fs::File::create(&log_path)?;
    let t = Instant::now();
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release"])
        .args(BINS.iter().flat_map(|b| ["--bin", b]))
        .current_dir(&src)
        // Its own target folder, whatever the bench was built with.
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running cargo build for lidi")?;
    let built_s = t.elapsed().as_secs_f64();
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let first_error = text
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or("")
            .to_string();
        bail!(
            "cargo build --release of {} failed ({status}): {first_error}; log {}:\n{}",
            version(&src),
            log_path.display(),
            tail(&text, 15)
        );
    }
    for b in BINS {
        if !release.join(b).is_file() {
            bail!("lidi's build has no {b} in {}", release.display());
        }
    }
    Ok(LidiBins {
        dir: release,
        version: version(&src),
        built_s: Some(built_s),
    })
}

/// lidi's sysctls, raised for its run, restored on drop.
pub struct LidiSysctls {
    /// (name, old text, new text)
    restore: Vec<(&'static str, String, String)>,
    /// What could not be raised and why.
    pub refused: Vec<String>,
    /// Already at or above lidi's value: (name, value).
    pub kept: Vec<(&'static str, String)>,
}

impl LidiSysctls {
    /// Raises each of lidi's sysctls that is below 97,536,000 (each field of
    /// `udp_mem`). Not root, or a read-only /proc: says so in `refused` and
    /// leaves them.
    pub fn raise() -> LidiSysctls {
        let mut s = LidiSysctls {
            restore: Vec::new(),
            refused: Vec::new(),
            kept: Vec::new(),
        };
        // Root: the effective uid on /proc/self/status's Uid line is 0.
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|st| {
                st.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
            })
            .unwrap_or(false);
        for name in LIDI_SYSCTLS {
            let path = sysctl_path(name);
            let Ok(old) = std::fs::read_to_string(&path) else {
                s.refused.push(format!("{name}: unreadable"));
                continue;
            };
            let old = old.split_whitespace().collect::<Vec<_>>().join(" ");
            let fields: Vec<u64> = old
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            if fields.is_empty() || fields.iter().all(|&v| v >= LIDI_BUFFER) {
                s.kept.push((name, old));
                continue;
            }
            let new = fields
                .iter()
                .map(|&v| v.max(LIDI_BUFFER).to_string())
                .collect::<Vec<_>>()
                .join(" ");
            if !root {
                s.refused
                    .push(format!("{name} (is {old}): not root, left as it is"));
                continue;
            }
            match raise_sysctl(&path, &old, &new) {
                Ok(()) => s.restore.push((name, old, new)),
                Err(e) => s.refused.push(format!("{name} (is {old}): {e}")),
            }
        }
        s
    }

    /// `name old→new` of each raised sysctl.
    pub fn describe(&self) -> Vec<String> {
        self.restore
            .iter()
            .map(|(n, o, w)| format!("{n} {o}→{w}"))
            .collect()
    }
}

impl Drop for LidiSysctls {
    fn drop(&mut self) {
        for (name, old, _) in self.restore.iter().rev() {
            if let Err(e) = put_back_sysctl(&sysctl_path(name), old) {
                eprintln!("could not restore {name} to {old}: {e}");
            }
        }
    }
}

/// One lidi run that delivered the file whole.
#[derive(Debug, Clone)]
pub struct LidiRun {
    pub bytes: u64,
    /// Sender handed the file → output file at full size.
    pub seconds: f64,
    /// What the receiver's UDP socket dropped (kernel counter).
    pub rx_kernel_drops: u64,
    /// utime+stime of lidi's four processes over the same span, seconds.
    pub cpu_s: f64,
}

impl LidiRun {
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }
}

/// A child process killed and reaped on drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        // No new process once a signal is stopping the bench's children.
        super::machine::hold_if_stopping();
        let f = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name, child, log })
    }

    /// utime+stime so far, seconds (0 once it has exited and been reaped).
    fn cpu_s(&self) -> f64 {
        super::procfs::sample(self.child.id()).map_or(0.0, |s| s.cpu_s)
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("--- {}\n{}", self.name, tail(&strip_ansi(&text), 4))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether something listens on TCP 127.0.0.1:`port` (/proc/net/tcp, state
/// 0A): probing by connecting would start a transfer.
fn tcp_listening(port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A")
            })
        })
        .unwrap_or(false)
}

/// Moves `file` through lidi once, with its defaults, and checks the copy.
pub fn run(bins: &LidiBins, file: &Path, work: &Path, timeout: Duration) -> Result<LidiRun> {
    let total = std::fs::metadata(file)?.len();
    let dir = work.join("lidi");
    let _ = std::fs::remove_dir_all(&dir);
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir)?;
    let name = file.file_name().context("file name")?;
    let out = out_dir.join(name);
    let send_tcp = free_tcp_port()?;
    let recv_tcp = free_tcp_port()?;
    let udp = free_udp_port()?;
    let udp_addr: SocketAddr = format!("127.0.0.1:{udp}").parse()?;

    let mut procs: Vec<Proc> = Vec::new();
    procs.push(Proc::spawn(
        "diode-receive-file",
        Command::new(bins.bin("diode-receive-file"))
            .args(["--from-tcp", &format!("127.0.0.1:{recv_tcp}")])
            .args(["--max-files", "1"])
            .arg(&out_dir),
        dir.join("diode-receive-file.log"),
    )?);
    let wait_for = |what: &str, procs: &mut [Proc], ready: &dyn Fn() -> bool| -> Result<()> {
        let t = Instant::now();
        while !ready() {
            if procs.iter_mut().any(|p| !p.running()) || t.elapsed() > Duration::from_secs(20) {
                let tails: Vec<String> = procs.iter().map(Proc::tail).collect();
                bail!("lidi: {what} did not come up\n{}", tails.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    wait_for("diode-receive-file", &mut procs, &|| {
        tcp_listening(recv_tcp)
    })?;
    procs.push(Proc::spawn(
        "diode-receive",
        Command::new(bins.bin("diode-receive"))
            .args(["--from", &udp_addr.to_string()])
            .args(["--to-tcp", &format!("127.0.0.1:{recv_tcp}")]),
        dir.join("diode-receive.log"),
    )?);
    wait_for("diode-receive", &mut procs, &|| {
        weir_tests::diode::kernel_udp_drops(udp_addr).is_some()
    })?;
    procs.push(Proc::spawn(
        "diode-send",
        Command::new(bins.bin("diode-send"))
            .args(["--from-tcp", &format!("127.0.0.1:{send_tcp}")])
            .args(["--to", &udp_addr.to_string()]),
        dir.join("diode-send.log"),
    )?);
    wait_for("diode-send", &mut procs, &|| tcp_listening(send_tcp))?;

    // The daemons' CPU before the file is handed over (start-up, idle).
    let cpu_before: f64 = procs.iter().map(Proc::cpu_s).sum();
    let started = Instant::now();
    let mut sender = Proc::spawn(
        "diode-send-file",
        Command::new(bins.bin("diode-send-file"))
            .args(["--to-tcp", &format!("127.0.0.1:{send_tcp}")])
            .arg(file),
        dir.join("diode-send-file.log"),
    )?;
    let deadline = started + timeout;
    let mut last_size = 0;
    let mut last_progress = Instant::now();
    let full = loop {
        let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        if size >= total {
            break Instant::now();
        }
        if size != last_size {
            last_size = size;
            last_progress = Instant::now();
        }
        let stalled = last_progress.elapsed() > Duration::from_secs(20);
        let receiver_gone = !procs[0].running();
        if stalled || receiver_gone || Instant::now() > deadline {
            let drops = weir_tests::diode::kernel_udp_drops(udp_addr).unwrap_or(0);
            let mut tails: Vec<String> = procs.iter().map(Proc::tail).collect();
            tails.push(sender.tail());
            bail!(
                "lidi's output stopped at {size} of {total} bytes ({}; diode-receive's socket dropped {drops} datagrams)\n{}",
                if receiver_gone {
                    "diode-receive-file exited"
                } else if stalled {
                    "no progress for 20 s"
                } else {
                    "timed out"
                },
                tails.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let seconds = (full - started).as_secs_f64();
    let cpu_s = procs.iter().map(Proc::cpu_s).sum::<f64>() + sender.cpu_s() - cpu_before;
    // diode-receive-file exits once its one file is written; give it and
    // the sender a moment to finish on their own.
    let t = Instant::now();
    while (procs[0].running() || sender.running()) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rx_kernel_drops = weir_tests::diode::kernel_udp_drops(udp_addr).unwrap_or(0);
    drop(sender);
    drop(procs);
    let (want, got) = (sha256_file(file)?, sha256_file(&out)?);
    let _ = std::fs::remove_file(&out);
    if want != got {
        bail!("lidi delivered {total} bytes that differ from the archive (sha256 {got}, expected {want})");
    }
    Ok(LidiRun {
        bytes: total,
        seconds,
        rx_kernel_drops,
        cpu_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_escapes_are_stripped_from_log_lines() {
        assert_eq!(
            strip_ansi("\u{1b}[0m\u{1b}[31m[ERROR] \u{1b}[0mfailed"),
            "[ERROR] failed"
        );
    }
}
