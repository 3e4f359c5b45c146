//! image-build: the flashable appliance image for each weir role.
//!
//! From the role's gateway binary and Debian's packages it makes, in the
//! output directory:
//!
//! - `weir-<role>.img`: the disk image (GPT: GRUB BIOS boot, boot state,
//!   root slots A and B, data), bootable as is, to `dd` onto the appliance;
//! - `weir-<role>-rootfs.squashfs`: the read-only root filesystem (a slot);
//! - `weir-<role>.raucb`: the signed RAUC update bundle holding that slot;
//! - `weir-<role>.manifest.json`: what went in (inputs, packages) and what
//!   came out (sha256 of each output);
//! - `SHA256SUMS` over all of them.

// geteuid has no safe wrapper in std.
#![allow(unsafe_code)]

mod appliance;
mod bundle;
mod debian;
mod disk;
mod filesystem;
mod grub;
mod manifest;
mod role;
mod tool;

use anyhow::{bail, Context};
use clap::Parser;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use disk::{Layout, Purpose, Sizes};
use role::Role;

#[derive(Parser, Debug)]
#[command(
    name = "image-build",
    version,
    about = "Builds the flashable weir appliance image for a role"
)]
struct Cli {
    /// Which gateway the appliance runs.
    #[arg(long, value_enum)]
    role: Role,
    /// The role's gateway binary (cargo build --release -p gateway-<role>).
    #[arg(long, value_name = "PATH")]
    binary: PathBuf,
    /// Output directory (created if missing; outputs in it are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A configuration to put on the data partition as
    /// /data/weir/<role>.toml. For tests: a real appliance is provisioned on
    /// the device (see the README).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Key files to put on the data partition in /data/weir/keys/ (mode
    /// 0600). For tests, like --config.
    #[arg(long, value_name = "DIR")]
    keys: Option<PathBuf>,
    /// systemd-networkd files (`*.network`, `*.netdev`, `*.link`) and
    /// `resolv.conf` to put on the data partition in /data/weir/network/.
    /// For tests, like --config (e.g. DHCP on qemu's user-mode network).
    #[arg(long, value_name = "DIR")]
    network: Option<PathBuf>,
    /// Timestamp for everything in the image; the same inputs and epoch
    /// give the same bytes. Default: $SOURCE_DATE_EPOCH, else now.
    #[arg(long, value_name = "N")]
    source_date_epoch: Option<u64>,
    /// Bundle signing material: signing.cert.pem, signing.key.pem and
    /// keyring.pem (the CA the image trusts). Generated there, for
    /// development, when the directory has none of them.
    /// Default: OUT/dev-signing.
    #[arg(long, value_name = "DIR")]
    signing_dir: Option<PathBuf>,
    /// Debian mirror (e.g. a snapshot.debian.org URL to pin the packages).
    #[arg(long, default_value = "http://deb.debian.org/debian")]
    mirror: String,
    /// Debian security mirror.
    #[arg(long, default_value = "http://deb.debian.org/debian-security")]
    security_mirror: String,
    /// Size of each root slot.
    #[arg(long, default_value_t = 512)]
    slot_size_mib: u64,
    /// Size of the data partition in the image (grow it on the device).
    #[arg(long, default_value_t = 256)]
    data_size_mib: u64,
    /// Size of the boot-state partition (GRUB environment, RAUC status).
    #[arg(long, default_value_t = 16)]
    boot_state_size_mib: u64,
    /// Keep the work directory (root filesystem tree, partition images).
    #[arg(long)]
    keep_work: bool,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match build(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("image-build: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `<name> <version>` from `<binary> --version`, checked against the role.
fn gateway_version(role: Role, binary: &Path) -> anyhow::Result<String> {
    let out = tool::captured(Command::new(binary).arg("--version"))
        .with_context(|| format!("--binary {}: running it with --version", binary.display()))?;
    let line = out.lines().next().unwrap_or_default().trim();
    match line.split_once(' ') {
        Some((name, version)) if name == role.binary_name() => Ok(version.trim().to_string()),
        _ => bail!(
            "--binary {}: says {line:?}, expected \"{} <version>\" for role {}",
            binary.display(),
            role.binary_name(),
            role.name()
        ),
    }
}

fn build(cli: &Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    let missing = tool::missing_tools();
    if !missing.is_empty() {
        bail!("missing tools: {}", missing.join(", "));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!("not root: mmdebstrap falls back to unshare mode, and data partition files are owned by this user");
    }
    let role = cli.role;
    let binary = std::fs::canonicalize(&cli.binary)
        .with_context(|| format!("--binary {}", cli.binary.display()))?;
    let version = gateway_version(role, &binary)?;
    let from_env = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => Some(
            v.trim()
                .parse::<u64>()
                .with_context(|| format!("SOURCE_DATE_EPOCH={v:?}: not a number of seconds"))?,
        ),
        Err(_) => None,
    };
    let epoch = match cli.source_date_epoch.or(from_env) {
        Some(e) => e,
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("the clock is before 1970")?
                .as_secs();
            tracing::warn!(
                source_date_epoch = now,
                "no --source-date-epoch: using now; pass it again to reproduce this build"
            );
            now
        }
    };
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let out = std::fs::canonicalize(&cli.out)?;
    let work_dir = tempfile::Builder::new()
        .prefix(".image-build-")
        .tempdir_in(&out)
        .with_context(|| format!("creating a work directory in {}", out.display()))?;
    let work = work_dir.path().to_path_buf();
    tracing::info!(role = role.name(), %version, source_date_epoch = epoch, out = %out.display(), work = %work.display(), "building");

    let signing_dir = cli
        .signing_dir
        .clone()
        .unwrap_or_else(|| out.join("dev-signing"));
    let signing = bundle::signing_material(&signing_dir)?;

    let sizes = Sizes {
        boot_state_mib: cli.boot_state_size_mib,
        slot_mib: cli.slot_size_mib,
        data_mib: cli.data_size_mib,
    };
    let layout = Layout::new(role, sizes);
    let release = debian::Release::bookworm(&cli.mirror, &cli.security_mirror);
    let binary_digest = manifest::digest(&binary, &format!("/usr/bin/{}", role.binary_name()))?;

    // 1. Root filesystem.
    let step = Instant::now();
    let root = work.join("rootfs");
    debian::bootstrap(&release, &root, &work, epoch)?;
    let kernel = debian::kernel_version(&root)?;
    let packages = debian::installed_packages(&root)?;
    let build_info = serde_json::to_string_pretty(&serde_json::json!({
        "role": role.name(),
        "version": version,
        "binary_sha256": binary_digest.sha256,
        "source_date_epoch": epoch,
        "kernel": kernel,
        "apt_sources": release.sources,
    }))? + "\n";
    appliance::apply(
        &root,
        &appliance::entries(&appliance::Appliance {
            role,
            binary: &binary,
            keyring: &signing.keyring,
            kernel_version: &kernel,
            build_info,
        }),
    )?;
    tracing::info!(%kernel, packages = packages.len(), seconds = step.elapsed().as_secs(), "root filesystem ready");

    let stem = role.artifact_stem();
    let rootfs_img = out.join(format!("{stem}-rootfs.squashfs"));
    let step = Instant::now();
    filesystem::squashfs(&root, &rootfs_img, epoch)?;
    let rootfs_sha = manifest::sha256_file(&rootfs_img)?;
    tracing::info!(sha256 = %rootfs_sha, seconds = step.elapsed().as_secs(), "root slot image ready");

    // 2. Boot state and data partitions.
    let boot_tree = work.join("boot-state");
    std::fs::create_dir_all(&boot_tree)?;
    std::fs::write(boot_tree.join("grubenv"), grub::initial_grubenv())?;
    let boot_img = work.join("boot-state.ext4");
    let boot_part = layout.get(Purpose::BootState);
    filesystem::ext4(
        &boot_tree,
        &boot_img,
        &filesystem::Ext4 {
            label: boot_part.label,
            uuid: &disk::fixed_uuid(role, "boot-state filesystem"),
            hash_seed: &disk::fixed_uuid(role, "boot-state hash seed"),
            size_mib: sizes.boot_state_mib,
            // GRUB 2.06 reads and writes this one; keep to features it knows.
            disabled_features: &["orphan_file", "metadata_csum_seed"],
        },
        epoch,
    )?;
    let (data_tree, data_inputs) = data_tree(cli, role, &work)?;
    let data_img = work.join("data.ext4");
    let data_part = layout.get(Purpose::Data);
    filesystem::ext4(
        &data_tree,
        &data_img,
        &filesystem::Ext4 {
            label: data_part.label,
            uuid: &disk::fixed_uuid(role, "data filesystem"),
            hash_seed: &disk::fixed_uuid(role, "data hash seed"),
            size_mib: sizes.data_mib,
            disabled_features: &[],
        },
        epoch,
    )?;

    // 3. The disk image.
    let step = Instant::now();
    let grub_dir = Path::new(tool::GRUB_I386_PC);
    let core_img = work.join("core.img");
    grub::make_core_image(&layout, grub_dir, &work, &core_img, epoch)?;
    let disk_img = out.join(format!("{stem}.img"));
    let _ = std::fs::remove_file(&disk_img);
    disk::create(&disk_img, &layout)?;
    disk::write_partition(&disk_img, boot_part, &boot_img)?;
    disk::write_partition(&disk_img, layout.get(Purpose::RootA), &rootfs_img)?;
    disk::write_partition(&disk_img, layout.get(Purpose::RootB), &rootfs_img)?;
    disk::write_partition(&disk_img, data_part, &data_img)?;
    grub::install(&disk_img, &layout, grub_dir, &core_img)?;
    tracing::info!(image = %disk_img.display(), seconds = step.elapsed().as_secs(), "disk image ready");

    // 4. The update bundle.
    let bundle_path = out.join(format!("{stem}.raucb"));
    let info = bundle::build(
        role,
        &version,
        &epoch.to_string(),
        &rootfs_img,
        &rootfs_sha,
        &signing,
        &work,
        &bundle_path,
        epoch,
    )?;
    tracing::info!(bundle = %bundle_path.display(), compatible = %info.compatible, "update bundle ready and verified against the keyring");

    // 5. Manifest and checksums.
    let mut outputs = Vec::new();
    for (path, what) in [
        (&disk_img, "disk image: dd onto the appliance's disk"),
        (&rootfs_img, "root slot image (squashfs), as in the bundle"),
        (&bundle_path, "RAUC update bundle: rauc install"),
    ] {
        let d = manifest::digest(path, &file_name(path))?;
        outputs.push(manifest::Output {
            file: d.path,
            sha256: d.sha256,
            size: d.size,
            what,
        });
    }
    let host_tools = tool::host_package_versions(tool::HOST_PACKAGES)?;
    let build_manifest = manifest::BuildManifest {
        format: manifest::FORMAT,
        role,
        version: version.clone(),
        source_date_epoch: epoch,
        inputs: manifest::Inputs {
            binary: binary_digest,
            release,
            packages_requested: debian::PACKAGES.iter().map(|s| s.to_string()).collect(),
            path_excludes: debian::PATH_EXCLUDES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            data: data_inputs,
            keyring: manifest::digest(&signing.keyring, "/etc/rauc/keyring.pem")?,
            image_build_version: env!("CARGO_PKG_VERSION").to_string(),
            host_tools,
        },
        kernel,
        packages,
        layout,
        outputs,
    };
    let manifest_path = out.join(format!("{stem}.manifest.json"));
    std::fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&build_manifest)? + "\n",
    )
    .with_context(|| format!("writing {}", manifest_path.display()))?;
    let mut sums: Vec<(String, String)> = build_manifest
        .outputs
        .iter()
        .map(|o| (o.file.clone(), o.sha256.clone()))
        .collect();
    sums.push((
        file_name(&manifest_path),
        manifest::sha256_file(&manifest_path)?,
    ));
    std::fs::write(out.join("SHA256SUMS"), manifest::sha256sums(&sums))
        .context("writing SHA256SUMS")?;

    if cli.keep_work {
        let kept = work_dir.keep();
        tracing::info!(work = %kept.display(), "work directory kept");
    }
    for o in &build_manifest.outputs {
        println!("{}  {}", o.sha256, out.join(&o.file).display());
    }
    println!("{}", manifest_path.display());
    tracing::info!(seconds = started.elapsed().as_secs(), "done");
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The data partition's tree: `weir/` with the configuration, `keys/`,
/// `state/` and `network/`. Returns the digests of the provisioned files.
fn data_tree(
    cli: &Cli,
    role: Role,
    work: &Path,
) -> anyhow::Result<(PathBuf, Vec<manifest::FileDigest>)> {
    let tree = work.join("data");
    let weir = tree.join("weir");
    let mut inputs = Vec::new();
    for (dir, mode) in [
        ("", 0o755),
        ("keys", 0o700),
        ("state", 0o750),
        ("network", 0o755),
        ("update", 0o755),
    ] {
        let d = weir.join(dir);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        set_mode(&d, mode)?;
    }
    std::fs::write(weir.join("README"), data_readme(role))?;
    if let Some(config) = &cli.config {
        let dest = weir.join(role.config_file_name());
        std::fs::copy(config, &dest).with_context(|| format!("--config {}", config.display()))?;
        set_mode(&dest, 0o640)?;
        inputs.push(manifest::digest(&dest, &role.config_path())?);
    }
    if let Some(keys) = &cli.keys {
        let mut names: Vec<_> = std::fs::read_dir(keys)
            .with_context(|| format!("--keys {}", keys.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| e.file_name())
            .collect();
        names.sort();
        if names.is_empty() {
            bail!("--keys {}: no key files in it", keys.display());
        }
        for name in names {
            let dest = weir.join("keys").join(&name);
            std::fs::copy(keys.join(&name), &dest)
                .with_context(|| format!("--keys {}: copying {:?}", keys.display(), name))?;
            set_mode(&dest, 0o600)?;
            inputs.push(manifest::digest(
                &dest,
                &format!("{}/keys/{}", appliance::WEIR_DIR, name.to_string_lossy()),
            )?);
        }
    }
    if let Some(network) = &cli.network {
        let names = network_files(network)?;
        if names.is_empty() {
            bail!(
                "--network {}: no *.network, *.netdev, *.link or resolv.conf in it",
                network.display()
            );
        }
        for name in names {
            let dest = weir.join("network").join(&name);
            std::fs::copy(network.join(&name), &dest)
                .with_context(|| format!("--network {}: copying {name}", network.display()))?;
            set_mode(&dest, 0o644)?;
            inputs.push(manifest::digest(
                &dest,
                &format!("{}/network/{name}", appliance::WEIR_DIR),
            )?);
        }
    }
    Ok((tree, inputs))
}

/// The files of `dir` that systemd-networkd (or the resolv.conf link)
/// reads, sorted; anything else there is no network setup and is left out.
fn network_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("--network {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| is_network_file(n))
        .collect();
    names.sort();
    Ok(names)
}

fn is_network_file(name: &str) -> bool {
    name == "resolv.conf"
        || [".network", ".netdev", ".link"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

fn data_readme(role: Role) -> String {
    format!(
        "\
weir {role} appliance data partition (mounted at /data; never touched by updates)

  weir/{config}       gateway configuration (gateway-{role} check-config FILE)
  weir/keys/          link keys, hex, mode 0600 (/etc/weir/keys on the appliance)
  weir/state/         gateway state (/var/lib/weir on the appliance)
  weir/network/       systemd-networkd *.network files and resolv.conf
  weir/update/        drop a RAUC bundle here (copy, then rename to *.raucb):
                      it is installed into the other slot and the appliance
                      reboots into it; refused ones go to update/rejected/
",
        role = role.name(),
        config = role.config_file_name(),
    )
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_networkd_files_and_resolv_conf_are_network_setup() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "10-dhcp.network",
            "20-br.netdev",
            "30-eth.link",
            "resolv.conf",
            "notes.txt",
            ".network",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.network")).unwrap();
        assert_eq!(
            network_files(dir.path()).unwrap(),
            [
                "10-dhcp.network",
                "20-br.netdev",
                "30-eth.link",
                "resolv.conf"
            ]
        );
    }
}
