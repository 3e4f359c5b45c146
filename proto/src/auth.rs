//! Keys: an HMAC key from its secret bytes, and the receiver's key set.
//!
//! Reading key files is the host's business (`weir_host::keys`). Keys
//! rotate without a back channel: the sender signs with one key id, the
//! receiver accepts any id in its ring, so a new key is provisioned on the
//! receiver first.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use weir_kernels::HmacKey;

/// Shortest secret accepted, in bytes (HMAC-SHA256's block of security).
pub const MIN_KEY_BYTES: usize = 32;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Why a key was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key {origin}: {len} bytes, at least {MIN_KEY_BYTES} are required")]
    TooShort { origin: String, len: usize },
    #[error("key id {0} appears twice in the key set")]
    DuplicateId(u16),
}

/// One HMAC key with its id.
#[derive(Clone)]
pub struct Key {
    id: u16,
    /// HMAC state already keyed, for tags computed piece by piece (reports).
    mac: HmacSha256,
    /// The same key for frames: pads compressed once, many frames at a time.
    frames: HmacKey,
    fingerprint: [u8; 8],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Key").field("id", &self.id).finish()
    }
}

impl Key {
    /// A key from its secret bytes; refuses secrets shorter than
    /// [`MIN_KEY_BYTES`].
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
            frames: HmacKey::new(secret),
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

    /// HMAC-SHA256 of one message.
    pub(crate) fn tag(&self, message: &[u8]) -> [u8; 32] {
        self.frames.tag(message)
    }

    /// HMAC-SHA256 of many messages: `tags[i]` for `messages[i]`.
    pub(crate) fn tags(&self, messages: &[&[u8]], tags: &mut [[u8; 32]]) {
        self.frames.tag_many(messages, tags)
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

    /// The id of a key in the ring with `key`'s secret, whatever its id.
    pub fn id_with_secret_of(&self, key: &Key) -> Option<u16> {
        self.keys
            .iter()
            .find(|k| k.fingerprint == key.fingerprint)
            .map(Key::id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_found_in_the_ring_under_any_id() {
        let ring = KeyRing::new(vec![
            Key::from_bytes(1, &[1; 32]).unwrap(),
            Key::from_bytes(2, &[2; 32]).unwrap(),
        ])
        .unwrap();
        let same = Key::from_bytes(0, &[2; 32]).unwrap();
        assert_eq!(ring.id_with_secret_of(&same), Some(2));
        let other = Key::from_bytes(2, &[3; 32]).unwrap();
        assert_eq!(ring.id_with_secret_of(&other), None);
    }

    #[test]
    fn refuses_short_secret() {
        assert!(matches!(
            Key::from_bytes(4, &[1; 31]),
            Err(KeyError::TooShort { len: 31, .. })
        ));
    }

    #[test]
    fn frame_tags_are_the_streamed_macs() {
        let key = Key::from_bytes(3, &[0x42; 40]).unwrap();
        let msgs: Vec<Vec<u8>> = (0..40).map(|n| vec![n as u8; n * 37]).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        let mut tags = vec![[0u8; 32]; msgs.len()];
        key.tags(&refs, &mut tags);
        for (m, t) in msgs.iter().zip(&tags) {
            let mut mac = key.mac();
            mac.update(m);
            let want: [u8; 32] = mac.finalize().into_bytes().into();
            assert_eq!(*t, want);
            assert_eq!(key.tag(m), want);
        }
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
