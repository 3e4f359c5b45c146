//! Pacing: gateway-tx sending to a counting socket at a configured rate;
//! the rate is measured over a 10 s window after a 2 s warm-up, as UDP
//! payload bytes (= frame bytes, which gateway-tx paces with
//! `frame_overhead_bytes = 0`). The carousel keeps an idle link busy by
//! cycling the image, so a small image keeps it sending for the window.

use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use weir_tests::pair::{Site, SiteOptions, Target};

use crate::crossing::Image;
use crate::procfs::{child_pid, sample, steal_s};
use crate::wire::{WireCounter, WireReading};

const WARM_UP: Duration = Duration::from_secs(2);
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PacingRun {
    pub configured_bps: u64,
    pub measured_bps: f64,
    /// Largest deviation of any 1 s slice of the window from the configured rate.
    pub worst_second_error: f64,
    /// Datagrams the kernel dropped at the counting socket in the window
    /// (sent but not counted; 0 means the count is the wire).
    pub kernel_drops: u64,
    /// gateway-tx CPU seconds per GiB of frames counted in the window.
    pub tx_cpu_s_per_wire_gib: Option<f64>,
    /// The longest stretch of the window without a datagram at the socket.
    pub longest_silence: Duration,
    /// CPU seconds the host took from this virtual machine's cores over
    /// the window (steal); None where the kernel does not count it.
    pub steal_s: Option<f64>,
}

impl PacingRun {
    pub fn error(&self) -> f64 {
        self.measured_bps / self.configured_bps as f64 - 1.0
    }
}

fn bps(a: &WireReading, b: &WireReading) -> f64 {
    (b.bytes - a.bytes) as f64 * 8.0 / (b.at - a.at).as_secs_f64()
}

pub fn measure(image: &Image, rate_bps: u64) -> Result<PacingRun> {
    let counter = WireCounter::start()?;
    let opts = SiteOptions {
        rate_bps,
        tx_extra: "[ingest]\npoll_interval_ms = 50\n".into(),
        ..SiteOptions::default()
    };
    let unused = tempfile::tempdir()?;
    let site = Site::new(Target::Layout(unused.path().join("layout")), &opts)?;
    site.write_tx_config(counter.addr(), &opts)?;
    let mut tx = site.start_tx()?;
    let partial = site.spool.join("pacing.tar.partial");
    if std::fs::hard_link(&image.path, &partial).is_err() {
        std::fs::copy(&image.path, &partial).context("copying the image into the spool")?;
    }
    std::fs::rename(&partial, site.spool.join("pacing.tar"))?;

    let t = Instant::now();
    while counter.read().datagrams < 100 {
        if !tx.is_running() || t.elapsed() > Duration::from_secs(60) {
            bail!(
                "pacing at {rate_bps} b/s: gateway-tx sent nothing within 60 s\n{}",
                tx.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(WARM_UP);
    let pid = child_pid("gateway-tx");
    let cpu = || pid.and_then(sample).map(|s| s.cpu_s);
    let cpu0 = cpu();
    let drops0 = counter.kernel_drops();
    let steal0 = steal_s();
    counter.restart_silence();
    let start = counter.read();
    let mut last = start;
    let mut worst = 0.0f64;
    while start.at.elapsed() < WINDOW {
        std::thread::sleep(Duration::from_secs(1));
        let now = counter.read();
        worst = worst.max((bps(&last, &now) / rate_bps as f64 - 1.0).abs());
        last = now;
    }
    let drops = counter.kernel_drops() - drops0;
    let longest_silence = counter.longest_silence();
    let steal_s = steal0.zip(steal_s()).map(|(a, b)| b - a);
    let tx_cpu_s_per_wire_gib = match (cpu0, cpu()) {
        (Some(a), Some(b)) if last.bytes > start.bytes => {
            Some((b - a) / ((last.bytes - start.bytes) as f64 / (1u64 << 30) as f64))
        }
        _ => None,
    };
    if !tx.is_running() {
        bail!(
            "pacing at {rate_bps} b/s: gateway-tx stopped\n{}",
            tx.log_tail(30)
        );
    }
    Ok(PacingRun {
        configured_bps: rate_bps,
        measured_bps: bps(&start, &last),
        worst_second_error: worst,
        kernel_drops: drops,
        tx_cpu_s_per_wire_gib,
        longest_silence,
        steal_s,
    })
}
