//! The carousel: which object goes on the wire next, and putting it there.
//!
//! Every object is cut into FEC blocks; blocks are sent in *groups* of about
//! `window_blocks` (the groups of proto's `interleave`), each group's shards
//! interleaved so a burst of lost frames costs each block few shards. A group
//! is also the unit of scheduling:
//!
//! - **Passes.** Each object is owed `passes` passes. Its progress (passes
//!   done, next group) is written to sled after every group, so a restart
//!   resumes mid-pass instead of starting over.
//! - **New before repeats.** Only objects at the lowest owed pass among all
//!   objects still owed passes are eligible: an image dropped now has its
//!   first pass before anyone's second.
//! - **Small never waits behind large.** Eligible images take turns, one
//!   group each, round-robin; within an image its objects go in order: the
//!   image object, then the blobs, then (uncounted) the image object again,
//!   so a receiver sees the transfer manifest early and late in each pass.
//! - **Idle cycling.** When nothing is owed, images ingested within the
//!   retention window keep cycling, least-sent objects first, so a receiver
//!   that was down catches up. Those passes are counted too (and persisted).
//! - **Headers and heartbeats.** Each group starts with the object's header
//!   frame, repeated every `header_every` shard frames; a heartbeat goes out
//!   every second, also when idle.
//! - **Console control** ([`CarouselControl`]). `pause` stops shard frames
//!   at the next batch (the link holds the groups under way, heartbeats go
//!   on); `resume` continues them. Pausing is not persisted: a restarted
//!   sender sends. `resend` owes an image's objects `passes` new passes,
//!   whatever they had done.
//! - **Threads.** This stage schedules and reserves sequence numbers; the
//!   groups are sealed by workers ([`crate::stages::sealing`]) and sent in
//!   order by the link thread ([`crate::stages::emit`]), which tells each
//!   one back: its progress is persisted only then.
//!
//! A blob shared by two images is one object: it crosses once per pass. An
//! image dropped later that needs a blob whose passes are done re-arms it for
//! `passes` more, since the sender cannot know whether the receiver kept it.

use crate::config::TxConfig;
use crate::objects::{unix_now, ImageRecord, ObjectProgress, ObjectStore, StoreError};
use crate::pacing::{Pacer, RateMeter, TokenBucket};
use crate::stages::emit::{CarouselGauges, Done, Emitter, Link, Outcome, WireTally};
use crate::stages::sealing::{group_frames, run_worker, GroupJob, Work};
use crate::status::{
    ImageState, ImageStatus, ObjectsStatus, QueueStatus, SenderState, StatusBoard,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_host::{FrameSink, LinkError, Shutdown};
use weir_proto::{FecParams, FrameSealer, Key, ObjectId, ObjectKind};

/// How often status.json is refreshed from the schedule.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Groups given out and not yet sent: enough to keep every worker busy
/// while the link sends.
const MAX_JOBS: usize = 8;
/// Frames reserved and not yet sent, at most (one larger group aside).
const MAX_AHEAD: u64 = weir_proto::replay::WINDOW / 2;
/// Expired images and unreferenced payload files are swept this often.
const GC_EVERY: Duration = Duration::from_secs(600);
/// An unreferenced payload younger than this may belong to an ingest that
/// has not committed yet; it is spared.
const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

/// What the carousel needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct CarouselSettings {
    pub fec: FecParams,
    pub passes: u64,
    pub retention_s: u64,
    pub window_blocks: u32,
    pub header_every: u32,
    pub rate_bps: u64,
    pub frame_overhead: u32,
    pub datagram_size: usize,
    pub fingerprint: u64,
    /// `[ledger] keep_records`.
    pub ledger_keep_records: u64,
}

impl CarouselSettings {
    pub fn from_config(c: &TxConfig, key: &Key) -> Result<Self, weir_proto::FecError> {
        let pacing = c.pacing();
        Ok(CarouselSettings {
            fec: c.fec_params()?,
            passes: c.carousel.passes as u64,
            retention_s: c.carousel.retention_hours * 3600,
            window_blocks: c.carousel.window_blocks,
            header_every: c.carousel.header_every,
            rate_bps: pacing.rate_bps,
            frame_overhead: pacing.frame_overhead,
            datagram_size: c.link.datagram_size,
            fingerprint: c.fingerprint(key),
            ledger_keep_records: c.ledger.keep_records,
        })
    }
}

/// What the console asks of the carousel; the carousel looks between frames.
#[derive(Debug, Default)]
pub struct CarouselControl {
    paused: AtomicBool,
    resend: Mutex<Vec<ObjectId>>,
}

impl CarouselControl {
    /// Stops shard frames; returns false if already paused.
    pub fn pause(&self) -> bool {
        !self.paused.swap(true, Ordering::SeqCst)
    }

    /// Lets shard frames go again; returns false if not paused.
    pub fn resume(&self) -> bool {
        self.paused.swap(false, Ordering::SeqCst)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Asks for new passes of the image whose image object is `image`.
    pub fn request_resend(&self, image: ObjectId) {
        self.resend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(image);
    }

    pub(crate) fn take_resends(&self) -> Vec<ObjectId> {
        std::mem::take(&mut *self.resend.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Groups an object of `blocks` blocks is sent in (proto's interleave groups).
pub fn group_count(blocks: u32, window: u32) -> u32 {
    (blocks / window.max(1)).max(1)
}

/// First block and block count of group `g`.
pub fn group_span(blocks: u32, window: u32, g: u32) -> (u32, u32) {
    let groups = group_count(blocks, window);
    let base = blocks / groups;
    let extra = blocks % groups;
    (g * base + g.min(extra), base + u32::from(g < extra))
}

#[derive(Debug, Clone)]
struct Tracked {
    kind: ObjectKind,
    len: u64,
    progress: ObjectProgress,
    broken: bool,
}

impl Tracked {
    fn pending(&self) -> bool {
        !self.broken && self.progress.passes_done < self.progress.target
    }
}

#[derive(Debug, Clone)]
struct Queued {
    record: ImageRecord,
    id: ObjectId,
    /// The image object first, then its blobs.
    members: Vec<ObjectId>,
}

/// One group of one object, chosen for the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    pub object: ObjectId,
    pub group: u32,
    /// Whose turn it is (round-robin is between images).
    pub image: ObjectId,
    /// An owed pass (true) or idle cycling (false).
    pub owed: bool,
    /// The pass level the turn was chosen at.
    pub level: u64,
}

/// Images and objects that left the carousel.
#[derive(Debug, Default)]
pub struct Expired {
    pub images: Vec<ImageRecord>,
    /// Objects no image left in the carousel names.
    pub objects: Vec<ObjectId>,
}

/// The scheduling state, free of I/O.
pub struct Schedule {
    fec: FecParams,
    window: u32,
    passes: u64,
    retention_s: u64,
    objects: HashMap<ObjectId, Tracked>,
    images: Vec<Queued>,
    /// Seq of the image served last.
    cursor: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("image record {image}: {why}")]
pub struct BadRecord {
    pub image: String,
    pub why: String,
}

impl Schedule {
    pub fn new(fec: FecParams, window: u32, passes: u64, retention_s: u64) -> Self {
        Schedule {
            fec,
            window: window.max(1),
            passes: passes.max(1),
            retention_s,
            objects: HashMap::new(),
            images: Vec::new(),
            cursor: None,
        }
    }

    pub fn groups_of(&self, len: u64) -> u32 {
        group_count(self.fec.for_object(len).blocks_for(len), self.window)
    }

    /// Owed pass an object is on (0 = first), counted from when it was armed.
    fn level(&self, t: &Tracked) -> u64 {
        let armed_at = t.progress.target.saturating_sub(self.passes);
        t.progress.passes_done.saturating_sub(armed_at)
    }

    /// Adds an image. `fresh` for a new ingest (re-arms shared objects whose
    /// passes are done), false when reloading the queue at start. `stored`
    /// gives persisted progress. Returns progress to persist.
    pub fn add_image(
        &mut self,
        record: ImageRecord,
        fresh: bool,
        stored: &dyn Fn(&ObjectId) -> Option<ObjectProgress>,
    ) -> Result<Vec<(ObjectId, ObjectProgress)>, BadRecord> {
        let bad = |why: String| BadRecord {
            image: record.image.clone(),
            why,
        };
        let id = ObjectId::from_digest(&record.image).map_err(|e| bad(e.to_string()))?;
        if self.images.iter().any(|q| q.id == id) {
            return Ok(Vec::new());
        }
        let mut members = vec![(id, ObjectKind::Image, record.image_len)];
        for b in &record.blobs {
            let bid = ObjectId::from_digest(&b.digest).map_err(|e| bad(e.to_string()))?;
            if !members.iter().any(|(m, _, _)| *m == bid) {
                members.push((bid, ObjectKind::Blob, b.size));
            }
        }
        let mut changed = Vec::new();
        for &(mid, kind, len) in &members {
            let groups = self.groups_of(len);
            let passes = self.passes;
            let fec = self.fec.for_object(len);
            if let Some(t) = self.objects.get_mut(&mid) {
                if fresh && t.progress.passes_done >= t.progress.target {
                    t.progress.target = t.progress.passes_done + passes;
                    t.progress.next_group = 0;
                    changed.push((mid, t.progress));
                }
                continue;
            }
            let mut progress = match stored(&mid) {
                Some(mut p) => {
                    if p.fec != fec || p.next_group >= groups {
                        // Another layout: the pass under way starts again.
                        p.fec = fec;
                        p.next_group = 0;
                        changed.push((mid, p));
                    }
                    p
                }
                None => {
                    let p = ObjectProgress {
                        passes_done: 0,
                        target: passes,
                        next_group: 0,
                        fec,
                    };
                    changed.push((mid, p));
                    p
                }
            };
            if fresh && progress.passes_done >= progress.target {
                progress.target = progress.passes_done + passes;
                progress.next_group = 0;
                changed.retain(|(c, _)| *c != mid);
                changed.push((mid, progress));
            }
            self.objects.insert(
                mid,
                Tracked {
                    kind,
                    len,
                    progress,
                    broken: false,
                },
            );
        }
        let pos = self
            .images
            .iter()
            .position(|q| q.record.seq > record.seq)
            .unwrap_or(self.images.len());
        self.images.insert(
            pos,
            Queued {
                record,
                id,
                members: members.into_iter().map(|(m, _, _)| m).collect(),
            },
        );
        Ok(changed)
    }

    fn retained(&self, q: &Queued, now: u64) -> bool {
        q.record.ingested_at.saturating_add(self.retention_s) > now
    }

    /// The eligibility rule of this moment: owed passes at the lowest level,
    /// else idle cycling of retained images at the lowest pass count.
    fn mode(&self, now: u64) -> Option<(bool, u64)> {
        let owed = self
            .objects
            .values()
            .filter(|t| t.pending())
            .map(|t| self.level(t))
            .min();
        if let Some(level) = owed {
            return Some((true, level));
        }
        self.images
            .iter()
            .filter(|q| self.retained(q, now))
            .flat_map(|q| q.members.iter())
            .filter_map(|m| self.objects.get(m))
            .filter(|t| !t.broken)
            .map(|t| t.progress.passes_done)
            .min()
            .map(|l| (false, l))
    }

    fn eligible(&self, id: &ObjectId, owed: bool, level: u64) -> bool {
        match self.objects.get(id) {
            None => false,
            Some(t) if t.broken => false,
            Some(t) if owed => t.pending() && self.level(t) == level,
            Some(t) => t.progress.passes_done == level,
        }
    }

    /// The next group to send, or None when there is nothing to send.
    pub fn next_turn(&mut self, now: u64) -> Option<Turn> {
        let (owed, level) = self.mode(now)?;
        let n = self.images.len();
        // Round-robin: the first image after the one served last.
        let start = match self.cursor {
            Some(c) => self
                .images
                .iter()
                .position(|q| q.record.seq > c)
                .unwrap_or(0),
            None => 0,
        };
        for i in 0..n {
            let q = &self.images[(start + i) % n];
            if !owed && !self.retained(q, now) {
                continue;
            }
            if let Some(m) = q.members.iter().find(|m| self.eligible(m, owed, level)) {
                let t = &self.objects[m];
                let turn = Turn {
                    object: *m,
                    group: t.progress.next_group,
                    image: q.id,
                    owed,
                    level,
                };
                self.cursor = Some(q.record.seq);
                return Some(turn);
            }
        }
        None
    }

    /// Records that the turn's group went out. Returns the object's new
    /// progress and the image objects to send again (uncounted) because
    /// their image's last blob of this pass just went.
    pub fn finish_turn(&mut self, turn: &Turn) -> (ObjectProgress, Vec<ObjectId>) {
        let groups = match self.objects.get(&turn.object) {
            Some(t) => self.groups_of(t.len),
            None => return (self.fresh_progress(), Vec::new()),
        };
        let Some(t) = self.objects.get_mut(&turn.object) else {
            return (self.fresh_progress(), Vec::new());
        };
        t.progress.next_group += 1;
        let mut pass_done = false;
        if t.progress.next_group >= groups {
            t.progress.next_group = 0;
            t.progress.passes_done += 1;
            pass_done = true;
        }
        let progress = t.progress;
        let mut trailers = Vec::new();
        if pass_done {
            for q in &self.images {
                if q.id == turn.object || !q.members.contains(&turn.object) {
                    continue;
                }
                let more = q.members[1..]
                    .iter()
                    .any(|m| self.eligible(m, turn.owed, turn.level));
                if !more {
                    trailers.push(q.id);
                }
            }
        }
        (progress, trailers)
    }

    fn fresh_progress(&self) -> ObjectProgress {
        ObjectProgress {
            passes_done: 0,
            target: self.passes,
            next_group: 0,
            fec: self.fec,
        }
    }

    /// Owes every object of `image` `passes` new passes, whether it was
    /// still sending, done or idle-cycling; a pass under way goes on and
    /// counts. Returns the progress to persist, or `None` for an image not
    /// in the carousel.
    pub fn rearm_image(&mut self, image: &ObjectId) -> Option<Vec<(ObjectId, ObjectProgress)>> {
        let members = self.images.iter().find(|q| q.id == *image)?.members.clone();
        let mut changed = Vec::new();
        for m in members {
            if let Some(t) = self.objects.get_mut(&m) {
                if t.progress.passes_done >= t.progress.target {
                    t.progress.next_group = 0;
                }
                t.progress.target = t.progress.target.max(t.progress.passes_done + self.passes);
                changed.push((m, t.progress));
            }
        }
        Some(changed)
    }

    /// The payload is unreadable: stop choosing it (logged by the caller).
    /// True the first time.
    pub fn mark_broken(&mut self, id: &ObjectId) -> bool {
        match self.objects.get_mut(id) {
            Some(t) => !std::mem::replace(&mut t.broken, true),
            None => false,
        }
    }

    pub fn object(&self, id: &ObjectId) -> Option<(ObjectKind, u64)> {
        self.objects.get(id).map(|t| (t.kind, t.len))
    }

    pub fn progress(&self, id: &ObjectId) -> Option<ObjectProgress> {
        self.objects.get(id).map(|t| t.progress)
    }

    pub fn references(&self, id: &ObjectId) -> bool {
        self.objects.contains_key(id)
    }

    pub fn pending_objects(&self) -> usize {
        self.objects.values().filter(|t| t.pending()).count()
    }

    pub fn image_count(&self) -> usize {
        self.images.len()
    }

    /// Images past retention whose objects owe nothing leave the carousel,
    /// with the objects no remaining image names.
    pub fn expire(&mut self, now: u64) -> Expired {
        let mut out = Expired::default();
        let (gone, kept): (Vec<Queued>, Vec<Queued>) =
            std::mem::take(&mut self.images).into_iter().partition(|q| {
                !self.retained(q, now)
                    && q.members
                        .iter()
                        .all(|m| self.objects.get(m).is_none_or(|t| !t.pending()))
            });
        self.images = kept;
        let still: HashSet<ObjectId> = self
            .images
            .iter()
            .flat_map(|q| q.members.iter().copied())
            .collect();
        for q in gone {
            out.images.push(q.record.clone());
            for m in q.members {
                if !still.contains(&m) && self.objects.remove(&m).is_some() {
                    out.objects.push(m);
                }
            }
        }
        out
    }

    /// Figures for status.json.
    pub fn report(&self, now: u64, rate_bps: u64, frame_overhead: u32) -> ScheduleReport {
        let mut r = ScheduleReport {
            state: match self.mode(now) {
                Some((true, _)) => SenderState::Sending,
                Some((false, _)) => SenderState::Cycling,
                None => SenderState::Idle,
            },
            pass: self.mode(now).map(|(_, l)| l).unwrap_or(0),
            ..Default::default()
        };
        for t in self.objects.values() {
            r.objects.count += 1;
            r.objects.bytes += t.len;
            if t.pending() {
                r.queue.objects += 1;
                r.queue.bytes += t.len;
            }
        }
        // Wire bytes per payload byte: parity and frame overhead.
        let k = self.fec.data_shards as f64;
        let n = self.fec.total_shards() as f64;
        let s = self.fec.shard_size as f64;
        let frame = s + weir_proto::frame::SHARD_FRAME_OVERHEAD as f64 + frame_overhead as f64;
        let wire_per_byte = n / k * frame / s;
        // (owed passes done, share of the pass under way) of an object.
        let owed = |t: &Tracked| -> (u64, f64) {
            if t.pending() {
                let groups = self.groups_of(t.len) as f64;
                (self.level(t), t.progress.next_group as f64 / groups)
            } else {
                (self.passes, 0.0)
            }
        };
        let weight = |t: &Tracked| t.len.max(1) as f64;
        for q in &self.images {
            let members: Vec<&Tracked> = q
                .members
                .iter()
                .filter_map(|m| self.objects.get(m))
                .collect();
            let bytes: u64 = members.iter().map(|t| t.len).sum();
            let total: f64 = members.iter().map(|t| weight(t)).sum::<f64>().max(1.0);
            let min_done = members
                .iter()
                .map(|t| owed(t).0)
                .min()
                .unwrap_or(self.passes);
            let done: f64 = members
                .iter()
                .map(|t| {
                    let (l, w) = owed(t);
                    weight(t) * (l as f64 + w)
                })
                .sum();
            let in_pass: f64 = members
                .iter()
                .map(|t| {
                    let (l, w) = owed(t);
                    weight(t) * if l > min_done { 1.0 } else { w }
                })
                .sum();
            let remaining_bytes: f64 = members
                .iter()
                .filter(|t| t.pending())
                .map(|t| {
                    let (l, w) = owed(t);
                    t.len as f64 * ((self.passes - l) as f64 - w)
                })
                .sum();
            let any_pending = members.iter().any(|t| t.pending());
            let started = done > 0.0;
            if any_pending {
                r.queue.images += 1;
            }
            let percent = 100.0 * done / (total * self.passes as f64);
            let pass_percent = 100.0 * in_pass / total;
            let eta_s = (rate_bps > 0 && any_pending)
                .then(|| (remaining_bytes * wire_per_byte * 8.0 / rate_bps as f64).ceil() as u64);
            r.images.push(ImageStatus {
                image: q.record.image.clone(),
                destination: q.record.destination.clone(),
                manifest_digest: q.record.manifest_digest.clone(),
                source: q.record.source.clone(),
                bytes,
                passes: self.passes,
                passes_done: min_done,
                pass_percent: if any_pending {
                    (pass_percent * 10.0).round() / 10.0
                } else {
                    100.0
                },
                percent: (percent.min(100.0) * 10.0).round() / 10.0,
                eta_s,
                state: if any_pending {
                    if started {
                        ImageState::Sending
                    } else {
                        ImageState::Queued
                    }
                } else if self.retained(q, now) {
                    ImageState::Cycling
                } else {
                    ImageState::Done
                },
            });
        }
        r
    }
}

#[derive(Debug, Default)]
pub struct ScheduleReport {
    pub state: SenderState,
    pub pass: u64,
    pub queue: QueueStatus,
    pub objects: ObjectsStatus,
    pub images: Vec<ImageStatus>,
}

/// Why a group could not go out.
#[derive(Debug, thiserror::Error)]
pub enum CarouselError {
    #[error("object {id}: {why}")]
    Object { id: ObjectId, why: String },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("FEC: {0}")]
    Fec(#[from] weir_proto::FecError),
}

/// A group handed to a sealing worker, which sends it in its turn, and
/// what the carousel needs back once it is on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    pub object: ObjectId,
    pub group: u32,
    pub frames: u64,
    /// The object's progress once this group is sent; `None` for the
    /// uncounted repeat of an image object.
    pub progress: Option<ObjectProgress>,
}

/// Groups given out and not yet told back.
#[derive(Debug, Default)]
struct InFlight {
    jobs: usize,
    frames: u64,
    /// Groups given out so far: the next one's turn on the link.
    turns: u64,
}

/// The channels between the carousel and its workers.
struct Pipeline<'a> {
    work: &'a Sender<Work>,
    done: &'a Receiver<Done>,
}

/// The carousel stage: the schedule, and the threads it drives — sealing
/// workers (read, FEC, seal, then send in turn through the emitter:
/// pacing, link) and `link-tx` (heartbeats while no group is sent).
pub struct Carousel {
    schedule: Schedule,
    settings: CarouselSettings,
    store: Arc<ObjectStore>,
    sealer: FrameSealer,
    emitter: Option<Emitter>,
    gauges: Arc<CarouselGauges>,
    next_seq: Arc<AtomicU64>,
    in_flight: InFlight,
    incoming: Receiver<ImageRecord>,
    status: StatusBoard,
    control: Arc<CarouselControl>,
    last_status: Option<Instant>,
    last_gc: Instant,
}

/// A thread of the carousel could not start: the gateway stops.
fn not_started(what: &str, e: std::io::Error, shutdown: &Shutdown) -> CarouselError {
    shutdown.trigger();
    CarouselError::Object {
        id: ObjectId([0; 32]),
        why: format!("starting {what}: {e}"),
    }
}

/// Sealing workers: one per core, a few at most (the receiver, on a
/// shared machine, needs cores too).
fn sealing_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

impl Carousel {
    pub fn new(
        settings: CarouselSettings,
        store: Arc<ObjectStore>,
        sink: Box<dyn FrameSink>,
        key: Key,
        session_id: u64,
        incoming: Receiver<ImageRecord>,
        status: StatusBoard,
    ) -> Result<Carousel, CarouselError> {
        let fec = settings.fec;
        weir_proto::BlockCodec::new(fec)?;
        let frame_bytes = settings.datagram_size as u64 + settings.frame_overhead as u64;
        // About a millisecond of frames per system call, at most 64.
        let per_ms = settings.rate_bps / 8 / 1000 / frame_bytes.max(1);
        let batch_max = per_ms.clamp(1, 64) as usize;
        let capacity = TokenBucket::capacity_for(
            settings.rate_bps,
            Duration::from_millis(2),
            frame_bytes * batch_max as u64,
        );
        status.update(|s| {
            s.session_id = session_id;
            s.wire.rate_bps = settings.rate_bps;
        });
        let sealer = FrameSealer::new(key, session_id);
        let gauges = Arc::new(CarouselGauges::default());
        let next_seq = Arc::new(AtomicU64::new(0));
        let control = Arc::new(CarouselControl::default());
        Ok(Carousel {
            schedule: Schedule::new(
                fec,
                settings.window_blocks,
                settings.passes,
                settings.retention_s,
            ),
            emitter: Some(Emitter {
                sealer: sealer.clone(),
                sink,
                pacer: Pacer::new(settings.rate_bps, capacity),
                batch_max,
                frame_overhead: settings.frame_overhead as u64,
                started: Instant::now(),
                last_heartbeat: None,
                fingerprint: settings.fingerprint,
                gauges: gauges.clone(),
                next_seq: next_seq.clone(),
                control: control.clone(),
                meter: RateMeter::new(Instant::now()),
                sent: WireTally::default(),
                status: status.clone(),
                rate_bps: settings.rate_bps,
                store: store.clone(),
                heartbeat_frame: Vec::new(),
            }),
            sealer,
            gauges,
            next_seq,
            in_flight: InFlight::default(),
            settings,
            store,
            incoming,
            status,
            control,
            last_status: None,
            last_gc: Instant::now(),
        })
    }

    /// Takes console control from `control` (pause, resume, resend)
    /// instead of a private one nobody else holds.
    pub fn with_control(mut self, control: Arc<CarouselControl>) -> Self {
        if let Some(e) = &mut self.emitter {
            e.control = control.clone();
        }
        self.control = control;
        self
    }

    /// Loads the persisted queue and progress.
    pub fn load(&mut self) -> Result<(), CarouselError> {
        for record in self.store.images()? {
            self.add(record, false)?;
        }
        self.collect_garbage()?;
        tracing::info!(
            images = self.schedule.image_count(),
            owed_objects = self.schedule.pending_objects(),
            "carousel loaded its queue"
        );
        Ok(())
    }

    fn add(&mut self, record: ImageRecord, fresh: bool) -> Result<(), CarouselError> {
        let store = &self.store;
        let lookup = |id: &ObjectId| store.progress(id).ok().flatten();
        let digest = record.manifest_digest.clone();
        match self.schedule.add_image(record, fresh, &lookup) {
            Ok(changed) => {
                for (id, p) in changed {
                    self.store.set_progress(&id, &p)?;
                }
                if fresh {
                    self.store.commit("tx.carousel.image-added")?;
                    tracing::info!(digest = %digest, "image entered the carousel");
                }
            }
            Err(e) => {
                tracing::error!(digest = %digest, error = %e, "image record unusable; skipped")
            }
        }
        Ok(())
    }

    /// Runs until shutdown; progress of what reached the wire is committed
    /// before returning.
    pub fn run(mut self, shutdown: &Shutdown) -> Result<(), CarouselError> {
        self.load()?;
        let Some(emitter) = self.emitter.take() else {
            return Ok(());
        };
        let (work_tx, work_rx) = std::sync::mpsc::channel::<Work>();
        let work_rx = Mutex::new(work_rx);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Done>();
        let link = Link::new(emitter);
        let workers = sealing_workers();
        tracing::info!(workers, "sealing workers started");
        let result = std::thread::scope(|scope| {
            let mut sealers = Vec::with_capacity(workers);
            for i in 0..workers {
                let (jobs, link, done, sealer) =
                    (&work_rx, &link, done_tx.clone(), self.sealer.clone());
                let worker = std::thread::Builder::new()
                    .name(format!("seal-{i}"))
                    .spawn_scoped(scope, move || {
                        run_worker(jobs, link, &done, shutdown, sealer)
                    });
                // Returning drops `work_tx`, so the workers started stop.
                sealers.push(worker.map_err(|e| not_started("a sealing worker", e, shutdown))?);
            }
            drop(done_tx);
            let heartbeats = std::thread::Builder::new()
                .name("link-tx".into())
                .spawn_scoped(scope, || link.keep_heartbeats(shutdown))
                .map_err(|e| not_started("the link thread", e, shutdown))?;
            let pipeline = Pipeline {
                work: &work_tx,
                done: &done_rx,
            };
            let result = self.run_loop(shutdown, &pipeline);
            // The workers send what they were given (or give up at
            // shutdown), then the link stops.
            drop(work_tx);
            let panicked = sealers.into_iter().any(|w| w.join().is_err());
            link.close();
            let link_result = heartbeats.join();
            // What reached the wire before the link stopped.
            while let Ok(d) = done_rx.try_recv() {
                self.settle(d)?;
            }
            let result = match link_result {
                Ok(Ok(())) => result,
                Ok(Err(e)) => Err(e.into()),
                Err(_) => {
                    shutdown.trigger();
                    result.and(Err(CarouselError::Object {
                        id: ObjectId([0; 32]),
                        why: "the link thread panicked".into(),
                    }))
                }
            };
            if panicked {
                return result.and(Err(CarouselError::Object {
                    id: ObjectId([0; 32]),
                    why: "a sealing worker panicked".into(),
                }));
            }
            result
        });
        self.publish_status();
        self.store.commit("tx.carousel.stopped")?;
        result
    }

    fn run_loop(&mut self, shutdown: &Shutdown, pipe: &Pipeline) -> Result<(), CarouselError> {
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            while let Ok(d) = pipe.done.try_recv() {
                self.settle(d)?;
            }
            self.housekeeping()?;
            let turn = if self.control.is_paused() {
                None
            } else {
                self.schedule.next_turn(unix_now())
            };
            let Some(turn) = turn else {
                // Nothing to send (or paused): the link sends heartbeats;
                // wait for new images and for groups told back.
                match self.incoming.recv_timeout(Duration::from_millis(50)) {
                    Ok(record) => self.add(record, true)?,
                    Err(RecvTimeoutError::Timeout) => {}
                    // Ingest stopped (the gateway is stopping): wait here
                    // rather than spin.
                    Err(RecvTimeoutError::Disconnected) => {
                        if shutdown.sleep(Duration::from_millis(50)) {
                            return Ok(());
                        }
                    }
                }
                continue;
            };
            self.gauges
                .queued_objects
                .store(self.schedule.pending_objects() as u32, Ordering::Relaxed);
            self.gauges.pass.store(turn.level, Ordering::Relaxed);
            // The schedule moves on as the group is given out; its progress
            // is persisted only once the link says it was sent.
            let (progress, trailers) = self.schedule.finish_turn(&turn);
            if self.give_out(turn.object, turn.group, Some(progress), pipe, shutdown)? {
                return Ok(());
            }
            if progress.next_group == 0 {
                tracing::debug!(object = %turn.object, passes_done = progress.passes_done,
                    owed = turn.owed, "object pass given out");
            }
            for image in trailers {
                let Some((_, len)) = self.schedule.object(&image) else {
                    continue;
                };
                for g in 0..self.schedule.groups_of(len) {
                    if self.give_out(image, g, None, pipe, shutdown)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// New images, console resends, status and retention: done between
    /// groups, also while waiting for the link (a paused link holds groups).
    fn housekeeping(&mut self) -> Result<(), CarouselError> {
        while let Ok(record) = self.incoming.try_recv() {
            self.add(record, true)?;
        }
        self.apply_resends()?;
        if self
            .last_status
            .is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY)
        {
            self.publish_status();
        }
        if self.last_gc.elapsed() >= GC_EVERY {
            self.collect_garbage()?;
        }
        Ok(())
    }

    /// Reserves the group's sequence numbers and hands it to the workers
    /// and the link. Waits while what is reserved and unsent would pass
    /// half the receiver's replay window (a heartbeat numbered after it
    /// all must not push it out of the window). True when shutdown came.
    fn give_out(
        &mut self,
        object: ObjectId,
        group: u32,
        progress: Option<ObjectProgress>,
        pipe: &Pipeline,
        shutdown: &Shutdown,
    ) -> Result<bool, CarouselError> {
        let Some((kind, len)) = self.schedule.object(&object) else {
            return Ok(false);
        };
        let fec = self.settings.fec.for_object(len);
        let (first_block, blocks) =
            group_span(fec.blocks_for(len), self.settings.window_blocks, group);
        let frames = group_frames(blocks, fec, self.settings.header_every);
        while self.in_flight.jobs > 0
            && (self.in_flight.jobs >= MAX_JOBS || self.in_flight.frames + frames > MAX_AHEAD)
        {
            if shutdown.is_triggered() {
                return Ok(true);
            }
            self.housekeeping()?;
            match pipe.done.recv_timeout(Duration::from_millis(100)) {
                Ok(d) => self.settle(d)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(true),
            }
        }
        let source = match self.store.payload(&object) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.payload_unusable(&object, "payload missing from the object store");
                return Ok(false);
            }
            Err(e) => {
                self.payload_unusable(&object, &e.to_string());
                return Ok(false);
            }
        };
        let first_seq = self.next_seq.fetch_add(frames, Ordering::SeqCst);
        let job = GroupJob {
            object,
            kind,
            len,
            fec,
            first_block,
            blocks,
            path: source.path,
            offset: source.offset,
            first_seq,
            header_every: self.settings.header_every,
        };
        let ticket = Ticket {
            object,
            group,
            frames,
            progress,
        };
        let turn = self.in_flight.turns;
        if pipe.work.send(Work { job, turn, ticket }).is_err() {
            return Ok(true); // the workers stopped
        }
        self.in_flight.turns += 1;
        self.in_flight.jobs += 1;
        self.in_flight.frames += frames;
        Ok(false)
    }

    /// A group told back by the link: its progress persisted once sent,
    /// its object set aside if its payload is unusable.
    fn settle(&mut self, done: Done) -> Result<(), CarouselError> {
        let t = done.ticket;
        self.in_flight.jobs = self.in_flight.jobs.saturating_sub(1);
        self.in_flight.frames = self.in_flight.frames.saturating_sub(t.frames);
        match done.outcome {
            Outcome::Sent => {
                let (Some(sent), Some(now)) = (t.progress, self.schedule.progress(&t.object))
                else {
                    return Ok(());
                };
                // A resend or a new image may have re-armed the object since
                // the group was given out: its target is the one now, and a
                // pass it restarted is not overwritten by an older position.
                if (sent.passes_done, sent.next_group) <= (now.passes_done, now.next_group) {
                    let persisted = ObjectProgress {
                        passes_done: sent.passes_done,
                        next_group: sent.next_group,
                        ..now
                    };
                    self.store.set_progress(&t.object, &persisted)?;
                }
            }
            Outcome::Broken(why) => self.payload_unusable(&t.object, &why),
            Outcome::Unsent => {}
        }
        Ok(())
    }

    fn payload_unusable(&mut self, object: &ObjectId, why: &str) {
        if self.schedule.mark_broken(object) {
            tracing::error!(digest = %object, error = %why,
                "object payload unusable; it is no longer sent");
        }
    }

    /// Owes the images the console asked for new passes, and persists it.
    fn apply_resends(&mut self) -> Result<(), CarouselError> {
        for image in self.control.take_resends() {
            match self.schedule.rearm_image(&image) {
                Some(changed) => {
                    for (id, p) in &changed {
                        self.store.set_progress(id, p)?;
                    }
                    self.store.commit("tx.carousel.resend-armed")?;
                    tracing::info!(image = %image, objects = changed.len(),
                        passes = self.settings.passes, "image queued for new passes (console resend)");
                    self.publish_status();
                }
                None => {
                    tracing::warn!(image = %image, "resend of an image no longer in the carousel")
                }
            }
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        self.last_status = Some(Instant::now());
        let report = self.schedule.report(
            unix_now(),
            self.settings.rate_bps,
            self.settings.frame_overhead,
        );
        let paused = self.control.is_paused();
        self.status.update(|s| {
            s.state = if paused {
                SenderState::Paused
            } else {
                report.state
            };
            s.paused = paused;
            s.pass = report.pass;
            s.queue = report.queue;
            s.objects = report.objects;
            s.images = report.images;
        });
    }

    /// Drops expired images and payload files nothing refers to: the
    /// sender's side of retention. The records go first, durably; only
    /// then the files. A crash between leaves payloads no queued image
    /// names, which the next sweep removes; the other order could leave
    /// an image record whose payloads are gone, reloaded at restart as owed
    /// and never sendable.
    fn collect_garbage(&mut self) -> Result<(), CarouselError> {
        self.last_gc = Instant::now();
        let expired = self.schedule.expire(unix_now());
        for image in &expired.images {
            tracing::info!(digest = %image.manifest_digest, image = %image.image,
                destination = %image.destination, "retention over; image leaves the carousel");
            self.store.remove_image(&image.image)?;
        }
        for id in &expired.objects {
            self.store.remove_progress(id)?;
        }
        // After the images left: their records may go with them.
        if let Some((records, checkpoint)) =
            self.store.prune_ledger(self.settings.ledger_keep_records)?
        {
            tracing::info!(records, checkpoint_seq = checkpoint.seq,
                checkpoint_hash = %checkpoint.hash.short(),
                "image ledger records of images that left the carousel pruned; the chain is \
                 checked from its checkpoint on");
        }
        self.store.commit("tx.carousel.pruned")?;
        let now = std::time::SystemTime::now();
        let is_old = |modified: std::time::SystemTime| {
            now.duration_since(modified).unwrap_or_default() > ORPHAN_GRACE
        };
        // Looked at just before: an ingest may have reused a payload since
        // (a new drop with a shared layer touches it before it commits).
        let still_old = |store: &ObjectStore, id: &ObjectId| store.modified(id).is_some_and(is_old);
        for id in &expired.objects {
            if still_old(&self.store, id) {
                tracing::info!(digest = %id, "retention over; payload removed");
                self.store.remove_object(id)?;
            }
        }
        for (id, modified) in self.store.stored_objects()? {
            if !is_old(modified) || self.schedule.references(&id) {
                continue;
            }
            if still_old(&self.store, &id) {
                tracing::info!(digest = %id, "removing payload no queued image names");
                self.store.remove_object(&id)?;
            }
        }
        let archives = self.store.sweep_archives(ORPHAN_GRACE)?;
        if archives > 0 {
            tracing::info!(
                archives,
                "dropped archives no payload names any more removed"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::BlobMember;
    use weir_proto::interleave;

    fn fec() -> FecParams {
        FecParams::new(4, 2, 10).unwrap() // 40 bytes per block
    }

    fn record(seq: u64, tag: &str, blobs: &[(&[u8], u64)]) -> ImageRecord {
        ImageRecord {
            image: ObjectId::of_bytes(tag.as_bytes()).digest(),
            image_len: 30,
            manifest_digest: format!("sha256:{tag}"),
            destination: format!("t/{tag}:1"),
            references: vec![format!("t/{tag}:1")],
            source: format!("{tag}.tar"),
            ingested_at: 1000,
            seq,
            blobs: blobs
                .iter()
                .map(|(b, size)| BlobMember {
                    digest: ObjectId::of_bytes(b).digest(),
                    size: *size,
                })
                .collect(),
        }
    }

    fn id(b: &[u8]) -> ObjectId {
        ObjectId::of_bytes(b)
    }

    fn none(_: &ObjectId) -> Option<ObjectProgress> {
        None
    }

    /// Runs turns until nothing is owed, returning (object, group, owed).
    fn drain(s: &mut Schedule, max: usize) -> Vec<Turn> {
        let mut out = Vec::new();
        while let Some(t) = s.next_turn(1000) {
            if !t.owed || out.len() >= max {
                break;
            }
            s.finish_turn(&t);
            out.push(t);
        }
        out
    }

    #[test]
    fn groups_match_proto_interleave() {
        for (blocks, window) in [(1, 8), (7, 8), (8, 8), (17, 8), (100, 8), (33, 4)] {
            let order: Vec<(u32, u16)> = interleave(blocks, 3, window).collect();
            let mut at = 0;
            for g in 0..group_count(blocks, window) {
                let (start, count) = group_span(blocks, window, g);
                let ours: Vec<(u32, u16)> = interleave(count, 3, count)
                    .map(|(b, i)| (start + b, i))
                    .collect();
                assert_eq!(
                    &order[at..at + ours.len()],
                    &ours[..],
                    "blocks {blocks} window {window} group {g}"
                );
                at += ours.len();
            }
            assert_eq!(at, order.len());
        }
    }

    #[test]
    fn each_object_gets_its_passes_image_object_first() {
        let mut s = Schedule::new(fec(), 2, 3, 3600);
        s.add_image(record(1, "a", &[(b"blob1", 200)]), true, &none)
            .unwrap();
        let turns = drain(&mut s, 1000);
        // image object: 1 block → 1 group; blob: 5 blocks → 2 groups.
        assert_eq!(turns.len(), 3 * (1 + 2));
        assert_eq!(turns[0].object, id(b"a"));
        assert_eq!(turns[1].object, id(b"blob1"));
        assert_eq!(s.progress(&id(b"blob1")).unwrap().passes_done, 3);
        assert_eq!(s.pending_objects(), 0);
    }

    #[test]
    fn trailer_sends_the_image_object_after_its_last_blob() {
        let mut s = Schedule::new(fec(), 100, 1, 3600);
        s.add_image(record(1, "a", &[(b"x", 10), (b"y", 10)]), true, &none)
            .unwrap();
        let mut trailers = Vec::new();
        while let Some(t) = s.next_turn(1000) {
            if !t.owed {
                break;
            }
            let (_, tr) = s.finish_turn(&t);
            trailers.push((t.object, tr));
        }
        assert_eq!(trailers[0], (id(b"a"), vec![]));
        assert_eq!(trailers[1], (id(b"x"), vec![]));
        assert_eq!(trailers[2], (id(b"y"), vec![id(b"a")]));
    }

    #[test]
    fn small_image_does_not_wait_behind_a_large_one() {
        let mut s = Schedule::new(fec(), 2, 1, 3600);
        // 1000 blocks = 500 groups of 2.
        s.add_image(record(1, "big", &[(b"huge", 40_000)]), true, &none)
            .unwrap();
        for _ in 0..10 {
            let t = s.next_turn(1000).unwrap();
            s.finish_turn(&t);
        }
        s.add_image(record(2, "small", &[(b"tiny", 40)]), true, &none)
            .unwrap();
        let turns = drain(&mut s, 10);
        let small_done = turns
            .iter()
            .position(|t| t.object == id(b"tiny"))
            .expect("small image sent within a few turns");
        assert!(small_done < 4, "{turns:?}");
        assert_eq!(s.progress(&id(b"tiny")).unwrap().passes_done, 1);
        assert!(s.progress(&id(b"huge")).unwrap().passes_done == 0);
    }

    #[test]
    fn new_objects_go_ahead_of_repeats() {
        let mut s = Schedule::new(fec(), 2, 3, 3600);
        s.add_image(record(1, "old", &[(b"o", 400)]), true, &none)
            .unwrap();
        // Finish the first pass of "old" (1 + 5 groups).
        for _ in 0..6 {
            let t = s.next_turn(1000).unwrap();
            s.finish_turn(&t);
        }
        assert_eq!(s.progress(&id(b"o")).unwrap().passes_done, 1);
        s.add_image(record(2, "new", &[(b"n", 400)]), true, &none)
            .unwrap();
        // The next 6 turns are all the new image's first pass.
        for _ in 0..6 {
            let t = s.next_turn(1000).unwrap();
            assert_eq!(t.image, id(b"new"), "{t:?}");
            s.finish_turn(&t);
        }
        assert_eq!(s.progress(&id(b"n")).unwrap().passes_done, 1);
    }

    #[test]
    fn restart_resumes_from_persisted_progress() {
        let mut s = Schedule::new(fec(), 2, 3, 3600);
        s.add_image(record(1, "a", &[(b"blob", 400)]), true, &none)
            .unwrap();
        for _ in 0..9 {
            let t = s.next_turn(1000).unwrap();
            s.finish_turn(&t);
        }
        let saved_blob = s.progress(&id(b"blob")).unwrap();
        let saved_img = s.progress(&id(b"a")).unwrap();
        assert_eq!((saved_blob.passes_done, saved_blob.next_group), (1, 2));
        let mut again = Schedule::new(fec(), 2, 3, 3600);
        let stored = move |i: &ObjectId| {
            if *i == id(b"blob") {
                Some(saved_blob)
            } else {
                Some(saved_img)
            }
        };
        again
            .add_image(record(1, "a", &[(b"blob", 400)]), false, &stored)
            .unwrap();
        let t = again.next_turn(1000).unwrap();
        assert_eq!((t.object, t.group, t.level), (id(b"blob"), 2, 1));
    }

    #[test]
    fn idle_link_cycles_retained_images_only() {
        let mut s = Schedule::new(fec(), 2, 1, 3600);
        s.add_image(record(1, "a", &[(b"x", 10)]), true, &none)
            .unwrap();
        drain(&mut s, 100);
        let t = s.next_turn(1000).unwrap();
        assert!(!t.owed);
        assert_eq!(t.object, id(b"a"));
        // Past retention: nothing to send, and the image expires.
        assert!(s.next_turn(1000 + 3600).is_none());
        let gone = s.expire(1000 + 3600);
        assert_eq!(gone.images.len(), 1);
        assert_eq!(gone.objects.len(), 2);
    }

    #[test]
    fn shared_blob_is_one_object_and_rearmed_for_a_later_image() {
        let mut s = Schedule::new(fec(), 2, 1, 3600);
        s.add_image(record(1, "a", &[(b"base", 10), (b"x", 10)]), true, &none)
            .unwrap();
        s.add_image(record(2, "b", &[(b"base", 10), (b"y", 10)]), true, &none)
            .unwrap();
        let turns = drain(&mut s, 100);
        assert_eq!(turns.iter().filter(|t| t.object == id(b"base")).count(), 1);
        s.add_image(record(3, "c", &[(b"base", 10)]), true, &none)
            .unwrap();
        let turns = drain(&mut s, 100);
        assert_eq!(turns.iter().filter(|t| t.object == id(b"base")).count(), 1);
    }

    #[test]
    fn rearmed_image_owes_new_passes_even_when_done() {
        let mut s = Schedule::new(fec(), 2, 2, 3600);
        s.add_image(record(1, "a", &[(b"x", 400)]), true, &none)
            .unwrap();
        drain(&mut s, 1000);
        assert_eq!(s.pending_objects(), 0);
        assert!(s.rearm_image(&id(b"unknown")).is_none());
        let changed = s.rearm_image(&id(b"a")).unwrap();
        assert_eq!(changed.len(), 2);
        assert_eq!(s.pending_objects(), 2);
        let r = s.report(1000, 1_000_000, 0);
        assert_eq!(r.images[0].state, "queued");
        assert_eq!(r.images[0].passes_done, 0);
        // Two more whole passes of both objects: 2 × (1 + 5) groups.
        assert_eq!(drain(&mut s, 1000).len(), 12);
        assert_eq!(s.progress(&id(b"x")).unwrap().passes_done, 4);
    }

    struct NullSink;

    impl FrameSink for NullSink {
        fn send(&mut self, _: &[&[u8]]) -> Result<(), LinkError> {
            Ok(())
        }
        fn max_frame_len(&self) -> usize {
            1400
        }
    }

    /// A payload file as ingest leaves it, last touched `age` ago.
    fn payload(store: &ObjectStore, bytes: &[u8], age: Duration) -> ObjectId {
        let stored = store.put_bytes(bytes).unwrap();
        let f = std::fs::File::options()
            .append(true)
            .open(store.object_path(&stored.id))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
        stored.id
    }

    /// An image past retention with its passes done leaves: its record,
    /// progress and payloads go, except a payload another queued image
    /// names and one an ingest touched just now (about to reuse it).
    #[test]
    fn expired_images_lose_their_payloads_but_not_shared_or_reused_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ObjectStore::open(dir.path()).unwrap());
        let day = Duration::from_secs(86_400);
        let settings = CarouselSettings {
            fec: FecParams::new(4, 2, 100).unwrap(),
            passes: 1,
            retention_s: 3600,
            window_blocks: 2,
            header_every: 256,
            rate_bps: 1_000_000_000,
            frame_overhead: 0,
            datagram_size: 1400,
            fingerprint: 0,
            ledger_keep_records: 10_000,
        };
        let old = payload(&store, b"old image object", day);
        let shared = payload(&store, b"shared base layer", day);
        let own = payload(&store, b"old image's own layer", day);
        let reused = payload(&store, b"layer a new drop reuses", Duration::ZERO);
        let new = payload(&store, b"new image object", Duration::ZERO);
        let member = |id: &ObjectId| BlobMember {
            digest: id.digest(),
            size: 20,
        };
        let mut expired = record(1, "old", &[]);
        expired.image = old.digest();
        expired.ingested_at = unix_now() - 2 * 3600;
        expired.blobs = vec![member(&shared), member(&own), member(&reused)];
        let mut queued = record(2, "new", &[]);
        queued.image = new.digest();
        queued.ingested_at = unix_now();
        queued.blobs = vec![member(&shared)];
        let (tx, rx) = std::sync::mpsc::channel();
        let mut carousel = Carousel::new(
            settings,
            store.clone(),
            Box::new(NullSink),
            Key::from_bytes(1, &[7; 32]).unwrap(),
            1,
            rx,
            StatusBoard::new(),
        )
        .unwrap();
        drop(tx);
        for r in [&expired, &queued] {
            let done = ObjectProgress {
                passes_done: 1,
                target: 1,
                next_group: 0,
                fec: settings.fec,
            };
            for m in std::iter::once(&r.image).chain(r.blobs.iter().map(|b| &b.digest)) {
                let id = ObjectId::from_digest(m).unwrap();
                store.set_progress(&id, &done).unwrap();
            }
        }
        // Queued as intake leaves them, records made by hand: the sweep
        // reads only the records and the payload files.
        for r in [&expired, &queued] {
            store.queue_record_for_test(r).unwrap();
        }
        // Loading sweeps once.
        carousel.load().unwrap();

        let images: Vec<String> = store
            .images()
            .unwrap()
            .into_iter()
            .map(|r| r.image)
            .collect();
        assert_eq!(images, vec![queued.image.clone()]);
        assert!(!store.has_object(&old) && !store.has_object(&own));
        assert!(store.progress(&own).unwrap().is_none());
        assert!(store.has_object(&shared), "a queued image still names it");
        assert!(store.has_object(&new));
        assert!(
            store.has_object(&reused),
            "touched just now: an ingest reuses it"
        );
        assert!(store.progress(&shared).unwrap().is_some());
        assert_eq!(carousel.schedule.image_count(), 1);
    }

    use crate::stages::emit::RecordingSink;

    /// The whole stage: groups sealed on workers come out in carousel
    /// order, each (block, shard) once per pass, every number fresh to the
    /// receiver's replay guard; heartbeats among them; the progress of
    /// what was sent is persisted; a pause holds shard frames and resume
    /// finishes the pass.
    #[test]
    fn sealed_groups_reach_the_link_in_order_and_a_pause_holds_them() {
        use weir_proto::{Body, FrameOpener, KeyRing, ReplayGuard, ReplayVerdict};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ObjectStore::open(dir.path()).unwrap());
        let fec = FecParams::new(4, 2, 100).unwrap();
        let settings = CarouselSettings {
            fec,
            passes: 2,
            retention_s: 0,
            window_blocks: 2,
            header_every: 7,
            rate_bps: 400_000_000,
            frame_overhead: 0,
            datagram_size: 1400,
            fingerprint: 0,
            ledger_keep_records: 10_000,
        };
        let blob: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let blob_id = payload(&store, &blob, Duration::ZERO);
        let image_id = payload(&store, b"the image object", Duration::ZERO);
        let mut r = record(1, "pipe", &[]);
        r.image = image_id.digest();
        r.image_len = 16;
        r.ingested_at = unix_now();
        r.blobs = vec![BlobMember {
            digest: blob_id.digest(),
            size: blob.len() as u64,
        }];
        let key = Key::from_bytes(1, &[7; 32]).unwrap();
        let sink = RecordingSink::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let control = Arc::new(CarouselControl::default());
        control.pause();
        let carousel = Carousel::new(
            settings,
            store.clone(),
            Box::new(sink.clone()),
            key.clone(),
            9,
            rx,
            StatusBoard::new(),
        )
        .unwrap()
        .with_control(control.clone());
        let shutdown = Shutdown::new();
        let running = std::thread::spawn({
            let shutdown = shutdown.clone();
            move || carousel.run(&shutdown)
        });
        tx.send(r).unwrap();
        let opener = FrameOpener::new(KeyRing::new(vec![key]).unwrap());
        let shards = |frames: &[Vec<u8>]| {
            frames
                .iter()
                .filter(|f| matches!(opener.open(f).unwrap().body, Body::Shard(_)))
                .count()
        };
        // Paused: heartbeats, no shard frame.
        std::thread::sleep(Duration::from_millis(1300));
        assert_eq!(shards(&sink.0.lock().unwrap()), 0);
        control.resume();
        let done = |id: &ObjectId| {
            store
                .progress(id)
                .unwrap()
                .is_some_and(|p| p.passes_done >= 2)
        };
        let t = Instant::now();
        while !(done(&blob_id) && done(&image_id)) {
            assert!(t.elapsed() < Duration::from_secs(20), "two passes not sent");
            std::thread::sleep(Duration::from_millis(10));
        }
        shutdown.trigger();
        running.join().unwrap().unwrap();

        let frames = sink.0.lock().unwrap().clone();
        let mut guard = ReplayGuard::new();
        let mut blob_shards = HashMap::new();
        let mut heartbeats = 0;
        // Groups are sent by whichever worker sealed them, in turn: every
        // frame but a heartbeat (which may pass groups waiting their turn)
        // leaves in sequence order.
        let mut last_group_seq = None;
        for f in &frames {
            let frame = opener.open(f).unwrap();
            let h = frame.header;
            if !matches!(frame.body, Body::Heartbeat(_)) {
                assert!(
                    last_group_seq.is_none_or(|l| h.seq > l),
                    "seq {} after {last_group_seq:?}",
                    h.seq
                );
                last_group_seq = Some(h.seq);
            }
            assert!(
                matches!(
                    guard.check(h.key_id, h.session_id, h.seq),
                    ReplayVerdict::Fresh { .. }
                ),
                "seq {} refused",
                h.seq
            );
            match frame.body {
                Body::Shard(s) if s.object == blob_id => {
                    *blob_shards.entry((s.block, s.index)).or_insert(0) += 1
                }
                Body::Heartbeat(_) => heartbeats += 1,
                _ => {}
            }
        }
        let per_pass = (fec.for_object(20_000).blocks_for(20_000) * 6) as usize;
        assert_eq!(blob_shards.len(), per_pass);
        assert!(blob_shards.values().all(|&n| n == 2), "{blob_shards:?}");
        assert!(heartbeats >= 2, "heartbeats while paused and after");
    }

    #[test]
    fn report_counts_progress() {
        let mut s = Schedule::new(fec(), 2, 2, 3600);
        s.add_image(record(1, "a", &[(b"x", 400)]), true, &none)
            .unwrap();
        let r = s.report(1000, 1_000_000, 0);
        assert_eq!(r.images[0].state, "queued");
        assert_eq!(r.images[0].percent, 0.0);
        drain(&mut s, 6);
        let r = s.report(1000, 1_000_000, 0);
        assert_eq!(r.images[0].passes_done, 1);
        assert!(
            (r.images[0].percent - 50.0).abs() < 1.0,
            "{:?}",
            r.images[0]
        );
        drain(&mut s, 100);
        let r = s.report(1000, 1_000_000, 0);
        assert_eq!(r.images[0].state, "cycling");
        assert_eq!(r.queue.objects, 0);
    }
}
