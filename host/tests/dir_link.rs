//! The directory link end to end: a DirSink writes batch files into an
//! outbox, a file-transfer service carries them to an inbox — late, twice,
//! cut short or damaged, on a seed — and a DirSource reads them. Every frame
//! of every file that arrived whole is received intact; damage costs only
//! what it touched.

use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_host::link::{DirSink, DirSource, FrameBatch, FrameSink, FrameSource};
use weir_host::new_session_id;
use weir_proto::framing::batch::FILE_HEADER_LEN;
use weir_proto::*;

fn key() -> Key {
    Key::from_bytes(3, &[0x33; 32]).unwrap()
}

fn sealed_frames(n: u32) -> Vec<Vec<u8>> {
    let mut sealer = FrameSealer::new(key(), new_session_id(None));
    let fec = FecParams::new(4, 2, 128).unwrap();
    let object_len = 128 * 4 * u64::from(n);
    (0..n)
        .map(|i| {
            let payload = vec![i as u8; 128];
            let mut out = Vec::new();
            sealer.seal(
                &Body::Shard(ShardFrame {
                    object: ObjectId([9; 32]),
                    kind: ObjectKind::Blob,
                    object_len,
                    fec,
                    block: i / 6,
                    index: (i % 6) as u16,
                    payload: &payload,
                }),
                &mut out,
            );
            out
        })
        .collect()
}

/// What the service did to the files it carried.
#[derive(Debug, Default)]
struct Carried {
    files: usize,
    late: usize,
    twice: usize,
    truncated: usize,
    corrupted: usize,
    /// Records declared by files delivered whole (at least once).
    whole_records: usize,
}

/// Drops `bytes` into the inbox the way a careful service does: temporary
/// name, then rename.
fn deliver(inbox: &Path, name: &str, bytes: &[u8]) {
    let tmp = inbox.join(format!(".{name}.partial.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, inbox.join(name)).unwrap();
}

/// Moves finished outbox files to the inbox, damaging some.
fn carry(outbox: PathBuf, inbox: PathBuf, sender_done: Arc<AtomicBool>, seed: u64) -> Carried {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut carried = Carried::default();
    let mut held_back: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let done = sender_done.load(Ordering::SeqCst);
        let mut names: Vec<String> = std::fs::read_dir(&outbox)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".weir") && !n.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            let path = outbox.join(&name);
            let bytes = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            let declared = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
            // Every fault in turn; where a file is cut or hit is random.
            match carried.files % 8 {
                0 => {
                    carried.late += 1;
                    carried.whole_records += declared;
                    held_back.push((name, bytes));
                }
                1 => {
                    carried.twice += 1;
                    carried.whole_records += declared;
                    deliver(&inbox, &name, &bytes);
                    deliver(&inbox, &format!("{name}.again.weir"), &bytes);
                }
                2 => {
                    carried.truncated += 1;
                    let cut = rng.gen_range(1..bytes.len());
                    deliver(&inbox, &name, &bytes[..cut]);
                }
                3 => {
                    carried.corrupted += 1;
                    let mut bad = bytes.clone();
                    for _ in 0..rng.gen_range(1..4) {
                        let at = rng.gen_range(FILE_HEADER_LEN..bad.len());
                        bad[at] ^= 1 << rng.gen_range(0..8);
                    }
                    deliver(&inbox, &name, &bad);
                }
                _ => {
                    carried.whole_records += declared;
                    deliver(&inbox, &name, &bytes);
                }
            }
            carried.files += 1;
        }
        if done {
            // Files that were held up arrive last, after newer ones.
            for (name, bytes) in held_back.drain(..) {
                deliver(&inbox, &name, &bytes);
            }
            return carried;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn frames_cross_a_faulty_file_transfer_service() {
    let outbox = tempfile::tempdir().unwrap();
    let inbox = tempfile::tempdir().unwrap();
    let frames = sealed_frames(600);

    let mut sink = DirSink::new(outbox.path(), 4096, Duration::from_millis(200)).unwrap();
    let sender_done = Arc::new(AtomicBool::new(false));
    let to_send = frames.clone();
    let done = sender_done.clone();
    let sender = std::thread::spawn(move || {
        for chunk in to_send.chunks(8) {
            let refs: Vec<&[u8]> = chunk.iter().map(|f| f.as_slice()).collect();
            sink.send(&refs).unwrap();
        }
        sink.flush().unwrap();
        let files = sink.files_written();
        done.store(true, Ordering::SeqCst);
        files
    });
    let (from, to, done) = (
        outbox.path().to_path_buf(),
        inbox.path().to_path_buf(),
        sender_done.clone(),
    );
    let service = std::thread::spawn(move || carry(from, to, done, 0xd1_0de));

    let mut source = DirSource::new(inbox.path())
        .unwrap()
        .with_settle(Duration::ZERO);
    let mut batch = FrameBatch::new(16, 2048);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "inbox not drained in time");
        source.recv(&mut batch, Duration::from_millis(50)).unwrap();
        got.extend(batch.iter().map(|f| f.to_vec()));
        let inbox_empty = std::fs::read_dir(inbox.path()).unwrap().next().is_none();
        if batch.is_empty() && service.is_finished() && inbox_empty {
            break;
        }
    }
    let files_written = sender.join().expect("sender");
    let carried = service.join().expect("service");
    let stats = source.stats();

    let opener = FrameOpener::new(KeyRing::new(vec![key()]).unwrap());
    let mut intact = HashSet::new();
    let mut refused = 0;
    for f in &got {
        match opener.open(f) {
            Ok(opened) => {
                assert_eq!(
                    &frames[opened.header.seq as usize], f,
                    "opened frame differs from what was sent"
                );
                intact.insert(opened.header.seq);
            }
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "sent {} frames in {files_written} files; {carried:?}; received {} ({} distinct intact, {refused} refused); {stats:?}",
        frames.len(),
        got.len(),
        intact.len()
    );
    assert_eq!(carried.files as u64, files_written);
    assert!(files_written > 20, "files are bounded in size");
    assert!(
        carried.late > 0 && carried.twice > 0 && carried.truncated > 0 && carried.corrupted > 0
    );
    // Every frame of every file that arrived whole, including the late ones.
    assert!(
        intact.len() >= carried.whole_records,
        "{} < {}",
        intact.len(),
        carried.whole_records
    );
    assert!(intact.len() < frames.len(), "damage cost nothing");
    // Every cut file reads short; damage can make a file read short too.
    assert!(stats.short_files as usize >= carried.truncated);
    assert!(stats.short_files as usize <= carried.truncated + carried.corrupted);
    // Files delivered twice show up twice; the copies are harmless.
    assert!(got.len() > intact.len() + refused);
    assert_eq!(stats.files as usize, carried.files + carried.twice);
}
