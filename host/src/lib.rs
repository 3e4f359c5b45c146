//! What touches the machine, for both gateways.
//!
//! `weir_proto` is pure: it turns bytes into frames and back and is told
//! the time. This crate does the rest for it:
//!
//! - [`appliance`]: the fault set, the state-disk guard, the LED panel loop
//!   and the counter windows it judges on.
//! - [`cli`]: the command line both gateway binaries share.
//! - [`clock`]: the wall-clock and entropy reads a new session id needs.
//! - [`config`]: the configuration pieces both gateways share, and how a
//!   file is read and its relative paths resolved.
//! - [`console`]: the serial console, a command prompt on a tty.
//! - [`crash`]: named crash points that a test can turn into an abort.
//! - [`durable`]: fsync of directories and trees, whole-file writes.
//! - [`keys`]: key files read from disk (mode 0600, hex).
//! - [`leds`]: status LEDs through the Linux LED class.
//! - [`link`]: the links frames travel on: UDP (GSO/GRO), serial, directory.
//! - [`link_setup`]: why a configured link end did not open.
//! - [`logging`]: the log output both gateway binaries set up.
//! - [`metrics`]: the Prometheus text format and the `/metrics` endpoint.
//! - [`reload`]: configuration reloads (SIGHUP): requests, values stages
//!   pick up, which changed fields apply and which need a restart.
//! - [`report`]: the plain-text lines both consoles and `status` print.
//! - [`shutdown`]: the stop signal every stage of a gateway shares.
//! - [`signals`]: SIGTERM and SIGINT stop a gateway through its shutdown;
//!   SIGHUP asks for a reload.
//! - [`stages`]: the stage runner (named threads, first error stops all).
//! - [`state`]: the sled database and its one commit point.
//! - [`states`]: enums of states that show as the words status.json uses.

pub mod appliance;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod crash;
pub mod durable;
pub mod keys;
pub mod leds;
pub mod link;
pub mod link_setup;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod report;
pub mod shutdown;
pub mod signals;
pub mod signatures;
pub mod stages;
pub mod state;
pub mod states;

pub use clock::new_session_id;
pub use console::{Command, CommandHandler, Console, ConsoleError, Reply};
pub use keys::{load_key, KeyFileError};
pub use leds::{LedNames, Leds};
pub use link::{
    DirSink, DirSource, FrameBatch, FrameSink, FrameSource, LinkError, SerialSink, SerialSource,
    UdpSink, UdpSource,
};
pub use shutdown::Shutdown;
