//! The directory link's batch file: frames gathered into one file.
//!
//! ```text
//!  offset  size  field
//!       0     8  magic "WEIRDIR1"
//!       8     4  record count            (big-endian)
//!      12         records: length n (4 bytes, big-endian), then n bytes of frame
//! ```
//!
//! The reader trusts nothing in a file: each record must carry a frame
//! whose header parses and whose length matches the record's length;
//! otherwise [`scan`] skips forward to the next frame magic. A file cut
//! short or damaged costs only its damaged records. Naming, writing and
//! reading the files is the host's directory link.

use crate::frame::{self, HEADER_LEN, MAGIC, MAX_BODY_LEN, TAG_LEN};

pub const FILE_MAGIC: [u8; 8] = *b"WEIRDIR1";
pub const FILE_HEADER_LEN: usize = 12;
/// Bytes before each frame: its length.
pub const RECORD_PREFIX_LEN: usize = 4;
/// The shortest and the longest frame a record can hold.
pub const MIN_FRAME: usize = HEADER_LEN + TAG_LEN;
pub const MAX_FRAME: usize = HEADER_LEN + MAX_BODY_LEN + TAG_LEN;

/// Starts a file in `out` (cleared first): the header, with a count of 0
/// until [`set_count`].
pub fn start_file(out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&FILE_MAGIC);
    out.extend_from_slice(&[0; 4]);
}

/// Appends one record holding `frame` (at most `u32::MAX` bytes; callers
/// bound frames by [`MAX_FRAME`]).
pub fn push_record(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// Writes the record count into a file started with [`start_file`].
pub fn set_count(file: &mut [u8], count: u32) {
    file[8..FILE_HEADER_LEN].copy_from_slice(&count.to_be_bytes());
}

/// The record count a file's header declares, if it starts with one.
pub fn declared_count(file: &[u8]) -> Option<u32> {
    if file.len() >= FILE_HEADER_LEN && file[..8] == FILE_MAGIC {
        Some(u32::from_be_bytes([file[8], file[9], file[10], file[11]]))
    } else {
        None
    }
}

/// One step of reading records from the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A frame of `len` bytes after the length prefix.
    Record { len: usize },
    /// Bytes that hold no frame start; drop them.
    Skip(usize),
    /// The buffer ends inside what may be a record.
    NeedMore,
}

/// Reads the record at the front of `buf`, or says how far to skip to the
/// next frame magic. With `eof`, never answers `NeedMore` for a non-empty
/// buffer, and every `Skip` is at least one byte: the scan always ends.
pub fn scan(buf: &[u8], eof: bool) -> Step {
    if buf.is_empty() {
        return Step::NeedMore;
    }
    if buf.len() < RECORD_PREFIX_LEN + MAGIC.len() {
        return if eof {
            Step::Skip(buf.len())
        } else {
            Step::NeedMore
        };
    }
    if buf[4..8] == MAGIC {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if (MIN_FRAME..=MAX_FRAME).contains(&len) {
            match buf.get(RECORD_PREFIX_LEN..RECORD_PREFIX_LEN + len) {
                None if !eof => return Step::NeedMore,
                None => {} // cut short: look for a later frame
                Some(f) => {
                    if matches!(frame::peek_header(f), Ok((_, total)) if total == len) {
                        return Step::Record { len };
                    }
                }
            }
        }
    }
    // Resynchronise on the next frame magic after this record's own.
    let from = RECORD_PREFIX_LEN + 1;
    match buf[from..].windows(MAGIC.len()).position(|w| w == MAGIC) {
        Some(i) => Step::Skip(from + i - RECORD_PREFIX_LEN),
        None if eof => Step::Skip(buf.len()),
        // Keep a tail that may hold a length prefix and part of a magic.
        None => Step::Skip(buf.len() - (RECORD_PREFIX_LEN + MAGIC.len() - 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::stream::tests::frames;
    use proptest::prelude::*;

    /// Every record of a whole file in memory, and the bytes skipped.
    fn read_all(file: &[u8]) -> (Vec<Vec<u8>>, usize) {
        let mut at = if declared_count(file).is_some() {
            FILE_HEADER_LEN
        } else {
            0
        };
        let (mut got, mut skipped) = (Vec::new(), 0);
        loop {
            match scan(&file[at..], true) {
                Step::Record { len } => {
                    got.push(file[at + RECORD_PREFIX_LEN..at + RECORD_PREFIX_LEN + len].to_vec());
                    at += RECORD_PREFIX_LEN + len;
                }
                Step::Skip(n) => {
                    at += n;
                    skipped += n;
                }
                Step::NeedMore => return (got, skipped),
            }
        }
    }

    #[test]
    fn a_file_round_trips_and_declares_its_count() {
        let fs = frames(4);
        let mut file = Vec::new();
        start_file(&mut file);
        for f in &fs {
            push_record(&mut file, f);
        }
        set_count(&mut file, fs.len() as u32);
        assert_eq!(declared_count(&file), Some(4));
        assert_eq!(read_all(&file), (fs, 0));
    }

    #[test]
    fn a_damaged_record_costs_only_itself() {
        let fs = frames(3);
        let mut file = Vec::new();
        start_file(&mut file);
        for f in &fs {
            push_record(&mut file, f);
        }
        // The length of record 1.
        file[FILE_HEADER_LEN + RECORD_PREFIX_LEN + fs[0].len()] ^= 0x40;
        let (got, skipped) = read_all(&file);
        assert_eq!(got, vec![fs[0].clone(), fs[2].clone()]);
        assert_eq!(skipped, RECORD_PREFIX_LEN + fs[1].len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// The scan always makes progress and never skips past a whole record.
        #[test]
        fn scan_progresses(bytes in proptest::collection::vec(any::<u8>(), 1..200), eof in any::<bool>()) {
            match scan(&bytes, eof) {
                Step::Record { len } => prop_assert!(len + RECORD_PREFIX_LEN <= bytes.len()),
                Step::Skip(n) => prop_assert!(n >= 1 && n <= bytes.len()),
                Step::NeedMore => prop_assert!(!eof),
            }
        }
    }
}
