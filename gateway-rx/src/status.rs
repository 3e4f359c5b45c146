//! Counters and the status report (`state_dir/status.json`).
//!
//! sled admits one process, so `gateway-rx status` cannot open the database
//! while the gateway runs: the gateway writes the whole report to
//! status.json every second (tmp + rename, so a reader never sees half of
//! it), and `status` reads that file, or builds the same report from the
//! database when the gateway is stopped.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use weir_host::appliance::human_bytes;
use weir_host::report;

use crate::state::now_ms;

/// File name of the report inside state_dir.
pub const STATUS_FILE: &str = "status.json";

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Event counts since the gateway started, shared by every stage.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A copy of [`Counters`] at one instant, as written to status.json.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct CounterSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl CounterSnapshot {
            /// Every counter with its name, in declaration order.
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    /// Frames whose tag verified and that were not replays.
    frames_accepted,
    /// Frames whose HMAC tag did not verify (forged, corrupted).
    frames_bad_tag,
    /// Frames signed with a key id not in the configured set.
    frames_unknown_key,
    /// Authentic frames seen before (same session and sequence number), or
    /// from an older sender session.
    frames_replayed,
    /// Authentic frames of a sender session that claims to start further
    /// ahead of this clock than `auth.max_session_ahead_hours`: a sender
    /// holding the key could otherwise make every later real session look
    /// old.
    frames_future_session,
    /// Shard frames of objects held whole already (a later pass's), dropped
    /// before their tag was checked: they could change nothing. They count
    /// as arrivals in the loss estimate.
    frames_held_unopened,
    /// Objects refused before anything was allocated for them: a length,
    /// block count or FEC layout past `[limits]` (an image object over its
    /// own bound). Their frames count as accepted; nothing is stored.
    objects_refused,
    /// Objects set aside half received because `limits.max_objects_in_flight`
    /// were arriving at once (the one that had gone longest without a shard
    /// goes); their shards come again with a later pass.
    objects_evicted,
    /// Frames refused before the tag could be checked (short, bad magic,
    /// version, length) or whose authenticated body did not parse.
    frames_malformed,
    /// Shards written to staging (distinct shards).
    shards_stored,
    /// Shards already held, or of an object already complete.
    shards_duplicate,
    /// Verified frames not stored because the state disk was full (they
    /// come again with a later pass).
    frames_dropped_disk_full,
    /// Shards whose object changed length or FEC parameters midway; the
    /// object's earlier shards were dropped and it restarted.
    shards_conflicting,
    /// Frames lost, estimated from sequence-number gaps.
    frames_lost_estimate,
    /// Frames the sender numbered over the same span.
    frames_expected,
    /// Blocks whose data is complete (received whole or rebuilt).
    blocks_complete,
    /// Blocks that needed Reed-Solomon repair (a data shard was missing).
    blocks_repaired,
    /// Blob objects whose sha256 matched and that entered the blob store.
    blobs_verified,
    /// Blob objects whose sha256 did not match; discarded, await the next pass.
    blobs_failed,
    /// Image objects (transfer manifests) verified.
    image_objects_verified,
    /// Image objects that failed their sha256 or did not decode.
    image_objects_failed,
    /// Images whose image object and every blob are verified.
    images_complete,
    /// Image ledger records refused (they did not chain: forged, replayed
    /// or reordered history; or did not belong to their image object);
    /// their images are not delivered.
    ledger_records_refused,
    /// Deliveries finished (one per image and target).
    pushes_done,
    /// Delivery attempts that failed (each is retried).
    push_attempts_failed,
    /// Objects pruned from the blob store (their images delivered; see
    /// `[retention]`).
    objects_pruned,
    /// Bytes those prunes freed.
    bytes_pruned,
    /// Objects in staging forgotten after `keep_delivered_hours` without a
    /// shard.
    staging_pruned,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }
}

/// The last heartbeat from the sender.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderStatus {
    pub received_at_ms: u64,
    pub uptime_s: u64,
    pub queued_objects: u32,
    pub pass: u64,
    pub config_fingerprint: u64,
    pub sent_frames: u64,
    pub session_id: u64,
    /// The head of the sender's image ledger.
    #[serde(default)]
    pub ledger: Option<weir_proto::LedgerHead>,
}

/// An object whose shards are being received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectProgress {
    /// `sha256:` id of the object.
    pub id: String,
    /// "blob" or "image".
    pub kind: String,
    pub len: u64,
    pub blocks_total: u64,
    pub blocks_complete: u64,
    /// Distinct shards held (data and parity).
    pub shards_held: u64,
    /// Shard frames received for it (duplicates too) divided by the shards
    /// of one pass: how many passes' worth has arrived.
    pub passes_seen: f64,
    pub first_seen_ms: u64,
}

impl ObjectProgress {
    /// Object bytes already usable.
    pub fn bytes_done(&self) -> u64 {
        if self.blocks_total == 0 {
            return 0;
        }
        (self.len as u128 * self.blocks_complete as u128 / self.blocks_total as u128) as u64
    }
}

/// One image the receiver knows of (its image object arrived).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageProgress {
    /// `sha256:` id of the image object.
    pub image: String,
    /// Destination `repository:tag` (first tag), after mapping.
    pub reference: String,
    pub manifest_digest: String,
    pub blobs_total: u64,
    pub blobs_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub percent: f64,
    /// Most passes' worth seen among its objects still arriving.
    pub passes_seen: f64,
    pub state: ImageState,
    pub first_frame_ms: u64,
    pub complete_at_ms: Option<u64>,
}

weir_host::named_states! {
    /// Where an image stands on this side.
    pub enum ImageState {
        /// Its image object or some of its blobs are still to come.
        Receiving = "receiving",
        /// Everything verified; its deliveries are queued.
        Complete = "complete",
    }
}

weir_host::named_states! {
    /// Where a delivery stands.
    pub enum DeliveryState {
        Pending = "pending",
        /// Pending, and the last attempt failed.
        Failing = "failing",
        /// Kept and not pushed: its signature does not pass
        /// `[delivery] verify_signatures`.
        Refused = "refused",
        Done = "done",
    }
}

/// One delivery (an image to one target).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryView {
    pub image: String,
    /// "registry" or "oci-layout".
    pub target: String,
    pub reference: String,
    pub manifest_digest: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_ms: Option<u64>,
    pub last_error: Option<String>,
    pub tags_done: Vec<String>,
    pub done_ms: Option<u64>,
}

/// The whole report, as in status.json.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReport {
    pub written_at_ms: u64,
    /// Written by a running gateway (false: built from the database of a
    /// stopped one; counters are then those of its last status.json).
    pub running: bool,
    pub pid: Option<u32>,
    /// Where the link listens (the bound UDP address).
    pub listening: Option<String>,
    /// A frame was accepted in the last 3 s.
    pub link_up: bool,
    /// Frames accepted per second, over the last few seconds.
    pub frames_per_s: f64,
    /// The faults standing, with their reasons; `None` when all is well.
    pub fault: Option<String>,
    pub counters: CounterSnapshot,
    pub pushes_pending: u64,
    /// Failing or refused; also counted in pushes_pending.
    pub pushes_failing: u64,
    pub sender: Option<SenderStatus>,
    pub receiving: Vec<ObjectProgress>,
    pub images: Vec<ImageProgress>,
    pub deliveries: Vec<DeliveryView>,
    /// The image ledger: the head announced, what is complete, the gaps.
    pub ledger: Option<crate::ledger::LedgerView>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("status file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("status file {path}: {reason}")]
    Decode { path: PathBuf, reason: String },
}

impl StatusReport {
    /// Writes `state_dir/status.json` atomically (no fsync: it is a view,
    /// rebuilt every second).
    pub fn write(&self, state_dir: &Path) -> Result<(), StatusError> {
        let path = state_dir.join(STATUS_FILE);
        let text = serde_json::to_vec_pretty(self).map_err(|e| StatusError::Decode {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        weir_host::durable::replace_quickly(&path, &text)
            .map_err(|source| StatusError::Io { path, source })
    }

    pub fn read(state_dir: &Path) -> Result<Option<StatusReport>, StatusError> {
        let path = state_dir.join(STATUS_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StatusError::Io { path, source }),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StatusError::Decode {
                path,
                reason: e.to_string(),
            })
    }

    /// Human-readable lines for `gateway-rx status`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let c = &self.counters;
        let age_s = now_ms().saturating_sub(self.written_at_ms) as f64 / 1000.0;
        let _ = writeln!(
            out,
            "gateway-rx: {}{} (report {:.0}s old)",
            if self.running { "running" } else { "stopped" },
            self.listening
                .as_ref()
                .map(|l| format!(", listening on {l}"))
                .unwrap_or_default(),
            age_s
        );
        if self.running {
            let _ = writeln!(
                out,
                "link: {}, {:.0} frames/s",
                if self.link_up {
                    "up (frames arriving)"
                } else {
                    "down (no frame in 3 s)"
                },
                self.frames_per_s
            );
        }
        report::fault_line(&mut out, self.fault.as_deref());
        let loss = if c.frames_expected > 0 {
            100.0 * c.frames_lost_estimate as f64 / c.frames_expected as f64
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "frames: {} accepted, {} bad tag, {} unknown key, {} replayed, {} malformed, \
             {} dropped (disk full); shards: {} stored, {} duplicate; loss ~{:.2}% ({} of {})",
            c.frames_accepted,
            c.frames_bad_tag,
            c.frames_unknown_key,
            c.frames_replayed,
            c.frames_malformed,
            c.frames_dropped_disk_full,
            c.shards_stored,
            c.shards_duplicate,
            loss,
            c.frames_lost_estimate,
            c.frames_expected
        );
        let _ = writeln!(
            out,
            "blocks: {} complete, {} repaired; blobs: {} verified, {} failed; images: {} complete; \
             pushes: {} pending, {} failing, {} done",
            c.blocks_complete,
            c.blocks_repaired,
            c.blobs_verified,
            c.blobs_failed,
            c.images_complete,
            self.pushes_pending,
            self.pushes_failing,
            c.pushes_done
        );
        if let Some(s) = &self.sender {
            let _ = writeln!(
                out,
                "sender: pass {}, {} objects queued, up {}s, last heartbeat {:.0}s ago",
                s.pass,
                s.queued_objects,
                s.uptime_s,
                now_ms().saturating_sub(s.received_at_ms) as f64 / 1000.0
            );
        }
        if let Some(l) = &self.ledger {
            l.render(&mut out, now_ms());
        }
        report::list_heading(&mut out, "images", self.images.len(), None);
        for i in &self.images {
            let _ = writeln!(
                out,
                "  {} {}: {}/{} blobs, {:.1}%, {:.1} passes seen, {} (manifest {}, image object {})",
                i.reference,
                i.state,
                i.blobs_done,
                i.blobs_total,
                i.percent,
                i.passes_seen,
                human_bytes(i.bytes_total),
                i.manifest_digest,
                i.image
            );
        }
        report::list_heading(&mut out, "objects arriving", self.receiving.len(), None);
        for o in &self.receiving {
            let pct = if o.blocks_total > 0 {
                100.0 * o.blocks_complete as f64 / o.blocks_total as f64
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "  {} {} {}: {}/{} blocks, {:.1}%, {:.1} passes seen",
                o.kind,
                o.id,
                human_bytes(o.len),
                o.blocks_complete,
                o.blocks_total,
                pct,
                o.passes_seen
            );
        }
        let waiting: Vec<&DeliveryView> = self
            .deliveries
            .iter()
            .filter(|d| d.state != DeliveryState::Done)
            .collect();
        report::list_heading(&mut out, "waiting to be delivered", waiting.len(), None);
        for d in waiting {
            let next = d
                .next_attempt_ms
                .map(|t| format!(", next try in {}s", t.saturating_sub(now_ms()) / 1000))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} -> {} ({}, {} attempts{}){}",
                d.reference,
                d.target,
                d.state,
                d.attempts,
                next,
                d.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
        let done = self
            .deliveries
            .iter()
            .filter(|d| d.state == DeliveryState::Done)
            .count();
        if done > 0 {
            let _ = writeln!(out, "delivered: {done}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Counters::default();
        Counters::add(&counters.frames_bad_tag, 3);
        let report = StatusReport {
            written_at_ms: now_ms(),
            running: true,
            counters: counters.snapshot(),
            images: vec![ImageProgress {
                image: "sha256:aa".into(),
                reference: "team/app:1".into(),
                manifest_digest: "sha256:bb".into(),
                blobs_total: 3,
                blobs_done: 1,
                bytes_total: 3 << 20,
                bytes_done: 1 << 20,
                percent: 33.3,
                passes_seen: 1.0,
                state: ImageState::Receiving,
                first_frame_ms: 1,
                complete_at_ms: None,
            }],
            ..Default::default()
        };
        report.write(dir.path()).unwrap();
        let back = StatusReport::read(dir.path()).unwrap().unwrap();
        assert_eq!(back, report);
        let text = back.render();
        assert!(text.contains("3 bad tag"), "{text}");
        assert!(
            text.contains("team/app:1 receiving: 1/3 blobs, 33.3%"),
            "{text}"
        );
        assert!(!dir.path().join("status.json.tmp").exists());
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(StatusReport::read(dir.path()).unwrap().is_none());
    }
}
