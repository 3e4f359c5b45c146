//! The sender's stages, one module each, in the order an image meets them:
//!
//! ```text
//!  spool_dir ──▶ ingest ──▶ policy ──▶ object store ──▶ carousel ──▶ emit
//!               (archives)  (rules,     (payload files   (FEC, seal,  (udp, serial,
//!                            scans)      + sled)          pacing)      dir outbox)
//!                               report: status.json, LEDs, console
//! ```
//!
//! [`crate::run`] wires them; the durable state they share (the object
//! store, [`crate::objects`]) lives outside this folder.

pub mod carousel;
pub mod emit;
pub mod ingest;
pub mod policy;
pub mod pull;
pub mod report;
