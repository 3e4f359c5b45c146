//! The image ledger: every image the sender accepts (a drop or a pull) gets
//! the next number of a hash chain, so the receiver, which can never answer,
//! can still tell what it should have received and whether the history it
//! holds is the sender's.
//!
//! # The record and the chain
//!
//! A [`ChainRecord`] holds the chain's id, its sequence number (1, 2, …),
//! the hash of the record before it ([`RecordHash::ZERO`] for seq 1), and
//! what was accepted: manifest digest, destination, source, the policy
//! verdict (rule, gate, worst severity, signature) and the time. Its hash
//! is the sha256 of a domain tag and its postcard bytes. The record travels
//! inside the image's transfer object ([`TransferManifest::ledger`]), so it
//! is covered by the object's sha256 and every frame's HMAC; the chain's
//! head ([`LedgerHead`]: chain, seq, hash) travels in every heartbeat.
//!
//! # Images arrive in any order
//!
//! The carousel sends images again and again in passes, and a small image
//! accepted later can complete before a large one accepted earlier: that is
//! normal, not an attack. So the receiver holds records by sequence number
//! and checks the chain as it fills in ([`check_links`]):
//!
//! - a record whose predecessor is held must name that record's hash as its
//!   `prev`;
//! - a record whose successor is held must hash to that successor's `prev`;
//! - a record at a sequence number already held with another hash is
//!   refused: forged or replayed history.
//!
//! The record held first stands; the one that contradicts it is refused and
//! counted. Either way the refusal is the alarm: with the HMAC key a
//! compromised sender can sign anything, but it cannot rewrite what the
//! receiver already holds without being seen.
//!
//! # Gaps
//!
//! The heartbeat's head tells the receiver how many records exist. Every
//! sequence number up to the head that has not completed (record held and
//! image complete) is missing; [`Announcements`] remembers when each was
//! first announced, and [`missing`] lists the missing ranges with that time,
//! so the receiver can raise a gap when one has waited longer than its
//! alert time.
//!
//! # A sender whose state was lost
//!
//! Each chain has a random 64-bit [`ChainId`] drawn when the sender's
//! ledger is created. A sender that lost its state starts a new chain at
//! seq 1; the receiver accepts a chain it does not know only with that
//! chain's genesis record (seq 1, prev zero). Records of an unknown chain
//! that arrive before its genesis wait for it.
//!
//! # On the wire
//!
//! The record is the last field of the image object's [`TransferManifest`]
//! (postcard, like the rest of it); the head is the heartbeat's `ledger`
//! field (`None` from a sender without a ledger). Everything is bounded: a
//! record's strings and lists have limits ([`ChainRecord::check`]) and the
//! image object its own, since a compromised low side signs frames with the
//! real key; a hostile head far ahead costs one range, not a list
//! ([`missing`]), and the remembered announcement steps are capped
//! ([`MAX_ANNOUNCEMENT_STEPS`]).
//!
//! [`report`] is the receiver's report, HMAC'd under a report key and
//! carried back by hand.

pub mod report;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::manifest::{Destination, ObjectId, TransferManifest, Verdict};
use crate::names::shorten_to;

/// Hashed before a record's bytes, so a record hash is never the sha256 of
/// anything else in the system.
const RECORD_DOMAIN: &[u8] = b"weir ledger record v1\0";

/// Longest `source` of a record (a drop file name or a source reference).
pub const MAX_SOURCE_BYTES: usize = 4096;
/// Longest text of a verdict field (a rule regex, a summary).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest destination repository (the distribution spec's bound).
pub const MAX_REPOSITORY_BYTES: usize = 255;
/// Most tags a record names.
pub const MAX_TAGS: usize = 256;
/// Longest tag (the distribution spec's bound).
pub const MAX_TAG_BYTES: usize = 128;
/// Records each side keeps of a chain by default before pruning the older
/// ones it has accounted for (`[ledger] keep_records`).
pub const DEFAULT_KEEP_RECORDS: u64 = 10_000;
/// Most remembered announcement steps; older ones merge (see
/// [`Announcements::observe`]).
pub const MAX_ANNOUNCEMENT_STEPS: usize = 4096;

/// Identity of one chain: drawn at random when a sender's ledger is created.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChainId(pub u64);

impl std::fmt::Display for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::fmt::Debug for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainId({self})")
    }
}

impl std::str::FromStr for ChainId {
    type Err = RecordError;

    /// 16 hex digits, as [`Display`](std::fmt::Display) writes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 {
            return Err(RecordError::Decode(format!(
                "chain id {s:?}: 16 hex digits"
            )));
        }
        u64::from_str_radix(s, 16)
            .map(ChainId)
            .map_err(|_| RecordError::Decode(format!("chain id {s:?}: 16 hex digits")))
    }
}

// Hex in JSON (reports, snapshots, sled values), a plain integer on the wire.
impl Serialize for ChainId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ChainId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            u64::deserialize(d).map(ChainId)
        }
    }
}

/// The hash of a record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RecordHash(pub [u8; 32]);

impl RecordHash {
    /// The `prev` of a chain's first record.
    pub const ZERO: RecordHash = RecordHash([0; 32]);

    /// The first 12 hex digits, for log lines.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl std::fmt::Display for RecordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for RecordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordHash({})", self.short())
    }
}

impl std::str::FromStr for RecordHash {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| RecordError::Decode(format!("record hash {s:?}: 64 hex digits")))?;
        Ok(RecordHash(out))
    }
}

impl Serialize for RecordHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for RecordHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(RecordHash)
        }
    }
}

/// Why a record, or a ledger's bytes, were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("sequence number 0 (a chain starts at 1)")]
    SeqZero,
    #[error("record 1 of a chain names a previous record")]
    GenesisPrev,
    #[error("{field} is {len} bytes, more than the {max} a record may hold")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field}: {count} entries, more than the {max} a record may hold")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error("manifest digest {0:?} is not a sha256 digest")]
    Digest(String),
    #[error("the record names {field} {record:?}, its image object carries {image:?}")]
    NotItsImage {
        field: &'static str,
        record: String,
        image: String,
    },
    #[error("does not decode: {0}")]
    Decode(String),
}

/// One accepted image, numbered in its sender's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainRecord {
    pub chain: ChainId,
    /// 1 for the chain's first record.
    pub seq: u64,
    /// Hash of record `seq - 1`; [`RecordHash::ZERO`] for seq 1.
    pub prev: RecordHash,
    /// `sha256:` digest of the image's manifest (or index).
    pub manifest_digest: String,
    /// Where it goes, as the sender wrote it (before any receiver mapping).
    pub destination: Destination,
    /// Drop file name, or source registry reference.
    pub source: String,
    pub verdict: Verdict,
    /// Unix seconds at acceptance.
    pub accepted_at: u64,
}

fn bounded(field: &'static str, text: &str, max: usize) -> Result<(), RecordError> {
    if text.len() > max {
        return Err(RecordError::TooLong {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(())
}

fn bounded_opt(field: &'static str, text: &Option<String>, max: usize) -> Result<(), RecordError> {
    text.as_deref().map_or(Ok(()), |t| bounded(field, t, max))
}

impl ChainRecord {
    /// The record's bytes: its postcard encoding (what is hashed).
    pub fn to_bytes(&self) -> Vec<u8> {
        // postcard into a Vec cannot fail for these types.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ChainRecord, RecordError> {
        postcard::from_bytes(bytes).map_err(|e| RecordError::Decode(e.to_string()))
    }

    /// sha256 of the domain tag and the record's bytes.
    pub fn hash(&self) -> RecordHash {
        let mut h = Sha256::new();
        h.update(RECORD_DOMAIN);
        h.update(self.to_bytes());
        RecordHash(h.finalize().into())
    }

    /// The sender's chain after this record.
    pub fn head(&self) -> LedgerHead {
        LedgerHead {
            chain: self.chain,
            seq: self.seq,
            hash: self.hash(),
        }
    }

    /// Ranges and lengths, before the receiver keeps anything of it.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.seq == 0 {
            return Err(RecordError::SeqZero);
        }
        if self.seq == 1 && self.prev != RecordHash::ZERO {
            return Err(RecordError::GenesisPrev);
        }
        if ObjectId::from_digest(&self.manifest_digest).is_err() {
            return Err(RecordError::Digest(shorten_to(&self.manifest_digest, 80)));
        }
        bounded(
            "destination.repository",
            &self.destination.repository,
            MAX_REPOSITORY_BYTES,
        )?;
        if self.destination.tags.len() > MAX_TAGS {
            return Err(RecordError::TooMany {
                field: "destination.tags",
                count: self.destination.tags.len(),
                max: MAX_TAGS,
            });
        }
        for t in &self.destination.tags {
            bounded("destination tag", t, MAX_TAG_BYTES)?;
        }
        bounded("source", &self.source, MAX_SOURCE_BYTES)?;
        let v = &self.verdict;
        bounded_opt("verdict.rule", &v.rule, MAX_TEXT_BYTES)?;
        bounded_opt("verdict.gate", &v.gate, MAX_TEXT_BYTES)?;
        bounded_opt("verdict.worst_severity", &v.worst_severity, MAX_TEXT_BYTES)?;
        bounded_opt("verdict.signature", &v.signature, MAX_TEXT_BYTES)?;
        bounded("verdict.summary", &v.summary, MAX_TEXT_BYTES)
    }

    /// Checks the record against the image object it travels in: a record
    /// copied from another image must not account for this one.
    pub fn belongs_to(&self, tm: &TransferManifest) -> Result<(), RecordError> {
        if self.manifest_digest != tm.manifest.digest {
            return Err(RecordError::NotItsImage {
                field: "manifest digest",
                record: shorten_to(&self.manifest_digest, 80),
                image: shorten_to(&tm.manifest.digest, 80),
            });
        }
        if self.destination != tm.destination {
            // The image object's names are not bounded yet (that comes
            // after its record is admitted): quote only a part of them.
            return Err(RecordError::NotItsImage {
                field: "destination",
                record: shorten_to(&self.destination.display(), 200),
                image: shorten_to(&tm.destination.display(), 200),
            });
        }
        Ok(())
    }
}

/// A chain's last record, as heartbeats announce it: `seq` records exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LedgerHead {
    pub chain: ChainId,
    /// 0 while the chain has no record.
    pub seq: u64,
    /// Hash of record `seq` ([`RecordHash::ZERO`] while there is none).
    pub hash: RecordHash,
}

/// What a new record says about the image; the chain fields come from the
/// head ([`LedgerHead::next`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFields {
    pub manifest_digest: String,
    pub destination: Destination,
    pub source: String,
    pub verdict: Verdict,
    pub accepted_at: u64,
}

impl LedgerHead {
    /// A new chain, no record yet.
    pub fn empty(chain: ChainId) -> LedgerHead {
        LedgerHead {
            chain,
            seq: 0,
            hash: RecordHash::ZERO,
        }
    }

    /// The record that follows this head.
    pub fn next(&self, fields: RecordFields) -> ChainRecord {
        ChainRecord {
            chain: self.chain,
            seq: self.seq.saturating_add(1),
            prev: self.hash,
            manifest_digest: fields.manifest_digest,
            destination: fields.destination,
            source: fields.source,
            verdict: fields.verdict,
            accepted_at: fields.accepted_at,
        }
    }
}

/// Why a record does not fit the records held around it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error(
        "chain {chain} already holds another record at seq {seq} (forged or replayed history)"
    )]
    Conflict { chain: ChainId, seq: u64 },
    #[error(
        "record {seq} of chain {chain} does not follow the record held at seq {}: \
         its prev is not that record's hash (forged or reordered history)",
        seq - 1
    )]
    BreaksFromBefore { chain: ChainId, seq: u64 },
    #[error(
        "the record held at seq {} of chain {chain} does not follow record {seq}: \
         its prev is not this record's hash (forged or reordered history)",
        seq + 1
    )]
    BreaksToAfter { chain: ChainId, seq: u64 },
    #[error("record {seq} of chain {chain} came before with another image object")]
    OtherImage { chain: ChainId, seq: u64 },
}

/// Checks a record against its held neighbours: `before` is the hash of
/// the record held at `seq - 1`, `after_prev` the `prev` of the one held at
/// `seq + 1`. A neighbour not held yet is checked when it arrives.
pub fn check_links(
    record: &ChainRecord,
    hash: RecordHash,
    before: Option<RecordHash>,
    after_prev: Option<RecordHash>,
) -> Result<(), ChainBreak> {
    if before.is_some_and(|b| b != record.prev) {
        return Err(ChainBreak::BreaksFromBefore {
            chain: record.chain,
            seq: record.seq,
        });
    }
    if after_prev.is_some_and(|a| a != hash) {
        return Err(ChainBreak::BreaksToAfter {
            chain: record.chain,
            seq: record.seq,
        });
    }
    Ok(())
}

/// What a heartbeat's head changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// Nothing new.
    Same,
    /// Records `from..=to` were announced for the first time.
    Grew { from: u64, to: u64 },
    /// Another chain than the one followed so far (the sender's state was
    /// lost, or this is the first head heard).
    NewChain { previous: Option<ChainId> },
    /// A head below the one already announced (an older heartbeat).
    Behind,
}

/// When each sequence number of the announced chain was first announced:
/// steps `(from seq, ms)` meaning seqs from `from` up to the next step's
/// were first announced at `ms`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Announcements {
    pub head: Option<LedgerHead>,
    pub steps: Vec<(u64, u64)>,
}

impl Announcements {
    /// Takes a heartbeat's head, heard at `now_ms`.
    pub fn observe(&mut self, head: &LedgerHead, now_ms: u64) -> Announced {
        let Some(known) = self.head else {
            self.start(head, now_ms);
            return Announced::NewChain { previous: None };
        };
        if known.chain != head.chain {
            self.start(head, now_ms);
            return Announced::NewChain {
                previous: Some(known.chain),
            };
        }
        if head.seq < known.seq {
            return Announced::Behind;
        }
        if head.seq == known.seq {
            self.head = Some(*head);
            return Announced::Same;
        }
        let from = known.seq + 1;
        self.steps.push((from, now_ms));
        if self.steps.len() > MAX_ANNOUNCEMENT_STEPS {
            // The second step's seqs take the first's (earlier) time: a gap
            // may be raised sooner, never later.
            self.steps.remove(1);
        }
        self.head = Some(*head);
        Announced::Grew { from, to: head.seq }
    }

    fn start(&mut self, head: &LedgerHead, now_ms: u64) {
        self.head = Some(*head);
        self.steps = if head.seq > 0 {
            vec![(1, now_ms)]
        } else {
            Vec::new()
        };
    }

    /// When `seq` was first announced, if it was.
    pub fn first_announced(&self, seq: u64) -> Option<u64> {
        if self.head.is_none_or(|h| seq == 0 || seq > h.seq) {
            return None;
        }
        // Steps ascend by seq: the last one at or below `seq`.
        let at = self.steps.partition_point(|(from, _)| *from <= seq);
        at.checked_sub(1).map(|i| self.steps[i].1)
    }

    /// The steps starting inside `from + 1..=to`.
    fn steps_within(&self, from: u64, to: u64) -> &[(u64, u64)] {
        let start = self.steps.partition_point(|(s, _)| *s <= from);
        let end = self.steps.partition_point(|(s, _)| *s <= to);
        &self.steps[start..end.max(start)]
    }

    /// Forgets the steps wholly below `contiguous + 1`: everything up to
    /// `contiguous` completed, so their times no longer matter.
    pub fn settle_below(&mut self, contiguous: u64) {
        while self.steps.len() > 1 && self.steps[1].0 <= contiguous + 1 {
            self.steps.remove(0);
        }
    }
}

/// Records announced and not completed: seqs `from..=to`, first announced
/// at `since_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub since_ms: u64,
}

impl Gap {
    pub fn count(&self) -> u64 {
        self.to - self.from + 1
    }
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.from == self.to {
            write!(f, "seq {}", self.from)
        } else {
            write!(f, "seqs {}-{}", self.from, self.to)
        }
    }
}

/// The announced records not completed, as ranges split by when they were
/// first announced, at most `limit` of them. `completed` yields the
/// completed seqs above `contiguous` in ascending order (every seq up to
/// `contiguous` completed).
pub fn missing(
    announced: &Announcements,
    contiguous: u64,
    completed: impl IntoIterator<Item = u64>,
    limit: usize,
) -> Vec<Gap> {
    let Some(head) = announced.head else {
        return Vec::new();
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut expected = contiguous.saturating_add(1);
    for seq in completed {
        if seq > head.seq || ranges.len() >= limit {
            break;
        }
        if seq > expected {
            ranges.push((expected, seq - 1));
        }
        expected = expected.max(seq.saturating_add(1));
    }
    if expected <= head.seq && ranges.len() < limit {
        ranges.push((expected, head.seq));
    }
    let mut out = Vec::new();
    for (from, to) in ranges {
        // Split at the announcement steps inside the range.
        let mut start = from;
        for &(step, _) in announced.steps_within(from, to) {
            out.push(Gap {
                from: start,
                to: step - 1,
                since_ms: announced.first_announced(start).unwrap_or(0),
            });
            start = step;
        }
        out.push(Gap {
            from: start,
            to,
            since_ms: announced.first_announced(start).unwrap_or(0),
        });
        if out.len() >= limit {
            out.truncate(limit);
            break;
        }
    }
    out
}

/// The last record pruned from a chain: every record up to `seq` was
/// accounted for (delivered, on the receiver; its image's passes done, on
/// the sender) and is no longer stored. `hash` is record `seq`'s, so the
/// record after it is still checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: RecordHash,
    /// Milliseconds since the Unix epoch, when it was last moved.
    pub at_ms: u64,
}

/// The first bad record of a stored chain, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {seq}: {why}")]
pub struct BadRecord {
    pub seq: u64,
    pub why: String,
}

/// Re-checks a stored chain record by record, in seq order: each record's
/// ranges, its stored hash, and its link to the record before. The sender's
/// chain must have no hole; the receiver's may (images still to come).
pub struct ChainWalk {
    chain: ChainId,
    contiguous: bool,
    last: Option<(u64, RecordHash)>,
    count: u64,
}

impl ChainWalk {
    pub fn new(chain: ChainId, contiguous: bool) -> ChainWalk {
        ChainWalk {
            chain,
            contiguous,
            last: None,
            count: 0,
        }
    }

    /// A walk of a chain whose records up to `checkpoint` were pruned: the
    /// first record stored must come after it (and, at its next seq, name
    /// its hash as `prev`).
    pub fn after(chain: ChainId, contiguous: bool, checkpoint: &Checkpoint) -> ChainWalk {
        ChainWalk {
            chain,
            contiguous,
            last: Some((checkpoint.seq, checkpoint.hash)),
            count: 0,
        }
    }

    /// Records checked so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The next stored record: `key_seq` is the seq it is stored under,
    /// `stored_hash` the hash stored beside it, if any.
    pub fn step(
        &mut self,
        key_seq: u64,
        record: &ChainRecord,
        stored_hash: Option<RecordHash>,
    ) -> Result<RecordHash, BadRecord> {
        let bad = |why: String| BadRecord { seq: key_seq, why };
        if record.seq != key_seq {
            return Err(bad(format!(
                "stored under seq {key_seq} but says {}",
                record.seq
            )));
        }
        if record.chain != self.chain {
            return Err(bad(format!(
                "belongs to chain {}, not {}",
                record.chain, self.chain
            )));
        }
        record.check().map_err(|e| bad(e.to_string()))?;
        let hash = record.hash();
        if let Some(stored) = stored_hash {
            if stored != hash {
                return Err(bad(format!(
                    "hashes to {}, but {} is stored beside it",
                    hash.short(),
                    stored.short()
                )));
            }
        }
        match self.last {
            None if self.contiguous && key_seq != 1 => {
                return Err(bad("the chain does not start at seq 1".into()));
            }
            Some((seq, _)) if key_seq <= seq => {
                return Err(bad(format!("comes after record {seq}")));
            }
            Some((seq, _)) if self.contiguous && key_seq != seq + 1 => {
                return Err(bad(format!("records {}..{} are missing", seq + 1, key_seq)));
            }
            Some((seq, prev_hash)) if key_seq == seq + 1 && record.prev != prev_hash => {
                return Err(bad(format!(
                    "its prev {} is not the hash {} of record {seq}",
                    record.prev.short(),
                    prev_hash.short()
                )));
            }
            _ => {}
        }
        self.last = Some((key_seq, hash));
        self.count += 1;
        Ok(hash)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fields(n: u64) -> RecordFields {
        RecordFields {
            manifest_digest: ObjectId::of_bytes(&n.to_be_bytes()).digest(),
            destination: Destination {
                repository: "team/app".into(),
                tags: vec![format!("v{n}")],
            },
            source: format!("app-{n}.tar"),
            verdict: Verdict {
                rule: Some("team/.*".into()),
                gate: Some("High".into()),
                worst_severity: Some("Medium".into()),
                signature: None,
                summary: "ok".into(),
            },
            accepted_at: 1_700_000_000 + n,
        }
    }

    /// Records 1..=n of one chain.
    pub(crate) fn chain_of(chain: u64, n: u64) -> Vec<ChainRecord> {
        let mut head = LedgerHead::empty(ChainId(chain));
        (1..=n)
            .map(|i| {
                let r = head.next(fields(i));
                head = r.head();
                r
            })
            .collect()
    }

    #[test]
    fn records_chain_and_round_trip_in_both_encodings() {
        let c = chain_of(0xabc, 3);
        assert_eq!(c[0].seq, 1);
        assert_eq!(c[0].prev, RecordHash::ZERO);
        assert_eq!(c[1].prev, c[0].hash());
        assert_eq!(c[2].prev, c[1].hash());
        for r in &c {
            r.check().unwrap();
            assert_eq!(ChainRecord::from_bytes(&r.to_bytes()).unwrap(), *r);
            let json = serde_json::to_string(r).unwrap();
            assert!(json.contains("\"chain\":\"0000000000000abc\""), "{json}");
            assert_eq!(serde_json::from_str::<ChainRecord>(&json).unwrap(), *r);
        }
        // Any field changes the hash.
        let mut other = c[1].clone();
        other.accepted_at += 1;
        assert_ne!(other.hash(), c[1].hash());
    }

    #[test]
    fn checks_bound_what_a_record_may_hold() {
        let good = chain_of(1, 2);
        let mut r = good[0].clone();
        r.seq = 0;
        assert_eq!(r.check(), Err(RecordError::SeqZero));
        let mut r = good[0].clone();
        r.prev = RecordHash([1; 32]);
        assert_eq!(r.check(), Err(RecordError::GenesisPrev));
        let mut r = good[1].clone();
        r.source = "x".repeat(MAX_SOURCE_BYTES + 1);
        assert!(matches!(r.check(), Err(RecordError::TooLong { .. })));
        let mut r = good[1].clone();
        r.destination.tags = vec!["t".into(); MAX_TAGS + 1];
        assert!(matches!(r.check(), Err(RecordError::TooMany { .. })));
        let mut r = good[1].clone();
        r.manifest_digest = "md5:0".into();
        assert!(matches!(r.check(), Err(RecordError::Digest(_))));
        // A hostile digest whose 80th byte falls inside a character is
        // quoted cut on a boundary, not a panic.
        let mut r = good[1].clone();
        r.manifest_digest = format!("{}é{}", "a".repeat(79), "b".repeat(100));
        match r.check() {
            Err(RecordError::Digest(shown)) => {
                assert!(
                    shown.starts_with(&"a".repeat(79)) && shown.len() < 120,
                    "{shown}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn links_are_checked_against_whichever_neighbour_is_held() {
        let c = chain_of(7, 3);
        let h: Vec<RecordHash> = c.iter().map(ChainRecord::hash).collect();
        // Record 2 arriving between held 1 and 3.
        check_links(&c[1], h[1], Some(h[0]), Some(c[2].prev)).unwrap();
        // Alone, nothing to check yet.
        check_links(&c[1], h[1], None, None).unwrap();
        // A forged record 2 (other digest, prev right) breaks to 3.
        let mut forged = c[1].clone();
        forged.manifest_digest = ObjectId::of_bytes(b"evil").digest();
        assert!(matches!(
            check_links(&forged, forged.hash(), Some(h[0]), Some(c[2].prev)),
            Err(ChainBreak::BreaksToAfter { seq: 2, .. })
        ));
        // A record 3 skipping 2 (prev = hash of 1) breaks from 2.
        let mut skipping = c[2].clone();
        skipping.prev = h[0];
        assert!(matches!(
            check_links(&skipping, skipping.hash(), Some(h[1]), None),
            Err(ChainBreak::BreaksFromBefore { seq: 3, .. })
        ));
    }

    fn head(chain: u64, seq: u64) -> LedgerHead {
        LedgerHead {
            chain: ChainId(chain),
            seq,
            hash: RecordHash([seq as u8; 32]),
        }
    }

    #[test]
    fn announcements_remember_when_each_seq_was_first_heard() {
        let mut a = Announcements::default();
        assert_eq!(
            a.observe(&head(1, 2), 1000),
            Announced::NewChain { previous: None }
        );
        assert_eq!(a.observe(&head(1, 2), 2000), Announced::Same);
        assert_eq!(
            a.observe(&head(1, 5), 3000),
            Announced::Grew { from: 3, to: 5 }
        );
        assert_eq!(a.observe(&head(1, 4), 4000), Announced::Behind);
        assert_eq!(a.first_announced(1), Some(1000));
        assert_eq!(a.first_announced(2), Some(1000));
        assert_eq!(a.first_announced(3), Some(3000));
        assert_eq!(a.first_announced(5), Some(3000));
        assert_eq!(a.first_announced(6), None);
        assert_eq!(a.first_announced(0), None);
        // Everything up to 3 completed: the first step no longer matters.
        a.settle_below(3);
        assert_eq!(a.steps, vec![(3, 3000)]);
        assert_eq!(
            a.observe(&head(2, 1), 5000),
            Announced::NewChain {
                previous: Some(ChainId(1))
            }
        );
        assert_eq!(a.first_announced(1), Some(5000));
    }

    #[test]
    fn steps_stay_bounded_and_merge_toward_the_earlier_time() {
        let mut a = Announcements::default();
        a.observe(&head(1, 1), 0);
        for i in 2..(MAX_ANNOUNCEMENT_STEPS as u64 + 100) {
            a.observe(&head(1, i), i);
        }
        assert_eq!(a.steps.len(), MAX_ANNOUNCEMENT_STEPS);
        assert_eq!(a.first_announced(50), Some(0));
    }

    #[test]
    fn missing_lists_ranges_split_by_announcement_time() {
        let mut a = Announcements::default();
        a.observe(&head(1, 3), 100);
        a.observe(&head(1, 8), 200);
        // 1 and 2 complete (contiguous 2); 4, 6 complete.
        let gaps = missing(&a, 2, [4, 6], 10);
        assert_eq!(
            gaps,
            vec![
                Gap {
                    from: 3,
                    to: 3,
                    since_ms: 100
                },
                Gap {
                    from: 5,
                    to: 5,
                    since_ms: 200
                },
                Gap {
                    from: 7,
                    to: 8,
                    since_ms: 200
                },
            ]
        );
        // A range across a step splits at it.
        let gaps = missing(&a, 0, [], 10);
        assert_eq!(
            gaps,
            vec![
                Gap {
                    from: 1,
                    to: 3,
                    since_ms: 100
                },
                Gap {
                    from: 4,
                    to: 8,
                    since_ms: 200
                },
            ]
        );
        assert_eq!(missing(&a, 8, [], 10), vec![]);
        assert_eq!(missing(&a, 0, [], 1).len(), 1);
        // A hostile head far ahead is one range, not a list of seqs.
        a.observe(&head(1, u64::MAX), 300);
        let gaps = missing(&a, 8, [], 10);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].count(), u64::MAX - 8);
    }

    #[test]
    fn a_walk_names_the_first_bad_record() {
        let c = chain_of(9, 4);
        let mut walk = ChainWalk::new(ChainId(9), true);
        for r in &c {
            walk.step(r.seq, r, Some(r.hash())).unwrap();
        }
        assert_eq!(walk.count(), 4);

        let mut tampered = c.clone();
        tampered[2].source = "elsewhere.tar".into();
        let mut walk = ChainWalk::new(ChainId(9), true);
        let err = tampered
            .iter()
            .try_for_each(|r| walk.step(r.seq, r, None).map(|_| ()))
            .unwrap_err();
        assert_eq!(err.seq, 4, "{err}");
        assert!(err.why.contains("prev"), "{err}");

        // The receiver's walk allows holes but checks what it holds.
        let mut walk = ChainWalk::new(ChainId(9), false);
        walk.step(1, &c[0], None).unwrap();
        walk.step(3, &c[2], None).unwrap();
        let err = walk.step(4, &c[3], Some(c[0].hash())).unwrap_err();
        assert!(err.why.contains("stored beside"), "{err}");
        // The sender's may not.
        let mut walk = ChainWalk::new(ChainId(9), true);
        walk.step(1, &c[0], None).unwrap();
        assert!(walk.step(3, &c[2], None).is_err());
    }

    #[test]
    fn a_walk_after_a_checkpoint_starts_from_its_hash() {
        let c = chain_of(9, 4);
        let checkpoint = Checkpoint {
            seq: 2,
            hash: c[1].hash(),
            at_ms: 0,
        };
        let mut walk = ChainWalk::after(ChainId(9), true, &checkpoint);
        walk.step(3, &c[2], None).unwrap();
        walk.step(4, &c[3], None).unwrap();
        assert_eq!(walk.count(), 2);
        // A record at or below the checkpoint, or a hole after it, is bad.
        let mut walk = ChainWalk::after(ChainId(9), true, &checkpoint);
        assert!(walk.step(2, &c[1], None).is_err());
        let mut walk = ChainWalk::after(ChainId(9), true, &checkpoint);
        assert!(walk.step(4, &c[3], None).is_err());
        // A checkpoint whose hash is not record 2's: record 3 does not follow.
        let wrong = Checkpoint {
            hash: c[0].hash(),
            ..checkpoint
        };
        let mut walk = ChainWalk::after(ChainId(9), false, &wrong);
        let err = walk.step(3, &c[2], None).unwrap_err();
        assert!(err.why.contains("prev"), "{err}");
    }
}
