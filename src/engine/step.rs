//! One step of the move (see HACKING.md, "How a step moves"): copy the source, encrypted, to
//! where nothing maps yet, read it back from the disk and through dm-crypt, then the short
//! suspended window (compare the source once more, commit, flip), cut when it runs past
//! `max_stall`; the mirror of a failed commit; pacing for `--rate`.

use super::*;

impl<D: Disk, K: Kernel> Engine<D, K> {
    /// `--rate`: after a chunk of `bytes` that started at `t`, wait until the average rate is
    /// back under the cap (a stop request cuts the wait short).
    pub(super) fn pace(&self, t: Instant, bytes: u64, hooks: &mut dyn Hooks) {
        let Some(rate) = self.opts.rate.filter(|&r| r > 0) else { return };
        let due = t + Duration::from_secs_f64(bytes as f64 / rate as f64);
        while !hooks.stop_requested() {
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
    }

    /// Copy step [a, b): read its source into `plain`, write it encrypted at the
    /// destination (S + a), flush. Only luksify writes there: the bridge maps nothing onto
    /// [S + a, S + b) until the step is committed.
    pub(super) fn copy_step(&mut self, a: u64, b: u64) -> EResult<()> {
        let g = *self.g();
        let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
        // In as few I/Os as the source allows: one below F (the shadow), one above.
        let mut x = a;
        while x < b {
            let e = g.source_run_end(x, b);
            let (o, n) = (Sectors(x - a).byte_len(), Sectors(e - x).byte_len());
            self.disk
                .read(g.source_of(x), &mut self.plain[o..o + n])
                .map_err(|er| fail(x, format!("reading the source: {er}")))?;
            self.write_copy(x, o, o + n).map_err(|er| fail(x, format!("writing the copy: {er}")))?;
            x = e;
        }
        self.disk.flush().map_err(|er| fail(a, format!("flushing the copy: {er}")))
    }

    /// Whether the steps go through the staging crypt device (the kernel encrypts) rather
    /// than luksify's own AES-XTS.
    fn kernel_crypt(&self) -> bool {
        self.xts.is_none() || self.opts.kernel_crypt
    }

    /// Write `plain[o0..o1]`, the step's sectors from `x` on, encrypted to their
    /// destination S + x: encrypted here into `cipher` and written to the raw disk, or
    /// written through the staging crypt device (O_DIRECT; dm-crypt encrypts with the new
    /// key and the same IVs). Not flushed: the caller flushes the raw disk, which makes
    /// either durable.
    fn write_copy(&mut self, x: u64, o0: usize, o1: usize) -> Result<(), String> {
        if self.kernel_crypt() {
            return self.kernel.write(&self.names.staging, x, &self.plain[o0..o1]).map_err(|e| e.to_string());
        }
        let s = self.g().s;
        let xts = self.xts.as_ref().expect("kernel_crypt() is false only with a userspace cipher");
        xts.encrypt_into(&self.plain[o0..o1], &mut self.cipher[o0..o1], x);
        self.disk.write(s + x, &self.cipher[o0..o1]).map_err(|e| e.to_string())
    }

    /// Read the sectors `runs` of step [a, b) back from the destination and compare them with
    /// what was written: the copy is on the disk, not only in a cache that lied. Encrypted
    /// here: the raw sectors against `cipher`. Encrypted by the kernel: read through the
    /// staging crypt device (O_DIRECT, so from the disk) against `plain`, which, the cipher
    /// being a permutation of each sector, says the same of the raw sectors.
    pub(super) fn check_written(&mut self, a: u64, b: u64, runs: &[(u64, u64)]) -> EResult<()> {
        let s = self.g().s;
        let kernel = self.kernel_crypt();
        let staging = self.names.staging.clone();
        for &(ra, rb) in runs {
            let mut x = ra;
            while x < rb {
                let e = (x + self.piece()).min(rb);
                let (o, n) = (Sectors(x - a).byte_len(), Sectors(e - x).byte_len());
                let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
                let (read, want) = match kernel {
                    false => {
                        (self.disk.read(s + x, &mut self.verify_dst[..n]).map_err(|er| er.to_string()), &self.cipher)
                    }
                    true => (
                        self.kernel.read(&staging, x, &mut self.verify_dst[..n]).map_err(|er| er.to_string()),
                        &self.plain,
                    ),
                };
                read.map_err(|er| fail(x, format!("reading the copy back: {er}")))?;
                if let Some(i) = (0..n / SECTOR_BYTES)
                    .find(|i| self.verify_dst[sector(*i)] != want[o + i * SECTOR_BYTES..o + (i + 1) * SECTOR_BYTES])
                {
                    return Err(fail(x + i as u64, "the disk returned other data than was written".into()));
                }
                x = e;
            }
        }
        Ok(())
    }

    /// Read the first sectors of step [a, b) through the staging device, that is through
    /// the kernel's dm-crypt with the new key: they must be the plaintext luksify encrypted.
    /// This is what proves, on every step, that luksify's cipher is the one the kernel (and
    /// later `cryptsetup open`) decrypts with.
    pub(super) fn check_kernel(&mut self, a: u64, b: u64) -> EResult<()> {
        let n = Sectors((b - a).min(KERNEL_CHECK_SECTORS)).byte_len();
        let staging = self.names.staging.clone();
        self.kernel.read(&staging, a, &mut self.verify_dst[..n]).map_err(|e| EngineError::CopyFailed {
            from: a,
            to: b,
            sector: a,
            why: format!("reading the copy through dm-crypt: {e}"),
        })?;
        if self.verify_dst[..n] != self.plain[..n] {
            return Err(EngineError::CopyFailed {
                from: a,
                to: b,
                sector: a,
                why: "dm-crypt decrypts the copy to other data: luksify's cipher is not the kernel's".into(),
            });
        }
        Ok(())
    }

    /// Compare the source of step [a, b) with `plain` (what was copied) and copy again every
    /// sector that a live write changed since, adding their runs to `runs` and their number
    /// to `changed` (not flushed, not checked: the caller does both once, for every attempt
    /// of the step, cut ones included). Returns false when `deadline` passed before the
    /// last piece (the bridge has been suspended too long: the caller resumes it and tries
    /// again). The first piece is always compared, so every attempt makes progress. While
    /// the bridge is suspended this allocates nothing.
    pub(super) fn refresh_into(
        &mut self,
        a: u64,
        b: u64,
        runs: &mut Vec<(u64, u64)>,
        changed: &mut u64,
        deadline: Option<Instant>,
    ) -> EResult<bool> {
        let g = *self.g();
        let piece = self.piece();
        let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
        let mut x = a;
        while x < b {
            if x > a && deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            let e = piece_end(&g, x, b, piece);
            let n = Sectors(e - x).byte_len();
            self.disk
                .read(g.source_of(x), &mut self.verify_src[..n])
                .map_err(|er| fail(x, format!("reading the source: {er}")))?;
            let base = Sectors(x - a).byte_len();
            let same = |src: &[u8], plain: &[u8], i: usize| {
                src[sector(i)] == plain[base + i * SECTOR_BYTES..base + (i + 1) * SECTOR_BYTES]
            };
            let mut i = 0;
            while i < n / SECTOR_BYTES {
                if same(&self.verify_src, &self.plain, i) {
                    i += 1;
                    continue;
                }
                let j = i;
                while i < n / SECTOR_BYTES && !same(&self.verify_src, &self.plain, i) {
                    i += 1;
                }
                let (ra, rb) = (x + j as u64, x + i as u64);
                let (o0, o1) = (base + j * SECTOR_BYTES, base + i * SECTOR_BYTES);
                self.plain[o0..o1].copy_from_slice(&self.verify_src[sectors(j, i)]);
                self.write_copy(ra, o0, o1).map_err(|er| fail(ra, format!("writing the copy: {er}")))?;
                *changed += rb - ra;
                let room = runs.len() < runs.capacity();
                match runs.last_mut() {
                    // Out of room: widen the last run to cover this one too (checking more is
                    // only slower; an earlier attempt's runs may lie either side).
                    Some(last) if !room => *last = (last.0.min(ra), last.1.max(rb)),
                    _ => runs.push((ra, rb)),
                }
            }
            x = e;
        }
        Ok(true)
    }

    /// Migrating{to} → Migrating{from}, in steps of at most the copy buffer (one step
    /// unless the journal was written with a larger chunk), each committed on its own.
    pub(super) fn move_chunk(&mut self, from: u64, to: u64) -> EResult<ChunkStats> {
        let d = self.ensure_helpers()?;
        let step = Sectors::in_len(self.plain.len()).0;
        let mut stats = ChunkStats::default();
        let mut b = to;
        while b > from {
            let a = b.saturating_sub(step).max(from);
            self.move_step(d, a, b, &mut stats)?;
            b = a;
        }
        Ok(stats)
    }

    /// Migrating{b} → Migrating{a}: the commit protocol.
    ///
    /// Everything slow happens while the bridge is live and still maps the step linear to
    /// its source, so that live writes go there: luksify reads the source, encrypts it with
    /// the new key and writes it to the destination, which nothing else maps yet; reads it
    /// back; and reads its first sectors through the kernel's dm-crypt. The bridge is then
    /// suspended (no write in flight, none can start) only to compare the source with what
    /// was copied, copy again the few sectors live writes changed since, commit the journal
    /// and flip the table to crypt. (A live round of that comparison before the suspend
    /// was measured: it cost a read of every step and saved the suspended window almost
    /// nothing, the writes that land in one step's window being few.) At
    /// the commit the destination holds exactly the encrypted source, and the source does
    /// not change until the flip.
    pub(super) fn move_step(&mut self, d: Devices, a: u64, b: u64, stats: &mut ChunkStats) -> EResult<()> {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        // 1. Copy and check, live.
        let t0 = Instant::now();
        self.copy_step(a, b)?;
        stats.copy += t0.elapsed();
        let t1 = Instant::now();
        self.check_written(a, b, &[(a, b)])?;
        let read_back = t1.elapsed();
        self.check_kernel(a, b)?;
        stats.verify += t1.elapsed();
        // 2. Suspended: the last comparison, then commit, then flip. A window that runs
        // past `max_stall` before its last comparison is done is cut: live I/O resumes on
        // the old table and the step tries again after a pause of `max_stall` times the
        // cuts so far (at most MAX_CUTS times; then the window runs to its end, whatever
        // it takes).
        let steady = tables::bridge_table(&g, &self.spec, d, BridgePhase::Steady { cursor: a });
        let mut runs = std::mem::take(&mut self.recheck);
        runs.clear();
        let max_stall = self.opts.max_stall.unwrap_or(DEFAULT_MAX_STALL.max(2 * read_back));
        let r = self.suspended_refresh(d, a, b, &steady, max_stall, &mut runs, stats);
        self.recheck = runs;
        let (w, t_suspended) = r?;
        #[cfg(test)]
        if self.wrong_order_for_tests {
            kern(self.kernel.resume(&bridge))?;
            return self.commit(State::Migrating { cursor: a });
        }
        let t_refreshed = Instant::now();
        if let Err(e) = self.commit(State::Migrating { cursor: a }) {
            // Whether the commit reached the disk is unknown: the journal may say either
            // cursor. Both copies are identical now; a mirror over them keeps them so
            // until a resume loads the journaled table.
            self.keep_both(d, a, b);
            return Err(e);
        }
        // 3. Only now map the step through crypt alone.
        let t_committed = Instant::now();
        kern(self.kernel.resume(&bridge))?;
        let t_end = Instant::now();
        stats.note_window(
            t_end - w,
            [t_suspended - w, t_refreshed - t_suspended, t_committed - t_refreshed, t_end - t_committed],
        );
        Ok(())
    }

    /// Load the step's flipped table inactive, suspend the bridge and bring the destination
    /// up to date with the source ([`Engine::refresh_into`]), cutting windows that run too
    /// long (see `move_step`); then flush and read back every sector copied again. Returns,
    /// with the bridge suspended and the flipped table loaded, when the last window began
    /// and when its suspend returned. On an error nothing was committed: the bridge is
    /// resumed on the table it had.
    #[allow(clippy::too_many_arguments)] // one step's state, threaded through its windows
    pub(super) fn suspended_refresh(
        &mut self,
        d: Devices,
        a: u64,
        b: u64,
        steady: &[Line],
        max_stall: Duration,
        runs: &mut Vec<(u64, u64)>,
        stats: &mut ChunkStats,
    ) -> EResult<(Instant, Instant)> {
        let bridge = self.names.bridge.clone();
        let (mut changed, mut cuts) = (0u64, 0u32);
        loop {
            kern(self.kernel.load(&bridge, steady, &self.key_hex))?;
            let sp = self.suspend_on_tick(&bridge, &mut |_| false)?;
            let (w, t_suspended) = (sp.called, sp.returned);
            stats.tick_wait += sp.slept;
            // One window; more than one pass of the comparison only if a cut could not
            // back out (then the window runs to its end instead).
            loop {
                let deadline = (cuts < MAX_CUTS).then_some(w + max_stall);
                let r = self.refresh_into(a, b, runs, &mut changed, deadline).and_then(|done| {
                    // Every sector copied again in any window of this step, cut ones too.
                    if done && changed > 0 {
                        let fail = |why: String| EngineError::CopyFailed { from: a, to: b, sector: a, why };
                        self.disk.flush().map_err(|er| fail(format!("flushing the copy: {er}")))?;
                        self.check_written(a, b, runs)?;
                    }
                    Ok(done)
                });
                match r {
                    Ok(true) => {
                        stats.rechecked += changed;
                        return Ok((w, t_suspended));
                    }
                    Ok(false) => {
                        // Cut: nothing was committed. What was copied again so far stays in
                        // `runs`, to be checked with the last window's.
                        let t_cut = Instant::now();
                        if self.drop_flipped(&bridge, d, b).is_err() {
                            // The flipped table is still loaded: finish this window instead
                            // (the normal way out), never resume onto it uncommitted.
                            cuts = MAX_CUTS;
                            continue;
                        }
                        // A failed resume leaves the bridge suspended on its old table:
                        // `luksify resume` takes it from there.
                        kern(self.kernel.resume(&bridge))?;
                        let t_end = Instant::now();
                        stats.note_window(
                            t_end - w,
                            [t_suspended - w, t_cut - t_suspended, Duration::ZERO, t_end - t_cut],
                        );
                        stats.cut_windows += 1;
                        cuts += 1;
                        // Let live I/O catch up, longer after each cut (a slow spell of the
                        // disk tends to last).
                        std::thread::sleep(max_stall * cuts);
                        break;
                    }
                    Err(e) => {
                        // Nothing was committed. If the flipped table cannot be dropped the
                        // bridge stays suspended: resuming onto it would map a copy that may
                        // not be current; `luksify resume` loads the journal's table.
                        if self.drop_flipped(&bridge, d, b).is_ok() {
                            let r = self.kernel.resume(&bridge);
                            undone(&mut self.undo_failed, || format!("resuming {}", bridge), r);
                        }
                        return Err(e);
                    }
                }
            }
        }
    }

    /// With the bridge suspended and step [.., b)'s flipped table loaded, uncommitted: drop
    /// that table (or, if the kernel will not clear it, load the live table's twin over it),
    /// so that a resume puts the bridge back on the table it had, which maps the step to
    /// its source. An error means the flipped table is still loaded.
    pub(super) fn drop_flipped(&mut self, bridge: &str, d: Devices, b: u64) -> KResult<()> {
        if self.kernel.clear_inactive(bridge).is_err() {
            let live = tables::bridge_table(self.g(), &self.spec, d, BridgePhase::Steady { cursor: b });
            self.kernel.load(bridge, &live, &self.key_hex)?;
        }
        Ok(())
    }

    /// After a failed commit, with the bridge suspended and step [a, b) identical at its
    /// source and (encrypted) at its destination: map it through a mirror over both, which
    /// writes to both and so keeps them identical, whichever cursor the journal holds.
    /// Best effort: if even that fails, the bridge resumes with the table it had (the
    /// source), and the journal most likely holds the old cursor too (its write failed).
    pub(super) fn keep_both(&mut self, d: Devices, a: u64, b: u64) {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        let mirror = self.names.mirror.clone();
        let r = self.kernel.clear_inactive(&bridge);
        undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", bridge), r);
        let mt = tables::mirror_table(&g, d, a, b);
        let bt = tables::bridge_table(&g, &self.spec, d, BridgePhase::Mirroring { from: a, to: b });
        let r = self
            .kernel
            .load(&mirror, &mt, &self.key_hex)
            .and_then(|_| self.kernel.suspend(&mirror))
            .and_then(|_| self.kernel.resume(&mirror))
            .and_then(|_| self.kernel.load(&bridge, &bt, &self.key_hex));
        if r.is_err() {
            let r = self.kernel.clear_inactive(&bridge);
            undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", bridge), r);
        }
        let r = self.kernel.resume(&bridge);
        undone(&mut self.undo_failed, || format!("resuming {}", bridge), r);
    }
}
