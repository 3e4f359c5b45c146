//! Each gateway alone, pinned with `taskset` to one core and to two, to
//! see how it scales and what it costs per GiB:
//!
//! - **sender alone**: gateway-tx sends one pass of the image, unpaced, into
//!   a UDP sink in the bench that only counts datagrams and bytes. Its
//!   retention is 0 hours, so once the owed pass is out the carousel does
//!   not go on cycling the image on the idle link (that would add datagrams
//!   to the count). Timed from acceptance (the drop moved to
//!   `spool/done/`, as in the crossing) to the last datagram of the pass
//!   (the sink's clock: the last datagram that arrived within 20 ms of the
//!   one before, so the idle heartbeats after the pass do not count).
//! - **receiver alone**: the frames of one pass of the same image, recorded
//!   once from gateway-tx by the same sink (paced, so the recording loses
//!   nothing) and kept in memory, are replayed into gateway-rx's UDP port
//!   as fast as gateway-rx takes them: the replayer keeps gateway-rx's
//!   socket queue between 8 and 16 MiB (asked of the kernel's sock_diag)
//!   so the receiver always has frames waiting and the kernel drops none (a
//!   replayed frame cannot be sent again: the receiver's replay guard
//!   refuses it). Timed from the first frame replayed to the delivery done
//!   in the OCI layout (gateway-rx's status.json).
//!
//! Each side runs on one core, then two, then again, for a few rounds:
//! on this kind of virtual machine a run that must take fresh memory from
//! the host (gateway-rx's 1 GiB of page cache) costs up to several times
//! what one reusing pages the guest already holds does, and which run gets
//! which is chance. That noise only ever adds time, so the rows take each
//! CPU set's fastest round and show the others beside it.
//!
//! CPU: utime + stime of the gateway process over the timed span
//! (/proc/PID/stat), per GiB of image blobs. On loopback the receiving
//! socket's share of a datagram's path runs in the sending thread, and a
//! GSO message reaching a socket without UDP GRO is cut into its datagrams
//! there too. So that neither gateway is charged for the bench's side, both
//! ends look like the real peer: the sink turns on UDP GRO, as gateway-rx
//! does, and takes gateway-tx's GSO messages whole; the replayer sends runs
//! of equal-length frames as GSO messages, as gateway-tx does, which
//! gateway-rx takes whole. The sink, a thread of the bench, is not pinned:
//! what it does (copying datagrams out of its socket) is the peer's work,
//! and the path into its socket already runs on gateway-tx's cores. The
//! replayer's thread is pinned to gateway-rx's CPU set while it replays:
//! the path into gateway-rx's socket it carries is the receiver's own
//! (on an appliance it runs on the receiver's cores), and on this machine a
//! replayer left apart would have a core of its own in the one-core round
//! and none in the two-core one.

// recvmmsg with UDP GRO and sendmsg with UDP GSO, to count, record and
// replay datagrams at line rate, have no safe wrapper in std or socket2.
#![allow(unsafe_code)]

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use weir_tests::pair::{Site, SiteOptions, Target};

use crate::crossing::{drop_linked, set_config_key, set_datagram_size, Image};
use crate::procfs::{child_pid, now_ms, thread_cpu, ProcTrace, MACHINE, STEAL};
use weir_host::link::udp::{gro_segment, gso_run_of, udp_sockopt, Cmsg, GSO_MAX_SEGMENTS};

/// Messages per recvmmsg of the sink.
const BATCH: usize = 64;
/// Receive room per message: the largest coalesced (GRO) message fits.
const REGION: usize = 65_536;
/// Frames replayed between two looks at gateway-rx's queue.
const QUEUE_CHECK_FRAMES: usize = 256;
const GIB: f64 = (1u64 << 30) as f64;
/// How long the sink sleeps when it found its socket empty.
const POLL_EVERY: Duration = Duration::from_millis(1);
/// A datagram within this of the one before is part of the stream.
const BUSY_GAP: Duration = Duration::from_millis(20);

#[derive(Default)]
struct SinkState {
    datagrams: AtomicU64,
    /// Messages received: fewer than datagrams when GSO messages arrived
    /// whole (GRO).
    messages: AtomicU64,
    bytes: AtomicU64,
    /// now_ms() of the last datagram that arrived within BUSY_GAP of the
    /// one before it.
    last_busy_ms: AtomicU64,
}

/// A UDP receiver on a thread that counts, and optionally records each
/// datagram (u16 little-endian length, then the bytes).
pub struct Sink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u8>>>,
}

impl Sink {
    pub fn start(record_capacity: Option<usize>) -> Result<Sink> {
        let sock =
            Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("UDP socket")?;
        let _ = sock.set_recv_buffer_size(256 << 20);
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())
            .context("binding the sink")?;
        // As gateway-rx does: gateway-tx's GSO messages then reach the
        // socket whole instead of being cut into datagrams on its thread.
        udp_sockopt(&sock, libc::UDP_GRO, 1).context("enabling UDP GRO on the sink")?;
        let sock: UdpSocket = sock.into();
        let addr = sock.local_addr()?;
        let state = Arc::new(SinkState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || sink_loop(sock, &s, &st, record_capacity))?;
        Ok(Sink {
            addr,
            state,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn counts(&self) -> (u64, u64) {
        (
            self.state.datagrams.load(Ordering::Relaxed),
            self.state.bytes.load(Ordering::Relaxed),
        )
    }

    pub fn messages(&self) -> u64 {
        self.state.messages.load(Ordering::Relaxed)
    }

    pub fn last_busy_ms(&self) -> u64 {
        self.state.last_busy_ms.load(Ordering::Relaxed)
    }

    pub fn kernel_drops(&self) -> u64 {
        weir_tests::diode::kernel_udp_drops(self.addr).unwrap_or(0)
    }

    /// Stops the thread; the recording (empty when not recording).
    pub fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The datagrams of a message of `len` bytes received with GRO segment
/// size `seg` (None: one datagram): every one `seg` long but the last.
fn segments(len: usize, seg: Option<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    let seg = seg.filter(|&s| s < len).unwrap_or(len.max(1));
    (0..len.div_ceil(seg).max(1)).map(move |i| i * seg..((i + 1) * seg).min(len))
}

fn sink_loop(
    sock: UdpSocket,
    state: &SinkState,
    stop: &AtomicBool,
    record_capacity: Option<usize>,
) -> Vec<u8> {
    let mut record = record_capacity.map(Vec::with_capacity);
    let mut buf = vec![0u8; BATCH * REGION];
    let mut ctl = vec![Cmsg([0; 32]); BATCH];
    let mut iovs: Vec<libc::iovec> = buf
        .chunks_exact_mut(REGION)
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: REGION,
        })
        .collect();
    // SAFETY: a zeroed mmsghdr is a valid empty header; each is pointed at
    // its iovec and control buffer below, and both outlive every recvmmsg
    // call.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    // Counting needs only each message's length: with MSG_TRUNC and no room
    // the kernel reports it without copying the bytes out, so the sink,
    // which shares the machine's cores with the sender it measures, costs
    // it as little as a diode would. Nor is it woken by the sender: a
    // reader blocked on the socket is woken by every send that finds its
    // queue empty, and on shared cores that wake-up preempts the sender's
    // own threads, which a diode's far end on its own machine never does.
    // The sink looks at its queue every POLL_EVERY instead, as a NIC
    // moderates its interrupts; the socket holds far more than arrives in
    // that time.
    let (room, flags) = if record.is_some() {
        (REGION, libc::MSG_DONTWAIT)
    } else {
        (0, libc::MSG_DONTWAIT | libc::MSG_TRUNC)
    };
    for iov in iovs.iter_mut() {
        iov.iov_len = room;
    }
    let mut last: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        for ((m, iov), c) in msgs.iter_mut().zip(iovs.iter_mut()).zip(ctl.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            // The kernel shortens msg_controllen to what it wrote: reset it.
            m.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of::<Cmsg>() as _;
            m.msg_hdr.msg_flags = 0;
        }
        // SAFETY: msgs holds BATCH valid headers pointing at live buffers
        // and control buffers; MSG_DONTWAIT, so the call returns.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            std::thread::sleep(POLL_EVERY);
            continue;
        }
        let now = Instant::now();
        let mut datagrams = 0u64;
        let mut bytes = 0u64;
        for (i, m) in msgs[..n as usize].iter().enumerate() {
            let len = (m.msg_len as usize).min(REGION);
            // SAFETY: the kernel filled this msghdr; its control buffer is
            // still alive.
            let seg = unsafe { gro_segment(&m.msg_hdr) };
            for r in segments(len, seg) {
                datagrams += 1;
                if let Some(rec) = record.as_mut() {
                    let region = &buf[i * REGION..i * REGION + len];
                    rec.extend_from_slice(&(r.len() as u16).to_le_bytes());
                    rec.extend_from_slice(&region[r]);
                }
            }
            bytes += len as u64;
        }
        // Heartbeats come one a second, alone: more than one datagram at
        // once, or one soon after the last, is the stream.
        if last.is_some_and(|l| now - l <= BUSY_GAP) || datagrams > 1 {
            state.last_busy_ms.store(now_ms(), Ordering::Relaxed);
        }
        last = Some(now);
        state.datagrams.fetch_add(datagrams, Ordering::Relaxed);
        state.messages.fetch_add(n as u64, Ordering::Relaxed);
        state.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    record.unwrap_or_default()
}

/// Pins every thread of `pid` (and so the threads they start) to `cpus`.
fn pin(pid: u32, cpus: &str) -> Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .context("running taskset (util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The calling thread held on a CPU set until dropped, when it gets back
/// the set it had.
struct ThreadPin {
    before: libc::cpu_set_t,
}

impl ThreadPin {
    /// Pins the calling thread to `cpus`, a `taskset -c` list of single
    /// cores ("0,1").
    fn new(cpus: &str) -> Result<ThreadPin> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for c in cpus.split(',') {
            let c: usize = c
                .trim()
                .parse()
                .with_context(|| format!("CPU list {cpus:?}"))?;
            if c >= 8 * size {
                bail!("CPU {c} of {cpus:?} is past the affinity mask");
            }
            // SAFETY: c is within the set's bits, checked above.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        // SAFETY: as above.
        let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: both point at live cpu_set_t of `size` bytes; pid 0 is the
        // calling thread.
        if unsafe { libc::sched_getaffinity(0, size, &mut before) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        // SAFETY: as above.
        if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning the bench's thread to CPUs {cpus}"));
        }
        Ok(ThreadPin { before })
    }
}

impl Drop for ThreadPin {
    fn drop(&mut self) {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `before` is a live cpu_set_t of `size` bytes that
        // sched_getaffinity filled for this thread.
        unsafe { libc::sched_setaffinity(0, size, &self.before) };
    }
}

/// One gateway alone on a CPU set.
#[derive(Debug, Clone)]
pub struct SideRun {
    /// `taskset -c` list, or "any" (not pinned).
    pub cpus: String,
    /// Bytes of the image's blobs.
    pub payload_bytes: u64,
    pub seconds: f64,
    /// utime + stime of the gateway over the timed span.
    pub cpu_s: f64,
    /// Datagrams and bytes on the wire (sent by gateway-tx, or replayed).
    pub datagrams: u64,
    pub wire_bytes: u64,
    /// Datagrams the kernel dropped at the receiving socket.
    pub kernel_drops: u64,
    pub threads: Vec<(String, f64)>,
    /// Messages the datagrams went in: received by the sink (GRO), or sent
    /// by the replayer (GSO).
    pub messages: u64,
    /// The receiver's own count of what it was fed (None: the sender's run).
    pub rx_taken: Option<RxTaken>,
    /// CPU seconds the whole machine spent busy over the span: the gateway,
    /// the bench's sink or replayer, the kernel's threads, anything else.
    pub machine_cpu_s: f64,
    /// CPU seconds the host took from this virtual machine's cores over the
    /// span (steal in /proc/stat; 0 where the kernel does not count it).
    pub steal_s: f64,
}

impl SideRun {
    pub fn bytes_per_s(&self) -> f64 {
        self.payload_bytes as f64 / self.seconds
    }

    /// Share of its CPU set the gateway used over the span, 0..1.
    pub fn cpu_share(&self) -> f64 {
        let cores = self.cpus.split(',').count().max(1) as f64;
        self.cpu_s / (self.seconds * cores)
    }

    pub fn cpu_s_per_gib(&self) -> f64 {
        self.cpu_s / (self.payload_bytes as f64 / GIB)
    }

    /// Share of all the machine's cores that were busy over the span, 0..1.
    pub fn machine_share(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.machine_cpu_s / (self.seconds * cores)
    }
}

/// gateway-rx's counters after a replay.
#[derive(Debug, Clone, Copy, Default)]
pub struct RxTaken {
    /// Frames it read from its socket: accepted, refused as replays,
    /// malformed, bad tag, unknown key, future session.
    pub frames: u64,
    pub accepted: u64,
    /// Frames it counted lost from sequence-number gaps.
    pub lost_estimate: u64,
    /// From the last frame replayed to delivery done: what the receiver
    /// still had to do once it had every frame.
    pub drain_s: f64,
}

/// Both sides' settings, as the lidi comparison's crossing has them.
pub struct Setup {
    pub fec: (u16, u16),
    pub datagram: usize,
    pub timeout: Duration,
}

fn tx_image_status(site: &Site, digest: &str) -> Option<serde_json::Value> {
    site.tx_status()?["images"]
        .as_array()?
        .iter()
        .find(|i| i["manifest_digest"] == digest)
        .cloned()
}

/// gateway-tx sends one pass of `image` at `rate_bps` into a sink, pinned
/// to `cpus` (None: not pinned); with `record`, the sink keeps every
/// datagram and the recording is returned.
pub fn sender_alone(
    image: &Image,
    setup: &Setup,
    cpus: Option<&str>,
    rate_bps: u64,
    record: bool,
) -> Result<(SideRun, Vec<u8>)> {
    let opts = SiteOptions {
        rate_bps,
        passes: 1,
        data_shards: setup.fec.0,
        parity_shards: setup.fec.1,
        rules_yaml: None,
        tx_extra: "[ingest]\npoll_interval_ms = 50\n".into(),
        rx_extra: String::new(),
    };
    let layout = std::env::temp_dir().join("weir-bench-unused-layout");
    let site = Site::new(Target::Layout(layout), &opts).context("laying out the site")?;
    // One pass is about 1.2× the image with 128+20 and 1472 B datagrams.
    let capacity = record.then(|| (image.archive_bytes as f64 * 1.3) as usize + (64 << 20));
    let sink = Sink::start(capacity)?;
    site.write_tx_config(sink.addr(), &opts)?;
    set_datagram_size(&site.tx_config, setup.datagram)?;
    // No retention: once its one owed pass is out, the carousel does not go
    // on cycling the image on the idle link, so the sink counts one pass
    // and the span ends with it.
    set_config_key(&site.tx_config, "carousel", "retention_hours", "0")?;
    let mut tx = site.start_tx()?;
    let fail = |what: String, tx: &weir_tests::pair::Gateway| {
        anyhow::anyhow!("{what}\n--- gateway-tx\n{}", tx.log_tail(20))
    };
    let t = Instant::now();
    while site.tx_status().is_none() {
        if !tx.is_running() || t.elapsed() > Duration::from_secs(30) {
            return Err(fail("gateway-tx did not come up".into(), &tx));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child_pid("gateway-tx").context("finding gateway-tx's pid")?;
    if let Some(c) = cpus {
        pin(pid, c)?;
    }
    let mut trace = ProcTrace::start(vec![("tx", pid)], Duration::from_millis(50));
    let name = "bench.tar";
    let deadline = Instant::now() + setup.timeout;
    drop_linked(&site.spool, &image.path, name)?;
    let accepted_ms = loop {
        if site.spool.join("done").join(name).exists() {
            break now_ms();
        }
        if site.spool.join("rejected").join(name).exists() {
            bail!("gateway-tx rejected the drop");
        }
        if !tx.is_running() || Instant::now() > deadline {
            return Err(fail("drop not accepted".into(), &tx));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let digest = &image.manifest_digest;
    let status = loop {
        if let Some(s) = tx_image_status(&site, digest) {
            if s["passes_done"].as_u64() >= Some(1) {
                break s;
            }
        }
        if !tx.is_running() || Instant::now() > deadline {
            return Err(fail(
                format!("one pass not sent within {:?}", setup.timeout),
                &tx,
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The sink may be behind: let it drain its socket before reading when
    // the last datagram arrived (a lagging sink makes the span longer, never
    // shorter).
    let t = Instant::now();
    let mut probe = UdpQueueProbe::new(sink.addr()).ok();
    while probe.as_mut().and_then(UdpQueueProbe::queued).unwrap_or(0) > 0
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let end_ms = sink.last_busy_ms();
    trace.sample_now("tx", pid);
    let threads = thread_cpu(pid);
    trace.stop();
    drop(tx);
    let (datagrams, wire_bytes) = sink.counts();
    let messages = sink.messages();
    let kernel_drops = sink.kernel_drops();
    let recording = sink.finish();
    let cpu = |at| trace.cpu_at("tx", at).unwrap_or(0.0);
    let machine = |at| trace.cpu_at(MACHINE, at).unwrap_or(0.0);
    let steal = |at| trace.cpu_at(STEAL, at).unwrap_or(0.0);
    if end_ms <= accepted_ms {
        bail!("the sink saw no stream after acceptance");
    }
    Ok((
        SideRun {
            cpus: cpus.unwrap_or("any").to_string(),
            payload_bytes: status["bytes"].as_u64().unwrap_or(image.archive_bytes),
            seconds: (end_ms - accepted_ms) as f64 / 1000.0,
            cpu_s: cpu(end_ms) - cpu(accepted_ms),
            machine_cpu_s: machine(end_ms) - machine(accepted_ms),
            steal_s: steal(end_ms) - steal(accepted_ms),
            datagrams,
            wire_bytes,
            kernel_drops,
            threads,
            messages,
            rx_taken: None,
        },
        recording,
    ))
}

/// One pass of frames as the sink received them, kept in memory for every
/// replay: each frame a little-endian u16 length, then the frame.
pub struct Recording {
    bytes: Vec<u8>,
    /// (offset, length) of each frame in `bytes`.
    frames: Vec<(usize, usize)>,
}

/// Records one pass of `image` from gateway-tx (paced at `rate_bps`, not
/// pinned). Fails if the sink's socket dropped a datagram.
pub fn record(image: &Image, setup: &Setup, rate_bps: u64) -> Result<(SideRun, Recording)> {
    let (run, bytes) = sender_alone(image, setup, None, rate_bps, true)?;
    if run.kernel_drops > 0 {
        bail!(
            "the recording sink's socket dropped {} datagrams at {} Mb/s: lower --scaling-record-mbps",
            run.kernel_drops,
            rate_bps / 1_000_000
        );
    }
    let frames = frames_of(&bytes)?;
    Ok((run, Recording { bytes, frames }))
}

/// Bytes waiting in the receive buffer of the UDP socket bound to an IPv4
/// address, asked of the kernel's socket-diagnostics netlink interface for
/// that one socket (what `ss` uses). The replayer asks every few hundred
/// frames while it shares gateway-rx's cores: reading /proc/net/udp instead
/// walks the whole UDP hash table each time, and took about a tenth of the
/// two cores' time in the two-core run.
struct UdpQueueProbe {
    netlink: Socket,
    request: [u8; 72],
    reply: Vec<u8>,
}

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_NOCOOKIE`: the socket is named by its addresses alone.
const INET_DIAG_NOCOOKIE: u32 = !0;

impl UdpQueueProbe {
    fn new(addr: SocketAddr) -> Result<UdpQueueProbe> {
        let SocketAddr::V4(a) = addr else {
            bail!("the queue probe takes an IPv4 address, not {addr}");
        };
        let netlink = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::DGRAM,
            Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
        )
        .context("opening a sock_diag netlink socket")?;
        // nlmsghdr (16 bytes, native endian), then inet_diag_req_v2:
        // family, protocol, extensions, pad, states (u32), inet_diag_sockid
        // (ports and addresses in network order, interface, cookie). For
        // UDP the kernel looks the socket up as a datagram from `src` to
        // `dst` would be: `dst` is the receiving socket's own address.
        let mut request = [0u8; 72];
        request[0..4].copy_from_slice(&72u32.to_ne_bytes());
        request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        request[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        request[16] = libc::AF_INET as u8;
        request[17] = libc::IPPROTO_UDP as u8;
        request[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        let id = 24;
        request[id + 2..id + 4].copy_from_slice(&a.port().to_be_bytes());
        request[id + 20..id + 24].copy_from_slice(&a.ip().octets());
        request[id + 40..id + 44].copy_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
        request[id + 44..id + 48].copy_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
        Ok(UdpQueueProbe {
            netlink,
            request,
            reply: vec![0; 4096],
        })
    }

    /// Bytes queued (the kernel's accounting, as /proc/net/udp's
    /// `rx_queue`), or None when no socket is bound there or the kernel
    /// would not say.
    fn queued(&mut self) -> Option<u64> {
        (&self.netlink).write_all(&self.request).ok()?;
        let n = (&self.netlink).read(&mut self.reply).ok()?;
        let reply = &self.reply[..n];
        let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
        if kind != SOCK_DIAG_BY_FAMILY {
            return None; // NLMSG_ERROR: no such socket
        }
        // inet_diag_msg after the 16-byte header: family, state, timer,
        // retransmits, inet_diag_sockid (48), expires, then rqueue.
        let rqueue = reply.get(16 + 56..16 + 60)?;
        Some(u32::from_ne_bytes(rqueue.try_into().ok()?) as u64)
    }
}

/// The frames of a recording: (offset, length) of each.
fn frames_of(recording: &[u8]) -> Result<Vec<(usize, usize)>> {
    let mut v = Vec::with_capacity(recording.len() / 1400);
    let mut at = 0;
    while at < recording.len() {
        let len_bytes = recording
            .get(at..at + 2)
            .context("truncated recording (length)")?;
        let len = u16::from_le_bytes([len_bytes[0], len_bytes[1]]) as usize;
        if at + 2 + len > recording.len() {
            bail!("truncated recording (frame at {at})");
        }
        v.push((at + 2, len));
        at += 2 + len;
    }
    Ok(v)
}

/// gateway-rx pinned to `cpus`, fed the recorded frames of `image` as fast as it takes them, into an OCI layout under `work`.
pub fn receiver_alone(
    image: &Image,
    setup: &Setup,
    recording: &Recording,
    cpus: &str,
    work: &Path,
) -> Result<SideRun> {
    let Recording {
        bytes: recording,
        frames,
    } = recording;
    let layout: PathBuf = work.join(format!("scaling-rx-{}", cpus.replace(',', "-")));
    let _ = std::fs::remove_dir_all(&layout);
    let opts = SiteOptions {
        data_shards: setup.fec.0,
        parity_shards: setup.fec.1,
        ..SiteOptions::default()
    };
    let site = Site::new(Target::Layout(layout.clone()), &opts).context("laying out the site")?;
    set_datagram_size(&site.rx_config, setup.datagram)?;
    let mut rx = site.start_rx()?;
    let fail = |what: String, rx: &weir_tests::pair::Gateway| {
        anyhow::anyhow!("{what}\n--- gateway-rx\n{}", rx.log_tail(20))
    };
    let t = Instant::now();
    loop {
        let listening = gateway_rx::status::StatusReport::read(&site.rx_state)
            .ok()
            .flatten()
            .is_some_and(|s| s.listening.is_some());
        if listening {
            break;
        }
        if !rx.is_running() || t.elapsed() > Duration::from_secs(30) {
            return Err(fail("gateway-rx did not come up".into(), &rx));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child_pid("gateway-rx").context("finding gateway-rx's pid")?;
    pin(pid, cpus)?;
    let mut trace = ProcTrace::start(vec![("rx", pid)], Duration::from_millis(50));

    // Keep the receiver's queue between LOW and HIGH (in the kernel's
    // accounting, a loopback datagram of 1472 B takes a few KiB), below
    // what its buffer may hold.
    let rmem_max = crate::machine::read_sysctl("net.core.rmem_max").unwrap_or(212_992);
    let high = (16u64 << 20).min(rmem_max / 2);
    let low = high / 2;
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("UDP socket")?;
    // Room for a few GSO messages in flight.
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())
        .context("binding the replayer")?;
    sock.connect(&site.rx_addr.into())
        .context("connecting the replayer to gateway-rx")?;
    let sock: UdpSocket = sock.into();
    let mut probe = UdpQueueProbe::new(site.rx_addr)?;
    let mut replayer = Replayer {
        sock,
        gso: true,
        messages: 0,
    };
    let deadline = Instant::now() + setup.timeout;
    // On loopback the path of each datagram into gateway-rx's socket
    // (routing, the UDP lookup, the enqueue) runs in the replayer's thread;
    // on an appliance it runs on the receiver's own cores, and in the
    // sender's row it already runs on gateway-tx's. So the replayer shares
    // the receiver's CPU set in every round: unpinned, it had a core of its
    // own in the one-core round and not in the two-core one.
    let pinned = ThreadPin::new(cpus)?;
    let start_ms = now_ms();
    let mut wire_bytes = 0u64;
    let mut replayed = 0usize;
    let mut since_check = 0usize;
    while replayed < frames.len() {
        if since_check >= QUEUE_CHECK_FRAMES {
            since_check = 0;
            if probe.queued().unwrap_or(0) > high {
                while probe.queued().unwrap_or(0) > low {
                    std::thread::sleep(Duration::from_micros(200));
                    if Instant::now() > deadline || !rx.is_running() {
                        return Err(fail("gateway-rx stopped taking frames".into(), &rx));
                    }
                }
            }
        }
        let run = &frames[replayed..replayed + gso_run(&frames[replayed..])];
        replayer.send(recording, run).context("replaying frames")?;
        wire_bytes += run.iter().map(|&(_, len)| len as u64).sum::<u64>();
        replayed += run.len();
        since_check += run.len();
    }
    let replayed_ms = now_ms();
    drop(pinned);
    let digest = &image.manifest_digest;
    let (img, done_ms) = loop {
        if let Ok(Some(s)) = gateway_rx::status::StatusReport::read(&site.rx_state) {
            let img = s
                .images
                .iter()
                .find(|i| &i.manifest_digest == digest)
                .cloned();
            let done = s
                .deliveries
                .iter()
                .find(|d| &d.manifest_digest == digest && d.state == "done")
                .and_then(|d| d.done_ms);
            if let (Some(img), Some(done)) = (img, done) {
                break (img, done);
            }
        }
        if !rx.is_running() || Instant::now() > deadline {
            let drops = weir_tests::diode::kernel_udp_drops(site.rx_addr).unwrap_or(0);
            return Err(fail(
                format!(
                    "the replayed image was not delivered within {:?} (socket drops {drops})",
                    setup.timeout
                ),
                &rx,
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    trace.sample_now("rx", pid);
    let threads = thread_cpu(pid);
    trace.stop();
    let taken = RxTaken {
        drain_s: done_ms.saturating_sub(replayed_ms) as f64 / 1000.0,
        ..frames_taken(&site, site.rx_addr, replayed as u64)
    };
    let kernel_drops = weir_tests::diode::kernel_udp_drops(site.rx_addr).unwrap_or(0);
    drop(rx);
    let _ = std::fs::remove_dir_all(&layout);
    let cpu = |at| trace.cpu_at("rx", at).unwrap_or(0.0);
    let machine = |at| trace.cpu_at(MACHINE, at).unwrap_or(0.0);
    let steal = |at| trace.cpu_at(STEAL, at).unwrap_or(0.0);
    Ok(SideRun {
        cpus: cpus.to_string(),
        payload_bytes: img.bytes_total,
        seconds: done_ms.saturating_sub(start_ms) as f64 / 1000.0,
        cpu_s: cpu(done_ms) - cpu(start_ms),
        machine_cpu_s: machine(done_ms) - machine(start_ms),
        steal_s: steal(done_ms) - steal(start_ms),
        datagrams: replayed as u64,
        wire_bytes,
        kernel_drops,
        threads,
        messages: replayer.messages,
        rx_taken: Some(taken),
    })
}

/// After the timed span: the frames gateway-rx took, once its socket is
/// empty and a later status.json is out (the last frames of the pass may
/// still be queued when the delivery is done). Every replayed frame should
/// be there, in some counter: the GSO replay must not lose or add any.
fn frames_taken(site: &Site, addr: SocketAddr, replayed: u64) -> RxTaken {
    let t = Instant::now();
    let mut empty_ms = None;
    let mut taken = RxTaken::default();
    let mut probe = UdpQueueProbe::new(addr).ok();
    while t.elapsed() < Duration::from_secs(5) {
        let queued = probe.as_mut().and_then(UdpQueueProbe::queued).unwrap_or(0);
        if empty_ms.is_none() && queued == 0 {
            empty_ms = Some(now_ms());
        }
        if let Ok(Some(s)) = gateway_rx::status::StatusReport::read(&site.rx_state) {
            let c = &s.counters;
            taken = RxTaken {
                frames: c.frames_accepted
                    + c.frames_held_unopened
                    + c.frames_replayed
                    + c.frames_malformed
                    + c.frames_bad_tag
                    + c.frames_unknown_key
                    + c.frames_future_session,
                accepted: c.frames_accepted,
                lost_estimate: c.frames_lost_estimate,
                drain_s: 0.0,
            };
            let settled = empty_ms.is_some_and(|e| s.written_at_ms > e + 100);
            if taken.frames >= replayed || settled {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    taken
}

/// How many frames from the start of `frames` (offset, length) leave as one
/// GSO message, as gateway-tx forms them.
fn gso_run(frames: &[(usize, usize)]) -> usize {
    gso_run_of(frames.len(), |i| frames[i].1)
}

/// Sends runs of recorded frames into gateway-rx, each run one UDP GSO
/// message, as gateway-tx sends them: gateway-rx has UDP GRO on and takes
/// the message whole, so the replayer's thread does not also cut it into
/// datagrams and run the receive path once per frame on the cores gateway-rx
/// is measured on.
struct Replayer {
    sock: UdpSocket,
    /// False once the kernel refused a GSO message: one frame per message
    /// from then on.
    gso: bool,
    /// Messages sent (fewer than frames when runs went as GSO messages).
    messages: u64,
}

impl Replayer {
    fn send(&mut self, recording: &[u8], run: &[(usize, usize)]) -> Result<()> {
        if run.len() > 1 && !self.gso {
            for f in run {
                self.send(recording, std::slice::from_ref(f))?;
            }
            return Ok(());
        }
        if run.len() > GSO_MAX_SEGMENTS || run.iter().any(|&(at, len)| at + len > recording.len()) {
            bail!("a replayed run outside the recording");
        }
        // SAFETY (zeroed): plain C structs; null pointers and zero lengths
        // are their empty values.
        let mut iovs: [libc::iovec; GSO_MAX_SEGMENTS] = unsafe { std::mem::zeroed() };
        for (iov, &(at, len)) in iovs.iter_mut().zip(run) {
            *iov = libc::iovec {
                // sendmsg only reads through it.
                iov_base: recording[at..].as_ptr() as *mut libc::c_void,
                iov_len: len,
            };
        }
        let mut ctl = Cmsg([0; 32]);
        // SAFETY: as above.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_iov = iovs.as_mut_ptr();
        h.msg_iovlen = run.len() as _;
        if run.len() > 1 {
            // SAFETY: ctl is aligned for cmsghdr and larger than
            // CMSG_SPACE(2); the cmsg is written inside it.
            unsafe {
                h.msg_control = ctl.0.as_mut_ptr().cast();
                h.msg_controllen = libc::CMSG_SPACE(2) as _;
                let c = libc::CMSG_FIRSTHDR(&h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                // gso_run keeps a segment under MAX_UDP_PAYLOAD.
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), run[0].1 as u16);
            }
        }
        loop {
            // SAFETY: h points at iovecs into `recording` and at `ctl`, all
            // alive across the call.
            let r = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &h, 0) };
            if r >= 0 {
                self.messages += 1;
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                // The kernel will not segment (an old kernel, a route
                // without it): frame by frame, as gateway-tx falls back.
                Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EMSGSIZE) if run.len() > 1 => {
                    eprintln!("  UDP GSO refused ({err}); replaying one frame per message");
                    self.gso = false;
                    return self.send(recording, run);
                }
                _ => return Err(err).context("sendmsg"),
            }
        }
    }
}

/// The 16-core projection of one gateway from its 1-core and 2-core runs:
/// Amdahl's law with the parallel fraction p the 2-core speed-up S₂ gives
/// (S₂ = 1 / ((1 − p) + p/2), so p = 2 (1 − 1/S₂), kept within 0..1), applied
/// to the 1-core cost: GiB/s(n) = (1 / c₁) / ((1 − p) + p/n), c₁ the CPU
/// seconds per GiB on one core. Returns (p, bytes per second at n cores).
pub fn project(c1_cpu_s_per_gib: f64, s2: f64, cores: f64) -> (f64, f64) {
    let p = (2.0 * (1.0 - 1.0 / s2)).clamp(0.0, 1.0);
    let gib_per_s = (1.0 / c1_cpu_s_per_gib) / ((1.0 - p) + p / cores);
    (p, gib_per_s * GIB)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_host::link::udp::MAX_UDP_PAYLOAD;

    #[test]
    fn the_queue_probe_reads_what_waits_in_that_socket_alone() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let other = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = rx.local_addr().expect("addr");
        let mut probe = UdpQueueProbe::new(addr).expect("netlink");
        assert_eq!(probe.queued(), Some(0));
        for _ in 0..10 {
            tx.send_to(&[7u8; 1000], addr).expect("send");
        }
        tx.send_to(&[7u8; 1000], other.local_addr().expect("addr"))
            .expect("send");
        let ten = probe.queued().expect("queued");
        // The kernel counts each datagram's buffer, not only its bytes.
        assert!(ten >= 10_000, "{ten}");
        let mut buf = [0u8; 2000];
        for _ in 0..5 {
            rx.recv(&mut buf).expect("recv");
        }
        let five = probe.queued().expect("queued");
        assert_eq!(five * 2, ten);
        drop(rx);
        // Another test's child, forked before it execs, may hold the
        // socket a moment longer (its descriptor closes on exec).
        let gone = Instant::now() + Duration::from_secs(5);
        while probe.queued().is_some() && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(probe.queued(), None, "no socket is bound there any more");
    }

    fn allowed_cpus() -> String {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn a_thread_pin_holds_the_thread_on_its_set_and_gives_the_old_one_back() {
        // Its own thread, so that the test harness's is never pinned.
        std::thread::spawn(|| {
            let before = allowed_cpus();
            // The first CPU this process may run on ("0-1" → "0").
            let first: String = before.chars().take_while(char::is_ascii_digit).collect();
            let pinned = ThreadPin::new(&first).unwrap();
            assert_eq!(allowed_cpus(), first);
            drop(pinned);
            assert_eq!(allowed_cpus(), before);
            assert!(ThreadPin::new("0,x").is_err());
            assert!(ThreadPin::new("100000").is_err());
            assert_eq!(allowed_cpus(), before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_recording_splits_back_into_its_frames() {
        let mut r = Vec::new();
        for len in [1usize, 1472, 0, 300] {
            r.extend_from_slice(&(len as u16).to_le_bytes());
            r.extend(std::iter::repeat_n(7u8, len));
        }
        let f = frames_of(&r).unwrap();
        assert_eq!(
            f.iter().map(|&(_, l)| l).collect::<Vec<_>>(),
            [1, 1472, 0, 300]
        );
        r.pop();
        assert!(frames_of(&r).is_err());
    }

    #[test]
    fn a_gso_run_is_equal_frames_closed_by_at_most_one_shorter() {
        let f = |lens: &[usize]| lens.iter().map(|&l| (0, l)).collect::<Vec<_>>();
        assert_eq!(gso_run(&f(&[1472, 1472, 1472, 900, 1472])), 4);
        assert_eq!(gso_run(&f(&[1472, 1472, 1500])), 2);
        assert_eq!(gso_run(&f(&[900, 1472])), 1);
        assert_eq!(gso_run(&f(&[1472, 0])), 1);
        assert_eq!(gso_run(&f(&[0, 0])), 1);
        assert_eq!(gso_run(&f(&[])), 0);
        assert_eq!(gso_run(&f(&[8; 100])), GSO_MAX_SEGMENTS);
        assert_eq!(gso_run(&f(&[1472; 64])), MAX_UDP_PAYLOAD / 1472);
        // The closing short frame must fit too.
        let n = MAX_UDP_PAYLOAD / 1472;
        let mut lens = vec![1472; n];
        lens.push(1400);
        assert_eq!(gso_run(&f(&lens)), n);
    }

    #[test]
    fn a_coalesced_message_splits_into_its_datagrams() {
        let r = |len, seg| {
            segments(len, seg)
                .map(|r| (r.start, r.end))
                .collect::<Vec<_>>()
        };
        assert_eq!(r(1472, None), [(0, 1472)]);
        assert_eq!(r(2944, Some(1472)), [(0, 1472), (1472, 2944)]);
        assert_eq!(r(3844, Some(1472)), [(0, 1472), (1472, 2944), (2944, 3844)]);
        assert_eq!(r(900, Some(1472)), [(0, 900)]);
        assert_eq!(r(0, None), [(0, 0)]);
    }

    /// The replayer's GSO messages reach the sink whole (GRO) and come out
    /// of the recording as the frames that went in, in order.
    #[test]
    fn replayed_frames_cross_gso_and_gro_as_they_were() {
        replay_into_sink(true);
    }

    /// Counting without copying the bytes out still counts every datagram
    /// and byte of a coalesced message.
    #[test]
    fn a_sink_that_only_counts_counts_what_a_recording_sink_does() {
        replay_into_sink(false);
    }

    fn replay_into_sink(record: bool) {
        let lens: Vec<usize> = [vec![1472; 70], vec![1000, 77], vec![1472; 3], vec![0, 5]].concat();
        let mut recording = Vec::new();
        let mut frames = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            recording.extend_from_slice(&(len as u16).to_le_bytes());
            frames.push((recording.len(), len));
            recording.extend((0..len).map(|j| (i + j) as u8));
        }
        assert_eq!(frames_of(&recording).unwrap(), frames);
        let sink = Sink::start(record.then_some(1 << 20)).unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(sink.addr()).unwrap();
        let mut replayer = Replayer {
            sock,
            gso: true,
            messages: 0,
        };
        let mut at = 0;
        while at < frames.len() {
            let n = gso_run(&frames[at..]);
            replayer.send(&recording, &frames[at..at + n]).unwrap();
            at += n;
        }
        assert!(replayer.gso, "this kernel has UDP GSO (Linux 4.18+)");
        assert!((replayer.messages as usize) < frames.len());
        let t = Instant::now();
        while sink.counts().0 < frames.len() as u64 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (datagrams, bytes) = sink.counts();
        assert_eq!(datagrams, frames.len() as u64);
        assert!(sink.messages() < datagrams, "GSO messages arrived whole");
        assert_eq!(bytes, lens.iter().sum::<usize>() as u64);
        let recorded = sink.finish();
        if record {
            assert_eq!(recorded, recording);
        } else {
            assert!(recorded.is_empty());
        }
    }

    #[test]
    fn the_projection_is_amdahl_from_the_two_core_speed_up() {
        // Perfect scaling: 16 cores do 16 times one core's GiB per CPU-s.
        let (p, b) = project(2.0, 2.0, 16.0);
        assert_eq!(p, 1.0);
        assert!((b / GIB - 8.0).abs() < 1e-9);
        // No scaling: one core's figure.
        let (p, b) = project(2.0, 1.0, 16.0);
        assert_eq!(p, 0.0);
        assert!((b / GIB - 0.5).abs() < 1e-9);
        // S₂ = 1.7: p ≈ 0.82, about 4.4× on 16 cores.
        let (p, b) = project(1.0, 1.7, 16.0);
        assert!((p - 0.8235).abs() < 1e-3, "{p}");
        assert!((b / GIB - 4.39).abs() < 0.01, "{}", b / GIB);
    }
}
