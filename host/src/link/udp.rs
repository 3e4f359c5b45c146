//! UDP link: one frame per datagram, sent and received in batches with
//! sendmmsg/recvmmsg, on sockets with large buffers.
//!
//! Where the kernel offers it, a run of equal-length frames leaves as one
//! UDP GSO message (`UDP_SEGMENT`) and arrives coalesced (`UDP_GRO`): the
//! stack then handles one buffer per few dozen datagrams instead of one per
//! datagram, which is most of the per-frame cost on a fast link. The
//! datagrams on the wire are the same either way; a peer without GRO gets
//! them one by one.

// sendmmsg/recvmmsg with GSO/GRO control messages have no safe wrapper in
// std or socket2; each unsafe block states what it relies on.
#![allow(unsafe_code)]

use super::{FrameBatch, FrameSink, FrameSource, LinkError};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Asked-for socket buffer: a few hundred milliseconds at 1 Gb/s.
pub const SOCKET_BUFFER_BYTES: usize = 32 << 20;
/// Frames per sendmmsg; messages per recvmmsg without GRO.
const BATCH: usize = 64;
const RECV_MSGS: usize = 128;
/// Segments per GSO message: the kernel's UDP_MAX_SEGMENTS (64 before 6.x
/// raised it; the older bound works everywhere).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload of one IPv4 datagram: a GSO message is one datagram
/// until the stack cuts it.
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Receive room per message with GRO: the largest coalesced datagram fits.
const GRO_REGION: usize = 65_536;
/// Messages per recvmmsg with GRO (each up to GRO_REGION bytes).
const GRO_MAX_MSGS: usize = 16;

/// Control buffer of one message: room for one cmsg carrying an int.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Cmsg(pub [u8; 32]);

/// Sets an int option at the UDP level (UDP_GRO, UDP_SEGMENT).
pub fn udp_sockopt(sock: &Socket, name: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: an int option on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the kernel knows UDP_SEGMENT (Linux 4.18 and later).
fn gso_supported(sock: &Socket) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option read into a local of the size given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0
}

/// How many frames from the start of `frames` leave as one GSO message: a
/// run of equal lengths, closed by at most one shorter frame (the kernel
/// cuts a message into gso_size pieces; only the last may be short).
fn gso_run(frames: &[&[u8]]) -> usize {
    gso_run_of(frames.len(), |i| frames[i].len())
}

/// [`gso_run`] over `n` frames whose lengths `len(i)` gives: also for
/// frames that are not slices (a recording's offsets). 0 for no frame.
pub fn gso_run_of(n: usize, len: impl Fn(usize) -> usize) -> usize {
    if n == 0 {
        return 0;
    }
    let seg = len(0);
    if seg == 0 {
        return 1;
    }
    let max = GSO_MAX_SEGMENTS.min(MAX_UDP_PAYLOAD / seg);
    let mut run = 1;
    while run < n && run < max && len(run) == seg {
        run += 1;
    }
    if run < n
        && run < max
        && len(run) > 0
        && len(run) < seg
        && run * seg + len(run) <= MAX_UDP_PAYLOAD
    {
        run += 1;
    }
    run
}

/// The segment size of a coalesced message, from its UDP_GRO cmsg.
///
/// # Safety
/// `h` must be a msghdr the kernel filled, its control pointer still valid.
pub unsafe fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    let mut c = libc::CMSG_FIRSTHDR(h);
    while !c.is_null() {
        if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
            let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
            return usize::try_from(v).ok().filter(|&s| s > 0);
        }
        c = libc::CMSG_NXTHDR(h, c);
    }
    None
}

fn socket_for(addr: &SocketAddr) -> Result<Socket, LinkError> {
    Socket::new(Domain::for_address(*addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| LinkError::io("creating UDP socket", e))
}

/// Receive buffer asked for: the store pauses (fsync, sled commit) for
/// longer than 32 MiB lasts at several Gb/s, and what does not fit is lost.
/// Kernel memory, taken only while datagrams wait; capped by
/// `net.core.rmem_max`, which the appliance image raises to this.
pub const RECV_BUFFER_BYTES: usize = 256 << 20;

/// Asks for a large buffer and says which sysctl to raise when the kernel
/// gave less: small buffers lose frames in bursts on a fast link.
fn size_buffer(sock: &Socket, receive: bool) -> usize {
    let wanted = if receive {
        RECV_BUFFER_BYTES
    } else {
        SOCKET_BUFFER_BYTES
    };
    let (set, sysctl) = if receive {
        (sock.set_recv_buffer_size(wanted), "net.core.rmem_max")
    } else {
        (sock.set_send_buffer_size(wanted), "net.core.wmem_max")
    };
    if let Err(e) = set {
        tracing::warn!(error = %e, "could not set UDP socket buffer size");
    }
    let got = if receive {
        sock.recv_buffer_size()
    } else {
        sock.send_buffer_size()
    }
    .unwrap_or(0);
    // Linux reports twice the usable size it granted.
    if got < wanted {
        tracing::warn!(
            wanted,
            got,
            "UDP {} buffer capped by the kernel; raise it with: sysctl -w {}={}",
            if receive { "receive" } else { "send" },
            sysctl,
            wanted
        );
    }
    got
}

/// Sends frames as datagrams to one peer.
pub struct UdpSink {
    socket: UdpSocket,
    max_frame: usize,
    gso: bool,
    /// Datagrams the kernel refused (counted, never retried: no back channel).
    pub refused: u64,
}

impl UdpSink {
    /// A sink that uses UDP GSO when the kernel has it.
    pub fn connect(peer: SocketAddr, max_frame: usize) -> Result<Self, LinkError> {
        Self::connect_with(peer, max_frame, true)
    }

    /// `gso: false` sends one datagram per message whatever the kernel offers.
    pub fn connect_with(peer: SocketAddr, max_frame: usize, gso: bool) -> Result<Self, LinkError> {
        let sock = socket_for(&peer)?;
        size_buffer(&sock, false);
        let local: SocketAddr = if peer.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal address")
        } else {
            "[::]:0".parse().expect("literal address")
        };
        sock.bind(&local.into())
            .map_err(|e| LinkError::io("binding UDP sender socket", e))?;
        sock.connect(&peer.into())
            .map_err(|e| LinkError::io(format!("setting UDP peer {peer}"), e))?;
        let gso = gso && gso_supported(&sock);
        Ok(UdpSink {
            socket: sock.into(),
            max_frame,
            gso,
            refused: 0,
        })
    }

    /// Whether runs of frames still leave as GSO messages.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Sends at most BATCH frames with one sendmmsg (more when a message is
    /// refused part-way), each message one frame or one GSO run.
    fn send_chunk(&mut self, chunk: &[&[u8]]) -> Result<(), LinkError> {
        debug_assert!(chunk.len() <= BATCH);
        // SAFETY (zeroed): plain C structs; null pointers and zero lengths
        // are their empty values.
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut ctl = [Cmsg([0; 32]); BATCH];
        // First frame and frame count of each message.
        let mut runs = [(0usize, 0usize); BATCH];
        for (i, f) in chunk.iter().enumerate() {
            iovs[i] = libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            };
        }
        let mut nmsg = 0;
        let mut i = 0;
        while i < chunk.len() {
            let n = if self.gso { gso_run(&chunk[i..]) } else { 1 };
            runs[nmsg] = (i, n);
            let h = &mut msgs[nmsg].msg_hdr;
            // SAFETY: i + n <= chunk.len() <= BATCH, inside `iovs`.
            h.msg_iov = unsafe { iovs.as_mut_ptr().add(i) };
            h.msg_iovlen = n as _;
            if n > 1 {
                // SAFETY: ctl[nmsg] is aligned for cmsghdr and larger than
                // CMSG_SPACE(2); the cmsg is written inside it.
                unsafe {
                    h.msg_control = ctl.as_mut_ptr().add(nmsg).cast();
                    h.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    // gso_run keeps a segment under MAX_UDP_PAYLOAD.
                    std::ptr::write_unaligned(
                        libc::CMSG_DATA(c).cast::<u16>(),
                        chunk[i].len() as u16,
                    );
                }
            }
            nmsg += 1;
            i += n;
        }
        let mut done = 0;
        while done < nmsg {
            // SAFETY: msgs[done..nmsg] point at iovecs that borrow `chunk`
            // and at control buffers on this stack, all outliving the call.
            let n = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    msgs.as_mut_ptr().add(done),
                    (nmsg - done) as libc::c_uint,
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                let (first, count) = runs[done];
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The peer's port is closed (ICMP came back) or the
                    // kernel is out of buffers: the datagrams are lost, as
                    // on a diode. Skip them and go on.
                    Some(libc::ECONNREFUSED) | Some(libc::ENOBUFS) => {
                        self.refused += count as u64;
                        done += 1;
                        continue;
                    }
                    // The route or device will not segment (no checksum
                    // offload, a segment above the MTU, an old kernel):
                    // datagram by datagram from here on.
                    Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EMSGSIZE) if count > 1 => {
                        tracing::warn!(error = %err, segment = chunk[first].len(),
                            "UDP GSO refused; sending one datagram per message from now on");
                        self.gso = false;
                        return self.send_chunk(&chunk[first..]);
                    }
                    _ => return Err(LinkError::io("sending UDP datagrams", err)),
                }
            }
            done += n as usize;
        }
        Ok(())
    }
}

impl FrameSink for UdpSink {
    fn send(&mut self, frames: &[&[u8]]) -> Result<(), LinkError> {
        if let Some(f) = frames.iter().find(|f| f.len() > self.max_frame) {
            return Err(LinkError::FrameTooLarge {
                len: f.len(),
                max: self.max_frame,
            });
        }
        for chunk in frames.chunks(BATCH) {
            self.send_chunk(chunk)?;
        }
        Ok(())
    }

    fn max_frame_len(&self) -> usize {
        self.max_frame
    }
}

/// Receives datagrams on a bound address.
pub struct UdpSource {
    socket: UdpSocket,
    gro: bool,
    /// Datagrams longer than the largest frame, cut by the kernel or
    /// refused here.
    pub truncated: u64,
    /// Datagrams that arrived coalesced (GRO) with others.
    pub coalesced: u64,
}

impl UdpSource {
    /// A source that asks for UDP GRO when the kernel has it.
    pub fn bind(listen: SocketAddr) -> Result<Self, LinkError> {
        Self::bind_with(listen, true)
    }

    /// `gro: false` receives one datagram per message whatever the kernel
    /// offers.
    pub fn bind_with(listen: SocketAddr, gro: bool) -> Result<Self, LinkError> {
        let sock = socket_for(&listen)?;
        size_buffer(&sock, true);
        sock.bind(&listen.into())
            .map_err(|e| LinkError::io(format!("binding UDP {listen}"), e))?;
        let gro = gro
            && match udp_sockopt(&sock, libc::UDP_GRO, 1) {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!(error = %e, "UDP GRO not available; receiving datagram by datagram");
                    false
                }
            };
        Ok(UdpSource {
            socket: sock.into(),
            gro,
            truncated: 0,
            coalesced: 0,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.socket
            .local_addr()
            .map_err(|e| LinkError::io("reading UDP local address", e))
    }

    /// Whether datagrams may arrive coalesced.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Takes what is queued without waiting; the number of frames added.
    fn recv_ready(&mut self, batch: &mut FrameBatch) -> Result<usize, LinkError> {
        let n = if self.gro {
            self.recv_coalesced(batch)
        } else {
            self.recv_plain(batch)
        };
        match n {
            Ok(n) => Ok(n),
            Err(err) => match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(LinkError::io("receiving UDP datagrams", err)),
            },
        }
    }

    /// One datagram per slot of the batch.
    fn recv_plain(&mut self, batch: &mut FrameBatch) -> std::io::Result<usize> {
        let cap = batch.capacity().min(RECV_MSGS);
        let (buf, slot, frames) = batch.raw_mut();
        let cap = cap.min(buf.len() / slot.max(1));
        // SAFETY (zeroed): plain C structs, empty when zero.
        let mut iovs: [libc::iovec; RECV_MSGS] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; RECV_MSGS] = unsafe { std::mem::zeroed() };
        for i in 0..cap {
            iovs[i] = libc::iovec {
                iov_base: buf[i * slot..].as_mut_ptr() as *mut libc::c_void,
                iov_len: slot,
            };
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each iovec points at its own `slot`-byte region of `buf`.
        let n = unsafe { self.recvmmsg(&mut msgs[..cap]) }?;
        for (i, m) in msgs[..n].iter().enumerate() {
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.truncated += 1;
                // Keep an empty frame in its place; it fails verification.
                frames.push((i * slot, 0));
            } else {
                frames.push((i * slot, m.msg_len as usize));
            }
        }
        Ok(n)
    }

    /// Receives into `msgs` without waiting; how many arrived.
    ///
    /// # Safety
    /// Every message's iovecs and control buffer must point at memory that
    /// is valid for writes of the lengths given.
    unsafe fn recvmmsg(&self, msgs: &mut [libc::mmsghdr]) -> std::io::Result<usize> {
        let n = libc::recvmmsg(
            self.socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        );
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    /// One region of GRO_REGION bytes per message, each split into its
    /// datagrams in place by the segment size the kernel reports.
    fn recv_coalesced(&mut self, batch: &mut FrameBatch) -> std::io::Result<usize> {
        let regions = (batch.capacity() * batch.max_frame())
            .div_ceil(GRO_REGION)
            .clamp(1, GRO_MAX_MSGS);
        let (buf, slot, frames) = batch.raw_mut();
        if buf.len() < regions * GRO_REGION {
            buf.resize(regions * GRO_REGION, 0);
        }
        // SAFETY (zeroed): plain C structs, empty when zero.
        let mut iovs: [libc::iovec; GRO_MAX_MSGS] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; GRO_MAX_MSGS] = unsafe { std::mem::zeroed() };
        let mut ctl = [Cmsg([0; 32]); GRO_MAX_MSGS];
        for i in 0..regions {
            iovs[i] = libc::iovec {
                iov_base: buf[i * GRO_REGION..].as_mut_ptr() as *mut libc::c_void,
                iov_len: GRO_REGION,
            };
            let h = &mut msgs[i].msg_hdr;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = ctl[i].0.as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<Cmsg>() as _;
        }
        // SAFETY: each iovec points at its own GRO_REGION bytes of `buf`,
        // each control pointer at its own Cmsg on this stack.
        let n = unsafe { self.recvmmsg(&mut msgs[..regions]) }?;
        let before = frames.len();
        for (i, m) in msgs[..n].iter().enumerate() {
            let base = i * GRO_REGION;
            let len = (m.msg_len as usize).min(GRO_REGION);
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len == 0 {
                // Cannot happen for UDP with a region this large, but an
                // empty frame in its place keeps the count honest.
                if len != 0 {
                    self.truncated += 1;
                }
                frames.push((base, 0));
                continue;
            }
            // SAFETY: the kernel filled this msghdr; ctl is still alive.
            let seg = unsafe { gro_segment(&m.msg_hdr) }.unwrap_or(len);
            if seg < len {
                self.coalesced += len.div_ceil(seg) as u64;
            }
            let mut off = 0;
            while off < len {
                let n = seg.min(len - off);
                if n > slot {
                    self.truncated += 1;
                    frames.push((base + off, 0));
                } else {
                    frames.push((base + off, n));
                }
                off += n;
            }
        }
        Ok(frames.len() - before)
    }
}

impl FrameSource for UdpSource {
    fn recv(&mut self, batch: &mut FrameBatch, timeout: Duration) -> Result<(), LinkError> {
        batch.clear();
        // Under load datagrams are already queued: take them without a poll.
        if self.recv_ready(batch)? > 0 {
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                return Ok(());
            }
            return Err(LinkError::io("waiting for UDP datagrams", err));
        }
        if ready == 0 {
            return Ok(());
        }
        self.recv_ready(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_loopback_in_batches() {
        let mut src = UdpSource::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut sink = UdpSink::connect(src.local_addr().unwrap(), 1400).unwrap();
        let frames: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_be_bytes().repeat(100)).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        sink.send(&refs).unwrap();
        let mut batch = FrameBatch::new(64, 1400);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < frames.len() && std::time::Instant::now() < deadline {
            src.recv(&mut batch, Duration::from_millis(100)).unwrap();
            got.extend(batch.iter().map(|f| f.to_vec()));
        }
        assert_eq!(got, frames);
    }

    /// Frames of mixed lengths, each unique: runs of equal length (GSO
    /// messages), a run closed by a shorter frame, lone frames, an empty one.
    fn mixed_frames() -> Vec<Vec<u8>> {
        let mut lens = Vec::new();
        lens.extend(std::iter::repeat_n(1361, 70)); // longer than one GSO message
        lens.push(1200); // closes the run
        lens.extend(std::iter::repeat_n(1362, 5));
        lens.extend([1400, 120, 1400, 1400, 0, 1399, 1400]);
        lens.extend(std::iter::repeat_n(64, 90)); // more than 64 segments' worth
        lens.extend(std::iter::repeat_n(1400, 47)); // payload-bound run
        lens.extend([1, 1, 2]);
        lens.into_iter()
            .enumerate()
            .map(|(i, n)| {
                (0..n)
                    .map(|j| (i as u32).wrapping_mul(31).wrapping_add(j as u32) as u8)
                    .collect()
            })
            .collect()
    }

    /// Sends `frames` in batches of `chunk`, draining the receiver after
    /// each (a default-sized socket buffer holds one batch), and returns
    /// what came out, in order.
    fn cross(
        sink: &mut UdpSink,
        src: &mut UdpSource,
        frames: &[Vec<u8>],
        chunk: usize,
    ) -> Vec<Vec<u8>> {
        let mut batch = FrameBatch::new(32, 1400);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for part in frames.chunks(chunk) {
            let refs: Vec<&[u8]> = part.iter().map(|f| f.as_slice()).collect();
            sink.send(&refs).unwrap();
            let want = got.len() + part.len();
            while got.len() < want && std::time::Instant::now() < deadline {
                src.recv(&mut batch, Duration::from_millis(100)).unwrap();
                got.extend(batch.iter().map(|f| f.to_vec()));
            }
        }
        got
    }

    #[test]
    fn mixed_frames_cross_through_gso_and_gro() {
        let mut src = UdpSource::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut sink = UdpSink::connect(src.local_addr().unwrap(), 1400).unwrap();
        assert!(sink.gso(), "this kernel has UDP GSO (Linux 4.18+)");
        assert!(src.gro(), "this kernel has UDP GRO (Linux 5.0+)");
        let frames = mixed_frames();
        let got = cross(&mut sink, &mut src, &frames, 64);
        assert_eq!(got.len(), frames.len());
        assert!(got == frames, "frames differ after crossing");
        assert!(sink.gso(), "GSO fell back on loopback");
        assert!(src.coalesced > 0, "nothing arrived coalesced");
        assert_eq!((sink.refused, src.truncated), (0, 0));
    }

    #[test]
    fn mixed_frames_cross_without_gso_or_gro() {
        let frames = mixed_frames();
        // Each side alone off, then both: a GSO message reaches a plain
        // socket cut into datagrams by the kernel.
        for (gso, gro) in [(false, false), (true, false), (false, true)] {
            let mut src = UdpSource::bind_with("127.0.0.1:0".parse().unwrap(), gro).unwrap();
            let mut sink = UdpSink::connect_with(src.local_addr().unwrap(), 1400, gso).unwrap();
            assert_eq!(src.gro(), gro);
            assert_eq!(sink.gso(), gso);
            let got = cross(&mut sink, &mut src, &frames, 50);
            assert!(got == frames, "gso {gso} gro {gro}: frames differ");
            if !gro {
                assert_eq!(src.coalesced, 0, "gso {gso}");
            }
        }
    }

    #[test]
    fn gso_refused_by_the_kernel_falls_back_to_datagrams() {
        let mut src = UdpSource::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut sink = UdpSink::connect(src.local_addr().unwrap(), 1400).unwrap();
        assert!(sink.gso());
        // Without UDP checksums the kernel refuses GSO messages (EINVAL)
        // but still sends single datagrams.
        let one: libc::c_int = 1;
        // SAFETY: an int option on the sink's own socket.
        let r = unsafe {
            libc::setsockopt(
                sink.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let frames = mixed_frames();
        let got = cross(&mut sink, &mut src, &frames, 64);
        assert!(!sink.gso(), "the refusal switched GSO off");
        assert!(got == frames, "frames differ after the fallback");
    }

    #[test]
    fn gro_marks_datagrams_longer_than_a_frame() {
        let mut src = UdpSource::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut sink = UdpSink::connect(src.local_addr().unwrap(), 1400).unwrap();
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 1000]).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        sink.send(&refs).unwrap();
        // A receiver whose frames are at most 999 bytes: every one is too long.
        let mut batch = FrameBatch::new(4, 999);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < frames.len() && std::time::Instant::now() < deadline {
            src.recv(&mut batch, Duration::from_millis(100)).unwrap();
            got.extend(batch.iter().map(<[u8]>::len));
        }
        assert_eq!(got, vec![0; 10]);
        assert_eq!(src.truncated, 10);
    }

    #[test]
    fn gso_runs_respect_the_kernel_bounds() {
        let f = |lens: &[usize]| -> Vec<Vec<u8>> { lens.iter().map(|&n| vec![0; n]).collect() };
        let run = |frames: &[Vec<u8>]| {
            let refs: Vec<&[u8]> = frames.iter().map(|v| v.as_slice()).collect();
            gso_run(&refs)
        };
        assert_eq!(run(&f(&[10, 10, 10, 9, 9])), 4); // one shorter frame closes a run
        assert_eq!(run(&f(&[10, 11, 10])), 1); // a longer one cannot follow
        assert_eq!(run(&f(&[10, 10, 0])), 2); // nor an empty one
        assert_eq!(run(&f(&[0, 0])), 1);
        assert_eq!(run(&f(&[8; 100])), GSO_MAX_SEGMENTS);
        assert_eq!(run(&f(&[1400; 64])), MAX_UDP_PAYLOAD / 1400);
        let mut big = vec![1400; 46];
        big.push(1399); // 46 · 1400 + 1399 exceeds one datagram
        assert_eq!(run(&f(&big)), 46);
    }

    #[test]
    fn oversize_frame_is_refused_before_sending() {
        let mut sink = UdpSink::connect("127.0.0.1:9".parse().unwrap(), 100).unwrap();
        assert!(matches!(
            sink.send(&[&[0u8; 101][..]]),
            Err(LinkError::FrameTooLarge { len: 101, max: 100 })
        ));
    }

    #[test]
    fn sending_to_a_closed_port_is_not_an_error() {
        let closed = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut sink = UdpSink::connect(closed, 100).unwrap();
        for _ in 0..5 {
            sink.send(&[&[1u8; 10][..]]).unwrap();
        }
    }

    #[test]
    fn recv_times_out_empty() {
        let mut src = UdpSource::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut batch = FrameBatch::new(4, 100);
        src.recv(&mut batch, Duration::from_millis(10)).unwrap();
        assert!(batch.is_empty());
    }
}
