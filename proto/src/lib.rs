//! The contract of the weir gateway pair.
//!
//! Both gateways compile against this crate and nothing else of each other:
//! the frame format and its HMAC ([`frame`], [`auth`]), replay and restart
//! detection ([`replay`]), the FEC codec and send order ([`fec`]), what an
//! image object carries ([`manifest`]), and the links frames travel on
//! ([`link`]), and the appliance surface ([`appliance`]: status LEDs, the
//! serial console). It knows nothing of registries or databases.

pub mod appliance;
pub mod auth;
pub mod fec;
pub mod frame;
pub mod link;
pub mod manifest;
pub mod names;
pub mod replay;
pub mod shutdown;

pub use appliance::{Command, CommandHandler, Console, ConsoleError, LedNames, Leds, Reply};
pub use auth::{Key, KeyError, KeyRing};
pub use fec::{interleave, BlockCodec, Codecs, FecError, FecParams};
pub use frame::{
    new_session_id, Body, Frame, FrameError, FrameKind, FrameOpener, FrameSealer, Header,
    Heartbeat, ObjectHeader, ShardFrame,
};
pub use link::{
    DirSink, DirSource, FrameBatch, FrameSink, FrameSource, LinkError, SerialSink, SerialSource,
    UdpSink, UdpSource,
};
pub use manifest::*;
pub use names::{check_repository, check_tag, NameError};
pub use replay::{LossEstimate, ReplayGuard, ReplayVerdict};
pub use shutdown::Shutdown;
