//! The durable delivery queue: one job per complete image and target, kept
//! in sled with its retry schedule, so that a dead registry or a restart
//! never loses a completed image.

use serde::{Deserialize, Serialize};
use weir_proto::ObjectId;

use crate::state::{StateDb, StateError};
use crate::status::{DeliveryState, DeliveryView};

const TREE: &str = "deliveries";

/// Where an image goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    Registry,
    OciLayout,
}

impl Target {
    fn byte(self) -> u8 {
        match self {
            Target::Registry => 0,
            Target::OciLayout => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Registry => "registry",
            Target::OciLayout => "oci-layout",
        }
    }
}

/// Why the last attempt failed, which decides the retry schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Not reachable, timed out, 5xx, 429: retried with backoff up to
    /// `retry_max_seconds`.
    Unavailable,
    /// 4xx or a local problem someone must fix: retried every
    /// `retry_refused_seconds`.
    Refused,
    /// The image's signature does not pass `[delivery] verify_signatures`:
    /// kept, never pushed as it is; checked again every
    /// `retry_refused_seconds` (a key added by a reload may pass it).
    Unverified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Pending,
    Done,
}

/// One image to one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryJob {
    /// Id of the image object (`sha256:`), whose transfer manifest is in the
    /// blob store.
    pub image: String,
    pub target: Target,
    /// Destination repository, after mapping.
    pub repository: String,
    pub tags: Vec<String>,
    pub manifest_digest: String,
    /// When the first frame of the image's objects arrived.
    pub first_frame_ms: u64,
    pub enqueued_ms: u64,
    pub state: JobState,
    /// Attempts started (recorded before each starts, so a crash midway is
    /// known on restart).
    pub attempts: u32,
    /// Failed attempts in a row: drives the backoff.
    pub failures: u32,
    pub next_attempt_ms: u64,
    pub failure: Option<FailureKind>,
    pub last_error: Option<String>,
    /// Tags already set, each recorded as soon as the registry took it.
    pub tags_done: Vec<String>,
    pub done_ms: Option<u64>,
}

/// What a new job is about: the image, where it goes, under which names.
pub struct JobFor<'a> {
    pub image: String,
    pub target: Target,
    pub repository: &'a str,
    pub tags: &'a [String],
    pub manifest_digest: &'a str,
    pub first_frame_ms: u64,
}

impl DeliveryJob {
    /// A job not yet attempted, queued at `enqueued_ms`.
    pub fn pending(what: JobFor<'_>, enqueued_ms: u64) -> DeliveryJob {
        DeliveryJob {
            image: what.image,
            target: what.target,
            repository: what.repository.to_string(),
            tags: what.tags.to_vec(),
            manifest_digest: what.manifest_digest.to_string(),
            first_frame_ms: what.first_frame_ms,
            enqueued_ms,
            state: JobState::Pending,
            attempts: 0,
            failures: 0,
            next_attempt_ms: 0,
            failure: None,
            last_error: None,
            tags_done: Vec::new(),
            done_ms: None,
        }
    }

    pub fn image_id(&self) -> Option<ObjectId> {
        ObjectId::from_digest(&self.image).ok()
    }

    /// `repository:tag` of the first tag, or the repository alone.
    pub fn reference(&self) -> String {
        match self.tags.first() {
            Some(t) => format!("{}:{}", self.repository, t),
            None => format!("{}@{}", self.repository, self.manifest_digest),
        }
    }

    pub fn view(&self) -> DeliveryView {
        let state = match (self.state, self.failure) {
            (JobState::Done, _) => DeliveryState::Done,
            (JobState::Pending, Some(FailureKind::Unverified)) => DeliveryState::Refused,
            (JobState::Pending, Some(_)) => DeliveryState::Failing,
            (JobState::Pending, None) => DeliveryState::Pending,
        };
        DeliveryView {
            image: self.image.clone(),
            target: self.target.name().to_string(),
            reference: self.reference(),
            manifest_digest: self.manifest_digest.clone(),
            state,
            attempts: self.attempts,
            next_attempt_ms: (self.state == JobState::Pending).then_some(self.next_attempt_ms),
            last_error: self.last_error.clone(),
            tags_done: self.tags_done.clone(),
            done_ms: self.done_ms,
        }
    }
}

/// The jobs, in the `deliveries` tree.
#[derive(Clone)]
pub struct DeliveryQueue {
    db: StateDb,
    tree: sled::Tree,
}

fn key(target: Target, image: &ObjectId) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = target.byte();
    k[1..].copy_from_slice(&image.0);
    k
}

impl DeliveryQueue {
    pub fn open(db: &StateDb) -> Result<DeliveryQueue, StateError> {
        Ok(DeliveryQueue {
            db: db.clone(),
            tree: db.tree(TREE)?,
        })
    }

    /// Adds the job unless one for this image and target exists already:
    /// enqueueing again after a crash must not deliver twice. Not durable
    /// until [`StateDb::commit`].
    pub fn enqueue(&self, job: &DeliveryJob) -> Result<bool, StateError> {
        let image =
            ObjectId::from_digest(&job.image).map_err(|e| self.db.corrupt(&job.image, e))?;
        let value = serde_json::to_vec(job).map_err(|e| self.db.corrupt(&job.image, e))?;
        let swapped = self
            .tree
            .compare_and_swap(key(job.target, &image), None as Option<&[u8]>, Some(value))
            .map_err(|e| self.db.sled_error(e))?;
        Ok(swapped.is_ok())
    }

    /// Stores the job's new state and makes it durable.
    pub fn save(&self, job: &DeliveryJob) -> Result<(), StateError> {
        let image =
            ObjectId::from_digest(&job.image).map_err(|e| self.db.corrupt(&job.image, e))?;
        let value = serde_json::to_vec(job).map_err(|e| self.db.corrupt(&job.image, e))?;
        self.tree
            .insert(key(job.target, &image), value)
            .map_err(|e| self.db.sled_error(e))?;
        self.db.commit("rx.delivery.job-saved")
    }

    pub fn get(&self, target: Target, image: &ObjectId) -> Result<Option<DeliveryJob>, StateError> {
        match self
            .tree
            .get(key(target, image))
            .map_err(|e| self.db.sled_error(e))?
        {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| self.db.corrupt(image.digest(), e)),
        }
    }

    /// Every job, done ones included.
    pub fn all(&self) -> Result<Vec<DeliveryJob>, StateError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let job: DeliveryJob =
                serde_json::from_slice(&v).map_err(|e| self.db.corrupt(hex::encode(&k), e))?;
            out.push(job);
        }
        Ok(out)
    }

    /// Jobs still to deliver, the earliest due first.
    pub fn pending(&self) -> Result<Vec<DeliveryJob>, StateError> {
        let mut jobs: Vec<DeliveryJob> = self
            .all()?
            .into_iter()
            .filter(|j| j.state == JobState::Pending)
            .collect();
        jobs.sort_by_key(|j| (j.next_attempt_ms, j.enqueued_ms));
        Ok(jobs)
    }

    /// Forgets delivered jobs finished before `before_ms` (history only).
    pub fn prune_done(&self, before_ms: u64) -> Result<usize, StateError> {
        let mut n = 0;
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let Ok(job) = serde_json::from_slice::<DeliveryJob>(&v) else {
                continue;
            };
            if job.state == JobState::Done && job.done_ms.is_some_and(|t| t < before_ms) {
                self.tree.remove(k).map_err(|e| self.db.sled_error(e))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// (pending, failing) counts.
    pub fn counts(&self) -> Result<(u64, u64), StateError> {
        let pending = self.pending()?;
        let failing = pending.iter().filter(|j| j.failure.is_some()).count();
        Ok((pending.len() as u64, failing as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn job(image: &ObjectId, target: Target) -> DeliveryJob {
        let what = JobFor {
            image: image.digest(),
            target,
            repository: "team/app",
            tags: &["1.0".to_string()],
            manifest_digest: "sha256:00",
            first_frame_ms: 1,
        };
        DeliveryJob::pending(what, 2)
    }

    #[test]
    fn enqueue_is_idempotent_and_jobs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = ObjectId::of_bytes(b"image");
        {
            let db = StateDb::open(&dir.path().join("db")).unwrap();
            let q = DeliveryQueue::open(&db).unwrap();
            assert!(q.enqueue(&job(&id, Target::Registry)).unwrap());
            let mut again = job(&id, Target::Registry);
            again.enqueued_ms = 99;
            assert!(
                !q.enqueue(&again).unwrap(),
                "a second enqueue must not replace the job"
            );
            assert!(q.enqueue(&job(&id, Target::OciLayout)).unwrap());
            let mut j = q.get(Target::Registry, &id).unwrap().unwrap();
            j.attempts = 3;
            j.failure = Some(FailureKind::Unavailable);
            q.save(&j).unwrap();
        }
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let q = DeliveryQueue::open(&db).unwrap();
        let j = q.get(Target::Registry, &id).unwrap().unwrap();
        assert_eq!((j.attempts, j.enqueued_ms), (3, 2));
        assert_eq!(q.counts().unwrap(), (2, 1));
        assert_eq!(j.view().state, "failing");

        let mut done = q.get(Target::OciLayout, &id).unwrap().unwrap();
        done.state = JobState::Done;
        done.done_ms = Some(1000);
        q.save(&done).unwrap();
        assert_eq!(q.prune_done(999).unwrap(), 0);
        assert_eq!(q.prune_done(1001).unwrap(), 1);
        assert_eq!(q.all().unwrap().len(), 1, "pending jobs are never pruned");
    }
}
