//! The rx appliance image under qemu, for the tests that boot it (`boot`,
//! `power_cut`): what the machine needs, building the image with
//! image-build (a test configuration, key and network setup on its data
//! partition), booting it with `qemu-system-x86_64 -accel tcg` through its
//! own GRUB, its serial ports, the power button, a power cut, and reading
//! its data partition back from the host without mounting it.
//!
//! Serial ports: ttyS0 (kernel, systemd and the gateway's log) goes to a
//! file; ttyS1 (the gateway's console) to a unix socket ([`Console`]).

// geteuid has no safe wrapper in std.
#![allow(unsafe_code)]

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::pair::bin_dir;

/// Building the image: mmdebstrap downloads ~150 MB and installs ~155
/// packages, then xz compresses the root (about 2 minutes here).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(12 * 60);
/// From the power button to qemu's exit: systemd stops the gateway (which
/// flushes its state) and powers off.
pub const POWEROFF_TIMEOUT: Duration = Duration::from_secs(120);
/// Every file in the image carries this time: builds are reproducible.
pub const EPOCH: &str = "1747699200";

/// Programs building and booting the image takes.
pub const TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "mmdebstrap",
    "mksquashfs",
    "mkfs.ext4",
    "debugfs",
    "sfdisk",
    "grub-mkimage",
    "rauc",
    "openssl",
];

/// What to install for [`TOOLS`].
pub const INSTALL: &str = "apt-get install -y mmdebstrap qemu-system-x86 qemu-utils \
                           squashfs-tools e2fsprogs fdisk grub-pc-bin rauc openssl";

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(program).is_file())
        })
        .unwrap_or(false)
}

/// What this machine lacks to build and boot the image.
pub fn missing_requirements() -> Vec<String> {
    let mut missing: Vec<String> = TOOLS
        .iter()
        .filter(|t| !on_path(t))
        .map(|t| t.to_string())
        .collect();
    if !Path::new("/usr/lib/grub/i386-pc/boot.img").is_file() {
        missing.push("grub-pc-bin".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (mmdebstrap builds the root filesystem as root)".into());
    }
    missing
}

/// Whether `test` can run here: Ok(false) after saying what is missing
/// (skipped), an error under `CI=true`, where a missing tool fails.
pub fn requirements_met(test: &str) -> Result<bool> {
    let missing = missing_requirements();
    if missing.is_empty() {
        return Ok(true);
    }
    let msg = format!("{test} needs: {} ({INSTALL})", missing.join(", "));
    if weir_test_support::tools::is_ci(std::env::var_os("CI").as_deref()) {
        bail!("{msg}");
    }
    eprintln!("skipped: {msg}");
    Ok(false)
}

/// Builds gateway-rx and image-build in this test's profile; returns their
/// paths.
pub fn build_binaries() -> Result<(PathBuf, PathBuf)> {
    let dir = bin_dir()?;
    let mut cmd = crate::pair::cargo_command();
    cmd.args([
        "build",
        "-q",
        "-p",
        "gateway-rx",
        "-p",
        "image-build",
        "--bins",
    ]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of gateway-rx and image-build failed: {status}");
    }
    Ok((dir.join("gateway-rx"), dir.join("image-build")))
}

/// A child process killed when dropped: the VM and the build never outlive
/// the test.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last `n` lines of a log file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs image-build, its output going to `log`, within BUILD_TIMEOUT.
pub fn run_image_build(mut cmd: Command, log: &Path) -> Result<()> {
    let out = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting image-build")?;
    let mut child = Killed(child);
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait()? {
            if !status.success() {
                bail!("image-build failed ({status}):\n{}", tail(log, 40));
            }
            return Ok(());
        }
        if started.elapsed() > BUILD_TIMEOUT {
            bail!(
                "image-build still running after {:?}:\n{}",
                BUILD_TIMEOUT,
                tail(log, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What goes on the image's data partition.
pub struct Provision<'a> {
    /// `/data/weir/rx.toml`.
    pub config: &'a str,
    /// `/data/weir/keys/1.key`, as written there (hex).
    pub key_hex: &'a str,
    /// systemd-networkd files by name, for `/data/weir/network/`; none
    /// brings no interface up.
    pub network: &'a [(&'a str, &'a str)],
}

/// Builds the rx image of `gateway` in `dir/out` (inputs and the build log
/// in `dir`); returns the disk image's path.
///
/// With `WEIR_APPLIANCE_CACHE=DIR` set, a pristine copy of each image is
/// kept there under a digest of the gateway binary and `provision`, and
/// reused instead of building when both are the same (the Debian packages
/// are then those of the first build): for iterating on a test, the build
/// being most of its time.
pub fn build_rx_image(
    gateway: &Path,
    image_build: &Path,
    dir: &Path,
    provision: &Provision,
) -> Result<PathBuf> {
    let out = dir.join("out");
    let image = out.join("weir-rx.img");
    let cached = match std::env::var_os("WEIR_APPLIANCE_CACHE") {
        Some(cache) => Some(PathBuf::from(cache).join(inputs_key(gateway, provision)?)),
        None => None,
    };
    if let Some(cached) = &cached {
        if cached.join("weir-rx.img").is_file() {
            std::fs::create_dir_all(&out)?;
            std::fs::copy(cached.join("weir-rx.img"), &image)
                .with_context(|| format!("copying the cached image {}", cached.display()))?;
            std::fs::copy(
                cached.join("weir-rx.manifest.json"),
                out.join("weir-rx.manifest.json"),
            )?;
            eprintln!("rx image reused from {}", cached.display());
            return Ok(image);
        }
    }
    let input = dir.join("input");
    std::fs::create_dir_all(input.join("keys"))?;
    std::fs::write(input.join("rx.toml"), provision.config)?;
    std::fs::write(input.join("keys/1.key"), provision.key_hex)?;
    let mut cmd = Command::new(image_build);
    cmd.arg("--role=rx")
        .arg("--binary")
        .arg(gateway)
        .arg("--out")
        .arg(&out)
        .arg("--config")
        .arg(input.join("rx.toml"))
        .arg("--keys")
        .arg(input.join("keys"))
        .arg("--signing-dir")
        .arg(dir.join("signing"))
        .arg("--source-date-epoch")
        .arg(EPOCH);
    if !provision.network.is_empty() {
        std::fs::create_dir_all(input.join("network"))?;
        for (name, text) in provision.network {
            std::fs::write(input.join("network").join(name), text)?;
        }
        cmd.arg("--network").arg(input.join("network"));
    }
    run_image_build(cmd, &dir.join("image-build.log"))?;
    if let Some(cached) = &cached {
        // Copied before any boot writes to it; complete once renamed.
        std::fs::create_dir_all(cached)?;
        let partial = cached.join("weir-rx.img.partial");
        std::fs::copy(&image, &partial)?;
        std::fs::copy(
            out.join("weir-rx.manifest.json"),
            cached.join("weir-rx.manifest.json"),
        )?;
        std::fs::rename(&partial, cached.join("weir-rx.img"))?;
    }
    Ok(image)
}

/// A digest of what an image is built from, as far as the test decides it.
fn inputs_key(gateway: &Path, provision: &Provision) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(Sha256::digest(std::fs::read(gateway)?));
    for part in [provision.config, provision.key_hex] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    for (name, text) in provision.network {
        for part in [*name, *text] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The VM's second serial port, as the harness's end of it.
pub struct Console {
    stream: UnixStream,
    seen: Vec<u8>,
}

impl Console {
    /// Connects to qemu's socket (qemu creates it right after starting).
    pub fn connect(path: &Path, deadline: Instant) -> Result<Console> {
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
                    return Ok(Console {
                        stream,
                        seen: Vec::new(),
                    });
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Reads until `needle` appears after what was consumed so far; returns
    /// the text up to and including it, and consumes it.
    pub fn read_until(&mut self, needle: &str, deadline: Instant) -> Result<String> {
        match self.try_read_until(needle, deadline)? {
            Some(text) => Ok(text),
            None => bail!(
                "no {needle:?} on the console; it showed: {:?}",
                String::from_utf8_lossy(&self.seen)
            ),
        }
    }

    /// Like [`Console::read_until`], but None once `deadline` passes.
    pub fn try_read_until(&mut self, needle: &str, deadline: Instant) -> Result<Option<String>> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(pos) = find(&self.seen, needle.as_bytes()) {
                let end = pos + needle.len();
                let text = String::from_utf8_lossy(&self.seen[..end]).into_owned();
                self.seen.drain(..end);
                return Ok(Some(text));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => bail!(
                    "console closed (VM gone?) before {needle:?}; it showed: {:?}",
                    String::from_utf8_lossy(&self.seen)
                ),
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("reading the console"),
            }
        }
    }

    pub fn type_line(&mut self, line: &str) -> Result<()> {
        self.stream
            .write_all(format!("{line}\r").as_bytes())
            .context("typing on the console")
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// gateway-rx's version, as `gateway-rx --version` prints it.
pub fn gateway_version(bin: &Path) -> Result<String> {
    let out = Command::new(bin).arg("--version").output()?;
    let text = String::from_utf8(out.stdout)?;
    text.trim()
        .strip_prefix("gateway-rx ")
        .map(str::to_string)
        .with_context(|| format!("unexpected --version output {text:?}"))
}

/// How a VM is started.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// Writes go to a throw-away overlay: the image stays as built.
    pub snapshot: bool,
    /// A virtio NIC on qemu's user-mode network, with host UDP port `.0`
    /// on 127.0.0.1 forwarded to guest UDP port `.1`.
    pub udp_forward: Option<(u16, u16)>,
}

/// One qemu process booting a disk image; killed when dropped.
pub struct Vm {
    qemu: Killed,
    /// ttyS0: kernel, systemd, and the gateway's log.
    pub serial0: PathBuf,
    /// ttyS1: the gateway's console, a socket for [`Console::connect`].
    pub console_socket: PathBuf,
    monitor: PathBuf,
    qemu_err: PathBuf,
    pub started: Instant,
}

impl Vm {
    /// Boots `image`; its files (serial log, sockets) are `dir/<name>.*`.
    pub fn start(image: &Path, dir: &Path, name: &str, options: &VmOptions) -> Result<Vm> {
        let serial0 = dir.join(format!("{name}.ttyS0.log"));
        let console_socket = dir.join(format!("{name}.console.sock"));
        let monitor = dir.join(format!("{name}.monitor.sock"));
        let qemu_err = dir.join(format!("{name}.qemu.err"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-nographic", "-m", "1024", "-no-reboot"]);
        // The oldest CPU the firmware runs on: x86-64-v2, which
        // reed-solomon-erasure's SIMD code is built for (qemu's default
        // qemu64 lacks SSSE3, and decoding a block would trap).
        cmd.args(["-cpu", "Nehalem"]);
        match options.udp_forward {
            Some((host, guest)) => {
                cmd.arg("-netdev")
                    .arg(format!("user,id=n0,hostfwd=udp:127.0.0.1:{host}-:{guest}"))
                    .arg("-device")
                    .arg("virtio-net-pci,netdev=n0");
            }
            None => {
                cmd.args(["-nic", "none"]);
            }
        }
        let snapshot = if options.snapshot { ",snapshot=on" } else { "" };
        let qemu = cmd
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio{snapshot}",
                image.display()
            ))
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial0.display()))
            .arg("-serial")
            .arg(format!(
                "unix:{},server=on,wait=off",
                console_socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("{name}.qemu.out")))?)
            .stderr(std::fs::File::create(&qemu_err)?)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        Ok(Vm {
            qemu: Killed(qemu),
            serial0,
            console_socket,
            monitor,
            qemu_err,
            started: Instant::now(),
        })
    }

    /// What ttyS0 showed so far.
    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial0).unwrap_or_default()).into_owned()
    }

    /// `e` with the end of ttyS0 and of qemu's errors, for a failure message.
    pub fn with_log(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!(
            "ttyS0 (last lines):\n{}\nqemu: {}",
            tail(&self.serial0, 60),
            tail(&self.qemu_err, 10)
        ))
    }

    /// qemu's exit status, once it has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.qemu.0.try_wait()?)
    }

    /// SIGKILL to qemu: the power is cut. Whatever the guest had not yet
    /// written to its disk (its page cache, queued requests) is gone; what
    /// qemu wrote to the image file stays.
    pub fn power_cut(&mut self) -> Result<()> {
        self.qemu.0.kill().context("killing qemu")?;
        self.qemu.0.wait().context("reaping qemu")?;
        Ok(())
    }

    /// Presses the power button (ACPI) and waits for qemu to exit: systemd
    /// stops the gateway and the kernel powers off (-no-reboot makes qemu
    /// exit then).
    pub fn power_off(&mut self, timeout: Duration) -> Result<()> {
        if let Some(status) = self.exited()? {
            bail!("qemu exited early ({status})");
        }
        let mut hmp = UnixStream::connect(&self.monitor)
            .with_context(|| format!("connecting to qemu's monitor {}", self.monitor.display()))?;
        hmp.write_all(b"system_powerdown\n")
            .context("pressing the power button")?;
        let pressed = Instant::now();
        loop {
            if self.exited()?.is_some() {
                return Ok(());
            }
            if pressed.elapsed() > timeout {
                return Err(self.with_log(anyhow::anyhow!(
                    "the VM did not power off within {timeout:?} of the power button"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One partition of a disk image, from `sfdisk --json`.
#[derive(Debug, Clone)]
pub struct Partition {
    pub name: String,
    /// Bytes from the start of the disk.
    pub offset: u64,
    pub size: u64,
}

/// The partitions of a GPT disk image.
pub fn partitions(image: &Path) -> Result<Vec<Partition>> {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(image)
        .output()
        .context("running sfdisk --json")?;
    if !out.status.success() {
        bail!(
            "sfdisk --json {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let table: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let table = &table["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    table["partitions"]
        .as_array()
        .context("sfdisk: no partitions")?
        .iter()
        .map(|p| {
            Ok(Partition {
                name: p["name"].as_str().unwrap_or_default().to_string(),
                offset: p["start"].as_u64().context("sfdisk: partition start")? * sector,
                size: p["size"].as_u64().context("sfdisk: partition size")? * sector,
            })
        })
        .collect()
}

/// Copies the partition labelled `name` out of `image` into `dest` (what
/// `dd skip=… count=…` would do).
pub fn extract_partition(image: &Path, name: &str, dest: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let part = partitions(image)?
        .into_iter()
        .find(|p| p.name == name)
        .with_context(|| format!("{} has no partition {name}", image.display()))?;
    let mut disk = std::fs::File::open(image)?;
    disk.seek(SeekFrom::Start(part.offset))?;
    let mut out = std::fs::File::create(dest)?;
    let copied = std::io::copy(&mut disk.take(part.size), &mut out)?;
    if copied != part.size {
        bail!("{name}: copied {copied} of {} bytes", part.size);
    }
    Ok(())
}

/// Copies directory `path` of the ext4 filesystem image `fs` into `dest`
/// with debugfs, without mounting it.
pub fn ext4_copy_out(fs: &Path, path: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump {path} {}", dest.display()))
        .arg(fs)
        .output()
        .context("running debugfs")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // debugfs reports a failed request on stderr and still exits 0.
    if !out.status.success() || stderr.lines().any(|l| l.contains("rdump:")) {
        bail!("debugfs rdump {path} from {}: {stderr}", fs.display());
    }
    Ok(())
}

/// The receiver's configuration on a test image's data partition, listening
/// on `udp_listen`. The paths are the example configuration's: on the
/// appliance /etc/weir and /var/lib/weir lead to the data partition.
pub fn rx_config(udp_listen: &str) -> String {
    format!(
        r#"state_dir = "/var/lib/weir/rx"

[link]
transport = "udp"
udp_listen = "{udp_listen}"

[[auth.keys]]
id = 1
file = "/etc/weir/keys/1.key"

[delivery]
oci_layout = "/var/lib/weir/out"

[console]
device = "/dev/ttyS1"
"#
    )
}
