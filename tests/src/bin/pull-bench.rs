//! Pull mode's benchmark: one large image in a loopback source registry,
//! pulled by `skopeo copy` into an OCI layout (the anchor) and by
//! gateway-tx in pull mode into its object store and sent, in the same run,
//! from the same registry, of the same bytes.
//!
//! ```text
//! cargo run --release -p weir-tests --bin pull-bench -- [--gib 2] [--layers 4]
//! ```
//!
//! Two figures: pull throughput (image bytes over the time from the start
//! of the process to the image being stored: skopeo's whole run, and
//! gateway-tx's start to its "image pulled and queued" line), and the
//! sender's peak resident set (VmHWM) over the pull and the image's whole
//! first pass (status.json says so) into a UDP sink that only counts.

// Shared with the pair's bench, which uses all of them.
#[allow(dead_code)]
#[path = "../bench/machine.rs"]
mod machine;
#[allow(dead_code)]
#[path = "../bench/procfs.rs"]
mod procfs;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_tests::imagegen::{self, LayerSpec};
use weir_tests::registry::Registry;

const MIB: f64 = (1u64 << 20) as f64;

#[derive(Parser)]
#[command(about = "Measure pull mode: throughput beside skopeo copy, and the sender's memory")]
struct Args {
    /// Image size, GiB (fractions allowed).
    #[arg(long, default_value_t = 2.0)]
    gib: f64,
    /// Layers the image is cut into.
    #[arg(long, default_value_t = 4)]
    layers: u64,
    /// Sender rate for the pass after the pull, Mb/s.
    #[arg(long, default_value_t = 2000)]
    rate_mbps: u64,
    /// Upper bound of each step, seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("pull-bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    if !exe.parent().is_some_and(|d| d.ends_with("release")) {
        bail!("not a release build; run: cargo run --release -p weir-tests --bin pull-bench");
    }
    if which("skopeo").is_none() {
        bail!("skopeo is not installed (apt-get install skopeo): it seeds the source registry and is the anchor");
    }
    let tx_bin = weir_tests::pair::gateway_bin("gateway-tx")?;
    let work = tempfile::tempdir()?;
    let bytes = (args.gib * (1u64 << 30) as f64) as u64;
    let layer = (bytes / args.layers.max(1)).max(1);
    let layers = vec![LayerSpec { size: layer }; args.layers.max(1) as usize];
    let t = Instant::now();
    let image =
        imagegen::oci_archive_uncompressed(work.path(), "big.tar", 7, &layers, "bench/big:1")
            .context("generating the image")?;
    let digest = image.manifest_digest.clone().context("manifest digest")?;
    eprintln!(
        "made the image: {:.0} MiB in {:.1} s",
        bytes as f64 / MIB,
        t.elapsed().as_secs_f64()
    );

    let mut registry = Registry::start()?
        .context("docker-registry is not installed (apt-get install docker-registry)")?;
    let host = registry.host();
    let t = Instant::now();
    weir_tests::skopeo::push(
        &format!("oci-archive:{}", image.path.display()),
        &registry,
        "bench/big:1",
    )?;
    eprintln!(
        "seeded the source registry in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    std::fs::remove_file(&image.path)?;

    // The anchor: skopeo copy of the same image into an OCI layout.
    let layout = work.path().join("layout");
    let t = Instant::now();
    weir_tests::skopeo::copy(
        &format!("docker://{host}/bench/big:1"),
        &format!("oci:{}:big", layout.display()),
    )?;
    let skopeo_s = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&layout)?;

    // gateway-tx in pull mode, sending into a sink that only counts.
    let sink = UdpSocket::bind("127.0.0.1:0")?;
    sink.set_read_timeout(Some(Duration::from_millis(200)))?;
    let sink_addr = sink.local_addr()?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sink.recv(&mut buf) {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let dir = work.path().join("tx");
    std::fs::create_dir_all(&dir)?;
    weir_tests::pair::write_key(&dir.join("1.key"), &weir_tests::pair::TEST_SECRET)?;
    std::fs::write(
        dir.join("sync.yaml"),
        format!("images:\n  - source: {host}/bench/big:1\n    destination: bench/big:1\n"),
    )?;
    std::fs::write(
        dir.join("tx.toml"),
        format!(
            "state_dir = \"state\"\nspool_dir = \"spool\"\n\
             [link]\ntransport = \"udp\"\nudp_peer = \"{sink_addr}\"\nrate_bps = {}\n\
             [auth]\nkey_id = 1\nkey_file = \"1.key\"\n\
             [carousel]\npasses = 1\n\
             [pull]\nsync_file = \"sync.yaml\"\ninterval_s = 3600\n\
             [[registry]]\nhost = \"{host}\"\nplain_http = true\n",
            args.rate_mbps * 1_000_000
        ),
    )?;
    let t = Instant::now();
    let mut child = Command::new(&tx_bin)
        .arg("--config")
        .arg(dir.join("tx.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", tx_bin.display()))?;
    let pid = child.id();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().context("gateway-tx stderr")?;
    let log_path = work.path().join("tx.log");
    let reader = {
        let log_path = log_path.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(&log_path).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                let _ = line_tx.send(line);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut pulled_s = None;
    let mut peak_kib = 0;
    let outcome: Result<()> = loop {
        if let Some(s) = procfs::sample(pid) {
            peak_kib = peak_kib.max(s.hwm_kib);
        }
        while let Ok(line) = line_rx.try_recv() {
            if pulled_s.is_none()
                && line.contains("image pulled and queued")
                && line.contains(&digest)
            {
                pulled_s = Some(t.elapsed().as_secs_f64());
            }
            if line.contains(" ERROR ") {
                eprintln!("gateway-tx: {line}");
            }
        }
        if pulled_s.is_some() && pass_done(&dir.join("state/status.json"), &digest) {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(anyhow::anyhow!(
                "gateway-tx exited early: {status}; log in {}",
                log_path.display()
            ));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "not pulled and sent within {} s; log in {}",
                args.timeout_s,
                log_path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(s) = procfs::sample(pid) {
        peak_kib = peak_kib.max(s.hwm_kib);
    }
    // SAFETY: kill has no memory preconditions; pid is our child.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    let _ = reader.join();
    stop.store(true, Ordering::Relaxed);
    let _ = counter.join();
    registry.stop()?;
    if let Err(e) = outcome {
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(20).collect();
        for l in tail.into_iter().rev() {
            eprintln!("  {l}");
        }
        return Err(e);
    }
    let pulled_s = pulled_s.context("pull time")?;
    eprintln!(
        "the sink counted {:.0} MiB of frames",
        received.load(Ordering::Relaxed) as f64 / MIB
    );
    let weir_bps = bytes as f64 / pulled_s;
    let skopeo_bps = bytes as f64 / skopeo_s;
    let ratio = weir_bps / skopeo_bps;
    let peak_mib = peak_kib as f64 / 1024.0;
    println!("| figure | measured | goal | |");
    println!("|---|---|---|---|");
    println!(
        "| pull throughput, {:.2} GiB image ({} layers), loopback registry | weir {:.0} MB/s ({pulled_s:.1} s) vs skopeo copy to an OCI layout {:.0} MB/s ({skopeo_s:.1} s): {ratio:.2}× | ≥ 1× | {} |",
        args.gib,
        args.layers,
        weir_bps / 1e6,
        skopeo_bps / 1e6,
        if ratio >= 1.0 { "met" } else { "**not met**" }
    );
    println!(
        "| gateway-tx peak RSS (VmHWM), pull + one pass sent | {peak_mib:.1} MiB | ≤ 64 MiB | {} |",
        if peak_mib <= 64.0 {
            "met"
        } else {
            "**not met**"
        }
    );
    println!();
    for f in machine::facts() {
        println!("- {f}");
    }
    Ok(())
}

/// Whether the sender's status.json shows the image's first pass sent.
fn pass_done(status: &Path, digest: &str) -> bool {
    let Ok(bytes) = std::fs::read(status) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    v["images"].as_array().is_some_and(|images| {
        images
            .iter()
            .any(|i| i["manifest_digest"] == digest && i["passes_done"].as_u64() >= Some(1))
    })
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| Path::new(p).is_file())
    })
}
