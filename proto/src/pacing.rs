//! Pacing: one token bucket on bytes, clock supplied by the caller.
//!
//! A one-way link has no flow control: what is sent above its rate is lost.
//! The bucket refills at a fixed byte rate up to its capacity (the largest
//! burst) and starts full. Three ways to use it:
//!
//! - a sender that waits: [`TokenBucket::delay_for`] then
//!   [`TokenBucket::consume`] (the sender's carousel);
//! - a sender that takes first and waits after: [`TokenBucket::reserve`]
//!   (the serial line, through [`LinePacer`]);
//! - a policer that drops what exceeds the rate: [`TokenBucket::try_take`]
//!   (a simulated diode).
//!
//! Nothing here reads a clock or sleeps: the caller passes `now` and does
//! the waiting.

use std::time::{Duration, Instant};

/// Token bucket arithmetic on bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    bytes_per_s: f64,
    capacity: f64,
    /// Bytes that may go now; negative while a debt is being paid off.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate_bps` in bits per second; `capacity` in bytes, the largest burst.
    /// Starts full.
    pub fn new(rate_bps: u64, capacity: u64, now: Instant) -> Self {
        Self::with_byte_rate(rate_bps as f64 / 8.0, capacity as f64, now)
    }

    /// A bucket that refills at `bytes_per_s` and holds `capacity` bytes;
    /// starts full.
    pub fn with_byte_rate(bytes_per_s: f64, capacity: f64, now: Instant) -> Self {
        TokenBucket {
            bytes_per_s,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// A capacity of about `window` worth of the rate, but at least two
    /// frames (a batch must always fit).
    pub fn capacity_for(rate_bps: u64, window: Duration, frame_bytes: u64) -> u64 {
        let by_time = (rate_bps as f64 / 8.0 * window.as_secs_f64()) as u64;
        by_time.max(2 * frame_bytes)
    }

    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes_per_s
    }

    /// The largest burst, in bytes.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Adds what the rate earned since the last call, up to the capacity.
    /// A `now` earlier than the last one adds nothing.
    pub fn refill(&mut self, now: Instant) {
        if now > self.last {
            let dt = (now - self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.bytes_per_s).min(self.capacity);
            self.last = now;
        }
    }

    /// How long to wait before `bytes` may go; zero when they may go now.
    pub fn delay_for(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        // A request larger than the capacity waits for a full bucket plus
        // the rest, rather than forever.
        let need = bytes as f64 - self.tokens.min(self.capacity);
        if need <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.bytes_per_s)
        }
    }

    /// Takes `bytes` (the caller waited `delay_for` first). The balance may go
    /// slightly negative after a large request; later sends wait for it.
    pub fn consume(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }

    /// Takes `bytes` at `now` and returns how long to wait before putting
    /// them on the line. A caller that always waits what it is told never
    /// sends more than `capacity + rate × t` bytes in any interval `t`.
    pub fn reserve(&mut self, bytes: u64, now: Instant) -> Duration {
        self.consume(bytes, now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.bytes_per_s)
        }
    }

    /// Takes `bytes` if the bucket holds them at `now`; false (and nothing
    /// taken) otherwise, as a link without flow control drops them.
    pub fn try_take(&mut self, bytes: u64, now: Instant) -> bool {
        self.refill(now);
        self.take(bytes)
    }

    /// [`try_take`](Self::try_take) at the time of the last refill, for a
    /// caller that refills once for a batch of arrivals.
    pub fn take(&mut self, bytes: u64) -> bool {
        if self.tokens < bytes as f64 {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }
}

/// The pacing of an asynchronous serial line: a token bucket on line
/// bytes, with writes cut to the burst.
#[derive(Debug, Clone)]
pub struct LinePacer {
    bucket: TokenBucket,
}

impl LinePacer {
    /// A bucket that refills at `bytes_per_sec` (at least 1) and holds
    /// `burst` bytes (at least 1), full at `now`.
    pub fn new(bytes_per_sec: u64, burst: usize, now: Instant) -> Self {
        LinePacer {
            bucket: TokenBucket::with_byte_rate(
                bytes_per_sec.max(1) as f64,
                burst.max(1) as f64,
                now,
            ),
        }
    }

    /// Pacing for an asynchronous serial line at `baud`, 8N1: ten bits on
    /// the wire per byte. The burst is 20 ms of line time (at least 16
    /// bytes), so writes stay small and the line never runs ahead by more.
    pub fn for_baud(baud: u32, now: Instant) -> Self {
        let rate = u64::from(baud / 10).max(1);
        Self::new(rate, (rate / 50).max(16) as usize, now)
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bucket.bytes_per_sec() as u64
    }

    /// The largest write that keeps the promise; callers cut writes to it.
    pub fn burst(&self) -> usize {
        self.bucket.capacity() as usize
    }

    /// Takes `n` bytes from the bucket at `now`; returns how long to wait
    /// before writing them.
    pub fn reserve(&mut self, n: usize, now: Instant) -> Duration {
        self.bucket.reserve(n as u64, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_policer_drops_what_the_bucket_does_not_hold() {
        let t0 = Instant::now();
        // 1000 B/s, 100 B deep.
        let mut b = TokenBucket::with_byte_rate(1000.0, 100.0, t0);
        assert!(b.try_take(60, t0));
        assert!(!b.try_take(60, t0), "only 40 bytes left");
        assert!(b.try_take(40, t0));
        // 20 ms earn 20 bytes.
        let t1 = t0 + Duration::from_millis(20);
        assert!(!b.try_take(21, t1));
        assert!(b.try_take(20, t1));
    }

    #[test]
    fn a_clock_that_goes_back_earns_nothing() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = TokenBucket::with_byte_rate(1000.0, 100.0, t0);
        b.consume(100, t0);
        b.refill(t0 - Duration::from_secs(1));
        assert!(!b.try_take(1, t0));
    }

    #[test]
    fn pacer_waits_once_the_burst_is_spent() {
        let t0 = Instant::now();
        let mut p = LinePacer::new(1000, 100, t0);
        assert_eq!(p.reserve(100, t0), Duration::ZERO);
        // Another 100 bytes at once must wait 100 ms of line time.
        let d = p.reserve(100, t0);
        assert!((d.as_secs_f64() - 0.1).abs() < 1e-6, "{d:?}");
        // An idle second refills the bucket, but only up to the burst.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(p.reserve(100, t1), Duration::ZERO);
        assert!(p.reserve(1, t1) > Duration::ZERO);
    }

    #[test]
    fn pacer_for_115200_baud_is_11520_bytes_per_second() {
        let p = LinePacer::for_baud(115_200, Instant::now());
        assert_eq!(p.bytes_per_sec(), 11_520);
        assert_eq!(p.burst(), 230);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the write sizes and idle gaps, the bytes written in any
        /// interval never exceed burst + rate × interval.
        #[test]
        fn pacer_never_exceeds_the_line_rate(
            rate in 100u64..100_000,
            burst in 1usize..500,
            steps in proptest::collection::vec((1usize..500, 0u64..50_000), 1..120),
        ) {
            let t0 = Instant::now();
            let mut p = LinePacer::new(rate, burst, t0);
            let mut t = t0;
            let mut writes: Vec<(Instant, usize)> = Vec::new();
            for (n, gap_us) in steps {
                let n = n.min(p.burst());
                t += Duration::from_micros(gap_us);
                t += p.reserve(n, t);
                writes.push((t, n));
            }
            for i in 0..writes.len() {
                let mut sum = 0usize;
                for w in &writes[i..] {
                    sum += w.1;
                    let span = (w.0 - writes[i].0).as_secs_f64();
                    let allowed = burst as f64 + rate as f64 * span;
                    prop_assert!(sum as f64 <= allowed + 1e-3, "{} bytes in {}s", sum, span);
                }
            }
        }

        /// Back to back, the pacer runs at the line rate, not below it.
        #[test]
        fn pacer_keeps_the_line_busy(rate in 100u64..100_000, burst in 1usize..500, chunks in 10usize..200) {
            let t0 = Instant::now();
            let mut p = LinePacer::new(rate, burst, t0);
            let mut t = t0;
            for _ in 0..chunks {
                t += p.reserve(burst, t);
            }
            let expected = ((chunks - 1) * burst) as f64 / rate as f64;
            prop_assert!(((t - t0).as_secs_f64() - expected).abs() < 1e-3);
        }
    }
}
