//! Reed-Solomon parity as GF(2^8) matrix products, with GFNI on AVX-512
//! or split nibble tables on AVX2.
//!
//! Multiplying bytes by a constant `c` of GF(2^8) is linear over GF(2): an
//! 8×8 bit matrix. GFNI's affine instruction applies such a matrix to 64
//! bytes at once, whatever polynomial the field was built with, so one
//! instruction and one XOR fold 64 bytes of a data shard into a parity
//! shard. Without GFNI, the same linearity splits a byte into its two
//! nibbles, whose sixteen products each fit one `vpshufb` table: two
//! lookups and two XORs fold 32 bytes. Either way a block's parity is a few
//! hundred cycles per column, where one table lookup per byte takes
//! several times that.
//!
//! [`ParityRows::new`] returns `None` on a CPU with neither; the caller
//! keeps its portable codec for those. The coefficients come from the
//! caller, so the parity is byte for byte what its codec makes.

// The kernels are SIMD intrinsics behind a runtime CPU check; the modules
// that hold them say what each unsafe block relies on.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512;

/// Multiplies in GF(2^8) with the reduction polynomial `poly` (its low
/// eight bits; x^8 is implied).
pub fn mul(poly: u8, mut a: u8, mut b: u8) -> u8 {
    let mut r = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            r ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= poly;
        }
        b >>= 1;
    }
    r
}

/// The bit matrix of "multiply by `c`" in GFNI's layout: byte `7 - i` of
/// the word holds the input bits that make output bit `i`.
pub fn affine_matrix(poly: u8, c: u8) -> u64 {
    let mut word = 0u64;
    for i in 0..8 {
        let mut row = 0u8;
        for k in 0..8 {
            if (mul(poly, c, 1 << k) >> i) & 1 != 0 {
                row |= 1 << k;
            }
        }
        word |= u64::from(row) << (8 * (7 - i));
    }
    word
}

/// What GFNI's affine instruction computes for one byte (no constant term):
/// the reference the matrices are checked against on any CPU.
pub fn affine_byte(matrix: u64, x: u8) -> u8 {
    let mut out = 0u8;
    for i in 0..8 {
        let row = (matrix >> (8 * (7 - i))) as u8;
        out |= (((row & x).count_ones() & 1) as u8) << i;
    }
    out
}

/// Which kernel applies the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// GFNI's affine instruction on AVX-512 registers, 64 bytes at a time.
    Gfni,
    /// Nibble tables looked up with `vpshufb` on AVX2, 32 bytes at a time.
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs, if any.
    pub fn detect() -> Option<Kernel> {
        [Kernel::Gfni, Kernel::Avx2]
            .into_iter()
            .find(|k| k.runs_here())
    }

    /// Whether this CPU runs the kernel.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Kernel::Gfni => {
                    std::arch::is_x86_feature_detected!("gfni")
                        && std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                }
                Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }
}

/// Parity rows ready to be applied: `m` rows of `k` coefficients.
pub struct ParityRows {
    k: usize,
    m: usize,
    passes: Passes,
}

/// Rows in passes of as many as the kernel keeps in registers: each pass is
/// (first row, rows, what multiplies by each coefficient, by data shard
/// then row).
enum Passes {
    Gfni(Vec<(usize, usize, Vec<u64>)>),
    Avx2(Vec<(usize, usize, Vec<[u8; 32]>)>),
}

/// Parity rows one GFNI pass keeps in registers (AVX-512 has 32).
const PASS_ROWS: usize = 20;

/// The products of `c` with every low nibble, then with every high one.
fn nibble_tables(poly: u8, c: u8) -> [u8; 32] {
    std::array::from_fn(|i| {
        if i < 16 {
            mul(poly, c, i as u8)
        } else {
            mul(poly, c, ((i - 16) as u8) << 4)
        }
    })
}

/// Splits `m` rows into passes of at most `widest`, each entry built by
/// `make` from a coefficient.
fn passes<T>(
    k: usize,
    m: usize,
    coefficients: &[u8],
    widest: usize,
    make: impl Fn(u8) -> T,
) -> Vec<(usize, usize, Vec<T>)> {
    let mut passes = Vec::new();
    let mut first = 0;
    while first < m {
        let rows = pass_rows(m - first, widest);
        let mut entries = Vec::with_capacity(k * rows);
        for i in 0..k {
            for j in first..first + rows {
                entries.push(make(coefficients[j * k + i]));
            }
        }
        passes.push((first, rows, entries));
        first += rows;
    }
    passes
}

impl ParityRows {
    /// `coefficients[j * k + i]` multiplies data shard `i` into parity shard
    /// `j`, in GF(2^8) with polynomial `poly`. `None` when this CPU runs no
    /// kernel or the shapes are empty.
    pub fn new(poly: u8, k: usize, m: usize, coefficients: &[u8]) -> Option<ParityRows> {
        Self::with_kernel(Kernel::detect()?, poly, k, m, coefficients)
    }

    /// The same with a chosen kernel; `None` also when this CPU cannot run
    /// it.
    pub fn with_kernel(
        kernel: Kernel,
        poly: u8,
        k: usize,
        m: usize,
        coefficients: &[u8],
    ) -> Option<ParityRows> {
        if k == 0 || m == 0 || coefficients.len() != k * m || !kernel.runs_here() {
            return None;
        }
        let passes = match kernel {
            Kernel::Gfni => Passes::Gfni(passes(k, m, coefficients, PASS_ROWS, |c| {
                affine_matrix(poly, c)
            })),
            Kernel::Avx2 => Passes::Avx2(passes(k, m, coefficients, AVX2_PASS_ROWS, |c| {
                nibble_tables(poly, c)
            })),
        };
        Some(ParityRows { k, m, passes })
    }

    /// The kernel that applies the rows.
    pub fn kernel(&self) -> Kernel {
        match self.passes {
            Passes::Gfni(_) => Kernel::Gfni,
            Passes::Avx2(_) => Kernel::Avx2,
        }
    }

    /// Writes every parity shard from the data shards: `data` holds `k`
    /// shards and `parity` `m`, all of the same length.
    ///
    /// # Panics
    /// When the counts or lengths differ from that.
    pub fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) {
        assert_eq!(data.len(), self.k, "data shard count");
        assert_eq!(parity.len(), self.m, "parity shard count");
        let len = data[0].len();
        assert!(
            data.iter().all(|d| d.len() == len) && parity.iter().all(|p| p.len() == len),
            "shards of unequal length"
        );
        match &self.passes {
            Passes::Gfni(passes) => {
                for (first, rows, mats) in passes {
                    let out = &mut parity[*first..*first + *rows];
                    #[cfg(target_arch = "x86_64")]
                    avx512::pass(mats, data, out, len);
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!(
                        "ParityRows is only built where its kernel runs: {mats:?} {out:?}"
                    );
                }
            }
            Passes::Avx2(passes) => {
                for (first, rows, tables) in passes {
                    let out = &mut parity[*first..*first + *rows];
                    #[cfg(target_arch = "x86_64")]
                    avx2::pass(tables, data, out, len);
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!(
                        "ParityRows is only built where its kernel runs: {tables:?} {out:?}"
                    );
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
const AVX2_PASS_ROWS: usize = avx2::PASS_ROWS;
#[cfg(not(target_arch = "x86_64"))]
const AVX2_PASS_ROWS: usize = 1;

/// Rows of the next pass: the widest kernel that fits what is left.
fn pass_rows(left: usize, widest: usize) -> usize {
    [widest, 16, 8, 4, 2, 1]
        .into_iter()
        .find(|&r| r <= left && r <= widest)
        .unwrap_or(1)
}

/// Whether this CPU runs a parity kernel.
pub fn supported() -> bool {
    Kernel::detect().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use reed_solomon_erasure::galois_8::ReedSolomon;

    /// reed-solomon-erasure's field: x^8 + x^4 + x^3 + x^2 + 1.
    const POLY: u8 = 0x1d;

    #[test]
    fn multiplication_is_the_codec_fields() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(POLY, a, b), reed_solomon_erasure::galois_8::mul(a, b));
            }
        }
    }

    #[test]
    fn the_affine_matrix_multiplies_by_its_constant() {
        for c in 0..=255u8 {
            let m = affine_matrix(POLY, c);
            for x in 0..=255u8 {
                assert_eq!(affine_byte(m, x), mul(POLY, c, x), "c={c} x={x}");
            }
        }
    }

    /// The codec's encoding rows, read off by encoding unit vectors.
    fn coefficients(k: usize, m: usize) -> Vec<u8> {
        let rs = ReedSolomon::new(k, m).unwrap();
        let mut c = vec![0u8; k * m];
        for i in 0..k {
            let mut shards = vec![vec![0u8; 1]; k + m];
            shards[i][0] = 1;
            rs.encode(&mut shards).unwrap();
            for j in 0..m {
                c[j * k + i] = shards[k + j][0];
            }
        }
        c
    }

    /// Each kernel this CPU runs, against the codec; a CPU with GFNI runs
    /// the AVX2 one too, so both are checked there.
    #[test]
    fn parity_equals_the_codecs_for_every_kernel_pass_width_and_tail() {
        let kernels: Vec<Kernel> = [Kernel::Gfni, Kernel::Avx2]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has neither GFNI with AVX-512BW nor AVX2");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for kernel in kernels {
            for (k, m, len) in [
                (128, 20, 1408),
                (128, 20, 1400),
                (32, 8, 1400),
                (4, 4, 1),
                (3, 37, 130),
                (10, 1, 64),
                (200, 56, 63),
                (1, 3, 200),
                (5, 13, 33),
            ] {
                let coeffs = coefficients(k, m);
                let rows = ParityRows::with_kernel(kernel, POLY, k, m, &coeffs).unwrap();
                assert_eq!(rows.kernel(), kernel);
                let mut shards: Vec<Vec<u8>> = (0..k + m)
                    .map(|i| {
                        if i < k {
                            (0..len).map(|_| rng.gen()).collect()
                        } else {
                            vec![0xa5; len]
                        }
                    })
                    .collect();
                let mut expected = shards.clone();
                ReedSolomon::new(k, m)
                    .unwrap()
                    .encode(&mut expected)
                    .unwrap();
                let (data, parity) = shards.split_at_mut(k);
                let data: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
                let mut parity: Vec<&mut [u8]> = parity.iter_mut().map(|p| &mut p[..]).collect();
                rows.encode(&data, &mut parity);
                assert_eq!(shards, expected, "{kernel:?} k={k} m={m} len={len}");
            }
        }
    }

    #[test]
    fn the_nibble_tables_multiply_by_their_constant() {
        for c in 0..=255u8 {
            let t = nibble_tables(POLY, c);
            for x in 0..=255u8 {
                let y = t[usize::from(x & 15)] ^ t[16 + usize::from(x >> 4)];
                assert_eq!(y, mul(POLY, c, x), "c={c} x={x}");
            }
        }
    }

    #[test]
    fn nothing_to_build_for_empty_shapes() {
        assert!(ParityRows::new(POLY, 0, 4, &[]).is_none());
        assert!(ParityRows::new(POLY, 4, 0, &[]).is_none());
        assert!(ParityRows::new(POLY, 4, 4, &[1; 15]).is_none());
    }
}
