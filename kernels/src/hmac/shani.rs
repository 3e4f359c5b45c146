//! Two SHA-256 computations interleaved with the SHA instructions. One
//! compression is a chain of `sha256rnds2`, each waiting on the one before;
//! on CPUs where that instruction's latency is twice its throughput (AMD's
//! Zen 2, for one) a second, independent chain fills the gaps.

use super::{final_blocks, outer_block, split_blocks, HmacKey, K};
use std::arch::x86_64::*;

/// Whether this CPU has the SHA instructions (and the SSE they use).
pub(super) fn supported() -> bool {
    std::arch::is_x86_feature_detected!("sha")
        && std::arch::is_x86_feature_detected!("sse4.1")
        && std::arch::is_x86_feature_detected!("ssse3")
}

/// Tags of two messages, hashed side by side while both have blocks left.
pub(super) fn tag_pair(key: &HmacKey, a: &[u8], b: &[u8]) -> [[u8; 32]; 2] {
    assert!(
        supported(),
        "the pair path runs only where the CPU has the SHA instructions"
    );
    let (full_a, tail_a) = split_blocks(a);
    let (full_b, tail_b) = split_blocks(b);
    let (last_a, n_a) = final_blocks(tail_a, a.len());
    let (last_b, n_b) = final_blocks(tail_b, b.len());
    let count = [full_a.len() / 64 + n_a, full_b.len() / 64 + n_b];
    // Block `j` of a message: its whole blocks, then the padded tail.
    fn block<'m>(full: &'m [u8], last: &'m [u8; 128], j: usize) -> &'m [u8] {
        let whole = full.len() / 64;
        if j < whole {
            &full[j * 64..j * 64 + 64]
        } else {
            &last[(j - whole) * 64..(j - whole) * 64 + 64]
        }
    }
    let both = count[0].min(count[1]);
    let mut states = [key.inner, key.inner];
    // SAFETY: the CPU has SHA, SSSE3 and SSE4.1 (checked above); every
    // block handed over is 64 bytes.
    unsafe {
        compress_pairs(&mut states, both, |j| {
            [block(full_a, &last_a, j), block(full_b, &last_b, j)]
        })
    };
    for j in both..count[0] {
        super::compress(&mut states[0], block(full_a, &last_a, j));
    }
    for j in both..count[1] {
        super::compress(&mut states[1], block(full_b, &last_b, j));
    }
    let outer = [outer_block(&states[0]), outer_block(&states[1])];
    let mut out = [key.outer, key.outer];
    // SAFETY: as above.
    unsafe { compress_pairs(&mut out, 1, |_| [&outer[0][..], &outer[1][..]]) };
    [super::digest_bytes(&out[0]), super::digest_bytes(&out[1])]
}

/// Compresses `n` blocks into each of two states: pair `j` is `blocks(j)`.
///
/// # Safety
/// The CPU must have SHA, SSSE3 and SSE4.1; every block must be 64 bytes.
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
unsafe fn compress_pairs<'m>(
    states: &mut [[u32; 8]; 2],
    n: usize,
    blocks: impl Fn(usize) -> [&'m [u8]; 2],
) {
    let bswap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
    // The SHA instructions keep the state as (a, b, e, f) and (c, d, g, h).
    let load = |s: &[u32; 8]| {
        // SAFETY: `s` is 32 readable bytes.
        let (dcba, hgfe) = unsafe {
            (
                _mm_loadu_si128(s.as_ptr().cast()),
                _mm_loadu_si128(s.as_ptr().add(4).cast()),
            )
        };
        let cdab = _mm_shuffle_epi32::<0xb1>(dcba);
        let efgh = _mm_shuffle_epi32::<0x1b>(hgfe);
        (
            _mm_alignr_epi8::<8>(cdab, efgh),
            _mm_blend_epi16::<0xf0>(efgh, cdab),
        )
    };
    let (mut abef0, mut cdgh0) = load(&states[0]);
    let (mut abef1, mut cdgh1) = load(&states[1]);
    for j in 0..n {
        let [b0, b1] = blocks(j);
        assert!(b0.len() == 64 && b1.len() == 64, "64-byte blocks");
        let (save_abef0, save_cdgh0, save_abef1, save_cdgh1) = (abef0, cdgh0, abef1, cdgh1);
        // SAFETY: each block is 64 readable bytes (asserted above).
        let word = |b: &[u8], i: usize| unsafe {
            _mm_shuffle_epi8(_mm_loadu_si128(b.as_ptr().add(16 * i).cast()), bswap)
        };
        let mut w0 = [word(b0, 0), word(b0, 1), word(b0, 2), word(b0, 3)];
        let mut w1 = [word(b1, 0), word(b1, 1), word(b1, 2), word(b1, 3)];
        for r in 0..16 {
            let i = r % 4;
            if r >= 4 {
                // The next four schedule words from the sixteen before.
                let next = |w: &[__m128i; 4]| {
                    let t = _mm_add_epi32(
                        _mm_sha256msg1_epu32(w[i], w[(i + 1) % 4]),
                        _mm_alignr_epi8::<4>(w[(i + 3) % 4], w[(i + 2) % 4]),
                    );
                    _mm_sha256msg2_epu32(t, w[(i + 3) % 4])
                };
                w0[i] = next(&w0);
                w1[i] = next(&w1);
            }
            // SAFETY: r * 4 + 4 <= 64 = K.len().
            let k = unsafe { _mm_loadu_si128(K.as_ptr().add(r * 4).cast()) };
            let t0 = _mm_add_epi32(w0[i], k);
            let t1 = _mm_add_epi32(w1[i], k);
            cdgh0 = _mm_sha256rnds2_epu32(cdgh0, abef0, t0);
            cdgh1 = _mm_sha256rnds2_epu32(cdgh1, abef1, t1);
            abef0 = _mm_sha256rnds2_epu32(abef0, cdgh0, _mm_shuffle_epi32::<0x0e>(t0));
            abef1 = _mm_sha256rnds2_epu32(abef1, cdgh1, _mm_shuffle_epi32::<0x0e>(t1));
        }
        abef0 = _mm_add_epi32(abef0, save_abef0);
        cdgh0 = _mm_add_epi32(cdgh0, save_cdgh0);
        abef1 = _mm_add_epi32(abef1, save_abef1);
        cdgh1 = _mm_add_epi32(cdgh1, save_cdgh1);
    }
    let store = |s: &mut [u32; 8], abef: __m128i, cdgh: __m128i| {
        let feba = _mm_shuffle_epi32::<0x1b>(abef);
        let dchg = _mm_shuffle_epi32::<0xb1>(cdgh);
        // SAFETY: `s` is 32 writable bytes.
        unsafe {
            _mm_storeu_si128(s.as_mut_ptr().cast(), _mm_blend_epi16::<0xf0>(feba, dchg));
            _mm_storeu_si128(
                s.as_mut_ptr().add(4).cast(),
                _mm_alignr_epi8::<8>(dchg, feba),
            );
        }
    };
    store(&mut states[0], abef0, cdgh0);
    store(&mut states[1], abef1, cdgh1);
}
