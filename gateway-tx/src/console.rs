//! What the sender answers on its serial console (proto's `Console` runs
//! the prompt; this is the `CommandHandler`).
//!
//! Every answer is plain text, one fact per line, so that an operator on a
//! 80-column terminal and a script reading the tty both get on with it.

use crate::appliance::Faults;
use crate::carousel::CarouselControl;
use crate::objects::{ImageRecord, ObjectStore};
use crate::status::{Status, StatusBoard};
use std::fmt::Write;
use std::sync::Arc;
use weir_host::appliance::human_bytes;
use weir_host::report;
use weir_host::{Command, CommandHandler, Reply};
use weir_proto::ObjectId;

const COMMANDS: &[Command] = &[
    report::STATUS,
    report::command("images", "images in the carousel, with their digests"),
    report::STATS,
    report::command("keys", "key ids in use (never key material)"),
    report::command("pause", "stop sending shard frames (heartbeats go on)"),
    report::command("resume", "send shard frames again"),
    Command {
        name: "resend",
        usage: "<digest>",
        summary: "owe an image new passes (manifest or image digest)",
    },
];

/// The shortest digest prefix `resend` takes: short enough to type on a
/// console, long enough not to hit two images by accident.
const MIN_PREFIX: usize = 8;

/// The sender's console commands.
pub struct TxCommands {
    pub board: StatusBoard,
    pub control: Arc<CarouselControl>,
    pub store: Arc<ObjectStore>,
    pub faults: Arc<Faults>,
    pub key_id: u16,
    pub passes: u32,
}

impl CommandHandler for TxCommands {
    fn commands(&self) -> &[Command] {
        COMMANDS
    }

    fn handle(&self, command: &str, args: &[&str]) -> Reply {
        match (command, args) {
            ("status", []) => Reply::Text(status_text(
                &self.board.snapshot(),
                self.faults.reason().as_deref(),
            )),
            ("images", []) => Reply::Text(images_text(&self.board.snapshot())),
            ("stats", []) => Reply::Text(stats_text(&self.board.snapshot())),
            ("keys", []) => Reply::Text(format!("signing key id: {}", self.key_id)),
            ("pause", []) => Reply::text(if self.control.pause() {
                "paused: shard frames stop now, heartbeats go on (a restart sends again)"
            } else {
                "already paused"
            }),
            ("resume", []) => Reply::text(if self.control.resume() {
                "resumed: shard frames go out again"
            } else {
                "not paused"
            }),
            ("resend", [digest]) => self.resend(digest),
            ("resend", _) => Reply::error("usage: resend <digest>"),
            (name, _) => Reply::error(format!("{name} takes no arguments")),
        }
    }
}

/// The sender's state for people: the console's `status` and
/// `gateway-tx status` print it.
pub fn status_text(s: &Status, fault: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gateway-tx {}: {}, pass {}, up {}s, session {}",
        env!("CARGO_PKG_VERSION"),
        s.state,
        s.pass,
        s.uptime_s,
        s.session_id
    );
    let _ = writeln!(
        out,
        "link: {}, {}; paced {} bit/s, measured {} bit/s",
        s.link.target,
        if s.link.up {
            "up (frames going out)"
        } else {
            "down (nothing sent in 3 s)"
        },
        s.wire.rate_bps,
        s.wire.measured_bps
    );
    let _ = writeln!(
        out,
        "queue: {} images, {} objects, {} owing passes",
        s.queue.images,
        s.queue.objects,
        human_bytes(s.queue.bytes)
    );
    if let Some(current) = &s.ingest.current {
        let _ = writeln!(out, "ingest: reading {current}");
    }
    if let Some(l) = &s.ledger {
        let _ = writeln!(
            out,
            "image ledger: chain {}, {} images numbered, head {}",
            l.chain,
            l.seq,
            l.hash.short()
        );
    }
    report::fault_line(&mut out, fault);
    report::list_heading(&mut out, "images", s.images.len(), Some("none"));
    for i in &s.images {
        let eta = i.eta_s.map(|e| format!(", eta {e}s")).unwrap_or_default();
        let _ = writeln!(
            out,
            "  {} {}: passes {}/{}, {:.1}% of this pass, {:.1}% overall{}",
            i.destination, i.state, i.passes_done, i.passes, i.pass_percent, i.percent, eta
        );
    }
    if let Some(p) = &s.pull {
        pull_text(&mut out, p);
    }
    out
}

fn pull_text(out: &mut String, p: &crate::status::PullStatus) {
    let now = crate::objects::unix_now();
    let _ = writeln!(out, "pull: {}", p.sync_file);
    if let Some(e) = &p.sync_error {
        let _ = writeln!(
            out,
            "  sync file edit refused (previous list in force): {e}"
        );
    }
    for r in &p.registries {
        let state = match &r.last_error {
            None => "answering".to_string(),
            Some(e) => format!("{} failed poll(s) in a row: {e}", r.failures_in_a_row),
        };
        let _ = writeln!(out, "  registry {}: {state}", r.host);
    }
    for e in &p.entries {
        let when = |t: Option<u64>, past: bool| match t {
            None => "never".to_string(),
            Some(t) if past => format!("{}s ago", now.saturating_sub(t)),
            Some(t) => format!("in {}s", t.saturating_sub(now)),
        };
        let _ = writeln!(
            out,
            "  {} {} -> {}: polled {}, next {}; tags seen {}, selected {}, already sent {}, \
             queued {}, refused {}, failed {}",
            e.name,
            e.source,
            e.destination,
            when(e.last_poll, true),
            when(e.next_poll, false),
            e.tags_seen,
            e.selected,
            e.already_sent,
            e.queued,
            e.refused,
            e.failed
        );
        if let Some(err) = &e.last_error {
            let _ = writeln!(out, "    last error: {err}");
        }
    }
}

impl TxCommands {
    fn resend(&self, typed: &str) -> Reply {
        let wanted = typed
            .strip_prefix("sha256:")
            .unwrap_or(typed)
            .to_ascii_lowercase();
        if wanted.len() < MIN_PREFIX || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Reply::error(format!(
                "'{typed}' is not a digest (sha256:<hex>, or at least {MIN_PREFIX} hex digits)"
            ));
        }
        let records = match self.store.images() {
            Ok(r) => r,
            Err(e) => return Reply::error(format!("reading the queue: {e}")),
        };
        let hex_of = |d: &str| d.strip_prefix("sha256:").unwrap_or(d).to_string();
        let matching: Vec<&ImageRecord> = records
            .iter()
            .filter(|r| {
                hex_of(&r.manifest_digest).starts_with(&wanted)
                    || hex_of(&r.image).starts_with(&wanted)
            })
            .collect();
        let mut manifests: Vec<&str> = matching
            .iter()
            .map(|r| r.manifest_digest.as_str())
            .collect();
        manifests.sort_unstable();
        manifests.dedup();
        if matching.is_empty() {
            return Reply::error(format!(
                "no image with digest {typed} in the carousel (see images)"
            ));
        }
        if manifests.len() > 1 {
            return Reply::error(format!(
                "{typed} matches {} images; type more of the digest",
                manifests.len()
            ));
        }
        let mut out = String::new();
        for r in matching {
            let Ok(id) = ObjectId::from_digest(&r.image) else {
                return Reply::error(format!("image record {} is unusable", r.image));
            };
            self.control.request_resend(id);
            let _ = writeln!(
                out,
                "resend: {} (manifest {}) owed {} new passes",
                r.destination, r.manifest_digest, self.passes
            );
        }
        if self.control.is_paused() {
            out.push_str("note: paused; the passes start on resume\n");
        }
        Reply::Text(out)
    }
}

fn images_text(s: &Status) -> String {
    report::list_or("no images in the carousel", &s.images, |out, i| {
        let _ = writeln!(
            out,
            "{} {}: passes {}/{}, {}, from {}",
            i.destination,
            i.state,
            i.passes_done,
            i.passes,
            human_bytes(i.bytes),
            i.source
        );
        report::image_digests(out, &i.manifest_digest, &i.image);
    })
}

fn stats_text(s: &Status) -> String {
    let w = &s.wire;
    let rows: [(&str, u64); 17] = [
        ("wire.frames", w.frames),
        ("wire.shard_frames", w.shard_frames),
        ("wire.heartbeats", w.heartbeats),
        ("wire.bytes", w.bytes),
        ("wire.link_errors", w.link_errors),
        ("wire.rate_bps", w.rate_bps),
        ("wire.measured_bps", w.measured_bps),
        ("ingest.accepted", s.ingest.accepted),
        ("ingest.rejected", s.ingest.rejected),
        ("ingest.already_sent", s.ingest.already_sent),
        ("queue.images", s.queue.images as u64),
        ("queue.objects", s.queue.objects as u64),
        ("queue.bytes", s.queue.bytes),
        ("objects.count", s.objects.count as u64),
        ("objects.bytes", s.objects.bytes),
        ("pass", s.pass),
        ("uptime_s", s.uptime_s),
    ];
    let mut out = String::new();
    report::counter_lines(&mut out, rows);
    if let Some(e) = &w.last_link_error {
        let _ = writeln!(out, "wire.last_link_error {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::appliance::Fault;
    use crate::objects::{DropCommit, DropRecord};
    use crate::status::ImageStatus;
    use weir_test_support::replies::text;

    const MANIFEST: &str =
        "sha256:4f9a1c0e2b7d6a8f3e5c1b0a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e";

    fn commands(dir: &std::path::Path) -> TxCommands {
        let store = Arc::new(ObjectStore::open(dir).unwrap());
        let mut img = crate::objects::tests::accepted("team/app", "1", b"manifest", "app.tar");
        img.manifest.digest = MANIFEST.into();
        let records = store
            .commit_drop(&DropCommit {
                source: "app.tar".into(),
                drop: Some(DropRecord {
                    size: 1,
                    modified_ns: 2,
                    images: vec![],
                    refused: None,
                }),
                images: vec![img],
                audit: crate::objects::tests::audit("app.tar"),
            })
            .unwrap();
        let image = records[0].image.clone();
        let board = StatusBoard::new();
        board.update(|s| {
            s.link.target = "udp to 127.0.0.1:7700".into();
            s.link.up = true;
            s.images.push(ImageStatus {
                image,
                destination: "team/app:1".into(),
                manifest_digest: MANIFEST.into(),
                source: "app.tar".into(),
                passes: 3,
                passes_done: 3,
                state: crate::status::ImageState::Cycling,
                ..Default::default()
            });
        });
        TxCommands {
            board,
            control: Arc::new(CarouselControl::default()),
            store,
            faults: Arc::new(Faults::default()),
            key_id: 7,
            passes: 3,
        }
    }

    #[test]
    fn status_names_link_images_and_faults() {
        let dir = tempfile::tempdir().unwrap();
        let c = commands(dir.path());
        let t = text(c.handle("status", &[]));
        assert!(t.contains("link: udp to 127.0.0.1:7700, up"), "{t}");
        assert!(t.contains("team/app:1 cycling: passes 3/3"), "{t}");
        assert!(t.contains("fault: none"), "{t}");
        c.faults
            .raise(Fault::StateDiskFull, "state disk full: 0.2 MiB free");
        let t = text(c.handle("status", &[]));
        assert!(t.contains("fault: state disk full: 0.2 MiB free"), "{t}");
        let t = text(c.handle("images", &[]));
        assert!(t.contains(&format!("manifest {MANIFEST}")), "{t}");
    }

    #[test]
    fn keys_lists_the_id_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = commands(dir.path());
        assert_eq!(text(c.handle("keys", &[])), "signing key id: 7");
    }

    #[test]
    fn pause_and_resume_toggle_the_carousel() {
        let dir = tempfile::tempdir().unwrap();
        let c = commands(dir.path());
        assert!(text(c.handle("pause", &[])).starts_with("paused"));
        assert!(c.control.is_paused());
        assert_eq!(text(c.handle("pause", &[])), "already paused");
        assert!(text(c.handle("resume", &[])).starts_with("resumed"));
        assert!(!c.control.is_paused());
        assert_eq!(text(c.handle("resume", &[])), "not paused");
    }

    #[test]
    fn resend_takes_a_digest_or_a_prefix_and_refuses_unknown_ones() {
        let dir = tempfile::tempdir().unwrap();
        let c = commands(dir.path());
        let t = text(c.handle("resend", &[MANIFEST]));
        assert!(
            t.contains("team/app:1") && t.contains("3 new passes"),
            "{t}"
        );
        assert_eq!(c.control.take_resends().len(), 1);
        // A prefix of the hex, without "sha256:", finds it too.
        text(c.handle("resend", &["4f9a1c0e2b"]));
        assert_eq!(c.control.take_resends().len(), 1);
        for bad in ["sha256:00000000000000", "4f9a", "not-hex!"] {
            assert!(
                matches!(c.handle("resend", &[bad]), Reply::Error(_)),
                "{bad}"
            );
        }
        assert!(c.control.take_resends().is_empty());
        assert!(matches!(c.handle("resend", &[]), Reply::Error(_)));
    }
}
