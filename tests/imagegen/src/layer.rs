//! Layer tars of seeded random bytes, generated in chunks while hashed.

use std::io::{self, Read, Write};

use flate2::write::GzEncoder;
use flate2::Compression;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::FIXED_MTIME;

/// Largest file inside a layer tar: bigger layers are split into parts so
/// every entry stays far below the 8 GiB limit of an octal tar size field.
const MAX_PART: u64 = 1 << 30;

/// How a layer blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerCompression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`
    #[default]
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar`: blob digest = diff id.
    None,
}

impl LayerCompression {
    pub fn oci_media_type(self) -> &'static str {
        match self {
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// What a layer holds: its random stream is a function of `key` only, so
/// the same key gives the same bytes in every image and archive format.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LayerContent {
    pub key: [u8; 32],
    /// File name stem inside the layer (`weir/<stem>.bin`).
    pub stem: String,
    pub size: u64,
}

impl LayerContent {
    /// `scope` separates platforms of a multi-arch image; layers of the same
    /// seed, scope, index and size are identical across images.
    pub fn new(seed: u64, scope: &str, index: usize, size: u64, stem: String) -> Self {
        let mut h = Sha256::new();
        h.update(b"weir-imagegen layer v1\0");
        h.update(seed.to_le_bytes());
        h.update(scope.as_bytes());
        h.update([0]);
        h.update((index as u64).to_le_bytes());
        h.update(size.to_le_bytes());
        Self {
            key: h.finalize().into(),
            stem,
            size,
        }
    }
}

/// A finished blob: digest and length of the bytes as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hashed {
    pub digest: String,
    pub len: u64,
}

/// A layer as stored: uncompressed tar digest (diff id) and blob digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerBlob {
    pub diff_id: String,
    pub blob: Hashed,
    pub compression: LayerCompression,
}

/// Writes through to `inner` and hashes what was accepted.
pub(crate) struct DigestingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> DigestingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    pub fn finish(self) -> (W, Hashed) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (
            self.inner,
            Hashed {
                digest,
                len: self.len,
            },
        )
    }
}

impl<W: Write> Write for DigestingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `len` bytes of a ChaCha8 stream: the layer's file content.
struct RandomBytes {
    rng: ChaCha8Rng,
    remaining: u64,
}

impl Read for RandomBytes {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        self.rng.fill_bytes(&mut buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Streams the layer tar of `content` into `out`, compressed as asked, and
/// returns its digests. Memory use is a few buffers whatever the size.
pub(crate) fn write_layer(
    content: &LayerContent,
    compression: LayerCompression,
    out: &mut dyn Write,
) -> io::Result<LayerBlob> {
    let stored = DigestingWriter::new(out);
    match compression {
        LayerCompression::None => {
            let (stored, tar_hash) = write_tar(content, stored)?;
            let (_, blob) = stored.finish();
            debug_assert_eq!(blob, tar_hash);
            Ok(LayerBlob {
                diff_id: tar_hash.digest,
                blob,
                compression,
            })
        }
        LayerCompression::Gzip => {
            // Fast level: the bytes are random, so a higher level only costs
            // time. The gzip header carries mtime 0, so output is stable.
            let gz = GzEncoder::new(stored, Compression::fast());
            let (gz, tar_hash) = write_tar(content, gz)?;
            let (_, blob) = gz.finish()?.finish();
            Ok(LayerBlob {
                diff_id: tar_hash.digest,
                blob,
                compression,
            })
        }
    }
}

fn write_tar<W: Write>(content: &LayerContent, out: W) -> io::Result<(W, Hashed)> {
    let mut tar = tar::Builder::new(DigestingWriter::new(out));
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_mtime(FIXED_MTIME);
    dir.set_size(0);
    tar.append_data(&mut dir, "weir/", io::empty())?;

    let mut rng = ChaCha8Rng::from_seed(content.key);
    let parts = content.size.div_ceil(MAX_PART).max(1);
    for part in 0..parts {
        let len = (content.size - part * MAX_PART).min(MAX_PART);
        let name = if parts == 1 {
            format!("weir/{}.bin", content.stem)
        } else {
            format!("weir/{}.part{part}.bin", content.stem)
        };
        let mut file = tar::Header::new_ustar();
        file.set_entry_type(tar::EntryType::Regular);
        file.set_mode(0o644);
        file.set_mtime(FIXED_MTIME);
        file.set_size(len);
        // One RNG across parts: the bytes are one stream cut into files.
        let mut bytes = RandomBytes {
            rng,
            remaining: len,
        };
        tar.append_data(&mut file, name, &mut bytes)?;
        rng = bytes.rng;
    }
    let hashed = tar.into_inner()?;
    Ok(hashed.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(size: u64) -> LayerContent {
        LayerContent::new(7, "", 0, size, "layer0".into())
    }

    #[test]
    fn uncompressed_layer_digest_is_its_diff_id_and_holds_the_random_file() {
        let mut out = Vec::new();
        let blob = write_layer(&content(10_000), LayerCompression::None, &mut out).unwrap();
        assert_eq!(blob.blob.digest, blob.diff_id);
        assert_eq!(blob.blob.len, out.len() as u64);
        assert_eq!(
            blob.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&out)))
        );
        let mut archive = tar::Archive::new(&out[..]);
        let sizes: Vec<(String, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.size())
            })
            .collect();
        assert_eq!(
            sizes,
            vec![("weir/".into(), 0), ("weir/layer0.bin".into(), 10_000)]
        );
    }

    #[test]
    fn gzip_layer_decompresses_to_the_diff_id() {
        let mut gz = Vec::new();
        let blob = write_layer(&content(70_000), LayerCompression::Gzip, &mut gz).unwrap();
        assert_ne!(blob.blob.digest, blob.diff_id);
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(
            blob.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&plain)))
        );
        let mut again = Vec::new();
        write_layer(&content(70_000), LayerCompression::Gzip, &mut again).unwrap();
        assert_eq!(gz, again, "same key must give the same bytes");
    }

    #[test]
    fn different_seeds_give_different_bytes() {
        let a = LayerContent::new(1, "", 0, 4096, "l".into());
        let b = LayerContent::new(2, "", 0, 4096, "l".into());
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let da = write_layer(&a, LayerCompression::None, &mut x).unwrap();
        let db = write_layer(&b, LayerCompression::None, &mut y).unwrap();
        assert_ne!(da.diff_id, db.diff_id);
    }
}
