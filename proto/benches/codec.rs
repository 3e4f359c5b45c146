//! Codec throughput: encode, parity in place, sign+encode and verify+decode at S=1400, for k=32 m=8
//! (the goodput figure's layout) and k=128 m=20 (gateway-tx's default).
//!
//! Run: `cargo bench -p weir-proto --bench codec`
//! Throughput is object (payload) bytes per second.
//!
//! `lost/N` drops the first N data shards of every block: every block needs
//! decoding, always with the same erasure pattern. `random5` drops each
//! frame with probability 5 % (seeded): the patterns differ from block to
//! block, as on a lossy link, so each one costs a matrix inversion.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use weir_proto::{
    BlockCodec, Body, FecParams, FrameOpener, FrameSealer, Key, KeyRing, ObjectId, ObjectKind,
    ShardFrame,
};

const LAYOUTS: [(u16, u16); 2] = [(32, 8), (128, 20)];
const S: u32 = 1400;
const OBJECT_LEN: usize = 8 << 20;

fn object() -> Vec<u8> {
    (0..OBJECT_LEN)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()[7])
        .collect()
}

/// Frames back to back, as gateway-tx keeps a sealed group.
#[derive(Default)]
struct Frames {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Frames {
    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

/// Encodes and seals every shard of the object into frames, as gateway-tx
/// does: each block held whole (zero-padded when short), its parity
/// computed in place, its data shards framed from the block's pieces, the
/// block's frames written, then signed at once.
fn seal_object(codec: &BlockCodec, sealer: &FrameSealer, data: &[u8], out: &mut Frames) {
    let p = codec.params();
    let s = p.shard_size as usize;
    let id = ObjectId([3; 32]);
    let mut whole = vec![0; p.block_bytes() as usize];
    let mut parity = Vec::new();
    let mut block_frames = Frames::default();
    out.bytes.clear();
    out.ends.clear();
    let mut seq = 0;
    for (block, chunk) in data.chunks(p.block_bytes() as usize).enumerate() {
        whole[..chunk.len()].copy_from_slice(chunk);
        whole[chunk.len()..].fill(0);
        codec.encode_parity(&whole, &mut parity).unwrap();
        block_frames.bytes.clear();
        block_frames.ends.clear();
        let shards = whole
            .chunks_exact(s)
            .chain(parity.iter().map(Vec::as_slice));
        for (index, payload) in shards.enumerate() {
            let body = Body::Shard(ShardFrame {
                object: id,
                kind: ObjectKind::Blob,
                object_len: data.len() as u64,
                fec: p,
                block: block as u32,
                index: index as u16,
                payload,
            });
            sealer.seal_unsigned(seq, &body, &mut block_frames.bytes);
            block_frames.ends.push(block_frames.bytes.len());
            seq += 1;
        }
        assert!(sealer.sign_run(&mut block_frames.bytes, &block_frames.ends));
        let base = out.bytes.len();
        out.bytes.extend_from_slice(&block_frames.bytes);
        out.ends.extend(block_frames.ends.iter().map(|e| base + e));
    }
}

/// Which shards of each block arrive.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// The first N data shards of every block are lost.
    FirstData(usize),
    /// Each frame is lost with this probability, seeded.
    Random(f64),
}

fn bench(c: &mut Criterion) {
    let key = Key::from_bytes(1, &[7; 32]).unwrap();
    let data = object();
    let mut frames = Frames::default();

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(OBJECT_LEN as u64));
    g.sample_size(10);

    for (k, m) in LAYOUTS {
        let params = FecParams::new(k, m, S).unwrap();
        let codec = BlockCodec::new(params).unwrap();
        let layout = format!("{k}+{m}");
        g.bench_function(BenchmarkId::new("encode", &layout), |b| {
            let mut shards = Vec::new();
            b.iter(|| {
                for chunk in data.chunks(params.block_bytes() as usize) {
                    codec.encode(chunk, &mut shards).unwrap();
                }
            })
        });
        g.bench_function(BenchmarkId::new("parity in place", &layout), |b| {
            let mut parity = Vec::new();
            let mut whole = vec![0; params.block_bytes() as usize];
            b.iter(|| {
                for chunk in data.chunks(params.block_bytes() as usize) {
                    whole[..chunk.len()].copy_from_slice(chunk);
                    whole[chunk.len()..].fill(0);
                    codec.encode_parity(&whole, &mut parity).unwrap();
                }
            })
        });
        g.bench_function(BenchmarkId::new("sign+encode", &layout), |b| {
            let sealer = FrameSealer::new(key.clone(), 1);
            b.iter(|| seal_object(&codec, &sealer, &data, &mut frames))
        });

        let sealer = FrameSealer::new(key.clone(), 1);
        seal_object(&codec, &sealer, &data, &mut frames);
        let opener = FrameOpener::new(KeyRing::new(vec![key.clone()]).unwrap());
        let n = params.total_shards() as usize;
        let losses: &[Loss] = if k == 32 {
            &[
                Loss::FirstData(0),
                Loss::FirstData(1),
                Loss::FirstData(4),
                Loss::FirstData(8),
                Loss::Random(0.05),
            ]
        } else {
            &[Loss::FirstData(0), Loss::Random(0.05)]
        };
        for &loss in losses {
            let name = match loss {
                Loss::FirstData(n) => format!("{layout}/lost/{n}"),
                Loss::Random(_) => format!("{layout}/random5"),
            };
            // The frames that arrive, per block: fixed for the benchmark so
            // every iteration decodes the same patterns. Blocks that lost
            // more than m keep k of their shards (a later pass would fill them).
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let arrived: Vec<Vec<bool>> = (0..frames.len())
                .step_by(n)
                .map(|first| {
                    let mut keep: Vec<bool> = (first..(first + n).min(frames.len()))
                        .map(|i| match loss {
                            Loss::FirstData(lost) => i >= lost,
                            Loss::Random(p) => !rng.gen_bool(p),
                        })
                        .collect();
                    let mut short =
                        (k as usize).saturating_sub(keep.iter().filter(|x| **x).count());
                    for x in keep.iter_mut().rev() {
                        if short == 0 {
                            break;
                        }
                        if !*x {
                            *x = true;
                            short -= 1;
                        }
                    }
                    keep
                })
                .collect();
            g.bench_function(BenchmarkId::new("verify+decode", name), |b| {
                let mut block: Vec<Option<Vec<u8>>> = vec![None; n];
                let mut out = Vec::with_capacity(OBJECT_LEN);
                let mut opened = Vec::new();
                b.iter(|| {
                    out.clear();
                    for (bi, keep) in arrived.iter().enumerate() {
                        for slot in block.iter_mut() {
                            *slot = None;
                        }
                        // A batch as the link hands it to a verifier.
                        let batch: Vec<&[u8]> = (0..keep.len())
                            .filter(|&i| keep[i])
                            .map(|i| frames.get(bi * n + i))
                            .collect();
                        opener.open_many(&batch, &mut opened);
                        for frame in opened.drain(..) {
                            if let Body::Shard(s) = frame.unwrap().body {
                                block[s.index as usize] = Some(s.payload.to_vec());
                            }
                        }
                        codec.reconstruct_data(&mut block).unwrap();
                        let want = params.block_len(OBJECT_LEN as u64, bi as u32);
                        let mut left = want;
                        for sh in block[..k as usize].iter().flatten() {
                            let take = left.min(sh.len());
                            out.extend_from_slice(&sh[..take]);
                            left -= take;
                        }
                    }
                    assert_eq!(out.len(), OBJECT_LEN);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
