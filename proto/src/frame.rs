//! The frame: the unit that crosses the diode (one UDP datagram, one serial
//! frame, one record in an outbox file).
//!
//! ```text
//!  offset  size  field
//!  ------  ----  -----------------------------------------------------------
//!       0     4  magic "WEIR"
//!       4     1  version (1)
//!       5     1  kind: 1 object header, 2 shard, 3 heartbeat
//!       6     2  key id                       (big-endian)
//!       8     8  session id                   (big-endian)
//!      16     8  sequence number              (big-endian)
//!      24     4  body length n                (big-endian)
//!      28     n  body: postcard encoding of the kind's struct
//!    28+n    32  HMAC-SHA256(key[key id], bytes 0 .. 28+n)
//! ```
//!
//! Bodies, in postcard (varints for integers, raw bytes for arrays):
//!
//! ```text
//!  object header: id[32] kind u8 len u64 sha256[32] fec{k u16, m u16, S u32}
//!  shard:         object[32] kind u8 object_len u64 fec{k, m, S}
//!                 block u32 index u16 payload(len, S bytes)
//!  heartbeat:     uptime_s u64 queued_objects u32 pass u64
//!                 config_fingerprint u64 sent_frames u64
//!                 ledger: option{chain u64, seq u64, hash[32]}
//! ```
//!
//! The receiver checks magic, version, key id and the tag — in constant
//! time — before it parses a byte of the body. A shard frame carries its
//! object's length and FEC parameters, so shards can be stored even when
//! every header of their object was lost.

use crate::auth::{Key, KeyRing};
use crate::fec::FecParams;
use crate::ledger::LedgerHead;
use crate::manifest::{ObjectId, ObjectKind};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

mod shard_body;

pub const MAGIC: [u8; 4] = *b"WEIR";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 28;
pub const TAG_LEN: usize = 32;
/// Largest shard payload: keeps the payload's length prefix at 3 bytes.
pub const MAX_SHARD_SIZE: usize = 65_000;
/// Largest body accepted: bounds what a forged length can make us read.
pub const MAX_BODY_LEN: usize = 1 << 20;

/// Header, tag and the largest postcard encoding of a shard body's fields.
pub const SHARD_FRAME_OVERHEAD: usize = HEADER_LEN
    + TAG_LEN
    + 32 // object id
    + 1 // kind
    + 10 // object_len varint
    + 3 + 3 + 5 // fec varints
    + 5 // block varint
    + 3 // index varint
    + 3; // payload length varint

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    ObjectHeader = 1,
    Shard = 2,
    Heartbeat = 3,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(FrameKind::ObjectHeader),
            2 => Some(FrameKind::Shard),
            3 => Some(FrameKind::Heartbeat),
            _ => None,
        }
    }
}

/// Announces an object: what it is, how long, how it is cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectHeader {
    pub id: ObjectId,
    pub kind: ObjectKind,
    pub len: u64,
    pub sha256: [u8; 32],
    pub fec: FecParams,
}

/// One shard of one block of one object; self-describing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFrame<'a> {
    pub object: ObjectId,
    pub kind: ObjectKind,
    pub object_len: u64,
    pub fec: FecParams,
    pub block: u32,
    pub index: u16,
    #[serde(borrow, with = "serde_bytes")]
    pub payload: &'a [u8],
}

/// The sender's pulse, once a second: the receiver knows the link is up even
/// when there is nothing to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub uptime_s: u64,
    pub queued_objects: u32,
    pub pass: u64,
    pub config_fingerprint: u64,
    pub sent_frames: u64,
    /// The head of the sender's image ledger: how many images it accepted
    /// in its chain, so the receiver can tell which it has not completed.
    pub ledger: Option<LedgerHead>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    ObjectHeader(ObjectHeader),
    Shard(ShardFrame<'a>),
    Heartbeat(Heartbeat),
}

impl Body<'_> {
    pub fn kind(&self) -> FrameKind {
        match self {
            Body::ObjectHeader(_) => FrameKind::ObjectHeader,
            Body::Shard(_) => FrameKind::Shard,
            Body::Heartbeat(_) => FrameKind::Heartbeat,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub kind: FrameKind,
    pub key_id: u16,
    pub session_id: u64,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: Header,
    pub body: Body<'a>,
}

/// Why a frame was dropped. Everything before `BadTag` is decided without
/// trusting the frame; everything after only on authenticated bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than header and tag")]
    TooShort(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    #[error("frame length {got} does not match its header ({expected})")]
    Length { got: usize, expected: usize },
    #[error("unknown key id {0}")]
    UnknownKey(u16),
    #[error("HMAC tag does not verify")]
    BadTag,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("body does not decode: {0}")]
    Body(String),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// Signs frames for one key and one sender session, numbering them.
///
/// A sender that seals on several threads gives each a clone and numbers
/// the frames itself ([`seal_numbered`](Self::seal_numbered)): the numbers
/// must still never repeat within the session.
#[derive(Clone)]
pub struct FrameSealer {
    key: Key,
    session_id: u64,
    next_seq: u64,
}

impl FrameSealer {
    pub fn new(key: Key, session_id: u64) -> Self {
        FrameSealer {
            key,
            session_id,
            next_seq: 0,
        }
    }

    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    pub fn key_id(&self) -> u16 {
        self.key.id()
    }

    /// Frames sealed so far by [`seal`](Self::seal).
    pub fn sealed(&self) -> u64 {
        self.next_seq
    }

    /// Writes the complete frame for `body` into `out` (cleared first) and
    /// returns the sequence number it carries.
    pub fn seal(&mut self, body: &Body<'_>, out: &mut Vec<u8>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        out.clear();
        self.seal_numbered(seq, body, out);
        seq
    }

    /// Appends the complete frame for `body`, numbered `seq`, to `out`.
    pub fn seal_numbered(&self, seq: u64, body: &Body<'_>, out: &mut Vec<u8>) {
        let start = out.len();
        self.seal_numbered_body(seq, body, out);
        let tag = self.key.tag(&out[start..]);
        out.extend_from_slice(&tag);
    }

    /// Appends header and body, without the tag.
    fn seal_numbered_body(&self, seq: u64, body: &Body<'_>, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(body.kind() as u8);
        out.extend_from_slice(&self.key.id().to_be_bytes());
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        fn extend(out: &mut Vec<u8>, value: &impl Serialize) {
            // Serializing plain structs into a Vec cannot fail.
            *out = postcard::to_extend(value, std::mem::take(out))
                .expect("postcard encoding into a Vec");
        }
        match body {
            Body::ObjectHeader(h) => extend(out, h),
            Body::Shard(s) => shard_body::encode(s, out),
            Body::Heartbeat(h) => extend(out, h),
        }
        let body_len = (out.len() - start - HEADER_LEN) as u32;
        out[start + 24..start + 28].copy_from_slice(&body_len.to_be_bytes());
    }

    /// Appends the frame for `body`, numbered `seq`, to `out` with its tag
    /// left zero: a run of frames written so is signed at once by
    /// [`sign_run`](Self::sign_run), several frames per SHA-256 pass.
    pub fn seal_unsigned(&self, seq: u64, body: &Body<'_>, out: &mut Vec<u8>) {
        let start = out.len();
        self.seal_numbered_body(seq, body, out);
        debug_assert!(out.len() >= start + HEADER_LEN);
        out.extend_from_slice(&[0; TAG_LEN]);
    }

    /// Signs frames written by [`seal_unsigned`](Self::seal_unsigned) back to
    /// back in `bytes`: frame `i` ends at `ends[i]`, the first starts at 0.
    /// Returns false, signing nothing, when an end is out of order, past
    /// `bytes` or leaves a frame shorter than a header and tag.
    pub fn sign_run(&self, bytes: &mut [u8], ends: &[usize]) -> bool {
        let mut start = 0;
        let mut spans = Vec::with_capacity(ends.len());
        for &end in ends {
            if end > bytes.len() || end < start + HEADER_LEN + TAG_LEN {
                return false;
            }
            spans.push((start, end - TAG_LEN));
            start = end;
        }
        let mut tags = vec![[0u8; TAG_LEN]; ends.len()];
        {
            let signed: Vec<&[u8]> = spans.iter().map(|&(s, e)| &bytes[s..e]).collect();
            self.key.tags(&signed, &mut tags);
        }
        for (&(_, e), tag) in spans.iter().zip(&tags) {
            bytes[e..e + TAG_LEN].copy_from_slice(tag);
        }
        true
    }

    /// Gives a frame this sealer made a new sequence number and tag: a
    /// frame held back (a paused link) must not fall behind the receiver's
    /// replay window. Returns false, leaving it untouched, for a buffer too
    /// short to be a frame.
    pub fn renumber(&self, frame: &mut [u8], seq: u64) -> bool {
        if frame.len() < HEADER_LEN + TAG_LEN {
            return false;
        }
        frame[16..24].copy_from_slice(&seq.to_be_bytes());
        let signed = frame.len() - TAG_LEN;
        let tag = self.key.tag(&frame[..signed]);
        frame[signed..].copy_from_slice(&tag);
        true
    }
}

/// Signs arbitrary body bytes under any kind byte. Not for the gateways:
/// the fuzz harness uses it to reach the body decoder past the tag check.
#[doc(hidden)]
pub fn seal_raw(key: &Key, kind: u8, session_id: u64, seq: u64, body: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&key.id().to_be_bytes());
    out.extend_from_slice(&session_id.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    let tag = key.tag(out);
    out.extend_from_slice(&tag);
}

/// A new session id, strictly greater than `previous`: the sender persists
/// the last one so that a clock that went back still yields a newer session.
/// The caller reads the clock (`now_ms`, milliseconds since the Unix epoch)
/// and draws `nonce` at random, so two senders started in one millisecond
/// still differ.
pub fn new_session_id(previous: Option<u64>, now_ms: u64, nonce: u16) -> u64 {
    let candidate = (now_ms << 16) | u64::from(nonce);
    match previous {
        Some(p) if candidate <= p => p.saturating_add(1),
        _ => candidate,
    }
}

/// Reads the header fields without trusting them.
pub fn peek_header(frame: &[u8]) -> Result<(Header, usize), FrameError> {
    if frame.len() < HEADER_LEN + TAG_LEN {
        return Err(FrameError::TooShort(frame.len()));
    }
    if frame[0..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if frame[4] != VERSION {
        return Err(FrameError::UnsupportedVersion(frame[4]));
    }
    let kind_byte = frame[5];
    let be16 =
        |r: std::ops::Range<usize>| u16::from_be_bytes(frame[r].try_into().unwrap_or([0; 2]));
    let be32 =
        |r: std::ops::Range<usize>| u32::from_be_bytes(frame[r].try_into().unwrap_or([0; 4]));
    let be64 =
        |r: std::ops::Range<usize>| u64::from_be_bytes(frame[r].try_into().unwrap_or([0; 8]));
    let body_len = be32(24..28) as usize;
    if body_len > MAX_BODY_LEN {
        return Err(FrameError::Length {
            got: frame.len(),
            expected: body_len,
        });
    }
    let kind = FrameKind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    Ok((
        Header {
            version: frame[4],
            kind,
            key_id: be16(6..8),
            session_id: be64(8..16),
            seq: be64(16..24),
        },
        HEADER_LEN + body_len + TAG_LEN,
    ))
}

/// The object a shard frame names, read without checking its tag, with
/// the header it came under. A receiver that already holds that object
/// whole may drop the frame unopened: it could change nothing there, and
/// the tag check is most of what a frame costs. None for anything that is
/// not, on its face, a shard frame of the length its header gives. Nothing
/// read here may be trusted beyond that choice.
pub fn claimed_object(frame: &[u8]) -> Option<(Header, ObjectId)> {
    let (header, total) = peek_header(frame).ok()?;
    if header.kind != FrameKind::Shard || total != frame.len() || total < HEADER_LEN + 32 + TAG_LEN
    {
        return None;
    }
    // A shard body opens with its object's id, raw.
    let id: [u8; 32] = frame.get(HEADER_LEN..HEADER_LEN + 32)?.try_into().ok()?;
    Some((header, ObjectId(id)))
}

/// Verifies and parses frames against a receiver's key set.
pub struct FrameOpener {
    keys: KeyRing,
}

impl FrameOpener {
    pub fn new(keys: KeyRing) -> Self {
        FrameOpener { keys }
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// Authenticates `frame` and only then decodes its body, which borrows
    /// the shard payload from `frame`.
    pub fn open<'a>(&self, frame: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let (header, key) = self.envelope(frame)?;
        let signed = frame.len() - TAG_LEN;
        if !tag_matches(&key.tag(&frame[..signed]), &frame[signed..]) {
            return Err(FrameError::BadTag);
        }
        Self::body(header, frame)
    }

    /// [`open`](Self::open) for each of `frames`, into `out` (cleared
    /// first): the same results, the tags computed several frames at once.
    pub fn open_many<'a>(&self, frames: &[&'a [u8]], out: &mut Vec<Result<Frame<'a>, FrameError>>) {
        out.clear();
        let envelopes: Vec<Result<(Header, &Key), FrameError>> =
            frames.iter().map(|f| self.envelope(f)).collect();
        let mut tag_ok = vec![false; frames.len()];
        // Frames grouped by key: one batch per key id in use (one, but for
        // the days a rotation overlaps).
        let mut ids: Vec<u16> = envelopes.iter().flatten().map(|(h, _)| h.key_id).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let mut key = None;
            let mut which = Vec::new();
            let mut signed = Vec::new();
            for (i, e) in envelopes.iter().enumerate() {
                if let Ok((h, k)) = e {
                    if h.key_id == id {
                        key = Some(*k);
                        which.push(i);
                        signed.push(&frames[i][..frames[i].len() - TAG_LEN]);
                    }
                }
            }
            let Some(key) = key else { continue };
            let mut tags = vec![[0u8; TAG_LEN]; signed.len()];
            key.tags(&signed, &mut tags);
            for (&i, tag) in which.iter().zip(&tags) {
                let f = frames[i];
                tag_ok[i] = tag_matches(tag, &f[f.len() - TAG_LEN..]);
            }
        }
        out.extend(
            frames
                .iter()
                .zip(envelopes)
                .zip(tag_ok)
                .map(|((frame, envelope), tag_ok)| {
                    let (header, _) = envelope?;
                    if !tag_ok {
                        return Err(FrameError::BadTag);
                    }
                    Self::body(header, frame)
                }),
        );
    }

    /// What is checked before the tag: header, length, key id.
    fn envelope(&self, frame: &[u8]) -> Result<(Header, &Key), FrameError> {
        let (header, total) = peek_header(frame)?;
        if total != frame.len() {
            return Err(FrameError::Length {
                got: frame.len(),
                expected: total,
            });
        }
        let key = self
            .keys
            .get(header.key_id)
            .ok_or(FrameError::UnknownKey(header.key_id))?;
        Ok((header, key))
    }

    /// Decodes the body of a frame whose tag was checked.
    fn body<'a>(header: Header, frame: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let signed = frame.len() - TAG_LEN;
        let body = &frame[HEADER_LEN..signed];
        let body = match header.kind {
            FrameKind::ObjectHeader => {
                let h: ObjectHeader = decode_exact(body)?;
                if !h.fec.is_valid() {
                    return Err(FrameError::Invalid("object header FEC parameters"));
                }
                if h.kind == ObjectKind::Blob && h.id.0 != h.sha256 {
                    return Err(FrameError::Invalid("blob id differs from its sha256"));
                }
                Body::ObjectHeader(h)
            }
            FrameKind::Shard => {
                let s = shard_body::decode(body)?;
                validate_shard(&s)?;
                Body::Shard(s)
            }
            FrameKind::Heartbeat => Body::Heartbeat(decode_exact(body)?),
        };
        Ok(Frame { header, body })
    }
}

/// Compares a computed tag with a frame's in constant time: how far two
/// tags agree must not show in how long the check takes. The differences
/// are folded into one word without a branch and only that word goes
/// through `subtle` (its slice comparison puts every byte through an
/// optimisation barrier, about 1 % of the receiver's CPU at line rate).
fn tag_matches(computed: &[u8; TAG_LEN], received: &[u8]) -> bool {
    // Whole words only: a remainder would go uncompared.
    const _: () = assert!(TAG_LEN.is_multiple_of(8));
    let Ok(received) = <&[u8; TAG_LEN]>::try_from(received) else {
        return false;
    };
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_ne_bytes(w)
    };
    let diff = computed
        .chunks_exact(8)
        .zip(received.chunks_exact(8))
        .fold(0u64, |d, (a, b)| d | (word(a) ^ word(b)));
    bool::from(diff.ct_eq(&0))
}

fn decode_exact<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Body(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Body(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

/// Range checks, so a receiver can index its stores with these fields.
fn validate_shard(s: &ShardFrame<'_>) -> Result<(), FrameError> {
    if !s.fec.is_valid() {
        return Err(FrameError::Invalid("shard FEC parameters"));
    }
    if s.payload.len() != s.fec.shard_size as usize {
        return Err(FrameError::Invalid(
            "shard payload length differs from shard_size",
        ));
    }
    if s.index >= s.fec.total_shards() {
        return Err(FrameError::Invalid("shard index beyond k + m"));
    }
    if s.block >= s.fec.blocks_for(s.object_len) {
        return Err(FrameError::Invalid("block beyond the object's length"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(id: u16) -> Key {
        Key::from_bytes(id, &[id as u8 ^ 0x5a; 32]).unwrap()
    }

    fn opener() -> FrameOpener {
        FrameOpener::new(KeyRing::new(vec![key(1), key(2)]).unwrap())
    }

    #[test]
    fn a_tag_matches_only_itself_whole() {
        let tag: [u8; TAG_LEN] = std::array::from_fn(|i| i as u8 * 7 + 1);
        assert!(tag_matches(&tag, &tag));
        for i in 0..TAG_LEN {
            for bit in [0x01, 0x80] {
                let mut other = tag;
                other[i] ^= bit;
                assert!(!tag_matches(&tag, &other), "byte {i} bit {bit:#x}");
            }
        }
        assert!(!tag_matches(&tag, &tag[..TAG_LEN - 1]));
        assert!(!tag_matches(&tag, &[tag.as_slice(), &[0]].concat()));
        assert!(!tag_matches(&tag, &[]));
    }

    fn arb_fec() -> impl Strategy<Value = FecParams> {
        (1u16..=200, 0u16..=56, 1u32..300).prop_map(|(k, m, s)| FecParams::new(k, m, s).unwrap())
    }

    fn arb_owned_body() -> impl Strategy<Value = (u8, Vec<u8>, FecParams, u64, u32, u16, [u8; 32])>
    {
        (
            0u8..3,
            any::<Vec<u8>>(),
            arb_fec(),
            any::<u64>(),
            any::<u32>(),
            any::<u16>(),
            any::<[u8; 32]>(),
        )
    }

    /// Builds a valid body of each kind from arbitrary parts.
    fn body_of<'a>(
        parts: &'a (u8, Vec<u8>, FecParams, u64, u32, u16, [u8; 32]),
        payload: &'a [u8],
    ) -> Body<'a> {
        let (which, _, fec, n, b, i, id) = parts;
        match which {
            0 => Body::ObjectHeader(ObjectHeader {
                id: ObjectId(*id),
                kind: ObjectKind::Image,
                len: *n,
                sha256: [7; 32],
                fec: *fec,
            }),
            1 => {
                let blocks = fec.blocks_for(*n % (1 << 40));
                Body::Shard(ShardFrame {
                    object: ObjectId(*id),
                    kind: ObjectKind::Blob,
                    object_len: *n % (1 << 40),
                    fec: *fec,
                    block: b % blocks,
                    index: i % fec.total_shards(),
                    payload,
                })
            }
            _ => Body::Heartbeat(Heartbeat {
                uptime_s: *n,
                queued_objects: *b,
                pass: u64::from(*i),
                config_fingerprint: n.rotate_left(7),
                sent_frames: n / 3,
                ledger: (n % 2 == 0).then_some(LedgerHead {
                    chain: crate::ledger::ChainId(n.rotate_left(3)),
                    seq: *n,
                    hash: crate::ledger::RecordHash(*id),
                }),
            }),
        }
    }

    #[test]
    fn shard_frame_fits_its_budget() {
        let fec = FecParams::for_datagram(1400, 32, 8).unwrap();
        let payload = vec![0xee; fec.shard_size as usize];
        let body = Body::Shard(ShardFrame {
            object: ObjectId([0xff; 32]),
            kind: ObjectKind::Image,
            object_len: u64::MAX,
            fec,
            block: fec.blocks_for(u64::MAX) - 1,
            index: 39,
            payload: &payload,
        });
        let mut out = Vec::new();
        FrameSealer::new(key(1), u64::MAX).seal(&body, &mut out);
        assert!(out.len() <= 1400, "{} bytes", out.len());
        assert_eq!(opener().open(&out).unwrap().body, body);
    }

    #[test]
    fn unknown_key_and_wrong_key_are_told_apart() {
        let body = Body::Heartbeat(Heartbeat {
            uptime_s: 1,
            queued_objects: 0,
            pass: 0,
            config_fingerprint: 0,
            sent_frames: 0,
            ledger: None,
        });
        let mut out = Vec::new();
        FrameSealer::new(key(9), 1).seal(&body, &mut out);
        assert_eq!(opener().open(&out), Err(FrameError::UnknownKey(9)));
        // Same id as a known key, other secret: a forgery.
        let forged = Key::from_bytes(1, &[0x11; 32]).unwrap();
        FrameSealer::new(forged, 1).seal(&body, &mut out);
        assert_eq!(opener().open(&out), Err(FrameError::BadTag));
    }

    #[test]
    fn frames_sealed_side_by_side_and_renumbered_open_with_their_numbers() {
        let hb = |uptime_s| {
            Body::Heartbeat(Heartbeat {
                uptime_s,
                queued_objects: 0,
                pass: 0,
                config_fingerprint: 0,
                sent_frames: 0,
                ledger: None,
            })
        };
        let sealer = FrameSealer::new(key(1), 5);
        let mut out = Vec::new();
        sealer.seal_numbered(40, &hb(1), &mut out);
        let first = out.len();
        sealer.seal_numbered(41, &hb(2), &mut out);
        let (a, b) = out.split_at_mut(first);
        let opened = opener().open(a).unwrap();
        assert_eq!((opened.header.seq, opened.body), (40, hb(1)));
        assert_eq!(opener().open(b).unwrap().header.seq, 41);
        assert!(sealer.renumber(b, 9000));
        let opened = opener().open(b).unwrap();
        assert_eq!((opened.header.seq, opened.body), (9000, hb(2)));
        assert!(!sealer.renumber(&mut [0u8; 10], 1));
        // Renumbered by another key: the receiver refuses it.
        let other = FrameSealer::new(Key::from_bytes(1, &[0x11; 32]).unwrap(), 5);
        assert!(other.renumber(a, 7));
        assert_eq!(opener().open(a), Err(FrameError::BadTag));
    }

    /// A shard of an 8-byte blob (one block of 2 + 1 shards of 4 bytes)
    /// whose id is `object` repeated.
    fn shard_of_8_bytes(object: u8, block: u32, index: u16, payload: &[u8; 4]) -> Body<'_> {
        Body::Shard(ShardFrame {
            object: ObjectId([object; 32]),
            kind: ObjectKind::Blob,
            object_len: 8,
            fec: FecParams::new(2, 1, 4).unwrap(),
            block,
            index,
            payload,
        })
    }

    #[test]
    fn out_of_range_shard_is_refused_even_when_signed() {
        // An 8-byte object has one block: block 1 is out of range.
        let body = shard_of_8_bytes(1, 1, 0, &[0u8; 4]);
        let mut out = Vec::new();
        FrameSealer::new(key(1), 1).seal(&body, &mut out);
        assert!(matches!(opener().open(&out), Err(FrameError::Invalid(_))));
    }

    #[test]
    fn a_shard_frame_names_its_object_before_it_is_opened() {
        let fec = FecParams::new(2, 1, 4).unwrap();
        let shard = shard_of_8_bytes(7, 0, 1, &[9u8; 4]);
        let mut out = Vec::new();
        let seq = FrameSealer::new(key(2), 77).seal(&shard, &mut out);
        let (header, id) = claimed_object(&out).unwrap();
        assert_eq!((header.key_id, header.session_id, header.seq), (2, 77, seq));
        assert_eq!(id, ObjectId([7; 32]));
        // Cut short, or lengthened: its header no longer gives its length.
        assert_eq!(claimed_object(&out[..out.len() - 1]), None);
        let mut longer = out.clone();
        longer.push(0);
        assert_eq!(claimed_object(&longer), None);
        // Other kinds name no object.
        let header = Body::ObjectHeader(ObjectHeader {
            id: ObjectId([7; 32]),
            kind: ObjectKind::Blob,
            len: 8,
            sha256: [7; 32],
            fec,
        });
        FrameSealer::new(key(2), 77).seal(&header, &mut out);
        assert_eq!(claimed_object(&out), None);
        // A body too short to hold an id, its length true to the header.
        let mut stub = Vec::new();
        seal_raw(&key(1), FrameKind::Shard as u8, 1, 1, &[7; 31], &mut stub);
        assert_eq!(claimed_object(&stub), None);
    }

    #[test]
    fn session_ids_increase() {
        let a = new_session_id(None, 1_700_000_000_000, 7);
        assert_eq!(a, (1_700_000_000_000 << 16) | 7);
        // The clock went back: still newer than the last session.
        assert!(new_session_id(Some(a), 1_600_000_000_000, 9) > a);
        assert_eq!(new_session_id(Some(u64::MAX - 1), 5, 5), u64::MAX);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every frame round-trips: what was sealed opens to the same header and body.
        #[test]
        fn every_frame_round_trips(parts in arb_owned_body(), key_id in 1u16..=2, session in any::<u64>()) {
            let payload = vec![0xabu8; parts.2.shard_size as usize];
            let body = body_of(&parts, &payload);
            let mut sealer = FrameSealer::new(key(key_id), session);
            let mut out = Vec::new();
            sealer.seal(&body, &mut out);
            let seq = sealer.seal(&body, &mut out);
            let frame = opener().open(&out).unwrap();
            prop_assert_eq!(frame.header.seq, seq);
            prop_assert_eq!(frame.header.session_id, session);
            prop_assert_eq!(frame.header.key_id, key_id);
            prop_assert_eq!(frame.body, body);
        }

        /// Flipping any single bit anywhere makes the frame fail.
        #[test]
        fn any_bit_flip_fails(parts in arb_owned_body(), bit in any::<proptest::sample::Index>()) {
            let payload = vec![0x5cu8; parts.2.shard_size as usize];
            let body = body_of(&parts, &payload);
            let mut out = Vec::new();
            FrameSealer::new(key(1), 42).seal(&body, &mut out);
            let i = bit.index(out.len() * 8);
            out[i / 8] ^= 1 << (i % 8);
            prop_assert!(opener().open(&out).is_err());
        }

        /// Frames signed as a run are the frames sealed one by one, and a
        /// batch opened at once gives what opening each gives, whatever
        /// was flipped, cut or signed with a key the receiver lacks.
        #[test]
        fn runs_and_batches_match_one_frame_at_a_time(
            parts in proptest::collection::vec(arb_owned_body(), 1..40),
            damage in proptest::collection::vec((any::<proptest::sample::Index>(), 0u8..4), 0..10),
        ) {
            let payloads: Vec<Vec<u8>> = parts.iter().map(|p| vec![0x3c; p.2.shard_size as usize]).collect();
            let sealer = FrameSealer::new(key(2), 77);
            let (mut one_by_one, mut run) = (Vec::new(), Vec::new());
            let mut ends = Vec::new();
            for (i, (p, payload)) in parts.iter().zip(&payloads).enumerate() {
                let body = body_of(p, payload);
                sealer.seal_numbered(i as u64, &body, &mut one_by_one);
                sealer.seal_unsigned(i as u64, &body, &mut run);
                ends.push(run.len());
            }
            prop_assert!(sealer.sign_run(&mut run, &ends));
            prop_assert_eq!(&run, &one_by_one);
            let mut frames: Vec<Vec<u8>> = Vec::new();
            let mut start = 0;
            for &end in &ends {
                frames.push(run[start..end].to_vec());
                start = end;
            }
            let stranger = FrameSealer::new(key(9), 1);
            for (at, how) in damage {
                let f = &mut frames[at.index(ends.len())];
                match how {
                    0 => { let bit = at.index(f.len() * 8); f[bit / 8] ^= 1 << (bit % 8); }
                    1 => { f.truncate(f.len() / 2); }
                    // A frame cut short by earlier damage has no key id to forge.
                    2 if f.len() >= HEADER_LEN => { let n = f.len(); stranger.renumber(&mut f[..], n as u64); f[6..8].copy_from_slice(&9u16.to_be_bytes()); }
                    2 => {}
                    _ => { f.push(0); }
                }
            }
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let mut batch = Vec::new();
            opener().open_many(&refs, &mut batch);
            let each: Vec<_> = refs.iter().map(|f| opener().open(f)).collect();
            prop_assert_eq!(batch, each);
        }

        /// No input makes the decoder panic (the fuzz target runs this longer).
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = opener().open(&bytes);
            let mut out = Vec::new();
            opener().open_many(&[&bytes, &bytes[..bytes.len() / 2]], &mut out);
        }
    }
}
