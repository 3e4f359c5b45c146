//! The receiver's sled database: the host's [`StateDb`], whose commit point
//! both gateways share, and the wall clock the records are stamped with.

use std::time::{SystemTime, UNIX_EPOCH};

pub use weir_host::durable::fsync_dir;
pub use weir_host::state::{StateDb, StateError};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
