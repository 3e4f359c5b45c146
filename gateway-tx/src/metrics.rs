//! The sender's Prometheus metrics, rendered at each scrape from the status
//! board (what status.json and the console show) and the free space of
//! the state disk. Families and their meaning are listed in the README
//! ("Metrics").

use std::path::PathBuf;
use weir_host::metrics::Exposition;

use crate::status::{ImageState, SenderState, Status, StatusBoard};

/// Renders the sender's families on demand (one call per scrape).
pub struct TxMetrics {
    board: StatusBoard,
    state_dir: PathBuf,
}

impl TxMetrics {
    pub fn new(board: StatusBoard, state_dir: PathBuf) -> Self {
        TxMetrics { board, state_dir }
    }

    /// The text of one scrape.
    pub fn render(&self) -> String {
        let free = weir_host::appliance::free_room(&self.state_dir).ok();
        expose(&self.board.snapshot(), free).render()
    }
}

/// Bits per second to the bytes per second Prometheus counts in.
fn bytes_per_second(bps: u64) -> f64 {
    bps as f64 / 8.0
}

/// Every family of the sender, from one status snapshot and the state
/// disk's free room (`None`: unreadable).
pub fn expose(s: &Status, disk_free: Option<weir_host::appliance::Room>) -> Exposition {
    let mut e = Exposition::new();
    e.gauge(
        "weir_tx_build_info",
        "The running gateway-tx; its version in the label.",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    let w = &s.wire;
    e.counter(
        "weir_tx_frames_total",
        "Frames handed to the link: object headers, shards and heartbeats.",
        &[],
        w.frames,
    );
    e.counter(
        "weir_tx_shard_frames_total",
        "Shard frames sealed.",
        &[],
        w.shard_frames,
    );
    e.counter(
        "weir_tx_heartbeats_total",
        "Heartbeat frames sealed.",
        &[],
        w.heartbeats,
    );
    e.counter(
        "weir_tx_sent_bytes_total",
        "Frame bytes handed to the link.",
        &[],
        w.bytes,
    );
    e.counter(
        "weir_tx_link_errors_total",
        "Sends the link refused (their frames are lost, as on a diode).",
        &[],
        w.link_errors,
    );
    e.gauge(
        "weir_tx_link_rate_limit_bytes_per_second",
        "The pacing rate (link.rate_bps, lowered to what a serial line carries).",
        &[],
        bytes_per_second(w.rate_bps),
    );
    e.gauge(
        "weir_tx_link_rate_bytes_per_second",
        "The rate measured on the link over the last second or two.",
        &[],
        bytes_per_second(w.measured_bps),
    );
    e.flag(
        "weir_tx_link_up",
        "1 while frames (heartbeats at least) went out in the last 3 s.",
        &[],
        s.link.up,
    );

    e.gauge(
        "weir_tx_queue_images",
        "Images still owed passes.",
        &[],
        s.queue.images as f64,
    );
    e.gauge(
        "weir_tx_queue_objects",
        "Objects still owed passes.",
        &[],
        s.queue.objects as f64,
    );
    e.gauge(
        "weir_tx_queue_bytes",
        "Bytes of the objects still owed passes.",
        &[],
        s.queue.bytes as f64,
    );
    e.gauge(
        "weir_tx_stored_objects",
        "Objects on disk in the object store.",
        &[],
        s.objects.count as f64,
    );
    e.gauge(
        "weir_tx_stored_bytes",
        "Bytes of the objects on disk in the object store.",
        &[],
        s.objects.bytes as f64,
    );
    e.gauge(
        "weir_tx_pass",
        "The carousel pass under way (0 = first).",
        &[],
        s.pass as f64,
    );
    for state in SenderState::ALL {
        e.flag(
            "weir_tx_state",
            "1 for what the sender is doing now.",
            &[("state", state.as_str())],
            s.state == *state,
        );
    }
    for state in ImageState::ALL {
        let n = s.images.iter().filter(|i| i.state == *state).count();
        e.gauge(
            "weir_tx_images",
            "Images in the carousel, by state.",
            &[("state", state.as_str())],
            n as f64,
        );
    }

    let drops = "Drops read from the spool since start, by result.";
    for (result, n) in [
        ("accepted", s.ingest.accepted),
        ("rejected", s.ingest.rejected),
        ("already_sent", s.ingest.already_sent),
    ] {
        e.counter("weir_tx_drops_total", drops, &[("result", result)], n);
    }
    if let Some(pull) = &s.pull {
        let images = "Images pull mode queued or refused since start, by sync list entry.";
        for entry in &pull.entries {
            for (result, n) in [
                ("queued", entry.queued_total),
                ("refused", entry.refused_total),
            ] {
                e.counter(
                    "weir_tx_pull_images_total",
                    images,
                    &[
                        ("entry", &entry.name),
                        ("source", &entry.source),
                        ("result", result),
                    ],
                    n,
                );
            }
        }
        for registry in &pull.registries {
            e.flag(
                "weir_tx_pull_registry_up",
                "1 while the source registry answered its last request.",
                &[("host", &registry.host)],
                registry.reachable,
            );
        }
        e.flag(
            "weir_tx_pull_sync_file_error",
            "1 while the newest sync file is refused (the previous list stays in force).",
            &[],
            pull.sync_error.is_some(),
        );
    }

    e.flag(
        "weir_tx_fault",
        "1 while a fault stands (status shows its reason).",
        &[],
        s.fault.is_some(),
    );
    if let Some(free) = disk_free {
        e.gauge(
            "weir_tx_disk_free_bytes",
            "Free space of the state_dir disk.",
            &[],
            free.bytes as f64,
        );
        if let Some(inodes) = free.inodes {
            e.gauge(
                "weir_tx_disk_free_inodes",
                "Free inodes of the state_dir disk (intake stops when too few are left).",
                &[],
                inodes as f64,
            );
        }
    }
    if let Some(head) = &s.ledger {
        e.gauge(
            "weir_tx_ledger_head",
            "Records in the image ledger's chain (the sequence number of its head).",
            &[],
            head.seq as f64,
        );
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ImageStatus, PullEntryStatus, PullStatus, SourceRegistryStatus};
    use weir_test_support::scrape::sample;

    fn status() -> Status {
        let mut s = Status {
            state: SenderState::Sending,
            pass: 1,
            ..Default::default()
        };
        s.wire.frames = 1000;
        s.wire.bytes = 1_400_000;
        s.wire.rate_bps = 8_000_000;
        s.wire.measured_bps = 4_000_000;
        s.link.up = true;
        s.queue.objects = 3;
        s.ingest.accepted = 2;
        s.ingest.rejected = 1;
        s.images = vec![
            ImageStatus {
                state: ImageState::Sending,
                ..Default::default()
            },
            ImageStatus {
                state: ImageState::Cycling,
                ..Default::default()
            },
        ];
        s.pull = Some(PullStatus {
            entries: vec![PullEntryStatus {
                name: "images[0]".into(),
                source: "src:5000/team-a/app:1.4".into(),
                queued_total: 4,
                refused_total: 1,
                ..Default::default()
            }],
            registries: vec![SourceRegistryStatus {
                host: "src:5000".into(),
                reachable: true,
                ..Default::default()
            }],
            ..Default::default()
        });
        s
    }

    const ROOM: weir_host::appliance::Room = weir_host::appliance::Room {
        bytes: 5_000,
        inodes: Some(700),
    };

    #[test]
    fn the_status_shows_under_its_names_in_base_units() {
        let text = expose(&status(), Some(ROOM)).render();
        for (series, value) in [
            ("weir_tx_frames_total", 1000.0),
            ("weir_tx_sent_bytes_total", 1_400_000.0),
            ("weir_tx_link_rate_limit_bytes_per_second", 1_000_000.0),
            ("weir_tx_link_rate_bytes_per_second", 500_000.0),
            ("weir_tx_link_up", 1.0),
            ("weir_tx_queue_objects", 3.0),
            ("weir_tx_pass", 1.0),
            ("weir_tx_state{state=\"sending\"}", 1.0),
            ("weir_tx_state{state=\"idle\"}", 0.0),
            ("weir_tx_images{state=\"sending\"}", 1.0),
            ("weir_tx_images{state=\"cycling\"}", 1.0),
            ("weir_tx_images{state=\"done\"}", 0.0),
            ("weir_tx_drops_total{result=\"accepted\"}", 2.0),
            ("weir_tx_drops_total{result=\"rejected\"}", 1.0),
            (
                "weir_tx_pull_images_total{entry=\"images[0]\",source=\"src:5000/team-a/app:1.4\",result=\"queued\"}",
                4.0,
            ),
            (
                "weir_tx_pull_images_total{entry=\"images[0]\",source=\"src:5000/team-a/app:1.4\",result=\"refused\"}",
                1.0,
            ),
            ("weir_tx_pull_registry_up{host=\"src:5000\"}", 1.0),
            ("weir_tx_pull_sync_file_error", 0.0),
            ("weir_tx_fault", 0.0),
            ("weir_tx_disk_free_bytes", 5_000.0),
            ("weir_tx_disk_free_inodes", 700.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        // Without [pull], no pull families.
        let mut plain = status();
        plain.pull = None;
        let text = expose(&plain, None).render();
        assert!(!text.contains("weir_tx_pull"), "{text}");
        assert!(!text.contains("weir_tx_disk_free_bytes"), "{text}");
    }

    #[test]
    fn promtool_accepts_the_text() {
        let Some(promtool) = weir_test_support::tools::or_skip(weir_test_support::tools::PROMTOOL)
        else {
            return;
        };
        let text = expose(&status(), Some(ROOM)).render();
        weir_test_support::scrape::promtool_check(&promtool, &text).unwrap();
    }
}
