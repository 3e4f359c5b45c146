//! weir-host: what touches the machine for both gateways.
//!
//! - [`appliance`]: the fault set, the state-disk guard, the LED panel loop
//!   and the counter windows it judges on.
//! - [`cli`]: the command line both gateway binaries share.
//! - [`config`]: the configuration pieces both gateways share, and how a
//!   file is read and its relative paths resolved.
//! - [`durable`]: fsync of directories and trees, whole-file writes.
//! - [`link_setup`]: why a configured link end did not open.
//! - [`logging`]: the log output both gateway binaries set up.
//! - [`report`]: the plain-text lines both consoles and `status` print.
//! - [`signals`]: SIGTERM and SIGINT stop a gateway through its shutdown.
//! - [`stages`]: the stage runner (named threads, first error stops all).
//! - [`state`]: the sled database and its one commit point.
//! - [`states`]: enums of states that show as the words status.json uses.

pub mod appliance;
pub mod cli;
pub mod config;
pub mod durable;
pub mod link_setup;
pub mod logging;
pub mod report;
pub mod signals;
pub mod stages;
pub mod state;
pub mod states;
