//! Plain-text reports, one fact per line: the console commands both
//! gateways answer, and how their answers and `gateway-rx status` print
//! faults, list headings, image digests and counters, so that an operator
//! reads them the same way everywhere and a script can parse them.

use crate::Command;
use std::fmt::Write;

/// A console command that takes no arguments.
pub const fn command(name: &'static str, summary: &'static str) -> Command {
    Command {
        name,
        usage: "",
        summary,
    }
}

/// `status`: the state of the gateway in a few lines.
pub const STATUS: Command = command(
    "status",
    "link state, rates, queue, per image progress, faults",
);

/// `stats`: every counter, [`counter_lines`].
pub const STATS: Command = command("stats", "the counters");

/// `fault: <reasons>`, or `fault: none` when all is well.
pub fn fault_line(out: &mut String, reason: Option<&str>) {
    let _ = writeln!(out, "fault: {}", reason.unwrap_or("none"));
}

/// The heading of a list of `len` items: `name:`. An empty list gets
/// `name: <empty>` instead, or no heading at all when `empty` is `None`.
pub fn list_heading(out: &mut String, name: &str, len: usize, empty: Option<&str>) {
    match (len, empty) {
        (0, Some(empty)) => {
            let _ = writeln!(out, "{name}: {empty}");
        }
        (0, None) => {}
        _ => {
            let _ = writeln!(out, "{name}:");
        }
    }
}

/// A list answer: what `write` makes of each item, in order, or the
/// sentence `none` when there is no item.
pub fn list_or<T>(none: &str, items: &[T], mut write: impl FnMut(&mut String, &T)) -> String {
    if items.is_empty() {
        return none.into();
    }
    let mut out = String::new();
    for item in items {
        write(&mut out, item);
    }
    out
}

/// The two digests an image is known by, indented under its line.
pub fn image_digests(out: &mut String, manifest_digest: &str, image: &str) {
    let _ = writeln!(out, "  manifest {manifest_digest}");
    let _ = writeln!(out, "  image    {image}");
}

/// One counter a line, `name value`.
pub fn counter_lines<'a>(out: &mut String, counters: impl IntoIterator<Item = (&'a str, u64)>) {
    for (name, value) in counters {
        let _ = writeln!(out, "{name} {value}");
    }
}

/// Unix seconds as UTC, `2024-05-01T12:00:00Z`: times an operator
/// compares across the two sides (whose clocks may differ) and logs.
pub fn utc_text(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_the_same_in_every_report() {
        let mut out = String::new();
        fault_line(&mut out, None);
        fault_line(&mut out, Some("state disk full"));
        list_heading(&mut out, "images", 0, Some("none"));
        list_heading(&mut out, "objects arriving", 0, None);
        list_heading(&mut out, "images", 2, Some("none"));
        image_digests(&mut out, "sha256:bb", "sha256:aa");
        counter_lines(&mut out, [("frames", 3), ("pass", 0)]);
        assert_eq!(list_or("no images", &[] as &[u8], |_, _| {}), "no images");
        let listed = list_or("no images", &[1, 2], |out, n| {
            let _ = writeln!(out, "image {n}");
        });
        assert_eq!(listed, "image 1\nimage 2\n");
        assert_eq!(
            out,
            "fault: none\nfault: state disk full\nimages: none\nimages:\n  manifest sha256:bb\n  image    sha256:aa\nframes 3\npass 0\n"
        );
    }

    #[test]
    fn utc_text_writes_the_civil_date() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_text(1_714_564_800), "2024-05-01T12:00:00Z");
    }
}
