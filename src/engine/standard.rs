//! LUKS2 conversions in cryptsetup's standard format (DESIGN.md, "The standard format
//! mid-way"; journal-format.md, "LUKS2").
//!
//! Nothing is written to the device before the cut-over: the bridge goes in under the LVs
//! exactly as for LUKS1, its records live in memory only. The cut-over, with the bridge
//! suspended, copies the first S plaintext sectors to the moved segment [L+S, L+2S),
//! writes the LUKS2 header of an encryption in progress over [0, S) (everything but its
//! first 4 KiB first, then those), and resumes the bridge with the table `cryptsetup open`
//! builds for that header. From then on the device is what `cryptsetup reencrypt
//! --encrypt --reduce-device-size 2S` would have made of it, and libcryptsetup's own
//! online reencryption runs the data phase (the caller's job). At the end the mapping
//! becomes what `cryptsetup open` maps for the final header ([`Engine::finish_standard`]).

use super::*;
use crate::core::tables::Target;

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
        if g.l < g.s || g.n < g.l + 2 * g.s {
            return Err(EngineError::Refused(format!(
                "a LUKS2 conversion needs L >= S and 2S sectors past the PV (L {} S {} device {})",
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
        let mut t = vec![Line { start: 0, length: g.s, target: Target::Linear { dev: self.raw, offset: g.l + g.s } }];
        if g.l > g.s {
            t.push(Line { start: g.s, length: g.l - g.s, target: Target::Linear { dev: self.raw, offset: g.s } });
        }
        t
    }

    /// Bridged → a LUKS2 reencryption in progress. On error, whether the header may be on
    /// the device (then the bridge stays: the device is a standard reencryption or, if the
    /// plaintext could not be put back, says so).
    fn cut_over(&mut self) -> Result<CutOver, (EngineError, bool)> {
        let g = *self.g();
        let (s, l) = (g.s, g.l);
        let bridge = self.names.bridge.clone();
        let table = self.cut_over_table();
        let before = |e| (e, false);
        // Everything the suspended window needs is allocated (and, under mlockall, faulted
        // in) before the suspend.
        let buf = |n: usize| io(IoBuf::new(n), || "allocating the cut-over buffers".into());
        let mut plain = buf(Sectors(s).byte_len()).map_err(before)?;
        let mut back = buf(Sectors(s).byte_len()).map_err(before)?;
        let mut hdr = buf(self.header.len()).map_err(before)?;
        hdr.copy_from_slice(&self.header);
        kern(self.kernel.load(&bridge, &table, &self.key_hex)).map_err(before)?;
        if let Err(e) = self.kernel.suspend(&bridge) {
            let r = self.kernel.clear_inactive(&bridge);
            undone(&mut self.undo_failed, || format!("clearing the inactive table of {bridge}"), r);
            return Err((EngineError::Kernel(e.context("suspending the bridge for the cut-over")), false));
        }
        let t0 = Instant::now();
        // 1. The moved segment: the first S sectors at L + S, flushed and read back.
        let moved = (|| -> std::io::Result<()> {
            self.disk.read(0, &mut plain)?;
            self.disk.write(l + s, &plain)?;
            self.disk.flush()?;
            self.disk.read(l + s, &mut back)?;
            if back[..] != plain[..] {
                return Err(std::io::Error::other("the moved segment reads back different from what was written"));
            }
            Ok(())
        })();
        if let Err(e) = moved {
            self.resume_old(&bridge);
            return Err((EngineError::Io { what: format!("copying sectors 0..{s} to {}", l + s), source: e }, false));
        }
        // 2. The header: all but its first 4 KiB (so the secondary copy and the keyslots are
        // complete), flush, then the first 4 KiB (the LVM label goes), flush.
        let header = (|| -> std::io::Result<()> {
            self.disk.write(8, &hdr[4096..])?;
            self.disk.flush()?;
            self.disk.write(0, &hdr[..4096])?;
            self.disk.flush()
        })();
        if let Err(e) = header {
            // [0, S) may hold part of the header: put the plaintext back before the old table
            // maps it again.
            let put_back = self.disk.write(0, &plain).and_then(|_| self.disk.flush());
            return match put_back {
                Ok(()) => {
                    self.resume_old(&bridge);
                    Err((
                        EngineError::Io {
                            what: "writing the LUKS2 header (the plaintext is back in place)".into(),
                            source: e,
                        },
                        false,
                    ))
                }
                Err(e2) => {
                    // Neither: map the moved copy (the new table) and say what the disk holds.
                    let r = self.kernel.resume(&bridge);
                    undone(&mut self.undo_failed, || format!("resuming {bridge}"), r);
                    Err((
                        EngineError::Io {
                            what: format!(
                                "writing the LUKS2 header failed and putting sectors 0..{s} back failed too ({e2}); the device's first {s} sectors are intact at sector {} (the bridge maps them from there)",
                                l + s
                            ),
                            source: e,
                        },
                        true,
                    ))
                }
            };
        }
        // 3. The new table goes live.
        kern(self.kernel.resume(&bridge)).map_err(|e| (e, true))?;
        let stall = t0.elapsed();
        // 4. No plaintext stays behind the header: [H, S) zeroed (nothing maps it now).
        let h = self.header.len();
        let zeros = &mut self.verify_src;
        zeros.fill(0);
        let s_bytes = Sectors(s).byte_len();
        let mut at = h;
        while at < s_bytes {
            let n = zeros.len().min(s_bytes - at);
            io(self.disk.write(Sectors::in_len(at).0, &zeros[..n]), || "zeroing the rest of the header area".into())
                .map_err(|e| (e, true))?;
            at += n;
        }
        io(self.disk.flush(), || "flushing the header area".into()).map_err(|e| (e, true))?;
        self.remove_helpers().map_err(|e| (e, true))?;
        Ok(CutOver { stall })
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
        self.report_undo_failures(hooks);
        r?;
        let bridge = self.names.bridge.clone();
        let _ = hooks.lvm_resize(&bridge);
        hooks.event(&Event::Done);
        Ok(())
    }
}
