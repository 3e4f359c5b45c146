//! The receiver's Prometheus metrics, rendered at each scrape from what it
//! already keeps: the counters and the status report (as status.json and
//! the console show them), the delivery queue, the delivery stats, and the
//! free space of the state disk. Families and their meaning are listed in
//! the README ("Metrics").

use std::sync::Arc;
use weir_host::metrics::Exposition;

use crate::config::RxConfig;
use crate::delivery::{DeliveryStats, Target};
use crate::stages::report::Reporter;
use crate::status::{DeliveryState, ImageState, StatusReport};

/// Renders the receiver's families on demand (one call per scrape).
pub struct RxMetrics {
    reporter: Arc<Reporter>,
    deliveries: Arc<DeliveryStats>,
    targets: Vec<Target>,
}

/// What one scrape shows, read at one instant.
pub struct RxScrape {
    pub report: StatusReport,
    /// Every job in the delivery queue, by target and state.
    pub queue: Vec<(Target, DeliveryState)>,
    /// Free room of the state disk; `None` when it could not be read.
    pub disk_free: Option<weir_host::appliance::Room>,
}

impl RxMetrics {
    pub fn new(config: &RxConfig, reporter: Arc<Reporter>, deliveries: Arc<DeliveryStats>) -> Self {
        RxMetrics {
            reporter,
            deliveries,
            targets: crate::delivery::targets(config),
        }
    }

    /// The text of one scrape.
    pub fn render(&self) -> String {
        let queue = match self.reporter.queue.all() {
            Ok(jobs) => jobs.iter().map(|j| (j.target, j.view().state)).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "delivery queue unreadable for metrics");
                Vec::new()
            }
        };
        let scrape = RxScrape {
            report: self.reporter.report(true),
            queue,
            disk_free: weir_host::appliance::free_room(&self.reporter.state_dir).ok(),
        };
        expose(&scrape, &self.targets, &self.deliveries).render()
    }
}

/// Every family of the receiver, from one scrape.
pub fn expose(s: &RxScrape, targets: &[Target], deliveries: &DeliveryStats) -> Exposition {
    let mut e = Exposition::new();
    let r = &s.report;
    let c = &r.counters;
    e.gauge(
        "weir_rx_build_info",
        "The running gateway-rx; its version in the label.",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );

    let frames = "Frames received, by result: accepted (tag verified, not a replay), \
                  held (a shard of an object held whole, dropped unopened) \
                  or the cause of refusal.";
    for (result, n) in [
        ("accepted", c.frames_accepted),
        ("held", c.frames_held_unopened),
        ("bad_tag", c.frames_bad_tag),
        ("unknown_key", c.frames_unknown_key),
        ("replayed", c.frames_replayed),
        ("future_session", c.frames_future_session),
        ("malformed", c.frames_malformed),
    ] {
        e.counter("weir_rx_frames_total", frames, &[("result", result)], n);
    }
    e.counter(
        "weir_rx_frames_dropped_disk_full_total",
        "Accepted frames not stored because the state disk was full.",
        &[],
        c.frames_dropped_disk_full,
    );
    e.counter(
        "weir_rx_frames_lost_estimate_total",
        "Frames lost on the link, estimated from sequence-number gaps.",
        &[],
        c.frames_lost_estimate,
    );
    e.counter(
        "weir_rx_frames_expected_total",
        "Frames the sender numbered over the span the loss estimate covers.",
        &[],
        c.frames_expected,
    );
    let shards = "Shards of accepted frames: stored (new) or duplicate (already held).";
    e.counter(
        "weir_rx_shards_total",
        shards,
        &[("result", "stored")],
        c.shards_stored,
    );
    e.counter(
        "weir_rx_shards_total",
        shards,
        &[("result", "duplicate")],
        c.shards_duplicate,
    );
    e.counter(
        "weir_rx_shards_conflicting_total",
        "Shards whose object changed length or FEC layout midway (the object restarted).",
        &[],
        c.shards_conflicting,
    );
    e.counter(
        "weir_rx_blocks_complete_total",
        "Blocks whose data is complete, received whole or rebuilt.",
        &[],
        c.blocks_complete,
    );
    e.counter(
        "weir_rx_blocks_repaired_total",
        "Blocks rebuilt by Reed-Solomon repair.",
        &[],
        c.blocks_repaired,
    );

    let objects = "Finished objects by kind (blob, image) and sha256 check result.";
    for (kind, result, n) in [
        ("blob", "verified", c.blobs_verified),
        ("blob", "failed", c.blobs_failed),
        ("image", "verified", c.image_objects_verified),
        ("image", "failed", c.image_objects_failed),
    ] {
        e.counter(
            "weir_rx_objects_total",
            objects,
            &[("kind", kind), ("result", result)],
            n,
        );
    }
    e.counter(
        "weir_rx_objects_refused_total",
        "Objects refused before anything was stored (over [limits]).",
        &[],
        c.objects_refused,
    );
    e.counter(
        "weir_rx_objects_evicted_total",
        "Objects set aside half received (limits.max_objects_in_flight).",
        &[],
        c.objects_evicted,
    );
    e.gauge(
        "weir_rx_objects_receiving",
        "Objects whose shards are arriving now.",
        &[],
        r.receiving.len() as f64,
    );

    for state in ImageState::ALL {
        let n = r.images.iter().filter(|i| i.state == *state).count();
        e.gauge(
            "weir_rx_images",
            "Images known to the receiver, by state.",
            &[("state", state.as_str())],
            n as f64,
        );
    }
    e.counter(
        "weir_rx_images_complete_total",
        "Images that became complete (every object verified) since start.",
        &[],
        c.images_complete,
    );

    for &target in targets {
        let t = [("target", target.name())];
        for state in DeliveryState::ALL {
            let n = s
                .queue
                .iter()
                .filter(|(tg, st)| *tg == target && st == state)
                .count();
            e.gauge(
                "weir_rx_deliveries",
                "Deliveries in the queue by target and state; pending and failing ones \
                 are the queue depth (done ones are kept a week).",
                &[("target", target.name()), ("state", state.as_str())],
                n as f64,
            );
        }
        let stats = deliveries.of(target);
        e.counter(
            "weir_rx_delivery_attempts_total",
            "Delivery attempts started since start, by target.",
            &t,
            stats.attempts(),
        );
        e.counter(
            "weir_rx_delivery_failures_total",
            "Delivery attempts that failed (each is retried), by target.",
            &t,
            stats.failures(),
        );
        e.histogram(
            "weir_rx_push_duration_seconds",
            "Time a successful delivery attempt took: a push to the registry or an \
             export into the OCI layout.",
            &t,
            &stats.push_duration(),
        );
    }

    e.flag(
        "weir_rx_link_up",
        "1 while frames were accepted in the last 3 s.",
        &[],
        r.link_up,
    );
    e.gauge(
        "weir_rx_link_frames_per_second",
        "Frames accepted per second over the last few seconds.",
        &[],
        r.frames_per_s,
    );
    if let Some(sender) = &r.sender {
        e.gauge(
            "weir_rx_sender_heartbeat_timestamp_seconds",
            "When the sender's last heartbeat arrived (Unix time).",
            &[],
            sender.received_at_ms as f64 / 1000.0,
        );
        e.gauge(
            "weir_rx_sender_pass",
            "The carousel pass the sender's last heartbeat named.",
            &[],
            sender.pass as f64,
        );
    }
    e.flag(
        "weir_rx_fault",
        "1 while a fault stands (status shows its reason).",
        &[],
        r.fault.is_some(),
    );
    if let Some(free) = s.disk_free {
        e.gauge(
            "weir_rx_disk_free_bytes",
            "Free space of the state_dir disk.",
            &[],
            free.bytes as f64,
        );
        if let Some(inodes) = free.inodes {
            e.gauge(
                "weir_rx_disk_free_inodes",
                "Free inodes of the state_dir disk (shards are dropped when too few are left).",
                &[],
                inodes as f64,
            );
        }
    }
    if let Some(l) = &r.ledger {
        e.gauge(
            "weir_rx_ledger_head",
            "Image ledger records the sender announced (its head's sequence number).",
            &[],
            l.head_announced as f64,
        );
        e.gauge(
            "weir_rx_ledger_contiguous",
            "Every image ledger record up to this sequence number is complete here.",
            &[],
            l.highest_contiguous as f64,
        );
        e.gauge(
            "weir_rx_ledger_gaps",
            "Images announced and not complete within ledger.gap_alert_hours.",
            &[],
            l.missing as f64,
        );
        e.counter(
            "weir_rx_ledger_records_refused_total",
            "Image ledger records refused (they contradict the chain held).",
            &[],
            l.records_refused,
        );
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{CounterSnapshot, ImageProgress};
    use weir_test_support::scrape::sample;

    fn image(state: ImageState) -> ImageProgress {
        ImageProgress {
            image: "sha256:1".into(),
            reference: "team/app:1".into(),
            manifest_digest: "sha256:2".into(),
            blobs_total: 1,
            blobs_done: 1,
            bytes_total: 1,
            bytes_done: 1,
            percent: 100.0,
            passes_seen: 1.0,
            state,
            first_frame_ms: 0,
            complete_at_ms: None,
        }
    }

    fn scrape() -> (RxScrape, DeliveryStats) {
        let report = StatusReport {
            running: true,
            link_up: true,
            frames_per_s: 12.5,
            fault: Some("delivery failing: \"x\"".into()),
            counters: CounterSnapshot {
                frames_accepted: 100,
                frames_held_unopened: 7,
                frames_bad_tag: 3,
                frames_replayed: 2,
                blocks_repaired: 4,
                blobs_verified: 5,
                images_complete: 1,
                ..Default::default()
            },
            images: vec![image(ImageState::Complete), image(ImageState::Receiving)],
            ..Default::default()
        };
        let queue = vec![
            (Target::Registry, DeliveryState::Done),
            (Target::Registry, DeliveryState::Failing),
            (Target::OciLayout, DeliveryState::Pending),
        ];
        let stats = DeliveryStats::default();
        stats.attempt_started(Target::Registry);
        stats.attempt_failed(Target::Registry);
        stats.attempt_started(Target::Registry);
        stats.delivered(Target::Registry, std::time::Duration::from_millis(300));
        let scrape = RxScrape {
            report,
            queue,
            disk_free: Some(weir_host::appliance::Room {
                bytes: 1 << 30,
                inodes: Some(700),
            }),
        };
        (scrape, stats)
    }

    #[test]
    fn the_counters_the_queue_and_the_stats_show_under_their_names() {
        let (s, stats) = scrape();
        let text = expose(&s, &[Target::Registry], &stats).render();
        for (series, value) in [
            ("weir_rx_frames_total{result=\"accepted\"}", 100.0),
            ("weir_rx_frames_total{result=\"held\"}", 7.0),
            ("weir_rx_frames_total{result=\"bad_tag\"}", 3.0),
            ("weir_rx_frames_total{result=\"replayed\"}", 2.0),
            ("weir_rx_frames_total{result=\"unknown_key\"}", 0.0),
            ("weir_rx_blocks_repaired_total", 4.0),
            (
                "weir_rx_objects_total{kind=\"blob\",result=\"verified\"}",
                5.0,
            ),
            ("weir_rx_images{state=\"complete\"}", 1.0),
            ("weir_rx_images{state=\"receiving\"}", 1.0),
            (
                "weir_rx_deliveries{target=\"registry\",state=\"done\"}",
                1.0,
            ),
            (
                "weir_rx_deliveries{target=\"registry\",state=\"failing\"}",
                1.0,
            ),
            (
                "weir_rx_deliveries{target=\"registry\",state=\"pending\"}",
                0.0,
            ),
            ("weir_rx_delivery_attempts_total{target=\"registry\"}", 2.0),
            ("weir_rx_delivery_failures_total{target=\"registry\"}", 1.0),
            (
                "weir_rx_push_duration_seconds_count{target=\"registry\"}",
                1.0,
            ),
            (
                "weir_rx_push_duration_seconds_bucket{target=\"registry\",le=\"0.25\"}",
                0.0,
            ),
            (
                "weir_rx_push_duration_seconds_bucket{target=\"registry\",le=\"0.5\"}",
                1.0,
            ),
            ("weir_rx_link_up", 1.0),
            ("weir_rx_link_frames_per_second", 12.5),
            ("weir_rx_fault", 1.0),
            ("weir_rx_disk_free_bytes", (1u64 << 30) as f64),
            ("weir_rx_disk_free_inodes", 700.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        // Only configured targets show; no heartbeat yet, no heartbeat gauge.
        assert!(!text.contains("oci-layout"), "{text}");
        assert!(!text.contains("weir_rx_sender_pass"), "{text}");
    }

    #[test]
    fn promtool_accepts_the_text() {
        let Some(promtool) = weir_test_support::tools::or_skip(weir_test_support::tools::PROMTOOL)
        else {
            return;
        };
        let (mut s, stats) = scrape();
        s.report.sender = Some(crate::status::SenderStatus {
            received_at_ms: 1_700_000_000_123,
            pass: 2,
            ..Default::default()
        });
        let text = expose(&s, &[Target::Registry, Target::OciLayout], &stats).render();
        weir_test_support::scrape::promtool_check(&promtool, &text).unwrap();
    }
}
