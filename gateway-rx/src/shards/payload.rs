//! Shard payloads left in the buffer they were received into.
//!
//! Copying each verified payload out of the receive buffer (an allocation,
//! a copy and a free per shard) cost the receiver about a tenth of its
//! CPU. Instead a batch's buffer is lent to the shards it holds: each
//! [`Payload`] is a slice of it, and the last shard to be written or
//! dropped sends the buffer back to [`ReceiveBuffers`], where the link
//! takes its next one.
//!
//! A lent buffer stays whole while any of its shards is kept, so a batch
//! of which the store keeps a few shards (a later pass filling gaps) pins
//! far more memory than its payloads. The buffers out at once are counted,
//! and at [`ReceiveBuffers::new`]'s bound the verifiers copy payloads out
//! instead, until buffers come back: memory stays bounded whatever
//! arrives.

use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Receive buffers lent to shards, and those back and free for the link.
#[derive(Debug)]
pub struct ReceiveBuffers {
    free: Mutex<Vec<Vec<u8>>>,
    lent: AtomicUsize,
    max_lent: usize,
    max_free: usize,
}

impl ReceiveBuffers {
    /// Lends while fewer than `max_lent` buffers are out with shards (a
    /// batch let through just below it is lent after the check, so the
    /// count may pass it by the batches in flight); keeps at most
    /// `max_free` for reuse.
    pub fn new(max_lent: usize, max_free: usize) -> Arc<ReceiveBuffers> {
        Arc::new(ReceiveBuffers {
            free: Mutex::new(Vec::new()),
            lent: AtomicUsize::new(0),
            max_lent,
            max_free,
        })
    }

    /// Whether a batch received now may lend its buffer to its shards
    /// (otherwise they copy their payloads out).
    pub fn may_lend(&self) -> bool {
        self.lent.load(Ordering::Relaxed) < self.max_lent
    }

    /// Buffers out with shards now.
    pub fn lent(&self) -> usize {
        self.lent.load(Ordering::Relaxed)
    }

    /// A buffer to receive into in place of one lent: one that came back,
    /// or an empty one for the link to size.
    pub fn replacement(&self) -> Vec<u8> {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Lends `bytes` to the shards whose payloads lie in it.
    pub fn lend(self: &Arc<Self>, bytes: Vec<u8>) -> Arc<LentBuffer> {
        self.lent.fetch_add(1, Ordering::Relaxed);
        Arc::new(LentBuffer {
            bytes,
            home: self.clone(),
        })
    }
}

/// A receive buffer shared by the payloads it holds.
#[derive(Debug)]
pub struct LentBuffer {
    bytes: Vec<u8>,
    home: Arc<ReceiveBuffers>,
}

impl Drop for LentBuffer {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        self.home.lent.fetch_sub(1, Ordering::Relaxed);
        let mut free = self.home.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.home.max_free {
            free.push(bytes);
        }
    }
}

/// A shard's payload: its own bytes, or a slice of a lent receive buffer.
#[derive(Debug, Clone)]
pub enum Payload {
    Owned(Vec<u8>),
    Lent {
        buffer: Arc<LentBuffer>,
        at: Range<usize>,
    },
}

impl Payload {
    /// The bytes at `at` in `buffer`, or None if they are not all inside.
    pub fn lent(buffer: &Arc<LentBuffer>, at: Range<usize>) -> Option<Payload> {
        buffer.bytes.get(at.clone())?;
        Some(Payload::Lent {
            buffer: buffer.clone(),
            at,
        })
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Owned(Vec::new())
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::Owned(bytes)
    }
}

impl Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Owned(bytes) => bytes,
            // In range: checked when the payload was made, and a lent
            // buffer is never changed.
            Payload::Lent { buffer, at } => &buffer.bytes[at.clone()],
        }
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_buffer_comes_back_when_its_last_payload_goes() {
        let buffers = ReceiveBuffers::new(2, 4);
        let mut bytes = buffers.replacement();
        assert!(bytes.is_empty(), "nothing has come back yet");
        bytes.extend_from_slice(b"headerPAYLOADtag");
        let lent = buffers.lend(bytes);
        let a = Payload::lent(&lent, 6..13).expect("inside");
        let b = a.clone();
        assert!(Payload::lent(&lent, 10..17).is_none(), "past the end");
        drop(lent);
        assert_eq!(&a[..], b"PAYLOAD");
        assert_eq!(buffers.lent(), 1);
        drop(a);
        assert_eq!(buffers.lent(), 1, "one payload still holds it");
        drop(b);
        assert_eq!(buffers.lent(), 0);
        assert_eq!(&buffers.replacement()[..], b"headerPAYLOADtag");
    }

    #[test]
    fn lending_stops_at_the_bound_and_resumes_as_buffers_come_back() {
        let buffers = ReceiveBuffers::new(2, 1);
        let first = buffers.lend(vec![1; 8]);
        assert!(buffers.may_lend());
        let second = buffers.lend(vec![2; 8]);
        assert!(!buffers.may_lend(), "two out: the shards copy");
        drop(first);
        assert!(buffers.may_lend());
        drop(second);
        // Only one is kept for reuse.
        assert_eq!(buffers.replacement(), vec![1; 8]);
        assert!(buffers.replacement().is_empty());
    }
}
