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
}

/// The sender's faults raised now, each with its reason.
pub type Faults = weir_host::appliance::Faults<Fault>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_join_their_reasons_in_a_fixed_order() {
        let f = Faults::default();
        f.raise(Fault::LinkFailing, "link failing: device gone");
        f.raise(Fault::StateDiskFull, "state disk full");
        let reason = f.reason();
        assert_eq!(
            reason.as_deref(),
            Some("state disk full; link failing: device gone")
        );
    }
}
