//! Replay and restart detection on the receiver.
//!
//! Per key id the guard follows the newest sender session. Within it, a
//! sliding window of sequence numbers refuses repeats; numbers older than the
//! window are refused as stale. A higher session id means the sender
//! restarted and is accepted; frames of an older session are refused.

use std::collections::HashMap;

/// Sequence numbers remembered behind the newest one; covers the
/// reordering a diode or UDP path can introduce.
pub const WINDOW: u64 = 8192;
const WORDS: usize = (WINDOW / 64) as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// First sight of this number; `gap` numbers were skipped before it
    /// (lost or still to come reordered).
    Fresh { gap: u64, new_session: bool },
    /// Seen already in this session.
    Replayed,
    /// Older than the window, or from a session older than the newest.
    Stale,
}

struct SessionWindow {
    session_id: u64,
    first: u64,
    highest: u64,
    bits: [u64; WORDS],
    received: u64,
    /// Frames of this session the receiver dropped unopened (see
    /// [`ReplayGuard::count_unopened`]).
    unopened: u64,
}

impl SessionWindow {
    fn new(session_id: u64, seq: u64) -> Self {
        let mut w = SessionWindow {
            session_id,
            first: seq,
            highest: seq,
            bits: [0; WORDS],
            received: 0,
            unopened: 0,
        };
        w.set(seq);
        w.received = 1;
        w
    }

    /// What the loss estimate takes from this window: frames received
    /// (accepted, or dropped unopened, which cannot make more than were
    /// numbered) and frames numbered.
    fn estimate(&self) -> LossEstimate {
        // Numbers are the sender's: a hostile one spans the whole range.
        let expected = self.highest.saturating_sub(self.first).saturating_add(1);
        LossEstimate {
            received: self.received.saturating_add(self.unopened).min(expected),
            expected,
        }
    }

    fn slot(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn set(&mut self, seq: u64) {
        let (w, b) = Self::slot(seq);
        self.bits[w] |= b;
    }

    fn clear(&mut self, seq: u64) {
        let (w, b) = Self::slot(seq);
        self.bits[w] &= !b;
    }

    fn is_set(&self, seq: u64) -> bool {
        let (w, b) = Self::slot(seq);
        self.bits[w] & b != 0
    }

    fn check(&mut self, seq: u64) -> ReplayVerdict {
        if seq > self.highest {
            let gap = seq - self.highest - 1;
            if gap >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for s in self.highest + 1..seq {
                    self.clear(s);
                }
            }
            self.highest = seq;
            self.set(seq);
            self.received += 1;
            return ReplayVerdict::Fresh {
                gap,
                new_session: false,
            };
        }
        if self.highest - seq >= WINDOW {
            return ReplayVerdict::Stale;
        }
        if self.is_set(seq) {
            return ReplayVerdict::Replayed;
        }
        self.set(seq);
        self.received += 1;
        self.first = self.first.min(seq);
        // A late frame fills a gap counted earlier.
        ReplayVerdict::Fresh {
            gap: 0,
            new_session: false,
        }
    }
}

/// Loss seen so far, from sequence numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossEstimate {
    /// Distinct frames accepted.
    pub received: u64,
    /// Frames the senders numbered up to the highest seen.
    pub expected: u64,
}

impl LossEstimate {
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    pub fn ratio(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.lost() as f64 / self.expected as f64
        }
    }
}

#[derive(Default)]
pub struct ReplayGuard {
    windows: HashMap<u16, SessionWindow>,
    /// Totals of sessions that were replaced by newer ones.
    closed: LossEstimate,
}

impl ReplayGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Judges one authenticated frame's numbers. Only call it after the tag
    /// verified: unauthenticated numbers must not move the window.
    pub fn check(&mut self, key_id: u16, session_id: u64, seq: u64) -> ReplayVerdict {
        match self.windows.get_mut(&key_id) {
            Some(w) if w.session_id == session_id => w.check(seq),
            Some(w) if session_id < w.session_id => ReplayVerdict::Stale,
            existing => {
                if let Some(old) = existing {
                    let done = old.estimate();
                    self.closed.received = self.closed.received.saturating_add(done.received);
                    self.closed.expected = self.closed.expected.saturating_add(done.expected);
                }
                self.windows
                    .insert(key_id, SessionWindow::new(session_id, seq));
                ReplayVerdict::Fresh {
                    gap: 0,
                    new_session: true,
                }
            }
        }
    }

    /// Counts a frame that arrived but was dropped before its tag was
    /// checked (a shard of an object held whole already), so that its
    /// number does not read as lost. Its numbers are not trusted: nothing
    /// in the window moves, only a count of the current session's arrivals
    /// grows, and the estimate never counts more arrivals than numbers.
    pub fn count_unopened(&mut self, key_id: u16, session_id: u64) {
        if let Some(w) = self.windows.get_mut(&key_id) {
            if w.session_id == session_id {
                w.unopened += 1;
            }
        }
    }

    /// Received versus numbered frames across all sessions seen. A session's
    /// frames before the first one received are not counted as lost: the
    /// receiver may have started late.
    pub fn loss(&self) -> LossEstimate {
        let mut total = self.closed;
        for w in self.windows.values() {
            let e = w.estimate();
            total.received = total.received.saturating_add(e.received);
            total.expected = total.expected.saturating_add(e.expected);
        }
        total
    }

    /// The newest session per key id, to persist across receiver restarts.
    pub fn sessions(&self) -> Vec<(u16, u64)> {
        self.windows
            .iter()
            .map(|(k, w)| (*k, w.session_id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_repeats_and_accepts_reordering() {
        let mut g = ReplayGuard::new();
        assert!(matches!(
            g.check(1, 10, 0),
            ReplayVerdict::Fresh {
                new_session: true,
                ..
            }
        ));
        assert_eq!(
            g.check(1, 10, 3),
            ReplayVerdict::Fresh {
                gap: 2,
                new_session: false
            }
        );
        assert_eq!(g.check(1, 10, 3), ReplayVerdict::Replayed);
        assert!(matches!(g.check(1, 10, 1), ReplayVerdict::Fresh { .. }));
        assert_eq!(g.check(1, 10, 1), ReplayVerdict::Replayed);
        assert_eq!(g.check(1, 10, 0), ReplayVerdict::Replayed);
    }

    #[test]
    fn refuses_numbers_behind_the_window() {
        let mut g = ReplayGuard::new();
        g.check(1, 10, 0);
        g.check(1, 10, WINDOW + 5);
        assert_eq!(g.check(1, 10, 5), ReplayVerdict::Stale);
        assert!(matches!(g.check(1, 10, 6), ReplayVerdict::Fresh { .. }));
    }

    #[test]
    fn window_slots_are_reused_correctly_after_a_jump() {
        let mut g = ReplayGuard::new();
        g.check(1, 10, 5);
        // 5 + WINDOW maps to the same slot as 5: it must count as new.
        assert!(matches!(
            g.check(1, 10, 5 + WINDOW),
            ReplayVerdict::Fresh { .. }
        ));
        assert_eq!(g.check(1, 10, 5 + WINDOW), ReplayVerdict::Replayed);
    }

    #[test]
    fn restart_is_accepted_and_old_session_refused() {
        let mut g = ReplayGuard::new();
        g.check(1, 10, 100);
        assert!(matches!(
            g.check(1, 11, 0),
            ReplayVerdict::Fresh {
                new_session: true,
                ..
            }
        ));
        assert_eq!(g.check(1, 10, 101), ReplayVerdict::Stale);
        // Sessions are per key id.
        assert!(matches!(
            g.check(2, 5, 0),
            ReplayVerdict::Fresh {
                new_session: true,
                ..
            }
        ));
    }

    #[test]
    fn loss_counts_gaps() {
        let mut g = ReplayGuard::new();
        for s in (0..100).filter(|s| s % 10 != 0) {
            g.check(1, 1, s);
        }
        let l = g.loss();
        // Counting starts at the first frame seen (seq 1): 10, 20 .. 90 lost.
        assert_eq!(l.expected, 99);
        assert_eq!(l.lost(), 9);
    }

    #[test]
    fn frames_dropped_unopened_are_not_lost_and_move_nothing() {
        let mut g = ReplayGuard::new();
        g.check(1, 5, 0);
        // Numbers 1..=40 arrive, but are dropped unopened; 41 is checked.
        for _ in 1..=40 {
            g.count_unopened(1, 5);
        }
        // Another session's, or another key's, say nothing of this one.
        g.count_unopened(1, 4);
        g.count_unopened(2, 5);
        assert!(matches!(
            g.check(1, 5, 41),
            ReplayVerdict::Fresh { gap: 40, .. }
        ));
        assert_eq!(
            g.loss(),
            LossEstimate {
                received: 42,
                expected: 42
            }
        );
        // The window did not move for them: number 7, checked, is new.
        assert!(matches!(g.check(1, 5, 7), ReplayVerdict::Fresh { .. }));
        // However many claim to have arrived, no more than were numbered.
        for _ in 0..1000 {
            g.count_unopened(1, 5);
        }
        assert_eq!(g.loss().lost(), 0);
        assert_eq!(g.loss().expected, 42);
        // A new session closes this one with what it counted.
        g.check(1, 6, 100);
        g.check(1, 6, 102);
        assert_eq!(
            g.loss(),
            LossEstimate {
                received: 44,
                expected: 45
            }
        );
    }
}
