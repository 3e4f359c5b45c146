//! The link end (UDP, serial line or file inbox): receives frames in
//! batches on a thread of its own, verifies each one, and passes on only
//! what is authentic and new.

use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_host::{DirSource, FrameBatch, FrameSource, SerialSource, Shutdown, UdpSource};
use weir_proto::{Body, ObjectHeader};

use crate::config::{RxConfig, Transport};
use crate::shards::ShardIn;
use crate::state::now_ms;
use crate::status::SenderStatus;
use crate::verify::Verifier;
pub use weir_host::link_setup::LinkSetupError;

/// Frames taken from the transport per call: a UDP source with GRO reads
/// this many frames' bytes as a few coalesced messages per system call.
const BATCH_FRAMES: usize = 512;
/// Frames per batch handed to the store: the channel's bound in batches
/// stays the bound in memory, whatever a receive returned.
const OUT_FRAMES: usize = 256;
/// How long a receive waits before checking for shutdown.
const RECV_WAIT: Duration = Duration::from_millis(200);
/// How often the loss estimate is published.
const LOSS_EVERY: Duration = Duration::from_millis(500);

/// A frame that passed verification, owned so the batch buffer can be reused.
#[derive(Debug, Clone)]
pub enum Inbound {
    Shard(ShardIn),
    Header(ObjectHeader),
}

/// The configured transport, opened. Returns the source and a description
/// of where it listens (the bound address for udp, the device or inbox).
pub fn open_source(config: &RxConfig) -> Result<(Box<dyn FrameSource>, String), LinkSetupError> {
    let link = &config.link;
    match link.transport {
        Transport::Udp => {
            let addr: SocketAddr = link
                .udp_listen
                .ok_or(LinkSetupError::missing("udp_listen", link.transport))?;
            let source = UdpSource::bind(addr).map_err(LinkSetupError::open("udp_listen", addr))?;
            let bound = source
                .local_addr()
                .map_err(LinkSetupError::open("udp_listen", addr))?;
            tracing::info!(%bound, gro = source.gro(), "UDP link open");
            Ok((Box::new(source), bound.to_string()))
        }
        Transport::Serial => {
            let device = link
                .serial_device
                .as_deref()
                .ok_or(LinkSetupError::missing("serial_device", link.transport))?;
            let source = SerialSource::open(device, link.baud, link.datagram_size)
                .map_err(LinkSetupError::open("serial_device", device.display()))?;
            Ok((
                Box::new(source),
                format!("{} at {} baud", device.display(), link.baud),
            ))
        }
        Transport::Dir => {
            let inbox = link
                .inbox_dir
                .as_deref()
                .ok_or(LinkSetupError::missing("inbox_dir", link.transport))?;
            let source = DirSource::new(inbox)
                .map_err(LinkSetupError::open("inbox_dir", inbox.display()))?;
            Ok((Box::new(source), format!("inbox {}", inbox.display())))
        }
    }
}

/// Receives until shutdown, handing verified frames to `out` one batch at a
/// time. Blocks when the store falls behind (the transport's buffer then
/// takes the excess, and beyond that, loss the carousel will repair).
pub fn receive(
    mut source: Box<dyn FrameSource>,
    mut verifier: Verifier,
    datagram_size: usize,
    out: SyncSender<Vec<Inbound>>,
    sender: Arc<Mutex<Option<SenderStatus>>>,
    shutdown: Shutdown,
) {
    let mut batch = FrameBatch::new(BATCH_FRAMES, datagram_size);
    let mut last_loss = Instant::now();
    let mut last_error: Option<Instant> = None;
    'recv: while !shutdown.is_triggered() {
        verifier.pick_up_keys();
        if let Err(e) = source.recv(&mut batch, RECV_WAIT) {
            // Log once a minute at most; keep trying, the link may come back.
            if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::error!(error = %e, "link receive failed; retrying");
                last_error = Some(Instant::now());
            }
            shutdown.sleep(Duration::from_millis(500));
            continue;
        }
        let mut frames = Vec::with_capacity(batch.len().min(OUT_FRAMES));
        for datagram in batch.iter() {
            if frames.len() == OUT_FRAMES {
                let full = std::mem::replace(&mut frames, Vec::with_capacity(OUT_FRAMES));
                if out.send(full).is_err() {
                    break 'recv; // the store stopped
                }
            }
            let Some(frame) = verifier.admit(datagram) else {
                continue;
            };
            match frame.body {
                Body::Shard(s) => frames.push(Inbound::Shard(ShardIn::from(&s))),
                Body::ObjectHeader(h) => frames.push(Inbound::Header(h)),
                Body::Heartbeat(h) => {
                    let status = SenderStatus {
                        received_at_ms: now_ms(),
                        uptime_s: h.uptime_s,
                        queued_objects: h.queued_objects,
                        pass: h.pass,
                        config_fingerprint: h.config_fingerprint,
                        sent_frames: h.sent_frames,
                        session_id: frame.header.session_id,
                        ledger: h.ledger,
                    };
                    *sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                }
            }
        }
        if last_loss.elapsed() >= LOSS_EVERY {
            verifier.publish_loss();
            last_loss = Instant::now();
        }
        if !frames.is_empty() && out.send(frames).is_err() {
            break; // the store stopped
        }
    }
    verifier.publish_loss();
}
