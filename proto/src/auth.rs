//! Keys: loading key files and holding the receiver's key set.
//!
//! A key file holds the secret as hex; whitespace (including newlines) is
//! ignored so operators can wrap long keys. Keys rotate without a back
//! channel: the sender signs with one key id, the receiver accepts any id in
//! its ring, so a new key is provisioned on the receiver first.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::{Path, PathBuf};

/// Shortest secret accepted, in bytes (HMAC-SHA256's block of security).
pub const MIN_KEY_BYTES: usize = 32;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Why a key was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
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
    #[error("key {origin}: {len} bytes, at least {MIN_KEY_BYTES} are required")]
    TooShort { origin: String, len: usize },
    #[error("key id {0} appears twice in the key set")]
    DuplicateId(u16),
}

/// One HMAC key with its id.
#[derive(Clone)]
pub struct Key {
    id: u16,
    /// HMAC state already keyed, cloned per frame (saves two compressions).
    mac: HmacSha256,
    fingerprint: [u8; 8],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Key").field("id", &self.id).finish()
    }
}

impl Key {
    /// Reads a hex key file; refuses short keys and files open to group/others.
    pub fn load(id: u16, path: &Path) -> Result<Key, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let secret = hex::decode(&compact).map_err(|e| KeyError::NotHex {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                origin: format!("file {}", path.display()),
                len: secret.len(),
            });
        }
        Ok(Self::build(id, &secret))
    }

    /// A key from raw secret bytes (tests, tools).
    pub fn from_bytes(id: u16, secret: &[u8]) -> Result<Key, KeyError> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                origin: format!("id {id}"),
                len: secret.len(),
            });
        }
        Ok(Self::build(id, secret))
    }

    fn build(id: u16, secret: &[u8]) -> Key {
        // HMAC accepts keys of any length; the length was checked above.
        let mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
        let mut fp = mac.clone();
        fp.update(b"weir key fingerprint");
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&fp.finalize().into_bytes()[..8]);
        Key {
            id,
            mac,
            fingerprint,
        }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    /// A short value derived from the key that reveals nothing of it: lets two
    /// sides compare configuration without showing the secret.
    pub fn fingerprint(&self) -> [u8; 8] {
        self.fingerprint
    }

    pub(crate) fn mac(&self) -> HmacSha256 {
        self.mac.clone()
    }
}

/// The keys a receiver accepts, by id.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: Vec<Key>,
}

impl KeyRing {
    /// Refuses two keys with one id: which one signs would be ambiguous.
    pub fn new(keys: Vec<Key>) -> Result<Self, KeyError> {
        let mut ids: Vec<u16> = keys.iter().map(Key::id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(KeyError::DuplicateId(w[0]));
        }
        Ok(KeyRing { keys })
    }

    pub fn get(&self, id: u16) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn ids(&self) -> Vec<u16> {
        self.keys.iter().map(Key::id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
        let k = Key::load(7, &p).unwrap();
        assert_eq!(k.id(), 7);
        let same = Key::from_bytes(7, &hex::decode(&hex64).unwrap()).unwrap();
        assert_eq!(k.fingerprint(), same.fingerprint());
    }

    #[test]
    fn refuses_short_key_naming_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_key(dir.path(), "short.key", &"ab".repeat(31), 0o600);
        let err = Key::load(1, &p).unwrap_err().to_string();
        assert!(
            err.contains("short.key") && err.contains("31 bytes"),
            "{err}"
        );
    }

    #[test]
    fn refuses_group_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_key(dir.path(), "open.key", &"ab".repeat(32), 0o640);
        let err = Key::load(1, &p).unwrap_err().to_string();
        assert!(
            err.contains("open.key") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn refuses_non_hex() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_key(dir.path(), "bad.key", &"zz".repeat(32), 0o600);
        assert!(matches!(Key::load(1, &p), Err(KeyError::NotHex { .. })));
    }

    #[test]
    fn ring_refuses_duplicate_ids() {
        let a = Key::from_bytes(1, &[1; 32]).unwrap();
        let b = Key::from_bytes(1, &[2; 32]).unwrap();
        assert!(matches!(
            KeyRing::new(vec![a, b]),
            Err(KeyError::DuplicateId(1))
        ));
    }
}
