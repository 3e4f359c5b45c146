//! The receiver's ledger report: what the high side holds, carried back to
//! the low side by hand (the diode has no way back).
//!
//! The file is JSON: `{"report": {...}, "hmac": "<hex>"}`, the tag an
//! HMAC-SHA256 under the report key over a domain tag and the exact bytes
//! of the `report` value as written. Checking those bytes (not a
//! re-serialization) means a byte changed anywhere in the report fails the
//! tag, whatever a JSON library would make of it; re-saving the file with
//! other whitespace does too.

use serde::{Deserialize, Serialize};

use super::{ChainId, ChainRecord, Checkpoint, Gap, RecordHash};
use crate::auth::Key;
use hmac::Mac;

/// The `format` every report carries.
pub const REPORT_FORMAT: &str = "weir-ledger-report/1";
/// Hashed before the report's bytes under the report key.
const REPORT_DOMAIN: &[u8] = b"weir ledger report v1\0";
/// Largest report file read: hundreds of thousands of records.
pub const MAX_REPORT_BYTES: usize = 512 << 20;

/// What the high side holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerReport {
    /// [`REPORT_FORMAT`].
    pub format: String,
    /// Milliseconds since the Unix epoch, on the receiver's clock.
    pub written_at_ms: u64,
    /// The chain the sender's heartbeats announced last, how far, and the
    /// announced records not complete.
    pub announced: Option<AnnouncedChain>,
    /// Every chain the receiver holds records of.
    pub chains: Vec<HeldChain>,
    /// Records refused (they did not chain, or did not belong to their
    /// image); their images were not delivered.
    pub refused: Vec<RefusedRecord>,
}

/// The head the sender announced last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnouncedChain {
    pub chain: ChainId,
    pub head: u64,
    /// Every seq up to this one completed.
    pub highest_contiguous: u64,
    /// Announced, not completed (whether overdue or not).
    pub missing: Vec<Gap>,
}

/// The records held of one chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldChain {
    pub chain: ChainId,
    pub highest_contiguous: u64,
    /// The operator accepted this chain from this seq (its first record
    /// never came): the records below it were never admitted here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_from: Option<u64>,
    /// Every record from the chain's start here (1, or `accepted_from`) up
    /// to this one was complete, delivered to every target, and pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    pub records: Vec<HeldRecord>,
}

impl HeldChain {
    /// Whether record `seq` was delivered and pruned (the checkpoint
    /// covers it).
    pub fn pruned_delivered(&self, seq: u64) -> bool {
        self.checkpoint.is_some_and(|c| seq <= c.seq)
            && self.accepted_from.is_none_or(|from| seq >= from)
    }
}

/// One record held, what became of its image, and where it was delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRecord {
    pub record: ChainRecord,
    pub hash: RecordHash,
    /// `sha256:` id of the image object the record came in.
    pub image: String,
    /// When every object of the image was verified; None while receiving.
    pub complete_at_ms: Option<u64>,
    pub deliveries: Vec<DeliveryOutcome>,
}

/// One delivery of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryOutcome {
    /// `registry` or `oci-layout`.
    pub target: String,
    /// `pending`, `failing` or `done`.
    pub state: String,
    pub done_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// A record the receiver refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRecord {
    pub chain: ChainId,
    pub seq: u64,
    pub hash: RecordHash,
    pub manifest_digest: String,
    pub image: String,
    pub reason: String,
    pub at_ms: u64,
}

/// Why a report file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("not a ledger report file: {0}")]
    Format(String),
    #[error(
        "the report's HMAC does not verify under this report key: the file was changed, \
         or another key made it"
    )]
    BadTag,
    #[error("report format {0:?}, this version reads {REPORT_FORMAT:?}")]
    Version(String),
    #[error("report of {0} bytes, more than the {MAX_REPORT_BYTES} read")]
    TooLarge(usize),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed<'a> {
    #[serde(borrow)]
    report: &'a serde_json::value::RawValue,
    hmac: String,
}

fn tag(key: &Key, body: &[u8]) -> impl Mac {
    let mut mac = key.mac();
    mac.update(REPORT_DOMAIN);
    mac.update(body);
    mac
}

impl LedgerReport {
    /// The file's bytes: the report and its tag under `key`.
    pub fn seal(&self, key: &Key) -> Vec<u8> {
        // Plain records of strings and numbers always serialize.
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        let tag = hex::encode(tag(key, &body).finalize().into_bytes());
        let mut out = Vec::with_capacity(body.len() + 100);
        out.extend_from_slice(b"{\"report\": ");
        out.extend_from_slice(&body);
        out.extend_from_slice(format!(",\n\"hmac\": \"{tag}\"}}\n").as_bytes());
        out
    }

    /// Checks the tag under `key` over the report's bytes, then reads it.
    pub fn open(bytes: &[u8], key: &Key) -> Result<LedgerReport, ReportError> {
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge(bytes.len()));
        }
        let sealed: Sealed<'_> =
            serde_json::from_slice(bytes).map_err(|e| ReportError::Format(e.to_string()))?;
        let want = hex::decode(&sealed.hmac).map_err(|_| ReportError::BadTag)?;
        tag(key, sealed.report.get().as_bytes())
            .verify_slice(&want)
            .map_err(|_| ReportError::BadTag)?;
        let report: LedgerReport = serde_json::from_str(sealed.report.get())
            .map_err(|e| ReportError::Format(e.to_string()))?;
        if report.format != REPORT_FORMAT {
            return Err(ReportError::Version(report.format));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::chain_of;

    fn key(byte: u8) -> Key {
        Key::from_bytes(0, &[byte; 32]).unwrap()
    }

    fn sample() -> LedgerReport {
        let records = chain_of(5, 2);
        LedgerReport {
            format: REPORT_FORMAT.into(),
            written_at_ms: 42,
            announced: Some(AnnouncedChain {
                chain: ChainId(5),
                head: 3,
                highest_contiguous: 2,
                missing: vec![Gap {
                    from: 3,
                    to: 3,
                    since_ms: 7,
                }],
            }),
            chains: vec![HeldChain {
                chain: ChainId(5),
                highest_contiguous: 2,
                accepted_from: None,
                checkpoint: None,
                records: records
                    .iter()
                    .map(|r| HeldRecord {
                        hash: r.hash(),
                        record: r.clone(),
                        image: "sha256:00".into(),
                        complete_at_ms: Some(9),
                        deliveries: vec![DeliveryOutcome {
                            target: "oci-layout".into(),
                            state: "done".into(),
                            done_ms: Some(10),
                            last_error: None,
                        }],
                    })
                    .collect(),
            }],
            refused: vec![],
        }
    }

    #[test]
    fn a_sealed_report_opens_under_its_key_only() {
        let r = sample();
        let bytes = r.seal(&key(1));
        assert_eq!(LedgerReport::open(&bytes, &key(1)).unwrap(), r);
        assert!(matches!(
            LedgerReport::open(&bytes, &key(2)),
            Err(ReportError::BadTag)
        ));
    }

    #[test]
    fn any_change_to_the_report_fails_the_tag() {
        let bytes = sample().seal(&key(1));
        let text = String::from_utf8(bytes).unwrap();
        // A delivered time moved, a digit of a seq changed, whitespace added.
        for (from, to) in [
            ("\"done_ms\": 10", "\"done_ms\": 11"),
            ("\"head\": 3", "\"head\": 2"),
        ] {
            let changed = text.replacen(from, to, 1);
            assert_ne!(changed, text);
            assert!(matches!(
                LedgerReport::open(changed.as_bytes(), &key(1)),
                Err(ReportError::BadTag)
            ));
        }
        let spaced = text.replacen("\"format\"", " \"format\"", 1);
        assert!(LedgerReport::open(spaced.as_bytes(), &key(1)).is_err());
        assert!(matches!(
            LedgerReport::open(b"{\"report\": {}}", &key(1)),
            Err(ReportError::Format(_))
        ));
        assert!(matches!(
            LedgerReport::open(b"not json", &key(1)),
            Err(ReportError::Format(_))
        ));
    }
}
