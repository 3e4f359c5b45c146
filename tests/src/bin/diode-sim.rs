//! diode-sim: a one-way UDP forwarder on loopback with seeded loss, burst
//! loss, corruption, duplication, reordering, blackouts and a rate cap.
//! Prints its counters every `--stats-interval` seconds and at the end
//! (stdout, one `key=value` line each); logs go to stderr.
//!
//! ```text
//! diode-sim --listen 127.0.0.1:7000 --forward 127.0.0.1:7001 --seed 1 \
//!   --loss 0.05 --burst-enter 0.002 --burst-exit 0.3 --burst-loss 1.0 \
//!   --corrupt 0.002 --duplicate 0.01 --reorder 0.01 \
//!   --blackout 30:10 --rate-bps 100000000 --duration 120
//! ```

// signal handlers for SIGINT/SIGTERM are installed through libc.
#![allow(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use weir_tests::diode::{
    Blackout, BurstLoss, Diode, DiodeConfig, DiodeHandle, DEFAULT_SOCKET_BUFFER,
};

/// Command line of diode-sim (its whole configuration).
#[derive(Debug, Parser)]
#[command(
    name = "diode-sim",
    version,
    about = "One-way lossy UDP link simulator"
)]
struct Args {
    /// Address the sender sends to.
    #[arg(long)]
    listen: SocketAddr,
    /// Address datagrams are forwarded to.
    #[arg(long)]
    forward: SocketAddr,
    /// Seed of every random decision.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Independent loss probability per datagram.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Gilbert–Elliott: probability per datagram of entering a burst (0: no bursts).
    #[arg(long, default_value_t = 0.0)]
    burst_enter: f64,
    /// Probability per datagram of leaving a burst (mean burst length 1/exit).
    #[arg(long, default_value_t = 0.3)]
    burst_exit: f64,
    /// Loss probability inside a burst.
    #[arg(long, default_value_t = 1.0)]
    burst_loss: f64,
    /// Probability of flipping one random byte of a datagram.
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Probability of sending a datagram twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Probability of holding a datagram back until 1-3 later ones went out.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// START_S:DURATION_S after start during which everything is dropped (repeatable).
    #[arg(long = "blackout", value_name = "START_S:DURATION_S")]
    blackouts: Vec<Blackout>,
    /// Rate cap in bits per second of UDP payload; datagrams above it are dropped.
    #[arg(long)]
    rate_bps: Option<u64>,
    /// Token bucket depth in bytes (default: max(64 KiB, 10 ms at the rate)).
    #[arg(long)]
    rate_burst_bytes: Option<u64>,
    /// Stop after this many seconds (default: until SIGINT/SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds between counter lines; 0: only the final line.
    #[arg(long, default_value_t = 1.0)]
    stats_interval: f64,
    /// Socket buffer size to ask for, bytes.
    #[arg(long, default_value_t = DEFAULT_SOCKET_BUFFER)]
    socket_buffer: usize,
}

impl Args {
    fn config(&self) -> anyhow::Result<DiodeConfig> {
        let mut config = DiodeConfig::new(self.listen, self.forward);
        config.seed = self.seed;
        config.loss = self.loss;
        config.burst = (self.burst_enter > 0.0).then_some(BurstLoss {
            enter: self.burst_enter,
            exit: self.burst_exit,
            loss: self.burst_loss,
        });
        config.corrupt = self.corrupt;
        config.duplicate = self.duplicate;
        config.reorder = self.reorder;
        config.blackouts = self.blackouts.clone();
        config.rate_bps = self.rate_bps;
        config.rate_burst_bytes = self.rate_burst_bytes;
        config.duration = match self.duration {
            Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
            Some(s) => anyhow::bail!("--duration {s}: must be a number of seconds >= 0"),
            None => None,
        };
        config.socket_buffer = self.socket_buffer;
        config.validate()?;
        Ok(config)
    }
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Relaxed);
}

fn print_counters(label: &str, started: Instant, diode: &DiodeHandle) {
    let counters = diode.stats().snapshot();
    let kernel = diode
        .kernel_drops()
        .map_or_else(|| "unknown".to_string(), |d| d.to_string());
    println!(
        "diode-sim {label} t={:.1}s {counters} kernel_dropped={kernel}",
        started.elapsed().as_secs_f64()
    );
}

fn run(args: &Args) -> anyhow::Result<()> {
    let config = args.config()?;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let diode = Diode::spawn(config).context("starting the diode")?;
    let buffers = diode.socket_buffers();
    tracing::info!(
        listen = %diode.local_addr(),
        forward = %args.forward,
        receive_buffer = buffers.receive,
        send_buffer = buffers.send,
        "diode-sim started"
    );
    let started = Instant::now();
    let interval =
        (args.stats_interval > 0.0).then(|| Duration::from_secs_f64(args.stats_interval));
    let mut next_print = interval.map(|i| started + i);
    while !diode.is_finished() && !SIGNALLED.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if let (Some(at), Some(every)) = (next_print, interval) {
            if Instant::now() >= at {
                print_counters("stats", started, &diode);
                next_print = Some(at + every);
            }
        }
    }
    let kernel = diode.kernel_drops();
    let final_counters = diode.stop().context("diode failed")?;
    println!(
        "diode-sim final t={:.1}s {final_counters} kernel_dropped={}",
        started.elapsed().as_secs_f64(),
        kernel.map_or_else(|| "unknown".to_string(), |d| d.to_string())
    );
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diode-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
