//! The two faces of the outside world the engine needs, as traits, so that the real kernel
//! (adapters) and a simulated one (tests) drive the very same engine code.

use crate::core::facts::TableLineFacts;
use crate::core::tables::{DevRef, Line};
use std::fmt;
use std::sync::Arc;

/// The raw partition being converted: sector-addressed I/O and a cache flush.
/// Implementations do their own alignment; a `flush` must make every completed write durable.
pub trait Disk {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn write(&mut self, sector: u64, buf: &[u8]) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;

    /// Zero the device's bytes [`from`, `from + len`) (both multiples of 512), in pieces of
    /// `scratch`'s size (no allocation: the caller may hold a pre-faulted buffer). Not flushed.
    /// The one way a range is wiped (header areas, copies, the cut-over record's neighbours).
    fn write_zeros(&mut self, from: u64, len: u64, scratch: &mut [u8]) -> std::io::Result<()> {
        assert!(
            from.is_multiple_of(512) && len.is_multiple_of(512) && scratch.len() >= 512,
            "write_zeros: unaligned range or scratch"
        );
        let piece = scratch.len() / 512 * 512;
        let zeros = &mut scratch[..piece];
        zeros.fill(0);
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(piece as u64) as usize;
            self.write((from + at) / 512, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

/// An error from the kernel side: what was being done (the whole message), and the adapter's
/// own error it came from, kept as its source (e.g. a `DmError` with its errno).
#[derive(Debug, Clone)]
pub struct KernelError {
    what: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl KernelError {
    /// An error with no typed cause (the simulator's, or one the engine finds itself).
    pub fn new(what: impl Into<String>) -> KernelError {
        KernelError { what: what.into(), source: None }
    }

    /// An adapter's error, kept as the source.
    pub fn from_source(e: impl std::error::Error + Send + Sync + 'static) -> KernelError {
        KernelError { what: e.to_string(), source: Some(Arc::new(e)) }
    }

    /// The same error, with what was being done in front; the source is kept.
    pub fn context(self, doing: impl fmt::Display) -> KernelError {
        KernelError { what: format!("{doing}: {}", self.what), source: self.source }
    }

    /// The same error told in other words (`what` usually quotes it); the source is kept.
    pub fn reworded(self, what: impl Into<String>) -> KernelError {
        KernelError { what: what.into(), source: self.source }
    }

    /// The message (what was being done, and why it failed).
    pub fn message(&self) -> &str {
        &self.what
    }
}

impl PartialEq for KernelError {
    fn eq(&self, other: &KernelError) -> bool {
        self.what == other.what
    }
}
impl Eq for KernelError {}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for KernelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

pub type KResult<T> = Result<T, KernelError>;

/// Device removals the engine does not wait for ([`Kernel::remove_aside`]): each name with
/// what its removal came to, once [`Aside::wait`] returns. Dropped, it waits as well: a
/// process that exits leaves no removal half-way.
pub struct Aside(Option<AsideState>);

/// What one removal came to.
pub type Removed = (String, KResult<()>);

enum AsideState {
    Done(Vec<Removed>),
    Running(Vec<String>, std::thread::JoinHandle<Vec<Removed>>),
}

impl Aside {
    /// Removals already done.
    pub fn done(removed: Vec<Removed>) -> Aside {
        Aside(Some(AsideState::Done(removed)))
    }

    /// Removals of `names` going on in the thread `h`.
    pub fn running(names: Vec<String>, h: std::thread::JoinHandle<Vec<Removed>>) -> Aside {
        Aside(Some(AsideState::Running(names, h)))
    }

    /// Wait for the removals: what each came to (a thread that panicked failed them all).
    pub fn wait(mut self) -> Vec<Removed> {
        match self.0.take() {
            None => Vec::new(),
            Some(AsideState::Done(r)) => r,
            Some(AsideState::Running(names, h)) => h.join().unwrap_or_else(|_| {
                names.into_iter().map(|n| (n, Err(KernelError::new("the thread removing it panicked")))).collect()
            }),
        }
    }
}

impl Drop for Aside {
    fn drop(&mut self) {
        if let Some(AsideState::Running(_, h)) = self.0.take() {
            let _ = h.join();
        }
    }
}

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
    /// Send `msg` to the target at sector 0 of `name`'s live table (`dmsetup message`); a
    /// dm-switch's `set_region_mappings` changes where its regions go without a new table;
    /// `@stats_*` messages go to device-mapper's core ([`crate::core::dmstats`]). The reply,
    /// empty if none.
    fn message(&mut self, name: &str, msg: &str) -> KResult<String>;
    /// Suspend, flushing in-flight I/O (without freezing a filesystem on the device, as
    /// LVM's table swaps).
    fn suspend(&mut self, name: &str) -> KResult<()>;
    /// Resume (making the inactive table live, if one is loaded).
    fn resume(&mut self, name: &str) -> KResult<()>;
    /// From now on, `name`'s resumes tell udev rules and LVM's autoactivation to ignore it
    /// (`hidden`: the uevent carries DM_UDEV_DISABLE_DISK_RULES_FLAG and
    /// DM_UDEV_DISABLE_OTHER_RULES_FLAG) or not. Not an ioctl: it changes how the later
    /// resumes are sent. Private devices are always hidden.
    fn set_udev_hidden(&mut self, name: &str, hidden: bool);
    fn remove(&mut self, name: &str) -> KResult<()>;
    /// Remove the dm devices `names`, in this order, without waiting for it: a removal waits
    /// for the kernel's grace periods (in the test bed it ends on a tick, ~10 ms), which the
    /// engine spends on its next step's I/O instead; the real kernel removes them from a
    /// thread of its own. Only for private devices that no live table maps and that the
    /// engine does not touch again before it waits for the [`Aside`]. Default: removed now.
    fn remove_aside(&mut self, names: Vec<String>) -> Aside {
        Aside::done(
            names
                .into_iter()
                .map(|n| {
                    let r = self.remove(&n);
                    (n, r)
                })
                .collect(),
        )
    }
    /// The live table, keys never included.
    fn table(&mut self, name: &str) -> KResult<Vec<TableLineFacts>>;
    /// Every dm device whose live table maps `dev`, except those named in `except`.
    fn holders_of(&mut self, dev: DevRef, except: &[&str]) -> KResult<Vec<HolderTable>>;
    /// Read from a dm device (O_DIRECT: what the kernel maps now, no page cache), `buf`
    /// a whole number of sectors. The engine reads each step back through the staging
    /// crypt device this way.
    fn read(&mut self, name: &str, sector: u64, buf: &mut [u8]) -> KResult<()>;
    /// Write to a dm device (O_DIRECT: on to the device below before it returns, nothing
    /// left in a page cache; made durable by a flush of the raw disk), `buf` a whole
    /// number of sectors. A LUKS1 step whose cipher luksify has no userspace
    /// implementation of is written through the staging crypt device this way.
    fn write(&mut self, name: &str, sector: u64, buf: &[u8]) -> KResult<()>;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    /// The adapter's own error survives context and the engine's error: a caller can still
    /// ask it for its errno.
    #[test]
    fn a_kernel_error_keeps_its_source_through_the_engine() {
        let io = std::io::Error::from_raw_os_error(libc::EBUSY);
        let k = KernelError::from_source(io).context("suspending the bridge");
        assert!(k.message().starts_with("suspending the bridge: "), "{k}");
        let e = crate::engine::EngineError::Kernel(k);
        let k: &dyn Error = e.source().expect("the engine error keeps the kernel error");
        let io =
            k.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the kernel error keeps the io error");
        assert_eq!(io.raw_os_error(), Some(libc::EBUSY));
        assert!(KernelError::new("no cause").source().is_none());
    }
}
