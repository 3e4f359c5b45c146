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

use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use weir_tests::appliance_vm::{
    build_binaries, build_rx_image, gateway_version, requirements_met, tail, Console, Provision,
    Vm, VmOptions, POWEROFF_TIMEOUT,
};

/// From qemu's start to the console banner (about 30 s here under TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn rx_image_boots_its_gateway_and_answers_on_the_serial_console() -> Result<()> {
    if !requirements_met("boot test")? {
        return Ok(());
    }

    let (gateway, image_build) = build_binaries()?;
    let version = gateway_version(&gateway)?;
    let tmp = tempfile::tempdir()?;
    let key_hex = hex::encode([0x5au8; 32]);

    let build_started = Instant::now();
    let image = build_rx_image(
        &gateway,
        &image_build,
        tmp.path(),
        &Provision {
            config: &weir_tests::appliance_vm::rx_config("127.0.0.1:7700"),
            key_hex: &key_hex,
            network: &[],
        },
    )?;
    let out = image.parent().context("image directory")?;
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
    let mut vm = Vm::start(
        &image,
        tmp.path(),
        "boot",
        &VmOptions {
            snapshot: true,
            udp_forward: None,
        },
    )?;
    let deadline = vm.started + BOOT_TIMEOUT;

    let mut console = Console::connect(&vm.console_socket, deadline).map_err(|e| vm.with_log(e))?;
    let banner = format!("weir rx {version} console ready");
    console
        .read_until(&banner, deadline)
        .map_err(|e| vm.with_log(e))?;
    eprintln!("console banner after {:?} of boot", vm.started.elapsed());
    console
        .read_until("weir-rx> ", deadline)
        .map_err(|e| vm.with_log(e))?;

    console.type_line("status")?;
    let answer = console
        .read_until("weir-rx> ", Instant::now() + ANSWER_TIMEOUT)
        .map_err(|e| vm.with_log(e))?;
    assert!(!answer.contains("error:"), "status refused: {answer:?}");
    // The gateway runs with the configuration from the data partition.
    assert!(
        answer.contains("127.0.0.1:7700"),
        "status does not show the configured link: {answer:?}"
    );

    // It booted through the image's own GRUB, slot A, read-only root.
    let boot_log = vm.serial_text();
    assert!(
        boot_log.contains("weir: booting slot A"),
        "{}",
        tail(&vm.serial0, 60)
    );
    assert!(boot_log.contains("root=PARTLABEL=weir-root-a ro rootfstype=squashfs"));

    // Power off as an operator would, with the power button (ACPI): systemd
    // stops the gateway and the kernel powers the VM off.
    let pressed = Instant::now();
    vm.power_off(POWEROFF_TIMEOUT)?;
    let boot_log = vm.serial_text();
    // The service's output goes to the kernel console too: the gateway
    // stopped on SIGTERM, after flushing, before the power went.
    if !boot_log.contains("gateway-rx stopped") {
        bail!(
            "gateway-rx did not stop cleanly:\n{}",
            tail(&vm.serial0, 40)
        );
    }
    if !boot_log.contains("reboot: Power down") {
        bail!("no power-down on ttyS0:\n{}", tail(&vm.serial0, 40));
    }
    eprintln!("powered off {:?} after the power button", pressed.elapsed());
    eprintln!(
        "boot test: build + boot + console in {:?}",
        build_started.elapsed()
    );
    Ok(())
}
