//! Sealing: one group of an object turned into its frames, on worker
//! threads, so that coding and signing use every core; each worker then
//! hands its group to the link, which sends it in the carousel's order
//! ([`Link`]).
//!
//! A [`GroupJob`] names the group (object, first block, block count) and
//! the sequence numbers the carousel reserved for it. A worker reads the
//! blocks from the payload file, computes their parity, and seals the
//! group's frames in wire order into one [`SealedGroup`]: the object header
//! first and again before every `header_every`-th shard frame after it,
//! the shards index by index across the group's blocks (proto's
//! interleave), so that a burst of lost frames costs each block few shards.
//! The frames are numbered `first_seq`, `first_seq + 1`, … in that order.

use crate::stages::carousel::Ticket;
use crate::stages::emit::{Done, Link};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;
use weir_host::Shutdown;
use weir_proto::{
    interleave, Body, Codecs, FecParams, FrameSealer, ObjectHeader, ObjectId, ObjectKind,
    ShardFrame,
};

/// Frames of a group of `blocks` blocks: its shard frames and the object
/// headers among them.
pub fn group_frames(blocks: u32, fec: FecParams, header_every: u32) -> u64 {
    let shards = u64::from(blocks) * u64::from(fec.total_shards());
    1 + shards.saturating_sub(1) / u64::from(header_every.max(1)) + shards
}

/// One group to seal.
#[derive(Debug, Clone)]
pub struct GroupJob {
    pub object: ObjectId,
    pub kind: ObjectKind,
    pub len: u64,
    /// The object's parameters ([`FecParams::for_object`]).
    pub fec: FecParams,
    pub first_block: u32,
    pub blocks: u32,
    /// Where the payload's bytes are: its file, or a linked archive.
    pub path: PathBuf,
    pub offset: u64,
    pub first_seq: u64,
    pub header_every: u32,
}

/// A group's frames, back to back, in wire order.
#[derive(Debug, Default)]
pub struct SealedGroup {
    bytes: Vec<u8>,
    /// Where each frame ends in `bytes`.
    ends: Vec<usize>,
    first_seq: u64,
    shard_frames: u64,
}

impl SealedGroup {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn shard_frames(&self) -> u64 {
        self.shard_frames
    }

    /// Sequence number of frame `i`.
    pub fn seq_of(&self, i: usize) -> u64 {
        self.first_seq + i as u64
    }

    fn range(&self, i: usize) -> std::ops::Range<usize> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        start..self.ends[i]
    }

    /// Frames `from..to`.
    pub fn frames(&self, from: usize, to: usize) -> impl Iterator<Item = &[u8]> + '_ {
        (from..to).map(|i| &self.bytes[self.range(i)])
    }

    /// Whether frame `i` is a shard frame (the others are headers).
    pub fn is_shard(&self, i: usize) -> bool {
        self.bytes.get(self.range(i).start + 5) == Some(&(weir_proto::FrameKind::Shard as u8))
    }

    /// Numbers frames `from..` anew from `first`: frames held back (a
    /// paused link) must not fall behind the receiver's replay window.
    pub fn renumber_from(&mut self, from: usize, first: u64, sealer: &FrameSealer) {
        for i in from..self.len() {
            let r = self.range(i);
            sealer.renumber(&mut self.bytes[r], first + (i - from) as u64);
        }
        self.first_seq = first.wrapping_sub(from as u64);
    }

    fn clear(&mut self, first_seq: u64) {
        self.bytes.clear();
        self.ends.clear();
        self.first_seq = first_seq;
        self.shard_frames = 0;
    }
}

/// A worker's tools: its copy of the sealer, codecs, and buffers reused
/// from group to group: each block of the group whole (its data shards are
/// its pieces, framed from there), and each block's parity shards.
pub struct GroupSealer {
    sealer: FrameSealer,
    codecs: Codecs,
    blocks: Vec<Vec<u8>>,
    parity: Vec<Vec<Vec<u8>>>,
}

impl GroupSealer {
    pub fn new(sealer: FrameSealer) -> Self {
        GroupSealer {
            sealer,
            codecs: Codecs::default(),
            blocks: Vec::new(),
            parity: Vec::new(),
        }
    }

    /// Seals `job` into `out`. An error names why the payload cannot be
    /// sent (missing, short, unreadable file).
    pub fn seal(&mut self, job: &GroupJob, out: &mut SealedGroup) -> Result<(), String> {
        out.clear(job.first_seq);
        let file = File::open(&job.path).map_err(|e| format!("{}: {e}", job.path.display()))?;
        let on_disk = file.metadata().map(|m| m.len()).unwrap_or(0);
        let wanted = job.offset.saturating_add(job.len);
        // A payload file is exactly the object; an archive holds it at offset.
        if (job.offset == 0 && on_disk != job.len) || on_disk < wanted {
            return Err(format!(
                "{} is {on_disk} bytes, expected {wanted}",
                job.path.display(),
            ));
        }
        let fec = job.fec;
        let codec = self.codecs.get(fec).map_err(|e| e.to_string())?;
        let count = job.blocks as usize;
        if self.blocks.len() < count {
            self.blocks.resize_with(count, Vec::new);
            self.parity.resize_with(count, Vec::new);
        }
        let whole = fec.block_bytes() as usize;
        for rel in 0..job.blocks {
            let b = job.first_block + rel;
            let n = fec.block_len(job.len, b);
            let block = &mut self.blocks[rel as usize];
            block.resize(whole, 0);
            file.read_exact_at(
                &mut block[..n],
                job.offset + u64::from(b) * fec.block_bytes(),
            )
            .map_err(|e| format!("{}: {e}", job.path.display()))?;
            // A short last block is padded with zeros, as `encode` pads
            // it; the buffer may hold an earlier block's bytes there.
            block[n..].fill(0);
            codec
                .encode_parity(block, &mut self.parity[rel as usize])
                .map_err(|e| e.to_string())?;
        }
        let (k, s) = (fec.data_shards, fec.shard_size as usize);
        let header = Body::ObjectHeader(ObjectHeader {
            id: job.object,
            kind: job.kind,
            len: job.len,
            sha256: job.object.0,
            fec,
        });
        let frames = group_frames(job.blocks, fec, job.header_every) as usize;
        out.bytes.reserve(frames * (fec.shard_size as usize + 128));
        let mut seq = job.first_seq;
        // Tags are left until a run of frames is written: signing several
        // at once hashes them side by side, and a run small enough to stay
        // in the cache is signed before it leaves it.
        let sealer = &self.sealer;
        let mut signed = 0;
        let mut push = |out: &mut SealedGroup, body: &Body<'_>| -> Result<(), String> {
            sealer.seal_unsigned(seq, body, &mut out.bytes);
            out.ends.push(out.bytes.len());
            seq += 1;
            if out.ends.len() - signed >= SIGN_AT_ONCE {
                sign_from(sealer, out, signed, &job.path)?;
                signed = out.ends.len();
            }
            Ok(())
        };
        push(out, &header)?;
        let mut since_header = 0;
        for (rel, index) in interleave(job.blocks, fec.total_shards(), job.blocks) {
            if since_header >= job.header_every {
                push(out, &header)?;
                since_header = 0;
            }
            push(
                out,
                &Body::Shard(ShardFrame {
                    object: job.object,
                    kind: job.kind,
                    object_len: job.len,
                    fec,
                    block: job.first_block + rel,
                    index,
                    payload: if index < k {
                        let at = usize::from(index) * s;
                        &self.blocks[rel as usize][at..at + s]
                    } else {
                        &self.parity[rel as usize][usize::from(index - k)]
                    },
                }),
            )?;
            out.shard_frames += 1;
            since_header += 1;
        }
        debug_assert_eq!(out.len(), frames);
        sign_from(sealer, out, signed, &job.path)
    }
}

/// Frames signed in one run: a few runs of the sixteen-lane tag kernel,
/// about 190 KB of 1472-byte frames, which a core's cache still holds.
const SIGN_AT_ONCE: usize = 128;

/// Signs the group's frames from frame `from` on.
fn sign_from(
    sealer: &FrameSealer,
    out: &mut SealedGroup,
    from: usize,
    path: &Path,
) -> Result<(), String> {
    let start = if from == 0 { 0 } else { out.ends[from - 1] };
    let ends: Vec<usize> = out.ends[from..].iter().map(|e| e - start).collect();
    if ends.is_empty() || sealer.sign_run(&mut out.bytes[start..], &ends) {
        Ok(())
    } else {
        Err(format!(
            "{}: frames of the group out of place",
            path.display()
        ))
    }
}

/// A job, its place in the link's order, and what the carousel is told
/// of it once sent.
pub struct Work {
    pub job: GroupJob,
    /// The carousel's count of groups given out before this one.
    pub turn: u64,
    pub ticket: Ticket,
}

/// Seals jobs and hands each to the link, which sends it in its turn,
/// until the carousel hangs up, the link fails or shutdown. A worker seals
/// into one group buffer at a time; a group sealed ahead of its turn waits
/// in the link with its buffer, so memory stays a few groups' worth.
pub fn run_worker(
    jobs: &Mutex<Receiver<Work>>,
    link: &Link,
    done: &Sender<Done>,
    shutdown: &Shutdown,
    sealer: FrameSealer,
) {
    // Turns are taken in order: a worker that dies holding one would stall
    // every later one.
    struct StopOnPanic<'a>(&'a Link, &'a Shutdown);
    impl Drop for StopOnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.break_off(self.1);
            }
        }
    }
    let _stop = StopOnPanic(link, shutdown);
    let mut tools = GroupSealer::new(sealer);
    let mut out = SealedGroup::default();
    loop {
        let work = {
            let jobs = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match jobs.recv() {
                Ok(w) => w,
                Err(_) => return,
            }
        };
        let broken = tools.seal(&work.job, &mut out).err();
        match link.hand_in(work.turn, work.ticket, out, broken, done, shutdown) {
            Some(next) => out = next,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::{Frame, FrameOpener, Key, KeyRing};

    fn key() -> Key {
        Key::from_bytes(1, &[9; 32]).unwrap()
    }

    fn open(frame: &[u8]) -> Frame<'_> {
        FrameOpener::new(KeyRing::new(vec![key()]).unwrap())
            .open(frame)
            .unwrap()
    }

    fn job(dir: &std::path::Path, data: &[u8], fec: FecParams, header_every: u32) -> GroupJob {
        let path = dir.join("payload");
        std::fs::write(&path, data).unwrap();
        let len = data.len() as u64;
        let fec = fec.for_object(len);
        GroupJob {
            object: ObjectId([3; 32]),
            kind: ObjectKind::Blob,
            len,
            fec,
            first_block: 0,
            blocks: fec.blocks_for(len),
            path,
            offset: 0,
            first_seq: 100,
            header_every,
        }
    }

    /// A group of several signing runs (over 500 frames): every frame's
    /// tag verifies, across the runs' seams too.
    #[test]
    fn a_group_is_sealed_in_wire_order_with_consecutive_numbers_and_the_data_intact() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..30_001u32).map(|i| (i * 7) as u8).collect();
        let fec = FecParams::new(4, 2, 100).unwrap();
        let job = job(dir.path(), &data, fec, 5);
        let mut out = SealedGroup::default();
        GroupSealer::new(FrameSealer::new(key(), 1))
            .seal(&job, &mut out)
            .unwrap();
        let blocks = job.blocks;
        assert_eq!(out.len() as u64, group_frames(blocks, job.fec, 5));
        assert_eq!(out.shard_frames(), u64::from(blocks) * 6);
        let mut rebuilt = vec![0u8; blocks as usize * 400];
        let mut order = Vec::new();
        let mut since_header = 0;
        for (i, f) in out.frames(0, out.len()).enumerate() {
            let frame = open(f);
            assert_eq!(frame.header.seq, 100 + i as u64);
            match frame.body {
                Body::ObjectHeader(h) => {
                    assert!(i == 0 || since_header == 5, "header at {i}");
                    assert!(!out.is_shard(i));
                    assert_eq!((h.id, h.len), (job.object, 30_001));
                    since_header = 0;
                }
                Body::Shard(s) => {
                    assert!(out.is_shard(i));
                    order.push((s.block, s.index));
                    if s.index < 4 {
                        let at = (s.block as usize * 4 + s.index as usize) * 100;
                        rebuilt[at..at + 100].copy_from_slice(s.payload);
                    }
                    since_header += 1;
                }
                Body::Heartbeat(_) => panic!("no heartbeat in a group"),
            }
        }
        let expected: Vec<_> = interleave(blocks, 6, blocks).collect();
        assert_eq!(order, expected);
        assert!(out.len() > 4 * SIGN_AT_ONCE, "{} frames", out.len());
        assert_eq!(&rebuilt[..30_001], &data[..]);
    }

    /// The parity frames rebuild lost data shards, also for a short last
    /// block sealed by a worker whose buffers held a longer object before
    /// (its padding is zeros, not the earlier bytes).
    #[test]
    fn parity_frames_rebuild_lost_data_shards_of_every_block() {
        let dir = tempfile::tempdir().unwrap();
        let fec = FecParams::new(4, 2, 100).unwrap();
        let mut tools = GroupSealer::new(FrameSealer::new(key(), 1));
        let mut out = SealedGroup::default();
        let long: Vec<u8> = (0..4000u32).map(|i| (i * 13 + 5) as u8).collect();
        tools
            .seal(&job(dir.path(), &long, fec, 256), &mut out)
            .unwrap();
        let data: Vec<u8> = (0..1250u32).map(|i| (i * 7 + 1) as u8).collect();
        let job = job(dir.path(), &data, fec, 256);
        tools.seal(&job, &mut out).unwrap();
        let codec = weir_proto::BlockCodec::new(job.fec).unwrap();
        let mut blocks: Vec<Vec<Option<Vec<u8>>>> = vec![vec![None; 6]; job.blocks as usize];
        for f in out.frames(0, out.len()) {
            if let Body::Shard(s) = open(f).body {
                blocks[s.block as usize][s.index as usize] = Some(s.payload.to_vec());
            }
        }
        let mut rebuilt = Vec::new();
        for mut shards in blocks {
            // Two data shards lost: only the parity can bring them back.
            shards[0] = None;
            shards[2] = None;
            codec.reconstruct_data(&mut shards).unwrap();
            for shard in shards.into_iter().take(4) {
                rebuilt.extend(shard.unwrap());
            }
        }
        assert_eq!(&rebuilt[..data.len()], &data[..]);
        assert!(rebuilt[data.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_payload_of_the_wrong_size_is_named_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let fec = FecParams::new(4, 2, 100).unwrap();
        let mut job = job(dir.path(), &[1; 500], fec, 256);
        job.len = 600;
        let mut out = SealedGroup::default();
        let err = GroupSealer::new(FrameSealer::new(key(), 1))
            .seal(&job, &mut out)
            .unwrap_err();
        assert!(err.contains("expected 600"), "{err}");
        std::fs::remove_file(&job.path).unwrap();
        let err = GroupSealer::new(FrameSealer::new(key(), 1))
            .seal(&job, &mut out)
            .unwrap_err();
        assert!(err.contains("payload"), "{err}");
    }

    #[test]
    fn renumbered_frames_carry_fresh_numbers_from_where_the_link_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let fec = FecParams::new(4, 2, 100).unwrap();
        let job = job(dir.path(), &[5; 800], fec, 256);
        let sealer = FrameSealer::new(key(), 1);
        let mut out = SealedGroup::default();
        GroupSealer::new(sealer.clone())
            .seal(&job, &mut out)
            .unwrap();
        out.renumber_from(3, 50_000, &sealer);
        let seqs: Vec<u64> = out
            .frames(0, out.len())
            .map(|f| open(f).header.seq)
            .collect();
        assert_eq!(&seqs[..3], &[100, 101, 102]);
        assert!(seqs[3..]
            .iter()
            .copied()
            .eq(50_000..50_000 + (seqs.len() as u64 - 3)));
        assert_eq!(out.seq_of(3), 50_000);
    }
}
