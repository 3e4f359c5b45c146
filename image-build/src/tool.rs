//! The Debian tools the build is made of, and how they are run.

use anyhow::{bail, Context};
use std::path::Path;
use std::process::{Command, Stdio};

/// A program the build runs, and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

/// Every program the build runs. `check_tools` refuses to start without them
/// rather than failing halfway through a ten-minute build.
pub const TOOLS: &[Tool] = &[
    Tool {
        program: "mmdebstrap",
        package: "mmdebstrap",
    },
    Tool {
        program: "mksquashfs",
        package: "squashfs-tools",
    },
    Tool {
        program: "mkfs.ext4",
        package: "e2fsprogs",
    },
    Tool {
        program: "debugfs",
        package: "e2fsprogs",
    },
    Tool {
        program: "sfdisk",
        package: "fdisk",
    },
    Tool {
        program: "grub-mkimage",
        package: "grub-common",
    },
    Tool {
        program: "rauc",
        package: "rauc",
    },
    Tool {
        program: "openssl",
        package: "openssl",
    },
    Tool {
        program: "dpkg-query",
        package: "dpkg",
    },
];

/// GRUB's BIOS modules and boot sectors (package grub-pc-bin).
pub const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";

/// Debian packages whose versions decide the bytes of the outputs; the
/// build manifest records them.
pub const HOST_PACKAGES: &[&str] = &[
    "mmdebstrap",
    "squashfs-tools",
    "e2fsprogs",
    "fdisk",
    "grub-common",
    "grub-pc-bin",
    "rauc",
    "openssl",
];

/// Where `program` is on PATH, if anywhere.
pub fn find(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The tools that are missing, each with the package to install.
pub fn missing_tools() -> Vec<String> {
    let mut missing: Vec<String> = TOOLS
        .iter()
        .filter(|t| find(t.program).is_none())
        .map(|t| format!("{} (package {})", t.program, t.package))
        .collect();
    if !Path::new(GRUB_I386_PC).join("boot.img").is_file() {
        missing.push(format!("{GRUB_I386_PC} (package grub-pc-bin)"));
    }
    missing
}

/// Runs `cmd` with its output captured; returns stdout. A failure names the
/// program and carries what it printed on stderr.
pub fn captured(cmd: &mut Command) -> anyhow::Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    tracing::debug!(command = ?cmd, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{program}: output is not UTF-8"))
}

/// Runs `cmd` with its output going to ours: the long steps (mmdebstrap,
/// mksquashfs) show their progress.
pub fn streamed(cmd: &mut Command) -> anyhow::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    tracing::debug!(command = ?cmd, "running");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} failed ({status}); its messages are above");
    }
    Ok(())
}

/// Runs `cmd` feeding `input` on stdin; returns stdout.
pub fn with_input(cmd: &mut Command, input: &str) -> anyhow::Result<String> {
    use std::io::Write;
    let program = cmd.get_program().to_string_lossy().into_owned();
    tracing::debug!(command = ?cmd, "running");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `package version` for each installed package of `packages`, from the
/// host's dpkg database.
pub fn host_package_versions(packages: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    // dpkg-query exits 1 when one of them is not installed (a tool may come
    // from elsewhere); the others are still listed.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package}\t${Version}\n")
        .args(packages)
        .stdin(Stdio::null())
        .output()
        .context("starting dpkg-query")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect())
}
