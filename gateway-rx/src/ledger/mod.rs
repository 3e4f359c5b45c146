//! The image ledger on the high side: the records of the sender's hash
//! chain(s) this receiver holds, the head the sender announces, and the
//! gaps between the two (the chain itself: [`weir_proto::ledger`]).
//!
//! # Records fill in out of order
//!
//! Passes repeat and images complete in any order, so records are held by
//! (chain, sequence number) and checked against whichever neighbours are
//! held when they arrive, and again (from the other side) when a neighbour
//! arrives later ([`weir_proto::ledger::check_links`]). A record is
//! admitted when its image object is verified, after the object's names
//! and counts were checked ([`crate::images`]), and before its image may
//! complete:
//!
//! - the same record again, with the same image object: nothing to do;
//! - a record at a sequence number already held with another hash, one
//!   that does not link to a held neighbour, one that fails its bounds, or
//!   one that does not belong to its image object (another manifest digest
//!   or destination): **refused**. Its image is not delivered, the refusal
//!   is kept (`ledger_refused`, the newest [`MAX_REFUSALS_KEPT`], so it
//!   is counted once, `ledger_records_refused`, and reported) and logged
//!   with the image's digest. The
//!   record held first stands; a sender holding the HMAC key can sign a
//!   forged record, but not make the receiver drop what it holds unseen.
//! - a record of a chain this receiver holds no first record of: it
//!   **waits** (`ledger_waiting`, at most [`MAX_WAITING`] records) until
//!   the chain's record 1 arrives (a genesis record: prev zero). Then the
//!   chain is accepted, logged loudly ("sender started a new image ledger
//!   chain"), and the waiting records are admitted in order. A record that
//!   finds no room is turned away but not kept as refused: its chain's
//!   first record hands its image back (remembered in memory), and so does
//!   the next start. A waiting record leaves with its image object
//!   when retention prunes that ([`HeldChains::forget_waiting_unless`]).
//! - a record whose chain's first record will never come (this receiver
//!   lost its state after that record left the sender's retention): the
//!   operator accepts the chain from a given seq with `gateway-rx ledger
//!   accept` ([`HeldChains::accept_from`], gateway stopped); records from
//!   that seq on are admitted as if the chain started there, records below
//!   it keep waiting and are never delivered.
//!
//! # Pruning
//!
//! Records of images delivered to every target longer than
//! `[retention] keep_delivered_hours` ago leave the tree, beyond the newest
//! `[ledger] keep_records` of each chain, from the chain's start upward
//! only ([`HeldChains::prune`]). The last one pruned stays as the chain's
//! checkpoint (seq and hash): the record after it is still checked against
//! its hash, gaps are counted from it, `ledger verify` walks from it, and
//! the report carries it (everything up to it was delivered). A record at
//! or below the checkpoint seen again is not admitted again
//! ([`Admission::Pruned`]): its image was delivered.
//!
//! # Gaps
//!
//! Each heartbeat carries the sender's head (chain, seq, hash). The chain
//! it names is the one followed; [`Announcements`] remember when each of
//! its sequence numbers was first announced. A sequence number announced
//! and not completed (its record held and its image complete) for
//! `[ledger] gap_alert_hours` is a gap: the ledger stage raises the fault,
//! posts the webhook event `missing` and shows it in status. It clears
//! when the record arrives and its image completes. A new chain announced
//! (a sender whose state was lost) replaces the one followed; the old
//! chain's missing records are logged as an error then, and stay in the
//! report.
//!
//! # State
//!
//! | tree | key | value |
//! |---|---|---|
//! | `ledger_records` | chain + seq, big-endian | [`StoredRecord`] (JSON) |
//! | `ledger_waiting` | chain + seq + image id | first seen, ms (JSON) |
//! | `ledger_refused` | image id | [`RefusedRecord`] (JSON) |
//! | `ledger_meta` | `announced` | [`Announcements`] (JSON) |
//! | `ledger_meta` | `refused_count` | refusals ever, u64 big-endian |
//! | `ledger_chain_starts` | chain, big-endian | [`ChainStart`] (JSON) |
//!
//! Records, refusals and completions are written before the image
//! ledger's commit points (`rx.ledger.object-recorded`,
//! `rx.ledger.image-complete`) and land with them. An announcement is
//! written when the head moves and made durable by the next commit point;
//! a power cut before it only restarts the clock of the newest ones.

pub mod report;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use weir_proto::ledger::report::RefusedRecord;
use weir_proto::ledger::{check_links, missing, Announced, Announcements, Checkpoint, Gap};
use weir_proto::names::shorten_to;
use weir_proto::{ChainId, ChainRecord, LedgerHead, ObjectId, RecordHash, TransferManifest};

use crate::state::{StateDb, StateError};

const RECORDS_TREE: &str = "ledger_records";
const WAITING_TREE: &str = "ledger_waiting";
const REFUSED_TREE: &str = "ledger_refused";
const META_TREE: &str = "ledger_meta";
const STARTS_TREE: &str = "ledger_chain_starts";
const ANNOUNCED_KEY: &str = "announced";
/// Refusals counted ever (the tree keeps only the newest).
const REFUSED_COUNT_KEY: &str = "refused_count";
/// Refusals kept (and reported): each is a different image object, which
/// a sender holding the key can make without end.
pub const MAX_REFUSALS_KEPT: usize = 1024;
/// A refusal's reason is kept to this many bytes: it may quote names of
/// the image object that nothing has bounded yet.
const MAX_REASON_BYTES: usize = 512;
/// Most records waiting for their chain's first record: a sender holding
/// the key could otherwise fill the database with chains that never start.
pub const MAX_WAITING: usize = 4096;
/// Chains whose highest contiguous seq is remembered between calls.
const MAX_CHAINS_CACHED: usize = 64;
/// Most missing ranges computed at once (a range may be one seq or
/// billions: a hostile head is one range).
const MAX_RANGES: usize = 10_000;

/// Where an image stands in its sender's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPosition {
    pub chain: ChainId,
    pub seq: u64,
}

/// A record held, the image object it came in, and when that image
/// completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub record: ChainRecord,
    pub hash: RecordHash,
    /// `sha256:` id of the image object.
    pub image: String,
    pub complete_at_ms: Option<u64>,
}

/// Where this receiver's hold of a chain starts when that is not the
/// chain's record 1 held here: the operator accepted it mid-way, or records
/// were pruned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStart {
    /// `gateway-rx ledger accept`: records from this seq on are admitted
    /// without the chain's first record; the ones below it never are.
    pub accepted_from: Option<u64>,
    pub accepted_at_ms: Option<u64>,
    /// The last record pruned (see the module doc).
    pub checkpoint: Option<Checkpoint>,
}

impl ChainStart {
    /// Every record of the chain up to this seq is accounted for without
    /// being held: pruned after delivery, or below an operator's acceptance.
    pub fn floor(&self) -> u64 {
        match (&self.checkpoint, self.accepted_from) {
            (Some(c), _) => c.seq,
            (None, Some(from)) => from.saturating_sub(1),
            (None, None) => 0,
        }
    }
}

/// A chain whose records wait for its first record, as status shows it:
/// what `gateway-rx ledger accept` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingChain {
    pub chain: ChainId,
    /// The lowest seq of the records waiting.
    pub lowest_seq: u64,
    /// Images waiting.
    pub images: u64,
}

/// Why `ledger accept` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("seq 0: a chain starts at 1")]
    SeqZero,
    #[error("chain {chain} is already accepted {how}; records of it are admitted as they come")]
    AlreadyAccepted { chain: ChainId, how: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// The outcome of admitting a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Held (now, or before with the same image object). `released`: the
    /// images that waited for this chain's first record, in seq order, with
    /// when they were first seen.
    Held {
        position: ChainPosition,
        released: Vec<(ObjectId, u64)>,
    },
    /// Its chain is unknown here: it waits for the chain's record 1 (or,
    /// below an operator's acceptance, for ever).
    Waiting,
    /// At or below the chain's checkpoint: delivered and pruned before.
    Pruned,
    /// Refused; `new` is false when this image was refused before.
    Refused { reason: String, new: bool },
}

/// The ledger as status.json shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LedgerView {
    /// The chain the sender announced last.
    pub chain: Option<ChainId>,
    /// Records it announced (its head's seq).
    pub head_announced: u64,
    /// Every seq up to this one completed.
    pub highest_contiguous: u64,
    /// Announced records not completed within `gap_alert_hours`, as ranges
    /// (at most 20 listed).
    pub gaps: Vec<Gap>,
    /// Seqs in all gaps.
    pub missing: u64,
    /// Announced records not completed, not overdue yet.
    pub awaiting: u64,
    /// Records refused, ever.
    pub records_refused: u64,
    /// Records waiting for their chain's first record.
    pub waiting_for_first_record: u64,
    /// The chains those records belong to (what `ledger accept` takes).
    pub waiting_chains: Vec<WaitingChain>,
    /// The sender's head names a hash other than the record held at its
    /// seq (this seq).
    pub head_conflict: Option<u64>,
    pub gap_alert_hours: f64,
}

/// Status lists this many gap ranges at most.
const GAPS_SHOWN: usize = 20;

impl LedgerView {
    /// One line per fact, for `status` and the console.
    pub fn render(&self, out: &mut String, now_ms: u64) {
        use std::fmt::Write;
        let Some(chain) = self.chain else {
            let _ = writeln!(out, "image ledger: no head announced yet");
            return;
        };
        let mut also = Vec::new();
        if self.awaiting > 0 {
            also.push(format!("{} on their way", self.awaiting));
        }
        if self.records_refused > 0 {
            also.push(format!("{} records refused", self.records_refused));
        }
        if self.waiting_for_first_record > 0 {
            also.push(format!(
                "{} waiting for their chain's first record",
                self.waiting_for_first_record
            ));
        }
        let _ = writeln!(
            out,
            "image ledger: chain {chain}, {} images announced, complete up to {}{}",
            self.head_announced,
            self.highest_contiguous,
            if also.is_empty() {
                String::new()
            } else {
                format!(" ({})", also.join(", "))
            }
        );
        for w in &self.waiting_chains {
            let _ = writeln!(
                out,
                "image ledger: chain {} is unknown here: {} images wait for its first record, \
                 lowest seq {} (if that record will never come: gateway-rx ledger accept \
                 --chain {} --from {}, gateway stopped)",
                w.chain, w.images, w.lowest_seq, w.chain, w.lowest_seq
            );
        }
        if let Some(seq) = self.head_conflict {
            let _ = writeln!(
                out,
                "image ledger: the sender's head names another record than the one held at seq {seq}"
            );
        }
        if self.gaps.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "ledger gaps: {} images announced and not complete for more than {} h:",
            self.missing, self.gap_alert_hours
        );
        for g in &self.gaps {
            let _ = writeln!(
                out,
                "  {g} (announced {:.1} h ago)",
                now_ms.saturating_sub(g.since_ms) as f64 / 3_600_000.0
            );
        }
    }

    /// The fault reason while there are gaps.
    pub fn fault_reason(&self) -> Option<String> {
        let first = self.gaps.first()?;
        Some(format!(
            "ledger gap: {} images the sender announced are not complete after {} h              (chain {}, first {first})",
            self.missing,
            self.gap_alert_hours,
            self.chain.unwrap_or_default()
        ))
    }
}

#[derive(Default)]
struct Followed {
    announced: Announcements,
    /// Highest contiguous complete seq per chain (only grows), a cache of
    /// what the records tree says, at most [`MAX_CHAINS_CACHED`] chains.
    contiguous: HashMap<ChainId, u64>,
    waiting: usize,
    /// Images whose record found the waiting places taken, by chain, with
    /// their record's seq and when they were first seen: handed back with
    /// their chain's first record. In memory only (a start admits them
    /// again anyway), at most [`MAX_WAITING`] in all.
    turned_away: HashMap<ChainId, Vec<(u64, ObjectId, u64)>>,
    turned_away_count: usize,
}

/// The records held, by chain and seq, and the announced head.
pub struct HeldChains {
    db: StateDb,
    records: sled::Tree,
    waiting: sled::Tree,
    refused: sled::Tree,
    meta: sled::Tree,
    starts: sled::Tree,
    followed: Mutex<Followed>,
    /// Bumped on every change, so views are rebuilt only when needed.
    changes: AtomicU64,
}

fn record_key(chain: ChainId, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&chain.0.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn waiting_key(chain: ChainId, seq: u64, image: &ObjectId) -> [u8; 48] {
    let mut k = [0u8; 48];
    k[..16].copy_from_slice(&record_key(chain, seq));
    k[16..].copy_from_slice(&image.0);
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(8..16)?.try_into().ok()?))
}

fn chain_of(key: &[u8]) -> Option<ChainId> {
    Some(ChainId(u64::from_be_bytes(key.get(..8)?.try_into().ok()?)))
}

impl HeldChains {
    pub fn open(db: &StateDb) -> Result<HeldChains, StateError> {
        let meta = db.tree(META_TREE)?;
        let announced = match meta.get(ANNOUNCED_KEY).map_err(|e| db.sled_error(e))? {
            Some(v) => {
                serde_json::from_slice(&v).map_err(|e| db.corrupt("ledger_meta/announced", e))?
            }
            None => Announcements::default(),
        };
        let waiting = db.tree(WAITING_TREE)?;
        let chains = HeldChains {
            db: db.clone(),
            records: db.tree(RECORDS_TREE)?,
            refused: db.tree(REFUSED_TREE)?,
            starts: db.tree(STARTS_TREE)?,
            meta,
            followed: Mutex::new(Followed {
                announced,
                contiguous: HashMap::new(),
                waiting: waiting.len(),
                ..Followed::default()
            }),
            waiting,
            changes: AtomicU64::new(0),
        };
        Ok(chains)
    }

    fn lock(&self) -> MutexGuard<'_, Followed> {
        self.followed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// A number that moves whenever what the ledger holds changes.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn get(&self, chain: ChainId, seq: u64) -> Result<Option<StoredRecord>, StateError> {
        let key = record_key(chain, seq);
        match self.records.get(key).map_err(|e| self.db.sled_error(e))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(|e| {
                self.db.corrupt(format!("ledger_records/{chain}/{seq}"), e)
            })?)),
            None => Ok(None),
        }
    }

    fn put(&self, stored: &StoredRecord) -> Result<(), StateError> {
        let key = record_key(stored.record.chain, stored.record.seq);
        let value = serde_json::to_vec(stored).map_err(|e| {
            self.db
                .corrupt(format!("ledger_records/{}", stored.record.seq), e)
        })?;
        self.records
            .insert(key, value)
            .map_err(|e| self.db.sled_error(e))?;
        self.changed();
        Ok(())
    }

    fn known(&self, chain: ChainId) -> Result<bool, StateError> {
        self.records
            .contains_key(record_key(chain, 1))
            .map_err(|e| self.db.sled_error(e))
    }

    /// Where this receiver's hold of `chain` starts, when not at a record 1.
    pub fn start_of(&self, chain: ChainId) -> Result<Option<ChainStart>, StateError> {
        match self
            .starts
            .get(chain.0.to_be_bytes())
            .map_err(|e| self.db.sled_error(e))?
        {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(|e| {
                self.db.corrupt(format!("ledger_chain_starts/{chain}"), e)
            })?)),
            None => Ok(None),
        }
    }

    fn put_start(&self, chain: ChainId, start: &ChainStart) -> Result<(), StateError> {
        let value = serde_json::to_vec(start)
            .map_err(|e| self.db.corrupt(format!("ledger_chain_starts/{chain}"), e))?;
        self.starts
            .insert(chain.0.to_be_bytes(), value)
            .map_err(|e| self.db.sled_error(e))?;
        self.changed();
        Ok(())
    }

    /// Every chain start recorded, by chain.
    pub fn starts(&self) -> Result<Vec<(ChainId, ChainStart)>, StateError> {
        let mut out = Vec::new();
        for item in self.starts.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let Some(chain) = chain_of(&k) else { continue };
            out.push((
                chain,
                serde_json::from_slice(&v)
                    .map_err(|e| self.db.corrupt(format!("ledger_chain_starts/{chain}"), e))?,
            ));
        }
        Ok(out)
    }

    /// The operator's word that `chain` is trusted from record `from` on
    /// (its first record will never come here): records from `from` on
    /// are admitted as they come (the images waiting now, at the next
    /// start), records below it never. Not durable until the caller's
    /// commit.
    pub fn accept_from(
        &self,
        chain: ChainId,
        from: u64,
        now_ms: u64,
    ) -> Result<ChainStart, AcceptError> {
        let _followed = self.lock();
        if from == 0 {
            return Err(AcceptError::SeqZero);
        }
        let mut start = self.start_of(chain)?.unwrap_or_default();
        if self.known(chain)? {
            return Err(AcceptError::AlreadyAccepted {
                chain,
                how: "with its first record".into(),
            });
        }
        // Lowering an acceptance is allowed (more records admitted); a
        // checkpoint means records were delivered, and lower ones are gone
        // from the sender long ago.
        if let Some(c) = &start.checkpoint {
            return Err(AcceptError::AlreadyAccepted {
                chain,
                how: format!("and delivered up to seq {}", c.seq),
            });
        }
        if let Some(was) = start.accepted_from {
            if was <= from {
                return Err(AcceptError::AlreadyAccepted {
                    chain,
                    how: format!("from seq {was}"),
                });
            }
        }
        start.accepted_from = Some(from);
        start.accepted_at_ms = Some(now_ms);
        self.put_start(chain, &start)?;
        Ok(start)
    }

    /// Chains whose records wait for their first record: the lowest seq
    /// waiting and how many images.
    pub fn waiting_chains(&self) -> Result<Vec<WaitingChain>, StateError> {
        let mut out: Vec<WaitingChain> = Vec::new();
        for item in self.waiting.iter() {
            let (k, _) = item.map_err(|e| self.db.sled_error(e))?;
            let (Some(chain), Some(seq)) = (chain_of(&k), seq_of(&k)) else {
                continue;
            };
            match out.last_mut() {
                // Keys sort by chain, then seq: the first of a chain is its lowest.
                Some(w) if w.chain == chain => w.images += 1,
                _ => out.push(WaitingChain {
                    chain,
                    lowest_seq: seq,
                    images: 1,
                }),
            }
        }
        Ok(out)
    }

    /// Prunes, from each chain's start upward, the records whose image
    /// `delivered_long_ago` says was delivered to every target long
    /// enough ago, keeping the newest `keep_records` held of each chain;
    /// the last one pruned becomes the chain's checkpoint. Returns, per
    /// chain pruned, the records pruned and the new checkpoint. Not durable
    /// until the caller's commit.
    pub fn prune(
        &self,
        keep_records: u64,
        delivered_long_ago: impl Fn(&StoredRecord) -> bool,
        now_ms: u64,
    ) -> Result<Vec<(ChainId, u64, Checkpoint)>, StateError> {
        let _followed = self.lock();
        let mut chains: Vec<(ChainId, u64)> = Vec::new();
        for item in self.records.iter().keys() {
            let k = item.map_err(|e| self.db.sled_error(e))?;
            let Some(chain) = chain_of(&k) else { continue };
            match chains.last_mut() {
                Some((c, n)) if *c == chain => *n += 1,
                _ => chains.push((chain, 1)),
            }
        }
        let mut out = Vec::new();
        for (chain, held) in chains {
            let prunable = held.saturating_sub(keep_records);
            if prunable == 0 {
                continue;
            }
            let mut start = self.start_of(chain)?.unwrap_or_default();
            let mut next = start.floor().saturating_add(1);
            let mut pruned = 0;
            while pruned < prunable {
                let Some(r) = self.get(chain, next)? else {
                    break;
                };
                if r.complete_at_ms.is_none() || !delivered_long_ago(&r) {
                    break;
                }
                self.records
                    .remove(record_key(chain, next))
                    .map_err(|e| self.db.sled_error(e))?;
                start.checkpoint = Some(Checkpoint {
                    seq: next,
                    hash: r.hash,
                    at_ms: now_ms,
                });
                pruned += 1;
                next = next.saturating_add(1);
            }
            if let (true, Some(checkpoint)) = (pruned > 0, start.checkpoint) {
                self.put_start(chain, &start)?;
                out.push((chain, pruned, checkpoint));
            }
        }
        Ok(out)
    }

    /// Admits the record `tm` carries, which came in image object `image`
    /// (see the module doc for the rules).
    pub fn admit(
        &self,
        tm: &TransferManifest,
        image: ObjectId,
        first_seen_ms: u64,
        now_ms: u64,
    ) -> Result<Admission, StateError> {
        let mut followed = self.lock();
        let record = &tm.ledger;
        if let Some(v) = self
            .refused
            .get(image.0)
            .map_err(|e| self.db.sled_error(e))?
        {
            let reason = serde_json::from_slice::<RefusedRecord>(&v)
                .map(|r| r.reason)
                .unwrap_or_else(|_| "refused before".into());
            return Ok(Admission::Refused { reason, new: false });
        }
        let hash = record.hash();
        if let Err(e) = record.check().and_then(|()| record.belongs_to(tm)) {
            return self.refuse(record, hash, &image, e.to_string(), now_ms);
        }
        let position = ChainPosition {
            chain: record.chain,
            seq: record.seq,
        };
        if let Some(held) = self.get(record.chain, record.seq)? {
            if held.hash != hash {
                let reason = weir_proto::ledger::ChainBreak::Conflict {
                    chain: record.chain,
                    seq: record.seq,
                };
                return self.refuse(record, hash, &image, reason.to_string(), now_ms);
            }
            if held.image != image.digest() {
                let reason = weir_proto::ledger::ChainBreak::OtherImage {
                    chain: record.chain,
                    seq: record.seq,
                };
                return self.refuse(record, hash, &image, reason.to_string(), now_ms);
            }
            return Ok(Admission::Held {
                position,
                released: Vec::new(),
            });
        }
        let start = self.start_of(record.chain)?;
        if let Some(checkpoint) = start.as_ref().and_then(|s| s.checkpoint) {
            if record.seq == checkpoint.seq && hash != checkpoint.hash {
                let reason = weir_proto::ledger::ChainBreak::Conflict {
                    chain: record.chain,
                    seq: record.seq,
                };
                return self.refuse(record, hash, &image, reason.to_string(), now_ms);
            }
            let below_acceptance = start
                .as_ref()
                .and_then(|s| s.accepted_from)
                .is_some_and(|from| record.seq < from);
            if record.seq <= checkpoint.seq && !below_acceptance {
                return Ok(Admission::Pruned);
            }
        }
        let genesis = record.seq == 1;
        let below_acceptance = start
            .as_ref()
            .and_then(|s| s.accepted_from)
            .is_some_and(|from| record.seq < from);
        let known = start.is_some() || self.known(record.chain)?;
        if below_acceptance || (!genesis && !known) {
            if followed.waiting >= MAX_WAITING {
                // Not kept with the refusals: nothing is wrong with the
                // record, only the room is taken (records of made-up chains
                // can take it). Its image object is verified but has no
                // image record, so the next start admits it again; so does
                // its chain's first record, if it comes before.
                if followed.turned_away_count < MAX_WAITING {
                    let list = followed.turned_away.entry(record.chain).or_default();
                    if !list.iter().any(|(_, i, _)| *i == image) {
                        list.push((record.seq, image, first_seen_ms));
                        followed.turned_away_count += 1;
                    }
                }
                let reason = format!(
                    "chain {} is unknown here and {MAX_WAITING} records already wait for their \
                     chain's first record; tried again when that record arrives or gateway-rx starts",
                    record.chain
                );
                return Ok(Admission::Refused { reason, new: true });
            }
            let key = waiting_key(record.chain, record.seq, &image);
            let fresh = self
                .waiting
                .insert(key, &first_seen_ms.to_be_bytes())
                .map_err(|e| self.db.sled_error(e))?
                .is_none();
            if fresh {
                followed.waiting += 1;
                self.changed();
            }
            return Ok(Admission::Waiting);
        }
        let checkpoint = start.as_ref().and_then(|s| s.checkpoint);
        let before = match record.seq {
            1 => None,
            seq => match checkpoint {
                Some(c) if c.seq == seq - 1 => Some(c.hash),
                _ => self.get(record.chain, seq - 1)?.map(|r| r.hash),
            },
        };
        let after_prev = self
            .get(record.chain, record.seq.saturating_add(1))?
            .map(|r| r.record.prev);
        if let Err(e) = check_links(record, hash, before, after_prev) {
            return self.refuse(record, hash, &image, e.to_string(), now_ms);
        }
        self.put(&StoredRecord {
            record: record.clone(),
            hash,
            image: image.digest(),
            complete_at_ms: None,
        })?;
        // Admitted at a restart after waiting (a crash before its release).
        let waited = self
            .waiting
            .remove(waiting_key(record.chain, record.seq, &image))
            .map_err(|e| self.db.sled_error(e))?;
        if waited.is_some() {
            followed.waiting = followed.waiting.saturating_sub(1);
        }
        let released = if genesis {
            tracing::warn!(chain = %record.chain, digest = %record.manifest_digest,
                image = %image, previous = ?followed.announced.head.map(|h| h.chain.to_string()),
                "sender started a new image ledger chain: accepted with its first record \
                 (a new sender, or one whose state was lost)");
            self.release(record.chain, &mut followed)?
        } else {
            Vec::new()
        };
        Ok(Admission::Held { position, released })
    }

    /// Forgets the records waiting (and those turned away for want of room)
    /// whose image object is not `held` (pruned
    /// from the blob store): their image cannot be delivered without it,
    /// and the records of a chain whose first record never comes (made up
    /// by a sender holding the key) would otherwise hold their places for
    /// good. Sent again once its pruned mark lapses, such an image waits
    /// again. Durable at the caller's next commit; the caller holds the
    /// image ledger's write lock, so no record starts waiting meanwhile.
    pub fn forget_waiting_unless(
        &self,
        held: &dyn Fn(&ObjectId) -> bool,
    ) -> Result<usize, StateError> {
        let mut followed = self.lock();
        let mut forgotten = 0;
        for item in self.waiting.iter() {
            let (k, _) = item.map_err(|e| self.db.sled_error(e))?;
            let Some(image) = k.get(16..48).and_then(|raw| <[u8; 32]>::try_from(raw).ok()) else {
                continue;
            };
            if !held(&ObjectId(image)) {
                self.waiting.remove(&k).map_err(|e| self.db.sled_error(e))?;
                followed.waiting = followed.waiting.saturating_sub(1);
                forgotten += 1;
            }
        }
        // And the turned away, which wait nowhere but here.
        let mut dropped = 0;
        for list in followed.turned_away.values_mut() {
            let before = list.len();
            list.retain(|(_, id, _)| held(id));
            dropped += before - list.len();
        }
        followed.turned_away.retain(|_, list| !list.is_empty());
        followed.turned_away_count = followed.turned_away_count.saturating_sub(dropped);
        if forgotten > 0 {
            self.changed();
        }
        Ok(forgotten)
    }

    /// Takes the records of `chain` that waited for its first record.
    fn release(
        &self,
        chain: ChainId,
        followed: &mut Followed,
    ) -> Result<Vec<(ObjectId, u64)>, StateError> {
        let mut out = Vec::new();
        for item in self.waiting.scan_prefix(chain.0.to_be_bytes()) {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let (Some(seq), Some(raw), Ok(seen)) =
                (seq_of(&k), k.get(16..48), <[u8; 8]>::try_from(v.as_ref()))
            else {
                continue;
            };
            let mut id = [0u8; 32];
            id.copy_from_slice(raw);
            out.push((seq, ObjectId(id), u64::from_be_bytes(seen)));
            self.waiting.remove(k).map_err(|e| self.db.sled_error(e))?;
            followed.waiting = followed.waiting.saturating_sub(1);
        }
        if let Some(turned_away) = followed.turned_away.remove(&chain) {
            followed.turned_away_count =
                followed.turned_away_count.saturating_sub(turned_away.len());
            out.extend(turned_away);
            out.sort_by_key(|&(seq, id, _)| (seq, id.0));
        }
        let out: Vec<(ObjectId, u64)> = out.into_iter().map(|(_, id, seen)| (id, seen)).collect();
        if !out.is_empty() {
            tracing::info!(chain = %chain, images = out.len(),
                "images that waited for their chain's first record are admitted now");
        }
        Ok(out)
    }

    fn refuse(
        &self,
        record: &ChainRecord,
        hash: RecordHash,
        image: &ObjectId,
        reason: String,
        now_ms: u64,
    ) -> Result<Admission, StateError> {
        let reason = shorten_to(&reason, MAX_REASON_BYTES);
        let refused = RefusedRecord {
            chain: record.chain,
            seq: record.seq,
            hash,
            manifest_digest: shorten_to(&record.manifest_digest, 80),
            image: image.digest(),
            reason: reason.clone(),
            at_ms: now_ms,
        };
        let value = serde_json::to_vec(&refused)
            .map_err(|e| self.db.corrupt(format!("ledger_refused/{image}"), e))?;
        let count = self.refused_ever()?.saturating_add(1);
        while self.refused.len() >= MAX_REFUSALS_KEPT {
            if !self.forget_oldest_refusal()? {
                break;
            }
        }
        self.refused
            .insert(image.0, value)
            .map_err(|e| self.db.sled_error(e))?;
        self.meta
            .insert(REFUSED_COUNT_KEY, &count.to_be_bytes())
            .map_err(|e| self.db.sled_error(e))?;
        self.changed();
        Ok(Admission::Refused { reason, new: true })
    }

    /// Refusals counted ever: the count kept beside them, or as many as
    /// are kept for a store written before the count was.
    fn refused_ever(&self) -> Result<u64, StateError> {
        let stored = self
            .meta
            .get(REFUSED_COUNT_KEY)
            .map_err(|e| self.db.sled_error(e))?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(stored.max(self.refused.len() as u64))
    }

    /// Drops the oldest refusal kept, to make room. Its image, seen again,
    /// is judged again by the same rules and refused again: a refusal is
    /// kept to count it once and to report it, not to hold it back.
    fn forget_oldest_refusal(&self) -> Result<bool, StateError> {
        let mut oldest: Option<(u64, sled::IVec)> = None;
        for item in self.refused.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            // An entry that no longer parses goes first.
            let at = serde_json::from_slice::<RefusedRecord>(&v).map_or(0, |r| r.at_ms);
            if oldest.as_ref().is_none_or(|(o, _)| at < *o) {
                oldest = Some((at, k));
            }
        }
        let Some((_, key)) = oldest else {
            return Ok(false);
        };
        self.refused
            .remove(key)
            .map_err(|e| self.db.sled_error(e))?;
        Ok(true)
    }

    /// The image of the record at `position` completed (idempotent).
    pub fn complete(
        &self,
        position: &ChainPosition,
        image: &ObjectId,
        now_ms: u64,
    ) -> Result<(), StateError> {
        let _followed = self.lock();
        let Some(mut held) = self.get(position.chain, position.seq)? else {
            return Ok(());
        };
        if held.complete_at_ms.is_some() || held.image != image.digest() {
            return Ok(());
        }
        held.complete_at_ms = Some(now_ms);
        self.put(&held)
    }

    /// Every seq up to the returned one of `chain` completed.
    fn contiguous(&self, chain: ChainId, followed: &mut Followed) -> Result<u64, StateError> {
        // Below the floor nothing is held, and nothing is owed.
        let floor = self.start_of(chain)?.map_or(0, |s| s.floor());
        let mut c = followed
            .contiguous
            .get(&chain)
            .copied()
            .unwrap_or(0)
            .max(floor);
        let start = record_key(chain, c.saturating_add(1));
        let end = record_key(chain, u64::MAX);
        for item in self.records.range(start..=end) {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            // The last seq a sender can number has no next.
            let Some(next) = c.checked_add(1).filter(|n| seq_of(&k) == Some(*n)) else {
                break;
            };
            let held: StoredRecord = serde_json::from_slice(&v)
                .map_err(|e| self.db.corrupt(format!("ledger_records/{chain}/{next}"), e))?;
            if held.complete_at_ms.is_none() {
                break;
            }
            c = next;
        }
        // A cache: each chain a heartbeat names would otherwise stay in it.
        if followed.contiguous.len() >= MAX_CHAINS_CACHED
            && !followed.contiguous.contains_key(&chain)
        {
            followed.contiguous.clear();
        }
        followed.contiguous.insert(chain, c);
        Ok(c)
    }

    /// Complete seqs of `chain` above `from`, up to `to`, ascending.
    fn completed_between(
        &self,
        chain: ChainId,
        from: u64,
        to: u64,
    ) -> Result<Vec<u64>, StateError> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        for item in self
            .records
            .range(record_key(chain, from)..=record_key(chain, to))
        {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let held: StoredRecord = serde_json::from_slice(&v)
                .map_err(|e| self.db.corrupt(format!("ledger_records/{chain}"), e))?;
            if held.complete_at_ms.is_some() {
                if let Some(seq) = seq_of(&k) {
                    out.push(seq);
                }
            }
        }
        Ok(out)
    }

    /// Takes the head of a heartbeat, heard at `now_ms`.
    pub fn announce(&self, head: &LedgerHead, now_ms: u64) -> Result<Announced, StateError> {
        let mut followed = self.lock();
        let previous = followed.announced.head;
        let outcome = followed.announced.observe(head, now_ms);
        match outcome {
            Announced::Same | Announced::Behind => return Ok(outcome),
            Announced::NewChain {
                previous: Some(old),
            } => {
                let old_head = previous.map_or(0, |h| h.seq);
                let contiguous = self.contiguous(old, &mut followed)?;
                let mut old_announced = Announcements::default();
                if let Some(h) = previous {
                    old_announced.observe(&h, now_ms);
                }
                let done = self.completed_between(old, contiguous + 1, old_head)?;
                let lost = missing(&old_announced, contiguous, done, MAX_RANGES);
                let lost_list: Vec<String> = lost.iter().map(|g| g.to_string()).collect();
                tracing::error!(chain = %head.chain, previous = %old, previous_head = old_head,
                    missing = %lost_list.join(", "),
                    "the sender announces a new image ledger chain: its state was lost, or \
                     another sender signs with the key; records of the previous chain it \
                     announced and this receiver never completed will not come");
            }
            Announced::NewChain { previous: None } => {
                tracing::info!(chain = %head.chain, head = head.seq, "following the sender's image ledger chain");
            }
            Announced::Grew { from, to } => {
                tracing::debug!(chain = %head.chain, from, to, "the sender announced new images");
            }
        }
        let contiguous = self.contiguous(head.chain, &mut followed)?;
        followed.announced.settle_below(contiguous);
        let value = serde_json::to_vec(&followed.announced)
            .map_err(|e| self.db.corrupt("ledger_meta/announced", e))?;
        self.meta
            .insert(ANNOUNCED_KEY, value)
            .map_err(|e| self.db.sled_error(e))?;
        self.changed();
        Ok(outcome)
    }

    /// What status shows, gaps judged at `now_ms` against `alert_ms`.
    pub fn view(&self, now_ms: u64, alert_hours: f64) -> Result<LedgerView, StateError> {
        let alert_ms = (alert_hours * 3_600_000.0) as u64;
        let (announced, contiguous, waiting) = {
            let mut followed = self.lock();
            let announced = followed.announced.clone();
            let contiguous = match announced.head {
                Some(h) => self.contiguous(h.chain, &mut followed)?,
                None => 0,
            };
            (announced, contiguous, followed.waiting)
        };
        let mut view = LedgerView {
            gap_alert_hours: alert_hours,
            highest_contiguous: contiguous,
            waiting_for_first_record: waiting as u64,
            waiting_chains: if waiting > 0 {
                self.waiting_chains()?
            } else {
                Vec::new()
            },
            records_refused: self.refused_ever()?,
            ..LedgerView::default()
        };
        let Some(head) = announced.head else {
            return Ok(view);
        };
        view.chain = Some(head.chain);
        view.head_announced = head.seq;
        if head.seq > 0 {
            let held = match self.get(head.chain, head.seq)? {
                Some(r) => Some(r.hash),
                None => self
                    .start_of(head.chain)?
                    .and_then(|s| s.checkpoint)
                    .filter(|c| c.seq == head.seq)
                    .map(|c| c.hash),
            };
            if held.is_some_and(|h| h != head.hash) {
                view.head_conflict = Some(head.seq);
            }
        }
        let done = self.completed_between(head.chain, contiguous.saturating_add(1), head.seq)?;
        for gap in missing(&announced, contiguous, done, MAX_RANGES) {
            if now_ms.saturating_sub(gap.since_ms) >= alert_ms {
                view.missing = view.missing.saturating_add(gap.count());
                if view.gaps.len() < GAPS_SHOWN {
                    view.gaps.push(gap);
                }
            } else {
                view.awaiting = view.awaiting.saturating_add(gap.count());
            }
        }
        Ok(view)
    }

    /// The head announced last, and the records announced and not completed.
    pub fn announced(&self) -> Result<Option<(LedgerHead, u64, Vec<Gap>)>, StateError> {
        let mut followed = self.lock();
        let Some(head) = followed.announced.head else {
            return Ok(None);
        };
        let contiguous = self.contiguous(head.chain, &mut followed)?;
        let done = self.completed_between(head.chain, contiguous.saturating_add(1), head.seq)?;
        let gaps = missing(&followed.announced, contiguous, done, MAX_RANGES);
        Ok(Some((head, contiguous, gaps)))
    }

    /// Every record held, in (chain, seq) order.
    pub fn all(&self) -> Result<Vec<StoredRecord>, StateError> {
        let mut out = Vec::new();
        for item in self.records.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let chain = chain_of(&k).unwrap_or_default();
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| self.db.corrupt(format!("ledger_records/{chain}"), e))?,
            );
        }
        Ok(out)
    }

    /// Every stored record with the (chain, seq) it is stored under.
    pub fn stored(&self) -> Result<Vec<(ChainPosition, StoredRecord)>, StateError> {
        let mut out = Vec::new();
        for item in self.records.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            let (Some(chain), Some(seq)) = (chain_of(&k), seq_of(&k)) else {
                continue;
            };
            let held: StoredRecord = serde_json::from_slice(&v)
                .map_err(|e| self.db.corrupt(format!("ledger_records/{chain}/{seq}"), e))?;
            out.push((ChainPosition { chain, seq }, held));
        }
        Ok(out)
    }

    /// Highest contiguous complete seq of `chain`.
    pub fn highest_contiguous(&self, chain: ChainId) -> Result<u64, StateError> {
        let mut followed = self.lock();
        self.contiguous(chain, &mut followed)
    }

    /// Every refusal, oldest first.
    pub fn refusals(&self) -> Result<Vec<RefusedRecord>, StateError> {
        let mut out = Vec::new();
        for item in self.refused.iter() {
            let (k, v) = item.map_err(|e| self.db.sled_error(e))?;
            out.push(serde_json::from_slice::<RefusedRecord>(&v).map_err(|e| {
                self.db
                    .corrupt(format!("ledger_refused/{}", hex::encode(&k)), e)
            })?);
        }
        out.sort_by_key(|r| r.at_ms);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_test_support::sample_image;

    struct Rig {
        _dir: tempfile::TempDir,
        chains: HeldChains,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        Rig {
            chains: HeldChains::open(&db).unwrap(),
            _dir: dir,
        }
    }

    /// Images 1..=n of one sender's chain.
    fn chain(n: usize) -> Vec<TransferManifest> {
        let mut head = LedgerHead::empty(ChainId(0x5eed));
        (0..n)
            .map(|i| {
                let img = sample_image("team/app", &[&format!("v{i}")], 1, 100).following(&head);
                head = img.tm.ledger.head();
                img.tm
            })
            .collect()
    }

    fn id(tm: &TransferManifest) -> ObjectId {
        ObjectId::of_bytes(&tm.to_object_bytes())
    }

    fn admit(r: &Rig, tm: &TransferManifest) -> Admission {
        r.chains.admit(tm, id(tm), 5, 10).unwrap()
    }

    fn held(a: &Admission) -> bool {
        matches!(a, Admission::Held { .. })
    }

    #[test]
    fn records_arriving_in_any_order_are_held_and_checked_as_they_fill_in() {
        let r = rig();
        let c = chain(4);
        // 3 first, then 1 (the genesis), then 4, then 2 between held 1 and 3.
        assert_eq!(admit(&r, &c[2]), Admission::Waiting);
        let Admission::Held { released, .. } = admit(&r, &c[0]) else {
            panic!("genesis not held")
        };
        assert_eq!(released, vec![(id(&c[2]), 5)]);
        assert!(held(&admit(&r, &c[2])));
        assert!(held(&admit(&r, &c[3])));
        assert!(held(&admit(&r, &c[1])));
        // The same record again with the same image: nothing new.
        assert!(held(&admit(&r, &c[1])));
        assert_eq!(r.chains.refusals().unwrap(), vec![]);
    }

    #[test]
    fn a_record_that_does_not_chain_is_refused_once_and_the_held_one_stands() {
        let r = rig();
        let c = chain(3);
        for tm in &c[..2] {
            assert!(held(&admit(&r, tm)));
        }
        // A sender holding the key signs another image as record 2.
        let mut forged = sample_image("evil/app", &["1"], 1, 100)
            .following(&c[0].ledger.head())
            .tm;
        let a = admit(&r, &forged);
        assert!(
            matches!(&a, Admission::Refused { reason, new: true } if reason.contains("already holds another record at seq 2")),
            "{a:?}"
        );
        // Seen again (a later pass, a restart): refused, not counted again.
        assert!(matches!(
            admit(&r, &forged),
            Admission::Refused { new: false, .. }
        ));
        // A record 3 that skips 2 (its prev is record 1's hash).
        forged = sample_image("evil/app", &["2"], 1, 100)
            .following(&c[0].ledger.head())
            .tm;
        forged.ledger.seq = 3;
        let a = admit(&r, &forged);
        assert!(
            matches!(&a, Admission::Refused { reason, .. } if reason.contains("does not follow the record held at seq 2")),
            "{a:?}"
        );
        // A record that is not its image's (copied from another image).
        let mut copied = sample_image("team/other", &["1"], 1, 100).tm;
        copied.ledger = c[2].ledger.clone();
        let a = admit(&r, &copied);
        assert!(
            matches!(&a, Admission::Refused { reason, .. } if reason.contains("its image object carries")),
            "{a:?}"
        );
        assert_eq!(r.chains.refusals().unwrap().len(), 3);
        // The genuine record 3 still fits.
        assert!(held(&admit(&r, &c[2])));
        // A replayed record 2 in another image object: refused.
        let mut replay = c[1].clone();
        replay.origin.source = "replayed".into();
        assert!(matches!(admit(&r, &replay), Admission::Refused { .. }));
    }

    #[test]
    fn refusals_keep_a_bounded_reason_and_only_the_newest_are_kept_while_all_are_counted() {
        let r = rig();
        let c = chain(1);
        assert!(held(&admit(&r, &c[0])));
        // A record copied into an image object whose destination is long
        // (names are bounded only after the record is admitted).
        let mut long = sample_image("team/other", &["1"], 1, 100).tm;
        long.ledger = c[0].ledger.clone();
        long.destination.repository = format!("team/{}", "é".repeat(300_000));
        let Admission::Refused { reason, new: true } = admit(&r, &long) else {
            panic!("not refused")
        };
        assert!(
            reason.len() <= MAX_REASON_BYTES + 40,
            "{} bytes",
            reason.len()
        );
        let kept = r.chains.refusals().unwrap();
        assert!(kept[0].reason.len() <= MAX_REASON_BYTES + 40);
        // More refusals than are kept: the oldest go, every one counts.
        for i in 0..MAX_REFUSALS_KEPT + 2 {
            let mut forged = sample_image("evil/app", &[&format!("v{i}")], 1, 100).tm;
            forged.ledger = c[0].ledger.clone();
            let image = id(&forged);
            let a = r.chains.admit(&forged, image, 5, 100 + i as u64).unwrap();
            assert!(matches!(a, Admission::Refused { new: true, .. }), "{a:?}");
        }
        let kept = r.chains.refusals().unwrap();
        assert_eq!(kept.len(), MAX_REFUSALS_KEPT);
        assert!(
            kept.iter().all(|k| k.at_ms >= 102),
            "the oldest were dropped"
        );
        let view = r.chains.view(1_000, 6.0).unwrap();
        assert_eq!(view.records_refused, MAX_REFUSALS_KEPT as u64 + 3);
    }

    /// A two-record chain whose record 2 found the waiting places taken.
    fn turned_away(r: &Rig) -> Vec<TransferManifest> {
        r.chains.lock().waiting = MAX_WAITING;
        let c = chain(2);
        assert!(matches!(
            admit(r, &c[1]),
            Admission::Refused { new: true, .. }
        ));
        c
    }

    #[test]
    fn waiting_records_are_bounded_and_a_record_turned_away_for_room_is_not_refused_for_good() {
        let r = rig();
        let c = turned_away(&r);
        // Room again (a restart, or records that waited pruned): the same
        // record waits instead of being refused before.
        r.chains.lock().waiting = 0;
        assert_eq!(admit(&r, &c[1]), Admission::Waiting);
    }

    #[test]
    fn a_record_turned_away_for_room_is_handed_back_with_its_chains_first_record() {
        let r = rig();
        let c = turned_away(&r);
        let Admission::Held { released, .. } = admit(&r, &c[0]) else {
            panic!("the first record is held")
        };
        assert_eq!(released, vec![(id(&c[1]), 5)]);
        assert_eq!(r.chains.lock().turned_away_count, 0);
        // Registered again, it is held: its chain is known now.
        assert!(held(&admit(&r, &c[1])));
    }

    #[test]
    fn a_record_turned_away_is_not_handed_back_once_its_image_object_is_pruned() {
        let r = rig();
        let c = turned_away(&r);
        assert_eq!(r.chains.forget_waiting_unless(&|_| false).unwrap(), 0);
        assert_eq!(r.chains.lock().turned_away_count, 0);
        let Admission::Held { released, .. } = admit(&r, &c[0]) else {
            panic!("the first record is held")
        };
        assert!(released.is_empty());
    }

    fn head_of(tm: &TransferManifest) -> LedgerHead {
        tm.ledger.head()
    }

    #[test]
    fn gaps_are_announced_seqs_not_completed_in_time_and_clear_on_completion() {
        let r = rig();
        let c = chain(3);
        let hours_ms = 3_600_000;
        r.chains.announce(&head_of(&c[2]), 1000).unwrap();
        // Images 1 and 3 arrive and complete; 2 does not.
        for tm in [&c[0], &c[2]] {
            let Admission::Held { position, .. } = admit(&r, tm) else {
                panic!()
            };
            r.chains.complete(&position, &id(tm), 2000).unwrap();
        }
        let early = r.chains.view(1000 + hours_ms, 6.0).unwrap();
        assert_eq!((early.head_announced, early.highest_contiguous), (3, 1));
        assert_eq!((early.gaps.len(), early.awaiting), (0, 1));
        let late = r.chains.view(1000 + 6 * hours_ms, 6.0).unwrap();
        assert_eq!(
            late.gaps,
            vec![Gap {
                from: 2,
                to: 2,
                since_ms: 1000
            }]
        );
        assert_eq!(late.missing, 1);
        // Held but not complete is still missing; complete clears it.
        let Admission::Held { position, .. } = admit(&r, &c[1]) else {
            panic!()
        };
        assert_eq!(r.chains.view(1000 + 6 * hours_ms, 6.0).unwrap().missing, 1);
        r.chains.complete(&position, &id(&c[1]), 3000).unwrap();
        let clear = r.chains.view(1000 + 6 * hours_ms, 6.0).unwrap();
        assert_eq!((clear.missing, clear.highest_contiguous), (0, 3));
        assert_eq!(clear.gaps, vec![]);
    }

    #[test]
    fn a_new_chain_announced_replaces_the_followed_one() {
        let r = rig();
        let old = chain(2);
        r.chains.announce(&head_of(&old[1]), 0).unwrap();
        let fresh = sample_image("team/app", &["new"], 1, 100).tm;
        let outcome = r.chains.announce(&head_of(&fresh), 10).unwrap();
        assert_eq!(
            outcome,
            Announced::NewChain {
                previous: Some(ChainId(0x5eed))
            }
        );
        let v = r.chains.view(10 + 7 * 3_600_000, 6.0).unwrap();
        assert_eq!(v.chain, Some(fresh.ledger.chain));
        assert_eq!((v.head_announced, v.missing), (1, 1));
        // The new chain's genesis is accepted and completes.
        let Admission::Held { position, .. } = admit(&r, &fresh) else {
            panic!()
        };
        r.chains.complete(&position, &id(&fresh), 20).unwrap();
        assert_eq!(r.chains.view(10 + 7 * 3_600_000, 6.0).unwrap().missing, 0);
    }

    #[test]
    fn what_is_held_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = chain(2);
        {
            let db = StateDb::open(&dir.path().join("db")).unwrap();
            let chains = HeldChains::open(&db).unwrap();
            chains.announce(&head_of(&c[1]), 7).unwrap();
            let Admission::Held { position, .. } = chains.admit(&c[0], id(&c[0]), 1, 1).unwrap()
            else {
                panic!()
            };
            chains.complete(&position, &id(&c[0]), 8).unwrap();
            assert_eq!(
                chains.admit(&c[1], id(&c[1]), 1, 1).unwrap(),
                Admission::Held {
                    position: ChainPosition {
                        chain: ChainId(0x5eed),
                        seq: 2
                    },
                    released: vec![]
                }
            );
            db.commit("test").unwrap();
        }
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let chains = HeldChains::open(&db).unwrap();
        let v = chains.view(7 + 7 * 3_600_000, 6.0).unwrap();
        assert_eq!(
            (v.head_announced, v.highest_contiguous, v.missing),
            (2, 1, 1)
        );
        assert_eq!(v.gaps[0].since_ms, 7);
        assert_eq!(chains.all().unwrap().len(), 2);
    }

    /// Admits and completes `tms` in order.
    fn complete_all(r: &Rig, tms: &[TransferManifest]) {
        for tm in tms {
            let Admission::Held { position, .. } = admit(r, tm) else {
                panic!("not held: seq {}", tm.ledger.seq)
            };
            r.chains.complete(&position, &id(tm), 100).unwrap();
        }
    }

    #[test]
    fn delivered_records_are_pruned_to_a_checkpoint_that_still_checks_the_chain() {
        let r = rig();
        let c = chain(6);
        complete_all(&r, &c[..4]);
        r.chains.announce(&head_of(&c[5]), 0).unwrap();
        // Image 3 not delivered long enough: the prune stops before it, and
        // the newest 2 records are kept whatever their age.
        let not_yet = id(&c[2]).digest();
        let pruned = r
            .chains
            .prune(2, |held| held.image != not_yet, 500)
            .unwrap();
        assert_eq!(pruned.len(), 1);
        let (chain, count, checkpoint) = pruned[0];
        assert_eq!((chain, count), (ChainId(0x5eed), 2));
        assert_eq!(checkpoint.seq, 2);
        assert_eq!(checkpoint.hash, c[1].ledger.hash());
        assert!(r.chains.get(chain, 1).unwrap().is_none());
        assert!(r.chains.get(chain, 3).unwrap().is_some());
        // Gaps count from the checkpoint: only 5 and 6 are missing.
        let v = r.chains.view(7 * 3_600_000, 6.0).unwrap();
        assert_eq!((v.highest_contiguous, v.missing), (4, 2), "{v:?}");
        assert_eq!(v.gaps[0].from, 5);
        // Now everything delivered, keeping the newest 1: 3 goes, 4 stays.
        let pruned = r.chains.prune(1, |_| true, 600).unwrap();
        assert_eq!((pruned[0].1, pruned[0].2.seq), (1, 3));
        // A pruned record seen again is not admitted again (nor is anything
        // claiming a seq below the checkpoint); one claiming the
        // checkpoint's seq with another hash is refused.
        assert_eq!(admit(&r, &c[0]), Admission::Pruned);
        let mut forged = sample_image("evil/app", &["1"], 1, 100)
            .following(&c[0].ledger.head())
            .tm;
        assert_eq!(admit(&r, &forged), Admission::Pruned);
        forged = sample_image("evil/app", &["2"], 1, 100)
            .following(&c[1].ledger.head())
            .tm;
        forged.ledger.seq = 3;
        assert!(matches!(
            admit(&r, &forged),
            Admission::Refused { new: true, .. }
        ));
        // Record 5 still has to follow the records held; 5 and 6 complete.
        complete_all(&r, &c[4..]);
        let v = r.chains.view(7 * 3_600_000, 6.0).unwrap();
        assert_eq!((v.highest_contiguous, v.missing), (6, 0));
        // The report carries the checkpoint and the records kept.
        let report = report::build(&r.chains, &[]).unwrap();
        assert_eq!(report.chains[0].checkpoint.map(|c| c.seq), Some(3));
        assert_eq!(report.chains[0].records.len(), 3);
        assert!(report.chains[0].pruned_delivered(2));
        assert!(!report.chains[0].pruned_delivered(4));
    }

    #[test]
    fn a_pruned_chain_verifies_from_its_checkpoint_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = chain(4);
        {
            let db = StateDb::open(&dir.path().join("db")).unwrap();
            let r = Rig {
                chains: HeldChains::open(&db).unwrap(),
                _dir: tempfile::tempdir().unwrap(),
            };
            complete_all(&r, &c);
            r.chains.prune(1, |_| true, 1).unwrap();
            db.commit("test").unwrap();
        }
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        let chains = HeldChains::open(&db).unwrap();
        let report = report::build(&chains, &[]).unwrap();
        let held = &report.chains[0];
        let checkpoint = held.checkpoint.expect("checkpoint kept");
        assert_eq!(checkpoint.seq, 3);
        let mut walk = weir_proto::ledger::ChainWalk::after(held.chain, false, &checkpoint);
        for r in &held.records {
            walk.step(r.record.seq, &r.record, Some(r.hash)).unwrap();
        }
        assert_eq!(walk.count(), 1);
        // The contiguous count starts at the checkpoint after a reopen.
        assert_eq!(chains.highest_contiguous(held.chain).unwrap(), 4);
    }

    #[test]
    fn a_chain_accepted_mid_way_admits_records_from_that_seq_only() {
        let r = rig();
        let c = chain(5);
        // This receiver lost its state: records 3 and 4 come, 1 never will.
        assert_eq!(admit(&r, &c[3]), Admission::Waiting);
        assert_eq!(admit(&r, &c[2]), Admission::Waiting);
        assert_eq!(
            r.chains.waiting_chains().unwrap(),
            vec![WaitingChain {
                chain: ChainId(0x5eed),
                lowest_seq: 3,
                images: 2
            }]
        );
        let v = r.chains.view(0, 6.0).unwrap();
        assert_eq!(v.waiting_chains.len(), 1);
        let mut text = String::new();
        r.chains.announce(&head_of(&c[4]), 0).unwrap();
        r.chains.view(0, 6.0).unwrap().render(&mut text, 0);
        assert!(
            text.contains("ledger accept --chain 0000000000005eed --from 3"),
            "{text}"
        );

        assert!(matches!(
            r.chains.accept_from(ChainId(0x5eed), 0, 1),
            Err(AcceptError::SeqZero)
        ));
        let start = r.chains.accept_from(ChainId(0x5eed), 4, 1).unwrap();
        assert_eq!(start.accepted_from, Some(4));
        // Raising it is refused; lowering it is allowed.
        assert!(matches!(
            r.chains.accept_from(ChainId(0x5eed), 5, 2),
            Err(AcceptError::AlreadyAccepted { .. })
        ));
        r.chains.accept_from(ChainId(0x5eed), 3, 2).unwrap();
        // Record 2 (below the acceptance) still waits; 3.. are admitted.
        assert_eq!(admit(&r, &c[1]), Admission::Waiting);
        complete_all(&r, &c[2..]);
        let v = r.chains.view(7 * 3_600_000, 6.0).unwrap();
        assert_eq!((v.highest_contiguous, v.missing), (5, 0), "{v:?}");
        // The records waited on were admitted; 2 still waits.
        assert_eq!(
            r.chains.waiting_chains().unwrap(),
            vec![WaitingChain {
                chain: ChainId(0x5eed),
                lowest_seq: 2,
                images: 1
            }]
        );
        // A chain with its first record held needs no acceptance.
        let other = rig();
        assert!(held(&admit(&other, &c[0])));
        assert!(matches!(
            other.chains.accept_from(ChainId(0x5eed), 3, 1),
            Err(AcceptError::AlreadyAccepted { .. })
        ));
        let report = report::build(&r.chains, &[]).unwrap();
        assert_eq!(report.chains[0].accepted_from, Some(3));
    }
}
