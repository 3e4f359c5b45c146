//! What the kernel knows of a gateway process: CPU seconds and resident
//! memory, read from `/proc/PID/stat` and `/proc/PID/status`, sampled on a
//! thread so CPU can be read at the instant an image was accepted or
//! delivered, and the peak (VmHWM) survives until the process is killed.

// sysconf(_SC_CLK_TCK) has no safe wrapper in std.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the clock gateway-rx stamps its
/// status with, so both can be compared.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One reading of one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    pub at_ms: u64,
    /// utime + stime, seconds.
    pub cpu_s: f64,
    pub rss_kib: u64,
    /// Peak resident set since the process started (VmHWM).
    pub hwm_kib: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The fields of `/proc/PID/stat` after the command name, which may hold
/// spaces and parentheses; field 3 (state) is index 0.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Reads one process now; None once it has exited.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let at_ms = now_ms();
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of stat(5).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        at_ms,
        cpu_s: (utime + stime) / clock_ticks(),
        rss_kib: status_kib(&status, "VmRSS:")?,
        hwm_kib: status_kib(&status, "VmHWM:")?,
    })
}

/// The whole machine now: CPU seconds all its cores spent busy (user,
/// nice, system, irq, softirq, steal from the first line of /proc/stat),
/// whoever spent them; memory fields are zero.
pub fn machine_sample() -> Option<ProcSample> {
    let at_ms = now_ms();
    let ticks = all_cpus_ticks()?;
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    Some(ProcSample {
        at_ms,
        cpu_s: busy / clock_ticks(),
        rss_kib: 0,
        hwm_kib: 0,
    })
}

/// CPU seconds, over all cores, that the hypervisor ran something else
/// while this virtual machine's cores had work (steal, the eighth field of
/// /proc/stat's first line): time a timed run lost to the host.
pub fn steal_s() -> Option<f64> {
    Some(*all_cpus_ticks()?.get(7)? / clock_ticks())
}

/// The tick counters of /proc/stat's first line (all cores).
fn all_cpus_ticks() -> Option<Vec<f64>> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    Some(
        line.strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect(),
    )
}

/// Name under which [`ProcTrace`] records [`machine_sample`].
pub const MACHINE: &str = "machine";
/// Name under which [`ProcTrace`] records [`steal_s`] (as `cpu_s`).
pub const STEAL: &str = "steal";

fn steal_sample() -> Option<ProcSample> {
    Some(ProcSample {
        at_ms: now_ms(),
        cpu_s: steal_s()?,
        rss_kib: 0,
        hwm_kib: 0,
    })
}

/// CPU seconds of each thread of a process, by thread name (threads of one
/// name summed), busiest first.
pub fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(fields) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| {
                let rest = &stat[stat.rfind(')')? + 1..];
                Some(
                    rest.split_whitespace()
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                )
            })
        else {
            continue;
        };
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        *by_name.entry(name.trim_end().to_string()).or_default() += ticks / clock_ticks();
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, s)| *s >= 0.05).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// The pid of the running child of this process whose command name is
/// `comm` (e.g. `gateway-tx`): `pair::Gateway` does not expose its pid.
pub fn child_pid(comm: &str) -> Option<u32> {
    let me = std::process::id().to_string();
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(name) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if name.trim_end() != comm {
            continue;
        }
        // Field 4 (ppid) is index 1; a zombie (state Z) has exited.
        if let Some(f) = stat_fields(pid) {
            if f.get(1) == Some(&me) && f.first().map(String::as_str) != Some("Z") {
                found = Some(pid);
            }
        }
    }
    found
}

/// Samples a set of processes every `every` until stopped.
pub struct ProcTrace {
    samples: Arc<Mutex<BTreeMap<&'static str, Vec<ProcSample>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProcTrace {
    pub fn start(procs: Vec<(&'static str, u32)>, every: Duration) -> ProcTrace {
        let samples: Arc<Mutex<BTreeMap<&'static str, Vec<ProcSample>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let now = procs
                    .iter()
                    .map(|(name, pid)| (*name, sample(*pid)))
                    .chain([(MACHINE, machine_sample()), (STEAL, steal_sample())]);
                for (name, x) in now {
                    if let Some(x) = x {
                        s.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(name)
                            .or_default()
                            .push(x);
                    }
                }
                std::thread::sleep(every);
            }
        });
        ProcTrace {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Takes one more sample of `pid` (and of the machine and the host's
    /// steal) now, e.g. right
    /// before killing it.
    pub fn sample_now(&self, name: &'static str, pid: u32) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = sample(pid) {
            samples.entry(name).or_default().push(x);
        }
        for (name, x) in [(MACHINE, machine_sample()), (STEAL, steal_sample())] {
            if let Some(x) = x {
                samples.entry(name).or_default().push(x);
            }
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn series(&self, name: &str) -> Vec<ProcSample> {
        let mut v = self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default();
        v.sort_by_key(|s| s.at_ms);
        v
    }

    /// CPU seconds of `name` at `at_ms`, interpolated between the samples
    /// around it (the nearest one outside the sampled span).
    pub fn cpu_at(&self, name: &str, at_ms: u64) -> Option<f64> {
        let v = self.series(name);
        let after = v.iter().position(|s| s.at_ms >= at_ms);
        match after {
            None => v.last().map(|s| s.cpu_s),
            Some(0) => v.first().map(|s| s.cpu_s),
            Some(i) => {
                let (a, b) = (v[i - 1], v[i]);
                let span = (b.at_ms - a.at_ms).max(1) as f64;
                Some(a.cpu_s + (b.cpu_s - a.cpu_s) * (at_ms - a.at_ms) as f64 / span)
            }
        }
    }

    /// Highest VmHWM seen: the process's peak resident set while sampled.
    pub fn peak_kib(&self, name: &str) -> Option<u64> {
        self.series(name)
            .iter()
            .map(|s| s.hwm_kib.max(s.rss_kib))
            .max()
    }
}

impl Drop for ProcTrace {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_a_resident_set() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib, "{s:?}");
    }

    /// The machine's busy time grows at least by what this process spends
    /// spinning (it counts every process, this one too).
    #[test]
    fn the_machine_is_busy_at_least_while_this_process_spins() {
        let (m0, p0) = (
            machine_sample().expect("/proc/stat"),
            sample(std::process::id()).expect("own /proc entry"),
        );
        let t = std::time::Instant::now();
        let mut spent = 0.0;
        while spent < 0.3 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no CPU time seen after a minute"
            );
            std::hint::spin_loop();
            spent = sample(std::process::id()).map_or(0.0, |s| s.cpu_s) - p0.cpu_s;
        }
        let m1 = machine_sample().expect("/proc/stat");
        assert!(
            m1.cpu_s - m0.cpu_s >= spent - 0.05,
            "machine {} → {}, this process {spent}",
            m0.cpu_s,
            m1.cpu_s
        );
    }

    #[test]
    fn threads_are_listed_by_name_with_their_cpu() {
        // Spin until the threads' CPU time shows it, not for a wall-clock
        // span: on a loaded machine 300 ms of wall time may be 0.1 s of CPU.
        let started = std::time::Instant::now();
        let mut threads = Vec::new();
        while threads.iter().map(|(_, s)| s).sum::<f64>() < 0.2 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no CPU time seen after a minute of spinning: {threads:?}"
            );
            let t = std::time::Instant::now();
            while t.elapsed() < Duration::from_millis(50) {
                std::hint::spin_loop();
            }
            threads = thread_cpu(std::process::id());
        }
        assert!(
            threads.iter().all(|(name, _)| !name.is_empty()),
            "{threads:?}"
        );
    }

    #[test]
    fn cpu_is_interpolated_between_samples() {
        let trace = ProcTrace {
            samples: Arc::default(),
            stop: Arc::new(AtomicBool::new(true)),
            thread: None,
        };
        let mk = |at_ms, cpu_s| ProcSample {
            at_ms,
            cpu_s,
            rss_kib: 1,
            hwm_kib: 1,
        };
        trace
            .samples
            .lock()
            .unwrap()
            .insert("x", vec![mk(1000, 1.0), mk(2000, 3.0)]);
        assert_eq!(trace.cpu_at("x", 1500), Some(2.0));
        assert_eq!(trace.cpu_at("x", 500), Some(1.0));
        assert_eq!(trace.cpu_at("x", 2500), Some(3.0));
        assert_eq!(trace.cpu_at("y", 1500), None);
    }
}
