//! The appliance side of the sender: the faults it can be in. The fault
//! set, the state disk guard and the LED panel loop are the host's
//! ([`weir_host::appliance`]), shared with gateway-rx.

pub use weir_host::appliance::{
    free_bytes, is_disk_full, run_panel, DiskFull, Intake, Lights, Movement, StateDisk,
    RESUME_MARGIN,
};

/// What can be wrong, in the order `status` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    StateDiskFull,
    LinkFailing,
    /// A source registry of pull mode failed several polls in a row.
    SourceRegistryFailing,
}

/// The sender's faults raised now, each with its reason.
pub type Faults = weir_host::appliance::Faults<Fault>;
