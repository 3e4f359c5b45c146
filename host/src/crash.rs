//! Crash points: the named places between two durable steps of a gateway.
//!
//! Every commit point (a [`StateDb::commit`](crate::state::StateDb::commit)
//! names its point) and every step between two of them (a rename into a
//! store, a payload written, a file moved) calls [`crash_point`]. When the
//! environment names a point in `WEIR_CRASH_AT` (`name`, or `name@N` for its
//! N-th pass), the process aborts there: no unwinding, no flush, what a
//! `kill -9` at exactly that instant would leave. Tests walk every point this
//! way and check that a restart still delivers each image once.
//!
//! The hook is compiled in always and read once: a cargo feature would be
//! unified into whichever build also compiles the tests, so release and test
//! binaries could differ without anyone asking for it. Unset, a point costs
//! one load of an initialised cell.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms one crash point.
pub const CRASH_AT_ENV: &str = "WEIR_CRASH_AT";

struct Armed {
    name: String,
    at_pass: u64,
    passes: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(CRASH_AT_ENV).ok()?;
            let (name, at_pass) = parse(&spec);
            tracing::warn!(point = %name, pass = at_pass, "crash point armed: this process will abort there");
            Some(Armed {
                name,
                at_pass,
                passes: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// `name` or `name@N` (N ≥ 1; anything else means the first pass).
fn parse(spec: &str) -> (String, u64) {
    match spec.rsplit_once('@') {
        Some((name, n)) => (
            name.to_string(),
            n.parse().ok().filter(|&n| n >= 1).unwrap_or(1),
        ),
        None => (spec.to_string(), 1),
    }
}

/// Marks a crash point; aborts the process if it is the armed one.
#[inline]
pub fn crash_point(name: &'static str) {
    let Some(armed) = armed() else { return };
    if armed.name == name && armed.passes.fetch_add(1, Ordering::Relaxed) + 1 == armed.at_pass {
        // stderr, not the log: the logger may buffer, and this is the last word.
        eprintln!("crash point {name} reached: aborting");
        std::process::abort();
    }
}

/// Every point named in the Rust sources under `dir`: the literals passed
/// to [`crash_point`] and to a state database's `commit`. A gateway's test
/// compares them with the list its crash test walks.
pub fn points_named_in(
    dir: &std::path::Path,
) -> std::io::Result<std::collections::BTreeSet<String>> {
    let mut found = std::collections::BTreeSet::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path)?;
                for call in ["crash_point(\"", ".commit(\""] {
                    for (at, _) in text.match_indices(call) {
                        let rest = &text[at + call.len()..];
                        if let Some(end) = rest.find('"') {
                            found.insert(rest[..end].to_string());
                        }
                    }
                }
            }
        }
    }
    found.remove("test");
    Ok(found)
}

/// Panics, naming the difference, unless the points named in the sources
/// under `src` are exactly `listed`: a gateway's unit test calls it so that
/// a commit point added without being listed fails.
pub fn assert_points_listed(src: &std::path::Path, listed: &[&str]) {
    let in_code = match points_named_in(src) {
        Ok(found) => found,
        Err(e) => panic!("reading {}: {e}", src.display()),
    };
    let listed: std::collections::BTreeSet<String> = listed.iter().map(|p| p.to_string()).collect();
    let unlisted: Vec<_> = in_code.difference(&listed).collect();
    let gone: Vec<_> = listed.difference(&in_code).collect();
    assert!(
        unlisted.is_empty() && gone.is_empty(),
        "crash points named in the code but not listed: {unlisted:?}; listed but not in the code: {gone:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_point_and_a_pass() {
        assert_eq!(
            parse("rx.ledger.verified"),
            ("rx.ledger.verified".into(), 1)
        );
        assert_eq!(
            parse("tx.objects.renamed@3"),
            ("tx.objects.renamed".into(), 3)
        );
        assert_eq!(parse("x@0"), ("x".into(), 1));
        assert_eq!(parse("x@y"), ("x".into(), 1));
    }

    #[test]
    fn an_unarmed_point_returns() {
        // The test process never sets the variable.
        crash_point("nowhere");
    }
}
