//! The link end: opens the frame sink the configuration names, and the
//! emitter that puts sealed groups on it, in the order the carousel chose
//! them, at the paced rate, with a heartbeat every second.
//!
//! Groups are sealed ahead on worker threads with sequence numbers the
//! carousel reserved for them, and a worker whose turn has come sends the
//! group it sealed itself ([`Link`]): the frames leave from the core whose
//! cache still holds them, and no thread stands between sealing and the
//! socket. A group sealed before its turn is left with the link and sent
//! right after the turn before it, by whichever worker sent that one, so
//! its worker goes on sealing instead of waiting (on two cores the wait
//! took 7 % of the workers' time). Turns follow the order the
//! carousel gave groups out, so frames still leave in sequence order and
//! the pacer sees one stream.
//! `link-tx` only keeps heartbeats going while no group is being sent; a
//! heartbeat takes the next number nobody holds, so it can pass the few
//! groups waiting their turn. The carousel keeps what is reserved and not
//! yet sent within half the receiver's replay window, so those groups
//! still arrive inside it; frames held longer (a paused link, a group
//! larger than that) get fresh numbers before they go.

use crate::config::{LinkConfig, Transport};
use crate::objects::ObjectStore;
use crate::pacing::{Pacer, RateMeter};
use crate::stages::carousel::{CarouselControl, Ticket};
use crate::stages::sealing::SealedGroup;
use crate::status::StatusBoard;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
pub use weir_host::link_setup::LinkSetupError;
use weir_host::{DirSink, FrameSink, LinkError, SerialSink, Shutdown, UdpSink};
use weir_proto::{Body, FrameSealer, Heartbeat};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Frames numbered this far behind the newest number go again with fresh
/// numbers: the receiver refuses what falls a whole window behind, and
/// the diode may reorder a little on top.
const RENUMBER_BEHIND: u64 = weir_proto::replay::WINDOW * 3 / 4;

/// What became of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// All its frames are on the wire.
    Sent,
    /// Its payload could not be read; why.
    Broken(String),
    /// Shutdown came first; it counts as not sent.
    Unsent,
}

/// Told back to the carousel, in the order the groups were given.
pub struct Done {
    pub ticket: Ticket,
    pub outcome: Outcome,
}

/// What heartbeats say of the carousel; it keeps these up to date.
#[derive(Debug, Default)]
pub struct CarouselGauges {
    pub queued_objects: AtomicU32,
    pub pass: AtomicU64,
}

/// Puts sealed groups on the link; heartbeats in between and when idle.
pub struct Emitter {
    pub(crate) sealer: FrameSealer,
    pub(crate) sink: Box<dyn FrameSink>,
    pub(crate) pacer: Pacer,
    pub(crate) batch_max: usize,
    pub(crate) frame_overhead: u64,
    pub(crate) started: Instant,
    pub(crate) last_heartbeat: Option<Instant>,
    pub(crate) fingerprint: u64,
    pub(crate) gauges: Arc<CarouselGauges>,
    /// The next sequence number no group or heartbeat holds.
    pub(crate) next_seq: Arc<AtomicU64>,
    pub(crate) control: Arc<CarouselControl>,
    pub(crate) meter: RateMeter,
    pub(crate) sent: WireTally,
    pub(crate) status: StatusBoard,
    pub(crate) rate_bps: u64,
    /// Where the image ledger's head is read for each heartbeat.
    pub(crate) store: Arc<ObjectStore>,
    pub(crate) heartbeat_frame: Vec<u8>,
}

/// What the emitter has put on the link since it started.
#[derive(Debug, Default)]
pub(crate) struct WireTally {
    frames: u64,
    bytes: u64,
    shard_frames: u64,
    heartbeats: u64,
    link_errors: u64,
    last_link_error: Option<String>,
}

/// The link as the sealing workers share it: the emitter, whose turn it
/// is to send, and the groups sealed ahead of their turn.
pub struct Link {
    state: Mutex<LinkState>,
    /// Locked only with `state` unlocked: by the worker sending (see
    /// [`LinkState::sending`]) and by `link-tx` for a heartbeat.
    emitter: Mutex<Emitter>,
    turn_taken: Condvar,
}

struct LinkState {
    /// The turn (the carousel's count of groups given out) whose group
    /// goes next.
    next_turn: u64,
    /// Groups sealed before their turn came, by turn: whoever sends the
    /// turn before one sends it too, so the worker that sealed it goes on
    /// to its next group instead of waiting.
    ahead: BTreeMap<u64, Handed>,
    /// Buffers of groups sent, for workers to seal into again.
    spare: Vec<SealedGroup>,
    /// A worker is sending `next_turn` (and then whatever waits in
    /// `ahead` after it) with this state unlocked.
    sending: bool,
    /// Why the link stopped, for `link-tx` to report.
    error: Option<LinkError>,
    /// The link failed or a worker died: no turn is taken any more.
    broken: bool,
    /// The workers are gone: `link-tx` stops.
    closed: bool,
}

/// A group handed to the link: its frames, or why it could not be sealed.
struct Handed {
    ticket: Ticket,
    group: SealedGroup,
    broken: Option<String>,
}

/// How long a worker waiting for its turn, or `link-tx` between
/// heartbeats, goes without looking at shutdown.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Groups that may wait sealed ahead of their turn. The carousel gives out
/// about three groups' frames at once (half the replay window), so this
/// never binds with the default window; it bounds memory when groups are
/// small.
const AHEAD_MAX: usize = 4;

impl Link {
    pub fn new(emitter: Emitter) -> Link {
        Link {
            state: Mutex::new(LinkState {
                next_turn: 0,
                ahead: BTreeMap::new(),
                spare: Vec::new(),
                sending: false,
                error: None,
                broken: false,
                closed: false,
            }),
            emitter: Mutex::new(emitter),
            turn_taken: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_emitter(&self) -> MutexGuard<'_, Emitter> {
        self.emitter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands in the group of `turn` (`broken`: why it could not be sealed).
    /// If its turn has come, the worker sends it, then every group handed
    /// in ahead that follows it; otherwise the group waits for whoever
    /// sends the turn before it, and the worker goes on at once (it waits
    /// only when [`AHEAD_MAX`] groups wait already). The carousel is told
    /// on `done` in turn order, under the state lock. Returns a buffer to
    /// seal the next group into, or None when the worker should stop:
    /// shutdown, the link failed, or the carousel hung up.
    pub fn hand_in(
        &self,
        turn: u64,
        ticket: Ticket,
        group: SealedGroup,
        broken: Option<String>,
        done: &Sender<Done>,
        shutdown: &Shutdown,
    ) -> Option<SealedGroup> {
        let mut handed = Handed {
            ticket,
            group,
            broken,
        };
        let mut st = self.lock();
        loop {
            if st.broken || shutdown.is_triggered() {
                return None;
            }
            // Only the holder of `next_turn` sends, and it clears
            // `sending` in the same critical section where it finds no
            // group for the turn after: a worker whose turn it is finds
            // nobody sending.
            if st.next_turn == turn && !st.sending {
                break;
            }
            if st.next_turn != turn && st.ahead.len() < AHEAD_MAX {
                st.ahead.insert(turn, handed);
                return Some(st.spare.pop().unwrap_or_default());
            }
            st = self
                .turn_taken
                .wait_timeout(st, LOOK_EVERY)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.sending = true;
        loop {
            drop(st);
            let mut failed = None;
            let outcome = match handed.broken.take() {
                Some(why) => Outcome::Broken(why),
                None => match self.lock_emitter().send_group(&mut handed.group, shutdown) {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        failed = Some(e);
                        Outcome::Unsent
                    }
                },
            };
            st = self.lock();
            if let Some(e) = failed {
                st.error = Some(e);
                st.broken = true;
                shutdown.trigger();
            }
            st.next_turn += 1;
            let stop = outcome == Outcome::Unsent;
            let told = done
                .send(Done {
                    ticket: handed.ticket,
                    outcome,
                })
                .is_ok();
            let next = if told && !stop {
                let next_turn = st.next_turn;
                st.ahead.remove(&next_turn)
            } else {
                None
            };
            let Some(next) = next else {
                st.sending = false;
                if !told {
                    // The carousel is gone: nobody would learn of the
                    // groups waiting their turn, so none is sent.
                    st.broken = true;
                }
                drop(st);
                self.turn_taken.notify_all();
                return (told && !stop).then_some(handed.group);
            };
            if st.spare.len() < AHEAD_MAX {
                st.spare
                    .push(std::mem::replace(&mut handed.group, next.group));
            } else {
                handed.group = next.group;
            }
            handed.ticket = next.ticket;
            handed.broken = next.broken;
            // A worker waiting for room in `ahead` may hand in now.
            self.turn_taken.notify_all();
        }
    }

    /// A worker died (panicked): the turns after its own would wait for
    /// ever, so nobody takes one any more and the gateway stops.
    pub fn break_off(&self, shutdown: &Shutdown) {
        self.lock().broken = true;
        self.turn_taken.notify_all();
        shutdown.trigger();
    }

    /// The workers are gone: [`Link::keep_heartbeats`] returns.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Runs on `link-tx`: a heartbeat whenever one is due and no group is
    /// being sent (a group's sending sends its own), until the link is
    /// closed or shutdown. The error that stopped the link, if one did; a
    /// frame larger than the link takes is a bug and stops the gateway.
    pub fn keep_heartbeats(&self, shutdown: &Shutdown) -> Result<(), LinkError> {
        loop {
            let (error, stop) = {
                let mut st = self.lock();
                (st.error.take(), st.closed || shutdown.is_triggered())
            };
            let mut emitter = self.lock_emitter();
            if let Some(e) = error {
                emitter.publish_wire();
                return Err(e);
            }
            if stop {
                emitter.publish_wire();
                return Ok(());
            }
            if emitter.heartbeat_due() {
                if let Err(e) = emitter.send_heartbeat() {
                    emitter.publish_wire();
                    drop(emitter);
                    self.lock().broken = true;
                    self.turn_taken.notify_all();
                    shutdown.trigger();
                    return Err(e);
                }
            }
            let wait = HEARTBEAT_EVERY
                .saturating_sub(
                    emitter
                        .last_heartbeat
                        .map(|t| t.elapsed())
                        .unwrap_or_default(),
                )
                .min(LOOK_EVERY);
            drop(emitter);
            shutdown.sleep(wait);
        }
    }
}

impl Emitter {
    fn heartbeat_due(&self) -> bool {
        self.last_heartbeat
            .is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY)
    }

    /// Sends `group` batch by batch; holds it while the console has the
    /// link paused (heartbeats go on).
    fn send_group(
        &mut self,
        group: &mut SealedGroup,
        shutdown: &Shutdown,
    ) -> Result<Outcome, LinkError> {
        let mut at = 0;
        let mut said_paused = false;
        while at < group.len() {
            if shutdown.is_triggered() {
                return Ok(Outcome::Unsent);
            }
            if self.control.is_paused() {
                if !said_paused {
                    tracing::info!(
                        sent = at,
                        left = group.len() - at,
                        "paused mid-group; the rest of the group goes on resume"
                    );
                    said_paused = true;
                }
                if self.heartbeat_due() {
                    self.send_heartbeat()?;
                }
                shutdown.sleep(Duration::from_millis(20));
                continue;
            }
            if self.heartbeat_due() {
                self.send_heartbeat()?;
            }
            let newest = self.next_seq.load(Ordering::SeqCst);
            if newest.saturating_sub(group.seq_of(at)) >= RENUMBER_BEHIND {
                let left = (group.len() - at) as u64;
                let first = self.next_seq.fetch_add(left, Ordering::SeqCst);
                tracing::debug!(frames = left, from = first, "held frames renumbered");
                group.renumber_from(at, first, &self.sealer);
            }
            let end = (at + self.batch_max).min(group.len());
            let shards = (at..end).filter(|&i| group.is_shard(i)).count() as u64;
            let frames: Vec<&[u8]> = group.frames(at, end).collect();
            self.send_batch(&frames)?;
            self.sent.shard_frames += shards;
            at = end;
        }
        Ok(Outcome::Sent)
    }

    fn send_heartbeat(&mut self) -> Result<(), LinkError> {
        self.last_heartbeat = Some(Instant::now());
        let ledger = self.store.ledger_head();
        let hb = Body::Heartbeat(Heartbeat {
            uptime_s: self.started.elapsed().as_secs(),
            queued_objects: self.gauges.queued_objects.load(Ordering::Relaxed),
            pass: self.gauges.pass.load(Ordering::Relaxed),
            config_fingerprint: self.fingerprint,
            sent_frames: self.sent.frames,
            ledger: Some(ledger),
        });
        self.sent.heartbeats += 1;
        self.publish_wire();
        self.status.update(|s| s.ledger = Some(ledger));
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let mut frame = std::mem::take(&mut self.heartbeat_frame);
        frame.clear();
        self.sealer.seal_numbered(seq, &hb, &mut frame);
        let result = self.send_batch(&[&frame]);
        self.heartbeat_frame = frame;
        result
    }

    fn publish_wire(&mut self) {
        let measured = self.meter.rate_bps(Instant::now());
        self.status.update(|s| {
            s.uptime_s = self.started.elapsed().as_secs();
            s.wire.rate_bps = self.rate_bps;
            s.wire.measured_bps = measured;
            s.wire.frames = self.sent.frames;
            s.wire.bytes = self.sent.bytes;
            s.wire.shard_frames = self.sent.shard_frames;
            s.wire.heartbeats = self.sent.heartbeats;
            s.wire.link_errors = self.sent.link_errors;
            s.wire
                .last_link_error
                .clone_from(&self.sent.last_link_error);
        });
    }

    /// Paces and sends one batch. Transport errors lose the frames, as a
    /// diode would, and are counted; a frame too large is a bug.
    fn send_batch(&mut self, frames: &[&[u8]]) -> Result<(), LinkError> {
        let wire: u64 = frames
            .iter()
            .map(|f| f.len() as u64 + self.frame_overhead)
            .sum();
        self.pacer.acquire(wire);
        let n = frames.len() as u64;
        match self.sink.send(frames) {
            Ok(()) => {
                self.sent.frames += n;
                self.sent.bytes += wire;
                self.meter.add(wire, Instant::now());
                Ok(())
            }
            Err(e @ LinkError::FrameTooLarge { .. }) => Err(e),
            Err(e) => {
                self.sent.link_errors += 1;
                self.sent.last_link_error = Some(e.to_string());
                if self.sent.link_errors == 1 || self.sent.link_errors.is_multiple_of(1000) {
                    tracing::warn!(error = %e, errors = self.sent.link_errors, "link send failed; frames lost");
                }
                Ok(())
            }
        }
    }
}

/// Opens the sending end of the configured link.
pub fn open_sink(config: &LinkConfig) -> Result<Box<dyn FrameSink>, LinkSetupError> {
    match config.transport {
        Transport::Udp => {
            let peer = config
                .udp_peer
                .ok_or(LinkSetupError::missing("udp_peer", config.transport))?;
            let sink = UdpSink::connect(peer, config.datagram_size)
                .map_err(LinkSetupError::open("udp_peer", peer))?;
            tracing::info!(%peer, datagram_size = config.datagram_size, gso = sink.gso(),
                "UDP link open");
            Ok(Box::new(sink))
        }
        Transport::Serial => {
            let device = config
                .serial_device
                .clone()
                .ok_or(LinkSetupError::missing("serial_device", config.transport))?;
            // The sink paces itself to the line as well: a one-way line
            // drops what arrives too fast, whatever the carousel believes.
            let sink = SerialSink::open(&device, config.baud, config.datagram_size)
                .map_err(LinkSetupError::open("serial_device", device.display()))?;
            Ok(Box::new(sink))
        }
        Transport::Dir => {
            let dir = config
                .outbox_dir
                .clone()
                .ok_or(LinkSetupError::missing("outbox_dir", config.transport))?;
            std::fs::create_dir_all(&dir).map_err(|e| {
                LinkSetupError::open("outbox_dir", dir.display())(LinkError::io(
                    "creating the outbox",
                    e,
                ))
            })?;
            let sink = DirSink::new(
                &dir,
                config.max_file_bytes,
                Duration::from_millis(config.max_file_age_ms),
            )
            .map_err(LinkSetupError::open("outbox_dir", dir.display()))?;
            tracing::info!(outbox = %dir.display(), max_file_bytes = config.max_file_bytes,
                max_file_age_ms = config.max_file_age_ms, "directory link open");
            Ok(Box::new(sink))
        }
    }
}

/// Keeps every frame sent: the link of the sending stages' tests.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct RecordingSink(pub(crate) Arc<Mutex<Vec<Vec<u8>>>>);

#[cfg(test)]
impl FrameSink for RecordingSink {
    fn send(&mut self, frames: &[&[u8]]) -> Result<(), LinkError> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.extend(frames.iter().map(|f| f.to_vec()));
        Ok(())
    }
    fn max_frame_len(&self) -> usize {
        1400
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(transport: Transport) -> LinkConfig {
        LinkConfig {
            transport,
            udp_peer: Some("127.0.0.1:9".parse().unwrap()),
            serial_device: None,
            baud: 115_200,
            outbox_dir: None,
            max_file_bytes: 1 << 20,
            max_file_age_ms: 1000,
            rate_bps: 1_000_000,
            datagram_size: 1400,
            frame_overhead_bytes: 0,
        }
    }

    #[test]
    fn udp_opens_and_carries_the_datagram_size() {
        let sink = open_sink(&cfg(Transport::Udp)).unwrap();
        assert_eq!(sink.max_frame_len(), 1400);
    }

    #[test]
    fn serial_and_dir_name_their_missing_key() {
        for (t, key) in [
            (Transport::Serial, "link.serial_device"),
            (Transport::Dir, "link.outbox_dir"),
        ] {
            let e = open_sink(&cfg(t)).err().unwrap().to_string();
            assert!(e.contains(key) && e.contains(&t.to_string()), "{e}");
        }
    }

    #[test]
    fn serial_names_a_device_that_cannot_open() {
        let mut c = cfg(Transport::Serial);
        c.serial_device = Some("/nonexistent/ttyS9".into());
        let e = open_sink(&c).err().unwrap().to_string();
        assert!(
            e.contains("link.serial_device") && e.contains("/nonexistent/ttyS9"),
            "{e}"
        );
    }

    #[test]
    fn dir_creates_the_outbox_and_writes_batch_files_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("out/box");
        let mut c = cfg(Transport::Dir);
        c.outbox_dir = Some(outbox.clone());
        let mut sink = open_sink(&c).unwrap();
        assert!(outbox.is_dir());
        assert!(sink.max_frame_len() >= 1400);
        // A frame that parses: a sealed heartbeat.
        let key = weir_proto::Key::from_bytes(1, &[7; 32]).unwrap();
        let mut sealer = weir_proto::FrameSealer::new(key, 1);
        let mut frame = Vec::new();
        sealer.seal(
            &weir_proto::Body::Heartbeat(weir_proto::Heartbeat {
                uptime_s: 1,
                queued_objects: 0,
                pass: 0,
                config_fingerprint: 0,
                sent_frames: 0,
                ledger: None,
            }),
            &mut frame,
        );
        sink.send(&[&frame]).unwrap();
        drop(sink); // flushes the gathered frames into a file
        let files: Vec<_> = std::fs::read_dir(&outbox)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].ends_with(".weir"), "{files:?}");
    }

    /// Groups handed in ahead of their turn leave the worker free at once
    /// and go on the wire right after the turn before them, in turn order,
    /// told back in that order; a worker finding the waiting room full
    /// waits until it has room, and one whose turn comes sends its own.
    #[test]
    fn groups_handed_in_ahead_go_out_in_turn_order_and_free_their_worker() {
        use crate::stages::sealing::{GroupJob, GroupSealer};
        use weir_proto::{Body, FecParams, FrameOpener, Key, KeyRing, ObjectId, ObjectKind};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ObjectStore::open(&dir.path().join("state")).unwrap());
        let key = Key::from_bytes(1, &[7; 32]).unwrap();
        let sealer = FrameSealer::new(key.clone(), 5);
        let wire = RecordingSink::default();
        let link = Link::new(Emitter {
            sealer: sealer.clone(),
            sink: Box::new(wire.clone()),
            pacer: Pacer::new(1_000_000_000, 1 << 20),
            batch_max: 16,
            frame_overhead: 0,
            started: Instant::now(),
            // No heartbeat among the groups: the wire holds groups only.
            last_heartbeat: Some(Instant::now() + Duration::from_secs(3600)),
            fingerprint: 0,
            gauges: Arc::default(),
            next_seq: Arc::new(AtomicU64::new(1_000)),
            control: Arc::default(),
            meter: RateMeter::new(Instant::now()),
            sent: WireTally::default(),
            status: StatusBoard::new(),
            rate_bps: 1_000_000_000,
            store,
            heartbeat_frame: Vec::new(),
        });
        let payload = dir.path().join("payload");
        std::fs::write(&payload, vec![0x5a; 3_000]).unwrap();
        let fec = FecParams::new(4, 2, 100).unwrap().for_object(3_000);
        let mut tools = GroupSealer::new(sealer);
        // Group `turn`: every frame of it numbered turn × 100 + i.
        let mut sealed = |turn: u64| {
            let job = GroupJob {
                object: ObjectId([turn as u8; 32]),
                kind: ObjectKind::Blob,
                len: 3_000,
                fec,
                first_block: 0,
                blocks: fec.blocks_for(3_000),
                path: payload.clone(),
                offset: 0,
                first_seq: turn * 100,
                header_every: 64,
            };
            let mut group = SealedGroup::default();
            tools.seal(&job, &mut group).unwrap();
            let ticket = Ticket {
                object: job.object,
                group: 0,
                frames: group.len() as u64,
                progress: None,
            };
            (ticket, group)
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let shutdown = Shutdown::new();
        let on_wire = || wire.0.lock().unwrap().len();
        let hand_in = |turn: u64, (ticket, group): (Ticket, SealedGroup)| {
            link.hand_in(turn, ticket, group, None, &done_tx, &shutdown)
        };

        // Turns 2 and 1 first: each worker is free at once, nothing leaves.
        assert!(hand_in(2, sealed(2)).is_some());
        assert!(hand_in(1, sealed(1)).is_some());
        assert_eq!(on_wire(), 0);
        // Turn 0 sends itself and both waiting after it.
        assert!(hand_in(0, sealed(0)).is_some());
        let per_group = wire.0.lock().unwrap().len() / 3;
        assert!(per_group > 1);
        // The waiting room takes AHEAD_MAX groups; the next one waits for
        // room, then finds its own turn come and sends it.
        let ahead: Vec<_> = (4..4 + AHEAD_MAX as u64).map(|t| (t, sealed(t))).collect();
        let last = 4 + AHEAD_MAX as u64;
        let (late, early) = (sealed(last), sealed(3));
        std::thread::scope(|scope| {
            for (t, g) in ahead {
                assert!(hand_in(t, g).is_some());
            }
            let waiting = scope.spawn(move || hand_in(last, late));
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                !waiting.is_finished(),
                "a full waiting room makes a worker wait"
            );
            assert_eq!(on_wire(), 3 * per_group);
            assert!(hand_in(3, early).is_some());
            assert!(waiting.join().unwrap().is_some());
        });
        // A group that could not be sealed is told back as such, in turn.
        let (ticket, group) = sealed(last + 1);
        let why = Some("payload missing".to_string());
        assert!(link
            .hand_in(last + 1, ticket, group, why, &done_tx, &shutdown)
            .is_some());

        let opener = FrameOpener::new(KeyRing::new(vec![key]).unwrap());
        let seqs: Vec<u64> = wire
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|f| {
                let frame = opener.open(f).unwrap();
                assert!(!matches!(frame.body, Body::Heartbeat(_)));
                frame.header.seq
            })
            .collect();
        let expected: Vec<u64> = (0..=last)
            .flat_map(|t| (0..per_group as u64).map(move |i| t * 100 + i))
            .collect();
        assert_eq!(seqs, expected);
        let told: Vec<(u8, Outcome)> = done_rx
            .try_iter()
            .map(|d| (d.ticket.object.0[0], d.outcome))
            .collect();
        let mut want: Vec<(u8, Outcome)> = (0..=last).map(|t| (t as u8, Outcome::Sent)).collect();
        want.push(((last + 1) as u8, Outcome::Broken("payload missing".into())));
        assert_eq!(told, want);
    }
}
