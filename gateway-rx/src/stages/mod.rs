//! The receiver's stages, one module each, in the order a frame meets them:
//!
//! ```text
//!  link ──▶ store ──▶ decode ──▶ store ──▶ finish ──▶ deliver
//!  (receive,  (shard     (Reed-      (commit)  (sha256,    (registry push,
//!   verify)    batches)   Solomon)              blob store) OCI layout)
//!                              report: status.json, LEDs, console
//!                              ledger: announced head, gaps, ledger copy
//! ```
//!
//! [`crate::gateway::run`] wires them; the durable state they work on
//! (shard store, blob store, image ledger, delivery queue, sled) lives
//! outside this folder.

pub mod decode;
pub mod deliver;
pub mod finish;
pub mod ledger;
pub mod link;
pub mod report;
pub mod store;

use weir_proto::ObjectId;

use crate::shards::RebuiltShards;

/// What the decoder and finisher report back to the store.
pub enum WorkResult {
    Decoded {
        object: ObjectId,
        generation: u64,
        block: u32,
        rebuilt: Result<RebuiltShards, String>,
    },
    Finished {
        object: ObjectId,
        generation: u64,
        outcome: FinishOutcome,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishOutcome {
    Verified,
    Failed,
    Interrupted,
}
