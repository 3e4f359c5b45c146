//! Forward error correction: Reed-Solomon blocks and the interleaved send order.
//!
//! An object is cut into blocks of `k` data shards of `S` bytes; each block
//! gets `m` parity shards, and any `k` of the `k + m` rebuild it. The code is
//! systematic: data shards are the object's bytes as they are, so a block
//! that lost nothing needs no decoding. The last block is zero-padded; the
//! object length carried in every frame trims it again.

use reed_solomon_erasure::galois_8::ReedSolomon;
use serde::{Deserialize, Serialize};

/// GF(2^8) allows at most 256 shards in one block.
pub const MAX_SHARDS_PER_BLOCK: usize = 256;

/// Parity shards a block shorter than the configured k keeps at least (up to
/// the configured m): at the configured ratio a block of a few shards would
/// get one parity shard, and two lost frames would cost a whole pass.
pub const MIN_SHORT_BLOCK_PARITY: u16 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FecError {
    #[error("data_shards must be at least 1 (got {0})")]
    NoDataShards(u16),
    #[error("data_shards + parity_shards = {0}, at most {MAX_SHARDS_PER_BLOCK} are possible")]
    TooManyShards(usize),
    #[error("datagram_size {datagram} leaves no room for shard payload (frame overhead is {overhead} bytes)")]
    DatagramTooSmall { datagram: usize, overhead: usize },
    #[error("block data of {got} bytes exceeds the block size of {max}")]
    BlockTooLarge { got: usize, max: usize },
    #[error("a whole block is {expected} bytes, got {got}")]
    BlockNotWhole { got: usize, expected: usize },
    #[error("{present} shards present, {needed} needed to rebuild the block")]
    TooFewShards { present: usize, needed: usize },
    #[error("shard of {got} bytes, expected {expected}")]
    ShardSize { got: usize, expected: usize },
    #[error("reed-solomon: {0}")]
    Codec(String),
}

/// The FEC layout of one object; carried in every header and shard frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FecParams {
    /// k: data shards per block.
    pub data_shards: u16,
    /// m: parity shards per block.
    pub parity_shards: u16,
    /// S: bytes per shard.
    pub shard_size: u32,
}

impl FecParams {
    /// Checks the shard counts; `shard_size` must be at least 1.
    pub fn new(data_shards: u16, parity_shards: u16, shard_size: u32) -> Result<Self, FecError> {
        if data_shards == 0 {
            return Err(FecError::NoDataShards(data_shards));
        }
        let total = data_shards as usize + parity_shards as usize;
        if total > MAX_SHARDS_PER_BLOCK {
            return Err(FecError::TooManyShards(total));
        }
        if shard_size == 0 {
            return Err(FecError::DatagramTooSmall {
                datagram: 0,
                overhead: 0,
            });
        }
        Ok(FecParams {
            data_shards,
            parity_shards,
            shard_size,
        })
    }

    /// The largest shard size whose frame still fits in `datagram_size`.
    pub fn for_datagram(
        datagram_size: usize,
        data_shards: u16,
        parity_shards: u16,
    ) -> Result<Self, FecError> {
        let overhead = crate::frame::SHARD_FRAME_OVERHEAD;
        if datagram_size <= overhead {
            return Err(FecError::DatagramTooSmall {
                datagram: datagram_size,
                overhead,
            });
        }
        // Shard payload lengths are bounded so the length prefix stays small.
        let s = (datagram_size - overhead).min(crate::frame::MAX_SHARD_SIZE);
        Self::new(data_shards, parity_shards, s as u32)
    }

    pub fn total_shards(&self) -> u16 {
        self.data_shards + self.parity_shards
    }

    /// Object bytes carried by one block: k × S.
    pub fn block_bytes(&self) -> u64 {
        self.data_shards as u64 * self.shard_size as u64
    }

    /// Blocks an object of `object_len` bytes needs; an empty object still
    /// has one (all-padding) block so it can cross and be seen complete.
    pub fn blocks_for(&self, object_len: u64) -> u32 {
        self.checked_blocks_for(object_len).unwrap_or(u32::MAX)
    }

    /// [`blocks_for`](Self::blocks_for), or None when the count does not fit
    /// the 32-bit block numbers of a shard frame (a length no sender makes,
    /// but one a frame can claim).
    pub fn checked_blocks_for(&self, object_len: u64) -> Option<u32> {
        u32::try_from(object_len.div_ceil(self.block_bytes().max(1)).max(1)).ok()
    }

    /// Object bytes in `block`, before padding.
    pub fn block_len(&self, object_len: u64, block: u32) -> usize {
        let start = block as u64 * self.block_bytes();
        object_len.saturating_sub(start).min(self.block_bytes()) as usize
    }

    /// The layout of an object of `object_len` bytes under these parameters,
    /// which the sender puts in the object's header and shard frames.
    ///
    /// Objects shorter than a block are not padded to k shards: a 1 KiB
    /// manifest under k=128 would otherwise cost 148 frames a pass. The
    /// object's blocks are sized evenly instead, k' = ⌈shards / blocks⌉ ≤ k,
    /// with parity at the configured ratio, m' = ⌈m·k'/k⌉, and at least
    /// [`MIN_SHORT_BLOCK_PARITY`] (bounded by m) when k' < k. An object of
    /// whole blocks keeps k and m as they are.
    pub fn for_object(&self, object_len: u64) -> FecParams {
        let s = self.shard_size as u64;
        let blocks = self.blocks_for(object_len) as u64;
        let shards = object_len.div_ceil(s).max(1);
        // ≤ k: blocks_for gives blocks ≥ shards / k.
        let k = shards.div_ceil(blocks) as u16;
        if k >= self.data_shards {
            return *self;
        }
        let scaled =
            (self.parity_shards as u64 * k as u64).div_ceil(self.data_shards as u64) as u16;
        let m = scaled.max(MIN_SHORT_BLOCK_PARITY.min(self.parity_shards));
        FecParams {
            data_shards: k,
            parity_shards: m,
            shard_size: self.shard_size,
        }
    }

    /// Whether two shards per block are consistent with these parameters.
    pub fn is_valid(&self) -> bool {
        Self::new(self.data_shards, self.parity_shards, self.shard_size).is_ok()
            && self.shard_size as usize <= crate::frame::MAX_SHARD_SIZE
    }
}

/// Codecs by parameters, each built on first use: objects shorter than a
/// block bring parameters of their own ([`FecParams::for_object`]), so a
/// sender or receiver needs a few at a time.
#[derive(Default)]
pub struct Codecs(std::collections::HashMap<FecParams, BlockCodec>);

impl Codecs {
    /// Short objects come in many sizes: past this many, start over.
    const MAX: usize = 64;

    pub fn get(&mut self, params: FecParams) -> Result<&BlockCodec, FecError> {
        if !self.0.contains_key(&params) {
            if self.0.len() >= Self::MAX {
                self.0.clear();
            }
            self.0.insert(params, BlockCodec::new(params)?);
        }
        Ok(&self.0[&params])
    }
}

/// Encodes and rebuilds blocks for one set of parameters.
pub struct BlockCodec {
    params: FecParams,
    /// None when m = 0: there is nothing to compute.
    rs: Option<ReedSolomon>,
    /// The same parity rows for a SIMD kernel (GFNI or AVX2), where the CPU
    /// runs one.
    parity: Option<weir_kernels::ParityRows>,
}

/// reed-solomon-erasure's field: x^8 + x^4 + x^3 + x^2 + 1 (low bits).
const FIELD_POLY: u8 = 0x1d;

/// The codec's parity rows, read off by encoding unit vectors: RS encoding
/// is linear, so data shard `i` set to 1 and the rest 0 leaves column `i`
/// of the parity matrix in the parity shards. Byte for byte the codec's.
fn parity_coefficients(rs: &ReedSolomon, k: usize, m: usize) -> Result<Vec<u8>, FecError> {
    let mut coefficients = vec![0u8; k * m];
    let mut shards = vec![vec![0u8; 1]; k + m];
    for i in 0..k {
        for s in shards.iter_mut() {
            s[0] = 0;
        }
        shards[i][0] = 1;
        rs.encode(&mut shards)
            .map_err(|e| FecError::Codec(format!("{e:?}")))?;
        for j in 0..m {
            coefficients[j * k + i] = shards[k + j][0];
        }
    }
    Ok(coefficients)
}

impl BlockCodec {
    pub fn new(params: FecParams) -> Result<Self, FecError> {
        FecParams::new(params.data_shards, params.parity_shards, params.shard_size)?;
        let (k, m) = (params.data_shards as usize, params.parity_shards as usize);
        let rs = if m == 0 {
            None
        } else {
            Some(ReedSolomon::new(k, m).map_err(|e| FecError::Codec(format!("{e:?}")))?)
        };
        let parity = match &rs {
            Some(rs) if weir_kernels::parity::supported() => {
                let coefficients = parity_coefficients(rs, k, m)?;
                weir_kernels::ParityRows::new(FIELD_POLY, k, m, &coefficients)
            }
            _ => None,
        };
        Ok(BlockCodec { params, rs, parity })
    }

    /// Whether parity is computed with a SIMD kernel (else the portable
    /// codec); the parity is the same either way.
    pub fn accelerated(&self) -> bool {
        self.parity.is_some()
    }

    pub fn params(&self) -> FecParams {
        self.params
    }

    /// Cuts `data` (at most k × S bytes, zero-padded here) into k data shards
    /// and computes m parity shards; `shards` is resized to k + m shards of S.
    pub fn encode(&self, data: &[u8], shards: &mut Vec<Vec<u8>>) -> Result<(), FecError> {
        self.split(data, shards)?;
        if let Some(rows) = &self.parity {
            let (data, parity) = shards.split_at_mut(self.params.data_shards as usize);
            let data: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let mut parity: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
            rows.encode(&data, &mut parity);
        } else if let Some(rs) = &self.rs {
            rs.encode(shards)
                .map_err(|e| FecError::Codec(format!("{e:?}")))?;
        }
        Ok(())
    }

    /// Computes the m parity shards of a block held whole in `block`
    /// (exactly k × S bytes, a short block zero-padded by the caller), its
    /// data shards being `block`'s consecutive S-byte pieces: the same
    /// parity as [`encode`](Self::encode), without copying the data into
    /// shards first. `parity` is resized to m shards of S.
    pub fn encode_parity(&self, block: &[u8], parity: &mut Vec<Vec<u8>>) -> Result<(), FecError> {
        let p = self.params;
        let s = p.shard_size as usize;
        let expected = p.block_bytes() as usize;
        if block.len() != expected {
            return Err(FecError::BlockNotWhole {
                got: block.len(),
                expected,
            });
        }
        parity.resize_with(p.parity_shards as usize, Vec::new);
        for shard in parity.iter_mut() {
            // Every byte is overwritten below; zeroed only when new.
            shard.resize(s, 0);
        }
        let data: Vec<&[u8]> = block.chunks_exact(s).collect();
        let mut out: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
        if let Some(rows) = &self.parity {
            rows.encode(&data, &mut out);
        } else if let Some(rs) = &self.rs {
            rs.encode_sep(&data, &mut out)
                .map_err(|e| FecError::Codec(format!("{e:?}")))?;
        }
        Ok(())
    }

    /// Cuts `data` into k data shards like [`encode`](Self::encode) and sizes
    /// the m parity shards, without computing them: a sender that streams the
    /// data shards first folds each one into the parity with
    /// [`add_to_parity`](Self::add_to_parity) while the next ones go out,
    /// instead of stalling for the whole block.
    pub fn split(&self, data: &[u8], shards: &mut Vec<Vec<u8>>) -> Result<(), FecError> {
        let p = self.params;
        let s = p.shard_size as usize;
        let max = p.block_bytes() as usize;
        if data.len() > max {
            return Err(FecError::BlockTooLarge {
                got: data.len(),
                max,
            });
        }
        shards.resize_with(p.total_shards() as usize, Vec::new);
        for (i, shard) in shards.iter_mut().enumerate() {
            shard.clear();
            shard.resize(s, 0);
            if i < p.data_shards as usize {
                let start = (i * s).min(data.len());
                let end = ((i + 1) * s).min(data.len());
                shard[..end - start].copy_from_slice(&data[start..end]);
            }
        }
        Ok(())
    }

    /// Folds data shard `index` of a [`split`](Self::split) block into its
    /// parity shards. Called for every index 0, 1, …, k-1 in that order, it
    /// leaves the same parity as [`encode`](Self::encode).
    pub fn add_to_parity(&self, index: u16, shards: &mut [Vec<u8>]) -> Result<(), FecError> {
        match &self.rs {
            Some(rs) => rs
                .encode_single(index as usize, shards)
                .map_err(|e| FecError::Codec(format!("{e:?}"))),
            None => Ok(()),
        }
    }

    /// Fills in the missing data shards of a block from any k present ones.
    /// `shards` holds k + m entries; parity shards are not rebuilt.
    pub fn reconstruct_data(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), FecError> {
        let p = self.params;
        let k = p.data_shards as usize;
        let s = p.shard_size as usize;
        if let Some(bad) = shards.iter().flatten().find(|sh| sh.len() != s) {
            return Err(FecError::ShardSize {
                got: bad.len(),
                expected: s,
            });
        }
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < k {
            return Err(FecError::TooFewShards { present, needed: k });
        }
        if shards[..k].iter().all(Option::is_some) {
            return Ok(()); // systematic: nothing to decode
        }
        match &self.rs {
            Some(rs) => rs
                .reconstruct_data(shards)
                .map_err(|e| FecError::Codec(format!("{e:?}"))),
            // m = 0 and a data shard missing: present < k was caught above.
            None => Err(FecError::TooFewShards { present, needed: k }),
        }
    }
}

/// The order in which one pass sends an object's shards: every (block,
/// shard index) once, interleaved across windows of at least `window`
/// blocks so that a burst of B consecutive lost frames costs any block at
/// most ceil(B / window) shards (ceil(B / blocks) for objects with fewer
/// blocks than the window).
///
/// Blocks are split into groups of near-equal size, each at least `window`
/// (all blocks in one group when there are fewer), and each group is sent
/// shard index by shard index.
pub fn interleave(
    blocks: u32,
    shards_per_block: u16,
    window: u32,
) -> impl Iterator<Item = (u32, u16)> {
    let window = window.max(1);
    let groups = (blocks / window).max(1);
    let base = blocks / groups;
    let extra = blocks % groups;
    (0..groups).flat_map(move |g| {
        // The first `extra` groups take one block more.
        let start = g * base + g.min(extra);
        let len = base + u32::from(g < extra);
        (0..shards_per_block).flat_map(move |i| (start..start + len).map(move |b| (b, i)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_count_past_32_bits_is_refused_not_truncated() {
        let p = FecParams::new(1, 1, 1).unwrap();
        assert_eq!(p.checked_blocks_for(u32::MAX as u64), Some(u32::MAX));
        assert_eq!(p.checked_blocks_for(u32::MAX as u64 + 1), None);
        assert_eq!(p.checked_blocks_for(0), Some(1));
    }
    use proptest::prelude::*;

    fn params(k: u16, m: u16, s: u32) -> FecParams {
        FecParams::new(k, m, s).unwrap()
    }

    #[test]
    fn refuses_impossible_parameters() {
        assert_eq!(FecParams::new(0, 4, 10), Err(FecError::NoDataShards(0)));
        assert_eq!(
            FecParams::new(200, 57, 10),
            Err(FecError::TooManyShards(257))
        );
        assert!(FecParams::for_datagram(60, 32, 8).is_err());
    }

    #[test]
    fn shard_frames_fit_the_datagram() {
        let p = FecParams::for_datagram(1400, 32, 8).unwrap();
        assert!(p.shard_size > 1200, "{p:?}");
    }

    #[test]
    fn block_arithmetic() {
        let p = params(4, 2, 10);
        assert_eq!(p.blocks_for(0), 1);
        assert_eq!(p.blocks_for(40), 1);
        assert_eq!(p.blocks_for(41), 2);
        assert_eq!(p.block_len(41, 0), 40);
        assert_eq!(p.block_len(41, 1), 1);
        assert_eq!(p.block_len(41, 2), 0);
    }

    #[test]
    fn short_objects_get_short_blocks_with_enough_parity() {
        let p = params(128, 20, 1000);
        // One shard: k'=1, at least 4 parity.
        assert_eq!(p.for_object(0), params(1, 4, 1000));
        assert_eq!(p.for_object(700), params(1, 4, 1000));
        // 30 shards: parity at the ratio (⌈20·30/128⌉ = 5).
        assert_eq!(p.for_object(29_500), params(30, 5, 1000));
        // Whole blocks: as configured; otherwise blocks of even size.
        assert_eq!(p.for_object(128_000), p);
        assert_eq!(p.for_object(1_280_000), p);
        assert_eq!(p.for_object(10_000_000), params(127, 20, 1000));
        // 1.5 blocks: two blocks of 96 shards, 15 parity each.
        assert_eq!(p.for_object(192_000), params(96, 15, 1000));
        // m = 0 stays 0; m < 4 is not raised above m.
        assert_eq!(params(32, 0, 10).for_object(5), params(1, 0, 10));
        assert_eq!(params(32, 2, 10).for_object(5), params(1, 2, 10));
    }

    #[test]
    fn intact_block_needs_no_decoding_and_is_the_data() {
        let p = params(3, 2, 4);
        let codec = BlockCodec::new(p).unwrap();
        let data: Vec<u8> = (0..10).collect();
        let mut shards = Vec::new();
        codec.encode(&data, &mut shards).unwrap();
        assert_eq!(shards.concat()[..10], data[..]);
        assert_eq!(shards[2][2..], [0, 0]); // padding
    }

    #[test]
    fn works_without_parity() {
        let codec = BlockCodec::new(params(2, 0, 3)).unwrap();
        let mut shards = Vec::new();
        codec.encode(b"abcde", &mut shards).unwrap();
        let mut opt: Vec<_> = shards.into_iter().map(Some).collect();
        codec.reconstruct_data(&mut opt).unwrap();
        opt[1] = None;
        assert!(codec.reconstruct_data(&mut opt).is_err());
    }

    /// The SIMD kernel's parity is the portable codec's, byte for byte: a
    /// receiver without the kernel rebuilds what a sender with it made.
    #[test]
    fn accelerated_parity_is_the_portable_codecs() {
        for (k, m, s) in [(128, 20, 1400), (32, 8, 1400), (5, 4, 3), (60, 60, 100)] {
            let p = params(k, m, s);
            let codec = BlockCodec::new(p).unwrap();
            if !codec.accelerated() {
                eprintln!("skipped: this CPU has no parity kernel (GFNI or AVX2)");
                return;
            }
            let data: Vec<u8> = (0..p.block_bytes() - 7)
                .map(|i| i.wrapping_mul(0x9e37_79b9).to_le_bytes()[3])
                .collect();
            let mut fast = Vec::new();
            codec.encode(&data, &mut fast).unwrap();
            let mut portable = Vec::new();
            codec.split(&data, &mut portable).unwrap();
            ReedSolomon::new(k as usize, m as usize)
                .unwrap()
                .encode(&mut portable)
                .unwrap();
            assert_eq!(fast, portable, "k={k} m={m} S={s}");
        }
    }

    /// Parity computed from the block in place is the parity `encode`
    /// computes from shards cut out of it, for both the kernel and the
    /// portable codec, short blocks padded as `encode` pads them; a block
    /// that is not whole is refused.
    #[test]
    fn parity_of_a_block_in_place_is_the_parity_of_its_shards() {
        for (k, m, s) in [(128, 20, 1400), (5, 4, 3), (3, 0, 10)] {
            let p = params(k, m, s);
            let codec = BlockCodec::new(p).unwrap();
            let portable = BlockCodec {
                parity: None,
                ..BlockCodec::new(p).unwrap()
            };
            for short in [0, 7] {
                let len = p.block_bytes() as usize - short;
                let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let mut shards = Vec::new();
                codec.encode(&data, &mut shards).unwrap();
                let mut block = data.clone();
                block.resize(p.block_bytes() as usize, 0);
                for c in [&codec, &portable] {
                    let mut parity = vec![vec![0xaa; 3]];
                    c.encode_parity(&block, &mut parity).unwrap();
                    assert_eq!(parity, shards[k as usize..], "k={k} m={m} S={s}");
                }
            }
            let mut parity = Vec::new();
            assert_eq!(
                codec.encode_parity(&[0; 5], &mut parity),
                Err(FecError::BlockNotWhole {
                    got: 5,
                    expected: p.block_bytes() as usize
                })
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any k of the k + m shards rebuild the block's bytes.
        #[test]
        fn any_k_shards_rebuild(
            k in 1u16..40, m in 0u16..12, s in 1u32..64,
            seed in any::<u64>(), fill in 0.0f64..=1.0,
        ) {
            let p = params(k, m, s);
            let codec = BlockCodec::new(p).unwrap();
            let len = ((p.block_bytes() as f64) * fill) as usize;
            let data: Vec<u8> = (0..len).map(|i| (i as u64).wrapping_mul(seed | 1).to_le_bytes()[3]).collect();
            let mut shards = Vec::new();
            codec.encode(&data, &mut shards).unwrap();
            // Keep a pseudo-random subset of exactly k shards.
            let n = p.total_shards() as usize;
            let mut idx: Vec<usize> = (0..n).collect();
            let mut x = seed;
            for i in (1..n).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                idx.swap(i, (x >> 33) as usize % (i + 1));
            }
            let keep: std::collections::HashSet<usize> = idx[..k as usize].iter().copied().collect();
            let mut opt: Vec<Option<Vec<u8>>> = shards.into_iter().enumerate()
                .map(|(i, sh)| keep.contains(&i).then_some(sh)).collect();
            codec.reconstruct_data(&mut opt).unwrap();
            let rebuilt: Vec<u8> = opt[..k as usize].iter().flat_map(|s| s.clone().unwrap()).collect();
            prop_assert_eq!(&rebuilt[..len], &data[..]);
        }

        /// An object's own layout holds it in as many blocks as the
        /// configured one, never more shards per block, and no more than
        /// k' - 1 shards of padding per block.
        #[test]
        fn object_layout_never_pads_more_than_a_shard_per_block(
            k in 1u16..200, m in 0u16..56, s in 1u32..2000, len in 0u64..50_000_000,
        ) {
            let p = params(k, m, s);
            let o = p.for_object(len);
            prop_assert!(o.is_valid());
            prop_assert_eq!(o.blocks_for(len), p.blocks_for(len));
            prop_assert!(o.data_shards <= k && o.parity_shards <= m);
            let shards = len.div_ceil(s as u64).max(1);
            let sent = o.blocks_for(len) as u64 * o.data_shards as u64;
            prop_assert!(o == p || sent - shards < o.blocks_for(len) as u64, "{:?} for {}", o, len);
            prop_assert_eq!(o.for_object(len), o);
        }

        /// Folding the data shards into the parity one by one gives the
        /// parity of a whole-block encode.
        #[test]
        fn parity_folded_shard_by_shard_equals_encode(
            k in 1u16..40, m in 0u16..12, s in 1u32..64, seed in any::<u64>(),
        ) {
            let p = params(k, m, s);
            let codec = BlockCodec::new(p).unwrap();
            let data: Vec<u8> = (0..p.block_bytes()).map(|i| i.wrapping_mul(seed | 1).to_le_bytes()[2]).collect();
            let mut whole = Vec::new();
            codec.encode(&data, &mut whole).unwrap();
            let mut folded = Vec::new();
            codec.split(&data, &mut folded).unwrap();
            for i in 0..k {
                codec.add_to_parity(i, &mut folded).unwrap();
            }
            prop_assert_eq!(folded, whole);
        }

        /// Every shard is sent exactly once, and a burst of B consecutive
        /// frames hits any block at most ceil(B / min(W, blocks)) times.
        #[test]
        fn interleave_bounds_every_burst(
            blocks in 1u32..200, n in 1u16..48, w in 1u32..64, burst in 1usize..400,
        ) {
            let order: Vec<(u32, u16)> = interleave(blocks, n, w).collect();
            prop_assert_eq!(order.len(), blocks as usize * n as usize);
            let mut seen = std::collections::HashSet::new();
            for o in &order { prop_assert!(seen.insert(*o)); }
            let eff = w.min(blocks) as usize;
            let bound = burst.div_ceil(eff);
            let b = burst.min(order.len());
            let mut counts = vec![0usize; blocks as usize];
            for (i, (blk, _)) in order.iter().enumerate() {
                counts[*blk as usize] += 1;
                if i >= b { counts[order[i - b].0 as usize] -= 1; }
                prop_assert!(counts[*blk as usize] <= bound,
                    "burst {} hit block {} {} times (bound {})", b, blk, counts[*blk as usize], bound);
            }
        }
    }
}
