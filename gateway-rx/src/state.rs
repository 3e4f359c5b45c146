//! The receiver's sled database and its commit point.
//!
//! sled 0.34's `flush()` ends in `sync_file_range`, which survives a killed
//! process but not a power cut; [`StateDb::commit`] adds the fsync.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Page cache sled may keep: the receiver's metadata is small, and the
/// default (1 GiB) would defeat the flat-memory goal.
const SLED_CACHE_BYTES: u64 = 8 << 20;
/// How long opening waits for a lock held by a database closing in this
/// process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: another process holds it (is gateway-rx running?)")]
    Locked { path: PathBuf },
    #[error("state database {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("state database {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("state database {path}: record {key} does not decode: {reason}")]
    Corrupt {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// The sled database under `state_dir/db`.
#[derive(Clone)]
pub struct StateDb {
    db: sled::Db,
    path: PathBuf,
}

impl StateDb {
    /// Opens (creating) the database at `path`; a lock still held by a
    /// database closing in this process is waited for, briefly.
    pub fn open(path: &Path) -> Result<StateDb, StateError> {
        Self::open_waiting(path, LOCK_WAIT)
    }

    /// Opens without waiting for a held lock (to learn whether a gateway
    /// runs).
    pub fn open_now(path: &Path) -> Result<StateDb, StateError> {
        Self::open_waiting(path, std::time::Duration::ZERO)
    }

    fn open_waiting(path: &Path, wait: std::time::Duration) -> Result<StateDb, StateError> {
        std::fs::create_dir_all(path).map_err(|source| StateError::Io {
            path: path.to_path_buf(),
            what: "creating directory",
            source,
        })?;
        // A database dropped in this process a moment ago may still be
        // held by sled's flusher thread: wait briefly for it before saying
        // that another gateway holds it.
        let deadline = std::time::Instant::now() + wait;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(SLED_CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                // sled reports a held lock only in its message.
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StateError::Locked {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(StateError::Sled {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        Ok(StateDb {
            db,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tree(&self, name: &str) -> Result<sled::Tree, StateError> {
        self.db.open_tree(name).map_err(|e| self.sled_error(e))
    }

    pub fn sled_error(&self, source: sled::Error) -> StateError {
        StateError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    pub fn corrupt(&self, key: impl Into<String>, reason: impl ToString) -> StateError {
        StateError::Corrupt {
            path: self.path.clone(),
            key: key.into(),
            reason: reason.to_string(),
        }
    }

    /// Makes every change applied so far durable against power loss.
    pub fn commit(&self) -> Result<(), StateError> {
        self.db.flush().map_err(|e| self.sled_error(e))?;
        let io = |what, source| StateError::Io {
            path: self.path.clone(),
            what,
            source,
        };
        File::open(self.path.join("db"))
            .and_then(|f| f.sync_all())
            .map_err(|e| io("fsync of the db file", e))?;
        fsync_dir(&self.path).map_err(|e| io("fsync of the directory", e))
    }
}

/// fsyncs a directory, so that names created or renamed in it survive a power cut.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_is_told_the_gateway_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        db.tree("t").unwrap().insert(b"k", b"v").unwrap();
        db.commit().unwrap();
        let err = StateDb::open(&dir.path().join("db")).err().unwrap();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        drop(db);
        let again = StateDb::open(&dir.path().join("db")).unwrap();
        assert_eq!(
            again.tree("t").unwrap().get(b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
}
