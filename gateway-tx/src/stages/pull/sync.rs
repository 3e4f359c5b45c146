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
//! Validation is whole-file: one bad entry refuses the file, with the file,
//! the entry (`images[0]`, `repositories[2]`) and the field named, so the
//! previous list stays in force.

use crate::ingest::reference::ImageRef;
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
        todo!("{tag}")
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
        todo!("{text}")
    }

    /// Whether an index entry's platform is this one. Without a variant
    /// here, any variant matches.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        todo!("{os}{architecture}{variant:?}")
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
        todo!("{}", path.display())
    }

    /// Parses and validates `text`; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<SyncList, SyncError> {
        todo!("{text}{origin}")
    }
}
