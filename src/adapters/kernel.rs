//! The real kernel as the engine's [`Kernel`]: a thin mapping onto [`super::dm::Dm`], which
//! checks every ioctl, loads crypt tables with DM_SECURE_DATA from wiped buffers and gives
//! private devices their udev flags.

use super::dm::{Dm, DmError, MirrorStatus, SuspendFlags};
use crate::core::facts::TableLineFacts;
use crate::core::tables::{DevRef, Line};
use crate::engine::{Aside, HolderTable, KResult, Kernel, KernelError, Removed};
use std::time::Duration;
use zeroize::Zeroize;

pub struct DmKernel {
    dm: Dm,
    /// Test-only fault injection (LUKSIFY_TEST_FAIL_LOAD=<dm name>): loading a rerouted LV
    /// table into that device fails as if the kernel refused it.
    fail_load_of: Option<String>,
    /// Devices opened by [`Kernel::read`] and [`Kernel::write`], by name, with whether open
    /// for writing: kept open (the engine reads the staging device
    /// at every step), closed before a remove.
    readers: std::collections::HashMap<String, (bool, crate::adapters::rawdisk::RawDisk)>,
    /// Keys put in the thread keyring for a table load, by description.
    keys: std::collections::HashMap<String, i32>,
    /// A helper process (a pidfd) stopped from before each suspend until after the resume
    /// of the same device ([`DmKernel::pause_during_suspends`]), and the device it is
    /// stopped for now.
    pause: Option<(std::os::fd::OwnedFd, Option<String>)>,
}

fn k(e: DmError) -> KernelError {
    KernelError::from_source(e)
}

impl DmKernel {
    pub fn new() -> KResult<DmKernel> {
        Ok(DmKernel {
            dm: Dm::open().map_err(k)?,
            fail_load_of: std::env::var("LUKSIFY_TEST_FAIL_LOAD").ok(),
            readers: Default::default(),
            keys: Default::default(),
            pause: None,
        })
    }

    /// From now on, stop the process of `pidfd` (SIGSTOP) right before every suspend and
    /// let it go on (SIGCONT) after the resume of the same device; None: no more, and it
    /// goes on now. For a helper started early in the background (the finish's LVM shell,
    /// [`super::lvmshell`]): in the one-CPU test bed a suspend or a table swap whose CPU is
    /// busy beside it ends a tick later (see HACKING.md), so the helper runs only while the
    /// engine waits for the disk, never in a suspended window. A helper handed over stopped
    /// stays stopped until the first such resume (in luksify's steps: the end of the first
    /// step's window).
    pub fn pause_during_suspends(&mut self, pidfd: Option<std::os::fd::OwnedFd>) {
        if let Some((old, _)) = self.pause.take() {
            super::lvmshell::signal(&old, libc::SIGCONT);
        }
        self.pause = pidfd.map(|p| (p, None));
    }

    /// The O_DIRECT handle of dm device `n` for [`Kernel::read`] and [`Kernel::write`]
    /// (`writable`): kept open while the device number stays and is open for as much.
    ///
    /// A cached handle is used without asking the kernel again (no ioctl, no allocation:
    /// the engine writes and reads the staging device inside the suspended window): while
    /// it is open the device cannot be removed (EBUSY), and [`Kernel::remove`] drops it.
    fn handle(&mut self, n: &str, writable: bool) -> KResult<&mut crate::adapters::rawdisk::RawDisk> {
        if matches!(self.readers.get(n), Some((w, _)) if *w || !writable) {
            return Ok(&mut self.readers.get_mut(n).expect("just checked").1);
        }
        self.readers.remove(n);
        let d = self.dm.info(n).map_err(k)?.ok_or_else(|| KernelError::new(format!("{n} does not exist")))?;
        let dev = nix::sys::stat::makedev(d.major as u64, d.minor as u64);
        // The kernel's own node (devtmpfs) if it is there; else a node of our own in /dev,
        // removed once open (private devices get no /dev/mapper node from udev).
        let kernel_node = std::path::PathBuf::from(format!("/dev/dm-{}", d.minor));
        let ours = std::path::PathBuf::from(format!("/dev/.luksify-{}-{n}", std::process::id()));
        let node_ok = |p: &std::path::Path| {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            std::fs::metadata(p).map(|m| m.file_type().is_block_device() && m.rdev() == dev).unwrap_or(false)
        };
        let path = if node_ok(&kernel_node) {
            kernel_node
        } else {
            let _ = std::fs::remove_file(&ours);
            nix::sys::stat::mknod(
                &ours,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                dev,
            )
            .map_err(|e| KernelError::new(format!("creating a node for {n}: {e}")))?;
            ours.clone()
        };
        let disk = crate::adapters::rawdisk::RawDisk::open_with_bounce(&path, writable, 64 << 10);
        if path == ours {
            let _ = std::fs::remove_file(&ours);
        }
        let disk = disk.map_err(|e| KernelError::new(format!("opening {n}: {e}")))?;
        Ok(&mut self.readers.entry(n.to_string()).or_insert((writable, disk)).1)
    }

    /// Whether a dm device of this name exists, has a live table and is not suspended
    /// (reading it will not block).
    pub fn is_live(&self, n: &str) -> bool {
        matches!(self.dm.info(n), Ok(Some(d)) if d.active_table && !d.suspended)
    }

    /// Whether a dm device of this name exists and is suspended.
    pub fn is_suspended(&self, n: &str) -> bool {
        matches!(self.dm.info(n), Ok(Some(d)) if d.suspended)
    }

    /// Create /dev/mapper/<name> if udev did not (rescue systems and test beds run without it).
    pub fn ensure_node(&self, n: &str) -> KResult<()> {
        let p = std::path::Path::new("/dev/mapper").join(n);
        let tries = if std::path::Path::new("/run/udev/control").exists() { 10 } else { 0 };
        for _ in 0..tries {
            if p.exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if p.exists() {
            return Ok(());
        }
        let d = self.dm.info(n).map_err(k)?.ok_or_else(|| KernelError::new(format!("{n} does not exist")))?;
        let _ = std::fs::create_dir_all("/dev/mapper");
        nix::sys::stat::mknod(
            &p,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(d.major as u64, d.minor as u64),
        )
        .map_err(|e| KernelError::new(format!("creating {}: {e}", p.display())))
    }
}

impl DmKernel {
    /// The name of the open dm device whose DM UUID is cryptsetup's for the LUKS device with
    /// `luks_uuid` (`CRYPT-LUKS<n>-<uuid without dashes>-<name>`), if one is open.
    pub fn luks_mapping_of(luks_uuid: &str) -> KResult<Option<String>> {
        let dm = Dm::open().map_err(k)?;
        let list = dm.list().map_err(k)?;
        Ok(list.iter().find_map(|d| crate::core::integrate::mapping_name_of(&d.uuid, luks_uuid).map(str::to_string)))
    }
}

/// Remove dm device `n` through `dm`, and its /dev/mapper node if one was made.
fn remove_with(dm: &mut Dm, n: &str) -> KResult<()> {
    dm.remove(n).map_err(k)?;
    let _ = std::fs::remove_file(std::path::Path::new("/dev/mapper").join(n));
    Ok(())
}

/// [`remove_with`] each of `names`, in order: what each came to.
fn remove_all(dm: &mut Dm, names: Vec<String>) -> Vec<Removed> {
    names
        .into_iter()
        .map(|n| {
            let r = remove_with(dm, &n);
            (n, r)
        })
        .collect()
}

impl Kernel for DmKernel {
    fn keyring_add(&mut self, desc: &str, key: &[u8]) -> KResult<Option<String>> {
        match crate::adapters::sys::keyring_add_logon(desc, key) {
            Ok(id) => {
                self.keys.insert(desc.to_string(), id);
                Ok(Some(format!(":{}:logon:{desc}", key.len())))
            }
            // no keyring in this kernel (or none for us): hex in the table, as cryptsetup does
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)) => Ok(None),
            Err(e) => Err(KernelError::new(format!("add_key logon {desc}: {e}"))),
        }
    }

    fn keyring_drop(&mut self, desc: &str) {
        if let Some(id) = self.keys.remove(desc) {
            crate::adapters::sys::keyring_revoke(id);
        }
    }

    fn lookup(&mut self, n: &str) -> KResult<Option<DevRef>> {
        Ok(self.dm.info(n).map_err(k)?.map(|d| DevRef { major: d.major, minor: d.minor }))
    }

    fn create(&mut self, n: &str, uuid: &str, private: bool) -> KResult<DevRef> {
        let (major, minor) = self.dm.create(n, uuid, private).map_err(k)?;
        Ok(DevRef { major, minor })
    }

    fn load(&mut self, n: &str, table: &[Line], key_hex: &str) -> KResult<()> {
        let secure = table.iter().any(|l| l.target_type() == "crypt");
        let mut lines: Vec<TableLineFacts> = table
            .iter()
            .map(|l| TableLineFacts {
                start: l.start,
                length: l.length,
                target_type: l.target_type().into(),
                params: l.params(key_hex),
            })
            .collect();
        let r = self.dm.load(n, &lines, secure);
        for l in lines.iter_mut() {
            l.params.zeroize();
        }
        r.map_err(k)
    }

    fn load_lines(&mut self, n: &str, lines: &[TableLineFacts]) -> KResult<()> {
        if self.fail_load_of.as_deref() == Some(n) {
            return Err(KernelError::new(format!(
                "loading a table into {n}: injected failure (LUKSIFY_TEST_FAIL_LOAD)"
            )));
        }
        self.dm.load(n, lines, false).map_err(k)
    }

    fn clear_inactive(&mut self, n: &str) -> KResult<()> {
        self.dm.clear_inactive(n).map_err(k)
    }

    fn message(&mut self, n: &str, msg: &str) -> KResult<String> {
        self.dm.message(n, msg).map_err(k)
    }

    fn suspend(&mut self, n: &str) -> KResult<()> {
        // In-flight I/O flushed, no filesystem frozen: LVM's own table swaps do the same
        // (lvm2 activate.c freezes only for snapshot origins and cows). Every table luksify
        // swaps maps the same data as the one before it, so nothing needs the filesystem
        // written back; with the freeze, an LV's reroute made ext4 commit its journal with
        // the system's writes held (29-37 ms writes in the bench, against ~22 without).
        if let Some((p, stopped_for)) = &mut self.pause {
            super::lvmshell::signal(p, libc::SIGSTOP);
            *stopped_for = Some(n.to_string());
        }
        self.dm.suspend(n, SuspendFlags { noflush: false, skip_lockfs: true }).map_err(k)
    }

    fn resume(&mut self, n: &str) -> KResult<()> {
        let r = self.dm.resume(n).map_err(k);
        if let Some((p, stopped_for)) = &mut self.pause {
            if stopped_for.as_deref() == Some(n) {
                super::lvmshell::signal(p, libc::SIGCONT);
                *stopped_for = None;
            }
        }
        r?;
        // A public device (the bridge) needs its /dev/mapper node for LVM and the user; udev
        // makes it where udev runs, luksify where it does not (rescue media, the test bed).
        let public =
            self.dm.info(n).map_err(k)?.map(|d| !d.uuid.starts_with(super::dm::PRIVATE_UUID_PREFIX)).unwrap_or(false);
        if public
            && !std::path::Path::new("/dev/mapper").join(n).exists()
            && !std::path::Path::new("/run/udev/control").exists()
        {
            self.ensure_node(n)?;
        }
        Ok(())
    }

    fn set_udev_hidden(&mut self, n: &str, hidden: bool) {
        self.dm.set_hidden(n, hidden)
    }

    fn remove(&mut self, n: &str) -> KResult<()> {
        self.readers.remove(n);
        remove_with(&mut self.dm, n)
    }

    /// The removals go to a thread with its own control handle (a small stack: under
    /// `mlockall` every page of it is locked); if no thread can be started, they happen now.
    fn remove_aside(&mut self, names: Vec<String>) -> Aside {
        for n in &names {
            self.readers.remove(n);
        }
        let todo = names.clone();
        let spawned = std::thread::Builder::new().name("luksify-remove".into()).stack_size(256 << 10).spawn(
            move || match Dm::open() {
                Ok(mut dm) => remove_all(&mut dm, todo),
                Err(e) => {
                    let e = k(e);
                    todo.into_iter().map(|n| (n, Err(e.clone()))).collect()
                }
            },
        );
        match spawned {
            Ok(h) => Aside::running(names, h),
            Err(_) => Aside::done(remove_all(&mut self.dm, names)),
        }
    }

    fn mirror_health(&mut self, n: &str) -> KResult<Vec<Vec<char>>> {
        let mut out = Vec::new();
        for l in self.dm.status(n).map_err(k)? {
            if l.target_type == "mirror" {
                out.push(MirrorStatus::parse(&l.params).map_err(|e| KernelError::new(e.to_string()))?.health);
            }
        }
        Ok(out)
    }

    fn table(&mut self, n: &str) -> KResult<Vec<TableLineFacts>> {
        self.dm.table(n).map_err(k)
    }

    fn holders_of(&mut self, dev: DevRef, except: &[&str]) -> KResult<Vec<HolderTable>> {
        let mut out = Vec::new();
        for d in self.dm.list().map_err(k)? {
            if except.contains(&d.name.as_str()) {
                continue;
            }
            if self.dm.deps(&d.name).map_err(k)?.contains(&(dev.major, dev.minor)) {
                out.push(HolderTable { table: self.dm.table(&d.name).map_err(k)?, name: d.name });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn read(&mut self, n: &str, sector: u64, buf: &mut [u8]) -> KResult<()> {
        use crate::engine::Disk;
        self.handle(n, false)?
            .read(sector, buf)
            .map_err(|e| KernelError::new(format!("reading {n} at sector {sector}: {e}")))
    }

    fn write(&mut self, n: &str, sector: u64, buf: &[u8]) -> KResult<()> {
        use crate::engine::Disk;
        self.handle(n, true)?
            .write(sector, buf)
            .map_err(|e| KernelError::new(format!("writing {n} at sector {sector}: {e}")))
    }
}
