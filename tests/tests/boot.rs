//! Boot test: image-build makes the rx appliance image (with a test
//! configuration on its data partition), qemu boots it through its own GRUB
//! (TCG, no KVM), and the test talks to gateway-rx's serial console on the
//! VM's second serial port: the start banner with the version, then
//! `status`. Then it presses the VM's power button and checks that the
//! gateway stopped cleanly and the VM powered off.
//!
//! Needs root and Debian's mmdebstrap, qemu-system-x86, squashfs-tools,
//! e2fsprogs, fdisk, grub-pc-bin, rauc and openssl (scripts/test installs
//! them), and network access to the Debian mirror. Skipped with a message
//! when they are missing, except in CI (CI=true), where that fails.
//!
//! The gateway binary is the one cargo built for this test run's profile
//! (debug under `cargo test`; it is also the smaller one, as release keeps
//! line tables).

// geteuid has no safe wrapper in std.
#![allow(unsafe_code)]

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weir_tests::pair::bin_dir;

/// Building the image: mmdebstrap downloads ~150 MB and installs ~155
/// packages, then xz compresses the root (about 2 minutes here).
const BUILD_TIMEOUT: Duration = Duration::from_secs(12 * 60);
/// From qemu's start to the console banner (about 30 s here under TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// From the power button to qemu's exit: systemd stops the gateway (which
/// flushes its state) and powers off.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(120);
const EPOCH: &str = "1747699200";

const TOOLS: &[&str] = &[
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

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(program).is_file())
        })
        .unwrap_or(false)
}

/// What this machine lacks to run the test.
fn missing_requirements() -> Vec<String> {
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

/// Builds gateway-rx and image-build in this test's profile; returns their
/// paths.
fn build_binaries() -> Result<(PathBuf, PathBuf)> {
    let dir = bin_dir()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
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
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last `n` lines of a log file, for failure messages.
fn tail(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs image-build, its output going to `log`, within BUILD_TIMEOUT.
fn run_image_build(mut cmd: Command, log: &Path) -> Result<()> {
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

/// The VM's second serial port, as the harness's end of it.
struct Console {
    stream: UnixStream,
    seen: Vec<u8>,
}

impl Console {
    /// Connects to qemu's socket (qemu creates it right after starting).
    fn connect(path: &Path, deadline: Instant) -> Result<Console> {
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
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
    fn read_until(&mut self, needle: &str, deadline: Instant) -> Result<String> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(pos) = find(&self.seen, needle.as_bytes()) {
                let end = pos + needle.len();
                let text = String::from_utf8_lossy(&self.seen[..end]).into_owned();
                self.seen.drain(..end);
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} on the console; it showed: {:?}",
                    String::from_utf8_lossy(&self.seen)
                );
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

    fn type_line(&mut self, line: &str) -> Result<()> {
        self.stream
            .write_all(format!("{line}\r").as_bytes())
            .context("typing on the console")
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// gateway-rx's version, as `gateway-rx --version` prints it.
fn gateway_version(bin: &Path) -> Result<String> {
    let out = Command::new(bin).arg("--version").output()?;
    let text = String::from_utf8(out.stdout)?;
    text.trim()
        .strip_prefix("gateway-rx ")
        .map(str::to_string)
        .with_context(|| format!("unexpected --version output {text:?}"))
}

const RX_CONFIG: &str = r#"# Test configuration on the image's data partition. The paths are the
# example configuration's: on the appliance /etc/weir and /var/lib/weir
# lead to the data partition.
state_dir = "/var/lib/weir/rx"

[link]
transport = "udp"
udp_listen = "127.0.0.1:7700"

[[auth.keys]]
id = 1
file = "/etc/weir/keys/1.key"

[delivery]
oci_layout = "/var/lib/weir/out"

[console]
device = "/dev/ttyS1"
"#;

#[test]
fn rx_image_boots_its_gateway_and_answers_on_the_serial_console() -> Result<()> {
    let missing = missing_requirements();
    if !missing.is_empty() {
        let msg = format!(
            "boot test needs: {} (apt-get install -y mmdebstrap qemu-system-x86 qemu-utils \
             squashfs-tools e2fsprogs fdisk grub-pc-bin rauc openssl)",
            missing.join(", ")
        );
        if weir_test_support::tools::is_ci(std::env::var_os("CI").as_deref()) {
            bail!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return Ok(());
    }

    let (gateway, image_build) = build_binaries()?;
    let version = gateway_version(&gateway)?;
    let tmp = tempfile::tempdir()?;
    let input = tmp.path().join("input");
    std::fs::create_dir_all(input.join("keys"))?;
    std::fs::write(input.join("rx.toml"), RX_CONFIG)?;
    std::fs::write(input.join("keys/1.key"), hex::encode([0x5au8; 32]))?;
    let out = tmp.path().join("out");

    let build_started = Instant::now();
    let mut cmd = Command::new(&image_build);
    cmd.arg("--role=rx")
        .arg("--binary")
        .arg(&gateway)
        .arg("--out")
        .arg(&out)
        .arg("--config")
        .arg(input.join("rx.toml"))
        .arg("--keys")
        .arg(input.join("keys"))
        .arg("--signing-dir")
        .arg(tmp.path().join("signing"))
        .arg("--source-date-epoch")
        .arg(EPOCH);
    run_image_build(cmd, &tmp.path().join("image-build.log"))?;
    eprintln!("image built in {:?}", build_started.elapsed());

    // The manifest says what went in: this gateway binary and the kernel.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("weir-rx.manifest.json"))?)?;
    let binary_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(
        &gateway,
    )?));
    assert_eq!(manifest["inputs"]["binary"]["sha256"], binary_sha.as_str());
    assert_eq!(manifest["version"], version.as_str());
    let packages = manifest["packages"]
        .as_array()
        .context("manifest packages")?;
    assert!(packages.iter().any(|p| p["name"] == "linux-image-amd64"));
    assert!(packages.iter().any(|p| p["name"] == "rauc"));

    // Boot it: ttyS0 (kernel and systemd) to a file, ttyS1 (the gateway's
    // console) to a socket the test holds. snapshot=on leaves the image as
    // built.
    let serial0 = tmp.path().join("ttyS0.log");
    let socket = tmp.path().join("console.sock");
    let qemu_log = tmp.path().join("qemu.log");
    let monitor = tmp.path().join("monitor.sock");
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-nographic",
            "-m",
            "1024",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            out.join("weir-rx.img").display()
        ))
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial0.display()))
        .arg("-serial")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&qemu_log)?)
        .stderr(std::fs::File::create(tmp.path().join("qemu.err"))?)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let mut vm = Killed(qemu);
    let boot_started = Instant::now();
    let deadline = boot_started + BOOT_TIMEOUT;
    let with_log = |e: anyhow::Error| {
        e.context(format!(
            "ttyS0 (last lines):\n{}\nqemu: {}",
            tail(&serial0, 60),
            tail(&tmp.path().join("qemu.err"), 10)
        ))
    };

    let mut console = Console::connect(&socket, deadline).map_err(with_log)?;
    let banner = format!("weir rx {version} console ready");
    console.read_until(&banner, deadline).map_err(with_log)?;
    eprintln!("console banner after {:?} of boot", boot_started.elapsed());
    console
        .read_until("weir-rx> ", deadline)
        .map_err(with_log)?;

    console.type_line("status")?;
    let answer = console
        .read_until("weir-rx> ", Instant::now() + ANSWER_TIMEOUT)
        .map_err(with_log)?;
    assert!(!answer.contains("error:"), "status refused: {answer:?}");
    // The gateway runs with the configuration from the data partition.
    assert!(
        answer.contains("127.0.0.1:7700"),
        "status does not show the configured link: {answer:?}"
    );

    // It booted through the image's own GRUB, slot A, read-only root.
    let boot_log = String::from_utf8_lossy(&std::fs::read(&serial0)?).into_owned();
    assert!(
        boot_log.contains("weir: booting slot A"),
        "{}",
        tail(&serial0, 60)
    );
    assert!(boot_log.contains("root=PARTLABEL=weir-root-a ro rootfstype=squashfs"));

    // Power off as an operator would, with the power button (ACPI): systemd
    // stops the gateway and the kernel powers the VM off; -no-reboot makes
    // qemu exit then.
    if let Some(status) = vm.0.try_wait()? {
        bail!("qemu exited early ({status})");
    }
    let mut hmp = UnixStream::connect(&monitor)
        .with_context(|| format!("connecting to qemu's monitor {}", monitor.display()))?;
    hmp.write_all(b"system_powerdown\n")
        .context("pressing the power button")?;
    let pressed = Instant::now();
    loop {
        if vm.0.try_wait()?.is_some() {
            break;
        }
        if pressed.elapsed() > POWEROFF_TIMEOUT {
            return Err(with_log(anyhow::anyhow!(
                "the VM did not power off within {POWEROFF_TIMEOUT:?} of the power button"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let boot_log = String::from_utf8_lossy(&std::fs::read(&serial0)?).into_owned();
    // The service's output goes to the kernel console too: the gateway
    // stopped on SIGTERM, after flushing, before the power went.
    assert!(
        boot_log.contains("gateway-rx stopped"),
        "gateway-rx did not stop cleanly:\n{}",
        tail(&serial0, 40)
    );
    assert!(
        boot_log.contains("reboot: Power down"),
        "no power-down on ttyS0:\n{}",
        tail(&serial0, 40)
    );
    eprintln!("powered off {:?} after the power button", pressed.elapsed());
    eprintln!(
        "boot test: build + boot + console in {:?}",
        build_started.elapsed()
    );
    Ok(())
}
