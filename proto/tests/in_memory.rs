//! An object crosses an in-memory link with loss, duplication, reordering,
//! corruption and a blackout, in several passes, and is rebuilt byte for
//! byte: sealed frames, FEC, the replay guard and block assembly, with
//! neither sockets nor files.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use weir_proto::assembly::{BlockProgress, ObjectAssembly, ObjectState};
use weir_proto::sim::{memory_link, Blackout, Faults, MemorySink, MemorySource};
use weir_proto::*;

const SECRET: [u8; 32] = [0x5a; 32];
const SEED: u64 = 0x77ee;

/// The sender: every pass announces the object and sends every shard of
/// every block once, interleaved.
struct Sender {
    sealer: FrameSealer,
    header: ObjectHeader,
    /// Shards of each block, data then parity.
    blocks: Vec<Vec<Vec<u8>>>,
    window: u32,
}

impl Sender {
    fn new(object: &[u8], params: FecParams) -> Sender {
        let fec = params.for_object(object.len() as u64);
        let codec = BlockCodec::new(fec).unwrap();
        let blocks = (0..fec.blocks_for(object.len() as u64))
            .map(|b| {
                let start = (b as u64 * fec.block_bytes()) as usize;
                let len = fec.block_len(object.len() as u64, b);
                let mut shards = Vec::new();
                codec
                    .encode(&object[start..start + len], &mut shards)
                    .unwrap();
                shards
            })
            .collect();
        let session = new_session_id(None, 1_700_000_000_000, 0x1234);
        Sender {
            sealer: FrameSealer::new(Key::from_bytes(1, &SECRET).unwrap(), session),
            header: ObjectHeader {
                id: ObjectId(Sha256::digest(object).into()),
                kind: ObjectKind::Blob,
                len: object.len() as u64,
                sha256: Sha256::digest(object).into(),
                fec,
            },
            blocks,
            window: 8,
        }
    }

    fn pass(&mut self, sink: &mut MemorySink) {
        let mut frames = Vec::new();
        let mut out = Vec::new();
        self.sealer
            .seal(&Body::ObjectHeader(self.header.clone()), &mut out);
        frames.push(out.clone());
        let fec = self.header.fec;
        for (block, index) in interleave(self.blocks.len() as u32, fec.total_shards(), self.window)
        {
            let body = Body::Shard(ShardFrame {
                object: self.header.id,
                kind: self.header.kind,
                object_len: self.header.len,
                fec,
                block,
                index,
                payload: &self.blocks[block as usize][index as usize],
            });
            self.sealer.seal(&body, &mut out);
            frames.push(out.clone());
        }
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        // In bursts, as a paced sender hands frames to its link.
        for chunk in refs.chunks(32) {
            sink.send(chunk);
        }
        sink.flush();
    }
}

/// What the receiver saw, to check that every fault was met.
#[derive(Debug, Default)]
struct Seen {
    refused: u64,
    replayed: u64,
    duplicate_shards: u64,
    blocks_decoded: u64,
    states: Vec<ObjectState>,
}

/// The receiver: opens frames, drops replays, keeps shard bytes in memory
/// and lets the assembly say what to rebuild.
struct Receiver {
    opener: FrameOpener,
    guard: ReplayGuard,
    assembly: Option<ObjectAssembly>,
    header: Option<ObjectHeader>,
    shards: HashMap<(u32, u16), Vec<u8>>,
    seen: Seen,
}

impl Receiver {
    fn new() -> Receiver {
        let keys = KeyRing::new(vec![Key::from_bytes(1, &SECRET).unwrap()]).unwrap();
        Receiver {
            opener: FrameOpener::new(keys),
            guard: ReplayGuard::new(),
            assembly: None,
            header: None,
            shards: HashMap::new(),
            seen: Seen::default(),
        }
    }

    fn drain(&mut self, source: &mut MemorySource) {
        let mut batch = Vec::new();
        loop {
            source.recv(&mut batch, 64);
            if batch.is_empty() {
                return;
            }
            for frame in &batch {
                self.admit(frame);
            }
        }
    }

    fn admit(&mut self, bytes: &[u8]) {
        let Ok(frame) = self.opener.open(bytes) else {
            self.seen.refused += 1;
            return;
        };
        let h = frame.header;
        match self.guard.check(h.key_id, h.session_id, h.seq) {
            ReplayVerdict::Fresh { .. } => {}
            ReplayVerdict::Replayed | ReplayVerdict::Stale => {
                self.seen.replayed += 1;
                return;
            }
        }
        match frame.body {
            Body::ObjectHeader(header) => {
                self.assembly
                    .get_or_insert_with(|| ObjectAssembly::new(header.fec, header.len));
                self.header = Some(header);
                self.note_state();
            }
            Body::Shard(shard) => self.store(&shard),
            Body::Heartbeat(_) => {}
        }
    }

    fn store(&mut self, shard: &ShardFrame<'_>) {
        // A shard carries the layout: its object can start without a header.
        let assembly = self
            .assembly
            .get_or_insert_with(|| ObjectAssembly::new(shard.fec, shard.object_len));
        if assembly.is_held(shard.block, shard.index) {
            self.seen.duplicate_shards += 1;
            return;
        }
        // The bytes first, then the bit that claims them.
        self.shards
            .insert((shard.block, shard.index), shard.payload.to_vec());
        match assembly.hold(shard.block, shard.index).unwrap() {
            BlockProgress::Decodable => {
                self.note_state();
                self.rebuild(shard.block);
            }
            BlockProgress::Duplicate => self.seen.duplicate_shards += 1,
            _ => {}
        }
        self.note_state();
    }

    fn rebuild(&mut self, block: u32) {
        let assembly = self.assembly.as_mut().unwrap();
        let Some(held) = assembly.start_decoding(block) else {
            return;
        };
        self.seen.states.push(assembly.state());
        let fec = assembly.fec();
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; fec.total_shards() as usize];
        for i in held {
            shards[i as usize] = self.shards.get(&(block, i)).cloned();
        }
        let missing: Vec<u16> = (0..fec.data_shards)
            .filter(|&i| shards[i as usize].is_none())
            .collect();
        let rebuilt = match BlockCodec::new(fec).unwrap().reconstruct_data(&mut shards) {
            Ok(()) => {
                for &i in &missing {
                    let bytes = shards[i as usize].take().unwrap();
                    self.shards.insert((block, i), bytes);
                }
                self.seen.blocks_decoded += 1;
                missing
            }
            Err(_) => Vec::new(),
        };
        assembly.decoded(block, &rebuilt);
    }

    fn note_state(&mut self) {
        if let Some(state) = self.assembly.as_ref().map(ObjectAssembly::state) {
            if self.seen.states.last() != Some(&state) {
                self.seen.states.push(state);
            }
        }
    }

    fn state(&self) -> Option<ObjectState> {
        self.assembly.as_ref().map(ObjectAssembly::state)
    }

    /// The object's bytes, once every block's data is held.
    fn object(&self) -> Option<Vec<u8>> {
        let a = self.assembly.as_ref()?;
        if a.state() != ObjectState::Complete {
            return None;
        }
        let fec = a.fec();
        let mut out = Vec::with_capacity(a.object_len() as usize);
        for block in 0..a.blocks() {
            let len = fec.block_len(a.object_len(), block);
            let mut data = Vec::with_capacity(fec.block_bytes() as usize);
            for i in 0..fec.data_shards {
                data.extend_from_slice(&self.shards[&(block, i)]);
            }
            out.extend_from_slice(&data[..len]);
        }
        Some(out)
    }
}

#[test]
fn an_object_is_rebuilt_through_a_lossy_reordering_link_in_several_passes() {
    let mut object = vec![0u8; 150_000];
    ChaCha8Rng::seed_from_u64(SEED).fill_bytes(&mut object);
    // k=16, m=4, S=1000: 10 blocks, 200 frames a pass.
    let mut sender = Sender::new(&object, FecParams::new(16, 4, 1000).unwrap());
    let faults = Faults {
        loss: 0.08,
        corrupt: 0.03,
        duplicate: 0.05,
        reorder: 0.1,
        reorder_depth: 40,
        // Half the first pass: more than any block can make up for.
        blackouts: vec![Blackout {
            from: 20,
            frames: 100,
        }],
    };
    let (mut sink, mut source) = memory_link(faults, SEED);
    let mut receiver = Receiver::new();

    let mut passes = 0;
    while receiver.state() != Some(ObjectState::Complete) {
        passes += 1;
        assert!(
            passes <= 6,
            "not rebuilt after 6 passes: {:?}",
            receiver.seen
        );
        sender.pass(&mut sink);
        receiver.drain(&mut source);
        if passes == 1 {
            assert_ne!(receiver.state(), Some(ObjectState::Complete));
        }
    }

    let rebuilt = receiver.object().unwrap();
    assert!(rebuilt == object, "rebuilt object differs");
    let header = receiver.header.as_ref().unwrap();
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&rebuilt)), header.sha256);

    let stats = sink.stats();
    let seen = &receiver.seen;
    assert!(passes >= 2, "one pass was enough: the blackout did nothing");
    assert!(stats.dropped_loss > 0 && stats.dropped_blackout == 100);
    assert!(
        stats.corrupted > 0 && seen.refused > 0,
        "{stats:?} {seen:?}"
    );
    assert!(
        stats.duplicated > 0 && seen.replayed > 0,
        "{stats:?} {seen:?}"
    );
    assert!(stats.reordered > 0);
    assert!(seen.duplicate_shards > 0, "later passes repeat held shards");
    assert!(seen.blocks_decoded > 0, "no block needed its parity");
    assert!(
        matches!(
            seen.states.first(),
            Some(ObjectState::Announced | ObjectState::Receiving)
        ),
        "{seen:?}"
    );
    assert!(seen.states.contains(&ObjectState::Decoding), "{seen:?}");
    assert_eq!(seen.states.last(), Some(&ObjectState::Complete));
}
