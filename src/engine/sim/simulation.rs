//! The simulation: set-up, faults, reboot, resume, checks.

use super::content::content;
use super::disk::CachePolicy;
use super::handles::{SimDisk, SimKernel};
use super::live::Model;
use super::world::{Fault, Scenario, Shared, World};
use super::{BRIDGE, CIPHER, FILLER, LUKS_UUID, PV_UUID, RAW, SECTOR};
use crate::core::facts::TableLineFacts;
use crate::core::journal::{self, Record, SLOT_BYTES};
use crate::engine::{EResult, Engine, Hooks, NewConversion, Options};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// One simulated machine.
pub struct Sim {
    pub w: Shared,
}

/// How a [`Sim::resume`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// There was no journal: nothing to do.
    NoJournal,
    /// The journal led to a completed conversion.
    Done,
}

impl Sim {
    /// A running machine: the PV with its original content, the LVs active on it, the
    /// writer running.
    pub fn new(sc: &Scenario) -> Sim {
        thread_local! {
            static IMAGES: RefCell<BTreeMap<(u64, u64), Vec<u8>>> = const { RefCell::new(BTreeMap::new()) };
        }
        let img = IMAGES.with(|m| {
            m.borrow_mut()
                .entry((sc.n, sc.l))
                .or_insert_with(|| {
                    let mut img = vec![0u8; sc.n as usize * SECTOR];
                    for x in 0..sc.n {
                        let id = if x < sc.l { 0 } else { FILLER };
                        img[x as usize * SECTOR..(x as usize + 1) * SECTOR].copy_from_slice(&content(id, x));
                    }
                    img
                })
                .clone()
        });
        let w = World::new(sc, img, Model::new(sc.l), Some(RAW));
        Sim { w: Rc::new(RefCell::new(w)) }
    }

    pub fn disk(&self) -> SimDisk {
        SimDisk(self.w.clone())
    }

    pub fn kernel(&self) -> SimKernel {
        SimKernel(self.w.clone())
    }

    pub fn n(&self) -> u64 {
        self.w.borrow().sc.n
    }

    pub fn key(&self) -> Vec<u8> {
        self.w.borrow().key.clone()
    }

    /// Make operation `at` (counted from now on) fail with `f`.
    pub fn set_fault(&self, at: u64, f: Fault) {
        let mut w = self.w.borrow_mut();
        let at = w.ops + at;
        w.fault = Some((at, f));
        w.fired = None;
    }

    pub fn fired(&self) -> Option<(u64, Fault)> {
        self.w.borrow().fired
    }

    pub fn ops(&self) -> u64 {
        self.w.borrow().ops
    }

    /// `luksify DEVICE`: prepare + run.
    pub fn convert(&self, hooks: &mut dyn Hooks) -> EResult<Engine<SimDisk, SimKernel>> {
        self.convert_with(hooks, &mut |_| {})
    }

    /// [`Sim::convert`], calling `tweak` on the engine between `prepare` and `run`.
    pub fn convert_with(
        &self,
        hooks: &mut dyn Hooks,
        tweak: &mut dyn FnMut(&mut Engine<SimDisk, SimKernel>),
    ) -> EResult<Engine<SimDisk, SimKernel>> {
        let (g, key, header) = {
            let mut w = self.w.borrow_mut();
            w.udev_hidden.clear();
            (w.g, w.key.clone(), w.header.clone())
        };
        let conversion = new_conversion(g, &key, header);
        let mut e = Engine::prepare(self.disk(), self.kernel(), conversion)?;
        self.tune(&mut e);
        tweak(&mut e);
        if let Err(err) = e.run(hooks) {
            // What the app does: a run that failed before anything but the tail changed puts
            // the tail back.
            let a = e.abandon();
            self.w.borrow_mut().trace.push(format!("   (abandon: {a:?})"));
            return Err(err);
        }
        Ok(e)
    }

    /// `luksify DEVICE` for LUKS2, up to the end of the cut-over: [`Engine::prepare_standard`]
    /// with `header` (a real LUKS2 reencryption header for this scenario's L and S), then
    /// [`Engine::bridge_and_cut_over`] in the cut-over order `order`. On error, whether the
    /// engine says the header may be on the device.
    pub fn cut_over_standard(
        &self,
        hooks: &mut dyn Hooks,
        header: &[u8],
        order: &'static [crate::engine::CutStep],
    ) -> Result<Engine<SimDisk, SimKernel>, (crate::engine::EngineError, bool)> {
        self.cut_over_standard_as(hooks, header, order, false, None)
    }

    /// [`Sim::cut_over_standard`], the first S copied only under the suspend (`no_precopy`),
    /// or with a mutant.
    pub(crate) fn cut_over_standard_as(
        &self,
        hooks: &mut dyn Hooks,
        header: &[u8],
        order: &'static [crate::engine::CutStep],
        no_precopy: bool,
        mutant: Option<crate::engine::standard_steps::Mutant>,
    ) -> Result<Engine<SimDisk, SimKernel>, (crate::engine::EngineError, bool)> {
        let (g, key) = {
            let mut w = self.w.borrow_mut();
            w.udev_hidden.clear();
            (w.g, w.key.clone())
        };
        let conversion = new_conversion(g, &key, header.to_vec());
        let mut e = Engine::prepare_standard(self.disk(), self.kernel(), conversion).map_err(|e| (e, false))?;
        e.set_cut_order(order);
        e.no_precopy = no_precopy;
        e.standard_mutant = mutant;
        e.bridge_and_cut_over(hooks)?;
        Ok(e)
    }

    /// The number of the first operation (from 0, in this machine's life) whose trace line
    /// contains `what`, and of the `nth` such.
    pub fn find_op(&self, what: &str, nth: usize) -> Option<u64> {
        let w = self.w.borrow();
        w.trace
            .iter()
            .filter(|l| l.contains(what))
            .nth(nth)
            .and_then(|l| l.trim_start_matches('#').split_whitespace().next()?.parse().ok())
    }

    /// The journal as the disk durably holds it (no operation counted).
    pub fn durable_journal(&self) -> Option<Record> {
        let w = self.w.borrow();
        let img = w.disk.durable();
        let a = &img[w.g.journal as usize * SECTOR..][..SLOT_BYTES];
        let b = &img[w.g.journal_slot(1) as usize * SECTOR..][..SLOT_BYTES];
        journal::choose(a, b).ok().flatten()
    }

    /// What the scenario asks of every engine this machine runs.
    fn tune(&self, e: &mut Engine<SimDisk, SimKernel>) {
        let sc = &self.w.borrow().sc;
        let mut o = Options { kernel_crypt: sc.kernel_crypt, ..Options::default() };
        if sc.cut_every_window {
            o = Options { max_stall: Some(std::time::Duration::ZERO), piece: 8, ..o };
        }
        e.set_options(o);
    }

    /// `luksify resume DEVICE`, on whatever machine this is (live or rescue).
    pub fn resume(&self, hooks: &mut dyn Hooks) -> EResult<Resumed> {
        self.resume_with(hooks, &mut |_| {})
    }

    /// [`Sim::resume`], calling `after_reopen` once the engine has rebuilt its devices (to
    /// activate the LVs on the bridge, as a rescue system's LVM would).
    pub fn resume_with(&self, hooks: &mut dyn Hooks, after_reopen: &mut dyn FnMut(&Sim)) -> EResult<Resumed> {
        {
            let mut w = self.w.borrow_mut();
            w.dead = false;
            // A new luksify process: its kernel handle hides nothing yet.
            w.udev_hidden.clear();
        }
        let n = self.n();
        let mut disk = self.disk();
        let Some(rec) = crate::engine::read_journal(&mut disk, n)? else {
            return Ok(Resumed::NoJournal);
        };
        let header = crate::engine::read_header_copy(&mut disk, &rec)?;
        let mut e = Engine::reopen(disk, self.kernel(), RAW, rec, &self.key(), header)?;
        self.tune(&mut e);
        after_reopen(self);
        e.run(hooks)?;
        Ok(Resumed::Done)
    }

    /// The engine is gone: revive the process side so a new `luksify` can run.
    pub fn revive(&self) {
        let mut w = self.w.borrow_mut();
        w.dead = false;
        w.fault = None;
    }

    /// Let the live machine run `n` turns without luksify.
    pub fn idle(&self, n: usize) {
        self.w.borrow_mut().idle(n);
    }

    /// Pull the plug now and boot rescue media: the durable image plus a seeded subset of
    /// the unflushed writes; no dm devices; no LVs.
    pub fn power_cut(&self, seed: u64, policy: CachePolicy) -> Sim {
        let w = self.w.borrow();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc4a54);
        let img = w.disk.crash_image(&mut rng, policy);
        let mut sc = w.sc.clone();
        sc.seed = sc.seed.wrapping_mul(31).wrapping_add(seed);
        let mut model = w.model.clone();
        model.power_cut();
        let mut nw = World::new(&sc, img, model, None);
        // Same key and header as before the crash (the passphrase unlocks the same key).
        nw.key = w.key.clone();
        nw.header = w.header.clone();
        nw.trace = w.trace.clone();
        nw.trace.push(format!("--- power cut ({} unflushed writes in the cache); reboot ---", w.disk.cached_writes()));
        Sim { w: Rc::new(RefCell::new(nw)) }
    }

    /// Activate the LVs (on the bridge if it is live, else on the raw device), starting the
    /// live system on a rebooted machine.
    pub fn activate_lvs(&self) -> Result<(), String> {
        let mut w = self.w.borrow_mut();
        let on = w.pv_dev();
        w.activate_lvs(on)
    }

    /// Check everything: the live system saw no stale read; the durable image is either
    /// untouched or fully converted with every acknowledged write (every issued write if
    /// `exact`); on a live machine, every sector read through the LVs is the latest write.
    pub fn check_final(&self, exact: bool) -> Result<&'static str, String> {
        let mut w = self.w.borrow_mut();
        if !w.violations.is_empty() {
            return Err(format!("the live system saw:\n  {}", w.violations.join("\n  ")));
        }
        w.check_all_reads()?;
        // Durable image: what a power cut right now would leave (the cache lost).
        let what = w.check_image(w.disk.durable(), false)?;
        if exact && !w.live.active {
            w.check_image(w.disk.current(), true)?;
        }
        if what == "converted" && w.live.active {
            // The final stack: the bridge maps exactly what `cryptsetup open` maps (N - S
            // sectors). Only a run that was stopped between the journal's clearing and that
            // last reload (not `exact`) may keep the conversion-time table (L sectors).
            let d = w.dm.devs.get(BRIDGE).ok_or("the bridge is gone")?;
            let t: Vec<TableLineFacts> = d.live.iter().flatten().map(|l| l.facts()).collect();
            let want = format!("0 {} crypt {CIPHER} - 0 {RAW} {}", w.g.n - w.g.s, w.g.s);
            let also = format!("0 {} crypt {CIPHER} - 0 {RAW} {}", w.g.l, w.g.s);
            let got: Vec<String> =
                t.iter().map(|l| format!("{} {} {} {}", l.start, l.length, l.target_type, l.params)).collect();
            if got != [want.clone()] && (exact || got != [also]) {
                return Err(format!("the final bridge table is {got:?}, expected [{want:?}]"));
            }
            if let Some(k) = w.dm.devs.keys().find(|k| k.starts_with(BRIDGE) && k.as_str() != BRIDGE) {
                return Err(format!("the helper device {k} is still there"));
            }
            for lv in &w.lvs {
                let d = &w.dm.devs[&lv.name];
                if d.live.iter().flatten().flat_map(|l| l.devs()).any(|x| x == RAW) {
                    return Err(format!("{} still maps the raw device", lv.name));
                }
            }
            if !d.uuid.starts_with("CRYPT-LUKS2-") || d.private {
                return Err(format!("the bridge has uuid {} (private {})", d.uuid, d.private));
            }
            if !w.bridge_shown_to_udev {
                return Err("the finished bridge's last uevent still carries the udev-disable flags: udev and LVM never processed it".into());
            }
        }
        Ok(what)
    }

    /// The operations around the fault and the last `n` ones, for failure messages.
    pub fn trace_tail(&self, n: usize) -> String {
        let w = self.w.borrow();
        let t = &w.trace;
        let from = t.len().saturating_sub(n);
        let mut out = String::new();
        if let Some(at) = t[..from].iter().position(|l| l.contains("<--")) {
            out = t[at.saturating_sub(12)..(at + 12).min(from)].join("\n");
            out.push_str("\n...\n");
        }
        out.push_str(&t[from..].join("\n"));
        out
    }

    pub fn model_stats(&self) -> (u64, u64, u64) {
        let w = self.w.borrow();
        (w.model.writes, w.model.acks, w.model.reads_checked)
    }
}

/// The conversion every simulated run starts: this scenario's device, names and LUKS2 header.
fn new_conversion(geometry: crate::core::geometry::Geometry, key: &[u8], header: Vec<u8>) -> NewConversion<'_> {
    NewConversion {
        raw: RAW,
        geometry,
        name: BRIDGE,
        luks_version: 2,
        luks_uuid: LUKS_UUID,
        cipher: CIPHER,
        allow_discards: false,
        pv_uuid: PV_UUID,
        key,
        header,
    }
}
