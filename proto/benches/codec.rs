//! Codec throughput: sign+encode and verify+decode at k=32, m=8, S=1400.
//!
//! Run: `cargo bench -p weir-proto --bench codec`
//! Throughput is object (payload) bytes per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use weir_proto::{
    BlockCodec, Body, FecParams, FrameOpener, FrameSealer, Key, KeyRing, ObjectId, ObjectKind,
    ShardFrame,
};

const K: u16 = 32;
const M: u16 = 8;
const S: u32 = 1400;
const OBJECT_LEN: usize = 8 << 20;

fn object() -> Vec<u8> {
    (0..OBJECT_LEN)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()[7])
        .collect()
}

/// Cuts, encodes and seals every shard of the object into frames.
fn seal_object(
    codec: &BlockCodec,
    sealer: &mut FrameSealer,
    data: &[u8],
    frames: &mut Vec<Vec<u8>>,
) {
    let p = codec.params();
    let id = ObjectId([3; 32]);
    let mut shards = Vec::new();
    let mut n = 0;
    for (block, chunk) in data.chunks(p.block_bytes() as usize).enumerate() {
        codec.encode(chunk, &mut shards).unwrap();
        for (index, payload) in shards.iter().enumerate() {
            let body = Body::Shard(ShardFrame {
                object: id,
                kind: ObjectKind::Blob,
                object_len: data.len() as u64,
                fec: p,
                block: block as u32,
                index: index as u16,
                payload,
            });
            if frames.len() <= n {
                frames.push(Vec::with_capacity(1500));
            }
            sealer.seal(&body, &mut frames[n]);
            n += 1;
        }
    }
    frames.truncate(n);
}

fn bench(c: &mut Criterion) {
    let params = FecParams::new(K, M, S).unwrap();
    let codec = BlockCodec::new(params).unwrap();
    let key = Key::from_bytes(1, &[7; 32]).unwrap();
    let data = object();
    let mut frames = Vec::new();

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(OBJECT_LEN as u64));
    g.sample_size(20);

    g.bench_function("sign+encode", |b| {
        let mut sealer = FrameSealer::new(key.clone(), 1);
        b.iter(|| seal_object(&codec, &mut sealer, &data, &mut frames))
    });

    let mut sealer = FrameSealer::new(key.clone(), 1);
    seal_object(&codec, &mut sealer, &data, &mut frames);
    let opener = FrameOpener::new(KeyRing::new(vec![key]).unwrap());
    let n = params.total_shards() as usize;
    for lost in [0usize, 1, 4, 8] {
        g.bench_with_input(
            BenchmarkId::new("verify+decode/lost", lost),
            &lost,
            |b, &lost| {
                let mut block: Vec<Option<Vec<u8>>> = vec![None; n];
                let mut out = Vec::with_capacity(OBJECT_LEN);
                b.iter(|| {
                    out.clear();
                    for (bi, block_frames) in frames.chunks(n).enumerate() {
                        for slot in block.iter_mut() {
                            *slot = None;
                        }
                        // Lose the first `lost` data shards: the worst case, every
                        // loss needs decoding.
                        for f in &block_frames[lost..] {
                            let frame = opener.open(f).unwrap();
                            if let Body::Shard(s) = frame.body {
                                block[s.index as usize] = Some(s.payload.to_vec());
                            }
                        }
                        codec.reconstruct_data(&mut block).unwrap();
                        let want = params.block_len(OBJECT_LEN as u64, bi as u32);
                        let mut left = want;
                        for sh in block[..K as usize].iter().flatten() {
                            let take = left.min(sh.len());
                            out.extend_from_slice(&sh[..take]);
                            left -= take;
                        }
                    }
                    assert_eq!(out.len(), OBJECT_LEN);
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
