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
//!
//! Without AVX-512, two messages are hashed at once with the SHA
//! instructions, whose chain of rounds leaves room for a second one.

use sha2::digest::generic_array::GenericArray;
use sha2::{Digest, Sha256};

// The kernel is SIMD intrinsics behind a runtime CPU check; the module
// says what each unsafe block relies on.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod shani;

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

/// SHA-256's round constants.
#[cfg(target_arch = "x86_64")]
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
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
    /// [`tag`](Self::tag) on each, sixteen at a time where the CPU has
    /// AVX-512, else two at a time where it has the SHA instructions.
    ///
    /// # Panics
    /// When the two slices differ in length.
    pub fn tag_many(&self, messages: &[&[u8]], tags: &mut [[u8; 32]]) {
        assert_eq!(messages.len(), tags.len(), "one tag per message");
        let simd = supported();
        #[cfg(target_arch = "x86_64")]
        if !simd && shani::supported() {
            // Without sixteen lanes, two at a time with the SHA instructions.
            for (m, t) in messages.chunks_exact(2).zip(tags.chunks_exact_mut(2)) {
                let [a, b] = shani::tag_pair(self, m[0], m[1]);
                t[0] = a;
                t[1] = b;
            }
            if messages.len() % 2 == 1 {
                tags[messages.len() - 1] = self.tag(messages[messages.len() - 1]);
            }
            return;
        }
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

    /// The two-at-a-time path, also on a CPU whose batches take the
    /// sixteen lanes: equal lengths, lengths that end in different block
    /// counts, and an empty message beside a long one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pairs_hashed_side_by_side_are_each_ones_tag() {
        if !shani::supported() {
            eprintln!("skipped: this CPU has no SHA instructions");
            return;
        }
        let key = [7u8; 32];
        let k = HmacKey::new(&key);
        for (la, lb) in [
            (1472, 1472),
            (0, 1472),
            (1472, 0),
            (55, 56),
            (63, 64),
            (1472, 90),
            (119, 120),
            (4096, 1),
        ] {
            let a: Vec<u8> = (0..la).map(|i| (i * 3 + 1) as u8).collect();
            let b: Vec<u8> = (0..lb).map(|i| (i * 5 + 2) as u8).collect();
            assert_eq!(
                shani::tag_pair(&k, &a, &b),
                [reference(&key, &a), reference(&key, &b)],
                "lengths {la} and {lb}"
            );
        }
    }

    #[test]
    fn many_tags_are_each_ones_tag_whatever_the_mix_of_lengths() {
        if !supported() {
            eprintln!("note: this CPU has no AVX-512BW; the sixteen-lane path did not run");
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
