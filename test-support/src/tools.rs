//! System programs some tests need (`docker-registry`, `socat`, `skopeo`,
//! `openssl`, qemu, `promtool`), found on `PATH`, and the one rule for when
//! one is missing: the test says which Debian package to install and skips,
//! except under `CI=true`, where the same message fails it. A CI run must
//! not pass by skipping the tests it exists to run.
//!
//! [`decide`] takes `PATH` and `CI` as arguments, so the rule itself is
//! tested without depending on what this machine has installed; [`find`]
//! and [`or_skip`] read them from the environment.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// A program tests run, and the Debian package that installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The file name looked up on `PATH`.
    pub program: &'static str,
    /// What to `apt-get install` for it.
    pub package: &'static str,
}

/// distribution's registry 2.x, as Debian packages it.
pub const DOCKER_REGISTRY: Tool = Tool {
    program: "docker-registry",
    package: "docker-registry",
};

/// Makes pty pairs for the serial-line and console tests.
pub const SOCAT: Tool = Tool {
    program: "socat",
    package: "socat",
};

/// Loads generated images into a registry and reads them back.
pub const SKOPEO: Tool = Tool {
    program: "skopeo",
    package: "skopeo",
};

/// Makes the test CA and server certificates for TLS registries.
pub const OPENSSL: Tool = Tool {
    program: "openssl",
    package: "openssl",
};

/// Boots the appliance image.
pub const QEMU: Tool = Tool {
    program: "qemu-system-x86_64",
    package: "qemu-system-x86",
};

/// Checks the metrics endpoints' text (`promtool check metrics`).
pub const PROMTOOL: Tool = Tool {
    program: "promtool",
    package: "prometheus",
};

/// A tool that is not on `PATH` while `CI=true`: the test must fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{program} not found on PATH; install it with: apt-get install -y {package} (CI=true: a missing tool fails the test instead of skipping it)")]
pub struct MissingTool {
    pub program: &'static str,
    pub package: &'static str,
}

/// Whether `CI` (the variable's value) says this is a CI run.
pub fn is_ci(ci: Option<&OsStr>) -> bool {
    ci.is_some_and(|v| v == "true")
}

/// The first executable file named `program` in the directories of `path`
/// (a `PATH` value).
pub fn find_on_path(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The skip/fail rule, given `PATH` and `CI`: `Ok(Some(program))` when the
/// tool is found, `Ok(None)` when the test should skip, `Err` when it must
/// fail (missing under `CI=true`).
pub fn decide(
    tool: Tool,
    path: Option<&OsStr>,
    ci: Option<&OsStr>,
) -> Result<Option<PathBuf>, MissingTool> {
    match find_on_path(tool.program, path) {
        Some(found) => Ok(Some(found)),
        None if is_ci(ci) => Err(MissingTool {
            program: tool.program,
            package: tool.package,
        }),
        None => Ok(None),
    }
}

/// [`decide`] with this process's `PATH` and `CI`; prints how to install
/// the tool when the test is to skip.
pub fn find(tool: Tool) -> Result<Option<PathBuf>, MissingTool> {
    let found = decide(
        tool,
        std::env::var_os("PATH").as_deref(),
        std::env::var_os("CI").as_deref(),
    )?;
    if found.is_none() {
        eprintln!(
            "SKIPPED: {} not found on PATH; install it with: apt-get install -y {}",
            tool.program, tool.package
        );
    }
    Ok(found)
}

/// [`find`] for tests that skip by returning early: `None` to skip; panics
/// (fails the test) under `CI=true` when the tool is missing.
pub fn or_skip(tool: Tool) -> Option<PathBuf> {
    match find(tool) {
        Ok(found) => found,
        Err(missing) => panic!("{missing}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// A PATH of one temporary directory, with `programs` in it as
    /// executable files.
    fn path_with(programs: &[&str]) -> (tempfile::TempDir, OsString) {
        let dir = tempfile::tempdir().unwrap();
        for program in programs {
            let file = dir.path().join(program);
            std::fs::write(&file, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = std::env::join_paths([dir.path()]).unwrap();
        (dir, path)
    }

    #[test]
    fn a_missing_registry_fails_under_ci_true() {
        let (_dir, path) = path_with(&["socat"]);
        let err = decide(DOCKER_REGISTRY, Some(&path), Some(OsStr::new("true"))).unwrap_err();
        assert_eq!(
            err,
            MissingTool {
                program: "docker-registry",
                package: "docker-registry"
            }
        );
        let message = err.to_string();
        assert!(
            message.contains("apt-get install -y docker-registry"),
            "{message}"
        );
        // No PATH at all is no better.
        assert!(decide(DOCKER_REGISTRY, None, Some(OsStr::new("true"))).is_err());
    }

    #[test]
    fn a_missing_registry_skips_outside_ci() {
        let (_dir, path) = path_with(&["socat"]);
        assert_eq!(decide(DOCKER_REGISTRY, Some(&path), None), Ok(None));
        assert_eq!(
            decide(DOCKER_REGISTRY, Some(&path), Some(OsStr::new("false"))),
            Ok(None)
        );
        assert_eq!(
            decide(DOCKER_REGISTRY, Some(&path), Some(OsStr::new(""))),
            Ok(None)
        );
    }

    #[test]
    fn a_tool_on_path_is_found_whatever_ci_says() {
        let (dir, path) = path_with(&["docker-registry", "skopeo"]);
        for ci in [None, Some(OsStr::new("true"))] {
            assert_eq!(
                decide(DOCKER_REGISTRY, Some(&path), ci),
                Ok(Some(dir.path().join("docker-registry")))
            );
            assert_eq!(
                decide(SKOPEO, Some(&path), ci),
                Ok(Some(dir.path().join("skopeo")))
            );
        }
    }

    #[test]
    fn a_file_that_is_not_executable_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("socat"), "").unwrap();
        std::fs::set_permissions(
            dir.path().join("socat"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("skopeo")).unwrap();
        let path = std::env::join_paths([dir.path()]).unwrap();
        assert_eq!(find_on_path("socat", Some(&path)), None);
        assert_eq!(find_on_path("skopeo", Some(&path)), None);
        assert!(decide(SOCAT, Some(&path), Some(OsStr::new("true"))).is_err());
        assert!(decide(QEMU, Some(&path), Some(OsStr::new("true"))).is_err());
        let err = decide(PROMTOOL, Some(&path), Some(OsStr::new("true"))).unwrap_err();
        assert!(
            err.to_string().contains("apt-get install -y prometheus"),
            "{err}"
        );
    }
}
