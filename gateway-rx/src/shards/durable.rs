//! What a bitmap may claim: shards that are on disk past an fsync.
//!
//! The claim takes [`Durable`] (a batch's payloads) and [`RebuiltShards`]
//! (the decoder's), and only the steps that fsync make those: a bitmap
//! cannot claim a shard before its bytes are durable, whatever order the
//! caller writes its statements in.

use rustc_hash::FxHashMap as HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use weir_proto::ObjectId;

use super::{io_err, LiveObject, Payload, PendingShard, ShardStoreError, StagingFiles};
use crate::state::fsync_dir;

/// Largest single write when coalescing adjacent shards.
const WRITE_RUN: usize = 1 << 20;
/// Parts per `pwritev` (the kernel's IOV_MAX).
const WRITE_PARTS: usize = 1024;

/// A batch planned on the store's thread: which payloads go where, and
/// which are dropped. Written and fsynced on the writer's thread, so the
/// store takes the next frames while the page cache fills and the disk
/// syncs.
pub(super) struct WriteBatch {
    pending: Vec<PendingShard>,
    /// Per pending shard: not to be written, so never to be claimed.
    dropped: Vec<bool>,
    /// Each object's files, once; `writes` refer to them by position.
    objects: Vec<Arc<StagingFiles>>,
    /// (object, parity file?, offset, pending shard), sorted.
    writes: Vec<(u16, bool, u64, usize)>,
    /// Staging files were created in this directory since the last batch:
    /// their directory entries are fsynced too.
    new_files_in: Option<PathBuf>,
}

/// A batch's payloads written to the staging files, not yet fsynced.
struct Written {
    batch: WriteBatch,
    /// Each file written (data or parity of one object), once.
    touched: Vec<(bool, Arc<StagingFiles>)>,
}

/// A batch's shards durably on disk: made only by [`WriteBatch::write`],
/// after the fsync.
pub(super) struct Durable {
    pending: Vec<PendingShard>,
    dropped: Vec<bool>,
}

/// A batch that could not be made durable: none of its shards may be
/// claimed; they come again with a later pass.
pub(super) struct Failed {
    pub(super) error: ShardStoreError,
}

impl Durable {
    /// The batch's shards that are on disk.
    pub(super) fn shards(&self) -> impl Iterator<Item = &PendingShard> + '_ {
        self.pending
            .iter()
            .zip(&self.dropped)
            .filter(|(_, dropped)| !**dropped)
            .map(|(p, _)| p)
    }

    /// Shards of the batch not written: their object is gone, or they are
    /// parity of a block whose data shards are all in.
    pub(super) fn dropped(&self) -> usize {
        self.dropped.iter().filter(|d| **d).count()
    }

    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// The batch's shards, claimed or not, to take off the queue.
    pub(super) fn into_pending(self) -> Vec<PendingShard> {
        self.pending
    }
}

/// Plans a batch: where each payload goes, adjacent shards to be coalesced
/// into one write. Parity of a block whose data shards are all in once the
/// shards queued so far land is never needed: it is dropped, not written.
pub(super) fn plan(
    pending: Vec<PendingShard>,
    live: &HashMap<ObjectId, LiveObject>,
    new_files_in: Option<PathBuf>,
) -> WriteBatch {
    let mut objects: Vec<(ObjectId, Arc<StagingFiles>)> = Vec::new();
    let mut dropped = vec![false; pending.len()];
    let mut writes: Vec<(u16, bool, u64, usize)> = Vec::with_capacity(pending.len());
    for (i, p) in pending.iter().enumerate() {
        let Some(live) = live.get(&p.object).filter(|l| l.generation == p.generation) else {
            dropped[i] = true;
            continue;
        };
        let f = live.record.fec;
        let s = f.shard_size as u64;
        let (parity, off) = if p.index < f.data_shards {
            (
                false,
                (p.block as u64 * f.data_shards as u64 + p.index as u64) * s,
            )
        } else {
            if live.assembly.data_complete_with_queued(p.block) {
                dropped[i] = true;
                continue;
            }
            let j = (p.index - f.data_shards) as u64;
            (true, (p.block as u64 * f.parity_shards as u64 + j) * s)
        };
        // A batch holds a handful of objects: a linear search beats
        // hashing a digest per shard.
        let at = match objects.iter().position(|(o, _)| *o == p.object) {
            Some(at) => at,
            None => {
                objects.push((p.object, live.files.clone()));
                objects.len() - 1
            }
        };
        writes.push((at as u16, parity, off, i));
    }
    writes.sort_unstable();
    WriteBatch {
        pending,
        dropped,
        objects: objects.into_iter().map(|(_, f)| f).collect(),
        writes,
        new_files_in,
    }
}

impl WriteBatch {
    /// Shards in the batch, dropped ones too.
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Writes the payloads, then fsyncs what was written: the only way to
    /// a [`Durable`] batch.
    pub(super) fn write(self) -> Result<Durable, Failed> {
        match sync_together(vec![self.land()]).pop() {
            Some(done) => done,
            None => unreachable!("one batch in, one outcome out"),
        }
    }

    /// Writes the payloads into the page cache and lets go of their
    /// memory; the fsync is still owed.
    fn land(mut self) -> Result<Written, Failed> {
        let touched = self.write_payloads().map_err(|error| Failed { error })?;
        for p in &mut self.pending {
            // A lent receive buffer goes back once its last shard is here.
            p.payload = Payload::default();
        }
        Ok(Written {
            batch: self,
            touched,
        })
    }

    fn write_payloads(&self) -> Result<Vec<(bool, Arc<StagingFiles>)>, ShardStoreError> {
        let mut touched: Vec<(u16, bool, Arc<StagingFiles>)> = Vec::new();
        let mut run = WriteRun::default();
        for &(at, parity, off, i) in &self.writes {
            let files = &self.objects[at as usize];
            // Sorted: each file's writes are one stretch, fsynced once.
            if !touched
                .last()
                .is_some_and(|(o, par, _)| *o == at && *par == parity)
            {
                touched.push((at, parity, files.clone()));
            }
            let payload = &self.pending[i].payload;
            if !run.extends(files, parity, off, payload.len()) {
                run.flush()?;
                run.start(files.clone(), parity, off);
            }
            run.push(payload);
        }
        run.flush()?;
        Ok(touched.into_iter().map(|(_, p, f)| (p, f)).collect())
    }
}

/// Fsyncs the files of several landed batches once each (one journal
/// commit for all of them instead of one per batch), and gives each batch
/// its outcome in the order given: a batch that did not land stays failed,
/// and an fsync that fails fails every batch that landed.
fn sync_together(batches: Vec<Result<Written, Failed>>) -> Vec<Result<Durable, Failed>> {
    let mut files: Vec<(bool, &Arc<StagingFiles>)> = Vec::new();
    let mut dirs: Vec<&PathBuf> = Vec::new();
    for w in batches.iter().flatten() {
        for (parity, f) in &w.touched {
            if !files
                .iter()
                .any(|(p, g)| *p == *parity && Arc::ptr_eq(g, f))
            {
                files.push((*parity, f));
            }
        }
        if let Some(dir) = &w.batch.new_files_in {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    let mut error: Option<(PathBuf, std::io::Error)> = None;
    for (parity, f) in files {
        let (file, path) = if parity {
            (&f.parity, &f.parity_path)
        } else {
            (&f.data, &f.data_path)
        };
        if let Err(e) = file.sync_data() {
            error = Some((path.clone(), e));
            break;
        }
    }
    if error.is_none() {
        for dir in dirs {
            if let Err(e) = fsync_dir(dir) {
                error = Some((dir.clone(), e));
                break;
            }
        }
    }
    batches
        .into_iter()
        .map(|landed| {
            let w = landed?;
            match &error {
                // Each failed batch carries the error: io::Error is not
                // Clone, its kind and message are what matter.
                Some((path, e)) => Err(Failed {
                    error: io_err(path, "fsync")(std::io::Error::new(e.kind(), e.to_string())),
                }),
                None => Ok(Durable {
                    pending: w.batch.pending,
                    dropped: w.batch.dropped,
                }),
            }
        })
        .collect()
}

/// Data shards the decoder rebuilt into the data file, fsynced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuiltShards(Vec<u16>);

impl RebuiltShards {
    /// Fsyncs the data file the shards `indices` were written to.
    pub(super) fn sync(files: &StagingFiles, indices: Vec<u16>) -> Result<Self, ShardStoreError> {
        files
            .data
            .sync_data()
            .map_err(io_err(&files.data_path, "fsync"))?;
        Ok(RebuiltShards(indices))
    }

    pub fn indices(&self) -> &[u16] {
        &self.0
    }
}

/// Adjacent shards of one staging file, written with one `pwritev`.
#[derive(Default)]
struct WriteRun<'a> {
    files: Option<Arc<StagingFiles>>,
    parity: bool,
    start: u64,
    len: usize,
    parts: Vec<&'a [u8]>,
}

impl<'a> WriteRun<'a> {
    fn extends(&self, files: &Arc<StagingFiles>, parity: bool, off: u64, len: usize) -> bool {
        self.files.as_ref().is_some_and(|f| Arc::ptr_eq(f, files))
            && self.parity == parity
            && self.start + self.len as u64 == off
            && self.len + len <= WRITE_RUN
            && self.parts.len() < WRITE_PARTS
    }

    fn start(&mut self, files: Arc<StagingFiles>, parity: bool, off: u64) {
        self.files = Some(files);
        self.parity = parity;
        self.start = off;
    }

    fn push(&mut self, part: &'a [u8]) {
        self.len += part.len();
        self.parts.push(part);
    }

    fn flush(&mut self) -> Result<(), ShardStoreError> {
        if let Some(f) = self.files.take() {
            let (file, path) = if self.parity {
                (&f.parity, &f.parity_path)
            } else {
                (&f.data, &f.data_path)
            };
            write_parts_at(file, &self.parts, self.start)
                .map_err(io_err(path, "writing shards"))?;
        }
        self.parts.clear();
        self.len = 0;
        Ok(())
    }
}

/// Writes `parts` back to back at `offset`, all of them, in as few
/// `pwritev` calls as the kernel allows.
fn write_parts_at(file: &File, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut iovs: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let (mut first, mut at) = (0usize, offset);
    while first < iovs.len() {
        let count = (iovs.len() - first).min(WRITE_PARTS);
        // SAFETY: the iovecs point into `parts`, which outlive the call.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iovs.as_ptr().add(first),
                count as libc::c_int,
                at as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        at += n as u64;
        // Skip what was written; a partly written part is resumed.
        while n > 0 {
            let iov = &mut iovs[first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: n < iov_len, still inside the same part.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
        while first < iovs.len() && iovs[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

/// The threads that write and fsync the store's batches, in the order
/// given: `rx-writer` lands each batch in the page cache, lets go of its
/// payloads and hands it to `rx-sync`, which fsyncs together every batch
/// landed meanwhile. An fsync per 4 MiB batch cost this receiver more CPU
/// than landing the bytes, and one thread doing both was what its
/// throughput waited for; a slow disk now makes the groups larger instead.
pub(super) struct Writer {
    jobs: Option<std::sync::mpsc::Sender<WriteBatch>>,
    /// One notice per batch landed: its payloads' memory is free again.
    landed: std::sync::mpsc::Receiver<()>,
    done: std::sync::mpsc::Receiver<Result<Durable, Failed>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts the threads; None when the system refuses one (the store then
    /// writes its batches itself).
    pub(super) fn spawn() -> Option<Writer> {
        let (jobs, inbox) = std::sync::mpsc::channel::<WriteBatch>();
        let (to_sync, synced) = std::sync::mpsc::channel::<Result<Written, Failed>>();
        let (notice, landed) = std::sync::mpsc::channel();
        let (outbox, done) = std::sync::mpsc::channel();
        let refused = |e: std::io::Error| tracing::warn!(error = %e, "no writer thread; the store writes its batches itself");
        // Started first: should the writer not start, dropping `to_sync`
        // ends this one and the store writes in place.
        let sync = std::thread::Builder::new()
            .name("rx-sync".into())
            .spawn(move || {
                while let Ok(first) = synced.recv() {
                    let mut group = vec![first];
                    group.extend(synced.try_iter());
                    for result in sync_together(group) {
                        if outbox.send(result).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(refused)
            .ok()?;
        let write = std::thread::Builder::new()
            .name("rx-writer".into())
            .spawn(move || {
                for batch in inbox {
                    let written = batch.land();
                    let _ = notice.send(());
                    if to_sync.send(written).is_err() {
                        break;
                    }
                }
            })
            .map_err(refused)
            .ok()?;
        Some(Writer {
            jobs: Some(jobs),
            landed,
            done,
            threads: vec![write, sync],
        })
    }

    /// Batches landed since the last call; with `wait`, waits for one
    /// (none when the writer is gone).
    pub(super) fn landed(&self, wait: bool) -> usize {
        let first = if wait {
            usize::from(self.landed.recv().is_ok())
        } else {
            0
        };
        first + self.landed.try_iter().count()
    }

    /// Hands a batch over; gives it back when the thread is gone.
    pub(super) fn send(&self, batch: WriteBatch) -> Result<(), WriteBatch> {
        match &self.jobs {
            Some(jobs) => jobs.send(batch).map_err(|e| e.0),
            None => Err(batch),
        }
    }

    /// The next batch done, in the order sent; with `wait`, waits for it.
    /// None when none is done (or, waiting, the thread is gone).
    pub(super) fn next_done(&self, wait: bool) -> Option<Result<Durable, Failed>> {
        if wait {
            self.done.recv().ok()
        } else {
            self.done.try_recv().ok()
        }
    }
}

impl Drop for Writer {
    /// Batches still queued are written, never claimed: as after a crash
    /// between the two, their shards come again.
    fn drop(&mut self) {
        self.jobs.take();
        // The writer first: its end is what ends the sync thread.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
