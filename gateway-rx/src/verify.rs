//! Verification: every frame's tag is checked (by `FrameOpener::open`, in
//! constant time, before its body is parsed), then its session and sequence
//! number against replays. Only what passes both goes further; everything
//! else is counted by cause and dropped.
//!
//! The two checks come apart ([`Verifier::into_parts`]) so that the link can
//! run the first, which costs a SHA-256 per frame and depends on no other
//! frame, on several threads ([`FrameKeys`]), and the second, which must see
//! frames in the order they were received, on one ([`ReplayCheck`]).

use std::collections::HashMap;
use std::sync::Arc;
use weir_host::reload::ReloadReader;
use weir_proto::{Frame, FrameError, FrameOpener, Header, KeyRing, ReplayGuard, ReplayVerdict};

use crate::state::{now_ms, StateDb, StateError};
use crate::status::Counters;

const SESSIONS_TREE: &str = "sender_sessions";

/// Checks frames for one receiver.
pub struct Verifier {
    keys: FrameKeys,
    replay: ReplayCheck,
}

/// The key ring frames are opened with, following reloads. Shared whole
/// ([`FrameKeys::opener`]) with the threads that open frames: a batch
/// carries the opener it is to be checked with.
pub struct FrameKeys {
    opener: Arc<FrameOpener>,
    /// Key rings a configuration reload sets.
    updates: Option<ReloadReader<KeyRing>>,
}

/// What must see authentic frames in receive order: the session horizon,
/// the sessions of earlier runs, the replay window and the loss estimate.
/// It also counts every frame refused before it, so that all the frame
/// counters move in one place.
pub struct ReplayCheck {
    guard: ReplayGuard,
    /// Newest sender session per key id seen by earlier runs: frames of
    /// older sessions are replays even though this run's guard is fresh.
    floors: HashMap<u16, u64>,
    counters: Arc<Counters>,
    sessions: Option<SessionBook>,
    /// How far ahead of this clock a session may start, in ms.
    horizon_ms: u64,
    /// Session ids up to this one are within the horizon (as of the last
    /// clock read): the clock is read only when a frame claims more.
    session_limit: u64,
    /// The last session refused as too far ahead, so the warning is logged
    /// once per session, not per frame.
    last_refused: Option<u64>,
}

/// The highest session id a sender whose clock reads `now_ms` plus
/// `horizon_ms` can draw (see `weir_proto::new_session_id`).
fn session_limit(now_ms: u64, horizon_ms: u64) -> u64 {
    now_ms
        .saturating_add(horizon_ms)
        .checked_shl(16)
        .filter(|v| v >> 16 == now_ms.saturating_add(horizon_ms))
        .map_or(u64::MAX, |v| v | 0xffff)
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

    /// Forgets the newest session of `key_id` (of every key id if None), so
    /// that the next session the sender starts is accepted whatever its id.
    /// Returns what was forgotten. The caller commits.
    pub fn forget(&self, key_id: Option<u16>) -> Result<Vec<(u16, u64)>, StateError> {
        let all = self.load()?;
        let mut gone = Vec::new();
        for (k, v) in all {
            if key_id.is_none_or(|id| id == k) {
                self.tree
                    .remove(k.to_be_bytes())
                    .map_err(|e| self.db.sled_error(e))?;
                gone.push((k, v));
            }
        }
        gone.sort_unstable();
        Ok(gone)
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
        let horizon_ms = crate::config::DEFAULT_MAX_SESSION_AHEAD_HOURS * 3_600_000;
        Ok(Verifier {
            keys: FrameKeys {
                opener: Arc::new(FrameOpener::new(keys)),
                updates: None,
            },
            replay: ReplayCheck {
                guard: ReplayGuard::new(),
                floors,
                counters,
                sessions,
                horizon_ms,
                session_limit: 0,
                last_refused: None,
            }
            .within_horizon(),
        })
    }

    /// Takes the key rings a reload sets (see [`Verifier::pick_up_keys`]).
    pub fn with_key_updates(mut self, keys: ReloadReader<KeyRing>) -> Verifier {
        self.keys.updates = Some(keys);
        self
    }

    /// Verifies with the key ring a reload set, if one was set since the
    /// last look. Sessions and replay windows of key ids kept stay as
    /// they were.
    pub fn pick_up_keys(&mut self) {
        self.keys.pick_up_keys();
    }

    /// Sets how far ahead of this clock a session may start.
    pub fn with_session_horizon_hours(mut self, hours: u64) -> Verifier {
        self.replay.horizon_ms = hours.saturating_mul(3_600_000);
        self.replay.session_limit = 0;
        self.replay = self.replay.within_horizon();
        self
    }

    /// The frame if it is authentic and new; otherwise None, counted.
    pub fn admit<'a>(&mut self, datagram: &'a [u8]) -> Option<Frame<'a>> {
        match self.keys.opener.open(datagram) {
            Ok(frame) => self.replay.admit(&frame.header).then_some(frame),
            Err(e) => {
                self.replay.refuse(&e);
                None
            }
        }
    }

    /// Publishes the loss estimate (from sequence gaps) to the counters.
    pub fn publish_loss(&self) {
        self.replay.publish_loss();
    }

    /// The check that may run on many threads at once, and the one that
    /// must see authentic frames one at a time in receive order.
    pub fn into_parts(self) -> (FrameKeys, ReplayCheck) {
        (self.keys, self.replay)
    }
}

impl FrameKeys {
    /// Opens with the key ring a reload set, if one was set since the last
    /// look. Batches handed out before keep the opener they carry.
    pub fn pick_up_keys(&mut self) {
        let Some(updates) = &mut self.updates else {
            return;
        };
        if let Some(ring) = updates.changed() {
            tracing::info!(key_ids = ?ring.ids(), "verifying with the reloaded keys");
            self.opener = Arc::new(FrameOpener::new((*ring).clone()));
        }
    }

    /// The opener of the current key ring.
    pub fn opener(&self) -> &Arc<FrameOpener> {
        &self.opener
    }
}

impl ReplayCheck {
    /// Drops remembered floors beyond the horizon: a store written before
    /// sessions were bounded may hold a forged far-future one, which would
    /// keep every real session stale for good.
    fn within_horizon(mut self) -> ReplayCheck {
        let limit = session_limit(now_ms(), self.horizon_ms);
        self.floors.retain(|&key_id, &mut session| {
            let keep = session <= limit;
            if !keep {
                tracing::warn!(
                    key_id,
                    session_id = session,
                    "remembered sender session lies beyond the session horizon; forgotten"
                );
            }
            keep
        });
        self
    }

    /// Counts a frame `FrameOpener::open` refused. Its header was never
    /// trusted, so nothing else moves.
    pub fn refuse(&self, error: &FrameError) {
        let c = &self.counters;
        match error {
            FrameError::BadTag => Counters::add(&c.frames_bad_tag, 1),
            FrameError::UnknownKey(id) => {
                Counters::add(&c.frames_unknown_key, 1);
                tracing::debug!(key_id = id, "frame signed with an unknown key id");
            }
            e => {
                Counters::add(&c.frames_malformed, 1);
                tracing::trace!(error = %e, "malformed frame");
            }
        }
    }

    /// Counts a shard frame dropped unopened, its object held whole. Its
    /// header was never trusted: it counts as an arrival in the loss
    /// estimate of its session, if that is the current one, and nothing
    /// else moves.
    pub fn unopened(&mut self, h: &Header) {
        Counters::add(&self.counters.frames_held_unopened, 1);
        self.guard.count_unopened(h.key_id, h.session_id);
    }

    /// Whether the frame with this header, whose tag verified, is new; it
    /// is counted either way. Only ever call it on authenticated headers:
    /// it moves the replay window.
    pub fn admit(&mut self, h: &Header) -> bool {
        let c = &self.counters;
        // The clock is read only when a frame claims more than the last
        // limit allowed.
        if h.session_id > self.session_limit {
            self.session_limit = session_limit(now_ms(), self.horizon_ms);
        }
        if h.session_id > self.session_limit {
            Counters::add(&c.frames_future_session, 1);
            if self.last_refused != Some(h.session_id) {
                self.last_refused = Some(h.session_id);
                tracing::warn!(key_id = h.key_id, session_id = h.session_id,
                    "authentic frames of a sender session that starts too far ahead of this clock are refused \
                     (a sender holding the key, or clocks apart by more than auth.max_session_ahead_hours)");
            }
            return false;
        }
        if self
            .floors
            .get(&h.key_id)
            .is_some_and(|&floor| h.session_id < floor)
        {
            Counters::add(&c.frames_replayed, 1);
            return false;
        }
        match self.guard.check(h.key_id, h.session_id, h.seq) {
            ReplayVerdict::Replayed | ReplayVerdict::Stale => {
                Counters::add(&c.frames_replayed, 1);
                false
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
                true
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
pub(crate) mod tests {
    use super::*;
    use weir_proto::{Body, FrameSealer, Heartbeat, Key};

    fn key(id: u16, fill: u8) -> Key {
        Key::from_bytes(id, &[fill; 32]).unwrap()
    }

    /// A heartbeat body of sender pass `pass`, the rest zero.
    pub(crate) fn heartbeat(pass: u64) -> Body<'static> {
        Body::Heartbeat(Heartbeat {
            uptime_s: 1,
            queued_objects: 0,
            pass,
            config_fingerprint: 0,
            sent_frames: 0,
            ledger: None,
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
    fn a_key_added_by_a_reload_is_accepted_and_sessions_of_kept_keys_stay() {
        let counters = Arc::new(Counters::default());
        let ring = weir_host::reload::Reloadable::new(KeyRing::new(vec![key(1, 7)]).unwrap());
        let mut v = Verifier::new((*ring.current()).clone(), None, counters.clone())
            .unwrap()
            .with_key_updates(ring.reader());
        let mut first = FrameSealer::new(key(1, 7), 100);
        let mut second = FrameSealer::new(key(3, 9), 100);
        let replayed = sealed(&mut first, 1);
        assert!(v.admit(&replayed).is_some());
        assert!(v.admit(&sealed(&mut second, 2)).is_none());
        v.pick_up_keys();
        assert!(
            v.admit(&sealed(&mut second, 3)).is_none(),
            "not yet reloaded"
        );
        ring.set(KeyRing::new(vec![key(1, 7), key(3, 9)]).unwrap());
        v.pick_up_keys();
        assert!(v.admit(&sealed(&mut second, 4)).is_some());
        assert!(v.admit(&replayed).is_none(), "key 1's replay window stays");
        assert!(v.admit(&sealed(&mut first, 5)).is_some());
        assert_eq!(get(&counters.frames_unknown_key), 2);
        assert_eq!(get(&counters.frames_replayed), 1);
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

    /// A session id as the real sender draws it, from this clock.
    fn real_session() -> u64 {
        weir_proto::new_session_id(None, now_ms(), 7)
    }

    /// A sender holding the key signs a heartbeat in session 2^64 - 1: it is
    /// refused and counted, and the real sender's session goes on, before
    /// and after a restart of the receiver.
    #[test]
    fn a_forged_far_future_session_cannot_make_the_real_one_stale() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let book = SessionBook::open(&db).unwrap();
        let counters = Arc::new(Counters::default());
        let mut v = verifier(&counters, Some(book.clone()));
        let mut real = FrameSealer::new(key(1, 7), real_session());
        assert!(v.admit(&sealed(&mut real, 1)).is_some());
        let mut poison = FrameSealer::new(key(1, 7), u64::MAX);
        assert!(v.admit(&sealed(&mut poison, 2)).is_none());
        // Just past the horizon is refused too; just inside is not.
        let day = 24 * 3_600_000;
        let mut late = FrameSealer::new(key(2, 8), (now_ms() + day + 60_000) << 16);
        assert!(v.admit(&sealed(&mut late, 3)).is_none());
        assert!(v.admit(&sealed(&mut real, 4)).is_some());
        assert_eq!(get(&counters.frames_future_session), 2);
        drop(v);
        let v2_counters = Arc::new(Counters::default());
        let mut v2 = verifier(&v2_counters, Some(book));
        assert!(v2.admit(&sealed(&mut real, 5)).is_some());
    }

    /// A store written before sessions were bounded may hold a forged floor:
    /// it is forgotten at open, and `forget` clears any floor by hand.
    #[test]
    fn a_remembered_floor_beyond_the_horizon_is_forgotten_and_floors_can_be_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let book = SessionBook::open(&db).unwrap();
        book.record(1, u64::MAX);
        let counters = Arc::new(Counters::default());
        let mut v = verifier(&counters, Some(book.clone()));
        let mut real = FrameSealer::new(key(1, 7), real_session());
        assert!(v.admit(&sealed(&mut real, 1)).is_some());
        drop(v);
        // The real session is now the floor of key 1; key 2 gets one too.
        book.record(2, 5);
        let gone = book.forget(Some(2)).unwrap();
        assert_eq!(gone, vec![(2, 5)]);
        assert_eq!(book.load().unwrap().len(), 1);
        assert_eq!(book.forget(None).unwrap().len(), 1);
        assert!(book.load().unwrap().is_empty());
    }
}
