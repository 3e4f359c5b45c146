//! The finish stage: hashes objects ahead as their leading blocks become
//! final, checks a whole object's sha256, moves it into the blob store and
//! tells the image ledger.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use weir_host::crash::crash_point;
use weir_host::Shutdown;
use weir_proto::ObjectKind;

use super::{FinishOutcome, WorkResult};
use crate::blobs::{BlobStore, BlobStoreError, RunningDigest, RunningDigests};
use crate::images::ImageLedger;
use crate::shards::{self, DigestJob, FinishJob};
use crate::state::now_ms;
use crate::status::Counters;

/// The finisher's work, in the order the store handed it out: an object's
/// digest jobs come before its finish.
pub enum FinisherJob {
    Digest(DigestJob),
    Finish(FinishJob),
}

pub fn run_finisher(
    jobs: Receiver<FinisherJob>,
    results: Sender<WorkResult>,
    blobs: BlobStore,
    ledger: Arc<ImageLedger>,
    counters: Arc<Counters>,
    shutdown: &Shutdown,
) {
    let mut running = RunningDigests::default();
    let stop = || shutdown.is_triggered();
    while let Ok(job) = jobs.recv() {
        let job = match job {
            FinisherJob::Digest(d) => {
                let file = &d.files.data;
                if let Err(e) = running.advance(d.object, d.generation, file, d.upto, &stop) {
                    tracing::warn!(digest = %d.object, error = %e, path = %d.files.data_path.display(),
                        "hashing ahead failed; the finish hashes the whole object");
                }
                continue;
            }
            FinisherJob::Finish(job) => job,
        };
        let digest = running.take(&job.object, job.generation);
        let outcome = finish(&job, digest, &blobs, &ledger, &counters, shutdown);
        let result = WorkResult::Finished {
            object: job.object,
            generation: job.generation,
            outcome,
        };
        if results.send(result).is_err() {
            break;
        }
    }
}

/// Checks a whole object's sha256 and moves it into the blob store; then
/// tells the image ledger.
fn finish(
    job: &FinishJob,
    digest: RunningDigest,
    blobs: &BlobStore,
    ledger: &ImageLedger,
    counters: &Counters,
    shutdown: &Shutdown,
) -> FinishOutcome {
    let kind = shards::kind_name(job.kind);
    let (verified, failed) = match job.kind {
        ObjectKind::Blob => (&counters.blobs_verified, &counters.blobs_failed),
        ObjectKind::Image => (
            &counters.image_objects_verified,
            &counters.image_objects_failed,
        ),
    };
    // Drop the padding of the last block: the file becomes the object.
    if let Err(e) = job.files.data.set_len(job.len) {
        tracing::error!(digest = %job.object, kind, error = %e, path = %job.files.data_path.display(),
            "cannot trim staged object");
        return FinishOutcome::Failed;
    }
    let hashed_ahead = digest.hashed();
    match blobs.adopt_hashed(&job.files.data_path, &job.object, digest, &|| {
        shutdown.is_triggered()
    }) {
        Ok(len) => {
            // In the blob store, durably, and no stage has recorded it yet:
            // a restart must find it from the store alone.
            match job.kind {
                ObjectKind::Blob => crash_point("rx.finish.blob-adopted"),
                ObjectKind::Image => crash_point("rx.finish.image-adopted"),
            }
            Counters::add(verified, 1);
            tracing::info!(digest = %job.object, kind, len, hashed_ahead,
                seconds_from_first_frame = now_ms().saturating_sub(job.first_seen_ms) as f64 / 1000.0,
                "object verified");
            if let Err(e) = ledger.object_verified(job.object, job.kind, job.first_seen_ms) {
                if job.kind == ObjectKind::Image {
                    Counters::add(&counters.image_objects_failed, 1);
                }
                tracing::error!(digest = %job.object, kind, error = %e, "verified object not usable");
            }
            FinishOutcome::Verified
        }
        Err(BlobStoreError::Interrupted { .. }) => FinishOutcome::Interrupted,
        Err(e @ BlobStoreError::Mismatch { .. }) => {
            Counters::add(failed, 1);
            tracing::warn!(digest = %job.object, kind, error = %e,
                "object failed its sha256; discarded, waiting for the next pass");
            FinishOutcome::Failed
        }
        Err(e) => {
            Counters::add(failed, 1);
            tracing::error!(digest = %job.object, kind, error = %e,
                "object could not enter the blob store; discarded, waiting for the next pass");
            FinishOutcome::Failed
        }
    }
}
