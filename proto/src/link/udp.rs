//! UDP link: one frame per datagram, sent and received in batches with
//! sendmmsg/recvmmsg, on sockets with large buffers.

use super::{FrameBatch, FrameSink, FrameSource, LinkError};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Asked-for socket buffer: a few hundred milliseconds at 1 Gb/s.
pub const SOCKET_BUFFER_BYTES: usize = 32 << 20;
/// Datagrams per system call.
const BATCH: usize = 64;

fn socket_for(addr: &SocketAddr) -> Result<Socket, LinkError> {
    Socket::new(Domain::for_address(*addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| LinkError::io("creating UDP socket", e))
}

/// Asks for a large buffer and says which sysctl to raise when the kernel
/// gave less: small buffers lose frames in bursts on a fast link.
fn size_buffer(sock: &Socket, receive: bool) -> usize {
    let (set, sysctl) = if receive {
        (
            sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES),
            "net.core.rmem_max",
        )
    } else {
        (
            sock.set_send_buffer_size(SOCKET_BUFFER_BYTES),
            "net.core.wmem_max",
        )
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
    if got < SOCKET_BUFFER_BYTES {
        tracing::warn!(
            wanted = SOCKET_BUFFER_BYTES,
            got,
            "UDP {} buffer capped by the kernel; raise it with: sysctl -w {}={}",
            if receive { "receive" } else { "send" },
            sysctl,
            SOCKET_BUFFER_BYTES
        );
    }
    got
}

/// Sends frames as datagrams to one peer.
pub struct UdpSink {
    socket: UdpSocket,
    max_frame: usize,
    /// Datagrams the kernel refused (counted, never retried: no back channel).
    pub refused: u64,
}

impl UdpSink {
    pub fn connect(peer: SocketAddr, max_frame: usize) -> Result<Self, LinkError> {
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
        Ok(UdpSink {
            socket: sock.into(),
            max_frame,
            refused: 0,
        })
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
            let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for (i, f) in chunk.iter().enumerate() {
                iovs[i] = libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                };
                msgs[i].msg_hdr.msg_iov = &mut iovs[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            let mut done = 0;
            while done < chunk.len() {
                // SAFETY: msgs[done..len] point at iovecs that borrow `frames`,
                // which outlive the call.
                let n = unsafe {
                    libc::sendmmsg(
                        self.socket.as_raw_fd(),
                        msgs.as_mut_ptr().add(done),
                        (chunk.len() - done) as libc::c_uint,
                        0,
                    )
                };
                if n < 0 {
                    let err = std::io::Error::last_os_error();
                    match err.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // The peer's port is closed (ICMP came back) or the
                        // kernel is out of buffers: the datagram is lost, as
                        // on a diode. Skip it and go on.
                        Some(libc::ECONNREFUSED) | Some(libc::ENOBUFS) => {
                            self.refused += 1;
                            done += 1;
                            continue;
                        }
                        _ => return Err(LinkError::io("sending UDP datagrams", err)),
                    }
                }
                done += n as usize;
            }
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
    /// Datagrams longer than the largest frame, cut by the kernel.
    pub truncated: u64,
}

impl UdpSource {
    pub fn bind(listen: SocketAddr) -> Result<Self, LinkError> {
        let sock = socket_for(&listen)?;
        size_buffer(&sock, true);
        sock.bind(&listen.into())
            .map_err(|e| LinkError::io(format!("binding UDP {listen}"), e))?;
        Ok(UdpSource {
            socket: sock.into(),
            truncated: 0,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.socket
            .local_addr()
            .map_err(|e| LinkError::io("reading UDP local address", e))
    }
}

impl FrameSource for UdpSource {
    fn recv(&mut self, batch: &mut FrameBatch, timeout: Duration) -> Result<(), LinkError> {
        batch.clear();
        let fd = self.socket.as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
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
        let (buf, slot, lens) = batch.slots_mut();
        let cap = (buf.len() / slot).min(BATCH);
        let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..cap {
            iovs[i] = libc::iovec {
                iov_base: buf[i * slot..].as_mut_ptr() as *mut libc::c_void,
                iov_len: slot,
            };
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each iovec points at its own `slot`-byte region of `buf`.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                cap as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(LinkError::io("receiving UDP datagrams", err)),
            };
        }
        for m in &msgs[..n as usize] {
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.truncated += 1;
                // Keep the slot so indices stay aligned; it fails verification.
                lens.push(0);
            } else {
                lens.push(m.msg_len as usize);
            }
        }
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
