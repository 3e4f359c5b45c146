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
}
