//! The device-mapper side of the engine: the helpers (staging crypt, idle mirror), the
//! bridge and the LVs rerouted onto it, the fence, and making the dm devices match the
//! journal on a resume ([`Engine::rebuild`]).

use super::*;

impl<D: Disk, K: Kernel> Engine<D, K> {
    /// The devices the tables refer to; helpers that do not exist are named by the raw
    /// device (only tables that do not reference them are built then).
    pub(super) fn devices(&mut self) -> EResult<Devices> {
        self.settle_aside();
        let staging = kern(self.kernel.lookup(&self.names.staging))?.unwrap_or(self.raw);
        let mirror = kern(self.kernel.lookup(&self.names.mirror))?.unwrap_or(self.raw);
        Ok(Devices { raw: self.raw, staging, mirror })
    }

    /// The staging crypt device and the idle mirror device, created if missing.
    pub(super) fn ensure_helpers(&mut self) -> EResult<Devices> {
        let staging = self.ensure_staging()?;
        let (n, u) = (self.names.mirror.clone(), self.names.mirror_uuid.clone());
        let mirror = match kern(self.kernel.lookup(&n))? {
            Some(d) => {
                if kern(self.kernel.table(&n))?.is_empty() {
                    let t = tables::mirror_idle_table(self.g(), Devices { raw: self.raw, staging, mirror: d });
                    kern(self.kernel.load(&n, &t, &self.key_hex))?;
                    kern(self.kernel.resume(&n))?;
                }
                d
            }
            None => {
                let d = kern(self.kernel.create(&n, &u, true))?;
                let t = tables::mirror_idle_table(self.g(), Devices { raw: self.raw, staging, mirror: d });
                if let Err(e) = self.kernel.load(&n, &t, &self.key_hex).and_then(|_| self.kernel.resume(&n)) {
                    let r = self.kernel.remove(&n);
                    undone(&mut self.undo_failed, || format!("removing {}", n), r);
                    return Err(EngineError::Kernel(e.context("setting up the mirror device")));
                }
                d
            }
        };
        Ok(Devices { raw: self.raw, staging, mirror })
    }

    /// Remove the helpers (nothing references them once the bridge is pure crypt).
    pub(super) fn remove_helpers(&mut self) -> EResult<()> {
        self.settle_aside();
        for n in [self.names.switch.clone(), self.names.mirror.clone(), self.names.staging.clone()] {
            if kern(self.kernel.lookup(&n))?.is_some() {
                kern(self.kernel.remove(&n))?;
            }
        }
        Ok(())
    }

    /// Start removing those of the private devices `names` that exist, in this order,
    /// without waiting ([`Kernel::remove_aside`]): no live table may map them.
    pub(super) fn remove_aside(&mut self, names: &[String]) {
        self.settle_aside();
        let mut todo = Vec::with_capacity(names.len());
        for n in names {
            match self.kernel.lookup(n) {
                Ok(Some(_)) => todo.push(n.clone()),
                Ok(None) => {}
                Err(e) => undone(&mut self.undo_failed, || format!("looking up {n}"), Err::<(), _>(e)),
            }
        }
        if !todo.is_empty() {
            self.aside = Some(self.kernel.remove_aside(todo));
        }
    }

    /// Wait for the removals [`Engine::remove_aside`] started; one that failed is reported
    /// beside the run's outcome (a private device left behind: `luksify resume` or a reboot
    /// removes it).
    pub(super) fn settle_aside(&mut self) {
        let Some(a) = self.aside.take() else { return };
        for (n, r) in a.wait() {
            undone(&mut self.undo_failed, || format!("removing the private device {n}"), r);
        }
    }

    /// Make the dm devices match the journal: create what is missing, reload what exists.
    pub(super) fn rebuild(&mut self) -> EResult<()> {
        let st = self.rec.state;
        let d = if state::needs_staging(st) { self.ensure_helpers()? } else { self.devices()? };
        let mut phase = state::resume_phase(st);
        if phase == BridgePhase::Linear {
            // A fence that wrote its marker but not its journal record: the label is in the
            // shadow, so map it from there (the fence step keeps that shadow).
            if self.fence_merge()? {
                phase = BridgePhase::Steady { cursor: self.g().l };
            }
        }
        let table = tables::bridge_table(self.g(), &self.spec, d, phase);
        match kern(self.kernel.lookup(&self.names.bridge))? {
            Some(_) => {
                // Live resume: whatever the bridge had (even the mirror of a failed commit,
                // unless a copy went stale under it), it now gets the journaled table.
                if let State::Migrating { cursor } = st {
                    self.check_kept_copies(cursor)?;
                }
                self.swap_table(&self.names.bridge.clone(), &table, "bridge")?;
            }
            None => {
                let (n, u) = (self.names.bridge.clone(), self.names.bridge_uuid.clone());
                kern(self.kernel.create(&n, &u, false))?;
                kern(self.kernel.load(&n, &table, &self.key_hex))?;
                kern(self.kernel.resume(&n))?;
            }
        }
        // LVs still on the raw device: fine before the fence (they get rerouted by the
        // bridge step); after it, something activated them over moved data.
        let except = self.names.own();
        let holders = kern(self.kernel.holders_of(self.raw, &except))?;
        if matches!(st, State::Migrating { .. } | State::HeaderWritten) && !holders.is_empty() {
            let names: Vec<_> = holders.iter().map(|h| h.name.clone()).collect();
            return Err(EngineError::Refused(format!(
                "{} map the raw device although it is half converted: deactivate them (`dmsetup remove`) without writing to them, then resume",
                names.join(", ")
            )));
        }
        if st == State::Bridged && !holders.is_empty() {
            self.reroute(holders)?;
        }
        if state::needs_marker(st) {
            self.write_marker()?;
        }
        if st == State::HeaderWritten || st == (State::Migrating { cursor: 0 }) {
            self.remove_helpers()?;
        }
        Ok(())
    }

    /// After a failed commit, [`Self::keep_both`] leaves the step's two copies under a
    /// mirror, identical. A write that failed on one of them since (its leg's health is no
    /// longer `A`: dm-mirror went on writing the other leg only) left that copy stale.
    /// The journal's cursor must map the other copy, or nothing is loaded: the live system
    /// stays on the mirror, which keeps serving the healthy copy.
    pub(super) fn check_kept_copies(&mut self, cursor: u64) -> EResult<()> {
        let mirror = self.names.mirror.clone();
        let Some(m) = kern(self.kernel.lookup(&mirror))? else { return Ok(()) };
        let health = kern(self.kernel.mirror_health(&mirror))?;
        let bad = |leg: usize| health.iter().any(|h| h.get(leg).is_some_and(|&c| c != 'A'));
        if !bad(0) && !bad(1) {
            return Ok(());
        }
        // The step the mirror holds: where the bridge maps onto it.
        let bridge = kern(self.kernel.table(&self.names.bridge))?;
        let span = dmline::linear_onto(&bridge, m);
        let letters: Vec<String> = health.iter().map(|h| h.iter().collect()).collect();
        let (mapped, ok) = match span {
            Some(l) if cursor <= l.start => ("the encrypted copy", !bad(1)),
            Some(l) if cursor >= l.start + l.length => ("the source", !bad(0)),
            _ => ("neither copy", false),
        };
        if ok {
            return Ok(());
        }
        Err(EngineError::Refused(format!(
            "after the failed commit, I/O failed on a copy of the step in flight (mirror leg health {}: D = a write failed, \
             F = a flush, R = a read); the journal maps {mapped}, which may have missed writes since. Nothing was changed: \
             the system runs on the mirror, which serves the healthy copy. The disk is failing: back up the volumes on \
             /dev/mapper/{} now",
            letters.join(" "),
            self.names.bridge
        )))
    }

    pub(super) fn ensure_staging(&mut self) -> EResult<DevRef> {
        self.settle_aside();
        let (n, u) = (self.names.staging.clone(), self.names.staging_uuid.clone());
        let t = tables::staging_table(self.g(), &self.spec, self.raw);
        if let Some(d) = kern(self.kernel.lookup(&n))? {
            // Left without a table by a crash between create and load: give it its table.
            if kern(self.kernel.table(&n))?.is_empty() {
                kern(self.kernel.load(&n, &t, &self.key_hex))?;
                kern(self.kernel.resume(&n))?;
            }
            return Ok(d);
        }
        let d = kern(self.kernel.create(&n, &u, true))?;
        if let Err(e) = self.kernel.load(&n, &t, &self.key_hex).and_then(|_| self.kernel.resume(&n)) {
            let r = self.kernel.remove(&n);
            undone(&mut self.undo_failed, || format!("removing {}", n), r);
            return Err(EngineError::Kernel(e.context("setting up the staging crypt device")));
        }
        Ok(d)
    }

    /// Load `table` inactive, suspend, resume: the only way a live table changes.
    pub(super) fn swap_table(&mut self, name: &str, table: &[Line], what: &'static str) -> EResult<()> {
        self.swap_table_keyed(name, table, None, what)
    }

    /// The volume key where `cryptsetup open` puts it for this header: LUKS2 in the kernel
    /// keyring as `cryptsetup:<UUID>-d0` (the header's UUID, its volume key's digest 0).
    /// Returns the description and the crypt lines' key parameter (`:64:logon:…`); None for
    /// LUKS1, or where the kernel has no keyring (the tables then carry the key in hex).
    /// Give it back with [`Engine::drop_cryptsetup_key`] once the table is loaded: dm-crypt
    /// keeps its own copy.
    pub(super) fn cryptsetup_key(&mut self) -> EResult<Option<(String, String)>> {
        if self.rec.luks_version != 2 {
            return Ok(None);
        }
        let desc = format!("cryptsetup:{}-d0", self.rec.luks_uuid);
        let key = Zeroizing::new(hex_bytes(&self.key_hex));
        Ok(kern(self.kernel.keyring_add(&desc, &key))?.map(|param| (desc, param)))
    }

    /// Remove a key of [`Engine::cryptsetup_key`] from the keyring.
    pub(super) fn drop_cryptsetup_key(&mut self, key: Option<(String, String)>) {
        if let Some((desc, _)) = key {
            self.kernel.keyring_drop(&desc);
        }
    }

    /// [`Engine::swap_table`], crypt lines given `key` (a keyring reference) instead of the
    /// volume key in hex.
    pub(super) fn swap_table_keyed(
        &mut self,
        name: &str,
        table: &[Line],
        key: Option<&str>,
        what: &'static str,
    ) -> EResult<()> {
        kern(self.kernel.load(name, table, key.unwrap_or(&self.key_hex)))?;
        if let Err(e) = self.suspend_observed(name) {
            let r = self.kernel.clear_inactive(name);
            undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", name), r);
            return Err(EngineError::Kernel(e.context(format!("suspending the {what}"))));
        }
        kern(self.kernel.resume(name))
    }

    /// Prepared → Bridged: staging + bridge devices, every LV rerouted onto the bridge.
    pub(super) fn insert_bridge(&mut self) -> EResult<()> {
        let d = self.ensure_helpers()?;
        let created_bridge = kern(self.kernel.lookup(&self.names.bridge))?.is_none();
        if created_bridge {
            let t = tables::bridge_table(self.g(), &self.spec, d, BridgePhase::Linear);
            let (n, u) = (self.names.bridge.clone(), self.names.bridge_uuid.clone());
            kern(self.kernel.create(&n, &u, false))?;
            if let Err(e) = self.kernel.load(&n, &t, &self.key_hex).and_then(|_| self.kernel.resume(&n)) {
                let r = self.kernel.remove(&n);
                undone(&mut self.undo_failed, || format!("removing {}", n), r);
                let r = self.remove_helpers();
                undone(&mut self.undo_failed, || "removing the helper devices".to_string(), r);
                return Err(EngineError::Kernel(e.context("setting up the bridge")));
            }
        }
        let except = self.names.own();
        let holders = kern(self.kernel.holders_of(self.raw, &except))?;
        if let Err(e) = self.reroute(holders) {
            if created_bridge {
                let r = self.kernel.remove(&self.names.bridge.clone());
                undone(&mut self.undo_failed, || format!("removing {}", self.names.bridge), r);
                let r = self.remove_helpers();
                undone(&mut self.undo_failed, || "removing the helper devices".to_string(), r);
            }
            return Err(e);
        }
        self.commit(State::Bridged)
    }

    /// Reroute every holder of the raw device onto the bridge, all or none.
    pub(super) fn reroute(&mut self, holders: Vec<HolderTable>) -> EResult<()> {
        let bridge = kern(self.kernel.lookup(&self.names.bridge))?
            .ok_or_else(|| EngineError::Kernel(KernelError::new("the bridge vanished")))?;
        self.reroute_between(holders, self.raw, bridge)
    }

    /// Reroute every holder of `from` onto `to` (same offsets), all or none. Onto the
    /// bridge, every rerouted extent must lie inside [0, L).
    pub(super) fn reroute_between(&mut self, holders: Vec<HolderTable>, from: DevRef, to: DevRef) -> EResult<()> {
        let g = *self.g();
        let mut plans: Vec<(String, Vec<TableLineFacts>, Vec<TableLineFacts>)> = Vec::new();
        for h in holders {
            let mut new = Vec::new();
            for l in &h.table {
                let params = match dmline::reroute_params(&l.target_type, &l.params, from, to) {
                    Some(p) => p,
                    None if dmline::references(l, from) => {
                        return Err(EngineError::Refused(format!(
                            "{} maps the device with a {} target, which luksify cannot reroute",
                            h.name, l.target_type
                        )))
                    }
                    None => l.params.clone(),
                };
                new.push(TableLineFacts { params, ..l.clone() });
            }
            // Every rerouted extent must lie inside [0, L): the bridge maps nothing else.
            if from == self.raw && !dmline::maps_only_below(&h.table, self.raw, g.l) {
                return Err(EngineError::Refused(format!("{} maps sectors of the device beyond the PV", h.name)));
            }
            plans.push((h.name, h.table, new));
        }
        // Phase 1: load every new table inactive. A failure clears them all: nothing changed.
        for (i, (name, _, new)) in plans.iter().enumerate() {
            if let Err(e) = self.kernel.load_lines(name, new) {
                for (n, _, _) in &plans[..i] {
                    let r = self.kernel.clear_inactive(n);
                    undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", n), r);
                }
                return Err(EngineError::Kernel({
                    let m = format!("loading the rerouted table of {name} failed ({e}); every table is back as it was");
                    e.reworded(m)
                }));
            }
        }
        // Phase 2: swap them in, one short suspend each. A failure puts back the old tables.
        for (i, (name, _, _)) in plans.iter().enumerate() {
            let r = self.suspend_observed(name).and_then(|_| self.kernel.resume(name));
            if let Err(e) = r {
                let r = self.kernel.resume(name);
                undone(&mut self.undo_failed, || format!("resuming {}", name), r);
                for (n, old, _) in plans[..i].iter().chain(std::iter::once(&plans[i])) {
                    let r = self.kernel.load_lines(n, old);
                    undone(&mut self.undo_failed, || format!("loading the old table back into {}", n), r);
                    let r = self.kernel.suspend(n);
                    undone(&mut self.undo_failed, || format!("suspending {}", n), r);
                    let r = self.kernel.resume(n);
                    undone(&mut self.undo_failed, || format!("resuming {}", n), r);
                }
                for (n, _, _) in &plans[i + 1..] {
                    let r = self.kernel.clear_inactive(n);
                    undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", n), r);
                }
                return Err(EngineError::Kernel({
                    let m = format!("switching {name} onto the bridge failed ({e}); tables put back");
                    e.reworded(m)
                }));
            }
        }
        Ok(())
    }

    /// Bridged → Migrating{L}: shadow the label sectors, map them from the shadow, then
    /// overwrite them on the raw device with the marker.
    pub(super) fn fence(&mut self) -> EResult<()> {
        let d = self.devices()?;
        let g = *self.g();
        let table = tables::bridge_table(&g, &self.spec, d, BridgePhase::Steady { cursor: g.l });
        let bridge = self.names.bridge.clone();
        kern(self.kernel.load(&bridge, &table, &self.key_hex))?;
        if let Err(e) = self.kernel.suspend(&bridge) {
            let r = self.kernel.clear_inactive(&bridge);
            undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", bridge), r);
            return Err(EngineError::Kernel(e.context("suspending the bridge")));
        }
        // Suspended: nothing writes to [0, F). Shadow, flush, marker, flush: from the marker
        // on, the label lives only in the shadow. A fence that finds our marker already in
        // place (an earlier attempt got that far) keeps the shadow it made.
        let merged = self.fence_merge().inspect_err(|_e| {
            let r = self.kernel.clear_inactive(&bridge);
            undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", bridge), r);
            let r = self.kernel.resume(&bridge);
            undone(&mut self.undo_failed, || format!("resuming {}", bridge), r);
        })?;
        if !merged {
            io(self.disk.read(0, &mut self.fence_buf), || "reading the label sectors".into()).inspect_err(|_e| {
                let r = self.kernel.clear_inactive(&bridge);
                undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", bridge), r);
                let r = self.kernel.resume(&bridge);
                undone(&mut self.undo_failed, || format!("resuming {}", bridge), r);
            })?;
            let r = (|| {
                io(self.disk.write(g.shadow, &self.fence_buf), || "writing the shadow".into())?;
                io(self.disk.flush(), || "flushing the shadow".into())?;
                let m = marker::encode(&self.rec.luks_uuid, g.journal);
                io(self.disk.write(0, &m[..Sectors(g.f).byte_len()]), || "writing the fence marker".into())?;
                io(self.disk.flush(), || "flushing the fence marker".into())
            })();
            if let Err(e) = r {
                // Put the label back where the old table reads it, then back out.
                let orig = self.fence_buf.to_vec();
                let r = self.disk.write(0, &orig).and_then(|_| self.disk.flush());
                undone(&mut self.undo_failed, || "putting the first sectors back".to_string(), r);
                let r = self.kernel.clear_inactive(&bridge);
                undone(&mut self.undo_failed, || format!("clearing the inactive table of {}", bridge), r);
                let r = self.kernel.resume(&bridge);
                undone(&mut self.undo_failed, || format!("resuming {}", bridge), r);
                return Err(e);
            }
        }
        // The shadow-mapped table goes live whatever the journal write does: a resume from
        // `Bridged` finds the marker and maps the shadow too (see `rebuild`).
        let c = self.commit(State::Migrating { cursor: g.l });
        kern(self.kernel.resume(&bridge))?;
        c
    }

    /// An earlier fence got as far as writing (part of) the marker but not its journal
    /// record: the shadow it flushed first is where the label is. Sector by sector, a
    /// sector that holds our marker comes from the shadow, any other from the raw device
    /// (the marker never reached it). Completes shadow and marker; returns whether there
    /// was such an earlier fence (false: raw [0, F) holds no sector of our marker).
    pub(super) fn fence_merge(&mut self) -> EResult<bool> {
        let g = *self.g();
        let f = Sectors(g.f).byte_len();
        let mut raw = vec![0u8; f];
        let mut shadow = vec![0u8; f];
        io(self.disk.read(0, &mut raw), || "reading the label sectors".into())?;
        let marked: Vec<bool> = (0..f / SECTOR_BYTES)
            .map(|i| marker::is_marker_sector(&raw[sector(i)], i, &self.rec.luks_uuid, g.journal))
            .collect();
        if !marked.iter().any(|&m| m) {
            return Ok(false);
        }
        io(self.disk.read(g.shadow, &mut shadow), || "reading the shadow".into())?;
        for (i, m) in marked.iter().enumerate() {
            if !m {
                shadow[sector(i)].copy_from_slice(&raw[sector(i)]);
            }
        }
        io(self.disk.write(g.shadow, &shadow), || "writing the shadow".into())?;
        io(self.disk.flush(), || "flushing the shadow".into())?;
        self.write_marker()?;
        Ok(true)
    }

    pub(super) fn write_marker(&mut self) -> EResult<()> {
        let m = marker::encode(&self.rec.luks_uuid, self.g().journal);
        io(self.disk.write(0, &m[..Sectors(self.g().f).byte_len()]), || "writing the fence marker".into())?;
        io(self.disk.flush(), || "flushing the fence marker".into())
    }
}
