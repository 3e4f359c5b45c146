//! The root filesystem from Debian's packages, with mmdebstrap.

use anyhow::{bail, Context};
use serde::Serialize;
use std::path::Path;
use std::process::Command;

use crate::tool;

/// The Debian release and the apt sources the packages come from. The
/// sources are build inputs: pin them to snapshot.debian.org to rebuild the
/// same image later.
#[derive(Debug, Clone, Serialize)]
pub struct Release {
    pub suite: String,
    /// One-line apt sources (`deb URL SUITE COMPONENTS`).
    pub sources: Vec<String>,
}

impl Release {
    /// Debian 12 with its updates and security archives.
    pub fn bookworm(mirror: &str, security_mirror: &str) -> Release {
        Release {
            suite: "bookworm".into(),
            sources: vec![
                format!("deb {mirror} bookworm main"),
                format!("deb {mirror} bookworm-updates main"),
                format!("deb {security_mirror} bookworm-security main"),
            ],
        }
    }
}

/// Installed on top of minbase (no recommends).
pub const PACKAGES: &[&str] = &[
    // init, device nodes by label, networking (systemd-networkd)
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    // the kernel, and an initramfs to find the root slot by label
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
    // fsck and growfs of the data partition
    "e2fsprogs",
    // TLS roots for a registry with a public certificate
    "ca-certificates",
    // A/B updates: rauc install, and grub-editenv for its GRUB backend
    "rauc",
    "rauc-service",
    "grub-common",
];

/// Left out of the root filesystem: documentation (copyright notices kept)
/// and kernel modules an appliance with no display, sound or radio never
/// loads. Saves about 200 MiB.
pub const PATH_EXCLUDES: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
    // bookworm's kernel packages ship /lib/modules (merged into /usr on
    // disk; dpkg matches the path in the package).
    "/lib/modules/*/kernel/sound/*",
    "/lib/modules/*/kernel/drivers/gpu/*",
    "/lib/modules/*/kernel/drivers/media/*",
    "/lib/modules/*/kernel/drivers/net/wireless/*",
    "/lib/modules/*/kernel/drivers/bluetooth/*",
    "/lib/modules/*/kernel/drivers/infiniband/*",
    "/lib/modules/*/kernel/drivers/staging/*",
    "/lib/modules/*/kernel/drivers/iio/*",
    "/lib/modules/*/kernel/drivers/comedi/*",
    "/lib/modules/*/kernel/drivers/isdn/*",
    "/lib/modules/*/kernel/net/wireless/*",
    "/lib/modules/*/kernel/net/mac80211/*",
    "/lib/modules/*/kernel/net/bluetooth/*",
];
const PATH_INCLUDES: &[&str] = &["/usr/share/doc/*/copyright"];

/// initramfs-tools hook: the root slot is squashfs, which MODULES=most
/// leaves out. Installed before the kernel so its first initramfs has it.
const INITRAMFS_HOOK: &str = r#"#!/bin/sh
# weir: the root filesystem is squashfs.
case "$1" in prereqs) exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
manual_add_modules squashfs
"#;

/// Runs mmdebstrap into the directory `root` (which must not exist or be
/// empty). `work` holds the hook file.
pub fn bootstrap(release: &Release, root: &Path, work: &Path, epoch: u64) -> anyhow::Result<()> {
    let hook = work.join("weir-initramfs-hook");
    std::fs::write(&hook, INITRAMFS_HOOK).with_context(|| format!("writing {}", hook.display()))?;
    let hook_str = hook
        .to_str()
        .context("the work directory's path must be UTF-8")?;
    if hook_str.contains('\'') {
        bail!("the work directory's path must not contain a quote: {hook_str}");
    }
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"");
    for p in PATH_EXCLUDES {
        cmd.arg(format!("--dpkgopt=path-exclude={p}"));
    }
    for p in PATH_INCLUDES {
        cmd.arg(format!("--dpkgopt=path-include={p}"));
    }
    cmd.arg(format!(
        "--essential-hook=mkdir -p \"$1/etc/initramfs-tools/hooks\" && \
         install -m 0755 '{hook_str}' \"$1/etc/initramfs-tools/hooks/weir-squashfs\""
    ))
    .arg(&release.suite)
    .arg(root)
    .args(&release.sources)
    .env("SOURCE_DATE_EPOCH", epoch.to_string());
    tool::streamed(&mut cmd).context("building the root filesystem (mmdebstrap)")
}

/// One installed Debian package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// The packages installed in `root`, from its dpkg database (what
/// `dpkg -l` shows on the appliance).
pub fn installed_packages(root: &Path) -> anyhow::Result<Vec<Package>> {
    let out = tool::captured(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .arg("-W")
            .arg("-f=${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"),
    )
    .context("listing the root filesystem's packages")?;
    let mut packages = parse_package_list(&out);
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(packages)
}

fn parse_package_list(out: &str) -> Vec<Package> {
    out.lines()
        .filter_map(|line| {
            let mut f = line.split('\t');
            let status = f.next()?;
            // "ii " = installed; removed packages linger as "rc ".
            if !status.starts_with("ii") {
                return None;
            }
            Some(Package {
                name: f.next()?.to_string(),
                version: f.next()?.to_string(),
                architecture: f.next()?.to_string(),
            })
        })
        .collect()
}

/// The one kernel installed in `root` (from `/boot/vmlinuz-<version>`).
pub fn kernel_version(root: &Path) -> anyhow::Result<String> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .collect();
    versions.sort();
    match versions.as_slice() {
        [one] => {
            let initrd = boot.join(format!("initrd.img-{one}"));
            if !initrd.is_file() {
                bail!(
                    "{} is missing: the initramfs was not built",
                    initrd.display()
                );
            }
            Ok(one.clone())
        }
        [] => bail!("no kernel in {}", boot.display()),
        many => bail!(
            "{} kernels in {}: {}",
            many.len(),
            boot.display(),
            many.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_list_keeps_installed_packages_only() {
        let out = "ii \tsystemd\t252.38-1~deb12u1\tamd64\nrc \told\t1.0\tamd64\nii \tca-certificates\t20230311\tall\n";
        let p = parse_package_list(out);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "systemd");
        assert_eq!(p[0].version, "252.38-1~deb12u1");
        assert_eq!(p[1].architecture, "all");
    }

    #[test]
    fn kernel_version_needs_exactly_one_kernel_with_its_initramfs() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir(&boot).unwrap();
        assert!(kernel_version(dir.path()).is_err());
        std::fs::write(boot.join("vmlinuz-6.1.0-56-amd64"), "k").unwrap();
        let err = kernel_version(dir.path()).unwrap_err();
        assert!(err.to_string().contains("initramfs"), "{err}");
        std::fs::write(boot.join("initrd.img-6.1.0-56-amd64"), "i").unwrap();
        assert_eq!(kernel_version(dir.path()).unwrap(), "6.1.0-56-amd64");
        std::fs::write(boot.join("vmlinuz-6.1.0-57-amd64"), "k").unwrap();
        assert!(kernel_version(dir.path()).is_err());
    }

    #[test]
    fn every_source_names_the_suite_family() {
        let r = Release::bookworm(
            "http://deb.debian.org/debian",
            "http://deb.debian.org/debian-security",
        );
        assert_eq!(r.sources.len(), 3);
        assert!(r
            .sources
            .iter()
            .all(|s| s.starts_with("deb http://") && s.contains("bookworm")));
    }
}
