//! The shard body, written and read by hand: every byte of a crossing but
//! a few heartbeats and headers passes through here on both gateways, and
//! serde's field-by-field calls (an object id is 32 calls of one byte) cost
//! more than the layout needs. The bytes are exactly postcard's encoding of
//! [`ShardFrame`], and what is accepted is exactly what postcard accepts:
//! tests hold both to postcard, so the wire format stays the one documented
//! in the module above.
//!
//! ```text
//!  object[32] kind varint(u32) object_len varint(u64)
//!  fec{data_shards varint(u16), parity_shards varint(u16), shard_size varint(u32)}
//!  block varint(u32) index varint(u16) payload{len varint(u64), bytes}
//! ```

use super::{FrameError, ShardFrame};
use crate::fec::FecParams;
use crate::manifest::{ObjectId, ObjectKind};

/// Appends `s`'s body to `out`.
pub(super) fn encode(s: &ShardFrame<'_>, out: &mut Vec<u8>) {
    out.reserve(32 + 1 + 10 + 3 + 3 + 5 + 5 + 3 + 10 + s.payload.len());
    out.extend_from_slice(&s.object.0);
    put_varint(out, s.kind as u64);
    put_varint(out, s.object_len);
    put_varint(out, u64::from(s.fec.data_shards));
    put_varint(out, u64::from(s.fec.parity_shards));
    put_varint(out, u64::from(s.fec.shard_size));
    put_varint(out, u64::from(s.block));
    put_varint(out, u64::from(s.index));
    put_varint(out, s.payload.len() as u64);
    out.extend_from_slice(s.payload);
}

/// LEB128, as postcard writes every unsigned integer wider than a byte.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a whole body; trailing bytes are refused.
pub(super) fn decode(body: &[u8]) -> Result<ShardFrame<'_>, FrameError> {
    let mut r = Reader { rest: body };
    let object = ObjectId(r.array()?);
    let kind = match r.varint(32)? {
        0 => ObjectKind::Blob,
        1 => ObjectKind::Image,
        v => return Err(bad(format!("object kind {v}"))),
    };
    let object_len = r.varint(64)?;
    let fec = FecParams {
        data_shards: r.varint(16)? as u16,
        parity_shards: r.varint(16)? as u16,
        shard_size: r.varint(32)? as u32,
    };
    let block = r.varint(32)? as u32;
    let index = r.varint(16)? as u16;
    let len = r.varint(64)?;
    let payload = r.take(len)?;
    if !r.rest.is_empty() {
        return Err(bad(format!("{} trailing bytes", r.rest.len())));
    }
    Ok(ShardFrame {
        object,
        kind,
        object_len,
        fec,
        block,
        index,
        payload,
    })
}

fn bad(what: String) -> FrameError {
    FrameError::Body(what)
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], FrameError> {
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.rest.len())
            .ok_or_else(|| bad("ends early".into()))?;
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array(&mut self) -> Result<[u8; 32], FrameError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }

    /// An unsigned integer of `bits` bits in LEB128: at most ⌈bits/7⌉
    /// bytes, and the last may not carry bits beyond the type (postcard's
    /// rule; a longer or overflowing encoding is refused).
    fn varint(&mut self, bits: u32) -> Result<u64, FrameError> {
        let max = bits.div_ceil(7) as usize;
        let last_max = (1u16 << (bits % 7)) - 1;
        let mut out = 0u64;
        for i in 0..max {
            let Some((&byte, tail)) = self.rest.split_first() else {
                return Err(bad("ends early".into()));
            };
            self.rest = tail;
            out |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if i == max - 1 && u16::from(byte) > last_max {
                    break;
                }
                return Ok(out);
            }
        }
        Err(bad(format!("integer of more than {bits} bits")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(payload: &[u8], seed: u64) -> ShardFrame<'_> {
        ShardFrame {
            object: ObjectId([(seed % 251) as u8; 32]),
            kind: if seed.is_multiple_of(2) {
                ObjectKind::Blob
            } else {
                ObjectKind::Image
            },
            object_len: seed.rotate_left(17),
            fec: FecParams {
                data_shards: (seed >> 3) as u16,
                parity_shards: (seed >> 9) as u16,
                shard_size: (seed >> 5) as u32,
            },
            block: (seed >> 7) as u32,
            index: (seed >> 11) as u16,
            payload,
        }
    }

    fn postcard_decode(body: &[u8]) -> Option<ShardFrame<'_>> {
        match postcard::take_from_bytes::<ShardFrame<'_>>(body) {
            Ok((s, [])) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn a_default_sized_shard_is_encoded_as_postcard_encodes_it() {
        let payload = vec![0xa5; 1347];
        let s = ShardFrame {
            object: ObjectId([7; 32]),
            kind: ObjectKind::Blob,
            object_len: 268_437_504,
            fec: FecParams::new(128, 20, 1347).unwrap(),
            block: 1556,
            index: 147,
            payload: &payload,
        };
        let mut ours = Vec::new();
        encode(&s, &mut ours);
        assert_eq!(ours, postcard::to_allocvec(&s).unwrap());
        assert_eq!(decode(&ours).unwrap(), s);
    }

    proptest! {
        #[test]
        fn every_shard_body_is_postcards_bytes_and_reads_back(
            seed in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let s = frame(&payload, seed);
            let mut ours = vec![0xee];
            encode(&s, &mut ours);
            prop_assert_eq!(&ours[1..], &postcard::to_allocvec(&s).unwrap()[..]);
            prop_assert_eq!(decode(&ours[1..]).unwrap(), s);
        }

        /// Arbitrary bytes, and valid bodies with bytes changed, cut or
        /// added: accepted exactly when postcard accepts them, as the same
        /// frame.
        #[test]
        fn any_bytes_are_accepted_exactly_when_postcard_accepts_them(
            seed in any::<u64>(),
            payload in proptest::collection::vec(any::<u8>(), 0..40),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            tail in proptest::collection::vec(any::<u8>(), 0..3),
            noise in proptest::collection::vec(any::<u8>(), 0..80),
            use_noise in any::<bool>(),
        ) {
            let mut body = if use_noise {
                noise
            } else {
                let mut b = Vec::new();
                encode(&frame(&payload, seed), &mut b);
                for (at, byte) in &edits {
                    let i = at.index(b.len());
                    b[i] = *byte;
                }
                b
            };
            if !body.is_empty() && cut.index(4) == 0 {
                body.truncate(cut.index(body.len()));
            }
            body.extend_from_slice(&tail);
            prop_assert_eq!(decode(&body).ok(), postcard_decode(&body));
        }
    }

    /// Each integer width against postcard's own reading of it: every
    /// length up to one byte past the longest, continuation bytes full or
    /// empty, every value of the last byte.
    #[test]
    fn integers_read_as_postcard_reads_them() {
        fn ours(bytes: &[u8], bits: u32) -> Option<u64> {
            let mut r = Reader { rest: bytes };
            r.varint(bits).ok().filter(|_| r.rest.is_empty())
        }
        fn theirs<T: serde::de::DeserializeOwned + Into<u64>>(bytes: &[u8]) -> Option<u64> {
            postcard::from_bytes::<T>(bytes).ok().map(Into::into)
        }
        let mut checked = 0;
        for len in 1..=11usize {
            for fill in [0x80u8, 0xff] {
                for last in 0..=255u8 {
                    let mut b = vec![fill; len - 1];
                    b.push(last);
                    assert_eq!(ours(&b, 16), theirs::<u16>(&b), "u16 {b:02x?}");
                    assert_eq!(ours(&b, 32), theirs::<u32>(&b), "u32 {b:02x?}");
                    assert_eq!(ours(&b, 64), theirs::<u64>(&b), "u64 {b:02x?}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 11 * 2 * 256);
    }

    #[test]
    fn overlong_and_overflowing_integers_are_refused_as_postcard_refuses_them() {
        let payload = [1u8; 3];
        let mut good = Vec::new();
        encode(&frame(&payload, 5), &mut good);
        // The kind (a u32 varint) right after the id: 5 bytes at most, the
        // fifth at most 0x0f.
        for kind in [
            &[0x80, 0x80, 0x80, 0x80, 0x00][..],
            &[0x81, 0x80, 0x80, 0x80, 0x10][..],
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x00][..],
            &[0x80, 0x00][..],
        ] {
            let mut b = good[..32].to_vec();
            b.extend_from_slice(kind);
            b.extend_from_slice(&good[33..]);
            assert_eq!(decode(&b).ok(), postcard_decode(&b), "{kind:02x?}");
        }
    }
}
