//! Block devices: open, size, block sizes, positioned I/O with a flush; sysfs facts
//! (partition → parent, read-only flag, holders); signatures in the first 64 KiB; which
//! device numbers are mounted (/proc/self/mountinfo) or used as swap (/proc/swaps).
//!
//! The parsers take text or byte buffers so they are unit-tested on samples; the thin
//! functions around them read the real files.

use crate::core::facts::Content;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// luksify's fence marker at byte 0 of the raw partition (the marker's layout is
/// `core::marker`; this is the same constant: the UUID follows it directly at byte 16, so
/// there is no NUL after the magic).
pub const FENCE_MAGIC: &[u8] = crate::core::marker::FENCE_MAGIC;

/// How many bytes from the start of a device signature detection looks at.
pub const PROBE_BYTES: usize = 64 * 1024;

/// LVM2 label: "LABELONE" at byte 0 and "LVM2 001" at byte 24 of one of sectors 0..3.
pub const LVM_LABEL_ID: &[u8; 8] = b"LABELONE";
pub const LVM_LABEL_TYPE: &[u8; 8] = b"LVM2 001";
/// LUKS1/LUKS2 primary header magic at byte 0, version (u16 big-endian) at byte 6.
pub const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// LUKS2 secondary header magic (at 16 KiB, 32 KiB, … 4 MiB).
pub const LUKS2_SECONDARY_MAGIC: &[u8; 6] = b"SKUL\xba\xbe";
/// ext2/3/4: 0xEF53 little-endian at byte 1080 (superblock at 1024, s_magic at 56).
pub const EXT_MAGIC_OFFSET: usize = 1080;
pub const XFS_MAGIC: &[u8; 4] = b"XFSB";
pub const SWAP_MAGIC: &[u8; 10] = b"SWAPSPACE2";
pub const SWAP_MAGIC_OLD: &[u8; 10] = b"SWAP-SPACE";

// ---------------------------------------------------------------------------------------------
// Opening and I/O

/// How to open a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenMode {
    /// O_RDWR instead of O_RDONLY.
    pub write: bool,
    /// O_EXCL: on a block device, fails with EBUSY while anything holds it (a mount, a dm
    /// table, another O_EXCL opener). Not for a device whose LVs are live.
    pub exclusive: bool,
    /// O_DIRECT: bypass the page cache. Reads are bounced through an aligned buffer (any
    /// offset and length work); writes must be aligned to the logical block size.
    pub direct: bool,
}

impl OpenMode {
    pub const READ: OpenMode = OpenMode { write: false, exclusive: false, direct: false };
    /// What the probe uses: read-only, uncached (the page cache of a partition is not kept
    /// coherent with writes that reach it through device-mapper).
    pub const READ_DIRECT: OpenMode = OpenMode { write: false, exclusive: false, direct: true };
}

/// An open block device (or, for tests and images, a regular file).
pub struct BlockDev {
    file: File,
    path: PathBuf,
    direct: bool,
    is_block: bool,
}

const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size; null is checked.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory for an I/O buffer");
        Aligned { ptr, len: len.max(DIRECT_ALIGN) }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is valid for `len` bytes and borrowed uniquely through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align(self.len, DIRECT_ALIGN).unwrap()) }
    }
}

// Block-layer ioctls (<linux/fs.h>).
nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_sszget, nix::request_code_none!(0x12, 104), libc::c_int);
nix::ioctl_read_bad!(blk_pbszget, nix::request_code_none!(0x12, 123), libc::c_uint);
nix::ioctl_read_bad!(blk_roget, nix::request_code_none!(0x12, 94), libc::c_int);

/// Opens `path` with `open(O_DIRECT)`; returns the file and whether it is direct. Where
/// O_DIRECT is refused (EINVAL), a block device is an error: luksify never reads or writes a
/// raw device through the page cache, which is not coherent with the live dm mappings over
/// it (the cause of cryptsetup 2.7.5's online-reencryption fix). A regular file on a
/// filesystem without O_DIRECT (tmpfs: test images) opens buffered (`open(0)`).
pub fn open_direct(path: &Path, open: impl Fn(i32) -> io::Result<File>) -> io::Result<(File, bool)> {
    match open(libc::O_DIRECT) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let is_block = std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(true);
            if is_block {
                return Err(io::Error::new(io::ErrorKind::Unsupported, direct_refused(path)));
            }
            Ok((open(0)?, false))
        }
        Err(e) => Err(e),
    }
}

/// What a block device that refuses O_DIRECT gets told.
pub fn direct_refused(path: &Path) -> String {
    format!(
        "{} refuses O_DIRECT: luksify does its I/O on the raw device with O_DIRECT only (buffered I/O under live device-mapper mappings is not coherent); nothing was changed",
        path.display()
    )
}

impl BlockDev {
    /// Open `path`. With `direct`, O_DIRECT as [`open_direct`] opens it (a block device
    /// that refuses it is an error; a test image on tmpfs opens buffered);
    /// [`BlockDev::is_direct`] says which.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<BlockDev> {
        let mut flags = 0;
        if mode.exclusive {
            flags |= libc::O_EXCL;
        }
        let open = |extra: i32| OpenOptions::new().read(true).write(mode.write).custom_flags(flags | extra).open(path);
        let (file, direct) = if mode.direct { open_direct(path, open)? } else { (open(0)?, false) };
        let is_block = file.metadata()?.file_type().is_block_device();
        Ok(BlockDev { file, path: path.to_path_buf(), direct, is_block })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> &File {
        &self.file
    }
    pub fn is_direct(&self) -> bool {
        self.direct
    }
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }

    /// (major, minor) of a block device; None for a regular file.
    pub fn dev_number(&self) -> io::Result<Option<(u32, u32)>> {
        if !self.is_block {
            return Ok(None);
        }
        let rdev = self.file.metadata()?.rdev();
        Ok(Some((libc::major(rdev), libc::minor(rdev))))
    }

    /// Size in bytes: BLKGETSIZE64 (a regular file: its length).
    pub fn size_bytes(&self) -> io::Result<u64> {
        if !self.is_block {
            return Ok(self.file.metadata()?.len());
        }
        let mut n: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        unsafe { blk_getsize64(self.file.as_raw_fd(), &mut n) }.map_err(io::Error::from)?;
        Ok(n)
    }

    /// Size in 512-byte sectors (rounded down).
    pub fn size_sectors(&self) -> io::Result<u64> {
        Ok(self.size_bytes()? / 512)
    }

    /// BLKSSZGET (a regular file: 512).
    pub fn logical_block_size(&self) -> io::Result<u32> {
        if !self.is_block {
            return Ok(512);
        }
        let mut v: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int.
        unsafe { blk_sszget(self.file.as_raw_fd(), &mut v) }.map_err(io::Error::from)?;
        Ok(v as u32)
    }

    /// BLKPBSZGET (a regular file: 512).
    pub fn physical_block_size(&self) -> io::Result<u32> {
        if !self.is_block {
            return Ok(512);
        }
        let mut v: libc::c_uint = 0;
        // SAFETY: BLKPBSZGET writes one unsigned int.
        unsafe { blk_pbszget(self.file.as_raw_fd(), &mut v) }.map_err(io::Error::from)?;
        Ok(v)
    }

    /// BLKROGET: the kernel's read-only flag (a regular file: false).
    pub fn read_only_flag(&self) -> io::Result<bool> {
        if !self.is_block {
            return Ok(false);
        }
        let mut v: libc::c_int = 0;
        // SAFETY: BLKROGET writes one int.
        unsafe { blk_roget(self.file.as_raw_fd(), &mut v) }.map_err(io::Error::from)?;
        Ok(v != 0)
    }

    /// Read exactly `buf.len()` bytes at byte `offset` (any alignment, also with O_DIRECT).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = Aligned::new((end - start) as usize);
        let b = bounce.as_mut();
        self.file.read_exact_at(&mut b[..(end - start) as usize], start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&b[skip..skip + buf.len()]);
        Ok(())
    }

    /// Time O_DIRECT reads of the device's first `max_bytes` (1 MiB at a time, stopping after
    /// `max_time`): the plan's time estimate. None without O_DIRECT (a plain file: the page
    /// cache would make any rate up) or on a read error.
    pub fn measure_read(
        &self,
        max_bytes: u64,
        max_time: std::time::Duration,
    ) -> Option<crate::core::facts::ReadSample> {
        const STEP: usize = 1 << 20;
        if !self.direct {
            return None;
        }
        let mut buf = Aligned::new(STEP);
        let t0 = std::time::Instant::now();
        let mut done = 0u64;
        while done + STEP as u64 <= max_bytes && t0.elapsed() < max_time {
            self.file.read_exact_at(buf.as_mut(), done).ok()?;
            done += STEP as u64;
        }
        Some(crate::core::facts::ReadSample { bytes: done, micros: t0.elapsed().as_micros() as u64 })
    }

    /// Write all of `buf` at byte `offset`. With O_DIRECT, offset and length must be
    /// multiples of 4096 (the data is bounced through an aligned buffer).
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if !self.direct {
            return self.file.write_all_at(buf, offset);
        }
        if !offset.is_multiple_of(DIRECT_ALIGN as u64) || !buf.len().is_multiple_of(DIRECT_ALIGN) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "O_DIRECT writes must be 4 KiB aligned"));
        }
        let mut bounce = Aligned::new(buf.len());
        bounce.as_mut()[..buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce.as_mut()[..buf.len()], offset)
    }

    /// fdatasync: on a block device this writes back dirty pages and sends a cache flush to
    /// the disk, so every completed write is durable when it returns.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

// ---------------------------------------------------------------------------------------------
// sysfs

/// What sysfs says about a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsInfo {
    /// Kernel name, e.g. "sda5".
    pub kname: String,
    /// Parent disk's kernel name when this is a partition.
    pub partition_of: Option<String>,
    /// The `ro` attribute.
    pub read_only: bool,
    /// Kernel names under `holders/` (e.g. "dm-0", "md127").
    pub holders: Vec<String>,
    /// The `size` attribute (always in 512-byte sectors).
    pub size_sectors: Option<u64>,
}

/// sysfs facts for a device number, from /sys.
pub fn sysfs_info(major: u32, minor: u32) -> io::Result<SysfsInfo> {
    sysfs_info_at(Path::new("/sys"), major, minor)
}

/// sysfs facts under `root` (a fake tree in tests): `root/dev/block/M:m` is a symlink to the
/// device's directory; a partition's directory holds a `partition` file and lies inside its
/// disk's directory.
pub fn sysfs_info_at(root: &Path, major: u32, minor: u32) -> io::Result<SysfsInfo> {
    let link = root.join("dev/block").join(format!("{major}:{minor}"));
    let dir = std::fs::canonicalize(&link)?;
    let kname = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("odd sysfs path {}", dir.display())))?
        .to_string();
    let partition_of = if dir.join("partition").exists() {
        dir.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).map(str::to_string)
    } else {
        None
    };
    let read_attr = |name: &str| std::fs::read_to_string(dir.join(name)).ok().map(|s| s.trim().to_string());
    let read_only = read_attr("ro").map(|s| s == "1").unwrap_or(false);
    let size_sectors = read_attr("size").and_then(|s| s.parse().ok());
    let mut holders = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("holders")) {
        for e in rd {
            holders.push(e?.file_name().to_string_lossy().into_owned());
        }
    }
    holders.sort();
    Ok(SysfsInfo { kname, partition_of, read_only, holders, size_sectors })
}

// ---------------------------------------------------------------------------------------------
// Signatures

/// A signature found in the first [`PROBE_BYTES`] of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// luksify's fence marker at byte 0.
    FenceMarker,
    /// LUKS primary header.
    Luks {
        version: u16,
    },
    /// A LUKS2 secondary header without a primary one.
    Luks2Secondary {
        offset: usize,
    },
    /// An LVM2 label in this sector (0..3).
    LvmLabel {
        sector: usize,
    },
    /// ext2, ext3 or ext4.
    Ext {
        fstype: &'static str,
    },
    Xfs,
    /// A swap area, for this page size.
    Swap {
        page_size: usize,
    },
    /// Linux MD RAID superblock v1.1 (byte 0) or v1.2 (byte 4096).
    MdRaid,
    /// A GPT header in sector 1 (a whole disk, not a partition).
    Gpt,
    /// 0x55AA at byte 510: an MBR partition table or a FAT/NTFS boot sector.
    BootSector,
}

impl Signature {
    pub fn describe(&self) -> String {
        match self {
            Signature::FenceMarker => "a luksify fence marker".into(),
            Signature::Luks { version } => format!("a LUKS{version} header"),
            Signature::Luks2Secondary { offset } => {
                format!("a LUKS2 secondary header at byte {offset} (no primary header)")
            }
            Signature::LvmLabel { sector } => format!("an LVM2 label in sector {sector}"),
            Signature::Ext { fstype } => format!("an {fstype} filesystem"),
            Signature::Xfs => "an xfs filesystem".into(),
            Signature::Swap { .. } => "a swap area".into(),
            Signature::MdRaid => "a Linux MD RAID member".into(),
            Signature::Gpt => "a GPT partition table (a whole disk)".into(),
            Signature::BootSector => "an MBR partition table or a FAT/NTFS boot sector".into(),
        }
    }
}

fn at(buf: &[u8], off: usize, magic: &[u8]) -> bool {
    buf.get(off..off + magic.len()) == Some(magic)
}

fn le32(buf: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(off..off + 4)?.try_into().ok()?))
}

/// Which sector 0..3 holds an LVM2 label, if any.
pub fn lvm_label_sector(buf: &[u8]) -> Option<usize> {
    (0..4).find(|s| at(buf, s * 512, LVM_LABEL_ID) && at(buf, s * 512 + 24, LVM_LABEL_TYPE))
}

/// ext2/3/4 from the superblock at byte 1024, the way blkid tells them apart: ext4 when it
/// uses a feature ext3 lacks, ext3 when it has a journal, ext2 otherwise.
fn ext_kind(buf: &[u8]) -> Option<&'static str> {
    if buf.get(EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2) != Some(&[0x53, 0xEF]) {
        return None;
    }
    let compat = le32(buf, 1024 + 0x5C)?;
    let incompat = le32(buf, 1024 + 0x60)?;
    let ro_compat = le32(buf, 1024 + 0x64)?;
    const HAS_JOURNAL: u32 = 0x4;
    const JOURNAL_DEV: u32 = 0x8;
    // ext3 understands only FILETYPE | RECOVER | META_BG (incompat) and
    // SPARSE_SUPER | LARGE_FILE | BTREE_DIR (ro_compat).
    const EXT3_INCOMPAT: u32 = 0x2 | 0x4 | 0x10;
    const EXT3_RO_COMPAT: u32 = 0x1 | 0x2 | 0x4;
    if incompat & JOURNAL_DEV != 0 {
        return Some("jbd");
    }
    if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        Some("ext4")
    } else if compat & HAS_JOURNAL != 0 {
        Some("ext3")
    } else {
        Some("ext2")
    }
}

/// Every signature in `buf` (the first bytes of a device, up to [`PROBE_BYTES`]).
pub fn detect_signatures(buf: &[u8]) -> Vec<Signature> {
    let mut out = Vec::new();
    if at(buf, 0, FENCE_MAGIC) {
        out.push(Signature::FenceMarker);
    }
    if at(buf, 0, LUKS_MAGIC) {
        let v = buf.get(6..8).map(|b| u16::from_be_bytes([b[0], b[1]])).unwrap_or(0);
        out.push(Signature::Luks { version: v });
    } else if let Some(off) = [0x4000usize, 0x8000].into_iter().find(|&o| at(buf, o, LUKS2_SECONDARY_MAGIC)) {
        out.push(Signature::Luks2Secondary { offset: off });
    }
    if let Some(sector) = lvm_label_sector(buf) {
        out.push(Signature::LvmLabel { sector });
    }
    if let Some(fstype) = ext_kind(buf) {
        out.push(Signature::Ext { fstype });
    }
    if at(buf, 0, XFS_MAGIC) {
        out.push(Signature::Xfs);
    }
    for page in [4096usize, 8192, 16384, 65536] {
        if at(buf, page - 10, SWAP_MAGIC) || at(buf, page - 10, SWAP_MAGIC_OLD) {
            out.push(Signature::Swap { page_size: page });
            break;
        }
    }
    const MD_MAGIC: u32 = 0xa92b_4efc;
    if le32(buf, 0) == Some(MD_MAGIC) || le32(buf, 4096) == Some(MD_MAGIC) {
        out.push(Signature::MdRaid);
    }
    if at(buf, 512, b"EFI PART") {
        out.push(Signature::Gpt);
    }
    if buf.get(510..512) == Some(&[0x55, 0xAA]) {
        out.push(Signature::BootSector);
    }
    out
}

/// What the device holds, from its signatures: the marker first (a half-converted disk),
/// then LUKS, then an LVM label (what LVM itself would use), then filesystems and swap,
/// then anything else.
pub fn content_of(sigs: &[Signature]) -> Content {
    let has = |f: &dyn Fn(&Signature) -> bool| sigs.iter().find(|s| f(s)).cloned();
    if has(&|s| matches!(s, Signature::FenceMarker)).is_some() {
        return Content::LuksifyMarker;
    }
    if let Some(Signature::Luks { version }) = has(&|s| matches!(s, Signature::Luks { .. })) {
        return Content::Luks { version };
    }
    if has(&|s| matches!(s, Signature::LvmLabel { .. })).is_some() {
        return Content::LvmPv;
    }
    if let Some(Signature::Ext { fstype }) = has(&|s| matches!(s, Signature::Ext { .. })) {
        if fstype == "jbd" {
            return Content::Other { what: "an ext3/4 external journal".into() };
        }
        return Content::Filesystem { fstype: fstype.to_string() };
    }
    if has(&|s| matches!(s, Signature::Xfs)).is_some() {
        return Content::Filesystem { fstype: "xfs".into() };
    }
    if has(&|s| matches!(s, Signature::Swap { .. })).is_some() {
        return Content::Swap;
    }
    match sigs.first() {
        Some(s) => Content::Other { what: s.describe() },
        None => Content::Nothing,
    }
}

// ---------------------------------------------------------------------------------------------
// /proc/self/mountinfo and /proc/swaps

/// Undo the kernel's octal escapes in mount and swap paths (`\040` space, `\011` tab,
/// `\012` newline, `\134` backslash).
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if v <= 255 {
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub major: u32,
    pub minor: u32,
    /// Root of the mount within its filesystem (a bind mount's subdirectory).
    pub root: String,
    pub mount_point: String,
    pub fstype: String,
    /// The mount source, e.g. "/dev/mapper/vg0-root".
    pub source: String,
}

/// Parse mountinfo: `id parent major:minor root mountpoint options [optional…] - fstype
/// source superoptions`. Lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let f: Vec<&str> = line.split(' ').collect();
    if f.len() < 10 {
        return None;
    }
    let (ma, mi) = f[2].split_once(':')?;
    let sep = f.iter().skip(6).position(|&x| x == "-")? + 6;
    Some(MountEntry {
        mount_id: f[0].parse().ok()?,
        major: ma.parse().ok()?,
        minor: mi.parse().ok()?,
        root: unescape_octal(f[3]),
        mount_point: unescape_octal(f[4]),
        fstype: unescape_octal(f.get(sep + 1)?),
        source: unescape_octal(f.get(sep + 2)?),
    })
}

pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Mount points of the filesystem on device (major, minor), each once, in mountinfo order.
pub fn mounts_of(entries: &[MountEntry], major: u32, minor: u32) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in entries.iter().filter(|e| e.major == major && e.minor == minor) {
        if !out.contains(&e.mount_point) {
            out.push(e.mount_point.clone());
        }
    }
    out
}

/// One line of /proc/swaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapEntry {
    pub filename: String,
    /// "partition" or "file".
    pub kind: String,
    pub size_kib: u64,
    pub used_kib: u64,
    pub priority: i32,
}

/// Parse /proc/swaps (header line, then `filename type size used priority`).
pub fn parse_swaps(text: &str) -> Vec<SwapEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 {
                return None;
            }
            // The file name is escaped, so it holds no whitespace; a deleted swap file has
            // " (deleted)" appended, which the split puts in its own field.
            let n = f.len();
            Some(SwapEntry {
                filename: unescape_octal(f[0]),
                kind: f[n - 4].to_string(),
                size_kib: f[n - 3].parse().ok()?,
                used_kib: f[n - 2].parse().ok()?,
                priority: f[n - 1].parse().ok()?,
            })
        })
        .collect()
}

pub fn read_swaps() -> io::Result<Vec<SwapEntry>> {
    Ok(parse_swaps(&std::fs::read_to_string("/proc/swaps")?))
}

/// Device numbers of the block devices in use as swap (swap files are left out: they are
/// on a filesystem, which shows as a mount).
pub fn swap_devices(entries: &[SwapEntry]) -> Vec<(u32, u32)> {
    entries
        .iter()
        .filter(|e| e.kind == "partition")
        .filter_map(|e| std::fs::metadata(&e.filename).ok())
        .filter(|m| m.file_type().is_block_device())
        .map(|m| (libc::major(m.rdev()), libc::minor(m.rdev())))
        .collect()
}

/// Size of a block device (or file) in sectors, by seeking to its end.
pub fn size_sectors_of(path: &Path) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    Ok(f.seek(SeekFrom::End(0))? / 512)
}

/// The device number of the block device at `path`; an error if it is not one.
pub fn devref_of(path: &Path) -> io::Result<crate::core::tables::DevRef> {
    let md = std::fs::metadata(path)?;
    if !md.file_type().is_block_device() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a block device"));
    }
    let rdev = md.rdev();
    Ok(crate::core::tables::DevRef {
        major: nix::sys::stat::major(rdev) as u32,
        minor: nix::sys::stat::minor(rdev) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `open` as a device that refuses O_DIRECT would answer: EINVAL with it, a file without.
    fn refusing(path: &Path) -> impl Fn(i32) -> io::Result<File> + '_ {
        move |extra| {
            if extra & libc::O_DIRECT != 0 {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                File::open(path)
            }
        }
    }

    #[test]
    fn a_block_device_that_refuses_o_direct_is_an_error_never_buffered() {
        // /dev/null is a character device; a block device is what luksify converts: take any
        // the machine has (loop0 exists wherever the loop module is loaded, ram0 with brd).
        let Some(dev) = ["/dev/loop0", "/dev/ram0", "/dev/vda", "/dev/sda", "/dev/nvme0n1"]
            .iter()
            .map(Path::new)
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
        else {
            panic!("no block device node to test with (modprobe loop)");
        };
        let e = open_direct(dev, refusing(dev)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("refuses O_DIRECT") && e.to_string().contains("nothing was changed"), "{e}");
    }

    #[test]
    fn a_test_image_on_a_filesystem_without_o_direct_opens_buffered() {
        let p = std::env::temp_dir().join(format!("luksify-direct-{}", std::process::id()));
        std::fs::write(&p, [0u8; 512]).unwrap();
        let (_, direct) = open_direct(&p, refusing(&p)).unwrap();
        assert!(!direct);
        let _ = std::fs::remove_file(&p);
    }

    fn buf() -> Vec<u8> {
        vec![0u8; PROBE_BYTES]
    }

    #[test]
    fn empty_is_nothing() {
        assert!(detect_signatures(&buf()).is_empty());
        assert_eq!(content_of(&detect_signatures(&buf())), Content::Nothing);
        assert_eq!(content_of(&detect_signatures(&[])), Content::Nothing);
    }

    #[test]
    fn lvm_label_in_each_of_sectors_0_to_3() {
        for s in 0..4 {
            let mut b = buf();
            b[s * 512..s * 512 + 8].copy_from_slice(b"LABELONE");
            b[s * 512 + 24..s * 512 + 32].copy_from_slice(b"LVM2 001");
            assert_eq!(detect_signatures(&b), vec![Signature::LvmLabel { sector: s }]);
            assert_eq!(content_of(&detect_signatures(&b)), Content::LvmPv);
        }
        // In sector 4 LVM would not look: nothing.
        let mut b = buf();
        b[2048..2056].copy_from_slice(b"LABELONE");
        b[2048 + 24..2048 + 32].copy_from_slice(b"LVM2 001");
        assert!(detect_signatures(&b).is_empty());
        // LABELONE without the LVM2 type is not an LVM label.
        let mut b = buf();
        b[512..520].copy_from_slice(b"LABELONE");
        assert!(detect_signatures(&b).is_empty());
    }

    #[test]
    fn luks_versions() {
        for v in [1u16, 2] {
            let mut b = buf();
            b[..6].copy_from_slice(LUKS_MAGIC);
            b[6..8].copy_from_slice(&v.to_be_bytes());
            assert_eq!(content_of(&detect_signatures(&b)), Content::Luks { version: v });
        }
        let mut b = buf();
        b[0x4000..0x4006].copy_from_slice(LUKS2_SECONDARY_MAGIC);
        let s = detect_signatures(&b);
        assert_eq!(s, vec![Signature::Luks2Secondary { offset: 0x4000 }]);
        assert!(matches!(content_of(&s), Content::Other { .. }));
    }

    fn ext(compat: u32, incompat: u32, ro: u32) -> Vec<u8> {
        let mut b = buf();
        b[1080] = 0x53;
        b[1081] = 0xEF;
        b[1024 + 0x5C..1024 + 0x60].copy_from_slice(&compat.to_le_bytes());
        b[1024 + 0x60..1024 + 0x64].copy_from_slice(&incompat.to_le_bytes());
        b[1024 + 0x64..1024 + 0x68].copy_from_slice(&ro.to_le_bytes());
        b
    }

    #[test]
    fn ext2_ext3_ext4() {
        let fs = |b: Vec<u8>| content_of(&detect_signatures(&b));
        assert_eq!(fs(ext(0, 0x2, 0x1)), Content::Filesystem { fstype: "ext2".into() });
        assert_eq!(fs(ext(0x4, 0x2, 0x3)), Content::Filesystem { fstype: "ext3".into() });
        // mke2fs -t ext4 defaults: extents (0x40), 64bit (0x80), flex_bg (0x200).
        assert_eq!(fs(ext(0x3c, 0x2c2, 0x46b)), Content::Filesystem { fstype: "ext4".into() });
        assert!(matches!(fs(ext(0, 0x8, 0)), Content::Other { .. }));
    }

    #[test]
    fn xfs_swap_marker() {
        let mut b = buf();
        b[..4].copy_from_slice(b"XFSB");
        assert_eq!(content_of(&detect_signatures(&b)), Content::Filesystem { fstype: "xfs".into() });
        let mut b = buf();
        b[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(detect_signatures(&b), vec![Signature::Swap { page_size: 4096 }]);
        assert_eq!(content_of(&detect_signatures(&b)), Content::Swap);
        let mut b = buf();
        b[65526..65536].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(detect_signatures(&b), vec![Signature::Swap { page_size: 65536 }]);
        let m = crate::core::marker::encode("0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", 12345);
        let mut b = buf();
        b[..m.len()].copy_from_slice(&m);
        assert_eq!(detect_signatures(&b), vec![Signature::FenceMarker]);
        assert_eq!(content_of(&detect_signatures(&b)), Content::LuksifyMarker);
        assert_eq!(FENCE_MAGIC, b"LUKSIFY-FENCE-V1");
    }

    #[test]
    fn priorities_marker_over_luks_over_lvm_over_fs() {
        // A PV whose stale ext4 superblock survived (pvcreate -ff without wiping): LVM wins.
        let mut b = ext(0x3c, 0x2c2, 0x46b);
        b[512..520].copy_from_slice(b"LABELONE");
        b[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(content_of(&detect_signatures(&b)), Content::LvmPv);
        b[..6].copy_from_slice(LUKS_MAGIC);
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(content_of(&detect_signatures(&b)), Content::Luks { version: 2 });
        b[..16].copy_from_slice(FENCE_MAGIC);
        assert_eq!(content_of(&detect_signatures(&b)), Content::LuksifyMarker);
    }

    #[test]
    fn other_signatures() {
        let mut b = buf();
        b[512..520].copy_from_slice(b"EFI PART");
        b[510] = 0x55;
        b[511] = 0xAA;
        let s = detect_signatures(&b);
        assert_eq!(s, vec![Signature::Gpt, Signature::BootSector]);
        assert_eq!(content_of(&s), Content::Other { what: "a GPT partition table (a whole disk)".into() });
        let mut b = buf();
        b[4096..4100].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
        assert_eq!(content_of(&detect_signatures(&b)), Content::Other { what: "a Linux MD RAID member".into() });
    }

    #[test]
    fn short_buffers_do_not_panic() {
        for n in [0, 1, 6, 100, 511, 512, 1081, 4095, 4096] {
            let mut b = vec![0u8; n];
            if n >= 6 {
                b[..6].copy_from_slice(LUKS_MAGIC);
            }
            let _ = content_of(&detect_signatures(&b));
        }
    }

    #[test]
    fn octal_escapes() {
        assert_eq!(unescape_octal(r"/mnt/my\040disk"), "/mnt/my disk");
        assert_eq!(unescape_octal(r"/a\011b\012c\134d"), "/a\tb\nc\\d");
        assert_eq!(unescape_octal(r"/plain"), "/plain");
        assert_eq!(unescape_octal(r"/trailing\04"), r"/trailing\04");
        assert_eq!(unescape_octal(r"\"), r"\");
    }

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg0-root rw,errors=remount-ro
28 27 254:2 / /home\\040dir rw,relatime shared:2 master:1 - xfs /dev/mapper/vg0-home rw,attr2
29 27 8:1 / /boot rw,relatime - ext2 /dev/sda1 rw
30 27 254:2 /sub /srv/bind rw,relatime - xfs /dev/mapper/vg0-home rw
31 27 0:45 / /data rw - btrfs /dev/sdb1 rw
garbage line
32 27 8:1 / /boot rw,relatime - ext2 /dev/sda1 rw
";

    #[test]
    fn mountinfo_parses_with_optional_fields_and_escapes() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 7);
        assert_eq!(m[1].mount_point, "/");
        assert_eq!((m[1].major, m[1].minor), (254, 0));
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].source, "/dev/mapper/vg0-root");
        assert_eq!(m[2].mount_point, "/home dir");
        assert_eq!(m[2].fstype, "xfs");
        assert_eq!(m[4].root, "/sub");
        assert_eq!(mounts_of(&m, 254, 2), vec!["/home dir", "/srv/bind"]);
        assert_eq!(mounts_of(&m, 8, 1), vec!["/boot"]);
        assert!(mounts_of(&m, 8, 5).is_empty());
    }

    #[test]
    fn real_mountinfo_parses() {
        let m = read_mountinfo().unwrap();
        assert!(m.iter().any(|e| e.mount_point == "/"), "{m:?}");
    }

    #[test]
    fn swaps_parse() {
        let t = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
/dev/dm-1                               partition\t1003516\t\t0\t\t-2\n\
/swap\\040file                           file\t\t524284\t\t1024\t\t-3\n\
/old/swap (deleted)                     file\t\t1000\t\t0\t\t-4\n";
        let s = parse_swaps(t);
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            SwapEntry {
                filename: "/dev/dm-1".into(),
                kind: "partition".into(),
                size_kib: 1003516,
                used_kib: 0,
                priority: -2
            }
        );
        assert_eq!(s[1].filename, "/swap file");
        assert_eq!(s[1].kind, "file");
        assert_eq!(s[2].filename, "/old/swap");
        assert_eq!(s[2].priority, -4);
        assert!(parse_swaps("Filename Type Size Used Priority\n").is_empty());
        // A swap partition that no longer exists is skipped, not an error.
        assert!(swap_devices(&[SwapEntry {
            filename: "/nonexistent/dev".into(),
            kind: "partition".into(),
            size_kib: 1,
            used_kib: 0,
            priority: 0
        }])
        .is_empty());
    }

    #[test]
    fn sysfs_fake_tree() {
        use std::os::unix::fs::symlink;
        let root = std::env::temp_dir().join(format!("luksify-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let disk = root.join("devices/pci0/block/sda");
        let part = disk.join("sda5");
        std::fs::create_dir_all(part.join("holders")).unwrap();
        std::fs::create_dir_all(root.join("dev/block")).unwrap();
        std::fs::write(part.join("partition"), "5\n").unwrap();
        std::fs::write(part.join("ro"), "0\n").unwrap();
        std::fs::write(part.join("size"), "2097152\n").unwrap();
        std::fs::create_dir_all(root.join("devices/virtual/block/dm-0")).unwrap();
        symlink(root.join("devices/virtual/block/dm-0"), part.join("holders/dm-0")).unwrap();
        std::fs::write(disk.join("ro"), "1\n").unwrap();
        symlink(&part, root.join("dev/block/8:5")).unwrap();
        symlink(&disk, root.join("dev/block/8:0")).unwrap();
        let i = sysfs_info_at(&root, 8, 5).unwrap();
        assert_eq!(
            i,
            SysfsInfo {
                kname: "sda5".into(),
                partition_of: Some("sda".into()),
                read_only: false,
                holders: vec!["dm-0".into()],
                size_sectors: Some(2097152)
            }
        );
        let d = sysfs_info_at(&root, 8, 0).unwrap();
        assert_eq!((d.kname.as_str(), d.partition_of.clone(), d.read_only), ("sda", None, true));
        assert!(d.holders.is_empty());
        assert!(sysfs_info_at(&root, 9, 9).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn file_backed_io_and_sizes() {
        let dir = std::env::temp_dir().join(format!("luksify-bd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let rw = OpenMode { write: true, exclusive: false, direct: true };
        let d = BlockDev::open(&p, rw).unwrap();
        assert_eq!(d.size_bytes().unwrap(), 1 << 20);
        assert_eq!(d.size_sectors().unwrap(), 2048);
        assert_eq!(d.logical_block_size().unwrap(), 512);
        assert!(!d.read_only_flag().unwrap());
        assert_eq!(d.dev_number().unwrap(), None);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        d.write_at(4096, &data).unwrap();
        d.flush().unwrap();
        let mut back = vec![0u8; 1000];
        d.read_at(4096 + 77, &mut back).unwrap(); // unaligned read works with O_DIRECT too
        assert_eq!(&back[..], &data[77..1077]);
        if d.is_direct() {
            assert!(d.write_at(100, &data[..512]).is_err());
        }
        let r = BlockDev::open(&p, OpenMode::READ).unwrap();
        assert!(r.write_at(0, &[1u8; 512]).is_err(), "a read-only open cannot write");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loop_device_ioctls_when_one_is_available() {
        // Real block-device ioctls on the host's first loop device, if there is one and it
        // is bound (size 0 otherwise): only checks that the calls work.
        let p = Path::new("/dev/loop0");
        let Ok(d) = BlockDev::open(p, OpenMode::READ) else { return };
        if !d.is_block_device() {
            return;
        }
        let _ = d.size_bytes().unwrap();
        let lbs = d.logical_block_size().unwrap();
        assert!(lbs >= 512 && lbs.is_power_of_two());
        assert!(d.physical_block_size().unwrap() >= lbs);
        let _ = d.read_only_flag().unwrap();
        assert!(d.dev_number().unwrap().is_some());
    }
}
