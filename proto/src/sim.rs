//! A seeded fault model and an in-memory one-way link, so protocol tests
//! run with neither sockets nor files (feature `sim`).
//!
//! The model judges frames one by one, in the order they are sent:
//!
//! - blackout windows, by frame position: every frame in them is dropped;
//! - independent loss;
//! - corruption: one random byte of the frame flipped;
//! - duplication: the frame goes out twice;
//! - reordering: the frame is held back and goes out after the next
//!   1..=`reorder_depth` frames.
//!
//! Every frame draws the same random numbers whatever happens to it, so the
//! fate of the n-th frame depends only on the seed and n: a test that fails
//! replays exactly from its seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// What the link does to frames; [`Faults::default`] does nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Probability that one byte of a frame is flipped.
    pub corrupt: f64,
    /// Probability that a frame is delivered twice.
    pub duplicate: f64,
    /// Probability that a frame is held back behind later ones.
    pub reorder: f64,
    /// Most frames a held frame waits for (at least 1).
    pub reorder_depth: u32,
    /// Windows in which nothing passes.
    pub blackouts: Vec<Blackout>,
}

/// `frames` frames from position `from` on (0 = the first frame sent) are
/// all dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blackout {
    pub from: u64,
    pub frames: u64,
}

impl Blackout {
    fn contains(&self, position: u64) -> bool {
        position >= self.from && position - self.from < self.frames
    }
}

/// What the model did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub dropped_loss: u64,
    pub dropped_blackout: u64,
    pub corrupted: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

/// The per-frame random draws, always all of them (see the module doc).
struct Draws {
    loss: f64,
    corrupt: f64,
    corrupt_at: f64,
    corrupt_xor: u8,
    duplicate: f64,
    reorder: f64,
    reorder_gap: u32,
}

/// Decides the fate of each frame from a seed.
pub struct FaultModel {
    faults: Faults,
    rng: ChaCha8Rng,
    /// Frames held back, with how many more frames must go out first.
    held: Vec<(u32, Vec<u8>)>,
    stats: FaultStats,
}

impl FaultModel {
    pub fn new(faults: Faults, seed: u64) -> Self {
        FaultModel {
            faults,
            rng: ChaCha8Rng::seed_from_u64(seed),
            held: Vec::new(),
            stats: FaultStats::default(),
        }
    }

    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    fn draw(&mut self) -> Draws {
        let depth = self.faults.reorder_depth.max(1);
        Draws {
            loss: self.rng.gen(),
            corrupt: self.rng.gen(),
            corrupt_at: self.rng.gen(),
            corrupt_xor: self.rng.gen_range(1..=255),
            duplicate: self.rng.gen(),
            reorder: self.rng.gen(),
            reorder_gap: self.rng.gen_range(1..=depth),
        }
    }

    /// Passes one frame through the link; appends to `out` whatever comes
    /// out now (nothing, the frame, its copies, frames held before).
    pub fn pass(&mut self, frame: &[u8], out: &mut Vec<Vec<u8>>) {
        let position = self.stats.frames_in;
        self.stats.frames_in += 1;
        let d = self.draw();
        if self.faults.blackouts.iter().any(|w| w.contains(position)) {
            self.stats.dropped_blackout += 1;
            return;
        }
        if d.loss < self.faults.loss {
            self.stats.dropped_loss += 1;
            return;
        }
        let mut frame = frame.to_vec();
        if !frame.is_empty() && d.corrupt < self.faults.corrupt {
            let at = ((d.corrupt_at * frame.len() as f64) as usize).min(frame.len() - 1);
            frame[at] ^= d.corrupt_xor;
            self.stats.corrupted += 1;
        }
        let copies = if d.duplicate < self.faults.duplicate {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        if d.reorder < self.faults.reorder {
            self.stats.reordered += 1;
            for _ in 0..copies {
                self.held.push((d.reorder_gap, frame.clone()));
            }
            return;
        }
        for _ in 0..copies {
            self.emit(frame.clone(), out);
        }
    }

    /// One frame goes out; held frames whose wait is over follow it.
    fn emit(&mut self, frame: Vec<u8>, out: &mut Vec<Vec<u8>>) {
        out.push(frame);
        self.stats.frames_out += 1;
        let mut i = 0;
        while i < self.held.len() {
            self.held[i].0 -= 1;
            if self.held[i].0 == 0 {
                let (_, f) = self.held.remove(i);
                out.push(f);
                self.stats.frames_out += 1;
            } else {
                i += 1;
            }
        }
    }

    /// The link went idle: every held frame goes out, in the order held.
    pub fn flush(&mut self, out: &mut Vec<Vec<u8>>) {
        for (_, f) in self.held.drain(..) {
            out.push(f);
            self.stats.frames_out += 1;
        }
    }
}

struct Wire {
    model: FaultModel,
    queue: VecDeque<Vec<u8>>,
}

/// The sending end of an in-memory one-way link.
pub struct MemorySink {
    wire: Arc<Mutex<Wire>>,
    out: Vec<Vec<u8>>,
}

/// The receiving end of an in-memory one-way link.
pub struct MemorySource {
    wire: Arc<Mutex<Wire>>,
}

/// A one-way link in memory through a [`FaultModel`] of `faults` seeded
/// with `seed`. The ends may live on different threads.
pub fn memory_link(faults: Faults, seed: u64) -> (MemorySink, MemorySource) {
    let wire = Arc::new(Mutex::new(Wire {
        model: FaultModel::new(faults, seed),
        queue: VecDeque::new(),
    }));
    (
        MemorySink {
            wire: wire.clone(),
            out: Vec::new(),
        },
        MemorySource { wire },
    )
}

fn lock(wire: &Mutex<Wire>) -> std::sync::MutexGuard<'_, Wire> {
    // A panicking test thread leaves frames that are still frames.
    wire.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemorySink {
    /// Sends frames in order through the fault model.
    pub fn send(&mut self, frames: &[&[u8]]) {
        let mut wire = lock(&self.wire);
        for f in frames {
            wire.model.pass(f, &mut self.out);
        }
        let Wire { queue, .. } = &mut *wire;
        queue.extend(self.out.drain(..));
    }

    /// Releases frames the model holds back, as an idle link would.
    pub fn flush(&mut self) {
        let mut wire = lock(&self.wire);
        wire.model.flush(&mut self.out);
        let Wire { queue, .. } = &mut *wire;
        queue.extend(self.out.drain(..));
    }

    pub fn stats(&self) -> FaultStats {
        lock(&self.wire).model.stats()
    }
}

impl MemorySource {
    /// Moves up to `max` frames that came out of the link into `batch`
    /// (cleared first); an empty batch means none are waiting.
    pub fn recv(&mut self, batch: &mut Vec<Vec<u8>>, max: usize) {
        batch.clear();
        let mut wire = lock(&self.wire);
        let n = max.min(wire.queue.len());
        batch.extend(wire.queue.drain(..n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: u32) -> Vec<Vec<u8>> {
        (0..n).map(|i| i.to_be_bytes().to_vec()).collect()
    }

    fn run(faults: Faults, seed: u64, input: &[Vec<u8>]) -> (Vec<Vec<u8>>, FaultStats) {
        let mut m = FaultModel::new(faults, seed);
        let mut out = Vec::new();
        for f in input {
            m.pass(f, &mut out);
        }
        m.flush(&mut out);
        (out, m.stats())
    }

    #[test]
    fn no_faults_pass_everything_in_order() {
        let input = frames(100);
        let (out, stats) = run(Faults::default(), 1, &input);
        assert_eq!(out, input);
        assert_eq!(stats.frames_out, 100);
    }

    #[test]
    fn the_same_seed_gives_the_same_output() {
        let faults = Faults {
            loss: 0.1,
            corrupt: 0.05,
            duplicate: 0.05,
            reorder: 0.1,
            reorder_depth: 3,
            blackouts: vec![Blackout {
                from: 10,
                frames: 10,
            }],
        };
        let input = frames(500);
        let a = run(faults.clone(), 42, &input);
        assert_eq!(a, run(faults.clone(), 42, &input));
        assert_ne!(a.0, run(faults, 43, &input).0);
        let s = a.1;
        assert_eq!(s.dropped_blackout, 10);
        assert!(s.dropped_loss > 0 && s.corrupted > 0 && s.duplicated > 0 && s.reordered > 0);
        assert_eq!(
            s.frames_out,
            s.frames_in - s.dropped_blackout - s.dropped_loss + s.duplicated
        );
    }

    #[test]
    fn held_frames_come_out_behind_later_ones() {
        let faults = Faults {
            reorder: 0.3,
            reorder_depth: 3,
            ..Faults::default()
        };
        let input = frames(200);
        let (out, stats) = run(faults, 7, &input);
        assert!(stats.reordered > 0);
        assert_ne!(out, input);
        let mut sorted = out.clone();
        sorted.sort();
        assert_eq!(sorted, input, "reordering neither loses nor adds");
    }

    #[test]
    fn a_memory_link_carries_frames_across_threads() {
        let (mut sink, mut source) = memory_link(Faults::default(), 0);
        let input = frames(10);
        std::thread::spawn(move || {
            let refs: Vec<&[u8]> = input.iter().map(|f| f.as_slice()).collect();
            sink.send(&refs);
        })
        .join()
        .unwrap();
        let mut batch = Vec::new();
        source.recv(&mut batch, 4);
        assert_eq!(batch, frames(4));
        source.recv(&mut batch, 100);
        assert_eq!(batch, frames(10)[4..].to_vec());
    }
}
