//! The store stage, on the gateway's own thread: takes verified frames in
//! batches into the shard store, hands each batch to the writer thread,
//! claims it once durable and hands the claim to the commit thread, hands
//! the blocks a committed claim finished to the decoder and whole objects
//! to the finisher, and applies what they report.
//!
//! A full state disk stops the store, not the gateway: while the disk of
//! state_dir holds less than `state_min_free_mb` (or after a write failed
//! for want of space, until space frees) verified frames are dropped and
//! counted, nothing is written, and the fault "state disk full" stands.
//! The bitmap never claimed a shard that is not on disk, so nothing is
//! corrupted, and later passes bring the dropped shards again.
//!
//! Between batches the store keeps its own house ([`StagingUpkeep`]): it
//! hears from retention and the image ledger which pruned objects to take
//! shards of again, and forgets staging leftovers that got no shard for
//! `keep_delivered_hours`.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_host::Shutdown;

use weir_host::reload::ReloadReader;

use super::finish::{FinisherJob, Finishers};
use super::link::Inbound;
use super::{FinishOutcome, WorkResult};
use crate::appliance::{is_disk_full, Fault, Faults, StateDisk};
use crate::config::RetentionConfig;
use crate::retention::{keep_ms, pass_every, StoreNotice};
use crate::shards::{BatchFailed, DecodeJob, ShardStore, Work};
use crate::state::now_ms;
use crate::status::{Counters, ObjectProgress};

/// Longest the store waits for frames before looking at its other work.
const STORE_POLL: Duration = Duration::from_millis(20);
/// How often the store looks at the state disk's free space.
const DISK_CHECK_EVERY: Duration = Duration::from_millis(250);
/// How often the progress board the report reads is refreshed.
const BOARD_EVERY: Duration = Duration::from_millis(500);
/// Longest the store waits for frames while the writer has a batch: its
/// claim should not wait for the next frame.
const CLAIM_POLL: Duration = Duration::from_millis(2);
/// Batches whose payloads are with the writer, not yet written, at once:
/// while it writes one, the next is ready.
const MAX_UNLANDED: usize = 2;
/// Batches written and not yet claimed, at once: they wait for the fsync
/// that covers them, and hold only their shards' keys.
const MAX_UNCLAIMED: usize = 16;
/// Claims applied to sled and not yet committed, at once: each holds its
/// blocks' bitmaps and its shards' keys.
const MAX_UNCOMMITTED: usize = 16;

/// The store loop's view of the state disk: whether shards may be written,
/// and the fault when not.
pub struct DiskWatch {
    disk: StateDisk,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
    full: bool,
    last_check: Option<Instant>,
}

impl DiskWatch {
    pub fn new(disk: StateDisk, faults: Arc<Faults>, counters: Arc<Counters>) -> Self {
        DiskWatch {
            disk,
            faults,
            counters,
            full: false,
            last_check: None,
        }
    }

    /// Looks at the free space every `DISK_CHECK_EVERY`.
    fn check_now_and_then(&mut self, store: &mut ShardStore) {
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < DISK_CHECK_EVERY)
        {
            return;
        }
        self.last_check = Some(Instant::now());
        match self.disk.check() {
            Ok(()) if self.full => {
                self.full = false;
                self.faults.clear(Fault::StateDiskFull);
                tracing::info!("state disk has room again; storing shards");
            }
            Ok(()) => {}
            Err(full) => {
                if !self.full {
                    tracing::error!(reason = %full, "state disk short of room (reason says bytes or inodes); verified frames are dropped until it has room again");
                    self.full = true;
                    self.drop_pending(store);
                }
                self.faults.raise(Fault::StateDiskFull, full.to_string());
            }
        }
    }

    /// A commit failed for want of space: its shards were not claimed.
    fn ran_out(&mut self, err: &dyn std::error::Error, shards: usize) {
        let full = self.disk.out_of_space();
        tracing::error!(error = %err, reason = %full,
            "state disk short of room (reason says bytes or inodes); shard batch not stored, frames are dropped until it has room again");
        Counters::add(&self.counters.frames_dropped_disk_full, shards as u64);
        self.faults.raise(Fault::StateDiskFull, full.to_string());
        self.full = true;
        self.last_check = Some(Instant::now());
    }

    fn drop_pending(&self, store: &mut ShardStore) {
        let n = store.discard_pending();
        Counters::add(&self.counters.frames_dropped_disk_full, n as u64);
    }

    /// Stores verified frames, or drops and counts them while the disk is full.
    fn store_or_drop(&mut self, store: &mut ShardStore, frames: Vec<Inbound>) {
        if self.full {
            Counters::add(&self.counters.frames_dropped_disk_full, frames.len() as u64);
            return;
        }
        for f in frames {
            let result = match f {
                Inbound::Shard(s) => store.accept(s).map(drop),
                Inbound::Header(h) => store.announce(h.id, h.kind, h.len, h.fec),
            };
            match result {
                Ok(()) => {}
                Err(e) if is_disk_full(&e) => {
                    let shards = store.pending_len();
                    store.discard_pending();
                    self.ran_out(&e, shards + 1);
                    // The rest of the batch is dropped too.
                    return;
                }
                Err(e) => tracing::error!(error = %e, "shard not stored"),
            }
        }
    }
}

/// What the store does between batches for retention.
pub struct StagingUpkeep {
    notices: Receiver<StoreNotice>,
    policy: ReloadReader<RetentionConfig>,
    counters: Arc<Counters>,
    last_sweep: Instant,
}

impl StagingUpkeep {
    pub fn new(
        notices: Receiver<StoreNotice>,
        policy: ReloadReader<RetentionConfig>,
        counters: Arc<Counters>,
    ) -> Self {
        StagingUpkeep {
            notices,
            policy,
            counters,
            last_sweep: Instant::now(),
        }
    }

    fn run(&mut self, store: &mut ShardStore) {
        while let Ok(notice) = self.notices.try_recv() {
            match notice {
                StoreNotice::Wanted(id) | StoreNotice::Released(id) => store.admit_again(&id),
            }
        }
        let policy = **self.policy.get();
        if self.last_sweep.elapsed() < pass_every(&policy) {
            return;
        }
        self.last_sweep = Instant::now();
        match store.release_idle(keep_ms(&policy), now_ms()) {
            Ok(gone) => {
                for (id, kind, len) in &gone {
                    tracing::info!(object = %id, kind = crate::shards::kind_name(*kind), len,
                        idle_hours = policy.keep_delivered_hours,
                        "staging leftover pruned: no shard for keep_delivered_hours (its shards start over if sent again)");
                }
                Counters::add(&self.counters.staging_pruned, gone.len() as u64);
            }
            Err(e) => tracing::error!(error = %e, "pruning staging leftovers failed"),
        }
    }
}

fn apply_result(store: &mut ShardStore, result: WorkResult) {
    match result {
        WorkResult::Decoded {
            object,
            generation,
            block,
            rebuilt,
        } => match rebuilt {
            Ok(indices) => store.decoded(object, generation, block, indices),
            Err(e) => {
                tracing::warn!(object = %object, block, error = %e, "block not rebuilt; waiting for more shards");
                store.decode_failed(object, generation, block);
            }
        },
        WorkResult::Finished {
            object,
            generation,
            outcome,
        } => {
            let r = match outcome {
                FinishOutcome::Verified => store.finished(object, generation, true),
                FinishOutcome::Failed => store.finished(object, generation, false),
                FinishOutcome::Interrupted => {
                    store.finish_interrupted(object);
                    Ok(())
                }
            };
            if let Err(e) = r {
                tracing::error!(object = %object, error = %e, "staging cleanup failed");
            }
        }
    }
}

/// The store stage's ends: where frames come from, where work goes, where
/// results come back, and the board the report reads.
pub struct StoreStage {
    pub store: ShardStore,
    pub disk: DiskWatch,
    pub inbound: Receiver<Vec<Inbound>>,
    pub results: Receiver<WorkResult>,
    pub decode: Sender<DecodeJob>,
    pub finish: Finishers,
    pub board: Arc<Mutex<Vec<ObjectProgress>>>,
    pub upkeep: StagingUpkeep,
}

/// The store after its loop, with the intake closed: what remains is to
/// take the last results in once the workers have stopped.
pub struct Settling {
    store: ShardStore,
    results: Receiver<WorkResult>,
    board: Arc<Mutex<Vec<ObjectProgress>>>,
}

impl StoreStage {
    /// Hands work to the decoder and the finishers.
    pub fn dispatch(&mut self, work: Vec<Work>) {
        for w in work {
            // The receiving threads outlive the store loop; a send can only
            // fail during shutdown, when the work is redone after restart.
            let _ = match w {
                Work::Decode(job) => self.decode.send(job).map_err(drop),
                Work::Digest(job) => self.finish.send(FinisherJob::Digest(job)).map_err(drop),
                Work::Finish(job) => self.finish.send(FinisherJob::Finish(job)).map_err(drop),
            };
        }
    }

    /// The store loop, until shutdown; then the intake closes: the last
    /// batch is committed and the workers are told there is no more work.
    pub fn run(mut self, shutdown: &Shutdown) -> Settling {
        let mut last_board = Instant::now();
        while !shutdown.is_triggered() {
            self.turn(shutdown);
            if last_board.elapsed() >= BOARD_EVERY {
                self.publish();
                last_board = Instant::now();
            }
        }
        tracing::info!("gateway-rx stopping");
        drop(self.inbound);
        if self.disk.full {
            self.disk.drop_pending(&mut self.store);
        }
        if let Err(e) = self.store.commit() {
            tracing::error!(error = %e, "last shard batch not committed");
        }
        Settling {
            store: self.store,
            results: self.results,
            board: self.board,
        }
    }

    /// One turn of the loop: frames in, results in, a commit when due.
    fn turn(&mut self, shutdown: &Shutdown) {
        self.disk.check_now_and_then(&mut self.store);
        let wait = self
            .store
            .commit_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(STORE_POLL)
            .min(if self.store.in_flight() > 0 || self.store.claiming() > 0 {
                CLAIM_POLL
            } else {
                STORE_POLL
            });
        match self.inbound.recv_timeout(wait) {
            Ok(frames) => self.disk.store_or_drop(&mut self.store, frames),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if !shutdown.is_triggered() {
                    tracing::error!("link thread ended; stopping");
                    shutdown.trigger();
                }
            }
        }
        // Drain what else is waiting, without blocking.
        while let Ok(frames) = self.inbound.try_recv() {
            self.disk.store_or_drop(&mut self.store, frames);
            if self.store.should_commit() {
                break;
            }
        }
        while let Ok(result) = self.results.try_recv() {
            apply_result(&mut self.store, result);
        }
        self.upkeep.run(&mut self.store);
        while let Some(done) = self.store.claim_next(false) {
            self.take_claimed(done);
        }
        while let Some(done) = self.store.take_committed(false) {
            self.take_claimed(done);
        }
        while self.store.claiming() >= MAX_UNCOMMITTED {
            match self.store.take_committed(true) {
                Some(done) => self.take_claimed(done),
                None => break,
            }
        }
        if !self.disk.full && self.store.should_commit() {
            // Memory holds the batches the writer has yet to write and the
            // one filling.
            while self.store.unlanded() >= MAX_UNLANDED {
                self.store.wait_landed();
            }
            while self.store.in_flight() >= MAX_UNCLAIMED {
                match self.store.claim_next(true) {
                    Some(done) => self.take_claimed(done),
                    None => break,
                }
            }
            self.store.start_commit();
        }
    }

    /// Hands out the work a claimed batch brought, or says why it was not.
    fn take_claimed(&mut self, done: Result<Vec<Work>, BatchFailed>) {
        match done {
            Ok(work) => self.dispatch(work),
            Err(f) if is_disk_full(&f.error) => self.disk.ran_out(&f.error, f.shards),
            Err(f) => {
                tracing::error!(error = %f.error, "shard batch not committed; its shards come again with the next pass")
            }
        }
    }

    fn publish(&self) {
        *self.board.lock().unwrap_or_else(|e| e.into_inner()) = self.store.progress();
    }
}

impl Settling {
    /// Takes in what the stopped decoder and finisher reported last, and
    /// commits it.
    pub fn settle(mut self) {
        while let Ok(result) = self.results.try_recv() {
            apply_result(&mut self.store, result);
        }
        if let Err(e) = self.store.commit() {
            tracing::error!(error = %e, "last decoded shards not committed");
        }
        *self.board.lock().unwrap_or_else(|e| e.into_inner()) = self.store.progress();
    }
}
