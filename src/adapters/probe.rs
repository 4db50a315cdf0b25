//! The probe: every fact the planner needs about a device, gathered **read-only**. It opens
//! the device O_RDONLY (O_DIRECT where possible, since a partition's page cache is not kept
//! coherent with writes that reach it through device-mapper), reads the first 64 KiB and the
//! journal slots in the tail, asks the kernel (sysfs, device-mapper list/table/deps ioctls,
//! mountinfo, /proc/swaps) and, only when the label says LVM PV, LVM's reporting commands.
//! It never writes, never creates or changes a dm device, never runs an LVM command that
//! changes anything.

use crate::adapters::blockdev::{self, BlockDev, OpenMode, PROBE_BYTES};
use crate::adapters::dm::{self, Dm, DmError};
use crate::adapters::lvm::{Lvm, LvmError};
use crate::core::facts::{Content, DeviceFacts, Holder};
use crate::core::geometry::{align_down, JOURNAL_SLOT_SECTORS};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Magic at byte 0 of each 4 KiB journal slot (journal-format.md); same as
/// `core::journal::MAGIC`. The probe only looks for it: decoding is the core's job.
pub const JOURNAL_MAGIC: &[u8; 8] = crate::core::journal::MAGIC;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{path}: no such device (check the name: `lsblk` lists block devices)")]
    NotFound { path: String },
    #[error("{path} is not a block device (it is {what}); give a partition such as /dev/sda5")]
    NotBlockDevice { path: String, what: &'static str },
    #[error("cannot access {path}: {source} (luksify must run as root)")]
    Access { path: String, source: io::Error },
    #[error("cannot read {what} of {path}: {source}")]
    Io { path: String, what: &'static str, source: io::Error },
    #[error("cannot list the device-mapper devices that use {path}: {source}")]
    Dm { path: String, source: DmError },
    #[error("{path} holds an LVM label but LVM cannot report it: {source}")]
    Lvm { path: String, source: LvmError },
}

/// Where the probe looks; [`Prober::system`] is the real machine, tests change the parts.
#[derive(Debug, Clone)]
pub struct Prober {
    pub lvm: Lvm,
    pub sysfs_root: PathBuf,
    pub mountinfo: PathBuf,
    pub swaps: PathBuf,
    /// Ask device-mapper for holders (when its control node exists).
    pub use_dm: bool,
    /// Time a read of the device's start for the plan's time estimate
    /// ([`DeviceFacts::read_sample`](crate::core::facts::DeviceFacts)): only where the
    /// estimate is shown (`--dry-run`); elsewhere it would be up to half a second of I/O
    /// competing with LVM's reports for nothing.
    pub time_read: bool,
}

impl Prober {
    pub fn system() -> Prober {
        Prober {
            lvm: Lvm::system(),
            sysfs_root: PathBuf::from("/sys"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            swaps: PathBuf::from("/proc/swaps"),
            use_dm: true,
            time_read: false,
        }
    }
}

/// Probe `path` on this machine.
pub fn probe(path: &Path) -> Result<DeviceFacts, ProbeError> {
    Prober::system().probe(path)
}

/// Probe `path` on this machine, with the timed read of the plan's time estimate.
pub fn probe_timed(path: &Path) -> Result<DeviceFacts, ProbeError> {
    Prober { time_read: true, ..Prober::system() }.probe(path)
}

fn file_kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a device"
    }
}

/// Where the two journal slots are: E = N rounded down to 8 sectors, slots at E-16 and E-8.
/// None when the device is too small to hold them.
pub fn journal_slots(size_sectors: u64) -> Option<[u64; 2]> {
    let e = align_down(size_sectors, 8);
    if e < 2 * JOURNAL_SLOT_SECTORS {
        return None;
    }
    Some([e - 2 * JOURNAL_SLOT_SECTORS, e - JOURNAL_SLOT_SECTORS])
}

/// Whether either 4 KiB slot of an 8 KiB tail read carries the journal magic.
pub fn has_journal_magic(tail: &[u8]) -> bool {
    tail.chunks(4096).take(2).any(|s| s.starts_with(JOURNAL_MAGIC))
}

impl Prober {
    pub fn probe(&self, path: &Path) -> Result<DeviceFacts, ProbeError> {
        let p = path.display().to_string();
        let md = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ProbeError::NotFound { path: p }),
            Err(e) => return Err(ProbeError::Access { path: p, source: e }),
        };
        if !md.file_type().is_block_device() {
            return Err(ProbeError::NotBlockDevice { path: p, what: file_kind(&md.file_type()) });
        }
        let mut warnings = Vec::new();
        let canonical = std::fs::canonicalize(path).map_err(|e| ProbeError::Access { path: p.clone(), source: e })?;
        let (major, minor) = (libc::major(md.rdev()), libc::minor(md.rdev()));

        let dev = BlockDev::open(path, OpenMode::READ_DIRECT)
            .map_err(|e| ProbeError::Access { path: p.clone(), source: e })?;
        let io = |what: &'static str| {
            let p = p.clone();
            move |e: io::Error| ProbeError::Io { path: p, what, source: e }
        };
        let size_bytes = dev.size_bytes().map_err(io("the size"))?;
        let size_sectors = size_bytes / 512;
        let logical_block_size = dev.logical_block_size().map_err(io("the logical block size"))?;
        let physical_block_size = dev.physical_block_size().map_err(io("the physical block size"))?;
        let ro_ioctl = dev.read_only_flag().map_err(io("the read-only flag"))?;

        let sys = match blockdev::sysfs_info_at(&self.sysfs_root, major, minor) {
            Ok(s) => Some(s),
            Err(e) => {
                warnings.push(format!("sysfs has no entry for {major}:{minor} ({e}): partition and holder facts come from device-mapper only"));
                None
            }
        };
        let kname = sys.as_ref().map(|s| s.kname.clone()).unwrap_or_else(|| {
            canonical.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.clone())
        });

        // Signatures in the first 64 KiB.
        let head_len = (PROBE_BYTES as u64).min(size_bytes) as usize;
        let mut head = vec![0u8; head_len];
        dev.read_at(0, &mut head).map_err(io("the first sectors"))?;
        let sigs = blockdev::detect_signatures(&head);
        let own = blockdev::content_of(&sigs);
        // libblkid knows far more formats than luksify reads itself; where it cannot answer,
        // say so (the conversion then rests on luksify's own reading alone).
        let content = match super::blkid::probe(&canonical) {
            Ok(b) => crate::core::facts::reconcile(own, &b, &p),
            Err(e) => {
                warnings.push(format!("{e}: signatures checked by luksify's own reading only"));
                own
            }
        };
        let luksify_marker = sigs.contains(&blockdev::Signature::FenceMarker);

        // LVM, only for an LVM label: its reports (processes that scan the devices, most of
        // the probe's time) run on their own thread while the reads below run here. The
        // canonical name: LVM knows devices by their names under /dev (a symlink elsewhere,
        // e.g. one a user made, is "not found" to it).
        std::thread::scope(|sc| {
            let lvm_report = (content == Content::LvmPv).then(|| sc.spawn(|| self.lvm.facts(&canonical)));
            let rest = || -> Result<DeviceFacts, ProbeError> {
                // A short timed read for the plan's time estimate (at most 64 MiB or half a second).
                let read_sample = self
                    .time_read
                    .then(|| dev.measure_read((64 << 20).min(size_bytes), std::time::Duration::from_millis(500)))
                    .flatten();

                // The journal slots in the tail.
                let luksify_journal = match journal_slots(size_sectors) {
                    Some([a, _]) => {
                        let mut tail = vec![0u8; (2 * JOURNAL_SLOT_SECTORS * 512) as usize];
                        dev.read_at(a * 512, &mut tail).map_err(io("the journal area"))?;
                        has_journal_magic(&tail)
                    }
                    None => false,
                };
                drop(dev);

                // Mounts and swap.
                let mounts = match std::fs::read_to_string(&self.mountinfo) {
                    Ok(t) => blockdev::parse_mountinfo(&t),
                    Err(e) => {
                        warnings
                            .push(format!("cannot read {} ({e}): mounts were not checked", self.mountinfo.display()));
                        Vec::new()
                    }
                };
                let swaps = match std::fs::read_to_string(&self.swaps) {
                    Ok(t) => blockdev::swap_devices(&blockdev::parse_swaps(&t)),
                    Err(e) => {
                        warnings.push(format!("cannot read {} ({e}): swap was not checked", self.swaps.display()));
                        Vec::new()
                    }
                };
                let mut direct_mounts = blockdev::mounts_of(&mounts, major, minor);
                // Filesystems that report an anonymous device number (btrfs) show up by source.
                for m in &mounts {
                    if m.source.starts_with("/dev/")
                        && !direct_mounts.contains(&m.mount_point)
                        && std::fs::canonicalize(&m.source).map(|c| c == canonical).unwrap_or(false)
                    {
                        direct_mounts.push(m.mount_point.clone());
                    }
                }
                let direct_swap = swaps.contains(&(major, minor));

                // Holders: dm devices whose live table uses this device.
                let mut holders = Vec::new();
                let dmh = if self.use_dm {
                    match Dm::open() {
                        Ok(d) => Some(d),
                        Err(DmError::Unavailable(why)) => {
                            warnings.push(format!(
                        "device-mapper is not available (cannot open {}: {why}): holders of {p} were not checked",
                        dm::CONTROL_PATH
                    ));
                            None
                        }
                        Err(e) => return Err(ProbeError::Dm { path: p.clone(), source: e }),
                    }
                } else {
                    None
                };
                let dm_ok = dmh.is_some();
                if let Some(dmh) = &dmh {
                    let dm_err = |e: DmError| ProbeError::Dm { path: p.clone(), source: e };
                    for d in dmh.list().map_err(dm_err)? {
                        let deps = match dmh.deps(&d.name) {
                            Ok(x) => x,
                            Err(DmError::NotFound(_)) => continue, // removed meanwhile
                            Err(e) => return Err(dm_err(e)),
                        };
                        if !deps.contains(&(major, minor)) {
                            continue;
                        }
                        let table = match dmh.table(&d.name) {
                            Ok(t) => t,
                            Err(DmError::NotFound(_)) => continue,
                            Err(e) => return Err(dm_err(e)),
                        };
                        holders.push(Holder {
                            mounts: blockdev::mounts_of(&mounts, d.major, d.minor),
                            swap: swaps.contains(&(d.major, d.minor)),
                            open_count: d.open_count,
                            name: d.name,
                            uuid: d.uuid,
                            major: d.major,
                            minor: d.minor,
                            table,
                        });
                    }
                }
                if let Some(s) = &sys {
                    for h in &s.holders {
                        let is_dm = h.starts_with("dm-");
                        if !is_dm {
                            warnings.push(format!("{p} is held by {h}, which is not a device-mapper device"));
                        } else if !dm_ok {
                            warnings.push(format!("{p} is held by {h} (device-mapper), whose table could not be read"));
                        }
                    }
                }

                Ok(DeviceFacts {
                    path: p.clone(),
                    canonical: canonical.display().to_string(),
                    kname,
                    major,
                    minor,
                    size_sectors,
                    logical_block_size,
                    physical_block_size,
                    partition_of: sys.as_ref().and_then(|s| s.partition_of.clone()),
                    read_only: ro_ioctl || sys.as_ref().map(|s| s.read_only).unwrap_or(false),
                    content,
                    holders,
                    direct_mounts,
                    direct_swap,
                    lvm: None,
                    luksify_journal,
                    luksify_marker,
                    read_sample,
                    warnings,
                })
            };
            let facts = rest();
            let lvm = lvm_report.map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(LvmError::Parse { cmd: "pvs/lvs".into(), why: "the report's thread panicked".into() })
                })
            });
            let mut facts = facts?;
            match lvm {
                None => {}
                Some(Ok(f)) => facts.lvm = Some(f),
                // Mid-conversion LVM may see the PV twice (raw and bridge): the journal is what
                // matters then, and the planner refuses on it.
                Some(Err(e)) if facts.luksify_journal => {
                    facts.warnings.push(format!("LVM could not report the PV on {p}: {e}"))
                }
                Some(Err(e)) => return Err(ProbeError::Lvm { path: p.clone(), source: e }),
            }
            Ok(facts)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_slots_are_in_the_last_8_kib_of_the_4k_aligned_end() {
        assert_eq!(journal_slots(1_000_000), Some([999_984, 999_992]));
        // N not a multiple of 8: E = N rounded down.
        assert_eq!(journal_slots(1_000_005), Some([999_984, 999_992]));
        assert_eq!(journal_slots(16), Some([0, 8]));
        assert_eq!(journal_slots(15), None);
        assert_eq!(JOURNAL_MAGIC, b"LUKSIFYJ");
    }

    #[test]
    fn journal_magic_in_either_slot() {
        let mut t = vec![0u8; 8192];
        assert!(!has_journal_magic(&t));
        t[4096..4104].copy_from_slice(JOURNAL_MAGIC);
        assert!(has_journal_magic(&t));
        let mut t = vec![0u8; 8192];
        t[..8].copy_from_slice(JOURNAL_MAGIC);
        assert!(has_journal_magic(&t));
        let mut t = vec![0u8; 8192];
        t[100..108].copy_from_slice(JOURNAL_MAGIC);
        assert!(!has_journal_magic(&t), "only at byte 0 of a slot");
    }

    #[test]
    fn missing_and_non_block_paths_are_distinct_errors() {
        let e = probe(Path::new("/dev/this-does-not-exist-luksify")).unwrap_err();
        assert!(matches!(e, ProbeError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("no such device"));
        let e = probe(Path::new("/")).unwrap_err();
        assert!(matches!(e, ProbeError::NotBlockDevice { what: "a directory", .. }), "{e}");
        let e = probe(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(e, ProbeError::NotBlockDevice { what: "a character device", .. }), "{e}");
        let f = std::env::temp_dir().join(format!("luksify-probe-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        let e = probe(&f).unwrap_err();
        assert!(e.to_string().contains("is not a block device (it is a regular file)"), "{e}");
        std::fs::remove_file(&f).unwrap();
    }
}
