//! LUKS2 after the cut-over: luksify's own steps over the plaintext segment (issue 22), each
//! committed as the metadata libcryptsetup itself writes after its step
//! ([`luks2meta::advanced_header`]; `tests/uml_luks2_steps` checks it against every step of
//! libcryptsetup's own runs), so that at every instant the device is a standard LUKS2
//! reencryption in progress that stock cryptsetup opens, recovers and finishes.
//!
//! A step moves the hotzone [a, b) (b − a ≤ S, from the end of the plaintext segment down)
//! to S + a, encrypted, as libcryptsetup's datashift step would — but only the last moment
//! holds live I/O: luksify reads the source, encrypts it in userspace and writes it to the
//! destination (which no table maps: the previous step's source), flushes and reads it back,
//! all with the bridge live; then loads the step's table inactive, suspends the bridge
//! (in-flight writes complete), compares the source once more and copies again the sectors
//! a live write changed, commits the metadata (primary copy, flush, secondary copy, flush: a
//! torn or missing copy leaves the other, which cryptsetup takes), and resumes on the new
//! table. libcryptsetup holds its hotzone suspended through three suspends and two commits.
//! While the bridge waits, live, for the moment to suspend ([`crate::core::tick`]), the
//! next step's source is read ahead; it only saves that step a read: its own last
//! comparison under its own suspend treats it like any other copy of the source.
//!
//! That last comparison reads the whole source again inside the window; it is skipped when
//! the hotzone's areas in a dm-stats region on the bridge (one region serves many steps),
//! printed before the first read of its source, counted no write by the time the bridge is
//! suspended ([`crate::core::dmstats`] says why that proves the source unchanged); else only
//! the areas that counted one are compared. Any doubt (no region, a message that fails, a
//! reply that does not parse) and the whole comparison runs.
//!
//! Crash at any point: before the primary copy is durable the metadata says the old state,
//! whose table maps the source, untouched since the suspend; from then on the new state,
//! whose destination holds exactly the source as it was at the suspend. Nothing changes
//! either until the resume. A commit whose outcome is unknown (a write failed and the
//! metadata cannot be read back) leaves the bridge suspended: the machine stops doing I/O
//! on the device rather than writing where a reboot would not look.
//!
//! The last step takes the moved first S (read from the moved segment at L + S) to [S, 2S);
//! its commit is the all-committed state (one crypt segment), and then, as cryptsetup's
//! teardown does, the reencrypt keyslot's area and the moved segment are zeroed and flushed
//! and the final metadata written ([`write_final`]). A crash between the two leaves the one
//! state stock cryptsetup opens but cannot finish; `luksify resume` writes the rest.

use super::*;
use crate::core::{dmstats, luks2meta};

/// How [`Engine::standard_steps`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepsEnd {
    /// Only the last step (the moved segment) and the teardown are left, or the header is in
    /// a state luksify does not step itself (another cipher, a crashed step): libcryptsetup
    /// continues from here. The sectors encrypted so far.
    Handover(u64),
    /// A stop was requested; every step so far is committed. The sectors encrypted so far.
    Stopped(u64),
    /// Every step is done and the final metadata written (the reencryption is over): only
    /// the finish is left.
    Finished,
}

/// TESTS ONLY: the wrong orders the crash sweep must catch.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mutant {
    /// The bridge resumes on the new table before the metadata commit.
    FlipBeforeCommit,
    /// The copy is not flushed before the commit.
    UnflushedCopy,
    /// Both metadata copies written, then one flush.
    OneFlushForBothCopies,
    /// A source read ahead (before the step before it was committed) is committed without the
    /// last comparison under the suspend.
    TrustReadAhead,
    /// A step through the switch device flips the region of the step after it (not yet
    /// copied) instead of its own.
    WrongRegion,
    /// The last comparison is skipped whenever the hotzone has a dm-stats region, whatever
    /// it counted.
    IgnoreWatchCount,
    /// The step's hotzone is watched (its region created, its areas printed) after its
    /// source was read (and none ahead).
    LateWatch,
    /// The cut-over trusts the first S copied before its suspend whatever the region counted.
    TrustPrecopy,
    /// The last of the areas a dm-stats region counted a write in is left out of the
    /// comparison under the suspend (a step's, and the cut-over's first S).
    OneAreaLess,
    /// A step's hotzone is watched in the lines of its neighbour's areas in the region.
    WrongLines,
    /// The cut-over record keeps the checksum of the early copy even where the window
    /// brought that copy up to date.
    EarlyChecksum,
}

/// Under the suspend, from the reply to a region's print over [a, b) (None: no region, or
/// the message failed) and the same print's areas taken before the first read of [a, b)'s
/// source (`before`; empty: the region was created then): the ranges to compare again, into
/// `areas` (its capacity kept): the areas that counted a write since, clipped to [a, b), or
/// all of [a, b) when the reply says nothing certain
/// ([`crate::core::dmstats::written_since`]). Whether there is nothing to compare: no write
/// reached [a, b) since before its source was read. `one_less`: the [`Mutant::OneAreaLess`]
/// (tests only).
pub(super) fn to_compare(
    reply: Option<&str>,
    before: &[dmstats::AreaWrites],
    a: u64,
    b: u64,
    areas: &mut Vec<(u64, u64)>,
    one_less: bool,
) -> bool {
    if !reply.is_some_and(|r| dmstats::written_since(before, r, areas)) {
        areas.clear();
        areas.push((a, b));
        return false;
    }
    areas.retain_mut(|x| {
        *x = (x.0.max(a), x.1.min(b));
        x.0 < x.1
    });
    if one_less {
        areas.pop();
    }
    areas.is_empty()
}

/// A dm-stats region on the bridge over the hotzones of several steps, [from, to) in areas
/// of `area` sectors ([`crate::core::dmstats::batch_region`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    from: u64,
    to: u64,
    area: u64,
    id: u64,
}

impl Region {
    /// Whether hotzone [a, b) lies in it.
    fn covers(&self, (a, b): (u64, u64)) -> bool {
        self.from <= a && b <= self.to
    }
}

/// A step's hotzone [from, to) watched: the counters of its areas in region `id` (lines
/// `first`.. `first + n`), printed before the first read of its source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watch {
    from: u64,
    to: u64,
    id: u64,
    first: u64,
    n: u64,
    before: Vec<dmstats::AreaWrites>,
}

/// The step's buffers, allocated (and so, under `mlockall`, faulted in) before any suspend.
struct Bufs {
    plain: IoBuf,
    /// The next step's source, as far as it was read ahead (it becomes `plain` once this
    /// step is committed).
    next: IoBuf,
    cipher: IoBuf,
    /// The source read again under the suspend, and the copy read back (never both at once:
    /// the read-back of re-copied runs comes after the comparison is done).
    scratch: IoBuf,
    head: IoBuf,
    meta: IoBuf,
    /// Runs of sectors copied again in the suspended window (capacity fixed up front).
    runs: Vec<(u64, u64)>,
    /// luksify's dm-stats regions on the bridge (the one over this step's hotzone, and
    /// over the next step's when that is another).
    regions: Vec<Region>,
    /// This step's hotzone watched, and the next one's.
    watches: Vec<Watch>,
    /// Under the suspend: the areas of this step's region that counted a write (capacity
    /// fixed up front: [`dmstats::MAX_AREAS`]).
    areas: Vec<(u64, u64)>,
}

/// The live copy's I/O goes to the disk a piece at a time: one request of a whole step
/// (16 MiB) queues every write of the running system behind it (in the test bed the
/// writer's fsync then waited ~10 ms on each step's copy). Smaller pieces cost the copy's
/// own speed: 1 MiB ones made a 16 MiB copy 28-31 ms instead of 17-20 (`qemu/bench`).
const LIVE_PIECE: usize = 4 << 20;

/// The read ahead's piece: one is read while the moment to suspend is at least
/// [`super::FILL_MIN`] away (1 MiB reads in the test bed: ~0.5 ms each).
#[cfg(not(test))]
const AHEAD_PIECE: usize = 1 << 20;
/// (the simulator's steps are 512 KiB: a few pieces each)
#[cfg(test)]
const AHEAD_PIECE: usize = 64 << 10;

/// The first `bytes` of hotzone [from, to)'s source, read ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadAhead {
    from: u64,
    to: u64,
    bytes: usize,
}

/// How a step's new mapping goes live.
enum Flip {
    /// A new bridge table, loaded inactive before the suspend: the resume swaps it in (and
    /// waits for an RCU grace period to drop the old one). `through_switch`: the table is
    /// the one through the switch device ([`tables::standard_switch_table`]).
    Table { table: tables::Table, through_switch: bool },
    /// The bridge goes through the switch device already: after the commit one message
    /// flips the step's region to the ciphertext; the resume swaps nothing.
    Message,
}

/// The switch device's part in a run of luksify's own steps ([`tables::switch_start`]): the
/// hotzones of a full S are its regions, and a step flips its region by a message instead
/// of swapping the bridge's table (in the test bed a step of 4 ticks instead of 5).
#[derive(Debug, Default)]
struct Switched {
    /// Where its regions start (None: no hotzone of S above S, no switch).
    z: Option<u64>,
    /// The bridge's live table goes through it.
    active: bool,
    /// Where the ciphertext starts, as the bridge maps it while `active`.
    x: u64,
    /// Setting it up failed: the rest of the run swaps tables.
    failed: bool,
    /// The bridge is suspended and was not resumed (a commit whose outcome is unknown, a
    /// failed resume): nothing may touch it on the way out.
    held: bool,
}

pub(super) fn read_pieces<D: Disk>(disk: &mut D, sector: u64, buf: &mut [u8]) -> std::io::Result<()> {
    for (i, p) in buf.chunks_mut(LIVE_PIECE).enumerate() {
        disk.read(sector + Sectors::in_len(i * LIVE_PIECE).0, p)?;
    }
    Ok(())
}

pub(super) fn write_pieces<D: Disk>(disk: &mut D, sector: u64, buf: &[u8]) -> std::io::Result<()> {
    let n = buf.len().div_ceil(LIVE_PIECE);
    for (i, p) in buf.chunks(LIVE_PIECE).enumerate() {
        disk.write(sector + Sectors::in_len(i * LIVE_PIECE).0, p)?;
        // a flush every FLUSH_PIECES pieces but the last (the caller flushes the copy): the
        // running system's fsync then waits behind one short flush, not one of the whole
        // step's data
        if (i + 1) % FLUSH_PIECES == 0 && i + 1 < n {
            disk.flush()?;
        }
    }
    Ok(())
}

/// See [`write_pieces`]: 8 MiB between flushes.
const FLUSH_PIECES: usize = 2;

/// The step the metadata in `head` says is next, if luksify takes it itself: its hotzone
/// (logical sectors), the metadata its commit writes, and for the last step the final
/// metadata.
struct Planned {
    from: u64,
    to: u64,
    adv: luks2meta::Advance,
    fin: Option<luks2meta::Finalize>,
}

fn plan(head: &[u8]) -> EResult<Option<Planned>> {
    let adv = luks2meta::advanced_header(head).map_err(|e| EngineError::Journal(e.to_string()))?;
    let Some(adv) = adv.filter(|a| a.metadata.len() == head.len()) else { return Ok(None) };
    // the last step ends the reencryption: what cryptsetup's teardown then writes
    let fin = match adv.last {
        true => match luks2meta::finalized_header(&adv.metadata) {
            Ok(Some(f)) => Some(f),
            _ => return Ok(None),
        },
        false => None,
    };
    let (from, to) = (Sectors::in_len(adv.from as usize).0, Sectors::in_len((adv.from + adv.len) as usize).0);
    Ok(Some(Planned { from, to, adv, fin }))
}

impl<D: Disk, K: Kernel> Engine<D, K> {
    /// luksify's own LUKS2 steps to the end of the reencryption (see the module's doc), or to
    /// a stop request. Needs luksify's userspace cipher (aes-xts-plain64, 512-bit key):
    /// otherwise hands over to libcryptsetup at once.
    pub fn standard_steps(&mut self, hooks: &mut dyn Hooks) -> EResult<StepsEnd> {
        let Some(xts) = self.xts.take() else { return Ok(StepsEnd::Handover(0)) };
        let r = self.standard_steps_with(&xts, hooks);
        self.xts = Some(xts);
        self.settle_aside();
        self.report_undo_failures(hooks);
        r
    }

    fn standard_steps_with(&mut self, xts: &crate::core::xts::Xts, hooks: &mut dyn Hooks) -> EResult<StepsEnd> {
        let s = self.g().s;
        let buf = |n: usize| io(IoBuf::new(n), || "allocating the step buffers".into());
        let n = Sectors(s).byte_len();
        let mut b = Bufs {
            plain: buf(n)?,
            next: buf(n)?,
            cipher: buf(n)?,
            scratch: buf(n)?,
            head: buf(luks2meta::HEAD_BYTES)?,
            meta: buf(luks2meta::HEAD_BYTES)?,
            runs: Vec::with_capacity(RECHECK_RUNS),
            regions: Vec::with_capacity(4),
            watches: Vec::with_capacity(4),
            areas: Vec::with_capacity(dmstats::MAX_AREAS),
        };
        // regions a luksify killed before left on the bridge
        self.purge_watches();
        let l = self.g().l;
        let mut sw = Switched { z: tables::switch_start(l, s), ..Switched::default() };
        let r = self.steps_loop(xts, hooks, &mut b, &mut sw);
        self.unwatch(&mut b, None);
        // Whatever ended the run: the bridge gets the table `cryptsetup open` builds again
        // (stock cryptsetup's resume compares the live table with it), unless it is left
        // suspended on purpose.
        match (r, self.leave_switch(&mut sw)) {
            (r, Ok(())) => r,
            (Ok(_), Err(e)) => Err(e),
            (Err(e), Err(e2)) => {
                undone(&mut self.undo_failed, || "giving the bridge its standard table again".into(), Err::<(), _>(e2));
                Err(e)
            }
        }
    }

    fn steps_loop(
        &mut self,
        xts: &crate::core::xts::Xts,
        hooks: &mut dyn Hooks,
        b: &mut Bufs,
        sw: &mut Switched,
    ) -> EResult<StepsEnd> {
        let l = self.g().l;
        let mut done = 0;
        // the part of the next step's source read ahead in the step before (in `b.plain`)
        let mut ahead: Option<ReadAhead> = None;
        loop {
            if hooks.stop_requested() {
                return Ok(StepsEnd::Stopped(done));
            }
            io(self.disk.read(0, &mut b.head), || "reading the LUKS2 metadata".into())?;
            let Some(Planned { from, to, adv, fin }) = plan(&b.head)? else { return Ok(StepsEnd::Handover(done)) };
            hooks.event(&Event::ChunkStart { from, to });
            let t = Instant::now();
            b.meta.copy_from_slice(&adv.metadata);
            // The step after this one, if luksify takes it and no stop is asked for yet:
            // its source is read ahead while the bridge waits for the moment to suspend.
            let next = match fin.is_none() && !hooks.stop_requested() {
                true => plan(&b.meta).ok().flatten().map(|p| (p.from, p.to)),
                false => None,
            };
            let have = ahead.filter(|r| (r.from, r.to) == (from, to)).map_or(0, |r| r.bytes);
            let flip = self.flip_for(sw, from, to);
            let (stats, read) = self.standard_step(xts, b, from, to, have, next, flip, sw)?;
            if !sw.active {
                // (removed while the next step copies; waited for before the run ends)
                self.remove_aside(&[self.names.switch.clone(), self.names.staging.clone()]);
            }
            ahead = read;
            done = l - from;
            if let Some(f) = fin {
                // The all-committed state is durable (a crash here: `luksify resume`
                // writes this, cryptsetup opens it), and nothing maps the areas wiped.
                io(write_final(&mut self.disk, &f), || "writing the final LUKS2 metadata".into())?;
                hooks.event(&Event::ChunkDone { from, to, stats });
                return Ok(StepsEnd::Finished);
            }
            hooks.event(&Event::ChunkDone { from, to, stats });
            self.pace(t, Sectors(to - from).bytes(), hooks);
        }
    }

    /// How step [a, b) flips: by a message while the bridge goes through the switch device
    /// and the step is one of its regions; by the table through the switch device (set up
    /// here, its regions as they must be once the step is committed) for the first such
    /// step with more after it; else by the standard table (which ends the switch's part).
    fn flip_for(&mut self, sw: &mut Switched, a: u64, b: u64) -> Flip {
        let (l, s) = (self.g().l, self.g().s);
        let region = |z: u64| b - a == s && a >= z && (a - z).is_multiple_of(s);
        match sw.z {
            Some(z) if region(z) && sw.active => Flip::Message,
            Some(z) if region(z) && !sw.failed && a > z => match self.enter_switch(z, a) {
                Ok(dev) => {
                    Flip::Table { table: tables::standard_switch_table(l, s, z, self.raw, dev), through_switch: true }
                }
                Err(_) => {
                    // (not an error: the steps swap tables, as without a switch)
                    sw.failed = true;
                    self.remove_switch();
                    Flip::Table { table: tables::standard_table(l, s, &self.spec, self.raw, a), through_switch: false }
                }
            },
            _ => Flip::Table { table: tables::standard_table(l, s, &self.spec, self.raw, a), through_switch: false },
        }
    }

    /// The staging crypt device and the switch device over [z, L) (private, unused by any
    /// table yet), its regions set for the ciphertext from `x` on.
    fn enter_switch(&mut self, z: u64, x: u64) -> EResult<DevRef> {
        let (l, s) = (self.g().l, self.g().s);
        let staging = self.ensure_staging()?;
        let (n, u) = (self.names.switch.clone(), self.names.switch_uuid.clone());
        if kern(self.kernel.lookup(&n))?.is_some() {
            kern(self.kernel.remove(&n))?;
        }
        let dev = kern(self.kernel.create(&n, &u, true))?;
        kern(self.kernel.load(&n, &tables::switch_table(l, s, z, self.raw, staging), &self.key_hex))?;
        kern(self.kernel.resume(&n))?;
        kern(self.kernel.message(&n, &tables::switch_mappings(l, s, z, x)))?;
        Ok(dev)
    }

    /// Remove the switch device, a mirror device left by a killed run, and the staging
    /// device, if they exist (no table maps them: the bridge does not go through the
    /// switch). A failure is reported, not an error: they are private devices, a reboot
    /// removes them.
    fn remove_switch(&mut self) {
        self.settle_aside();
        // (the mirror too: a luksify killed while it removed the cut-over's helpers aside
        // may have left it, and it holds the staging device)
        for n in [self.names.switch.clone(), self.names.mirror.clone(), self.names.staging.clone()] {
            match self.kernel.lookup(&n) {
                Ok(Some(_)) => {
                    let r = self.kernel.remove(&n);
                    undone(&mut self.undo_failed, || format!("removing the private device {n}"), r);
                }
                Ok(None) => {}
                Err(e) => undone(&mut self.undo_failed, || format!("looking up {n}"), Err::<(), _>(e)),
            }
        }
    }

    /// At the end of a run: the bridge through the switch device gets the standard table of
    /// where the ciphertext starts, and the switch goes (unless the bridge is held).
    fn leave_switch(&mut self, sw: &mut Switched) -> EResult<()> {
        if sw.held {
            return Ok(());
        }
        if sw.active {
            let (l, s) = (self.g().l, self.g().s);
            let t = tables::standard_table(l, s, &self.spec, self.raw, sw.x);
            let key = self.cryptsetup_key()?;
            let bridge = self.names.bridge.clone();
            let r = self.swap_table_keyed(&bridge, &t, key.as_ref().map(|k| k.1.as_str()), "bridge");
            self.drop_cryptsetup_key(key);
            r.map_err(|e| {
                EngineError::Kernel(KernelError::new(format!(
                    "{e}: the bridge still maps every sector right, through luksify's private switch device; `luksify resume` gives it the standard table (stock cryptsetup's resume needs that table: reboot, or run `luksify resume`)"
                )))
            })?;
            sw.active = false;
        }
        self.remove_switch();
        Ok(())
    }

    /// `luksify resume` on a live system whose luksify was killed (SIGKILL: no way out ran):
    /// the bridge may still go through the switch device (which stock cryptsetup's online
    /// resume refuses as a mismatching table), or be suspended in a step's window
    /// (`suspended`). Give it the standard table of the state the metadata says (`x`: where
    /// its ciphertext starts), resumed, and remove the switch. Right whatever instant the
    /// kill came at: before a step's commit the bridge still maps its source, untouched since
    /// the suspend; after it the bridge was suspended since before the last comparison, so
    /// source and copy are the same. Whether anything was done. The dm-stats regions the
    /// killed run left on the bridge are deleted too.
    pub fn leave_leftover_switch(&mut self, x: u64, suspended: bool) -> EResult<bool> {
        self.purge_watches();
        let dev = kern(self.kernel.lookup(&self.names.switch))?;
        let through = match dev {
            Some(dev) => kern(self.kernel.table(&self.names.bridge.clone()))?
                .iter()
                .any(|l| l.params.split_whitespace().any(|w| w == dev.to_string())),
            None => false,
        };
        let mut sw = Switched { active: through || suspended, x, ..Switched::default() };
        self.leave_switch(&mut sw)?;
        Ok(dev.is_some() || suspended)
    }

    /// After a commit, with the bridge suspended through the switch: flip the step's region.
    /// If the message fails (it may have flipped the region or not), the standard table of
    /// the committed state is loaded instead (the resume swaps it in); if that fails too,
    /// the bridge must stay suspended: its switch may still map the old source, which the
    /// metadata no longer names.
    fn flip_committed(&mut self, sw: &mut Switched, a: u64) -> EResult<()> {
        let (l, s) = (self.g().l, self.g().s);
        let z = sw.z.expect("a message step has a switch");
        #[cfg(test)]
        let a = match self.standard_mutant == Some(Mutant::WrongRegion) && a >= z + s {
            true => a - s,
            false => a,
        };
        let Err(e) = self.kernel.message(&self.names.switch.clone(), &tables::switch_flip(s, z, a)) else {
            return Ok(());
        };
        let t = tables::standard_table(l, s, &self.spec, self.raw, a);
        let key = self.cryptsetup_key()?;
        let bridge = self.names.bridge.clone();
        let r = self.kernel.load(&bridge, &t, key.as_ref().map_or(self.key_hex.as_str(), |k| &k.1));
        self.drop_cryptsetup_key(key);
        match r {
            Ok(()) => {
                sw.active = false;
                Ok(())
            }
            Err(e2) => {
                sw.held = true;
                Err(EngineError::Kernel(KernelError::new(format!(
                    "the step is committed, but neither its switch region ({e}) nor the bridge's table ({e2}) could be flipped, so {bridge} stays suspended (no write may go where a reboot would not look): reboot; the boot or `luksify resume` continues"
                ))))
            }
        }
    }

    /// Where the plaintext of logical sector `a` (the start of a hotzone) is: in place, or
    /// for the first S sectors in the moved segment at L + S.
    fn standard_source(&self, a: u64) -> u64 {
        let g = self.g();
        if a < g.s {
            g.l + g.s + a
        } else {
            a
        }
    }

    /// One step: the hotzone [a, b) (logical sectors: a >= S, or the moved first S) to S + a,
    /// committed with the metadata in `b.meta` (both copies), mapped by `flip`. The first
    /// `have` bytes of its source are in `bf.plain` already (read ahead). With `next` (the
    /// step after it, its source and length), as much of the next step's source is read
    /// ahead as the wait for the moment to suspend leaves time for: returned with the stats,
    /// that source then in `bf.plain`.
    #[allow(clippy::too_many_arguments)]
    fn standard_step(
        &mut self,
        xts: &crate::core::xts::Xts,
        bf: &mut Bufs,
        a: u64,
        b: u64,
        have: usize,
        next: Option<(u64, u64)>,
        flip: Flip,
        sw: &mut Switched,
    ) -> EResult<(ChunkStats, Option<ReadAhead>)> {
        let s = self.g().s;
        let src = self.standard_source(a);
        let len = Sectors(b - a).byte_len();
        let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
        let mut stats = ChunkStats::default();
        #[cfg(test)]
        let late = self.standard_mutant == Some(Mutant::LateWatch);
        #[cfg(not(test))]
        let late = false;
        // 1. Copy, live: the source (the rest of it not read ahead), the destination S
        // further on (no table maps it). Its dm-stats region first, unless one was created
        // before the read ahead began (after a read ahead without one, none is of use).
        let t0 = Instant::now();
        if have == 0 && !late {
            self.watch(bf, a, b);
        }
        read_pieces(&mut self.disk, src + Sectors::in_len(have).0, &mut bf.plain[have..len])
            .map_err(|e| fail(a, format!("reading the source: {e}")))?;
        if late {
            self.unwatch(bf, None);
            self.watch(bf, a, b);
        }
        xts.encrypt_into(&bf.plain[..len], &mut bf.cipher[..len], a);
        write_pieces(&mut self.disk, a + s, &bf.cipher[..len])
            .map_err(|e| fail(a, format!("writing the copy: {e}")))?;
        #[cfg(test)]
        let flush = self.standard_mutant != Some(Mutant::UnflushedCopy);
        #[cfg(not(test))]
        let flush = true;
        if flush {
            self.disk.flush().map_err(|e| fail(a, format!("flushing the copy: {e}")))?;
        }
        stats.copy = t0.elapsed();
        let t1 = Instant::now();
        self.read_back(bf, a, b, a, b)?;
        stats.verify = t1.elapsed();
        // 2. A new table, loaded inactive (with the key through the keyring, as cryptsetup
        // open maps it); a step through the switch device loads nothing. Then the suspended
        // window.
        let bridge = self.names.bridge.clone();
        let through_switch = match &flip {
            Flip::Table { table, through_switch } => {
                let key = self.cryptsetup_key()?;
                let loaded =
                    kern(self.kernel.load(&bridge, table, key.as_ref().map_or(self.key_hex.as_str(), |k| &k.1)));
                self.drop_cryptsetup_key(key);
                loaded?;
                *through_switch
            }
            Flip::Message => true,
        };
        let by_message = matches!(flip, Flip::Message);
        // (a source read ahead is read again under the suspend like any other: a live write
        // may have changed it since)
        let next_src = next.map(|(na, nb)| (self.standard_source(na), Sectors(nb - na).byte_len()));
        if let Some((na, nb)) = next.filter(|_| !late) {
            self.watch(bf, na, nb);
        }
        let mut got = 0;
        let nbuf = &mut bf.next;
        let sp = self.suspend_on_tick(&bridge, &mut |disk| {
            let Some((nsrc, nlen)) = next_src.filter(|&(_, nlen)| got < nlen) else { return false };
            let n = AHEAD_PIECE.min(nlen - got);
            // (a failed read is not reported here: the step reads the rest itself)
            let ok = disk.read(nsrc + Sectors::in_len(got).0, &mut nbuf[got..got + n]).is_ok();
            got += if ok { n } else { 0 };
            ok
        });
        if sp.is_err() && !by_message {
            let r = self.kernel.clear_inactive(&bridge);
            undone(&mut self.undo_failed, || format!("clearing the inactive table of {bridge}"), r);
        }
        let sp = sp?;
        sw.held = true;
        let (w, t_suspended) = (sp.called, sp.returned);
        (stats.tick_wait, stats.read_ahead) = (sp.slept, sp.filled);
        #[cfg(test)]
        let trust = have > 0 && self.standard_mutant == Some(Mutant::TrustReadAhead);
        #[cfg(not(test))]
        let trust = false;
        let quiet = !trust && self.watched_quiet(bf, a, b);
        let refreshed = if trust || quiet { Ok(0) } else { self.refresh_standard(xts, bf, a, b) };
        let changed = match refreshed {
            Ok(c) => c,
            Err(e) => {
                // nothing committed: back to the table (or switch regions) that maps the source
                let r = match by_message {
                    true => self.kernel.resume(&bridge),
                    false => self.kernel.clear_inactive(&bridge).and_then(|()| self.kernel.resume(&bridge)),
                };
                sw.held = r.is_err();
                undone(&mut self.undo_failed, || format!("resuming {bridge} on its old table"), r);
                return Err(e);
            }
        };
        stats.rechecked = changed;
        stats.compare_skipped = quiet;
        let t_refreshed = Instant::now();
        #[cfg(test)]
        if self.standard_mutant == Some(Mutant::FlipBeforeCommit) {
            if by_message {
                self.flip_committed(sw, a)?;
            }
            kern(self.kernel.resume(&bridge))?;
            sw.held = false;
            self.commit_metadata(bf).map_err(|e| EngineError::Io { what: "committing".into(), source: e })?;
            (sw.active, sw.x) = (sw.active && through_switch, a);
            return Ok((stats, None));
        }
        if let Err(e) = self.commit_metadata(bf) {
            return Err(self.after_failed_commit(bf, &bridge, e, by_message, through_switch, sw, a));
        }
        let t_committed = Instant::now();
        // the committed state, mapped: the table loaded (swapped in by the resume), or the
        // step's region flipped
        if by_message {
            self.flip_committed(sw, a)?;
        } else {
            sw.active = through_switch;
        }
        sw.x = a;
        kern(self.kernel.resume(&bridge).map_err(|e| e.context("resuming the bridge after the commit")))?;
        sw.held = false;
        let t_end = Instant::now();
        stats.note_window(
            t_end - w,
            [t_suspended - w, t_refreshed - t_suspended, t_committed - t_refreshed, t_end - t_committed],
        );
        // (this step's source and its region are not needed any more)
        self.unwatch(bf, next);
        let read = next.filter(|_| got > 0).map(|(from, to)| {
            std::mem::swap(&mut bf.plain, &mut bf.next);
            ReadAhead { from, to, bytes: got }
        });
        Ok((stats, read))
    }

    /// Watch hotzone [a, b), unless it is watched: the counters of its areas in a dm-stats
    /// region on the bridge that covers it (created if none does: [`dmstats::batch_region`]),
    /// printed now, before the first read of its source. Nothing if a message fails: that
    /// step's comparison runs.
    fn watch(&mut self, bf: &mut Bufs, a: u64, b: u64) {
        if bf.watches.iter().any(|w| (w.from, w.to) == (a, b)) || bf.watches.len() == bf.watches.capacity() {
            return;
        }
        let bridge = self.names.bridge.clone();
        let r = match bf.regions.iter().find(|r| r.covers((a, b))) {
            Some(r) => *r,
            None if bf.regions.len() < bf.regions.capacity() => {
                let (from, to, area) = dmstats::batch_region(a, b, self.g().s);
                let msg = dmstats::create_region_msg(from, to, area);
                let Some(id) = self.kernel.message(&bridge, &msg).ok().and_then(|r| dmstats::parse_created(&r)) else {
                    return;
                };
                let r = Region { from, to, area, id };
                bf.regions.push(r);
                r
            }
            None => return,
        };
        let (first, n) = dmstats::lines_of(r.from, r.area, a, b);
        #[cfg(test)]
        let first = match self.standard_mutant == Some(Mutant::WrongLines) {
            true if first >= n => first - n,
            true => first + n,
            false => first,
        };
        let mut before = Vec::with_capacity(n as usize);
        if let Ok(reply) = self.kernel.message(&bridge, &dmstats::print_lines_msg(r.id, first, n)) {
            if dmstats::area_writes(&reply, &mut before) {
                bf.watches.push(Watch { from: a, to: b, id: r.id, first, n, before });
            }
        }
    }

    /// Under the suspend: whether hotzone [a, b) counted no write since it was watched (so
    /// its source is what was read, and the last comparison would find nothing); else the
    /// ranges to compare again are in `bf.areas` ([`to_compare`]).
    fn watched_quiet(&mut self, bf: &mut Bufs, a: u64, b: u64) -> bool {
        let Some(w) = bf.watches.iter().find(|w| (w.from, w.to) == (a, b)) else {
            return to_compare(None, &[], a, b, &mut bf.areas, false);
        };
        #[cfg(test)]
        if self.standard_mutant == Some(Mutant::IgnoreWatchCount) {
            return true;
        }
        #[cfg(test)]
        let one_less = self.standard_mutant == Some(Mutant::OneAreaLess);
        #[cfg(not(test))]
        let one_less = false;
        let bridge = self.names.bridge.clone();
        let reply = self.kernel.message(&bridge, &dmstats::print_lines_msg(w.id, w.first, w.n)).ok();
        to_compare(reply.as_deref(), &w.before, a, b, &mut bf.areas, one_less)
    }

    /// Forget the hotzones watched but `keep`, and delete the regions that do not cover it.
    /// A failure is left: the next run's [`Engine::purge_watches`] (or the bridge's removal)
    /// takes it.
    fn unwatch(&mut self, bf: &mut Bufs, keep: Option<(u64, u64)>) {
        bf.watches.retain(|w| Some((w.from, w.to)) == keep);
        let bridge = self.names.bridge.clone();
        let mut i = 0;
        while i < bf.regions.len() {
            let r = bf.regions[i];
            if keep.is_some_and(|k| r.covers(k)) {
                i += 1;
                continue;
            }
            let _ = self.kernel.message(&bridge, &dmstats::delete_msg(r.id));
            bf.regions.remove(i);
        }
    }

    /// Delete luksify's regions on the bridge (left by a luksify that was killed).
    fn purge_watches(&mut self) {
        let bridge = self.names.bridge.clone();
        if let Ok(r) = self.kernel.message(&bridge, &dmstats::list_msg()) {
            for id in dmstats::parse_list(&r) {
                let _ = self.kernel.message(&bridge, &dmstats::delete_msg(id));
            }
        }
    }

    /// Read [ra, rb) of step [a, b) back from the destination: what `cipher` says was written.
    fn read_back(&mut self, bf: &mut Bufs, a: u64, b: u64, ra: u64, rb: u64) -> EResult<()> {
        let s = self.g().s;
        let (o0, o1) = (Sectors(ra - a).byte_len(), Sectors(rb - a).byte_len());
        read_pieces(&mut self.disk, ra + s, &mut bf.scratch[o0..o1]).map_err(|e| EngineError::CopyFailed {
            from: a,
            to: b,
            sector: ra,
            why: format!("reading the copy back: {e}"),
        })?;
        if let Some(i) = (0..(o1 - o0) / SECTOR_BYTES).find(|i| {
            let r = o0 + i * SECTOR_BYTES..o0 + (i + 1) * SECTOR_BYTES;
            bf.scratch[r.clone()] != bf.cipher[r]
        }) {
            return Err(EngineError::CopyFailed {
                from: a,
                to: b,
                sector: ra + i as u64,
                why: "the disk returned other data than was written".into(),
            });
        }
        Ok(())
    }

    /// With the bridge suspended: the source once more against what was copied, in the
    /// ranges `bf.areas` holds ([`Engine::watched_quiet`]); every run of sectors a live write
    /// changed is encrypted and written again, then flushed and read back. Returns how many
    /// sectors changed.
    fn refresh_standard(&mut self, xts: &crate::core::xts::Xts, bf: &mut Bufs, a: u64, b: u64) -> EResult<u64> {
        let src = self.standard_source(a);
        let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
        let mut runs = std::mem::take(&mut bf.runs);
        runs.clear();
        let ranges = std::mem::take(&mut bf.areas);
        let mut changed = 0u64;
        let r = (|| {
            for &(ra, rb) in &ranges {
                changed += self.refresh_range(xts, bf, a, b, src, ra, rb, &mut runs)?;
            }
            if changed > 0 {
                self.disk.flush().map_err(|e| fail(a, format!("flushing the copy: {e}")))?;
                for &(ra, rb) in &runs {
                    self.read_back(bf, a, b, ra, rb)?;
                }
            }
            Ok(changed)
        })();
        bf.runs = runs;
        bf.areas = ranges;
        r
    }

    /// [`Engine::refresh_standard`] for sectors [ra, rb) of step [a, b) (source at `src`):
    /// read again, each run that differs from `bf.plain` encrypted and written again (not
    /// flushed), noted in `runs`. Returns how many sectors changed.
    #[allow(clippy::too_many_arguments)]
    fn refresh_range(
        &mut self,
        xts: &crate::core::xts::Xts,
        bf: &mut Bufs,
        a: u64,
        b: u64,
        src: u64,
        ra: u64,
        rb: u64,
        runs: &mut Vec<(u64, u64)>,
    ) -> EResult<u64> {
        let s = self.g().s;
        let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
        let (o0, o1) = (Sectors(ra - a).byte_len(), Sectors(rb - a).byte_len());
        self.disk
            .read(src + (ra - a), &mut bf.scratch[o0..o1])
            .map_err(|e| fail(ra, format!("reading the source: {e}")))?;
        let sectors = o1 / SECTOR_BYTES;
        let same = |bf: &Bufs, i: usize| bf.scratch[sector(i)] == bf.plain[sector(i)];
        let (mut i, mut changed) = (o0 / SECTOR_BYTES, 0u64);
        while i < sectors {
            if same(bf, i) {
                i += 1;
                continue;
            }
            let j = i;
            while i < sectors && !same(bf, i) {
                i += 1;
            }
            let (o0, o1) = (j * SECTOR_BYTES, i * SECTOR_BYTES);
            bf.plain[o0..o1].copy_from_slice(&bf.scratch[o0..o1]);
            xts.encrypt_into(&bf.scratch[o0..o1], &mut bf.cipher[o0..o1], a + j as u64);
            let ra = a + j as u64;
            self.disk.write(ra + s, &bf.cipher[o0..o1]).map_err(|e| fail(ra, format!("writing the copy: {e}")))?;
            changed += (i - j) as u64;
            let rb = a + i as u64;
            let full = runs.len() == runs.capacity();
            match runs.last_mut() {
                // out of room (nothing is allocated while suspended): widen the last run
                Some(last) if full => *last = (last.0.min(ra), last.1.max(rb)),
                _ => runs.push((ra, rb)),
            }
        }
        Ok(changed)
    }

    /// Both metadata copies of `bf.meta`, each flushed: the primary first.
    fn commit_metadata(&mut self, bf: &Bufs) -> std::io::Result<()> {
        let half = bf.meta.len() / 2;
        self.disk.write(0, &bf.meta[..half])?;
        #[cfg(test)]
        if self.standard_mutant == Some(Mutant::OneFlushForBothCopies) {
            self.disk.write(Sectors::in_len(half).0, &bf.meta[half..])?;
            return self.disk.flush();
        }
        self.disk.flush()?;
        self.disk.write(Sectors::in_len(half).0, &bf.meta[half..])?;
        self.disk.flush()
    }

    /// The commit failed: which state does the metadata on the disk say? The new one: map it
    /// (the table loaded, or the step's switch region flipped) and resume. The old one: drop
    /// the new table (a switch region is not flipped yet) and resume on the old. Unknown (the
    /// metadata cannot be read): stay suspended (see the module's doc).
    #[allow(clippy::too_many_arguments)]
    fn after_failed_commit(
        &mut self,
        bf: &mut Bufs,
        bridge: &str,
        e: std::io::Error,
        by_message: bool,
        through_switch: bool,
        sw: &mut Switched,
        a: u64,
    ) -> EngineError {
        let new_seqid = luks2meta::parse(&bf.meta).ok().flatten().map(|m| m.seqid);
        let on_disk = self.disk.read(0, &mut bf.head).ok().and_then(|()| luks2meta::parse(&bf.head).ok().flatten());
        let what = format!("committing the LUKS2 metadata: {e}");
        match (on_disk.map(|m| m.seqid), new_seqid) {
            (Some(d), Some(n)) if d == n => {
                let flipped = match by_message {
                    true => self.flip_committed(sw, a),
                    false => {
                        sw.active = through_switch;
                        Ok(())
                    }
                };
                if let Err(f) = flipped {
                    return f;
                }
                sw.x = a;
                let r = self.kernel.resume(bridge);
                sw.held = r.is_err();
                undone(&mut self.undo_failed, || format!("resuming {bridge} on the committed table"), r);
                EngineError::Io { what: format!("{what} (the step is committed all the same)"), source: e }
            }
            (Some(_), Some(_)) => {
                let r = match by_message {
                    true => self.kernel.resume(bridge),
                    false => self.kernel.clear_inactive(bridge).and_then(|()| self.kernel.resume(bridge)),
                };
                sw.held = r.is_err();
                undone(&mut self.undo_failed, || format!("resuming {bridge} on its old table"), r);
                EngineError::Io { what: format!("{what} (the step is not committed; nothing is lost)"), source: e }
            }
            _ => EngineError::Io {
                what: format!(
                    "{what}; the metadata on the disk cannot be read back, so {bridge} stays suspended (no write may go where a reboot would not look): reboot; the boot or `luksify resume` continues from whichever state the disk holds"
                ),
                source: e,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk in memory that records each request: (write?, sector, bytes).
    struct MemDisk {
        data: Vec<u8>,
        ops: Vec<(bool, u64, usize)>,
    }

    impl Disk for MemDisk {
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.ops.push((false, sector, buf.len()));
            let o = sector as usize * SECTOR_BYTES;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn write(&mut self, sector: u64, buf: &[u8]) -> std::io::Result<()> {
            self.ops.push((true, sector, buf.len()));
            let o = sector as usize * SECTOR_BYTES;
            self.data[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_live_copy_goes_to_the_disk_in_pieces_and_arrives_whole() {
        let len = 2 * LIVE_PIECE + 3 * SECTOR_BYTES;
        let mut d = MemDisk { data: vec![0; len + 64 * SECTOR_BYTES], ops: Vec::new() };
        let src: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        write_pieces(&mut d, 7, &src).unwrap();
        let p = Sectors::in_len(LIVE_PIECE).0;
        assert_eq!(d.ops, [(true, 7, LIVE_PIECE), (true, 7 + p, LIVE_PIECE), (true, 7 + 2 * p, 3 * SECTOR_BYTES)]);
        d.ops.clear();
        let mut back = vec![0; len];
        read_pieces(&mut d, 7, &mut back).unwrap();
        assert_eq!(d.ops, [(false, 7, LIVE_PIECE), (false, 7 + p, LIVE_PIECE), (false, 7 + 2 * p, 3 * SECTOR_BYTES)]);
        assert!(back == src);
        assert!(d.data[..7 * SECTOR_BYTES].iter().all(|&b| b == 0));
    }
}
