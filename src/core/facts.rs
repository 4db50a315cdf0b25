//! Facts about a device, gathered by the adapters (`adapters::probe`) and consumed by the
//! pure planner. Plain data, serialisable, so tests can build them by hand.

use serde::{Deserialize, Serialize};

/// Sector = 512 bytes throughout.
pub use super::units::SECTOR;

/// `bytes` read with O_DIRECT in `micros` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSample {
    pub bytes: u64,
    pub micros: u64,
}

impl ReadSample {
    /// MiB per second; None for a sample too small to say anything (under 1 MiB or 1 ms).
    pub fn mib_per_s(&self) -> Option<f64> {
        (self.bytes >= 1 << 20 && self.micros >= 1000)
            .then(|| self.bytes as f64 / f64::from(1u32 << 20) / (self.micros as f64 / 1e6))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFacts {
    /// Path as given by the user.
    pub path: String,
    /// Canonical /dev path (symlinks resolved).
    pub canonical: String,
    /// Kernel name, e.g. "sda5" or "ubda5".
    pub kname: String,
    pub major: u32,
    pub minor: u32,
    /// Size in 512-byte sectors.
    pub size_sectors: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    /// Some(parent disk kname) if this is a partition.
    pub partition_of: Option<String>,
    pub read_only: bool,
    /// What the first sectors say.
    pub content: Content,
    /// dm devices that map this device (directly), with their tables.
    pub holders: Vec<Holder>,
    /// Mount points of filesystems directly on the device (not through dm).
    pub direct_mounts: Vec<String>,
    /// Swap directly on the device is active.
    pub direct_swap: bool,
    /// LVM's view, if the device is a PV.
    pub lvm: Option<LvmFacts>,
    /// A luksify journal was found in the tail (conversion in progress), or a fence marker.
    pub luksify_journal: bool,
    pub luksify_marker: bool,
    /// A short O_DIRECT read of the device's start, timed (the plan's time estimate);
    /// None when not measured.
    #[serde(default)]
    pub read_sample: Option<ReadSample>,
    /// What the probe could not check or found odd, one sentence each (e.g. no
    /// device-mapper in this kernel, so holders were not checked; a holder that is not a dm
    /// device). Empty when everything was checked.
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Content {
    /// No known signature.
    Nothing,
    LvmPv,
    Luks {
        version: u16,
    },
    Filesystem {
        fstype: String,
    },
    Swap,
    /// luksify's fence marker.
    LuksifyMarker,
    Other {
        what: String,
    },
}

/// What libblkid's low-level probe (superblocks and partition tables, in safe mode: two
/// signatures that exclude each other are "ambivalent") finds on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkidSays {
    Nothing,
    Found { fs_type: Option<String>, pt_type: Option<String> },
    Ambivalent,
}

/// The content, luksify's own reading of the first bytes (`own`) checked against libblkid's
/// (the library udev, LVM's scanning and `wipefs` use, which knows far more formats). luksify's
/// own states (its marker, a LUKS header: a conversion may be in progress) and what it already
/// refuses stay as they are; a PV must be nothing else to libblkid either, and a device with
/// no signature luksify knows gets libblkid's name for what is there.
pub fn reconcile(own: Content, blkid: &BlkidSays, dev: &str) -> Content {
    let other = |what: String| Content::Other { what };
    let list = format!("`wipefs --no-act {dev}` lists them");
    match (own, blkid) {
        (Content::LvmPv, BlkidSays::Found { fs_type: Some(t), pt_type: None }) if t == "LVM2_member" => Content::LvmPv,
        (Content::LvmPv, BlkidSays::Found { fs_type: Some(t), .. }) if t != "LVM2_member" => other(format!(
            "an LVM label, but libblkid identifies the device as {t}: one of the two is stale, and udev and LVM may follow either ({list}; remove the stale one first)"
        )),
        (Content::LvmPv, BlkidSays::Found { pt_type: Some(p), .. }) => other(format!(
            "an LVM label and a {p} partition table: LVM ignores a partitioned device ({list})"
        )),
        (Content::LvmPv, BlkidSays::Ambivalent) => other(format!(
            "an LVM label and other signatures that exclude it (libblkid's probe is ambivalent: {list}; remove the stale one first)"
        )),
        (Content::LvmPv, _) => other(format!("an LVM label that libblkid does not see ({list})")),
        (Content::Nothing, BlkidSays::Found { fs_type: Some(t), .. }) => other(format!("{t} (libblkid)")),
        (Content::Nothing, BlkidSays::Found { pt_type: Some(p), .. }) => other(format!("a {p} partition table (libblkid)")),
        (Content::Nothing, BlkidSays::Ambivalent) => other(format!("several signatures (libblkid; {list})")),
        (own, _) => own,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// dm name, e.g. "vg0-root".
    pub name: String,
    pub uuid: String,
    pub major: u32,
    pub minor: u32,
    /// Table lines (start, length, target type, params), keys never included.
    pub table: Vec<TableLineFacts>,
    /// Where it is mounted (mountinfo), if anywhere.
    pub mounts: Vec<String>,
    /// Active swap on it.
    pub swap: bool,
    /// Open count from the kernel.
    pub open_count: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableLineFacts {
    pub start: u64,
    pub length: u64,
    pub target_type: String,
    pub params: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvmFacts {
    pub pv_uuid: String,
    pub vg_name: String,
    pub vg_uuid: String,
    /// pe_start in sectors.
    pub pe_start: u64,
    /// Extent size in sectors.
    pub extent_size: u64,
    pub pe_count: u64,
    pub pe_alloc_count: u64,
    /// pv_size as LVM reports it, sectors.
    pub pv_size: u64,
    /// Device size as LVM knows it, sectors.
    pub dev_size: u64,
    /// Number of metadata areas on this PV (2 means one at the end: refused).
    pub mda_count: u32,
    /// Segments of this PV: [pe_start_extent, pe_start_extent+len) → which LV (None = free).
    pub segments: Vec<PvSegment>,
    pub lvs: Vec<LvFacts>,
    /// The file LVM locks for this VG (`<locking_dir>/V_<vg>`), as LVM itself named it
    /// while reporting; None when it did not say (luksify then asks `lvm config`).
    #[serde(skip)]
    pub vg_lock_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvSegment {
    pub start_extent: u64,
    pub extents: u64,
    /// LV name owning it, None if free.
    pub lv: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvFacts {
    pub name: String,
    /// lv_attr string, e.g. "-wi-ao----".
    pub attr: String,
    /// segtype(s) of its segments, e.g. ["linear"], ["striped"], ["snapshot"], ["thin-pool"].
    pub segtypes: Vec<String>,
    /// dm name (vg-lv with dashes doubled), when active.
    pub dm_name: String,
    pub active: bool,
    /// Uses PVs other than this one too.
    pub spans_other_pvs: bool,
}

/// Facts of sample devices, for the core's tests (the planner's and the boot checks').
#[cfg(test)]
pub(crate) mod samples {
    use super::*;

    /// /dev/sda5: an LVM PV (VG vg0, 60 extents of 4 MiB, root on its first 10), 20 MiB of
    /// room past the PV.
    pub fn laptop() -> DeviceFacts {
        DeviceFacts {
            path: "/dev/sda5".into(),
            canonical: "/dev/sda5".into(),
            kname: "sda5".into(),
            major: 8,
            minor: 5,
            size_sectors: 2048 + 60 * 8192 + 40_960,
            logical_block_size: 512,
            physical_block_size: 4096,
            partition_of: Some("sda".into()),
            read_only: false,
            content: Content::LvmPv,
            holders: vec![Holder {
                name: "vg0-root".into(),
                uuid: "LVM-abc".into(),
                major: 254,
                minor: 0,
                table: vec![TableLineFacts {
                    start: 0,
                    length: 8192 * 10,
                    target_type: "linear".into(),
                    params: "8:5 2048".into(),
                }],
                mounts: vec!["/".into()],
                swap: false,
                open_count: 1,
            }],
            direct_mounts: vec![],
            direct_swap: false,
            lvm: Some(LvmFacts {
                pv_uuid: "pvuuid".into(),
                vg_name: "vg0".into(),
                vg_uuid: "vguuid".into(),
                pe_start: 2048,
                extent_size: 8192,
                pe_count: 60,
                pe_alloc_count: 10,
                pv_size: 60 * 8192,
                dev_size: 2048 + 60 * 8192 + 40_960,
                mda_count: 1,
                segments: vec![
                    PvSegment { start_extent: 0, extents: 10, lv: Some("root".into()) },
                    PvSegment { start_extent: 10, extents: 50, lv: None },
                ],
                vg_lock_file: None,
                lvs: vec![LvFacts {
                    name: "root".into(),
                    attr: "-wi-ao----".into(),
                    segtypes: vec!["linear".into()],
                    dm_name: "vg0-root".into(),
                    active: true,
                    spans_other_pvs: false,
                }],
            }),
            luksify_journal: false,
            luksify_marker: false,
            read_sample: None,
            warnings: vec![],
        }
    }
}

#[cfg(test)]
mod reconcile_tests {
    use super::{reconcile, BlkidSays, Content};

    fn found(fs: Option<&str>, pt: Option<&str>) -> BlkidSays {
        BlkidSays::Found { fs_type: fs.map(str::to_string), pt_type: pt.map(str::to_string) }
    }

    #[test]
    fn a_pv_must_be_a_pv_to_libblkid_too() {
        let d = "/dev/sda5";
        assert_eq!(reconcile(Content::LvmPv, &found(Some("LVM2_member"), None), d), Content::LvmPv);
        for (b, word) in [
            (found(Some("zfs_member"), None), "zfs_member"),
            (found(Some("LVM2_member"), Some("dos")), "dos partition table"),
            (BlkidSays::Ambivalent, "ambivalent"),
            (BlkidSays::Nothing, "does not see"),
        ] {
            match reconcile(Content::LvmPv, &b, d) {
                Content::Other { what } => {
                    assert!(what.contains(word) && what.contains("wipefs --no-act /dev/sda5"), "{what}")
                }
                c => panic!("{b:?} gave {c:?}"),
            }
        }
    }

    #[test]
    fn luksify_s_own_states_and_other_refusals_stay() {
        for own in [
            Content::LuksifyMarker,
            Content::Luks { version: 2 },
            Content::Swap,
            Content::Filesystem { fstype: "xfs".into() },
        ] {
            assert_eq!(reconcile(own.clone(), &BlkidSays::Ambivalent, "/dev/x"), own);
            assert_eq!(reconcile(own.clone(), &BlkidSays::Nothing, "/dev/x"), own);
        }
    }

    #[test]
    fn an_unknown_device_gets_libblkid_s_name() {
        assert_eq!(
            reconcile(Content::Nothing, &found(Some("BitLocker"), None), "/dev/x"),
            Content::Other { what: "BitLocker (libblkid)".into() }
        );
        assert_eq!(reconcile(Content::Nothing, &BlkidSays::Nothing, "/dev/x"), Content::Nothing);
    }
}
