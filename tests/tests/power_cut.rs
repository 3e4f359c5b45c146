//! Power cut, for real: the rx appliance image (built by image-build with a
//! test configuration, key and DHCP on qemu's user-mode network) boots
//! under qemu (TCG) and receives an image from a real gateway-tx on the
//! host, through a UDP port qemu forwards into the guest. The test kills
//! qemu with SIGKILL at seeded-random moments — while frames arrive and
//! batches commit, as soon as the image is complete and its delivery
//! starts, during boot, right after the gateway starts — and boots it
//! again each time. A SIGKILL of qemu is a power cut for the guest: what
//! its kernel had not written to the disk (page cache, queued requests)
//! is gone.
//!
//! Nothing may be lost: an object the gateway logged as verified never
//! arrives again; an object in staging resumes with no fewer shards than
//! at any earlier boot, and the image with no fewer blobs done; no staging
//! file is found short and no object fails its sha256 after a cut; and
//! once the image is complete the sender is stopped, so the image must
//! reach the OCI layout from what is on disk alone. At the end the VM is powered off cleanly and the test reads the
//! data partition's OCI layout from the disk image, without mounting it:
//! `index.json` names the image once with the source's manifest digest and
//! every blob hashes to its name.
//!
//! 7 to 9 minutes here (image build 2 to 3 minutes, seven boots of 45 s
//! to a minute); bounded in every wait. Ignored in `cargo test` for its length; run it with
//! `cargo test -p weir-tests --test power_cut -- --ignored --nocapture`
//! (`WEIR_POWER_CUT_SEED=N` replays a seed's moments; the boots' logs and
//! the disk image are kept when it fails, or with `WEIR_POWER_CUT_KEEP=1`;
//! `WEIR_APPLIANCE_CACHE=DIR` reuses an image built before from the same
//! gateway binary). Needs what the boot
//! test needs; skipped with a message when that is missing, except under
//! CI=true.

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use weir_tests::appliance_vm::{
    build_binaries, build_rx_image, ext4_copy_out, extract_partition, gateway_version,
    requirements_met, tail, Console, Provision, Vm, VmOptions, POWEROFF_TIMEOUT,
};
use weir_tests::imagegen::{self, LayerSpec};
use weir_tests::pair::{free_udp_addr, gateway_bin, Site, SiteOptions, Target, TEST_SECRET};

/// gateway-rx's UDP port in the guest.
const GUEST_PORT: u16 = 7700;
/// Power cuts before the last, clean boot.
const CUTS: usize = 6;
/// From qemu's start to gateway-rx's start line (about 30 s here).
const START_TIMEOUT: Duration = Duration::from_secs(4 * 60);
/// Longest wait in one boot for frames to arrive, or for the image to
/// complete or be delivered.
const PHASE_TIMEOUT: Duration = Duration::from_secs(4 * 60);
/// For one answer on the console.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the console is asked for `status` while frames are awaited.
const STATUS_EVERY: Duration = Duration::from_millis(1500);
/// The whole test, build included: past it, it fails.
const TEST_LIMIT: Duration = Duration::from_secs(25 * 60);
/// Sender pacing: the guest's gateway is a debug build under TCG. At this
/// rate one pass of the image takes about 30 s, so each boot's receiving
/// cut catches part of it.
const RATE_BPS: u64 = 500_000;

/// qemu's user-mode network hands out 10.0.2.15 by DHCP; its port
/// forwarding goes there.
const NETWORK: &str = "[Match]\nType=ether\n\n[Network]\nDHCP=ipv4\n";

/// Where, in the data partition, the configuration's paths lead:
/// /var/lib/weir is /data/weir/state.
const LAYOUT_IN_PARTITION: &str = "/weir/state/out";

/// When a boot's power is cut.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// This long after qemu started: firmware, kernel, fsck, systemd.
    Booting(Duration),
    /// This long after the console says frames are arriving, before the
    /// image is complete: shard batches are being committed.
    Receiving(Duration),
    /// This long after the log says the image is complete (the ledger's
    /// commit): its delivery into the layout is under way.
    Delivering(Duration),
    /// This long after the gateway logged its start: recovery, resumed
    /// delivery, or whatever that boot is doing.
    Running(Duration),
}

impl Moment {
    fn describe(&self) -> String {
        let (what, d) = match self {
            Moment::Booting(d) => ("boot +", d),
            Moment::Receiving(d) => ("frames +", d),
            Moment::Delivering(d) => ("complete +", d),
            Moment::Running(d) => ("started +", d),
        };
        format!("{what}{:.1}s", d.as_secs_f64())
    }
}

/// The cuts, in order: two or three while receiving, then one as delivery
/// starts, the others (during boot, after the start) anywhere among them.
fn plan(rng: &mut ChaCha8Rng) -> Vec<Moment> {
    let ms = Duration::from_millis;
    let receiving = rng.gen_range(2..=3);
    let mut plan: Vec<Moment> = (0..receiving)
        .map(|_| Moment::Receiving(ms(rng.gen_range(1000..6000))))
        .collect();
    plan.push(Moment::Delivering(ms(rng.gen_range(0..40))));
    while plan.len() < CUTS {
        let m = if rng.gen_bool(0.5) {
            Moment::Booting(ms(rng.gen_range(3000..25_000)))
        } else {
            Moment::Running(ms(rng.gen_range(0..8000)))
        };
        let at = rng.gen_range(0..=plan.len());
        plan.insert(at, m);
    }
    plan
}

/// What one boot's ttyS0 shows of gateway-rx.
#[derive(Debug, Default, Clone)]
struct Seen {
    started: bool,
    arriving: Vec<String>,
    verified: Vec<String>,
    /// Objects resumed from staging, with the shards each held then.
    resumed: Vec<(String, u64)>,
    complete: bool,
    delivered: bool,
    /// Warnings and errors that mean something on disk was not as
    /// committed.
    losses: Vec<String>,
    crashes: Vec<String>,
}

/// What a log line says after `name=`, up to the next space.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let at = line.find(&key)? + key.len();
    line[at..].split(char::is_whitespace).next()
}

/// Lines that would mean a committed state did not survive.
const LOSS_MARKERS: &[&str] = &[
    "staging files missing or short",
    "object failed its sha256",
    "could not enter the blob store",
    "verified object not usable",
];

/// Lines that mean the gateway died by itself (the kernel reports a trap
/// or segfault; Rust a panic): the test stops there, with the log.
const CRASH_MARKERS: &[&str] = &["traps: ", " segfault at ", "panicked at"];

impl Seen {
    fn add_line(&mut self, line: &str) {
        if line.contains("gateway-rx started") {
            self.started = true;
        } else if line.contains("new object arriving") {
            self.arriving
                .extend(field(line, "object").map(str::to_string));
        } else if line.contains(": object verified ") {
            // The finisher's line, naming the object (the ledger's "image
            // object verified" names the manifest).
            self.verified
                .extend(field(line, "digest").map(str::to_string));
        } else if line.contains("resuming object from staging") {
            if let Some(id) = field(line, "object") {
                let shards = field(line, "shards").and_then(|c| c.parse::<u64>().ok());
                self.resumed.push((id.to_string(), shards.unwrap_or(0)));
            }
        } else if line.contains("image complete; queued for delivery") {
            self.complete = true;
        } else if line.contains("image delivered") {
            self.delivered = true;
        }
        if LOSS_MARKERS.iter().any(|m| line.contains(m)) {
            self.losses.push(line.trim().to_string());
        }
        if CRASH_MARKERS.iter().any(|m| line.contains(m)) {
            self.crashes.push(line.trim().to_string());
        }
    }
}

/// ttyS0's log file, read as it grows, one whole line at a time.
struct SerialWatch {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    seen: Seen,
}

impl SerialWatch {
    fn new(path: &Path) -> SerialWatch {
        SerialWatch {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            seen: Seen::default(),
        }
    }

    /// Reads what was added since the last call.
    fn update(&mut self) -> Result<&Seen> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(&self.seen),
            Err(e) => return Err(e).context("opening the serial log"),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut added = Vec::new();
        file.read_to_end(&mut added)?;
        self.offset += added.len() as u64;
        self.partial.extend_from_slice(&added);
        while let Some(nl) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            self.seen.add_line(&String::from_utf8_lossy(&line));
        }
        Ok(&self.seen)
    }

    /// Everything, the unfinished last line included (the power is off).
    fn finish(mut self) -> Result<Seen> {
        self.update()?;
        let rest = std::mem::take(&mut self.partial);
        self.seen.add_line(&String::from_utf8_lossy(&rest));
        Ok(self.seen)
    }
}

/// The image line of a `status` answer ("power/cut:1 receiving: 2/4 blobs,
/// 61.0%, …"), or what it says instead.
fn image_line(status: &str) -> String {
    status
        .lines()
        .find(|l| l.contains(" blobs, "))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| "no image object yet".into())
}

/// Blobs done of the image, from a `status` answer's image line.
fn blobs_done(status: &str) -> Option<u64> {
    let line = image_line(status);
    let (_, rest) = line.split_once(": ")?;
    rest.split('/').next()?.parse().ok()
}

fn frames_arriving(status: &str) -> bool {
    status.contains("link: up (frames arriving)")
}

/// "45 frames/s" from a `status` answer's link line.
fn frame_rate(status: &str) -> Option<&str> {
    status
        .lines()
        .find_map(|l| l.trim().strip_prefix("link: up (frames arriving), "))
}

/// One row of the table.
struct Cut {
    moment: Moment,
    at_in_boot: Duration,
    happening: String,
    recovered: String,
}

/// The console, once the gateway's banner has been read.
struct Prompt {
    console: Console,
    ready: bool,
}

impl Prompt {
    /// Reads the banner's prompt if it has come; true once it has.
    fn poll_ready(&mut self) -> Result<bool> {
        if !self.ready {
            self.ready = self
                .console
                .try_read_until("weir-rx> ", Instant::now() + Duration::from_millis(50))?
                .is_some();
        }
        Ok(self.ready)
    }

    fn ask(&mut self, command: &str) -> Result<String> {
        self.console.type_line(command)?;
        self.console
            .read_until("weir-rx> ", Instant::now() + ANSWER_TIMEOUT)
    }
}

/// What a boot ended with.
struct BootEnd {
    seen: Seen,
    /// The first `status` after the gateway's start: what it recovered.
    first_status: Option<String>,
    happening: String,
    at_in_boot: Duration,
}

/// Boots the image and cuts its power at `moment` (None: runs until the
/// image is delivered, then powers off with the button).
fn boot(
    image: &Path,
    dir: &Path,
    name: &str,
    port: u16,
    moment: Option<Moment>,
) -> Result<BootEnd> {
    let mut vm = Vm::start(
        image,
        dir,
        name,
        &VmOptions {
            snapshot: false,
            udp_forward: Some((port, GUEST_PORT)),
        },
    )?;
    let mut prompt = Prompt {
        console: Console::connect(&vm.console_socket, Instant::now() + Duration::from_secs(30))
            .map_err(|e| vm.with_log(e))?,
        ready: false,
    };
    let mut serial = SerialWatch::new(&vm.serial0);
    let mut first_status: Option<String> = None;
    let mut last_status: Option<String> = None;
    let mut asked = Instant::now();
    let mut started_at: Option<Instant> = None;
    let mut frames_at: Option<Instant> = None;
    let mut complete_at: Option<Instant> = None;
    loop {
        if let Some(status) = vm.exited()? {
            return Err(vm.with_log(anyhow::anyhow!("qemu exited by itself ({status})")));
        }
        let seen = serial.update()?;
        if let Some(crash) = seen.crashes.first() {
            return Err(vm.with_log(anyhow::anyhow!("{name}: gateway-rx crashed: {crash}")));
        }
        let now = Instant::now();
        if seen.started && started_at.is_none() {
            started_at = Some(now);
        }
        if seen.complete && complete_at.is_none() {
            complete_at = Some(now);
        }
        if seen.arriving.len() + seen.verified.len() > 0 && frames_at.is_none() {
            frames_at = Some(now);
        }

        let cut_at = match moment {
            Some(Moment::Booting(d)) => Some(vm.started + d),
            Some(Moment::Running(d)) => started_at.map(|t| t + d),
            Some(Moment::Receiving(d)) => frames_at.map(|t| t + d),
            Some(Moment::Delivering(d)) => complete_at.map(|t| t + d),
            None => None,
        };
        // An image completing before the planned cut is cut at once: its
        // delivery is the moment most worth cutting.
        let cut_at = match (moment, complete_at) {
            (Some(Moment::Delivering(_)) | None, _) | (_, None) => cut_at,
            (_, Some(c)) => Some(cut_at.map_or(c, |t| t.min(c))),
        };
        if cut_at.is_some_and(|t| Instant::now() >= t) {
            let at_in_boot = vm.started.elapsed();
            vm.power_cut()?;
            let seen = serial.finish()?;
            let happening = happening(&seen, last_status.as_deref());
            return Ok(BootEnd {
                seen,
                first_status,
                happening,
                at_in_boot,
            });
        }
        // Nothing that can wait stands between the image's completion and
        // its cut.
        if matches!(moment, Some(Moment::Delivering(_))) && first_status.is_some() {
            std::thread::sleep(Duration::from_millis(5));
            if started_at.is_some_and(|t| t.elapsed() > PHASE_TIMEOUT) {
                return Err(vm.with_log(anyhow::anyhow!(
                    "{name}: the image did not complete within {PHASE_TIMEOUT:?} of the gateway's start"
                )));
            }
            continue;
        }

        let ready = prompt.poll_ready()?;
        if ready && first_status.is_none() {
            let answer = prompt.ask("status").map_err(|e| vm.with_log(e))?;
            first_status = Some(answer.clone());
            last_status = Some(answer);
            asked = Instant::now();
        }
        // `status` says whether frames arrive (the log shows only new and
        // finished objects) and how far the image is; asked while the cut
        // is not imminent.
        let want_status = moment.is_some()
            && ready
            && asked.elapsed() >= STATUS_EVERY
            && cut_at.is_none_or(|t| t.saturating_duration_since(Instant::now()) > STATUS_EVERY);
        if want_status {
            let answer = prompt.ask("status").map_err(|e| vm.with_log(e))?;
            if frames_arriving(&answer) && frames_at.is_none() {
                frames_at = Some(Instant::now());
            }
            last_status = Some(answer);
            asked = Instant::now();
        }

        if moment.is_none() && ready && asked.elapsed() >= STATUS_EVERY {
            // The last boot: until the layout's delivery is done, then off.
            let images = prompt.ask("images").map_err(|e| vm.with_log(e))?;
            asked = Instant::now();
            if images.contains("delivery oci-layout done") {
                let at_in_boot = vm.started.elapsed();
                vm.power_off(POWEROFF_TIMEOUT)?;
                let seen = serial.finish()?;
                if !vm.serial_text().contains("gateway-rx stopped") {
                    bail!(
                        "gateway-rx did not stop cleanly:\n{}",
                        tail(&vm.serial0, 40)
                    );
                }
                return Ok(BootEnd {
                    seen,
                    first_status,
                    happening: images.trim().to_string(),
                    at_in_boot,
                });
            }
        }

        if started_at.is_none() && vm.started.elapsed() > START_TIMEOUT {
            return Err(vm.with_log(anyhow::anyhow!(
                "{name}: gateway-rx not started within {START_TIMEOUT:?}"
            )));
        }
        if started_at.is_some_and(|t| t.elapsed() > PHASE_TIMEOUT) {
            let what = match moment {
                Some(Moment::Receiving(_)) => "no frames arrived",
                None => "the image was not delivered",
                _ => "the moment did not come",
            };
            return Err(vm.with_log(anyhow::anyhow!(
                "{name}: {what} within {PHASE_TIMEOUT:?} of the gateway's start; last status: {}",
                last_status.as_deref().unwrap_or("-")
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the gateway was doing when the power went, from its log and the
/// last `status`.
fn happening(seen: &Seen, status: Option<&str>) -> String {
    if !seen.started {
        return "booting (gateway not started yet)".into();
    }
    if seen.complete && !seen.delivered {
        return "delivering (image complete, not yet delivered)".into();
    }
    if seen.delivered {
        return "delivered, idle".into();
    }
    let progress = status.map(image_line).unwrap_or_default();
    let objects = format!(
        "{} new objects, {} verified this boot; {progress}",
        seen.arriving.len(),
        seen.verified.len()
    );
    if let Some(rate) = status.and_then(frame_rate) {
        format!("receiving at {rate}: {objects}")
    } else if !seen.arriving.is_empty() || !seen.verified.is_empty() {
        format!("receiving: {objects}")
    } else {
        format!("running, no frames: {objects}")
    }
}

fn recovered(seen: &Seen, first_status: Option<&str>) -> String {
    if !seen.started {
        return "(cut again before the gateway started)".into();
    }
    format!(
        "{} objects resumed ({} shards); {}",
        seen.resumed.len(),
        seen.resumed.iter().map(|(_, n)| n).sum::<u64>(),
        first_status
            .map(image_line)
            .unwrap_or_else(|| "no status".into())
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The layout holds the image once with `manifest_digest`, every blob
/// hashes to its name, and the blobs the source had are all there.
fn check_layout(layout: &Path, manifest_digest: &str, source_blobs: &[String]) -> Result<()> {
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("index.json")).context("the layout has no index.json")?,
    )?;
    let manifests = index["manifests"]
        .as_array()
        .context("index.json manifests")?;
    let named = manifests
        .iter()
        .filter(|m| m["digest"] == manifest_digest)
        .count();
    if named != 1 || manifests.len() != 1 {
        bail!(
            "index.json names {manifest_digest} {named} times among {} entries: {index}",
            manifests.len()
        );
    }
    let blobs_dir = layout.join("blobs/sha256");
    let mut present = BTreeSet::new();
    for entry in std::fs::read_dir(&blobs_dir).context("the layout has no blobs/sha256")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let actual = sha256_hex(&std::fs::read(entry.path())?);
        if actual != name {
            bail!("blob {name} hashes to {actual}");
        }
        present.insert(format!("sha256:{name}"));
    }
    for digest in source_blobs
        .iter()
        .chain(std::iter::once(&manifest_digest.to_string()))
    {
        if !present.contains(digest) {
            bail!("the layout lacks {digest}");
        }
    }
    Ok(())
}

#[test]
#[ignore = "7 to 9 minutes: cargo test -p weir-tests --test power_cut -- --ignored --nocapture"]
fn power_cuts_while_receiving_and_delivering_lose_nothing() -> Result<()> {
    if !requirements_met("power-cut test")? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let result = power_cuts(tmp.path());
    if result.is_err() || std::env::var_os("WEIR_POWER_CUT_KEEP").is_some() {
        // The boots' serial logs and the disk image, to see what was lost.
        let kept = tmp.keep();
        eprintln!(
            "serial logs and the disk image kept in {} (about 1.3 GB: delete it when done)",
            kept.display()
        );
    }
    result
}

fn power_cuts(tmp: &Path) -> Result<()> {
    let test_started = Instant::now();
    let seed = match std::env::var("WEIR_POWER_CUT_SEED") {
        Ok(s) => s
            .parse::<u64>()
            .with_context(|| format!("WEIR_POWER_CUT_SEED={s:?}"))?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let plan = plan(&mut rng);
    eprintln!(
        "power-cut seed {seed} (WEIR_POWER_CUT_SEED={seed} replays these moments): {}",
        plan.iter()
            .map(Moment::describe)
            .collect::<Vec<_>>()
            .join(", ")
    );

    let (gateway, image_build) = build_binaries()?;
    gateway_bin("gateway-tx")?;
    let version = gateway_version(&gateway)?;
    let key_hex = hex::encode(TEST_SECRET);
    let image = build_rx_image(
        &gateway,
        &image_build,
        tmp,
        &Provision {
            config: &weir_tests::appliance_vm::rx_config("0.0.0.0:7700"),
            key_hex: &key_hex,
            network: &[("10-user.network", NETWORK)],
        },
    )?;
    eprintln!(
        "rx image (gateway-rx {version}) built in {:?}",
        test_started.elapsed()
    );

    // The sender on the host, sending to the port qemu forwards into the
    // guest. It goes on sending passes until stopped.
    let port = free_udp_addr()?.port();
    let opts = SiteOptions {
        rate_bps: RATE_BPS,
        passes: 1000,
        ..Default::default()
    };
    let site = Site::new(Target::Layout(tmp.join("unused")), &opts)?;
    site.write_tx_config(format!("127.0.0.1:{port}").parse()?, &opts)?;
    let source = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        seed,
        &[
            LayerSpec { size: 300_000 },
            LayerSpec { size: 200_000 },
            LayerSpec { size: 150_000 },
            LayerSpec { size: 150_000 },
            LayerSpec { size: 100_000 },
            LayerSpec { size: 100_000 },
            LayerSpec { size: 80_000 },
            LayerSpec { size: 60_000 },
            LayerSpec { size: 40_000 },
            LayerSpec { size: 20_000 },
        ],
        "power/cut:1",
    )?;
    let manifest_digest = source.manifest_digest.clone().context("manifest digest")?;
    let mut tx = site.start_tx()?;
    site.drop_image(&source.path, "img.tar")?;

    let vm_dir = tmp.join("vm");
    std::fs::create_dir_all(&vm_dir)?;
    let mut cuts: Vec<Cut> = Vec::new();
    let mut verified_before: BTreeSet<String> = BTreeSet::new();
    let mut losses: Vec<String> = Vec::new();
    let mut held: BTreeMap<String, u64> = BTreeMap::new();
    let mut blobs_before = 0u64;
    let mut sender_stopped = false;
    for i in 0..=plan.len() {
        if test_started.elapsed() > TEST_LIMIT {
            bail!("past {TEST_LIMIT:?} before boot {i}");
        }
        if !sender_stopped && !tx.is_running() {
            bail!("gateway-tx stopped: {}", tx.log_tail(20));
        }
        let moment = plan.get(i).copied();
        let end = boot(&image, &vm_dir, &format!("boot{i}"), port, moment)?;
        // What this boot found of the one before.
        if let Some(prev) = cuts.last_mut() {
            prev.recovered = recovered(&end.seen, end.first_status.as_deref());
        }
        for id in &end.seen.arriving {
            if verified_before.contains(id) {
                losses.push(format!(
                    "boot {i}: {id} was verified before the cut and arrived again"
                ));
            }
        }
        losses.extend(end.seen.losses.iter().map(|l| format!("boot {i}: {l}")));
        // Staged shards are committed only once durable, and bitmaps only
        // gain bits: a later boot never holds fewer.
        for (id, shards) in &end.seen.resumed {
            let before = held.entry(id.clone()).or_insert(0);
            if shards < before {
                losses.push(format!(
                    "boot {i}: {id} resumed with {shards} shards, {before} at an earlier boot"
                ));
            }
            *before = (*before).max(*shards);
        }
        if let Some(done) = end.first_status.as_deref().and_then(blobs_done) {
            if done < blobs_before {
                losses.push(format!(
                    "boot {i}: {done} blobs of the image done, {blobs_before} at an earlier boot"
                ));
            }
            blobs_before = blobs_before.max(done);
        }
        verified_before.extend(end.seen.verified.iter().cloned());
        if end.seen.complete && !sender_stopped {
            // From here on the image must be delivered from what is on
            // disk alone.
            tx.terminate(Duration::from_secs(30))?;
            sender_stopped = true;
        }
        match moment {
            Some(moment) => {
                eprintln!(
                    "cut {} at {:.1}s into boot ({}): {}",
                    i + 1,
                    end.at_in_boot.as_secs_f64(),
                    moment.describe(),
                    end.happening
                );
                cuts.push(Cut {
                    moment,
                    at_in_boot: end.at_in_boot,
                    happening: end.happening,
                    recovered: String::new(),
                });
            }
            None => eprintln!(
                "last boot: delivered after {:.1}s, powered off cleanly",
                end.at_in_boot.as_secs_f64()
            ),
        }
    }
    if !sender_stopped {
        bail!("the image never completed before the last boot");
    }

    // Read the layout from the disk image, as the host sees it.
    let data = tmp.join("data.ext4");
    extract_partition(&image, "weir-data", &data)?;
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&data)
        .output()
        .context("running e2fsck")?;
    if !fsck.status.success() {
        bail!(
            "the data partition is not clean after the last power-off: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    let layout = tmp.join("layout");
    ext4_copy_out(&data, LAYOUT_IN_PARTITION, &layout)?;
    let layout = layout.join("out");
    let layout_result = check_layout(&layout, &manifest_digest, &source.blob_digests);

    eprintln!("\npower cuts (seed {seed}):");
    eprintln!(
        "{:<3} {:<16} {:>7}  {:<60}  recovered at the next boot",
        "#", "moment", "at", "what was happening"
    );
    for (n, c) in cuts.iter().enumerate() {
        eprintln!(
            "{:<3} {:<16} {:>6.1}s  {:<60}  {}",
            n + 1,
            c.moment.describe(),
            c.at_in_boot.as_secs_f64(),
            c.happening,
            c.recovered
        );
    }
    eprintln!(
        "layout: {}; {:.0} s in all",
        match &layout_result {
            Ok(()) => format!("{manifest_digest} once, every blob intact"),
            Err(e) => format!("{e:#}"),
        },
        test_started.elapsed().as_secs_f64()
    );

    if !losses.is_empty() {
        bail!("lost across power cuts:\n{}", losses.join("\n"));
    }
    layout_result?;
    let receiving = cuts
        .iter()
        .filter(|c| c.happening.starts_with("receiving"))
        .count();
    let delivering = cuts
        .iter()
        .filter(|c| c.happening.starts_with("delivering"))
        .count();
    if receiving == 0 || delivering == 0 {
        bail!(
            "the cuts missed a moment: {receiving} while receiving, {delivering} while delivering"
        );
    }
    Ok(())
}

#[test]
fn log_lines_and_status_answers_are_read_as_gateway_rx_writes_them() {
    let mut seen = Seen::default();
    for line in [
        "[   38.1] gateway-rx[233]: 2026-01-01T00:00:00Z  INFO gateway_rx::gateway: gateway-rx started listening=0.0.0.0:7700\r",
        "[   38.2] gateway-rx[233]: 2026-01-01T00:00:00Z  INFO gateway_rx::shards: resuming object from staging object=sha256:aa blocks=3 complete=0 shards=15\r",
        "[   38.3] gateway-rx[233]: 2026-01-01T00:00:00Z  INFO gateway_rx::shards: new object arriving object=sha256:bb kind=\"blob\" len=1",
        "[   38.4] gateway-rx[233]: 2026-01-01T00:00:00Z  INFO gateway_rx::stages::finish: object verified digest=sha256:bb kind=\"blob\" len=1",
        "[   38.5] gateway-rx[233]: 2026-01-01T00:00:00Z  INFO gateway_rx::images: image object verified digest=sha256:cc image=sha256:dd",
        "[   38.6] gateway-rx[233]: 2026-01-01T00:00:00Z  INFO gateway_rx::images: image complete; queued for delivery digest=sha256:cc",
        "[   38.7] gateway-rx[233]: 2026-01-01T00:00:00Z  WARN gateway_rx::shards: staging files missing or short; the object starts over object=sha256:aa",
    ] {
        seen.add_line(line);
    }
    assert!(seen.started && seen.complete && !seen.delivered);
    assert_eq!(seen.resumed, [("sha256:aa".to_string(), 15)]);
    assert_eq!(seen.arriving, ["sha256:bb"]);
    assert_eq!(seen.verified, ["sha256:bb"]);
    assert_eq!(seen.losses.len(), 1);
    let status = "gateway-rx 0.1.0: running, listening on 0.0.0.0:7700\n\
                  link: up (frames arriving), 45 frames/s\n\
                  images (1):\n  power/cut:1 receiving: 4/11 blobs, 10.2%, 0.2 passes seen\n";
    assert_eq!(frame_rate(status), Some("45 frames/s"));
    assert_eq!(blobs_done(status), Some(4));
    assert_eq!(blobs_done("images: none yet\n"), None);
}
