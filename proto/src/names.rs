//! Repository and tag names as the OCI distribution spec defines them.
//!
//! Both sides check names against this grammar before a name reaches a
//! registry or an OCI layout: the sender so that a drop cannot carry a
//! name no registry accepts, the receiver because a compromised sender can
//! sign any bytes, and a name is also a path and a ref in `index.json`.

/// Longest repository name (every component and slash) accepted.
pub const MAX_REPOSITORY_LEN: usize = 255;
/// Longest tag, as the spec bounds it.
pub const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name {0:?} is longer than {MAX_REPOSITORY_LEN} characters")]
    RepositoryTooLong(String),
    #[error("repository name {0:?} is not lowercase components [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'")]
    RepositoryGrammar(String),
    #[error("tag {0:?} is not [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")]
    TagGrammar(String),
}

/// Checks `name` (e.g. `team/app`) against the spec's
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn check_repository(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_REPOSITORY_LEN {
        return Err(NameError::RepositoryTooLong(shorten(name)));
    }
    if name.split('/').all(valid_component) {
        Ok(())
    } else {
        Err(NameError::RepositoryGrammar(shorten(name)))
    }
}

/// Checks a tag against `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn check_tag(tag: &str) -> Result<(), NameError> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(NameError::TagGrammar(shorten(tag)))
    }
}

/// One path component: alphanumeric runs joined by `.`, `_`, `__` or `-+`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or any number of '-'.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Error messages quote at most this much of a hostile name.
fn shorten(s: &str) -> String {
    shorten_to(s, 80)
}

/// `s` cut to at most `max` bytes on a character boundary, saying how long
/// it was: for quoting a text a peer chose in a message or a record that
/// is kept (a byte cut inside a character would panic).
pub fn shorten_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}… ({} bytes)", cut_to(s, max), s.len())
}

/// The longest start of `s` of at most `max` bytes that ends on a
/// character boundary.
pub fn cut_to(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_registries_accept_pass() {
        for ok in [
            "app",
            "team/app",
            "team-a/my.app",
            "a/b/c/d",
            "x__y",
            "x---y",
            "library/ubuntu_22",
        ] {
            assert_eq!(check_repository(ok), Ok(()), "{ok}");
        }
        for ok in ["latest", "1.0", "_x", "v1.2.3-rc.1", &"a".repeat(128)] {
            assert_eq!(check_tag(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            "../../x",
            "/tmp/x",
            "team/../x",
            "team//x",
            "Team/app",
            "team/app\0",
            "team/.app",
            "team/app.",
            "a...b",
            "a___b",
            "a.-b",
            "team/app:1",
            &"a".repeat(256),
        ] {
            assert!(check_repository(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "../x",
            "-x",
            ".x",
            "a/b",
            "a\0",
            "a b",
            &"a".repeat(129),
        ] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_quote_a_bounded_part_of_the_name() {
        let long = "a".repeat(10_000);
        let msg = check_repository(&long).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
        assert!(msg.contains("10000 bytes"), "{msg}");
    }
}
