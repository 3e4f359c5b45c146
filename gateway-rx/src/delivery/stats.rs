//! Delivery attempts, failures and push durations per target since the
//! gateway started, for the metrics endpoint. The durable queue keeps
//! per-job counts; these are rates an operator can alert on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use weir_host::metrics::{Histogram, HistogramSnapshot, LATENCY_BUCKETS_SECONDS};

use super::Target;

/// One target's counts.
#[derive(Debug)]
pub struct TargetStats {
    attempts: AtomicU64,
    failures: AtomicU64,
    /// Time an attempt that succeeded took: a push to the registry, or an
    /// export into the layout.
    push_duration: Histogram,
}

impl Default for TargetStats {
    fn default() -> Self {
        TargetStats {
            attempts: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            push_duration: Histogram::new(LATENCY_BUCKETS_SECONDS),
        }
    }
}

impl TargetStats {
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn push_duration(&self) -> HistogramSnapshot {
        self.push_duration.snapshot()
    }
}

/// Every target's counts, shared by delivery and the metrics endpoint.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    registry: TargetStats,
    oci_layout: TargetStats,
}

impl DeliveryStats {
    pub fn of(&self, target: Target) -> &TargetStats {
        match target {
            Target::Registry => &self.registry,
            Target::OciLayout => &self.oci_layout,
        }
    }

    pub fn attempt_started(&self, target: Target) {
        self.of(target).attempts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn attempt_failed(&self, target: Target) {
        self.of(target).failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn delivered(&self, target: Target, took: Duration) {
        self.of(target).push_duration.observe(took.as_secs_f64());
    }
}
