//! The contract of the weir gateway pair, pure.
//!
//! Both gateways compile against this crate and nothing else of each other.
//! It does no I/O: no files, sockets, threads or clock reads. Callers pass
//! bytes and `now`; what touches the machine is the host crate's.
//!
//! A frame, the unit that crosses the diode ([`frame`] has the field
//! table and the bodies):
//!
//! ```text
//!  0      4  5  6      8             16            24      28        28+n     +32
//!  +------+--+--+------+-------------+-------------+-------+----------+--------+
//!  | WEIR |v |k |keyid | session id  | sequence    | len n | body     | HMAC   |
//!  +------+--+--+------+-------------+-------------+-------+----------+--------+
//!                                                          postcard    SHA-256 over
//!                                                          of kind k   bytes 0..28+n
//! ```
//!
//! The pipeline, and the module that holds each step:
//!
//! ```text
//!  sender                                    receiver
//!
//!  object bytes                              object bytes
//!    │                                         ▲
//!    │ fec: BlockCodec::encode                 │ fec: BlockCodec::reconstruct_data
//!    │      (k data + m parity per block)      │ assembly: ObjectAssembly
//!    │ fec: interleave (send order)            │   (held bitmaps, decodable,
//!    ▼                                         │    data-complete, ObjectState)
//!  frame: FrameSealer (auth: Key)            replay: ReplayGuard
//!    │                                         ▲
//!    │ pacing: TokenBucket                   frame: FrameOpener (auth: KeyRing)
//!    ▼                                         │
//!    └──► link (host crate; framing: COBS ─────┘
//!         on a serial line, batch files
//!         in a directory; sim: in memory)
//! ```
//!
//! - [`auth`]: keys from their secret bytes, the receiver's key ring;
//! - [`frame`]: the frame format, sealing and opening;
//! - [`replay`]: replay and restart detection, loss estimate;
//! - [`fec`]: the Reed–Solomon block codec and the send order;
//! - [`assembly`]: which shards of an object are held, and its lifecycle;
//! - [`manifest`]: what an image object carries;
//! - [`ledger`]: the image ledger's hash chain, heads, gaps and the
//!   receiver's report;
//! - [`referrers`]: signatures, attestations and SBOMs that cross with
//!   their image, and what bounds them;
//! - [`names`]: repository and tag names as the distribution spec allows;
//! - [`pacing`]: the token bucket every rate limit uses;
//! - [`framing`]: COBS for byte streams, the directory link's batch file;
//! - `sim` (feature `sim`): a seeded fault model and an in-memory link pair.

#![forbid(unsafe_code)]

pub mod assembly;
pub mod auth;
pub mod fec;
pub mod frame;
pub mod framing;
pub mod ledger;
pub mod manifest;
pub mod names;
pub mod pacing;
pub mod referrers;
pub mod replay;
#[cfg(feature = "sim")]
pub mod sim;

pub use assembly::{BlockProgress, ObjectAssembly, ObjectState};
pub use auth::{Key, KeyError, KeyRing};
pub use fec::{interleave, BlockCodec, Codecs, FecError, FecParams};
pub use frame::{
    claimed_object, new_session_id, Body, Frame, FrameError, FrameKind, FrameOpener, FrameSealer,
    Header, Heartbeat, ObjectHeader, ShardFrame,
};
pub use ledger::{ChainId, ChainRecord, LedgerHead, RecordHash};
pub use manifest::*;
pub use names::{check_repository, check_tag, NameError};
pub use pacing::{LinePacer, TokenBucket};
pub use referrers::{Attachment, Referrer, ReferrerError};
pub use replay::{LossEstimate, ReplayGuard, ReplayVerdict};
