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
//! ([`restore_on_signal`]). On a virtual machine whose kernel hands freed
//! pages back to the host at once, it also keeps them for the run
//! ([`KeptMemory`]).

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

/// The free page reporting knobs of the kernel this kind of virtual machine
/// runs. Mainline kernels have no such directory, and there the bench
/// leaves memory alone.
const PAGE_REPORTING: &str = "/sys/module/page_reporting/parameters";
/// Each knob and what it is kept at for the run: a page goes back to the
/// host once it has been free `min_free_ms` (five minutes, the most the
/// knob took of the values tried: an hour is refused), and with 1024 MiB
/// waiting (`max_waiting_mib`) pages still went back at once; 4 GiB holds
/// what the bench touches before each timed run.
const KEEP_FREED: [(&str, u64); 2] = [("min_free_ms", 300_000), ("max_waiting_mib", 4096)];

/// Freed memory kept by the virtual machine for the run, restored on drop.
///
/// With free page reporting at 0 ms, every page the kernel frees goes back
/// to the host at once, and the next page cache filled from it costs a
/// fault in the host per page: `dd` of 1 GiB into a new file ran at
/// 145 MB/s, against 2.1 GB/s right after the same amount was freed. Which
/// run pays that depends on what ran before it, not on what it does: lidi,
/// whose receiver writes its whole output into fresh page cache, ran at
/// 74–94 MB/s that way, and at 182–307 MB/s with freed pages kept. A real
/// machine keeps its memory, so the bench keeps it too, and touches
/// `prime` bytes first, and again before each timed run
/// ([`KeptMemory::touch_again`]),
/// so that no measured run pays for the host's faults either.
pub struct KeptMemory {
    /// (knob, old text), in the order raised.
    restore: Vec<(PathBuf, String)>,
    /// Bytes touched before each timed run; 0 where nothing is kept.
    prime: usize,
    said: Vec<String>,
}

impl KeptMemory {
    /// Keeps freed pages with the virtual machine where the knobs exist and
    /// are lower, then touches and frees `prime` bytes. Returns the guard
    /// and what could not be done.
    pub fn keep(prime: usize) -> (KeptMemory, Vec<String>) {
        KeptMemory::keep_in(Path::new(PAGE_REPORTING), prime)
    }

    fn keep_in(dir: &Path, prime: usize) -> (KeptMemory, Vec<String>) {
        let mut kept = KeptMemory {
            restore: Vec::new(),
            prime: 0,
            said: Vec::new(),
        };
        let mut refused = Vec::new();
        for (name, wanted) in KEEP_FREED {
            let path = dir.join(name);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let old = text.trim().to_string();
            match old.parse::<u64>() {
                Ok(v) if v < wanted => match raise_sysctl(&path, &old, &wanted.to_string()) {
                    Ok(()) => {
                        kept.said.push(format!("{} {old}→{wanted}", path.display()));
                        kept.restore.push((path, old));
                    }
                    Err(e) => refused.push(format!("{}: {e}", path.display())),
                },
                Ok(_) => {}
                Err(_) => refused.push(format!("{}: reads {old:?}", path.display())),
            }
        }
        if !kept.restore.is_empty() && prime > 0 {
            kept.prime = prime;
            let t = Instant::now();
            let touched = touch_and_free(prime);
            kept.said.push(format!(
                "{:.1} GiB touched and freed first in {:.1} s ({:.0} MB/s)",
                touched as f64 / (1u64 << 30) as f64,
                t.elapsed().as_secs_f64(),
                touched as f64 / 1e6 / t.elapsed().as_secs_f64().max(1e-9)
            ));
        }
        (kept, refused)
    }

    /// Before a timed run whose anchor it is compared with: touches and
    /// frees the first figure's bytes again, so that each run starts with
    /// as much memory the virtual machine holds, whatever the run before
    /// left in page cache. Cheap once those pages are kept (2–3 s for
    /// 4 GiB); nothing where no memory is kept.
    pub fn touch_again(&self) {
        if self.prime > 0 {
            touch_and_free(self.prime);
        }
    }

    /// What was changed and done, for the machine's facts.
    pub fn describe(&self) -> Vec<String> {
        self.said.clone()
    }
}

/// Waits until the kernel has stopped handing freed pages back to the host
/// (`reported_kib` unchanged for 2 s, at most 60 s), and says how long it
/// waited and how much went back, or nothing where there is no such knob.
/// When a run follows another, the memory the last one kept goes back as
/// it ends, gigabytes at once, and the virtual machine stalls meanwhile:
/// gateway-tx alone missed its rate by 32 % at 1 Gb/s in a run started
/// right after one. Waiting keeps the pacing figure out of the handing
/// back itself; the machine may still stall for a while after it.
pub fn settle_page_reporting() -> Option<String> {
    let path = Path::new(PAGE_REPORTING).join("reported_kib");
    let read = || -> Option<u64> { std::fs::read_to_string(&path).ok()?.trim().parse().ok() };
    let first = read()?;
    let t = Instant::now();
    let (mut last, mut since) = (first, Instant::now());
    while since.elapsed() < Duration::from_secs(2) && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(250));
        let now = read()?;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    Some(format!(
        "{:.1} GiB handed back to the host while the run waited {:.1} s for that to stop",
        last.saturating_sub(first) as f64 / (1u64 << 20) as f64,
        t.elapsed().as_secs_f64()
    ))
}

/// Writes every page of a `bytes`-long allocation and frees it; returns the
/// bytes touched.
fn touch_and_free(bytes: usize) -> usize {
    let mut v: Vec<u8> = Vec::new();
    if v.try_reserve_exact(bytes).is_err() {
        return 0;
    }
    v.resize(bytes, 0xa5);
    std::hint::black_box(&v);
    v.len()
}

impl Drop for KeptMemory {
    fn drop(&mut self) {
        for (path, old) in self.restore.iter().rev() {
            if let Err(e) = put_back_sysctl(path, old) {
                eprintln!("could not restore {} to {old}: {e}", path.display());
            }
        }
    }
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

    /// The list of raised files is one for the process; tests that raise
    /// take turns.
    static NOTES: Mutex<()> = Mutex::new(());

    #[test]
    fn noted_values_are_put_back_newest_first_and_restored_ones_left_alone() {
        let _turn = NOTES.lock().unwrap_or_else(|e| e.into_inner());
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

    #[test]
    fn freed_pages_are_kept_for_the_run_and_the_old_values_put_back() {
        let _turn = NOTES.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let ms = dir.path().join("min_free_ms");
        let mib = dir.path().join("max_waiting_mib");
        std::fs::write(&ms, "0\n").unwrap();
        std::fs::write(&mib, "1024\n").unwrap();
        let (kept, refused) = KeptMemory::keep_in(dir.path(), 1 << 20);
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(std::fs::read_to_string(&ms).unwrap(), "300000");
        assert_eq!(std::fs::read_to_string(&mib).unwrap(), "4096");
        let said = kept.describe();
        assert!(said[0].ends_with("min_free_ms 0→300000"), "{said:?}");
        assert!(said[1].ends_with("max_waiting_mib 1024→4096"), "{said:?}");
        assert!(said[2].starts_with("0.0 GiB touched and freed"), "{said:?}");
        drop(kept);
        assert_eq!(std::fs::read_to_string(&ms).unwrap(), "0");
        assert_eq!(std::fs::read_to_string(&mib).unwrap(), "1024");
        assert!(restore_noted().is_empty(), "the guard's notes went with it");

        // Already keeping pages longer: left alone, nothing touched.
        std::fs::write(&ms, "600000").unwrap();
        std::fs::write(&mib, "8192").unwrap();
        let (kept, refused) = KeptMemory::keep_in(dir.path(), 1 << 20);
        assert!(refused.is_empty() && kept.describe().is_empty());
        drop(kept);
        assert_eq!(std::fs::read_to_string(&ms).unwrap(), "600000");

        // A machine without the knobs: nothing to do, nothing refused.
        let (kept, refused) = KeptMemory::keep_in(&dir.path().join("absent"), 1 << 20);
        assert!(refused.is_empty() && kept.describe().is_empty());

        std::fs::write(&ms, "soon").unwrap();
        let (_, refused) = KeptMemory::keep_in(dir.path(), 0);
        assert!(refused[0].ends_with("reads \"soon\""), "{refused:?}");
    }
}
