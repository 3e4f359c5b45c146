//! Benchmark: the real `gateway-tx` binary ingests a large generated
//! docker-archive and sends it over UDP on loopback to a counting receiver.
//! Prints the pacing error over a 10 s window of steady sending and the
//! sender's peak RSS (goal: within ±2 %, at most 64 MiB).
//!
//! `cargo bench -p gateway-tx --bench sender`
//!
//! Environment: WEIR_BENCH_BYTES (layer bytes, default 1 GiB),
//! WEIR_BENCH_RATE_BPS (default 400000000), WEIR_BENCH_GZIP_LEVEL (default 6).

// libc::kill stops the sender process the bench started; std has no SIGTERM.
#![allow(unsafe_code)]

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// VmHWM (peak resident set) and VmRSS of a process, in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not:
    // a minute-long benchmark runs only when asked for.
    if !std::env::args().any(|a| a == "--bench") {
        println!("sender benchmark: run it with cargo bench -p gateway-tx --bench sender");
        return;
    }
    let bytes = env_u64("WEIR_BENCH_BYTES", 1 << 30);
    let rate_bps = env_u64("WEIR_BENCH_RATE_BPS", 400_000_000);
    let level = env_u64("WEIR_BENCH_GZIP_LEVEL", 6);
    let dir = tempfile::tempdir().expect("temporary directory");
    let root = dir.path();
    for d in ["spool", "stage", "state"] {
        std::fs::create_dir_all(root.join(d)).expect("bench directories");
    }

    println!("generating a docker-archive with a {bytes}-byte layer...");
    let t = Instant::now();
    let img = weir_imagegen::docker_archive(
        &root.join("stage"),
        "big.tar",
        42,
        &[
            weir_imagegen::LayerSpec { size: bytes },
            weir_imagegen::LayerSpec { size: 1 << 20 },
        ],
        "team-a/big:1",
        weir_imagegen::DockerFlavor::Classic,
    )
    .expect("image generation");
    println!("  done in {:.1} s", t.elapsed().as_secs_f64());

    let receiver = UdpSocket::bind("127.0.0.1:0").expect("receiver socket");
    let peer = receiver.local_addr().expect("receiver address");
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .ok();
    std::fs::write(root.join("1.key"), "ab".repeat(32)).expect("key");
    std::fs::set_permissions(root.join("1.key"), std::fs::Permissions::from_mode(0o600))
        .expect("key mode");
    let config = format!(
        r#"state_dir = "state"
spool_dir = "spool"
[link]
transport = "udp"
udp_peer = "{peer}"
rate_bps = {rate_bps}
[auth]
key_id = 1
key_file = "1.key"
[carousel]
passes = 1
retention_hours = 0
[ingest]
gzip_level = {level}
poll_interval_ms = 100
"#
    );
    std::fs::write(root.join("tx.toml"), config).expect("config");

    // Receiver: bytes per 100 ms slot from the first shard-sized frame on.
    let slots = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = {
        let (slots, total, stop) = (slots.clone(), total.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut start: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = receiver.recv(&mut buf) else {
                    continue;
                };
                total.fetch_add(n as u64, Ordering::Relaxed);
                // Heartbeats are small; the bulk starts with the first shard.
                if start.is_none() && n > 1000 {
                    start = Some(Instant::now());
                }
                if let Some(s) = start {
                    let slot = (s.elapsed().as_millis() / 100) as usize;
                    let mut v = slots.lock().unwrap_or_else(|e| e.into_inner());
                    if v.len() <= slot {
                        v.resize(slot + 1, 0);
                    }
                    v[slot] += n as u64;
                }
            }
        })
    };

    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway-tx"))
        .arg("--config")
        .arg(root.join("tx.toml"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting gateway-tx");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    std::fs::rename(&img.path, root.join("spool/big.tar")).expect("drop");

    // Wait until status.json says the pass is done, sampling memory.
    let mut peak_rss = 0;
    let mut ingest_s = None;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some((hwm, _)) = memory_kib(pid) {
            peak_rss = peak_rss.max(hwm);
        }
        let Ok(text) = std::fs::read(root.join("state/status.json")) else {
            continue;
        };
        let Ok(s) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        if ingest_s.is_none() && s["ingest"]["accepted"] == 1 {
            ingest_s = Some(t0.elapsed().as_secs_f64());
        }
        if s["ingest"]["accepted"] == 1
            && s["queue"]["objects"] == 0
            && s["images"].as_array().is_some_and(|a| !a.is_empty())
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            eprintln!("gave up after an hour");
            break;
        }
    }
    let total_s = t0.elapsed().as_secs_f64();
    if let Some((hwm, _)) = memory_kib(pid) {
        peak_rss = peak_rss.max(hwm);
    }
    // SAFETY: signalling a child we started, by its pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = rx.join();

    let slots = slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
    println!(
        "ingest (gzip level {level}) finished after {:.1} s",
        ingest_s.unwrap_or(f64::NAN)
    );
    println!(
        "pass sent after {total_s:.1} s, {} bytes on the wire",
        total.load(Ordering::Relaxed)
    );
    // Steady window: 10 s starting 1 s after the first shard.
    if slots.len() >= 112 {
        let window: u64 = slots[10..110].iter().sum();
        let measured = window as f64 * 8.0 / 10.0;
        let err = 100.0 * (measured - rate_bps as f64) / rate_bps as f64;
        println!("pacing: configured {rate_bps} bit/s, measured {measured:.0} bit/s over 10 s: error {err:+.2} % (goal ±2 %)");
    } else {
        println!("pacing: sending lasted {:.1} s, too short for a 10 s window; lower WEIR_BENCH_RATE_BPS", slots.len() as f64 / 10.0);
    }
    println!(
        "peak RSS of gateway-tx: {:.1} MiB (goal <= 64 MiB)",
        peak_rss as f64 / 1024.0
    );
}
