//! Why a configured link end could not be opened, the same way on both
//! gateways: the `[link]` field at fault and, where the transport was
//! tried, what it said.

use crate::config::Transport;
use crate::LinkError;

#[derive(Debug, thiserror::Error)]
pub enum LinkSetupError {
    #[error("link.{field} is required when transport = \"{transport}\"")]
    Missing {
        field: &'static str,
        transport: Transport,
    },
    /// `target` is what the field named: an address, a device, a directory.
    #[error("link.{field} {target}: {source}")]
    Open {
        field: &'static str,
        target: String,
        #[source]
        source: LinkError,
    },
}

impl LinkSetupError {
    pub fn missing(field: &'static str, transport: Transport) -> Self {
        LinkSetupError::Missing { field, transport }
    }

    /// Wraps a transport's error with the field and what it named.
    pub fn open(
        field: &'static str,
        target: impl std::fmt::Display,
    ) -> impl FnOnce(LinkError) -> LinkSetupError {
        let target = target.to_string();
        move |source| LinkSetupError::Open {
            field,
            target,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_the_transport_or_target() {
        let e = LinkSetupError::missing("serial_device", Transport::Serial).to_string();
        assert_eq!(
            e,
            "link.serial_device is required when transport = \"serial\""
        );
        let e = LinkSetupError::open("inbox_dir", "/in")(LinkError::io(
            "listing",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        ))
        .to_string();
        assert!(e.starts_with("link.inbox_dir /in: "), "{e}");
    }
}
