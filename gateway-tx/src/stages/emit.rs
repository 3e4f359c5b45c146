//! The link: builds the proto frame sink the configuration names.

use crate::config::{LinkConfig, Transport};
use std::time::Duration;
pub use weir_host::link_setup::LinkSetupError;
use weir_host::{DirSink, FrameSink, LinkError, SerialSink, UdpSink};

/// Opens the sending end of the configured link.
pub fn open_sink(config: &LinkConfig) -> Result<Box<dyn FrameSink>, LinkSetupError> {
    match config.transport {
        Transport::Udp => {
            let peer = config
                .udp_peer
                .ok_or(LinkSetupError::missing("udp_peer", config.transport))?;
            let sink = UdpSink::connect(peer, config.datagram_size)
                .map_err(LinkSetupError::open("udp_peer", peer))?;
            tracing::info!(%peer, datagram_size = config.datagram_size, gso = sink.gso(),
                "UDP link open");
            Ok(Box::new(sink))
        }
        Transport::Serial => {
            let device = config
                .serial_device
                .clone()
                .ok_or(LinkSetupError::missing("serial_device", config.transport))?;
            // The sink paces itself to the line as well: a one-way line
            // drops what arrives too fast, whatever the carousel believes.
            let sink = SerialSink::open(&device, config.baud, config.datagram_size)
                .map_err(LinkSetupError::open("serial_device", device.display()))?;
            Ok(Box::new(sink))
        }
        Transport::Dir => {
            let dir = config
                .outbox_dir
                .clone()
                .ok_or(LinkSetupError::missing("outbox_dir", config.transport))?;
            std::fs::create_dir_all(&dir).map_err(|e| {
                LinkSetupError::open("outbox_dir", dir.display())(LinkError::io(
                    "creating the outbox",
                    e,
                ))
            })?;
            let sink = DirSink::new(
                &dir,
                config.max_file_bytes,
                Duration::from_millis(config.max_file_age_ms),
            )
            .map_err(LinkSetupError::open("outbox_dir", dir.display()))?;
            tracing::info!(outbox = %dir.display(), max_file_bytes = config.max_file_bytes,
                max_file_age_ms = config.max_file_age_ms, "directory link open");
            Ok(Box::new(sink))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(transport: Transport) -> LinkConfig {
        LinkConfig {
            transport,
            udp_peer: Some("127.0.0.1:9".parse().unwrap()),
            serial_device: None,
            baud: 115_200,
            outbox_dir: None,
            max_file_bytes: 1 << 20,
            max_file_age_ms: 1000,
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
    fn serial_and_dir_name_their_missing_key() {
        for (t, key) in [
            (Transport::Serial, "link.serial_device"),
            (Transport::Dir, "link.outbox_dir"),
        ] {
            let e = open_sink(&cfg(t)).err().unwrap().to_string();
            assert!(e.contains(key) && e.contains(&t.to_string()), "{e}");
        }
    }

    #[test]
    fn serial_names_a_device_that_cannot_open() {
        let mut c = cfg(Transport::Serial);
        c.serial_device = Some("/nonexistent/ttyS9".into());
        let e = open_sink(&c).err().unwrap().to_string();
        assert!(
            e.contains("link.serial_device") && e.contains("/nonexistent/ttyS9"),
            "{e}"
        );
    }

    #[test]
    fn dir_creates_the_outbox_and_writes_batch_files_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("out/box");
        let mut c = cfg(Transport::Dir);
        c.outbox_dir = Some(outbox.clone());
        let mut sink = open_sink(&c).unwrap();
        assert!(outbox.is_dir());
        assert!(sink.max_frame_len() >= 1400);
        // A frame that parses: a sealed heartbeat.
        let key = weir_proto::Key::from_bytes(1, &[7; 32]).unwrap();
        let mut sealer = weir_proto::FrameSealer::new(key, 1);
        let mut frame = Vec::new();
        sealer.seal(
            &weir_proto::Body::Heartbeat(weir_proto::Heartbeat {
                uptime_s: 1,
                queued_objects: 0,
                pass: 0,
                config_fingerprint: 0,
                sent_frames: 0,
                ledger: None,
            }),
            &mut frame,
        );
        sink.send(&[&frame]).unwrap();
        drop(sink); // flushes the gathered frames into a file
        let files: Vec<_> = std::fs::read_dir(&outbox)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].ends_with(".weir"), "{files:?}");
    }
}
