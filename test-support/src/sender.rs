//! A sender reduced to what a receiver test needs: seals object headers and
//! interleaved shards with the proto API and sends them over UDP, paced,
//! dropping or altering what a test asks.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;
use weir_proto::{
    interleave, BlockCodec, Body, FecParams, FrameSealer, Heartbeat, Key, LedgerHead, ObjectHeader,
    ObjectId, ObjectKind, ShardFrame,
};

/// Alters a shard payload before sealing: (object, block, index, payload).
pub type Tamper<'a> = &'a mut dyn FnMut(&ObjectId, u32, u16, &mut Vec<u8>);

/// A sender reduced to what a receiver test needs.
pub struct TestSender {
    sealer: FrameSealer,
    /// None: a sender that only seals (the test carries the frames itself).
    link: Option<UdpLink>,
    pub fec: FecParams,
    /// Frames sealed, in order; a test picks which to send.
    frame: Vec<u8>,
}

impl TestSender {
    pub fn new(
        key: Key,
        session_id: u64,
        peer: SocketAddr,
        datagram_size: usize,
        k: u16,
        m: u16,
    ) -> TestSender {
        TestSender {
            link: Some(UdpLink::new(peer)),
            ..Self::sealer_only(key, session_id, datagram_size, k, m)
        }
    }

    /// A sender that seals frames for another transport.
    pub fn sealer_only(
        key: Key,
        session_id: u64,
        datagram_size: usize,
        k: u16,
        m: u16,
    ) -> TestSender {
        TestSender {
            sealer: FrameSealer::new(key, session_id),
            link: None,
            fec: FecParams::for_datagram(datagram_size, k, m).expect("fec params"),
            frame: Vec::new(),
        }
    }

    /// Seals one pass over `objects`: each object's header, then its shards
    /// interleaved. Every frame is sealed (so skipped ones leave sequence
    /// gaps, as real loss does) but kept only if `keep(n, shard)` for its
    /// running number n and (block, index) (None for a header). `tamper` may
    /// alter a shard payload before sealing.
    pub fn seal(
        &mut self,
        objects: &[(ObjectKind, Vec<u8>)],
        keep: &mut dyn FnMut(u64, Option<(u32, u16)>) -> bool,
        tamper: Tamper<'_>,
    ) -> Vec<Vec<u8>> {
        let codec = BlockCodec::new(self.fec).expect("codec");
        let mut kept = Vec::new();
        let mut n = 0u64;
        let mut shards = Vec::new();
        for (kind, bytes) in objects {
            let id = ObjectId::of_bytes(bytes);
            let len = bytes.len() as u64;
            let header = ObjectHeader {
                id,
                kind: *kind,
                len,
                sha256: id.0,
                fec: self.fec,
            };
            self.sealer
                .seal(&Body::ObjectHeader(header), &mut self.frame);
            if keep(n, None) {
                kept.push(self.frame.clone());
            }
            n += 1;
            let blocks = self.fec.blocks_for(len);
            let mut encoded: Vec<Vec<Vec<u8>>> = Vec::with_capacity(blocks as usize);
            for b in 0..blocks {
                let start = (b as u64 * self.fec.block_bytes()) as usize;
                let blen = self.fec.block_len(len, b);
                codec
                    .encode(&bytes[start..start + blen], &mut shards)
                    .expect("encode");
                encoded.push(shards.clone());
            }
            for (b, i) in interleave(blocks, self.fec.total_shards(), 8) {
                let mut payload = encoded[b as usize][i as usize].clone();
                tamper(&id, b, i, &mut payload);
                let body = Body::Shard(ShardFrame {
                    object: id,
                    kind: *kind,
                    object_len: len,
                    fec: self.fec,
                    block: b,
                    index: i,
                    payload: &payload,
                });
                self.sealer.seal(&body, &mut self.frame);
                if keep(n, Some((b, i))) {
                    kept.push(self.frame.clone());
                }
                n += 1;
            }
        }
        kept
    }

    /// Seals and sends one whole pass; returns the frames.
    pub fn pass(&mut self, objects: &[(ObjectKind, Vec<u8>)]) -> Vec<Vec<u8>> {
        let frames = self.seal(objects, &mut |_, _| true, &mut |_, _, _, _| {});
        self.send(&frames);
        frames
    }

    /// Seals and sends a heartbeat announcing `ledger` as the head of the
    /// sender's image ledger.
    pub fn heartbeat(&mut self, ledger: Option<LedgerHead>) {
        let body = Body::Heartbeat(Heartbeat {
            uptime_s: 1,
            queued_objects: 0,
            pass: 1,
            config_fingerprint: 0,
            sent_frames: self.sealer.sealed(),
            ledger,
        });
        self.sealer.seal(&body, &mut self.frame);
        let frame = self.frame.clone();
        self.send(&[frame]);
    }

    /// Sends frames as they are, one datagram each, paced so loopback
    /// buffers keep up.
    pub fn send(&mut self, frames: &[Vec<u8>]) {
        let link = self.link.as_ref().expect("a UDP sender");
        for chunk in frames.chunks(64) {
            for frame in chunk {
                link.send(frame);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

/// An unconnected UDP socket aimed at the receiver. Unconnected, so a
/// receiver that is down (a test restarting it) loses the datagrams, as on
/// a diode, instead of failing later sends with "connection refused".
struct UdpLink {
    socket: UdpSocket,
    peer: SocketAddr,
}

impl UdpLink {
    fn new(peer: SocketAddr) -> UdpLink {
        let local = if peer.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        UdpLink {
            socket: UdpSocket::bind(local).expect("binding the test sender's UDP socket"),
            peer,
        }
    }

    fn send(&self, frame: &[u8]) {
        match self.socket.send_to(frame, self.peer) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!("udp send to {}: {e}", self.peer),
        }
    }
}
