//! weir receiver (gateway-rx): verify → shard store → blob store → complete
//! images → registry push / OCI layout export.
//!
//! One module per pipeline stage; [`run`] wires them together. The
//! appliance surface: [`appliance`] (faults, the state disk guard, the
//! status LEDs) and [`console`] (the serial console's commands).

// statvfs, for the state disk's free space, has no safe wrapper in std.
#[allow(unsafe_code)]
pub mod appliance;
pub mod blobs;
pub mod config;
pub mod console;
pub mod delivery;
pub mod gateway;
pub mod images;
pub mod link;
// pwritev of shard buffers into object files has no safe wrapper in std.
#[allow(unsafe_code)]
pub mod shards;
pub mod state;
pub mod status;
pub mod verify;

#[cfg(test)]
pub(crate) mod testing;

pub use config::RxConfig;
pub use gateway::{run, status};
