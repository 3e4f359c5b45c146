//! The finish stage: hashes objects ahead as their leading blocks become
//! final, checks a whole object's sha256, moves it into the blob store and
//! tells the image ledger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SendError, Sender};
use std::sync::Arc;
use weir_host::crash::crash_point;
use weir_host::Shutdown;
use weir_proto::{ObjectId, ObjectKind};

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

/// Most finisher threads, and their names.
const FINISHER_NAMES: [&str; 4] = [
    "rx-finisher-0",
    "rx-finisher-1",
    "rx-finisher-2",
    "rx-finisher-3",
];

/// Finisher threads for this machine: one per core available to the
/// process, at most four. SHA-256 of one object is a chain no thread can
/// share, so one finisher caps the gateway near one core's hashing speed
/// (about 1.3 GB/s here, less its reads); objects in flight together are
/// hashed side by side instead.
pub fn finisher_names() -> &'static [&'static str] {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    &FINISHER_NAMES[..n.clamp(1, FINISHER_NAMES.len())]
}

/// Where the store hands finisher work: every job of one object goes to the
/// same finisher, so its digest jobs and its finish keep their order; a
/// new object goes to the finisher with the fewest jobs waiting, so that
/// one falling behind on an object does not also get the next.
pub struct Finishers {
    lanes: Vec<(Sender<FinisherJob>, Arc<AtomicUsize>)>,
    /// The finisher of each object with digest jobs out and no finish yet.
    holding: HashMap<ObjectId, usize>,
}

/// One finisher's end: its jobs, and the count of those not yet done that
/// the store routes by.
pub struct FinisherInbox {
    jobs: Receiver<FinisherJob>,
    waiting: Arc<AtomicUsize>,
}

impl Finishers {
    /// The store's end and `n` finishers' ends (at least one).
    pub fn new(n: usize) -> (Finishers, Vec<FinisherInbox>) {
        let (lanes, inboxes) = (0..n.max(1))
            .map(|_| {
                let (tx, jobs) = std::sync::mpsc::channel();
                let waiting = Arc::new(AtomicUsize::new(0));
                ((tx, waiting.clone()), FinisherInbox { jobs, waiting })
            })
            .unzip();
        let finishers = Finishers {
            lanes,
            holding: HashMap::new(),
        };
        (finishers, inboxes)
    }

    /// Hands `job` to its object's finisher. Fails only when that thread
    /// has stopped (shutdown).
    pub fn send(&mut self, job: FinisherJob) -> Result<(), SendError<FinisherJob>> {
        let lane = match &job {
            FinisherJob::Digest(d) => match self.holding.get(&d.object) {
                Some(&lane) => lane,
                None => {
                    let lane = self.least_waiting();
                    self.holding.insert(d.object, lane);
                    lane
                }
            },
            FinisherJob::Finish(f) => match self.holding.remove(&f.object) {
                Some(lane) => lane,
                None => self.least_waiting(),
            },
        };
        let (tx, waiting) = &self.lanes[lane];
        waiting.fetch_add(1, Ordering::Relaxed);
        tx.send(job)
    }

    fn least_waiting(&self) -> usize {
        (0..self.lanes.len())
            .min_by_key(|&i| self.lanes[i].1.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

impl FinisherInbox {
    /// The next job, once the one before is done; `None` once the store
    /// has gone.
    fn next(&self, done_before: bool) -> Option<FinisherJob> {
        if done_before {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        self.jobs.recv().ok()
    }
}

pub fn run_finisher(
    inbox: FinisherInbox,
    results: Sender<WorkResult>,
    blobs: BlobStore,
    ledger: Arc<ImageLedger>,
    counters: Arc<Counters>,
    shutdown: &Shutdown,
) {
    let mut running = RunningDigests::default();
    let stop = || shutdown.is_triggered();
    let mut done_before = false;
    while let Some(job) = inbox.next(done_before) {
        done_before = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::StagingFiles;

    fn files(dir: &tempfile::TempDir) -> Arc<StagingFiles> {
        let path = |name: &str| dir.path().join(name);
        Arc::new(StagingFiles {
            data: std::fs::File::create(path("data")).unwrap(),
            parity: std::fs::File::create(path("parity")).unwrap(),
            data_path: path("data"),
            parity_path: path("parity"),
        })
    }

    fn digest(object: u8, files: &Arc<StagingFiles>) -> FinisherJob {
        FinisherJob::Digest(DigestJob {
            object: ObjectId([object; 32]),
            generation: 1,
            upto: 0,
            files: files.clone(),
        })
    }

    fn finish(object: u8, files: &Arc<StagingFiles>) -> FinisherJob {
        FinisherJob::Finish(FinishJob {
            object: ObjectId([object; 32]),
            generation: 1,
            kind: ObjectKind::Blob,
            len: 0,
            first_seen_ms: 0,
            files: files.clone(),
        })
    }

    /// The jobs waiting at a finisher, taken and done: (object's byte,
    /// digest or finish).
    fn take_all(inbox: &FinisherInbox) -> Vec<(u8, &'static str)> {
        let mut got = Vec::new();
        while let Ok(job) = inbox.jobs.try_recv() {
            inbox.waiting.fetch_sub(1, Ordering::Relaxed);
            got.push(match job {
                FinisherJob::Digest(d) => (d.object.0[0], "digest"),
                FinisherJob::Finish(f) => (f.object.0[0], "finish"),
            });
        }
        got
    }

    #[test]
    fn an_objects_jobs_stay_on_one_finisher_and_the_next_object_avoids_a_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(&dir);
        let (mut finishers, inboxes) = Finishers::new(2);
        // 1 goes to the first; 2 to the second, as the first has a job
        // waiting; 1's jobs all follow it, even once the first is busier.
        for job in [
            digest(1, &f),
            digest(2, &f),
            digest(1, &f),
            digest(1, &f),
            finish(1, &f),
        ] {
            finishers.send(job).unwrap();
        }
        // The second finisher has done its work, the first has not: 3 goes
        // to the second, 2's finish too.
        assert_eq!(take_all(&inboxes[1]), vec![(2, "digest")]);
        for job in [digest(3, &f), finish(2, &f), finish(3, &f)] {
            finishers.send(job).unwrap();
        }
        assert_eq!(
            take_all(&inboxes[0]),
            vec![(1, "digest"), (1, "digest"), (1, "digest"), (1, "finish")]
        );
        assert_eq!(
            take_all(&inboxes[1]),
            vec![(3, "digest"), (2, "finish"), (3, "finish")]
        );
        // Nothing waits anywhere: a finish with no digest jobs before it
        // (a small object) goes to the first.
        finishers.send(finish(4, &f)).unwrap();
        assert_eq!(take_all(&inboxes[0]), vec![(4, "finish")]);
        assert!(finishers.holding.is_empty());
    }

    #[test]
    fn a_stopped_finisher_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(&dir);
        let (mut finishers, inboxes) = Finishers::new(1);
        drop(inboxes);
        assert!(finishers.send(digest(1, &f)).is_err());
    }
}
