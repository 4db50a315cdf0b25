//! The two faces of the outside world the engine needs, as traits, so that the real kernel
//! (adapters) and a simulated one (tests) drive the very same engine code.

use crate::core::facts::TableLineFacts;
use crate::core::tables::{DevRef, Line};
use std::fmt;

/// The raw partition being converted: sector-addressed I/O and a cache flush.
/// Implementations do their own alignment; a `flush` must make every completed write durable.
pub trait Disk {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn write(&mut self, sector: u64, buf: &[u8]) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
}

/// An error from the kernel side, with what was being done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError(pub String);

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}

pub type KResult<T> = Result<T, KernelError>;

/// A dm device that maps the raw partition (an LV, typically), with its live table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderTable {
    pub name: String,
    pub table: Vec<TableLineFacts>,
}

/// The device-mapper, as the engine uses it. Every call is checked; a failed `load` leaves
/// the live table in place (and the engine must not assume otherwise).
pub trait Kernel {
    /// The device number of a dm device, if it exists.
    fn lookup(&mut self, name: &str) -> KResult<Option<DevRef>>;
    /// Create an empty dm device. `private`: a helper device hidden from udev, blkid and LVM.
    fn create(&mut self, name: &str, uuid: &str, private: bool) -> KResult<DevRef>;
    /// Load `table` into the inactive slot; crypt lines get `key_hex` (loaded as secure data).
    fn load(&mut self, name: &str, table: &[Line], key_hex: &str) -> KResult<()>;
    /// Load a table given as kernel lines (LV tables, which hold no keys).
    fn load_lines(&mut self, name: &str, lines: &[TableLineFacts]) -> KResult<()>;
    fn clear_inactive(&mut self, name: &str) -> KResult<()>;
    /// Suspend, flushing in-flight I/O.
    fn suspend(&mut self, name: &str) -> KResult<()>;
    /// Resume (making the inactive table live, if one is loaded).
    fn resume(&mut self, name: &str) -> KResult<()>;
    /// From now on, `name`'s resumes tell udev rules and LVM's autoactivation to ignore it
    /// (`hidden`: the uevent carries DM_UDEV_DISABLE_DISK_RULES_FLAG and
    /// DM_UDEV_DISABLE_OTHER_RULES_FLAG) or not. Not an ioctl: it changes how the later
    /// resumes are sent. Private devices are always hidden.
    fn set_udev_hidden(&mut self, name: &str, hidden: bool);
    fn remove(&mut self, name: &str) -> KResult<()>;
    /// The live table, keys never included.
    fn table(&mut self, name: &str) -> KResult<Vec<TableLineFacts>>;
    /// Every dm device whose live table maps `dev`, except those named in `except`.
    fn holders_of(&mut self, dev: DevRef, except: &[&str]) -> KResult<Vec<HolderTable>>;
    /// Read from a dm device (O_DIRECT: what the kernel maps now, no page cache), `buf`
    /// a whole number of sectors. The engine reads each step back through the staging
    /// crypt device this way.
    fn read(&mut self, name: &str, sector: u64, buf: &mut [u8]) -> KResult<()>;
    /// For each `mirror` line of `name`'s live table, in order, one health letter per leg
    /// (dm-raid1's: `A` alive; `D` a write failed, `F` a flush failed, `R` a read failed,
    /// `S` a sync failed, `U` unknown). Empty if the live table has no mirror line.
    fn mirror_health(&mut self, name: &str) -> KResult<Vec<Vec<char>>>;
    /// Put `key` where dm-crypt reads a key named in a table (a `logon` key `desc` in the
    /// calling thread's kernel keyring, as cryptsetup does for LUKS2) and return the key
    /// string a crypt line takes for it (`:<bytes>:logon:<desc>`); None where the kernel has
    /// no keyring: the table then carries the key in hex, as cryptsetup's does there too.
    fn keyring_add(&mut self, desc: &str, key: &[u8]) -> KResult<Option<String>>;
    /// Take the key `desc` out of the keyring again (a loaded table keeps its own copy).
    fn keyring_drop(&mut self, desc: &str);
}
