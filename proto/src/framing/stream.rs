//! Frames on a byte stream (a serial line). The pacing that keeps a sender
//! under the line's rate is [`crate::pacing::LinePacer`].
//!
//! Each frame travels COBS-encoded between two zero bytes:
//!
//! ```text
//!  00 | COBS(frame) | 00 | 00 | COBS(frame) | 00 | ...
//! ```
//!
//! COBS removes every zero from the frame, so a zero always means "frame
//! boundary". A receiver that joins mid-stream, loses a run of bytes or sees
//! a flipped bit loses at most the frames it touched and picks up again at
//! the next zero. The leading zero makes a frame independent of its
//! predecessor: if the previous frame's trailing zero is lost, the damage
//! still stops here. The decoder passes up only candidates whose header
//! parses and whose length matches the header's; the frame's HMAC, checked
//! by the gateway, rejects the rest of what a line can damage.

use crate::frame;

/// The frame delimiter on the stream.
pub const DELIMITER: u8 = 0;

/// Largest number of stream bytes one frame of `frame_len` bytes becomes.
pub fn max_encoded_len(frame_len: usize) -> usize {
    cobs::max_encoding_length(frame_len) + 2
}

/// Appends `frame`, COBS-encoded and between delimiters, to `out`.
pub fn encode_frame(frame: &[u8], out: &mut Vec<u8>) {
    out.push(DELIMITER);
    let start = out.len();
    out.resize(start + cobs::max_encoding_length(frame.len()), 0);
    let n = cobs::encode(frame, &mut out[start..]);
    out.truncate(start + n);
    out.push(DELIMITER);
}

/// What the decoder saw, for the gateway's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamStats {
    /// Candidates passed up: decoded, header parsed, length agrees.
    pub frames: u64,
    /// Candidates dropped: not valid COBS, header refused, or a length that
    /// disagrees with the header (garbage, cuts, flipped bits).
    pub rejected: u64,
    /// Runs between delimiters longer than any frame, skipped.
    pub oversize: u64,
    /// Bytes thrown away in rejected and oversize candidates.
    pub skipped_bytes: u64,
}

/// Finds frames in a byte stream; resynchronises on every delimiter.
pub struct StreamDecoder {
    max_encoded: usize,
    /// Bytes since the last delimiter.
    candidate: Vec<u8>,
    /// The current run outgrew `max_encoded`: skip to the next delimiter.
    overflowed: bool,
    decoded: Vec<u8>,
    stats: StreamStats,
}

impl StreamDecoder {
    /// A decoder for frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        let max_encoded = cobs::max_encoding_length(max_frame);
        StreamDecoder {
            max_encoded,
            candidate: Vec::with_capacity(max_encoded),
            overflowed: false,
            decoded: Vec::with_capacity(max_encoded),
            stats: StreamStats::default(),
        }
    }

    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    /// Consumes `input` up to the end of the next acceptable frame and
    /// returns it. Returns `None` once `input` is used up; a partial frame
    /// stays inside the decoder and completes on a later call.
    pub fn next_frame(&mut self, input: &mut &[u8]) -> Option<&[u8]> {
        loop {
            let Some(end) = input.iter().position(|&b| b == DELIMITER) else {
                self.absorb(input);
                *input = &[];
                return None;
            };
            self.absorb(&input[..end]);
            *input = &input[end + 1..];
            if self.finish_candidate() {
                return Some(&self.decoded);
            }
        }
    }

    fn absorb(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.overflowed {
            self.stats.skipped_bytes += bytes.len() as u64;
        } else if self.candidate.len() + bytes.len() > self.max_encoded {
            self.stats.skipped_bytes += (self.candidate.len() + bytes.len()) as u64;
            self.candidate.clear();
            self.overflowed = true;
        } else {
            self.candidate.extend_from_slice(bytes);
        }
    }

    /// Judges the bytes before a delimiter; true when `decoded` holds a frame.
    fn finish_candidate(&mut self) -> bool {
        if self.overflowed {
            self.overflowed = false;
            self.stats.oversize += 1;
            return false;
        }
        if self.candidate.is_empty() {
            // Back-to-back delimiters: the gap between two frames.
            return false;
        }
        // Decoding never yields more bytes than it reads.
        self.decoded.resize(self.candidate.len(), 0);
        let accepted = match cobs::decode(&self.candidate, &mut self.decoded) {
            Ok(n) => {
                self.decoded.truncate(n);
                matches!(frame::peek_header(&self.decoded), Ok((_, total)) if total == n)
            }
            Err(_) => false,
        };
        if accepted {
            self.stats.frames += 1;
        } else {
            self.stats.rejected += 1;
            self.stats.skipped_bytes += self.candidate.len() as u64 + 1;
        }
        self.candidate.clear();
        accepted
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::{Body, FrameSealer, Heartbeat};
    use crate::Key;
    use proptest::prelude::*;

    /// Sealed heartbeats; their zero bytes exercise COBS.
    pub(crate) fn frames(n: u64) -> Vec<Vec<u8>> {
        let key = Key::from_bytes(1, &[7; 32]).unwrap();
        let mut sealer = FrameSealer::new(key, 99);
        (0..n)
            .map(|i| {
                let mut out = Vec::new();
                sealer.seal(
                    &Body::Heartbeat(Heartbeat {
                        uptime_s: i,
                        // Zero bytes inside the frame exercise COBS.
                        queued_objects: 0,
                        pass: i * 1000,
                        config_fingerprint: 0,
                        sent_frames: i,
                        ledger: None,
                    }),
                    &mut out,
                );
                out
            })
            .collect()
    }

    fn decode_all(dec: &mut StreamDecoder, mut input: &[u8]) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while let Some(f) = dec.next_frame(&mut input) {
            got.push(f.to_vec());
        }
        got
    }

    fn stream_of(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            encode_frame(f, &mut out);
        }
        out
    }

    #[test]
    fn frames_round_trip_in_any_split() {
        let fs = frames(5);
        let stream = stream_of(&fs);
        for chunk in [1, 2, 7, 64, stream.len()] {
            let mut dec = StreamDecoder::new(1400);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                got.extend(decode_all(&mut dec, piece));
            }
            assert_eq!(got, fs, "chunk {chunk}");
            assert_eq!(dec.stats().rejected, 0);
        }
    }

    #[test]
    fn encoded_frame_has_no_inner_zero_and_fits_its_bound() {
        let f = vec![0u8; 600];
        let mut out = Vec::new();
        encode_frame(&f, &mut out);
        assert!(out.len() <= max_encoded_len(f.len()));
        assert_eq!(out[0], 0);
        assert_eq!(*out.last().unwrap(), 0);
        assert!(!out[1..out.len() - 1].contains(&0));
    }

    #[test]
    fn garbage_before_and_between_frames_is_skipped() {
        let fs = frames(3);
        let mut stream = b"\x13\x37noise\xff\xfe".to_vec();
        encode_frame(&fs[0], &mut stream);
        stream.extend_from_slice(b"more noise\x00\x01\x02\x00garbage");
        encode_frame(&fs[1], &mut stream);
        encode_frame(&fs[2], &mut stream);
        let mut dec = StreamDecoder::new(1400);
        assert_eq!(decode_all(&mut dec, &stream), fs);
        assert!(dec.stats().rejected >= 2, "{:?}", dec.stats());
    }

    #[test]
    fn a_cut_mid_frame_costs_that_frame_only() {
        let fs = frames(3);
        let mut stream = Vec::new();
        encode_frame(&fs[0], &mut stream);
        let mut second = Vec::new();
        encode_frame(&fs[1], &mut second);
        // The line dropped the middle of the second frame and its trailing zero.
        stream.extend_from_slice(&second[..second.len() / 2]);
        encode_frame(&fs[2], &mut stream);
        let mut dec = StreamDecoder::new(1400);
        assert_eq!(
            decode_all(&mut dec, &stream),
            vec![fs[0].clone(), fs[2].clone()]
        );
        assert_eq!(dec.stats().rejected, 1);
    }

    #[test]
    fn a_flipped_bit_costs_that_frame_or_reaches_the_verifier() {
        let fs = frames(3);
        let opener = crate::FrameOpener::new(
            crate::KeyRing::new(vec![Key::from_bytes(1, &[7; 32]).unwrap()]).unwrap(),
        );
        let clean = stream_of(&fs);
        let mut first = Vec::new();
        encode_frame(&fs[0], &mut first);
        // Every bit of the first frame, its delimiters included.
        for bit in 0..first.len() * 8 {
            let mut stream = clean.clone();
            stream[bit / 8] ^= 1 << (bit % 8);
            let mut dec = StreamDecoder::new(1400);
            let got = decode_all(&mut dec, &stream);
            // The frames after the damaged one always survive.
            assert!(got.ends_with(&fs[1..]), "bit {bit}");
            // Whatever was passed up either is intact or fails the HMAC.
            for f in &got {
                assert!(fs.contains(f) || opener.open(f).is_err(), "bit {bit}");
            }
        }
    }

    #[test]
    fn oversize_runs_are_skipped_and_counted() {
        let fs = frames(1);
        let mut stream = vec![0x55; 5000];
        encode_frame(&fs[0], &mut stream);
        let mut dec = StreamDecoder::new(200);
        assert_eq!(decode_all(&mut dec, &stream), fs);
        assert_eq!(dec.stats().oversize, 1);
        assert!(dec.stats().skipped_bytes >= 5000);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// No input makes the decoder panic, and what it passes up always
        /// has a header and a matching length.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            split in 1usize..300,
            max in 0usize..2000,
        ) {
            let mut dec = StreamDecoder::new(max);
            for piece in bytes.chunks(split) {
                let mut input = piece;
                while let Some(f) = dec.next_frame(&mut input) {
                    let (_, total) = frame::peek_header(f).unwrap();
                    prop_assert_eq!(total, f.len());
                }
            }
        }

        /// Frames survive being mixed with garbage that holds delimiters:
        /// every frame not touched by garbage comes through, in order.
        #[test]
        fn frames_survive_interleaved_garbage(
            garbage in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 6),
        ) {
            let fs = frames(5);
            let mut stream = Vec::new();
            for (f, g) in fs.iter().zip(&garbage) {
                stream.extend_from_slice(g);
                encode_frame(f, &mut stream);
            }
            stream.extend_from_slice(&garbage[5]);
            let mut dec = StreamDecoder::new(1400);
            prop_assert_eq!(decode_all(&mut dec, &stream), fs);
        }
    }
}
