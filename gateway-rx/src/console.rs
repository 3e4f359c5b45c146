//! What the receiver answers on its serial console (proto's `Console` runs
//! the prompt; this is the `CommandHandler`).
//!
//! Answers are plain text, one fact per line; `stats` prints one counter
//! per line as `name value`, so a script can read them too.

use crate::appliance::Faults;
use crate::status::StatusReport;
use std::fmt::Write;
use std::sync::Arc;
use weir_host::report;
use weir_host::{Command, CommandHandler, Reply};

const COMMANDS: &[Command] = &[
    report::STATUS,
    report::command("images", "images known, with their digests and deliveries"),
    report::STATS,
    report::command("keys", "key ids accepted (never key material)"),
];

/// Builds the live report (the one status.json holds).
pub type ReportFn = dyn Fn() -> StatusReport + Send + Sync;

/// The receiver's console commands.
pub struct RxCommands {
    pub report: Box<ReportFn>,
    pub faults: Arc<Faults>,
    /// The key ids accepted now (a reload may add some).
    pub key_ids: Box<dyn Fn() -> Vec<u16> + Send + Sync>,
}

impl CommandHandler for RxCommands {
    fn commands(&self) -> &[Command] {
        COMMANDS
    }

    fn handle(&self, command: &str, args: &[&str]) -> Reply {
        if !args.is_empty() {
            return Reply::error(format!("{command} takes no arguments"));
        }
        match command {
            "status" => Reply::Text(self.status_text(&(self.report)())),
            "images" => Reply::Text(images_text(&(self.report)())),
            "stats" => {
                let report = (self.report)();
                let mut out = String::new();
                let deliveries = [
                    ("pushes_pending", report.pushes_pending),
                    ("pushes_failing", report.pushes_failing),
                ];
                report::counter_lines(
                    &mut out,
                    report.counters.named().into_iter().chain(deliveries),
                );
                Reply::Text(out)
            }
            "keys" => {
                let ids: Vec<String> = (self.key_ids)().iter().map(u16::to_string).collect();
                Reply::Text(format!("accepted key ids: {}", ids.join(", ")))
            }
            other => Reply::error(format!("'{other}' is not handled")),
        }
    }
}

impl RxCommands {
    fn status_text(&self, r: &StatusReport) -> String {
        let running = if r.running { "running" } else { "stopped" };
        let listening = r.listening.as_deref().unwrap_or("-");
        let mut out = String::new();
        let _ = writeln!(
            out,
            "gateway-rx {}: {running}, listening on {listening}",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "link: {}, {:.0} frames/s",
            if r.link_up {
                "up (frames arriving)"
            } else {
                "down (no frame in 3 s)"
            },
            r.frames_per_s
        );
        match &r.sender {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "sender: session {}, pass {}, {} objects queued, last heartbeat {:.0}s ago",
                    s.session_id,
                    s.pass,
                    s.queued_objects,
                    crate::state::now_ms().saturating_sub(s.received_at_ms) as f64 / 1000.0
                );
            }
            None => {
                let _ = writeln!(out, "sender: no heartbeat yet");
            }
        }
        let _ = writeln!(
            out,
            "queue: {} objects arriving, {} deliveries pending ({} failing), {} delivered",
            r.receiving.len(),
            r.pushes_pending,
            r.pushes_failing,
            r.counters.pushes_done
        );
        report::fault_line(&mut out, self.faults.reason().as_deref());
        if let Some(l) = &r.ledger {
            l.render(&mut out, crate::state::now_ms());
        }
        report::list_heading(&mut out, "images", r.images.len(), Some("none yet"));
        for i in &r.images {
            let _ = writeln!(
                out,
                "  {} {}: {}/{} blobs, {:.1}%, {:.1} passes seen",
                i.reference, i.state, i.blobs_done, i.blobs_total, i.percent, i.passes_seen
            );
        }
        out
    }
}

fn images_text(r: &StatusReport) -> String {
    report::list_or("no image object received yet", &r.images, |out, i| {
        let _ = writeln!(
            out,
            "{} {}: {}/{} blobs, {:.1}%",
            i.reference, i.state, i.blobs_done, i.blobs_total, i.percent
        );
        report::image_digests(out, &i.manifest_digest, &i.image);
        for d in r.deliveries.iter().filter(|d| d.image == i.image) {
            let _ = writeln!(
                out,
                "  delivery {} {}{}",
                d.target,
                d.state,
                d.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::Fault;
    use crate::status::{Counters, DeliveryView, ImageProgress};
    use weir_test_support::replies::text;

    fn commands() -> RxCommands {
        RxCommands {
            report: Box::new(|| {
                let counters = Counters::default();
                Counters::add(&counters.frames_accepted, 42);
                StatusReport {
                    running: true,
                    listening: Some("127.0.0.1:7700".into()),
                    link_up: true,
                    frames_per_s: 12.0,
                    counters: counters.snapshot(),
                    images: vec![ImageProgress {
                        image: "sha256:aa".into(),
                        reference: "team/app:1".into(),
                        manifest_digest: "sha256:bb".into(),
                        blobs_total: 2,
                        blobs_done: 1,
                        bytes_total: 10,
                        bytes_done: 5,
                        percent: 50.0,
                        passes_seen: 1.0,
                        state: crate::status::ImageState::Receiving,
                        first_frame_ms: 1,
                        complete_at_ms: None,
                    }],
                    deliveries: vec![DeliveryView {
                        image: "sha256:aa".into(),
                        target: "registry".into(),
                        reference: "team/app:1".into(),
                        manifest_digest: "sha256:bb".into(),
                        state: crate::status::DeliveryState::Failing,
                        attempts: 2,
                        next_attempt_ms: None,
                        last_error: Some("connection refused".into()),
                        tags_done: vec![],
                        done_ms: None,
                    }],
                    ledger: Some(crate::ledger::LedgerView {
                        chain: Some(weir_proto::ChainId(0xab)),
                        head_announced: 7,
                        highest_contiguous: 4,
                        gaps: vec![weir_proto::ledger::Gap {
                            from: 5,
                            to: 6,
                            since_ms: crate::state::now_ms().saturating_sub(7 * 3_600_000),
                        }],
                        missing: 2,
                        awaiting: 1,
                        gap_alert_hours: 6.0,
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            }),
            faults: Arc::new(Faults::default()),
            key_ids: Box::new(|| vec![1, 5]),
        }
    }

    #[test]
    fn status_shows_link_images_and_the_fault_reason() {
        let c = commands();
        let t = text(c.handle("status", &[]));
        assert!(t.contains("link: up (frames arriving), 12 frames/s"), "{t}");
        assert!(t.contains("team/app:1 receiving: 1/2 blobs, 50.0%"), "{t}");
        assert!(t.contains("fault: none"), "{t}");
        assert!(
            t.contains("image ledger: chain 00000000000000ab, 7 images announced, complete up to 4 (1 on their way)"),
            "{t}"
        );
        assert!(
            t.contains("ledger gaps: 2 images announced and not complete for more than 6 h:\n  seqs 5-6 (announced 7.0 h ago)"),
            "{t}"
        );
        c.faults.raise(
            Fault::HmacFailures,
            "HMAC failures: 150 bad tags in the last minute",
        );
        let t = text(c.handle("status", &[]));
        assert!(
            t.contains("fault: HMAC failures: 150 bad tags in the last minute"),
            "{t}"
        );
    }

    #[test]
    fn images_show_digests_and_delivery_state() {
        let t = text(commands().handle("images", &[]));
        assert!(t.contains("manifest sha256:bb"), "{t}");
        assert!(
            t.contains("delivery registry failing: connection refused"),
            "{t}"
        );
    }

    #[test]
    fn stats_print_every_counter_by_name_and_keys_only_ids() {
        let c = commands();
        let t = text(c.handle("stats", &[]));
        assert!(t.contains("frames_accepted 42\n"), "{t}");
        assert!(t.contains("frames_dropped_disk_full 0\n"), "{t}");
        assert_eq!(text(c.handle("keys", &[])), "accepted key ids: 1, 5");
        assert!(matches!(c.handle("keys", &["x"]), Reply::Error(_)));
    }
}
