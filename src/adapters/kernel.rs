//! The real kernel as the engine's [`Kernel`]: device-mapper ioctls through the
//! `devicemapper` crate. Every ioctl's result is checked; crypt tables are loaded with
//! DM_SECURE_DATA and the rendered key strings are wiped after the call.

use crate::core::facts::TableLineFacts;
use crate::core::tables::{DevRef, Line};
use crate::engine::{HolderTable, KResult, Kernel, KernelError, MirrorOutcome};
use devicemapper::{DevId, DmFlags, DmName, DmOptions, DmUuid, DM};
use zeroize::Zeroize;

pub struct DmKernel {
    dm: DM,
    /// Test-only fault injection (LUKSIFY_TEST_FAIL_LOAD=<dm name>): the load of an LV
    /// table for that device fails as if the kernel refused it.
    fail_load_of: Option<String>,
}

fn kerr(what: impl std::fmt::Display, e: impl std::fmt::Display) -> KernelError {
    KernelError(format!("{what}: {e}"))
}

fn name(n: &str) -> KResult<&DmName> {
    DmName::new(n).map_err(|e| kerr(format!("invalid dm name {n:?}"), e))
}

impl DmKernel {
    pub fn new() -> KResult<DmKernel> {
        let dm = DM::new().map_err(|e| {
            kerr("cannot open /dev/mapper/control (is the dm-mod module loaded? are you root?)", e)
        })?;
        Ok(DmKernel { dm, fail_load_of: std::env::var("LUKSIFY_TEST_FAIL_LOAD").ok() })
    }

    pub fn dm(&self) -> &DM {
        &self.dm
    }

    fn load_raw(&mut self, n: &str, mut lines: Vec<(u64, u64, String, String)>, secure: bool) -> KResult<()> {
        let opts = if secure { DmOptions::default().set_flags(DmFlags::DM_SECURE_DATA) } else { DmOptions::default() };
        let r = self.dm.table_load(&DevId::Name(name(n)?), &lines, opts);
        for l in lines.iter_mut() {
            l.3.zeroize();
        }
        r.map(|_| ()).map_err(|e| kerr(format!("loading a table into {n}"), e))
    }

    /// Status lines of the live table.
    pub fn status(&self, n: &str) -> KResult<Vec<(u64, u64, String, String)>> {
        self.dm
            .table_status(&DevId::Name(name(n)?), DmOptions::default().set_flags(DmFlags::DM_NOFLUSH))
            .map(|(_, s)| s)
            .map_err(|e| kerr(format!("status of {n}"), e))
    }

    /// Create /dev/mapper/<name> if udev did not (no udev in rescue systems and test beds).
    pub fn ensure_node(&self, n: &str) -> KResult<()> {
        let p = std::path::Path::new("/dev/mapper").join(n);
        if p.exists() {
            return Ok(());
        }
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            if p.exists() {
                return Ok(());
            }
        }
        let info = self.dm.device_info(&DevId::Name(name(n)?)).map_err(|e| kerr(format!("info of {n}"), e))?;
        let dev = info.device();
        let _ = std::fs::create_dir_all("/dev/mapper");
        nix::sys::stat::mknod(
            &p,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(dev.major as u64, dev.minor as u64),
        )
        .map_err(|e| kerr(format!("creating {}", p.display()), e))
    }
}

/// Parse the status of one mirror target:
/// `<#legs> <dev>… <in_sync>/<total> <#health> <health letters> <log args…>`.
/// Returns (in_sync, total, health letters).
pub fn parse_mirror_status(params: &str) -> Option<(u64, u64, String)> {
    let w: Vec<&str> = params.split_whitespace().collect();
    let legs: usize = w.first()?.parse().ok()?;
    let (a, b) = w.get(1 + legs)?.split_once('/')?;
    let health = w.get(3 + legs)?.to_string();
    if health.len() != legs {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?, health))
}

impl Kernel for DmKernel {
    fn lookup(&mut self, n: &str) -> KResult<Option<DevRef>> {
        match self.dm.device_info(&DevId::Name(name(n)?)) {
            Ok(info) => Ok(Some(DevRef { major: info.device().major, minor: info.device().minor })),
            Err(e) => {
                let s = e.to_string();
                if s.contains("ENXIO") || s.contains("No such device") {
                    Ok(None)
                } else {
                    // Distinguish "not there" by listing, so that a real failure is not
                    // mistaken for absence.
                    let list = self.dm.list_devices().map_err(|e2| kerr("listing dm devices", e2))?;
                    if list.iter().any(|(nm, _, _)| nm.to_string() == n) {
                        Err(kerr(format!("info of {n}"), s))
                    } else {
                        Ok(None)
                    }
                }
            }
        }
    }

    fn create(&mut self, n: &str, uuid: &str, private: bool) -> KResult<DevRef> {
        let u = DmUuid::new(uuid).map_err(|e| kerr(format!("invalid dm uuid {uuid:?}"), e))?;
        let opts = if private { DmOptions::private() } else { DmOptions::default() };
        let info = self.dm.device_create(name(n)?, Some(u), opts).map_err(|e| kerr(format!("creating {n}"), e))?;
        Ok(DevRef { major: info.device().major, minor: info.device().minor })
    }

    fn load(&mut self, n: &str, table: &[Line], key_hex: &str) -> KResult<()> {
        let secure = table.iter().any(|l| l.target_type() == "crypt");
        let lines = table.iter().map(|l| (l.start, l.length, l.target_type().to_string(), l.params(key_hex))).collect();
        self.load_raw(n, lines, secure)
    }

    fn load_lines(&mut self, n: &str, lines: &[TableLineFacts]) -> KResult<()> {
        if self.fail_load_of.as_deref() == Some(n) {
            return Err(KernelError(format!("loading a table into {n}: injected failure (LUKSIFY_TEST_FAIL_LOAD)")));
        }
        let lines = lines.iter().map(|l| (l.start, l.length, l.target_type.clone(), l.params.clone())).collect();
        self.load_raw(n, lines, false)
    }

    fn clear_inactive(&mut self, n: &str) -> KResult<()> {
        self.dm.table_clear(&DevId::Name(name(n)?)).map(|_| ()).map_err(|e| kerr(format!("clearing {n}'s inactive table"), e))
    }

    fn suspend(&mut self, n: &str) -> KResult<()> {
        self.dm
            .device_suspend(&DevId::Name(name(n)?), DmOptions::default().set_flags(DmFlags::DM_SUSPEND))
            .map(|_| ())
            .map_err(|e| kerr(format!("suspending {n}"), e))
    }

    fn resume(&mut self, n: &str) -> KResult<()> {
        self.dm
            .device_suspend(&DevId::Name(name(n)?), DmOptions::default())
            .map(|_| ())
            .map_err(|e| kerr(format!("resuming {n}"), e))
    }

    fn remove(&mut self, n: &str) -> KResult<()> {
        self.dm
            .device_remove(&DevId::Name(name(n)?), DmOptions::default())
            .map(|_| ())
            .map_err(|e| kerr(format!("removing {n}"), e))?;
        let _ = std::fs::remove_file(std::path::Path::new("/dev/mapper").join(n));
        Ok(())
    }

    fn table(&mut self, n: &str) -> KResult<Vec<TableLineFacts>> {
        let (_, t) = self
            .dm
            .table_status(&DevId::Name(name(n)?), DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE))
            .map_err(|e| kerr(format!("table of {n}"), e))?;
        Ok(t.into_iter()
            .map(|(start, length, target_type, mut params)| {
                let scrubbed = scrub_key(&target_type, &params);
                params.zeroize();
                TableLineFacts { params: scrubbed, start, length, target_type }
            })
            .collect())
    }

    fn holders_of(&mut self, dev: DevRef, except: &[&str]) -> KResult<Vec<HolderTable>> {
        let list = self.dm.list_devices().map_err(|e| kerr("listing dm devices", e))?;
        let mut out = Vec::new();
        for (nm, _, _) in list {
            let n = nm.to_string();
            if except.contains(&n.as_str()) {
                continue;
            }
            let deps = self
                .dm
                .table_deps(&DevId::Name(&nm), DmOptions::default())
                .map_err(|e| kerr(format!("deps of {n}"), e))?;
            if deps.iter().any(|d| d.major == dev.major && d.minor == dev.minor) {
                let table = self.table(&n)?;
                out.push(HolderTable { name: n, table });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn wait_mirror(&mut self, n: &str) -> KResult<MirrorOutcome> {
        // Event-driven: arm the global dm event poll, then check the status; if not done,
        // sleep in poll(2) until the kernel signals an event (dm-mirror raises one when all
        // regions are in sync or a leg fails). The 2 s poll timeout is only a safety net.
        loop {
            self.dm.arm_poll().map_err(|e| kerr("arming the dm event poll", e))?;
            let st = self.status(n)?;
            let mut done = true;
            let mut healths = String::new();
            let mut failed = false;
            for (_, _, ty, params) in &st {
                if ty != "mirror" {
                    continue;
                }
                let (a, b, h) = parse_mirror_status(params)
                    .ok_or_else(|| KernelError(format!("cannot parse the mirror status of {n}: {params:?}")))?;
                if h.chars().any(|c| c != 'A') {
                    failed = true;
                }
                healths.push_str(&h);
                if a != b {
                    done = false;
                }
            }
            if failed {
                return Ok(MirrorOutcome::Failed(healths));
            }
            if done {
                return Ok(MirrorOutcome::Synced);
            }
            use std::os::fd::AsFd;
            let mut fds = [nix::poll::PollFd::new(self.dm.file().as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(2000u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(kerr("waiting for dm events", e)),
            }
        }
    }
}

/// Replace the key in a crypt table line by "-": tables read back are printable.
pub fn scrub_key(target_type: &str, params: &str) -> String {
    if target_type != "crypt" {
        return params.to_string();
    }
    let mut w: Vec<&str> = params.split_whitespace().collect();
    if w.len() > 1 {
        w[1] = "-";
    }
    w.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_status_parses_sync_and_health() {
        assert_eq!(
            parse_mirror_status("2 254:3 254:4 30/64 1 AA 1 core"),
            Some((30, 64, "AA".into()))
        );
        assert_eq!(parse_mirror_status("2 98:5 254:1 8/8 1 AD 1 core"), Some((8, 8, "AD".into())));
        assert_eq!(parse_mirror_status("2 98:5 254:1 8/8"), None);
        assert_eq!(parse_mirror_status("garbage"), None);
    }

    #[test]
    fn keys_are_scrubbed_from_crypt_lines_only() {
        assert_eq!(scrub_key("crypt", "aes-xts-plain64 00112233 0 98:5 32768"), "aes-xts-plain64 - 0 98:5 32768");
        assert_eq!(scrub_key("linear", "98:5 2048"), "98:5 2048");
    }
}
