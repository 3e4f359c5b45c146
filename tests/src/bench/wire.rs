//! A counting UDP receiver: where the pacing figure is measured. Counts
//! datagrams and UDP payload bytes (= frame bytes, what gateway-tx paces:
//! `frame_overhead_bytes` is 0 in the bench), batched with `recvmmsg` so
//! counting keeps up with 1 Gb/s on one core.

// recvmmsg, to count datagrams at line rate, has no safe wrapper in std.
#![allow(unsafe_code)]

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const SLOT: usize = 2048;

#[derive(Default)]
struct Counts {
    datagrams: AtomicU64,
    bytes: AtomicU64,
    /// The longest time between two receives that returned datagrams,
    /// since the last [`WireCounter::restart_silence`].
    longest_silence_ns: AtomicU64,
}

/// A reading of the counters.
#[derive(Debug, Clone, Copy)]
pub struct WireReading {
    pub at: Instant,
    pub datagrams: u64,
    pub bytes: u64,
}

pub struct WireCounter {
    addr: SocketAddr,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WireCounter {
    pub fn start() -> Result<WireCounter> {
        let sock =
            Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("UDP socket")?;
        let _ = sock.set_recv_buffer_size(32 << 20);
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())
            .context("binding the counter")?;
        let sock: UdpSocket = sock.into();
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        let thread = std::thread::spawn(move || count(sock, &c, &s));
        Ok(WireCounter {
            addr,
            counts,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn read(&self) -> WireReading {
        WireReading {
            at: Instant::now(),
            datagrams: self.counts.datagrams.load(Ordering::Relaxed),
            bytes: self.counts.bytes.load(Ordering::Relaxed),
        }
    }

    /// From now on, [`WireCounter::longest_silence`] counts afresh.
    pub fn restart_silence(&self) {
        self.counts.longest_silence_ns.store(0, Ordering::Relaxed);
    }

    /// The longest stretch without a datagram since
    /// [`WireCounter::restart_silence`]: a stall of the sender, or of the
    /// whole machine, shows here.
    pub fn longest_silence(&self) -> Duration {
        Duration::from_nanos(self.counts.longest_silence_ns.load(Ordering::Relaxed))
    }

    /// Datagrams the kernel dropped at this socket (its buffer was full):
    /// they were sent but not counted.
    pub fn kernel_drops(&self) -> u64 {
        weir_tests::diode::kernel_udp_drops(self.addr).unwrap_or(0)
    }
}

impl Drop for WireCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn count(sock: UdpSocket, counts: &Counts, stop: &AtomicBool) {
    let mut bufs = vec![[0u8; SLOT]; BATCH];
    // SAFETY: zeroed iovec/mmsghdr are valid "empty" values; each is pointed
    // at its buffer below, and the buffers outlive every recvmmsg call.
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: SLOT,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut last: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs holds BATCH valid headers pointing at live buffers;
        // the socket has a receive timeout, so the call returns.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let now = Instant::now();
        if let Some(before) = last {
            let gap = (now - before).as_nanos() as u64;
            counts.longest_silence_ns.fetch_max(gap, Ordering::Relaxed);
        }
        last = Some(now);
        let bytes: u64 = msgs[..n as usize].iter().map(|m| m.msg_len as u64).sum();
        counts.datagrams.fetch_add(n as u64, Ordering::Relaxed);
        counts.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_datagram_and_its_bytes() {
        let counter = WireCounter::start().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for len in [1usize, 100, 1400] {
            tx.send_to(&vec![7u8; len], counter.addr()).unwrap();
        }
        let t = Instant::now();
        while counter.read().datagrams < 3 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = counter.read();
        assert_eq!((r.datagrams, r.bytes), (3, 1501));
    }

    #[test]
    fn a_pause_of_the_sender_shows_as_the_longest_silence_until_restarted() {
        let counter = WireCounter::start().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let send_and_count = |n: u64| {
            tx.send_to(b"frame", counter.addr()).unwrap();
            let t = Instant::now();
            while counter.read().datagrams < n && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(counter.read().datagrams, n);
        };
        send_and_count(1);
        std::thread::sleep(Duration::from_millis(80));
        send_and_count(2);
        assert!(counter.longest_silence() >= Duration::from_millis(80));
        counter.restart_silence();
        assert_eq!(counter.longest_silence(), Duration::ZERO);
    }
}
