//! The sender's stages, one module each, in the order an image meets them:
//!
//! ```text
//!  spool_dir ──▶ ingest ──▶ policy ──▶ object store ──▶ carousel ──▶ sealing ──▶ emit
//!               (archives)  (rules,     (payload files   (schedule,   (FEC, HMAC,  (order, pacing,
//!                            scans)      + sled)          passes)      workers)     heartbeats, link)
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
pub mod sealing;
