//! The engine: drives the pure core through the [`Disk`] and [`Kernel`] traits, step by
//! step, committing to the journal at exactly the points DESIGN.md prescribes.
//!
//! The same code runs on the real kernel (adapters) and on the simulator (tests), which
//! crashes it at every I/O and every ioctl in turn.

#[cfg(test)]
pub mod sim;
pub mod traits;

use crate::core::dmline;
use crate::core::evidence::{self, Damage, Evidence};
use crate::core::facts::TableLineFacts;
use crate::core::geometry::{self, Geometry, JOURNAL_SLOT_SECTORS};
use crate::core::journal::{self, Record, State, SLOT_BYTES};
use crate::core::marker;
use crate::core::state::{self, Step};
use crate::core::tables::{self, BridgePhase, CryptSpec, DevRef, Devices, Line};
pub use crate::iobuf::IoBuf;
use std::time::{Duration, Instant};
pub use traits::{Disk, HolderTable, KResult, Kernel, KernelError};
use zeroize::Zeroizing;

/// Bytes per read or write of the copy and its checks (the buffers are allocated up front:
/// nothing is allocated while the bridge is suspended).
const VERIFY_PIECE: usize = 1 << 20;
/// `--max-stall` when not given: a suspended window cut after this long (see `move_step`).
pub const DEFAULT_MAX_STALL: Duration = Duration::from_millis(50);
/// Windows cut per step at most; the next one runs to its end.
pub const MAX_CUTS: u32 = 4;
/// Runs of sectors remembered for a recheck (more are merged into the last one).
const RECHECK_RUNS: usize = 4096;
/// Sectors read back through the kernel's dm-crypt after each step's copy, to check that
/// the kernel decrypts what luksify encrypted.
const KERNEL_CHECK_SECTORS: u64 = 8;

/// What went wrong, and in which state the device was left.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Kernel(String),
    #[error("{0}")]
    Journal(String),
    /// Signs of a conversion whose journal is missing or damaged: no record to act on.
    #[error("a luksify conversion is in progress but its journal is {}", if .0.journal_missing() { "missing" } else { "damaged" })]
    Damaged(Box<Damage>),
    #[error("{0}")]
    Refused(String),
    #[error("the copy of sectors {from}..{to} failed at sector {sector} ({why}); the conversion stopped at a safe point (cursor {to}), nothing is lost; fix the device and run `luksify resume`")]
    CopyFailed { from: u64, to: u64, sector: u64, why: String },
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
    /// Reading, encrypting and writing the chunk, and flushing it (bridge live).
    pub copy: Duration,
    /// Reading the copy back, through the disk and through dm-crypt (bridge live).
    pub verify: Duration,
    /// The longest window in which the bridge was suspended (live I/O waited this long).
    pub stall: Duration,
    /// Where that window's time went: the suspend (waiting for I/O in flight), the last
    /// comparison with the source, the journal commit (write and flush), the resume.
    pub stall_split: [Duration; 4],
    /// Sectors that live writes changed after they were copied, copied again while the
    /// bridge was suspended.
    pub rechecked: u64,
    /// Suspended windows cut because they ran past `max_stall` (the step was tried again).
    pub cut_windows: u32,
}

impl ChunkStats {
    /// A suspended window of `total` (split as [`ChunkStats::stall_split`]): kept if it is
    /// the longest so far.
    fn note_window(&mut self, total: Duration, split: [Duration; 4]) {
        if total > self.stall {
            self.stall = total;
            self.stall_split = split;
        }
    }
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
    /// The private helper that holds a step whose commit failed (see `tables::Devices::mirror`).
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
    fence_buf: IoBuf,
    slot_buf: IoBuf,
    /// The new cipher: luksify encrypts each step itself.
    xts: Option<crate::core::xts::Xts>,
    /// The step in flight (up to [`geometry::MAX_STEP`] sectors): its plaintext as last
    /// read from the source, and its ciphertext as written to the destination (kept, so
    /// the read-back compares without a second pass of AES).
    plain: IoBuf,
    cipher: IoBuf,
    /// Scratch pieces: the source read again, the copy read back.
    verify_src: IoBuf,
    verify_dst: IoBuf,
    /// Runs of sectors to compare again (capacity fixed up front).
    recheck: Vec<(u64, u64)>,
    /// Cap on the copy rate in bytes per second (`--rate`): the engine pauses between
    /// chunks so that the average stays below it.
    pub rate: Option<u64>,
    /// The longest a suspended window may run before its last comparison is done
    /// (`--max-stall`); a longer one is cut and tried again, [`MAX_CUTS`] times at most.
    /// `None`: [`DEFAULT_MAX_STALL`], or twice what reading the step back took a moment
    /// earlier (live) if that is longer: a disk that is slow all the time gets windows as
    /// long as it needs; one that is slow for a moment gets its window cut.
    pub max_stall: Option<Duration>,
    /// Sectors the last comparison reads at once ([`VERIFY_PIECE`]; the deadline is checked
    /// between pieces). Tests make it smaller to cut windows in the middle of a step.
    pub piece: u64,
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
    /// [`Engine::piece`], within the scratch buffers.
    fn piece(&self) -> u64 {
        self.piece.clamp(1, (VERIFY_PIECE / 512) as u64)
    }

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
        if h == 0 || !h.is_multiple_of(4096) || h > geometry.header_copy_len * 512 {
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
        let mut e = Self::with_record(disk, kernel, raw, rec, key, header)?;
        e.original_tail = Some(original);
        e.write_record()?;
        Ok(e)
    }

    fn with_record(disk: D, mut kernel: K, raw: DevRef, rec: Record, key: &[u8], header: Vec<u8>) -> EResult<Self> {
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
        let buf = |len: usize| io(IoBuf::new(len), || "allocating the step buffers".into());
        let mut recheck = Vec::with_capacity(RECHECK_RUNS);
        recheck.resize(RECHECK_RUNS, (0, 0));
        recheck.clear();
        Ok(Engine {
            disk,
            kernel,
            names,
            raw,
            spec: CryptSpec { cipher: rec.cipher.clone(), allow_discards: rec.allow_discards },
            key_hex: hex,
            header,
            fence_buf: buf((rec.geometry.f * 512) as usize)?,
            slot_buf: buf(SLOT_BYTES)?,
            xts: (rec.cipher == "aes-xts-plain64").then(|| crate::core::xts::Xts::new(key)).flatten(),
            plain: buf((rec.geometry.k.min(geometry::MAX_STEP) * 512) as usize)?,
            cipher: buf((rec.geometry.k.min(geometry::MAX_STEP) * 512) as usize)?,
            verify_src: buf(VERIFY_PIECE)?,
            verify_dst: buf(VERIFY_PIECE)?,
            recheck,
            rate: None,
            max_stall: None,
            piece: (VERIFY_PIECE / 512) as u64,
            original_tail: None,
            wrong_order_for_tests: false,
            rec,
        })
    }

    /// Read the journal from a device: None if there is none. A damaged journal, or a
    /// missing one under luksify's fence marker, is an error that says what is known.
    pub fn read_journal(disk: &mut D, n_sectors: u64) -> EResult<Option<Record>> {
        match Self::examine(disk, n_sectors)? {
            Evidence::Nothing => Ok(None),
            Evidence::Journal(r) => Ok(Some(r)),
            Evidence::Damaged(d) => Err(EngineError::Damaged(Box::new(d))),
        }
    }

    /// What the device shows of a conversion: its journal, or every other sign of one when
    /// the journal is missing or damaged ([`evidence::examine`]). A journal that describes a
    /// device of another size is refused (wrong device).
    pub fn examine(disk: &mut D, n_sectors: u64) -> EResult<Evidence> {
        let mut head = vec![0u8; evidence::HEAD_BYTES];
        let mut a = vec![0u8; SLOT_BYTES];
        let mut b = vec![0u8; SLOT_BYTES];
        let Some(j) = geometry::journal_sector(n_sectors).filter(|_| n_sectors >= (evidence::HEAD_BYTES / 512) as u64)
        else {
            return Ok(Evidence::Nothing); // too small to hold a journal or a marker
        };
        io(disk.read(0, &mut head), || "reading the device's first sectors".into())?;
        io(disk.read(j, &mut a), || "reading journal slot A".into())?;
        io(disk.read(j + JOURNAL_SLOT_SECTORS, &mut b), || "reading journal slot B".into())?;
        let ev = evidence::examine(&head, &a, &b, j);
        if let Evidence::Journal(r) = &ev {
            if r.geometry.n != n_sectors {
                return Err(EngineError::Refused(format!(
                    "the journal describes a device of {} sectors but this one has {n_sectors}: wrong device?",
                    r.geometry.n
                )));
            }
        }
        Ok(ev)
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
            return Err(EngineError::Journal(
                "the copy of the LUKS header in the tail is corrupt (CRC mismatch)".into(),
            ));
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
        let mut e = Self::with_record(disk, kernel, raw, rec, key, header)?;
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

    /// After a failed commit, [`Self::keep_both`] leaves the step's two copies under a
    /// mirror, identical. A write that failed on one of them since (its leg's health is no
    /// longer `A`: dm-mirror went on writing the other leg only) left that copy stale.
    /// The journal's cursor must map the other copy, or nothing is loaded: the live system
    /// stays on the mirror, which keeps serving the healthy copy.
    fn check_kept_copies(&mut self, cursor: u64) -> EResult<()> {
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
                    None if dmline::references(l, self.raw) => {
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
            if !dmline::maps_only_below(&h.table, self.raw, g.l) {
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
                return Err(EngineError::Kernel(format!(
                    "switching {name} onto the bridge failed ({e}); tables put back"
                )));
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
        let merged = self.fence_merge().inspect_err(|_e| {
            let _ = self.kernel.clear_inactive(&bridge);
            let _ = self.kernel.resume(&bridge);
        })?;
        if !merged {
            io(self.disk.read(0, &mut self.fence_buf), || "reading the label sectors".into()).inspect_err(|_e| {
                let _ = self.kernel.clear_inactive(&bridge);
                let _ = self.kernel.resume(&bridge);
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
                let orig = self.fence_buf.to_vec();
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

    /// Copy step [a, b): read its source into `plain`, encrypt it into `cipher`, write that
    /// at the destination (S + a), flush. Only luksify writes there: the bridge maps
    /// nothing onto [S + a, S + b) until the step is committed.
    fn copy_step(&mut self, a: u64, b: u64) -> EResult<()> {
        let g = *self.g();
        let Some(xts) = &self.xts else { return Err(no_cipher(&self.rec.cipher)) };
        let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
        // In as few I/Os as the source allows: one below F (the shadow), one above.
        let mut x = a;
        while x < b {
            let e = g.source_run_end(x, b);
            let (o, n) = (((x - a) * 512) as usize, ((e - x) * 512) as usize);
            self.disk
                .read(g.source_of(x), &mut self.plain[o..o + n])
                .map_err(|er| fail(x, format!("reading the source: {er}")))?;
            self.cipher[o..o + n].copy_from_slice(&self.plain[o..o + n]);
            xts.encrypt_sectors(&mut self.cipher[o..o + n], x);
            self.disk
                .write(g.s + x, &self.cipher[o..o + n])
                .map_err(|er| fail(x, format!("writing the copy: {er}")))?;
            x = e;
        }
        self.disk.flush().map_err(|er| fail(a, format!("flushing the copy: {er}")))
    }

    /// Read the sectors `runs` of step [a, b) back from the destination and compare them with
    /// what was written (`cipher`): the copy is on the disk, not only in a cache that lied.
    fn check_written(&mut self, a: u64, b: u64, runs: &[(u64, u64)]) -> EResult<()> {
        let s = self.g().s;
        for &(ra, rb) in runs {
            let mut x = ra;
            while x < rb {
                let e = (x + self.piece()).min(rb);
                let (o, n) = (((x - a) * 512) as usize, ((e - x) * 512) as usize);
                let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
                self.disk
                    .read(s + x, &mut self.verify_dst[..n])
                    .map_err(|er| fail(x, format!("reading the copy back: {er}")))?;
                if let Some(i) = (0..n / 512)
                    .find(|i| self.verify_dst[i * 512..(i + 1) * 512] != self.cipher[o + i * 512..o + (i + 1) * 512])
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
    fn check_kernel(&mut self, a: u64, b: u64) -> EResult<()> {
        let n = ((b - a).min(KERNEL_CHECK_SECTORS) * 512) as usize;
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
    fn refresh_into(
        &mut self,
        a: u64,
        b: u64,
        runs: &mut Vec<(u64, u64)>,
        changed: &mut u64,
        deadline: Option<Instant>,
    ) -> EResult<bool> {
        let g = *self.g();
        let piece = self.piece();
        let Some(xts) = &self.xts else { return Err(no_cipher(&self.rec.cipher)) };
        let fail = |sector: u64, why: String| EngineError::CopyFailed { from: a, to: b, sector, why };
        let mut x = a;
        while x < b {
            if x > a && deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            let e = piece_end(&g, x, b, piece);
            let n = ((e - x) * 512) as usize;
            self.disk
                .read(g.source_of(x), &mut self.verify_src[..n])
                .map_err(|er| fail(x, format!("reading the source: {er}")))?;
            let base = ((x - a) * 512) as usize;
            let same = |src: &[u8], plain: &[u8], i: usize| {
                src[i * 512..(i + 1) * 512] == plain[base + i * 512..base + (i + 1) * 512]
            };
            let mut i = 0;
            while i < n / 512 {
                if same(&self.verify_src, &self.plain, i) {
                    i += 1;
                    continue;
                }
                let j = i;
                while i < n / 512 && !same(&self.verify_src, &self.plain, i) {
                    i += 1;
                }
                let (ra, rb) = (x + j as u64, x + i as u64);
                let (o0, o1) = (base + j * 512, base + i * 512);
                self.plain[o0..o1].copy_from_slice(&self.verify_src[j * 512..i * 512]);
                self.cipher[o0..o1].copy_from_slice(&self.plain[o0..o1]);
                xts.encrypt_sectors(&mut self.cipher[o0..o1], ra);
                self.disk
                    .write(g.s + ra, &self.cipher[o0..o1])
                    .map_err(|er| fail(ra, format!("writing the copy: {er}")))?;
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

    /// Migrating{to} → Migrating{from}, in steps of at most the copy buffer (one step
    /// unless the journal was written with a larger chunk), each committed on its own.
    fn move_chunk(&mut self, from: u64, to: u64) -> EResult<ChunkStats> {
        let d = self.ensure_helpers()?;
        let step = (self.plain.len() / 512) as u64;
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
    fn move_step(&mut self, d: Devices, a: u64, b: u64, stats: &mut ChunkStats) -> EResult<()> {
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
        let max_stall = self.max_stall.unwrap_or(DEFAULT_MAX_STALL.max(2 * read_back));
        let r = self.suspended_refresh(d, a, b, &steady, max_stall, &mut runs, stats);
        self.recheck = runs;
        let (w, t_suspended) = r?;
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
    fn suspended_refresh(
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
            let w = Instant::now();
            if let Err(e) = self.kernel.suspend(&bridge) {
                let _ = self.kernel.clear_inactive(&bridge);
                return Err(EngineError::Kernel(format!("suspending the bridge: {e}")));
            }
            let t_suspended = Instant::now();
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
                            let _ = self.kernel.resume(&bridge);
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
    fn drop_flipped(&mut self, bridge: &str, d: Devices, b: u64) -> KResult<()> {
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
    fn keep_both(&mut self, d: Devices, a: u64, b: u64) {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        let mirror = self.names.mirror.clone();
        let _ = self.kernel.clear_inactive(&bridge);
        let mt = tables::mirror_table(&g, d, a, b);
        let bt = tables::bridge_table(&g, &self.spec, d, BridgePhase::Mirroring { from: a, to: b });
        let r = self
            .kernel
            .load(&mirror, &mt, &self.key_hex)
            .and_then(|_| self.kernel.suspend(&mirror))
            .and_then(|_| self.kernel.resume(&mirror))
            .and_then(|_| self.kernel.load(&bridge, &bt, &self.key_hex));
        if r.is_err() {
            let _ = self.kernel.clear_inactive(&bridge);
        }
        let _ = self.kernel.resume(&bridge);
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
            r = disk.write((at / 512) as u64, &buf[..n]);
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
    fn cleanup(&mut self, hooks: &mut dyn Hooks) -> EResult<()> {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        self.open_as_cryptsetup_would()?;
        let zeros = vec![0u8; ((g.header_copy_len + g.f) * 512) as usize];
        io(self.disk.write(g.shadow, &zeros), || "wiping the header copy".into())?;
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
    fn open_as_cryptsetup_would(&mut self) -> EResult<()> {
        let g = *self.g();
        let bridge = self.names.bridge.clone();
        let table = [Line {
            start: 0,
            length: g.n - g.s,
            target: tables::Target::Crypt { spec: self.spec.clone(), iv_offset: 0, dev: self.raw, offset: g.s },
        }];
        // cryptsetup names the key after the LUKS2 header's UUID and its (only) digest, 0
        let desc = format!("cryptsetup:{}-d0", self.rec.luks_uuid);
        let keyring = if self.rec.luks_version == 2 {
            let key = Zeroizing::new(hex_bytes(&self.key_hex));
            kern(self.kernel.keyring_add(&desc, &key))?
        } else {
            None
        };
        let key = Zeroizing::new(keyring.as_deref().unwrap_or(self.key_hex.as_str()).to_string());
        let r = self.kernel.load(&bridge, &table, &key);
        if keyring.is_some() {
            self.kernel.keyring_drop(&desc);
        }
        kern(r)?;
        self.kernel.set_udev_hidden(&bridge, false);
        if let Err(e) = self.kernel.suspend(&bridge) {
            let _ = self.kernel.clear_inactive(&bridge);
            return Err(EngineError::Kernel(format!("suspending the bridge: {e}")));
        }
        // suspended, the bridge holds every filesystem on it: try the resume twice
        self.kernel.resume(&bridge).or_else(|_| self.kernel.resume(&bridge)).map_err(|e| {
            EngineError::Kernel(format!("resuming the bridge failed twice ({e}): run `dmsetup resume {bridge}`"))
        })
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

/// The bytes of a hex string (the engine keeps the volume key as the hex a crypt table takes).
fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len() / 2).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap_or(0)).collect()
}

/// The error of a step that cannot be copied because luksify has no implementation of the
/// journaled cipher (the planner accepts only aes-xts-plain64 with a 512-bit key).
fn no_cipher(cipher: &str) -> EngineError {
    EngineError::Refused(format!("luksify cannot encrypt with {cipher}"))
}

/// The end of the piece of [x, b) that one read takes: at most `piece` sectors, never
/// across the fence boundary (where the source changes from the shadow to the raw device).
fn piece_end(g: &Geometry, x: u64, b: u64, piece: u64) -> u64 {
    (x + piece).min(g.source_run_end(x, b))
}
