//! The appliance side of the receiver: the faults it can be in. The fault
//! set, the state disk guard, the counter windows and the LED panel loop
//! are the host's ([`weir_host::appliance`]), shared with gateway-tx.

pub use weir_host::appliance::{
    free_bytes, free_room, is_disk_full, run_panel, CounterWindow, DiskFull, Intake, Lights,
    Movement, StateDisk, RESUME_MARGIN,
};

/// What can be wrong, in the order `status` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    StateDiskFull,
    HmacFailures,
    DeliveryFailing,
    /// An image's signature does not pass `[delivery] verify_signatures`.
    SignatureRefused,
    /// Images the sender announced have not completed in time.
    LedgerGap,
}

/// The receiver's faults raised now, each with its reason.
pub type Faults = weir_host::appliance::Faults<Fault>;
