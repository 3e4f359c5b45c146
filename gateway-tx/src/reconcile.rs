//! `gateway-tx reconcile`: the receiver's ledger report, carried back by
//! hand, against the sender's own chain. The report's HMAC is checked
//! under the report key first (a report that fails it is refused, nothing
//! is compared); then every record this sender issued is looked up in what
//! the receiver holds, and the images that never arrived, arrived only in
//! part, were refused, or failed delivery are named.

use anyhow::Context;
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;
use weir_host::report::utc_text;
use weir_proto::ledger::report::{HeldRecord, LedgerReport, RefusedRecord, MAX_REPORT_BYTES};
use weir_proto::ledger::Checkpoint;
use weir_proto::ChainId;

use crate::config::TxConfig;
use crate::ledger::{read_chain, IssuedRecord, ReadFrom};

/// What became of one issued record, as the report tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Complete and delivered to every target (or its deliveries already
    /// pruned as history).
    Delivered,
    /// Complete; a delivery waits for its first attempt or its next one.
    DeliveryPending { targets: Vec<String> },
    /// Complete; a delivery failed its last attempt.
    DeliveryFailing { target: String, error: String },
    /// The image object arrived, some blob did not (yet).
    InPart,
    /// The receiver refused the record: it did not chain.
    Refused { reason: String },
    /// The receiver holds another record at this seq: forged history.
    Different,
    /// Not in the report.
    NeverArrived,
    /// Accepted after the report was written: it could not be in it.
    AfterReport,
}

impl Fate {
    /// Whether this is something to act on (the exit status says so).
    pub fn is_problem(&self) -> bool {
        !matches!(
            self,
            Fate::Delivered | Fate::DeliveryPending { .. } | Fate::AfterReport
        )
    }
}

/// The comparison, record by record.
#[derive(Debug)]
pub struct Reconciliation {
    pub chain: Option<ChainId>,
    pub from: ReadFrom,
    pub report_written_at_ms: u64,
    /// Whether the report holds records of this sender's chain at all.
    pub chain_in_report: bool,
    pub other_chains: Vec<ChainId>,
    /// This side's checkpoint: records up to it were pruned here (their
    /// images had left the carousel) and are not compared.
    pub pruned_here: Option<Checkpoint>,
    pub fates: Vec<(IssuedRecord, Fate)>,
}

/// A complete image's deliveries: failing once an attempt failed; pending
/// is not a failure (the receiver retries forever).
fn delivery_fate(held: &HeldRecord) -> Fate {
    if let Some(d) = held.deliveries.iter().find(|d| d.state == "failing") {
        return Fate::DeliveryFailing {
            target: d.target.clone(),
            error: d.last_error.clone().unwrap_or_else(|| "no answer".into()),
        };
    }
    let pending: Vec<String> = held
        .deliveries
        .iter()
        .filter(|d| d.state != "done")
        .map(|d| d.target.clone())
        .collect();
    if pending.is_empty() {
        Fate::Delivered
    } else {
        Fate::DeliveryPending { targets: pending }
    }
}

/// Compares `report` with the chain issued: pure, so it is tested apart
/// from files.
pub fn compare(
    issued: &[IssuedRecord],
    chain: Option<ChainId>,
    report: &LedgerReport,
) -> (bool, Vec<(IssuedRecord, Fate)>) {
    let held: HashMap<u64, &HeldRecord> = report
        .chains
        .iter()
        .filter(|c| Some(c.chain) == chain)
        .flat_map(|c| c.records.iter().map(|r| (r.record.seq, r)))
        .collect();
    // Records the receiver delivered and then pruned: its checkpoint says so.
    let ours = report.chains.iter().find(|c| Some(c.chain) == chain);
    let chain_in_report = report.chains.iter().any(|c| Some(c.chain) == chain);
    let refused: HashMap<(ChainId, u64), &RefusedRecord> = report
        .refused
        .iter()
        .map(|r| ((r.chain, r.seq), r))
        .collect();
    let fates = issued
        .iter()
        .map(|i| {
            let r = &i.record;
            let checkpoint = ours.and_then(|c| c.checkpoint);
            let fate = match held.get(&r.seq) {
                Some(h) if h.hash != r.hash() => Fate::Different,
                Some(h) if h.complete_at_ms.is_none() => Fate::InPart,
                Some(h) => delivery_fate(h),
                None if checkpoint.is_some_and(|c| c.seq == r.seq && c.hash != r.hash()) => {
                    Fate::Different
                }
                None if ours.is_some_and(|c| c.pruned_delivered(r.seq)) => Fate::Delivered,
                None => match refused.get(&(r.chain, r.seq)) {
                    Some(x) if x.hash == r.hash() => Fate::Refused {
                        reason: x.reason.clone(),
                    },
                    _ if r.accepted_at.saturating_mul(1000) > report.written_at_ms => {
                        Fate::AfterReport
                    }
                    _ => Fate::NeverArrived,
                },
            };
            (i.clone(), fate)
        })
        .collect();
    (chain_in_report, fates)
}

/// Reads the report at `report_path`, checks its tag under the configured
/// report key, and compares it with this sender's chain.
pub fn reconcile(config: &TxConfig, report_path: &Path) -> anyhow::Result<Reconciliation> {
    let key = config
        .report_key()
        .context("ledger.report_key_file")?
        .context(
            "[ledger] report_key_file is not set: reconcile needs the key gateway-rx signs its \
             reports with",
        )?;
    let meta = std::fs::metadata(report_path)
        .with_context(|| format!("reading report {}", report_path.display()))?;
    if meta.len() > MAX_REPORT_BYTES as u64 {
        anyhow::bail!(
            "report {} is {} bytes, more than the {MAX_REPORT_BYTES} read",
            report_path.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(report_path)
        .with_context(|| format!("reading report {}", report_path.display()))?;
    let report = LedgerReport::open(&bytes, &key)
        .with_context(|| format!("report {} refused", report_path.display()))?;
    let issued = read_chain(&config.state_dir)?;
    let (chain_in_report, fates) = compare(&issued.records, issued.chain, &report);
    Ok(Reconciliation {
        chain: issued.chain,
        from: issued.from,
        report_written_at_ms: report.written_at_ms,
        chain_in_report,
        pruned_here: issued.checkpoint,
        other_chains: report
            .chains
            .iter()
            .map(|c| c.chain)
            .filter(|c| Some(*c) != issued.chain)
            .collect(),
        fates,
    })
}

impl Reconciliation {
    /// Whether every issued image arrived and none failed delivery.
    pub fn all_accounted(&self) -> bool {
        !self.fates.iter().any(|(_, f)| f.is_problem())
    }

    fn section(
        &self,
        out: &mut String,
        title: &str,
        pick: impl Fn(&Fate) -> Option<String>,
    ) -> usize {
        let rows: Vec<(&IssuedRecord, String)> = self
            .fates
            .iter()
            .filter_map(|(i, f)| pick(f).map(|why| (i, why)))
            .collect();
        if rows.is_empty() {
            return 0;
        }
        let _ = writeln!(out, "{title} ({}):", rows.len());
        for (i, why) in &rows {
            let r = &i.record;
            let _ = writeln!(
                out,
                "  seq {} {} {} from {}, accepted {}{why}",
                r.seq,
                r.manifest_digest,
                r.destination.display(),
                r.source,
                utc_text(r.accepted_at)
            );
        }
        rows.len()
    }

    /// The lines `reconcile` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let chain = self
            .chain
            .map_or_else(|| "(none yet)".to_string(), |c| c.to_string());
        let _ = writeln!(
            out,
            "report written {} (receiver's clock); this sender's chain {chain}: {} images numbered \
             (read from {})",
            utc_text(self.report_written_at_ms / 1000),
            self.fates.len(),
            self.from
        );
        if let Some(c) = &self.pruned_here {
            let _ = writeln!(
                out,
                "records 1..{} were pruned here once their images left the carousel; the {} \
                 kept are compared",
                c.seq,
                self.fates.len()
            );
        }
        if !self.chain_in_report && !self.fates.is_empty() {
            let others: Vec<String> = self.other_chains.iter().map(|c| c.to_string()).collect();
            let _ = writeln!(
                out,
                "the report holds no record of chain {chain} (it holds chains: {})",
                if others.is_empty() {
                    "none".to_string()
                } else {
                    others.join(", ")
                }
            );
        }
        self.section(&mut out, "never arrived", |f| {
            (*f == Fate::NeverArrived).then(String::new)
        });
        self.section(
            &mut out,
            "arrived in part (image object, not every blob)",
            |f| (*f == Fate::InPart).then(String::new),
        );
        self.section(&mut out, "failed delivery", |f| match f {
            Fate::DeliveryFailing { target, error } => Some(format!(" -> {target}: {error}")),
            _ => None,
        });
        self.section(&mut out, "refused by the receiver", |f| match f {
            Fate::Refused { reason } => Some(format!(": {reason}")),
            _ => None,
        });
        self.section(
            &mut out,
            "the receiver holds another record at this seq (forged history?)",
            |f| (*f == Fate::Different).then(String::new),
        );
        self.section(&mut out, "delivery pending", |f| match f {
            Fate::DeliveryPending { targets } => Some(format!(" -> {}", targets.join(", "))),
            _ => None,
        });
        self.section(&mut out, "accepted after the report was written", |f| {
            (*f == Fate::AfterReport).then(String::new)
        });
        let delivered = self
            .fates
            .iter()
            .filter(|(_, f)| *f == Fate::Delivered)
            .count();
        let _ = writeln!(out, "delivered: {delivered} of {}", self.fates.len());
        if self.all_accounted() {
            let _ = writeln!(
                out,
                "every image numbered before the report arrived and none failed delivery"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::ledger::report::{DeliveryOutcome, HeldChain, REPORT_FORMAT};
    use weir_proto::ledger::{LedgerHead, RecordFields};
    use weir_proto::{Destination, Verdict};

    fn issued(n: u64) -> Vec<IssuedRecord> {
        let mut head = LedgerHead::empty(ChainId(3));
        (1..=n)
            .map(|i| {
                let record = head.next(RecordFields {
                    manifest_digest: weir_proto::ObjectId::of_bytes(&i.to_be_bytes()).digest(),
                    destination: Destination {
                        repository: "team/app".into(),
                        tags: vec![format!("{i}")],
                    },
                    source: format!("{i}.tar"),
                    verdict: Verdict {
                        rule: None,
                        gate: None,
                        worst_severity: None,
                        signature: None,
                        summary: String::new(),
                    },
                    accepted_at: 100 + i,
                });
                head = record.head();
                IssuedRecord {
                    record,
                    image: format!("sha256:{i}"),
                }
            })
            .collect()
    }

    fn held(i: &IssuedRecord, complete: bool, delivery: &str) -> HeldRecord {
        HeldRecord {
            record: i.record.clone(),
            hash: i.record.hash(),
            image: i.image.clone(),
            complete_at_ms: complete.then_some(1),
            deliveries: vec![DeliveryOutcome {
                target: "registry".into(),
                state: delivery.into(),
                done_ms: None,
                last_error: (delivery == "failing").then(|| "503".to_string()),
            }],
        }
    }

    #[test]
    fn each_record_gets_its_fate() {
        let chain = issued(7);
        let mut forged = held(&chain[5], true, "done");
        forged.record.source = "evil".into();
        forged.hash = forged.record.hash();
        let report = LedgerReport {
            format: REPORT_FORMAT.into(),
            written_at_ms: 106_500,
            announced: None,
            chains: vec![HeldChain {
                chain: ChainId(3),
                highest_contiguous: 1,
                accepted_from: None,
                checkpoint: None,
                records: vec![
                    held(&chain[0], true, "done"),
                    held(&chain[2], true, "failing"),
                    held(&chain[3], false, "pending"),
                    held(&chain[4], true, "pending"),
                    forged,
                ],
            }],
            refused: vec![],
        };
        let (known, fates) = compare(&chain, Some(ChainId(3)), &report);
        assert!(known);
        let fates: Vec<Fate> = fates.into_iter().map(|(_, f)| f).collect();
        assert_eq!(fates[0], Fate::Delivered);
        assert_eq!(fates[1], Fate::NeverArrived);
        assert!(matches!(fates[2], Fate::DeliveryFailing { .. }));
        assert_eq!(fates[3], Fate::InPart);
        assert!(matches!(fates[4], Fate::DeliveryPending { .. }));
        assert_eq!(fates[5], Fate::Different);
        // Accepted at 107 s, the report written at 106.5 s.
        assert_eq!(fates[6], Fate::AfterReport);
        let r = Reconciliation {
            chain: Some(ChainId(3)),
            from: ReadFrom::Database,
            report_written_at_ms: report.written_at_ms,
            chain_in_report: true,
            other_chains: vec![],
            pruned_here: None,
            fates: compare(&chain, Some(ChainId(3)), &report).1,
        };
        assert!(!r.all_accounted());
        let text = r.render();
        assert!(text.contains("never arrived (1):\n  seq 2 "), "{text}");
        assert!(text.contains("team/app:2 from 2.tar"), "{text}");
        assert!(text.contains("failed delivery (1):\n  seq 3"), "{text}");
        assert!(text.contains("-> registry: 503"), "{text}");
        assert!(text.contains("delivered: 1 of 7"), "{text}");
    }

    #[test]
    fn records_the_receiver_delivered_and_pruned_are_delivered_not_missing() {
        let chain = issued(5);
        let report = LedgerReport {
            format: REPORT_FORMAT.into(),
            written_at_ms: 1_000_000,
            announced: None,
            chains: vec![HeldChain {
                chain: ChainId(3),
                highest_contiguous: 4,
                accepted_from: None,
                checkpoint: Some(Checkpoint {
                    seq: 3,
                    hash: chain[2].record.hash(),
                    at_ms: 5,
                }),
                records: vec![held(&chain[3], true, "done")],
            }],
            refused: vec![],
        };
        let fates: Vec<Fate> = compare(&chain, Some(ChainId(3)), &report)
            .1
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        assert_eq!(
            fates,
            vec![
                Fate::Delivered,
                Fate::Delivered,
                Fate::Delivered,
                Fate::Delivered,
                Fate::NeverArrived
            ]
        );
        // A checkpoint naming another hash at its seq: not this history.
        let mut other = report.clone();
        other.chains[0].checkpoint = Some(Checkpoint {
            seq: 3,
            hash: chain[0].record.hash(),
            at_ms: 5,
        });
        assert_eq!(
            compare(&chain, Some(ChainId(3)), &other).1[2].1,
            Fate::Different
        );
        // Accepted mid-way from seq 2: record 1 never arrived there.
        other = report.clone();
        other.chains[0].accepted_from = Some(2);
        assert_eq!(
            compare(&chain, Some(ChainId(3)), &other).1[0].1,
            Fate::NeverArrived
        );
    }
}
