//! The `[host/]namespace/repo:tag` reference written into archives.

use std::io;

/// A tagged image reference as the generator writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// Registry host (with port) when the reference names one.
    pub host: Option<String>,
    /// Repository path without host, e.g. `team-a/app`.
    pub repository: String,
    pub tag: String,
}

impl ImageReference {
    /// Parses `[host/]path:tag`. A tag is required (archives always carry
    /// one); digest references are refused because a generated archive
    /// names its image by tag.
    pub fn parse(reference: &str) -> io::Result<Self> {
        let invalid = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("image reference {reference:?}: {why}"),
            )
        };
        if reference.contains('@') {
            return Err(invalid("digest references are not supported"));
        }
        let slash = reference.rfind('/').map_or(0, |i| i + 1);
        let colon = reference[slash..]
            .rfind(':')
            .map(|i| slash + i)
            .ok_or_else(|| invalid("missing :tag"))?;
        let (name, tag) = (&reference[..colon], &reference[colon + 1..]);
        if tag.is_empty() || name.is_empty() {
            return Err(invalid("empty repository or tag"));
        }
        let (host, repository) = match name.split_once('/') {
            // Same rule as Docker: a first component with '.' or ':' or
            // exactly "localhost" is a registry host.
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first.to_string()), rest.to_string())
            }
            _ => (None, name.to_string()),
        };
        if repository.is_empty() || repository.split('/').any(str::is_empty) {
            return Err(invalid("empty path component"));
        }
        Ok(Self {
            host,
            repository,
            tag: tag.to_string(),
        })
    }

    /// `repository:tag` with the host if one was given (the form written to
    /// `RepoTags` by `docker save`).
    pub fn full(&self) -> String {
        format!("{}:{}", self.name(), self.tag)
    }

    /// `[host/]repository` without the tag.
    pub fn name(&self) -> String {
        match &self.host {
            Some(host) => format!("{host}/{}", self.repository),
            None => self.repository.clone(),
        }
    }

    /// Docker's fully qualified name: `docker.io/` added when no host is
    /// given, and `library/` for single-component Docker Hub names (what
    /// skopeo writes to `RepoTags` and containerd to
    /// `io.containerd.image.name`).
    pub fn docker_qualified(&self) -> String {
        match &self.host {
            Some(_) => self.full(),
            None if !self.repository.contains('/') => {
                format!("docker.io/library/{}:{}", self.repository, self.tag)
            }
            None => format!("docker.io/{}:{}", self.repository, self.tag),
        }
    }

    /// Name without tag, docker-qualified (key of skopeo's `repositories`).
    pub fn docker_qualified_name(&self) -> String {
        let full = self.docker_qualified();
        match full.rfind(':') {
            Some(i) => full[..i].to_string(),
            None => full,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespace_repo_and_tag() {
        let r = ImageReference::parse("team-a/app:1.0").unwrap();
        assert_eq!(r.host, None);
        assert_eq!(r.repository, "team-a/app");
        assert_eq!(r.tag, "1.0");
        assert_eq!(r.full(), "team-a/app:1.0");
        assert_eq!(r.docker_qualified(), "docker.io/team-a/app:1.0");
        assert_eq!(r.docker_qualified_name(), "docker.io/team-a/app");
    }

    #[test]
    fn host_with_port_is_not_a_tag() {
        let r = ImageReference::parse("127.0.0.1:5000/team-a/app:2").unwrap();
        assert_eq!(r.host.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.repository, "team-a/app");
        assert_eq!(r.tag, "2");
        assert_eq!(r.docker_qualified(), "127.0.0.1:5000/team-a/app:2");
        assert!(ImageReference::parse("127.0.0.1:5000/team-a/app").is_err());
    }

    #[test]
    fn single_component_hub_names_get_library() {
        let r = ImageReference::parse("alpine:3").unwrap();
        assert_eq!(r.docker_qualified(), "docker.io/library/alpine:3");
    }

    #[test]
    fn refuses_digests_and_missing_tags() {
        assert!(ImageReference::parse("team-a/app").is_err());
        assert!(ImageReference::parse("team-a/app@sha256:00").is_err());
        assert!(ImageReference::parse("team-a//app:1").is_err());
        assert!(ImageReference::parse(":1").is_err());
    }
}
