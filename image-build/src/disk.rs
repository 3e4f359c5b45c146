//! The disk image: a GPT with GRUB's BIOS boot partition, a small boot-state
//! partition, two root slots (A/B) and the data partition, assembled from
//! filesystem images written at their partitions' offsets (no loop devices,
//! no mounts).

use anyhow::{bail, Context};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use crate::role::Role;
use crate::tool;

pub const SECTOR: u64 = 512;
/// Partitions start on MiB boundaries (flash erase blocks, 4K sectors).
const ALIGN_SECTORS: u64 = 2048;
/// The backup GPT at the end of the disk: header plus 128 entries.
const BACKUP_GPT_SECTORS: u64 = 33;
const MIB_SECTORS: u64 = (1 << 20) / SECTOR;

/// GPT type of GRUB's BIOS boot partition ("Hah!IdontNeedEFI").
const TYPE_BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
/// GPT type "Linux filesystem".
const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// What each partition is for; their labels are what the appliance mounts
/// by (`PARTLABEL=`), so they are part of the image's contract with RAUC,
/// fstab and GRUB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// GRUB's core image with the slot-selection script (BIOS boot).
    BiosBoot,
    /// GRUB's environment block (slot order and tries) and RAUC's status:
    /// survives updates of either slot and re-provisioning of the data.
    BootState,
    RootA,
    RootB,
    /// State directory, configuration and keys; never overwritten by an
    /// update.
    Data,
}

impl Purpose {
    pub fn label(self) -> &'static str {
        match self {
            Purpose::BiosBoot => "bios-boot",
            Purpose::BootState => "weir-boot",
            Purpose::RootA => "weir-root-a",
            Purpose::RootB => "weir-root-b",
            Purpose::Data => "weir-data",
        }
    }

    fn type_guid(self) -> &'static str {
        match self {
            Purpose::BiosBoot => TYPE_BIOS_BOOT,
            _ => TYPE_LINUX,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    /// 1-based, as GRUB (`gptN`) and Linux (`sdaN`) number them.
    pub number: u32,
    pub purpose: Purpose,
    pub label: &'static str,
    pub type_guid: &'static str,
    pub uuid: String,
    pub start_sector: u64,
    pub size_sectors: u64,
}

impl Partition {
    pub fn offset_bytes(&self) -> u64 {
        self.start_sector * SECTOR
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_sectors * SECTOR
    }

    /// GRUB's name for it on the boot disk, e.g. `gpt3`.
    pub fn grub_name(&self) -> String {
        format!("gpt{}", self.number)
    }
}

/// Partition sizes; the data partition is meant to be grown on the device
/// (see the README), so its size here only has to hold the provisioning.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sizes {
    pub boot_state_mib: u64,
    pub slot_mib: u64,
    pub data_mib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    pub disk_guid: String,
    pub total_sectors: u64,
    pub partitions: Vec<Partition>,
}

/// A fixed UUID for `name` within the role's image: the same inputs give
/// the same partition table (a random one would make every build differ).
/// The bytes are SHA-256 of the name, marked as an RFC 9562 version 8
/// (custom) UUID.
pub fn fixed_uuid(role: Role, name: &str) -> String {
    let digest = Sha256::digest(format!("weir image {} {name}", role.name()).as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Layout {
    pub fn new(role: Role, sizes: Sizes) -> Layout {
        let plan = [
            (Purpose::BiosBoot, MIB_SECTORS),
            (Purpose::BootState, sizes.boot_state_mib * MIB_SECTORS),
            (Purpose::RootA, sizes.slot_mib * MIB_SECTORS),
            (Purpose::RootB, sizes.slot_mib * MIB_SECTORS),
            (Purpose::Data, sizes.data_mib * MIB_SECTORS),
        ];
        let mut start = ALIGN_SECTORS;
        let mut partitions = Vec::new();
        for (i, (purpose, size)) in plan.into_iter().enumerate() {
            partitions.push(Partition {
                number: i as u32 + 1,
                purpose,
                label: purpose.label(),
                type_guid: purpose.type_guid(),
                uuid: fixed_uuid(role, purpose.label()),
                start_sector: start,
                size_sectors: size,
            });
            start = (start + size).div_ceil(ALIGN_SECTORS) * ALIGN_SECTORS;
        }
        let total_sectors = (start + BACKUP_GPT_SECTORS).div_ceil(ALIGN_SECTORS) * ALIGN_SECTORS;
        Layout {
            disk_guid: fixed_uuid(role, "disk"),
            total_sectors,
            partitions,
        }
    }

    pub fn get(&self, purpose: Purpose) -> &Partition {
        self.partitions
            .iter()
            .find(|p| p.purpose == purpose)
            .expect("every purpose has a partition in Layout::new")
    }

    /// The partition table as an sfdisk script.
    pub fn sfdisk_script(&self) -> String {
        let mut s = format!(
            "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: {ALIGN_SECTORS}\n",
            self.disk_guid
        );
        for p in &self.partitions {
            s.push_str(&format!(
                "start={}, size={}, type={}, uuid={}, name={}\n",
                p.start_sector, p.size_sectors, p.type_guid, p.uuid, p.label
            ));
        }
        s
    }
}

/// Creates `path` (sparse, the full disk size) and writes the partition
/// table with sfdisk.
pub fn create(path: &Path, layout: &Layout) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(layout.total_sectors * SECTOR)
        .with_context(|| format!("sizing {}", path.display()))?;
    drop(file);
    tool::with_input(
        Command::new("sfdisk")
            .arg("--quiet")
            .arg("--no-reread")
            .arg(path),
        &layout.sfdisk_script(),
    )
    .with_context(|| format!("writing the partition table of {}", path.display()))?;
    Ok(())
}

/// Copies the filesystem image `content` into `partition` of the disk
/// image, refusing one that does not fit.
pub fn write_partition(disk: &Path, partition: &Partition, content: &Path) -> anyhow::Result<()> {
    let mut src = File::open(content).with_context(|| format!("opening {}", content.display()))?;
    let len = src
        .metadata()
        .with_context(|| format!("reading {}", content.display()))?
        .len();
    if len > partition.size_bytes() {
        bail!(
            "{} ({} MiB) does not fit partition {} ({} MiB): raise its size option",
            content.display(),
            len.div_ceil(1 << 20),
            partition.label,
            partition.size_bytes() >> 20
        );
    }
    let mut dst = OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    dst.seek(SeekFrom::Start(partition.offset_bytes()))?;
    // Blocks of zeros are skipped: the disk image stays sparse where the
    // filesystem is empty.
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = partition.offset_bytes();
    loop {
        let n = read_full(&mut src, &mut buf)
            .with_context(|| format!("reading {}", content.display()))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])
                .with_context(|| format!("writing {}", disk.display()))?;
        }
        pos += n as u64;
    }
    debug_assert_eq!(pos, partition.offset_bytes() + len);
    dst.sync_all()
        .with_context(|| format!("syncing {}", disk.display()))?;
    Ok(())
}

fn read_full(src: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(
            Role::Rx,
            Sizes {
                boot_state_mib: 16,
                slot_mib: 512,
                data_mib: 256,
            },
        )
    }

    #[test]
    fn partitions_are_aligned_ordered_and_disjoint() {
        let l = layout();
        let labels: Vec<_> = l.partitions.iter().map(|p| p.label).collect();
        assert_eq!(
            labels,
            [
                "bios-boot",
                "weir-boot",
                "weir-root-a",
                "weir-root-b",
                "weir-data"
            ]
        );
        for w in l.partitions.windows(2) {
            assert!(w[0].start_sector + w[0].size_sectors <= w[1].start_sector);
        }
        for p in &l.partitions {
            assert_eq!(p.start_sector % ALIGN_SECTORS, 0, "{}", p.label);
        }
        let last = l.partitions.last().unwrap();
        assert!(last.start_sector + last.size_sectors + BACKUP_GPT_SECTORS <= l.total_sectors);
        assert_eq!(l.get(Purpose::RootA).size_bytes(), 512 << 20);
        assert_eq!(l.get(Purpose::RootB).grub_name(), "gpt4");
    }

    #[test]
    fn uuids_are_fixed_per_role_and_distinct() {
        let a = layout();
        let b = layout();
        assert_eq!(a.sfdisk_script(), b.sfdisk_script());
        let tx = Layout::new(
            Role::Tx,
            Sizes {
                boot_state_mib: 16,
                slot_mib: 512,
                data_mib: 256,
            },
        );
        assert_ne!(a.disk_guid, tx.disk_guid);
        let mut uuids: Vec<_> = a.partitions.iter().map(|p| p.uuid.clone()).collect();
        uuids.push(a.disk_guid.clone());
        uuids.sort();
        uuids.dedup();
        assert_eq!(uuids.len(), 6);
        let u = &a.disk_guid;
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8", "version 8 UUID: {u}");
    }

    #[test]
    fn sfdisk_script_names_every_partition() {
        let s = layout().sfdisk_script();
        assert!(s.starts_with("label: gpt\n"));
        assert!(s.contains(&format!("type={TYPE_BIOS_BOOT}")));
        assert!(s.contains("name=weir-data\n"));
        assert_eq!(s.lines().filter(|l| l.starts_with("start=")).count(), 5);
    }

    #[test]
    fn write_partition_places_bytes_at_the_offset_and_refuses_oversize() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk");
        File::create(&disk).unwrap().set_len(8 << 20).unwrap();
        let part = Partition {
            number: 2,
            purpose: Purpose::BootState,
            label: "weir-boot",
            type_guid: TYPE_LINUX,
            uuid: String::new(),
            start_sector: 4096,
            size_sectors: 2048,
        };
        let content = dir.path().join("fs");
        let mut bytes = vec![0u8; 3 << 20];
        bytes[0] = 0xaa;
        bytes[(2 << 20) + 5] = 0xbb;
        std::fs::write(&content, &bytes[..(1 << 20)]).unwrap();
        write_partition(&disk, &part, &content).unwrap();
        let img = std::fs::read(&disk).unwrap();
        assert_eq!(img[4096 * 512], 0xaa);
        assert_eq!(img.iter().filter(|&&b| b != 0).count(), 1);

        std::fs::write(&content, &bytes).unwrap();
        let err = write_partition(&disk, &part, &content).unwrap_err();
        assert!(
            err.to_string().contains("does not fit partition weir-boot"),
            "{err}"
        );
    }
}
