//! The clock and entropy reads that `weir_proto` leaves to its callers.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the clock is set before it.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new session id after `previous`, from the wall clock and a random
/// nonce (see [`weir_proto::new_session_id`] for the rule).
pub fn new_session_id(previous: Option<u64>) -> u64 {
    weir_proto::new_session_id(previous, unix_ms(), rand::random::<u16>())
}

/// A new image ledger chain id, drawn at random: a sender whose state was
/// lost must not restart a chain the receiver already holds.
pub fn new_chain_id() -> weir_proto::ChainId {
    weir_proto::ChainId(rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_increase() {
        let a = new_session_id(None);
        assert!(new_session_id(Some(a)) > a);
        assert_eq!(new_session_id(Some(u64::MAX - 1)), u64::MAX);
    }
}
