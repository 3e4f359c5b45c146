//! What the weir gateways touch on the machine, for both of them.
//!
//! `weir_proto` is pure: it turns bytes into frames and back and is told
//! the time. This crate does the rest for it:
//!
//! - [`clock`]: the wall-clock and entropy reads a new session id needs;
//! - [`console`]: the serial console, a command prompt on a tty;
//! - [`keys`]: key files read from disk (mode 0600, hex);
//! - [`leds`]: status LEDs through the Linux LED class;
//! - [`link`]: the links frames travel on — UDP (GSO/GRO), serial, directory;
//! - [`shutdown`]: the stop signal every stage of a gateway shares.

pub mod clock;
pub mod console;
pub mod keys;
pub mod leds;
pub mod link;
pub mod shutdown;

pub use clock::new_session_id;
pub use console::{Command, CommandHandler, Console, ConsoleError, Reply};
pub use keys::{load_key, KeyFileError};
pub use leds::{LedNames, Leds};
pub use link::{
    DirSink, DirSource, FrameBatch, FrameSink, FrameSource, LinkError, SerialSink, SerialSource,
    UdpSink, UdpSource,
};
pub use shutdown::Shutdown;
