//! The sender's image ledger: the hash chain numbering every image accepted,
//! by a drop or a pull (the record, the chain and what the receiver does
//! with them: [`weir_proto::ledger`]).
//!
//! # Where a record is made
//!
//! The record travels inside the image's transfer object, and the object is
//! written before the intake commits. So the object store assigns it
//! ([`crate::objects::ObjectStore::commit_drop`]): under the ledger's lock
//! it takes the head, builds each image's record from it, writes the image
//! object with the record inside, and commits the records together with the
//! queue entries in one sled transaction; only then does the head move.
//! Both intakes get records without knowing of the ledger. A crash before
//! the commit leaves an image object no record names (swept as any
//! unreferenced payload) and the sequence number is simply used again.
//!
//! # State
//!
//! | tree | key | value |
//! |---|---|---|
//! | `ledger` | seq, u64 big-endian | [`IssuedRecord`] (JSON) |
//! | `meta` | `ledger_chain` | the chain id, u64 big-endian |
//! | `meta` | `ledger_checkpoint` | the last record pruned: [`Checkpoint`] (JSON) |
//!
//! # Pruning
//!
//! Records beyond the newest `[ledger] keep_records` whose images left the
//! carousel (retention over, passes done) are pruned, oldest first and
//! without a hole ([`LedgerChain::prune`], at the carousel's retention
//! sweep). The last one pruned stays as the checkpoint (seq and hash):
//! `ledger verify` walks the chain from it, the record after it must name
//! its hash, and `reconcile` says how many records it no longer compares.
//!
//! The chain id is drawn at random when the ledger is created; a sender
//! whose state was lost starts a new chain, which the receiver accepts only
//! with its first record.
//!
//! sled admits one process, so while the gateway runs it keeps a copy of
//! the chain in `state_dir/ledger.json` (rewritten after every commit), for
//! `reconcile` and `ledger verify` to read.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use weir_host::state::{StateDb, StateError};
use weir_proto::ledger::{BadRecord, ChainWalk, Checkpoint};
use weir_proto::{ChainId, ChainRecord, LedgerHead};

const RECORDS_TREE: &str = "ledger";
const META_TREE: &str = "meta";
const CHAIN_KEY: &str = "ledger_chain";
const CHECKPOINT_KEY: &str = "ledger_checkpoint";
/// The running gateway's copy of its chain, in `state_dir`.
pub const SNAPSHOT_FILE: &str = "ledger.json";

/// One record the sender issued, and the image object it travels in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub record: ChainRecord,
    /// `sha256:` id of the image object carrying the record.
    pub image: String,
}

/// The chain as `state_dir/ledger.json` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    pub written_at_ms: u64,
    pub chain: ChainId,
    pub head: LedgerHead,
    /// The last record pruned; the records kept follow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    pub records: Vec<IssuedRecord>,
}

/// The sender's chain in its state database.
pub struct LedgerChain {
    db: StateDb,
    records: sled::Tree,
    meta: sled::Tree,
    /// The head, also the lock every record assignment holds (through the
    /// write of its image objects and the commit).
    assigning: Mutex<LedgerHead>,
    /// The committed head, for heartbeats: read without waiting for an
    /// assignment under way.
    committed: Mutex<LedgerHead>,
    snapshot: PathBuf,
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

impl LedgerChain {
    /// Opens the chain of the database `db` (in `state_dir`), drawing a new
    /// chain id if it has none.
    pub fn open(db: &StateDb, state_dir: &Path) -> Result<LedgerChain, StateError> {
        let records = db.tree(RECORDS_TREE)?;
        let meta = db.tree(META_TREE)?;
        let last = last_record(db, &records)?;
        let chain = match stored_chain(db, &meta)? {
            Some(chain) => chain,
            None => {
                let chain = match &last {
                    // The id's own key was lost but records were kept.
                    Some(r) => r.record.chain,
                    None => weir_host::clock::new_chain_id(),
                };
                meta.insert(CHAIN_KEY, &chain.0.to_be_bytes())
                    .map_err(|e| db.sled_error(e))?;
                if last.is_none() {
                    tracing::warn!(chain = %chain,
                        "no image ledger in the state directory: starting a new chain; \
                         the receiver accepts it with its first record");
                }
                chain
            }
        };
        let head = match &last {
            Some(r) if r.record.chain == chain => r.record.head(),
            _ => LedgerHead::empty(chain),
        };
        tracing::info!(chain = %chain, seq = head.seq, hash = %head.hash.short(), "image ledger opened");
        let ledger = LedgerChain {
            db: db.clone(),
            records,
            meta,
            assigning: Mutex::new(head),
            committed: Mutex::new(head),
            snapshot: state_dir.join(SNAPSHOT_FILE),
        };
        ledger.write_snapshot(&head);
        Ok(ledger)
    }

    /// The committed head, as heartbeats announce it.
    pub fn head(&self) -> LedgerHead {
        *self.committed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the head for an assignment: no other record is numbered until
    /// the guard is dropped.
    pub fn lock(&self) -> MutexGuard<'_, LedgerHead> {
        self.assigning.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tree records are committed into (in the intake's transaction).
    pub fn records_tree(&self) -> &sled::Tree {
        &self.records
    }

    /// The key and value of a record to insert.
    pub fn entry(issued: &IssuedRecord) -> ([u8; 8], Vec<u8>) {
        // Plain records of strings and numbers always serialize.
        (
            seq_key(issued.record.seq),
            serde_json::to_vec(issued).unwrap_or_default(),
        )
    }

    /// After the commit: the head moves and the copy is rewritten.
    pub fn committed(&self, guard: &mut MutexGuard<'_, LedgerHead>, head: LedgerHead) {
        **guard = head;
        *self.committed.lock().unwrap_or_else(|e| e.into_inner()) = head;
        self.write_snapshot(&head);
    }

    /// Prunes the records beyond the newest `keep_records` whose images
    /// `left_carousel` says left the carousel, oldest first, stopping at
    /// the first one still needed; the last one pruned becomes the
    /// checkpoint. Holds the assignment lock, so no record is numbered
    /// meanwhile. Returns the records pruned and the checkpoint; not
    /// durable until the caller's commit (the copy is rewritten now).
    pub fn prune(
        &self,
        keep_records: u64,
        left_carousel: impl Fn(&IssuedRecord) -> bool,
        now_ms: u64,
    ) -> Result<Option<(u64, Checkpoint)>, StateError> {
        let guard = self.lock();
        let head = *guard;
        let limit = head.seq.saturating_sub(keep_records);
        let mut checkpoint = None;
        let mut pruned = 0;
        for item in self.records.range(..=seq_key(limit)) {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let issued = decode(&self.db, &k, &v)?;
            if !left_carousel(&issued) {
                break;
            }
            self.records.remove(&k).map_err(|e| self.db.sled_error(e))?;
            checkpoint = Some(Checkpoint {
                seq: issued.record.seq,
                hash: issued.record.hash(),
                at_ms: now_ms,
            });
            pruned += 1;
        }
        let Some(checkpoint) = checkpoint else {
            return Ok(None);
        };
        let value = serde_json::to_vec(&checkpoint)
            .map_err(|e| self.db.corrupt("meta/ledger_checkpoint", e))?;
        self.meta
            .insert(CHECKPOINT_KEY, value)
            .map_err(|e| self.db.sled_error(e))?;
        self.write_snapshot(&head);
        drop(guard);
        Ok(Some((pruned, checkpoint)))
    }

    fn write_snapshot(&self, head: &LedgerHead) {
        let result = issued_records(&self.db, &self.records).and_then(|records| {
            let snapshot = LedgerSnapshot {
                written_at_ms: weir_host::clock::unix_ms(),
                chain: head.chain,
                head: *head,
                checkpoint: stored_checkpoint(&self.db, &self.meta)?,
                records,
            };
            let bytes = serde_json::to_vec_pretty(&snapshot).unwrap_or_default();
            weir_host::durable::replace_quickly(&self.snapshot, &bytes).map_err(|source| {
                StateError::Io {
                    path: self.snapshot.clone(),
                    what: "writing the ledger copy",
                    source,
                }
            })
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "the ledger copy for reconcile was not written");
        }
    }
}

fn stored_chain(db: &StateDb, meta: &sled::Tree) -> Result<Option<ChainId>, StateError> {
    Ok(meta
        .get(CHAIN_KEY)
        .map_err(|e| db.sled_error(e))?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(|b| ChainId(u64::from_be_bytes(b))))
}

fn stored_checkpoint(db: &StateDb, meta: &sled::Tree) -> Result<Option<Checkpoint>, StateError> {
    match meta.get(CHECKPOINT_KEY).map_err(|e| db.sled_error(e))? {
        Some(v) => Ok(Some(
            serde_json::from_slice(&v).map_err(|e| db.corrupt("meta/ledger_checkpoint", e))?,
        )),
        None => Ok(None),
    }
}

fn decode(db: &StateDb, key: &[u8], value: &[u8]) -> Result<IssuedRecord, StateError> {
    serde_json::from_slice(value).map_err(|e| db.corrupt(format!("ledger/{}", hex::encode(key)), e))
}

fn last_record(db: &StateDb, records: &sled::Tree) -> Result<Option<IssuedRecord>, StateError> {
    match records.last().map_err(|e| db.sled_error(e))? {
        Some((k, v)) => Ok(Some(decode(db, &k, &v)?)),
        None => Ok(None),
    }
}

fn issued_records(db: &StateDb, records: &sled::Tree) -> Result<Vec<IssuedRecord>, StateError> {
    let mut out = Vec::new();
    for item in records.iter() {
        let (k, v) = item.map_err(|e| db.sled_error(e))?;
        out.push(decode(db, &k, &v)?);
    }
    Ok(out)
}

/// Where a read of the chain came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    /// The state database (the gateway is stopped).
    Database,
    /// The copy the running gateway keeps, written at this time.
    RunningCopy { path: PathBuf, written_at_ms: u64 },
}

impl std::fmt::Display for ReadFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFrom::Database => write!(f, "the state database"),
            ReadFrom::RunningCopy { path, .. } => write!(
                f,
                "{} (gateway-tx runs and holds the database; this is its copy)",
                path.display()
            ),
        }
    }
}

/// The chain as it stands: its id (None: no ledger yet) and records.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    pub chain: Option<ChainId>,
    /// The last record pruned; `records` follow it.
    pub checkpoint: Option<Checkpoint>,
    pub records: Vec<IssuedRecord>,
    pub from: ReadFrom,
}

/// Reads the chain of `state_dir`: from the database when the gateway is
/// stopped, from its copy while it runs. Changes nothing.
pub fn read_chain(state_dir: &Path) -> anyhow::Result<IssuedChain> {
    use anyhow::Context;
    let db_path = state_dir.join("db");
    match StateDb::open_now(&db_path) {
        Ok(db) => {
            let records = db.tree(RECORDS_TREE)?;
            let meta = db.tree(META_TREE)?;
            let chain = stored_chain(&db, &meta)?;
            Ok(IssuedChain {
                chain,
                checkpoint: stored_checkpoint(&db, &meta)?,
                records: issued_records(&db, &records)?,
                from: ReadFrom::Database,
            })
        }
        Err(StateError::Locked { .. }) => {
            let path = state_dir.join(SNAPSHOT_FILE);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "gateway-tx runs, and its ledger copy {} cannot be read",
                    path.display()
                )
            })?;
            let snapshot: LedgerSnapshot = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a ledger copy", path.display()))?;
            Ok(IssuedChain {
                chain: Some(snapshot.chain),
                checkpoint: snapshot.checkpoint,
                records: snapshot.records,
                from: ReadFrom::RunningCopy {
                    path,
                    written_at_ms: snapshot.written_at_ms,
                },
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// What `ledger verify` found.
#[derive(Debug)]
pub struct Verified {
    pub chain: Option<ChainId>,
    /// The last record pruned: the walk started after it.
    pub checkpoint: Option<Checkpoint>,
    pub count: u64,
    pub head: Option<LedgerHead>,
    pub from: ReadFrom,
    pub bad: Option<BadRecord>,
}

/// Re-checks the stored chain record by record (ranges, order, no hole,
/// each record's prev the hash of the one before).
pub fn verify(state_dir: &Path) -> anyhow::Result<Verified> {
    let issued = read_chain(state_dir)?;
    let Some(chain) = issued.chain else {
        return Ok(Verified {
            chain: None,
            checkpoint: issued.checkpoint,
            count: 0,
            head: None,
            from: issued.from,
            bad: issued.records.first().map(|r| BadRecord {
                seq: r.record.seq,
                why: "records are stored but the chain id is not".into(),
            }),
        });
    };
    // Records pruned up to the checkpoint: the walk starts from its hash.
    let (mut walk, mut head) = match &issued.checkpoint {
        Some(c) => (
            ChainWalk::after(chain, true, c),
            LedgerHead {
                chain,
                seq: c.seq,
                hash: c.hash,
            },
        ),
        None => (ChainWalk::new(chain, true), LedgerHead::empty(chain)),
    };
    let mut bad = None;
    for r in &issued.records {
        match walk.step(r.record.seq, &r.record, None) {
            Ok(hash) => {
                head = LedgerHead {
                    chain,
                    seq: r.record.seq,
                    hash,
                }
            }
            Err(e) => {
                bad = Some(e);
                break;
            }
        }
    }
    Ok(Verified {
        chain: Some(chain),
        checkpoint: issued.checkpoint,
        count: walk.count(),
        head: Some(head),
        from: issued.from,
        bad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `verify` with the gateway stopped. A database dropped a moment ago
    /// can still be locked (sled's flusher, or a child another test forks
    /// before its exec), and `verify` would then read the running copy:
    /// wait for the database itself.
    fn verify_stopped(state_dir: &Path) -> Verified {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let v = verify(state_dir).unwrap();
            if v.from == ReadFrom::Database {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the database stays locked"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn a_chain_id_is_drawn_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let a = LedgerChain::open(&db, dir.path()).unwrap().head();
        assert_eq!(a.seq, 0);
        db.commit("test").unwrap();
        let b = LedgerChain::open(&db, dir.path()).unwrap().head();
        assert_eq!(a, b);
        // A database that lost its state gets another chain.
        let other = tempfile::tempdir().unwrap();
        let db2 = StateDb::open(&other.path().join("db")).unwrap();
        assert_ne!(
            LedgerChain::open(&db2, other.path()).unwrap().head().chain,
            a.chain
        );
    }

    /// Issues `n` records on `ledger`, images `sha256:1`, `sha256:2`, ...
    fn issue(ledger: &LedgerChain, n: u64) {
        let mut guard = ledger.lock();
        for i in 0..n {
            let head = *guard;
            let record = head.next(weir_proto::ledger::RecordFields {
                manifest_digest: weir_proto::ObjectId::of_bytes(&i.to_be_bytes()).digest(),
                destination: weir_proto::Destination {
                    repository: "team/app".into(),
                    tags: vec![format!("v{i}")],
                },
                source: format!("{i}.tar"),
                verdict: weir_proto::Verdict {
                    rule: None,
                    gate: None,
                    worst_severity: None,
                    signature: None,
                    summary: String::new(),
                },
                accepted_at: 1_700_000_000 + i,
            });
            let issued = IssuedRecord {
                image: format!("sha256:{}", record.seq),
                record,
            };
            let (key, value) = LedgerChain::entry(&issued);
            ledger.records_tree().insert(key, value).unwrap();
            ledger.committed(&mut guard, issued.record.head());
        }
    }

    #[test]
    fn records_beyond_the_newest_whose_images_left_are_pruned_to_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = StateDb::open(&dir.path().join("db")).unwrap();
            let ledger = LedgerChain::open(&db, dir.path()).unwrap();
            issue(&ledger, 6);
            // Image 3 still in the carousel: the prune stops before it.
            let (count, checkpoint) = ledger
                .prune(2, |i| i.image != "sha256:3", 7)
                .unwrap()
                .expect("pruned");
            assert_eq!((count, checkpoint.seq), (2, 2));
            // Image 3 left: 3 and 4 go, the newest 2 stay.
            let (count, checkpoint) = ledger.prune(2, |_| true, 8).unwrap().expect("pruned");
            assert_eq!((count, checkpoint.seq), (2, 4));
            assert!(ledger.prune(2, |_| true, 9).unwrap().is_none());
            // The copy the running gateway keeps says so.
            let copy: LedgerSnapshot =
                serde_json::from_slice(&std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap())
                    .unwrap();
            assert_eq!(copy.checkpoint.map(|c| c.seq), Some(4));
            assert_eq!(copy.records.len(), 2);
            db.commit("test").unwrap();
        }
        // Stopped: verify walks from the checkpoint, and the head survives.
        let v = verify_stopped(dir.path());
        assert!(v.bad.is_none(), "{:?}", v.bad);
        assert_eq!((v.count, v.head.map(|h| h.seq)), (2, Some(6)));
        assert_eq!(v.checkpoint.map(|c| c.seq), Some(4));
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let ledger = LedgerChain::open(&db, dir.path()).unwrap();
        assert_eq!(ledger.head().seq, 6);
        // A kept record tampered with after the checkpoint is named.
        let tree = db.tree(RECORDS_TREE).unwrap();
        let mut fifth: IssuedRecord =
            serde_json::from_slice(&tree.get(seq_key(5)).unwrap().unwrap()).unwrap();
        fifth.record.prev = weir_proto::RecordHash([7; 32]);
        tree.insert(seq_key(5), serde_json::to_vec(&fifth).unwrap())
            .unwrap();
        db.commit("test").unwrap();
        drop((ledger, tree, db));
        let v = verify_stopped(dir.path());
        assert_eq!(v.bad.map(|b| b.seq), Some(5));
    }
}
