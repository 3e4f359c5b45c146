//! weir receiver.
