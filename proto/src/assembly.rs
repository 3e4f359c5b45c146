//! Block assembly on the receiver: which shards of an object are held,
//! when a block can be rebuilt, and where the object is in its life.
//!
//! Only bookkeeping: the shard bytes live wherever the caller keeps them
//! (files on the receiver, memory in tests). The caller marks a shard held
//! once its bytes are where it keeps them, so a bitmap never claims a
//! shard that is not there.
//!
//! Per block, a bitmap of `k + m` bits (bit `i` of byte `i / 8` is shard
//! `i`; data shards are `0..k`). A block is
//!
//! - *data-complete* when its `k` data shards are held: its bytes are the
//!   object's, no decoding needed (the code is systematic);
//! - *decodable* when any `k` shards are held but a data shard is missing:
//!   [`BlockCodec::reconstruct_data`](crate::fec::BlockCodec::reconstruct_data)
//!   rebuilds the missing ones.
//!
//! The object's lifecycle:
//!
//! ```text
//!  Announced ──shard──► Receiving ──block decodable──► Decoding
//!                          │  ▲                           │
//!                          │  └──── decoded / failed ─────┘
//!                          └──every block data-complete──► Complete
//!                                                            │  ▲
//!                                           begin_finish ────┘  │ interrupted
//!                                                            ▼  │
//!                                                          Finishing
//! ```
//!
//! A caller that writes shards in batches marks each *queued* while its
//! bytes are on their way: a queued shard is no longer new, but not held
//! until the batch is durable. A caller that keeps the bitmaps keeps them
//! in chunks of [`BLOCKS_PER_CHUNK`] blocks.

use crate::fec::{FecParams, MAX_SHARDS_PER_BLOCK};

/// Longest bitmap of one block, in bytes.
pub const MAX_BITMAP_LEN: usize = MAX_SHARDS_PER_BLOCK.div_ceil(8);

/// Blocks whose bitmaps are kept as one value. One value per block would
/// make a 4 GiB object 100 000 values, and a database needs hundreds of
/// MiB to delete that many at once; chunks keep the count small.
pub const BLOCKS_PER_CHUNK: u32 = 256;

/// One block's bitmap, on the stack (no allocation per block).
pub type BlockBitmap = [u8; MAX_BITMAP_LEN];

/// Where an object is in its life on the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectState {
    /// Known (from a header or a first shard), no shard held yet.
    Announced,
    /// Shards arriving; no block is being rebuilt.
    Receiving,
    /// At least one block is being rebuilt from parity.
    Decoding,
    /// Every block's data is held: the object's bytes are all there.
    Complete,
    /// Complete, and handed to whoever checks the whole object; back to
    /// `Complete` if that stops before a verdict.
    Finishing,
}

/// What holding one more shard did to its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockProgress {
    /// The shard was held already; nothing changed.
    Duplicate,
    /// Held now; the block needs more shards (`held` of them so far).
    Waiting { held: u16 },
    /// Held now; `k` shards are in but a data shard is missing. Reported
    /// once, while the block is not being decoded: start decoding it.
    Decodable,
    /// Held now, or held already while the block is being decoded.
    Pending,
    /// The block's data shards are all held (reported when it becomes so).
    DataComplete,
}

/// A shard position outside the object's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shard {index} of block {block} is outside the object ({blocks} blocks of {total} shards)")]
pub struct OutOfRange {
    pub block: u32,
    pub index: u16,
    pub blocks: u32,
    pub total: u16,
}

/// Whether bits `0..k` (the data shards) of one block's bitmap are all set.
pub fn data_bits_set(map: &[u8], k: u16) -> bool {
    let (whole, rest) = (k as usize / 8, k % 8);
    map.len() * 8 >= k as usize
        && map[..whole].iter().all(|&b| b == 0xff)
        && (rest == 0 || map[whole] & ((1u8 << rest) - 1) == (1u8 << rest) - 1)
}

/// Whether shard `index` is set in one block's bitmap.
pub fn shard_set(map: &[u8], index: u16) -> bool {
    map[index as usize / 8] & (1 << (index % 8)) != 0
}

/// Sets shard `index` in one block's bitmap.
pub fn set_shard(map: &mut [u8], index: u16) {
    map[index as usize / 8] |= 1 << (index % 8);
}

/// Bytes of one block's bitmap under `fec`.
pub fn bitmap_len(fec: FecParams) -> usize {
    (fec.total_shards() as usize).div_ceil(8)
}

/// The held shards of one object, block by block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectAssembly {
    fec: FecParams,
    object_len: u64,
    blocks: u32,
    bitmap_len: usize,
    /// `blocks × bitmap_len` bytes.
    held: Vec<u8>,
    shards_held: u64,
    blocks_complete: u32,
    /// Blocks being rebuilt, by index.
    decoding: Vec<bool>,
    decoding_count: u32,
    /// Leading blocks whose data is final: complete and not being decoded.
    final_prefix: u32,
    /// Shards on their way to where the caller keeps them, same layout as
    /// `held`.
    queued: Vec<u8>,
    /// Leading blocks [`hash_ahead`](Self::hash_ahead) handed out.
    hashed_prefix: u32,
    finishing: bool,
}

impl ObjectAssembly {
    /// An object of `object_len` bytes cut as `fec` says (the parameters the
    /// object's frames carry), with nothing held.
    pub fn new(fec: FecParams, object_len: u64) -> Self {
        let blocks = fec.blocks_for(object_len);
        let bitmap_len = bitmap_len(fec);
        ObjectAssembly {
            fec,
            object_len,
            blocks,
            bitmap_len,
            held: vec![0; blocks as usize * bitmap_len],
            shards_held: 0,
            blocks_complete: 0,
            decoding: vec![false; blocks as usize],
            decoding_count: 0,
            final_prefix: 0,
            queued: vec![0; blocks as usize * bitmap_len],
            hashed_prefix: 0,
            finishing: false,
        }
    }

    /// An object whose held bitmaps were kept (`blocks × bitmap_len`
    /// bytes, as [`bitmaps`](Self::bitmaps) gives them); `None` when the
    /// length does not fit the layout.
    pub fn with_bitmaps(fec: FecParams, object_len: u64, held: &[u8]) -> Option<Self> {
        let mut a = Self::new(fec, object_len);
        if held.len() != a.held.len() {
            return None;
        }
        for block in 0..a.blocks {
            let start = block as usize * a.bitmap_len;
            a.replace_block(block, &held[start..start + a.bitmap_len]);
        }
        Some(a)
    }

    pub fn fec(&self) -> FecParams {
        self.fec
    }

    pub fn object_len(&self) -> u64 {
        self.object_len
    }

    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    pub fn shards_held(&self) -> u64 {
        self.shards_held
    }

    /// Blocks whose data shards are all held.
    pub fn blocks_complete(&self) -> u32 {
        self.blocks_complete
    }

    /// Every block's bitmap, `blocks × bitmap_len` bytes.
    pub fn bitmaps(&self) -> &[u8] {
        &self.held
    }

    pub fn block_bitmap(&self, block: u32) -> &[u8] {
        let start = block as usize * self.bitmap_len;
        &self.held[start..start + self.bitmap_len]
    }

    /// Bytes of one block's bitmap.
    pub fn bitmap_len(&self) -> usize {
        self.bitmap_len
    }

    pub fn state(&self) -> ObjectState {
        if self.finishing {
            ObjectState::Finishing
        } else if self.blocks_complete == self.blocks && self.decoding_count == 0 {
            ObjectState::Complete
        } else if self.decoding_count > 0 {
            ObjectState::Decoding
        } else if self.shards_held == 0 {
            ObjectState::Announced
        } else {
            ObjectState::Receiving
        }
    }

    fn check(&self, block: u32, index: u16) -> Result<(), OutOfRange> {
        if block < self.blocks && index < self.fec.total_shards() {
            Ok(())
        } else {
            Err(OutOfRange {
                block,
                index,
                blocks: self.blocks,
                total: self.fec.total_shards(),
            })
        }
    }

    pub fn is_held(&self, block: u32, index: u16) -> bool {
        self.check(block, index).is_ok() && shard_set(self.block_bitmap(block), index)
    }

    fn queued_bitmap(&self, block: u32) -> &[u8] {
        let start = block as usize * self.bitmap_len;
        &self.queued[start..start + self.bitmap_len]
    }

    pub fn is_queued(&self, block: u32, index: u16) -> bool {
        self.check(block, index).is_ok() && shard_set(self.queued_bitmap(block), index)
    }

    /// Marks shard `index` of `block` queued: its bytes are on their way.
    /// Returns whether it was new: not held, not queued already, and its
    /// block still misses data (a block with all its data needs nothing
    /// more, parity included, so later passes cost a bitmap test).
    pub fn queue(&mut self, block: u32, index: u16) -> Result<bool, OutOfRange> {
        self.check(block, index)?;
        if self.is_held(block, index)
            || shard_set(self.queued_bitmap(block), index)
            || self.data_complete(block)
        {
            return Ok(false);
        }
        let start = block as usize * self.bitmap_len;
        set_shard(&mut self.queued[start..start + self.bitmap_len], index);
        Ok(true)
    }

    /// The queued shard's bytes arrived, or were dropped: either way it is
    /// no longer on its way (held is [`replace_block`](Self::replace_block)'s).
    pub fn unqueue(&mut self, block: u32, index: u16) {
        if self.check(block, index).is_ok() {
            let byte = block as usize * self.bitmap_len + index as usize / 8;
            self.queued[byte] &= !(1 << (index % 8));
        }
    }

    /// Whether the block's data is complete once its queued shards are
    /// held: its queued parity is then never needed.
    pub fn data_complete_with_queued(&self, block: u32) -> bool {
        block < self.blocks && self.data_complete_with(block, self.queued_bitmap(block))
    }

    /// Indices of the shards held in `block`, in order.
    pub fn held_in_block(&self, block: u32) -> Vec<u16> {
        (0..self.fec.total_shards())
            .filter(|&i| self.is_held(block, i))
            .collect()
    }

    pub fn data_complete(&self, block: u32) -> bool {
        block < self.blocks && data_bits_set(self.block_bitmap(block), self.fec.data_shards)
    }

    /// Whether the block's data would be complete with the shards in
    /// `extra` (a bitmap of shards about to be held) added.
    pub fn data_complete_with(&self, block: u32, extra: &[u8]) -> bool {
        if block >= self.blocks {
            return false;
        }
        let mut map = [0u8; MAX_BITMAP_LEN];
        let map = &mut map[..self.bitmap_len];
        for (m, (h, x)) in map
            .iter_mut()
            .zip(self.block_bitmap(block).iter().zip(extra))
        {
            *m = h | x;
        }
        data_bits_set(map, self.fec.data_shards)
    }

    /// Whether `k` shards of the block are held, data-complete or not.
    pub fn decodable(&self, block: u32) -> bool {
        block < self.blocks && self.count(block) >= u32::from(self.fec.data_shards)
    }

    pub fn is_decoding(&self, block: u32) -> bool {
        self.decoding.get(block as usize).copied().unwrap_or(false)
    }

    fn count(&self, block: u32) -> u32 {
        self.block_bitmap(block)
            .iter()
            .map(|b| b.count_ones())
            .sum()
    }

    /// Marks shard `index` of `block` held: its bytes are where the caller
    /// keeps them.
    pub fn hold(&mut self, block: u32, index: u16) -> Result<BlockProgress, OutOfRange> {
        self.check(block, index)?;
        if self.is_held(block, index) {
            return Ok(BlockProgress::Duplicate);
        }
        let mut map = [0u8; MAX_BITMAP_LEN];
        let map = &mut map[..self.bitmap_len];
        map.copy_from_slice(self.block_bitmap(block));
        map[index as usize / 8] |= 1 << (index % 8);
        Ok(self.replace_block(block, map))
    }

    /// Sets `block`'s bitmap to `map` (a store that commits shards in
    /// batches sets the whole bitmap it committed). Bits past `k + m` are
    /// ignored.
    pub fn replace_block(&mut self, block: u32, map: &[u8]) -> BlockProgress {
        if block >= self.blocks {
            return BlockProgress::Duplicate;
        }
        let mut next = [0u8; MAX_BITMAP_LEN];
        let next = &mut next[..self.bitmap_len];
        let n = self.bitmap_len.min(map.len());
        next[..n].copy_from_slice(&map[..n]);
        // Bits past the last shard stay clear.
        let total = self.fec.total_shards();
        next[self.bitmap_len - 1] &= u8::MAX >> ((8 - total % 8) % 8);
        if next == self.block_bitmap(block) {
            return BlockProgress::Duplicate;
        }
        let was_complete = self.data_complete(block);
        let before = self.count(block);
        let start = block as usize * self.bitmap_len;
        self.held[start..start + self.bitmap_len].copy_from_slice(next);
        let after = self.count(block);
        self.shards_held = self.shards_held - u64::from(before) + u64::from(after);
        let complete = self.data_complete(block);
        if complete && !was_complete {
            self.blocks_complete += 1;
        } else if !complete && was_complete {
            self.blocks_complete -= 1;
        }
        self.advance_final_prefix();
        if complete {
            if was_complete || self.is_decoding(block) {
                BlockProgress::Pending
            } else {
                BlockProgress::DataComplete
            }
        } else if self.is_decoding(block) {
            BlockProgress::Pending
        } else if after >= u32::from(self.fec.data_shards) {
            BlockProgress::Decodable
        } else {
            BlockProgress::Waiting { held: after as u16 }
        }
    }

    /// The caller starts rebuilding `block`; returns the shards it holds
    /// to rebuild from, or `None` when the block is not decodable, already
    /// complete or already being rebuilt.
    pub fn start_decoding(&mut self, block: u32) -> Option<Vec<u16>> {
        if !self.decodable(block) || self.data_complete(block) || self.is_decoding(block) {
            return None;
        }
        self.decoding[block as usize] = true;
        self.decoding_count += 1;
        Some(self.held_in_block(block))
    }

    /// The rebuild of `block` ended: `rebuilt` lists the data shards it
    /// wrote (empty when it failed and the block waits for more shards).
    pub fn decoded(&mut self, block: u32, rebuilt: &[u16]) -> BlockProgress {
        if !self.is_decoding(block) {
            return BlockProgress::Duplicate;
        }
        self.decoding[block as usize] = false;
        self.decoding_count -= 1;
        let mut map = [0u8; MAX_BITMAP_LEN];
        let map = &mut map[..self.bitmap_len];
        map.copy_from_slice(self.block_bitmap(block));
        for &i in rebuilt.iter().filter(|&&i| i < self.fec.data_shards) {
            map[i as usize / 8] |= 1 << (i % 8);
        }
        let was_complete = self.data_complete(block);
        match self.replace_block(block, map) {
            BlockProgress::Duplicate if was_complete => {
                self.advance_final_prefix();
                BlockProgress::DataComplete
            }
            BlockProgress::Duplicate | BlockProgress::Waiting { .. } => {
                self.advance_final_prefix();
                BlockProgress::Waiting {
                    held: self.count(block) as u16,
                }
            }
            BlockProgress::Pending => BlockProgress::DataComplete,
            p => p,
        }
    }

    /// The caller stops rebuilding `block` with nothing to show (the
    /// rebuild failed, or its shards were not kept): the block waits for
    /// more shards.
    pub fn stop_decoding(&mut self, block: u32) {
        if self.is_decoding(block) {
            self.decoding[block as usize] = false;
            self.decoding_count -= 1;
            self.advance_final_prefix();
        }
    }

    /// Hands the object to whoever checks it whole: true once it is
    /// [`Complete`](ObjectState::Complete), false while finishing already
    /// or not complete yet.
    pub fn begin_finish(&mut self) -> bool {
        if self.state() != ObjectState::Complete {
            return false;
        }
        self.finishing = true;
        true
    }

    /// The check stopped before a verdict: it is to be asked again.
    pub fn finish_interrupted(&mut self) {
        self.finishing = false;
    }

    /// How far a reader may hash the object ahead of its finish: the final
    /// bytes, once they grew by `step` since the last answer. `None` when
    /// they did not, or when every block is final (the finish reads the
    /// rest anyway).
    pub fn hash_ahead(&mut self, step: u64) -> Option<u64> {
        let block = self.fec.block_bytes();
        let upto = self.final_bytes();
        let hashed = (u64::from(self.hashed_prefix) * block).min(upto);
        if self.final_prefix == self.blocks || upto - hashed < step {
            return None;
        }
        self.hashed_prefix = self.final_prefix;
        Some(upto)
    }

    /// Chunks the bitmaps are kept in.
    pub fn chunks(&self) -> u32 {
        self.blocks.div_ceil(BLOCKS_PER_CHUNK)
    }

    /// The blocks `chunk` covers (empty past the last).
    pub fn chunk_blocks(&self, chunk: u32) -> std::ops::Range<u32> {
        let start = chunk.saturating_mul(BLOCKS_PER_CHUNK).min(self.blocks);
        start..start.saturating_add(BLOCKS_PER_CHUNK).min(self.blocks)
    }

    /// The bitmaps of `chunk`'s blocks, back to back: the value kept.
    pub fn chunk_bitmaps(&self, chunk: u32) -> &[u8] {
        let range = self.chunk_blocks(chunk);
        &self.held[range.start as usize * self.bitmap_len..range.end as usize * self.bitmap_len]
    }

    /// Writes `map` as `block`'s bitmap into `value`, a copy of the
    /// bitmaps of the block's chunk.
    pub fn put_in_chunk(&self, value: &mut [u8], block: u32, map: &[u8]) {
        let first = block / BLOCKS_PER_CHUNK * BLOCKS_PER_CHUNK;
        let at = (block - first) as usize * self.bitmap_len;
        value[at..at + self.bitmap_len].copy_from_slice(&map[..self.bitmap_len]);
    }

    /// Takes a kept chunk's bitmaps back; false (and nothing taken) when
    /// the value does not fit the chunk, whose shards then come again.
    pub fn restore_chunk(&mut self, chunk: u32, value: &[u8]) -> bool {
        let range = self.chunk_blocks(chunk);
        if value.len() != range.len() * self.bitmap_len {
            return false;
        }
        for (block, map) in range.zip(value.chunks_exact(self.bitmap_len)) {
            self.replace_block(block, map);
        }
        true
    }

    fn advance_final_prefix(&mut self) {
        while self.final_prefix < self.blocks
            && self.data_complete(self.final_prefix)
            && !self.is_decoding(self.final_prefix)
        {
            self.final_prefix += 1;
        }
    }

    /// Leading blocks whose data is final: held and not being rewritten.
    pub fn final_prefix(&self) -> u32 {
        self.final_prefix
    }

    /// Object bytes covered by the final prefix: a reader may hash them
    /// ahead of the rest.
    pub fn final_bytes(&self) -> u64 {
        (u64::from(self.final_prefix) * self.fec.block_bytes()).min(self.object_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fec() -> FecParams {
        // 4 data + 2 parity shards of 10 bytes: 40 bytes a block.
        FecParams::new(4, 2, 10).unwrap()
    }

    #[test]
    fn data_shards_complete_a_block_without_decoding() {
        let mut a = ObjectAssembly::new(fec(), 100); // 3 blocks
        assert_eq!(a.blocks(), 3);
        assert_eq!(a.state(), ObjectState::Announced);
        assert_eq!(a.hold(0, 0), Ok(BlockProgress::Waiting { held: 1 }));
        assert_eq!(a.state(), ObjectState::Receiving);
        assert_eq!(a.hold(0, 0), Ok(BlockProgress::Duplicate));
        a.hold(0, 1).unwrap();
        a.hold(0, 2).unwrap();
        assert_eq!(a.hold(0, 3), Ok(BlockProgress::DataComplete));
        assert_eq!(a.blocks_complete(), 1);
        assert_eq!(a.final_prefix(), 1);
        assert_eq!(a.final_bytes(), 40);
        // Parity of a complete block changes nothing that matters.
        assert_eq!(a.hold(0, 5), Ok(BlockProgress::Pending));
        assert_eq!(a.held_in_block(0), vec![0, 1, 2, 3, 5]);
    }

    #[test]
    fn k_shards_with_a_gap_make_a_block_decodable_once() {
        let mut a = ObjectAssembly::new(fec(), 40);
        for i in [0, 1, 4] {
            a.hold(0, i).unwrap();
        }
        assert_eq!(a.hold(0, 5), Ok(BlockProgress::Decodable));
        assert!(a.decodable(0) && !a.data_complete(0));
        assert_eq!(a.start_decoding(0), Some(vec![0, 1, 4, 5]));
        assert_eq!(a.start_decoding(0), None, "already being rebuilt");
        assert_eq!(a.state(), ObjectState::Decoding);
        // A data shard arriving meanwhile does not restart anything.
        assert_eq!(a.hold(0, 2), Ok(BlockProgress::Pending));
        assert_eq!(a.final_prefix(), 0, "not final while rebuilt");
        assert_eq!(a.decoded(0, &[3]), BlockProgress::DataComplete);
        assert_eq!(a.state(), ObjectState::Complete);
        assert_eq!(a.final_bytes(), 40);
    }

    #[test]
    fn a_failed_rebuild_waits_for_more_shards() {
        let mut a = ObjectAssembly::new(fec(), 40);
        for i in [0, 1, 4, 5] {
            a.hold(0, i).unwrap();
        }
        a.start_decoding(0).unwrap();
        assert_eq!(a.decoded(0, &[]), BlockProgress::Waiting { held: 4 });
        assert_eq!(a.state(), ObjectState::Receiving);
        assert_eq!(a.start_decoding(0), Some(vec![0, 1, 4, 5]));
    }

    #[test]
    fn positions_outside_the_layout_are_refused() {
        let mut a = ObjectAssembly::new(fec(), 40);
        assert!(a.hold(1, 0).is_err());
        assert!(a.hold(0, 6).is_err());
        assert!(!a.is_held(9, 9));
    }

    #[test]
    fn an_empty_object_has_one_block_to_complete() {
        let mut a = ObjectAssembly::new(FecParams::new(1, 1, 10).unwrap(), 0);
        assert_eq!(a.blocks(), 1);
        assert_eq!(a.hold(0, 0), Ok(BlockProgress::DataComplete));
        assert_eq!(a.state(), ObjectState::Complete);
        assert_eq!(a.final_bytes(), 0);
    }

    #[test]
    fn kept_bitmaps_restore_the_same_assembly() {
        let mut a = ObjectAssembly::new(fec(), 100);
        for (b, i) in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 4), (2, 1)] {
            a.hold(b, i).unwrap();
        }
        let b = ObjectAssembly::with_bitmaps(fec(), 100, a.bitmaps()).unwrap();
        assert_eq!(a, b);
        assert!(ObjectAssembly::with_bitmaps(fec(), 100, &[0; 2]).is_none());
    }

    #[test]
    fn queued_shards_are_not_new_until_unqueued() {
        let mut a = ObjectAssembly::new(fec(), 100);
        assert_eq!(a.queue(0, 4), Ok(true));
        assert_eq!(a.queue(0, 4), Ok(false), "queued already");
        assert!(a.is_queued(0, 4) && !a.is_held(0, 4));
        assert_eq!(a.shards_held(), 0, "queued is not held");
        a.unqueue(0, 4);
        assert_eq!(a.queue(0, 4), Ok(true), "dropped from its batch: new again");
        a.hold(1, 2).unwrap();
        assert_eq!(a.queue(1, 2), Ok(false), "held");
        assert!(a.queue(3, 0).is_err());
    }

    #[test]
    fn a_block_whose_data_is_queued_needs_no_parity() {
        let mut a = ObjectAssembly::new(fec(), 40);
        a.hold(0, 0).unwrap();
        for i in [1, 2, 4] {
            assert_eq!(a.queue(0, i), Ok(true));
        }
        assert!(!a.data_complete_with_queued(0));
        assert_eq!(a.queue(0, 3), Ok(true));
        assert!(a.data_complete_with_queued(0));
        assert!(!a.data_complete(0));
        for i in 0..4 {
            a.hold(0, i).unwrap();
        }
        // Complete: even an unseen parity shard is no longer new.
        assert_eq!(a.queue(0, 5), Ok(false));
    }

    #[test]
    fn a_stopped_rebuild_releases_the_final_prefix() {
        let mut a = ObjectAssembly::new(fec(), 80);
        for i in [0, 1, 4, 5] {
            a.hold(0, i).unwrap();
        }
        a.start_decoding(0).unwrap();
        // The rebuilt shards are held by a batch, not by `decoded`.
        a.hold(0, 2).unwrap();
        a.hold(0, 3).unwrap();
        assert_eq!(a.final_prefix(), 0, "still being rewritten");
        a.stop_decoding(0);
        assert_eq!(a.final_prefix(), 1);
        assert_eq!(a.state(), ObjectState::Receiving);
        a.stop_decoding(0); // not decoding: nothing to stop
        assert_eq!(a.state(), ObjectState::Receiving);
    }

    #[test]
    fn a_complete_object_is_finished_once_until_interrupted() {
        let mut a = ObjectAssembly::new(fec(), 40);
        assert!(!a.begin_finish(), "not complete");
        for i in 0..4 {
            a.hold(0, i).unwrap();
        }
        assert!(a.begin_finish());
        assert_eq!(a.state(), ObjectState::Finishing);
        assert!(!a.begin_finish(), "finishing already");
        a.finish_interrupted();
        assert_eq!(a.state(), ObjectState::Complete);
        assert!(a.begin_finish());
    }

    #[test]
    fn final_bytes_are_hashed_ahead_in_steps() {
        let mut a = ObjectAssembly::new(fec(), 190); // 5 blocks of 40 bytes
        assert_eq!(a.hash_ahead(1), None, "nothing final");
        for i in 0..4 {
            a.hold(0, i).unwrap();
        }
        assert_eq!(a.hash_ahead(80), None, "40 bytes, steps of 80");
        assert_eq!(a.hash_ahead(40), Some(40));
        assert_eq!(a.hash_ahead(1), None, "nothing new");
        for b in 1..3 {
            for i in 0..4 {
                a.hold(b, i).unwrap();
            }
        }
        assert_eq!(a.hash_ahead(80), Some(120));
        for b in 3..5 {
            for i in 0..4 {
                a.hold(b, i).unwrap();
            }
        }
        assert_eq!(
            a.hash_ahead(1),
            None,
            "all final: the finish reads the rest"
        );
    }

    #[test]
    fn chunks_keep_the_bitmaps_and_restore_them() {
        // 4 data + 2 parity shards of 1 byte: 4 bytes a block.
        let small = FecParams::new(4, 2, 1).unwrap();
        let blocks = BLOCKS_PER_CHUNK + 10;
        let mut a = ObjectAssembly::new(small, u64::from(blocks) * 4);
        assert_eq!(a.chunks(), 2);
        assert_eq!(a.chunk_blocks(1), BLOCKS_PER_CHUNK..blocks);
        assert!(a.chunk_blocks(7).is_empty());
        for b in [0, 5, BLOCKS_PER_CHUNK, blocks - 1] {
            a.hold(b, 1).unwrap();
        }
        let mut restored = ObjectAssembly::new(small, u64::from(blocks) * 4);
        for c in 0..a.chunks() {
            assert!(restored.restore_chunk(c, a.chunk_bitmaps(c)));
        }
        assert_eq!(restored, a);
        assert!(!restored.restore_chunk(1, &[0xff; 3]), "wrong length");
        assert_eq!(restored, a, "nothing taken from a value that does not fit");
        // A block's new bitmap lands at its place in its chunk's value.
        let mut value = a.chunk_bitmaps(1).to_vec();
        let mut map: BlockBitmap = [0; MAX_BITMAP_LEN];
        map[0] = 0b1111;
        a.put_in_chunk(&mut value, BLOCKS_PER_CHUNK + 2, &map);
        assert!(restored.restore_chunk(1, &value));
        assert!(restored.data_complete(BLOCKS_PER_CHUNK + 2));
        assert!(restored.is_held(blocks - 1, 1));
    }

    proptest! {
        /// Whatever the arrival order, counts and states agree with the
        /// bitmaps: complete blocks are the data-complete ones, the final
        /// prefix is the leading run of them.
        #[test]
        fn counts_follow_the_bitmaps(
            arrivals in proptest::collection::vec((0u32..5, 0u16..6), 0..80),
        ) {
            let mut a = ObjectAssembly::new(fec(), 190); // 5 blocks
            for (b, i) in arrivals {
                a.hold(b, i).unwrap();
            }
            let complete = (0..5).filter(|&b| a.data_complete(b)).count() as u32;
            prop_assert_eq!(a.blocks_complete(), complete);
            let held: usize = (0..5).map(|b| a.held_in_block(b).len()).sum();
            prop_assert_eq!(a.shards_held(), held as u64);
            let prefix = (0..5).take_while(|&b| a.data_complete(b)).count() as u32;
            prop_assert_eq!(a.final_prefix(), prefix);
            prop_assert_eq!(a.state() == ObjectState::Complete, complete == 5);
        }
    }
}
