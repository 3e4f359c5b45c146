//! Waking intake as soon as a drop lands: inotify on the spool directory
//! (a rename into place is `IN_MOVED_TO`, a file written in place
//! `IN_CLOSE_WRITE`), with the periodic listing kept as the fallback for
//! whatever inotify cannot tell (its queue overflowing, a file system that
//! does not support it).

use std::path::Path;
use std::time::{Duration, Instant};
use weir_host::Shutdown;

/// How often the watch looks at inotify's queue while it waits: the
/// latency a drop sees at most, at no cost worth counting.
const SLICE: Duration = Duration::from_millis(20);

/// Waits for something to land in the spool.
pub struct SpoolWatch {
    inotify: Option<inotify::Inotify>,
    buffer: Vec<u8>,
}

impl SpoolWatch {
    /// Watches `dir`; without inotify the watch only waits out the period.
    pub fn new(dir: &Path) -> SpoolWatch {
        let watched = inotify::Inotify::init().and_then(|i| {
            i.watches().add(
                dir,
                inotify::WatchMask::MOVED_TO | inotify::WatchMask::CLOSE_WRITE,
            )?;
            Ok(i)
        });
        let inotify = match watched {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(spool = %dir.display(), error = %e,
                    "inotify unavailable; the spool is only listed periodically");
                None
            }
        };
        SpoolWatch {
            inotify,
            buffer: vec![0u8; 4096],
        }
    }

    /// Returns when a file was renamed or written into the spool, when
    /// `period` has passed, or at shutdown (then true).
    pub fn wait(&mut self, period: Duration, shutdown: &Shutdown) -> bool {
        let Some(inotify) = self.inotify.as_mut() else {
            return shutdown.sleep(period);
        };
        let deadline = Instant::now() + period;
        loop {
            match inotify.read_events(&mut self.buffer) {
                // Names starting with '.' or ending in ".partial" are
                // being written: they do not wake intake.
                Ok(events) => {
                    let landed = events.into_iter().any(|e| {
                        e.name
                            .and_then(|n| n.to_str())
                            .is_some_and(super::is_drop_name)
                    });
                    if landed {
                        return shutdown.is_triggered();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::warn!(error = %e, "inotify failed; the spool is only listed periodically");
                    self.inotify = None;
                    return shutdown.sleep(deadline.saturating_duration_since(Instant::now()));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return shutdown.is_triggered();
            }
            if shutdown.sleep(left.min(SLICE)) {
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_renamed_into_place_wakes_the_watch_long_before_the_period() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = SpoolWatch::new(dir.path());
        let shutdown = Shutdown::new();
        let path = dir.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(path.join("img.tar.partial"), b"x").unwrap();
            std::fs::rename(path.join("img.tar.partial"), path.join("img.tar")).unwrap();
        });
        let started = Instant::now();
        assert!(!watch.wait(Duration::from_secs(30), &shutdown));
        writer.join().unwrap();
        // Woken by the rename, not by the 30 s period.
        assert!(started.elapsed() < Duration::from_secs(29));
    }

    #[test]
    fn a_partial_file_does_not_wake_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = SpoolWatch::new(dir.path());
        std::fs::write(dir.path().join("img.tar.partial"), b"x").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        let started = Instant::now();
        assert!(!watch.wait(Duration::from_millis(300), &Shutdown::new()));
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
