//! What turns a Debian root filesystem into a weir appliance: the gateway
//! binary and its service, sysctls, mounts, RAUC's slot configuration,
//! the slot's boot entry, and the links that put the configuration, keys,
//! state and network setup on the data partition.

use anyhow::Context;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::disk::Purpose;
use crate::role::Role;

/// Where the data partition is mounted.
pub const DATA_MOUNT: &str = "/data";
/// Where the boot-state partition is mounted (grubenv, RAUC status).
pub const BOOT_STATE_MOUNT: &str = "/boot/state";
/// The gateway's directory on the data partition: configuration, keys/,
/// state/, network/.
pub const WEIR_DIR: &str = "/data/weir";

/// One thing placed in the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File {
        path: String,
        contents: String,
        mode: u32,
    },
    /// A file copied from the build host (the gateway binary, the keyring).
    Copy {
        path: String,
        from: PathBuf,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    Dir {
        path: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::File { path, .. }
            | Entry::Dir { path }
            | Entry::Copy { path, .. }
            | Entry::Symlink { path, .. } => path,
        }
    }
}

/// Inputs the appliance files depend on.
pub struct Appliance<'a> {
    pub role: Role,
    pub binary: &'a Path,
    pub keyring: &'a Path,
    pub kernel_version: &'a str,
    /// JSON describing the build, installed as /usr/share/weir/build.json.
    pub build_info: String,
}

/// The gateway's unit: started at boot, restarted whenever it dies, however
/// often; everything outside its data directory read-only.
pub fn service_unit(role: Role) -> String {
    format!(
        "\
[Unit]
Description=weir {bin}: {summary}
RequiresMountsFor={WEIR_DIR}
After=network.target
# The appliance has nothing else to do: never give up restarting.
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/bin/{bin} --config {config}
# SIGHUP reads the configuration again (what needs a restart is logged).
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=3
# SIGTERM makes the gateway flush its state; give it time before SIGKILL.
TimeoutStopSec=60
LimitNOFILE=65536
# Logs go to the journal and to the kernel console (ttyS0).
StandardOutput=journal+console
StandardError=journal+console
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths=-{WEIR_DIR}

[Install]
WantedBy=multi-user.target
",
        bin = role.binary_name(),
        summary = role.summary(),
        config = role.config_path(),
    )
}

/// Confirms the booted slot to RAUC (clears its GRUB try flag) once the
/// gateway has run for a while; a slot whose gateway keeps dying is not
/// confirmed, and GRUB boots the other slot next time.
pub fn mark_good_unit(role: Role) -> String {
    format!(
        "\
[Unit]
Description=weir: confirm the booted slot once {bin} runs
After={service}
Requires={service} rauc.service
After=rauc.service

[Service]
# exec, not oneshot: boot does not wait for the 30 s.
Type=exec
ExecStart=/bin/sh -c 'sleep 30 && systemctl is-active --quiet {service} && exec rauc status mark-good'
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
",
        bin = role.binary_name(),
        service = role.service_name(),
    )
}

/// Where operators drop update bundles on the data partition (the
/// appliance has no remote login): each `*.raucb` there is installed with
/// `rauc install`, then the appliance reboots into the updated slot.
pub const UPDATE_DROP: &str = "/data/weir/update";

/// Watches the update drop.
pub fn update_path_unit() -> String {
    format!(
        "\
[Unit]
Description=weir: watch {UPDATE_DROP} for update bundles
RequiresMountsFor={WEIR_DIR}

[Path]
PathExistsGlob={UPDATE_DROP}/*.raucb
MakeDirectory=yes

[Install]
WantedBy=multi-user.target
"
    )
}

pub fn update_service_unit() -> String {
    "\
[Unit]
Description=weir: install the update bundles dropped on the data partition
Requires=rauc.service
After=rauc.service

[Service]
Type=oneshot
ExecStart=/usr/lib/weir/install-updates
StandardOutput=journal+console
StandardError=journal+console
"
    .to_string()
}

/// Installs each dropped bundle into the other slot; a bundle that RAUC
/// refuses (signature, compatible, corrupt) goes to `rejected/` with the
/// reason beside it. Bundles must arrive complete: copy under another name
/// and rename to `*.raucb`.
pub fn install_updates_script() -> String {
    format!(
        r#"#!/bin/sh
# weir: install update bundles from {UPDATE_DROP}, then reboot into them.
set -u
drop="${{WEIR_UPDATE_DROP:-{UPDATE_DROP}}}"
installed=0
for bundle in "$drop"/*.raucb; do
  [ -f "$bundle" ] || continue
  name=$(basename "$bundle")
  # The running slot booted and runs this: keep it as the fallback if the
  # new one fails (an update soon after boot would leave it unconfirmed).
  [ "$installed" = 1 ] || rauc status mark-good >/dev/null 2>&1 || true
  echo "weir-update: installing $name"
  if rauc install "$bundle" >"$drop/.last.log" 2>&1; then
    echo "weir-update: installed $name"
    rm -f "$bundle"
    installed=1
  else
    mkdir -p "$drop/rejected"
    mv "$bundle" "$drop/rejected/$name"
    mv "$drop/.last.log" "$drop/rejected/$name.reason"
    echo "weir-update: refused $name: $(tail -n 1 "$drop/rejected/$name.reason")"
  fi
done
rm -f "$drop/.last.log"
if [ "$installed" = 1 ]; then
  echo "weir-update: rebooting into the updated slot"
  systemctl reboot
fi
"#
    )
}

/// Kernel limits the diode link needs: gateway-rx asks for
/// `RECV_BUFFER_BYTES` of UDP receive buffer and gateway-tx for
/// `SOCKET_BUFFER_BYTES` of send buffer (a diode has no flow control, so
/// bursts and the receiver's pauses must fit in the buffer), and the kernel
/// caps requests at rmem_max/wmem_max.
pub fn sysctl_conf() -> String {
    let receive = weir_host::link::udp::RECV_BUFFER_BYTES;
    let send = weir_host::link::udp::SOCKET_BUFFER_BYTES;
    format!(
        "\
# weir: UDP socket buffers for the diode link (gateway-rx asks for {receive}
# bytes of receive buffer, gateway-tx for {send} bytes of send buffer).
net.core.rmem_max = {receive}
net.core.wmem_max = {send}
# Packets queued per CPU before the stack drops them.
net.core.netdev_max_backlog = 16384
"
    )
}

pub fn fstab() -> String {
    format!(
        "\
# The root slot is mounted read-only by the initramfs; /var is a tmpfs
# (systemd.volatile=state).
PARTLABEL={data}  {DATA_MOUNT}  ext4  defaults,noatime,x-systemd.growfs  0 2
PARTLABEL={boot}  {BOOT_STATE_MOUNT}  ext4  defaults,noatime  0 2
tmpfs  /tmp  tmpfs  mode=1777,nosuid,nodev  0 0
",
        data = Purpose::Data.label(),
        boot = Purpose::BootState.label(),
    )
}

/// RAUC's system configuration: two raw slots holding the squashfs root,
/// switched through GRUB's environment block.
pub fn rauc_system_conf(role: Role) -> String {
    format!(
        "\
[system]
compatible={compatible}
bootloader=grub
grubenv={BOOT_STATE_MOUNT}/grubenv
statusfile={BOOT_STATE_MOUNT}/rauc.status
# verity bundles only: checked block by block as they are read.
bundle-formats=-plain

[keyring]
path=/etc/rauc/keyring.pem

[slot.rootfs.0]
device=/dev/disk/by-partlabel/{a}
type=raw
bootname=A

[slot.rootfs.1]
device=/dev/disk/by-partlabel/{b}
type=raw
bootname=B
",
        compatible = role.compatible(),
        a = Purpose::RootA.label(),
        b = Purpose::RootB.label(),
    )
}

/// Everything the appliance adds to the Debian tree.
pub fn entries(a: &Appliance) -> Vec<Entry> {
    let role = a.role;
    let unit_dir = "/usr/lib/systemd/system";
    let wants = "/etc/systemd/system/multi-user.target.wants";
    vec![
        Entry::Copy {
            path: format!("/usr/bin/{}", role.binary_name()),
            from: a.binary.to_path_buf(),
            mode: 0o755,
        },
        Entry::File {
            path: format!("{unit_dir}/{}", role.service_name()),
            contents: service_unit(role),
            mode: 0o644,
        },
        Entry::Symlink {
            path: format!("{wants}/{}", role.service_name()),
            target: format!("{unit_dir}/{}", role.service_name()),
        },
        Entry::File {
            path: "/usr/lib/systemd/system/weir-mark-good.service".into(),
            contents: mark_good_unit(role),
            mode: 0o644,
        },
        Entry::Symlink {
            path: format!("{wants}/weir-mark-good.service"),
            target: "/usr/lib/systemd/system/weir-mark-good.service".into(),
        },
        Entry::File {
            path: "/usr/lib/systemd/system/weir-update.path".into(),
            contents: update_path_unit(),
            mode: 0o644,
        },
        Entry::Symlink {
            path: format!("{wants}/weir-update.path"),
            target: "/usr/lib/systemd/system/weir-update.path".into(),
        },
        Entry::File {
            path: "/usr/lib/systemd/system/weir-update.service".into(),
            contents: update_service_unit(),
            mode: 0o644,
        },
        Entry::File {
            path: "/usr/lib/weir/install-updates".into(),
            contents: install_updates_script(),
            mode: 0o755,
        },
        Entry::File {
            path: "/usr/lib/sysctl.d/60-weir.conf".into(),
            contents: sysctl_conf(),
            mode: 0o644,
        },
        Entry::File {
            path: "/etc/fstab".into(),
            contents: fstab(),
            mode: 0o644,
        },
        Entry::Dir {
            path: DATA_MOUNT.into(),
        },
        Entry::Dir {
            path: BOOT_STATE_MOUNT.into(),
        },
        Entry::File {
            path: "/etc/hostname".into(),
            contents: format!("{}\n", role.hostname()),
            mode: 0o644,
        },
        Entry::File {
            path: "/etc/hosts".into(),
            contents: format!("127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost\n", role.hostname()),
            mode: 0o644,
        },
        // Example configurations name /etc/weir/... and /var/lib/weir/...;
        // on the appliance both are on the data partition.
        Entry::Symlink {
            path: "/etc/weir".into(),
            target: WEIR_DIR.into(),
        },
        Entry::File {
            path: "/usr/lib/tmpfiles.d/weir.conf".into(),
            contents: format!("# /var is a tmpfs: link the state directory on every boot.\nL /var/lib/weir - - - - {WEIR_DIR}/state\n"),
            mode: 0o644,
        },
        // Network setup (systemd-networkd .network files, resolv.conf) is
        // provisioned with the configuration, on the data partition.
        Entry::Symlink {
            path: "/etc/systemd/network".into(),
            target: format!("{WEIR_DIR}/network"),
        },
        Entry::Symlink {
            path: "/etc/resolv.conf".into(),
            target: format!("{WEIR_DIR}/network/resolv.conf"),
        },
        Entry::File {
            path: "/etc/systemd/system/systemd-networkd.service.d/weir.conf".into(),
            contents: format!("[Unit]\n# Its configuration is on the data partition.\nRequiresMountsFor={WEIR_DIR}\n"),
            mode: 0o644,
        },
        Entry::Symlink {
            path: format!("{wants}/systemd-networkd.service"),
            target: format!("{unit_dir}/systemd-networkd.service"),
        },
        Entry::Symlink {
            path: "/etc/systemd/system/sockets.target.wants/systemd-networkd.socket".into(),
            target: format!("{unit_dir}/systemd-networkd.socket"),
        },
        Entry::File {
            path: "/etc/rauc/system.conf".into(),
            contents: rauc_system_conf(role),
            mode: 0o644,
        },
        Entry::Copy {
            path: "/etc/rauc/keyring.pem".into(),
            from: a.keyring.to_path_buf(),
            mode: 0o644,
        },
        Entry::File {
            path: "/boot/grub/grub.cfg".into(),
            contents: crate::grub::slot_config(role, a.kernel_version),
            mode: 0o644,
        },
        Entry::File {
            path: "/usr/share/weir/build.json".into(),
            contents: a.build_info.clone(),
            mode: 0o644,
        },
    ]
}

/// Writes `entries` into the tree at `root`, replacing what is there.
pub fn apply(root: &Path, entries: &[Entry]) -> anyhow::Result<()> {
    for entry in entries {
        let dest = root.join(entry.path().trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        match entry {
            Entry::Dir { .. } => {
                std::fs::create_dir_all(&dest)
                    .with_context(|| format!("creating {}", dest.display()))?;
            }
            Entry::File { contents, mode, .. } => {
                remove_existing(&dest)?;
                std::fs::write(&dest, contents)
                    .with_context(|| format!("writing {}", dest.display()))?;
                set_mode(&dest, *mode)?;
            }
            Entry::Copy { from, mode, .. } => {
                remove_existing(&dest)?;
                std::fs::copy(from, &dest)
                    .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
                set_mode(&dest, *mode)?;
            }
            Entry::Symlink { target, .. } => {
                remove_existing(&dest)?;
                symlink(target, &dest)
                    .with_context(|| format!("linking {} to {target}", dest.display()))?;
            }
        }
    }
    Ok(())
}

fn remove_existing(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)
            .with_context(|| format!("replacing the directory {}", path.display())),
        Ok(_) => {
            std::fs::remove_file(path).with_context(|| format!("replacing {}", path.display()))
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_starts_the_roles_gateway_with_its_config_and_always_restarts() {
        let u = service_unit(Role::Rx);
        assert!(u.contains("ExecStart=/usr/bin/gateway-rx --config /data/weir/rx.toml\n"));
        assert!(u.contains("Restart=always\n"));
        assert!(u.contains("ExecReload=/bin/kill -HUP $MAINPID\n"));
        assert!(u.contains("StartLimitIntervalSec=0\n"));
        assert!(u.contains("WantedBy=multi-user.target"));
        let t = service_unit(Role::Tx);
        assert!(t.contains("ExecStart=/usr/bin/gateway-tx --config /data/weir/tx.toml\n"));
    }

    #[test]
    fn sysctls_allow_the_buffer_the_link_asks_for() {
        let conf = sysctl_conf();
        use weir_host::link::udp::{RECV_BUFFER_BYTES, SOCKET_BUFFER_BYTES};
        for (key, wanted) in [
            ("net.core.rmem_max", RECV_BUFFER_BYTES),
            ("net.core.wmem_max", SOCKET_BUFFER_BYTES),
        ] {
            let value: usize = conf
                .lines()
                .find_map(|l| {
                    l.strip_prefix(key)?
                        .trim()
                        .strip_prefix('=')?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("{key} missing"));
            assert!(value >= wanted, "{key} = {value}");
        }
    }

    /// The update script installs good bundles and reboots, and moves a
    /// refused one aside with RAUC's reason (rauc and systemctl faked).
    #[test]
    fn update_script_installs_good_bundles_and_sets_refused_ones_aside() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let drop = dir.path().join("update");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&drop).unwrap();
        let calls = dir.path().join("calls");
        let fake = |name: &str, body: &str| {
            let p = bin.join(name);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"{name} $*\" >> '{}'\n{body}\n",
                    calls.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        fake(
            "rauc",
            r#"case "$2" in *bad*) echo "signature verification failed" >&2; exit 1;; esac"#,
        );
        fake("systemctl", "");
        std::fs::write(drop.join("good.raucb"), "b").unwrap();
        std::fs::write(drop.join("bad.raucb"), "b").unwrap();
        std::fs::write(drop.join("partial.raucb.tmp"), "b").unwrap();
        let script = dir.path().join("install-updates");
        std::fs::write(&script, install_updates_script()).unwrap();
        let out = std::process::Command::new("/bin/sh")
            .arg(&script)
            .env("WEIR_UPDATE_DROP", &drop)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let calls = std::fs::read_to_string(&calls).unwrap();
        assert!(calls.starts_with("rauc status mark-good\n"), "{calls}");
        assert!(
            calls.contains(&format!("rauc install {}/good.raucb", drop.display())),
            "{calls}"
        );
        assert!(calls.ends_with("systemctl reboot\n"), "{calls}");
        assert!(!drop.join("good.raucb").exists());
        assert!(drop.join("rejected/bad.raucb").exists());
        let reason = std::fs::read_to_string(drop.join("rejected/bad.raucb.reason")).unwrap();
        assert!(reason.contains("signature verification failed"));
        assert!(
            drop.join("partial.raucb.tmp").exists(),
            "a partial copy is not touched"
        );

        // Only refused bundles: no reboot.
        std::fs::write(dir.path().join("calls"), "").unwrap();
        std::fs::write(drop.join("bad2.raucb"), "b").unwrap();
        std::process::Command::new("/bin/sh")
            .arg(&script)
            .env("WEIR_UPDATE_DROP", &drop)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert!(!calls.contains("reboot"), "{calls}");
    }

    #[test]
    fn rauc_slots_and_fstab_use_the_partition_labels() {
        let r = rauc_system_conf(Role::Tx);
        assert!(r.contains("compatible=weir-tx\n"));
        assert!(r.contains("device=/dev/disk/by-partlabel/weir-root-a\n"));
        assert!(r.contains("device=/dev/disk/by-partlabel/weir-root-b\n"));
        assert!(r.contains("grubenv=/boot/state/grubenv\n"));
        let f = fstab();
        assert!(f.contains("PARTLABEL=weir-data  /data  ext4"));
        assert!(f.contains("PARTLABEL=weir-boot  /boot/state  ext4"));
    }

    #[test]
    fn apply_writes_files_links_and_replaces_existing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc/systemd/network")).unwrap();
        let bin = dir.path().join("gateway-rx");
        std::fs::write(&bin, "ELF").unwrap();
        let keyring = dir.path().join("ca.pem");
        std::fs::write(&keyring, "PEM").unwrap();
        let a = Appliance {
            role: Role::Rx,
            binary: &bin,
            keyring: &keyring,
            kernel_version: "6.1.0-56-amd64",
            build_info: "{}".into(),
        };
        apply(&root, &entries(&a)).unwrap();
        let installed = root.join("usr/bin/gateway-rx");
        assert_eq!(std::fs::read_to_string(&installed).unwrap(), "ELF");
        assert_eq!(
            std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            std::fs::read_link(root.join("etc/systemd/network")).unwrap(),
            Path::new("/data/weir/network")
        );
        assert_eq!(
            std::fs::read_link(
                root.join("etc/systemd/system/multi-user.target.wants/weir-gateway-rx.service")
            )
            .unwrap(),
            Path::new("/usr/lib/systemd/system/weir-gateway-rx.service")
        );
        assert!(root.join("data").is_dir());
        assert!(std::fs::read_to_string(root.join("boot/grub/grub.cfg"))
            .unwrap()
            .contains("vmlinuz-6.1.0-56-amd64"));
        // Applying twice gives the same tree (no error on existing links).
        apply(&root, &entries(&a)).unwrap();
    }
}
