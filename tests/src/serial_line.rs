//! A serial line between two gateways, for tests: pseudo-terminal pairs from
//! `socat` (re-exported from `weir-test-support`), and a one-way link
//! between two of them that damages what it carries (drops runs of bytes,
//! flips bits, inserts noise) on a seed and carries no more than the line's
//! rate.
//!
//! ```text
//!  gateway-tx ── upstream.a ═ upstream.b ──▶ FaultyLine ──▶ downstream.a ═ downstream.b ── gateway-rx
//! ```
//!
//! Pseudo-terminals have flow control and ignore the baud rate; a real
//! one-way line has neither, so the [`FaultyLine`] paces itself to the baud
//! (8N1: baud/10 bytes per second) like the wire would.

use anyhow::{Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use weir_proto::pacing::LinePacer;

pub use weir_test_support::pty::{have_socat, open_raw, PtyPair};

/// How a [`FaultyLine`] damages bytes, as chances per byte carried.
#[derive(Debug, Clone, Copy)]
pub struct LineFaults {
    pub seed: u64,
    /// Chance that a run of 1..=`max_run` bytes is dropped from here.
    pub drop_run: f64,
    pub max_run: usize,
    /// Chance that one bit of this byte is flipped.
    pub flip: f64,
    /// Chance that 1..=16 random bytes are inserted before this byte.
    pub noise: f64,
}

impl LineFaults {
    /// A line that carries every byte unchanged.
    pub fn none() -> LineFaults {
        LineFaults {
            seed: 0,
            drop_run: 0.0,
            max_run: 1,
            flip: 0.0,
            noise: 0.0,
        }
    }
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
    /// Faults injected, of every kind.
    pub fn faults(&self) -> u64 {
        self.dropped_runs + self.flipped + self.noise_bursts
    }
}

/// The damage so far, readable while the line runs.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    damage: std::sync::Mutex<Damage>,
}

/// A one-way line: reads bytes from one pty, damages them, and writes them
/// to another at no more than `baud / 10` bytes per second.
pub struct FaultyLine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FaultyLine {
    pub fn start(from: &Path, to: &Path, baud: u32, faults: LineFaults) -> Result<FaultyLine> {
        let mut input = open_raw(from, Duration::from_millis(50))?;
        let mut output = open_raw(to, Duration::from_secs(5))?;
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("faulty-line".into())
            .spawn(move || {
                let mut rng = StdRng::seed_from_u64(faults.seed);
                let mut pacer = LinePacer::for_baud(baud, Instant::now());
                let burst = pacer.burst();
                let mut dropping = 0usize;
                let mut buf = [0u8; 1024];
                let mut out = Vec::new();
                while !state.stop.load(Ordering::SeqCst) {
                    let n = match input.read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::TimedOut => continue,
                        // The test is ending (its ptys are gone).
                        Err(_) => return,
                    };
                    out.clear();
                    let mut d = Damage::default();
                    for &b in &buf[..n] {
                        d.carried += 1;
                        if dropping == 0 && faults.drop_run > 0.0 && rng.gen_bool(faults.drop_run) {
                            dropping = rng.gen_range(1..=faults.max_run.max(1));
                            d.dropped_runs += 1;
                        }
                        if dropping > 0 {
                            dropping -= 1;
                            d.dropped_bytes += 1;
                            continue;
                        }
                        if faults.noise > 0.0 && rng.gen_bool(faults.noise) {
                            d.noise_bursts += 1;
                            for _ in 0..rng.gen_range(1..=16) {
                                out.push(rng.gen());
                            }
                        }
                        let mut b = b;
                        if faults.flip > 0.0 && rng.gen_bool(faults.flip) {
                            d.flipped += 1;
                            b ^= 1 << rng.gen_range(0..8);
                        }
                        out.push(b);
                    }
                    {
                        let mut total = state.damage.lock().unwrap_or_else(|e| e.into_inner());
                        total.carried += d.carried;
                        total.dropped_runs += d.dropped_runs;
                        total.dropped_bytes += d.dropped_bytes;
                        total.flipped += d.flipped;
                        total.noise_bursts += d.noise_bursts;
                    }
                    for chunk in out.chunks(burst) {
                        std::thread::sleep(pacer.reserve(chunk.len(), Instant::now()));
                        if output.write_all(chunk).is_err() {
                            return;
                        }
                    }
                }
            })
            .context("spawning the faulty line")?;
        Ok(FaultyLine {
            shared,
            thread: Some(thread),
        })
    }

    /// The damage done so far.
    pub fn damage(&self) -> Damage {
        *self.shared.damage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FaultyLine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line is one way, carries bytes in order when it does no damage,
    /// and damages what it carries when told to.
    #[test]
    fn the_line_carries_one_way_and_damages_on_a_seed() -> Result<()> {
        if !have_socat() {
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let up = PtyPair::new(dir.path(), "up")?;
        let down = PtyPair::new(dir.path(), "down")?;
        let clean = FaultyLine::start(&up.b, &down.a, 460_800, LineFaults::none())?;
        let mut writer = open_raw(&up.a, Duration::from_secs(5))?;
        let mut reader = open_raw(&down.b, Duration::from_millis(200))?;
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        writer.write_all(&sent)?;
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while got.len() < sent.len() && Instant::now() < deadline {
            match reader.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                Err(e) => return Err(e.into()),
            }
        }
        assert_eq!(got, sent, "a clean line changes nothing");
        assert_eq!(clean.damage().faults(), 0);
        drop(clean);

        let faulty = FaultyLine::start(
            &up.b,
            &down.a,
            460_800,
            LineFaults {
                seed: 3,
                drop_run: 1.0 / 2000.0,
                max_run: 20,
                flip: 1.0 / 2000.0,
                noise: 0.0,
            },
        )?;
        writer.write_all(&sent)?;
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while faulty.damage().carried < sent.len() as u64 && Instant::now() < deadline {
            match reader.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                Err(e) => return Err(e.into()),
            }
        }
        let d = faulty.damage();
        assert!(d.dropped_runs > 0 && d.flipped > 0, "{d:?}");
        assert_ne!(got, sent);
        Ok(())
    }
}
