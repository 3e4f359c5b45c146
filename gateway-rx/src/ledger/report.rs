//! The ledger report (what the high side holds: each record, its image,
//! when it completed, where it was delivered and when), `gateway-rx report`
//! that signs it under the report key, and `gateway-rx ledger verify`.
//!
//! sled admits one process, so the running gateway keeps the unsigned
//! report in `state_dir/ledger.json` (rewritten by the ledger stage when
//! something changed); `report` and `ledger verify` read the database when
//! the gateway is stopped and that copy while it runs.

use anyhow::Context;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use weir_proto::ledger::report::{
    AnnouncedChain, DeliveryOutcome, HeldChain, HeldRecord, LedgerReport, REPORT_FORMAT,
};
use weir_proto::ledger::{BadRecord, ChainWalk, Checkpoint};
use weir_proto::{ChainId, ChainRecord, RecordHash};

use super::{ChainStart, HeldChains};
use crate::config::RxConfig;
use crate::delivery::{DeliveryJob, DeliveryQueue};
use crate::gateway::db_dir;
use crate::state::{now_ms, StateDb, StateError};

/// The running gateway's unsigned report, in `state_dir`.
pub const SNAPSHOT_FILE: &str = "ledger.json";

/// Builds the report from what the ledger holds and the delivery jobs.
pub fn build(chains: &HeldChains, jobs: &[DeliveryJob]) -> Result<LedgerReport, StateError> {
    let mut deliveries: HashMap<&str, Vec<DeliveryOutcome>> = HashMap::new();
    for j in jobs {
        let v = j.view();
        deliveries
            .entry(j.image.as_str())
            .or_default()
            .push(DeliveryOutcome {
                target: v.target,
                state: v.state.to_string(),
                done_ms: v.done_ms,
                last_error: v.last_error,
            });
    }
    let starts: HashMap<ChainId, ChainStart> = chains.starts()?.into_iter().collect();
    let held_chain = |chain: ChainId| -> Result<HeldChain, StateError> {
        let start = starts.get(&chain);
        Ok(HeldChain {
            chain,
            highest_contiguous: chains.highest_contiguous(chain)?,
            accepted_from: start.and_then(|s| s.accepted_from),
            checkpoint: start.and_then(|s| s.checkpoint),
            records: Vec::new(),
        })
    };
    let mut held: Vec<HeldChain> = Vec::new();
    for r in chains.all()? {
        let chain = r.record.chain;
        if held.last().is_none_or(|c| c.chain != chain) {
            held.push(held_chain(chain)?);
        }
        let outcomes = deliveries
            .get(r.image.as_str())
            .cloned()
            .unwrap_or_default();
        if let Some(c) = held.last_mut() {
            c.records.push(HeldRecord {
                record: r.record,
                hash: r.hash,
                image: r.image,
                complete_at_ms: r.complete_at_ms,
                deliveries: outcomes,
            });
        }
    }
    // A chain pruned whole, or accepted with nothing admitted yet.
    for chain in starts.keys() {
        if !held.iter().any(|c| c.chain == *chain) {
            held.push(held_chain(*chain)?);
        }
    }
    held.sort_by_key(|c| c.chain);
    Ok(LedgerReport {
        format: REPORT_FORMAT.into(),
        written_at_ms: now_ms(),
        announced: chains
            .announced()?
            .map(|(head, highest_contiguous, missing)| AnnouncedChain {
                chain: head.chain,
                head: head.seq,
                highest_contiguous,
                missing,
            }),
        chains: held,
        refused: chains.refusals()?,
    })
}

/// Writes the unsigned report as the running gateway's copy.
pub fn write_snapshot(state_dir: &Path, report: &LedgerReport) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    weir_host::durable::replace_quickly(&state_dir.join(SNAPSHOT_FILE), &bytes)
}

/// Where a report or a verify read the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    Database,
    /// The running gateway's copy, written at `written_at_ms`.
    RunningCopy {
        path: PathBuf,
        written_at_ms: u64,
    },
}

impl std::fmt::Display for ReadFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFrom::Database => write!(f, "the state database"),
            ReadFrom::RunningCopy {
                path,
                written_at_ms,
            } => write!(
                f,
                "{} (gateway-rx runs and holds the database; its copy is {:.0} s old)",
                path.display(),
                now_ms().saturating_sub(*written_at_ms) as f64 / 1000.0
            ),
        }
    }
}

/// The report as it stands: built from the database when the gateway is
/// stopped, the running gateway's copy otherwise. Changes nothing.
pub fn current(config: &RxConfig) -> anyhow::Result<(LedgerReport, ReadFrom)> {
    match StateDb::open_now(&db_dir(config)) {
        Ok(db) => {
            let chains = HeldChains::open(&db)?;
            let jobs = DeliveryQueue::open(&db)?.all()?;
            Ok((build(&chains, &jobs)?, ReadFrom::Database))
        }
        Err(StateError::Locked { .. }) => {
            let path = config.state_dir.join(SNAPSHOT_FILE);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "gateway-rx runs, and its ledger copy {} cannot be read (it is written \
                     within seconds of the start)",
                    path.display()
                )
            })?;
            let report: LedgerReport = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a ledger copy", path.display()))?;
            let written_at_ms = report.written_at_ms;
            Ok((
                report,
                ReadFrom::RunningCopy {
                    path,
                    written_at_ms,
                },
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// What `report` wrote.
#[derive(Debug)]
pub struct Written {
    pub from: ReadFrom,
    pub records: usize,
    pub chains: usize,
    pub missing: u64,
    pub refused: usize,
}

/// `gateway-rx report --out`: the report, HMAC'd under the report key.
pub fn write_report(config: &RxConfig, out: &Path) -> anyhow::Result<Written> {
    let key = config
        .report_key()
        .context("ledger.report_key_file")?
        .context(
            "[ledger] report_key_file is not set: the report is signed with it, and \
             gateway-tx reconcile checks it with the same key",
        )?;
    let (report, from) = current(config)?;
    weir_host::durable::write_atomically(out, &report.seal(&key))
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(Written {
        from,
        records: report.chains.iter().map(|c| c.records.len()).sum(),
        chains: report.chains.len(),
        missing: report
            .announced
            .as_ref()
            .map_or(0, |a| a.missing.iter().map(|g| g.count()).sum()),
        refused: report.refused.len(),
    })
}

/// What `ledger verify` found.
#[derive(Debug)]
pub struct Verified {
    pub from: ReadFrom,
    /// (chain, records) per chain, in order.
    pub chains: Vec<(ChainId, u64)>,
    /// The first bad record and its chain.
    pub bad: Option<(ChainId, BadRecord)>,
}

/// Re-checks every chain held: each record's bounds, its stored hash, and
/// its link to the record held just before it (holes are allowed: images
/// still to come).
pub fn verify(config: &RxConfig) -> anyhow::Result<Verified> {
    // Per chain: its checkpoint, and each record with the seq it is stored under.
    type Held = (
        ChainId,
        Option<Checkpoint>,
        Vec<(u64, ChainRecord, RecordHash)>,
    );
    let (held, from): (Vec<Held>, ReadFrom) = match StateDb::open_now(&db_dir(config)) {
        Ok(db) => {
            let chains = HeldChains::open(&db)?;
            let starts: HashMap<ChainId, ChainStart> = chains.starts()?.into_iter().collect();
            let mut held: Vec<Held> = Vec::new();
            for (at, r) in chains.stored()? {
                if held.last().is_none_or(|(c, _, _)| *c != at.chain) {
                    let checkpoint = starts.get(&at.chain).and_then(|s| s.checkpoint);
                    held.push((at.chain, checkpoint, Vec::new()));
                }
                if let Some((_, _, records)) = held.last_mut() {
                    records.push((at.seq, r.record, r.hash));
                }
            }
            (held, ReadFrom::Database)
        }
        Err(StateError::Locked { .. }) => {
            let (report, from) = current(config)?;
            let held = report
                .chains
                .into_iter()
                .map(|c| {
                    let records = c
                        .records
                        .into_iter()
                        .map(|r| (r.record.seq, r.record, r.hash))
                        .collect();
                    (c.chain, c.checkpoint, records)
                })
                .collect();
            (held, from)
        }
        Err(e) => return Err(e.into()),
    };
    let mut chains: Vec<(ChainId, u64)> = Vec::new();
    for (chain, checkpoint, records) in held {
        // Records pruned up to the checkpoint: the walk starts from its hash.
        let mut walk = match &checkpoint {
            Some(c) => ChainWalk::after(chain, false, c),
            None => ChainWalk::new(chain, false),
        };
        chains.push((chain, 0));
        for (seq, record, hash) in records {
            if let Err(bad) = walk.step(seq, &record, Some(hash)) {
                return Ok(Verified {
                    from,
                    chains,
                    bad: Some((chain, bad)),
                });
            }
        }
        if let Some(last) = chains.last_mut() {
            last.1 = walk.count();
        }
    }
    Ok(Verified {
        from,
        chains,
        bad: None,
    })
}
