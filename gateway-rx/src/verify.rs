//! Verification: every frame's tag is checked (by `FrameOpener::open`, in
//! constant time, before its body is parsed), then its session and sequence
//! number against replays. Only what passes both goes further; everything
//! else is counted by cause and dropped.

use std::collections::HashMap;
use std::sync::Arc;
use weir_proto::{Frame, FrameError, FrameOpener, KeyRing, ReplayGuard, ReplayVerdict};

use crate::state::{StateDb, StateError};
use crate::status::Counters;

const SESSIONS_TREE: &str = "sender_sessions";

/// Checks frames for one receiver.
pub struct Verifier {
    opener: FrameOpener,
    guard: ReplayGuard,
    /// Newest sender session per key id seen by earlier runs: frames of
    /// older sessions are replays even though this run's guard is fresh.
    floors: HashMap<u16, u64>,
    counters: Arc<Counters>,
    sessions: Option<SessionBook>,
}

/// Where the newest session per key id is kept across restarts.
#[derive(Clone)]
pub struct SessionBook {
    tree: sled::Tree,
    db: StateDb,
}

impl SessionBook {
    pub fn open(db: &StateDb) -> Result<SessionBook, StateError> {
        Ok(SessionBook {
            tree: db.tree(SESSIONS_TREE)?,
            db: db.clone(),
        })
    }

    pub fn load(&self) -> Result<HashMap<u16, u64>, StateError> {
        let mut out = HashMap::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            if let (Ok(k), Ok(v)) = (<[u8; 2]>::try_from(&k[..]), <[u8; 8]>::try_from(&v[..])) {
                out.insert(u16::from_be_bytes(k), u64::from_be_bytes(v));
            }
        }
        Ok(out)
    }

    /// Recorded lazily: sled writes it out with the next commit. Losing it
    /// costs nothing but accepting an old session's (idempotent) shards.
    fn record(&self, key_id: u16, session_id: u64) {
        if let Err(e) = self
            .tree
            .insert(key_id.to_be_bytes(), &session_id.to_be_bytes()[..])
        {
            tracing::warn!(error = %e, "could not record the sender session");
        }
    }
}

impl Verifier {
    pub fn new(
        keys: KeyRing,
        sessions: Option<SessionBook>,
        counters: Arc<Counters>,
    ) -> Result<Verifier, StateError> {
        let floors = match &sessions {
            Some(book) => book.load()?,
            None => HashMap::new(),
        };
        Ok(Verifier {
            opener: FrameOpener::new(keys),
            guard: ReplayGuard::new(),
            floors,
            counters,
            sessions,
        })
    }

    /// The frame if it is authentic and new; otherwise None, counted.
    pub fn admit<'a>(&mut self, datagram: &'a [u8]) -> Option<Frame<'a>> {
        let c = &self.counters;
        let frame = match self.opener.open(datagram) {
            Ok(f) => f,
            Err(FrameError::BadTag) => {
                Counters::add(&c.frames_bad_tag, 1);
                return None;
            }
            Err(FrameError::UnknownKey(id)) => {
                Counters::add(&c.frames_unknown_key, 1);
                tracing::debug!(key_id = id, "frame signed with an unknown key id");
                return None;
            }
            Err(e) => {
                Counters::add(&c.frames_malformed, 1);
                tracing::trace!(error = %e, "malformed frame");
                return None;
            }
        };
        let h = &frame.header;
        if self
            .floors
            .get(&h.key_id)
            .is_some_and(|&floor| h.session_id < floor)
        {
            Counters::add(&c.frames_replayed, 1);
            return None;
        }
        match self.guard.check(h.key_id, h.session_id, h.seq) {
            ReplayVerdict::Replayed | ReplayVerdict::Stale => {
                Counters::add(&c.frames_replayed, 1);
                None
            }
            ReplayVerdict::Fresh { new_session, .. } => {
                if new_session {
                    tracing::info!(
                        key_id = h.key_id,
                        session_id = h.session_id,
                        "sender session started"
                    );
                    self.floors.insert(h.key_id, h.session_id);
                    if let Some(book) = &self.sessions {
                        book.record(h.key_id, h.session_id);
                    }
                }
                Counters::add(&c.frames_accepted, 1);
                Some(frame)
            }
        }
    }

    /// Publishes the loss estimate (from sequence gaps) to the counters.
    pub fn publish_loss(&self) {
        let loss = self.guard.loss();
        Counters::set(&self.counters.frames_lost_estimate, loss.lost());
        Counters::set(&self.counters.frames_expected, loss.expected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::{Body, FrameSealer, Heartbeat, Key};

    fn key(id: u16, fill: u8) -> Key {
        Key::from_bytes(id, &[fill; 32]).unwrap()
    }

    fn heartbeat(pass: u64) -> Body<'static> {
        Body::Heartbeat(Heartbeat {
            uptime_s: 1,
            queued_objects: 0,
            pass,
            config_fingerprint: 0,
            sent_frames: 0,
        })
    }

    fn sealed(sealer: &mut FrameSealer, pass: u64) -> Vec<u8> {
        let mut out = Vec::new();
        sealer.seal(&heartbeat(pass), &mut out);
        out
    }

    fn verifier(counters: &Arc<Counters>, book: Option<SessionBook>) -> Verifier {
        Verifier::new(
            KeyRing::new(vec![key(1, 7), key(2, 8)]).unwrap(),
            book,
            counters.clone(),
        )
        .unwrap()
    }

    fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn each_cause_of_refusal_is_counted_and_nothing_refused_passes() {
        let counters = Arc::new(Counters::default());
        let mut v = verifier(&counters, None);
        let mut sealer = FrameSealer::new(key(1, 7), 100);

        let good = sealed(&mut sealer, 1);
        assert!(v.admit(&good).is_some());
        // The same frame again: a replay.
        assert!(v.admit(&good).is_none());
        // A flipped bit anywhere: the tag fails.
        let mut corrupted = sealed(&mut sealer, 2);
        corrupted[30] ^= 1;
        assert!(v.admit(&corrupted).is_none());
        // The right key id with the wrong secret: a forgery, bad tag.
        let mut forger = FrameSealer::new(key(1, 99), 100);
        assert!(v.admit(&sealed(&mut forger, 3)).is_none());
        // A key id the receiver does not have.
        let mut stranger = FrameSealer::new(key(9, 7), 100);
        assert!(v.admit(&sealed(&mut stranger, 4)).is_none());
        // Garbage and a truncated frame.
        assert!(v.admit(b"not a frame at all, clearly not one").is_none());
        let whole = sealed(&mut sealer, 5);
        assert!(v.admit(&whole[..whole.len() - 1]).is_none());
        // A second accepted key.
        let mut other = FrameSealer::new(key(2, 8), 5);
        assert!(v.admit(&sealed(&mut other, 6)).is_some());

        assert_eq!(get(&counters.frames_accepted), 2);
        assert_eq!(get(&counters.frames_replayed), 1);
        assert_eq!(get(&counters.frames_bad_tag), 2);
        assert_eq!(get(&counters.frames_unknown_key), 1);
        assert_eq!(get(&counters.frames_malformed), 2);
    }

    #[test]
    fn sequence_gaps_are_reported_as_loss() {
        let counters = Arc::new(Counters::default());
        let mut v = verifier(&counters, None);
        let mut sealer = FrameSealer::new(key(1, 7), 100);
        let frames: Vec<Vec<u8>> = (0..10).map(|i| sealed(&mut sealer, i)).collect();
        for (i, f) in frames.iter().enumerate() {
            if i != 3 && i != 7 {
                assert!(v.admit(f).is_some());
            }
        }
        v.publish_loss();
        assert_eq!(get(&counters.frames_lost_estimate), 2);
        assert_eq!(get(&counters.frames_expected), 10);
    }

    #[test]
    fn an_older_session_is_refused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let book = SessionBook::open(&db).unwrap();
        let mut old = FrameSealer::new(key(1, 7), 100);
        let captured = sealed(&mut old, 1);
        {
            let counters = Arc::new(Counters::default());
            let mut v = verifier(&counters, Some(book.clone()));
            assert!(v.admit(&captured).is_some());
            // The sender restarts with a newer session.
            let mut new = FrameSealer::new(key(1, 7), 200);
            assert!(v.admit(&sealed(&mut new, 2)).is_some());
        }
        // The receiver restarts; the captured frame of session 100 comes back.
        let counters = Arc::new(Counters::default());
        let mut v = verifier(&counters, Some(book));
        assert!(v.admit(&captured).is_none());
        assert_eq!(get(&counters.frames_replayed), 1);
    }
}
