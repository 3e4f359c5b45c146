//! Pseudo-terminal pairs from `socat`, for the serial-line and console
//! tests: two connected ptys whose ends are symlinks in a directory.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools;

/// True when socat is on `PATH`; prints how to get it otherwise, so a test
/// can skip. Panics (fails the test) when it is missing under `CI=true`.
pub fn have_socat() -> bool {
    tools::or_skip(tools::SOCAT).is_some()
}

/// Two connected ptys, `a` and `b` (symlinks in `dir`), held open by a
/// socat process that is killed on drop.
pub struct PtyPair {
    pub a: PathBuf,
    pub b: PathBuf,
    socat: Child,
}

impl PtyPair {
    pub fn new(dir: &Path, name: &str) -> Result<PtyPair> {
        let a = dir.join(format!("{name}-a"));
        let b = dir.join(format!("{name}-b"));
        // A killed socat leaves its links; a stale one could name a pty
        // number the kernel hands out again.
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        let socat = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running socat")?;
        let pair = PtyPair { a, b, socat };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(pair.a.exists() && pair.b.exists()) {
            if Instant::now() > deadline {
                bail!("socat did not create the {name} ptys within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(pair)
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.socat.kill();
        let _ = self.socat.wait();
    }
}

/// Opens a pty end raw (8N1, no flow control), with a read timeout.
///
/// serialport takes an exclusive flock. A child that another test forks
/// while an earlier holder of this end had it open keeps that lock until
/// its exec, so an open that finds the end locked tries again for a while.
pub fn open_raw(path: &Path, timeout: Duration) -> Result<serialport::TTYPort> {
    let name = path.to_str().context("pty path is not UTF-8")?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match serialport::new(name, 115_200)
            .timeout(timeout)
            .open_native()
        {
            Err(e) if e.kind() == serialport::ErrorKind::NoDevice && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r.with_context(|| format!("opening {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read, Write};

    #[test]
    fn bytes_written_to_one_end_come_out_of_the_other() -> Result<()> {
        if !have_socat() {
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let pair = PtyPair::new(dir.path(), "p")?;
        let mut a = open_raw(&pair.a, Duration::from_secs(5))?;
        let mut b = open_raw(&pair.b, Duration::from_millis(200))?;
        a.write_all(b"weir\x00\xff")?;
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 6 && Instant::now() < deadline {
            match b.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                Err(e) => return Err(e.into()),
            }
        }
        assert_eq!(got, b"weir\x00\xff");
        Ok(())
    }
}
