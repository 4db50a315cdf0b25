//! The scenario and the world: the sizes and the seed of a run, and everything simulated
//! (disk, device-mapper, live system, operation numbering and faults) in one place.

use super::content::{content, describe, is_zero, key_and_header, label_sector, xts_from_key};
use super::disk::DiskImage;
use super::dm::{parse_line, size_of, DmDev, DmState, SLine, STarget};
use super::live::{Live, Lv, Model, Seg, WriterConfig};
use super::{BRIDGE, DM_MAJOR, FILLER, KEY_SEED, RAW, SECTOR};
use crate::core::geometry::Geometry;
use crate::core::journal::{self, SLOT_BYTES};
use crate::core::tables::DevRef;
use crate::engine::traits::{KResult, KernelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

/// Sizes of the simulated device and PV, and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub n: u64,
    pub l: u64,
    pub s: u64,
    pub k: u64,
    pub region: u64,
    pub pe_start: u64,
    pub extent: u64,
    pub seed: u64,
    pub writer: WriterConfig,
    /// Mutation for the tests of the tests: every chunk commit reaches the disk only after the
    /// bridge has flipped to crypt (what an engine with the wrong commit order would do).
    pub late_commit_mutant: bool,
    /// Cut every suspended window that can be cut (`max_stall` zero, the last comparison
    /// read in pieces of 8 sectors): each step is tried [`crate::engine::MAX_CUTS`] + 1 times, its windows
    /// cut after their first piece, live I/O running in between.
    pub cut_every_window: bool,
    /// Every engine encrypts through the staging crypt device ([`Options::kernel_crypt`]),
    /// as it does for a cipher luksify has no userspace implementation of.
    ///
    /// [`Options::kernel_crypt`]: crate::engine::Options::kernel_crypt
    pub kernel_crypt: bool,
}

impl Scenario {
    /// L = 256, S = 32, k = 24 (11 chunks, the last one 16 sectors: L mod k != 0), region 16
    /// (a chunk is one full and one partial region), device of the minimum size (the tail is
    /// exactly full: [S+L, shadow) is empty; N is not a multiple of 8).
    pub fn small(seed: u64) -> Scenario {
        let (l, s) = (256, 32);
        let n = (l..).find(|&n| n - l >= Geometry::tail_needed(n, s)).unwrap();
        Scenario {
            n,
            l,
            s,
            k: 24,
            region: 16,
            pe_start: 16,
            extent: 8,
            seed,
            writer: WriterConfig::busy(),
            late_commit_mutant: false,
            cut_every_window: false,
            kernel_crypt: false,
        }
    }

    /// L = 2048, S = 128, k = 120 (L mod k != 0), region 16, some unused room in the tail.
    pub fn larger(seed: u64) -> Scenario {
        let (l, s) = (2048, 128);
        let n = (l..).find(|&n| n - l >= Geometry::tail_needed(n, s)).unwrap() + 301;
        Scenario {
            n,
            l,
            s,
            k: 120,
            region: 16,
            pe_start: 64,
            extent: 32,
            seed,
            writer: WriterConfig::busy(),
            late_commit_mutant: false,
            cut_every_window: false,
            kernel_crypt: false,
        }
    }

    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.n, self.l, self.s, self.k, self.region).expect("scenario geometry")
    }

    /// Three LVs: root in two non-contiguous segments, home linear, swap striped over 2 stripes
    /// of the same PV; two ranges of free extents.
    pub fn lvs(&self) -> Vec<Lv> {
        let e = self.extent;
        let p = (self.l - self.pe_start) / e;
        let pv = |x: u64| self.pe_start + x * e;
        let (r0, h0, f0, r1, sw) = (0, p / 4, p / 2, p / 2 + p / 8, 3 * p / 4);
        let sw_ext = 2 * ((p - sw - 1) / 2);
        let chunk = 8;
        assert!(sw_ext >= 2 && f0 < r1);
        vec![
            Lv {
                name: "vg0-root".into(),
                segs: vec![
                    (0, (h0 - r0) * e, Seg::Linear { pv: pv(r0) }),
                    ((h0 - r0) * e, (sw - r1) * e, Seg::Linear { pv: pv(r1) }),
                ],
            },
            Lv { name: "vg0-home".into(), segs: vec![(0, (f0 - h0) * e, Seg::Linear { pv: pv(h0) })] },
            Lv {
                name: "vg0-swap".into(),
                segs: vec![(0, sw_ext * e, Seg::Striped { chunk, pvs: vec![pv(sw), pv(sw + sw_ext / 2)] })],
            },
        ]
    }
}

/// How operation `i` fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    PowerCut,
    Kill,
    Error,
}

/// Everything simulated, shared by the engine's [`SimDisk`](super::SimDisk) and [`SimKernel`](super::SimKernel) handles.
pub struct World {
    pub sc: Scenario,
    pub g: Geometry,
    pub key: Vec<u8>,
    pub header: Vec<u8>,
    pub disk: DiskImage,
    pub(super) dm: DmState,
    pub lvs: Vec<Lv>,
    pub live: Live,
    pub model: Model,
    /// Reverse map: PV sector → (LV index, LV sector), for sectors inside LVs.
    pv_owner: Vec<Option<(usize, u64)>>,
    pub(super) rng: ChaCha8Rng,
    /// Operations performed so far (the next one gets this number).
    pub ops: u64,
    pub fault: Option<(u64, Fault)>,
    /// A failing area that appears at operation number `.0` (before that operation runs).
    pub bad_from: Option<(u64, super::disk::BadArea)>,
    /// The fault fired.
    pub fired: Option<(u64, Fault)>,
    /// The luksify process is dead (kill or power cut): every engine operation fails.
    pub(super) dead: bool,
    /// The machine is off (power cut): nothing runs any more.
    off: bool,
    /// Operation log (number, what), for failure reports.
    pub trace: Vec<String>,
    /// Things the live system saw that it must never see (stale or wrong reads).
    pub violations: Vec<String>,
    /// Mutation: hold every chunk commit back until after the bridge's next resume.
    pub defer_chunk_commits: bool,
    pub(super) deferred: Option<(u64, Vec<u8>)>,
    pub(super) swallow_flush: bool,
    pub(super) release_armed: bool,
    /// Mirror recovery writes (the kernel's).
    pub recovery_steps: u64,
    /// Devices the running luksify process resumes with the udev-disable flags (its
    /// `set_udev_hidden`); a new process starts with none.
    pub(super) udev_hidden: BTreeSet<String>,
    /// The bridge's last uevent let udev (and LVM's autoactivation) see it, and it was the
    /// finished LUKS mapping then. A later hidden resume clears it again.
    pub bridge_shown_to_udev: bool,
}

pub(super) type Shared = Rc<RefCell<World>>;

pub(super) fn io_err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

#[derive(Debug)]
pub(super) enum IoFail {
    Blocked,
    Error(#[allow(dead_code)] String),
}

impl World {
    pub(super) fn new(sc: &Scenario, image: Vec<u8>, model: Model, live_on: Option<DevRef>) -> World {
        let g = sc.geometry();
        let (key, header) = key_and_header(KEY_SEED);
        let lvs = sc.lvs();
        let mut pv_owner = vec![None; sc.l as usize];
        for (i, lv) in lvs.iter().enumerate() {
            for o in 0..lv.len() {
                let x = lv.pv(o) as usize;
                assert!(pv_owner[x].is_none(), "LVs overlap at {x}");
                pv_owner[x] = Some((i, o));
            }
        }
        let mut w = World {
            sc: sc.clone(),
            g,
            key,
            header,
            disk: DiskImage::new(image),
            dm: DmState::default(),
            lvs,
            live: Live { on: RAW, active: false },
            model,
            pv_owner,
            rng: ChaCha8Rng::seed_from_u64(sc.seed),
            ops: 0,
            fault: None,
            bad_from: None,
            fired: None,
            dead: false,
            off: false,
            trace: Vec::new(),
            violations: Vec::new(),
            defer_chunk_commits: sc.late_commit_mutant,
            deferred: None,
            swallow_flush: false,
            release_armed: false,
            recovery_steps: 0,
            udev_hidden: BTreeSet::new(),
            bridge_shown_to_udev: false,
        };
        if let Some(on) = live_on {
            w.activate_lvs(on).expect("activating the LVs");
        }
        w
    }

    // ----- operations: numbering, faults, the live system in between -----

    /// Every engine-visible operation goes through here: the live system gets a turn, then
    /// the fault (if this is its number) fires.
    pub(super) fn op(&mut self, what: impl FnOnce() -> String) -> Result<(), String> {
        if self.dead {
            return Err("the luksify process is dead".into());
        }
        let i = self.ops;
        self.ops += 1;
        let what = what();
        if let Some((at, b)) = self.bad_from {
            if at == i {
                self.bad_from = None;
                self.disk.bad.push(b);
                self.trace.push(format!("   (sectors {}..{} start failing)", b.start, b.end));
            }
        }
        self.tick();
        if let Some((at, f)) = self.fault {
            if at == i {
                self.fired = Some((i, f));
                self.trace.push(format!("#{i} {what}  <-- {f:?}"));
                match f {
                    Fault::PowerCut => {
                        self.dead = true;
                        self.off = true;
                    }
                    Fault::Kill => self.dead = true,
                    Fault::Error => {}
                }
                if self.dead {
                    // A commit the (mutant) engine still held back dies with it.
                    self.deferred = None;
                    self.release_armed = false;
                    self.swallow_flush = false;
                }
                return Err(format!("injected {f:?} at operation {i} ({what})"));
            }
        }
        self.trace.push(format!("#{i} {what}"));
        if self.release_armed {
            // Mutation: the held-back commit lands only now, after the table flipped.
            self.release_armed = false;
            if let Some((s, d)) = self.deferred.take() {
                self.trace.push(format!("   (deferred journal write at {s} lands now)"));
                let _ = self.disk.write(s, &d);
                self.disk.flush();
            }
        }
        Ok(())
    }

    /// The live system's turn: maybe a write, an fsync, a check read, a metadata write,
    /// a background mirror recovery step.
    pub fn tick(&mut self) {
        if self.off {
            return;
        }
        let c = self.sc.writer.clone();
        if self.rng.gen_bool(c.p_recover) {
            self.recover_step(None);
        }
        if !self.live.active {
            return;
        }
        if self.rng.gen_bool(c.p_write) {
            self.writer_write();
        }
        if self.rng.gen_bool(c.p_meta) {
            self.meta_write();
        }
        if self.rng.gen_bool(c.p_flush) {
            self.writer_flush();
        }
        if self.rng.gen_bool(c.p_read) {
            self.reader_check(4);
        }
    }

    /// Let the machine run for `n` turns without the engine (after a kill or an error).
    pub fn idle(&mut self, n: usize) {
        for _ in 0..n {
            self.tick();
        }
    }

    /// Whether `dev` is a dm device whose live table holds a mirror target.
    fn is_mirror_dev(&self, dev: DevRef) -> bool {
        self.dm_by_dev(dev)
            .and_then(|(_, d)| d.live.as_ref())
            .is_some_and(|t| t.iter().any(|l| matches!(l.target, STarget::Mirror { .. })))
    }

    /// The sector range the writer likes to hit: the chunk in flight, or the one just moved.
    fn hot_range(&self) -> Option<(u64, u64)> {
        let bridge = self.dm.devs.get(BRIDGE)?;
        let t = bridge.live.as_ref()?;
        let in_flight = t.iter().find(|l| match &l.target {
            STarget::Mirror { .. } => true,
            STarget::Linear { dev, .. } => self.is_mirror_dev(*dev),
            _ => false,
        });
        if let Some(m) = in_flight {
            let end = (m.start + m.length + self.g.k).min(self.g.l);
            return Some((m.start, end.max(m.start + 1)));
        }
        let c = t.iter().find(|l| matches!(l.target, STarget::Crypt { .. }))?;
        Some((c.start.saturating_sub(self.g.k), (c.start + self.g.k).min(self.g.l)))
    }

    fn pick_lv_sector(&mut self) -> Option<(usize, u64)> {
        let hot = if self.rng.gen_bool(self.sc.writer.p_hot) { self.hot_range() } else { None };
        for _ in 0..16 {
            let x = match hot {
                Some((a, b)) => self.rng.gen_range(a..b),
                None => self.rng.gen_range(0..self.sc.l),
            };
            if let Some(o) = self.pv_owner[x as usize] {
                return Some(o);
            }
        }
        None
    }

    fn lv_dev(&self, i: usize) -> Option<DevRef> {
        self.dm.devs.get(&self.lvs[i].name).map(|d| d.dev)
    }

    /// The device LVM sees the PV on: the bridge once it has a live table, else the raw one.
    pub(super) fn pv_dev(&self) -> DevRef {
        match self.dm.devs.get(BRIDGE) {
            Some(b) if b.live.is_some() => b.dev,
            _ => RAW,
        }
    }

    fn writer_write(&mut self) {
        let Some((lv, o)) = self.pick_lv_sector() else { return };
        let Some(dev) = self.lv_dev(lv) else { return };
        let len = self.rng.gen_range(1..=self.sc.writer.max_len).min(self.lvs[lv].len() - o);
        if (o..o + len).any(|s| self.blocked(dev, s)) {
            return; // the write waits behind a suspended device: it is issued later, or never
        }
        let id = self.model.next_id;
        self.model.next_id += 1;
        for s in o..o + len {
            let x = self.lvs[lv].pv(s);
            let mut b = content(id, x);
            // Recorded before the I/O: once issued, it may be on the disk.
            self.model.pending[x as usize].push(id);
            if let Err(e) = self.dev_io(dev, s, &mut b, true) {
                self.violations.push(format!("write #{id} to {} sector {s} failed: {e:?}", self.lvs[lv].name));
            }
        }
        self.model.writes += 1;
    }

    fn meta_write(&mut self) {
        let dev = self.pv_dev();
        let lo = if dev == RAW && !self.sc.writer.raw_label_area { self.g.f } else { 0 };
        let x = loop {
            let x = self.rng.gen_range(lo..self.sc.pe_start);
            if x != 1 {
                break x;
            }
        };
        if self.blocked(dev, x) {
            return;
        }
        let id = self.model.next_id;
        self.model.next_id += 1;
        self.model.pending[x as usize].push(id);
        let mut b = content(id, x);
        if let Err(e) = self.dev_io(dev, x, &mut b, true) {
            self.violations.push(format!("metadata write #{id} to PV sector {x} on {dev} failed: {e:?}"));
        }
        self.model.writes += 1;
        // Read a metadata sector back through the PV device.
        let y = self.rng.gen_range(0..self.sc.pe_start);
        self.check_read(dev, y, y);
    }

    fn writer_flush(&mut self) {
        // fsync through one LV: the flush reaches every device below it, down to the disk.
        let lv = self.rng.gen_range(0..self.lvs.len());
        let Some(dev) = self.lv_dev(lv) else { return };
        if self.flush_blocked(dev) {
            return;
        }
        match self.dev_flush(dev) {
            Ok(()) => self.model.ack_all(),
            Err(e) => self.violations.push(format!("fsync through {} failed: {e:?}", self.lvs[lv].name)),
        }
    }

    fn reader_check(&mut self, count: usize) {
        for _ in 0..count {
            let Some((lv, o)) = self.pick_lv_sector() else { continue };
            let Some(dev) = self.lv_dev(lv) else { continue };
            let x = self.lvs[lv].pv(o);
            self.check_read(dev, o, x);
        }
    }

    /// Read sector `s` of `dev` (which holds plaintext PV sector `x`) and compare it with the
    /// latest write.
    fn check_read(&mut self, dev: DevRef, s: u64, x: u64) {
        if self.blocked(dev, s) {
            return;
        }
        let mut b = vec![0u8; SECTOR];
        match self.dev_io(dev, s, &mut b, false) {
            Ok(()) => {
                let want = self.model.latest(x);
                match want.iter().find(|&&id| b == content(id, x)) {
                    Some(&id) => self.model.observed(x, id),
                    None => {
                        let msg = format!(
                            "read of PV sector {x} (sector {s} of {dev}) after op #{} returned {} instead of write {want:?}",
                            self.ops,
                            describe(&b)
                        );
                        self.violations.push(msg);
                    }
                }
                self.model.reads_checked += 1;
            }
            Err(e) => self.violations.push(format!("read of PV sector {x} through {dev} failed: {e:?}")),
        }
    }

    /// Read every sector of every active LV and the PV metadata through the stack: all must
    /// be the latest writes.
    pub fn check_all_reads(&mut self) -> Result<(), String> {
        let before = self.violations.len();
        if self.live.active {
            for i in 0..self.lvs.len() {
                let Some(dev) = self.lv_dev(i) else { return Err(format!("{} is not active", self.lvs[i].name)) };
                for o in 0..self.lvs[i].len() {
                    if self.blocked(dev, o) {
                        return Err(format!("{} is blocked behind a suspended device", self.lvs[i].name));
                    }
                    let x = self.lvs[i].pv(o);
                    self.check_read(dev, o, x);
                }
            }
            let dev = self.pv_dev();
            for x in 0..self.sc.pe_start {
                self.check_read(dev, x, x);
            }
        }
        if self.violations.len() > before {
            return Err(self.violations[before..].join("\n"));
        }
        Ok(())
    }

    // ----- the live system's LVs -----

    /// Activate every LV with its table on `on` (what `vgchange -ay` does).
    pub fn activate_lvs(&mut self, on: DevRef) -> Result<(), String> {
        for i in 0..self.lvs.len() {
            let name = self.lvs[i].name.clone();
            let table = self.lvs[i].table(on);
            let minor = self.dm.next_minor;
            self.dm.next_minor += 1;
            let dev = DevRef { major: DM_MAJOR, minor };
            self.dm.devs.insert(
                name.clone(),
                DmDev {
                    dev,
                    uuid: format!("LVM-{name}"),
                    private: false,
                    live: None,
                    inactive: None,
                    suspended: false,
                    stats: Vec::new(),
                },
            );
            let lines =
                self.parse_table(table.iter().map(|l| (l.start, l.length, l.target_type.clone(), l.params.clone())))?;
            let d = self.dm.devs.get_mut(&name).unwrap();
            d.live = Some(lines);
        }
        self.live = Live { on, active: true };
        Ok(())
    }

    // ----- block I/O through the dm stack -----

    fn dm_by_dev(&self, dev: DevRef) -> Option<(&String, &DmDev)> {
        self.dm.devs.iter().find(|(_, d)| d.dev == dev)
    }

    fn dev_size(&self, dev: DevRef) -> Option<u64> {
        if dev == RAW {
            return Some(self.disk.n);
        }
        self.dm_by_dev(dev).map(|(_, d)| size_of(&d.live))
    }

    fn line_at(t: &[SLine], s: u64) -> Option<usize> {
        t.iter().position(|l| s >= l.start && s < l.start + l.length)
    }

    /// Whether an I/O to sector `s` of `dev` would wait behind a suspended device.
    fn blocked(&self, dev: DevRef, s: u64) -> bool {
        if dev == RAW {
            return false;
        }
        let Some((_, d)) = self.dm_by_dev(dev) else { return false };
        if d.suspended {
            return true;
        }
        let Some(t) = &d.live else { return false };
        let Some(i) = Self::line_at(t, s) else { return false };
        let l = &t[i];
        let o = s - l.start;
        match &l.target {
            STarget::Linear { dev, offset } | STarget::Crypt { dev, offset, .. } => self.blocked(*dev, offset + o),
            STarget::Striped { .. } => {
                let (d2, s2) = striped_map(l, o);
                self.blocked(d2, s2)
            }
            STarget::Mirror { legs, .. } => legs.iter().any(|(d2, off)| self.blocked(*d2, off + o)),
            STarget::Switch { region, paths, map } => {
                let (d2, off) = paths[map[(o / region) as usize] as usize];
                self.blocked(d2, off + o)
            }
            STarget::Zero => false,
        }
    }

    fn flush_blocked(&self, dev: DevRef) -> bool {
        if dev == RAW {
            return false;
        }
        let Some((_, d)) = self.dm_by_dev(dev) else { return false };
        d.suspended || d.live.iter().flatten().flat_map(|l| l.flush_devs()).any(|d2| self.flush_blocked(d2))
    }

    fn dev_flush(&mut self, dev: DevRef) -> Result<(), IoFail> {
        if dev == RAW {
            self.disk.flush();
            return Ok(());
        }
        let (_, d) = self.dm_by_dev(dev).ok_or_else(|| IoFail::Error(format!("no device {dev}")))?;
        if d.suspended {
            return Err(IoFail::Blocked);
        }
        let below: Vec<DevRef> = d.live.iter().flatten().flat_map(|l| l.flush_devs()).collect();
        for b in below {
            self.dev_flush(b)?;
        }
        Ok(())
    }

    /// One sector of I/O to `dev` through its live table.
    pub(super) fn dev_io(&mut self, dev: DevRef, s: u64, buf: &mut [u8], write: bool) -> Result<(), IoFail> {
        debug_assert_eq!(buf.len(), SECTOR);
        if dev == RAW {
            return if write { self.disk.write(s, buf) } else { self.disk.read(s, buf) }.map_err(IoFail::Error);
        }
        let (name, d) = self.dm_by_dev(dev).ok_or_else(|| IoFail::Error(format!("no device {dev}")))?;
        if d.suspended {
            return Err(IoFail::Blocked);
        }
        let name = name.clone();
        if write {
            // dm-stats: a write is counted in the regions it overlaps (the kernel counts it
            // when it completes, failed or not; the simulator's I/O is synchronous)
            if let Some(d) = self.dm.devs.get_mut(&name) {
                for r in d.stats.iter_mut().filter(|r| (r.start..r.end).contains(&s)) {
                    r.writes[((s - r.start) / r.step) as usize] += 1;
                }
            }
        }
        let d = &self.dm.devs[&name];
        let t = d.live.as_ref().ok_or_else(|| IoFail::Error(format!("{name} has no table")))?;
        let li = Self::line_at(t, s).ok_or_else(|| IoFail::Error(format!("sector {s} beyond the end of {name}")))?;
        let l = &t[li];
        let o = s - l.start;
        match l.target.clone() {
            STarget::Zero => {
                if !write {
                    buf.fill(0);
                }
                Ok(())
            }
            STarget::Linear { dev, offset } => self.dev_io(dev, offset + o, buf, write),
            STarget::Striped { .. } => {
                let (d2, s2) = striped_map(l, o);
                self.dev_io(d2, s2, buf, write)
            }
            STarget::Crypt { xts, iv_offset, dev, offset, .. } => {
                if write {
                    let mut c = buf.to_vec();
                    xts.encrypt(iv_offset + o, &mut c);
                    self.dev_io(dev, offset + o, &mut c, true)
                } else {
                    self.dev_io(dev, offset + o, buf, false)?;
                    xts.decrypt(iv_offset + o, buf);
                    Ok(())
                }
            }
            STarget::Switch { region, paths, map } => {
                let (d2, off) = paths[map[(o / region) as usize] as usize];
                self.dev_io(d2, off + o, buf, write)
            }
            STarget::Mirror { region, legs, sync, health, .. } => {
                let r = (o / region) as usize;
                let in_sync = sync[r];
                if write {
                    let r0 = self.dev_io(legs[0].0, legs[0].1 + o, buf, true);
                    if r0.is_err() {
                        self.set_health(&name, li, 0, b'D');
                    }
                    let mut r1 = Err(IoFail::Error("not written".into()));
                    if in_sync {
                        r1 = self.dev_io(legs[1].0, legs[1].1 + o, buf, true);
                        if r1.is_err() {
                            self.set_health(&name, li, 1, b'D');
                        }
                    }
                    // Without handle_errors, a write that reached one leg completes as success.
                    if r0.is_ok() || r1.is_ok() {
                        Ok(())
                    } else {
                        r0
                    }
                } else {
                    // Out-of-sync regions are read from the primary; in-sync ones from either
                    // healthy leg (a failed primary hands over to the other leg, as
                    // dm-raid1's fail_mirror does).
                    let primary_failed = health[0] != b'A' && health[1] == b'A';
                    let leg =
                        if in_sync && (primary_failed || (health == *b"AA" && self.rng.gen_bool(0.5))) { 1 } else { 0 };
                    let r = self.dev_io(legs[leg].0, legs[leg].1 + o, buf, false);
                    if r.is_err() {
                        self.set_health(&name, li, leg, b'R');
                        if in_sync {
                            let other = 1 - leg;
                            return self.dev_io(legs[other].0, legs[other].1 + o, buf, false);
                        }
                    }
                    r
                }
            }
        }
    }

    fn set_health(&mut self, name: &str, li: usize, leg: usize, c: u8) {
        if let Some(STarget::Mirror { health, .. }) =
            self.dm.devs.get_mut(name).and_then(|d| d.live.as_mut()).map(|t| &mut t[li].target)
        {
            if health[leg] == b'A' {
                health[leg] = c;
            }
        }
    }

    /// Copy one out-of-sync region of a mirror (of `only`, or of any device), as kcopyd does:
    /// read the primary, write the secondary, into the disk's volatile cache (no FUA).
    /// Returns whether a region was copied (or failed).
    pub(super) fn recover_step(&mut self, only: Option<&str>) -> bool {
        let mut job = None;
        'find: for (name, d) in &self.dm.devs {
            if only.is_some_and(|o| o != name) || d.suspended {
                continue;
            }
            for (li, l) in d.live.iter().flatten().enumerate() {
                if let STarget::Mirror { region, legs, sync, health, .. } = &l.target {
                    if health != b"AA" {
                        continue;
                    }
                    if let Some(r) = sync.iter().position(|s| !s) {
                        let a = r as u64 * region;
                        let b = (a + region).min(l.length);
                        job = Some((name.clone(), li, r, a, b, *legs));
                        break 'find;
                    }
                }
            }
        }
        let Some((name, li, r, a, b, legs)) = job else { return false };
        if (a..b).any(|o| self.blocked(legs[0].0, legs[0].1 + o) || self.blocked(legs[1].0, legs[1].1 + o)) {
            return false;
        }
        let mut data = vec![0u8; ((b - a) as usize) * SECTOR];
        let mut failed = None;
        for (i, o) in (a..b).enumerate() {
            if self.dev_io(legs[0].0, legs[0].1 + o, &mut data[i * SECTOR..(i + 1) * SECTOR], false).is_err() {
                failed = Some(0);
                break;
            }
        }
        if failed.is_none() {
            for (i, o) in (a..b).enumerate() {
                if self.dev_io(legs[1].0, legs[1].1 + o, &mut data[i * SECTOR..(i + 1) * SECTOR], true).is_err() {
                    failed = Some(1);
                    break;
                }
            }
        }
        self.recovery_steps += 1;
        match failed {
            // A failed copy is a sync error on that leg; the region stays out of sync.
            Some(leg) => self.set_health(&name, li, leg, b'S'),
            None => {
                if let Some(STarget::Mirror { sync, .. }) =
                    self.dm.devs.get_mut(&name).and_then(|d| d.live.as_mut()).map(|t| &mut t[li].target)
                {
                    sync[r] = true;
                }
            }
        }
        true
    }

    /// Remove the LVs (`vgchange -an`): they must not be held by anything.
    pub fn deactivate_lvs(&mut self) {
        for lv in &self.lvs {
            self.dm.devs.remove(&lv.name);
        }
        self.live.active = false;
    }

    /// Whether the raw device shows the PV label in its durable image (what LVM on a freshly
    /// booted machine would find).
    pub fn raw_shows_pv(&self) -> bool {
        self.disk.durable()[..SECTOR * 4].chunks(SECTOR).any(|s| s == label_sector().as_slice())
    }

    // ----- tables -----

    pub(super) fn parse_table(
        &self,
        lines: impl Iterator<Item = (u64, u64, String, String)>,
    ) -> Result<Vec<SLine>, String> {
        let mut out: Vec<SLine> = Vec::new();
        let mut pos = 0;
        for (start, length, ty, params) in lines {
            if start != pos {
                return Err(format!("gap or overlap in the table at sector {start} (expected {pos})"));
            }
            let l = parse_line(start, length, &ty, &params)?;
            for (d, off, len) in l.extents() {
                let size = self.dev_size(d).ok_or_else(|| format!("device {d} does not exist"))?;
                if off + len > size {
                    return Err(format!("{ty} line {start}+{length}: device {d} too small ({off}+{len} > {size})"));
                }
            }
            pos = start + length;
            out.push(l);
        }
        if out.is_empty() {
            return Err("empty table".into());
        }
        Ok(out)
    }

    pub(super) fn dev_mut(&mut self, name: &str) -> KResult<&mut DmDev> {
        self.dm.devs.get_mut(name).ok_or_else(|| KernelError::new(format!("{name}: no such device (ENXIO)")))
    }

    /// Whether any other device's live or inactive table refers to `dev`, or the live system
    /// holds it open.
    pub(super) fn in_use(&self, name: &str, dev: DevRef) -> Option<String> {
        for (n, d) in &self.dm.devs {
            if n != name && d.live.iter().chain(d.inactive.iter()).flatten().any(|l| l.devs().contains(&dev)) {
                return Some(n.clone());
            }
        }
        if self.live.active && self.lvs.iter().any(|l| l.name == name) {
            return Some("a mounted filesystem".into());
        }
        None
    }

    // ----- final checks -----

    pub(super) fn plain_ok(&self, x: u64, b: &[u8], exact: bool) -> Result<(), String> {
        let allowed = if exact { self.model.latest(x) } else { self.model.allowed(x) };
        let id =
            if x == 1 && b == label_sector().as_slice() { 0 } else { u64::from_le_bytes(b[..8].try_into().unwrap()) };
        if allowed.contains(&id) && content(id, x) == b {
            return Ok(());
        }
        let found = describe(b);
        let lost = match self.model.acked(x) {
            Some(id) => format!(" (acknowledged write #{id} LOST)"),
            None => String::new(),
        };
        Err(format!("plaintext sector {x} holds {found}, expected one of writes {allowed:?}{lost}"))
    }

    /// Check a durable image: either untouched (no journal, plaintext in place) or fully
    /// converted (LUKS header, ciphertext, tail wiped). `exact`: every issued write must be
    /// there (no power was lost since), not merely every acknowledged one.
    pub fn check_image(&self, img: &[u8], exact: bool) -> Result<&'static str, String> {
        let g = self.g;
        let sec = |x: u64| &img[x as usize * SECTOR..(x as usize + 1) * SECTOR];
        let mut errs = Vec::new();
        let mut a = vec![0u8; SLOT_BYTES];
        let mut b = vec![0u8; SLOT_BYTES];
        a.copy_from_slice(&img[g.journal as usize * SECTOR..][..SLOT_BYTES]);
        b.copy_from_slice(&img[g.journal_slot(1) as usize * SECTOR..][..SLOT_BYTES]);
        match journal::choose(&a, &b) {
            Ok(None) => {}
            Ok(Some(r)) => return Err(format!("a journal remains: {:?} seq {}", r.state, r.seq)),
            Err(e) => return Err(format!("the journal is corrupt: {e}")),
        }
        let converted = img[..self.header.len()] == self.header[..];
        let what = if converted {
            let mut area = vec![0u8; (g.s as usize) * SECTOR];
            area[..self.header.len()].copy_from_slice(&self.header);
            if img[..area.len()] != area[..] {
                errs.push("[0, S) is not the LUKS header followed by zeros".to_string());
            }
            let xts = xts_from_key(&self.key);
            for x in 0..g.l {
                let mut p = sec(g.s + x).to_vec();
                xts.decrypt(x, &mut p);
                if let Err(e) = self.plain_ok(x, &p, exact) {
                    errs.push(e);
                }
            }
            for x in g.s + g.l..g.shadow {
                if sec(x) != content(FILLER, x).as_slice() {
                    errs.push(format!("sector {x} past S+L was changed: {}", describe(sec(x))));
                }
            }
            // The shadow and the header copy (keyslot material) must be wiped. The journal
            // slots must hold no journal (checked above); residue of a clear that failed
            // half-way is harmless.
            if !is_zero(&img[g.shadow as usize * SECTOR..g.journal as usize * SECTOR]) {
                errs.push("the shadow or the header copy (keyslot material) was not wiped".to_string());
            }
            "converted"
        } else {
            for x in 0..g.l {
                if let Err(e) = self.plain_ok(x, sec(x), exact) {
                    errs.push(e);
                }
            }
            for x in g.l..g.shadow {
                if sec(x) != content(FILLER, x).as_slice() {
                    errs.push(format!(
                        "sector {x} past L was changed although nothing was converted: {}",
                        describe(sec(x))
                    ));
                }
            }
            "untouched"
        };
        if errs.is_empty() {
            Ok(what)
        } else {
            let n = errs.len();
            errs.truncate(12);
            Err(format!("the {what} device is wrong in {n} places:\n  {}", errs.join("\n  ")))
        }
    }
}

fn striped_map(l: &SLine, o: u64) -> (DevRef, u64) {
    let STarget::Striped { chunk, stripes } = &l.target else { unreachable!() };
    let c = o / chunk;
    let n = stripes.len() as u64;
    let (d, off) = stripes[(c % n) as usize];
    (d, off + (c / n) * chunk + o % chunk)
}
