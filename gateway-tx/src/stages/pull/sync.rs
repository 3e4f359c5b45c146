//! The sync list: which source images and repositories pull mode follows,
//! and where each lands on the high side.
//!
//! The file is the image sync tool's mapping list (`images:` with `source`
//! and `destination`), valid as it is, plus `repositories:` whose tags are
//! followed through a filter:
//!
//! ```yaml
//! images:                       # exact references
//!   - source: 127.0.0.1:5001/team-a/app:1.4
//!     destination: team-a/app:1.4
//! repositories:                 # follow a repository's tags
//!   - source: 127.0.0.1:5001/team-b/svc
//!     destination: mirror/team-b/svc        # tags keep their names
//!     tags: {allow: ['^v\d+\.\d+\.\d+$'], deny: ['-rc'], semver: '>=2.0.0'}
//!     platforms: [linux/amd64]              # optional
//!     interval_s: 60                        # optional
//! ```
//!
//! An `images:` source written with both a tag and a digest is pulled by
//! the digest. Source references without a registry host are Docker Hub's
//! (`alpine` is `docker.io/library/alpine`); a host written in front of a
//! destination is dropped.
//!
//! Validation is whole-file: one bad entry refuses the file, with the file,
//! the entry (`images[0]`, `repositories[2]`) and the field named, so the
//! previous list stays in force.

use crate::ingest::reference::ImageRef;
use regex::Regex;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// Largest sync file read.
pub const MAX_SYNC_FILE_BYTES: u64 = 4 << 20;

/// A validated sync list.
#[derive(Debug, Clone)]
pub struct SyncList {
    pub entries: Vec<SyncEntry>,
}

/// One entry of the list.
#[derive(Debug, Clone)]
pub struct SyncEntry {
    /// `images[0]`, `repositories[1]`: how logs, status and errors name it.
    pub name: String,
    /// The source reference as written (for logs, status and scan `{ref}`).
    pub source_text: String,
    pub source: SourceRepository,
    pub selection: Selection,
    /// The destination repository on the high side (a registry host written
    /// in front of it is dropped). For an exact image its tag is the
    /// destination tag (`latest` when none is written); for a followed
    /// repository the tag is None: tags keep their names.
    pub destination: ImageRef,
    /// Platforms to keep of an index (`linux/amd64`, `linux/arm64/v8`).
    /// None: the whole index crosses unchanged.
    pub platforms: Option<Vec<Platform>>,
    /// The entry's own poll period, overriding `[pull] interval_s`.
    pub interval: Option<Duration>,
}

/// A repository on a source registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceRepository {
    /// `host[:port]` as written; `docker.io` when the reference names none.
    pub host: String,
    /// The repository path on that host (`library/x` for a one-component
    /// Docker Hub name).
    pub repository: String,
}

/// What of a source repository an entry takes.
#[derive(Debug, Clone)]
pub enum Selection {
    /// One tag (`app:1.4`; `latest` when neither tag nor digest is written).
    Tag(String),
    /// One manifest by digest (`app@sha256:...`).
    Digest(String),
    /// Every tag the filter selects.
    Follow(TagFilter),
}

/// `tags: {allow, deny, semver}` of a followed repository. A tag is
/// selected when it matches some `allow` pattern (or there are none), no
/// `deny` pattern, and, with `semver`, parses as a version (a leading `v`
/// allowed) inside the range.
#[derive(Debug, Clone, Default)]
pub struct TagFilter {
    pub allow: Vec<regex::Regex>,
    pub deny: Vec<regex::Regex>,
    pub semver: Option<semver::VersionReq>,
}

impl TagFilter {
    pub fn selects(&self, tag: &str) -> bool {
        let allowed = self.allow.is_empty() || self.allow.iter().any(|r| r.is_match(tag));
        if !allowed || self.deny.iter().any(|r| r.is_match(tag)) {
            return false;
        }
        match &self.semver {
            None => true,
            Some(range) => tag_version(tag).is_some_and(|v| range.matches(&v)),
        }
    }
}

/// `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(text: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let word = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(word) {
            return Err(format!(
                "{text:?} is not os/architecture[/variant] (linux/amd64, linux/arm64/v8)"
            ));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }

    /// Whether an index entry's platform is this one. Without a variant
    /// here, any variant matches.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == architecture
            && self.variant.as_deref().is_none_or(|v| Some(v) == variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A sync file that cannot be used; names the file, the entry and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{}: {message}", file, entry.as_deref().map(|e| format!(": {e}")).unwrap_or_default(), field.as_deref().map(|f| format!(".{f}")).unwrap_or_default())]
pub struct SyncError {
    pub file: String,
    pub entry: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl SyncList {
    /// Reads and validates the file (at most [`MAX_SYNC_FILE_BYTES`]).
    pub fn load(path: &Path) -> Result<SyncList, SyncError> {
        let file = path.display().to_string();
        let refuse = |message: String| SyncError {
            file: file.clone(),
            entry: None,
            field: None,
            message,
        };
        let bytes = read_bounded(path).map_err(refuse)?;
        let text = String::from_utf8(bytes).map_err(|e| refuse(format!("is not UTF-8: {e}")))?;
        SyncList::parse(&text, &file)
    }

    /// Parses and validates `text`; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<SyncList, SyncError> {
        // An empty file (or one of comments only) is an empty list.
        let raw: Option<RawFile> =
            serde_yaml::from_str(text).map_err(|e| yaml_error(origin, &e))?;
        let raw = raw.unwrap_or_default();
        let refuse = |entry: &str, bad: Bad| SyncError {
            file: origin.to_string(),
            entry: Some(entry.to_string()),
            field: Some(bad.field),
            message: bad.message,
        };
        let mut entries = Vec::new();
        for (i, r) in raw.images.unwrap_or_default().into_iter().enumerate() {
            let name = format!("images[{i}]");
            entries.push(image_entry(r, &name).map_err(|b| refuse(&name, b))?);
        }
        for (i, r) in raw.repositories.unwrap_or_default().into_iter().enumerate() {
            let name = format!("repositories[{i}]");
            entries.push(repository_entry(r, &name).map_err(|b| refuse(&name, b))?);
        }
        check_destinations(&entries).map_err(|(i, b)| refuse(&entries[i].name, b))?;
        Ok(SyncList { entries })
    }
}

/// The file as written, before validation. Unknown keys are refused so a
/// misspelt `platfroms` does not silently pull every platform.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename = "SyncList")]
struct RawFile {
    #[serde(default)]
    images: Option<Vec<RawImage>>,
    #[serde(default)]
    repositories: Option<Vec<RawRepository>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    source: String,
    destination: String,
    /// Accepted only to refuse it with a sentence saying where it belongs.
    #[serde(default)]
    tags: Option<serde_yaml::Value>,
    #[serde(default)]
    platforms: Option<Vec<String>>,
    #[serde(default)]
    interval_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    source: String,
    destination: String,
    #[serde(default)]
    tags: Option<RawTags>,
    #[serde(default)]
    platforms: Option<Vec<String>>,
    #[serde(default)]
    interval_s: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTags {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    semver: Option<String>,
}

/// Longest `interval_s`: a year. Longer is surely a typo, and keeps
/// `Instant + interval` far from overflowing.
const MAX_INTERVAL_S: u64 = 365 * 24 * 3600;

/// A field of an entry that does not validate.
struct Bad {
    field: String,
    message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> Bad {
    Bad {
        field: field.into(),
        message: message.into(),
    }
}

fn image_entry(r: RawImage, name: &str) -> Result<SyncEntry, Bad> {
    if r.tags.is_some() {
        return Err(bad(
            "tags",
            "only repositories: entries follow tags; an images: entry takes the tag or digest its source names",
        ));
    }
    let source = parse_source(&r.source).map_err(|m| bad("source", m))?;
    // A digest names the manifest exactly; a tag written beside it is only
    // a label, so the digest is what is pulled.
    let selection = match (source.digest, source.tag) {
        (Some(d), _) => Selection::Digest(d),
        (None, Some(t)) => Selection::Tag(t),
        (None, None) => Selection::Tag("latest".to_string()),
    };
    let mut destination =
        ImageRef::parse(&r.destination).map_err(|e| bad("destination", e.to_string()))?;
    if destination.tag.is_none() {
        // A digest only: the high side needs a tag to put the image under.
        match &selection {
            Selection::Tag(t) => destination.tag = Some(t.clone()),
            _ => {
                return Err(bad(
                    "destination",
                    format!(
                        "{:?} names a digest and no tag, and the source is pulled by digest: write the destination tag",
                        r.destination
                    ),
                ))
            }
        }
    }
    Ok(SyncEntry {
        name: name.to_string(),
        source_text: r.source,
        source: source.repository,
        selection,
        destination,
        platforms: platforms(r.platforms)?,
        interval: interval(r.interval_s)?,
    })
}

fn repository_entry(r: RawRepository, name: &str) -> Result<SyncEntry, Bad> {
    let source = parse_source(&r.source).map_err(|m| bad("source", m))?;
    if source.tag.is_some() || source.digest.is_some() {
        return Err(bad(
            "source",
            format!(
                "{:?} names a tag or digest; a followed repository is written without one, its tags are chosen by `tags`",
                r.source
            ),
        ));
    }
    if names_tag_or_digest(&r.destination) {
        return Err(bad(
            "destination",
            format!(
                "{:?} names a tag or digest; a followed repository's tags keep their names, so write the repository only",
                r.destination
            ),
        ));
    }
    let mut destination =
        ImageRef::parse(&r.destination).map_err(|e| bad("destination", e.to_string()))?;
    destination.tag = None;
    let tags = r.tags.unwrap_or_default();
    let compile = |list: &[String], key: &str| -> Result<Vec<Regex>, Bad> {
        list.iter()
            .enumerate()
            .map(|(j, p)| {
                Regex::new(p).map_err(|e| {
                    bad(
                        format!("tags.{key}[{j}]"),
                        format!("{p:?} is not a regular expression: {}", one_line(&e)),
                    )
                })
            })
            .collect()
    };
    let filter = TagFilter {
        allow: compile(&tags.allow, "allow")?,
        deny: compile(&tags.deny, "deny")?,
        semver: match &tags.semver {
            None => None,
            Some(text) => Some(semver::VersionReq::parse(text).map_err(|e| {
                bad(
                    "tags.semver",
                    format!("{text:?} is not a version range (>=2.0.0, ^1.4, ~1.2.3): {e}"),
                )
            })?),
        },
    };
    Ok(SyncEntry {
        name: name.to_string(),
        source_text: r.source,
        source: source.repository,
        selection: Selection::Follow(filter),
        destination,
        platforms: platforms(r.platforms)?,
        interval: interval(r.interval_s)?,
    })
}

fn platforms(list: Option<Vec<String>>) -> Result<Option<Vec<Platform>>, Bad> {
    let Some(list) = list else {
        return Ok(None);
    };
    if list.is_empty() {
        return Err(bad(
            "platforms",
            "an empty list keeps no platform; leave `platforms` out to take the whole index",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(j, p)| Platform::parse(p).map_err(|m| bad(format!("platforms[{j}]"), m)))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn interval(seconds: Option<u64>) -> Result<Option<Duration>, Bad> {
    match seconds {
        None => Ok(None),
        Some(s) if (1..=MAX_INTERVAL_S).contains(&s) => Ok(Some(Duration::from_secs(s))),
        Some(s) => Err(bad(
            "interval_s",
            format!("{s} is not between 1 and {MAX_INTERVAL_S} seconds"),
        )),
    }
}

/// Two exact images cannot land on one destination tag: whichever was
/// pulled last would win, poll after poll. Entries that say the same thing
/// twice are harmless and allowed. Returns the later entry's index.
fn check_destinations(entries: &[SyncEntry]) -> Result<(), (usize, Bad)> {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let pick = match &e.selection {
            Selection::Tag(t) | Selection::Digest(t) => t.as_str(),
            Selection::Follow(_) => continue,
        };
        let key = (
            e.destination.repository.as_str(),
            e.destination.tag.as_deref().unwrap_or_default(),
        );
        let Some(&j) = seen.get(&key) else {
            seen.insert(key, i);
            continue;
        };
        let other = &entries[j];
        let other_pick = match &other.selection {
            Selection::Tag(t) | Selection::Digest(t) => t.as_str(),
            Selection::Follow(_) => "",
        };
        if other.source != e.source || other_pick != pick {
            return Err((
                i,
                bad(
                    "destination",
                    format!(
                        "{} is also the destination of {} (from {}); one tag cannot hold two images",
                        e.destination.name(),
                        other.name,
                        other.source_text
                    ),
                ),
            ));
        }
    }
    Ok(())
}

/// A source reference taken apart.
struct ParsedSource {
    repository: SourceRepository,
    tag: Option<String>,
    digest: Option<String>,
}

/// Parses `[host[:port]/]path[:tag][@digest]`. The first component is a
/// host when it has a `.` or `:` or is `localhost`, as docker decides;
/// otherwise the host is Docker Hub, where a one-component name lives
/// under `library/`.
fn parse_source(text: &str) -> Result<ParsedSource, String> {
    let (name, digest) = match text.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (text, None),
    };
    if let Some(d) = digest {
        if weir_proto::ObjectId::from_digest(d).is_err() {
            return Err(format!("{text:?}: digest {d:?} is not sha256:<64 hex>"));
        }
    }
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (path, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    if let Some(t) = tag {
        weir_proto::check_tag(t).map_err(|e| format!("{text:?}: {e}"))?;
    }
    let (host, path) = match path.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, rest)
        }
        _ => ("docker.io", path),
    };
    check_host(host).map_err(|why| format!("{text:?}: registry host {host:?} {why}"))?;
    let repository = if host == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    weir_proto::check_repository(&repository).map_err(|e| format!("{text:?}: {e}"))?;
    Ok(ParsedSource {
        repository: SourceRepository {
            host: host.to_string(),
            repository,
        },
        tag: tag.map(str::to_string),
        digest: digest.map(str::to_string),
    })
}

/// `name[:port]`, the name a DNS name, IPv4 address or `[IPv6]`. The host
/// becomes part of a URL, so nothing else is let through.
fn check_host(host: &str) -> Result<(), &'static str> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !p.contains(']') => (n, Some(p)),
        _ => (host, None),
    };
    if let Some(p) = port {
        if !p.bytes().all(|b| b.is_ascii_digit()) || !matches!(p.parse::<u16>(), Ok(1..)) {
            return Err("has a port that is not 1 to 65535");
        }
    }
    let ok = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => {
            !v6.is_empty()
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => {
            !name.is_empty()
                && !name.starts_with(['-', '.'])
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    if ok {
        Ok(())
    } else {
        Err("is not a DNS name or IP address")
    }
}

/// Whether a repository reference carries a tag (a `:` in its last
/// component) or a digest. ImageRef::parse cannot say: it fills in `latest`.
fn names_tag_or_digest(reference: &str) -> bool {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    reference.contains('@') || last.contains(':')
}

/// The regex crate's multi-line error (pattern, caret, reason) on one line,
/// for logs and the status page.
fn one_line(e: &regex::Error) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.bytes().all(|b| b == b'^' || b == b'~'))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tag read as a version: one leading `v` dropped, and `1.2` or `1` read
/// as `1.2.0` or `1.0.0`, as registries commonly tag releases.
fn tag_version(tag: &str) -> Option<semver::Version> {
    let t = tag.strip_prefix('v').unwrap_or(tag);
    if let Ok(v) = semver::Version::parse(t) {
        return Some(v);
    }
    let (core, rest) = t.split_at(t.find(['-', '+']).unwrap_or(t.len()));
    let parts = core.split('.').count();
    if parts >= 3 {
        return None;
    }
    semver::Version::parse(&format!("{core}{}{rest}", ".0".repeat(3 - parts))).ok()
}

/// A serde_yaml error as a SyncError: its path (`images[0].platforms`),
/// when it has one, becomes the entry and field; its message keeps the line
/// and column.
fn yaml_error(origin: &str, e: &serde_yaml::Error) -> SyncError {
    let mut text = e.to_string();
    if let Some(at) = e.location() {
        if !text.contains(" line ") {
            text.push_str(&format!(" at line {} column {}", at.line(), at.column()));
        }
    }
    let mut error = SyncError {
        file: origin.to_string(),
        entry: None,
        field: None,
        message: text.clone(),
    };
    let Some((path, message)) = text.split_once(": ") else {
        return error;
    };
    let is_path = (path.starts_with("images") || path.starts_with("repositories"))
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.[]".contains(&b));
    if is_path {
        let (entry, field) = match path.split_once('.') {
            Some((entry, field)) => (entry, Some(field.to_string())),
            None => (path, None),
        };
        error.entry = Some(entry.to_string());
        error.field = field;
        error.message = message.to_string();
    }
    error
}

/// Reads at most [`MAX_SYNC_FILE_BYTES`] of a regular file.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: a FIFO in the file's place opens at once instead of
    // waiting for a writer; the type check below then refuses it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot be opened: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".to_string());
    }
    if meta.len() > MAX_SYNC_FILE_BYTES {
        return Err(format!(
            "is {} bytes, more than the {MAX_SYNC_FILE_BYTES} a sync file may have",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow after the size check: read no more than the bound.
    file.take(MAX_SYNC_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() as u64 > MAX_SYNC_FILE_BYTES {
        return Err(format!(
            "grew past the {MAX_SYNC_FILE_BYTES} bytes a sync file may have"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
images:                       # exact references
  - source: 127.0.0.1:5001/team-a/app:1.4
    destination: team-a/app:1.4
repositories:                 # follow a repository's tags
  - source: 127.0.0.1:5001/team-b/svc
    destination: mirror/team-b/svc        # tags keep their names
    tags: {allow: ['^v\d+\.\d+\.\d+$'], deny: ['-rc'], semver: '>=2.0.0'}
    platforms: [linux/amd64]              # optional
    interval_s: 60                        # optional
"#;

    fn parse(text: &str) -> Result<SyncList, SyncError> {
        SyncList::parse(text, "sync.yaml")
    }

    /// The error for `text`, checked to name the file, the entry and the
    /// field in its Display.
    fn refused(text: &str, entry: &str, field: &str) -> SyncError {
        let e = parse(text).expect_err(text);
        let shown = e.to_string();
        assert_eq!(e.file, "sync.yaml", "{shown}");
        assert_eq!(e.entry.as_deref(), Some(entry), "{shown}");
        assert_eq!(e.field.as_deref(), Some(field), "{shown}");
        assert!(
            shown.starts_with(&format!("sync.yaml: {entry}.{field}: ")),
            "{shown}"
        );
        e
    }

    fn repo_entry(extra: &str) -> String {
        format!(
            "repositories:\n  - source: reg.example/team/svc\n    destination: team/svc\n{extra}"
        )
    }

    fn image_entry(extra: &str) -> String {
        format!("images:\n  - source: reg.example/team/app:1\n    destination: team/app:1\n{extra}")
    }

    #[test]
    fn the_documented_example_parses() {
        let list = parse(EXAMPLE).unwrap();
        assert_eq!(list.entries.len(), 2);

        let a = &list.entries[0];
        assert_eq!(a.name, "images[0]");
        assert_eq!(a.source_text, "127.0.0.1:5001/team-a/app:1.4");
        assert_eq!(
            a.source,
            SourceRepository {
                host: "127.0.0.1:5001".into(),
                repository: "team-a/app".into()
            }
        );
        assert!(matches!(&a.selection, Selection::Tag(t) if t == "1.4"));
        assert_eq!(a.destination.name(), "team-a/app:1.4");
        assert_eq!(a.platforms, None);
        assert_eq!(a.interval, None);

        let b = &list.entries[1];
        assert_eq!(b.name, "repositories[0]");
        assert_eq!(b.source.host, "127.0.0.1:5001");
        assert_eq!(b.source.repository, "team-b/svc");
        assert_eq!(b.destination.repository, "mirror/team-b/svc");
        assert_eq!(b.destination.tag, None);
        let Selection::Follow(filter) = &b.selection else {
            panic!("{:?}", b.selection);
        };
        assert_eq!(filter.allow.len(), 1);
        assert_eq!(filter.deny.len(), 1);
        assert!(filter.semver.is_some());
        assert_eq!(
            b.platforms,
            Some(vec![Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None
            }])
        );
        assert_eq!(b.interval, Some(Duration::from_secs(60)));
    }

    #[test]
    fn the_image_sync_tools_list_parses_as_it_is() {
        let text = r#"
images:
  - source: "source-registry.com/repo/image:tag"
    destination: "destination-registry.com/repo/image:tag"
  - source: "source-registry.com:5000/repo/other:1.0"
    destination: "destination-registry.com:443/mirror/other:1.0"
    platforms: [linux/arm64/v8]
    interval_s: 3600
"#;
        let list = parse(text).unwrap();
        let a = &list.entries[0];
        assert_eq!(a.source.host, "source-registry.com");
        assert_eq!(a.source.repository, "repo/image");
        assert!(matches!(&a.selection, Selection::Tag(t) if t == "tag"));
        assert_eq!(a.destination.name(), "repo/image:tag");
        let b = &list.entries[1];
        assert_eq!(b.source.host, "source-registry.com:5000");
        assert_eq!(b.destination.name(), "mirror/other:1.0");
        assert_eq!(
            b.platforms.as_ref().unwrap()[0].to_string(),
            "linux/arm64/v8"
        );
        assert_eq!(b.interval, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn empty_lists_are_valid() {
        for text in [
            "",
            "# nothing yet\n",
            "images: []\n",
            "images:\nrepositories: []\n",
        ] {
            assert!(parse(text).unwrap().entries.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn docker_hub_defaults_and_selections() {
        let d = format!("sha256:{}", "a".repeat(64));
        let text = format!(
            "images:\n\
             - {{source: alpine, destination: base/alpine}}\n\
             - {{source: docker.io/nginx:1.25, destination: base/nginx:1.25}}\n\
             - {{source: 'localhost/team/app@{d}', destination: team/app:pinned}}\n\
             - {{source: 'team/app:1@{d}', destination: team/app:pinned-hub}}\n\
             - {{source: 'team/x:7', destination: 'team/x@{d}'}}\n"
        );
        let list = parse(&text).unwrap();
        let e = &list.entries;
        assert_eq!(e[0].source.host, "docker.io");
        assert_eq!(e[0].source.repository, "library/alpine");
        assert!(matches!(&e[0].selection, Selection::Tag(t) if t == "latest"));
        assert_eq!(e[0].destination.name(), "base/alpine:latest");
        assert_eq!(e[1].source.host, "docker.io");
        assert_eq!(e[1].source.repository, "library/nginx");
        assert_eq!(e[2].source.host, "localhost");
        assert!(matches!(&e[2].selection, Selection::Digest(x) if *x == d));
        // A digest wins over a tag written beside it.
        assert_eq!(e[3].source.host, "docker.io");
        assert!(matches!(&e[3].selection, Selection::Digest(x) if *x == d));
        // A destination with a digest only takes the source's tag.
        assert_eq!(e[4].destination.name(), "team/x:7");
    }

    #[test]
    fn yaml_syntax_errors_name_the_file_and_line() {
        let e = parse("images:\n  - source: [a\n").unwrap_err();
        let shown = e.to_string();
        assert!(shown.starts_with("sync.yaml: "), "{shown}");
        assert!(shown.contains("line "), "{shown}");
        assert!(shown.contains("column "), "{shown}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = parse("imagez: []\n").unwrap_err();
        assert!(e.to_string().starts_with("sync.yaml: "), "{e}");
        assert!(e.message.contains("imagez"), "{e}");
        assert!(e.message.contains("line 1 column 1"), "{e}");

        let e = parse(&image_entry("    platfroms: [linux/amd64]\n")).unwrap_err();
        assert_eq!(e.entry.as_deref(), Some("images[0]"), "{e}");
        assert!(e.message.contains("platfroms"), "{e}");
        assert!(e.to_string().starts_with("sync.yaml: images[0]"), "{e}");
        assert!(e.message.contains("line 4"), "{e}");

        let e = parse(&repo_entry("    tags: {allow: [x], denny: [y]}\n")).unwrap_err();
        assert_eq!(e.entry.as_deref(), Some("repositories[0]"), "{e}");
        assert!(e.message.contains("denny"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_entry_and_field() {
        let e = parse(&repo_entry("    interval_s: soon\n")).unwrap_err();
        assert_eq!(e.entry.as_deref(), Some("repositories[0]"), "{e}");
        assert_eq!(e.field.as_deref(), Some("interval_s"), "{e}");
        assert!(e.message.contains("line 4"), "{e}");
    }

    #[test]
    fn bad_regexes_name_their_index() {
        let e = refused(
            &repo_entry("    tags: {allow: ['^v', 'a(']}\n"),
            "repositories[0]",
            "tags.allow[1]",
        );
        assert!(e.message.contains("a("), "{e}");
        assert!(!e.message.contains('\n'), "{e}");
        refused(
            &repo_entry("    tags: {deny: ['[z-a]']}\n"),
            "repositories[0]",
            "tags.deny[0]",
        );
    }

    #[test]
    fn bad_semver_ranges_are_refused() {
        refused(
            &repo_entry("    tags: {semver: 'two or more'}\n"),
            "repositories[0]",
            "tags.semver",
        );
    }

    #[test]
    fn a_followed_repository_names_no_tag() {
        let text = "repositories:\n  - {source: reg.example/team/svc:1, destination: team/svc}\n";
        refused(text, "repositories[0]", "source");
        let text = format!(
            "repositories:\n  - {{source: 'reg.example/team/svc@sha256:{}', destination: team/svc}}\n",
            "b".repeat(64)
        );
        refused(&text, "repositories[0]", "source");
        let text = "repositories:\n  - {source: reg.example/team/svc, destination: team/svc:1}\n";
        refused(text, "repositories[0]", "destination");
        // A port on a destination host is not a tag.
        let text = "repositories:\n  - {source: reg.example/team/svc, destination: 'high.example:5000/team/svc'}\n";
        assert_eq!(
            parse(text).unwrap().entries[0].destination.repository,
            "team/svc"
        );
    }

    #[test]
    fn tags_belong_to_repositories_only() {
        refused(
            &image_entry("    tags: {allow: [x]}\n"),
            "images[0]",
            "tags",
        );
    }

    #[test]
    fn bad_platforms_and_intervals_are_refused() {
        refused(
            &repo_entry("    platforms: [linux]\n"),
            "repositories[0]",
            "platforms[0]",
        );
        refused(
            &repo_entry("    platforms: [linux/amd64, linux//v8]\n"),
            "repositories[0]",
            "platforms[1]",
        );
        refused(
            &image_entry("    platforms: []\n"),
            "images[0]",
            "platforms",
        );
        refused(
            &repo_entry("    interval_s: 0\n"),
            "repositories[0]",
            "interval_s",
        );
        refused(
            &image_entry("    interval_s: 99999999999\n"),
            "images[0]",
            "interval_s",
        );
    }

    #[test]
    fn bad_references_are_refused() {
        let d = format!("sha256:{}", "c".repeat(64));
        for (source, destination, field) in [
            ("Team/App:1", "team/app:1", "source"),
            ("reg.example/team/app:", "team/app:1", "source"),
            ("reg.example/team/app@sha256:xyz", "team/app:1", "source"),
            ("reg.example:0/team/app:1", "team/app:1", "source"),
            ("reg ex.com/team/app:1", "team/app:1", "source"),
            ("reg.example/team//app:1", "team/app:1", "source"),
            ("", "team/app:1", "source"),
            ("team/app:1", "Team/app:1", "destination"),
            ("team/app:1", "", "destination"),
            (
                &format!("team/app@{d}"),
                &format!("team/app@{d}"),
                "destination",
            ),
        ] {
            let text =
                format!("images:\n  - source: '{source}'\n    destination: '{destination}'\n");
            refused(&text, "images[0]", field);
        }
    }

    #[test]
    fn two_sources_cannot_share_a_destination_tag() {
        let text = "images:\n\
                    - {source: a.example/team/app:1, destination: team/app:1}\n\
                    - {source: a.example/team/app:1, destination: 'high.example/team/app:1'}\n\
                    - {source: b.example/team/app:1, destination: team/app:1}\n";
        let e = refused(text, "images[2]", "destination");
        assert!(e.message.contains("images[0]"), "{e}");
        // The same tag of two followed repositories is not checked here:
        // which tags exist is known only when polling.
        let text = "repositories:\n\
                    - {source: a.example/team/app, destination: team/app}\n\
                    - {source: b.example/team/app, destination: team/app}\n";
        assert_eq!(parse(text).unwrap().entries.len(), 2);
    }

    #[test]
    fn the_filter_selects_as_documented() {
        let list = parse(EXAMPLE).unwrap();
        let Selection::Follow(f) = &list.entries[1].selection else {
            panic!("not followed");
        };
        for (tag, want) in [
            ("v2.1.0", true),
            ("v2.0.0", true),
            ("v10.0.3", true),
            ("v2.1.0-rc1", false), // denied by '-rc' (and not allowed either)
            ("v1.9.0", false),     // outside >=2.0.0
            ("latest", false),     // refused by the allow pattern
            ("2.1.0", false),      // the allow pattern wants the 'v'
        ] {
            assert_eq!(f.selects(tag), want, "{tag}");
        }

        let only = |text: &str| {
            let list = parse(&repo_entry(&format!("    tags: {text}\n"))).unwrap();
            match &list.entries[0].selection {
                Selection::Follow(f) => f.clone(),
                other => panic!("{other:?}"),
            }
        };
        let any = TagFilter::default();
        assert!(any.selects("latest") && any.selects("v1"));
        let deny = only("{deny: ['-rc']}");
        assert!(deny.selects("2.1.0") && !deny.selects("2.1.0-rc1"));
        let range = only("{semver: '>=2.0.0'}");
        assert!(range.selects("2.0.0"));
        assert!(range.selects("v3"), "1 component padded");
        assert!(range.selects("2.1"), "2 components padded");
        assert!(!range.selects("1.9"));
        assert!(!range.selects("vv2.0.0"), "one 'v' only");
        assert!(!range.selects("latest"));
        assert!(!range.selects("2.1.0-rc1"), "semver: pre-releases excluded");
        let pre = only("{semver: '>=2.1.0-rc0, <2.2.0'}");
        assert!(
            pre.selects("2.1.0-rc1"),
            "semver: pre-release of the same version"
        );
        assert!(pre.selects("2.1.0"));
    }

    #[test]
    fn platforms_match_with_or_without_variant() {
        let arm = Platform::parse("linux/arm64").unwrap();
        assert!(arm.matches("linux", "arm64", Some("v8")));
        assert!(arm.matches("linux", "arm64", None));
        assert!(!arm.matches("linux", "amd64", None));
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        assert!(v7.matches("linux", "arm", Some("v7")));
        assert!(!v7.matches("linux", "arm", Some("v6")));
        assert!(!v7.matches("linux", "arm", None));
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/amd 64"] {
            assert!(Platform::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn load_reads_only_bounded_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("sync.yaml");
        std::fs::write(&good, EXAMPLE).unwrap();
        assert_eq!(SyncList::load(&good).unwrap().entries.len(), 2);

        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "images: [{source: a/b}]\n").unwrap();
        let e = SyncList::load(&bad).unwrap_err();
        assert_eq!(e.file, bad.display().to_string());

        let e = SyncList::load(dir.path()).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");

        let device = dir.path().join("zero.yaml");
        std::os::unix::fs::symlink("/dev/zero", &device).unwrap();
        let e = SyncList::load(&device).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");

        let big = dir.path().join("big.yaml");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_SYNC_FILE_BYTES + 1).unwrap();
        let e = SyncList::load(&big).unwrap_err();
        assert!(e.message.contains("more than"), "{e}");

        let e = SyncList::load(&dir.path().join("none.yaml")).unwrap_err();
        assert!(e.to_string().contains("none.yaml: cannot be opened"), "{e}");
    }
}
