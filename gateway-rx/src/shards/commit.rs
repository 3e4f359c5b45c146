//! Claims committed off the store's thread.
//!
//! A claim is applied to sled on the store's thread, then `rx-commit`
//! makes it durable (sled's flush and the fsync of its files), once for
//! every claim applied while the last commit ran. The store takes the next
//! frames meanwhile: waiting for that commit was where its thread spent
//! most of its time off the CPU. What a claim found (blocks to decode,
//! objects to finish) is acted on only once a [`Committed`] covers it, so
//! nothing downstream rests on a bitmap a crash could still undo.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender};

use crate::state::{StateDb, StateError};

/// Every claim numbered up to `upto` is committed, or the commit that
/// would have covered them failed. Made only here, after the commit.
pub(super) struct Committed {
    upto: u64,
    result: Result<(), StateError>,
}

impl Committed {
    pub(super) fn covers(&self, ticket: u64) -> bool {
        ticket <= self.upto
    }

    pub(super) fn result(self) -> Result<(), StateError> {
        self.result
    }
}

/// The `rx-commit` thread, or the store's own thread when none could be
/// had.
pub(super) struct Committer {
    db: StateDb,
    asks: Option<Sender<u64>>,
    reports: Option<Receiver<Committed>>,
    /// Commits made on the store's thread, not yet reported.
    inline: VecDeque<Committed>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    pub(super) fn spawn(db: &StateDb) -> Committer {
        let (asks, inbox) = std::sync::mpsc::channel::<u64>();
        let (outbox, reports) = std::sync::mpsc::channel();
        let on_thread = db.clone();
        let thread = std::thread::Builder::new()
            .name("rx-commit".into())
            .spawn(move || {
                while let Ok(first) = inbox.recv() {
                    // One commit covers every claim applied before it starts.
                    let upto = inbox.try_iter().fold(first, u64::max);
                    let result = on_thread.commit("rx.shards.batch-claimed");
                    if outbox.send(Committed { upto, result }).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "no commit thread; the store commits its claims itself"))
            .ok();
        let (asks, reports) = match thread {
            Some(_) => (Some(asks), Some(reports)),
            None => (None, None),
        };
        Committer {
            db: db.clone(),
            asks,
            reports,
            inline: VecDeque::new(),
            thread,
        }
    }

    /// Asks for a commit covering claim `ticket`, applied to sled already.
    pub(super) fn ask(&mut self, ticket: u64) {
        let sent = self.asks.as_ref().is_some_and(|a| a.send(ticket).is_ok());
        if !sent {
            self.commit_here(ticket);
        }
    }

    /// The next commit made, in order; with `wait`, waits for it. None when
    /// none is made yet.
    pub(super) fn next(&mut self, wait: bool) -> Option<Committed> {
        if let Some(c) = self.inline.pop_front() {
            return Some(c);
        }
        let reports = self.reports.as_ref()?;
        let report = if wait {
            reports.recv().ok()
        } else {
            match reports.try_recv() {
                Ok(c) => Some(c),
                Err(std::sync::mpsc::TryRecvError::Empty) => return None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            }
        };
        if report.is_none() {
            // The thread is gone, perhaps with claims asked of it: one
            // commit here covers them all.
            tracing::error!("the commit thread is gone; the store commits its claims itself");
            self.asks = None;
            self.reports = None;
            self.commit_here(u64::MAX);
            return self.inline.pop_front();
        }
        report
    }

    fn commit_here(&mut self, upto: u64) {
        let result = self.db.commit("rx.shards.batch-claimed");
        self.inline.push_back(Committed { upto, result });
    }
}

impl Drop for Committer {
    /// Claims still asked of the thread are committed before it ends.
    fn drop(&mut self) {
        self.asks.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
