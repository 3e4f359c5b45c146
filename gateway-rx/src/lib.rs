//! weir receiver (gateway-rx): verify → shard store → blob store → complete
//! images → registry push / OCI layout export.
//!
//! One module per pipeline stage under [`stages`] (link, store, decode,
//! finish, deliver, report); [`run`] wires them together. The durable
//! state they work on stays apart: [`shards`] (the shard store), [`blobs`],
//! [`images`] (the image ledger), [`delivery`] (queue and targets),
//! [`state`] (sled). The appliance surface: [`appliance`] (the receiver's
//! faults) and [`console`] (the serial console's commands).

pub mod appliance;
pub mod blobs;
pub mod config;
pub mod console;
pub mod delivery;
pub mod gateway;
pub mod images;
pub mod shards;
pub mod stages;
pub mod state;
pub mod status;
pub mod verify;

pub use config::RxConfig;
pub use gateway::{run, status};
