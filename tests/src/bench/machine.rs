//! Facts about the machine a table was measured on, and the socket-buffer
//! sysctls the run needs.
//!
//! gateway-rx asks for a 256 MiB UDP receive buffer and gateway-tx for a
//! 32 MiB send buffer, and get at most `net.core.rmem_max`/`wmem_max`;
//! udp-receiver asks for nothing and gets `net.core.rmem_default`. With the
//! Debian defaults all of them lose frames in bursts on loopback, so the
//! bench raises the three for the run (rmem_max and wmem_max as the
//! appliance image does, rmem_default to 32 MiB for udp-receiver) and puts
//! the old values back when it ends, also when a signal ends it
//! ([`restore_on_signal`]).

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

pub fn sysctl_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/{}", name.replace('.', "/")))
}

/// Sysctl files raised and not yet put back, each with its old text,
/// newest last. A guard puts back its own when dropped, but a signal that
/// ends the bench runs no `Drop`, and the machine would keep the raised
/// buffers for whatever it runs next.
static RAISED: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());

fn raised() -> MutexGuard<'static, Vec<(PathBuf, String)>> {
    // The list stays whole whatever panicked while holding it.
    RAISED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `new` into the sysctl file `path`, whose text was `old`, and
/// notes it so that a signal can still put it back.
pub fn raise_sysctl(path: &Path, old: &str, new: &str) -> std::io::Result<()> {
    std::fs::write(path, new)?;
    note_raised(path, old);
    Ok(())
}

/// Puts `old` back into the sysctl file `path`, as the guard that raised it
/// does when dropped; the note of it goes either way.
pub fn put_back_sysctl(path: &Path, old: &str) -> std::io::Result<()> {
    let written = std::fs::write(path, old);
    note_restored(path);
    written
}

fn note_raised(path: &Path, old: &str) {
    raised().push((path.to_path_buf(), old.to_string()));
}

/// The newest note of `path` goes.
fn note_restored(path: &Path) {
    let mut list = raised();
    if let Some(i) = list.iter().rposition(|(p, _)| p == path) {
        list.remove(i);
    }
}

/// Writes back every value noted and not yet restored, newest first (a
/// file raised twice ends at its first old value); says `path → old` for
/// each, or why it could not.
pub fn restore_noted() -> Vec<String> {
    let mut list = raised();
    let mut said = Vec::new();
    while let Some((path, old)) = list.pop() {
        said.push(match std::fs::write(&path, &old) {
            Ok(()) => format!("{} → {old}", path.display()),
            Err(e) => format!("{} → {old} failed: {e}", path.display()),
        });
    }
    said
}

/// Set by the signal thread before it stops anything.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Once a signal has arrived, the calling thread waits here for the signal
/// thread to end the process: whatever it measured after its children
/// were stopped is no figure, and the process's status is the signal's.
pub fn hold_if_stopping() {
    while STOPPING.load(Ordering::SeqCst) {
        std::thread::park();
    }
}

/// Watches for SIGINT, SIGTERM and SIGHUP on a thread of its own; on the
/// first, puts back every sysctl still raised and says so, stops the
/// bench's children, removes `scratch` (the run's temporary directory:
/// its archives are gigabytes, and no `Drop` removes it then), and exits
/// with status 128 + the signal, as the signal's default action would
/// have.
pub fn restore_on_signal(scratch: Option<PathBuf>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing the bench's signal handlers")?;
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                STOPPING.store(true, Ordering::SeqCst);
                for line in restore_noted() {
                    eprintln!("bench stopped by signal {sig}: put back {line}");
                }
                // A child that ends may let the main thread start another
                // before it reaches a spawn point that holds it: again
                // until none is left.
                for _ in 0..10 {
                    stop_children(Duration::from_secs(3));
                    std::thread::sleep(Duration::from_millis(300));
                    if running_children().is_empty() {
                        break;
                    }
                }
                if let Some(dir) = &scratch {
                    match std::fs::remove_dir_all(dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            eprintln!("could not remove {}: {e}", dir.display())
                        }
                        _ => {}
                    }
                }
                std::process::exit(128 + sig);
            }
        })
        .context("starting the bench's signal thread")?;
    Ok(())
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
                    let path = sysctl_path(name);
                    match raise_sysctl(&path, &v.to_string(), &wanted.to_string()) {
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
        for (name, v, _) in self.restore.iter().rev() {
            if let Err(e) = put_back_sysctl(&sysctl_path(name), &v.to_string()) {
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

/// This process's children still running (the gateways, the anchors,
/// the registries): /proc entries whose parent it is, zombies left out.
fn running_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // The command name is in parentheses and may hold anything:
            // state and parent are the fields after its last ')'.
            let mut fields = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace())
                .into_iter()
                .flatten();
            let state = fields.next();
            let parent = fields.next().and_then(|p| p.parse::<i32>().ok());
            parent == Some(me) && state != Some("Z")
        })
        .collect()
}

/// SIGTERM to each of this process's children, SIGKILL to those still
/// running after `grace`: without the bench they would go on holding
/// ports, cores and their state directories.
#[allow(unsafe_code)] // kill(2) has no wrapper in std beyond Child::kill.
fn stop_children(grace: Duration) {
    let send = |pid: i32, signal: i32| {
        // SAFETY: kill takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid, signal);
        }
    };
    for pid in running_children() {
        send(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !running_children().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in running_children() {
        send(pid, libc::SIGKILL);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noted_values_are_put_back_newest_first_and_restored_ones_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("wmem_max");
        let b = dir.path().join("rmem_max");
        // The bench raises a to 32 MiB, lidi's run raises it again, and b
        // is raised and put back by its own guard before the signal.
        std::fs::write(&a, "212992").unwrap();
        std::fs::write(&b, "4096").unwrap();
        raise_sysctl(&a, "212992", "33554432").unwrap();
        raise_sysctl(&a, "33554432", "97536000").unwrap();
        raise_sysctl(&b, "4096", "97536000").unwrap();
        put_back_sysctl(&b, "4096").unwrap();
        let said = restore_noted();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "212992");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "4096");
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[1].ends_with("→ 212992"), "{said:?}");
        assert!(restore_noted().is_empty());
    }
}
