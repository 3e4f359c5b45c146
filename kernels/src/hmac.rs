//! HMAC-SHA256 (RFC 2104) of many messages under one key.
//!
//! One SHA-256 compression depends on the one before, so hashing a frame
//! is bound by that chain's latency even with the CPU's SHA instructions.
//! Frames come in batches, though, and frames do not depend on each
//! other: with AVX-512, sixteen messages are hashed side by side, one per
//! 32-bit lane, and a batch costs less than half of one frame after
//! another. Messages of unequal lengths share a batch: a lane whose
//! message is done keeps its state while the others go on.
//!
//! The key's inner and outer pads are compressed once, when the key is
//! made; each tag then costs the message's blocks and one outer block.

use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};

// The kernel is SIMD intrinsics behind a runtime CPU check; the module
// says what each unsafe block relies on.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512;

/// SHA-256's initial state.
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// Messages below which a batch goes one by one: sixteen lanes cost about
/// as much as six messages hashed in turn.
const SIMD_MIN_BATCH: usize = 8;

/// A key with its pads already compressed.
#[derive(Clone)]
pub struct HmacKey {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The states are as good as the key: never printed.
        f.write_str("HmacKey")
    }
}

impl HmacKey {
    /// A key from its secret bytes (any length; longer than a block is
    /// hashed first, as RFC 2104 says).
    pub fn new(secret: &[u8]) -> HmacKey {
        let mut block = [0u8; 64];
        if secret.len() > 64 {
            block[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            block[..secret.len()].copy_from_slice(secret);
        }
        let pad = |byte: u8| {
            let mut state = IV;
            let padded: [u8; 64] = std::array::from_fn(|i| block[i] ^ byte);
            compress(&mut state, &padded);
            state
        };
        HmacKey {
            inner: pad(0x36),
            outer: pad(0x5c),
        }
    }

    /// The tag of one message.
    pub fn tag(&self, message: &[u8]) -> [u8; 32] {
        let mut state = self.inner;
        let (full, tail) = split_blocks(message);
        for block in full.chunks_exact(64) {
            compress(&mut state, block);
        }
        let (tail, n) = final_blocks(tail, message.len());
        for block in tail[..n * 64].chunks_exact(64) {
            compress(&mut state, block);
        }
        let mut out = self.outer;
        compress(&mut out, &outer_block(&state));
        digest_bytes(&out)
    }

    /// The tags of many messages: `tags[i]` for `messages[i]`. The same as
    /// [`tag`](Self::tag) on each, sixteen at a time where the CPU can.
    ///
    /// # Panics
    /// When the two slices differ in length.
    pub fn tag_many(&self, messages: &[&[u8]], tags: &mut [[u8; 32]]) {
        assert_eq!(messages.len(), tags.len(), "one tag per message");
        let simd = supported();
        for (m, t) in messages.chunks(LANES).zip(tags.chunks_mut(LANES)) {
            if simd && m.len() >= SIMD_MIN_BATCH {
                #[cfg(target_arch = "x86_64")]
                avx512::tag_lanes(self, m, t);
            } else {
                for (m, t) in m.iter().zip(t.iter_mut()) {
                    *t = self.tag(m);
                }
            }
        }
    }
}

/// Messages hashed side by side: one per 32-bit lane of a 512-bit register.
pub const LANES: usize = 16;

/// Whether this CPU hashes sixteen messages at once.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One SHA-256 compression (the SHA instructions where the CPU has them).
fn compress(state: &mut [u32; 8], block: &[u8]) {
    sha2::compress256(state, &[*GenericArray::from_slice(block)]);
}

/// The message's whole blocks and what is left after them.
fn split_blocks(message: &[u8]) -> (&[u8], &[u8]) {
    message.split_at(message.len() / 64 * 64)
}

/// The last one or two blocks: the message's tail, the 0x80 byte, zeros,
/// and the bit length of everything hashed after the inner pad's block.
fn final_blocks(tail: &[u8], message_len: usize) -> ([u8; 128], usize) {
    let mut out = [0u8; 128];
    out[..tail.len()].copy_from_slice(tail);
    out[tail.len()] = 0x80;
    let n = if tail.len() < 56 { 1 } else { 2 };
    let bits = ((64 + message_len as u64) * 8).to_be_bytes();
    out[n * 64 - 8..n * 64].copy_from_slice(&bits);
    (out, n)
}

/// The outer hash's only block: the inner digest, padded (64 + 32 bytes).
fn outer_block(inner: &[u32; 8]) -> [u8; 64] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(&digest_bytes(inner));
    block[32] = 0x80;
    block[56..].copy_from_slice(&((64u64 + 32) * 8).to_be_bytes());
    block
}

fn digest_bytes(state: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use rand::{Rng, SeedableRng};

    fn reference(key: &[u8], message: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn one_tag_is_the_hmac_crates_for_every_length_and_key_size() {
        for key_len in [0, 1, 32, 64, 65, 200] {
            let key: Vec<u8> = (0..key_len).map(|i| i as u8 ^ 0x5a).collect();
            let k = HmacKey::new(&key);
            for len in (0..200).chain([1471, 1472, 1473, 4096]) {
                let msg: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                assert_eq!(
                    k.tag(&msg),
                    reference(&key, &msg),
                    "key {key_len} B, message {len} B"
                );
            }
        }
    }

    #[test]
    fn many_tags_are_each_ones_tag_whatever_the_mix_of_lengths() {
        if !supported() {
            eprintln!("note: this CPU has no AVX-512BW; only the one-by-one path ran");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let key = [9u8; 32];
        let k = HmacKey::new(&key);
        // Equal lengths (a batch of shard frames), lengths around the
        // padding's edges, ragged mixes, and batch sizes around the lanes.
        let mut cases: Vec<Vec<usize>> = vec![
            vec![1472; 16],
            vec![1472; 37],
            vec![55; 16],
            vec![56; 16],
            vec![63; 17],
            vec![64; 16],
            vec![0; 16],
            vec![1472; 7],
        ];
        for n in [8, 9, 15, 16, 31, 100] {
            cases.push((0..n).map(|_| rng.gen_range(0..1600)).collect());
        }
        cases.push(
            (0..16)
                .map(|i| if i % 5 == 0 { 90 } else { 1472 })
                .collect(),
        );
        for lens in cases {
            let msgs: Vec<Vec<u8>> = lens
                .iter()
                .map(|&n| (0..n).map(|_| rng.gen()).collect())
                .collect();
            let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
            let mut tags = vec![[0u8; 32]; msgs.len()];
            k.tag_many(&refs, &mut tags);
            for (i, m) in msgs.iter().enumerate() {
                assert_eq!(
                    tags[i],
                    reference(&key, m),
                    "message {i} of lengths {lens:?}"
                );
            }
        }
    }
}
