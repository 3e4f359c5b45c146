//! Directory link, for diodes that are file-transfer services: the sender
//! writes frames in batches into files in an outbox, the service carries
//! the files across, the receiver reads them from an inbox and deletes them.
//!
//! A file holds frames in the batch format of
//! [`weir_proto::framing::batch`] (magic, record count, length-prefixed
//! records).
//!
//! Files are written as `.<name>.tmp`, fsynced and renamed to `<name>`,
//! where `<name>` is a 20-digit stamp (microseconds since the epoch, kept
//! strictly increasing) plus `.weir`, so name order is write order.
//!
//! The receiver trusts nothing in a file (see the format's `scan`). Files that
//! arrive late, twice, cut short or damaged cost only their damaged records;
//! duplicated frames are harmless (the replay guard drops repeats).

use super::{FrameBatch, FrameSink, FrameSource, LinkError};
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use weir_proto::framing::batch::{
    self, scan, Step, FILE_HEADER_LEN, MAX_FRAME, MIN_FRAME, RECORD_PREFIX_LEN,
};

pub const FILE_SUFFIX: &str = ".weir";
const TEMP_SUFFIX: &str = ".tmp";
/// Bytes read from an inbox file per system call.
const READ_CHUNK: usize = 64 * 1024;
/// How often an idle receiver looks at the inbox.
const POLL: Duration = Duration::from_millis(100);
/// Default time a file must sit unmodified before it is read: a service
/// that writes in place (no temporary name) is left to finish.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(1);

fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(TEMP_SUFFIX)
}

/// The stamp in an outbox file name (`<digits>.weir`, or its temp form).
fn stamp_of(name: &str) -> Option<u64> {
    let bare = name.strip_prefix('.').unwrap_or(name);
    let bare = bare.strip_suffix(TEMP_SUFFIX).unwrap_or(bare);
    bare.strip_suffix(FILE_SUFFIX)?.parse().ok()
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes frames into batch files in an outbox.
pub struct DirSink {
    outbox: PathBuf,
    max_file_bytes: usize,
    max_age: Duration,
    /// The file being gathered: header, then records.
    pending: Vec<u8>,
    count: u32,
    oldest: Option<Instant>,
    last_stamp: u64,
    files_written: u64,
    frames_dropped: u64,
}

impl DirSink {
    /// Writes into `outbox` (which must exist) files of at most
    /// `max_file_bytes`, flushing a file once it is full or its first frame
    /// is `max_age` old (checked on each [`send`](FrameSink::send), so a
    /// gateway that sends heartbeats flushes on time).
    ///
    /// Leftover temporary files of a previous run are removed; new names
    /// continue after the highest one present.
    pub fn new(outbox: &Path, max_file_bytes: usize, max_age: Duration) -> Result<Self, LinkError> {
        let min = FILE_HEADER_LEN + RECORD_PREFIX_LEN + MIN_FRAME;
        if max_file_bytes < min {
            return Err(LinkError::io(
                format!("outbox {}", outbox.display()),
                std::io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("max_file_bytes {max_file_bytes} is below the smallest file ({min})"),
                ),
            ));
        }
        let entries = std::fs::read_dir(outbox)
            .map_err(|e| LinkError::io(format!("reading outbox {}", outbox.display()), e))?;
        let mut last_stamp = 0;
        for entry in entries {
            let entry = entry
                .map_err(|e| LinkError::io(format!("reading outbox {}", outbox.display()), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stamp) = stamp_of(name) else {
                continue;
            };
            if is_temp_name(name) {
                // A file cut short by a crash; its frames are repeated by the carousel.
                let path = entry.path();
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(file = %path.display(), error = %e, "cannot remove stale outbox temp file");
                }
            } else {
                last_stamp = last_stamp.max(stamp);
            }
        }
        Ok(DirSink {
            outbox: outbox.to_path_buf(),
            max_file_bytes,
            max_age,
            pending: Vec::with_capacity(max_file_bytes.min(16 << 20)),
            count: 0,
            oldest: None,
            last_stamp,
            files_written: 0,
            frames_dropped: 0,
        })
    }

    /// Files renamed into the outbox so far.
    pub fn files_written(&self) -> u64 {
        self.files_written
    }

    /// Frames gathered and not yet in a file.
    pub fn pending_frames(&self) -> usize {
        self.count as usize
    }

    /// Frames lost because their file could not be written.
    pub fn frames_dropped(&self) -> u64 {
        self.frames_dropped
    }

    /// Writes the gathered frames into a file now, if there are any.
    /// On failure the gathered frames are dropped (and counted): memory
    /// stays bounded, and the carousel sends every frame again anyway.
    pub fn flush(&mut self) -> Result<(), LinkError> {
        if self.count == 0 {
            return Ok(());
        }
        let count = self.count;
        batch::set_count(&mut self.pending, count);
        let now_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        // Strictly increasing, even if the clock steps back.
        let stamp = now_us.max(self.last_stamp + 1);
        let name = format!("{stamp:020}{FILE_SUFFIX}");
        let tmp = self.outbox.join(format!(".{name}{TEMP_SUFFIX}"));
        let dest = self.outbox.join(&name);
        let result = write_durably(&tmp, &dest, &self.outbox, &self.pending);
        self.pending.clear();
        self.count = 0;
        self.oldest = None;
        match result {
            Ok(()) => {
                self.last_stamp = stamp;
                self.files_written += 1;
                tracing::debug!(file = %dest.display(), frames = count, "outbox file written");
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                self.frames_dropped += u64::from(count);
                Err(e)
            }
        }
    }

    fn due(&self) -> bool {
        self.oldest.is_some_and(|t| t.elapsed() >= self.max_age)
    }
}

fn write_durably(tmp: &Path, dest: &Path, dir: &Path, bytes: &[u8]) -> Result<(), LinkError> {
    let mut file = File::create(tmp)
        .map_err(|e| LinkError::io(format!("creating outbox file {}", tmp.display()), e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| LinkError::io(format!("writing outbox file {}", tmp.display()), e))?;
    std::fs::rename(tmp, dest).map_err(|e| {
        LinkError::io(
            format!("renaming {} to {}", tmp.display(), dest.display()),
            e,
        )
    })?;
    fsync_dir(dir).map_err(|e| LinkError::io(format!("syncing outbox {}", dir.display()), e))
}

impl FrameSink for DirSink {
    fn send(&mut self, frames: &[&[u8]]) -> Result<(), LinkError> {
        let max = self.max_frame_len();
        if let Some(f) = frames.iter().find(|f| f.len() > max) {
            return Err(LinkError::FrameTooLarge { len: f.len(), max });
        }
        for f in frames {
            if self.count > 0
                && self.pending.len() + RECORD_PREFIX_LEN + f.len() > self.max_file_bytes
            {
                self.flush()?;
            }
            if self.count == 0 {
                batch::start_file(&mut self.pending);
                self.oldest = Some(Instant::now());
            }
            batch::push_record(&mut self.pending, f);
            self.count += 1;
        }
        if self.due() {
            self.flush()?;
        }
        Ok(())
    }

    fn max_frame_len(&self) -> usize {
        (self.max_file_bytes - FILE_HEADER_LEN - RECORD_PREFIX_LEN).min(MAX_FRAME)
    }
}

impl Drop for DirSink {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(outbox = %self.outbox.display(), error = %e, "outbox: last frames not written");
        }
    }
}

/// What the receiver saw, for the gateway's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InboxStats {
    /// Files read to their end and deleted.
    pub files: u64,
    /// Frames passed up.
    pub frames: u64,
    /// Files with fewer records than their header declares, or with no
    /// header: cut short, or records lost to damage.
    pub short_files: u64,
    /// Files in which bytes had to be skipped (damage, cuts, bad header).
    pub damaged_files: u64,
    /// Bytes skipped over all files.
    pub skipped_bytes: u64,
    /// Frames longer than the caller's batch slots, dropped.
    pub too_large_for_batch: u64,
}

/// Identity of a file as read, so a later copy under the same name is
/// never deleted unread.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    path: PathBuf,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl Seen {
    fn of(path: &Path, meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Seen {
            path: path.to_path_buf(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// An inbox file being read.
struct InboxFile {
    seen: Seen,
    file: File,
    window: Vec<u8>,
    pos: usize,
    eof: bool,
    declared: Option<u32>,
    records: u32,
    skipped: u64,
}

impl InboxFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let mut f = InboxFile {
            seen: Seen::of(path, &meta),
            file,
            window: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            eof: false,
            declared: None,
            records: 0,
            skipped: 0,
        };
        while f.window.len() < FILE_HEADER_LEN && !f.eof {
            f.refill()?;
        }
        f.declared = batch::declared_count(&f.window);
        if f.declared.is_some() {
            f.pos = FILE_HEADER_LEN;
        }
        Ok(f)
    }

    fn refill(&mut self) -> std::io::Result<()> {
        if self.pos > 0 {
            self.window.drain(..self.pos);
            self.pos = 0;
        }
        let len = self.window.len();
        self.window.resize(len + READ_CHUNK, 0);
        let n = loop {
            match self.file.read(&mut self.window[len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.window.truncate(len);
                    return Err(e);
                }
            }
        };
        self.window.truncate(len + n);
        self.eof = n == 0;
        Ok(())
    }

    /// The next frame that parses, or `None` at the end of the file.
    fn next_frame(&mut self) -> std::io::Result<Option<&[u8]>> {
        loop {
            match scan(&self.window[self.pos..], self.eof) {
                Step::Record { len } => {
                    let start = self.pos + RECORD_PREFIX_LEN;
                    self.pos = start + len;
                    self.records += 1;
                    return Ok(Some(&self.window[start..start + len]));
                }
                Step::Skip(n) => {
                    self.pos += n;
                    self.skipped += n as u64;
                }
                Step::NeedMore if self.eof => return Ok(None),
                Step::NeedMore => self.refill()?,
            }
        }
    }
}

/// Reads frames from batch files arriving in an inbox, in name order, and
/// deletes each file once its frames were handed out.
pub struct DirSource {
    inbox: PathBuf,
    settle: Duration,
    /// Names ready to read, in order; refilled from the directory when empty.
    queue: VecDeque<PathBuf>,
    current: Option<InboxFile>,
    /// Files read to the end, deleted on the next `recv`: by then the caller
    /// has taken their frames.
    finished: Vec<Seen>,
    /// Names already warned about: foreign files, files that cannot be
    /// deleted.
    ignored: HashSet<OsString>,
    stats: InboxStats,
}

impl DirSource {
    /// Reads from `inbox`, which must exist.
    pub fn new(inbox: &Path) -> Result<Self, LinkError> {
        let meta = std::fs::metadata(inbox)
            .map_err(|e| LinkError::io(format!("inbox {}", inbox.display()), e))?;
        if !meta.is_dir() {
            return Err(LinkError::io(
                format!("inbox {}", inbox.display()),
                std::io::Error::new(ErrorKind::InvalidInput, "not a directory"),
            ));
        }
        Ok(DirSource {
            inbox: inbox.to_path_buf(),
            settle: DEFAULT_SETTLE,
            queue: VecDeque::new(),
            current: None,
            finished: Vec::new(),
            ignored: HashSet::new(),
            stats: InboxStats::default(),
        })
    }

    /// How long a file must sit unmodified before it is read
    /// ([`DEFAULT_SETTLE`] unless set).
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    pub fn stats(&self) -> InboxStats {
        self.stats
    }

    /// Lists the inbox: names to read, in order, skipping temporary names,
    /// foreign files and files still being written.
    fn refill_queue(&mut self) -> Result<(), LinkError> {
        let entries = std::fs::read_dir(&self.inbox)
            .map_err(|e| LinkError::io(format!("reading inbox {}", self.inbox.display()), e))?;
        let now = SystemTime::now();
        let mut ready = Vec::new();
        for entry in entries {
            let entry = entry
                .map_err(|e| LinkError::io(format!("reading inbox {}", self.inbox.display()), e))?;
            let name = entry.file_name();
            let Some(text) = name.to_str() else {
                self.ignore_once(name, "name is not UTF-8");
                continue;
            };
            if is_temp_name(text) {
                continue;
            }
            if !text.ends_with(FILE_SUFFIX) {
                self.ignore_once(name, "not a .weir file");
                continue;
            }
            if self.ignored.contains(&name) {
                continue;
            }
            let path = entry.path();
            // Read to the end already, deleted on the next recv.
            if self.finished.iter().any(|s| s.path == path) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or(Duration::ZERO);
            if age < self.settle {
                continue;
            }
            ready.push(path);
        }
        ready.sort();
        self.queue = ready.into();
        Ok(())
    }

    fn ignore_once(&mut self, name: OsString, why: &str) {
        if !self.ignored.contains(&name) {
            tracing::warn!(inbox = %self.inbox.display(), file = ?name, why, "ignoring file in inbox");
            self.ignored.insert(name);
        }
    }

    /// Opens the next readable file, if any is ready.
    fn open_next(&mut self) -> Result<Option<InboxFile>, LinkError> {
        if self.queue.is_empty() {
            self.refill_queue()?;
        }
        while let Some(path) = self.queue.pop_front() {
            match InboxFile::open(&path) {
                Ok(f) => return Ok(Some(f)),
                // Taken away since the listing (or a duplicate already consumed).
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LinkError::io(
                        format!("opening inbox file {}", path.display()),
                        e,
                    ))
                }
            }
        }
        Ok(None)
    }

    fn close_current(&mut self) {
        let Some(f) = self.current.take() else { return };
        let path = &f.seen.path;
        self.stats.files += 1;
        self.stats.skipped_bytes += f.skipped;
        let short = f.declared.is_none_or(|d| f.records < d);
        if short {
            self.stats.short_files += 1;
        }
        if f.skipped > 0 {
            self.stats.damaged_files += 1;
        }
        if short || f.skipped > 0 {
            tracing::warn!(
                file = %path.display(),
                records = f.records,
                declared = ?f.declared,
                skipped_bytes = f.skipped,
                "inbox file damaged or cut short; read what parsed"
            );
        } else {
            tracing::debug!(file = %path.display(), records = f.records, "inbox file read");
        }
        self.finished.push(f.seen);
    }

    /// Deletes files read to the end, unless a new copy took the name.
    fn delete_finished(&mut self) {
        for seen in std::mem::take(&mut self.finished) {
            let unchanged = std::fs::metadata(&seen.path)
                .map(|m| Seen::of(&seen.path, &m) == seen)
                .unwrap_or(false);
            if !unchanged {
                continue;
            }
            if let Err(e) = std::fs::remove_file(&seen.path) {
                if e.kind() != ErrorKind::NotFound {
                    tracing::error!(file = %seen.path.display(), error = %e, "cannot delete inbox file; it will not be read again");
                    if let Some(name) = seen.path.file_name() {
                        self.ignored.insert(name.to_os_string());
                    }
                }
            }
        }
    }
}

impl FrameSource for DirSource {
    fn recv(&mut self, batch: &mut FrameBatch, timeout: Duration) -> Result<(), LinkError> {
        batch.clear();
        self.delete_finished();
        let deadline = Instant::now() + timeout;
        loop {
            if self.current.is_none() {
                self.current = self.open_next()?;
            }
            if let Some(cur) = self.current.as_mut() {
                while batch.len() < batch.capacity() {
                    match cur.next_frame() {
                        Ok(Some(frame)) => {
                            if batch.push(frame) {
                                self.stats.frames += 1;
                            } else {
                                self.stats.too_large_for_batch += 1;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let path = cur.seen.path.clone();
                            self.current = None;
                            return Err(LinkError::io(
                                format!("reading inbox file {}", path.display()),
                                e,
                            ));
                        }
                    }
                }
                if batch.len() == batch.capacity() {
                    return Ok(());
                }
                self.close_current();
                continue;
            }
            if !batch.is_empty() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(POLL));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use weir_proto::frame::{self, Body, FrameSealer, Heartbeat};
    use weir_proto::Key;

    fn frames(n: u64) -> Vec<Vec<u8>> {
        let key = Key::from_bytes(1, &[3; 32]).unwrap();
        let mut sealer = FrameSealer::new(key, 5);
        (0..n)
            .map(|i| {
                let mut out = Vec::new();
                sealer.seal(
                    &Body::Heartbeat(Heartbeat {
                        uptime_s: i,
                        queued_objects: 1,
                        pass: 2,
                        config_fingerprint: 3,
                        sent_frames: i,
                        ledger: None,
                    }),
                    &mut out,
                );
                out
            })
            .collect()
    }

    fn refs(fs: &[Vec<u8>]) -> Vec<&[u8]> {
        fs.iter().map(|f| f.as_slice()).collect()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn source(dir: &Path) -> DirSource {
        DirSource::new(dir).unwrap().with_settle(Duration::ZERO)
    }

    /// Reads until a call returns nothing.
    fn drain(src: &mut DirSource) -> Vec<Vec<u8>> {
        let mut batch = FrameBatch::new(16, 2048);
        let mut got = Vec::new();
        loop {
            src.recv(&mut batch, Duration::ZERO).unwrap();
            if batch.is_empty() {
                return got;
            }
            got.extend(batch.iter().map(|f| f.to_vec()));
        }
    }

    /// One file holding `fs`, written by a sink, returned as bytes.
    fn file_bytes(fs: &[Vec<u8>]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = DirSink::new(dir.path(), 1 << 20, Duration::from_secs(3600)).unwrap();
        sink.send(&refs(fs)).unwrap();
        sink.flush().unwrap();
        let name = &names(dir.path())[0];
        std::fs::read(dir.path().join(name)).unwrap()
    }

    #[test]
    fn frames_cross_in_bounded_files_in_order() {
        let out = tempfile::tempdir().unwrap();
        let fs = frames(100);
        let mut sink = DirSink::new(out.path(), 1000, Duration::from_secs(3600)).unwrap();
        for chunk in fs.chunks(7) {
            sink.send(&refs(chunk)).unwrap();
        }
        sink.flush().unwrap();
        let files = names(out.path());
        assert!(files.len() > 5, "{files:?}");
        assert_eq!(files.len() as u64, sink.files_written());
        for f in &files {
            assert!(f.ends_with(".weir"));
            assert!(std::fs::metadata(out.path().join(f)).unwrap().len() <= 1000);
        }
        let mut src = source(out.path());
        assert_eq!(drain(&mut src), fs);
        assert!(
            names(out.path()).is_empty(),
            "files are deleted after reading"
        );
        assert_eq!(src.stats().files, files.len() as u64);
        assert_eq!(src.stats().damaged_files + src.stats().short_files, 0);
    }

    #[test]
    fn a_file_is_flushed_on_age_even_with_few_frames() {
        let out = tempfile::tempdir().unwrap();
        let fs = frames(2);
        let mut sink = DirSink::new(out.path(), 1 << 20, Duration::from_secs(1)).unwrap();
        sink.send(&refs(&fs[..1])).unwrap();
        assert!(names(out.path()).is_empty());
        assert_eq!(sink.pending_frames(), 1);
        std::thread::sleep(Duration::from_millis(1100));
        // Any send, even an empty one, writes the file that came of age.
        sink.send(&[]).unwrap();
        assert_eq!(names(out.path()).len(), 1);
        assert_eq!(sink.pending_frames(), 0);
    }

    #[test]
    fn dropping_the_sink_writes_what_it_gathered() {
        let out = tempfile::tempdir().unwrap();
        let fs = frames(3);
        let mut sink = DirSink::new(out.path(), 1 << 20, Duration::from_secs(3600)).unwrap();
        sink.send(&refs(&fs)).unwrap();
        drop(sink);
        assert_eq!(drain(&mut source(out.path())), fs);
    }

    #[test]
    fn a_restarted_sink_names_files_after_existing_ones_and_clears_temp_files() {
        let out = tempfile::tempdir().unwrap();
        let future = "09999999999999999990.weir";
        std::fs::write(out.path().join(future), file_bytes(&frames(1))).unwrap();
        std::fs::write(
            out.path().join(".00000000000000000001.weir.tmp"),
            b"partial",
        )
        .unwrap();
        let mut sink = DirSink::new(out.path(), 1 << 20, Duration::from_secs(3600)).unwrap();
        sink.send(&refs(&frames(1))).unwrap();
        sink.flush().unwrap();
        assert_eq!(
            names(out.path()),
            vec![future.to_string(), "09999999999999999991.weir".into()]
        );
    }

    #[test]
    fn missing_outbox_and_inbox_are_errors_naming_them() {
        let gone = Path::new("/nonexistent/weir-outbox");
        let err = DirSink::new(gone, 1 << 20, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/nonexistent/weir-outbox"),
            "{err}"
        );
        let err = DirSource::new(gone).err().unwrap();
        assert!(
            err.to_string().contains("/nonexistent/weir-outbox"),
            "{err}"
        );
    }

    #[test]
    fn oversize_frame_is_refused() {
        let out = tempfile::tempdir().unwrap();
        let mut sink = DirSink::new(out.path(), 200, Duration::from_secs(1)).unwrap();
        assert_eq!(sink.max_frame_len(), 200 - 16);
        assert!(matches!(
            sink.send(&[&[0u8; 185][..]]),
            Err(LinkError::FrameTooLarge { len: 185, max: 184 })
        ));
    }

    #[test]
    fn temp_and_foreign_names_are_left_alone() {
        let inbox = tempfile::tempdir().unwrap();
        let bytes = file_bytes(&frames(2));
        for name in [".1.weir", "2.weir.tmp", ".3.weir.tmp", "notes.txt"] {
            std::fs::write(inbox.path().join(name), &bytes).unwrap();
        }
        let mut src = source(inbox.path());
        assert!(drain(&mut src).is_empty());
        assert_eq!(names(inbox.path()).len(), 4);
    }

    #[test]
    fn a_file_still_being_written_waits_until_it_settles() {
        let inbox = tempfile::tempdir().unwrap();
        let fs = frames(3);
        let path = inbox.path().join("1.weir");
        std::fs::write(&path, file_bytes(&fs)).unwrap();
        let mut src = DirSource::new(inbox.path())
            .unwrap()
            .with_settle(Duration::from_secs(3600));
        assert!(drain(&mut src).is_empty());
        let file = File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        assert_eq!(drain(&mut src), fs);
    }

    #[test]
    fn a_late_file_with_an_older_name_is_still_read() {
        let inbox = tempfile::tempdir().unwrap();
        let fs = frames(4);
        let mut src = source(inbox.path());
        std::fs::write(inbox.path().join("2.weir"), file_bytes(&fs[2..])).unwrap();
        assert_eq!(drain(&mut src), fs[2..].to_vec());
        std::fs::write(inbox.path().join("1.weir"), file_bytes(&fs[..2])).unwrap();
        assert_eq!(drain(&mut src), fs[..2].to_vec());
    }

    #[test]
    fn a_file_arriving_twice_is_read_twice_harmlessly() {
        let inbox = tempfile::tempdir().unwrap();
        let fs = frames(3);
        let bytes = file_bytes(&fs);
        let mut src = source(inbox.path());
        std::fs::write(inbox.path().join("1.weir"), &bytes).unwrap();
        std::fs::write(inbox.path().join("1-copy.weir"), &bytes).unwrap();
        assert_eq!(drain(&mut src), [fs.clone(), fs.clone()].concat());
        // The same name again after it was consumed.
        std::fs::write(inbox.path().join("1.weir"), &bytes).unwrap();
        assert_eq!(drain(&mut src), fs);
        assert!(names(inbox.path()).is_empty());
    }

    #[test]
    fn a_new_copy_under_a_name_being_read_is_not_deleted_unread() {
        let inbox = tempfile::tempdir().unwrap();
        let fs = frames(2);
        let path = inbox.path().join("1.weir");
        std::fs::write(&path, file_bytes(&fs[..1])).unwrap();
        let mut src = source(inbox.path());
        let mut batch = FrameBatch::new(16, 2048);
        src.recv(&mut batch, Duration::ZERO).unwrap();
        assert_eq!(batch.len(), 1);
        // The service replaces the file before the next recv deletes it.
        let tmp = inbox.path().join(".1.weir.tmp");
        std::fs::write(&tmp, file_bytes(&fs[1..])).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(drain(&mut src), fs[1..].to_vec());
    }

    #[test]
    fn a_truncated_file_yields_the_records_before_the_cut() {
        let inbox = tempfile::tempdir().unwrap();
        let fs = frames(5);
        let bytes = file_bytes(&fs);
        let record = RECORD_PREFIX_LEN + fs[0].len();
        // Cut in the middle of the fourth record.
        let cut = FILE_HEADER_LEN + 3 * record + record / 2;
        std::fs::write(inbox.path().join("1.weir"), &bytes[..cut]).unwrap();
        let mut src = source(inbox.path());
        assert_eq!(drain(&mut src), fs[..3].to_vec());
        let stats = src.stats();
        assert_eq!(stats.short_files, 1);
        assert_eq!(stats.skipped_bytes, (record / 2) as u64);
        assert!(names(inbox.path()).is_empty());
    }

    #[test]
    fn corrupted_records_are_skipped_and_the_rest_read() {
        let fs = frames(6);
        let bytes = file_bytes(&fs);
        let record = RECORD_PREFIX_LEN + fs[0].len();
        let at = |i: usize| FILE_HEADER_LEN + i * record;
        let mut bad = bytes.clone();
        bad[at(1)] ^= 0x40; // length of record 1
        bad[at(3) + 4] ^= 0x01; // magic of record 3's frame
                                // Garbage inserted before record 5.
        let mut damaged = bad[..at(5)].to_vec();
        damaged.extend_from_slice(b"WEIR\x00\x00garbageWEI");
        damaged.extend_from_slice(&bad[at(5)..]);
        let inbox = tempfile::tempdir().unwrap();
        std::fs::write(inbox.path().join("1.weir"), &damaged).unwrap();
        let mut src = source(inbox.path());
        let got = drain(&mut src);
        assert_eq!(
            got,
            vec![fs[0].clone(), fs[2].clone(), fs[4].clone(), fs[5].clone()]
        );
        assert_eq!(src.stats().damaged_files, 1);
        assert!(names(inbox.path()).is_empty());
    }

    #[test]
    fn a_bad_file_header_costs_nothing_but_the_header() {
        let fs = frames(3);
        let mut bytes = file_bytes(&fs);
        bytes[0..8].copy_from_slice(b"garbage!");
        let inbox = tempfile::tempdir().unwrap();
        std::fs::write(inbox.path().join("1.weir"), &bytes).unwrap();
        std::fs::write(inbox.path().join("2.weir"), b"").unwrap();
        let mut src = source(inbox.path());
        assert_eq!(drain(&mut src), fs);
        assert_eq!(src.stats().files, 2);
        assert_eq!(src.stats().short_files, 2);
        assert!(names(inbox.path()).is_empty());
    }

    #[test]
    fn a_full_batch_resumes_inside_the_file() {
        let inbox = tempfile::tempdir().unwrap();
        let fs = frames(10);
        std::fs::write(inbox.path().join("1.weir"), file_bytes(&fs)).unwrap();
        let mut src = source(inbox.path());
        let mut batch = FrameBatch::new(3, 2048);
        let mut got = Vec::new();
        for _ in 0..5 {
            src.recv(&mut batch, Duration::ZERO).unwrap();
            assert!(names(inbox.path()).len() == 1 || got.len() + batch.len() == 10);
            got.extend(batch.iter().map(|f| f.to_vec()));
        }
        assert_eq!(got, fs);
        assert!(names(inbox.path()).is_empty());
    }

    #[test]
    fn recv_waits_for_a_file_and_times_out_empty() {
        let inbox = tempfile::tempdir().unwrap();
        let mut src = source(inbox.path());
        let mut batch = FrameBatch::new(4, 2048);
        src.recv(&mut batch, Duration::from_millis(50)).unwrap();
        assert!(batch.is_empty());
        let fs = frames(1);
        let dir = inbox.path().to_path_buf();
        let bytes = file_bytes(&fs);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            std::fs::write(dir.join(".1.weir.tmp"), bytes).unwrap();
            std::fs::rename(dir.join(".1.weir.tmp"), dir.join("1.weir")).unwrap();
        });
        src.recv(&mut batch, Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
        assert_eq!(batch.iter().map(|f| f.to_vec()).collect::<Vec<_>>(), fs);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any file content: no panic, the scan ends, and whatever is passed
        /// up has a header and the length it claims.
        #[test]
        fn arbitrary_files_never_panic(
            garbage in proptest::collection::vec(any::<u8>(), 0..3000),
            with_frames in any::<bool>(),
            splice in any::<proptest::sample::Index>(),
        ) {
            let mut bytes = garbage;
            if with_frames {
                let good = file_bytes(&frames(3));
                let at = splice.index(bytes.len() + 1);
                bytes.splice(at..at, good);
            }
            let inbox = tempfile::tempdir().unwrap();
            std::fs::write(inbox.path().join("1.weir"), &bytes).unwrap();
            let mut src = source(inbox.path());
            let got = drain(&mut src);
            for f in &got {
                let (_, total) = frame::peek_header(f).unwrap();
                prop_assert_eq!(total, f.len());
            }
            if with_frames {
                prop_assert!(got.len() >= 3);
            }
        }
    }
}
