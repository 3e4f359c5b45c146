//! Which side of the diode an image is for.

use serde::Serialize;

/// The appliance's role: the sender on the low side or the receiver on the
/// high side. Everything role-specific in the image derives from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Receiver, high side (gateway-rx).
    Rx,
    /// Sender, low side (gateway-tx).
    Tx,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Rx => "rx",
            Role::Tx => "tx",
        }
    }

    /// The gateway binary, as cargo names it and as it sits in /usr/bin.
    pub fn binary_name(self) -> &'static str {
        match self {
            Role::Rx => "gateway-rx",
            Role::Tx => "gateway-tx",
        }
    }

    pub fn summary(self) -> &'static str {
        match self {
            Role::Rx => "receiver (high side of the diode)",
            Role::Tx => "sender (low side of the diode)",
        }
    }

    /// The configuration file on the data partition, as the appliance sees it.
    pub fn config_path(self) -> String {
        format!("/data/weir/{}.toml", self.name())
    }

    /// The configuration file's name inside the data partition's weir/ dir.
    pub fn config_file_name(self) -> String {
        format!("{}.toml", self.name())
    }

    pub fn service_name(self) -> String {
        format!("weir-gateway-{}.service", self.name())
    }

    pub fn hostname(self) -> String {
        format!("weir-{}", self.name())
    }

    /// RAUC's compatible string: a bundle for one role never installs on the
    /// other.
    pub fn compatible(self) -> String {
        format!("weir-{}", self.name())
    }

    /// Stem of every output file name.
    pub fn artifact_stem(self) -> String {
        format!("weir-{}", self.name())
    }
}
