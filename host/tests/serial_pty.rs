//! The serial link over real pseudo-terminals: sealed frames go through a
//! SerialSink, a damaging one-way line between two socat pty pairs, and a
//! SerialSource; what opens is intact, what was damaged is dropped.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::{Faults, FaultyLine, PtyPair};
use weir_host::link::{FrameBatch, FrameSink, FrameSource, LinkError, SerialSink, SerialSource};
use weir_host::new_session_id;
use weir_proto::*;

const BAUD: u32 = 230_400;
const MAX_FRAME: usize = 1024;

fn key() -> Key {
    Key::from_bytes(7, &[0x42; 32]).unwrap()
}

/// A few hundred frames of each kind, sealed.
fn sealed_frames(n: u32) -> Vec<Vec<u8>> {
    let mut sealer = FrameSealer::new(key(), new_session_id(None));
    let fec = FecParams::new(2, 1, 96).unwrap();
    let object_len = 96 * 2 * u64::from(n);
    (0..n)
        .map(|i| {
            let payload: Vec<u8> = (0..96).map(|j| (i * 31 + j) as u8).collect();
            let body = match i % 5 {
                0 => Body::Heartbeat(Heartbeat {
                    uptime_s: u64::from(i),
                    queued_objects: 0,
                    pass: 1,
                    config_fingerprint: 0xfeed,
                    sent_frames: u64::from(i),
                    ledger: None,
                }),
                _ => Body::Shard(ShardFrame {
                    object: ObjectId([0xab; 32]),
                    kind: ObjectKind::Blob,
                    object_len,
                    fec,
                    block: i / 3,
                    index: (i % 3) as u16,
                    payload: &payload,
                }),
            };
            let mut out = Vec::new();
            sealer.seal(&body, &mut out);
            out
        })
        .collect()
}

/// Receives until the sender is done and the line has been quiet a while.
fn receive_all(
    source: &mut SerialSource,
    sender: &std::thread::JoinHandle<Duration>,
    deadline: Instant,
) -> Vec<Vec<u8>> {
    let mut batch = FrameBatch::new(32, MAX_FRAME);
    let mut got = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        source.recv(&mut batch, Duration::from_millis(200)).unwrap();
        if batch.is_empty() {
            if sender.is_finished() && quiet_since.elapsed() > Duration::from_millis(1500) {
                break;
            }
        } else {
            quiet_since = Instant::now();
            got.extend(batch.iter().map(|f| f.to_vec()));
        }
    }
    got
}

#[test]
fn frames_cross_a_damaging_serial_line_intact_or_not_at_all() {
    if !support::have_socat("frames_cross_a_damaging_serial_line_intact_or_not_at_all") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream = PtyPair::new(dir.path(), "up");
    let downstream = PtyPair::new(dir.path(), "down");
    let faults = Faults {
        seed: 0x5eed_0005,
        drop_run: 1.0 / 4000.0,
        max_run: 40,
        flip: 1.0 / 6000.0,
        noise: 1.0 / 8000.0,
    };
    let line = FaultyLine::start(&upstream.b, &downstream.a, u64::from(BAUD / 10), faults);
    let mut source = SerialSource::open(&downstream.b, BAUD, MAX_FRAME).unwrap();
    let mut sink = SerialSink::open(&upstream.a, BAUD, MAX_FRAME).unwrap();
    assert_eq!(sink.line_rate(), u64::from(BAUD / 10));

    let frames = sealed_frames(300);
    let to_send = frames.clone();
    let sender = std::thread::spawn(move || {
        let started = Instant::now();
        for chunk in to_send.chunks(10) {
            let refs: Vec<&[u8]> = chunk.iter().map(|f| f.as_slice()).collect();
            sink.send(&refs).unwrap();
        }
        let elapsed = started.elapsed();
        // Pacing: no faster than the line, give or take one burst.
        let burst = LinePacer::for_baud(BAUD, started).burst();
        let line_time = (sink.bytes_sent() - burst as u64) as f64 / sink.line_rate() as f64;
        assert!(
            elapsed.as_secs_f64() >= line_time,
            "{} bytes in {elapsed:?}, faster than the line",
            sink.bytes_sent()
        );
        elapsed
    });

    let got = receive_all(
        &mut source,
        &sender,
        Instant::now() + Duration::from_secs(60),
    );
    sender.join().expect("sender");
    let damage = line.finish();
    let stats = source.stats();

    let by_seq: HashMap<u64, &Vec<u8>> = frames
        .iter()
        .map(|f| (frame::peek_header(f).unwrap().0.seq, f))
        .collect();
    let opener = FrameOpener::new(KeyRing::new(vec![key()]).unwrap());
    let mut intact = 0;
    let mut refused = 0;
    let mut seen = std::collections::HashSet::new();
    for f in &got {
        match opener.open(f) {
            Ok(opened) => {
                assert_eq!(
                    by_seq[&opened.header.seq], f,
                    "opened frame differs from what was sent"
                );
                assert!(
                    seen.insert(opened.header.seq),
                    "frame {} twice",
                    opened.header.seq
                );
                intact += 1;
            }
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "sent {}, intact {intact}, refused by HMAC {refused}, framing {stats:?}, line {damage:?}",
        frames.len()
    );
    assert!(damage.faults() > 0, "the line damaged nothing");
    assert!(
        intact < frames.len(),
        "every frame survived a damaging line"
    );
    assert!(
        intact * 10 >= frames.len() * 7,
        "only {intact} of {} arrived",
        frames.len()
    );
    assert!(
        stats.rejected + refused as u64 > 0,
        "damaged frames were not dropped"
    );
    assert_eq!(stats.frames as usize, got.len());
}

#[test]
fn an_undamaged_pty_line_delivers_every_frame_in_order() {
    if !support::have_socat("an_undamaged_pty_line_delivers_every_frame_in_order") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::new(dir.path(), "clean");
    // Garbage already on the line before the receiver's first frame.
    let mut source = SerialSource::open(&pair.b, 460_800, MAX_FRAME).unwrap();
    // Written through a plain file, which takes no flock: a socat that a
    // parallel test forks while this is open would share a locked
    // description until its exec, and the sink's exclusive open below
    // would find the port taken.
    let mut noise = std::fs::OpenOptions::new()
        .write(true)
        .open(&pair.a)
        .unwrap();
    std::io::Write::write_all(&mut noise, b"\xffboot noise\x01\x02").unwrap();
    drop(noise);
    let mut sink = SerialSink::open(&pair.a, 460_800, MAX_FRAME).unwrap();
    let frames = sealed_frames(60);
    let sent = frames.clone();
    let sender = std::thread::spawn(move || {
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        sink.send(&refs).unwrap();
        assert!(matches!(
            sink.send(&[&[0u8; MAX_FRAME + 1][..]]),
            Err(LinkError::FrameTooLarge { .. })
        ));
        Duration::ZERO
    });
    let got = receive_all(
        &mut source,
        &sender,
        Instant::now() + Duration::from_secs(30),
    );
    sender.join().expect("sender");
    assert_eq!(got, sent);
    assert_eq!(source.stats().rejected, 1, "the boot noise");
}

#[test]
fn opening_a_missing_device_names_it() {
    let err = SerialSource::open(std::path::Path::new("/nonexistent/tty"), 9600, 100)
        .err()
        .expect("no such device");
    assert!(err.to_string().contains("/nonexistent/tty"), "{err}");
}
