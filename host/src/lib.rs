//! weir-host: what touches the machine for both gateways.
//!
//! - [`appliance`]: the fault set, the state-disk guard, the LED panel loop
//!   and the counter windows it judges on.
//! - [`config`]: the configuration pieces both gateways share, and how a
//!   file is read and its relative paths resolved.
//! - [`durable`]: fsync of directories and trees, whole-file writes.
//! - [`link_setup`]: why a configured link end did not open.
//! - [`stages`]: the stage runner (named threads, first error stops all).
//! - [`state`]: the sled database and its one commit point.

pub mod appliance;
pub mod config;
pub mod durable;
pub mod link_setup;
pub mod stages;
pub mod state;
