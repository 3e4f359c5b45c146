//! Serial link: frames on a tty, COBS-framed (see
//! [`weir_proto::framing::stream`]) and paced to the line's rate
//! ([`weir_proto::pacing::LinePacer`]).
//!
//! Blocking I/O through the `serialport` crate (the crate `tokio-serial`
//! wraps): link ends run on threads of their own, so an async runtime would
//! add nothing. A pseudo-terminal ignores the baud rate and blocks a writer
//! that runs ahead, but a real one-way line drops what arrives too fast, so
//! the sink paces itself to 8N1 line time whatever the device does.

use super::{FrameBatch, FrameSink, FrameSource, LinkError};
use serialport::{SerialPort, TTYPort};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use weir_proto::framing::stream::{encode_frame, max_encoded_len, StreamDecoder, StreamStats};
use weir_proto::pacing::LinePacer;

/// How long a write may make no progress before the sink reports the line
/// stuck (only a device with flow control, like a pty, can block at all).
const WRITE_STALL: Duration = Duration::from_secs(10);
/// Bytes read from the device per system call.
const READ_CHUNK: usize = 4096;

fn open_port(device: &Path, baud: u32) -> Result<TTYPort, LinkError> {
    let what = || format!("opening serial device {}", device.display());
    if baud == 0 {
        return Err(LinkError::io(
            what(),
            std::io::Error::new(ErrorKind::InvalidInput, "baud rate must be above 0"),
        ));
    }
    let name = device.to_str().ok_or_else(|| {
        LinkError::io(
            what(),
            std::io::Error::new(ErrorKind::InvalidInput, "device path is not UTF-8"),
        )
    })?;
    serialport::new(name, baud)
        .timeout(WRITE_STALL)
        .open_native()
        .map_err(|e| LinkError::io(what(), e.into()))
}

/// The sending end on a serial device.
pub struct SerialSink {
    port: TTYPort,
    device: PathBuf,
    max_frame: usize,
    pacer: LinePacer,
    encoded: Vec<u8>,
    bytes_sent: u64,
}

impl SerialSink {
    /// Opens `device` at `baud` (8N1, no flow control) for frames of at most
    /// `max_frame` bytes.
    pub fn open(device: &Path, baud: u32, max_frame: usize) -> Result<Self, LinkError> {
        let port = open_port(device, baud)?;
        tracing::info!(
            device = %device.display(),
            baud,
            bytes_per_sec = baud / 10,
            "serial link sink open"
        );
        Ok(SerialSink {
            port,
            device: device.to_path_buf(),
            max_frame,
            pacer: LinePacer::for_baud(baud, Instant::now()),
            encoded: Vec::with_capacity(max_encoded_len(max_frame)),
            bytes_sent: 0,
        })
    }

    /// Line bytes per second the sink keeps to.
    pub fn line_rate(&self) -> u64 {
        self.pacer.bytes_per_sec()
    }

    /// Bytes put on the line so far, framing included.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    fn write_paced(&mut self) -> Result<(), LinkError> {
        let burst = self.pacer.burst();
        let mut at = 0;
        while at < self.encoded.len() {
            let end = (at + burst).min(self.encoded.len());
            let wait = self.pacer.reserve(end - at, Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            self.port.write_all(&self.encoded[at..end]).map_err(|e| {
                LinkError::io(
                    format!("writing to serial device {}", self.device.display()),
                    e,
                )
            })?;
            self.bytes_sent += (end - at) as u64;
            at = end;
        }
        Ok(())
    }
}

impl FrameSink for SerialSink {
    fn send(&mut self, frames: &[&[u8]]) -> Result<(), LinkError> {
        if let Some(f) = frames.iter().find(|f| f.len() > self.max_frame) {
            return Err(LinkError::FrameTooLarge {
                len: f.len(),
                max: self.max_frame,
            });
        }
        for f in frames {
            self.encoded.clear();
            encode_frame(f, &mut self.encoded);
            self.write_paced()?;
        }
        Ok(())
    }

    fn max_frame_len(&self) -> usize {
        self.max_frame
    }
}

/// The receiving end on a serial device.
pub struct SerialSource {
    port: TTYPort,
    device: PathBuf,
    decoder: StreamDecoder,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    too_large_for_batch: u64,
}

impl SerialSource {
    /// Opens `device` at `baud` (8N1) for frames of at most `max_frame` bytes.
    pub fn open(device: &Path, baud: u32, max_frame: usize) -> Result<Self, LinkError> {
        let port = open_port(device, baud)?;
        tracing::info!(device = %device.display(), baud, "serial link source open");
        Ok(SerialSource {
            port,
            device: device.to_path_buf(),
            decoder: StreamDecoder::new(max_frame),
            rx: vec![0; READ_CHUNK].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            too_large_for_batch: 0,
        })
    }

    /// What the framing layer passed up and threw away so far.
    pub fn stats(&self) -> StreamStats {
        self.decoder.stats()
    }

    /// Frames dropped because they exceeded the caller's batch slots.
    pub fn too_large_for_batch(&self) -> u64 {
        self.too_large_for_batch
    }

    /// Decodes buffered bytes into `batch` until either runs out.
    fn drain_into(&mut self, batch: &mut FrameBatch) {
        while self.rx_start < self.rx_end && batch.len() < batch.capacity() {
            let mut input = &self.rx[self.rx_start..self.rx_end];
            let before = input.len();
            if let Some(frame) = self.decoder.next_frame(&mut input) {
                if !batch.push(frame) {
                    self.too_large_for_batch += 1;
                }
            }
            self.rx_start += before - input.len();
        }
    }
}

impl FrameSource for SerialSource {
    fn recv(&mut self, batch: &mut FrameBatch, timeout: Duration) -> Result<(), LinkError> {
        batch.clear();
        let deadline = Instant::now() + timeout;
        loop {
            self.drain_into(batch);
            if batch.len() == batch.capacity() {
                return Ok(());
            }
            // Wait for the first frame; after that, take only what is
            // already there.
            let wait = if batch.is_empty() {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if wait.is_zero() && batch.is_empty() {
                return Ok(());
            }
            self.port.set_timeout(wait).map_err(|e| {
                LinkError::io(
                    format!("setting timeout on serial device {}", self.device.display()),
                    e.into(),
                )
            })?;
            match self.port.read(&mut self.rx) {
                Ok(0) => {
                    return Err(LinkError::io(
                        format!("reading serial device {}", self.device.display()),
                        std::io::Error::new(ErrorKind::UnexpectedEof, "device closed"),
                    ))
                }
                Ok(n) => {
                    self.rx_start = 0;
                    self.rx_end = n;
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(LinkError::io(
                        format!("reading serial device {}", self.device.display()),
                        e,
                    ))
                }
            }
        }
    }
}
