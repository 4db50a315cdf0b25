//! The end of a conversion: the LUKS header over [0, S) (`finish`), the table `cryptsetup
//! open` makes, the tail wiped and the journal cleared (`cleanup`); and giving up a
//! conversion that changed nothing yet (`abandon`).

use super::*;

impl<D: Disk, K: Kernel> Engine<D, K> {
    /// Migrating{0} → HeaderWritten: the bridge is already the pure crypt table; drop the
    /// staging device and write the LUKS header over [0, S), marker last.
    pub(super) fn finish(&mut self) -> EResult<()> {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        let table = kern(self.kernel.table(&bridge))?;
        let d = self.devices()?;
        let want = tables::bridge_table(&g, &self.spec, d, BridgePhase::Final);
        if table.len() != 1 || table[0].target_type != "crypt" || table[0].length != g.l {
            // Not yet the pure crypt table (a resume at cursor 0 may land here): load it.
            self.swap_table(&bridge, &want, "bridge")?;
        }
        self.remove_helpers()?;
        // [F, S) first, then [0, F) (where the marker is) in one 4 KiB write. The area is
        // the header followed by zeros (no plaintext may stay behind it), written from one
        // piece-sized buffer: S may be 128 MiB, and under mlockall a buffer that size is
        // faulted in and locked page by page (seconds in UML).
        let f = Sectors(g.f).byte_len();
        let s_bytes = Sectors(g.s).byte_len();
        let header = std::mem::take(&mut self.header);
        let buf = &mut self.verify_src;
        let disk = &mut self.disk;
        let piece_of = |buf: &mut [u8], at: usize, n: usize| {
            buf[..n].fill(0);
            if at < header.len() {
                let end = header.len().min(at + n);
                buf[..end - at].copy_from_slice(&header[at..end]);
            }
        };
        let mut r = Ok(());
        let mut at = f;
        while at < s_bytes && r.is_ok() {
            let n = buf.len().min(s_bytes - at);
            piece_of(buf, at, n);
            r = disk.write(Sectors::in_len(at).0, &buf[..n]);
            at += n;
        }
        let r = r
            .and_then(|_| disk.flush())
            .and_then(|_| {
                piece_of(buf, 0, f);
                disk.write(0, &buf[..f])
            })
            .and_then(|_| disk.flush());
        self.header = header;
        io(r, || "writing the LUKS header".into())?;
        self.commit(State::HeaderWritten)
    }

    /// HeaderWritten → done: the bridge becomes what `cryptsetup open` maps (and is shown to
    /// udev), the copies in the tail are wiped, the journal cleared (older slot first, so a
    /// crash leaves HeaderWritten, never an older state); only then may LVM grow the PV over
    /// the tail (`pvresize`), which is no longer luksify's.
    pub(super) fn cleanup(&mut self, hooks: &mut dyn Hooks) -> EResult<()> {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        self.open_as_cryptsetup_would()?;
        let mut scratch = vec![0u8; 1 << 20];
        let (at, len) = (Sectors(g.shadow).bytes(), Sectors(g.header_copy_len + g.f).bytes());
        io(self.disk.write_zeros(at, len, &mut scratch), || "wiping the header copy".into())?;
        io(self.disk.flush(), || "flushing".into())?;
        let newest = journal::slot_for(self.rec.seq);
        let z = vec![0u8; SLOT_BYTES];
        for slot in [1 - newest, newest] {
            io(self.disk.write(g.journal_slot(slot), &z), || "clearing the journal".into())?;
            io(self.disk.flush(), || "flushing".into())?;
        }
        let _ = hooks.lvm_resize(&bridge);
        Ok(())
    }

    /// The finished bridge becomes exactly what `cryptsetup open` maps for the same header:
    /// N − S sectors (the header's dynamic data segment), and for LUKS2 the volume key through
    /// the kernel keyring (`:64:logon:cryptsetup:<uuid>-d0`) instead of in the table, so that
    /// no table read-back (`dmsetup table --showkeys`) shows it. The same data as before in
    /// [0, L); [L, N − S) maps the tail, which the PV does not reach until `pvresize`. Its
    /// resume is the bridge's first one without the udev flags, so udev (blkid, /dev/disk
    /// links, LVM's pvscan) processes it as the LUKS mapping it now is; a synthetic "change"
    /// event would not do: udev would re-import the old flags from its database. Idempotent:
    /// a resume from HeaderWritten does it again.
    pub(super) fn open_as_cryptsetup_would(&mut self) -> EResult<()> {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        let table = [Line {
            start: 0,
            length: g.n - g.s,
            target: tables::Target::Crypt { spec: self.spec.clone(), iv_offset: 0, dev: self.raw, offset: g.s },
        }];
        let key = self.cryptsetup_key()?;
        // this table's resume is the first one udev may see
        self.kernel.set_udev_hidden(&bridge, false);
        let r = self.swap_table_keyed(&bridge, &table, key.as_ref().map(|k| k.1.as_str()), "bridge");
        self.drop_cryptsetup_key(key);
        r
    }

    /// Give up a conversion that has not changed anything yet (state `Prepared`, in the
    /// process that prepared it): remove our dm devices if any, and restore the tail as it
    /// was, so the device is byte-for-byte what it was before. Returns false (and does
    /// nothing) in any other state: there the journal is the way forward.
    pub fn abandon(&mut self) -> EResult<bool> {
        let Some(orig) = self.original_tail.take() else { return Ok(false) };
        if self.rec.state != State::Prepared {
            self.original_tail = Some(orig);
            return Ok(false);
        }
        if kern(self.kernel.lookup(&self.names.bridge))?.is_some() {
            kern(self.kernel.remove(&self.names.bridge.clone()))?;
        }
        self.remove_helpers()?;
        let g = *self.g();
        io(self.disk.write(g.shadow, &orig), || "restoring the tail".into())?;
        io(self.disk.flush(), || "flushing the tail".into())?;
        Ok(true)
    }
}
