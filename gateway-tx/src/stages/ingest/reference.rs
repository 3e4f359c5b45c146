//! Image references: from what archives say to `namespace/repo:tag`, and
//! from the source repository to the destination one.

use crate::config::Mapping;

/// A reference with its registry host dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    /// `namespace/repo` (any depth; one component has no namespace).
    pub repository: String,
    /// None only for a digest reference without a tag.
    pub tag: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("reference {reference:?}: {why}")]
pub struct RefError {
    pub reference: String,
    pub why: &'static str,
}

impl ImageRef {
    /// Parses `[host[:port]/]path[:tag][@digest]`. A first component with a
    /// `.` or `:`, or `localhost`, is a registry host and is dropped. No tag
    /// and no digest means `latest`, as docker does.
    pub fn parse(reference: &str) -> Result<ImageRef, RefError> {
        let err = |why| RefError {
            reference: reference.to_string(),
            why,
        };
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        let last_slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (path, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        let mut parts: Vec<&str> = path.split('/').collect();
        if parts.len() > 1 {
            let first = parts[0];
            if first.contains('.') || first.contains(':') || first == "localhost" {
                parts.remove(0);
            }
        }
        let repository = parts.join("/");
        if repository.len() > weir_proto::names::MAX_REPOSITORY_LEN {
            return Err(err("repository path is longer than 255 characters"));
        }
        if weir_proto::check_repository(&repository).is_err() {
            return Err(err(
                "repository path is not lowercase [a-z0-9] components joined by '.', '_', '__' or '-'",
            ));
        }
        if let Some(t) = tag {
            if weir_proto::check_tag(t).is_err() {
                return Err(err("tag is not [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        if let Some(d) = digest {
            if weir_proto::ObjectId::from_digest(d).is_err() {
                return Err(err("digest is not sha256:<64 hex>"));
            }
        }
        let tag = match (tag, digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(ImageRef { repository, tag })
    }

    /// The first path component; empty for a one-component repository.
    pub fn namespace(&self) -> &str {
        match self.repository.split_once('/') {
            Some((ns, _)) => ns,
            None => "",
        }
    }

    /// `repository:tag`, what rules match and sent images are keyed by.
    pub fn name(&self) -> String {
        match &self.tag {
            Some(t) => format!("{}:{t}", self.repository),
            None => self.repository.clone(),
        }
    }

    /// The destination: the longest matching `from` prefix rewritten.
    pub fn mapped(&self, mappings: &[Mapping]) -> ImageRef {
        let best = mappings
            .iter()
            .filter(|m| self.repository.starts_with(&m.from))
            .max_by_key(|m| m.from.len());
        match best {
            Some(m) => ImageRef {
                repository: format!("{}{}", m.to, &self.repository[m.from.len()..]),
                tag: self.tag.clone(),
            },
            None => self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn registry_host_is_dropped() {
        assert_eq!(r("docker.io/team-a/app:1.0").name(), "team-a/app:1.0");
        assert_eq!(
            r("quay.low.example:5000/team-a/app:v2").name(),
            "team-a/app:v2"
        );
        assert_eq!(r("localhost/team-a/app:v2").name(), "team-a/app:v2");
        assert_eq!(r("team-a/app:v2").name(), "team-a/app:v2");
        assert_eq!(r("team-a/sub/app").name(), "team-a/sub/app:latest");
        assert_eq!(r("team-a/sub/app").namespace(), "team-a");
        assert_eq!(r("alpine:3").namespace(), "");
    }

    #[test]
    fn digest_references_keep_no_tag() {
        let d = format!("team-a/app@sha256:{}", "a".repeat(64));
        assert_eq!(r(&d).tag, None);
        assert_eq!(
            r(&format!("team-a/app:1@sha256:{}", "a".repeat(64)))
                .tag
                .as_deref(),
            Some("1")
        );
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in [
            "",
            "Team/App:1",
            "team-a/app:",
            "team-a//app:1",
            "a/b@sha256:xyz",
            "a/b:-x",
            "a/../b:1",
            "a/b:../x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
        // A 2000-character reference is refused, not carried.
        let long = format!("team/{}:1", "a".repeat(2000));
        assert!(ImageRef::parse(&long).is_err());
    }

    #[test]
    fn longest_mapping_prefix_wins() {
        let maps = vec![
            Mapping {
                from: "team-a/".into(),
                to: "mirror/team-a/".into(),
            },
            Mapping {
                from: "team-a/special/".into(),
                to: "vip/".into(),
            },
        ];
        assert_eq!(
            r("team-a/app:1").mapped(&maps).name(),
            "mirror/team-a/app:1"
        );
        assert_eq!(r("team-a/special/x:1").mapped(&maps).name(), "vip/x:1");
        assert_eq!(r("team-b/app:1").mapped(&maps).name(), "team-b/app:1");
    }
}
