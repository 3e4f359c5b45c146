//! The kernel: 64 bytes of every data shard at a time, each folded into up
//! to [`super::PASS_ROWS`] parity accumulators held in registers, so a data
//! byte is loaded once per pass and a parity byte stored once.

use std::arch::x86_64::*;

/// Runs one pass of `out.len()` rows over shards of `len` bytes.
pub(crate) fn pass(mats: &[u64], data: &[&[u8]], out: &mut [&mut [u8]], len: usize) {
    assert!(
        super::Kernel::Gfni.runs_here(),
        "ParityRows is only built where its kernel runs"
    );
    assert_eq!(mats.len(), data.len() * out.len());
    assert!(data.iter().all(|d| d.len() >= len) && out.iter().all(|o| o.len() >= len));
    // SAFETY: the CPU has GFNI, AVX-512F and AVX-512BW (checked above), and
    // every shard holds at least `len` bytes (checked above), which is all
    // the kernel reads or writes.
    unsafe {
        match out.len() {
            20 => rows::<20>(mats, data, out, len),
            16 => rows::<16>(mats, data, out, len),
            8 => rows::<8>(mats, data, out, len),
            4 => rows::<4>(mats, data, out, len),
            2 => rows::<2>(mats, data, out, len),
            1 => rows::<1>(mats, data, out, len),
            n => unreachable!("no kernel for a pass of {n} rows"),
        }
    }
}

/// # Safety
/// The CPU must have GFNI, AVX-512F and AVX-512BW; every shard of `data`
/// and `out` must hold at least `len` bytes; `out` holds `P` shards and
/// `mats` `data.len() * P` matrices.
#[target_feature(enable = "avx512f,avx512bw,gfni")]
unsafe fn rows<const P: usize>(mats: &[u64], data: &[&[u8]], out: &mut [&mut [u8]], len: usize) {
    let mut off = 0;
    while off < len {
        let n = (len - off).min(64);
        // Loads and stores past the shard's end are masked off.
        let mask: __mmask64 = if n == 64 { !0 } else { (1u64 << n) - 1 };
        let mut acc = [_mm512_setzero_si512(); P];
        for (d, m) in data.iter().zip(mats.chunks_exact(P)) {
            // SAFETY: off + n <= len <= d.len(); masked lanes are not read.
            let x = unsafe { _mm512_maskz_loadu_epi8(mask, d.as_ptr().add(off).cast()) };
            for (a, &w) in acc.iter_mut().zip(m) {
                let y = _mm512_gf2p8affine_epi64_epi8::<0>(x, _mm512_set1_epi64(w as i64));
                *a = _mm512_xor_si512(*a, y);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: off + n <= len <= o.len(); masked lanes are not written.
            unsafe { _mm512_mask_storeu_epi8(o.as_mut_ptr().add(off).cast(), mask, a) };
        }
        off += 64;
    }
}
