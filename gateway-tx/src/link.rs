//! The link: builds the proto frame sink the configuration names.

use crate::config::{LinkConfig, Transport};
use weir_proto::{FrameSink, LinkError, UdpSink};

#[derive(Debug, thiserror::Error)]
pub enum LinkSetupError {
    #[error("link.transport = \"{0}\" is not supported by this build yet; use \"udp\"")]
    Unsupported(Transport),
    #[error("link.udp_peer is required when transport = \"udp\"")]
    NoPeer,
    #[error("link.udp_peer {peer}: {source}")]
    Udp {
        peer: std::net::SocketAddr,
        #[source]
        source: LinkError,
    },
}

/// Opens the sending end of the configured link.
pub fn open_sink(config: &LinkConfig) -> Result<Box<dyn FrameSink>, LinkSetupError> {
    match config.transport {
        Transport::Udp => {
            let peer = config.udp_peer.ok_or(LinkSetupError::NoPeer)?;
            let sink = UdpSink::connect(peer, config.datagram_size)
                .map_err(|source| LinkSetupError::Udp { peer, source })?;
            tracing::info!(%peer, datagram_size = config.datagram_size, "UDP link open");
            Ok(Box::new(sink))
        }
        other => Err(LinkSetupError::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(transport: Transport) -> LinkConfig {
        LinkConfig {
            transport,
            udp_peer: Some("127.0.0.1:9".parse().unwrap()),
            rate_bps: 1_000_000,
            datagram_size: 1400,
            frame_overhead_bytes: 0,
        }
    }

    #[test]
    fn udp_opens_and_carries_the_datagram_size() {
        let sink = open_sink(&cfg(Transport::Udp)).unwrap();
        assert_eq!(sink.max_frame_len(), 1400);
    }

    #[test]
    fn serial_and_dir_say_so_clearly() {
        for t in [Transport::Serial, Transport::Dir] {
            let e = open_sink(&cfg(t)).err().unwrap().to_string();
            assert!(
                e.contains("not supported") && e.contains(&t.to_string()),
                "{e}"
            );
        }
    }
}
