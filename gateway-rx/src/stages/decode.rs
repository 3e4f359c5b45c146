//! The decode stage: rebuilds blocks from any k of their shards
//! (Reed-Solomon), off the store's thread.

use std::sync::mpsc::{Receiver, Sender};
use weir_host::Shutdown;
use weir_proto::Codecs;

use super::WorkResult;
use crate::shards::{self, DecodeJob};

/// Rebuilds the blocks the store hands over until the store hangs up.
pub fn run_decoder(jobs: Receiver<DecodeJob>, results: Sender<WorkResult>, shutdown: &Shutdown) {
    let mut codecs = Codecs::default();
    while let Ok(job) = jobs.recv() {
        if shutdown.is_triggered() {
            break; // the bitmap is the truth: undecoded blocks are found again at restart
        }
        let rebuilt = codecs
            .get(job.fec)
            .map_err(|e| e.to_string())
            .and_then(|codec| shards::decode_block(&job, codec).map_err(|e| e.to_string()));
        let result = WorkResult::Decoded {
            object: job.object,
            generation: job.generation,
            block: job.block,
            rebuilt,
        };
        if results.send(result).is_err() {
            break;
        }
    }
}
