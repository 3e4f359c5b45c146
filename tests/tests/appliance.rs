//! The appliance, end to end: both gateways as real processes on the
//! transports an appliance may have (a serial line, a file-transfer
//! service), with their serial consoles, status LEDs, SIGTERM and a full
//! state disk. Each test says what it proves; each is bounded in time and
//! stops by itself.

use anyhow::{Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_proto::{Body, FrameSealer, Heartbeat, Key};
use weir_test_support::small_disk::SmallDisk;
use weir_tests::imagegen::{self, LayerSpec};
use weir_tests::pair::{
    expect_within, layout_lists, rx_counter, Gateway, Site, SiteLinks, SiteOptions, Target,
    TEST_SECRET,
};
use weir_tests::serial_line::{self, FaultyLine, LineFaults, PtyPair};

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(90);
const LED_NAMES: [&str; 4] = ["weir:power", "weir:link", "weir:activity", "weir:fault"];

fn layers(sizes: &[u64]) -> Vec<LayerSpec> {
    sizes.iter().map(|&size| LayerSpec { size }).collect()
}

fn tx_image_state(site: &Site) -> Option<(String, u64)> {
    let s = site.tx_status()?;
    let img = s["images"].get(0)?;
    Some((
        img["state"].as_str()?.to_string(),
        img["passes_done"].as_u64()?,
    ))
}

fn tx_wire(site: &Site, field: &str) -> u64 {
    site.tx_status()
        .and_then(|s| s["wire"][field].as_u64())
        .unwrap_or(0)
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

// ------------------------------------------------------------ (a) serial

/// (a) An image crosses a serial line at 460800 baud through socat ptys and
/// a one-way line that drops runs of bytes, flips bits and inserts noise:
/// the receiver's framing and HMAC throw the damaged frames away, FEC and
/// repeated passes make up for them, and the image lands with its digest.
/// The sender was configured faster than the line and paced to the line.
#[test]
fn an_image_crosses_a_damaging_serial_line() -> Result<()> {
    if !serial_line::have_socat() {
        return Ok(());
    }
    const BAUD: u32 = 460_800;
    let ptys = tempfile::tempdir()?;
    let up = PtyPair::new(ptys.path(), "up")?;
    let down = PtyPair::new(ptys.path(), "down")?;
    let out = tempfile::tempdir()?;
    let layout = out.path().join("layout");
    let opts = SiteOptions {
        rate_bps: 10_000_000,
        passes: 4,
        ..Default::default()
    };
    let links = SiteLinks {
        tx_link: Some(format!(
            "transport = \"serial\"\nserial_device = {}\nbaud = {BAUD}\ndatagram_size = 1024",
            toml_path(&up.a)
        )),
        rx_link: Some(format!(
            "transport = \"serial\"\nserial_device = {}\nbaud = {BAUD}\ndatagram_size = 1024",
            toml_path(&down.b)
        )),
        ..Default::default()
    };
    let site = Site::with_links(Target::Layout(layout.clone()), &opts, links)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        41,
        &layers(&[150_000]),
        "team-a/serial:1",
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;

    let line = FaultyLine::start(
        &up.b,
        &down.a,
        BAUD,
        LineFaults {
            seed: 0x5e71a1,
            drop_run: 1.0 / 20_000.0,
            max_run: 40,
            flip: 1.0 / 20_000.0,
            noise: 1.0 / 50_000.0,
        },
    )?;
    let mut rx = site.start_rx()?;
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut tx = site.start_tx()?;
    site.drop_image(&image.path, "img.tar")?;

    expect_within(
        "delivery over the serial line",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || layout_lists(&layout, &digest),
    );
    let damage = line.damage();
    assert!(
        damage.dropped_runs > 0 && damage.flipped > 0,
        "the line damaged the traffic: {damage:?}"
    );
    let seen = rx_counter(&site, "frames_lost_estimate") + rx_counter(&site, "frames_bad_tag");
    assert!(seen > 0, "the receiver noticed lost or damaged frames");
    let log = std::fs::read_to_string(&tx.log)?;
    assert!(
        log.contains("exceeds what the serial line carries"),
        "rate_bps above the line was lowered, and said so"
    );
    let paced = site
        .tx_status()
        .and_then(|s| s["wire"]["rate_bps"].as_u64())
        .unwrap_or(0);
    assert_eq!(
        paced,
        u64::from(BAUD / 10) * 8,
        "status shows the line's rate"
    );
    Ok(())
}

// ------------------------------------------------------------ (b) dir

/// What the simulated file-transfer service did.
#[derive(Debug, Default, Clone, Copy)]
struct ServiceLog {
    files: u64,
    on_time: u64,
    late: u64,
    twice: u64,
    truncated: u64,
    corrupted: u64,
}

/// A file-transfer service between the sender's outbox and the receiver's
/// inbox that takes every finished file and delivers it as is, late (after
/// newer ones), twice, truncated or with bytes flipped. The first four
/// files get one fault each, in that order; the rest are drawn on a seed.
fn run_service(
    outbox: PathBuf,
    inbox: PathBuf,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<ServiceLog>>,
) {
    let mut rng = StdRng::seed_from_u64(0xf11e);
    // (deliver at, name, bytes)
    let mut later: Vec<(Instant, String, Vec<u8>)> = Vec::new();
    let deliver = |name: &str, bytes: &[u8]| {
        // The service writes under a temporary name and renames, as the
        // receiver expects of a well-behaved one.
        let tmp = inbox.join(format!(".{name}.part"));
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, inbox.join(name));
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let mut names: Vec<String> = std::fs::read_dir(&outbox)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.retain(|n| n.ends_with(".weir") && !n.starts_with('.'));
        names.sort();
        for name in names {
            let path = outbox.join(&name);
            let Ok(mut bytes) = std::fs::read(&path) else {
                continue;
            };
            let _ = std::fs::remove_file(&path);
            let mut l = log.lock().unwrap();
            l.files += 1;
            let fate = match l.files {
                n @ 1..=4 => n,
                _ => match rng.gen_range(0..100) {
                    0..=9 => 1,
                    10..=19 => 2,
                    20..=27 => 3,
                    28..=35 => 4,
                    _ => 0,
                },
            };
            match fate {
                1 => {
                    l.late += 1;
                    later.push((
                        Instant::now() + Duration::from_millis(rng.gen_range(1500..4000)),
                        name,
                        bytes,
                    ));
                }
                2 => {
                    l.twice += 1;
                    deliver(&name, &bytes);
                    later.push((
                        Instant::now() + Duration::from_millis(rng.gen_range(1500..3000)),
                        name,
                        bytes,
                    ));
                }
                3 => {
                    l.truncated += 1;
                    let keep = bytes.len() * rng.gen_range(10..90) / 100;
                    bytes.truncate(keep);
                    deliver(&name, &bytes);
                }
                4 => {
                    l.corrupted += 1;
                    for _ in 0..8 {
                        let i = rng.gen_range(0..bytes.len());
                        bytes[i] ^= 1 << rng.gen_range(0..8);
                    }
                    deliver(&name, &bytes);
                }
                _ => {
                    l.on_time += 1;
                    deliver(&name, &bytes);
                }
            }
        }
        let now = Instant::now();
        let (due, wait): (Vec<_>, Vec<_>) = later.drain(..).partition(|(at, _, _)| *at <= now);
        later = wait;
        for (_, name, bytes) in due {
            deliver(&name, &bytes);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (b) An image crosses a directory link whose file-transfer service
/// delivers files late, twice, truncated and corrupted: the sender writes
/// bounded batch files into its outbox, the receiver reads what parses from
/// each inbox file, deletes it, and the image lands with its digest.
#[test]
fn an_image_crosses_a_file_service_that_delivers_late_twice_truncated_and_corrupted() -> Result<()>
{
    let work = tempfile::tempdir()?;
    let outbox = work.path().join("outbox");
    let inbox = work.path().join("inbox");
    std::fs::create_dir_all(&inbox)?;
    let layout = work.path().join("layout");
    let opts = SiteOptions {
        rate_bps: 8_000_000,
        passes: 4,
        ..Default::default()
    };
    let links = SiteLinks {
        tx_link: Some(format!(
            "transport = \"dir\"\noutbox_dir = {}\nmax_file_bytes = 65536\nmax_file_age_ms = 300",
            toml_path(&outbox)
        )),
        rx_link: Some(format!(
            "transport = \"dir\"\ninbox_dir = {}",
            toml_path(&inbox)
        )),
        ..Default::default()
    };
    let site = Site::with_links(Target::Layout(layout.clone()), &opts, links)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        42,
        &layers(&[400_000, 100_000]),
        "team-a/files:1",
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;

    let mut rx = site.start_rx()?;
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut tx = site.start_tx()?;
    expect_within(
        "the outbox created by the sender",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || outbox.is_dir(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let service_log = Arc::new(Mutex::new(ServiceLog::default()));
    let service = std::thread::spawn({
        let (outbox, inbox, stop, log) = (
            outbox.clone(),
            inbox.clone(),
            stop.clone(),
            service_log.clone(),
        );
        move || run_service(outbox, inbox, stop, log)
    });
    site.drop_image(&image.path, "img.tar")?;
    expect_within(
        "delivery through the file service",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || layout_lists(&layout, &digest),
    );
    stop.store(true, Ordering::SeqCst);
    service.join().expect("service thread");
    let l = *service_log.lock().unwrap();
    assert!(
        l.late > 0 && l.twice > 0 && l.truncated > 0 && l.corrupted > 0,
        "every fault happened: {l:?}"
    );
    assert!(
        l.files > 8,
        "the sender cut the stream into bounded files: {l:?}"
    );
    // A running sender always has its next batch file under a temporary
    // name; once stopped, it leaves none behind.
    tx.terminate(Duration::from_secs(20))?;
    let leftovers: Vec<String> = std::fs::read_dir(&outbox)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary batch files left in the outbox: {leftovers:?}"
    );
    Ok(())
}

// ------------------------------------------------------------ (c) consoles

/// A terminal on the far end of a console's pty pair.
struct Terminal {
    tty: serialport::TTYPort,
    prompt: &'static str,
}

impl Terminal {
    fn open(path: &Path, prompt: &'static str) -> Result<Terminal> {
        Ok(Terminal {
            tty: serial_line::open_raw(path, Duration::from_millis(100))?,
            prompt,
        })
    }

    /// Reads until the prompt ends the output (10 s at most).
    fn read_answer(&mut self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with(self.prompt) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "no prompt; got {:?}",
                String::from_utf8_lossy(&got)
            );
            match self.tty.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(String::from_utf8_lossy(&got).replace("\r\n", "\n"))
    }

    /// Types `line` and returns the answer (the echoed line, the output).
    fn ask(&mut self, line: &str) -> Result<String> {
        self.tty.write_all(format!("{line}\r").as_bytes())?;
        self.read_answer()
    }
}

/// (c) Both serial consoles over ptys: a test types commands and reads the
/// answers an operator would act on. The sender's console pauses shard
/// frames (heartbeats go on), owes a delivered image new passes (visible
/// in status.json), refuses an unknown digest, and resumes; neither console
/// ever shows key material.
#[test]
fn both_consoles_answer_typed_commands_over_a_pty() -> Result<()> {
    if !serial_line::have_socat() {
        return Ok(());
    }
    let ptys = tempfile::tempdir()?;
    let tx_pty = PtyPair::new(ptys.path(), "tx-console")?;
    let rx_pty = PtyPair::new(ptys.path(), "rx-console")?;
    let out = tempfile::tempdir()?;
    let layout = out.path().join("layout");
    let opts = SiteOptions {
        rate_bps: 20_000_000,
        passes: 1,
        tx_extra: format!(
            "[ingest]\npoll_interval_ms = 100\n\n[console]\ndevice = {}\n",
            toml_path(&tx_pty.a)
        ),
        rx_extra: format!(
            "\n[console]\ndevice = {}\nbaud = 115200\n",
            toml_path(&rx_pty.a)
        ),
        ..Default::default()
    };
    let site = Site::new(Target::Layout(layout.clone()), &opts)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        43,
        &layers(&[80_000]),
        "team-a/console:1",
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;
    let secret_hex = hex::encode(TEST_SECRET);

    // Terminals first: the banner must not go to a pty nobody holds.
    let mut tx_term = Terminal::open(&tx_pty.b, "weir-tx> ")?;
    let mut rx_term = Terminal::open(&rx_pty.b, "weir-rx> ")?;
    let mut rx = site.start_rx()?;
    // No diode: the sender talks to the receiver directly.
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut tx = site.start_tx()?;
    assert!(tx_term.read_answer()?.contains("weir tx"), "the tx banner");
    assert!(rx_term.read_answer()?.contains("weir rx"), "the rx banner");

    site.drop_image(&image.path, "img.tar")?;
    expect_within(
        "delivery, and the sender done with its pass",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || {
            layout_lists(&layout, &digest)
                && tx_image_state(&site).is_some_and(|(s, _)| s == "cycling")
        },
    );

    // --- the sender's console
    let help = tx_term.ask("help")?;
    for cmd in [
        "status",
        "images",
        "stats",
        "keys",
        "pause",
        "resume",
        "resend <digest>",
    ] {
        assert!(help.contains(cmd), "help lists {cmd}: {help}");
    }
    let status = tx_term.ask("status")?;
    assert!(
        status.contains("team-a/console:1 cycling"),
        "status names the image and its state: {status}"
    );
    assert!(
        status.contains(&format!("udp to {}", site.rx_addr)) && status.contains("fault: none"),
        "{status}"
    );
    let images = tx_term.ask("images")?;
    assert!(
        images.contains(&format!("manifest {digest}")),
        "images shows the digest to resend by: {images}"
    );
    let stats = tx_term.ask("stats")?;
    assert!(
        stats.contains("wire.shard_frames ") && stats.contains("ingest.accepted 1"),
        "{stats}"
    );
    let keys = tx_term.ask("keys")?;
    assert!(keys.contains("signing key id: 1"), "{keys}");
    for answer in [&help, &status, &images, &stats, &keys] {
        assert!(
            !answer.contains(&secret_hex),
            "no key material on the console"
        );
    }
    let bogus = tx_term.ask("bogus")?;
    assert!(
        bogus.contains("error: unknown command 'bogus' (try help)"),
        "{bogus}"
    );

    assert!(tx_term.ask("pause")?.contains("paused: shard frames stop"));
    expect_within(
        "status.json says paused",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || {
            site.tx_status()
                .is_some_and(|s| s["paused"] == true && s["state"] == "paused")
        },
    );
    let unknown = tx_term.ask(&format!("resend sha256:{}", "0".repeat(64)))?;
    assert!(unknown.contains("error: no image with digest"), "{unknown}");
    let resend = tx_term.ask(&format!("resend {digest}"))?;
    assert!(
        resend.contains("team-a/console:1") && resend.contains("owed 1 new passes"),
        "{resend}"
    );
    expect_within(
        "the image owed a pass again in status.json",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || {
            site.tx_status().is_some_and(|s| {
                s["queue"]["images"] == 1
                    && s["images"][0]["state"] == "queued"
                    && s["images"][0]["passes_done"] == 0
            })
        },
    );
    // Paused: heartbeats go on, shard frames do not.
    std::thread::sleep(Duration::from_millis(1500));
    let (shards_before, beats_before) =
        (tx_wire(&site, "shard_frames"), tx_wire(&site, "heartbeats"));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        tx_wire(&site, "shard_frames"),
        shards_before,
        "no shard frame while paused"
    );
    expect_within(
        "heartbeats continuing while paused",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || tx_wire(&site, "heartbeats") > beats_before,
    );

    assert!(tx_term.ask("resume")?.contains("resumed"));
    expect_within(
        "the owed pass sent after resume",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || {
            tx_image_state(&site).is_some_and(|(s, done)| s == "cycling" && done == 1)
                && tx_wire(&site, "shard_frames") > shards_before
        },
    );

    // --- the receiver's console
    let help = rx_term.ask("help")?;
    for cmd in ["status", "images", "stats", "keys"] {
        assert!(help.contains(cmd), "help lists {cmd}: {help}");
    }
    assert!(
        !help.contains("resend"),
        "the receiver has no sender commands: {help}"
    );
    let status = rx_term.ask("status")?;
    assert!(
        status.contains("link: up"),
        "heartbeats keep the link up: {status}"
    );
    assert!(
        status.contains("team-a/console:1 complete"),
        "status names the image: {status}"
    );
    let images = rx_term.ask("images")?;
    assert!(
        images.contains(&format!("manifest {digest}"))
            && images.contains("delivery oci-layout done"),
        "{images}"
    );
    let stats = rx_term.ask("stats")?;
    let accepted: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("frames_accepted "))
        .and_then(|v| v.trim().parse().ok())
        .context("frames_accepted in stats")?;
    assert!(accepted > 0, "{stats}");
    let keys = rx_term.ask("keys")?;
    assert!(keys.contains("accepted key ids: 1"), "{keys}");
    for answer in [&help, &status, &images, &stats, &keys] {
        assert!(
            !answer.contains(&secret_hex),
            "no key material on the console"
        );
    }
    let bogus = rx_term.ask("bogus arg")?;
    assert!(
        bogus.contains("error: unknown command 'bogus' (try help)"),
        "{bogus}"
    );
    Ok(())
}

// ------------------------------------------------------------ (d) LEDs

/// Lays out the four LEDs under `base` as the LED class does.
fn fake_leds(base: &Path) -> Result<()> {
    for name in LED_NAMES {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("brightness"), "0\n")?;
        std::fs::write(dir.join("max_brightness"), "255\n")?;
        std::fs::write(dir.join("trigger"), "[none] timer heartbeat\n")?;
        std::fs::write(dir.join("delay_on"), "500\n")?;
        std::fs::write(dir.join("delay_off"), "500\n")?;
    }
    Ok(())
}

fn led(base: &Path, name: &str, file: &str) -> String {
    std::fs::read_to_string(base.join(name).join(file))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Frames signed with a wrong secret under the right key id.
fn forged_frames(n: usize) -> Vec<Vec<u8>> {
    let key = Key::from_bytes(1, &[0x66; 32]).expect("key");
    let mut sealer = FrameSealer::new(key, 77);
    (0..n)
        .map(|i| {
            let mut out = Vec::new();
            sealer.seal(
                &Body::Heartbeat(Heartbeat {
                    uptime_s: i as u64,
                    queued_objects: 0,
                    pass: 0,
                    config_fingerprint: 0,
                    sent_frames: 0,
                    ledger: None,
                }),
                &mut out,
            );
            out
        })
        .collect()
}

/// (d) The LEDs, against a temporary directory laid out as sysfs: power on
/// while each gateway runs, link on while heartbeats go out (tx) and frames
/// arrive (rx), activity blinking (timer trigger) while an image moves, the
/// fault LED on with its reason in status.json after a flood of forged
/// frames, and after SIGTERM both gateways exit 0 with every LED dark.
#[test]
fn leds_show_power_link_activity_and_an_hmac_fault_and_go_dark_on_sigterm() -> Result<()> {
    let out = tempfile::tempdir()?;
    let layout = out.path().join("layout");
    let tx_leds = out.path().join("tx-leds");
    let rx_leds = out.path().join("rx-leds");
    fake_leds(&tx_leds)?;
    fake_leds(&rx_leds)?;
    let opts = SiteOptions {
        // Slow enough that an image takes a few seconds to cross.
        rate_bps: 2_000_000,
        passes: 3,
        tx_extra: format!(
            "[ingest]\npoll_interval_ms = 100\n\n[leds]\nbase = {}\n",
            toml_path(&tx_leds)
        ),
        rx_extra: format!(
            "\n[leds]\nbase = {}\nhmac_fault_threshold = 20\n",
            toml_path(&rx_leds)
        ),
        ..Default::default()
    };
    let site = Site::new(Target::Layout(layout.clone()), &opts)?;
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        44,
        &layers(&[1_000_000]),
        "team-a/leds:1",
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;
    let mut rx = site.start_rx()?;
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut tx = site.start_tx()?;

    expect_within(
        "power and link on at both ends",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || {
            [&tx_leds, &rx_leds].iter().all(|b| {
                led(b, "weir:power", "brightness") == "255"
                    && led(b, "weir:link", "brightness") == "255"
            })
        },
    );
    assert_eq!(
        led(&tx_leds, "weir:fault", "brightness"),
        "0",
        "no fault at the start"
    );
    assert_eq!(
        led(&rx_leds, "weir:activity", "trigger"),
        "none",
        "nothing moves yet"
    );

    site.drop_image(&image.path, "img.tar")?;
    expect_within(
        "activity blinking at both ends while the image moves",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || {
            led(&tx_leds, "weir:activity", "trigger") == "timer"
                && led(&rx_leds, "weir:activity", "trigger") == "timer"
        },
    );

    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    for f in forged_frames(200) {
        sock.send_to(&f, site.rx_addr)?;
        std::thread::sleep(Duration::from_micros(200));
    }
    expect_within(
        "the HMAC fault on the receiver's LED and in its status",
        Duration::from_secs(15),
        &mut [&mut tx, &mut rx],
        || {
            led(&rx_leds, "weir:fault", "brightness") == "255"
                && site.rx_status().is_some_and(|s| {
                    s["fault"]
                        .as_str()
                        .is_some_and(|f| f.contains("HMAC failures"))
                })
        },
    );
    assert_eq!(
        led(&tx_leds, "weir:fault", "brightness"),
        "0",
        "the sender has no fault"
    );
    expect_within(
        "delivery despite the flood",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || layout_lists(&layout, &digest),
    );

    let tx_exit = tx.terminate(Duration::from_secs(30))?;
    let rx_exit = rx.terminate(Duration::from_secs(30))?;
    assert!(
        tx_exit.success(),
        "gateway-tx exits 0 on SIGTERM: {tx_exit}\n{}",
        tx.log_tail(20)
    );
    assert!(
        rx_exit.success(),
        "gateway-rx exits 0 on SIGTERM: {rx_exit}\n{}",
        rx.log_tail(20)
    );
    for (side, base) in [("tx", &tx_leds), ("rx", &rx_leds)] {
        for name in LED_NAMES {
            assert_eq!(
                led(base, name, "brightness"),
                "0",
                "{side} {name} dark after SIGTERM"
            );
            assert_eq!(
                led(base, name, "trigger"),
                "none",
                "{side} {name} not blinking after SIGTERM"
            );
        }
    }
    assert!(
        std::fs::read_to_string(&tx.log)?.contains("state flushed"),
        "the sender flushed its state"
    );
    assert!(
        std::fs::read_to_string(&rx.log)?.contains("gateway-rx stopped"),
        "the receiver stopped cleanly"
    );
    Ok(())
}

// ------------------------------------------------------------ (e) full disk

fn fault_of(status: Option<serde_json::Value>) -> Option<String> {
    status.and_then(|s| s["fault"].as_str().map(str::to_string))
}

/// (e, tx) A full state disk stops the sender's intake without harm: a
/// drop whose blobs do not fit stays in the spool (not rejected), the fault
/// "state disk full" stands, the gateway keeps running; once space is
/// freed the same drop is accepted, the fault clears and the image crosses.
#[test]
fn a_full_sender_state_disk_keeps_the_drop_raises_a_fault_and_resumes() -> Result<()> {
    let out = tempfile::tempdir()?;
    let layout = out.path().join("layout");
    let opts = SiteOptions {
        rate_bps: 20_000_000,
        tx_extra: "[ingest]\npoll_interval_ms = 100\n".into(),
        ..Default::default()
    };
    let links = SiteLinks {
        tx_top: "state_min_free_mb = 1".into(),
        ..Default::default()
    };
    let site = Site::with_links(Target::Layout(layout.clone()), &opts, links)?;
    let Some(disk) = SmallDisk::mount(&site.tx_state, "24m") else {
        return Ok(());
    };
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        45,
        &layers(&[3_000_000, 3_000_000]),
        "team-a/full:1",
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;
    let mut rx = site.start_rx()?;
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut tx = site.start_tx()?;
    expect_within(
        "the sender up",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || site.tx_status().is_some(),
    );
    // 4 MiB free: above the 1 MiB floor, too little for 6 MB of blobs.
    let filler = disk.fill_leaving(4 << 20)?;
    let drop = site.drop_image(&image.path, "img.tar")?;
    expect_within(
        "the state disk fault",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || fault_of(site.tx_status()).is_some_and(|f| f.contains("state disk full")),
    );
    assert!(drop.exists(), "the drop waits in the spool");
    assert!(
        !site.spool.join("rejected/img.tar").exists(),
        "the drop was not rejected"
    );
    let leftovers = std::fs::read_dir(site.tx_state.join("objects/tmp"))?.count();
    assert_eq!(leftovers, 0, "the half-written blob was removed");
    assert!(tx.is_running(), "the sender keeps running");

    std::fs::remove_file(&filler)?;
    expect_within(
        "the drop accepted once space is back",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || site.spool.join("done/img.tar").exists() && fault_of(site.tx_status()).is_none(),
    );
    expect_within(
        "delivery",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || layout_lists(&layout, &digest),
    );
    drop_gateways(tx, rx);
    Ok(())
}

/// (e, rx) A full state disk stops the receiver's storing without harm:
/// verified frames are dropped and counted, the fault "state disk full"
/// stands, nothing is delivered; once space is freed, storing resumes, the
/// fault clears, and later passes deliver the image.
#[test]
fn a_full_receiver_state_disk_drops_frames_raises_a_fault_and_resumes() -> Result<()> {
    let out = tempfile::tempdir()?;
    let layout = out.path().join("layout");
    let opts = SiteOptions {
        rate_bps: 8_000_000,
        passes: 20,
        tx_extra: "[ingest]\npoll_interval_ms = 100\n".into(),
        ..Default::default()
    };
    let links = SiteLinks {
        rx_top: "state_min_free_mb = 4".into(),
        ..Default::default()
    };
    let site = Site::with_links(Target::Layout(layout.clone()), &opts, links)?;
    let Some(disk) = SmallDisk::mount(&site.rx_state, "24m") else {
        return Ok(());
    };
    let image = imagegen::oci_archive(
        site.dir.path(),
        "img.tar",
        46,
        &layers(&[600_000]),
        "team-a/rxfull:1",
    )?;
    let digest = image.manifest_digest.clone().context("digest")?;
    let mut rx = site.start_rx()?;
    receiver_up(&site, &mut rx);
    // 3 MiB free: below the 4 MiB floor.
    let filler = disk.fill_leaving(3 << 20)?;
    expect_within(
        "the state disk fault",
        Duration::from_secs(15),
        &mut [&mut rx],
        || fault_of(site.rx_status()).is_some_and(|f| f.contains("state disk full")),
    );
    site.write_tx_config(site.rx_addr, &opts)?;
    let mut tx = site.start_tx()?;
    site.drop_image(&image.path, "img.tar")?;
    expect_within(
        "frames dropped and counted",
        Duration::from_secs(30),
        &mut [&mut tx, &mut rx],
        || rx_counter(&site, "frames_dropped_disk_full") > 100,
    );
    assert_eq!(
        rx_counter(&site, "shards_stored"),
        0,
        "nothing stored while full"
    );
    assert!(!layout_lists(&layout, &digest));
    assert!(rx.is_running(), "the receiver keeps running");

    std::fs::remove_file(&filler)?;
    expect_within(
        "delivery once space is back",
        DELIVERY_TIMEOUT,
        &mut [&mut tx, &mut rx],
        || layout_lists(&layout, &digest),
    );
    expect_within(
        "the fault cleared",
        Duration::from_secs(10),
        &mut [&mut tx, &mut rx],
        || fault_of(site.rx_status()).is_none(),
    );
    drop_gateways(tx, rx);
    Ok(())
}

/// (e, rx) A state disk out of inodes, with bytes to spare, stops the
/// receiver's storing with a fault that says so, and lifts it once inodes
/// are freed: every object arriving needs files of its own, and such a
/// disk refuses them however many bytes are free.
#[test]
fn a_receiver_state_disk_out_of_inodes_raises_its_fault_and_lifts_it() -> Result<()> {
    let out = tempfile::tempdir()?;
    let layout = out.path().join("layout");
    let opts = SiteOptions::default();
    let links = SiteLinks {
        rx_top: "state_min_free_mb = 1".into(),
        ..Default::default()
    };
    let site = Site::with_links(Target::Layout(layout), &opts, links)?;
    let Some(disk) = SmallDisk::mount_with(&site.rx_state, "size=24m,nr_inodes=3000") else {
        return Ok(());
    };
    let mut rx = site.start_rx()?;
    receiver_up(&site, &mut rx);
    assert!(disk.free_inodes() > 1100, "the tmpfs counts its inodes");
    // Empty files: inodes gone, bytes still free.
    let filler = disk.fill_inodes_leaving(1000)?;
    expect_within(
        "the out-of-inodes fault",
        Duration::from_secs(15),
        &mut [&mut rx],
        || fault_of(site.rx_status()).is_some_and(|f| f.contains("state disk out of inodes")),
    );
    assert!(disk.free() > 20 << 20, "bytes were never short");
    assert!(rx.is_running(), "the receiver keeps running");
    std::fs::remove_dir_all(&filler)?;
    expect_within(
        "the fault lifted",
        Duration::from_secs(15),
        &mut [&mut rx],
        || site.rx_status().is_some() && fault_of(site.rx_status()).is_none(),
    );
    rx.kill9();
    Ok(())
}

/// Waits for gateway-rx's first status report.
fn receiver_up(site: &Site, rx: &mut Gateway) {
    expect_within(
        "the receiver up",
        Duration::from_secs(30),
        &mut [rx],
        || site.rx_status().is_some(),
    );
}

/// Kills the gateways before the tmpfs under them is unmounted.
fn drop_gateways(mut tx: Gateway, mut rx: Gateway) {
    tx.kill9();
    rx.kill9();
}
