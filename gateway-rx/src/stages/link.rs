//! The link end (UDP, serial line or file inbox): receives frames in
//! batches, verifies each one, and passes on only what is authentic and new.
//!
//! The tag check (a SHA-256 over every frame) is most of the work and
//! depends on no other frame, so it runs on a small pool of threads; what
//! depends on the order of frames runs on one:
//!
//! ```text
//!  rx-link ──batch n──▶ rx-verify-(n mod W) ──▶ rx-admit ──▶ store
//!  (receive)            (tag, body, owned        (in receive order: replay
//!     ▲                  copies of payloads)      window, loss, counters,
//!     │                                           sender status)
//!     └──────────────── emptied batch buffers ◀───────┘
//! ```
//!
//! A shard of an object the receiver holds whole already (the store's
//! [`HeldView`]) is dropped unopened: its tag is not checked, since nothing
//! in it could change what is held, and after the first pass of an image
//! that is most of what arrives. Its numbers, unchecked, move no window;
//! it is counted apart, and as an arrival in the loss estimate.
//!
//! The link thread deals batches to the workers in turn and rx-admit takes
//! them back in that same turn, so the store gets frames in the order they
//! were received, and the replay window moves only on authenticated frames,
//! in that order. A fixed number of batch buffers go round, so nothing is
//! allocated per batch and memory stays bounded: when every buffer is out
//! (the store is behind) the link waits and the socket's buffer takes the
//! excess.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_host::{DirSource, FrameBatch, FrameSource, SerialSource, Shutdown, UdpSource};
use weir_proto::{
    claimed_object, Body, Frame, FrameError, FrameOpener, Header, Heartbeat, ObjectHeader,
};

use crate::config::{RxConfig, Transport};
use crate::shards::{HeldView, LentBuffer, Payload, ReceiveBuffers, ShardIn};
use crate::state::now_ms;
use crate::status::SenderStatus;
use crate::verify::{FrameKeys, ReplayCheck, Verifier};
pub use weir_host::link_setup::LinkSetupError;

/// Frames taken from the transport per call: a UDP source with GRO reads
/// this many frames' bytes as a few coalesced messages per system call.
const BATCH_FRAMES: usize = 512;
/// Frames a verifier authenticates and parses at once: a few runs of the
/// sixteen-lane tag kernel, small enough to stay in a core's cache.
const OPEN_AT_ONCE: usize = 64;
/// Receive room of one batch at most: with large datagrams a batch holds
/// fewer frames, so the buffers in flight stay a few MiB whatever the
/// configured datagram size.
const BATCH_BYTES: usize = 1 << 20;
/// Frames a batch gathers before it is dealt to a worker when receives
/// come back small: handing a batch on costs a few wake-ups, spread over
/// this many frames.
const DEAL_FRAMES: usize = 256;
/// Frames per batch handed to the store: the channel's bound in batches
/// stays the bound in memory, whatever a receive returned.
const OUT_FRAMES: usize = 256;
/// Receive buffers (up to 1 MiB each) lent to the payloads in them at
/// once, give or take the batches in flight: enough for the batch the
/// store fills and those with its writer when the frames are dense with
/// new shards. Beyond it payloads are copied out (so too while frames
/// queue up for the store), so a later pass's scattered new shards cannot
/// each pin a whole buffer.
const MAX_LENT_BUFFERS: usize = 12;
/// How long a receive waits before checking for shutdown.
const RECV_WAIT: Duration = Duration::from_millis(200);
/// How often the loss estimate is published.
const LOSS_EVERY: Duration = Duration::from_millis(500);
/// Verification threads at most: beyond this the store thread, not the
/// tag check, bounds the receiver.
pub const MAX_VERIFY_WORKERS: usize = 4;

/// A frame that passed verification, owned (a shard's payload may share the
/// buffer it was received into: see [`Payload`]).
#[derive(Debug, Clone)]
pub enum Inbound {
    Shard(ShardIn),
    Header(ObjectHeader),
}

/// Verification threads for this machine: one per core available to the
/// process, at least one, at most [`MAX_VERIFY_WORKERS`].
pub fn verify_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_VERIFY_WORKERS)
}

/// The configured transport, opened. Returns the source and a description
/// of where it listens (the bound address for udp, the device or inbox).
pub fn open_source(config: &RxConfig) -> Result<(Box<dyn FrameSource>, String), LinkSetupError> {
    let link = &config.link;
    match link.transport {
        Transport::Udp => {
            let addr: SocketAddr = link
                .udp_listen
                .ok_or(LinkSetupError::missing("udp_listen", link.transport))?;
            let source = UdpSource::bind(addr).map_err(LinkSetupError::open("udp_listen", addr))?;
            let bound = source
                .local_addr()
                .map_err(LinkSetupError::open("udp_listen", addr))?;
            tracing::info!(%bound, gro = source.gro(), "UDP link open");
            Ok((Box::new(source), bound.to_string()))
        }
        Transport::Serial => {
            let device = link
                .serial_device
                .as_deref()
                .ok_or(LinkSetupError::missing("serial_device", link.transport))?;
            let source = SerialSource::open(device, link.baud, link.datagram_size)
                .map_err(LinkSetupError::open("serial_device", device.display()))?;
            Ok((
                Box::new(source),
                format!("{} at {} baud", device.display(), link.baud),
            ))
        }
        Transport::Dir => {
            let inbox = link
                .inbox_dir
                .as_deref()
                .ok_or(LinkSetupError::missing("inbox_dir", link.transport))?;
            let source = DirSource::new(inbox)
                .map_err(LinkSetupError::open("inbox_dir", inbox.display()))?;
            Ok((Box::new(source), format!("inbox {}", inbox.display())))
        }
    }
}

/// What a verification worker made of one frame.
enum Opened {
    /// The tag verified and the body parsed; the replay check is to come.
    Authentic(Header, Authentic),
    Refused(FrameError),
    /// A shard of an object held whole, not opened; its header unchecked.
    Held(Header),
}

/// An authentic frame's body, owned.
enum Authentic {
    Inbound(Inbound),
    /// A shard whose payload stays in the batch's buffer, at `at`: rx-admit
    /// lends the buffer and fills the payload in.
    InPlace {
        shard: ShardIn,
        at: Range<usize>,
    },
    Heartbeat(Heartbeat),
}

/// One received batch and what became of its frames. Its buffers go round
/// (link, worker, rx-admit, link again); a frame buffer lent to the
/// payloads in it is replaced from [`ReceiveBuffers`].
struct Batch {
    frames: FrameBatch,
    /// The key ring current when the batch was received: a reload reaches
    /// the workers with the next batch.
    opener: Arc<FrameOpener>,
    /// One per frame of `frames`, in order; emptied by rx-admit.
    opened: Vec<Opened>,
}

/// Receives until shutdown on this thread, verifies on `workers` threads
/// (`rx-verify-N`) and checks for replays on one (`rx-admit`), which hands
/// verified frames to `out` one batch at a time, in the order received.
/// Blocks when the store falls behind (the transport's buffer then takes
/// the excess, and beyond that, loss the carousel will repair). Returns
/// once every thread it started has ended; an error only if one could not
/// be started.
#[allow(clippy::too_many_arguments)]
pub fn receive(
    mut source: Box<dyn FrameSource>,
    verifier: Verifier,
    held: HeldView,
    datagram_size: usize,
    workers: usize,
    out: SyncSender<Vec<Inbound>>,
    sender: Arc<Mutex<Option<SenderStatus>>>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let workers = workers.clamp(1, MAX_VERIFY_WORKERS);
    let (mut keys, replay) = verifier.into_parts();
    // One being filled, two per worker (one opened, one waiting, so a
    // worker never idles for want of a batch), one at rx-admit; the link
    // thread's own receive buffer comes on top.
    let in_flight = 2 * workers + 2;
    let frames_per_batch = (BATCH_BYTES / datagram_size.max(1)).clamp(1, BATCH_FRAMES);
    let buffers = ReceiveBuffers::new(MAX_LENT_BUFFERS, MAX_LENT_BUFFERS);
    let (give_back, free) = mpsc::sync_channel(in_flight);
    for _ in 0..in_flight {
        // Cannot fail: the channel has room for every buffer and its
        // receiver is right here.
        let _ = give_back.send(Batch {
            frames: FrameBatch::new(frames_per_batch, datagram_size),
            opener: keys.opener().clone(),
            opened: Vec::new(),
        });
    }
    tracing::info!(
        verify_threads = workers,
        frames_per_batch,
        "verifying frames"
    );
    std::thread::scope(|scope| {
        let mut to_workers = Vec::with_capacity(workers);
        let mut from_workers = Vec::with_capacity(workers);
        for i in 0..workers {
            // As deep as the buffers are many: no send ever blocks.
            let (job, jobs) = mpsc::sync_channel(in_flight);
            let (done, finished) = mpsc::sync_channel(in_flight);
            let (buffers, held) = (buffers.clone(), held.clone());
            std::thread::Builder::new()
                .name(format!("rx-verify-{i}"))
                .spawn_scoped(scope, move || open_batches(jobs, done, &buffers, &held))?;
            to_workers.push(job);
            from_workers.push(finished);
        }
        std::thread::Builder::new()
            .name("rx-admit".to_string())
            .spawn_scoped(scope, move || {
                admit_in_order(from_workers, replay, give_back, out, sender, &buffers)
            })?;
        let received = FrameBatch::new(frames_per_batch, datagram_size);
        receive_batches(
            source.as_mut(),
            &mut keys,
            received,
            &free,
            &to_workers,
            &shutdown,
        );
        // Dropping `to_workers` on return lets the workers finish what
        // they hold and stop; rx-admit stops after their last batch.
        Ok(())
    })
}

/// The link thread: fills free buffers from the transport and deals them
/// to the workers in turn, until shutdown or until the others stopped.
///
/// A receive that comes back large is dealt as it is (its buffer swapped
/// with a free one). Small ones (datagrams that were not coalesced, which
/// a UDP source with GRO takes only 16 to a system call) are gathered by
/// copy into one batch while more are waiting, so that the hand-offs
/// between threads, a few wake-ups per batch, are not paid every few
/// frames.
fn receive_batches(
    source: &mut dyn FrameSource,
    keys: &mut FrameKeys,
    mut received: FrameBatch,
    free: &Receiver<Batch>,
    workers: &[SyncSender<Batch>],
    shutdown: &Shutdown,
) {
    let deal_at = DEAL_FRAMES.min(received.capacity()).max(1);
    let mut last_error: Option<Instant> = None;
    let mut next = 0;
    // `received` holds frames not yet placed in a batch.
    let mut pending = false;
    let mut filling: Option<Batch> = None;
    while !shutdown.is_triggered() {
        let mut batch = match filling.take() {
            Some(batch) => batch,
            None => match free.recv_timeout(RECV_WAIT) {
                Ok(mut batch) => {
                    batch.frames.clear();
                    batch
                }
                // Every buffer is out: the store is behind.
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return, // rx-admit stopped
            },
        };
        // Nothing more waiting: what was gathered goes on now.
        let mut drained = false;
        if !pending {
            // Once frames are gathered, take only what is already there. A
            // reload is picked up between batches, so that all the frames
            // of one were received under the key ring it carries.
            let wait = if batch.frames.is_empty() {
                keys.pick_up_keys();
                RECV_WAIT
            } else {
                Duration::ZERO
            };
            match source.recv(&mut received, wait) {
                Ok(()) => {
                    pending = !received.is_empty();
                    drained = !pending;
                }
                Err(e) => {
                    // Log once a minute at most; keep trying, the link may
                    // come back.
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::error!(error = %e, "link receive failed; retrying");
                        last_error = Some(Instant::now());
                    }
                    if batch.frames.is_empty() {
                        filling = Some(batch);
                        shutdown.sleep(Duration::from_millis(500));
                        continue;
                    }
                    drained = true;
                }
            }
        }
        if pending {
            let room = batch.frames.capacity().saturating_sub(batch.frames.len());
            if batch.frames.is_empty() && received.len() >= deal_at {
                std::mem::swap(&mut batch.frames, &mut received);
                pending = false;
            } else if received.len() <= room {
                for datagram in received.iter() {
                    // Cannot fail: there is room, and every batch has the
                    // slot size `received` has.
                    let _ = batch.frames.push(datagram);
                }
                pending = false;
            }
            // Otherwise they go into the next batch, once this one is dealt.
        }
        let ready = pending || drained || batch.frames.len() >= deal_at;
        if batch.frames.is_empty() || !ready {
            filling = Some(batch);
            continue;
        }
        batch.opener = keys.opener().clone();
        if workers[next].send(batch).is_err() {
            return; // a worker stopped
        }
        next = (next + 1) % workers.len();
    }
}

/// A verification worker: checks the tag of every frame of a batch and
/// parses its body, but for shards of objects `held` whole, which it leaves
/// unopened; what it made of each goes back with the batch. Shard payloads
/// stay in the batch's buffer while `buffers` may lend one more; otherwise
/// they are copied out.
fn open_batches(
    jobs: Receiver<Batch>,
    done: SyncSender<Batch>,
    buffers: &ReceiveBuffers,
    held: &HeldView,
) {
    for mut batch in jobs {
        let Batch {
            frames,
            opener,
            opened,
        } = &mut batch;
        opened.clear();
        let lend = buffers.may_lend();
        // Tags of several frames at once (several per SHA-256 pass), a
        // slice of the batch at a time so that each frame's body is parsed
        // while the tag check left it in the cache.
        let datagrams: Vec<&[u8]> = frames.iter().collect();
        let mut results = Vec::with_capacity(OPEN_AT_ONCE);
        let mut to_open = Vec::with_capacity(OPEN_AT_ONCE);
        let mut unopened = Vec::with_capacity(OPEN_AT_ONCE);
        for slice in datagrams.chunks(OPEN_AT_ONCE) {
            to_open.clear();
            unopened.clear();
            {
                let held = held.look();
                for &datagram in slice {
                    // Only under a key in use: a frame under another stays
                    // counted as such.
                    let skip = claimed_object(datagram).filter(|(header, id)| {
                        held.contains(id) && opener.keys().get(header.key_id).is_some()
                    });
                    match skip {
                        Some((header, _)) => unopened.push(Some(header)),
                        None => {
                            unopened.push(None);
                            to_open.push(datagram);
                        }
                    }
                }
            }
            opener.open_many(&to_open, &mut results);
            let mut results = results.drain(..);
            for header in unopened.drain(..) {
                opened.push(match header {
                    Some(header) => Opened::Held(header),
                    // One result per frame opened, in order.
                    None => match results.next() {
                        Some(r) => opened_as(r, frames, lend),
                        None => Opened::Refused(FrameError::Invalid("not opened")),
                    },
                });
            }
        }
        if done.send(batch).is_err() {
            return; // rx-admit stopped
        }
    }
}

fn opened_as(result: Result<Frame<'_>, FrameError>, frames: &FrameBatch, lend: bool) -> Opened {
    match result {
        Err(e) => Opened::Refused(e),
        Ok(Frame { header, body }) => Opened::Authentic(
            header,
            match body {
                Body::Shard(s) => match frames.offset_of(s.payload).filter(|_| lend) {
                    Some(start) => Authentic::InPlace {
                        shard: ShardIn::with_payload(&s, Payload::default()),
                        at: start..start + s.payload.len(),
                    },
                    None => Authentic::Inbound(Inbound::Shard(ShardIn::from(&s))),
                },
                Body::ObjectHeader(h) => Authentic::Inbound(Inbound::Header(h)),
                Body::Heartbeat(h) => Authentic::Heartbeat(h),
            },
        ),
    }
}

/// rx-admit: takes the workers' batches back in the turn they were dealt,
/// so in receive order, runs the replay check and counts every frame, and
/// hands what is new to the store. Stops when the store or the workers do.
fn admit_in_order(
    workers: Vec<Receiver<Batch>>,
    mut replay: ReplayCheck,
    give_back: SyncSender<Batch>,
    out: SyncSender<Vec<Inbound>>,
    sender: Arc<Mutex<Option<SenderStatus>>>,
    buffers: &Arc<ReceiveBuffers>,
) {
    let mut last_loss = Instant::now();
    let mut next = 0;
    'batches: loop {
        if last_loss.elapsed() >= LOSS_EVERY {
            replay.publish_loss();
            last_loss = Instant::now();
        }
        let mut batch = match workers[next].recv_timeout(RECV_WAIT) {
            Ok(batch) => batch,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break, // the link stopped
        };
        next = (next + 1) % workers.len();
        let mut frames = Vec::with_capacity(batch.opened.len().min(OUT_FRAMES));
        // The batch's buffer, once lent to the first payload left in it.
        let mut lent: Option<Arc<LentBuffer>> = None;
        for opened in batch.opened.drain(..) {
            let (header, body) = match opened {
                Opened::Authentic(header, body) => (header, body),
                Opened::Refused(e) => {
                    replay.refuse(&e);
                    continue;
                }
                Opened::Held(header) => {
                    replay.unopened(&header);
                    continue;
                }
            };
            // Only now, on a header whose tag verified, may the replay
            // window move.
            if !replay.admit(&header) {
                continue;
            }
            let inbound = match body {
                Authentic::Inbound(frame) => Some(frame),
                Authentic::InPlace { mut shard, at } => {
                    let buffer = lent.get_or_insert_with(|| {
                        buffers.lend(batch.frames.swap_buffer(buffers.replacement()))
                    });
                    // Inside: the worker found the payload in this buffer.
                    shard.payload = Payload::lent(buffer, at).unwrap_or_default();
                    Some(Inbound::Shard(shard))
                }
                Authentic::Heartbeat(h) => {
                    let status = SenderStatus {
                        received_at_ms: now_ms(),
                        uptime_s: h.uptime_s,
                        queued_objects: h.queued_objects,
                        pass: h.pass,
                        config_fingerprint: h.config_fingerprint,
                        sent_frames: h.sent_frames,
                        session_id: header.session_id,
                        ledger: h.ledger,
                    };
                    *sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                    None
                }
            };
            if let Some(frame) = inbound {
                if frames.len() == OUT_FRAMES {
                    let full = std::mem::replace(&mut frames, Vec::with_capacity(OUT_FRAMES));
                    if out.send(full).is_err() {
                        break 'batches; // the store stopped
                    }
                }
                frames.push(frame);
            }
        }
        if !frames.is_empty() && out.send(frames).is_err() {
            break; // the store stopped
        }
        // Fails only once the link thread stopped; the batches the workers
        // still hold are admitted all the same.
        let _ = give_back.send(batch);
    }
    replay.publish_loss();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU64, Ordering};
    use weir_host::link::LinkError;
    use weir_host::reload::Reloadable;
    use weir_proto::{FecParams, FrameSealer, Key, KeyRing, ObjectId, ObjectKind, ShardFrame};

    use crate::status::Counters;

    const DATAGRAM: usize = 1472;

    fn key(id: u16, fill: u8) -> Key {
        Key::from_bytes(id, &[fill; 32]).unwrap()
    }

    /// A shard whose 4-byte payload carries `n`, to read the order back.
    fn shard(sealer: &mut FrameSealer, n: u32) -> Vec<u8> {
        shard_of(ObjectId([7; 32]), sealer, n)
    }

    /// A shard of `object` whose 4-byte payload carries `n`.
    fn shard_of(object: ObjectId, sealer: &mut FrameSealer, n: u32) -> Vec<u8> {
        let fec = FecParams::new(4, 2, 4).unwrap();
        let body = Body::Shard(ShardFrame {
            object,
            kind: ObjectKind::Blob,
            object_len: 1 << 20,
            fec,
            block: n / 6,
            index: (n % 6) as u16,
            payload: &n.to_be_bytes(),
        });
        let mut out = Vec::new();
        sealer.seal(&body, &mut out);
        out
    }

    fn heartbeat(sealer: &mut FrameSealer, pass: u64) -> Vec<u8> {
        let mut out = Vec::new();
        sealer.seal(&crate::verify::tests::heartbeat(pass), &mut out);
        out
    }

    /// The same header and body as `frame`, under a tag `forger` made.
    fn forged(frame: &[u8], forger: &Key, session_id: u64, seq: u64) -> Vec<u8> {
        let body = &frame[weir_proto::frame::HEADER_LEN..frame.len() - weir_proto::frame::TAG_LEN];
        let mut out = Vec::new();
        weir_proto::frame::seal_raw(forger, frame[5], session_id, seq, body, &mut out);
        out
    }

    enum Step {
        Frames(Vec<Vec<u8>>),
        /// Nothing waiting: the receive comes back empty, so what the link
        /// gathered goes on.
        Pause,
        /// A reload of the key ring while the link waits for frames.
        Reload(Arc<Reloadable<KeyRing>>, KeyRing),
    }

    /// A link that delivers prepared batches, one per receive, then asks the
    /// gateway to stop.
    struct Script {
        steps: VecDeque<Step>,
        shutdown: Shutdown,
    }

    impl FrameSource for Script {
        fn recv(&mut self, batch: &mut FrameBatch, _: Duration) -> Result<(), LinkError> {
            batch.clear();
            match self.steps.pop_front() {
                Some(Step::Frames(frames)) => {
                    for f in frames {
                        assert!(batch.push(&f), "a test batch fits");
                    }
                }
                Some(Step::Pause) => {}
                Some(Step::Reload(ring, keys)) => ring.set(keys),
                None => self.shutdown.trigger(),
            }
            Ok(())
        }
    }

    struct Run {
        /// What the store got, batch by batch.
        batches: Vec<Vec<Inbound>>,
        counters: Arc<Counters>,
        sender: Option<SenderStatus>,
    }

    impl Run {
        /// The numbers the shards carry, in the order the store got them.
        fn numbers(&self) -> Vec<u32> {
            self.batches
                .iter()
                .flatten()
                .map(|f| match f {
                    Inbound::Shard(s) => u32::from_be_bytes(s.payload[..].try_into().unwrap()),
                    Inbound::Header(_) => panic!("only shards were sent"),
                })
                .collect()
        }

        fn count(&self, c: impl Fn(&Counters) -> &AtomicU64) -> u64 {
            c(&self.counters).load(Ordering::Relaxed)
        }
    }

    fn run(steps: Vec<Step>, workers: usize, ring: &Arc<Reloadable<KeyRing>>) -> Run {
        run_holding(steps, workers, ring, HeldView::default())
    }

    /// [`run`] for a receiver that holds whole the objects `held` lists.
    fn run_holding(
        steps: Vec<Step>,
        workers: usize,
        ring: &Arc<Reloadable<KeyRing>>,
        held: HeldView,
    ) -> Run {
        let counters = Arc::new(Counters::default());
        let verifier = Verifier::new((*ring.current()).clone(), None, counters.clone())
            .unwrap()
            .with_key_updates(ring.reader());
        let shutdown = Shutdown::new();
        let source = Box::new(Script {
            steps: steps.into(),
            shutdown: shutdown.clone(),
        });
        let (out, store) = mpsc::sync_channel(4);
        let store = std::thread::spawn(move || store.iter().collect::<Vec<_>>());
        let sender = Arc::new(Mutex::new(None));
        receive(
            source,
            verifier,
            held,
            DATAGRAM,
            workers,
            out,
            sender.clone(),
            shutdown,
        )
        .unwrap();
        let batches = store.join().unwrap();
        let sender = sender.lock().unwrap().clone();
        Run {
            batches,
            counters,
            sender,
        }
    }

    fn ring(keys: Vec<Key>) -> Arc<Reloadable<KeyRing>> {
        Reloadable::new(KeyRing::new(keys).unwrap())
    }

    /// Batches of very different sizes, so the workers finish out of turn:
    /// the store still gets every frame in the order received.
    #[test]
    fn frames_verified_by_several_workers_reach_the_store_in_receive_order() {
        let mut sealer = FrameSealer::new(key(1, 7), 100);
        let mut steps = Vec::new();
        let mut n = 0;
        for i in 0..40 {
            let size = if i % 4 == 0 { 500 } else { i % 7 + 1 };
            let frames = (0..size)
                .map(|_| {
                    n += 1;
                    shard(&mut sealer, n - 1)
                })
                .collect();
            steps.push(Step::Frames(frames));
            if i % 3 == 0 {
                steps.push(Step::Pause);
            }
        }
        steps.push(Step::Frames(vec![heartbeat(&mut sealer, 42)]));
        let r = run(steps, 3, &ring(vec![key(1, 7)]));
        assert_eq!(r.numbers(), (0..n).collect::<Vec<_>>());
        assert!(r
            .batches
            .iter()
            .all(|b| !b.is_empty() && b.len() <= OUT_FRAMES));
        assert_eq!(r.count(|c| &c.frames_accepted), u64::from(n) + 1);
        assert_eq!(r.count(|c| &c.frames_lost_estimate), 0);
        assert_eq!(r.count(|c| &c.frames_expected), u64::from(n) + 1);
        let status = r.sender.expect("the heartbeat reached the sender status");
        assert_eq!((status.pass, status.session_id), (42, 100));
    }

    /// Frames with a bad tag claiming the next sequence number, one far
    /// ahead, and a newer session sit between real ones: each is counted
    /// as a bad tag and none moves the replay window, so the real frames
    /// after them are all accepted; an authentic replay is refused once.
    #[test]
    fn forged_frames_among_real_ones_are_counted_and_move_no_window() {
        let session = 100;
        let mut sealer = FrameSealer::new(key(1, 7), session);
        let real: Vec<Vec<u8>> = (0..10).map(|n| shard(&mut sealer, n)).collect();
        let forger = key(1, 99);
        let steps = vec![
            Step::Frames(real[..5].to_vec()),
            Step::Pause,
            Step::Frames(vec![
                forged(&real[5], &forger, session, 5),
                real[5].clone(),
                forged(&real[5], &forger, session, 1_000_000),
                forged(&real[5], &forger, session + 1, 0),
            ]),
            Step::Pause,
            Step::Frames(real[6..].to_vec()),
            Step::Pause,
            Step::Frames(vec![real[2].clone()]),
        ];
        let r = run(steps, 2, &ring(vec![key(1, 7)]));
        assert_eq!(r.numbers(), (0..10).collect::<Vec<_>>());
        assert_eq!(r.count(|c| &c.frames_accepted), 10);
        assert_eq!(r.count(|c| &c.frames_bad_tag), 3);
        assert_eq!(r.count(|c| &c.frames_replayed), 1);
        assert_eq!(r.count(|c| &c.frames_lost_estimate), 0);
    }

    /// Frames of a key the ring does not hold are refused until a reload
    /// adds it; from the next batch on the workers accept them.
    /// Shards of an object held whole, interleaved with those of one still
    /// arriving, are dropped before their tags are checked: the store gets
    /// only the others, in order; a forgery of a held object's shard is
    /// dropped the same way, and moves no window, so the real frames after
    /// it are all accepted; one under a key id not in use is counted as
    /// such; and the dropped frames count as arrivals, not losses.
    #[test]
    fn shards_of_held_objects_are_dropped_unopened_and_not_counted_lost() {
        let (held_id, new_id) = (ObjectId([1; 32]), ObjectId([2; 32]));
        let session = 100;
        let mut sealer = FrameSealer::new(key(1, 7), session);
        let mut frames = Vec::new();
        for n in 0..60 {
            let object = if n % 3 == 0 { new_id } else { held_id };
            frames.push(shard_of(object, &mut sealer, n));
        }
        let forger = key(1, 99);
        let held_forgery = forged(&frames[1], &forger, session, 1_000_000);
        let mut stranger = FrameSealer::new(key(5, 7), session);
        let steps = vec![
            Step::Frames(frames[..30].to_vec()),
            Step::Pause,
            Step::Frames(vec![held_forgery, shard_of(held_id, &mut stranger, 0)]),
            Step::Pause,
            Step::Frames(frames[30..].to_vec()),
            Step::Pause,
            Step::Frames(vec![heartbeat(&mut sealer, 3)]),
        ];
        let mut held = crate::shards::HeldObjects::new([held_id]);
        let r = run_holding(steps, 2, &ring(vec![key(1, 7)]), held.view());
        assert_eq!(r.numbers(), (0..60).step_by(3).collect::<Vec<_>>());
        assert_eq!(r.count(|c| &c.frames_accepted), 20 + 1);
        assert_eq!(r.count(|c| &c.frames_held_unopened), 40 + 1);
        assert_eq!(r.count(|c| &c.frames_unknown_key), 1);
        assert_eq!(r.count(|c| &c.frames_bad_tag), 0);
        assert_eq!(r.count(|c| &c.frames_expected), 61);
        assert_eq!(r.count(|c| &c.frames_lost_estimate), 0);

        // Once the store no longer holds it, its shards are opened again.
        held.remove(&held_id);
        let again = vec![Step::Frames(vec![shard_of(held_id, &mut sealer, 7)])];
        let r = run_holding(again, 1, &ring(vec![key(1, 7)]), held.view());
        assert_eq!(r.numbers(), vec![7]);
        assert_eq!(r.count(|c| &c.frames_held_unopened), 0);
    }

    #[test]
    fn a_key_reload_reaches_the_workers() {
        let keys = ring(vec![key(1, 7)]);
        let mut old = FrameSealer::new(key(1, 7), 100);
        let mut new = FrameSealer::new(key(3, 9), 200);
        let steps = vec![
            Step::Frames(vec![
                shard(&mut new, 0),
                shard(&mut old, 1),
                shard(&mut new, 2),
            ]),
            Step::Reload(
                keys.clone(),
                KeyRing::new(vec![key(1, 7), key(3, 9)]).unwrap(),
            ),
            Step::Frames(vec![shard(&mut new, 3), shard(&mut old, 4)]),
            Step::Frames(vec![shard(&mut new, 5)]),
        ];
        let r = run(steps, 2, &keys);
        assert_eq!(r.numbers(), vec![1, 3, 4, 5]);
        assert_eq!(r.count(|c| &c.frames_unknown_key), 2);
        assert_eq!(r.count(|c| &c.frames_accepted), 4);
    }

    /// Receives of a few frames each (datagrams that were not coalesced)
    /// are gathered while more are waiting: the store gets them in batches
    /// of OUT_FRAMES, not of 16, and a large receive goes on whole.
    #[test]
    fn small_receives_are_gathered_and_large_ones_go_on_whole() {
        let mut sealer = FrameSealer::new(key(1, 7), 100);
        let mut n = 0;
        let mut frames = |count: u32| {
            let batch = (n..n + count).map(|i| shard(&mut sealer, i)).collect();
            n += count;
            Step::Frames(batch)
        };
        let mut steps: Vec<Step> = (0..16).map(|_| frames(16)).collect();
        steps.push(frames(5));
        steps.push(Step::Pause);
        steps.push(frames(300));
        let r = run(steps, 2, &ring(vec![key(1, 7)]));
        assert_eq!(r.numbers(), (0..n).collect::<Vec<_>>());
        let sizes: Vec<usize> = r.batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![256, 5, 256, 44]);
    }

    /// An idle link: receives come back empty after a while.
    struct Idle;

    impl FrameSource for Idle {
        fn recv(&mut self, batch: &mut FrameBatch, timeout: Duration) -> Result<(), LinkError> {
            batch.clear();
            std::thread::sleep(timeout.min(Duration::from_millis(20)));
            Ok(())
        }
    }

    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect()
    }

    /// The workers and rx-admit run under their names, and all of them
    /// stop within a receive wait or two of the shutdown.
    #[test]
    fn shutdown_stops_every_thread_promptly() {
        let counters = Arc::new(Counters::default());
        let verifier =
            Verifier::new(KeyRing::new(vec![key(1, 7)]).unwrap(), None, counters).unwrap();
        let shutdown = Shutdown::new();
        let (out, _store) = mpsc::sync_channel(4);
        let (ended, has_ended) = mpsc::channel();
        let link = std::thread::spawn({
            let shutdown = shutdown.clone();
            move || {
                let r = receive(
                    Box::new(Idle),
                    verifier,
                    HeldView::default(),
                    DATAGRAM,
                    2,
                    out,
                    Arc::new(Mutex::new(None)),
                    shutdown,
                );
                let _ = ended.send(());
                r
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let names = thread_names();
            if ["rx-verify-0", "rx-verify-1", "rx-admit"]
                .iter()
                .all(|n| names.iter().any(|t| t == n))
            {
                break;
            }
            assert!(Instant::now() < deadline, "threads not named: {names:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        shutdown.trigger();
        // Within a few waits, not at the next frame (none comes); the
        // margin is for a loaded machine.
        has_ended
            .recv_timeout(10 * RECV_WAIT)
            .expect("the link stops");
        link.join().unwrap().unwrap();
    }

    /// A link that always has frames waiting.
    struct Flood(FrameSealer, u32);

    impl FrameSource for Flood {
        fn recv(&mut self, batch: &mut FrameBatch, _: Duration) -> Result<(), LinkError> {
            batch.clear();
            for _ in 0..64 {
                self.1 += 1;
                batch.push(&shard(&mut self.0, self.1));
            }
            Ok(())
        }
    }

    /// When the store stops taking frames, the link and its threads stop
    /// too, without a shutdown.
    #[test]
    fn the_store_stopping_stops_the_link() {
        let counters = Arc::new(Counters::default());
        let verifier =
            Verifier::new(KeyRing::new(vec![key(1, 7)]).unwrap(), None, counters).unwrap();
        let (out, store) = mpsc::sync_channel(2);
        let (ended, has_ended) = mpsc::channel();
        let source = Flood(FrameSealer::new(key(1, 7), 100), 0);
        std::thread::spawn(move || {
            let r = receive(
                Box::new(source),
                verifier,
                HeldView::default(),
                DATAGRAM,
                3,
                out,
                Arc::new(Mutex::new(None)),
                Shutdown::new(),
            );
            let _ = ended.send(r.is_ok());
        });
        for _ in 0..5 {
            store.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        drop(store);
        assert_eq!(has_ended.recv_timeout(Duration::from_secs(5)), Ok(true));
    }

    #[test]
    fn workers_follow_the_cores_within_bounds() {
        assert!((1..=MAX_VERIFY_WORKERS).contains(&verify_workers()));
    }
}
