//! Fuzz harness for the frame decoder, run for a bounded time.
//!
//! `WEIR_FUZZ_SECONDS` (default 3) bounds the run, `WEIR_FUZZ_SEED` replays
//! one. It feeds the decoder random bytes, mutated valid frames, and — since
//! random bytes never pass the HMAC — random and mutated bodies that are
//! correctly signed, so the body decoder and field checks see hostile input
//! too. The property: no input panics, and whatever opens re-seals to the
//! same bytes.

use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use std::time::{Duration, Instant};
use weir_proto::frame::seal_raw;
use weir_proto::*;

fn valid_frames(key: &Key) -> Vec<Vec<u8>> {
    let fec = FecParams::new(4, 2, 16).unwrap();
    let payload = [9u8; 16];
    let bodies = [
        Body::ObjectHeader(ObjectHeader {
            id: ObjectId([1; 32]),
            kind: ObjectKind::Blob,
            len: 100,
            sha256: [1; 32],
            fec,
        }),
        Body::Shard(ShardFrame {
            object: ObjectId([2; 32]),
            kind: ObjectKind::Image,
            object_len: 100,
            fec,
            block: 1,
            index: 5,
            payload: &payload,
        }),
        Body::Heartbeat(Heartbeat {
            uptime_s: 5,
            queued_objects: 2,
            pass: 1,
            config_fingerprint: 77,
            sent_frames: 1000,
            ledger: None,
        }),
    ];
    let mut sealer = FrameSealer::new(key.clone(), 99);
    bodies
        .iter()
        .map(|b| {
            let mut out = Vec::new();
            sealer.seal(b, &mut out);
            out
        })
        .collect()
}

fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>) {
    match rng.gen_range(0..5) {
        0 if !bytes.is_empty() => {
            let i = rng.gen_range(0..bytes.len());
            bytes[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if !bytes.is_empty() => {
            let i = rng.gen_range(0..bytes.len());
            bytes[i] = rng.gen();
        }
        2 => {
            let n = rng.gen_range(0..=bytes.len());
            bytes.truncate(n);
        }
        3 => {
            let i = rng.gen_range(0..=bytes.len());
            let extra: Vec<u8> = (0..rng.gen_range(1..8)).map(|_| rng.gen()).collect();
            bytes.splice(i..i, extra);
        }
        _ => {
            // Extreme varints: 0xff runs decode to huge lengths and counts.
            let i = rng.gen_range(0..=bytes.len());
            bytes.splice(i..i, std::iter::repeat_n(0xff, rng.gen_range(1..12)));
        }
    }
}

#[test]
fn frame_decoder_survives_hostile_input() {
    let seconds: u64 = std::env::var("WEIR_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("WEIR_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzzing frames for {seconds} s with WEIR_FUZZ_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let key = Key::from_bytes(1, &[0x42; 32]).unwrap();
    let opener = FrameOpener::new(KeyRing::new(vec![key.clone()]).unwrap());
    let seeds = valid_frames(&key);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut runs, mut opened) = (0u64, 0u64);
    let mut input = Vec::new();
    let mut resealed = Vec::new();
    while Instant::now() < deadline {
        for _ in 0..1000 {
            runs += 1;
            match rng.gen_range(0..4) {
                0 => {
                    input.resize(rng.gen_range(0..200), 0);
                    rng.fill_bytes(&mut input);
                }
                1 => {
                    input.clone_from(&seeds[rng.gen_range(0..seeds.len())]);
                    for _ in 0..rng.gen_range(1..4) {
                        mutate(&mut rng, &mut input);
                    }
                }
                2 => {
                    let mut body = vec![0u8; rng.gen_range(0..120)];
                    rng.fill_bytes(&mut body);
                    seal_raw(
                        &key,
                        rng.gen_range(0..5),
                        rng.gen(),
                        rng.gen(),
                        &body,
                        &mut input,
                    );
                }
                _ => {
                    // A valid body, mutated, then signed: only the decoder stands guard.
                    let src = &seeds[rng.gen_range(0..seeds.len())];
                    let mut body = src[28..src.len() - 32].to_vec();
                    for _ in 0..rng.gen_range(1..4) {
                        mutate(&mut rng, &mut body);
                    }
                    seal_raw(&key, src[5], 1, runs, &body, &mut input);
                }
            }
            if let Ok(frame) = opener.open(&input) {
                opened += 1;
                // Whatever opens is canonical: sealing it again gives the same body.
                let mut sealer = FrameSealer::new(key.clone(), frame.header.session_id);
                sealer.seal(&frame.body, &mut resealed);
                assert_eq!(
                    opener.open(&resealed).map(|f| f.body),
                    Ok(frame.body.clone()),
                    "seed {seed}"
                );
            }
        }
    }
    eprintln!("{runs} inputs, {opened} opened, no panic");
    assert!(runs > 0 && opened > 0, "the harness must reach the decoder");
}
