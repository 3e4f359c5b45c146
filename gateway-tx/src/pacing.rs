//! Pacing: a token bucket on wire bytes. A diode has no flow control;
//! whatever is sent above its rate is lost, so the sender never bursts past
//! `rate_bps` for longer than the bucket's small capacity.
//!
//! Tokens accrue from the monotonic clock, so sleeping too long (the kernel
//! wakes us late) is made up by the next sends instead of lowering the
//! average rate, as long as the lateness stays under the capacity. Waits
//! sleep until shortly before the deadline and spin the rest, which keeps
//! sub-millisecond accuracy without burning a core on long waits.

use std::time::{Duration, Instant};

/// The last stretch of a wait is spun rather than slept. Short: a late
/// wake-up (the kernel's timer slack is 50 µs) is made up by the bucket,
/// while time spun is CPU the sealing workers (or a receiver on the same
/// machine) do not get; spinning the last 100 µs, the link thread of a
/// crossing paced at 4.5 Gb/s took half as much CPU again.
const SPIN: Duration = Duration::from_micros(20);

/// Token bucket arithmetic, clock supplied by the caller: the one bucket
/// every rate limit of weir uses.
pub use weir_proto::pacing::TokenBucket;

/// The bucket plus the waiting.
pub struct Pacer {
    bucket: TokenBucket,
}

impl Pacer {
    pub fn new(rate_bps: u64, capacity: u64) -> Self {
        Pacer {
            bucket: TokenBucket::new(rate_bps, capacity, Instant::now()),
        }
    }

    /// Blocks until `bytes` may be sent, then takes them.
    pub fn acquire(&mut self, bytes: u64) {
        let now = Instant::now();
        let wait = self.bucket.delay_for(bytes, now);
        if !wait.is_zero() {
            wait_until(now + wait);
        }
        self.bucket.consume(bytes, Instant::now());
    }
}

/// Sleeps until shortly before `deadline`, then spins.
pub fn wait_until(deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Bytes sent over the last full second, for status.
#[derive(Debug)]
pub struct RateMeter {
    window_start: Instant,
    bytes_in_window: u64,
    last_rate_bps: u64,
}

impl RateMeter {
    pub fn new(now: Instant) -> Self {
        RateMeter {
            window_start: now,
            bytes_in_window: 0,
            last_rate_bps: 0,
        }
    }

    pub fn add(&mut self, bytes: u64, now: Instant) {
        self.roll(now);
        self.bytes_in_window += bytes;
    }

    fn roll(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.window_start);
        if dt >= Duration::from_secs(1) {
            self.last_rate_bps = (self.bytes_in_window as f64 * 8.0 / dt.as_secs_f64()) as u64;
            self.bytes_in_window = 0;
            self.window_start = now;
        }
    }

    /// Bits per second over the last completed window.
    pub fn rate_bps(&mut self, now: Instant) -> u64 {
        self.roll(now);
        if now.saturating_duration_since(self.window_start) > Duration::from_secs(2) {
            0
        } else {
            self.last_rate_bps
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_bucket_sends_at_once_then_waits_for_the_rate() {
        let t0 = Instant::now();
        // 8000 bit/s = 1000 B/s, capacity 100 B.
        let mut b = TokenBucket::new(8000, 100, t0);
        assert_eq!(b.delay_for(100, t0), Duration::ZERO);
        b.consume(100, t0);
        assert_eq!(b.delay_for(50, t0), Duration::from_millis(50));
        assert_eq!(
            b.delay_for(50, t0 + Duration::from_millis(50)),
            Duration::ZERO
        );
    }

    #[test]
    fn idle_time_never_buys_more_than_the_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(8000, 100, t0);
        b.consume(100, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.delay_for(100, later), Duration::ZERO);
        b.consume(100, later);
        assert!(b.delay_for(1, later) > Duration::ZERO);
    }

    #[test]
    fn request_larger_than_capacity_still_goes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(8000, 100, t0);
        // Waits for 400 more bytes: 0.4 s.
        assert_eq!(b.delay_for(500, t0), Duration::from_millis(400));
        b.consume(500, t0 + Duration::from_millis(400));
        // The debt is paid before anything else goes.
        assert!(b.delay_for(1, t0 + Duration::from_millis(400)) > Duration::ZERO);
    }

    /// Simulated clock: waits the bucket asks for, oversleeping by a varying
    /// amount as a kernel does; over 10 s the rate stays within 2 %.
    #[test]
    fn late_wakeups_do_not_lower_the_average_rate() {
        let rate_bps = 100_000_000u64;
        let frame = 1400u64;
        let cap = TokenBucket::capacity_for(rate_bps, Duration::from_millis(2), frame);
        let t0 = Instant::now();
        let mut b = TokenBucket::new(rate_bps, cap, t0);
        let mut now = t0;
        let end = t0 + Duration::from_secs(10);
        let mut sent = 0u64;
        let mut jitter = 7u64;
        while now < end {
            let wait = b.delay_for(frame, now);
            if !wait.is_zero() {
                jitter = (jitter * 1103515245 + 12345) % 400; // 0..400 µs late
                now += wait + Duration::from_micros(jitter);
            }
            b.consume(frame, now);
            sent += frame;
        }
        let measured = sent as f64 * 8.0 / (now - t0).as_secs_f64();
        let err = (measured - rate_bps as f64).abs() / rate_bps as f64;
        assert!(
            err < 0.02,
            "measured {measured:.0} bit/s, error {:.3} %",
            err * 100.0
        );
    }

    #[test]
    fn meter_reports_the_last_second() {
        let t0 = Instant::now();
        let mut m = RateMeter::new(t0);
        m.add(1000, t0);
        m.add(250, t0 + Duration::from_millis(500));
        assert_eq!(m.rate_bps(t0 + Duration::from_millis(1000)), 10_000);
        assert_eq!(m.rate_bps(t0 + Duration::from_secs(5)), 0);
    }
}
