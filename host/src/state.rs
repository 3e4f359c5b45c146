//! The sled database of a gateway and its one commit point.
//!
//! [`StateDb::commit`] is the rule both gateways use: flush sled, then
//! fsync every file below the database directory and the directories that
//! name them. Why every file: sled 0.34's `flush()` ends in
//! `sync_file_range` on its log (`db`), which survives a killed process but
//! not a power cut (no fsync, so neither the file's size nor the disk's
//! cache is settled); and sled writes more than its log: `conf` at
//! creation and one file under `blobs/` for every large value, neither of
//! them fsynced, nor the directories that name them. Syncing `db` alone
//! would let a power cut take a large record, or a database created
//! just before, while the log still points at it. Files with nothing
//! dirty cost next to nothing to fsync, so syncing the whole tree is not
//! wasteful.

use std::path::{Path, PathBuf};

use crate::crash::crash_point;
use crate::durable::fsync_tree;

/// Page cache sled may keep: the gateways' metadata is small, and the
/// default (1 GiB) would defeat the flat-memory goal.
const SLED_CACHE_BYTES: u64 = 8 << 20;
/// How long opening waits for a lock held by a database closing in this
/// process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: another process holds it (is the gateway running?)")]
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

/// A gateway's sled database (`state_dir/db`).
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

    /// The database itself, for ids and transactions across trees.
    pub fn sled(&self) -> &sled::Db {
        &self.db
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

    /// The commit point: makes every change applied so far durable against
    /// power loss (see the module doc for why every file is synced). `point`
    /// names it as a [`crash_point`], passed once the commit is durable.
    pub fn commit(&self, point: &'static str) -> Result<(), StateError> {
        self.db.flush().map_err(|e| self.sled_error(e))?;
        fsync_tree(&self.path).map_err(|source| StateError::Io {
            path: self.path.clone(),
            what: "fsync of the database files",
            source,
        })?;
        crash_point(point);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_is_told_the_gateway_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        db.tree("t").unwrap().insert(b"k", b"v").unwrap();
        db.commit("test").unwrap();
        let err = StateDb::open(&dir.path().join("db")).err().unwrap();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        drop(db);
        let again = StateDb::open(&dir.path().join("db")).unwrap();
        assert_eq!(
            again.tree("t").unwrap().get(b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }

    #[test]
    fn a_commit_syncs_a_large_value_kept_beside_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("db")).unwrap();
        // Large values go to files of their own under blobs/.
        let big = vec![7u8; 256 << 10];
        db.tree("t").unwrap().insert(b"big", big.clone()).unwrap();
        db.commit("test").unwrap();
        drop(db);
        let again = StateDb::open(&dir.path().join("db")).unwrap();
        assert_eq!(
            again.tree("t").unwrap().get(b"big").unwrap().as_deref(),
            Some(&big[..])
        );
    }
}
