//! Facts about the machine a table was measured on, and the socket-buffer
//! sysctls the run needs.
//!
//! gateway-rx asks for a 256 MiB UDP receive buffer and gateway-tx for a
//! 32 MiB send buffer, and get at most `net.core.rmem_max`/`wmem_max`;
//! udp-receiver asks for nothing and gets `net.core.rmem_default`. With the
//! Debian defaults all of them lose frames in bursts on loopback, so the
//! bench raises the three for the run (rmem_max and wmem_max as the
//! appliance image does, rmem_default to 32 MiB for udp-receiver) and puts
//! the old values back when it ends.

use std::process::Command;

/// Each buffer sysctl and the value it needs during the run.
const SYSCTLS: [(&str, u64); 3] = [
    (
        "net.core.rmem_max",
        weir_host::link::udp::RECV_BUFFER_BYTES as u64,
    ),
    (
        "net.core.wmem_max",
        weir_host::link::udp::SOCKET_BUFFER_BYTES as u64,
    ),
    ("net.core.rmem_default", 32 << 20),
];

fn sysctl_path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

pub fn read_sysctl(name: &str) -> Option<u64> {
    std::fs::read_to_string(sysctl_path(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raised sysctls, restored on drop.
pub struct RaisedBuffers {
    /// (name, old value, new value)
    restore: Vec<(&'static str, u64, u64)>,
}

impl RaisedBuffers {
    /// Raises each of the buffer sysctls to what the run needs where it is
    /// lower. Returns what could not be raised (not root, read-only /proc).
    pub fn raise() -> (RaisedBuffers, Vec<String>) {
        let mut restore = Vec::new();
        let mut refused = Vec::new();
        for (name, wanted) in SYSCTLS {
            match read_sysctl(name) {
                Some(v) if v < wanted => {
                    match std::fs::write(sysctl_path(name), wanted.to_string()) {
                        Ok(()) => restore.push((name, v, wanted)),
                        Err(e) => refused.push(format!("{name}: {e}")),
                    }
                }
                Some(_) => {}
                None => refused.push(format!("{name}: unreadable")),
            }
        }
        (RaisedBuffers { restore }, refused)
    }

    /// What was raised, `name old→new`.
    pub fn describe(&self) -> Vec<String> {
        self.restore
            .iter()
            .map(|(n, v, w)| format!("{n} {v}→{w}"))
            .collect()
    }
}

impl Drop for RaisedBuffers {
    fn drop(&mut self) {
        for (name, v, _) in &self.restore {
            if let Err(e) = std::fs::write(sysctl_path(name), v.to_string()) {
                eprintln!("could not restore {name} to {v}: {e}");
            }
        }
    }
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// One line per fact, for the report.
pub fn facts() -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let has = |flag: &str| {
        cpuinfo
            .lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == flag))
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "unknown".into());
    let sysctls: Vec<String> = SYSCTLS
        .iter()
        .map(|(n, _)| {
            format!(
                "{n}={}",
                read_sysctl(n)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "?".into())
            )
        })
        .collect();
    vec![
        format!(
            "CPU: {model}, {cores} cores available (sha_ni: {}, avx2: {})",
            has("sha_ni"),
            has("avx2")
        ),
        format!("memory: {mem_gib}; kernel {}", first_line("uname", &["-r"])),
        format!("socket buffers during the run: {}", sysctls.join(", ")),
        format!(
            "tools: {}; {}; {}; {}",
            first_line("rustc", &["--version"]),
            first_line("skopeo", &["--version"]),
            first_line("docker-registry", &["--version"]),
            // udp-sender prints its version (a date) first on stderr.
            format!(
                "udpcast {}",
                first_line("dpkg-query", &["-W", "-f=${Version}", "udpcast"])
            )
        ),
        format!(
            "weir commit: {}",
            first_line("git", &["rev-parse", "--short", "HEAD"])
        ),
    ]
}
