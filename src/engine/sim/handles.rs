//! The engine's handles: the raw partition ([`SimDisk`]) and the device-mapper
//! ([`SimKernel`]) as the engine sees them, each call one numbered operation of the world.

use super::dm::{DmDev, STarget};
use super::world::{io_err, IoFail, Shared};
use super::{BRIDGE, DM_MAJOR, SECTOR};
use crate::core::facts::TableLineFacts;
use crate::core::journal::{Record, State, SLOT_BYTES};
use crate::core::tables::{DevRef, Line};
use crate::engine::traits::{Disk, HolderTable, KResult, Kernel, KernelError};
use rand::Rng;
use std::fmt::Write as _;

/// The raw partition, as the engine sees it.
pub struct SimDisk(pub(super) Shared);
/// The device-mapper, as the engine sees it.
pub struct SimKernel(pub(super) Shared);

impl Disk for SimDisk {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("disk read {sector}+{}", buf.len() / SECTOR)).map_err(io_err)?;
        w.disk.read(sector, buf).map_err(io_err)
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> std::io::Result<()> {
        let mut w = self.0.borrow_mut();
        let g = w.g;
        let slot = (sector == g.journal_slot(0) || sector == g.journal_slot(1)) && buf.len() == SLOT_BYTES;
        w.op(|| {
            let mut s = format!("disk write {sector}+{}", buf.len() / SECTOR);
            if slot {
                match Record::decode(buf) {
                    Ok(r) => {
                        let _ = write!(s, " (journal seq {} {:?})", r.seq, r.state);
                    }
                    Err(_) => s.push_str(" (journal clear)"),
                }
            }
            s
        })
        .map_err(|e| {
            if !w.dead {
                // EIO on a write: some prefix of it (maybe none, maybe all) may have landed.
                let n = buf.len() / SECTOR;
                let p = w.rng.gen_range(0..=n);
                if p > 0 {
                    let _ = w.disk.write(sector, &buf[..p * SECTOR]);
                }
            }
            io_err(e)
        })?;
        if slot && w.defer_chunk_commits {
            if let Ok(Record { state: State::Migrating { cursor }, .. }) = Record::decode(buf) {
                if cursor < g.l {
                    w.deferred = Some((sector, buf.to_vec()));
                    w.swallow_flush = true;
                    return Ok(());
                }
            }
        }
        w.disk.write(sector, buf).map_err(io_err)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| "disk flush".into()).map_err(|e| {
            if !w.dead {
                // A failed flush may still have made the older part of the cache durable.
                let n = w.disk.cache.len();
                let p = w.rng.gen_range(0..=n);
                w.disk.flush_prefix(p);
            }
            io_err(e)
        })?;
        if w.swallow_flush {
            w.swallow_flush = false;
            return Ok(());
        }
        w.disk.flush();
        Ok(())
    }
}

fn kerr(e: String) -> KernelError {
    KernelError::new(e)
}

impl Kernel for SimKernel {
    /// The simulated kernel has no keyring: the final table carries the key in hex (the
    /// path cryptsetup takes on such kernels too).
    fn keyring_add(&mut self, _desc: &str, _key: &[u8]) -> KResult<Option<String>> {
        Ok(None)
    }

    fn keyring_drop(&mut self, _desc: &str) {}

    fn lookup(&mut self, name: &str) -> KResult<Option<DevRef>> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("lookup {name}")).map_err(kerr)?;
        Ok(w.dm.devs.get(name).map(|d| d.dev))
    }

    fn create(&mut self, name: &str, uuid: &str, private: bool) -> KResult<DevRef> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("create {name}")).map_err(kerr)?;
        if w.dm.devs.contains_key(name) {
            return Err(KernelError::new(format!("creating {name}: device exists (EBUSY)")));
        }
        if w.dm.devs.values().any(|d| d.uuid == uuid) {
            return Err(KernelError::new(format!("creating {name}: uuid {uuid} in use (EBUSY)")));
        }
        let dev = DevRef { major: DM_MAJOR, minor: w.dm.next_minor };
        w.dm.next_minor += 1;
        w.dm.devs.insert(
            name.into(),
            DmDev { dev, uuid: uuid.into(), private, live: None, inactive: None, suspended: false, stats: Vec::new() },
        );
        Ok(dev)
    }

    fn load(&mut self, name: &str, table: &[Line], key_hex: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("load {name}: {}", table.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(" | ")))
            .map_err(kerr)?;
        w.dev_mut(name)?;
        let t = w
            .parse_table(table.iter().map(|l| (l.start, l.length, l.target_type().to_string(), l.params(key_hex))))
            .map_err(|e| KernelError::new(format!("loading {name}: {e} (EINVAL)")))?;
        w.dev_mut(name)?.inactive = Some(t);
        Ok(())
    }

    fn load_lines(&mut self, name: &str, lines: &[TableLineFacts]) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| {
            format!(
                "load {name}: {}",
                lines
                    .iter()
                    .map(|l| format!("{} {} {} {}", l.start, l.length, l.target_type, l.params))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
        })
        .map_err(kerr)?;
        w.dev_mut(name)?;
        let t = w
            .parse_table(lines.iter().map(|l| (l.start, l.length, l.target_type.clone(), l.params.clone())))
            .map_err(|e| KernelError::new(format!("loading {name}: {e} (EINVAL)")))?;
        w.dev_mut(name)?.inactive = Some(t);
        Ok(())
    }

    fn clear_inactive(&mut self, name: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("clear inactive {name}")).map_err(kerr)?;
        w.dev_mut(name)?.inactive = None;
        Ok(())
    }

    fn message(&mut self, name: &str, msg: &str) -> KResult<String> {
        let mut w = self.0.borrow_mut();
        let failed = w.op(|| format!("message {name}: {msg}")).err();
        if msg.starts_with('@') {
            // dm-stats, device-mapper's core: a failed message changed nothing
            if let Some(e) = failed {
                return Err(kerr(e));
            }
            return stats_message(w.dev_mut(name)?, msg)
                .map_err(|e| KernelError::new(format!("message to {name}: {e} (EINVAL)")));
        }
        // A message that fails may have set some regions before it failed (the kernel sets
        // them one word at a time): the caller cannot tell.
        let apply = failed.is_none() || (!w.dead && w.rng.gen_bool(0.5));
        let d = w.dev_mut(name)?;
        let words: Vec<&str> = msg.split_whitespace().collect();
        let r = match (d.live.as_mut().and_then(|t| t.first_mut()).map(|l| &mut l.target), words.first()) {
            (Some(STarget::Switch { map, .. }), Some(&"set_region_mappings")) if apply => {
                crate::core::tables::apply_region_mappings(map, 2, &words[1..])
            }
            (Some(STarget::Switch { .. }), Some(&"set_region_mappings")) => Ok(()),
            (Some(_), _) => Err("the target takes no such message".to_string()),
            (None, _) => Err("no live table".to_string()),
        };
        if let Some(e) = failed {
            return Err(kerr(e));
        }
        r.map(|()| String::new()).map_err(|e| KernelError::new(format!("message to {name}: {e} (EINVAL)")))
    }

    fn suspend(&mut self, name: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("suspend {name}")).map_err(kerr)?;
        // Suspending waits for in-flight I/O (none: the simulator's I/O is synchronous) and
        // for a region being recovered (recovery steps are atomic here).
        w.dev_mut(name)?.suspended = true;
        Ok(())
    }

    fn resume(&mut self, name: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        if let Err(e) = w.op(|| format!("resume {name}")) {
            // A resume that fails may fail after the table swap: new table, still suspended.
            if !w.dead && w.rng.gen_bool(0.5) {
                if let Some(d) = w.dm.devs.get_mut(name) {
                    if let Some(t) = d.inactive.take() {
                        d.live = Some(t);
                    }
                }
            }
            return Err(KernelError::new(e));
        }
        let d = w.dev_mut(name)?;
        if let Some(t) = d.inactive.take() {
            d.live = Some(t);
        }
        d.suspended = false;
        if name == BRIDGE && w.deferred.is_some() {
            w.release_armed = true;
        }
        if name == BRIDGE {
            // The uevent of this resume: hidden from udev rules and pvscan, or not. Shown, the
            // bridge must be the finished LUKS mapping (pure crypt table, header on disk):
            // before, udev and LVM would scan a device that still shows the plaintext PV.
            if w.udev_hidden.contains(name) {
                w.bridge_shown_to_udev = false;
            } else {
                let d = &w.dm.devs[name];
                let pure = matches!(d.live.as_deref(), Some([l]) if matches!(l.target, STarget::Crypt { .. }) && (l.length == w.g.l || l.length == w.g.n - w.g.s));
                // the header luksify wrote (LUKS1), or a LUKS2 header whose reencryption is over
                let cur = w.disk.current();
                let header = cur.get(..w.header.len()) == Some(&w.header[..])
                    || cur.get(..crate::core::luks2meta::HEAD_BYTES).is_some_and(
                        |h| matches!(crate::core::luks2meta::parse(h), Ok(Some(m)) if m.reencrypt.is_none()),
                    );
                if pure && header {
                    w.bridge_shown_to_udev = true;
                } else {
                    let msg = format!("the bridge was resumed without the udev flags before it was the finished LUKS mapping (pure crypt table {pure}, header on disk {header})");
                    w.violations.push(msg);
                }
            }
        }
        Ok(())
    }

    fn set_udev_hidden(&mut self, name: &str, hidden: bool) {
        let mut w = self.0.borrow_mut();
        if hidden {
            w.udev_hidden.insert(name.to_string());
        } else {
            w.udev_hidden.remove(name);
        }
    }

    fn remove(&mut self, name: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("remove {name}")).map_err(kerr)?;
        let dev = w.dev_mut(name)?.dev;
        if let Some(user) = w.in_use(name, dev) {
            return Err(KernelError::new(format!("removing {name}: in use by {user} (EBUSY)")));
        }
        w.dm.devs.remove(name);
        Ok(())
    }

    fn table(&mut self, name: &str) -> KResult<Vec<TableLineFacts>> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("table {name}")).map_err(kerr)?;
        let d = w.dev_mut(name)?;
        Ok(d.live.iter().flatten().map(|l| l.facts()).collect())
    }

    fn holders_of(&mut self, dev: DevRef, except: &[&str]) -> KResult<Vec<HolderTable>> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("holders of {dev}")).map_err(kerr)?;
        Ok(w.dm
            .devs
            .iter()
            .filter(|(n, d)| !except.contains(&n.as_str()) && d.live.iter().flatten().any(|l| l.devs().contains(&dev)))
            .map(|(n, d)| HolderTable { name: n.clone(), table: d.live.iter().flatten().map(|l| l.facts()).collect() })
            .collect())
    }

    fn mirror_health(&mut self, name: &str) -> KResult<Vec<Vec<char>>> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("status {name}")).map_err(kerr)?;
        let d = w.dev_mut(name)?;
        Ok(d.live
            .iter()
            .flatten()
            .filter_map(|l| match &l.target {
                STarget::Mirror { health, .. } => Some(health.iter().map(|&c| c as char).collect()),
                _ => None,
            })
            .collect())
    }

    fn read(&mut self, name: &str, sector: u64, buf: &mut [u8]) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("read {name} {sector}+{}", buf.len() / SECTOR)).map_err(kerr)?;
        let dev =
            w.dm.devs.get(name).map(|d| d.dev).ok_or_else(|| KernelError::new(format!("{name}: no such device")))?;
        for (i, b) in buf.chunks_mut(SECTOR).enumerate() {
            match w.dev_io(dev, sector + i as u64, b, false) {
                Ok(()) => {}
                Err(IoFail::Blocked) => {
                    return Err(KernelError::new(format!("reading suspended {name}: this would hang forever")))
                }
                Err(IoFail::Error(e)) => return Err(KernelError::new(e)),
            }
        }
        Ok(())
    }

    /// Sector by sector through the device's tables down to the disk (whose cache keeps
    /// what is not flushed yet, as for the engine's own writes).
    fn write(&mut self, name: &str, sector: u64, buf: &[u8]) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        let dev =
            w.dm.devs.get(name).map(|d| d.dev).ok_or_else(|| KernelError::new(format!("{name}: no such device")))?;
        let mut n = buf.len() / SECTOR;
        let failed = w.op(|| format!("write {name} {sector}+{n}")).err();
        if failed.is_some() {
            // EIO on a write: some prefix of it (maybe none, maybe all) may have landed.
            n = if w.dead { 0 } else { w.rng.gen_range(0..=n) };
        }
        for (i, b) in buf.chunks(SECTOR).take(n).enumerate() {
            let mut b = b.to_vec();
            match w.dev_io(dev, sector + i as u64, &mut b, true) {
                Ok(()) => {}
                Err(IoFail::Blocked) => {
                    return Err(KernelError::new(format!("writing suspended {name}: this would hang forever")))
                }
                Err(IoFail::Error(e)) => return Err(KernelError::new(e)),
            }
        }
        failed.map_or(Ok(()), |e| Err(kerr(e)))
    }
}

/// The `@stats_*` messages luksify sends, as dm-stats answers them (areas of a given length
/// or `/N` of them, printed one line each with the area's whole length; of the counters only
/// the writes are modelled).
fn stats_message(d: &mut super::dm::DmDev, msg: &str) -> Result<String, String> {
    let w: Vec<&str> = msg.split_whitespace().collect();
    let id = |i: usize| w.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or("no region id");
    match w.first().copied() {
        Some("@stats_create") => {
            let (a, n) = w.get(1).and_then(|r| r.split_once('+')).ok_or("no range")?;
            let (a, n): (u64, u64) = (a.parse().map_err(|_| "range")?, n.parse().map_err(|_| "range")?);
            let step = match w.get(2).copied().ok_or("no step")? {
                s if s.starts_with('/') => n.div_ceil(s[1..].parse::<u64>().map_err(|_| "step")?.max(1)),
                s => s.parse::<u64>().map_err(|_| "step")?,
            }
            .max(1);
            let id = (0..).find(|i| d.stats.iter().all(|r| r.id != *i)).expect("a free id");
            let program = w.get(3).copied().unwrap_or("-");
            let areas = n.div_ceil(step).max(1) as usize;
            d.stats.push(super::dm::SimStat {
                id,
                start: a,
                end: a + n,
                step,
                writes: vec![0; areas],
                program: program.into(),
            });
            Ok(format!("{id}"))
        }
        Some("@stats_print") => {
            let id = id(1)?;
            let r = d.stats.iter().find(|r| r.id == id).ok_or("no such region")?;
            // optional lines: <starting_line> <number_of_lines> (clipped to the region, as
            // the kernel does; 0 lines: to the end)
            let n = r.writes.len();
            let (first, len) = match (w.get(2), w.get(3)) {
                (Some(f), Some(l)) => {
                    (f.parse::<usize>().map_err(|_| "line")?, l.parse::<usize>().map_err(|_| "lines")?)
                }
                (None, None) => (0, 0),
                _ => return Err("invalid number of arguments".into()),
            };
            let first = first.min(n);
            let end = if len == 0 { n } else { first.saturating_add(len).min(n) };
            Ok((first..end)
                .zip(&r.writes[first..end])
                .map(|(i, &wr)| {
                    format!("{}+{} 0 0 0 0 {wr} 0 {} 0 0 0 0 0 0\n", r.start + i as u64 * r.step, r.step, wr * 8)
                })
                .collect())
        }
        Some("@stats_delete") => {
            let id = id(1)?;
            let before = d.stats.len();
            d.stats.retain(|r| r.id != id);
            if d.stats.len() == before {
                return Err("no such region".into());
            }
            Ok(String::new())
        }
        Some("@stats_list") => {
            let want = w.get(1).copied();
            Ok(d.stats
                .iter()
                .filter(|r| want.is_none_or(|p| p == r.program))
                .map(|r| format!("{}: {}+{} {} {} -\n", r.id, r.start, r.end - r.start, r.end - r.start, r.program))
                .collect())
        }
        _ => Err("no such message".into()),
    }
}
