//! Key files: the secret as hex, readable by its owner only.
//!
//! Whitespace (including newlines) in the file is ignored so operators can
//! wrap long keys. The key itself, once read, is `weir_proto::Key`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use weir_proto::auth::MIN_KEY_BYTES;
use weir_proto::{Key, KeyError};

/// Why a key file was refused; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path}: not hex ({reason})")]
    NotHex { path: PathBuf, reason: String },
    #[error("key file {path}: {len} bytes, at least {MIN_KEY_BYTES} are required")]
    TooShort { path: PathBuf, len: usize },
    #[error("key file {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
}

/// Reads the hex key file at `path` as key `id`; refuses short keys and
/// files open to group or others.
pub fn load_key(id: u16, path: &Path) -> Result<Key, KeyFileError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let secret = hex::decode(&compact).map_err(|e| KeyFileError::NotHex {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if secret.len() < MIN_KEY_BYTES {
        return Err(KeyFileError::TooShort {
            path: path.to_path_buf(),
            len: secret.len(),
        });
    }
    Key::from_bytes(id, &secret).map_err(|source| KeyFileError::Key {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn loads_hex_with_whitespace() {
        let dir = tempfile::tempdir().unwrap();
        let hex64 = "00112233445566778899aabbccddeeff".repeat(2);
        let text = format!("{}\n  {}\n", &hex64[..32], &hex64[32..]);
        let p = write_key(dir.path(), "k", &text, 0o600);
        let k = load_key(7, &p).unwrap();
        assert_eq!(k.id(), 7);
        let same = Key::from_bytes(7, &hex::decode(&hex64).unwrap()).unwrap();
        assert_eq!(k.fingerprint(), same.fingerprint());
    }

    #[test]
    fn refuses_short_key_naming_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_key(dir.path(), "short.key", &"ab".repeat(31), 0o600);
        let err = load_key(1, &p).unwrap_err().to_string();
        assert!(
            err.contains("short.key") && err.contains("31 bytes"),
            "{err}"
        );
    }

    #[test]
    fn refuses_group_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_key(dir.path(), "open.key", &"ab".repeat(32), 0o640);
        let err = load_key(1, &p).unwrap_err().to_string();
        assert!(
            err.contains("open.key") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn refuses_non_hex() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_key(dir.path(), "bad.key", &"zz".repeat(32), 0o600);
        assert!(matches!(load_key(1, &p), Err(KeyFileError::NotHex { .. })));
    }
}
