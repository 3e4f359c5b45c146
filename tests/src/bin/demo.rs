//! The main job: both gateways on this machine over a lossy one-way link.
//!
//! Starts gateway-rx, the diode simulator (5 % loss plus bursts) and
//! gateway-tx in this process, makes a ~64 MiB sample image, drops it into
//! the spool, shows progress, and checks that what arrived has the source's
//! digests — in an OCI layout under `./demo-out`, or in a registry with
//! `--registry URL`. Logs of both gateways go to `demo-work/demo.log`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use weir_host::Shutdown;
use weir_tests::diode::{BurstLoss, Diode, DiodeConfig};
use weir_tests::imagegen::{self, LayerSpec};
use weir_tests::pair::{free_udp_addr, write_key, TEST_SECRET};

#[derive(Parser)]
#[command(about = "Mirror a sample image across a simulated lossy one-way link, end to end")]
struct Args {
    /// Deliver into this registry (http:// or https://) instead of an OCI layout.
    #[arg(long)]
    registry: Option<String>,
    /// OCI layout directory to deliver into when no registry is given.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Working directory for keys, spool, state and logs (emptied first).
    #[arg(long, default_value = "demo-work")]
    work: PathBuf,
    /// Sample image size in MiB, spread over four layers.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Independent frame loss on the link, 0..1.
    #[arg(long, default_value_t = 0.05)]
    loss: f64,
    /// Sender wire rate in Mb/s (pacing).
    #[arg(long, default_value_t = 200)]
    rate_mbps: u64,
    /// Seed of the image and of the link's faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

const REFERENCE: &str = "demo/sample:1.0";

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            eprintln!("logs: {}", args.work.join("demo.log").display());
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if args.work.exists() {
        std::fs::remove_dir_all(&args.work)
            .with_context(|| format!("emptying {}", args.work.display()))?;
    }
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let work = args.work.canonicalize()?;
    let log = std::fs::File::create(work.join("demo.log")).context("creating demo.log")?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .init();

    // The sample image.
    let started = Instant::now();
    let layer = args.size_mib * (1 << 20) / 4;
    let layers = [0u64, 1, 2, 3].map(|_| LayerSpec { size: layer });
    let image = imagegen::oci_archive(&work, "sample.tar", args.seed, &layers, REFERENCE)
        .context("making the sample image")?;
    let source_digest = image
        .manifest_digest
        .clone()
        .context("an OCI archive has a manifest digest")?;
    let image_bytes = std::fs::metadata(&image.path)?.len();
    println!(
        "sample image {REFERENCE}: {} MiB, manifest {source_digest}",
        image_bytes >> 20
    );

    // Both sides' files.
    let key = work.join("1.key");
    write_key(&key, &TEST_SECRET)?;
    let spool = work.join("spool");
    std::fs::create_dir_all(&spool)?;
    let rx_state = work.join("rx-state");
    let rx_addr = free_udp_addr()?;
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        std::env::current_dir()?.join(&args.out)
    };
    if args.registry.is_none() && out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("emptying {}", out.display()))?;
    }
    let delivery = match &args.registry {
        Some(url) => format!("registry_url = {url:?}\nretry_max_seconds = 5\n"),
        None => format!("oci_layout = {:?}\n", out.display().to_string()),
    };
    let rx_toml = work.join("rx.toml");
    std::fs::write(
        &rx_toml,
        format!(
            "state_dir = {:?}\n[link]\ntransport = \"udp\"\nudp_listen = \"{rx_addr}\"\n\
             [[auth.keys]]\nid = 1\nfile = {:?}\n[delivery]\n{delivery}",
            rx_state.display().to_string(),
            key.display().to_string()
        ),
    )?;

    let mut diode_cfg = DiodeConfig::new("127.0.0.1:0".parse()?, rx_addr);
    diode_cfg.seed = args.seed;
    diode_cfg.loss = args.loss;
    diode_cfg.burst = Some(BurstLoss {
        enter: 0.001,
        exit: 0.2,
        loss: 1.0,
    });
    let rx_cfg = gateway_rx::RxConfig::load(&rx_toml).context("rx.toml")?;

    let shutdown = Shutdown::new();
    let rx = {
        let s = shutdown.clone();
        std::thread::spawn(move || gateway_rx::run(rx_cfg, s))
    };
    let diode = Diode::spawn(diode_cfg).context("starting the diode simulator")?;
    let tx_toml = work.join("tx.toml");
    std::fs::write(
        &tx_toml,
        format!(
            "state_dir = {:?}\nspool_dir = {:?}\n[link]\ntransport = \"udp\"\nudp_peer = \"{}\"\n\
             rate_bps = {}\ndatagram_size = 1400\n[auth]\nkey_id = 1\nkey_file = {:?}\n\
             [carousel]\npasses = 3\n",
            work.join("tx-state").display().to_string(),
            spool.display().to_string(),
            diode.local_addr(),
            args.rate_mbps * 1_000_000,
            key.display().to_string()
        ),
    )?;
    let tx_cfg = gateway_tx::TxConfig::load(&tx_toml).context("tx.toml")?;
    let tx = {
        let s = shutdown.clone();
        std::thread::spawn(move || gateway_tx::run(tx_cfg, s))
    };
    println!(
        "gateway-tx → diode-sim ({:.0} % loss + bursts) → gateway-rx → {}",
        args.loss * 100.0,
        args.registry
            .clone()
            .unwrap_or_else(|| out.display().to_string())
    );

    // The drop: written under a temporary name, then renamed into place.
    let partial = spool.join("sample.tar.partial");
    std::fs::copy(&image.path, &partial)?;
    std::fs::rename(&partial, spool.join("sample.tar"))?;
    let t0 = Instant::now();

    let outcome = watch(args, &rx_state, t0, &source_digest, image_bytes, || {
        rx.is_finished() || tx.is_finished()
    });
    let wire = read_json(&work.join("tx-state/status.json"));
    let kernel_drops = diode.kernel_drops().unwrap_or(0);
    let counters = diode.stop().context("stopping the diode simulator")?;
    shutdown.trigger();
    let rx_result = rx.join();
    let tx_result = tx.join();
    for (name, r) in [("gateway-rx", rx_result), ("gateway-tx", tx_result)] {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("{name} stopped with an error: {e:#}"),
            Err(_) => bail!("{name} panicked"),
        }
    }
    let seconds = outcome?;

    // Proof: the digests that arrived are the source's.
    let checked = match &args.registry {
        Some(url) => verify_registry(url, &source_digest)?,
        None => verify_layout(&out, &source_digest)?,
    };
    let rx_status = gateway_rx::status::StatusReport::read(&rx_state)
        .ok()
        .flatten();
    let c = rx_status.map(|s| s.counters).unwrap_or_default();
    let wire_mbps = wire
        .as_ref()
        .and_then(|w| w.pointer("/wire/measured_bps"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as f64
        / 1e6;
    println!("\ndelivered {REFERENCE} with manifest {source_digest}");
    println!("  checked: manifest digest equal to the source's, {checked} blobs re-hashed");
    println!(
        "  seconds from drop to delivery: {seconds:.1} (whole run {:.1})",
        started.elapsed().as_secs_f64()
    );
    println!("  wire rate (tx, last second): {wire_mbps:.1} Mb/s");
    println!(
        "  link: {} frames in, {} forwarded, {} lost ({} independent, {} in bursts), {} kernel drops",
        counters.received,
        counters.forwarded,
        counters.dropped_loss + counters.dropped_burst,
        counters.dropped_loss,
        counters.dropped_burst,
        kernel_drops
    );
    println!(
        "  receiver: {} frames accepted, loss estimate {} of {}, {} blocks complete, {} repaired by FEC",
        c.frames_accepted, c.frames_lost_estimate, c.frames_expected, c.blocks_complete, c.blocks_repaired
    );
    Ok(())
}

/// Shows progress until the image is delivered; returns seconds taken.
fn watch(
    args: &Args,
    rx_state: &Path,
    t0: Instant,
    digest: &str,
    image_bytes: u64,
    stopped: impl Fn() -> bool,
) -> Result<f64> {
    let deadline = t0 + Duration::from_secs(args.timeout_s);
    let mut last_bytes = 0u64;
    let mut last_t = Instant::now();
    let mut rate = 0.0f64;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if stopped() {
            bail!("a gateway stopped early");
        }
        if Instant::now() > deadline {
            bail!("not delivered within {} s", args.timeout_s);
        }
        let Ok(Some(s)) = gateway_rx::status::StatusReport::read(rx_state) else {
            continue;
        };
        if s.deliveries
            .iter()
            .any(|d| d.manifest_digest == digest && d.state == "done")
        {
            println!(
                "\r{:<100}",
                format!("delivered after {:.1} s", t0.elapsed().as_secs_f64())
            );
            return Ok(t0.elapsed().as_secs_f64());
        }
        let img = s.images.iter().find(|i| i.manifest_digest == digest);
        let done = img
            .map(|i| i.bytes_done)
            .unwrap_or_else(|| s.receiving.iter().map(|o| o.bytes_done()).sum());
        let dt = last_t.elapsed().as_secs_f64();
        if dt > 0.0 {
            let now = done.saturating_sub(last_bytes) as f64 / dt;
            rate = if rate == 0.0 {
                now
            } else {
                0.7 * rate + 0.3 * now
            };
        }
        last_bytes = done;
        last_t = Instant::now();
        let total = img
            .map(|i| i.bytes_total)
            .filter(|&t| t > 0)
            .unwrap_or(image_bytes);
        let pct = (done as f64 * 100.0 / total as f64).min(100.0);
        let eta = if rate > 0.0 {
            format!("{:.0} s", total.saturating_sub(done) as f64 / rate)
        } else {
            "-".into()
        };
        let state = img.map(|i| i.state.as_str()).unwrap_or("receiving");
        print!(
            "\r{REFERENCE}: {pct:5.1} %  {:6.1} MB/s  ETA {eta:>5}  {state:<12} frames {} repaired blocks {}   ",
            rate / 1e6,
            s.counters.frames_accepted,
            s.counters.blocks_repaired
        );
        let _ = std::io::stdout().flush();
    }
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Finds the reference in the layout's index.json, checks its digest, and
/// re-hashes every blob the manifest names.
fn verify_layout(out: &Path, digest: &str) -> Result<usize> {
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("index.json")).context("reading index.json")?,
    )?;
    let found = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| m["digest"] == digest);
    if !found {
        bail!("index.json of {} does not list {digest}", out.display());
    }
    let blob = |d: &str| {
        out.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(digest)).context("reading the manifest blob")?)?;
    if sha256_file(&blob(digest))? != digest {
        bail!("manifest blob does not hash to {digest}");
    }
    let mut digests = vec![manifest["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string()];
    for l in manifest["layers"].as_array().into_iter().flatten() {
        digests.push(l["digest"].as_str().unwrap_or_default().to_string());
    }
    for d in &digests {
        if sha256_file(&blob(d))? != *d {
            bail!("blob {d} in the layout does not hash to its name");
        }
    }
    Ok(digests.len())
}

fn verify_registry(url: &str, digest: &str) -> Result<usize> {
    let v = weir_tests::registry::RegistryClient::new(url).verify_image("demo/sample", "1.0")?;
    if v.manifest_digest != digest {
        bail!(
            "registry serves {} for {REFERENCE}, source had {digest}",
            v.manifest_digest
        );
    }
    Ok(v.blob_digests.len())
}
