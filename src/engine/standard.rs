//! LUKS2 conversions in cryptsetup's standard format (DESIGN.md, "The standard format
//! mid-way"; journal-format.md, "LUKS2").
//!
//! Nothing is written to the device before the cut-over but the moved segment's early copy
//! (past the PV, where nothing looks): the bridge goes in under the LVs exactly as for
//! LUKS1, its records live in memory only. The cut-over, with the bridge suspended, runs
//! [`CUT_OVER_ORDER`]: the first S plaintext sectors copied to the moved segment
//! [L+S, L+2S) (or the copy made live just before the suspend: as it is if a dm-stats
//! region over them counted no write since before it read them, else brought up to date,
//! the runs of sectors that changed copied again) and luksify's
//! cut-over record (`core::cutover`: where they are, and their SHA-256) written to the
//! device's last 4 KiB, flushed, read back; the LVM label removed (its sector zeroed, one
//! sector: never torn), flushed, so that no PV with a half-overwritten metadata area is
//! ever visible; the LUKS2 header of an encryption in progress over
//! [4 KiB, H), flushed, then its first 4 KiB, flushed; the bridge resumed with the table
//! `cryptsetup open` builds for that header; [H, S) zeroed, flushed; the record erased.
//! A crash anywhere leaves either the plain PV, or the record and an intact copy (which
//! [`recover_cut_over`] puts back: `luksify resume`), or a complete LUKS2 reencryption: from
//! then on the device is what `cryptsetup reencrypt --encrypt --reduce-device-size 2S` would
//! have made of it, and the data phase follows (the caller's job: luksify's own steps,
//! `standard_steps.rs`, or libcryptsetup's online reencryption). At the end the mapping
//! becomes what `cryptsetup open` maps for the final header ([`Engine::finish_standard`]). The simulator sweeps every crash point of this
//! order under every cache policy (`sim/cutover_tests.rs`), and fails on wrong orders.

use super::*;
use crate::core::cutover::{self, CutRecord, Decision, Finding};
use crate::core::{dmstats, luks2meta};

/// What the cut-over did, for the progress output and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutOver {
    /// How long the bridge was suspended (live I/O waited this long, once).
    pub stall: Duration,
}

impl<D: Disk, K: Kernel> Engine<D, K> {
    /// A LUKS2 conversion about to start: like [`Engine::prepare`], but nothing is written
    /// to the device (no journal, no header copy): until the cut-over the device is the
    /// plain PV, and a crash finds it so.
    pub fn prepare_standard(disk: D, kernel: K, c: NewConversion) -> EResult<Self> {
        let rec = Record {
            seq: 1,
            state: State::Prepared,
            geometry: c.geometry,
            luks_version: c.luks_version,
            luks_uuid: c.luks_uuid.to_string(),
            cipher: c.cipher.to_string(),
            key_bytes: c.key.len() as u32,
            allow_discards: c.allow_discards,
            name: c.name.to_string(),
            pv_uuid: c.pv_uuid.to_string(),
            header_len: c.header.len() as u32,
            header_crc: crc32fast::hash(&c.header),
        };
        let g = c.geometry;
        if g.l < g.s || cutover::record_sector(g.n).is_none_or(|r| r < g.l + 2 * g.s) {
            return Err(EngineError::Refused(format!(
                "a LUKS2 conversion needs L >= S, and 2S sectors and luksify's 4 KiB cut-over record past the PV (L {} S {} device {})",
                g.l, g.s, g.n
            )));
        }
        if c.header.len() < 4096 || c.header.len() as u64 > Sectors(g.s).bytes() || !c.header.len().is_multiple_of(4096)
        {
            return Err(EngineError::Refused(format!(
                "the LUKS2 header is {} bytes; it must fit the data offset",
                c.header.len()
            )));
        }
        let mut e = Self::with_record(disk, kernel, c.raw, rec, c.key, c.header)?;
        e.persist = false;
        Ok(e)
    }

    /// Insert the bridge (if not yet), then cut over. A failure or a stop request before
    /// the header is written puts every LV back onto the raw device and removes the bridge:
    /// the device is as it was.
    /// On error, also whether the LUKS2 header may be on the device (false: nothing changed).
    pub fn bridge_and_cut_over(&mut self, hooks: &mut dyn Hooks) -> Result<CutOver, (EngineError, bool)> {
        let r = self.bridge_and_cut_over_inner(hooks);
        self.report_undo_failures(hooks);
        r
    }

    fn bridge_and_cut_over_inner(&mut self, hooks: &mut dyn Hooks) -> Result<CutOver, (EngineError, bool)> {
        if self.rec.state == State::Prepared {
            self.insert_bridge().map_err(|e| (e, false))?;
            hooks.event(&Event::Committed(self.rec.state));
        }
        if hooks.stop_requested() {
            self.unbridge().map_err(|e| (e, false))?;
            return Err((
                EngineError::Refused(
                    "stopped on request before the cut-over: nothing was changed (the device is the plain PV it was)"
                        .into(),
                ),
                false,
            ));
        }
        match self.cut_over() {
            Ok(c) => {
                hooks.event(&Event::CutOver { stall: c.stall });
                Ok(c)
            }
            Err((e, true)) => Err((e, true)),
            Err((e, false)) => {
                let r = self.unbridge();
                undone(&mut self.undo_failed, || "putting the LVs back onto the raw device".to_string(), r);
                Err((e, false))
            }
        }
    }

    /// Every LV back onto the raw device, the bridge and the helpers removed.
    fn unbridge(&mut self) -> EResult<()> {
        let Some(bridge) = kern(self.kernel.lookup(&self.names.bridge))? else { return Ok(()) };
        let holders = kern(self.kernel.holders_of(bridge, &[]))?;
        self.reroute_between(holders, bridge, self.raw)?;
        kern(self.kernel.remove(&self.names.bridge.clone()))?;
        self.remove_helpers()
    }

    /// The bridge's table for the state right after the cut-over: what `cryptsetup open`
    /// builds for the header's segments (linear moved segment, linear rest in place).
    pub fn cut_over_table(&self) -> Vec<Line> {
        let g = self.g();
        tables::standard_table(g.l, g.s, &self.spec, self.raw, g.l)
    }

    /// Bridged → a LUKS2 reencryption in progress, in the order [`Engine::cut_order`] gives
    /// ([`CUT_OVER_ORDER`]). On error, whether the header may be on the device (then the
    /// bridge stays: the device is a standard reencryption or, if the plaintext could not be
    /// put back, the cut-over record says where it is and `luksify resume` rolls back).
    fn cut_over(&mut self) -> Result<CutOver, (EngineError, bool)> {
        let g = *self.g();
        let (s, l, n) = (g.s, g.l, g.n);
        let before = |e| (e, false);
        let rec_at = cutover::record_sector(n).filter(|&r| r >= l + 2 * s).ok_or_else(|| {
            before(EngineError::Refused(format!(
                "a LUKS2 conversion needs 2S sectors and luksify's 4 KiB cut-over record past the PV (L {l} S {s} device {n})"
            )))
        })?;
        let bridge = self.names.bridge.clone();
        let table = self.cut_over_table();
        // Everything the suspended window needs is allocated (and, under mlockall, faulted
        // in) before the suspend.
        let buf = |n: usize| io(IoBuf::new(n), || "allocating the cut-over buffers".into());
        let mut plain = buf(Sectors(s).byte_len()).map_err(before)?;
        let mut back = buf(Sectors(s).byte_len()).map_err(before)?;
        let mut hdr = buf(self.header.len()).map_err(before)?;
        let mut rec_buf = buf(cutover::RECORD_BYTES).map_err(before)?;
        let zero4k = buf(cutover::RECORD_BYTES).map_err(before)?;
        let mut areas = Vec::with_capacity(dmstats::MAX_AREAS);
        hdr.copy_from_slice(&self.header);
        // Live, before the suspend: the first S sectors copied to the moved segment (past
        // the PV: nothing maps it yet), flushed and read back, under a dm-stats region over
        // [0, S) on the bridge created before the read (`core::dmstats`). If under the
        // suspend the region counted no write, that copy is the source as it stands and the
        // window only writes the record and the header; otherwise (or without a region) the
        // window reads and copies the first S itself.
        let watch = self.precopy_first_s(&mut plain, &mut back, l, s);
        // The record's checksum of that copy, computed live (SHA-256 of S: ~12 ms at 16 MiB
        // in the test bed), its state kept at every dm-stats area: under the suspend only
        // what follows the first sector a live write changed is hashed again.
        let early = watch.map(|_| cutover::EarlySum::of(&plain, Sectors(dmstats::area_sectors(s)).byte_len()));
        kern(self.kernel.load(&bridge, &table, &self.key_hex)).map_err(|e| {
            self.unwatch_first_s(watch);
            before(e)
        })?;
        // (the window is timed from the suspend's call: the I/O it holds waits from then)
        let t0 = match self.suspend_observed(&bridge) {
            Ok(called) => called,
            Err(e) => {
                self.unwatch_first_s(watch);
                let r = self.kernel.clear_inactive(&bridge);
                undone(&mut self.undo_failed, || format!("clearing the inactive table of {bridge}"), r);
                return Err((EngineError::Kernel(e.context("suspending the bridge for the cut-over")), false));
            }
        };
        // (a write counted: the early copy is brought up to date, the sectors that changed
        // copied again, flushed and read back; if that fails, the window copies it all)
        let (copied, first_changed) = match watch {
            None => (false, Some(0)),
            Some(id) if self.first_s_quiet(id, s, &mut areas) => (true, None),
            Some(_) => self.refresh_first_s(&mut plain, &mut back, l, &areas).map_or((false, Some(0)), |c| (true, c)),
        };
        // Else the first S sectors, read once with the bridge suspended (no write can change
        // them any more): the moved segment's content and the record's checksum.
        if !copied {
            if let Err(e) = self.disk.read(0, &mut plain) {
                self.resume_old(&bridge);
                return Err((EngineError::Io { what: format!("reading sectors 0..{s}"), source: e }, false));
            }
        }
        #[cfg(test)]
        let early_anyway = self.standard_mutant == Some(standard_steps::Mutant::EarlyChecksum);
        #[cfg(not(test))]
        let early_anyway = false;
        let record = CutRecord {
            n,
            l,
            s,
            header_len: self.header.len() as u64,
            moved_sha256: match &early {
                Some(e) if copied => {
                    let first = first_changed.filter(|_| !early_anyway).map_or(plain.len(), |x| Sectors(x).byte_len());
                    e.finish(&plain, first)
                }
                _ => cutover::sha256(&plain),
            },
            pv_uuid: self.rec.pv_uuid.clone(),
        };
        record.encode_into(&mut rec_buf);
        let h = self.header.len();
        // What has happened so far, for the error paths.
        let (mut record_written, mut touched, mut header_pending, mut header_durable, mut resumed) =
            (false, false, false, false, false);
        let mut stall = Duration::ZERO;
        for &step in self.cut_order {
            let r: EResult<()> = match step {
                // (copied, flushed and read back before the suspend)
                CutStep::Moved | CutStep::ReadBack if copied => Ok(()),
                CutStep::Moved => io(self.disk.write(l + s, &plain), || format!("copying sectors 0..{s} to {}", l + s)),
                CutStep::Record => {
                    record_written = true;
                    io(self.disk.write(rec_at, &rec_buf), || "writing the cut-over record".into())
                }
                CutStep::Flush => {
                    let r = io(self.disk.flush(), || "flushing the device during the cut-over".into());
                    if r.is_ok() && header_pending {
                        header_durable = true;
                    }
                    r
                }
                CutStep::ReadBack => io(self.disk.read(l + s, &mut back), || format!("reading back sector {}", l + s))
                    .and_then(|()| match back[..] == plain[..] {
                        true => Ok(()),
                        false => Err(EngineError::Io {
                            what: format!("copying sectors 0..{s} to {}", l + s),
                            source: std::io::Error::other(
                                "the moved segment reads back different from what was written",
                            ),
                        }),
                    }),
                CutStep::Fence => {
                    // The label's sector(s) only, one sector each (never torn): a torn
                    // 4 KiB write could zero the sectors around a label that stays, and a
                    // label on the disk says nothing of [0, S) was overwritten. (No label
                    // found: the whole first 4 KiB, as the label's place is unknown.)
                    touched = true;
                    let labels = cutover::label_sectors(&plain[..4096]);
                    let r = match labels.is_empty() {
                        true => self.disk.write(0, &zero4k),
                        false => labels.iter().try_for_each(|&i| self.disk.write(i as u64, &zero4k[..512])),
                    };
                    io(r, || "removing the LVM label".into())
                }
                CutStep::HeaderRest => {
                    touched = true;
                    io(self.disk.write(8, &hdr[4096..]), || "writing the LUKS2 header".into())
                }
                CutStep::HeaderFirst => {
                    touched = true;
                    header_pending = true;
                    io(self.disk.write(0, &hdr[..4096]), || "writing the LUKS2 header's first 4 KiB".into())
                }
                CutStep::Resume => {
                    let r = kern(self.kernel.resume(&bridge));
                    if r.is_ok() {
                        resumed = true;
                        stall = t0.elapsed();
                    }
                    r
                }
                CutStep::WipeRest => {
                    io(self.disk.write_zeros(h as u64, Sectors(s).bytes() - h as u64, &mut self.verify_src), || {
                        "zeroing the rest of the header area".into()
                    })
                }
                CutStep::EraseRecord => io(self.disk.write(rec_at, &zero4k), || "erasing the cut-over record".into()),
            };
            let Err(e) = r else { continue };
            if header_durable || resumed {
                return Err((e, true));
            }
            if !touched {
                // [0, S) is as it was: a record left behind the LVM label is stale and
                // harmless (a resume erases it); try to erase it now anyway.
                if record_written {
                    let _ = self.disk.write(rec_at, &zero4k).and_then(|()| self.disk.flush());
                }
                self.resume_old(&bridge);
                return Err((e, false));
            }
            // [0, S) may hold part of the header: put the plaintext back (the rollback's own
            // order) before the old table maps it again.
            return match roll_back(&mut self.disk, &plain, &mut back, rec_at, &zero4k) {
                Ok(()) => {
                    self.resume_old(&bridge);
                    let e = match e {
                        EngineError::Io { what, source } => {
                            EngineError::Io { what: format!("{what} (the plaintext is back in place)"), source }
                        }
                        e => e,
                    };
                    Err((e, false))
                }
                Err(e2) => {
                    // The failed writes may not have landed at all (a write error before the
                    // disk took anything): then [0, S) is the plaintext and the old table is
                    // right (a record left behind the label is stale).
                    if self.disk.read(0, &mut back).is_ok() && back[..] == plain[..] {
                        let _ = self.disk.write(rec_at, &zero4k).and_then(|()| self.disk.flush());
                        self.resume_old(&bridge);
                        return Err((e, false));
                    }
                    // Neither: map the moved copy (the new table) and say what the disk holds.
                    let r = self.kernel.resume(&bridge);
                    undone(&mut self.undo_failed, || format!("resuming {bridge}"), r);
                    Err((
                        EngineError::Io {
                            what: format!(
                                "the cut-over failed ({e}) and putting sectors 0..{s} back failed too; the device's first {s} sectors are intact at sector {} (the bridge maps them from there, so the system keeps running on them) and luksify's cut-over record says so: once the device accepts writes, `luksify resume` puts them back if nothing has written to them since (it checks); otherwise copy sectors {}..{} to sector 0 by hand",
                                l + s,
                                l + s,
                                l + 2 * s
                            ),
                            source: e2,
                        },
                        true,
                    ))
                }
            };
        }
        if !resumed {
            kern(self.kernel.resume(&bridge)).map_err(|e| (e, true))?;
            stall = t0.elapsed();
        }
        // The helpers go while the first step copies; luksify's own steps keep the staging
        // device for their switch device (`standard_steps`), which removes it at its end.
        let keep_staging = self.xts.is_some() && tables::switch_start(l, s).is_some();
        let mut helpers = vec![self.names.switch.clone(), self.names.mirror.clone()];
        if !keep_staging {
            helpers.push(self.names.staging.clone());
        }
        self.remove_aside(&helpers);
        Ok(CutOver { stall })
    }

    /// The cut-over's copy of the first S before the suspend (see [`Engine::cut_over`]): a
    /// dm-stats region over [0, S) on the bridge, then the first S read into `plain`,
    /// written to the moved segment at L + S, flushed, read back into `back` and compared.
    /// The region's id if all of it went well (else none, and the region is gone).
    fn precopy_first_s(&mut self, plain: &mut [u8], back: &mut [u8], l: u64, s: u64) -> Option<u64> {
        #[cfg(test)]
        if self.no_precopy {
            return None;
        }
        let bridge = self.names.bridge.clone();
        let id =
            self.kernel.message(&bridge, &dmstats::create_msg(0, s)).ok().and_then(|r| dmstats::parse_created(&r))?;
        // (in pieces, flushed every few, as the steps copy: the running system's fsync waits
        // behind one short flush, not behind the whole copy)
        let ok = standard_steps::read_pieces(&mut self.disk, 0, plain).is_ok()
            && standard_steps::write_pieces(&mut self.disk, l + s, plain).is_ok()
            && self.disk.flush().is_ok()
            && standard_steps::read_pieces(&mut self.disk, l + s, back).is_ok()
            && back[..] == plain[..];
        if !ok {
            self.unwatch_first_s(Some(id));
            return None;
        }
        Some(id)
    }

    /// Under the cut-over's suspend: whether region `id` over [0, S) counted no write since
    /// before the copy read the first S (then the moved segment holds them as they are);
    /// else the ranges to read again are in `areas` ([`standard_steps::to_compare`]). The
    /// region is deleted either way.
    fn first_s_quiet(&mut self, id: u64, s: u64, areas: &mut Vec<(u64, u64)>) -> bool {
        let bridge = self.names.bridge.clone();
        let reply = self.kernel.message(&bridge, &dmstats::print_msg(id)).ok();
        self.unwatch_first_s(Some(id));
        #[cfg(test)]
        if self.standard_mutant == Some(standard_steps::Mutant::TrustPrecopy) {
            return true;
        }
        #[cfg(test)]
        let one_less = self.standard_mutant == Some(standard_steps::Mutant::OneAreaLess);
        #[cfg(not(test))]
        let one_less = false;
        standard_steps::to_compare(reply.as_deref(), &[], 0, s, areas, one_less)
    }

    /// Under the cut-over's suspend, after a write reached the first S since the early copy
    /// read them: read the sectors in `ranges` (where the region counted writes, or all of
    /// the first S if it did not say) again into `back`, and copy every run of sectors that
    /// differs from `plain` (updated) to the moved segment; then those ranges of it flushed,
    /// read back and compared. The first sector that had changed, if any.
    fn refresh_first_s(
        &mut self,
        plain: &mut [u8],
        back: &mut [u8],
        l: u64,
        ranges: &[(u64, u64)],
    ) -> std::io::Result<Option<u64>> {
        #[cfg(test)]
        if self.standard_mutant == Some(standard_steps::Mutant::TrustPrecopy) {
            return Ok(None);
        }
        let s = self.g().s;
        let differs = |plain: &[u8], back: &[u8], i: usize| plain[sector(i)] != back[sector(i)];
        let mut first: Option<u64> = None;
        for &(ra, rb) in ranges {
            let (i0, n) = (ra as usize, rb as usize);
            self.disk.read(ra, &mut back[sector(i0).start..sector(n - 1).end])?;
            let mut i = i0;
            while i < n {
                if !differs(plain, back, i) {
                    i += 1;
                    continue;
                }
                let j = i;
                while i < n && differs(plain, back, i) {
                    i += 1;
                }
                let r = j * SECTOR_BYTES..i * SECTOR_BYTES;
                plain[r.clone()].copy_from_slice(&back[r.clone()]);
                self.disk.write(l + s + j as u64, &plain[r])?;
                first = Some(first.map_or(j as u64, |f| f.min(j as u64)));
            }
        }
        if first.is_some() {
            self.disk.flush()?;
            // `back` equals `plain` in every range read again: read those ranges back
            for &(ra, rb) in ranges {
                let r = sector(ra as usize).start..sector(rb as usize - 1).end;
                self.disk.read(l + s + ra, &mut back[r.clone()])?;
                if back[r.clone()] != plain[r] {
                    return Err(std::io::Error::other("the moved segment reads back different from what was written"));
                }
            }
        }
        Ok(first)
    }

    fn unwatch_first_s(&mut self, watch: Option<u64>) {
        if let Some(id) = watch {
            let bridge = self.names.bridge.clone();
            let _ = self.kernel.message(&bridge, &dmstats::delete_msg(id));
        }
    }

    /// TESTS ONLY: run the cut-over in another order (the crash sweep must catch a wrong one).
    #[cfg(test)]
    pub(crate) fn set_cut_order(&mut self, order: &'static [CutStep]) {
        self.cut_order = order;
    }

    /// After a failed cut-over step that wrote nothing durable: the old table back.
    fn resume_old(&mut self, bridge: &str) {
        let r = self.kernel.clear_inactive(bridge);
        undone(&mut self.undo_failed, || format!("clearing the inactive table of {bridge}"), r);
        let r = self.kernel.resume(bridge);
        undone(&mut self.undo_failed, || format!("resuming {bridge}"), r);
    }

    /// After libcryptsetup finished the data phase: the mapping becomes what `cryptsetup
    /// open` maps for the final header (N − S sectors, the key through the keyring), then
    /// LVM may grow the PV.
    pub fn finish_standard(&mut self, hooks: &mut dyn Hooks) -> EResult<()> {
        let r = self.open_as_cryptsetup_would();
        self.settle_aside();
        self.report_undo_failures(hooks);
        r?;
        let bridge = self.names.bridge.clone();
        let _ = hooks.lvm_resize(&bridge);
        hooks.event(&Event::Done);
        Ok(())
    }
}

/// What ends a LUKS2 reencryption whose every step is committed ([`luks2meta::Finalize`],
/// cryptsetup's teardown): the wipes (the reencrypt keyslot's area, the moved segment),
/// flushed; then the final metadata, the primary copy first, each copy flushed on its own, so
/// that a torn write leaves the other copy whole (one write of both could tear both).
pub fn write_final<D: Disk>(disk: &mut D, f: &luks2meta::Finalize) -> std::io::Result<()> {
    let mut zeros = IoBuf::new(1 << 20)?;
    for &(off, len) in &f.wipe {
        disk.write_zeros(off, len, &mut zeros)?;
    }
    disk.flush()?;
    let mut md = IoBuf::new(f.metadata.len())?;
    md.copy_from_slice(&f.metadata);
    let half = md.len() / 2;
    disk.write(0, &md[..half])?;
    disk.flush()?;
    disk.write(Sectors::in_len(half).0, &md[half..])?;
    disk.flush()
}

/// One action of the LUKS2 cut-over (all with the bridge suspended but the last three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutStep {
    /// [0, S) (read once, the bridge suspended) written to the moved segment [L+S, L+2S).
    Moved,
    /// The cut-over record (L, S, H, SHA-256 of the moved sectors) written to the device's
    /// last 4 KiB ([`cutover::record_sector`]).
    Record,
    /// A device flush.
    Flush,
    /// The moved segment read back and compared with what was written.
    ReadBack,
    /// [0, 4 KiB) zeroed: the LVM label goes. The fence: from here until the primary header
    /// is durable, nothing sees a PV whose metadata area is half overwritten.
    Fence,
    /// The header's bytes [4 KiB, H): the primary's JSON area, the secondary copy, the
    /// keyslot areas.
    HeaderRest,
    /// The header's first 4 KiB, the primary binary header. Once flushed, the device is a
    /// LUKS2 reencryption in progress.
    HeaderFirst,
    /// The bridge resumes with the table `cryptsetup open` builds for the header.
    Resume,
    /// [H, S) zeroed: no plaintext stays behind the header.
    WipeRest,
    /// The record zeroed.
    EraseRecord,
}

/// The cut-over's order (journal-format.md, "LUKS2"). Every prefix of it, with any subset of
/// the writes since the last flush torn or lost, is either the plain PV (possibly after
/// [`recover_cut_over`] rolls back) or a complete LUKS2 reencryption in progress:
///
/// - the moved copy and the record are durable (and the copy read back) before anything in
///   [0, S) changes, so the record always finds an intact copy;
/// - the LVM label goes (flushed) before anything else in [0, S): a device whose label is
///   there has its whole [0, S) intact (LVM never sees a half-overwritten PV);
/// - everything of the header but its primary binary header is durable before that is
///   written: a primary that verifies means the whole header (keyslots too) is there;
/// - [H, S) is zeroed (flushed) before the record goes: a record that is gone means the
///   header area holds no plaintext.
pub const CUT_OVER_ORDER: &[CutStep] = &[
    CutStep::Moved,
    CutStep::Record,
    CutStep::Flush,
    CutStep::ReadBack,
    CutStep::Fence,
    CutStep::Flush,
    CutStep::HeaderRest,
    CutStep::Flush,
    CutStep::HeaderFirst,
    CutStep::Flush,
    CutStep::Resume,
    CutStep::WipeRest,
    CutStep::Flush,
    CutStep::EraseRecord,
    CutStep::Flush,
];

/// Put the plaintext `plain` (S sectors) back over [0, S), then erase the record at
/// `rec_at`. The order keeps the cut-over's invariants at every crash point: the primary
/// header goes first (zeros over [0, 4 KiB), flushed), so no primary can verify over a
/// half-restored header area; then [4 KiB, S); then the first 4 KiB but the LVM label's
/// sector; the label's sector last (one sector: never torn), so a label on disk means
/// [0, S) is whole again; read back; the record last. `back`: S sectors of scratch.
pub(crate) fn roll_back<D: Disk>(
    disk: &mut D,
    plain: &[u8],
    back: &mut [u8],
    rec_at: u64,
    zero4k: &[u8],
) -> std::io::Result<()> {
    let labels = cutover::label_sectors(&plain[..4096]);
    disk.write(0, zero4k)?;
    disk.flush()?;
    if plain.len() > 4096 {
        disk.write(8, &plain[4096..])?;
    }
    disk.flush()?;
    for i in (0..8).filter(|i| !labels.contains(i)) {
        disk.write(i as u64, &plain[i * 512..(i + 1) * 512])?;
    }
    disk.flush()?;
    for &i in &labels {
        disk.write(i as u64, &plain[i * 512..(i + 1) * 512])?;
    }
    disk.flush()?;
    disk.read(0, back)?;
    if *back != *plain {
        return Err(std::io::Error::other("sectors 0.. read back different from what was put back"));
    }
    disk.write(rec_at, zero4k)?;
    disk.flush()
}

/// After a crash (or a failure) during a LUKS2 cut-over: what the device is, and the one
/// action that makes it either the plain PV or a complete LUKS2 reencryption in progress
/// ([`cutover::classify`]). Reads the record area first; without a record it changes
/// nothing and says [`Decision::Nothing`] (the other paths judge the device).
///
/// - the LVM label is in place: the plain PV; a stale record is erased;
/// - the primary LUKS2 header verifies: the cut-over is complete; if the record is still
///   there, [H, S) is zeroed (flushed), then the record erased;
/// - otherwise a valid record whose moved segment matches its SHA-256: rolled back
///   ([`roll_back`]); one that does not match is refused, nothing changed.
pub fn recover_cut_over<D: Disk>(disk: &mut D, n: u64) -> EResult<Decision> {
    let Some(x) = examine_cut_over(disk, n)? else { return Ok(Decision::Nothing) };
    let rec_at = cutover::record_sector(n).expect("examined");
    let zero4k = vec![0u8; cutover::RECORD_BYTES];
    let erase = |disk: &mut D| {
        io(disk.write(rec_at, &zero4k).and_then(|()| disk.flush()), || "erasing luksify's cut-over record".into())
    };
    match x.finding {
        Finding::Other | Finding::PlainPv { stale: false } => Ok(Decision::Nothing),
        Finding::PlainPv { stale: true } => {
            erase(disk)?;
            Ok(Decision::ErasedStale)
        }
        Finding::Luks2 { record, leftover } => {
            if let Some(r) = record.filter(|r| x.data_offset == Some(Sectors(r.s).bytes())) {
                let mut scratch = vec![0u8; 1 << 20];
                io(disk.write_zeros(r.header_len, Sectors(r.s).bytes() - r.header_len, &mut scratch), || {
                    "zeroing the rest of the LUKS2 header area".into()
                })?;
                io(disk.flush(), || "flushing the header area".into())?;
            }
            if leftover {
                erase(disk)?;
            }
            Ok(Decision::Luks2 { cleaned: leftover })
        }
        Finding::Window(r) => {
            let moved = x.moved.expect("read for a window");
            if cutover::sha256(&moved) != r.moved_sha256 {
                return Err(EngineError::Refused(format!(
                    "the cut-over to LUKS2 was interrupted, but the copy of sectors 0..{} at sector {} no longer matches luksify's cut-over record: nothing was changed. Either the copy is damaged, or luksify's own rollback failed and the system kept running on that copy (then it holds the current data: copying sectors {}..{} to sector 0 restores the PV by hand); do not write to the device and report with `luksify status --json`",
                    r.s,
                    r.moved_at(),
                    r.moved_at(),
                    r.moved_at() + r.s
                )));
            }
            let mut back = vec![0u8; moved.len()];
            io(roll_back(disk, &moved, &mut back, rec_at, &zero4k), || {
                format!("putting sectors 0..{} back from sector {}", r.s, r.moved_at())
            })?;
            Ok(Decision::RolledBack)
        }
    }
}

/// What [`examine_cut_over`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutOverFinding {
    pub finding: Finding,
    /// The data offset of the LUKS2 reencryption at sector 0 (bytes), if one verifies.
    pub data_offset: Option<u64>,
    /// [`Finding::Window`]: the moved sectors as read.
    pub moved: Option<Vec<u8>>,
}

impl CutOverFinding {
    /// [`Finding::Window`]: whether the moved copy matches the record (a rollback can run).
    pub fn moved_matches(&self) -> bool {
        match (&self.finding, &self.moved) {
            (Finding::Window(r), Some(m)) => cutover::sha256(m) == r.moved_sha256,
            _ => false,
        }
    }
}

/// Read-only: what the device is with respect to a LUKS2 cut-over (`None`: no record, nothing
/// of the cut-over's). [`recover_cut_over`] acts on it; `luksify status` reports it.
pub fn examine_cut_over<D: Disk>(disk: &mut D, n: u64) -> EResult<Option<CutOverFinding>> {
    let Some(rec_at) = cutover::record_sector(n) else { return Ok(None) };
    let mut rb = vec![0u8; cutover::RECORD_BYTES];
    io(disk.read(rec_at, &mut rb), || "reading luksify's cut-over record".into())?;
    let record = CutRecord::decode(&rb, n);
    if record == Ok(None) {
        return Ok(None);
    }
    // The primary's verdict needs its binary header and JSON area (luksify writes hdr_size
    // 16 KiB, [`luks2meta::HEAD_BYTES`] covers it); a larger hdr_size asks for more.
    let dev_bytes = (Sectors(n).bytes() as usize) / 4096 * 4096;
    let read_head = |disk: &mut D, len: usize| {
        let mut head = vec![0u8; len];
        io(disk.read(0, &mut head), || "reading the device's first sectors".into()).map(|()| head)
    };
    let mut head = read_head(disk, luks2meta::HEAD_BYTES.min(dev_bytes))?;
    let mut parsed = luks2meta::parse(&head);
    if let Err(luks2meta::MetaError::NeedMore(k)) = parsed {
        let len = k.min(luks2meta::MAX_HEAD_BYTES).min(dev_bytes).div_ceil(4096) * 4096;
        if len > head.len() {
            head = read_head(disk, len)?;
            parsed = luks2meta::parse(&head);
        }
    }
    let primary = matches!(&parsed, Ok(Some(m)) if m.copies_valid.0);
    let data_offset = match &parsed {
        Ok(Some(m)) if primary => m.reencrypt.as_ref().map(|r| r.data_offset),
        _ => None,
    };
    let finding = cutover::classify(&head, primary, &record);
    let moved = match &finding {
        Finding::Window(r) => {
            let mut moved = vec![0u8; Sectors(r.s).byte_len()];
            io(disk.read(r.moved_at(), &mut moved), || format!("reading the moved sectors at {}", r.moved_at()))?;
            Some(moved)
        }
        _ => None,
    };
    Ok(Some(CutOverFinding { finding, data_offset, moved }))
}
