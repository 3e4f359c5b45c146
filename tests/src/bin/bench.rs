//! The pair's benchmark: both gateways as release processes on
//! loopback, six figures measured and printed as one markdown table with
//! the goals, followed by how each was measured and the machine's facts.
//!
//! ```text
//! cargo run --release -p weir-tests --bin bench -- [--only goodput,loss,memory,pacing,push,cpu,lidi,scaling] [--big-gib 4]
//! ```
//!
//! `lidi` builds lidi 2.1.1 from its tarball outside the repository and
//! compares its file-to-file goodput with weir's drop-to-delivered goodput
//! (ingest included) on the same archive (lidi.rs); `scaling` runs each
//! gateway alone under `taskset` on one core and on two (scaling.rs).
//!
//! Images are uncompressed OCI archives (cheap to make at 4 GiB), dropped
//! into the spool as hard links. Each measurement is bounded by
//! `--timeout-s` and fails with both gateways' log tails; a failed figure
//! is reported in its row and the others still run.
//!
//! The sender-only benchmark is `cargo bench -p gateway-tx --bench sender`.

#[path = "../bench/crossing.rs"]
mod crossing;
#[path = "../bench/lidi.rs"]
mod lidi;
#[path = "../bench/machine.rs"]
mod machine;
#[path = "../bench/pacing.rs"]
mod pacing;
#[path = "../bench/procfs.rs"]
mod procfs;
#[path = "../bench/push.rs"]
mod push;
#[path = "../bench/scaling.rs"]
mod scaling;
#[path = "../bench/udpcast.rs"]
mod udpcast;
#[path = "../bench/wire.rs"]
mod wire;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use weir_tests::diode::BurstLoss;
use weir_tests::imagegen::{self, ImageOptions, LayerCompression, LayerSpec};
use weir_tests::pair::Target;
use weir_tests::registry::Registry;

use crossing::{Crossing, Image, Plan};

const FIGURES: [&str; 8] = [
    "goodput", "loss", "memory", "pacing", "push", "cpu", "lidi", "scaling",
];
const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;
/// FEC of the goodput and push figures: k=32, m=8, 1400-byte
/// datagrams. The loss figure uses gateway-tx's default FEC.
const DATA_SHARDS: u16 = 32;
const PARITY_SHARDS: u16 = 8;
const DATAGRAM: usize = 1400;
/// Datagrams of the lidi comparison and of the scaling rows (as compared:
/// weir with its default FEC, 128+20, in 1472-byte datagrams, the most a
/// 1500-byte MTU carries).
const LIDI_DATAGRAM: usize = 1472;
/// CPU sets of the scaling rows.
const ONE_CORE: &str = "0";
const TWO_CORES: &str = "0,1";
/// "Pacing above what the machine can do": gateway-tx alone now sends
/// close to 10 Gb/s on two cores, so that rate would pace it.
const UNPACED_BPS: u64 = 100_000_000_000;
/// The push figure's crossing runs at a diode's line rate: unpaced, the
/// receiver would still be draining its socket backlog (up to 256 MiB of
/// frames, each verified) while it pushes, which measures the overrun, not
/// the push.
const PUSH_CROSSING_BPS: u64 = 1_000_000_000;

#[derive(Parser)]
#[command(about = "Measure the weir pair: goodput, loss efficiency, memory, pacing, push, CPU")]
struct Args {
    /// Figures to measure, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(FIGURES))]
    only: Vec<String>,
    /// Size of the large image of the memory figure, GiB (fractions allowed).
    #[arg(long, default_value_t = 4.0)]
    big_gib: f64,
    /// Size of the small image (memory) and of the goodput image, GiB.
    #[arg(long, default_value_t = 1.0)]
    small_gib: f64,
    /// Sender rate of the goodput and memory crossings, Mb/s (default:
    /// 100 Gb/s, above what this machine can do: unpaced).
    #[arg(long)]
    goodput_rate_mbps: Option<u64>,
    /// A second goodput crossing (and lidi row run) with the sender paced
    /// at this rate, Mb/s (0: none). On this 2-core machine, where both
    /// gateways share the cores, the receiver takes what the sender sends
    /// at this rate without losing a frame; unpaced, the sender's workers
    /// take cores the receiver needs, it may overrun the receiver, and its
    /// later passes add frames on both sides.
    #[arg(long, default_value_t = 6500)]
    goodput_paced_mbps: u64,
    /// Image of the loss-efficiency figure, MiB.
    #[arg(long, default_value_t = 128)]
    loss_mib: u64,
    /// Paced rate of the loss-efficiency figure, Mb/s.
    #[arg(long, default_value_t = 100)]
    loss_rate_mbps: u64,
    /// Image of the push figure, MiB.
    #[arg(long, default_value_t = 500)]
    push_mib: u64,
    /// lidi's release tarball (default: ../shared/anchors/lidi-2.1.1-8a9f7e0.tar.gz
    /// from the workspace root).
    #[arg(long)]
    lidi_tarball: Option<PathBuf>,
    /// lidi runs tried until one delivers the archive intact (lidi has no
    /// rate limit; on a loaded machine its receiver may overrun).
    #[arg(long, default_value_t = 3)]
    lidi_attempts: u32,
    /// Rounds of the lidi row: weir at each rate, then lidi, this many times
    /// over; each side's fastest round is its figure (the others shown
    /// beside it).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    lidi_rounds: u32,
    /// Sender rate while the scaling rows record the frames the receiver is
    /// fed, Mb/s (paced, so the recording sink loses nothing).
    #[arg(long, default_value_t = 2000)]
    scaling_record_mbps: u64,
    /// Rounds of the scaling rows: each gateway runs on one core, then on
    /// two, this many times over; each CPU set's fastest round is the row
    /// (the others shown beside it).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    scaling_rounds: u32,
    /// Rates of the pacing figure, Mb/s.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pacing_mbps: Vec<u64>,
    /// Upper bound of each crossing, seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
    /// Leave the machine's settings alone. By default the UDP buffer
    /// sysctls are raised for the run (receive to 256 MiB, send to 32 MiB)
    /// and, on a virtual machine whose kernel hands freed pages back to the
    /// host at once (`/sys/module/page_reporting/parameters/min_free_ms`),
    /// freed pages are kept for five minutes; both are restored after, also
    /// when SIGINT, SIGTERM or SIGHUP stops the bench.
    #[arg(long)]
    no_sysctl: bool,
    /// Memory touched and freed before the first figure, and again before
    /// each timed crossing and anchor run of the goodput, memory, CPU and
    /// lidi rows and each round of the scaling rows, GiB, where freed pages
    /// are kept (see `--no-sysctl`): so that no run's page cache or socket
    /// buffers come from memory the host has taken back (at most 4 GiB
    /// waits to go back).
    #[arg(long, default_value_t = 4.0)]
    prime_gib: f64,
    /// Working directory for images (default: a temporary directory).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Record each crossing's gateways with `perf record --call-graph dwarf`
    /// into this directory (`<crossing>-tx.data`, `<crossing>-rx.data`),
    /// with both gateways' logs beside them (`<crossing>-tx.log`, ...).
    #[arg(long)]
    profile: Option<PathBuf>,
}

impl Args {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == figure)
    }
}

fn main() {
    let args = Args::parse();
    let result = run(&args);
    machine::hold_if_stopping();
    if let Err(e) = result {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}

/// The gateways must be the release build: `pair::gateway_bin` builds and
/// picks the profile this executable was built with.
fn check_release() -> Result<()> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    if !exe.parent().is_some_and(|d| d.ends_with("release")) {
        bail!(
            "{} is not a release build; run: cargo run --release -p weir-tests --bin bench",
            exe.display()
        );
    }
    for name in ["gateway-tx", "gateway-rx"] {
        let bin = weir_tests::pair::gateway_bin(name)?;
        eprintln!("using {}", bin.display());
    }
    Ok(())
}

fn make_image(dir: &Path, name: &str, seed: u64, bytes: u64, reference: &str) -> Result<Image> {
    let t = Instant::now();
    // Four layers, as a typical image has a few large ones.
    let layer = (bytes / 4).max(1);
    let layers = [LayerSpec { size: layer }; 4];
    let g = imagegen::oci_archive_uncompressed(dir, name, seed, &layers, reference)
        .with_context(|| format!("generating {name}"))?;
    let archive_bytes = std::fs::metadata(&g.path)?.len();
    eprintln!(
        "made {name}: {:.0} MiB in {:.1} s",
        archive_bytes as f64 / MIB,
        t.elapsed().as_secs_f64()
    );
    Ok(Image {
        manifest_digest: g
            .manifest_digest
            .context("an OCI archive has a manifest digest")?,
        path: g.path,
        archive_bytes,
    })
}

/// One row of the table.
struct Row {
    number: &'static str,
    figure: String,
    measured: String,
    goal: String,
    met: String,
}

impl Row {
    fn new(
        number: &'static str,
        figure: impl Into<String>,
        measured: impl Into<String>,
        goal: impl Into<String>,
        met: Option<bool>,
    ) -> Row {
        Row {
            number,
            figure: figure.into(),
            measured: measured.into(),
            goal: goal.into(),
            met: match met {
                Some(true) => "met".into(),
                Some(false) => "**not met**".into(),
                None => "—".into(),
            },
        }
    }

    fn failed(number: &'static str, figure: &str, e: &anyhow::Error) -> Row {
        let first = format!("{e:#}").lines().next().unwrap_or("").to_string();
        Row::new(number, figure, format!("failed: {first}"), "", Some(false))
    }
}

/// The fastest of the rounds run on `cpus`: the noise of the scaling rows
/// (fresh memory from the host, other work on the machine) only ever adds
/// time.
fn fastest<'a>(runs: &'a [scaling::SideRun], cpus: &str) -> Option<&'a scaling::SideRun> {
    runs.iter()
        .filter(|r| r.cpus == cpus)
        .max_by(|a, b| a.bytes_per_s().total_cmp(&b.bytes_per_s()))
}

/// Every round's figure, in MB/s, for beside the fastest: " (rounds a /
/// b / c)", "lost" for a round without one; nothing for a single round.
fn rounds_of(figures: &[Option<f64>]) -> String {
    if figures.len() < 2 {
        return String::new();
    }
    let each: Vec<String> = figures
        .iter()
        .map(|f| f.map_or("lost".into(), |b| format!("{:.0}", b / 1e6)))
        .collect();
    format!(" (rounds {})", each.join(" / "))
}

fn mbs(bytes_per_s: f64) -> String {
    format!("{:.0} MB/s", bytes_per_s / 1e6)
}

struct Bench<'a> {
    args: &'a Args,
    work: PathBuf,
    rows: Vec<Row>,
    notes: Vec<String>,
    timeout: Duration,
    pacing_runs: Vec<pacing::PacingRun>,
    /// Freed memory kept by the virtual machine from after the pacing
    /// figure to the end of the run.
    kept: Option<machine::KeptMemory>,
}

fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let load_before = machine::load_average();
    check_release()?;
    let tmp;
    let work = match &args.work {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.canonicalize()?
        }
        None => {
            tmp = tempfile::Builder::new().prefix("weir-bench-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    if args.work.is_none() {
        // The crossings' sites and state directories go under the run's
        // own directory, so that an interrupted run removes them with it.
        // No other thread runs yet to read the environment meanwhile.
        let sites = work.join("tmp");
        std::fs::create_dir_all(&sites)?;
        std::env::set_var("TMPDIR", &sites);
    }
    // Before anything is raised or started: an interrupted run stops its
    // children, puts the machine's sysctls back and leaves no scratch
    // archives behind (a `--work` directory is the user's, and stays).
    machine::restore_on_signal(args.work.is_none().then(|| work.clone()))?;
    let (raised, refused) = if args.no_sysctl {
        (None, Vec::new())
    } else {
        let (r, refused) = machine::RaisedBuffers::raise();
        (Some(r), refused)
    };
    for r in &refused {
        eprintln!("could not raise {r}; UDP receivers may drop frames");
    }
    let mut b = Bench {
        args,
        work,
        rows: Vec::new(),
        notes: Vec::new(),
        timeout: Duration::from_secs(args.timeout_s),
        pacing_runs: Vec::new(),
        kept: None,
    };
    b.measure_all();
    machine::hold_if_stopping();

    let facts = machine::facts();
    let load_after = machine::load_average();
    let mut raised_text = raised.as_ref().map(|r| r.describe()).unwrap_or_default();
    raised_text.extend(b.kept.as_ref().map(|k| k.describe()).unwrap_or_default());
    drop(b.kept.take());
    drop(raised);
    b.print(
        &facts,
        &load_before,
        &load_after,
        &raised_text,
        started.elapsed(),
    );
    Ok(())
}

fn threads(t: &[(String, f64)]) -> String {
    t.iter()
        .take(6)
        .map(|(n, s)| format!("{n} {s:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Bench<'_> {
    fn profile(&self, name: &str) -> Option<(PathBuf, String)> {
        let dir = self.args.profile.as_ref()?;
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("profile directory {}: {e}", dir.display());
            return None;
        }
        Some((dir.clone(), name.to_string()))
    }

    fn measure_all(&mut self) {
        let a = self.args;
        // Pacing first, with the machine's memory as it is: in runs that
        // kept freed memory, gateway-tx alone missed its rate by 2.5–14 %
        // in five of eight (stalls of up to a third of a second's frames),
        // and in none of two that did not. It writes no page cache, so it
        // has nothing to gain from kept memory.
        if a.wants("pacing") {
            if let Some(said) = machine::settle_page_reporting() {
                eprintln!("free page reporting: {said}");
            }
            self.pacing();
        }
        if FIGURES.iter().any(|f| *f != "pacing" && a.wants(f)) {
            self.keep_memory();
        }
        let want_small = a.wants("goodput") || a.wants("memory") || a.wants("cpu");
        let want_archive = a.wants("lidi") || a.wants("scaling");
        let want_big = a.wants("memory") || a.wants("cpu");
        let small = if want_small {
            Some(self.crossing_of("small", a.small_gib))
        } else {
            None
        };
        if a.wants("goodput") {
            match &small {
                Some(Ok((img, c))) => {
                    let mut crossings = vec![(a.goodput_rate_mbps, c)];
                    let paced = (a.goodput_paced_mbps > 0)
                        .then(|| {
                            self.crossing_at("paced", a.small_gib, a.goodput_paced_mbps * 1_000_000)
                        })
                        .transpose();
                    match &paced {
                        Ok(Some((_, p))) => crossings.push((Some(a.goodput_paced_mbps), p)),
                        Ok(None) => {}
                        Err(e) => self.rows.push(Row::failed("1", "goodput, paced", e)),
                    }
                    if let Ok(Some((img, _))) = &paced {
                        let _ = std::fs::remove_file(&img.path);
                    }
                    let r = self.goodput(img, &crossings);
                    if let Err(e) = r {
                        self.rows.push(Row::failed("1", "goodput", &e));
                    }
                }
                Some(Err(e)) => self.rows.push(Row::failed("1", "goodput", e)),
                None => {}
            }
        }
        // lidi and the scaling rows move the goodput image's archive (the
        // same bytes: the generator is deterministic).
        if want_archive {
            let img = match &small {
                Some(Ok((img, _))) => Ok(img.clone()),
                _ => self.small_image(),
            };
            match img {
                Ok(img) => {
                    if a.wants("lidi") {
                        self.lidi(&img);
                    }
                    if a.wants("scaling") {
                        self.scaling(&img);
                    }
                    let _ = std::fs::remove_file(&img.path);
                }
                Err(e) => {
                    if a.wants("lidi") {
                        self.rows.push(Row::failed("7", "lidi", &e));
                    }
                    if a.wants("scaling") {
                        self.rows.push(Row::failed("8", "scaling", &e));
                    }
                }
            }
        }
        // The goodput image is not needed any more; the big one may be 4 GiB.
        if let Some(Ok((img, _))) = &small {
            let _ = std::fs::remove_file(&img.path);
        }
        if a.wants("loss") {
            if let Err(e) = self.loss() {
                self.rows.push(Row::failed("2", "loss efficiency", &e));
            }
        }
        let big = if want_big {
            Some(self.crossing_of("big", a.big_gib))
        } else {
            None
        };
        if let Some(Ok((img, _))) = &big {
            let _ = std::fs::remove_file(&img.path);
        }
        let small = small.map(|r| r.map(|(_, c)| c));
        let big = big.map(|r| r.map(|(_, c)| c));
        if a.wants("memory") {
            self.memory(small.as_ref(), big.as_ref());
        }
        if a.wants("push") {
            if let Err(e) = self.push() {
                self.rows.push(Row::failed("5", "push", &e));
            }
        }
        if a.wants("cpu") {
            self.cpu(small.as_ref(), big.as_ref());
        }
    }

    /// Keeps freed memory with the virtual machine from here on, unless the
    /// machine's settings are to be left alone (see [`machine::KeptMemory`]).
    fn keep_memory(&mut self) {
        if self.args.no_sysctl {
            return;
        }
        let prime = (self.args.prime_gib.max(0.0) * GIB) as usize;
        let (k, refused) = machine::KeptMemory::keep(prime);
        for r in &refused {
            eprintln!("could not keep freed pages: {r}; page cache may cost the host's faults");
        }
        for line in k.describe() {
            eprintln!("free page reporting: {line}");
        }
        self.kept = Some(k);
    }

    /// Touches the kept memory again before a timed run (see
    /// [`machine::KeptMemory::touch_again`]).
    fn touch_kept(&self) {
        if let Some(k) = &self.kept {
            k.touch_again();
        }
    }

    /// An image of `gib` crossing at the goodput rate into an OCI layout.
    fn crossing_of(&mut self, name: &str, gib: f64) -> Result<(Image, Crossing)> {
        let rate_bps = self
            .args
            .goodput_rate_mbps
            .map(|m| m * 1_000_000)
            .unwrap_or(UNPACED_BPS);
        self.crossing_at(name, gib, rate_bps)
    }

    /// The archive of an image of `gib` named `name`.
    fn image_of(&self, name: &str, gib: f64) -> Result<Image> {
        let bytes = (gib * GIB) as u64;
        make_image(
            &self.work,
            &format!("{name}.tar"),
            60 + bytes % 7,
            bytes,
            &format!("bench/{name}:1"),
        )
    }

    /// The goodput figure's archive, byte for byte.
    fn small_image(&self) -> Result<Image> {
        self.image_of("small", self.args.small_gib)
    }

    /// An image of `gib` crossing at `rate_bps` into an OCI layout.
    fn crossing_at(&mut self, name: &str, gib: f64, rate_bps: u64) -> Result<(Image, Crossing)> {
        machine::hold_if_stopping();
        let image = self.image_of(name, gib)?;
        let layout = self.work.join(format!("{name}-layout"));
        eprintln!(
            "crossing: {gib:.2} GiB image at {} Mb/s into an OCI layout...",
            rate_bps / 1_000_000
        );
        self.touch_kept();
        let c = crossing::run(
            &image,
            Plan {
                label: format!("{name} image ({gib} GiB)"),
                fec: (DATA_SHARDS, PARITY_SHARDS),
                rate_bps,
                passes: 3,
                datagram: None,
                link: None,
                target: Target::Layout(layout.clone()),
                stop_tx_when_complete: false,
                timeout: self.timeout,
                profile: self.profile(name),
            },
        );
        let _ = std::fs::remove_dir_all(&layout);
        let c = c?;
        eprintln!(
            "  ingest {:.1} s, complete {:.2} s and delivered {:.2} s after acceptance, peaks tx {:.0} MiB rx {:.0} MiB",
            c.ingest_s,
            c.to_complete_s,
            c.to_delivered_s,
            c.tx_peak_kib as f64 / 1024.0,
            c.rx_peak_kib as f64 / 1024.0
        );
        Ok((image, c))
    }

    /// One goodput row per crossing of the same image (at different
    /// sender rates), against one udpcast run.
    fn goodput(&mut self, image: &Image, crossings: &[(Option<u64>, &Crossing)]) -> Result<()> {
        // Deliberately from acceptance, ingest not counted: udpcast, the
        // anchor here, is timed from its first byte written, not from a drop.
        let figure = |rate: Option<u64>| match rate {
            Some(m) => {
                format!("goodput from acceptance, FEC 32+8, 1400 B datagrams, paced at {m} Mb/s")
            }
            None => "goodput from acceptance, FEC 32+8, 1400 B datagrams, unpaced".into(),
        };
        let row = |rate: Option<u64>, measured: String, met| {
            Row::new(
                "1",
                figure(rate),
                measured,
                "≥ 2× udpcast and ≥ 260 MB/s",
                met,
            )
        };
        let weir = |c: &Crossing| c.payload_bytes as f64 / c.to_delivered_s;
        if !udpcast::available() {
            for (rate, c) in crossings {
                self.rows.push(row(
                    *rate,
                    format!(
                        "weir {}; udpcast not installed (apt-get install udpcast)",
                        mbs(weir(c))
                    ),
                    Some(false),
                ));
            }
            return Ok(());
        }
        eprintln!("udpcast: the same archive, async, FEC 8x8...");
        self.touch_kept();
        let u = udpcast::best_run(&image.path, &self.work, self.timeout, &udpcast::LADDER)?;
        let udp = u.bytes_per_s();
        for (rate, c) in crossings {
            let ratio = weir(c) / udp;
            self.rows.push(row(
                *rate,
                format!("weir {} · udpcast {} · {ratio:.2}×", mbs(weir(c)), mbs(udp)),
                Some(ratio >= 2.0 && weir(c) >= 260e6),
            ));
            self.notes.push(format!(
                "{}: weir moved {:.0} MiB of blobs from acceptance by gateway-tx to delivery done in the OCI layout in {:.2} s \
                 (complete at {:.2} s; ingest before that: {:.2} s for the {:.0} MiB archive, not counted); gateway-rx's socket dropped {} \
                 datagrams or GRO runs of datagrams (receiver overrun, repaired by FEC or later passes); it accepted {} frames, dropped {} unopened \
                 (shards of objects it held already), counted {} lost, \
                 repaired {} blocks. CPU seconds by thread until delivery: gateway-tx {}; gateway-rx {}.",
                figure(*rate),
                c.payload_bytes as f64 / MIB,
                c.to_delivered_s,
                c.to_complete_s,
                c.ingest_s,
                image.archive_bytes as f64 / MIB,
                c.rx_kernel_drops,
                c.rx_counters.frames_accepted,
                c.rx_counters.frames_held_unopened,
                c.rx_counters.frames_lost_estimate,
                c.rx_counters.blocks_repaired,
                threads(&c.tx_threads),
                threads(&c.rx_threads)
            ));
        }
        self.notes.push(format!(
            "goodput: udpcast moved the archive ({:.0} MiB) in {:.2} s, first byte written to full size, {}{}.",
            u.bytes as f64 / MIB,
            u.seconds,
            match u.max_bitrate {
                Some(cap) => format!("--max-bitrate {cap}"),
                None => "uncapped".into(),
            },
            if u.failed.is_empty() {
                String::new()
            } else {
                format!(" (lost data, so not counted, at: {})", u.failed.join(", "))
            }
        ));
        Ok(())
    }

    fn loss(&mut self) -> Result<()> {
        let a = self.args;
        let rate = a.loss_rate_mbps * 1_000_000;
        let image = make_image(&self.work, "loss.tar", 62, a.loss_mib << 20, "bench/loss:1")?;
        let layout = self.work.join("loss-layout");
        let default_fec = gateway_tx::config::FecConfig::default();
        let (k, m) = (default_fec.data_shards, default_fec.parity_shards);
        eprintln!(
            "loss efficiency: {} MiB at {} Mb/s, 5 % loss + bursts, FEC {k}+{m}...",
            a.loss_mib, a.loss_rate_mbps
        );
        let burst = BurstLoss {
            enter: 0.001,
            exit: 0.2,
            loss: 1.0,
        };
        let steal0 = procfs::steal_s();
        let c = crossing::run(
            &image,
            Plan {
                label: "loss efficiency".into(),
                fec: (default_fec.data_shards, default_fec.parity_shards),
                rate_bps: rate,
                passes: 3,
                datagram: None,
                link: Some(Box::new(move |cfg| {
                    cfg.loss = 0.05;
                    cfg.burst = Some(burst);
                })),
                target: Target::Layout(layout.clone()),
                stop_tx_when_complete: false,
                timeout: self.timeout,
                profile: self.profile("loss"),
            },
        );
        let steal = steal0.zip(procfs::steal_s()).map(|(a, b)| b - a);
        let _ = std::fs::remove_dir_all(&layout);
        let _ = std::fs::remove_file(&image.path);
        let c = c?;
        let ideal = c.payload_bytes as f64 * 8.0 / rate as f64;
        let ratio = c.to_complete_s / ideal;
        let fec = weir_proto::FecParams::for_datagram(DATAGRAM, k, m)
            .context("FEC parameters of the bench")?;
        let l = c.link.unwrap_or_default();
        // What one pass puts on the wire per image byte, loss aside: parity,
        // frame overhead (mean frame as the link saw it), a header frame
        // every 64 shards (the default header_every).
        let mean_frame = l.received_bytes as f64 / l.received.max(1) as f64;
        let header_every = gateway_tx::config::CarouselConfig::default().header_every;
        let floor = (k + m) as f64 / k as f64 * mean_frame / fec.shard_size as f64
            * (1.0 + 1.0 / header_every as f64);
        self.rows.push(Row::new(
            "2",
            format!(
                "loss efficiency, 5 % loss + bursts, {} Mb/s, FEC {k}+{m} (default)",
                a.loss_rate_mbps
            ),
            format!("{ratio:.2}"),
            "≤ 1.3",
            Some(ratio <= 1.3),
        ));
        self.notes.push(format!(
            "loss efficiency: {:.0} MiB of blobs complete {:.1} s after acceptance; at {} Mb/s the image alone takes {:.1} s. \
             One pass of FEC {k}+{m} is already about {floor:.2}× the image before any loss: {} frames per {k} shards of {} B, \
             frames of {mean_frame:.0} B on average (header, postcard body fields and HMAC tag: {:.0} B), plus an object \
             header every {header_every} shards. \
             Link: {} frames in, {} lost independently, {} in bursts (Gilbert–Elliott enter 0.001, exit 0.2: mean burst 5), \
             {:.1} % in all; gateway-rx socket drops {}. CPU time the host took from this virtual machine's \
             cores over the whole crossing (steal in /proc/stat): {}.",
            c.payload_bytes as f64 / MIB,
            c.to_complete_s,
            a.loss_rate_mbps,
            ideal,
            k + m,
            fec.shard_size,
            mean_frame - fec.shard_size as f64,
            l.received,
            l.dropped_loss,
            l.dropped_burst,
            100.0 * l.dropped() as f64 / l.received.max(1) as f64,
            c.rx_kernel_drops,
            match steal {
                Some(s) => format!("{s:.2} CPU-s"),
                None => "not counted by this kernel".into(),
            }
        ));
        Ok(())
    }

    fn memory(&mut self, small: Option<&Result<Crossing>>, big: Option<&Result<Crossing>>) {
        let a = self.args;
        let (s, b) = match (small, big) {
            (Some(Ok(s)), Some(Ok(b))) => (s, b),
            (Some(Err(e)), _) | (_, Some(Err(e))) => {
                self.rows.push(Row::failed("3", "memory", e));
                return;
            }
            _ => return,
        };
        let limit = 64 * 1024;
        for (side, sp, bp) in [
            ("gateway-tx", s.tx_peak_kib, b.tx_peak_kib),
            ("gateway-rx", s.rx_peak_kib, b.rx_peak_kib),
        ] {
            // Flat: the larger image may cost at most a quarter more.
            let flat = bp as f64 <= sp as f64 * 1.25;
            self.rows.push(Row::new(
                "3",
                format!(
                    "peak RSS {side}, {} GiB → {} GiB image",
                    a.small_gib, a.big_gib
                ),
                format!(
                    "{:.1} MiB → {:.1} MiB",
                    sp as f64 / 1024.0,
                    bp as f64 / 1024.0
                ),
                "≤ 64 MiB, flat (≤ +25 %)",
                Some(sp <= limit && bp <= limit && flat),
            ));
        }
        self.notes.push(format!(
            "memory: VmHWM of each process (sampled every 50 ms and just before the end) over the whole crossing, \
             ingest included, at the goodput rate into an OCI layout; {} GiB delivered {:.1} s after acceptance, {} GiB {:.1} s.",
            a.small_gib, s.to_delivered_s, a.big_gib, b.to_delivered_s
        ));
    }

    fn pacing(&mut self) {
        let image = match make_image(&self.work, "pacing.tar", 63, 64 << 20, "bench/pacing:1") {
            Ok(i) => i,
            Err(e) => {
                self.rows.push(Row::failed("4", "pacing", &e));
                return;
            }
        };
        let (mut drops, mut stalls) = (Vec::new(), Vec::new());
        for &mbps in &self.args.pacing_mbps {
            eprintln!("pacing at {mbps} Mb/s...");
            let figure = format!(
                "pacing at {}",
                if mbps >= 1000 {
                    format!("{} Gb/s", mbps as f64 / 1000.0)
                } else {
                    format!("{mbps} Mb/s")
                }
            );
            match pacing::measure(&image, mbps * 1_000_000) {
                Ok(p) => {
                    self.rows.push(Row::new(
                        "4",
                        figure,
                        format!(
                            "{:.2} Mb/s ({:+.2} %; worst 1 s {:.1} %)",
                            p.measured_bps / 1e6,
                            p.error() * 100.0,
                            p.worst_second_error * 100.0
                        ),
                        "within ±2 %",
                        Some(p.error().abs() <= 0.02),
                    ));
                    drops.push(format!("{mbps} Mb/s: {}", p.kernel_drops));
                    stalls.push(format!(
                        "{mbps} Mb/s: {:.0} ms, {}",
                        p.longest_silence.as_secs_f64() * 1000.0,
                        match p.steal_s {
                            Some(s) => format!("{s:.2} CPU-s taken by the host"),
                            None => "host's share not counted by this kernel".into(),
                        }
                    ));
                    self.pacing_runs.push(p);
                }
                Err(e) => self.rows.push(Row::failed("4", &figure, &e)),
            }
        }
        let _ = std::fs::remove_file(&image.path);
        self.notes.push(format!(
            "pacing: UDP payload bytes (= frame bytes, what gateway-tx paces; IP/UDP headers not counted) at a counting \
             socket, over 10 s after 2 s of warm-up; 'worst 1 s' is the largest deviation of a one-second slice. \
             Datagrams the counting socket's kernel buffer dropped (sent, not counted): {}. \
             The longest stretch of the window without a datagram, and the CPU time the host took from this \
             virtual machine's two cores over it (steal in /proc/stat; a stall the host causes stops the sender \
             and this counter alike): {}.",
            drops.join(", "),
            stalls.join("; ")
        ));
    }

    fn push(&mut self) -> Result<()> {
        let a = self.args;
        if !weir_tests::skopeo::available() {
            bail!("skopeo not installed: apt-get install skopeo");
        }
        let bytes = a.push_mib << 20;
        let layers = [LayerSpec { size: bytes / 4 }; 4];
        let reference = "bench/push:1";
        let image = make_image(&self.work, "push.tar", 64, bytes, reference)?;
        let options = ImageOptions {
            layer_compression: LayerCompression::None,
            ..ImageOptions::default()
        };
        let layout = imagegen::oci_layout_dir_with(
            &self.work,
            "push-layout",
            64,
            &layers,
            reference,
            &options,
        )
        .context("generating the push image as a layout")?;
        if layout.manifest_digest.as_deref() != Some(image.manifest_digest.as_str()) {
            bail!(
                "the layout and the archive of the push image differ: {:?} vs {}",
                layout.manifest_digest,
                image.manifest_digest
            );
        }
        let for_skopeo = Registry::start()?
            .context("docker-registry not installed: apt-get install docker-registry")?;
        let for_weir = Registry::start()?.context("docker-registry not installed")?;
        eprintln!("push: skopeo copy of {} MiB...", a.push_mib);
        let skopeo_s = push::skopeo_seconds(
            &layout.path,
            &for_skopeo,
            "bench/push",
            "1",
            &image.manifest_digest,
        )?;
        eprintln!("push: the same image through the pair into another registry...");
        let c = crossing::run(
            &image,
            Plan {
                label: "push".into(),
                fec: (DATA_SHARDS, PARITY_SHARDS),
                rate_bps: PUSH_CROSSING_BPS,
                passes: 3,
                datagram: None,
                link: None,
                target: Target::Registry(for_weir.url()),
                stop_tx_when_complete: true,
                timeout: self.timeout,
                profile: self.profile("push"),
            },
        );
        let _ = std::fs::remove_file(&image.path);
        let _ = std::fs::remove_dir_all(&layout.path);
        let c = c?;
        let served = for_weir.manifest_digest("bench/push", "1")?;
        if served.as_deref() != Some(image.manifest_digest.as_str()) {
            bail!(
                "gateway-rx's registry serves {served:?}, expected {}",
                image.manifest_digest
            );
        }
        let ratio = c.delivery_s / skopeo_s;
        self.rows.push(Row::new(
            "5",
            format!("push of a {} MiB image into the local registry", a.push_mib),
            format!(
                "gateway-rx {:.2} s · skopeo {:.2} s · {ratio:.2}",
                c.delivery_s, skopeo_s
            ),
            "ratio ≤ 1.0",
            Some(ratio <= 1.0),
        ));
        self.notes.push(format!(
            "push: gateway-rx's delivery from image complete to delivery done (status.json milliseconds; the image crossed \
             at 1 Gb/s and gateway-tx was killed the moment it was complete, so the push had the machine to itself); skopeo copy oci:LAYOUT → registry \
             with --preserve-digests as a whole process, into a registry of its own. Uncompressed layers, {:.0} MiB of blobs.",
            c.payload_bytes as f64 / MIB
        ));
        Ok(())
    }

    fn cpu(&mut self, small: Option<&Result<Crossing>>, big: Option<&Result<Crossing>>) {
        let (c, gib_label) = match (big, small) {
            (Some(Ok(b)), _) => (b, self.args.big_gib),
            (_, Some(Ok(s))) => (s, self.args.small_gib),
            (Some(Err(e)), _) | (_, Some(Err(e))) => {
                self.rows.push(Row::failed("6", "CPU", e));
                return;
            }
            _ => return,
        };
        let gib = c.payload_bytes as f64 / GIB;
        let per = |s: f64| format!("{:.2} s/GiB", s / gib);
        // Frames of one pass of this image (40 per 32 shards), to say how
        // many passes' worth the receiver handled.
        let shard = weir_proto::FecParams::for_datagram(DATAGRAM, DATA_SHARDS, PARITY_SHARDS)
            .map(|f| f.shard_size as f64)
            .unwrap_or(f64::NAN);
        let frames_per_byte = (DATA_SHARDS + PARITY_SHARDS) as f64 / DATA_SHARDS as f64 / shard;
        let one_pass = c.payload_bytes as f64 * frames_per_byte;
        let passes =
            (c.rx_counters.frames_accepted + c.rx_counters.frames_held_unopened) as f64 / one_pass;
        self.rows.push(Row::new(
            "6",
            "CPU gateway-tx, ingest (read, hash, store)",
            per(c.tx_cpu_ingest_s),
            "report",
            None,
        ));
        let paced = self
            .pacing_runs
            .iter()
            .filter_map(|p| Some((p.configured_bps, p.tx_cpu_s_per_wire_gib?)))
            .max_by_key(|(bps, _)| *bps);
        let send = match paced {
            Some((bps, s)) => format!(
                "{s:.2} s per GiB of frames at {} Mb/s; {} from acceptance until complete at the goodput rate",
                bps / 1_000_000,
                per(c.tx_cpu_send_s)
            ),
            None => format!(
                "{} from acceptance until complete at the goodput rate",
                per(c.tx_cpu_send_s)
            ),
        };
        self.rows.push(Row::new(
            "6",
            "CPU gateway-tx, send (FEC, HMAC, pacing, UDP): steady pacing window, and from acceptance to complete",
            send,
            "report",
            None,
        ));
        self.rows.push(Row::new(
            "6",
            "CPU gateway-rx, receive to delivered",
            format!(
                "{} (to complete {}), {passes:.1} passes' frames",
                per(c.rx_cpu_s),
                per(c.rx_cpu_to_complete_s)
            ),
            "report",
            None,
        ));
        self.notes.push(format!(
            "CPU: utime+stime from /proc/PID/stat, sampled every 50 ms and interpolated at the moments of acceptance, \
             completion and delivery, per GiB of blobs, in the {gib_label} GiB crossing at the goodput rate; the sender's \
             cost per GiB of frames also from the steady pacing window (one pass is at most {:.3} GiB of frames per GiB \
             of image). When the receiver overruns, the sender's later passes add frames on both sides (passes' frames \
             = frames accepted by gateway-rx ÷ frames of one pass). CPU seconds by thread: gateway-tx {}; gateway-rx {}.",
            frames_per_byte * DATAGRAM as f64,
            threads(&c.tx_threads),
            threads(&c.rx_threads)
        ));
    }

    /// weir's drop-to-delivered goodput (ingest included) with its default
    /// FEC in 1472-byte datagrams, and lidi's file-to-file goodput, on the
    /// same archive: each from the moment the file is handed over to the
    /// moment it is out on the other side, what a user waits for.
    fn lidi(&mut self, image: &Image) {
        let a = self.args;
        let fec = gateway_tx::config::FecConfig::default();
        let (k, m) = (fec.data_shards, fec.parity_shards);
        // Unpaced, and paced where the receiver, sharing the cores, drains
        // what comes: a diode's sender is set to what its receiver takes.
        let mut rates: Vec<(String, u64)> = vec![match a.goodput_rate_mbps {
            Some(m) => (format!("paced at {m} Mb/s"), m * 1_000_000),
            None => ("unpaced".into(), UNPACED_BPS),
        }];
        if a.goodput_paced_mbps > 0 && a.goodput_rate_mbps != Some(a.goodput_paced_mbps) {
            rates.push((
                format!("paced at {} Mb/s", a.goodput_paced_mbps),
                a.goodput_paced_mbps * 1_000_000,
            ));
        }
        let figure = format!(
            "goodput against lidi: weir drop-to-delivered (from the drop renamed into the spool to delivery done, \
             ingest included; FEC {k}+{m}, {LIDI_DATAGRAM} B datagrams, OCI layout; {}) vs lidi file-to-file (defaults, \
             1500 MTU), same {:.0} MiB archive",
            rates.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>().join(", then "),
            image.archive_bytes as f64 / MIB
        );
        // Rounds: weir at each rate, then lidi, this many times over. On
        // this virtual machine noise only ever adds time (see the scaling
        // rows), so each side's figure is its fastest round, all shown.
        let rounds = a.lidi_rounds.max(1);
        let mut runs: Vec<(String, Result<(f64, crossing::Crossing)>)> = Vec::new();
        let tarball = a.lidi_tarball.clone().unwrap_or_else(lidi::default_tarball);
        let bins = lidi::build(&tarball);
        let mut sysctls = Vec::new();
        let mut lidi_failed: Vec<String> = Vec::new();
        let mut lidi_runs: Vec<Result<lidi::LidiRun>> = Vec::new();
        for round in 1..=rounds {
            for (label, rate_bps) in &rates {
                eprintln!(
                    "lidi row, round {round} of {rounds}: weir crossing, FEC {k}+{m}, {LIDI_DATAGRAM} B datagrams, {label}..."
                );
                let layout = self.work.join("lidi-weir-layout");
                self.touch_kept();
                let c = crossing::run(
                    image,
                    Plan {
                        label: format!("weir, lidi row, {label}"),
                        fec: (k, m),
                        datagram: Some(LIDI_DATAGRAM),
                        rate_bps: *rate_bps,
                        passes: 3,
                        link: None,
                        target: Target::Layout(layout.clone()),
                        stop_tx_when_complete: false,
                        timeout: self.timeout,
                        profile: self.profile("lidi-weir"),
                    },
                );
                let _ = std::fs::remove_dir_all(&layout);
                let run = c.map(|c| (c.payload_bytes as f64 / c.drop_to_delivered_s, c));
                if let Err(e) = &run {
                    eprintln!("  weir's crossing ({label}) failed: {e:#}");
                }
                runs.push((label.clone(), run));
            }
            let bins = match &bins {
                Ok(bins) => bins,
                Err(e) => {
                    // Said once: there is no lidi to run in later rounds.
                    if lidi_runs.is_empty() {
                        lidi_runs.push(Err(anyhow::anyhow!("{e:#}")));
                    }
                    continue;
                }
            };
            eprintln!(
                "lidi row, round {round} of {rounds}: {} file to file ({}; built in {})...",
                bins.version,
                bins.dir.display(),
                match bins.built_s {
                    Some(s) => format!("{s:.0} s"),
                    None => "an earlier run, reused".into(),
                }
            );
            let guard = lidi::LidiSysctls::raise();
            if round == 1 {
                for r in &guard.refused {
                    eprintln!("  lidi's sysctl not raised: {r}");
                }
                sysctls.push(format!(
                    "raised for each of lidi's runs and restored after: {}",
                    if guard.describe().is_empty() {
                        "none".into()
                    } else {
                        guard.describe().join(", ")
                    }
                ));
                if !guard.kept.is_empty() {
                    sysctls.push(format!(
                        "already at or above lidi's 97536000: {}",
                        guard
                            .kept
                            .iter()
                            .map(|(n, v)| format!("{n}={v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if !guard.refused.is_empty() {
                    sysctls.push(format!("not raised: {}", guard.refused.join("; ")));
                }
            }
            // lidi has no rate limit: on a loaded machine its receiver may
            // overrun and lose the file; a round's figure is its first
            // intact run of a few, the others reported.
            let mut r = Err(anyhow::anyhow!("no attempt"));
            for attempt in 1..=a.lidi_attempts.max(1) {
                machine::hold_if_stopping();
                self.touch_kept();
                r = lidi::run(bins, &image.path, &self.work, self.timeout);
                match &r {
                    Ok(_) => break,
                    Err(e) => {
                        let first = format!("{e:#}").lines().next().unwrap_or("").to_string();
                        eprintln!("  lidi attempt {attempt} lost the file: {first}");
                        lidi_failed.push(first);
                    }
                }
            }
            drop(guard);
            lidi_runs.push(r);
        }
        // The ratio is taken on weir's fastest run, at whichever rate, and
        // lidi's fastest; every run is shown.
        let best = runs
            .iter()
            .enumerate()
            .filter_map(|(i, (_, r))| r.as_ref().ok().map(|(g, _)| (i, *g)))
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .map(|(i, _)| i);
        let weir_all = rates
            .iter()
            .map(|(label, _)| {
                let of_rate: Vec<Option<f64>> = runs
                    .iter()
                    .filter(|(l, _)| l == label)
                    .map(|(_, r)| r.as_ref().ok().map(|(g, _)| *g))
                    .collect();
                let fastest = of_rate.iter().flatten().copied().max_by(f64::total_cmp);
                format!(
                    "weir {label} {}{}",
                    fastest.map_or("failed".into(), mbs),
                    rounds_of(&of_rate)
                )
            })
            .collect::<Vec<_>>()
            .join(" · ");
        let weir: Result<(f64, &crossing::Crossing), anyhow::Error> = match best {
            Some(i) => match &runs[i].1 {
                Ok((g, c)) => Ok((*g, c)),
                Err(_) => Err(anyhow::anyhow!("no weir run")),
            },
            None => Err(match runs.iter().find_map(|(_, r)| r.as_ref().err()) {
                Some(e) => anyhow::anyhow!("{e:#}"),
                None => anyhow::anyhow!("no weir run"),
            }),
        };
        let lidi_all = rounds_of(
            &lidi_runs
                .iter()
                .map(|r| r.as_ref().ok().map(|l| l.bytes_per_s()))
                .collect::<Vec<_>>(),
        );
        let lidi_run: Result<&lidi::LidiRun> = lidi_runs
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .max_by(|x, y| x.bytes_per_s().total_cmp(&y.bytes_per_s()))
            .ok_or_else(|| match lidi_runs.iter().find_map(|r| r.as_ref().err()) {
                Some(e) => anyhow::anyhow!("{e:#}"),
                None => anyhow::anyhow!("no lidi run"),
            });
        let why = |e: &anyhow::Error| {
            format!("{e:#}")
                .lines()
                .next()
                .unwrap_or("")
                .replace('|', "/")
        };
        let measured = match (&weir, &lidi_run) {
            (Ok((w, _)), Ok(l)) => {
                let ratio = w / l.bytes_per_s();
                self.rows.push(Row::new(
                    "7",
                    figure.clone(),
                    format!(
                        "{weir_all} · lidi {}{lidi_all} · {ratio:.2}× (fastest runs)",
                        mbs(l.bytes_per_s())
                    ),
                    "≥ 2× lidi",
                    Some(ratio >= 2.0),
                ));
                true
            }
            (Ok(_), Err(e)) => {
                self.rows.push(Row::new(
                    "7",
                    figure.clone(),
                    format!("{weir_all}; lidi not measured: {}", why(e)),
                    "≥ 2× lidi",
                    None,
                ));
                false
            }
            (Err(e), Ok(l)) => {
                self.rows.push(Row::new(
                    "7",
                    figure.clone(),
                    format!(
                        "weir failed: {}; lidi {}{lidi_all}",
                        why(e),
                        mbs(l.bytes_per_s())
                    ),
                    "≥ 2× lidi",
                    Some(false),
                ));
                true
            }
            (Err(e), Err(f)) => {
                self.rows.push(Row::new(
                    "7",
                    figure.clone(),
                    format!("weir failed: {}; lidi not measured: {}", why(e), why(f)),
                    "≥ 2× lidi",
                    Some(false),
                ));
                false
            }
        };
        let mut note = String::from("lidi row: ");
        // The fastest run at each rate, in detail.
        for (label, _) in &rates {
            let fastest = runs
                .iter()
                .filter(|(l, _)| l == label)
                .filter_map(|(_, r)| r.as_ref().ok())
                .max_by(|x, y| x.0.total_cmp(&y.0));
            let Some((_, c)) = fastest else { continue };
            note.push_str(&format!(
                "weir {label} moved {:.0} MiB of blobs from the drop renamed into the spool to delivery done in {:.2} s, ingest included \
                 (ingest to acceptance {:.2} s; then complete {:.2} s and delivered {:.2} s after acceptance); \
                 gateway-rx's socket dropped {} datagrams, it accepted {} frames, dropped {} unopened (shards of objects it held already), \
                 counted {} lost, repaired {} blocks. \
                 CPU: gateway-tx {:.1} s to image complete, gateway-rx {:.1} s to delivered, the pair {:.2} CPU-s/GiB; \
                 by thread (those alive at the end): gateway-tx {}; gateway-rx {}. ",
                c.payload_bytes as f64 / MIB,
                c.drop_to_delivered_s,
                c.ingest_s,
                c.to_complete_s,
                c.to_delivered_s,
                c.rx_kernel_drops,
                c.rx_counters.frames_accepted,
                c.rx_counters.frames_held_unopened,
                c.rx_counters.frames_lost_estimate,
                c.rx_counters.blocks_repaired,
                c.tx_cpu_ingest_s + c.tx_cpu_send_s,
                c.rx_cpu_s,
                (c.tx_cpu_ingest_s + c.tx_cpu_send_s + c.rx_cpu_s) / (c.payload_bytes as f64 / GIB).max(1e-9),
                threads(&c.tx_threads),
                threads(&c.rx_threads)
            ));
        }
        match (&bins, &lidi_run) {
            (Ok(b), Ok(l)) => note.push_str(&format!(
                "{} (built from {} into {}, outside the repository) moved the archive ({:.0} MiB) in {:.2} s in its fastest round, from diode-send-file \
                 started to the output file at full size, sha256 equal; diode-send → diode-receive over UDP 127.0.0.1 with lidi's \
                 defaults (MTU 1500, blocks of 734928 B, 2 % repair, 1 encode and 1 decode thread); diode-receive's socket dropped {} \
                 datagrams; its four processes used {:.1} CPU-s over that span ({:.2} CPU-s/GiB). {}.",
                b.version,
                tarball.display(),
                b.dir.display(),
                l.bytes as f64 / MIB,
                l.seconds,
                l.rx_kernel_drops,
                l.cpu_s,
                l.cpu_s / (l.bytes as f64 / GIB),
                sysctls.join("; ")
            )),
            (_, Err(e)) => {
                let full = format!("{e:#}");
                let mut short: String = full.lines().take(12).collect::<Vec<_>>().join(" / ");
                short.truncate(1500);
                note.push_str(&format!(
                    "lidi ({}) was not measured: {short}{}",
                    tarball.display(),
                    if sysctls.is_empty() {
                        String::new()
                    } else {
                        format!(". {}", sysctls.join("; "))
                    }
                ));
            }
            (Err(_), Ok(_)) => {}
        }
        if !lidi_failed.is_empty() {
            note.push_str(&format!(
                " lidi attempts that lost the file (not counted): {}.",
                lidi_failed.join("; ")
            ));
        }
        if !measured {
            eprintln!("lidi: {note}");
        }
        self.notes.push(note);
    }

    /// Each gateway alone on one core and on two.
    fn scaling(&mut self, image: &Image) {
        let a = self.args;
        let fec = gateway_tx::config::FecConfig::default();
        let setup = scaling::Setup {
            fec: (fec.data_shards, fec.parity_shards),
            datagram: LIDI_DATAGRAM,
            timeout: self.timeout,
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let sets: Vec<&str> = if cores >= 2 {
            vec![ONE_CORE, TWO_CORES]
        } else {
            vec![ONE_CORE]
        };
        let what = format!(
            "FEC {}+{}, {LIDI_DATAGRAM} B datagrams, {:.0} MiB archive",
            setup.fec.0,
            setup.fec.1,
            image.archive_bytes as f64 / MIB
        );
        let tx_runs = self.rounds("gateway-tx alone", &sets, |cpus| {
            scaling::sender_alone(image, &setup, Some(cpus), UNPACED_BPS, false).map(|(r, _)| r)
        });
        self.scaling_rows(
            "gateway-tx alone → UDP sink that only counts, unpaced, one pass, from acceptance",
            &what,
            &tx_runs,
        );
        eprintln!(
            "scaling: recording one pass of frames at {} Mb/s...",
            a.scaling_record_mbps
        );
        let rx_runs = match scaling::record(image, &setup, a.scaling_record_mbps * 1_000_000) {
            Ok((r, recording)) => {
                self.notes.push(format!(
                    "scaling, recording: one pass of gateway-tx (paced at {} Mb/s, not pinned) recorded by the sink: {} datagrams, \
                     {:.0} MiB of frames, sink socket drops {}; kept in memory for every replay.",
                    a.scaling_record_mbps,
                    r.datagrams,
                    r.wire_bytes as f64 / MIB,
                    r.kernel_drops
                ));
                // Every sender run is the same one pass: the counts differ
                // only by headers and heartbeats, else something besides
                // the pass was counted.
                let counts: Vec<u64> = tx_runs
                    .iter()
                    .map(|t| t.datagrams)
                    .chain([r.datagrams])
                    .collect();
                if let (Some(lo), Some(hi)) = (counts.iter().min(), counts.iter().max()) {
                    self.notes.push(format!(
                        "scaling, one pass each: datagrams at the sink {} (taskset runs, then the recording), spread {:.2} %.",
                        counts
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        100.0 * (hi - lo) as f64 / (*lo).max(1) as f64
                    ));
                }
                let work = self.work.clone();
                self.rounds("gateway-rx alone", &sets, |cpus| {
                    scaling::receiver_alone(image, &setup, &recording, cpus, &work)
                })
            }
            Err(e) => {
                self.rows
                    .push(Row::failed("8", "gateway-rx alone (recording)", &e));
                Vec::new()
            }
        };
        self.scaling_rows(
            "gateway-rx alone ← frames recorded from gateway-tx, replayed as fast as it takes them, into an OCI layout, \
             from the first frame replayed",
            &what,
            &rx_runs,
        );
        let tx = self.projection("gateway-tx", &tx_runs);
        let rx = self.projection("gateway-rx", &rx_runs);
        if let (Some(t), Some(r)) = (tx, rx) {
            let pair = t.min(r);
            self.rows.push(Row::new(
                "8",
                "**projected** 16-core pair (each gateway on its own 16 cores): the slower side",
                format!("{:.2} GB/s (projection, not measured)", pair / 1e9),
                "≥ 1.1 GB/s",
                Some(pair >= 1.1e9),
            ));
        }
        self.notes.push(
            "scaling: each gateway alone as a release process, every thread pinned with `taskset -a -p -c LIST` once it is up \
             (before the image is dropped). On loopback the receiving socket's share of a datagram's path runs in the sending \
             thread, so both bench ends do what the real peer does: the sink has UDP GRO on, as gateway-rx, and takes \
             gateway-tx's GSO messages whole (not cut into datagrams on gateway-tx's thread); the replayer sends runs of \
             equal-length frames as UDP GSO messages, as gateway-tx, which gateway-rx's GRO socket takes whole. The sink is a \
             thread of the bench, not pinned (it only copies datagrams out of its socket; the path into that socket runs on \
             gateway-tx's cores). The replayer's thread is pinned to gateway-rx's CPU set while it replays, in every round: \
             the path into gateway-rx's socket that it carries is the receiver's own (on an appliance, on the receiver's \
             cores), and left apart it would have a core of its own in the one-core round and none in the two-core one. gateway-tx runs with `[carousel] retention_hours = 0`, so after its one owed \
             pass it does not cycle the image on the idle link. gateway-tx: acceptance to the last datagram of its one pass; \
             gateway-rx: first frame replayed to delivery done. MB/s of image blobs; CPU-s/GiB = utime+stime of the gateway \
             over that span ÷ GiB of blobs. The machine's cores busy: all the busy time /proc/stat counts over the span \
             (the gateway, the bench's sink or replayer, kernel threads), of all the machine's cores; on one core the sink has \
             the other core to itself, on two it takes its share of the gateway's. \
             Projected 16-core = (1 ÷ c₁) ÷ ((1 − p) + p ÷ 16) GiB/s, Amdahl's law with c₁ the CPU-s/GiB on one core and the \
             parallel fraction p = 2 (1 − 1 ÷ S₂) from the measured 2-core/1-core ratio S₂ (kept within 0..1): a projection from \
             two points, not a measurement."
                .to_string(),
        );
    }

    /// `run` on each CPU set in turn, `--scaling-rounds` times over; a
    /// failure is a row and ends the rounds.
    fn rounds(
        &mut self,
        side: &str,
        sets: &[&str],
        mut run: impl FnMut(&str) -> Result<scaling::SideRun>,
    ) -> Vec<scaling::SideRun> {
        let rounds = self.args.scaling_rounds;
        let mut runs = Vec::new();
        for round in 1..=rounds {
            for &cpus in sets {
                eprintln!("scaling: {side}, taskset -c {cpus}, round {round} of {rounds}...");
                // Both ends take fresh pages all the time (socket buffers,
                // and the receiver's page cache): from the kept memory, as
                // the other timed runs.
                self.touch_kept();
                match run(cpus) {
                    Ok(r) => runs.push(r),
                    Err(e) => {
                        self.rows
                            .push(Row::failed("8", &format!("{side}, taskset -c {cpus}"), &e));
                        return runs;
                    }
                }
            }
        }
        runs
    }

    fn scaling_rows(&mut self, side: &str, what: &str, runs: &[scaling::SideRun]) {
        let one = fastest(runs, ONE_CORE);
        for cpus in [ONE_CORE, TWO_CORES] {
            let Some(r) = fastest(runs, cpus) else {
                continue;
            };
            let two = cpus == TWO_CORES;
            let ratio = one
                .filter(|_| two)
                .map(|o| r.bytes_per_s() / o.bytes_per_s());
            let rounds: Vec<String> = runs
                .iter()
                .filter(|x| x.cpus == cpus)
                .map(|x| format!("{:.0}", x.bytes_per_s() / 1e6))
                .collect();
            self.rows.push(Row::new(
                "8",
                format!("{side}, taskset -c {cpus} ({what})"),
                format!(
                    "{} · {:.2} CPU-s/GiB · used {:.0} % of its CPU set (the machine's cores busy {:.0} %){} · fastest of {} rounds: {} MB/s",
                    mbs(r.bytes_per_s()),
                    r.cpu_s_per_gib(),
                    r.cpu_share() * 100.0,
                    r.machine_share() * 100.0,
                    match ratio {
                        Some(x) => format!(" · 2-core/1-core {x:.2}×"),
                        None => String::new(),
                    },
                    rounds.len(),
                    rounds.join(" / ")
                ),
                if two {
                    "2-core ≥ 1.7× 1-core"
                } else {
                    "report"
                },
                ratio.map(|x| x >= 1.7),
            ));
        }
        for r in runs {
            self.notes.push(format!(
                "{side}, taskset -c {}: {:.0} MiB of blobs in {:.2} s, {:.2} CPU-s (the host took {:.2} CPU-s of the machine's \
                 cores meanwhile: steal); {} datagrams in {} messages ({:.1} per \
                 message: GSO/GRO), {:.0} MiB on the wire; receiving socket drops {}{}; CPU seconds by thread: {}.",
                r.cpus,
                r.payload_bytes as f64 / MIB,
                r.seconds,
                r.cpu_s,
                r.steal_s,
                r.datagrams,
                r.messages,
                r.datagrams as f64 / r.messages.max(1) as f64,
                r.wire_bytes as f64 / MIB,
                r.kernel_drops,
                match r.rx_taken {
                    Some(t) => format!(
                        "; gateway-rx read {} frames ({} accepted), counted {} lost; the last frame replayed \
                         {:.2} s before delivery done",
                        t.frames, t.accepted, t.lost_estimate, t.drain_s
                    ),
                    None => String::new(),
                },
                threads(&r.threads)
            ));
        }
    }

    /// The projected 16-core figure of one gateway, as a row; bytes/s.
    fn projection(&mut self, name: &str, runs: &[scaling::SideRun]) -> Option<f64> {
        let one = fastest(runs, ONE_CORE)?;
        let two = fastest(runs, TWO_CORES)?;
        let s2 = two.bytes_per_s() / one.bytes_per_s();
        let c1 = one.cpu_s_per_gib();
        let (p, bps) = scaling::project(c1, s2, 16.0);
        self.rows.push(Row::new(
            "8",
            format!("**projected** 16-core {name}, from c₁ = {c1:.2} CPU-s/GiB and S₂ = {s2:.2}"),
            format!(
                "{:.2} GB/s (projection, not measured: p = {p:.2}, (1/c₁) ÷ ((1 − p) + p/16))",
                bps / 1e9
            ),
            "≥ 1.1 GB/s",
            Some(bps >= 1.1e9),
        ));
        Some(bps)
    }

    fn print(
        &self,
        facts: &[String],
        load_before: &str,
        load_after: &str,
        raised: &[String],
        took: Duration,
    ) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        println!();
        println!(
            "`cargo run --release -p weir-tests --bin bench --{}{}`",
            if args.is_empty() { "" } else { " " },
            args.join(" ")
        );
        println!();
        println!("| # | figure | measured | goal | |");
        println!("|---|---|---|---|---|");
        // In figure order (lidi and scaling run beside the goodput image).
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| r.number);
        for r in rows {
            println!(
                "| {} | {} | {} | {} | {} |",
                r.number, r.figure, r.measured, r.goal, r.met
            );
        }
        println!();
        for n in &self.notes {
            println!("- {n}");
        }
        println!();
        println!("Machine:");
        for f in facts {
            println!("- {f}");
        }
        println!("- load average (1, 5, 15 min) before: {load_before}; after: {load_after}");
        if !raised.is_empty() {
            println!(
                "- raised for the run and restored after: {}",
                raised.join(", ")
            );
        }
        println!("- whole run: {:.0} s", took.as_secs_f64());
    }
}
