//! The Prometheus text format (version 0.0.4), written from what a gateway
//! already counts, and the latency histogram it keeps for itself.
//!
//! Samples are gathered per family and written at the end, so each family
//! gets its `# HELP` and `# TYPE` lines once and its samples together, in
//! whatever order the caller visits them.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The content type of [`Exposition::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds, in seconds, for operations that take from a blink to
/// minutes (a push of a large image to a slow registry).
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

/// A metric family's type, as the `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

struct Family {
    name: String,
    help: String,
    kind: MetricKind,
    /// Sample lines, each ending in a newline.
    samples: String,
}

/// One scrape's text, built family by family.
#[derive(Default)]
pub struct Exposition {
    families: Vec<Family>,
    index: HashMap<String, usize>,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter sample; `name` ends in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        let line = sample_line(name, labels, None, &value.to_string());
        self.family(name, help, MetricKind::Counter).push_str(&line);
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let line = sample_line(name, labels, None, &format_float(value));
        self.family(name, help, MetricKind::Gauge).push_str(&line);
    }

    /// A gauge that is 1 when `on`, else 0.
    pub fn flag(&mut self, name: &str, help: &str, labels: &[(&str, &str)], on: bool) {
        self.gauge(name, help, labels, if on { 1.0 } else { 0.0 });
    }

    /// A histogram's cumulative `_bucket` samples (the last `le="+Inf"`),
    /// `_sum` and `_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) {
        let mut lines = String::new();
        let bucket = format!("{name}_bucket");
        for (bound, count) in h.bounds.iter().zip(&h.cumulative) {
            let le = format_float(*bound);
            lines.push_str(&sample_line(&bucket, labels, Some(&le), &count.to_string()));
        }
        lines.push_str(&sample_line(
            &bucket,
            labels,
            Some("+Inf"),
            &h.count.to_string(),
        ));
        lines.push_str(&sample_line(
            &format!("{name}_sum"),
            labels,
            None,
            &format_float(h.sum),
        ));
        lines.push_str(&sample_line(
            &format!("{name}_count"),
            labels,
            None,
            &h.count.to_string(),
        ));
        self.family(name, help, MetricKind::Histogram)
            .push_str(&lines);
    }

    /// The text: each family's HELP and TYPE lines, then its samples.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
            out.push_str(&f.samples);
        }
        out
    }

    /// The sample lines of family `name`, declared on first use. The HELP
    /// text and type given first stand.
    fn family(&mut self, name: &str, help: &str, kind: MetricKind) -> &mut String {
        debug_assert!(valid_name(name), "metric name {name:?}");
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    help: help.to_string(),
                    kind,
                    samples: String::new(),
                });
                self.index.insert(name.to_string(), self.families.len() - 1);
                self.families.len() - 1
            }
        };
        let family = &mut self.families[i];
        debug_assert_eq!(family.kind, kind, "{name} declared twice, as two types");
        &mut family.samples
    }
}

/// `name{a="x",le="1"} value\n`; `le` goes last, after the caller's labels.
fn sample_line(name: &str, labels: &[(&str, &str)], le: Option<&str>, value: &str) -> String {
    let mut line = String::from(name);
    let all = labels.iter().copied().chain(le.map(|v| ("le", v)));
    let mut first = true;
    for (label, v) in all {
        debug_assert!(valid_name(label) && !label.contains(':'), "label {label:?}");
        line.push(if first { '{' } else { ',' });
        first = false;
        let _ = write!(line, "{label}=\"{}\"", escape_label_value(v));
    }
    if !first {
        line.push('}');
    }
    let _ = writeln!(line, " {value}");
    line
}

/// Label values escape backslash, double quote and newline.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text escapes backslash and newline (a quote stays).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Go's float syntax, which Prometheus parses: `+Inf`, `-Inf`, `NaN`, and
/// Rust's shortest decimal otherwise (never an exponent).
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Observations counted into fixed buckets, from any thread without a lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the overflow (above the last bound); not
    /// cumulative, so an observation touches one bucket.
    buckets: Vec<AtomicU64>,
    /// The f64 bits of the sum of observations.
    sum_bits: AtomicU64,
}

/// A [`Histogram`] at one instant, buckets cumulative as the format wants.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Observations at or below each bound.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    /// `bounds` must be increasing.
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0u64;
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        for b in &self.buckets {
            running += b.load(Ordering::Relaxed);
            cumulative.push(running);
        }
        // The overflow bucket's running total is every observation: the
        // count, so that `+Inf` and `_count` always agree.
        let count = cumulative.pop().unwrap_or(0);
        HistogramSnapshot {
            bounds: self.bounds,
            cumulative,
            count,
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        let mut e = Exposition::new();
        e.gauge(
            "weir_test_images",
            "Images.",
            &[("state", "a\\b\"c\nd"), ("target", "plain")],
            1.0,
        );
        let text = e.render();
        assert!(
            text.contains("weir_test_images{state=\"a\\\\b\\\"c\\nd\",target=\"plain\"} 1\n"),
            "{text}"
        );
        assert_eq!(escape_label_value("x"), "x");
    }

    #[test]
    fn each_family_has_one_help_and_type_and_its_samples_together() {
        let mut e = Exposition::new();
        e.counter("weir_test_frames_total", "Frames.", &[("result", "a")], 1);
        e.gauge("weir_test_up", "Up.\nTwo lines \\ here.", &[], 1.0);
        e.counter("weir_test_frames_total", "Ignored.", &[("result", "b")], 2);
        e.gauge("weir_test_rate", "Rate.", &[], f64::INFINITY);
        let text = e.render();
        assert_eq!(
            text,
            "# HELP weir_test_frames_total Frames.\n\
             # TYPE weir_test_frames_total counter\n\
             weir_test_frames_total{result=\"a\"} 1\n\
             weir_test_frames_total{result=\"b\"} 2\n\
             # HELP weir_test_up Up.\\nTwo lines \\\\ here.\n\
             # TYPE weir_test_up gauge\n\
             weir_test_up 1\n\
             # HELP weir_test_rate Rate.\n\
             # TYPE weir_test_rate gauge\n\
             weir_test_rate +Inf\n"
        );
        assert_eq!(text.matches("# TYPE weir_test_frames_total").count(), 1);
    }

    #[test]
    fn a_histogram_writes_cumulative_buckets_sum_and_count() {
        static BOUNDS: &[f64] = &[0.5, 1.0, 2.5];
        let h = Histogram::new(BOUNDS);
        for v in [0.125, 0.5, 0.75, 2.0, 9.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![2, 3, 4]);
        assert_eq!(s.count, 5);
        assert_eq!(s.sum, 12.375);
        let mut e = Exposition::new();
        e.histogram("weir_test_seconds", "Time.", &[("target", "t")], &s);
        let text = e.render();
        assert!(
            text.contains("# TYPE weir_test_seconds histogram\n"),
            "{text}"
        );
        for line in [
            "weir_test_seconds_bucket{target=\"t\",le=\"0.5\"} 2\n",
            "weir_test_seconds_bucket{target=\"t\",le=\"1\"} 3\n",
            "weir_test_seconds_bucket{target=\"t\",le=\"2.5\"} 4\n",
            "weir_test_seconds_bucket{target=\"t\",le=\"+Inf\"} 5\n",
            "weir_test_seconds_count{target=\"t\"} 5\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            text.contains("weir_test_seconds_sum{target=\"t\"} 12.375\n"),
            "{text}"
        );
    }

    #[test]
    fn floats_use_the_syntax_prometheus_parses() {
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(0.25), "0.25");
        assert_eq!(format_float(3.0), "3");
        assert_eq!(format_float(1e21), "1000000000000000000000");
    }
}
