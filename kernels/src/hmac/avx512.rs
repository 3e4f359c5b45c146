//! Sixteen SHA-256 computations side by side: state word `i` of message
//! `L` sits in lane `L` of register `i`. Each message's block is loaded as
//! a row and the sixteen rows transposed into message-schedule words.

use super::{final_blocks, split_blocks, HmacKey, K, LANES};
use std::arch::x86_64::*;

/// Reverses the bytes of each 32-bit word (SHA-256 reads big-endian).
static BSWAP: [u8; 64] = {
    let mut m = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        m[i] = (i - i % 4 + 3 - i % 4) as u8;
        i += 1;
    }
    m
};

/// A block for lanes with nothing left to hash: loaded, never kept.
static IDLE: [u8; 64] = [0; 64];

/// Tags of up to sixteen messages.
pub(super) fn tag_lanes(key: &HmacKey, messages: &[&[u8]], tags: &mut [[u8; 32]]) {
    assert!(
        super::supported(),
        "the batch path runs only where the CPU has AVX-512BW"
    );
    assert!(messages.len() <= LANES && messages.len() == tags.len());
    // SAFETY: the CPU has AVX-512F and AVX-512BW (checked above).
    unsafe { tag_lanes_avx512(key, messages, tags) }
}

/// # Safety
/// The CPU must have AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tag_lanes_avx512(key: &HmacKey, messages: &[&[u8]], tags: &mut [[u8; 32]]) {
    let mut whole = [0usize; LANES];
    let mut total = [0usize; LANES];
    let mut tails = [[0u8; 128]; LANES];
    let mut longest = 0;
    for (l, m) in messages.iter().enumerate() {
        let (full, tail) = split_blocks(m);
        let (t, n) = final_blocks(tail, m.len());
        tails[l] = t;
        whole[l] = full.len() / 64;
        total[l] = whole[l] + n;
        longest = longest.max(total[l]);
    }
    let mut state: [__m512i; 8] = std::array::from_fn(|i| _mm512_set1_epi32(key.inner[i] as i32));
    // SAFETY: a static of 64 bytes.
    let bswap = unsafe { _mm512_loadu_si512(BSWAP.as_ptr().cast()) };
    for b in 0..longest {
        let mut active: __mmask16 = 0;
        let rows: [__m512i; 16] = std::array::from_fn(|l| {
            let block: &[u8] = if l >= messages.len() || b >= total[l] {
                &IDLE
            } else {
                active |= 1 << l;
                if b < whole[l] {
                    &messages[l][b * 64..b * 64 + 64]
                } else {
                    &tails[l][(b - whole[l]) * 64..(b - whole[l]) * 64 + 64]
                }
            };
            // SAFETY: `block` is 64 bytes long.
            unsafe { _mm512_loadu_si512(block.as_ptr().cast()) }
        });
        let mut w = transpose(rows);
        for x in w.iter_mut() {
            *x = _mm512_shuffle_epi8(*x, bswap);
        }
        compress(&mut state, &mut w, active);
    }
    // The outer block: the inner digest's words as they are, then padding
    // for 96 bytes hashed in all.
    let mut w: [__m512i; 16] = std::array::from_fn(|i| match i {
        0..=7 => state[i],
        8 => _mm512_set1_epi32(0x8000_0000u32 as i32),
        15 => _mm512_set1_epi32((64 + 32) * 8),
        _ => _mm512_setzero_si512(),
    });
    let mut outer: [__m512i; 8] = std::array::from_fn(|i| _mm512_set1_epi32(key.outer[i] as i32));
    compress(&mut outer, &mut w, 0xffff);
    let mut words = [[0u32; LANES]; 8];
    for (row, v) in words.iter_mut().zip(outer) {
        // SAFETY: `row` is 64 bytes.
        unsafe { _mm512_storeu_si512(row.as_mut_ptr().cast(), v) };
    }
    for (l, tag) in tags.iter_mut().enumerate() {
        for (i, o) in tag.chunks_exact_mut(4).enumerate() {
            o.copy_from_slice(&words[i][l].to_be_bytes());
        }
    }
}

/// Rows (one message's 16 words each) into columns (word `t` of every
/// message): 32-bit, then 64-bit interleaves inside 128-bit lanes, then
/// 128-bit lanes gathered across registers.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // v[4g + w]: word w (+4j in 128-bit lane j) of rows 4g..4g+3.
    let v: [__m512i; 16] = std::array::from_fn(|i| {
        let g = i / 4 * 4;
        match i % 4 {
            0 => _mm512_unpacklo_epi64(t[g], t[g + 2]),
            1 => _mm512_unpackhi_epi64(t[g], t[g + 2]),
            2 => _mm512_unpacklo_epi64(t[g + 1], t[g + 3]),
            _ => _mm512_unpackhi_epi64(t[g + 1], t[g + 3]),
        }
    });
    let mut out = [_mm512_setzero_si512(); 16];
    for w in 0..4 {
        let lo01 = _mm512_shuffle_i32x4::<0x44>(v[w], v[4 + w]);
        let hi01 = _mm512_shuffle_i32x4::<0xee>(v[w], v[4 + w]);
        let lo23 = _mm512_shuffle_i32x4::<0x44>(v[8 + w], v[12 + w]);
        let hi23 = _mm512_shuffle_i32x4::<0xee>(v[8 + w], v[12 + w]);
        out[w] = _mm512_shuffle_i32x4::<0x88>(lo01, lo23);
        out[w + 4] = _mm512_shuffle_i32x4::<0xdd>(lo01, lo23);
        out[w + 8] = _mm512_shuffle_i32x4::<0x88>(hi01, hi23);
        out[w + 12] = _mm512_shuffle_i32x4::<0xdd>(hi01, hi23);
    }
    out
}

/// One compression of sixteen states by sixteen blocks; lanes outside
/// `active` keep their state.
#[inline]
#[target_feature(enable = "avx512f")]
fn compress(state: &mut [__m512i; 8], w: &mut [__m512i; 16], active: __mmask16) {
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    for (t, k) in K.iter().enumerate() {
        if t >= 16 {
            let w15 = w[(t + 1) & 15];
            let w2 = w[(t + 14) & 15];
            let s0 = _mm512_ternarylogic_epi32::<0x96>(
                _mm512_ror_epi32::<7>(w15),
                _mm512_ror_epi32::<18>(w15),
                _mm512_srli_epi32::<3>(w15),
            );
            let s1 = _mm512_ternarylogic_epi32::<0x96>(
                _mm512_ror_epi32::<17>(w2),
                _mm512_ror_epi32::<19>(w2),
                _mm512_srli_epi32::<10>(w2),
            );
            w[t & 15] = _mm512_add_epi32(
                _mm512_add_epi32(w[t & 15], s0),
                _mm512_add_epi32(s1, w[(t + 9) & 15]),
            );
        }
        let s1 = _mm512_ternarylogic_epi32::<0x96>(
            _mm512_ror_epi32::<6>(e),
            _mm512_ror_epi32::<11>(e),
            _mm512_ror_epi32::<25>(e),
        );
        let ch = _mm512_ternarylogic_epi32::<0xca>(e, f, g);
        let t1 = _mm512_add_epi32(
            _mm512_add_epi32(h, s1),
            _mm512_add_epi32(
                ch,
                _mm512_add_epi32(_mm512_set1_epi32(*k as i32), w[t & 15]),
            ),
        );
        let s0 = _mm512_ternarylogic_epi32::<0x96>(
            _mm512_ror_epi32::<2>(a),
            _mm512_ror_epi32::<13>(a),
            _mm512_ror_epi32::<22>(a),
        );
        let maj = _mm512_ternarylogic_epi32::<0xe8>(a, b, c);
        let t2 = _mm512_add_epi32(s0, maj);
        h = g;
        g = f;
        f = e;
        e = _mm512_add_epi32(d, t1);
        d = c;
        c = b;
        b = a;
        a = _mm512_add_epi32(t1, t2);
    }
    for (s, x) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
        *s = _mm512_mask_add_epi32(*s, active, *s, x);
    }
}
