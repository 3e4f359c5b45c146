//! One image crossing the pair: gateway-rx and gateway-tx as release
//! processes (weir_tests::pair), optionally the lossy link between them,
//! the image dropped into the spool, and the moments that matter read from
//! where the gateways publish them:
//!
//! - *accepted*: the drop moved to `spool/done/` (gateway-tx does that right
//!   after queueing the image for the carousel), polled every 10 ms;
//! - *complete* and *delivered*: `complete_at_ms` of the image and
//!   `done_ms` of its delivery in gateway-rx's status.json (stamped by the
//!   gateway with its own clock, in milliseconds).
//!
//! CPU and memory of both processes are sampled throughout (procfs).

// libc::kill sends SIGINT to a gateway process; std can only SIGKILL.
#![allow(unsafe_code)]

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use weir_tests::diode::{kernel_udp_drops, Diode, DiodeConfig, DiodeCounters};
use weir_tests::pair::{Gateway, Site, SiteOptions, Target};

use crate::procfs::{child_pid, now_ms, thread_cpu, ProcTrace};

/// `perf record` of one process, stopped (SIGINT, so it writes its file)
/// on drop.
struct Profiler(Option<std::process::Child>);

impl Profiler {
    fn start(pid: u32, out: &Path) -> Profiler {
        let child = std::process::Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(c) => Profiler(Some(c)),
            Err(e) => {
                eprintln!("perf record not started ({e}); apt-get install linux-perf");
                Profiler(None)
            }
        }
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let _ = c.wait();
        }
    }
}

/// A generated image ready to drop.
#[derive(Debug, Clone)]
pub struct Image {
    pub path: PathBuf,
    pub manifest_digest: String,
    pub archive_bytes: u64,
}

/// Sets the faults of the simulated link.
pub type LinkFaults = Box<dyn FnOnce(&mut DiodeConfig)>;

/// How the image crosses.
pub struct Plan {
    /// For messages: "goodput 1 GiB", ...
    pub label: String,
    pub rate_bps: u64,
    pub passes: u32,
    /// FEC data and parity shards per block.
    pub fec: (u16, u16),
    /// Datagram size of both sides; None: the site's 1400 bytes.
    pub datagram: Option<usize>,
    /// Faults between the sides; None: gateway-tx sends straight to gateway-rx.
    pub link: Option<LinkFaults>,
    pub target: Target,
    /// Kill gateway-tx as soon as gateway-rx logs the image complete, so the
    /// delivery that follows has the machine to itself (on an appliance the
    /// sender is another box).
    pub stop_tx_when_complete: bool,
    pub timeout: Duration,
    /// Record both gateways with `perf record --call-graph dwarf` into this
    /// directory (`<name>-tx.data`, `<name>-rx.data`).
    pub profile: Option<(PathBuf, String)>,
}

/// What one crossing measured.
#[derive(Debug, Clone, Default)]
pub struct Crossing {
    /// Bytes of the image's blobs, as gateway-rx counts them.
    pub payload_bytes: u64,
    /// Drop renamed into the spool → accepted (ingest, with spool polling).
    pub ingest_s: f64,
    /// Drop renamed into the spool → delivery done: what a user waits for,
    /// ingest included (one span, not a sum of rounded parts).
    pub drop_to_delivered_s: f64,
    /// Accepted → every blob verified at the receiver.
    pub to_complete_s: f64,
    /// Accepted → delivery done.
    pub to_delivered_s: f64,
    /// Image complete → delivery done (push or layout export).
    pub delivery_s: f64,
    pub tx_peak_kib: u64,
    pub rx_peak_kib: u64,
    /// gateway-tx CPU from its start to accepted (ingest).
    pub tx_cpu_ingest_s: f64,
    /// gateway-tx CPU from accepted to image complete at the receiver.
    pub tx_cpu_send_s: f64,
    /// gateway-rx CPU from its start to delivered.
    pub rx_cpu_s: f64,
    /// Of which, up to image complete.
    pub rx_cpu_to_complete_s: f64,
    /// Datagrams the kernel dropped at gateway-rx's socket (buffer full).
    pub rx_kernel_drops: u64,
    /// gateway-rx's counters in the report that showed the delivery done.
    pub rx_counters: gateway_rx::status::CounterSnapshot,
    pub link: Option<DiodeCounters>,
    /// CPU seconds per thread name at the end, busiest first.
    pub tx_threads: Vec<(String, f64)>,
    pub rx_threads: Vec<(String, f64)>,
}

fn fail_with_logs(what: &str, gws: &mut [&mut Gateway]) -> anyhow::Error {
    let logs: Vec<String> = gws
        .iter_mut()
        .map(|g| {
            let running = g.is_running();
            format!("--- {} (running: {running})\n{}", g.name, g.log_tail(30))
        })
        .collect();
    anyhow::anyhow!("{what}\n{}", logs.join("\n"))
}

/// Drops the image as a hard link (4 GiB images: no copy), renamed into
/// place; falls back to a copy across file systems. Returns now_ms() just
/// before the rename: the moment the drop exists for gateway-tx, so a
/// fallback copy is not timed as ingest.
pub fn drop_linked(spool: &Path, image: &Path, name: &str) -> Result<u64> {
    let partial = spool.join(format!("{name}.partial"));
    if std::fs::hard_link(image, &partial).is_err() {
        std::fs::copy(image, &partial)
            .with_context(|| format!("copying {} into the spool", image.display()))?;
    }
    let renamed_ms = now_ms();
    std::fs::rename(&partial, spool.join(name)).context("renaming the drop into place")?;
    Ok(renamed_ms)
}

/// Whether gateway-rx's log, from `offset`, contains `needle`; moves `offset`
/// past what was read.
fn log_contains(log: &Path, offset: &mut u64, needle: &str) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return false;
    };
    // Re-read a little before the offset: a line may have been half written.
    let start = offset.saturating_sub(needle.len() as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return false;
    }
    *offset = start + buf.len() as u64;
    String::from_utf8_lossy(&buf).contains(needle)
}

/// Sets `datagram_size` in the `[link]` table of a gateway's config as
/// `pair::Site` wrote it (tx.toml has the key, rx.toml takes the default).
pub fn set_datagram_size(config: &Path, bytes: usize) -> Result<()> {
    set_config_key(config, "link", "datagram_size", &bytes.to_string())
}

/// Sets `key = value` (`value` as TOML) in the `[table]` of a gateway's
/// config as `pair::Site` wrote it, replacing the key or adding it to the
/// table: the table exists already, and appending a second one (as
/// `SiteOptions`' extra text would) is a TOML error.
pub fn set_config_key(config: &Path, table: &str, key: &str, value: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    std::fs::write(config, with_key(&text, table, key, value)?)
        .with_context(|| format!("writing {}", config.display()))
}

fn with_key(text: &str, table: &str, key: &str, value: &str) -> Result<String> {
    let header = format!("[{table}]");
    let is_key = |t: &str| {
        t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    };
    let mut out = String::with_capacity(text.len() + 32);
    let mut in_table = false;
    let mut set = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            if in_table && !set {
                out.push_str(&format!("{key} = {value}\n"));
                set = true;
            }
            in_table = t == header;
        } else if in_table && is_key(t) {
            out.push_str(&format!("{key} = {value}\n"));
            set = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if in_table && !set {
        out.push_str(&format!("{key} = {value}\n"));
        set = true;
    }
    if !set {
        bail!("the config has no {header} table");
    }
    Ok(out)
}

pub fn run(image: &Image, plan: Plan) -> Result<Crossing> {
    let opts = SiteOptions {
        rate_bps: plan.rate_bps,
        passes: plan.passes,
        data_shards: plan.fec.0,
        parity_shards: plan.fec.1,
        rules_yaml: None,
        // The spool is listed every second by default; 50 ms keeps the
        // ingest figure about ingest.
        tx_extra: "[ingest]\npoll_interval_ms = 50\n".into(),
        rx_extra: String::new(),
    };
    let site = Site::new(plan.target, &opts).context("laying out the site")?;
    if let Some(d) = plan.datagram {
        set_datagram_size(&site.rx_config, d)?;
    }
    let mut rx = site.start_rx()?;
    let ready = |site: &Site| {
        gateway_rx::status::StatusReport::read(&site.rx_state)
            .ok()
            .flatten()
            .is_some_and(|s| s.listening.is_some())
    };
    let t = Instant::now();
    while !ready(&site) {
        if !rx.is_running() || t.elapsed() > Duration::from_secs(30) {
            return Err(fail_with_logs(
                &format!("{}: gateway-rx did not come up", plan.label),
                &mut [&mut rx],
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let diode = match plan.link {
        Some(f) => {
            let mut cfg = DiodeConfig::new("127.0.0.1:0".parse()?, site.rx_addr);
            cfg.seed = 6;
            f(&mut cfg);
            Some(Diode::spawn(cfg).context("starting the lossy link")?)
        }
        None => None,
    };
    let peer = diode
        .as_ref()
        .map(|d| d.local_addr())
        .unwrap_or(site.rx_addr);
    site.write_tx_config(peer, &opts)?;
    if let Some(d) = plan.datagram {
        set_datagram_size(&site.tx_config, d)?;
    }
    let mut tx = site.start_tx()?;
    let t = Instant::now();
    while site.tx_status().is_none() {
        if !tx.is_running() || t.elapsed() > Duration::from_secs(30) {
            return Err(fail_with_logs(
                &format!("{}: gateway-tx did not come up", plan.label),
                &mut [&mut tx, &mut rx],
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tx_pid = child_pid("gateway-tx").context("finding gateway-tx's pid")?;
    let rx_pid = child_pid("gateway-rx").context("finding gateway-rx's pid")?;
    let mut trace = ProcTrace::start(
        vec![("tx", tx_pid), ("rx", rx_pid)],
        Duration::from_millis(50),
    );
    let mut profilers = match &plan.profile {
        Some((dir, name)) => vec![
            Profiler::start(tx_pid, &dir.join(format!("{name}-tx.data"))),
            Profiler::start(rx_pid, &dir.join(format!("{name}-rx.data"))),
        ],
        None => Vec::new(),
    };
    let mut tx_threads = Vec::new();

    let name = "bench.tar";
    let deadline = Instant::now() + plan.timeout;
    let dropped_ms = drop_linked(&site.spool, &image.path, name)?;
    let accepted_ms = loop {
        if site.spool.join("done").join(name).exists() {
            break now_ms();
        }
        if site.spool.join("rejected").join(name).exists() {
            let reason = std::fs::read_to_string(
                site.spool
                    .join("rejected")
                    .join(format!("{name}.reason.json")),
            )
            .unwrap_or_default();
            bail!("{}: gateway-tx rejected the drop: {reason}", plan.label);
        }
        if !tx.is_running() || Instant::now() > deadline {
            return Err(fail_with_logs(
                &format!(
                    "{}: drop not accepted within {:?}",
                    plan.label, plan.timeout
                ),
                &mut [&mut tx, &mut rx],
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };

    let mut log_offset = 0u64;
    let mut tx_stopped = false;
    let digest = &image.manifest_digest;
    let (report, image_status, delivery) = loop {
        if plan.stop_tx_when_complete
            && !tx_stopped
            && log_contains(
                &rx.log,
                &mut log_offset,
                "image complete; queued for delivery",
            )
        {
            trace.sample_now("tx", tx_pid);
            tx_threads = thread_cpu(tx_pid);
            if let Some(p) = profilers.first_mut() {
                *p = Profiler(None); // stops the sender's recording with it
            }
            tx.kill9();
            tx_stopped = true;
        }
        if let Ok(Some(s)) = gateway_rx::status::StatusReport::read(&site.rx_state) {
            let img = s
                .images
                .iter()
                .find(|i| &i.manifest_digest == digest)
                .cloned();
            let del = s
                .deliveries
                .iter()
                .find(|d| &d.manifest_digest == digest && d.state == "done")
                .cloned();
            if let (Some(img), Some(del)) = (img, del) {
                break (s, img, del);
            }
            if let Some(d) = s
                .deliveries
                .iter()
                .find(|d| &d.manifest_digest == digest && d.state == "failing")
            {
                bail!("{}: delivery failing: {:?}", plan.label, d.last_error);
            }
        }
        let tx_gone = !tx_stopped && !tx.is_running();
        if tx_gone || !rx.is_running() || Instant::now() > deadline {
            let progress = gateway_rx::status::StatusReport::read(&site.rx_state)
                .ok()
                .flatten()
                .map(|s| format!("{:?}", s.images))
                .unwrap_or_default();
            return Err(fail_with_logs(
                &format!(
                    "{}: not delivered within {:?} (receiver images: {progress})",
                    plan.label, plan.timeout
                ),
                &mut [&mut tx, &mut rx],
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !tx_stopped {
        trace.sample_now("tx", tx_pid);
        tx_threads = thread_cpu(tx_pid);
    }
    trace.sample_now("rx", rx_pid);
    let rx_threads = thread_cpu(rx_pid);
    profilers.clear();
    let rx_kernel_drops = kernel_udp_drops(site.rx_addr).unwrap_or(0);
    trace.stop();
    let link = match diode {
        Some(d) => Some(d.stop().context("stopping the lossy link")?),
        None => None,
    };
    drop(tx);
    drop(rx);
    // Beside the profiles, the logs tell the timeline.
    if let Some((dir, name)) = &plan.profile {
        for side in ["tx", "rx"] {
            let _ = std::fs::copy(
                site.dir.path().join(format!("{side}.log")),
                dir.join(format!("{name}-{side}.log")),
            );
        }
    }

    let complete_ms = image_status
        .complete_at_ms
        .context("gateway-rx delivered an image without complete_at_ms")?;
    let done_ms = delivery
        .done_ms
        .context("a done delivery without done_ms")?;
    let s = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1000.0;
    let cpu = |name: &str, at: u64| trace.cpu_at(name, at).unwrap_or(0.0);
    Ok(Crossing {
        payload_bytes: image_status.bytes_total,
        ingest_s: s(dropped_ms, accepted_ms),
        drop_to_delivered_s: s(dropped_ms, done_ms),
        to_complete_s: s(accepted_ms, complete_ms),
        to_delivered_s: s(accepted_ms, done_ms),
        delivery_s: s(complete_ms, done_ms),
        tx_peak_kib: trace.peak_kib("tx").unwrap_or(0),
        rx_peak_kib: trace.peak_kib("rx").unwrap_or(0),
        tx_cpu_ingest_s: cpu("tx", accepted_ms),
        tx_cpu_send_s: cpu("tx", complete_ms) - cpu("tx", accepted_ms),
        rx_cpu_s: cpu("rx", done_ms),
        rx_cpu_to_complete_s: cpu("rx", complete_ms),
        rx_kernel_drops,
        rx_counters: report.counters,
        tx_threads,
        rx_threads,
        link,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_replaced_or_added_in_its_own_table() {
        let toml = "a = 1\n\n[link]\ndatagram_size = 1400\n\n[carousel]\npasses = 1\n\n[ingest]\npoll_interval_ms = 50\n";
        let out = with_key(toml, "carousel", "retention_hours", "0").unwrap();
        assert_eq!(
            out,
            "a = 1\n\n[link]\ndatagram_size = 1400\n\n[carousel]\npasses = 1\n\nretention_hours = 0\n[ingest]\npoll_interval_ms = 50\n"
        );
        let out = with_key(&out, "link", "datagram_size", "1472").unwrap();
        assert!(out.contains("[link]\ndatagram_size = 1472\n"), "{out}");
        assert!(!out.contains("1400"));
        // A key that only starts like another is not it.
        let out = with_key("[carousel]\npasses_x = 2\n", "carousel", "passes", "1").unwrap();
        assert_eq!(out, "[carousel]\npasses_x = 2\npasses = 1\n");
        // The last table takes the key too.
        let out = with_key("[carousel]\npasses = 1", "carousel", "retention_hours", "0").unwrap();
        assert_eq!(out, "[carousel]\npasses = 1\nretention_hours = 0\n");
        assert!(with_key("[link]\n", "carousel", "passes", "1").is_err());
    }
}
