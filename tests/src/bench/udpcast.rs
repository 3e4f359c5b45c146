//! The reference: udpcast (Debian package `udpcast`) moving the same file
//! one way, `udp-sender --async --fec 8x8` to `udp-receiver` on loopback.
//!
//! In async mode the receiver must be listening first and aborts at the
//! first slice its FEC cannot repair, leaving a short file; the sender never
//! knows. So each attempt is checked (size and sha256 of the output), and
//! attempts go down a ladder of `--max-bitrate` caps until one delivers the
//! file whole: udpcast's figure is its best intact run.
//!
//! Timing: from the first byte udp-receiver writes to the moment the output
//! reaches the full size (polled every 5 ms). The first slice (about 1.5 MB)
//! arrives before the first write, so this slightly favours udpcast.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One udpcast attempt that delivered the file intact.
#[derive(Debug, Clone)]
pub struct UdpcastRun {
    /// `--max-bitrate` given, None: uncapped.
    pub max_bitrate: Option<&'static str>,
    pub bytes: u64,
    pub seconds: f64,
    /// Attempts that lost data, with the cap they ran at.
    pub failed: Vec<String>,
}

impl UdpcastRun {
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }
}

pub fn available() -> bool {
    Command::new("udp-sender")
        .arg("--license")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// An even port P with P and P+1 free on loopback (udpcast's portbase).
fn free_portbase() -> Result<u16> {
    for _ in 0..50 {
        let a = UdpSocket::bind("127.0.0.1:0").context("probing a UDP port")?;
        let p = a.local_addr()?.port() & !1;
        if p < 1024 {
            continue;
        }
        drop(a);
        let both = UdpSocket::bind(("0.0.0.0", p))
            .and_then(|x| UdpSocket::bind(("0.0.0.0", p + 1)).map(|y| (x, y)));
        if both.is_ok() {
            return Ok(p);
        }
    }
    bail!("no free even UDP port pair for udpcast")
}

/// Whether a UDP socket (any address) is bound to `port` or `port + 1`.
fn udp_port_bound(port: u16) -> bool {
    let ports = [format!(":{port:04X}"), format!(":{:04X}", port + 1)];
    ["/proc/net/udp", "/proc/net/udp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|t| {
            t.lines().skip(1).any(|row| {
                row.split_whitespace()
                    .nth(1)
                    .is_some_and(|local| ports.iter().any(|p| local.ends_with(p.as_str())))
            })
        })
    })
}

/// The sha256 (hex) of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One attempt; Ok(None) when the receiver lost data.
fn attempt(
    file: &Path,
    out: &Path,
    log_dir: &Path,
    cap: Option<&str>,
    timeout: Duration,
) -> Result<Option<f64>> {
    let total = std::fs::metadata(file)?.len();
    let _ = std::fs::remove_file(out);
    let port_base = free_portbase()?;
    let port = port_base.to_string();
    let log = |n: &str| std::fs::File::create(log_dir.join(n)).context("creating a udpcast log");
    let receiver = Command::new("udp-receiver")
        .args([
            "--interface",
            "lo",
            "--nokbd",
            "--portbase",
            &port,
            "--start-timeout",
            "30",
            "--receive-timeout",
            "5",
            "--file",
        ])
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log("udp-receiver.log")?)
        .spawn()
        .context("starting udp-receiver")?;
    let mut receiver = Killed(receiver);
    // The sender starts without waiting for receivers (--async): start it
    // once the receiver has its sockets, or after 5 s on a machine whose
    // table says nothing.
    let bound_by = Instant::now() + Duration::from_secs(5);
    while !udp_port_bound(port_base) && Instant::now() < bound_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut sender_cmd = Command::new("udp-sender");
    sender_cmd
        .args([
            "--interface",
            "lo",
            "--async",
            "--fec",
            "8x8",
            "--nokbd",
            "--autostart",
            "2",
            "--portbase",
            &port,
        ])
        .arg("--file")
        .arg(file);
    if let Some(c) = cap {
        sender_cmd.args(["--max-bitrate", c]);
    }
    let sender = sender_cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log("udp-sender.log")?)
        .spawn()
        .context("starting udp-sender")?;
    let mut sender = Killed(sender);

    let deadline = Instant::now() + timeout;
    let mut first: Option<Instant> = None;
    let full = loop {
        let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        if size > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if size >= total {
            break Some(Instant::now());
        }
        if receiver.0.try_wait()?.is_some() || Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Let both finish on their own (the receiver waits for the end marker).
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end
        && (sender.0.try_wait()?.is_none() || receiver.0.try_wait()?.is_none())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (Some(first), Some(full)) = (first, full) else {
        return Ok(None);
    };
    if sha256_file(out)? != sha256_file(file)? {
        return Ok(None);
    }
    Ok(Some((full - first).as_secs_f64()))
}

/// `--max-bitrate` caps tried in turn; None: uncapped.
pub const LADDER: [Option<&str>; 5] = [
    None,
    Some("3000m"),
    Some("2000m"),
    Some("1000m"),
    Some("500m"),
];

/// Runs down `ladder` until one attempt delivers `file` intact.
pub fn best_run(
    file: &Path,
    work: &Path,
    timeout: Duration,
    ladder: &[Option<&'static str>],
) -> Result<UdpcastRun> {
    let out = work.join("udpcast.out");
    let mut failed = Vec::new();
    for &cap in ladder {
        match attempt(file, &out, work, cap, timeout)? {
            Some(seconds) => {
                let _ = std::fs::remove_file(&out);
                return Ok(UdpcastRun {
                    max_bitrate: cap,
                    bytes: std::fs::metadata(file)?.len(),
                    seconds,
                    failed,
                });
            }
            None => failed.push(cap.unwrap_or("uncapped").to_string()),
        }
    }
    let _ = std::fs::remove_file(&out);
    let tail = std::fs::read_to_string(work.join("udp-receiver.log")).unwrap_or_default();
    let tail: String = tail
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    bail!(
        "udpcast lost data at every cap tried ({}); receiver log ends: {tail}",
        failed.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udpcast_delivers_a_small_file_whole_and_times_it() {
        if !available() {
            eprintln!("udpcast not installed: apt-get install udpcast (skipping)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("in.bin");
        // Not a multiple of udpcast's 1456-byte block: the tail must arrive too.
        let data: Vec<u8> = (0..3_000_001u32)
            .map(|i| (i * 7 + i / 1000) as u8)
            .collect();
        std::fs::write(&file, &data).unwrap();
        // Capped: with the default socket buffers an uncapped sender
        // overruns udp-receiver even on a small file.
        let run = best_run(&file, dir.path(), Duration::from_secs(30), &[Some("100m")]).unwrap();
        assert_eq!(run.bytes, data.len() as u64);
        assert!(
            run.seconds > 0.0 && run.bytes_per_s().is_finite(),
            "{run:?}"
        );
    }
}
