//! `state_dir/status.json`: what the sender is doing, rewritten atomically
//! every second for the console, the demo and operators.
//!
//! ```json
//! {
//!   "version": 1, "updated_at": 1700000000, "uptime_s": 12, "session_id": 1234,
//!   "state": "sending",            // sending | cycling | idle | paused
//!   "paused": false,               // the console paused shard frames
//!   "fault": null,                 // or the reasons, e.g. "state disk full: ..."
//!   "link": {"transport": "udp", "target": "udp to 192.0.2.10:7700", "up": true},
//!   "pass": 0,                     // pass the carousel is on (0 = first)
//!   "queue":   {"images": 1, "objects": 3, "bytes": 1048576},  // still owed passes
//!   "objects": {"count": 9, "bytes": 4194304},                 // on disk, tracked
//!   "wire":    {"rate_bps": 100000000, "measured_bps": 99800000, "frames": 81234, "bytes": 113000000,
//!               "shard_frames": 80000, "heartbeats": 42, "link_errors": 0, "last_link_error": null},
//!   "ingest":  {"accepted": 2, "rejected": 1, "already_sent": 0, "current": null,
//!               "last": {"file": "app.tar", "outcome": "accepted", "code": null, "at": 1700000000}},
//!   "pull": {"sync_file": "/etc/weir/sync.yaml", "sync_error": null,    // only with [pull]
//!            "entries": [{"name": "images[0]", "source": "src:5000/team-a/app:1.4",
//!                         "destination": "team-a/app:1.4", "last_poll": 1700000000,
//!                         "next_poll": 1700000600, "tags_seen": 1, "selected": 1,
//!                         "already_sent": 0, "queued": 1, "refused": 0, "failed": 0,
//!                         "queued_total": 1, "refused_total": 0, "last_error": null}],
//!            "registries": [{"host": "src:5000", "reachable": true,
//!                            "failures_in_a_row": 0, "last_error": null}]},
//!   "images": [{"image": "sha256:…", "destination": "team-a/app:1", "manifest_digest": "sha256:…",
//!               "source": "app.tar", "bytes": 1048576, "passes": 3, "passes_done": 1,
//!               "pass_percent": 40.0, "percent": 46.7, "eta_s": 3, "state": "sending"}]
//! }
//! ```
//!
//! `percent` is the share of all owed passes sent; `eta_s` estimates the
//! time to finish them at the configured rate, FEC overhead included.
//! `link.up` means frames (heartbeats at least) went out in the last 3 s.

use crate::ingest::DropOutcome;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};

weir_host::named_states! {
    /// What the sender is doing.
    #[derive(Default)]
    pub enum SenderState {
        #[default]
        Idle = "idle",
        /// Images owe passes.
        Sending = "sending",
        /// Owed passes done; cycling retained images on the idle link.
        Cycling = "cycling",
        Paused = "paused",
    }
}

weir_host::named_states! {
    /// Where an image stands in the carousel.
    #[derive(Default)]
    pub enum ImageState {
        #[default]
        Queued = "queued",
        Sending = "sending",
        /// Owed passes done, within retention.
        Cycling = "cycling",
        Done = "done",
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    pub version: u32,
    pub updated_at: u64,
    pub uptime_s: u64,
    pub session_id: u64,
    pub state: SenderState,
    pub paused: bool,
    pub fault: Option<String>,
    pub link: LinkStatus,
    pub pass: u64,
    pub queue: QueueStatus,
    pub objects: ObjectsStatus,
    pub wire: WireStatus,
    pub ingest: IngestStatus,
    /// Pull mode; absent without `[pull]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullStatus>,
    /// The image ledger's head, as the last heartbeat announced it.
    pub ledger: Option<weir_proto::LedgerHead>,
    pub images: Vec<ImageStatus>,
}

/// Pull mode: the sync list in force and each entry's last poll.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PullStatus {
    pub sync_file: String,
    /// Why the newest version of the sync file was refused (the previous
    /// list stays in force); None when the file in force is the newest.
    pub sync_error: Option<String>,
    pub entries: Vec<PullEntryStatus>,
    pub registries: Vec<SourceRegistryStatus>,
}

/// One sync list entry. The counts are those of its last poll, but
/// `queued_total` and `refused_total`, which count since the start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PullEntryStatus {
    /// `images[0]`, `repositories[1]`.
    pub name: String,
    pub source: String,
    pub destination: String,
    /// Unix seconds.
    pub last_poll: Option<u64>,
    pub next_poll: Option<u64>,
    pub tags_seen: u64,
    pub selected: u64,
    pub already_sent: u64,
    pub queued: u64,
    pub refused: u64,
    /// Images whose fetch failed this poll (tried again next poll).
    pub failed: u64,
    pub queued_total: u64,
    pub refused_total: u64,
    pub last_error: Option<String>,
}

/// A source registry as pull mode last found it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceRegistryStatus {
    pub host: String,
    /// The last request answered (any answer but a failure of the registry).
    pub reachable: bool,
    /// Polls in a row that failed because of the registry.
    pub failures_in_a_row: u64,
    /// The registry's own message, or what failed in reaching it.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkStatus {
    pub transport: String,
    /// Where frames go, e.g. `serial /dev/ttyS2 at 115200 baud`.
    pub target: String,
    pub up: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueStatus {
    pub images: usize,
    pub objects: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ObjectsStatus {
    pub count: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct WireStatus {
    pub rate_bps: u64,
    pub measured_bps: u64,
    pub frames: u64,
    pub bytes: u64,
    pub shard_frames: u64,
    pub heartbeats: u64,
    /// Sends the transport refused (their frames are lost, as on a diode).
    pub link_errors: u64,
    pub last_link_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct IngestStatus {
    pub accepted: u64,
    pub rejected: u64,
    pub already_sent: u64,
    /// The drop being read now.
    pub current: Option<String>,
    pub last: Option<LastDrop>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LastDrop {
    pub file: String,
    pub outcome: String,
    pub code: Option<String>,
    pub at: u64,
}

impl IngestStatus {
    pub fn record(&mut self, file: &str, outcome: &DropOutcome) {
        let (name, code) = match outcome {
            DropOutcome::Accepted(_) | DropOutcome::Finished => {
                self.accepted += 1;
                ("accepted", None)
            }
            DropOutcome::AlreadySent(_) => {
                self.already_sent += 1;
                ("already-sent", Some("already-sent".to_string()))
            }
            DropOutcome::Rejected(r) => {
                self.rejected += 1;
                ("rejected", Some(r.code.as_str().to_string()))
            }
            DropOutcome::Interrupted | DropOutcome::StillChanging => return,
        };
        self.last = Some(LastDrop {
            file: file.to_string(),
            outcome: name.to_string(),
            code,
            at: crate::objects::unix_now(),
        });
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageStatus {
    pub image: String,
    pub destination: String,
    pub manifest_digest: String,
    pub source: String,
    pub bytes: u64,
    pub passes: u64,
    /// Owed passes every object of the image has completed.
    pub passes_done: u64,
    /// Progress of the pass under way, 0..100.
    pub pass_percent: f64,
    /// Progress over all owed passes, 0..100.
    pub percent: f64,
    pub eta_s: Option<u64>,
    pub state: ImageState,
}

/// Shared by the stages; the status thread writes it out.
#[derive(Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<Status>>,
}

impl StatusBoard {
    pub fn new() -> Self {
        let b = StatusBoard::default();
        b.update(|s| {
            s.version = 1;
            s.state = SenderState::Idle;
        });
        b
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard);
    }

    pub fn ingest(&self, f: impl FnOnce(&mut IngestStatus)) {
        self.update(|s| f(&mut s.ingest));
    }

    pub fn snapshot(&self) -> Status {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Writes the snapshot to `path` atomically (temporary file + rename);
    /// readers never see half a file. Not fsynced: it is rewritten every second.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut s = self.snapshot();
        s.updated_at = crate::objects::unix_now();
        let bytes = serde_json::to_vec_pretty(&s).map_err(std::io::Error::other)?;
        weir_host::durable::replace_quickly(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_file_is_whole_json_with_the_documented_fields() {
        let board = StatusBoard::new();
        board.update(|s| {
            s.queue.objects = 3;
            s.images.push(ImageStatus {
                destination: "a/b:1".into(),
                percent: 50.0,
                ..Default::default()
            });
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        board.write(&path).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for key in [
            "paused",
            "fault",
            "link",
            "queue",
            "objects",
            "pass",
            "wire",
            "images",
            "ingest",
            "state",
            "session_id",
        ] {
            assert!(v.get(key).is_some(), "{key} missing");
        }
        assert_eq!(v["queue"]["objects"], 3);
        assert_eq!(v["images"][0]["destination"], "a/b:1");
    }
}
