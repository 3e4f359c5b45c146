//! The contract of the weir gateway pair.
//!
//! Both gateways compile against this crate and nothing else of each other:
//! the frame format and its HMAC ([`frame`], [`auth`]), replay and restart
//! detection ([`replay`]), the FEC codec and send order ([`fec`]), what an
//! image object carries ([`manifest`]), and the links frames travel on
//! ([`link`]). It knows nothing of registries or databases.

pub mod auth;
pub mod fec;
pub mod frame;
pub mod link;
pub mod manifest;
pub mod replay;
pub mod shutdown;

pub use auth::{Key, KeyError, KeyRing};
pub use fec::{interleave, BlockCodec, FecError, FecParams};
pub use frame::{
    new_session_id, Body, Frame, FrameError, FrameKind, FrameOpener, FrameSealer, Header,
    Heartbeat, ObjectHeader, ShardFrame,
};
pub use link::{FrameBatch, FrameSink, FrameSource, LinkError, UdpSink, UdpSource};
pub use manifest::*;
pub use replay::{LossEstimate, ReplayGuard, ReplayVerdict};
pub use shutdown::Shutdown;
