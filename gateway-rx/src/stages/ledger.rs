//! The ledger stage: once a second it takes the head the sender's last
//! heartbeat announced into the image ledger, judges the gaps (announced
//! images not complete within `[ledger] gap_alert_hours`): raises or clears
//! the fault, logs and posts the webhook event `missing` once per new gap;
//! and rewrites the ledger copy (`state_dir/ledger.json`) that `gateway-rx
//! report` reads while the gateway holds the database.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_host::Shutdown;
use weir_proto::ledger::Gap;
use weir_proto::{ChainId, LedgerHead};

use crate::appliance::{Fault, Faults};
use crate::delivery::notify::{MissingImages, Notice};
use crate::delivery::DeliveryQueue;
use crate::ledger::{report, HeldChains, LedgerView};
use crate::stages::deliver::WebhookSwitch;
use crate::state::now_ms;
use crate::status::{Counters, SenderStatus};

const EVERY: Duration = Duration::from_secs(1);
/// The copy is rewritten at least this often, so its age says the gateway
/// is alive even when nothing changes.
const COPY_AT_LEAST_EVERY: Duration = Duration::from_secs(60);
/// ... and at most this often: it holds every record, and a busy receiver
/// changes the ledger many times a second.
const COPY_AT_MOST_EVERY: Duration = Duration::from_secs(2);

/// What the stage reads and where it tells.
pub struct LedgerWatch {
    pub chains: Arc<HeldChains>,
    pub sender: Arc<Mutex<Option<SenderStatus>>>,
    pub faults: Arc<Faults>,
    /// The webhook as it is at each event (a reload may change it).
    pub webhook: WebhookSwitch,
    pub queue: DeliveryQueue,
    pub counters: Arc<Counters>,
    pub state_dir: PathBuf,
    pub gap_alert_hours: f64,
}

/// What the stage remembers between ticks.
#[derive(Default)]
struct Seen {
    head: Option<LedgerHead>,
    /// Gaps already told (a gap that clears and comes back is told again).
    told: HashSet<(ChainId, u64, u64)>,
    head_conflict: Option<u64>,
    /// (ledger changes, deliveries done, delivery failures) at the last copy.
    copied: Option<(u64, u64, u64)>,
    copied_at: Option<Instant>,
}

impl LedgerWatch {
    pub fn run(self, shutdown: &Shutdown) {
        let mut seen = Seen::default();
        loop {
            self.tick(&mut seen);
            if shutdown.sleep(EVERY) {
                break;
            }
        }
        // The last copy, with what the shutdown settled.
        seen.copied_at = None;
        self.copy(&mut seen);
    }

    fn tick(&self, seen: &mut Seen) {
        let head = self
            .sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|s| s.ledger);
        if let Some(head) = head.filter(|h| seen.head != Some(*h)) {
            match self.chains.announce(&head, now_ms()) {
                Ok(_) => seen.head = Some(head),
                Err(e) => tracing::warn!(error = %e, "the announced ledger head was not recorded"),
            }
        }
        match self.chains.view(now_ms(), self.gap_alert_hours) {
            Ok(view) => self.judge(&view, seen),
            Err(e) => tracing::warn!(error = %e, "the image ledger cannot be read for its gaps"),
        }
        self.copy(seen);
    }

    fn judge(&self, view: &LedgerView, seen: &mut Seen) {
        if view.head_conflict != seen.head_conflict {
            if let Some(seq) = view.head_conflict {
                tracing::error!(chain = ?view.chain.map(|c| c.to_string()), seq,
                    "the sender's heartbeat names another record than the one held at its head: \
                     the record held, or the heartbeat, is not the sender's history");
            }
            seen.head_conflict = view.head_conflict;
        }
        let Some(reason) = view.fault_reason() else {
            if self.faults.is_raised(Fault::LedgerGap) {
                tracing::info!(chain = ?view.chain.map(|c| c.to_string()),
                    complete_up_to = view.highest_contiguous, "image ledger gaps cleared");
                self.faults.clear(Fault::LedgerGap);
            }
            seen.told.clear();
            return;
        };
        self.faults.raise(Fault::LedgerGap, reason);
        let chain = view.chain.unwrap_or_default();
        let now: HashSet<(ChainId, u64, u64)> =
            view.gaps.iter().map(|g| (chain, g.from, g.to)).collect();
        for gap in &view.gaps {
            if !seen.told.contains(&(chain, gap.from, gap.to)) {
                self.tell(chain, gap);
            }
        }
        seen.told = now;
    }

    fn tell(&self, chain: ChainId, gap: &Gap) {
        let hours = now_ms().saturating_sub(gap.since_ms) as f64 / 3_600_000.0;
        tracing::error!(chain = %chain, from = gap.from, to = gap.to, images = gap.count(),
            announced_hours_ago = hours,
            "image ledger gap: images the sender announced have not arrived complete");
        let Some(n) = self.webhook.current() else {
            return;
        };
        n.send(Notice {
            text: format!(
                "weir: {} image(s) the sender announced ({gap} of ledger chain {chain}) have not \
                 arrived complete {hours:.1} h after they were announced",
                gap.count()
            ),
            event: "missing".into(),
            reference: String::new(),
            digest: String::new(),
            target: String::new(),
            seconds_from_first_frame: hours * 3600.0,
            error: None,
            missing: Some(MissingImages {
                chain: chain.to_string(),
                from: gap.from,
                to: gap.to,
                count: gap.count(),
                announced_at_ms: gap.since_ms,
            }),
        });
    }

    /// Rewrites the ledger copy when something it shows changed.
    fn copy(&self, seen: &mut Seen) {
        let c = self.counters.snapshot();
        let state = (self.chains.changes(), c.pushes_done, c.push_attempts_failed);
        let due = match seen.copied_at.map(|t| t.elapsed()) {
            None => true,
            Some(age) if seen.copied == Some(state) => age >= COPY_AT_LEAST_EVERY,
            Some(age) => age >= COPY_AT_MOST_EVERY,
        };
        if !due {
            return;
        }
        let written = self
            .queue
            .all()
            .map_err(|e| e.to_string())
            .and_then(|jobs| report::build(&self.chains, &jobs).map_err(|e| e.to_string()))
            .and_then(|r| report::write_snapshot(&self.state_dir, &r).map_err(|e| e.to_string()));
        match written {
            Ok(()) => {
                seen.copied = Some(state);
                seen.copied_at = Some(Instant::now());
            }
            Err(e) => tracing::warn!(error = %e, "the image ledger copy was not written"),
        }
    }
}
