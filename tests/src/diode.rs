//! A one-way UDP link with faults: what `diode-sim` runs, usable in-process.
//!
//! Datagrams arriving on `listen` go out to `forward` from a second socket;
//! nothing is ever sent toward the sender, and what the far side sends to
//! the output socket is never read. On the way, seeded faults:
//!
//! - blackout windows (relative to start, or to the first datagram):
//!   every datagram dropped;
//! - a token-bucket rate cap: a datagram above the cap is dropped, as a
//!   real diode (no flow control) loses it;
//! - Gilbert–Elliott burst loss: a good and a bad state with per-datagram
//!   transition probabilities (`enter`, `exit`) and a loss probability in
//!   the bad state, plus independent loss (`loss`) in either state;
//! - corruption (one random byte flipped), duplication, reordering (a
//!   datagram held back and released after the next 1–3);
//! - an [`ObjectFilter`]: the frames of chosen objects dropped, whatever
//!   pass carries them (one image that never arrives), changed while the
//!   diode runs.
//!
//! Every datagram draws the same random numbers whatever happens to it, so
//! the fate of the n-th datagram depends only on the seed and n (plus the
//! clock, for blackouts and the rate cap): the same input order gives the
//! same output.
//!
//! Batches of up to 64 datagrams move with `recvmmsg`/`sendmmsg` into
//! buffers allocated once; nothing is allocated per datagram.

// recvmmsg and a forced socket buffer size have no safe wrapper in std or socket2.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use weir_proto::pacing::TokenBucket;

/// Datagrams moved per system call.
const BATCH: usize = 64;
/// Largest UDP payload (IPv4 65507, IPv6 jumbograms aside), rounded up.
const MAX_DATAGRAM: usize = 65_536;
/// Datagrams that can be held back for reordering at once.
const HELD_SLOTS: usize = 16;
/// How often an idle loop looks at the stop flag and the clock.
const POLL: Duration = Duration::from_millis(20);
/// Socket buffers asked for (the kernel may grant less; see
/// [`DiodeHandle::socket_buffers`]).
pub const DEFAULT_SOCKET_BUFFER: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DiodeError {
    #[error("diode config: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("diode thread panicked")]
    Panicked,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DiodeError {
    let context = context.into();
    move |source| DiodeError::Io { context, source }
}

/// Gilbert–Elliott burst loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurstLoss {
    /// Per datagram, probability good -> bad.
    pub enter: f64,
    /// Per datagram, probability bad -> good (mean burst length 1/exit).
    pub exit: f64,
    /// Loss probability while bad.
    pub loss: f64,
}

/// A window, relative to the diode's start, in which everything is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blackout {
    pub start: Duration,
    pub duration: Duration,
}

impl Blackout {
    fn contains(&self, t: Duration) -> bool {
        t >= self.start && t < self.start + self.duration
    }
}

impl FromStr for Blackout {
    type Err = DiodeError;

    /// `START_S:DURATION_S`, seconds, fractions allowed: `10:2.5`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DiodeError::Config(format!("blackout {s:?}: expected START_S:DURATION_S"));
        let (start, duration) = s.split_once(':').ok_or_else(bad)?;
        let secs = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(bad)
        };
        Ok(Blackout {
            start: secs(start)?,
            duration: secs(duration)?,
        })
    }
}

/// Drops every frame (object header or shard) of chosen objects: a test's
/// way to make exactly one image never arrive, until it is released.
#[derive(Default)]
pub struct ObjectFilter {
    state: Mutex<FilterState>,
}

#[derive(Default)]
struct FilterState {
    image_objects: bool,
    objects: HashSet<[u8; 32]>,
}

/// Where a header or shard frame names its object (its body's first 32
/// bytes) and the object's kind (the byte after).
const OBJECT_ID_AT: std::ops::Range<usize> = 28..60;
const OBJECT_KIND_AT: usize = 60;

impl ObjectFilter {
    fn state(&self) -> std::sync::MutexGuard<'_, FilterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every image object's frames (its blobs pass), or stops.
    pub fn drop_image_objects(&self, on: bool) {
        self.state().image_objects = on;
    }

    /// Drops the frames of object `id` (its sha256).
    pub fn drop_object(&self, id: [u8; 32]) {
        self.state().objects.insert(id);
    }

    /// Lets everything through again.
    pub fn release(&self) {
        let mut s = self.state();
        s.image_objects = false;
        s.objects.clear();
    }

    fn drops(&self, frame: &[u8]) -> bool {
        // Kinds 1 and 2: object header and shard.
        if frame.len() <= OBJECT_KIND_AT || !matches!(frame.get(5), Some(1 | 2)) {
            return false;
        }
        let s = self.state();
        (s.image_objects && frame[OBJECT_KIND_AT] == 1)
            || frame[OBJECT_ID_AT]
                .try_into()
                .is_ok_and(|id: [u8; 32]| s.objects.contains(&id))
    }
}

/// A shared [`ObjectFilter`] in a diode's configuration.
#[derive(Clone, Default)]
pub struct FilterHandle(pub Arc<ObjectFilter>);

impl PartialEq for FilterHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for FilterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FilterHandle")
    }
}

/// Everything the diode does; `DiodeConfig::new` has every fault off.
#[derive(Debug, Clone, PartialEq)]
pub struct DiodeConfig {
    /// Where the sender sends (port 0: any free port, see
    /// [`DiodeHandle::local_addr`]).
    pub listen: SocketAddr,
    /// Where datagrams go.
    pub forward: SocketAddr,
    pub seed: u64,
    /// Independent loss probability per datagram.
    pub loss: f64,
    pub burst: Option<BurstLoss>,
    /// Probability that one random byte of a datagram is flipped.
    pub corrupt: f64,
    /// Probability that a datagram is sent twice.
    pub duplicate: f64,
    /// Probability that a datagram is held and sent after the next 1–3.
    pub reorder: f64,
    pub blackouts: Vec<Blackout>,
    /// Blackout windows count from the first datagram, not from the start:
    /// a window then covers what the sender sends, however long it took to
    /// start.
    pub blackouts_from_first_datagram: bool,
    /// Link rate cap in bits per second of UDP payload; None: no cap.
    pub rate_bps: Option<u64>,
    /// Token bucket depth in bytes; default max(64 KiB, 10 ms at the rate).
    pub rate_burst_bytes: Option<u64>,
    /// Stop by itself after this long; None: until stopped.
    pub duration: Option<Duration>,
    /// Receive/send buffer size asked for.
    pub socket_buffer: usize,
    /// Frames of chosen objects dropped.
    pub filter: Option<FilterHandle>,
}

impl DiodeConfig {
    pub fn new(listen: SocketAddr, forward: SocketAddr) -> Self {
        Self {
            listen,
            forward,
            seed: 0,
            loss: 0.0,
            burst: None,
            corrupt: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            blackouts: Vec::new(),
            blackouts_from_first_datagram: false,
            rate_bps: None,
            rate_burst_bytes: None,
            duration: None,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            filter: None,
        }
    }

    pub fn validate(&self) -> Result<(), DiodeError> {
        let mut probabilities = vec![
            ("loss", self.loss),
            ("corrupt", self.corrupt),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ];
        if let Some(b) = &self.burst {
            probabilities.extend([
                ("burst-enter", b.enter),
                ("burst-exit", b.exit),
                ("burst-loss", b.loss),
            ]);
        }
        for (name, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return Err(DiodeError::Config(format!(
                    "{name} = {p}: must be within 0..=1"
                )));
            }
        }
        if self.rate_bps == Some(0) {
            return Err(DiodeError::Config(
                "rate-bps = 0: nothing could pass".into(),
            ));
        }
        if self.listen.is_ipv4() != self.forward.is_ipv4() {
            return Err(DiodeError::Config(format!(
                "listen {} and forward {} are of different address families",
                self.listen, self.forward
            )));
        }
        Ok(())
    }

    fn bucket_depth(&self) -> Option<f64> {
        self.rate_bps.map(|bps| {
            let bytes_per_s = bps as f64 / 8.0;
            self.rate_burst_bytes
                .map(|b| b as f64)
                .unwrap_or((bytes_per_s * 0.010).max(65_536.0))
        })
    }
}

/// Live counters, shared with the diode thread.
#[derive(Debug, Default)]
pub struct DiodeStats {
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Datagrams sent out (a duplicate counts twice).
    pub forwarded: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_burst: AtomicU64,
    pub dropped_blackout: AtomicU64,
    pub dropped_rate: AtomicU64,
    /// Frames of an object the filter drops.
    pub dropped_filter: AtomicU64,
    pub corrupted: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    /// `sendmmsg` refused a datagram (e.g. ENOBUFS); it is lost.
    pub send_errors: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiodeCounters {
    pub received: u64,
    pub received_bytes: u64,
    pub forwarded: u64,
    pub forwarded_bytes: u64,
    pub dropped_loss: u64,
    pub dropped_burst: u64,
    pub dropped_blackout: u64,
    pub dropped_rate: u64,
    pub dropped_filter: u64,
    pub corrupted: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub send_errors: u64,
}

impl DiodeCounters {
    pub fn dropped(&self) -> u64 {
        self.dropped_loss
            + self.dropped_burst
            + self.dropped_blackout
            + self.dropped_rate
            + self.dropped_filter
    }
}

impl fmt::Display for DiodeCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received={} forwarded={} dropped_loss={} dropped_burst={} dropped_blackout={} \
             dropped_rate={} dropped_filter={} corrupted={} duplicated={} reordered={} send_errors={} \
             received_bytes={} forwarded_bytes={}",
            self.received,
            self.forwarded,
            self.dropped_loss,
            self.dropped_burst,
            self.dropped_blackout,
            self.dropped_rate,
            self.dropped_filter,
            self.corrupted,
            self.duplicated,
            self.reordered,
            self.send_errors,
            self.received_bytes,
            self.forwarded_bytes,
        )
    }
}

impl DiodeStats {
    pub fn snapshot(&self) -> DiodeCounters {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DiodeCounters {
            received: r(&self.received),
            received_bytes: r(&self.received_bytes),
            forwarded: r(&self.forwarded),
            forwarded_bytes: r(&self.forwarded_bytes),
            dropped_loss: r(&self.dropped_loss),
            dropped_burst: r(&self.dropped_burst),
            dropped_blackout: r(&self.dropped_blackout),
            dropped_rate: r(&self.dropped_rate),
            dropped_filter: r(&self.dropped_filter),
            corrupted: r(&self.corrupted),
            duplicated: r(&self.duplicated),
            reordered: r(&self.reordered),
            send_errors: r(&self.send_errors),
        }
    }

    fn add(&self, c: &DiodeCounters) {
        let a = |x: &AtomicU64, v: u64| {
            if v != 0 {
                x.fetch_add(v, Ordering::Relaxed);
            }
        };
        a(&self.received, c.received);
        a(&self.received_bytes, c.received_bytes);
        a(&self.forwarded, c.forwarded);
        a(&self.forwarded_bytes, c.forwarded_bytes);
        a(&self.dropped_loss, c.dropped_loss);
        a(&self.dropped_burst, c.dropped_burst);
        a(&self.dropped_blackout, c.dropped_blackout);
        a(&self.dropped_rate, c.dropped_rate);
        a(&self.dropped_filter, c.dropped_filter);
        a(&self.corrupted, c.corrupted);
        a(&self.duplicated, c.duplicated);
        a(&self.reordered, c.reordered);
        a(&self.send_errors, c.send_errors);
    }
}

/// Socket buffer sizes the kernel granted (as `getsockopt` reports them,
/// i.e. doubled by Linux for bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    pub receive: usize,
    pub send: usize,
}

/// A running diode. Dropping it stops the thread.
pub struct DiodeHandle {
    local_addr: SocketAddr,
    /// A duplicate of the listening socket, so its kernel counters stay
    /// readable after the thread ends (the port stays bound until drop).
    input: UdpSocket,
    stats: Arc<DiodeStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), DiodeError>>>,
    buffers: SocketBuffers,
}

impl DiodeHandle {
    /// The address the sender must send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<DiodeStats> {
        Arc::clone(&self.stats)
    }

    pub fn socket_buffers(&self) -> SocketBuffers {
        self.buffers
    }

    /// Datagrams the kernel dropped on the listening socket because its
    /// buffer was full (invisible to the counters above); Linux only.
    pub fn kernel_drops(&self) -> Option<u64> {
        kernel_udp_drops(self.input.local_addr().ok()?)
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the diode (held datagrams are sent first) and returns the
    /// final counters.
    pub fn stop(mut self) -> Result<DiodeCounters, DiodeError> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits until the diode stops by itself (its `duration`) or `stop` is
    /// asked from elsewhere.
    pub fn wait(mut self) -> Result<DiodeCounters, DiodeError> {
        self.join()
    }

    fn join(&mut self) -> Result<DiodeCounters, DiodeError> {
        if let Some(thread) = self.thread.take() {
            thread.join().map_err(|_| DiodeError::Panicked)??;
        }
        Ok(self.stats.snapshot())
    }
}

impl Drop for DiodeHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.join();
    }
}

/// Namespace of [`Diode::spawn`].
pub struct Diode;

impl Diode {
    /// Binds the sockets (so the listen address is ready when this returns)
    /// and runs the diode on its own thread.
    pub fn spawn(config: DiodeConfig) -> Result<DiodeHandle, DiodeError> {
        config.validate()?;
        let domain = Domain::for_address(config.listen);
        let input = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))
            .map_err(io_err("creating the listening socket"))?;
        set_buffer(
            &input,
            libc::SO_RCVBUFFORCE,
            config.socket_buffer,
            |s, n| s.set_recv_buffer_size(n),
        );
        input
            .bind(&config.listen.into())
            .map_err(io_err(format!("binding {}", config.listen)))?;
        input
            .set_read_timeout(Some(POLL))
            .map_err(io_err("setting the receive timeout"))?;
        let output = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))
            .map_err(io_err("creating the forwarding socket"))?;
        set_buffer(
            &output,
            libc::SO_SNDBUFFORCE,
            config.socket_buffer,
            |s, n| s.set_send_buffer_size(n),
        );
        let any = SocketAddr::new(
            if config.forward.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        );
        output
            .bind(&any.into())
            .map_err(io_err("binding the forwarding socket"))?;
        let buffers = SocketBuffers {
            receive: input.recv_buffer_size().unwrap_or(0),
            send: output.send_buffer_size().unwrap_or(0),
        };
        if buffers.receive < config.socket_buffer {
            tracing::warn!(
                granted = buffers.receive,
                asked = config.socket_buffer,
                "diode receive buffer smaller than asked: raise net.core.rmem_max"
            );
        }
        let input: UdpSocket = input.into();
        let local_addr = input
            .local_addr()
            .map_err(io_err("reading the listening address"))?;
        let input_kept = input
            .try_clone()
            .map_err(io_err("duplicating the listening socket"))?;
        let stats = Arc::new(DiodeStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
            let output: UdpSocket = output.into();
            thread::Builder::new()
                .name("diode".into())
                .spawn(move || run(config, input, output, &stats, &stop))
                .map_err(io_err("starting the diode thread"))?
        };
        Ok(DiodeHandle {
            local_addr,
            input: input_kept,
            stats,
            stop,
            thread: Some(thread),
            buffers,
        })
    }
}

/// Asks for `size` with the privileged option (bypasses
/// net.core.[rw]mem_max when running as root), else the ordinary one.
fn set_buffer(
    socket: &Socket,
    force_option: libc::c_int,
    size: usize,
    ordinary: impl Fn(&Socket, usize) -> io::Result<()>,
) {
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid c_int.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            force_option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = ordinary(socket, size);
    }
}

/// The per-datagram random draws, always all of them (see module doc).
struct Draws {
    enter_or_exit: f64,
    burst_loss: f64,
    loss: f64,
    corrupt: f64,
    corrupt_at: f64,
    corrupt_xor: u8,
    duplicate: f64,
    reorder: f64,
    reorder_gap: u8,
}

impl Draws {
    fn next(rng: &mut ChaCha8Rng) -> Self {
        Draws {
            enter_or_exit: rng.gen(),
            burst_loss: rng.gen(),
            loss: rng.gen(),
            corrupt: rng.gen(),
            corrupt_at: rng.gen(),
            corrupt_xor: rng.gen_range(1..=255),
            duplicate: rng.gen(),
            reorder: rng.gen(),
            reorder_gap: rng.gen_range(1..=3),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Released after this many more datagrams go out.
    Held(u8),
    /// In this batch's output; free once it is sent.
    Releasing,
}

/// Where an outgoing datagram's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Batch(usize),
    Held(usize),
}

/// One entry of a batch's output: a datagram, sent `copies` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Out {
    source: Source,
    copies: u8,
}

/// Datagrams held back for reordering, in buffers allocated once.
struct HeldBack {
    buf: Vec<u8>,
    len: [usize; HELD_SLOTS],
    copies: [u8; HELD_SLOTS],
    state: [Slot; HELD_SLOTS],
}

impl HeldBack {
    fn new() -> Self {
        Self {
            buf: vec![0u8; HELD_SLOTS * MAX_DATAGRAM],
            len: [0; HELD_SLOTS],
            copies: [1; HELD_SLOTS],
            state: [Slot::Free; HELD_SLOTS],
        }
    }

    /// Holds a copy of `bytes` until `gap` more datagrams go out; false
    /// when every slot is busy (the datagram then goes out in order).
    fn hold(&mut self, bytes: &[u8], gap: u8, copies: u8) -> bool {
        let Some(k) = self.state.iter().position(|s| *s == Slot::Free) else {
            return false;
        };
        self.buf[k * MAX_DATAGRAM..k * MAX_DATAGRAM + bytes.len()].copy_from_slice(bytes);
        self.len[k] = bytes.len();
        self.copies[k] = copies;
        self.state[k] = Slot::Held(gap);
        true
    }

    /// One more datagram went out: release those whose turn has come.
    fn one_went_out(&mut self, out: &mut Vec<Out>) {
        for k in 0..HELD_SLOTS {
            if let Slot::Held(left) = self.state[k] {
                if left <= 1 {
                    self.state[k] = Slot::Releasing;
                    out.push(Out {
                        source: Source::Held(k),
                        copies: self.copies[k],
                    });
                } else {
                    self.state[k] = Slot::Held(left - 1);
                }
            }
        }
    }

    fn release_all(&mut self, out: &mut Vec<Out>) {
        for k in 0..HELD_SLOTS {
            if matches!(self.state[k], Slot::Held(_)) {
                self.state[k] = Slot::Releasing;
                out.push(Out {
                    source: Source::Held(k),
                    copies: self.copies[k],
                });
            }
        }
    }

    /// The batch was sent: released slots can be reused.
    fn sent(&mut self) {
        for s in self.state.iter_mut() {
            if *s == Slot::Releasing {
                *s = Slot::Free;
            }
        }
    }
}

/// The link's state between datagrams.
struct Link {
    config: DiodeConfig,
    rng: ChaCha8Rng,
    in_burst: bool,
    /// The rate cap, as a policer: what the bucket does not hold is dropped.
    bucket: Option<TokenBucket>,
}

impl Link {
    fn new(config: DiodeConfig, now: Instant) -> Self {
        let bucket = config
            .rate_bps
            .zip(config.bucket_depth())
            .map(|(bps, depth)| TokenBucket::with_byte_rate(bps as f64 / 8.0, depth, now));
        Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            in_burst: false,
            bucket,
            config,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(bucket) = &mut self.bucket {
            bucket.refill(now);
        }
    }

    /// The fate of one datagram, `t` after start: dropped (None), or sent
    /// `copies` times, maybe after a byte was flipped in place, maybe held
    /// back (`Fate::Hold`).
    fn decide(&mut self, t: Duration, bytes: &mut [u8], c: &mut DiodeCounters) -> Fate {
        let d = Draws::next(&mut self.rng);
        let len = bytes.len();
        c.received += 1;
        c.received_bytes += len as u64;
        // The burst state moves on every datagram, lost or not.
        if let Some(b) = &self.config.burst {
            self.in_burst = if self.in_burst {
                d.enter_or_exit >= b.exit
            } else {
                d.enter_or_exit < b.enter
            };
        }
        if self
            .config
            .filter
            .as_ref()
            .is_some_and(|f| f.0.drops(bytes))
        {
            c.dropped_filter += 1;
            return Fate::Dropped;
        }
        if self.config.blackouts.iter().any(|w| w.contains(t)) {
            c.dropped_blackout += 1;
            return Fate::Dropped;
        }
        if let Some(bucket) = &mut self.bucket {
            // Refilled for this batch's arrival time already.
            if !bucket.take(len as u64) {
                c.dropped_rate += 1;
                return Fate::Dropped;
            }
        }
        if self.in_burst && self.config.burst.is_some_and(|b| d.burst_loss < b.loss) {
            c.dropped_burst += 1;
            return Fate::Dropped;
        }
        if d.loss < self.config.loss {
            c.dropped_loss += 1;
            return Fate::Dropped;
        }
        if len > 0 && d.corrupt < self.config.corrupt {
            let at = ((d.corrupt_at * len as f64) as usize).min(len - 1);
            bytes[at] ^= d.corrupt_xor;
            c.corrupted += 1;
        }
        let copies = if d.duplicate < self.config.duplicate {
            2
        } else {
            1
        };
        if d.reorder < self.config.reorder {
            Fate::Hold {
                gap: d.reorder_gap,
                copies,
            }
        } else {
            Fate::Send { copies }
        }
    }
}

enum Fate {
    Dropped,
    Send { copies: u8 },
    Hold { gap: u8, copies: u8 },
}

fn run(
    config: DiodeConfig,
    input: UdpSocket,
    output: UdpSocket,
    stats: &DiodeStats,
    stop: &AtomicBool,
) -> Result<(), DiodeError> {
    let forward = SockAddr::from(config.forward);
    let started = Instant::now();
    let duration = config.duration;
    let mut clock_from = (!config.blackouts_from_first_datagram).then_some(started);
    let mut link = Link::new(config, started);
    tracing::info!(
        listen = %input.local_addr().map_err(io_err("listen address"))?,
        forward = %link.config.forward,
        seed = link.config.seed,
        "diode running"
    );

    // Every buffer once, up front.
    let mut batch = vec![0u8; BATCH * MAX_DATAGRAM];
    let mut lens = [0usize; BATCH];
    let mut held = HeldBack::new();
    let mut out: Vec<Out> = Vec::with_capacity(BATCH + HELD_SLOTS);
    let mut sender = BatchSender::new(&forward);
    let mut in_iov: Vec<libc::iovec> = (0..BATCH)
        .map(|i| libc::iovec {
            iov_base: batch[i * MAX_DATAGRAM..].as_mut_ptr().cast(),
            iov_len: MAX_DATAGRAM,
        })
        .collect();
    let mut in_msgs: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
    for iov in in_iov.iter_mut() {
        // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
        in_msgs.push(m);
    }

    let mut counters = DiodeCounters::default();
    while !stop.load(Ordering::Relaxed) && duration.is_none_or(|d| started.elapsed() < d) {
        for m in in_msgs.iter_mut() {
            m.msg_len = 0;
            m.msg_hdr.msg_flags = 0;
        }
        // SAFETY: in_msgs holds BATCH headers, each pointing at its own
        // iovec into `batch` (MAX_DATAGRAM bytes each); all outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                input.as_raw_fd(),
                in_msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        out.clear();
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => {
                    // Idle link: a held datagram would otherwise wait forever.
                    held.release_all(&mut out);
                }
                _ => return Err(io_err("receiving datagrams")(e)),
            }
        } else {
            let n = n as usize;
            let now = Instant::now();
            link.refill(now);
            let t = now.duration_since(*clock_from.get_or_insert(now));
            for i in 0..n {
                lens[i] = in_msgs[i].msg_len as usize;
                let bytes = &mut batch[i * MAX_DATAGRAM..i * MAX_DATAGRAM + lens[i]];
                match link.decide(t, bytes, &mut counters) {
                    Fate::Dropped => {}
                    Fate::Hold { gap, copies } if held.hold(bytes, gap, copies) => {
                        counters.reordered += 1;
                    }
                    Fate::Hold { copies, .. } | Fate::Send { copies } => {
                        out.push(Out {
                            source: Source::Batch(i),
                            copies,
                        });
                        held.one_went_out(&mut out);
                    }
                }
            }
        }
        if !out.is_empty() {
            sender.send(&output, &out, &batch, &lens, &held, &mut counters);
            held.sent();
        }
        stats.add(&counters);
        counters = DiodeCounters::default();
    }
    // Held datagrams were in flight: deliver them.
    out.clear();
    held.release_all(&mut out);
    if !out.is_empty() {
        sender.send(&output, &out, &batch, &lens, &held, &mut counters);
        stats.add(&counters);
    }
    tracing::info!(counters = %stats.snapshot(), "diode stopped");
    Ok(())
}

/// `sendmmsg` of one batch's output, with headers allocated once.
struct BatchSender {
    forward: SockAddr,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

/// Most datagrams one batch can send: each received or released datagram
/// at most twice.
const MAX_OUT: usize = 2 * (BATCH + HELD_SLOTS);

impl BatchSender {
    fn new(forward: &SockAddr) -> Self {
        Self {
            forward: forward.clone(),
            iov: Vec::with_capacity(MAX_OUT),
            msgs: Vec::with_capacity(MAX_OUT),
        }
    }

    fn send(
        &mut self,
        socket: &UdpSocket,
        out: &[Out],
        batch: &[u8],
        lens: &[usize; BATCH],
        held: &HeldBack,
        c: &mut DiodeCounters,
    ) {
        self.iov.clear();
        self.msgs.clear();
        for o in out {
            let bytes = match o.source {
                Source::Batch(i) => &batch[i * MAX_DATAGRAM..i * MAX_DATAGRAM + lens[i]],
                Source::Held(k) => &held.buf[k * MAX_DATAGRAM..k * MAX_DATAGRAM + held.len[k]],
            };
            for copy in 0..o.copies {
                if copy == 1 {
                    c.duplicated += 1;
                }
                self.iov.push(libc::iovec {
                    // sendmmsg only reads through this pointer.
                    iov_base: bytes.as_ptr() as *mut libc::c_void,
                    iov_len: bytes.len(),
                });
            }
        }
        // Headers point into `iov`, which is complete and no longer grows.
        for iov in self.iov.iter_mut() {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = self.forward.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = self.forward.len();
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            self.msgs.push(m);
        }
        let mut at = 0;
        while at < self.msgs.len() {
            let left = &mut self.msgs[at..];
            // SAFETY: each header points at a valid address and one iovec
            // over bytes that outlive the call.
            let sent = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    left.as_mut_ptr(),
                    left.len() as libc::c_uint,
                    0,
                )
            };
            if sent < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // This datagram is lost (e.g. ENOBUFS), as on a real link.
                c.send_errors += 1;
                at += 1;
                continue;
            }
            for m in &left[..sent as usize] {
                c.forwarded += 1;
                c.forwarded_bytes += u64::from(m.msg_len);
            }
            at += sent as usize;
        }
    }
}

/// Drops the kernel counted on the UDP socket bound to `addr` (the `drops`
/// column of /proc/net/udp or udp6): datagrams lost because the socket's
/// receive buffer was full.
pub fn kernel_udp_drops(addr: SocketAddr) -> Option<u64> {
    udp_table_row(addr, |fields| fields.last()?.parse().ok())
}

/// Bytes waiting in the receive queue of the UDP socket bound to `addr`
/// (the `rx_queue` half of /proc/net/udp's `tx_queue:rx_queue`, in hex):
/// zero once its reader has taken everything sent to it.
pub fn kernel_udp_queued(addr: SocketAddr) -> Option<u64> {
    udp_table_row(addr, |fields| {
        let (_, rx) = fields.get(4)?.split_once(':')?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// Reads the row of /proc/net/udp (or udp6) whose local address is `addr`.
fn udp_table_row(addr: SocketAddr, read: impl Fn(&[&str]) -> Option<u64>) -> Option<u64> {
    let (table, local) = match addr {
        SocketAddr::V4(a) => (
            "/proc/net/udp",
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let words: String = o
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("/proc/net/udp6", format!("{words}:{:04X}", a.port()))
        }
    };
    let text = std::fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()))
            .then(|| read(&fields))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    const LOCAL: &str = "127.0.0.1:0";

    /// A receiving socket on a thread that keeps every datagram, and can
    /// answer each one back to where it came from.
    struct Sink {
        addr: SocketAddr,
        got: Arc<Mutex<Vec<Vec<u8>>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Sink {
        fn start(echo: bool) -> Sink {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
            set_buffer(&socket, libc::SO_RCVBUFFORCE, 32 << 20, |s, n| {
                s.set_recv_buffer_size(n)
            });
            socket
                .bind(&LOCAL.parse::<SocketAddr>().unwrap().into())
                .unwrap();
            let socket: UdpSocket = socket.into();
            socket
                .set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
            let addr = socket.local_addr().unwrap();
            let got = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (got, stop) = (Arc::clone(&got), Arc::clone(&stop));
                thread::spawn(move || {
                    let mut buf = vec![0u8; MAX_DATAGRAM];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = socket.recv_from(&mut buf) {
                            got.lock().unwrap().push(buf[..n].to_vec());
                            if echo {
                                let _ = socket.send_to(b"reply toward the source", from);
                            }
                        }
                    }
                })
            };
            Sink {
                addr,
                got,
                stop,
                thread: Some(thread),
            }
        }

        fn count(&self) -> usize {
            self.got.lock().unwrap().len()
        }

        /// Waits (bounded) until `n` datagrams arrived, then stops.
        fn finish(mut self, n: u64) -> Vec<Vec<u8>> {
            let deadline = Instant::now() + Duration::from_secs(10);
            while (self.count() as u64) < n && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
            std::mem::take(&mut *self.got.lock().unwrap())
        }
    }

    /// Datagram `seq`: its number, then bytes derived from it.
    fn datagram(seq: u32, size: usize) -> Vec<u8> {
        let mut d: Vec<u8> = (0..size)
            .map(|i| (i as u32 ^ seq.wrapping_mul(2_654_435_761)) as u8)
            .collect();
        d[..4].copy_from_slice(&seq.to_le_bytes());
        d
    }

    fn seq_of(d: &[u8]) -> u32 {
        u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    }

    /// Sends `n` numbered datagrams, never more than 256 ahead of what the
    /// diode has taken in, so no datagram is lost in a kernel buffer and
    /// the input order is exactly 0..n.
    fn send_paced(from: &UdpSocket, diode: &DiodeHandle, seqs: std::ops::Range<u32>, size: usize) {
        let stats = diode.stats();
        let base = stats.received.load(Ordering::Relaxed);
        for (k, seq) in seqs.enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while base + (k as u64) > stats.received.load(Ordering::Relaxed) + 256 {
                assert!(Instant::now() < deadline, "diode stopped taking datagrams");
                thread::yield_now();
            }
            from.send_to(&datagram(seq, size), diode.local_addr())
                .unwrap();
        }
    }

    /// Waits (bounded) until the diode took in `n` datagrams, stops it.
    fn stop_after(diode: DiodeHandle, n: u64) -> DiodeCounters {
        let stats = diode.stats();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.received.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        diode.stop().unwrap()
    }

    /// Runs `n` datagrams of `size` bytes through a diode with `setup`
    /// applied; returns the counters and what arrived, in arrival order.
    fn run_through(
        n: u32,
        size: usize,
        setup: impl FnOnce(&mut DiodeConfig),
    ) -> (DiodeCounters, Vec<Vec<u8>>) {
        let sink = Sink::start(false);
        let mut config = DiodeConfig::new(LOCAL.parse().unwrap(), sink.addr);
        setup(&mut config);
        let diode = Diode::spawn(config).unwrap();
        let from = UdpSocket::bind(LOCAL).unwrap();
        send_paced(&from, &diode, 0..n, size);
        let counters = stop_after(diode, u64::from(n));
        assert_eq!(
            counters.received,
            u64::from(n),
            "every datagram reached the diode"
        );
        let got = sink.finish(counters.forwarded);
        assert_eq!(
            got.len() as u64,
            counters.forwarded,
            "every forwarded datagram reached the sink"
        );
        (counters, got)
    }

    #[test]
    fn without_faults_every_datagram_arrives_intact_and_in_order() {
        let (c, got) = run_through(5_000, 1400, |_| {});
        assert_eq!(c.forwarded, 5_000);
        assert_eq!(c.dropped(), 0);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &datagram(i as u32, 1400));
        }
    }

    #[test]
    fn independent_loss_is_near_the_rate_and_the_same_for_the_same_seed() {
        let lossy = |seed| {
            move |c: &mut DiodeConfig| {
                c.seed = seed;
                c.loss = 0.05;
            }
        };
        let (a, got_a) = run_through(20_000, 200, lossy(42));
        let rate = a.dropped_loss as f64 / a.received as f64;
        // 5 % of 20k: sd ~31 datagrams; the band is over 6 sd wide each way.
        assert!((0.04..0.06).contains(&rate), "measured loss {rate}");
        assert_eq!(a.forwarded + a.dropped_loss, 20_000);
        let (b, got_b) = run_through(20_000, 200, lossy(42));
        assert_eq!(a, b);
        assert_eq!(got_a, got_b, "same seed, same input: same output");
        let (c, _) = run_through(20_000, 200, lossy(43));
        assert_ne!(a.dropped_loss, 0);
        let seqs = |got: &[Vec<u8>]| got.iter().map(|d| seq_of(d)).collect::<Vec<_>>();
        let (_, got_c) = run_through(20_000, 200, lossy(43));
        assert_eq!(seqs(&got_c).len() as u64, c.forwarded);
        assert_ne!(
            seqs(&got_a),
            seqs(&got_c),
            "another seed loses other datagrams"
        );
    }

    #[test]
    fn corruption_flips_exactly_one_byte_of_the_datagrams_it_counts() {
        let (c, got) = run_through(5_000, 300, |c| {
            c.seed = 7;
            c.corrupt = 0.05;
        });
        assert_eq!(got.len(), 5_000, "corruption drops nothing");
        let mut changed = 0;
        for (i, d) in got.iter().enumerate() {
            let sent = datagram(i as u32, 300);
            let differing = d.iter().zip(&sent).filter(|(a, b)| a != b).count();
            assert!(differing <= 1, "datagram {i}: {differing} bytes changed");
            changed += differing;
        }
        assert_eq!(changed as u64, c.corrupted);
        assert!(
            (150..350).contains(&changed),
            "{changed} of 5000 corrupted at 5 %"
        );
    }

    #[test]
    fn duplicates_and_reordering_still_deliver_every_datagram() {
        let (c, got) = run_through(10_000, 100, |c| {
            c.seed = 3;
            c.duplicate = 0.02;
            c.reorder = 0.02;
        });
        let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
        for d in &got {
            assert_eq!(d, &datagram(seq_of(d), 100), "content intact");
            *seen.entry(seq_of(d)).or_default() += 1;
        }
        assert_eq!(seen.len(), 10_000, "every datagram arrived");
        let extra: u32 = seen.values().map(|n| n - 1).sum();
        assert_eq!(u64::from(extra), c.duplicated);
        assert!(c.duplicated > 100 && c.reordered > 100, "{c}");
        let out_of_order = got
            .windows(2)
            .filter(|w| seq_of(&w[1]) < seq_of(&w[0]))
            .count();
        assert!(out_of_order > 0, "reordering visible at the sink");
    }

    #[test]
    fn burst_loss_loses_runs_of_datagrams() {
        let (c, got) = run_through(20_000, 100, |c| {
            c.seed = 11;
            c.burst = Some(BurstLoss {
                enter: 0.005,
                exit: 0.2,
                loss: 1.0,
            });
        });
        assert_eq!(c.dropped_loss, 0);
        assert!(c.dropped_burst > 0);
        let arrived: std::collections::BTreeSet<u32> = got.iter().map(|d| seq_of(d)).collect();
        let (mut runs, mut lost, mut in_run) = (0u32, 0u32, false);
        for seq in 0..20_000 {
            let missing = !arrived.contains(&seq);
            if missing {
                lost += 1;
                if !in_run {
                    runs += 1;
                }
            }
            in_run = missing;
        }
        assert_eq!(u64::from(lost), c.dropped_burst);
        let mean_run = f64::from(lost) / f64::from(runs);
        // Mean burst length 1/exit = 5; independent loss would give ~1.
        assert!(mean_run > 2.5, "mean run of lost datagrams {mean_run}");
    }

    #[test]
    fn blackout_drops_everything_in_its_window() {
        let sink = Sink::start(false);
        let mut config = DiodeConfig::new(LOCAL.parse().unwrap(), sink.addr);
        config.blackouts = vec!["1:2".parse().unwrap()];
        config.blackouts_from_first_datagram = true;
        let diode = Diode::spawn(config).unwrap();
        let from = UdpSocket::bind(LOCAL).unwrap();
        // The clock starts with the first datagram; each phase sits 1 s
        // from the window's edges, room for a loaded machine's stalls.
        let started = Instant::now();
        send_paced(&from, &diode, 0..100, 500);
        thread::sleep(Duration::from_secs_f64(2.0).saturating_sub(started.elapsed()));
        send_paced(&from, &diode, 100..200, 500);
        thread::sleep(Duration::from_secs_f64(4.0).saturating_sub(started.elapsed()));
        send_paced(&from, &diode, 200..300, 500);
        let c = stop_after(diode, 300);
        assert_eq!(c.dropped_blackout, 100);
        let got = sink.finish(c.forwarded);
        let seqs: Vec<u32> = got.iter().map(|d| seq_of(d)).collect();
        let expected: Vec<u32> = (0..100).chain(200..300).collect();
        assert_eq!(seqs, expected);
    }

    #[test]
    fn rate_cap_drops_what_exceeds_the_link() {
        let rate_bps = 8_000_000; // 1 MB/s
        let sink = Sink::start(false);
        let mut config = DiodeConfig::new(LOCAL.parse().unwrap(), sink.addr);
        config.rate_bps = Some(rate_bps);
        let diode = Diode::spawn(config).unwrap();
        let started = Instant::now();
        let from = UdpSocket::bind(LOCAL).unwrap();
        send_paced(&from, &diode, 0..3_000, 1000);
        let c = stop_after(diode, 3_000);
        let elapsed = started.elapsed().as_secs_f64();
        assert!(
            c.dropped_rate > 0,
            "3 MB sent at once through a 1 MB/s link: {c}"
        );
        // Never more than the bucket plus what the rate earned meanwhile.
        let allowance = 65_536.0 + elapsed * rate_bps as f64 / 8.0;
        assert!((c.forwarded_bytes as f64) <= allowance, "{c} in {elapsed}s");
        assert_eq!(c.forwarded + c.dropped_rate, 3_000);
        sink.finish(c.forwarded);
    }

    #[test]
    fn nothing_is_ever_sent_back_to_the_source() {
        let sink = Sink::start(true);
        let mut config = DiodeConfig::new(LOCAL.parse().unwrap(), sink.addr);
        config.loss = 0.01;
        config.corrupt = 0.01;
        config.duplicate = 0.05;
        config.reorder = 0.05;
        let diode = Diode::spawn(config).unwrap();
        let from = UdpSocket::bind(LOCAL).unwrap();
        send_paced(&from, &diode, 0..2_000, 200);
        let c = stop_after(diode, 2_000);
        let got = sink.finish(c.forwarded);
        assert!(!got.is_empty());
        // The sink answered every datagram toward the diode's output; none
        // of it may reach the source.
        from.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        let back = from.recv_from(&mut buf);
        assert_eq!(
            back.map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "the source received something"
        );
    }

    #[test]
    fn stops_by_itself_after_its_duration() {
        let sink = Sink::start(false);
        let mut config = DiodeConfig::new(LOCAL.parse().unwrap(), sink.addr);
        config.duration = Some(Duration::from_millis(200));
        let diode = Diode::spawn(config).unwrap();
        let c = diode.wait().unwrap();
        assert_eq!(c, DiodeCounters::default());
        sink.finish(0);
    }

    #[test]
    fn parses_blackouts_and_refuses_bad_configs() {
        let b: Blackout = "30:2.5".parse().unwrap();
        assert_eq!(
            b,
            Blackout {
                start: Duration::from_secs(30),
                duration: Duration::from_millis(2500)
            }
        );
        assert!(b.contains(Duration::from_secs(31)));
        assert!(!b.contains(Duration::from_millis(32_500)));
        assert!("30".parse::<Blackout>().is_err());
        assert!("-1:2".parse::<Blackout>().is_err());
        let mut config = DiodeConfig::new(LOCAL.parse().unwrap(), LOCAL.parse().unwrap());
        config.loss = 1.5;
        assert!(matches!(
            Diode::spawn(config.clone()),
            Err(DiodeError::Config(_))
        ));
        config.loss = 0.0;
        config.rate_bps = Some(0);
        assert!(config.validate().is_err());
        config.rate_bps = None;
        config.forward = "[::1]:9".parse().unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn kernel_drops_count_what_the_listening_socket_could_not_hold() {
        let sink = Sink::start(false);
        let mut config = DiodeConfig::new(LOCAL.parse().unwrap(), sink.addr);
        config.duration = Some(Duration::ZERO);
        config.socket_buffer = 4096;
        let diode = Diode::spawn(config).unwrap();
        assert_eq!(diode.kernel_drops(), Some(0));
        while !diode.is_finished() {
            thread::sleep(Duration::from_millis(1));
        }
        // Nobody reads any more and the buffer is tiny: the kernel drops.
        let from = UdpSocket::bind(LOCAL).unwrap();
        for seq in 0..200 {
            from.send_to(&datagram(seq, 1400), diode.local_addr())
                .unwrap();
        }
        assert!(diode.kernel_drops().unwrap() > 0);
        drop(diode);
        sink.finish(0);
    }

    #[test]
    fn the_queue_is_what_was_sent_and_not_yet_read() {
        let socket = UdpSocket::bind(LOCAL).unwrap();
        let addr = socket.local_addr().unwrap();
        assert_eq!(kernel_udp_queued(addr), Some(0));
        let from = UdpSocket::bind(LOCAL).unwrap();
        for seq in 0..3 {
            from.send_to(&datagram(seq, 1000), addr).unwrap();
        }
        // Loopback delivers within the send call; the queue counts buffer
        // space (more than the 3000 payload bytes), not datagrams.
        assert!(kernel_udp_queued(addr).unwrap() >= 3000);
        let mut buf = [0u8; 2048];
        for _ in 0..3 {
            socket.recv(&mut buf).unwrap();
        }
        assert_eq!(kernel_udp_queued(addr), Some(0));
    }
}
