//! gateway-rx: the high-side gateway of weir.
//!
//! ```text
//!  link (UDP / serial / inbox) ──▶ verify ──▶ store (shards on disk, bitmaps in sled)
//!                                               │            ▲
//!                                               ▼            │ rebuilt shards
//!                                  finish ◀── blocks ──▶ decode (Reed–Solomon)
//!                                  (sha256 ──▶ blob store ──▶ image ledger)
//!                                                               │ image complete
//!                                                               ▼
//!                                            deliver (registry push / OCI layout)
//! ```
//!
//! One module per pipeline stage under [`stages`] (link with verify, store,
//! decode, finish, deliver, report); [`run`] wires them together. The
//! durable state they work on stays apart: [`shards`] (the shard store),
//! [`blobs`], [`images`] (the images and their completion, and what a
//! restart rebuilds), [`ledger`] (the records of the sender's image
//! ledger: its hash chain, the announced head, gaps, the report),
//! [`delivery`] (queue and targets), [`state`] (sled); [`retention`]
//! prunes what was delivered, [`reload`] applies a re-read configuration
//! (SIGHUP). The appliance surface: [`appliance`] (the receiver's faults),
//! [`console`] (the serial console's commands) and [`metrics`] (the
//! Prometheus families). [`CRASH_POINTS`] names every place a crash
//! is walked at.

// statvfs, for the state disk's free space, has no safe wrapper in std.
#[allow(unsafe_code)]
pub mod appliance;
pub mod blobs;
pub mod config;
pub mod console;
pub mod delivery;
pub mod gateway;
pub mod images;
pub mod ledger;
pub mod metrics;
pub mod reload;
pub mod retention;
// pwritev of shard buffers into object files has no safe wrapper in std.
#[allow(unsafe_code)]
pub mod shards;
pub mod stages;
pub mod state;
pub mod status;
pub mod verify;

pub use config::RxConfig;
pub use gateway::{accept_chain, forget_image, forget_session, run, status};

/// Every crash point of the receiver (see `weir_host::crash`), roughly in
/// the order an image meets them. A test aborts the gateway at each in turn
/// and checks that the image is still delivered once after a restart.
pub const CRASH_POINTS: &[&str] = &[
    "rx.ledger.recovered",
    "rx.shards.opened",
    "rx.shards.payload-written",
    "rx.shards.batch-claimed",
    "rx.finish.blob-adopted",
    "rx.finish.image-adopted",
    "rx.ledger.object-recorded",
    "rx.shards.mismatch-discarded",
    "rx.ledger.jobs-queued",
    "rx.ledger.image-complete",
    "rx.registry.tag-set",
    "rx.layout.exported",
    "rx.delivery.job-saved",
    "rx.retention.pruned",
    "rx.stopped",
];

/// Commit points of operator commands: one step each, with nothing between
/// two durable states to crash in, so they are listed but not walked
/// (`forget-image` deletes a file after its commit, as a prune does: a
/// crash there leaves a file recorded as pruned, which the next start
/// deletes).
pub const OPERATOR_COMMITS: &[&str] = &[
    "rx.operator.forget-session",
    "rx.operator.ledger-accept",
    "rx.operator.forget-image",
];

#[cfg(test)]
mod tests {
    /// A commit point or step added to the code without being listed here
    /// would never be walked by the crash test.
    #[test]
    fn crash_points_lists_every_point_in_the_code() {
        let listed: Vec<&str> = super::CRASH_POINTS
            .iter()
            .chain(super::OPERATOR_COMMITS)
            .copied()
            .collect();
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        weir_host::crash::assert_points_listed(&src, &listed);
    }
}
