//! Optional webhook: one JSON POST per image delivered, failing or refused
//! (its signature), and per image ledger gap (`missing`).
//!
//! Best effort by design: notices go through a small queue to a task of
//! their own, each call has a timeout, and a full queue drops the notice
//! (logged). Delivery never waits for a webhook.

use serde::Serialize;
use std::time::Duration;
use tokio::sync::mpsc;

/// Notices waiting for the webhook; more are dropped (and logged).
const QUEUE: usize = 64;

/// The JSON body posted. `text` makes chat webhooks (Slack, Mattermost,
/// Teams connectors) show a readable line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notice {
    pub text: String,
    /// "delivered", "failing", "refused" or "missing".
    pub event: String,
    pub reference: String,
    pub digest: String,
    pub target: String,
    /// Seconds from the first frame of the image to this event.
    pub seconds_from_first_frame: f64,
    pub error: Option<String>,
    /// For `missing`: the images of the sender's ledger chain that did not
    /// arrive complete in time (reference, digest and target are empty:
    /// the receiver knows only their numbers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<MissingImages>,
}

/// A range of the sender's image ledger not complete in time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MissingImages {
    /// The chain id, 16 hex digits.
    pub chain: String,
    pub from: u64,
    pub to: u64,
    pub count: u64,
    /// When the sender first announced them (receiver's clock).
    pub announced_at_ms: u64,
}

/// Handle that queues notices for the webhook task.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Notice>,
}

impl Notifier {
    /// Starts the posting task on the current tokio runtime.
    pub fn start(url: String, timeout: Duration) -> Result<Notifier, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        let (tx, mut rx) = mpsc::channel::<Notice>(QUEUE);
        tokio::spawn(async move {
            while let Some(notice) = rx.recv().await {
                let body = match serde_json::to_vec(&notice) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook notice does not encode");
                        continue;
                    }
                };
                let sent = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await;
                match sent.and_then(|r| r.error_for_status()) {
                    Ok(_) => {
                        tracing::debug!(digest = %notice.digest, event = %notice.event, "webhook notified")
                    }
                    Err(e) => tracing::warn!(
                        digest = %notice.digest, event = %notice.event, error = %e,
                        "webhook notification failed (not retried)"
                    ),
                }
            }
        });
        Ok(Notifier { tx })
    }

    /// Queues a notice without waiting.
    pub fn send(&self, notice: Notice) {
        if let Err(e) = self.tx.try_send(notice) {
            let notice = match &e {
                mpsc::error::TrySendError::Full(n) | mpsc::error::TrySendError::Closed(n) => n,
            };
            tracing::warn!(digest = %notice.digest, "webhook queue full; notice dropped");
        }
    }
}
