//! The kernel for CPUs with AVX2 but no GFNI: 32 bytes of every data shard
//! at a time, each multiplied by split tables (the products of its low and
//! its high nibble, looked up with `vpshufb`) and folded into up to
//! [`PASS_ROWS`] parity accumulators held in registers, so a data byte is
//! loaded once per pass and a parity byte stored once. A tail shorter
//! than 32 bytes goes through the same kernel on zero-padded copies.

use std::arch::x86_64::*;

/// Parity rows one pass keeps in registers: AVX2 has 16, and the data's
/// two nibbles, their mask and two lookups take five.
pub(crate) const PASS_ROWS: usize = 10;

/// Data shards folded in one sweep over the columns: their tables (10 KiB
/// for ten rows) stay in the first-level cache from column to column,
/// where a whole block's would not.
const GROUP_SHARDS: usize = 32;

/// Runs one pass of `out.len()` rows over shards of `len` bytes; `tables`
/// holds 32 bytes per data shard and row (by shard, then row): the
/// products of the sixteen low nibbles, then of the sixteen high ones.
pub(crate) fn pass(tables: &[[u8; 32]], data: &[&[u8]], out: &mut [&mut [u8]], len: usize) {
    assert!(
        std::arch::is_x86_feature_detected!("avx2"),
        "the AVX2 kernel is only chosen where the CPU has AVX2"
    );
    assert_eq!(tables.len(), data.len() * out.len());
    assert!(data.iter().all(|d| d.len() >= len) && out.iter().all(|o| o.len() >= len));
    let whole = len - len % 32;
    sweep(tables, data, out, whole);
    if whole == len {
        return;
    }
    // The tail, zero-padded to one column: the same kernel, on copies.
    let tail = len - whole;
    let padded: Vec<[u8; 32]> = data
        .iter()
        .map(|d| {
            let mut c = [0u8; 32];
            c[..tail].copy_from_slice(&d[whole..len]);
            c
        })
        .collect();
    let padded: Vec<&[u8]> = padded.iter().map(|c| &c[..]).collect();
    let mut sums = vec![[0u8; 32]; out.len()];
    let mut sums_out: Vec<&mut [u8]> = sums.iter_mut().map(|c| &mut c[..]).collect();
    sweep(tables, &padded, &mut sums_out, 32);
    for (o, c) in out.iter_mut().zip(&sums) {
        o[whole..len].copy_from_slice(&c[..tail]);
    }
}

/// The kernel over columns `..whole` (a multiple of 32) of every shard,
/// [`GROUP_SHARDS`] data shards at a time.
fn sweep(tables: &[[u8; 32]], data: &[&[u8]], out: &mut [&mut [u8]], whole: usize) {
    assert!(whole.is_multiple_of(32));
    assert!(data.iter().all(|d| d.len() >= whole) && out.iter().all(|o| o.len() >= whole));
    assert_eq!(tables.len(), data.len() * out.len());
    let p = out.len();
    for (g, (data, tables)) in data
        .chunks(GROUP_SHARDS)
        .zip(tables.chunks(GROUP_SHARDS * p))
        .enumerate()
    {
        let fold = g > 0;
        // SAFETY: the CPU has AVX2 (`pass`, the only caller, checked it),
        // and every shard holds at least `whole` bytes, a multiple of 32
        // (checked above).
        unsafe {
            match p {
                10 => rows::<10>(tables, data, out, whole, fold),
                8 => rows::<8>(tables, data, out, whole, fold),
                4 => rows::<4>(tables, data, out, whole, fold),
                2 => rows::<2>(tables, data, out, whole, fold),
                1 => rows::<1>(tables, data, out, whole, fold),
                n => unreachable!("no kernel for a pass of {n} rows"),
            }
        }
    }
}

/// # Safety
/// The CPU must have AVX2; every shard of `data` and `out` must hold at
/// least `whole` bytes, a multiple of 32; `out` holds `P` shards and
/// `tables` `data.len() * P` entries. With `fold`, the products are added
/// to what `out` holds; otherwise they replace it.
#[target_feature(enable = "avx2")]
unsafe fn rows<const P: usize>(
    tables: &[[u8; 32]],
    data: &[&[u8]],
    out: &mut [&mut [u8]],
    whole: usize,
    fold: bool,
) {
    let nibble = _mm256_set1_epi8(0x0f);
    let mut off = 0;
    while off < whole {
        let mut acc = [_mm256_setzero_si256(); P];
        if fold {
            for (a, o) in acc.iter_mut().zip(out.iter()) {
                // SAFETY: off + 32 <= whole <= o.len().
                *a = unsafe { _mm256_loadu_si256(o.as_ptr().add(off).cast()) };
            }
        }
        for (d, t) in data.iter().zip(tables.chunks_exact(P)) {
            // SAFETY: off + 32 <= whole <= d.len().
            let x = unsafe { _mm256_loadu_si256(d.as_ptr().add(off).cast()) };
            let lo = _mm256_and_si256(x, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), nibble);
            for (a, t) in acc.iter_mut().zip(t) {
                // SAFETY: each entry is 32 readable bytes; the two halves
                // are each broadcast to both lanes, as vpshufb looks up
                // within a lane.
                let (tl, th) = unsafe {
                    (
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr().cast())),
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr().add(16).cast())),
                    )
                };
                let y = _mm256_xor_si256(_mm256_shuffle_epi8(tl, lo), _mm256_shuffle_epi8(th, hi));
                *a = _mm256_xor_si256(*a, y);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: off + 32 <= whole <= o.len().
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().add(off).cast(), a) };
        }
        off += 32;
    }
}
