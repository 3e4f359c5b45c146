//! A bounded random-fault campaign: rounds of images crossing the real pair
//! while the faults a site meets are thrown at it, each round drawn from a
//! seed so a failure can be replayed.
//!
//! A round gets its own site, registry and link. From its seed it draws the
//! images to drop (OCI, multi-arch OCI, docker-archive; when each is
//! dropped; whether it is dropped a second time), the link's loss and
//! Gilbert–Elliott bursts and blackouts, an armed crash point on either
//! gateway, and a schedule of faults: SIGKILL or SIGTERM of either gateway
//! at a moment, the registry killed for a while, and gateway-rx or the
//! registry killed the moment a push is seen in the registry's access log.
//! Then it waits, bounded, until every tag is served and checks what a user
//! cares about: each tag at the source's digest with every blob re-hashed,
//! each tag PUT once, every drop in `done/`, nothing pending on either side.
//!
//! Round 1 uses the campaign seed itself and later rounds seeds drawn from
//! it, and a round's plan depends on its seed only: `--seed S --rounds 1`
//! replays the round whose seed is S.

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::{self, Write as _};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weir_imagegen::{self as imagegen, DockerFlavor, GeneratedImage, LayerSpec};
use weir_test_support::registry::Registry;

use crate::diode::{Blackout, BurstLoss, Diode, DiodeConfig};
use crate::pair::{files_in, Gateway, Site, SiteOptions, Target};

/// The seed the suite's test runs when none is given.
pub const DEFAULT_SEED: u64 = 0x5745_4952_0005;

/// Crash points no round passes: there is no layout target, no object
/// changes its FEC layout midway, nobody types on a console, and delivered
/// images are kept for days. Arming them would only waste the round's arm.
const NOT_REACHED_BY_ROUNDS: &[&str] = &[
    "rx.layout.exported",
    "rx.shards.mismatch-discarded",
    "rx.retention.pruned",
    "tx.carousel.resend-armed",
];

/// Points passed once per shard batch: their N-th pass lands mid-transfer.
const PER_BATCH_POINTS: &[&str] = &["rx.shards.payload-written", "rx.shards.batch-claimed"];

/// How long a gateway gets to stop on SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// After the last tag appears: time a second PUT would need to show.
const SETTLE: Duration = Duration::from_secs(3);
/// How long the sides get to report what they already did (status.json is
/// rewritten every second; a re-drop is moved once the sender sees it).
const REPORT_LIMIT: Duration = Duration::from_secs(20);
const TICK: Duration = Duration::from_millis(100);

/// What a campaign runs.
#[derive(Debug, Clone)]
pub struct CampaignOptions {
    pub seed: u64,
    pub rounds: u32,
    /// A round not delivered within this long fails.
    pub round_limit: Duration,
    /// Print every fault as it is applied, not only for a failed round.
    pub verbose: bool,
}

impl CampaignOptions {
    pub fn new(seed: u64, rounds: u32) -> CampaignOptions {
        CampaignOptions {
            seed,
            rounds,
            round_limit: Duration::from_secs(150),
            verbose: false,
        }
    }
}

/// The seed of each round: the campaign seed first, then draws from it.
pub fn round_seeds(seed: u64, rounds: u32) -> Vec<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rounds)
        .map(|i| if i == 0 { seed } else { rng.gen() })
        .collect()
}

/// The archive format of a dropped image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Oci,
    MultiArch,
    Docker,
}

impl Format {
    fn short(self) -> &'static str {
        match self {
            Format::Oci => "oci",
            Format::MultiArch => "multi",
            Format::Docker => "docker",
        }
    }
}

/// One image of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePlan {
    pub format: Format,
    pub layer_sizes: Vec<u64>,
    /// After the round starts.
    pub drop_at: Duration,
    /// Dropped again under another name once the first drop is in `done/`.
    pub redrop: bool,
}

/// When a planned fault is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    At(Duration),
    /// The first request of that kind in the registry's access log.
    PushSeen(PushStep),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushStep {
    /// A blob request (the existence check or the upload).
    Blob,
    /// A manifest PUT (a child, by digest, or a tag).
    Manifest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Rx,
    Tx,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Rx => "rx",
            Side::Tx => "tx",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// SIGKILL, started again after `down`.
    Kill { side: Side, down: Duration },
    /// SIGTERM (a clean stop, its last commits), started again after `down`.
    Stop { side: Side, down: Duration },
    /// The registry killed, started again after `down`.
    RegistryDown { down: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannedFault {
    pub when: When,
    pub fault: Fault,
}

impl fmt::Display for PlannedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, down) = match self.fault {
            Fault::Kill { side, down } => (format!("kill-{}", side.name()), down),
            Fault::Stop { side, down } => (format!("term-{}", side.name()), down),
            Fault::RegistryDown { down } => ("registry-down".to_string(), down),
        };
        let when = match self.when {
            When::At(t) => format!("{:.1}s", t.as_secs_f64()),
            When::PushSeen(PushStep::Blob) => "blob-push".into(),
            When::PushSeen(PushStep::Manifest) => "manifest-put".into(),
        };
        write!(f, "{what}@{when}/{:.1}s", down.as_secs_f64())
    }
}

/// The link's faults for the whole round.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkPlan {
    pub loss: f64,
    pub burst: Option<BurstLoss>,
    pub blackouts: Vec<Blackout>,
}

/// Everything a round does, drawn from its seed alone.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPlan {
    pub seed: u64,
    pub rate_bps: u64,
    pub images: Vec<ImagePlan>,
    pub link: LinkPlan,
    /// `point@N`, armed at every start until the gateway aborts there.
    pub rx_crash: Option<String>,
    pub tx_crash: Option<String>,
    pub faults: Vec<PlannedFault>,
}

fn secs(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.gen_range(lo..hi))
}

fn draw_crash_point(rng: &mut ChaCha8Rng, points: &[&str]) -> String {
    let usable: Vec<&str> = points
        .iter()
        .copied()
        .filter(|p| !NOT_REACHED_BY_ROUNDS.contains(p))
        .collect();
    let point = usable[rng.gen_range(0..usable.len())];
    // Most points pass once per image or per start; a round has one to four.
    let pass = if PER_BATCH_POINTS.contains(&point) {
        rng.gen_range(1..=20)
    } else {
        rng.gen_range(1..=2)
    };
    format!("{point}@{pass}")
}

impl RoundPlan {
    pub fn draw(seed: u64) -> RoundPlan {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rate_bps = [16_000_000, 24_000_000, 40_000_000][rng.gen_range(0..3)];
        let images = (0..rng.gen_range(1..=4))
            .map(|_| ImagePlan {
                format: match rng.gen_range(0..10) {
                    0..=5 => Format::Oci,
                    6..=7 => Format::MultiArch,
                    _ => Format::Docker,
                },
                layer_sizes: (0..rng.gen_range(1..=3))
                    .map(|_| rng.gen_range(20_000..900_000))
                    .collect(),
                drop_at: secs(&mut rng, 0.0, 8.0),
                redrop: rng.gen_bool(0.2),
            })
            .collect();
        let mut blackouts: Vec<Blackout> = (0..rng.gen_range(0..=2))
            .map(|_| Blackout {
                start: secs(&mut rng, 0.0, 15.0),
                duration: secs(&mut rng, 0.5, 4.0),
            })
            .collect();
        blackouts.sort_by_key(|b| b.start);
        let link = LinkPlan {
            loss: rng.gen_range(0.0..0.03),
            burst: rng.gen_bool(0.6).then(|| BurstLoss {
                enter: rng.gen_range(0.0005..0.003),
                exit: rng.gen_range(0.05..0.3),
                loss: 1.0,
            }),
            blackouts,
        };
        let rx_crash = rng
            .gen_bool(0.5)
            .then(|| draw_crash_point(&mut rng, gateway_rx::CRASH_POINTS));
        let tx_crash = rng
            .gen_bool(0.4)
            .then(|| draw_crash_point(&mut rng, gateway_tx::CRASH_POINTS));
        let mut faults: Vec<PlannedFault> = (0..rng.gen_range(1..=4))
            .map(|_| {
                let side = if rng.gen_bool(0.5) {
                    Side::Rx
                } else {
                    Side::Tx
                };
                let fault = match rng.gen_range(0..10) {
                    0..=5 => Fault::Kill {
                        side,
                        down: secs(&mut rng, 0.2, 3.0),
                    },
                    6..=7 => Fault::Stop {
                        side,
                        down: secs(&mut rng, 0.2, 2.0),
                    },
                    _ => Fault::RegistryDown {
                        down: secs(&mut rng, 1.0, 6.0),
                    },
                };
                PlannedFault {
                    when: When::At(secs(&mut rng, 0.5, 14.0)),
                    fault,
                }
            })
            .collect();
        if rng.gen_bool(0.5) {
            let step = if rng.gen_bool(0.5) {
                PushStep::Blob
            } else {
                PushStep::Manifest
            };
            let fault = if rng.gen_bool(0.5) {
                Fault::RegistryDown {
                    down: secs(&mut rng, 1.0, 5.0),
                }
            } else {
                Fault::Kill {
                    side: Side::Rx,
                    down: secs(&mut rng, 0.2, 2.0),
                }
            };
            faults.push(PlannedFault {
                when: When::PushSeen(step),
                fault,
            });
        }
        RoundPlan {
            seed,
            rate_bps,
            images,
            link,
            rx_crash,
            tx_crash,
            faults,
        }
    }

    /// `3 (oci,multi,docker+again)`
    pub fn images_summary(&self) -> String {
        let kinds: Vec<String> = self
            .images
            .iter()
            .map(|i| {
                format!(
                    "{}{}",
                    i.format.short(),
                    if i.redrop { "+again" } else { "" }
                )
            })
            .collect();
        format!("{} ({})", self.images.len(), kinds.join(","))
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u32,
    pub seed: u64,
    pub images: String,
    /// What was applied, in order; crash points say whether they were reached.
    pub faults: Vec<String>,
    /// From the round's start until every tag was first served.
    pub deliver_s: Option<f64>,
    pub result: Result<(), String>,
    /// The applied faults with their times, and on failure the logs.
    pub events: Vec<String>,
    /// A failed round's site directory, kept for its logs.
    pub kept: Option<PathBuf>,
}

pub const TABLE_HEADER: &str =
    "| round | seed | images | faults applied | deliver s | result |\n|---|---|---|---|---|---|";

impl RoundReport {
    pub fn row(&self) -> String {
        let result = match &self.result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("FAIL: {}", e.lines().next().unwrap_or_default()),
        };
        format!(
            "| {} | {} | {} | {} | {} | {} |",
            self.round,
            self.seed,
            self.images,
            if self.faults.is_empty() {
                "-".to_string()
            } else {
                self.faults.join(", ")
            },
            self.deliver_s
                .map_or_else(|| "-".to_string(), |s| format!("{s:.1}")),
            result
        )
    }
}

/// The commands that replay one round.
pub fn replay_commands(seed: u64) -> String {
    format!(
        "cargo run --release -p weir-tests --bin campaign -- --rounds 1 --seed {seed}\n\
         WEIR_CAMPAIGN_SEED={seed} WEIR_CAMPAIGN_ROUNDS=1 cargo test -p weir-tests --test campaign -- --nocapture"
    )
}

/// Runs every round, printing the table as it goes (stderr); returns the
/// reports. The registry is needed: `None` when it is missing (the caller
/// skips or fails, by the tools rule).
pub fn run(options: &CampaignOptions) -> Result<Option<Vec<RoundReport>>> {
    eprintln!(
        "campaign: seed {} ({} rounds; round seeds follow from it)",
        options.seed, options.rounds
    );
    eprintln!("{TABLE_HEADER}");
    let mut reports = Vec::new();
    for (i, seed) in round_seeds(options.seed, options.rounds)
        .into_iter()
        .enumerate()
    {
        let Some(report) = run_round(i as u32 + 1, seed, options)? else {
            return Ok(None);
        };
        eprintln!("{}", report.row());
        if report.result.is_err() && !options.verbose {
            for e in &report.events {
                eprintln!("    {e}");
            }
        }
        if report.result.is_err() {
            if let Some(dir) = &report.kept {
                eprintln!("    logs kept in {}", dir.display());
            }
            eprintln!("    replay with:\n{}", indent(&replay_commands(seed), 6));
        }
        reports.push(report);
    }
    let failed: Vec<&RoundReport> = reports.iter().filter(|r| r.result.is_err()).collect();
    let times: Vec<f64> = reports.iter().filter_map(|r| r.deliver_s).collect();
    eprintln!(
        "campaign seed {}: {} of {} rounds ok, {} images, {} faults; delivery {:.1}–{:.1} s",
        options.seed,
        reports.len() - failed.len(),
        reports.len(),
        reports
            .iter()
            .map(|r| image_count(&r.images))
            .sum::<usize>(),
        reports.iter().map(|r| r.faults.len()).sum::<usize>(),
        times.iter().copied().fold(f64::INFINITY, f64::min),
        times.iter().copied().fold(0.0, f64::max),
    );
    for r in &failed {
        eprintln!("failed round {} (seed {}), replay with:", r.round, r.seed);
        eprintln!("{}", indent(&replay_commands(r.seed), 2));
    }
    Ok(Some(reports))
}

fn image_count(summary: &str) -> usize {
    summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn indent(text: &str, by: usize) -> String {
    text.lines()
        .map(|l| format!("{}{l}", " ".repeat(by)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A generated image and where it should end up.
struct Dropped {
    plan: ImagePlan,
    image: GeneratedImage,
    file: String,
    repo: String,
    tag: String,
    dropped: bool,
    redropped: bool,
}

impl Dropped {
    fn again_file(&self) -> String {
        format!("again-{}", self.file)
    }
}

/// A gateway of the round: running, or down until a moment.
struct Process {
    side: Side,
    gateway: Option<Gateway>,
    start_at: Option<Instant>,
    /// Armed at every start until it has aborted there.
    armed: Option<String>,
    reached: bool,
}

impl Process {
    fn start(&mut self, site: &Site) -> Result<()> {
        let env: Vec<(&str, &str)> = match &self.armed {
            Some(point) if !self.reached => vec![("WEIR_CRASH_AT", point.as_str())],
            _ => vec![],
        };
        let gateway = match self.side {
            Side::Rx => Gateway::start_with_env(
                "gateway-rx",
                &site.rx_config,
                &site.dir.path().join("rx.log"),
                &env,
            )?,
            Side::Tx => site.start_tx_with_env(&env)?,
        };
        self.gateway = Some(gateway);
        self.start_at = None;
        Ok(())
    }

    fn is_up(&self) -> bool {
        self.gateway.is_some()
    }

    fn log_tail(&self, site: &Site, lines: usize) -> String {
        let log = site.dir.path().join(format!("{}.log", self.side.name()));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Runs one round; `None` when the registry is missing.
pub fn run_round(round: u32, seed: u64, options: &CampaignOptions) -> Result<Option<RoundReport>> {
    let plan = RoundPlan::draw(seed);
    let Some(mut registry) = Registry::start().context("starting docker-registry")? else {
        return Ok(None);
    };
    let mut round_run = RoundRun {
        round,
        plan: plan.clone(),
        started: Instant::now(),
        events: Vec::new(),
        applied: Vec::new(),
        verbose: options.verbose,
    };
    let site = Site::new(Target::Registry(registry.url()), &round_run.site_options())?;
    let outcome = round_run.drive(&site, &mut registry, options.round_limit);
    let (deliver_s, result) = match outcome {
        Ok(s) => (Some(s), Ok(())),
        Err(Failure { deliver_s, error }) => (deliver_s, Err(format!("{error:#}"))),
    };
    let mut kept = None;
    if result.is_err() {
        // The registry's log goes with the site: its storage is removed on drop.
        let _ = std::fs::copy(registry.log_path(), site.dir.path().join("registry.log"));
        let Site { dir, .. } = site;
        kept = Some(dir.keep());
    }
    Ok(Some(RoundReport {
        round,
        seed,
        images: plan.images_summary(),
        faults: round_run.applied,
        deliver_s,
        result,
        events: round_run.events,
        kept,
    }))
}

struct Failure {
    deliver_s: Option<f64>,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure {
            deliver_s: None,
            error,
        }
    }
}

struct RoundRun {
    round: u32,
    plan: RoundPlan,
    started: Instant,
    events: Vec<String>,
    applied: Vec<String>,
    verbose: bool,
}

impl RoundRun {
    fn site_options(&self) -> SiteOptions {
        SiteOptions {
            rate_bps: self.plan.rate_bps,
            passes: 3,
            ..Default::default()
        }
    }

    fn event(&mut self, what: String) {
        let line = format!(
            "r{} +{:5.1}s {what}",
            self.round,
            self.started.elapsed().as_secs_f64()
        );
        if self.verbose {
            eprintln!("    {line}");
        }
        self.events.push(line);
    }

    fn generate(&self, site: &Site) -> Result<Vec<Dropped>> {
        let mut out = Vec::new();
        for (i, plan) in self.plan.images.iter().enumerate() {
            let n = i + 1;
            let repo = format!("campaign/img{n}");
            let tag = format!("r{}", self.round);
            let reference = format!("{repo}:{tag}");
            let file = format!("img{n}.tar");
            let layers: Vec<LayerSpec> = plan
                .layer_sizes
                .iter()
                .map(|&size| LayerSpec { size })
                .collect();
            // Distinct contents per image and round, the same on a replay.
            let content_seed = self.plan.seed.wrapping_mul(31).wrapping_add(n as u64);
            let dir = site.dir.path();
            let image = match plan.format {
                Format::Oci => imagegen::oci_archive(dir, &file, content_seed, &layers, &reference),
                Format::MultiArch => imagegen::multiarch_oci_archive(
                    dir,
                    &file,
                    content_seed,
                    &[("linux", "amd64"), ("linux", "arm64")],
                    &layers,
                    &reference,
                ),
                Format::Docker => imagegen::docker_archive(
                    dir,
                    &file,
                    content_seed,
                    &layers,
                    &reference,
                    DockerFlavor::Classic,
                ),
            }
            .with_context(|| format!("generating {reference}"))?;
            out.push(Dropped {
                plan: plan.clone(),
                image,
                file,
                repo,
                tag,
                dropped: false,
                redropped: false,
            });
        }
        Ok(out)
    }

    /// Drops, applies faults, restarts what is down, until every tag is
    /// served; then checks. Returns the seconds to deliver.
    fn drive(
        &mut self,
        site: &Site,
        registry: &mut Registry,
        limit: Duration,
    ) -> Result<f64, Failure> {
        let mut images = self.generate(site)?;
        let mut rx = Process {
            side: Side::Rx,
            gateway: None,
            start_at: None,
            armed: self.plan.rx_crash.clone(),
            reached: false,
        };
        let mut tx = Process {
            side: Side::Tx,
            gateway: None,
            start_at: None,
            armed: self.plan.tx_crash.clone(),
            reached: false,
        };
        for process in [&rx, &tx] {
            if let Some(point) = &process.armed {
                let line = format!("gateway-{} armed at {point}", process.side.name());
                self.event(line);
            }
        }
        rx.start(site)?;
        let link = &self.plan.link;
        let mut link_config =
            DiodeConfig::new("127.0.0.1:0".parse().context("address")?, site.rx_addr);
        link_config.seed = self.plan.seed;
        link_config.loss = link.loss;
        link_config.burst = link.burst;
        link_config.blackouts = link.blackouts.clone();
        let diode = Diode::spawn(link_config).context("starting the link")?;
        site.write_tx_config(diode.local_addr(), &self.site_options())?;
        tx.start(site)?;
        self.started = Instant::now();
        for b in &self.plan.link.blackouts.clone() {
            self.applied.push(format!(
                "blackout@{:.1}s/{:.1}s",
                b.start.as_secs_f64(),
                b.duration.as_secs_f64()
            ));
        }
        if let Some(b) = self.plan.link.burst {
            self.applied.push(format!(
                "loss {:.1}%+bursts(1/{:.0})",
                self.plan.link.loss * 100.0,
                1.0 / b.exit
            ));
        } else {
            self.applied
                .push(format!("loss {:.1}%", self.plan.link.loss * 100.0));
        }

        let mut pending: Vec<Option<PlannedFault>> =
            self.plan.faults.iter().copied().map(Some).collect();
        let mut registry_up_at: Option<Instant> = None;
        let mut registry_was_down = false;
        let deadline = self.started + limit;
        let mut last_tag_check = Instant::now() - Duration::from_secs(1);
        let mut first_served: Option<f64> = None;
        let deliver_s = loop {
            let now = Instant::now();
            let t = now - self.started;
            if now > deadline {
                let missing: Vec<String> = images
                    .iter()
                    .filter(|i| !matches!(registry.manifest_digest(&i.repo, &i.tag), Ok(Some(_))))
                    .map(|i| format!("{}:{}", i.repo, i.tag))
                    .collect();
                return Err(self.fail(
                    site,
                    &rx,
                    &tx,
                    None,
                    anyhow::anyhow!("not delivered within {limit:?}: missing {missing:?}"),
                ));
            }
            for image in images.iter_mut() {
                if !image.dropped && t >= image.plan.drop_at {
                    site.drop_image(&image.image.path, &image.file)?;
                    image.dropped = true;
                    self.event(format!(
                        "dropped {} ({})",
                        image.file, image.image.reference
                    ));
                }
                let first_done = site.spool.join("done").join(&image.file).exists();
                if image.plan.redrop && !image.redropped && first_done {
                    site.drop_image(&image.image.path, &image.again_file())?;
                    image.redropped = true;
                    self.event(format!("dropped {} again", image.file));
                }
            }
            for process in [&mut rx, &mut tx] {
                self.watch(site, process)?;
            }
            if registry_up_at.is_some_and(|at| now >= at) {
                registry
                    .restart()
                    .map_err(|e| self.fail(site, &rx, &tx, None, e))?;
                registry_up_at = None;
                self.event("registry started again".into());
            }
            for slot in pending.iter_mut() {
                let Some(planned) = *slot else { continue };
                let due = match planned.when {
                    When::At(at) => t >= at,
                    When::PushSeen(step) => registry_up_at.is_none() && push_seen(registry, step),
                };
                if !due {
                    continue;
                }
                *slot = None;
                match planned.fault {
                    Fault::Kill { side, down } => {
                        let process = if side == Side::Rx { &mut rx } else { &mut tx };
                        let Some(mut gateway) = process.gateway.take() else {
                            self.event(format!("{planned}: skipped, already down"));
                            continue;
                        };
                        gateway.kill9();
                        process.start_at = Some(now + down);
                    }
                    Fault::Stop { side, down } => {
                        let process = if side == Side::Rx { &mut rx } else { &mut tx };
                        let Some(mut gateway) = process.gateway.take() else {
                            self.event(format!("{planned}: skipped, already down"));
                            continue;
                        };
                        let armed = process.armed.clone().filter(|_| !process.reached);
                        // An armed last commit aborts the stop itself.
                        let stopped = match gateway.terminate(STOP_LIMIT) {
                            Ok(s) if armed.is_some() && s.signal() == Some(libc::SIGABRT) => {
                                process.reached = true;
                                Ok(armed)
                            }
                            Ok(s) if s.success() => Ok(None),
                            Ok(s) => Err(anyhow::anyhow!(
                                "gateway-{} ended with {s} on SIGTERM",
                                side.name()
                            )),
                            Err(e) => Err(e),
                        };
                        process.start_at = Some(Instant::now() + down);
                        match stopped {
                            Ok(Some(point)) => self.note_reached(side, point),
                            Ok(None) => {}
                            Err(e) => return Err(self.fail(site, &rx, &tx, None, e)),
                        }
                    }
                    Fault::RegistryDown { down } => {
                        if registry_up_at.is_some() {
                            self.event(format!("{planned}: skipped, already down"));
                            continue;
                        }
                        registry
                            .stop()
                            .map_err(|e| self.fail(site, &rx, &tx, None, e))?;
                        registry_up_at = Some(now + down);
                        registry_was_down = true;
                    }
                }
                self.event(format!("applied {planned}"));
                self.applied.push(planned.to_string());
            }

            let settled = images
                .iter()
                .all(|i| i.dropped && (!i.plan.redrop || i.redropped))
                && rx.is_up()
                && tx.is_up()
                && registry_up_at.is_none()
                && pending
                    .iter()
                    .flatten()
                    .all(|f| matches!(f.when, When::PushSeen(_)));
            let all_dropped = images.iter().all(|i| i.dropped);
            if all_dropped
                && registry_up_at.is_none()
                && now - last_tag_check >= Duration::from_millis(500)
            {
                last_tag_check = now;
                let all_served = images
                    .iter()
                    .all(|i| matches!(registry.manifest_digest(&i.repo, &i.tag), Ok(Some(_))));
                // The table reports the first moment; the round goes on
                // until every planned fault has been applied too.
                if all_served && first_served.is_none() {
                    first_served = Some(t.as_secs_f64());
                    self.event("every tag served".into());
                }
                if let (true, Some(at)) = (settled && all_served, first_served) {
                    break at;
                }
            }
            std::thread::sleep(TICK);
        };
        self.event("every fault applied; checking".into());
        std::thread::sleep(SETTLE);
        let checked = self
            .check(site, registry, &images, registry_was_down)
            .and_then(|()| {
                self.stop_both(site, registry, &images, registry_was_down, &mut rx, &mut tx)
            });
        for slot in pending.iter().flatten() {
            self.applied.push(format!("{slot} (never seen)"));
        }
        for process in [&rx, &tx] {
            if let (Some(point), false) = (&process.armed, process.reached) {
                self.applied.push(format!("crash {point} (not reached)"));
            }
        }
        drop(diode);
        checked.map_err(|e| self.fail(site, &rx, &tx, Some(deliver_s), e))?;
        Ok(deliver_s)
    }

    /// Stops both gateways. One armed at a point of its stop aborts there;
    /// then both start once more and must owe nothing and push nothing again.
    fn stop_both(
        &mut self,
        site: &Site,
        registry: &Registry,
        images: &[Dropped],
        registry_was_down: bool,
        rx: &mut Process,
        tx: &mut Process,
    ) -> Result<()> {
        let mut restarted = false;
        for process in [&mut *tx, &mut *rx] {
            let Some(mut gateway) = process.gateway.take() else {
                continue;
            };
            let status = gateway.terminate(STOP_LIMIT)?;
            if process.armed.is_some() && !process.reached && status.signal() == Some(libc::SIGABRT)
            {
                process.reached = true;
                self.note_reached(process.side, process.armed.clone().unwrap_or_default());
                restarted = true;
            } else if !status.success() {
                bail!(
                    "gateway-{} ended with {status} on SIGTERM",
                    process.side.name()
                );
            }
        }
        if restarted {
            // Both run again: the receiver writes the report the check reads.
            let _ = std::fs::remove_file(site.rx_state.join("status.json"));
            for process in [&mut *rx, &mut *tx] {
                process.start(site)?;
                self.event(format!("gateway-{} started again", process.side.name()));
            }
            std::thread::sleep(SETTLE);
            self.check(site, registry, images, registry_was_down)?;
            for process in [rx, tx] {
                if let Some(mut gateway) = process.gateway.take() {
                    let status = gateway.terminate(STOP_LIMIT)?;
                    if !status.success() {
                        bail!(
                            "gateway-{} ended with {status} on SIGTERM",
                            process.side.name()
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Notices a gateway that ended by itself (its armed point, or a crash
    /// nobody asked for) and starts one that is due.
    fn watch(&mut self, site: &Site, process: &mut Process) -> Result<(), Failure> {
        if let Some(gateway) = process.gateway.as_mut() {
            if let Some(status) = gateway.exit_status() {
                process.gateway = None;
                let armed_here = process.armed.is_some()
                    && !process.reached
                    && status.signal() == Some(libc::SIGABRT);
                if !armed_here {
                    let tail = process.log_tail(site, 30);
                    return Err(anyhow::anyhow!(
                        "gateway-{} exited by itself with {status}:\n{tail}",
                        process.side.name()
                    )
                    .into());
                }
                process.reached = true;
                self.note_reached(process.side, process.armed.clone().unwrap_or_default());
                process.start_at = Some(Instant::now() + Duration::from_millis(300));
            }
        }
        if process.start_at.is_some_and(|at| Instant::now() >= at) {
            process.start(site)?;
            self.event(format!("gateway-{} started again", process.side.name()));
        }
        Ok(())
    }

    fn note_reached(&mut self, side: Side, point: String) {
        self.event(format!("gateway-{} aborted at {point}", side.name()));
        self.applied.push(format!("crash {point}"));
    }

    fn check(
        &mut self,
        site: &Site,
        registry: &Registry,
        images: &[Dropped],
        registry_was_down: bool,
    ) -> Result<()> {
        for i in images {
            let served = registry
                .manifest_digest(&i.repo, &i.tag)?
                .with_context(|| format!("{}:{} no longer served", i.repo, i.tag))?;
            let got = registry
                .verify_image(&i.repo, &i.tag)
                .with_context(|| format!("{}:{} does not re-hash", i.repo, i.tag))?;
            match (&i.plan.format, &i.image.manifest_digest) {
                (Format::Docker, _) | (_, None) => {
                    // The sender compresses a docker-archive's layers: only
                    // the config keeps the source's digest.
                    if got.config_digests != vec![i.image.config_digest.clone()] {
                        bail!(
                            "{}:{} config {:?}, the source's is {}",
                            i.repo,
                            i.tag,
                            got.config_digests,
                            i.image.config_digest
                        );
                    }
                }
                (_, Some(source)) => {
                    if &served != source || &got.manifest_digest != source {
                        bail!(
                            "{}:{} served at {served}, the source's is {source}",
                            i.repo,
                            i.tag
                        );
                    }
                    let mut want = i.image.blob_digests.clone();
                    want.sort();
                    let mut have = got.blob_digests.clone();
                    have.sort();
                    if want != have {
                        bail!("{}:{} blobs {have:?}, the source's {want:?}", i.repo, i.tag);
                    }
                    if got.children != i.image.children {
                        bail!(
                            "{}:{} children {:?}, the source's {:?}",
                            i.repo,
                            i.tag,
                            got.children,
                            i.image.children
                        );
                    }
                }
            }
            let puts = registry.manifest_puts(&i.repo, &i.tag)?;
            // A PUT the registry applied but was killed before answering
            // leaves no 201 in its log; the retry then finds the tag set.
            let puts_ok = puts == 1 || (puts == 0 && registry_was_down);
            if !puts_ok {
                bail!("{}:{} was PUT {puts} times", i.repo, i.tag);
            }
        }
        let spool_settled = crate::pair::wait_until(REPORT_LIMIT, || {
            let waiting = site.waiting_drops();
            let done = files_in(&site.spool.join("done"));
            waiting.is_empty()
                && images.iter().all(|i| {
                    done.contains(&i.file) && (!i.plan.redrop || done.contains(&i.again_file()))
                })
        });
        let rejected = files_in(&site.spool.join("rejected"));
        if !spool_settled || !rejected.is_empty() {
            bail!(
                "spool not settled: waiting {:?}, done {:?}, rejected {rejected:?}",
                site.waiting_drops(),
                files_in(&site.spool.join("done"))
            );
        }
        for i in images.iter().filter(|i| i.plan.redrop) {
            let reason = std::fs::read_to_string(
                site.spool
                    .join("done")
                    .join(format!("{}.reason.json", i.again_file())),
            )
            .unwrap_or_default();
            if !reason.contains("already-sent") {
                bail!("{} again: not refused as already sent ({reason})", i.file);
            }
        }
        let mut last = None;
        let rx_idle = crate::pair::wait_until(REPORT_LIMIT, || {
            last = site.rx_status();
            last.as_ref().is_some_and(|s| {
                let deliveries = s["deliveries"].as_array().cloned().unwrap_or_default();
                s["pushes_pending"] == 0
                    && deliveries.len() == images.len()
                    && deliveries.iter().all(|d| d["state"] == "done")
            })
        });
        if !rx_idle {
            bail!(
                "gateway-rx still owes deliveries: {}",
                last.map(|s| format!(
                    "pending {} deliveries {}",
                    s["pushes_pending"], s["deliveries"]
                ))
                .unwrap_or_else(|| "no status".into())
            );
        }
        Ok(())
    }

    fn fail(
        &mut self,
        site: &Site,
        rx: &Process,
        tx: &Process,
        deliver_s: Option<f64>,
        error: anyhow::Error,
    ) -> Failure {
        let mut logs = String::new();
        for process in [rx, tx] {
            let _ = write!(
                logs,
                "--- gateway-{} ({})\n{}\n",
                process.side.name(),
                if process.is_up() { "up" } else { "down" },
                process.log_tail(site, 25)
            );
        }
        self.events.push(logs);
        Failure { deliver_s, error }
    }
}

/// Whether the registry's log shows a request of that push step yet.
fn push_seen(registry: &Registry, step: PushStep) -> bool {
    registry.access_log().is_ok_and(|log| {
        log.iter().any(|e| match step {
            PushStep::Blob => e.path.contains("/blobs/"),
            PushStep::Manifest => e.method == "PUT" && e.path.contains("/manifests/"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_drawn_from_its_seed_alone() {
        assert_eq!(RoundPlan::draw(42), RoundPlan::draw(42));
        assert_ne!(RoundPlan::draw(42), RoundPlan::draw(43));
        let seeds = round_seeds(42, 5);
        assert_eq!(seeds[0], 42, "round 1 replays with the campaign seed");
        assert_eq!(seeds, round_seeds(42, 5));
        assert_eq!(round_seeds(42, 2), seeds[..2]);
    }

    #[test]
    fn rounds_arm_only_points_they_pass() {
        for seed in 0..200 {
            let plan = RoundPlan::draw(seed);
            for armed in plan.rx_crash.iter().chain(&plan.tx_crash) {
                let point = armed.split('@').next().unwrap_or_default();
                assert!(!NOT_REACHED_BY_ROUNDS.contains(&point), "{armed}");
                assert!(
                    gateway_rx::CRASH_POINTS.contains(&point)
                        || gateway_tx::CRASH_POINTS.contains(&point),
                    "{armed}"
                );
            }
            assert!(!plan.images.is_empty() && !plan.faults.is_empty());
        }
    }
}
