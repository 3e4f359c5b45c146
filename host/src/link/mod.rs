//! Links: how frames leave the sender and reach the receiver.
//!
//! A link only moves opaque frames one way. It is blocking and batched: the
//! gateways run each link end on a thread of its own. Batches fit every
//! transport: a datagram link sends one datagram per frame, a byte-stream
//! link frames them on the stream, a directory link writes them into one
//! file. The framings themselves are pure and live in
//! [`weir_proto::framing`].

pub mod dir;
pub mod serial;
pub mod udp;

use std::time::Duration;

pub use dir::{DirSink, DirSource};
pub use serial::{SerialSink, SerialSource};
pub use udp::{UdpSink, UdpSource};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("frame of {len} bytes exceeds the link's maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
}

impl LinkError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LinkError::Io {
            what: what.into(),
            source,
        }
    }
}

/// The sending end of a one-way link.
pub trait FrameSink: Send {
    /// Sends whole frames in order. Returns once the frames are handed to the
    /// transport; there is never an acknowledgement.
    fn send(&mut self, frames: &[&[u8]]) -> Result<(), LinkError>;

    /// The largest frame this link carries.
    fn max_frame_len(&self) -> usize;
}

/// The receiving end of a one-way link.
pub trait FrameSource: Send {
    /// Waits up to `timeout` for frames and fills `batch` (cleared first)
    /// with as many as are ready. An empty batch means the time ran out.
    fn recv(&mut self, batch: &mut FrameBatch, timeout: Duration) -> Result<(), LinkError>;
}

/// Frames received in one call, stored in one reusable buffer.
pub struct FrameBatch {
    buf: Vec<u8>,
    slot: usize,
    capacity: usize,
    /// (start, length) of each frame in `buf`: a transport that receives
    /// coalesced datagrams (UDP GRO) leaves them packed, not slot-aligned.
    frames: Vec<(usize, usize)>,
}

impl FrameBatch {
    /// Room for `capacity` frames of at most `max_frame` bytes each. A
    /// transport that receives datagrams coalesced may grow the buffer and
    /// return more frames than this in one call.
    pub fn new(capacity: usize, max_frame: usize) -> Self {
        FrameBatch {
            buf: vec![0; capacity * max_frame],
            slot: max_frame,
            capacity,
            frames: Vec::with_capacity(capacity),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn max_frame(&self) -> usize {
        self.slot
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn clear(&mut self) {
        self.frames.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.frames
            .iter()
            .map(|&(start, n)| &self.buf[start..start + n])
    }

    /// Appends a copy of `frame`; false when full or the frame is too large.
    pub fn push(&mut self, frame: &[u8]) -> bool {
        if self.frames.len() >= self.capacity || frame.len() > self.slot {
            return false;
        }
        let start = self.frames.len() * self.slot;
        self.buf[start..start + frame.len()].copy_from_slice(frame);
        self.frames.push((start, frame.len()));
        true
    }

    /// Puts `fresh` in place of the buffer, which it returns with every
    /// frame in it: the receiver lends a batch's buffer to the payloads in
    /// it instead of copying them out. `fresh` is grown to the size of the
    /// buffer it replaces (at least a full batch; more if the transport
    /// grew it), so that the transport need not grow it again.
    pub fn swap_buffer(&mut self, mut fresh: Vec<u8>) -> Vec<u8> {
        let room = (self.capacity * self.slot).max(self.buf.len());
        if fresh.len() < room {
            fresh.resize(room, 0);
        }
        self.frames.clear();
        std::mem::replace(&mut self.buf, fresh)
    }

    /// Where `part` (a slice of one of this batch's frames) lies in the
    /// buffer, or None if it is not inside it.
    pub fn offset_of(&self, part: &[u8]) -> Option<usize> {
        let base = self.buf.as_ptr() as usize;
        let start = (part.as_ptr() as usize).checked_sub(base)?;
        (start + part.len() <= self.buf.len()).then_some(start)
    }

    /// The raw buffer, slot size and frame list, for transports that
    /// receive in place. They may grow the buffer; every (start, length)
    /// they record must lie inside it.
    pub(crate) fn raw_mut(&mut self) -> (&mut Vec<u8>, usize, &mut Vec<(usize, usize)>) {
        (&mut self.buf, self.slot, &mut self.frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_keeps_frames_apart() {
        let mut b = FrameBatch::new(2, 4);
        assert!(b.push(b"ab"));
        assert!(!b.push(b"toolong"));
        assert!(b.push(b"wxyz"));
        assert!(!b.push(b"c"));
        let got: Vec<&[u8]> = b.iter().collect();
        assert_eq!(got, vec![&b"ab"[..], &b"wxyz"[..]]);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn a_swapped_buffer_keeps_its_frames_where_offset_of_said() {
        let mut b = FrameBatch::new(2, 4);
        assert!(b.push(b"ab"));
        assert!(b.push(b"wxyz"));
        let frames: Vec<&[u8]> = b.iter().collect();
        let at = b.offset_of(&frames[1][1..3]).unwrap();
        assert_eq!(b.offset_of(b"xy"), None, "not a slice of the batch");
        let old = b.swap_buffer(Vec::new());
        assert_eq!(&old[at..at + 2], b"xy");
        assert!(b.is_empty());
        assert!(b.push(b"cdef"), "the fresh buffer holds a full batch");
        assert!(b.push(b"gh"));
    }
}
