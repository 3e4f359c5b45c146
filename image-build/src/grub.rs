//! The bootloader: GRUB for BIOS, installed into the disk image by hand.
//!
//! `grub-install` wants a block device; the image is a file. So the build
//! does what `grub-bios-setup` does: GRUB's core image (with the modules it
//! needs and the slot-selection script in a memdisk) goes into the BIOS
//! boot partition, and the boot sector goes into the MBR, patched to load
//! the core image from there.
//!
//! Slot selection follows RAUC's GRUB backend: the environment block on the
//! boot-state partition holds `ORDER` and, per slot, `<slot>_OK` and
//! `<slot>_TRY`. GRUB boots the first slot in ORDER that is OK and not yet
//! tried, marking it tried; the booted system confirms it with `rauc status
//! mark-good` (which clears TRY). A slot that fails to confirm is skipped on
//! the next boot.

use anyhow::{bail, Context};
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use crate::disk::{Layout, Purpose, SECTOR};
use crate::role::Role;
use crate::tool;

/// Size of GRUB's environment block file.
pub const GRUBENV_BYTES: usize = 1024;

/// Modules linked into the core image: reading the GPT and the slot
/// filesystems, the script language, the environment block, serial
/// terminal, and the memdisk holding the selection script.
const CORE_MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "ext2",
    "squash4",
    "xzio",
    "gzio",
    "memdisk",
    "tar",
    "normal",
    "test",
    "loadenv",
    "linux",
    "echo",
    "serial",
    "terminal",
    "regexp",
    "configfile",
    "sleep",
    "halt",
    "reboot",
];

// Offsets in GRUB's boot sector (grub/i386/pc/boot.h).
/// Start of the BIOS parameter block kept from the existing sector.
const BOOT_BPB_START: usize = 0x3;
const BOOT_BPB_END: usize = 0x5a;
/// LBA of the core image's first sector (u64 LE).
const BOOT_KERNEL_SECTOR: usize = 0x5c;
/// A jump that skips the boot-drive workaround; replaced by two NOPs on a
/// hard disk, as grub-bios-setup does.
const BOOT_DRIVE_CHECK: usize = 0x66;
/// Disk signature and partition table: kept from the existing MBR.
const BOOT_NT_MAGIC: usize = 0x1b8;

/// The block list at the end of the core image's first sector
/// (diskboot.img): start (u64), length in sectors (u16), segment (u16).
const CORE_BLOCKLIST: usize = 0x200 - 12;
/// Where diskboot loads the rest of the core image (segment).
const CORE_LOAD_SEGMENT: u16 = 0x820;

/// The initial environment block: both slots good, A first. The B slot is
/// written with the same root filesystem, so either boots.
pub fn initial_grubenv() -> Vec<u8> {
    grubenv(&[
        ("ORDER", "A B"),
        ("A_OK", "1"),
        ("A_TRY", "0"),
        ("B_OK", "1"),
        ("B_TRY", "0"),
    ])
}

fn grubenv(vars: &[(&str, &str)]) -> Vec<u8> {
    let mut s = String::from("# GRUB Environment Block\n");
    for (k, v) in vars {
        s.push_str(&format!("{k}={v}\n"));
    }
    let mut bytes = s.into_bytes();
    bytes.resize(GRUBENV_BYTES, b'#');
    bytes
}

/// Run by GRUB's rescue parser before anything else: remembers the disk
/// GRUB was loaded from, then hands over to the script in the memdisk.
const EARLY_CONFIG: &str = "\
set weir_disk=$root
set prefix=(memdisk)/boot/grub
set root=memdisk
";

/// The slot-selection script (memdisk `/boot/grub/grub.cfg`).
pub fn selection_script(layout: &Layout) -> String {
    let boot = layout.get(Purpose::BootState).grub_name();
    let a = layout.get(Purpose::RootA);
    let b = layout.get(Purpose::RootB);
    format!(
        r#"# weir slot selection (A/B, RAUC's GRUB environment variables).
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
regexp --set=1:disk '^([^,]+)' "$weir_disk"
set bootenv=($disk,{boot})/grubenv

set ORDER="A B"
set A_OK=0
set A_TRY=0
set B_OK=0
set B_TRY=0
load_env --file $bootenv

set slot=""
for s in $ORDER; do
  if [ "$s" = A -a "$A_OK" = 1 -a "$A_TRY" = 0 ]; then
    set slot=A
    set A_TRY=1
    break
  fi
  if [ "$s" = B -a "$B_OK" = 1 -a "$B_TRY" = 0 ]; then
    set slot=B
    set B_TRY=1
    break
  fi
done
# Every good slot was tried and none confirmed: try them all again rather
# than boot nothing.
if [ -z "$slot" ]; then
  set A_TRY=0
  set B_TRY=0
  for s in $ORDER; do
    if [ "$s" = A -a "$A_OK" = 1 ]; then set slot=A; break; fi
    if [ "$s" = B -a "$B_OK" = 1 ]; then set slot=B; break; fi
  done
fi
if [ -z "$slot" ]; then
  echo "weir: no slot marked good; booting A"
  set slot=A
fi
save_env --file $bootenv ORDER A_OK A_TRY B_OK B_TRY

if [ "$slot" = A ]; then
  set slot_label=a
  set root=($disk,{a})
else
  set slot_label=b
  set root=($disk,{b})
fi
echo "weir: booting slot $slot"
set default=0
set timeout=1
source /boot/grub/grub.cfg
"#,
        a = a.grub_name(),
        b = b.grub_name(),
    )
}

/// The slot's own menu entry (`/boot/grub/grub.cfg` in the root
/// filesystem): the kernel and its command line travel with the slot, so an
/// update can change them.
pub fn slot_config(role: Role, kernel_version: &str) -> String {
    let root_prefix = Purpose::RootA
        .label()
        .strip_suffix("-a")
        .expect("root slot labels end in -a/-b");
    format!(
        r#"# weir-{role}: boots this slot (chosen by the selection script in GRUB's
# core image, which sets $slot and $slot_label).
menuentry "weir {role} slot $slot" {{
    linux /boot/vmlinuz-{kv} root=PARTLABEL={root_prefix}-${{slot_label}} ro rootfstype=squashfs systemd.volatile=state console=tty0 console=ttyS0,115200n8 panic=10 rauc.slot=${{slot}}
    initrd /boot/initrd.img-{kv}
}}
"#,
        role = role.name(),
        kv = kernel_version,
    )
}

/// A tar archive (the memdisk) holding `files`, with fixed metadata.
fn memdisk_tar(files: &[(&str, &[u8])], epoch: u64) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, contents) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(epoch);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, path, *contents)
            .context("building GRUB's memdisk")?;
    }
    builder.into_inner().context("building GRUB's memdisk")
}

/// Builds GRUB's BIOS core image at `out` with the selection script inside.
pub fn make_core_image(
    layout: &Layout,
    grub_dir: &Path,
    work: &Path,
    out: &Path,
    epoch: u64,
) -> anyhow::Result<()> {
    let script = selection_script(layout);
    let memdisk = work.join("grub-memdisk.tar");
    std::fs::write(
        &memdisk,
        memdisk_tar(&[("boot/grub/grub.cfg", script.as_bytes())], epoch)?,
    )
    .with_context(|| format!("writing {}", memdisk.display()))?;
    let early = work.join("grub-early.cfg");
    std::fs::write(&early, EARLY_CONFIG).with_context(|| format!("writing {}", early.display()))?;
    tool::captured(
        Command::new("grub-mkimage")
            .arg("--format=i386-pc")
            .arg("--directory")
            .arg(grub_dir)
            .arg("--output")
            .arg(out)
            .arg("--config")
            .arg(&early)
            .arg("--memdisk")
            .arg(&memdisk)
            .arg("--prefix=/boot/grub")
            .args(CORE_MODULES),
    )
    .context("building GRUB's core image")?;
    Ok(())
}

/// GRUB's boot sector for a disk whose core image starts at `core_lba`,
/// keeping the BPB area and the partition table of `existing`.
pub fn boot_sector(boot_img: &[u8], existing: &[u8], core_lba: u64) -> anyhow::Result<Vec<u8>> {
    if boot_img.len() != SECTOR as usize || existing.len() != SECTOR as usize {
        bail!(
            "boot.img and the MBR must be one sector each (got {} and {} bytes)",
            boot_img.len(),
            existing.len()
        );
    }
    let mut sector = boot_img.to_vec();
    sector[BOOT_BPB_START..BOOT_BPB_END].copy_from_slice(&existing[BOOT_BPB_START..BOOT_BPB_END]);
    sector[BOOT_NT_MAGIC..].copy_from_slice(&existing[BOOT_NT_MAGIC..]);
    sector[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    // Some BIOSes pass a wrong boot drive; on a hard disk GRUB ignores
    // theirs and uses 0x80.
    sector[BOOT_DRIVE_CHECK] = 0x90;
    sector[BOOT_DRIVE_CHECK + 1] = 0x90;
    Ok(sector)
}

/// Points the core image's block list at its own sectors after `core_lba`,
/// checking the fields grub-mkimage already filled in.
pub fn patch_core_image(core: &mut [u8], core_lba: u64) -> anyhow::Result<()> {
    let sectors = (core.len() as u64).div_ceil(SECTOR);
    if sectors < 2 {
        bail!("GRUB core image is {} bytes: too small", core.len());
    }
    let len = u16::from_le_bytes([core[CORE_BLOCKLIST + 8], core[CORE_BLOCKLIST + 9]]);
    let segment = u16::from_le_bytes([core[CORE_BLOCKLIST + 10], core[CORE_BLOCKLIST + 11]]);
    if u64::from(len) != sectors - 1 || segment != CORE_LOAD_SEGMENT {
        bail!(
            "GRUB core image block list says {len} sectors at segment {segment:#x}; \
             expected {} at {CORE_LOAD_SEGMENT:#x} (not an i386-pc core image?)",
            sectors - 1
        );
    }
    core[CORE_BLOCKLIST..CORE_BLOCKLIST + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    Ok(())
}

/// Installs GRUB into the disk image: the core image into the BIOS boot
/// partition and the boot sector into the MBR.
pub fn install(
    disk: &Path,
    layout: &Layout,
    grub_dir: &Path,
    core_img: &Path,
) -> anyhow::Result<()> {
    let part = layout.get(Purpose::BiosBoot);
    let mut core =
        std::fs::read(core_img).with_context(|| format!("reading {}", core_img.display()))?;
    if core.len() as u64 > part.size_bytes() {
        bail!(
            "GRUB core image ({} bytes) does not fit the BIOS boot partition ({} bytes)",
            core.len(),
            part.size_bytes()
        );
    }
    patch_core_image(&mut core, part.start_sector)?;
    let boot_path = grub_dir.join("boot.img");
    let boot_img =
        std::fs::read(&boot_path).with_context(|| format!("reading {}", boot_path.display()))?;

    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    let mut mbr = vec![0u8; SECTOR as usize];
    f.read_exact(&mut mbr)
        .with_context(|| format!("reading the MBR of {}", disk.display()))?;
    let sector = boot_sector(&boot_img, &mbr, part.start_sector)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&sector)
        .with_context(|| format!("writing the MBR of {}", disk.display()))?;
    f.seek(SeekFrom::Start(part.offset_bytes()))?;
    f.write_all(&core)
        .with_context(|| format!("writing GRUB's core image into {}", disk.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", disk.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Sizes;

    fn layout() -> Layout {
        Layout::new(
            Role::Rx,
            Sizes {
                boot_state_mib: 16,
                slot_mib: 512,
                data_mib: 64,
            },
        )
    }

    #[test]
    fn grubenv_is_one_padded_block_with_both_slots_good() {
        let env = initial_grubenv();
        assert_eq!(env.len(), GRUBENV_BYTES);
        let text = String::from_utf8(env).unwrap();
        assert!(text.starts_with("# GRUB Environment Block\nORDER=A B\nA_OK=1\n"));
        assert!(text.contains("B_OK=1\nB_TRY=0\n#"));
        assert!(text.ends_with("####"));
    }

    #[test]
    fn selection_script_reads_the_boot_state_partition_and_both_slots() {
        let s = selection_script(&layout());
        assert!(s.contains("set bootenv=($disk,gpt2)/grubenv"));
        assert!(s.contains("set root=($disk,gpt3)"));
        assert!(s.contains("set root=($disk,gpt4)"));
        assert!(s.contains("save_env --file $bootenv ORDER A_OK A_TRY B_OK B_TRY"));
    }

    #[test]
    fn slot_config_boots_the_chosen_slot_read_only_with_the_serial_console() {
        let c = slot_config(Role::Rx, "6.1.0-56-amd64");
        assert!(c.contains("linux /boot/vmlinuz-6.1.0-56-amd64 "));
        assert!(c.contains("initrd /boot/initrd.img-6.1.0-56-amd64"));
        assert!(c.contains("root=PARTLABEL=weir-root-${slot_label} ro rootfstype=squashfs"));
        assert!(c.contains("console=ttyS0,115200n8"));
        assert!(c.contains("rauc.slot=${slot}"));
    }

    #[test]
    fn memdisk_is_reproducible() {
        let a = memdisk_tar(&[("boot/grub/grub.cfg", b"x")], 1_700_000_000).unwrap();
        let b = memdisk_tar(&[("boot/grub/grub.cfg", b"x")], 1_700_000_000).unwrap();
        assert_eq!(a, b);
        let mut ar = tar::Archive::new(&a[..]);
        let e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.header().mtime().unwrap(), 1_700_000_000);
    }

    #[test]
    fn boot_sector_keeps_the_partition_table_and_points_at_the_core() {
        let boot_img: Vec<u8> = (0..512).map(|i| (i % 251) as u8).collect();
        let mut mbr = vec![0u8; 512];
        mbr[0x1be..0x1ce].copy_from_slice(&[0xee; 16]);
        mbr[0x1fe] = 0x55;
        mbr[0x1ff] = 0xaa;
        let s = boot_sector(&boot_img, &mbr, 2048).unwrap();
        assert_eq!(&s[0x1b8..], &mbr[0x1b8..], "partition table kept");
        assert_eq!(&s[0x5c..0x64], &2048u64.to_le_bytes());
        assert_eq!(&s[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(&s[0x68..0x1b8], &boot_img[0x68..0x1b8], "boot code kept");
        assert_eq!(&s[3..0x5a], &mbr[3..0x5a], "BPB from the disk");
        assert!(boot_sector(&boot_img[..100], &mbr, 2048).is_err());
    }

    #[test]
    fn core_block_list_points_after_its_first_sector() {
        let mut core = vec![0u8; 512 * 10];
        core[CORE_BLOCKLIST + 8..CORE_BLOCKLIST + 10].copy_from_slice(&9u16.to_le_bytes());
        core[CORE_BLOCKLIST + 10..CORE_BLOCKLIST + 12].copy_from_slice(&0x820u16.to_le_bytes());
        patch_core_image(&mut core, 2048).unwrap();
        assert_eq!(
            &core[CORE_BLOCKLIST..CORE_BLOCKLIST + 8],
            &2049u64.to_le_bytes()
        );

        let mut other = vec![0u8; 512 * 10];
        let err = patch_core_image(&mut other, 2048).unwrap_err();
        assert!(
            err.to_string().contains("not an i386-pc core image"),
            "{err}"
        );
    }
}
