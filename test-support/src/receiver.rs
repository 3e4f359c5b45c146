//! A receiver reduced to what sender tests check: frames verified, shards
//! kept (some discarded on a seed, as a lossy link would), objects rebuilt
//! with the FEC codec and checked by sha256.

use std::collections::{BTreeMap, HashMap};
use weir_proto::{BlockCodec, Body, FecParams, FrameOpener, Key, KeyRing, ObjectId, ObjectKind};

/// Shard frames as the receiver sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenShard {
    pub session: u64,
    pub object: ObjectId,
    pub block: u32,
    pub index: u16,
}

/// What the receiver holds of one object: kind, length, FEC layout, shards.
pub type HeldObject = (ObjectKind, u64, FecParams, BTreeMap<(u32, u16), Vec<u8>>);

/// The receiving side, reduced to what the tests check: frames verified,
/// shards kept, objects rebuilt with the FEC codec and checked by sha256.
pub struct Reassembler {
    opener: FrameOpener,
    pub shards: HashMap<ObjectId, HeldObject>,
    pub headers: HashMap<ObjectId, u64>,
    pub heartbeats: u64,
    pub order: Vec<SeenShard>,
}

impl Reassembler {
    /// A receiver that accepts frames sealed with `key`.
    pub fn new(key: Key) -> Reassembler {
        Reassembler {
            opener: FrameOpener::new(KeyRing::new(vec![key]).expect("one key is a valid key ring")),
            shards: HashMap::new(),
            headers: HashMap::new(),
            heartbeats: 0,
            order: Vec::new(),
        }
    }

    /// Verifies and files every frame; discards shard frames with
    /// probability `loss_percent` (seeded, so the test is repeatable), so
    /// rebuilding needs parity and repeated passes.
    pub fn feed(&mut self, frames: &[Vec<u8>], loss_percent: u64) {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for f in frames {
            let frame = self.opener.open(f).expect("every frame verifies");
            match frame.body {
                Body::Heartbeat(_) => self.heartbeats += 1,
                Body::ObjectHeader(h) => {
                    assert_eq!(h.sha256, h.id.0);
                    *self.headers.entry(h.id).or_default() += 1;
                }
                Body::Shard(s) => {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    self.order.push(SeenShard {
                        session: frame.header.session_id,
                        object: s.object,
                        block: s.block,
                        index: s.index,
                    });
                    if rng % 100 < loss_percent {
                        continue;
                    }
                    let e = self
                        .shards
                        .entry(s.object)
                        .or_insert_with(|| (s.kind, s.object_len, s.fec, BTreeMap::new()));
                    e.3.insert((s.block, s.index), s.payload.to_vec());
                }
            }
        }
    }

    /// The object's bytes if every block can be rebuilt and the sha256 matches.
    pub fn object(&self, id: &ObjectId) -> Option<Vec<u8>> {
        let (_, len, fec, shards) = self.shards.get(id)?;
        let codec = BlockCodec::new(*fec).expect("a codec for the object's FEC layout");
        let mut out = Vec::with_capacity(*len as usize);
        for b in 0..fec.blocks_for(*len) {
            let mut slots: Vec<Option<Vec<u8>>> = (0..fec.total_shards())
                .map(|i| shards.get(&(b, i)).cloned())
                .collect();
            codec.reconstruct_data(&mut slots).ok()?;
            let data: Vec<u8> = slots[..fec.data_shards as usize]
                .iter()
                .flat_map(|s| s.clone().unwrap_or_default())
                .collect();
            out.extend_from_slice(&data[..fec.block_len(*len, b)]);
        }
        (ObjectId::of_bytes(&out) == *id).then_some(out)
    }

    pub fn image_objects(&self) -> Vec<ObjectId> {
        self.shards
            .iter()
            .filter(|(_, v)| v.0 == ObjectKind::Image)
            .map(|(k, _)| *k)
            .collect()
    }
}
