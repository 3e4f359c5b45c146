//! The appliance side of both gateways: the set of faults raised now, the
//! guard that stops intake before the state disk fills, the windows the
//! LEDs are judged on, and the loop that drives the LEDs.
//!
//! What differs per gateway stays there: which faults exist (each gateway
//! has its own `Fault` enum, ordered as `status` lists them) and where the
//! LED inputs come from (the `read` closure given to [`run_panel`]).
#![allow(unsafe_code)] // statvfs(2) for the state disk's free space has no safe wrapper in std.

use crate::{CommandHandler, Console, Leds, Shutdown};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Intake resumes this far above the point where it stopped, so a disk
/// hovering at the limit does not flap.
pub const RESUME_MARGIN: u64 = 1 << 20;
/// Intake stops while fewer inodes than this are free, on a filesystem
/// that counts them: each object arriving needs files of its own, and a
/// disk out of inodes refuses them (ENOSPC) however many bytes are free.
pub const MIN_FREE_INODES: u64 = 1024;
/// Intake resumes this many inodes above the floor (or the point where it
/// stopped).
pub const INODE_RESUME_MARGIN: u64 = 1024;
/// How often the LEDs are re-evaluated.
const PANEL_EVERY: Duration = Duration::from_millis(250);
/// How often blinking LEDs without the timer trigger toggle.
const TICK_EVERY: Duration = Duration::from_millis(100);

/// The faults raised now, each with its reason. Shared by the stages.
/// `F` is the gateway's fault enum; its order is the order of the reasons.
#[derive(Debug)]
pub struct Faults<F> {
    active: Mutex<BTreeMap<F, String>>,
}

impl<F> Default for Faults<F> {
    fn default() -> Self {
        Faults {
            active: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<F: Ord + Copy> Faults<F> {
    fn active(&self) -> std::sync::MutexGuard<'_, BTreeMap<F, String>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises (or updates) `fault`; `reason` is shown as is.
    pub fn raise(&self, fault: F, reason: impl Into<String>) {
        self.active().insert(fault, reason.into());
    }

    pub fn clear(&self, fault: F) {
        self.active().remove(&fault);
    }

    pub fn is_raised(&self, fault: F) -> bool {
        self.active().contains_key(&fault)
    }

    /// Every active fault's reason, joined; `None` when all is well.
    pub fn reason(&self) -> Option<String> {
        let active = self.active();
        (!active.is_empty()).then(|| active.values().cloned().collect::<Vec<_>>().join("; "))
    }
}

fn statvfs(dir: &Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL byte")
    })?;
    // SAFETY: statvfs only writes into the struct we pass; the path is a
    // valid NUL-terminated string that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Bytes free for this process on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    Ok(free_room(dir)?.bytes)
}

/// What the filesystem holding a directory has free for this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub bytes: u64,
    /// Free inodes; `None` where the filesystem does not count them.
    pub inodes: Option<u64>,
}

impl Room {
    /// Bytes and inodes to free before `min_bytes` and `min_inodes` are
    /// free (0 where they are; no inodes where the filesystem does not
    /// count them).
    pub fn short_of(&self, min_bytes: u64, min_inodes: u64) -> (u64, u64) {
        (
            min_bytes.saturating_sub(self.bytes),
            self.inodes
                .map_or(0, |free| min_inodes.saturating_sub(free)),
        )
    }
}

/// Bytes and inodes free for this process on the filesystem holding `dir`.
pub fn free_room(dir: &Path) -> std::io::Result<Room> {
    let st = statvfs(dir)?;
    Ok(Room {
        bytes: st.f_bavail as u64 * st.f_frsize as u64,
        inodes: (st.f_files > 0).then_some(st.f_favail as u64),
    })
}

/// Size and use of the filesystem holding a directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub total: u64,
    /// Bytes in use (the root-reserved free blocks count as free).
    pub used: u64,
    /// Inodes, and those in use; both 0 where the filesystem does not
    /// count them.
    pub inodes_total: u64,
    pub inodes_used: u64,
}

impl DiskUsage {
    /// Bytes in use above `percent` of the disk (0 below it).
    pub fn above_percent(&self, percent: u32) -> u64 {
        let mark = (self.total as u128 * percent.min(100) as u128 / 100) as u64;
        self.used.saturating_sub(mark)
    }

    /// Inodes in use above `percent` of the disk's (0 below it, or where
    /// the filesystem does not count them).
    pub fn inodes_above_percent(&self, percent: u32) -> u64 {
        let mark = (self.inodes_total as u128 * percent.min(100) as u128 / 100) as u64;
        self.inodes_used.saturating_sub(mark)
    }

    pub fn percent_used(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        100.0 * self.used as f64 / self.total as f64
    }
}

/// How full the filesystem holding `dir` is.
pub fn disk_usage(dir: &Path) -> std::io::Result<DiskUsage> {
    let st = statvfs(dir)?;
    let block = st.f_frsize as u64;
    let total = st.f_blocks as u64 * block;
    let free = st.f_bfree as u64 * block;
    let inodes_total = st.f_files as u64;
    Ok(DiskUsage {
        total,
        used: total.saturating_sub(free),
        inodes_total,
        inodes_used: inodes_total.saturating_sub(st.f_ffree as u64),
    })
}

/// True when `err`, or an error it wraps, says the disk (or the quota) is
/// full.
pub fn is_disk_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let full = |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if full(io) {
                return true;
            }
        }
        if let Some(sled::Error::Io(io)) = e.downcast_ref::<sled::Error>() {
            if full(io) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// What a full state disk stops, as its fault reason tells the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// The sender's file drop: nothing new is ingested.
    Spool,
    /// The receiver's shard store: verified frames are dropped.
    Shards,
}

/// What a disk ran short of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    Bytes,
    Inodes,
}

/// Why intake is stopped. `free` and `resume_at` count what it ran short
/// of: bytes, or inodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFull {
    pub dir: PathBuf,
    pub short_of: Shortage,
    pub free: u64,
    pub resume_at: u64,
    pub intake: Intake,
}

impl std::fmt::Display for DiskFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = self.dir.display();
        let (short, free, resume_at) = match self.short_of {
            Shortage::Bytes => ("full", mib(self.free), mib(self.resume_at)),
            Shortage::Inodes => (
                "out of inodes",
                self.free.to_string(),
                self.resume_at.to_string(),
            ),
        };
        match self.intake {
            Intake::Spool => write!(
                f,
                "state disk {short}: {free} free on {dir}; intake resumes at {resume_at} free"
            ),
            Intake::Shards => write!(
                f,
                "state disk {short}: {free} free on {dir}; shards are dropped until {resume_at} free"
            ),
        }
    }
}

/// A floor of free room (bytes, or inodes) with hysteresis: below `min`
/// intake stops; it resumes `margin` above the floor, or above the point
/// where it stopped if that was higher (a write failed with room still
/// above the floor), so a disk hovering at the limit does not flap.
#[derive(Debug)]
struct Floor {
    min: u64,
    margin: u64,
    /// Free room when intake stopped; `None` while it runs.
    stopped_at: Option<u64>,
}

impl Floor {
    fn new(min: u64, margin: u64) -> Floor {
        Floor {
            min,
            margin,
            stopped_at: None,
        }
    }

    /// `Err(resume_at)` while intake must stay stopped with `free` free.
    fn judge(&mut self, free: u64) -> Result<(), u64> {
        let stopped = match self.stopped_at {
            Some(at) => at,
            None if free < self.min => {
                self.stopped_at = Some(free);
                free
            }
            None => return Ok(()),
        };
        let resume_at = self.min.max(stopped) + self.margin;
        if free >= resume_at {
            self.stopped_at = None;
            return Ok(());
        }
        Err(resume_at)
    }

    /// Stops intake at `free` whatever the floor (a write failed); returns
    /// where it resumes.
    fn stop_at(&mut self, free: u64) -> u64 {
        self.stopped_at = Some(free);
        self.min.max(free) + self.margin
    }
}

/// Stops intake while the state disk is (nearly) full, so that sled and
/// the files beside it never meet a write that fails half-way.
#[derive(Debug)]
pub struct StateDisk {
    dir: PathBuf,
    intake: Intake,
    bytes: Floor,
    inodes: Floor,
    warned: bool,
}

impl StateDisk {
    pub fn new(dir: &Path, min_free_mb: u64, intake: Intake) -> Self {
        StateDisk {
            dir: dir.to_path_buf(),
            intake,
            bytes: Floor::new(min_free_mb.saturating_mul(1 << 20), RESUME_MARGIN),
            inodes: Floor::new(MIN_FREE_INODES, INODE_RESUME_MARGIN),
            warned: false,
        }
    }

    /// Looks at the disk now; `Err` while intake must stay stopped.
    pub fn check(&mut self) -> Result<(), DiskFull> {
        match free_room(&self.dir) {
            Ok(room) => {
                let bytes = self.judge(room.bytes);
                let inodes = room.inodes.map_or(Ok(()), |n| self.judge_inodes(n));
                bytes.and(inodes)
            }
            Err(e) => {
                // Unknown is not full: a guard that cannot look must not
                // stop the gateway on its own.
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read free space of the state disk");
                }
                Ok(())
            }
        }
    }

    fn full(&self, short_of: Shortage, free: u64, resume_at: u64) -> DiskFull {
        DiskFull {
            dir: self.dir.clone(),
            short_of,
            free,
            resume_at,
            intake: self.intake,
        }
    }

    /// The decision for `free` bytes free.
    pub fn judge(&mut self, free: u64) -> Result<(), DiskFull> {
        self.bytes
            .judge(free)
            .map_err(|resume_at| self.full(Shortage::Bytes, free, resume_at))
    }

    /// The decision for `free` inodes free.
    pub fn judge_inodes(&mut self, free: u64) -> Result<(), DiskFull> {
        self.inodes
            .judge(free)
            .map_err(|resume_at| self.full(Shortage::Inodes, free, resume_at))
    }

    /// A write failed for want of space: intake stops until space frees.
    /// ENOSPC is also what a disk out of inodes answers; the inodes left
    /// tell the two apart.
    pub fn out_of_space(&mut self) -> DiskFull {
        let room = free_room(&self.dir).unwrap_or(Room {
            bytes: 0,
            inodes: None,
        });
        match room.inodes.filter(|&n| n < MIN_FREE_INODES) {
            Some(inodes) => {
                // Short of bytes too: both must come back before intake.
                if room.bytes < self.bytes.min.max(RESUME_MARGIN) {
                    self.bytes.stop_at(room.bytes);
                }
                let resume_at = self.inodes.stop_at(inodes);
                self.full(Shortage::Inodes, inodes, resume_at)
            }
            None => {
                let resume_at = self.bytes.stop_at(room.bytes);
                self.full(Shortage::Bytes, room.bytes, resume_at)
            }
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.bytes.stopped_at.is_some() || self.inodes.stopped_at.is_some()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// When a counter last moved.
#[derive(Debug, Default)]
pub struct Movement {
    last: Option<u64>,
    moved_at: Option<Instant>,
}

impl Movement {
    pub fn observe(&mut self, value: u64, now: Instant) {
        if self.last.is_some_and(|l| l != value) {
            self.moved_at = Some(now);
        }
        self.last = Some(value);
    }

    pub fn moved_within(&self, window: Duration, now: Instant) -> bool {
        self.moved_at
            .is_some_and(|t| now.saturating_duration_since(t) <= window)
    }
}

/// A counter's recent history, sampled by the panel: how much it grew
/// within a window.
#[derive(Debug)]
pub struct CounterWindow {
    span: Duration,
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl CounterWindow {
    /// Keeps samples covering `span`.
    pub fn new(span: Duration) -> Self {
        CounterWindow {
            span,
            samples: std::collections::VecDeque::new(),
        }
    }

    pub fn observe(&mut self, value: u64, now: Instant) {
        self.samples.push_back((now, value));
        // Keep one sample at or before the window's start as the baseline.
        while self.samples.len() > 2
            && now.saturating_duration_since(self.samples[1].0) >= self.span
        {
            self.samples.pop_front();
        }
    }

    /// Growth over the window (over what was seen, while younger).
    pub fn growth(&self) -> u64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last)) => last.1.saturating_sub(first.1),
            _ => 0,
        }
    }

    /// Growth per second over the window.
    pub fn per_second(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last)) if last.0 > first.0 => {
                last.1.saturating_sub(first.1) as f64 / (last.0 - first.0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// What the LEDs show at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lights {
    pub link: bool,
    pub activity: bool,
    pub fault: Option<String>,
}

/// Drives the LEDs until shutdown: power on, the others from `read`
/// every 250 ms. Without LEDs it still calls `read` (which publishes the
/// figures) and logs fault changes. The caller turns the LEDs off once
/// the state is flushed.
pub fn run_panel(leds: Option<&Leds>, shutdown: &Shutdown, mut read: impl FnMut() -> Lights) {
    if let Some(l) = leds {
        l.set_power(true);
    }
    let mut shown_fault: Option<String> = None;
    let mut last_read: Option<Instant> = None;
    loop {
        if last_read.is_none_or(|t| t.elapsed() >= PANEL_EVERY) {
            last_read = Some(Instant::now());
            let lights = read();
            match leds {
                Some(l) => {
                    l.set_link(lights.link);
                    l.set_activity(lights.activity);
                    // Leds logs the change itself.
                    l.set_fault(lights.fault.clone());
                }
                None if lights.fault != shown_fault => match &lights.fault {
                    Some(r) => tracing::warn!(reason = %r, "fault raised"),
                    None => tracing::info!("fault cleared"),
                },
                None => {}
            }
            shown_fault = lights.fault;
        }
        if let Some(l) = leds {
            l.tick();
        }
        if shutdown.sleep(TICK_EVERY) {
            return;
        }
    }
}

/// Starts the serial console of gateway `role` ("tx", "rx") on the
/// configured tty. A broken console must not stop images from crossing: it
/// is logged, and the gateway runs without it.
pub fn start_console(
    config: Option<&crate::config::ConsoleConfig>,
    role: &str,
    commands: Arc<dyn CommandHandler>,
    shutdown: &Shutdown,
) -> Option<Console> {
    let c = config?;
    Console::spawn(
        &c.device,
        c.baud,
        role,
        env!("CARGO_PKG_VERSION"),
        commands,
        shutdown.clone(),
    )
    .inspect_err(|e| tracing::error!(error = %e, "serial console unavailable; running without it"))
    .ok()
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn intake_stops_below_the_floor_and_resumes_a_margin_above_it() {
        let mut disk = StateDisk::new(Path::new("/state"), 64, Intake::Spool);
        assert!(disk.judge(100 * MIB).is_ok());
        let full = disk.judge(63 * MIB).unwrap_err();
        assert_eq!(full.resume_at, 65 * MIB);
        assert!(full.to_string().contains("state disk full"), "{full}");
        // Just back at the floor is not enough: no flapping.
        assert!(disk.judge(64 * MIB).is_err());
        assert!(disk.is_stopped());
        assert!(disk.judge(65 * MIB).is_ok());
        assert!(!disk.is_stopped());
    }

    #[test]
    fn a_write_that_ran_out_of_space_stops_intake_until_space_frees() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = StateDisk::new(dir.path(), 0, Intake::Shards);
        let full = disk.out_of_space();
        assert!(disk.is_stopped());
        assert!(disk.judge(full.free).is_err(), "nothing freed yet");
        assert!(disk.judge(full.free + RESUME_MARGIN).is_ok());
    }

    #[test]
    fn intake_stops_when_inodes_run_short_and_says_so() {
        let mut disk = StateDisk::new(Path::new("/state"), 64, Intake::Shards);
        assert!(disk.judge_inodes(MIN_FREE_INODES).is_ok());
        let full = disk.judge_inodes(MIN_FREE_INODES - 1).unwrap_err();
        assert_eq!(full.short_of, Shortage::Inodes);
        assert_eq!(full.resume_at, MIN_FREE_INODES + INODE_RESUME_MARGIN);
        assert_eq!(
            full.to_string(),
            format!(
                "state disk out of inodes: {} free on /state; shards are dropped until {} free",
                MIN_FREE_INODES - 1,
                MIN_FREE_INODES + INODE_RESUME_MARGIN
            )
        );
        // Bytes aplenty do not lift it; inodes freed past the margin do.
        assert!(disk.judge(100 * MIB).is_ok());
        assert!(disk.is_stopped());
        assert!(disk.judge_inodes(MIN_FREE_INODES + 10).is_err());
        assert!(disk
            .judge_inodes(MIN_FREE_INODES + INODE_RESUME_MARGIN)
            .is_ok());
        assert!(!disk.is_stopped());
    }

    #[test]
    fn disk_full_is_found_inside_wrapped_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("writing blob: {0}")]
        struct Wrapper(#[source] std::io::Error);
        let enospc = Wrapper(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_disk_full(&enospc));
        let sled_full = sled::Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_disk_full(&sled_full));
        let other = Wrapper(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(!is_disk_full(&other));
    }

    #[test]
    fn free_space_of_a_real_directory_is_known() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(Path::new("/nonexistent/dir")).is_err());
        let usage = disk_usage(dir.path()).unwrap();
        assert!(usage.total > 0 && usage.used <= usage.total);
        assert!(usage.inodes_used <= usage.inodes_total);
        let room = free_room(dir.path()).unwrap();
        assert_eq!(room.inodes.is_some(), usage.inodes_total > 0);
    }

    #[test]
    fn the_excess_over_a_high_water_mark_is_what_is_used_above_it() {
        let usage = DiskUsage {
            total: 100 * MIB,
            used: 95 * MIB,
            inodes_total: 1000,
            inodes_used: 930,
        };
        assert_eq!(usage.above_percent(90), 5 * MIB);
        assert_eq!(usage.inodes_above_percent(90), 30);
        assert_eq!(usage.inodes_above_percent(95), 0);
        let uncounted = DiskUsage {
            inodes_total: 0,
            inodes_used: 0,
            ..usage
        };
        assert_eq!(uncounted.inodes_above_percent(0), 0);
        assert_eq!(usage.above_percent(96), 0);
        assert_eq!(usage.above_percent(250), 0);
        assert!((usage.percent_used() - 95.0).abs() < 1e-9);
    }

    #[test]
    fn faults_join_their_reasons_in_a_fixed_order() {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        enum Fault {
            StateDiskFull,
            DeliveryFailing,
        }
        let f = Faults::default();
        assert_eq!(f.reason(), None);
        f.raise(Fault::DeliveryFailing, "delivery failing: registry down");
        f.raise(Fault::StateDiskFull, "state disk full: 0.1 MiB free");
        assert_eq!(
            f.reason().as_deref(),
            Some("state disk full: 0.1 MiB free; delivery failing: registry down")
        );
        f.clear(Fault::StateDiskFull);
        assert!(!f.is_raised(Fault::StateDiskFull));
        assert_eq!(
            f.reason().as_deref(),
            Some("delivery failing: registry down")
        );
    }

    #[test]
    fn disk_full_names_what_it_stops() {
        let mut disk = StateDisk::new(Path::new("/state"), 64, Intake::Spool);
        let full = disk.judge(MIB).unwrap_err().to_string();
        assert!(full.ends_with("intake resumes at 65.0 MiB free"), "{full}");
        let mut disk = StateDisk::new(Path::new("/state"), 64, Intake::Shards);
        let full = disk.judge(MIB).unwrap_err().to_string();
        assert!(
            full.ends_with("shards are dropped until 65.0 MiB free"),
            "{full}"
        );
    }

    #[test]
    fn counter_window_counts_growth_within_its_span_only() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = CounterWindow::new(Duration::from_secs(60));
        w.observe(0, at(0));
        w.observe(150, at(10));
        assert_eq!(w.growth(), 150);
        assert!((w.per_second() - 15.0).abs() < 1e-9);
        w.observe(160, at(65));
        // The burst at 10 s is still inside the last minute.
        assert_eq!(w.growth(), 160);
        w.observe(160, at(80));
        // Now the baseline is the sample at 10 s (150): the burst has aged out.
        assert_eq!(w.growth(), 10);
        w.observe(160, at(140));
        assert_eq!(w.growth(), 0);
    }

    #[test]
    fn movement_remembers_when_a_counter_last_changed() {
        let t0 = Instant::now();
        let mut m = Movement::default();
        m.observe(5, t0);
        assert!(
            !m.moved_within(Duration::from_secs(3), t0),
            "a first value is no movement"
        );
        m.observe(6, t0 + Duration::from_secs(1));
        assert!(m.moved_within(Duration::from_secs(3), t0 + Duration::from_secs(2)));
        m.observe(6, t0 + Duration::from_secs(5));
        assert!(!m.moved_within(Duration::from_secs(3), t0 + Duration::from_secs(5)));
    }
}
