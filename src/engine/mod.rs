//! The engine: drives the pure core through the [`Disk`] and [`Kernel`] traits, step by
//! step, committing to the journal at exactly the points DESIGN.md prescribes.
//!
//! The same code runs on the real kernel (adapters) and on the simulator (tests), which
//! crashes it at every I/O and every ioctl in turn.

pub mod traits;
#[cfg(test)]
pub mod sim;

use crate::core::geometry::{Geometry, JOURNAL_SLOT_SECTORS};
use crate::core::journal::{self, Record, State, SLOT_BYTES};
use crate::core::marker;
use crate::core::state::{self, Step};
use crate::core::tables::{self, BridgePhase, CryptSpec, DevRef, Devices, Line};
use crate::core::facts::TableLineFacts;
pub use traits::{Disk, HolderTable, KResult, Kernel, KernelError, MirrorOutcome};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Bytes compared per read when a chunk's copy is verified (two buffers of this size are
/// allocated up front: nothing is allocated while the bridge is suspended).
const VERIFY_PIECE: usize = 1 << 20;
/// Runs of sectors remembered for a recheck (more are merged into the last one).
const RECHECK_RUNS: usize = 4096;

/// What went wrong, and in which state the device was left.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Kernel(String),
    #[error("{0}")]
    Journal(String),
    #[error("{0}")]
    Refused(String),
    #[error("the copy of chunk {from}..{to} failed (mirror health {health}); the conversion stopped at a safe point (cursor {to}), nothing is lost; fix the device and run `luksify resume`")]
    MirrorFailed { from: u64, to: u64, health: String },
    #[error("the copy of chunk {from}..{to} does not match its source at sector {sector} ({why}); dm-mirror reported it in sync (it hides read errors during recovery); the conversion stopped at a safe point (cursor {to}), nothing is lost; fix the device and run `luksify resume`")]
    CopyMismatch { from: u64, to: u64, sector: u64, why: String },
    #[error("stopped at a safe point (cursor {0})")]
    Stopped(u64),
}

pub type EResult<T> = Result<T, EngineError>;

fn io<T>(r: std::io::Result<T>, what: impl FnOnce() -> String) -> EResult<T> {
    r.map_err(|source| EngineError::Io { what: what(), source })
}

fn kern<T>(r: KResult<T>) -> EResult<T> {
    r.map_err(|e| EngineError::Kernel(e.0))
}

/// Progress events for the front end (a bar, JSON lines, or nothing).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Committed(State),
    ChunkStart { from: u64, to: u64 },
    ChunkDone { from: u64, to: u64, stats: ChunkStats },
    Done,
}

/// How one chunk went: where its time went, and how long live I/O on the bridge waited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// From the start of the step until the mirror reported every region in sync.
    pub copy: Duration,
    /// Flushing the copy and comparing every sector with its source (bridge live).
    pub verify: Duration,
    /// The longest window in which the bridge was suspended (live I/O waited this long).
    pub stall: Duration,
    /// Sectors that live writes changed during the check, compared again while suspended.
    pub rechecked: u64,
    /// Mirror targets that copied the chunk side by side.
    pub streams: u64,
    /// Their region size in sectors.
    pub region: u64,
}

/// What the engine asks of its caller besides the kernel and the disk.
pub trait Hooks {
    fn event(&mut self, _e: &Event) {}
    /// A stop was requested (SIGINT/SIGTERM): the engine stops at the next commit point.
    fn stop_requested(&self) -> bool {
        false
    }
    /// Make LVM agree with the new, smaller device (`pvresize` on the bridge). Best effort:
    /// an error here is reported, not fatal (the data is all there).
    fn lvm_resize(&mut self, _bridge: &str) -> Result<(), String> {
        Ok(())
    }
}

/// Hooks that do nothing (tests, offline resume).
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Names and identities of the dm devices of one conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub bridge: String,
    pub bridge_uuid: String,
    pub staging: String,
    pub staging_uuid: String,
    /// The private helper holding the chunk in flight (see `tables::Devices::mirror`).
    pub mirror: String,
    pub mirror_uuid: String,
}

impl Names {
    /// The bridge gets the DM UUID cryptsetup gives its own LUKS devices, so that
    /// `cryptsetup status` reports it as a LUKS device once converted; the staging device is
    /// a private CRYPT-SUBDEV- helper.
    pub fn new(name: &str, luks_version: u8, luks_uuid: &str) -> Names {
        let u = luks_uuid.replace('-', "");
        Names {
            bridge: name.to_string(),
            bridge_uuid: format!("CRYPT-LUKS{luks_version}-{u}-{name}"),
            staging: format!("{name}-luksify"),
            staging_uuid: format!("CRYPT-SUBDEV-{u}-{name}-luksify"),
            mirror: format!("{name}-luksify-mirror"),
            mirror_uuid: format!("CRYPT-SUBDEV-{u}-{name}-luksify-mirror"),
        }
    }
}

/// One conversion in flight.
pub struct Engine<D: Disk, K: Kernel> {
    pub disk: D,
    pub kernel: K,
    pub rec: Record,
    pub names: Names,
    raw: DevRef,
    spec: CryptSpec,
    key_hex: Zeroizing<String>,
    /// The header copy (H bytes), as written in the tail.
    header: Vec<u8>,
    /// Buffers allocated before any suspend, so that a suspended window allocates nothing.
    fence_buf: Vec<u8>,
    slot_buf: Vec<u8>,
    /// The new cipher, to check each copied chunk against its source before the commit.
    xts: Option<crate::core::xts::Xts>,
    verify_src: Vec<u8>,
    verify_dst: Vec<u8>,
    /// Runs of sectors to compare again (capacity fixed up front).
    recheck: Vec<(u64, u64)>,
    /// Cap on the copy rate in bytes per second (`--rate`): the engine pauses between
    /// chunks so that the average stays below it.
    pub rate: Option<u64>,
    /// Mirror targets per chunk (`--streams`); None: [`tables::STREAMS`].
    pub streams: Option<u64>,
    /// How chunks are copied in this run, decided at its first chunk ([`Engine::copy_shape`]).
    shape: Option<tables::CopyShape>,
    /// What the tail held before `prepare` wrote into it: while nothing else has changed
    /// (state `Prepared`), [`Engine::abandon`] puts it back, byte for byte.
    original_tail: Option<Vec<u8>>,
    /// TESTS ONLY: flip the bridge table to crypt *before* the journal commit, the order
    /// DESIGN.md forbids. The crash simulation sets it to prove that its sweep catches a
    /// wrong order; nothing else may.
    #[doc(hidden)]
    pub wrong_order_for_tests: bool,
}

impl<D: Disk, K: Kernel> Engine<D, K> {
    fn g(&self) -> &Geometry {
        &self.rec.geometry
    }

    /// The devices the tables refer to; helpers that do not exist are named by the raw
    /// device (only tables that do not reference them are built then).
    fn devices(&mut self) -> EResult<Devices> {
        let staging = kern(self.kernel.lookup(&self.names.staging))?.unwrap_or(self.raw);
        let mirror = kern(self.kernel.lookup(&self.names.mirror))?.unwrap_or(self.raw);
        Ok(Devices { raw: self.raw, staging, mirror })
    }

    /// The staging crypt device and the idle mirror device, created if missing.
    fn ensure_helpers(&mut self) -> EResult<Devices> {
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
                    let _ = self.kernel.remove(&n);
                    return Err(EngineError::Kernel(format!("setting up the mirror device: {e}")));
                }
                d
            }
        };
        Ok(Devices { raw: self.raw, staging, mirror })
    }

    /// Remove the helpers (nothing references them once the bridge is pure crypt).
    fn remove_helpers(&mut self) -> EResult<()> {
        for n in [self.names.mirror.clone(), self.names.staging.clone()] {
            if kern(self.kernel.lookup(&n))?.is_some() {
                kern(self.kernel.remove(&n))?;
            }
        }
        Ok(())
    }

    /// Start a fresh conversion: write the header copy and the first journal record
    /// (`Prepared`) into the tail. Nothing else on the device changes.
    /// `key` is the raw volume key; `header` the formatted LUKS header (H bytes).
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        mut disk: D,
        kernel: K,
        raw: DevRef,
        geometry: Geometry,
        name: &str,
        luks_version: u8,
        luks_uuid: &str,
        cipher: &str,
        allow_discards: bool,
        pv_uuid: &str,
        key: &[u8],
        header: Vec<u8>,
    ) -> EResult<Self> {
        let h = header.len() as u64;
        if h == 0 || h % 4096 != 0 || h > geometry.header_copy_len * 512 {
            return Err(EngineError::Refused(format!(
                "the LUKS header is {h} bytes; luksify reserves {} bytes for its copy",
                geometry.header_copy_len * 512
            )));
        }
        let rec = Record {
            seq: 1,
            state: State::Prepared,
            geometry,
            luks_version,
            luks_uuid: luks_uuid.to_string(),
            cipher: cipher.to_string(),
            key_bytes: key.len() as u32,
            allow_discards,
            name: name.to_string(),
            pv_uuid: pv_uuid.to_string(),
            header_len: h as u32,
            header_crc: crc32fast::hash(&header),
        };
        let tail_len = (geometry.journal + 2 * JOURNAL_SLOT_SECTORS - geometry.shadow) * 512;
        let mut original = vec![0u8; tail_len as usize];
        io(disk.read(geometry.shadow, &mut original), || "reading the tail".into())?;
        io(disk.write(geometry.header_copy, &header), || "writing the header copy into the tail".into())?;
        io(disk.flush(), || "flushing the header copy".into())?;
        let mut e = Self::with_record(disk, kernel, raw, rec, key, header);
        e.original_tail = Some(original);
        e.write_record()?;
        Ok(e)
    }

    fn with_record(disk: D, mut kernel: K, raw: DevRef, rec: Record, key: &[u8], header: Vec<u8>) -> Self {
        let names = Names::new(&rec.name, rec.luks_version, &rec.luks_uuid);
        // Until the finish, the bridge shows the plaintext PV: keep udev rules (blkid, links)
        // and LVM's autoactivation (pvscan) off it. `cleanup` shows it to udev once it holds
        // the pure crypt table and the header is on disk.
        kernel.set_udev_hidden(&names.bridge, true);
        let mut hex = Zeroizing::new(String::with_capacity(key.len() * 2));
        for b in key {
            use std::fmt::Write;
            let _ = write!(hex, "{b:02x}");
        }
        Engine {
            disk,
            kernel,
            names,
            raw,
            spec: CryptSpec { cipher: rec.cipher.clone(), allow_discards: rec.allow_discards },
            key_hex: hex,
            header,
            fence_buf: vec![0u8; (rec.geometry.f * 512) as usize],
            slot_buf: vec![0u8; SLOT_BYTES],
            xts: (rec.cipher == "aes-xts-plain64").then(|| crate::core::xts::Xts::new(key)).flatten(),
            verify_src: vec![0u8; VERIFY_PIECE],
            verify_dst: vec![0u8; VERIFY_PIECE],
            recheck: Vec::with_capacity(RECHECK_RUNS),
            rate: None,
            streams: None,
            shape: None,
            original_tail: None,
            wrong_order_for_tests: false,
            rec,
        }
    }

    /// Read the journal from a device: None if there is none.
    pub fn read_journal(disk: &mut D, n_sectors: u64) -> EResult<Option<Record>> {
        let e = crate::core::geometry::align_down(n_sectors, 8);
        if e < 2 * JOURNAL_SLOT_SECTORS {
            return Ok(None);
        }
        let j = e - 2 * JOURNAL_SLOT_SECTORS;
        let mut a = vec![0u8; SLOT_BYTES];
        let mut b = vec![0u8; SLOT_BYTES];
        io(disk.read(j, &mut a), || "reading journal slot A".into())?;
        io(disk.read(j + JOURNAL_SLOT_SECTORS, &mut b), || "reading journal slot B".into())?;
        let rec = journal::choose(&a, &b).map_err(|e| EngineError::Journal(format!("the journal on the device is unreadable: {e}")))?;
        if let Some(r) = &rec {
            if r.geometry.n != n_sectors {
                return Err(EngineError::Refused(format!(
                    "the journal describes a device of {} sectors but this one has {n_sectors}: wrong device?",
                    r.geometry.n
                )));
            }
        }
        Ok(rec)
    }

    /// The header a resume unlocks the key with: once it is written at [0, S) (state
    /// `HeaderWritten`), the one on the device (the copy in the tail may already be wiped);
    /// before, the copy in the tail, checked against its CRC.
    pub fn read_header_copy(disk: &mut D, rec: &Record) -> EResult<Vec<u8>> {
        if rec.state == State::HeaderWritten {
            let mut h = vec![0u8; rec.header_len as usize];
            io(disk.read(0, &mut h), || "reading the LUKS header".into())?;
            return Ok(h);
        }
        let mut h = vec![0u8; rec.header_len as usize];
        io(disk.read(rec.geometry.header_copy, &mut h), || "reading the header copy".into())?;
        if crc32fast::hash(&h) != rec.header_crc {
            return Err(EngineError::Journal("the copy of the LUKS header in the tail is corrupt (CRC mismatch)".into()));
        }
        Ok(h)
    }

    /// Continue from a journal record (after a crash or a pause), with the volume key
    /// unlocked from the header copy. Checks the device's identity, then rebuilds the
    /// staging device and the bridge for the journaled state (see `state::resume_phase`).
    pub fn reopen(mut disk: D, kernel: K, raw: DevRef, rec: Record, key: &[u8], header: Vec<u8>) -> EResult<Self> {
        if key.len() as u32 != rec.key_bytes {
            return Err(EngineError::Refused("the unlocked key does not have the journaled size".into()));
        }
        // Identity: the PV label, in place before the fence, in the shadow after it.
        let g = rec.geometry;
        let mut label = vec![0u8; (g.f * 512) as usize];
        let fenced = matches!(rec.state, State::Migrating { .. });
        let mut at = if fenced { g.shadow } else { 0 };
        io(disk.read(at, &mut label), || "reading the PV label".into())?;
        if !fenced {
            // The fence wrote (part of) its marker but not its record: marked sectors are in
            // the shadow.
            let mut sh = vec![0u8; label.len()];
            io(disk.read(g.shadow, &mut sh), || "reading the shadow".into())?;
            for i in 0..label.len() / 512 {
                if marker::is_marker_sector(&label[i * 512..(i + 1) * 512], i, &rec.luks_uuid, g.journal) {
                    label[i * 512..(i + 1) * 512].copy_from_slice(&sh[i * 512..(i + 1) * 512]);
                    at = g.shadow;
                }
            }
        }
        if !rec.pv_uuid.is_empty() {
            match marker::pv_uuid(&label) {
                Some(u) if u == rec.pv_uuid => {}
                Some(u) => {
                    return Err(EngineError::Refused(format!(
                        "this device's PV UUID is {u} but the journal was written for {}: wrong device",
                        rec.pv_uuid
                    )))
                }
                None if rec.state == State::HeaderWritten || matches!(rec.state, State::Migrating { cursor: 0 }) => {}
                None => {
                    return Err(EngineError::Refused(format!(
                        "no LVM label where the journal says it is (sector {at}): the device does not match its journal"
                    )))
                }
            }
        }
        let mut e = Self::with_record(disk, kernel, raw, rec, key, header);
        e.rebuild()?;
        Ok(e)
    }

    /// Make the dm devices match the journal: create what is missing, reload what exists.
    fn rebuild(&mut self) -> EResult<()> {
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
                // Live resume: whatever the bridge had (even a mirror in flight, whose source
                // leg is complete), it now gets the journaled table.
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
        let except = [self.names.bridge.as_str(), self.names.staging.as_str(), self.names.mirror.as_str()];
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

    fn ensure_staging(&mut self) -> EResult<DevRef> {
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
            let _ = self.kernel.remove(&n);
            return Err(EngineError::Kernel(format!("setting up the staging crypt device: {e}")));
        }
        Ok(d)
    }

    /// Load `table` inactive, suspend, resume: the only way a live table changes.
    fn swap_table(&mut self, name: &str, table: &[Line], what: &'static str) -> EResult<()> {
        kern(self.kernel.load(name, table, &self.key_hex))?;
        if let Err(e) = self.kernel.suspend(name) {
            let _ = self.kernel.clear_inactive(name);
            return Err(EngineError::Kernel(format!("suspending the {what}: {e}")));
        }
        kern(self.kernel.resume(name))
    }

    /// Write the journal record `self.rec` into its slot and flush.
    fn write_record(&mut self) -> EResult<()> {
        let bytes = self.rec.encode().map_err(|e| EngineError::Journal(e.to_string()))?;
        self.slot_buf.copy_from_slice(&bytes);
        let slot = self.g().journal_slot(journal::slot_for(self.rec.seq));
        io(self.disk.write(slot, &self.slot_buf), || "writing the journal".into())?;
        io(self.disk.flush(), || "flushing the journal".into())
    }

    /// Commit `st` as the new durable state.
    fn commit(&mut self, st: State) -> EResult<()> {
        let old = self.rec.clone();
        self.rec.seq += 1;
        self.rec.state = st;
        if let Err(e) = self.write_record() {
            self.rec = old;
            return Err(e);
        }
        Ok(())
    }

    fn write_marker(&mut self) -> EResult<()> {
        let m = marker::encode(&self.rec.luks_uuid, self.g().journal);
        io(self.disk.write(0, &m[..(self.g().f * 512) as usize]), || "writing the fence marker".into())?;
        io(self.disk.flush(), || "flushing the fence marker".into())
    }

    /// Run to the end (or to a stop request at a commit point).
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> EResult<()> {
        loop {
            let st = self.rec.state;
            if hooks.stop_requested() && matches!(st, State::Migrating { cursor } if cursor > 0) {
                let State::Migrating { cursor } = st else { unreachable!() };
                return Err(EngineError::Stopped(cursor));
            }
            let step = state::next_step(self.g(), st);
            match step {
                Step::InsertBridge => self.insert_bridge()?,
                Step::Fence => self.fence()?,
                Step::MoveChunk { from, to } => {
                    hooks.event(&Event::ChunkStart { from, to });
                    let t = Instant::now();
                    let stats = self.move_chunk(from, to)?;
                    hooks.event(&Event::ChunkDone { from, to, stats });
                    self.pace(t, (to - from) * 512, hooks);
                }
                Step::Finish => self.finish()?,
                Step::Cleanup => {
                    self.cleanup(hooks)?;
                    hooks.event(&Event::Done);
                    return Ok(());
                }
            }
            debug_assert_eq!(Some(self.rec.state), state::after_in(self.g(), st, step));
            hooks.event(&Event::Committed(self.rec.state));
        }
    }

    /// `--rate`: after a chunk of `bytes` that started at `t`, wait until the average rate is
    /// back under the cap (a stop request cuts the wait short).
    fn pace(&self, t: Instant, bytes: u64, hooks: &mut dyn Hooks) {
        let Some(rate) = self.rate.filter(|&r| r > 0) else { return };
        let due = t + Duration::from_secs_f64(bytes as f64 / rate as f64);
        while !hooks.stop_requested() {
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
    }

    /// Prepared → Bridged: staging + bridge devices, every LV rerouted onto the bridge.
    fn insert_bridge(&mut self) -> EResult<()> {
        let d = self.ensure_helpers()?;
        let created_bridge = kern(self.kernel.lookup(&self.names.bridge))?.is_none();
        if created_bridge {
            let t = tables::bridge_table(self.g(), &self.spec, d, BridgePhase::Linear);
            let (n, u) = (self.names.bridge.clone(), self.names.bridge_uuid.clone());
            kern(self.kernel.create(&n, &u, false))?;
            if let Err(e) = self.kernel.load(&n, &t, &self.key_hex).and_then(|_| self.kernel.resume(&n)) {
                let _ = self.kernel.remove(&n);
                let _ = self.remove_helpers();
                return Err(EngineError::Kernel(format!("setting up the bridge: {e}")));
            }
        }
        let except = [self.names.bridge.as_str(), self.names.staging.as_str(), self.names.mirror.as_str()];
        let holders = kern(self.kernel.holders_of(self.raw, &except))?;
        if let Err(e) = self.reroute(holders) {
            if created_bridge {
                let _ = self.kernel.remove(&self.names.bridge.clone());
                let _ = self.remove_helpers();
            }
            return Err(e);
        }
        self.commit(State::Bridged)
    }

    /// Reroute every holder of the raw device onto the bridge, all or none.
    fn reroute(&mut self, holders: Vec<HolderTable>) -> EResult<()> {
        let bridge = kern(self.kernel.lookup(&self.names.bridge))?
            .ok_or_else(|| EngineError::Kernel("the bridge vanished".into()))?;
        let g = *self.g();
        let mut plans: Vec<(String, Vec<TableLineFacts>, Vec<TableLineFacts>)> = Vec::new();
        for h in holders {
            let mut new = Vec::new();
            for l in &h.table {
                let params = match tables::reroute_params(&l.target_type, &l.params, self.raw, bridge) {
                    Some(p) => p,
                    None if l.params.split_whitespace().any(|w| w == self.raw.to_string()) => {
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
            if !maps_within(&h.table, self.raw, g.l) {
                return Err(EngineError::Refused(format!("{} maps sectors of the device beyond the PV", h.name)));
            }
            plans.push((h.name, h.table, new));
        }
        // Phase 1: load every new table inactive. A failure clears them all: nothing changed.
        for (i, (name, _, new)) in plans.iter().enumerate() {
            if let Err(e) = self.kernel.load_lines(name, new) {
                for (n, _, _) in &plans[..i] {
                    let _ = self.kernel.clear_inactive(n);
                }
                return Err(EngineError::Kernel(format!(
                    "loading the rerouted table of {name} failed ({e}); every table is back as it was"
                )));
            }
        }
        // Phase 2: swap them in, one short suspend each. A failure puts back the old tables.
        for (i, (name, _, _)) in plans.iter().enumerate() {
            let r = self.kernel.suspend(name).and_then(|_| self.kernel.resume(name));
            if let Err(e) = r {
                let _ = self.kernel.resume(name);
                for (n, old, _) in plans[..i].iter().chain(std::iter::once(&plans[i])) {
                    let _ = self.kernel.load_lines(n, old);
                    let _ = self.kernel.suspend(n);
                    let _ = self.kernel.resume(n);
                }
                for (n, _, _) in &plans[i + 1..] {
                    let _ = self.kernel.clear_inactive(n);
                }
                return Err(EngineError::Kernel(format!("switching {name} onto the bridge failed ({e}); tables put back")));
            }
        }
        Ok(())
    }

    /// Bridged → Migrating{L}: shadow the label sectors, map them from the shadow, then
    /// overwrite them on the raw device with the marker.
    fn fence(&mut self) -> EResult<()> {
        let d = self.devices()?;
        let g = *self.g();
        let table = tables::bridge_table(&g, &self.spec, d, BridgePhase::Steady { cursor: g.l });
        let bridge = self.names.bridge.clone();
        kern(self.kernel.load(&bridge, &table, &self.key_hex))?;
        if let Err(e) = self.kernel.suspend(&bridge) {
            let _ = self.kernel.clear_inactive(&bridge);
            return Err(EngineError::Kernel(format!("suspending the bridge: {e}")));
        }
        // Suspended: nothing writes to [0, F). Shadow, flush, marker, flush: from the marker
        // on, the label lives only in the shadow. A fence that finds our marker already in
        // place (an earlier attempt got that far) keeps the shadow it made.
        let merged = self.fence_merge().map_err(|e| {
            let _ = self.kernel.clear_inactive(&bridge);
            let _ = self.kernel.resume(&bridge);
            e
        })?;
        if !merged {
            io(self.disk.read(0, &mut self.fence_buf), || "reading the label sectors".into()).map_err(|e| {
                let _ = self.kernel.clear_inactive(&bridge);
                let _ = self.kernel.resume(&bridge);
                e
            })?;
            let r = (|| {
                io(self.disk.write(g.shadow, &self.fence_buf), || "writing the shadow".into())?;
                io(self.disk.flush(), || "flushing the shadow".into())?;
                let m = marker::encode(&self.rec.luks_uuid, g.journal);
                io(self.disk.write(0, &m[..(g.f * 512) as usize]), || "writing the fence marker".into())?;
                io(self.disk.flush(), || "flushing the fence marker".into())
            })();
            if let Err(e) = r {
                // Put the label back where the old table reads it, then back out.
                let orig = self.fence_buf.clone();
                let _ = self.disk.write(0, &orig).and_then(|_| self.disk.flush());
                let _ = self.kernel.clear_inactive(&bridge);
                let _ = self.kernel.resume(&bridge);
                return Err(e);
            }
        }
        // The shadow-mapped table goes live whatever the journal write does: a resume from
        // `Bridged` finds the marker and maps the shadow too (see `rebuild`).
        let c = self.commit(State::Migrating { cursor: g.l });
        kern(self.kernel.resume(&bridge))?;
        c
    }

    /// Compare the sectors `runs` (half-open ranges inside one chunk) at their destination
    /// with their source encrypted with the new key. Sectors that differ are appended to
    /// `bad` as runs (at most `bad`'s capacity; the rest are counted) when `bad` is given;
    /// without it, the first difference is an error. Reads go to the raw device (O_DIRECT),
    /// so a source that cannot be read fails here.
    fn compare_runs(&mut self, chunk: (u64, u64), runs: &[(u64, u64)], mut bad: Option<&mut Vec<(u64, u64)>>) -> EResult<u64> {
        let Some(xts) = &self.xts else { return Ok(0) };
        let g = *self.g();
        let (from, to) = chunk;
        let piece = (VERIFY_PIECE / 512) as u64;
        let mut differing = 0u64;
        for &(ra, rb) in runs {
            let mut a = ra;
            while a < rb {
                // Never straddle the fence boundary: [0, F) reads from the shadow.
                let lim = if a < g.f { g.f } else { rb };
                let b = (a + piece).min(rb).min(lim);
                let n = ((b - a) * 512) as usize;
                let src_at = if a < g.f { g.shadow + a } else { a };
                let fail = |why: String| EngineError::CopyMismatch { from, to, sector: a, why };
                self.disk.read(src_at, &mut self.verify_src[..n]).map_err(|e| fail(format!("reading the source: {e}")))?;
                self.disk.read(g.s + a, &mut self.verify_dst[..n]).map_err(|e| fail(format!("reading the copy: {e}")))?;
                xts.encrypt_sectors(&mut self.verify_src[..n], a);
                for i in 0..n / 512 {
                    if self.verify_src[i * 512..(i + 1) * 512] == self.verify_dst[i * 512..(i + 1) * 512] {
                        continue;
                    }
                    let sector = a + i as u64;
                    let Some(bad) = bad.as_deref_mut() else {
                        return Err(EngineError::CopyMismatch { from, to, sector, why: "different data".into() });
                    };
                    differing += 1;
                    let room = bad.len() < bad.capacity();
                    match bad.last_mut() {
                        Some(last) if last.1 == sector || !room => {
                            // Contiguous, or out of room: widen the last run to cover this
                            // sector (rechecking more than needed is only slower).
                            last.1 = sector + 1
                        }
                        _ => bad.push((sector, sector + 1)),
                    }
                }
                a = b;
            }
        }
        Ok(differing)
    }

    /// An earlier fence got as far as writing (part of) the marker but not its journal
    /// record: the shadow it flushed first is where the label is. Sector by sector, a
    /// sector that holds our marker comes from the shadow, any other from the raw device
    /// (the marker never reached it). Completes shadow and marker; returns whether there
    /// was such an earlier fence (false: raw [0, F) holds no sector of our marker).
    fn fence_merge(&mut self) -> EResult<bool> {
        let g = *self.g();
        let f = (g.f * 512) as usize;
        let mut raw = vec![0u8; f];
        let mut shadow = vec![0u8; f];
        io(self.disk.read(0, &mut raw), || "reading the label sectors".into())?;
        let marked: Vec<bool> = (0..f / 512)
            .map(|i| marker::is_marker_sector(&raw[i * 512..(i + 1) * 512], i, &self.rec.luks_uuid, g.journal))
            .collect();
        if !marked.iter().any(|&m| m) {
            return Ok(false);
        }
        io(self.disk.read(g.shadow, &mut shadow), || "reading the shadow".into())?;
        for (i, m) in marked.iter().enumerate() {
            if !m {
                shadow[i * 512..(i + 1) * 512].copy_from_slice(&raw[i * 512..(i + 1) * 512]);
            }
        }
        io(self.disk.write(g.shadow, &shadow), || "writing the shadow".into())?;
        io(self.disk.flush(), || "flushing the shadow".into())?;
        self.write_marker()?;
        Ok(true)
    }


    /// Migrating{to} → Migrating{from}: the commit protocol of DESIGN.md.
    ///
    /// Everything slow happens while the bridge is live: the mirror's copy, the flush that
    /// makes it durable, and the check of every copied sector against its source. The
    /// bridge is then suspended only to confirm (mirror still in sync, both legs healthy,
    /// sectors that live writes changed during the check compared again), commit the
    /// journal and flip the table.
    fn move_chunk(&mut self, from: u64, to: u64) -> EResult<ChunkStats> {
        let t0 = Instant::now();
        let mut stats = ChunkStats::default();
        let d = self.ensure_helpers()?;
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        let mirror = self.names.mirror.clone();
        // 1. chunk as mirror, live. The bridge is suspended while the mirror device gets the
        //    chunk's table, so no write can reach the source behind the mirror's back.
        let shape = self.copy_shape()?;
        (stats.streams, stats.region) = (shape.streams, shape.region);
        let mt = tables::mirror_table(&g, d, from, to, shape);
        let bt = tables::bridge_table(&g, &self.spec, d, BridgePhase::Mirroring { from, to });
        kern(self.kernel.load(&mirror, &mt, &self.key_hex))?;
        if let Err(e) = self.kernel.load(&bridge, &bt, &self.key_hex) {
            let _ = self.kernel.clear_inactive(&mirror);
            return Err(EngineError::Kernel(e.0));
        }
        let w = Instant::now();
        let r = self
            .kernel
            .suspend(&bridge)
            .and_then(|_| self.kernel.suspend(&mirror))
            .and_then(|_| self.kernel.resume(&mirror))
            .and_then(|_| self.kernel.resume(&bridge));
        stats.stall = w.elapsed();
        if let Err(e) = r {
            let _ = self.kernel.clear_inactive(&bridge);
            let _ = self.kernel.clear_inactive(&mirror);
            let _ = self.kernel.resume(&mirror);
            let _ = self.kernel.resume(&bridge);
            return Err(EngineError::Kernel(format!("switching chunk {from}..{to} to the mirror: {e}")));
        }
        // Back to the journaled state (cursor `to`: the source leg is complete) after a
        // failure before the commit.
        let back = tables::bridge_table(&g, &self.spec, d, BridgePhase::Steady { cursor: to });
        // 2. wait until every region is in sync and both legs are healthy.
        match kern(self.kernel.wait_mirror(&mirror))? {
            MirrorOutcome::Synced => {}
            MirrorOutcome::Failed(health) => {
                self.swap_table(&bridge, &back, "bridge")?;
                return Err(EngineError::MirrorFailed { from, to, health });
            }
        }
        stats.copy = t0.elapsed();
        let steady = tables::bridge_table(&g, &self.spec, d, BridgePhase::Steady { cursor: from });
        if self.wrong_order_for_tests {
            self.swap_table(&bridge, &steady, "bridge")?;
            io(self.disk.flush(), || "flushing the copied chunk".into())?;
            self.commit(State::Migrating { cursor: from })?;
            return Ok(stats);
        }
        // 3. Live: kcopyd's writes are not FUA, so flush them; then check every copied
        //    sector. Every region is in sync, so live writes now reach both legs (a write
        //    racing with the check may make a sector differ for a moment: it is rechecked).
        let t1 = Instant::now();
        let mut recheck = std::mem::take(&mut self.recheck);
        recheck.clear();
        let live = io(self.disk.flush(), || "flushing the copied chunk".into())
            .and_then(|_| self.compare_runs((from, to), &[(from, to)], Some(&mut recheck)));
        let live = live.and_then(|mut n| {
            // A few more live rounds over what differed, so that little is left for the
            // suspended window.
            for _ in 0..3 {
                if n == 0 {
                    break;
                }
                let runs = std::mem::take(&mut recheck);
                recheck = Vec::with_capacity(runs.capacity());
                n = self.compare_runs((from, to), &runs, Some(&mut recheck))?;
            }
            Ok(())
        });
        if let Err(e) = live {
            self.recheck = recheck;
            self.swap_table(&bridge, &back, "bridge")?;
            return Err(e);
        }
        stats.verify = t1.elapsed();
        // 4. Quiesce: with the bridge suspended no write can reach the mirror, so the health
        //    and sync checked now are final, and so is the recheck of what live writes
        //    touched during the check. Then commit while the mirror table is still live.
        kern(self.kernel.load(&bridge, &steady, &self.key_hex))?;
        let w = Instant::now();
        if let Err(e) = self.kernel.suspend(&bridge) {
            let _ = self.kernel.clear_inactive(&bridge);
            self.recheck = recheck;
            return Err(EngineError::Kernel(format!("suspending the bridge: {e}")));
        }
        let checked = match self.kernel.wait_mirror(&mirror) {
            Ok(MirrorOutcome::Synced) => Ok(()),
            Ok(MirrorOutcome::Failed(health)) => Err(EngineError::MirrorFailed { from, to, health }),
            Err(e) => Err(EngineError::Kernel(e.0)),
        };
        stats.rechecked = recheck.iter().map(|r| r.1 - r.0).sum();
        // dm-mirror without handle_errors reports a region whose recovery failed to read
        // its source as in sync and healthy (seen on Linux 6.1): the check above is ours.
        let checked = checked.and_then(|_| self.compare_runs((from, to), &recheck, None).map(|_| ()));
        self.recheck = recheck;
        if let Err(e) = checked {
            // Nothing was committed; back to the source, whose leg is complete.
            let _ = self.kernel.clear_inactive(&bridge);
            let _ = self.kernel.load(&bridge, &back, &self.key_hex);
            let _ = self.kernel.resume(&bridge);
            return Err(e);
        }
        let r = self.commit(State::Migrating { cursor: from });
        if let Err(e) = r {
            // The commit failed, so whether it reached the disk is unknown: keep the mirror
            // live, which keeps both legs identical, so that either cursor the journal may
            // hold reads the same data. A resume loads the journaled table.
            let _ = self.kernel.clear_inactive(&bridge);
            let _ = self.kernel.resume(&bridge);
            return Err(e);
        }
        // 5. only now map the chunk through crypt alone.
        kern(self.kernel.resume(&bridge))?;
        stats.stall = stats.stall.max(w.elapsed());
        // 6. Nothing maps through the mirror device any more: give it back its idle table
        //    now, while the bridge is live, so that tearing down the chunk's mirror targets
        //    (their kcopyd clients and workqueues) is not inside the next chunk's stall.
        //    The chunk is committed, so a failure here only leaves that cost to the next
        //    chunk's switch (which loads the mirror device whatever it holds).
        let idle = tables::mirror_idle_table(&g, d);
        let _ = self.swap_table(&mirror, &idle, "mirror device");
        Ok(stats)
    }

    /// How this run copies its chunks ([`tables::copy_shape`]): `--streams` targets (default
    /// [`tables::STREAMS`]), with regions shrunk to share one plan region among them when
    /// something is mapped on the bridge (the LVs of a running system, whose writes may wait
    /// on a region being copied). Decided at the first chunk: LVM's VG lock, held until the
    /// finish, keeps LVs from being activated or removed meanwhile (and the shape only
    /// decides how long a live write may wait, never where data goes).
    fn copy_shape(&mut self) -> EResult<tables::CopyShape> {
        if let Some(c) = self.shape {
            return Ok(c);
        }
        let bridge = kern(self.kernel.lookup(&self.names.bridge))?
            .ok_or_else(|| EngineError::Kernel(format!("{} disappeared", self.names.bridge)))?;
        let live = !kern(self.kernel.holders_of(bridge, &[]))?.is_empty();
        let c = tables::copy_shape(self.g(), self.streams.unwrap_or(tables::STREAMS), live);
        self.shape = Some(c);
        Ok(c)
    }

    /// Migrating{0} → HeaderWritten: the bridge is already the pure crypt table; drop the
    /// staging device and write the LUKS header over [0, S), marker last.
    fn finish(&mut self) -> EResult<()> {
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
        let f = (g.f * 512) as usize;
        let s_bytes = (g.s * 512) as usize;
        let header = std::mem::take(&mut self.header);
        let mut buf = std::mem::take(&mut self.verify_src);
        let piece_of = |buf: &mut Vec<u8>, at: usize, n: usize| {
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
            piece_of(&mut buf, at, n);
            r = self.disk.write((at / 512) as u64, &buf[..n]);
            at += n;
        }
        let r = r
            .and_then(|_| self.disk.flush())
            .and_then(|_| {
                piece_of(&mut buf, 0, f);
                self.disk.write(0, &buf[..f])
            })
            .and_then(|_| self.disk.flush());
        self.header = header;
        self.verify_src = buf;
        io(r, || "writing the LUKS header".into())?;
        self.commit(State::HeaderWritten)
    }

    /// HeaderWritten → done: LVM resize, wipe the copies in the tail, clear the journal
    /// (older slot first, so a crash leaves HeaderWritten, never an older state).
    fn cleanup(&mut self, hooks: &mut dyn Hooks) -> EResult<()> {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        self.show_bridge_to_udev()?;
        let _ = hooks.lvm_resize(&bridge);
        let zeros = vec![0u8; ((g.header_copy_len + g.f) * 512) as usize];
        io(self.disk.write(g.shadow, &zeros), || "wiping the header copy".into())?;
        io(self.disk.flush(), || "flushing".into())?;
        let newest = journal::slot_for(self.rec.seq);
        let z = vec![0u8; SLOT_BYTES];
        for slot in [1 - newest, newest] {
            io(self.disk.write(g.journal_slot(slot), &z), || "clearing the journal".into())?;
            io(self.disk.flush(), || "flushing".into())?;
        }
        Ok(())
    }

    /// The bridge holds the pure crypt table and the LUKS header is on disk: one real
    /// suspend/resume without the udev flags, so that udev processes the device as the LUKS
    /// mapping it now is (blkid, /dev/disk links, LVM's pvscan). A synthetic "change" event
    /// would not do: udev would re-import the old flags from its database.
    fn show_bridge_to_udev(&mut self) -> EResult<()> {
        let bridge = self.names.bridge.clone();
        self.kernel.set_udev_hidden(&bridge, false);
        self.kernel.suspend(&bridge).map_err(|e| EngineError::Kernel(format!("suspending the bridge: {e}")))?;
        kern(self.kernel.resume(&bridge))
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

    pub fn state(&self) -> State {
        self.rec.state
    }

    pub fn into_parts(self) -> (D, K) {
        (self.disk, self.kernel)
    }
}

/// Whether every line of `table` that references `raw` maps only sectors below `l`.
fn maps_within(table: &[TableLineFacts], raw: DevRef, l: u64) -> bool {
    let r = raw.to_string();
    table.iter().all(|line| {
        let w: Vec<&str> = line.params.split_whitespace().collect();
        match line.target_type.as_str() {
            "linear" => w.first() != Some(&r.as_str()) || w.get(1).and_then(|o| o.parse::<u64>().ok()).map(|o| o + line.length <= l).unwrap_or(false),
            "striped" => {
                let n: u64 = w.first().and_then(|x| x.parse().ok()).unwrap_or(0);
                let per = if n > 0 { line.length / n } else { 0 };
                (0..n as usize).all(|i| {
                    w.get(2 + 2 * i) != Some(&r.as_str())
                        || w.get(3 + 2 * i).and_then(|o| o.parse::<u64>().ok()).map(|o| o + per <= l).unwrap_or(false)
                })
            }
            _ => true,
        }
    })
}
