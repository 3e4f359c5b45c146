//! Pseudo-terminal pairs from socat, and a one-way byte link between two
//! ptys that damages what it carries on a seed.

#![allow(dead_code)]

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use weir_proto::pacing::LinePacer;

/// True when socat can be run; prints why the test is skipped otherwise,
/// and fails the test instead under `CI=true`.
pub fn have_socat(test: &str) -> bool {
    let ok = Command::new("socat")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        // CI installs socat, so a missing one there is a broken setup.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: socat is not installed, and CI=true forbids skipping"
        );
        eprintln!("skipping {test}: socat is not installed");
    }
    ok
}

/// Two connected ptys, `a` and `b`, held open by a socat process that is
/// killed on drop.
pub struct PtyPair {
    pub a: PathBuf,
    pub b: PathBuf,
    socat: Child,
}

impl PtyPair {
    pub fn new(dir: &Path, name: &str) -> PtyPair {
        let a = dir.join(format!("{name}-a"));
        let b = dir.join(format!("{name}-b"));
        // A killed socat leaves its links; a stale one could name a pty
        // number the kernel hands out again.
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        let socat = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running socat");
        let pair = PtyPair { a, b, socat };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(pair.a.exists() && pair.b.exists()) {
            assert!(
                Instant::now() < deadline,
                "socat did not create {name} ptys"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pair
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.socat.kill();
        let _ = self.socat.wait();
    }
}

/// Opens a pty end raw, with a read timeout.
///
/// serialport takes an exclusive flock. A child that another test forks
/// while an earlier holder of this end had it open keeps that lock until
/// its exec, so an open that finds the end locked tries again for a while.
pub fn open_raw(path: &Path, timeout: Duration) -> serialport::TTYPort {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match serialport::new(path.to_str().unwrap(), 115_200)
            .timeout(timeout)
            .open_native()
        {
            Ok(port) => return port,
            Err(e) if e.kind() == serialport::ErrorKind::NoDevice && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    }
}

/// How a [`FaultyLine`] damages bytes, as chances per byte carried.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub seed: u64,
    /// Chance that a run of 1..=`max_run` bytes is dropped from here.
    pub drop_run: f64,
    pub max_run: usize,
    /// Chance that one bit of this byte is flipped.
    pub flip: f64,
    /// Chance that 1..=16 random bytes are inserted before this byte.
    pub noise: f64,
}

/// What the line did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Damage {
    pub carried: u64,
    pub dropped_runs: u64,
    pub dropped_bytes: u64,
    pub flipped: u64,
    pub noise_bursts: u64,
}

impl Damage {
    pub fn faults(&self) -> u64 {
        self.dropped_runs + self.flipped + self.noise_bursts
    }
}

/// A one-way line: reads bytes from one pty, damages them, and writes them
/// to another at no more than `bytes_per_sec`.
pub struct FaultyLine {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Damage>,
}

impl FaultyLine {
    pub fn start(from: &Path, to: &Path, bytes_per_sec: u64, faults: Faults) -> FaultyLine {
        let mut input = open_raw(from, Duration::from_millis(50));
        let mut output = open_raw(to, Duration::from_secs(5));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(faults.seed);
            let mut pacer = LinePacer::new(bytes_per_sec, 64, Instant::now());
            let mut damage = Damage::default();
            let mut dropping = 0usize;
            let mut buf = [0u8; 1024];
            let mut out = Vec::new();
            loop {
                let n = match input.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::TimedOut => {
                        if stopping.load(Ordering::SeqCst) {
                            return damage;
                        }
                        continue;
                    }
                    // The test is ending (its ptys are gone); what was
                    // lost shows in its own assertions.
                    Err(e) => {
                        eprintln!("faulty line stops: reading: {e}");
                        return damage;
                    }
                };
                out.clear();
                for &b in &buf[..n] {
                    damage.carried += 1;
                    if dropping == 0 && rng.gen_bool(faults.drop_run) {
                        dropping = rng.gen_range(1..=faults.max_run);
                        damage.dropped_runs += 1;
                    }
                    if dropping > 0 {
                        dropping -= 1;
                        damage.dropped_bytes += 1;
                        continue;
                    }
                    if rng.gen_bool(faults.noise) {
                        damage.noise_bursts += 1;
                        for _ in 0..rng.gen_range(1..=16) {
                            out.push(rng.gen());
                        }
                    }
                    let mut b = b;
                    if rng.gen_bool(faults.flip) {
                        damage.flipped += 1;
                        b ^= 1 << rng.gen_range(0..8);
                    }
                    out.push(b);
                }
                for chunk in out.chunks(64) {
                    std::thread::sleep(pacer.reserve(chunk.len(), Instant::now()));
                    if let Err(e) = output.write_all(chunk) {
                        eprintln!("faulty line stops: writing: {e}");
                        return damage;
                    }
                }
            }
        });
        FaultyLine { stop, thread }
    }

    /// Stops once the input has been quiet for a moment; returns the damage.
    pub fn finish(self) -> Damage {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("faulty line thread")
    }
}
