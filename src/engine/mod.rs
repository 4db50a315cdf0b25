//! The engine: drives the pure core through the [`Disk`] and [`Kernel`] traits, step by
//! step, committing to the journal at exactly the points DESIGN.md prescribes.
//!
//! The same code runs on the real kernel (adapters) and on the simulator (tests), which
//! crashes it at every I/O and every ioctl in turn.

mod devices;
mod finish;
#[cfg(test)]
pub mod sim;
mod standard;
pub(crate) mod standard_steps;
mod step;
pub mod traits;

use crate::core::dmline;
use crate::core::evidence::{self, Damage, Evidence};
use crate::core::facts::TableLineFacts;
use crate::core::geometry::{self, Geometry, JOURNAL_SLOT_SECTORS};
use crate::core::journal::{self, Record, State, SLOT_BYTES};
use crate::core::marker;
use crate::core::state::{self, Step};
use crate::core::tables::{self, BridgePhase, CryptSpec, DevRef, Devices, Line};
use crate::core::units::{sector, sectors, Sectors, SECTOR_BYTES};
pub use crate::iobuf::IoBuf;
pub use standard::{examine_cut_over, recover_cut_over, write_final, CutOverFinding, CutStep, CUT_OVER_ORDER};
pub use standard_steps::StepsEnd;
use std::time::{Duration, Instant};
pub use traits::{Aside, Disk, HolderTable, KResult, Kernel, KernelError, Removed};
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
    /// The kernel refused or failed (the adapter's error is kept as the source).
    #[error("{0}")]
    Kernel(#[source] KernelError),
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
    r.map_err(EngineError::Kernel)
}

/// Progress events for the front end (a bar, JSON lines, or nothing).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Committed(State),
    ChunkStart {
        from: u64,
        to: u64,
    },
    ChunkDone {
        from: u64,
        to: u64,
        stats: ChunkStats,
    },
    /// LUKS2: the device became a standard LUKS2 reencryption in progress; live I/O on the
    /// bridge waited `stall` (once).
    CutOver {
        stall: Duration,
    },
    /// An undo step failed too (what, and why); the run's error (if any) is the first failure.
    UndoFailed(String),
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
    /// Time waited, the bridge live, for the moment a suspend holds I/O the shortest
    /// ([`crate::core::tick`]); zero on a kernel whose suspends do not end on its tick.
    pub tick_wait: Duration,
    /// Time spent, the bridge live, reading the next step's source ahead while waiting for
    /// that moment (instead of sleeping).
    pub read_ahead: Duration,
    /// The last comparison under the suspend was skipped: the hotzone's dm-stats region
    /// counted no write (LUKS2's own steps, [`crate::core::dmstats`]).
    pub compare_skipped: bool,
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

/// How a step window's suspend went ([`Engine::suspend_on_tick`]).
#[derive(Debug, Clone, Copy)]
struct Suspended {
    /// Slept, the bridge live, for the moment to suspend.
    slept: Duration,
    /// Spent on useful work (the next step's source read ahead) while waiting for it.
    filled: Duration,
    /// When the suspend was called, and when it returned.
    called: Instant,
    returned: Instant,
}

/// The shortest wait before a suspend that is filled with work: a piece of it
/// ([`standard_steps`]' read ahead: 1 MiB, ~0.5 ms in the test bed) must end before the
/// moment to suspend.
const FILL_MIN: Duration = Duration::from_millis(1);

/// The pieces of work done before every suspend in the simulator (which has no tick): some
/// steps' sources then are read partly ahead, partly in the step. (Tests only.)
const TEST_FILL_PIECES: usize = 2;

/// Where the kernel's tick falls, learnt before a conversion touches anything: `n`
/// suspends of a private idle device `name` (an 8-sector `zero` target, created here and
/// removed again), returning the moments they returned ([`Engine::seed_ticks`]). Without it
/// the tick is learnt from the conversion's own suspends, and the cut-over's and first
/// steps' windows, suspended before it is known, hold the system's I/O up to a tick longer
/// ([`crate::core::tick`]). The device belongs to no one and holds nothing, so its suspends
/// block no I/O (memory need not be locked); they mostly wait for the tick, so running them
/// beside CPU work (formatting the header) costs that work almost nothing. Best effort:
/// anything failing ends it with the marks so far (none if `name` exists already: then it
/// is left alone).
pub fn tick_marks<K: Kernel>(kernel: &mut K, name: &str, uuid: &str, n: usize) -> Vec<Instant> {
    let mut marks = Vec::new();
    if !matches!(kernel.lookup(name), Ok(None)) || kernel.create(name, uuid, true).is_err() {
        return marks;
    }
    let zero = [TableLineFacts { start: 0, length: 8, target_type: "zero".into(), params: String::new() }];
    if kernel.load_lines(name, &zero).is_ok() && kernel.resume(name).is_ok() {
        while marks.len() < n && kernel.suspend(name).is_ok() {
            marks.push(Instant::now());
            if kernel.resume(name).is_err() {
                break;
            }
        }
    }
    if kernel.remove(name).is_err() {
        // (suspended by a failed resume: resumed first, then removed)
        let _ = kernel.resume(name).and_then(|()| kernel.remove(name));
    }
    marks
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
    /// LUKS2's own steps: the private dm-switch device between the bridge and the plaintext
    /// or the staging device ([`crate::core::tables::switch_start`]).
    pub switch: String,
    pub switch_uuid: String,
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
            switch: format!("{name}-luksify-switch"),
            switch_uuid: format!("CRYPT-SUBDEV-{u}-{name}-luksify-switch"),
        }
    }

    /// luksify's own devices: the holders of the raw device that are expected there.
    pub fn own(&self) -> [&str; 4] {
        [self.bridge.as_str(), self.staging.as_str(), self.mirror.as_str(), self.switch.as_str()]
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
    /// The new cipher in userspace, where luksify has it (aes-xts-plain64, 512-bit key):
    /// it then encrypts each step itself; else (or with [`Options::kernel_crypt`]) each
    /// step goes through the staging crypt device.
    xts: Option<crate::core::xts::Xts>,
    /// The step in flight (up to [`geometry::MAX_STEP`] sectors): its plaintext as last
    /// read from the source, and its ciphertext as written to the destination (kept, so
    /// the read-back compares without a second pass of AES; unused when the kernel
    /// encrypts: the read-back through dm-crypt compares with `plain`).
    plain: IoBuf,
    cipher: IoBuf,
    /// Scratch pieces: the source read again, the copy read back.
    verify_src: IoBuf,
    verify_dst: IoBuf,
    /// Runs of sectors to compare again (capacity fixed up front).
    recheck: Vec<(u64, u64)>,
    /// How the run behaves ([`Options`]; [`Engine::set_options`]).
    opts: Options,
    /// When the kernel's grace periods end (learnt from the bridge's suspends), so that a
    /// suspend starts just before a tick ([`crate::core::tick`]).
    ticks: crate::core::tick::TickGrid,
    /// The origin of the times in `ticks`.
    epoch: Instant,
    /// Undo steps (after a failure, putting tables or devices back) that failed themselves:
    /// the first failure is the error; these are reported beside it ([`Event::UndoFailed`]).
    undo_failed: Vec<String>,
    /// Private devices being removed without the engine waiting ([`Kernel::remove_aside`]):
    /// waited for before any helper device is looked up, made or removed again
    /// ([`Engine::settle_aside`]); dropped, it waits too.
    aside: Option<Aside>,
    /// What the tail held before `prepare` wrote into it: while nothing else has changed
    /// (state `Prepared`), [`Engine::abandon`] puts it back, byte for byte.
    original_tail: Option<Vec<u8>>,
    /// Whether commits go to the journal in the tail (LUKS1). A LUKS2 conversion keeps its
    /// state in cryptsetup's own metadata from the cut-over on and writes nothing before it:
    /// its records live in memory only ([`Engine::prepare_standard`]).
    persist: bool,
    /// LUKS2: the order of the cut-over's writes ([`CUT_OVER_ORDER`]; the simulator's tests
    /// run wrong orders to prove that the crash sweep catches them).
    cut_order: &'static [CutStep],
    /// TESTS ONLY (compiled only in tests): flip the bridge table to crypt *before* the
    /// journal commit, the order DESIGN.md forbids. The crash simulation sets it to prove
    /// that its sweep catches a wrong order.
    #[cfg(test)]
    pub(crate) wrong_order_for_tests: bool,
    /// TESTS ONLY: a wrong order in luksify's own LUKS2 steps, which the crash sweep of
    /// `sim/steps_tests.rs` must catch.
    #[cfg(test)]
    pub(crate) standard_mutant: Option<standard_steps::Mutant>,
    /// TESTS ONLY: the cut-over copies the first S under the suspend, never before it (the
    /// order tests of `sim/cutover_tests.rs` check that path's order).
    #[cfg(test)]
    pub(crate) no_precopy: bool,
}

/// How a run behaves; none of it changes what is written, only when and how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
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
    /// LUKS1: encrypt every step through the staging crypt device (the kernel's dm-crypt,
    /// written O_DIRECT, read back through it) even where luksify's own AES-XTS could: the
    /// same bytes reach the disk. Always so for a cipher luksify has no userspace
    /// implementation of (it has one for aes-xts-plain64 with a 512-bit key only); the
    /// simulator sets it to sweep that path with the cipher it has.
    pub kernel_crypt: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options { rate: None, max_stall: None, piece: Sectors::in_len(VERIFY_PIECE).0, kernel_crypt: false }
    }
}

/// A conversion about to start: what [`Engine::prepare`] journals.
pub struct NewConversion<'a> {
    /// The raw partition's device number (tables name it so).
    pub raw: DevRef,
    pub geometry: Geometry,
    /// The bridge's and final mapping's name, e.g. `sda5_crypt`.
    pub name: &'a str,
    pub luks_version: u8,
    pub luks_uuid: &'a str,
    pub cipher: &'a str,
    pub allow_discards: bool,
    /// The PV's UUID (the device's identity on a resume).
    pub pv_uuid: &'a str,
    /// The raw volume key.
    pub key: &'a [u8],
    /// The formatted LUKS header (H bytes).
    pub header: Vec<u8>,
}

impl<D: Disk, K: Kernel> Engine<D, K> {
    /// [`Engine::piece`], within the scratch buffers.
    fn piece(&self) -> u64 {
        self.opts.piece.clamp(1, Sectors::in_len(VERIFY_PIECE).0)
    }

    fn g(&self) -> &Geometry {
        &self.rec.geometry
    }

    /// How this run behaves (rate cap, window deadline, comparison piece).
    pub fn set_options(&mut self, o: Options) {
        self.opts = o;
    }

    /// Start a fresh conversion: write the header copy and the first journal record
    /// (`Prepared`) into the tail. Nothing else on the device changes.
    pub fn prepare(mut disk: D, kernel: K, c: NewConversion) -> EResult<Self> {
        let NewConversion {
            raw,
            geometry,
            name,
            luks_version,
            luks_uuid,
            cipher,
            allow_discards,
            pv_uuid,
            key,
            header,
        } = c;
        let h = header.len() as u64;
        if h == 0 || !h.is_multiple_of(4096) || h > Sectors(geometry.header_copy_len).bytes() {
            return Err(EngineError::Refused(format!(
                "the LUKS header is {h} bytes; luksify reserves {} bytes for its copy",
                Sectors(geometry.header_copy_len).bytes()
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
        let tail_len = Sectors(geometry.journal + 2 * JOURNAL_SLOT_SECTORS - geometry.shadow).bytes();
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
            fence_buf: buf(Sectors(rec.geometry.f).byte_len())?,
            slot_buf: buf(SLOT_BYTES)?,
            xts: (rec.cipher == "aes-xts-plain64").then(|| crate::core::xts::Xts::new(key)).flatten(),
            plain: buf(Sectors(rec.geometry.k.min(geometry::MAX_STEP)).byte_len())?,
            cipher: buf(Sectors(rec.geometry.k.min(geometry::MAX_STEP)).byte_len())?,
            verify_src: buf(VERIFY_PIECE)?,
            verify_dst: buf(VERIFY_PIECE)?,
            recheck,
            opts: Options::default(),
            ticks: crate::core::tick::TickGrid::new(),
            epoch: Instant::now(),
            undo_failed: Vec::new(),
            aside: None,
            original_tail: None,
            persist: true,
            cut_order: CUT_OVER_ORDER,
            #[cfg(test)]
            wrong_order_for_tests: false,
            #[cfg(test)]
            standard_mutant: None,
            #[cfg(test)]
            no_precopy: false,
            rec,
        })
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
        let mut label = vec![0u8; Sectors(g.f).byte_len()];
        let fenced = matches!(rec.state, State::Migrating { .. });
        let mut at = if fenced { g.shadow } else { 0 };
        io(disk.read(at, &mut label), || "reading the PV label".into())?;
        if !fenced {
            // The fence wrote (part of) its marker but not its record: marked sectors are in
            // the shadow.
            let mut sh = vec![0u8; label.len()];
            io(disk.read(g.shadow, &mut sh), || "reading the shadow".into())?;
            for i in 0..label.len() / SECTOR_BYTES {
                if marker::is_marker_sector(&label[sector(i)], i, &rec.luks_uuid, g.journal) {
                    label[sector(i)].copy_from_slice(&sh[sector(i)]);
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

    /// Write the journal record `self.rec` into its slot and flush.
    fn write_record(&mut self) -> EResult<()> {
        if !self.persist {
            return Ok(());
        }
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

    /// Run to the end (or to a stop request at a commit point).
    pub fn run(&mut self, hooks: &mut dyn Hooks) -> EResult<()> {
        let r = self.run_steps(hooks);
        self.report_undo_failures(hooks);
        r
    }

    fn run_steps(&mut self, hooks: &mut dyn Hooks) -> EResult<()> {
        loop {
            // undo steps that failed before this run (reopen) or in the last step
            self.report_undo_failures(hooks);
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
                    self.pace(t, Sectors(to - from).bytes(), hooks);
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

    /// Suspend the bridge for a step's window, its table loaded inactive: at the moment a
    /// suspend holds I/O the shortest ([`crate::core::tick`]: just before the kernel's tick,
    /// where its suspends end on one; the wait is live), learning the tick from when it
    /// returns. While there is time before that moment, `fill` is called to do one piece of
    /// useful work on the disk (reading the next step's source ahead), until it says there is
    /// none left; then the rest of the wait is slept. If the suspend fails, the loaded table
    /// is cleared: the bridge runs on as it was.
    fn suspend_on_tick(&mut self, bridge: &str, fill: &mut dyn FnMut(&mut D) -> bool) -> EResult<Suspended> {
        let start = Instant::now();
        let mut pieces = 0;
        let slept = loop {
            let now = (Instant::now() - self.epoch).as_nanos() as u64;
            let wait = Duration::from_nanos(self.ticks.wait_before_suspend(now));
            if !self.fill_now(wait, pieces) || !fill(&mut self.disk) {
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                break wait;
            }
            pieces += 1;
        };
        let called = Instant::now();
        if let Err(e) = self.kernel.suspend(bridge) {
            let r = self.kernel.clear_inactive(bridge);
            undone(&mut self.undo_failed, || format!("clearing the inactive table of {bridge}"), r);
            return Err(EngineError::Kernel(e.context("suspending the bridge")));
        }
        let returned = Instant::now();
        self.ticks.observe((returned - self.epoch).as_nanos() as u64);
        Ok(Suspended { slept, filled: called - start - slept, called, returned })
    }

    /// Suspend `name` (flushing) just before the kernel's tick if the grid is known (the
    /// wait is live and ends the suspend on the same tick as one started at once:
    /// [`crate::core::tick`]), and learn the tick from when it returned: every suspend
    /// luksify makes of a device in use counts, so that the steps' first windows already
    /// start just before a tick. Returns when the suspend was called (the I/O held from then).
    fn suspend_observed(&mut self, name: &str) -> KResult<Instant> {
        let wait = self.ticks.wait_before_suspend((Instant::now() - self.epoch).as_nanos() as u64);
        if wait > 0 {
            std::thread::sleep(Duration::from_nanos(wait));
        }
        let called = Instant::now();
        self.kernel.suspend(name)?;
        self.ticks.observe((Instant::now() - self.epoch).as_nanos() as u64);
        Ok(called)
    }

    /// The moments [`tick_marks`] saw suspends return, before this engine existed: the tick
    /// grid known from the first suspend on. Call before the engine suspends anything.
    pub fn seed_ticks(&mut self, marks: &[Instant]) {
        if let Some(&first) = marks.first() {
            self.epoch = self.epoch.min(first);
        }
        self.ticks.observe_since(self.epoch, marks);
    }

    /// Whether a wait of `wait` before a suspend leaves time for one more piece of work
    /// ([`FILL_MIN`]) after `pieces` of them. The simulator has no tick: its runs do
    /// [`TEST_FILL_PIECES`] pieces before every suspend instead.
    fn fill_now(&self, wait: Duration, pieces: usize) -> bool {
        if cfg!(test) {
            pieces < TEST_FILL_PIECES
        } else {
            wait >= FILL_MIN
        }
    }

    /// Undo steps that failed (after the failure they were undoing), as events: never dropped.
    fn report_undo_failures(&mut self, hooks: &mut dyn Hooks) {
        for m in std::mem::take(&mut self.undo_failed) {
            hooks.event(&Event::UndoFailed(m));
        }
    }

    /// Undo steps that failed and have not been reported yet (for a caller without hooks,
    /// e.g. after [`Engine::abandon`]).
    pub fn take_undo_failures(&mut self) -> Vec<String> {
        std::mem::take(&mut self.undo_failed)
    }

    pub fn state(&self) -> State {
        self.rec.state
    }

    pub fn into_parts(self) -> (D, K) {
        (self.disk, self.kernel)
    }
}

/// Read the journal from a device: None if there is none. A damaged journal, or a
/// missing one under luksify's fence marker, is an error that says what is known.
pub fn read_journal<D: Disk>(disk: &mut D, n_sectors: u64) -> EResult<Option<Record>> {
    match examine(disk, n_sectors)? {
        Evidence::Nothing => Ok(None),
        Evidence::Journal(r) => Ok(Some(r)),
        Evidence::Damaged(d) => Err(EngineError::Damaged(Box::new(d))),
    }
}

/// What the device shows of a conversion: its journal, or every other sign of one when
/// the journal is missing or damaged ([`evidence::examine`]). A journal that describes a
/// device of another size is refused (wrong device).
pub fn examine<D: Disk>(disk: &mut D, n_sectors: u64) -> EResult<Evidence> {
    let mut head = vec![0u8; evidence::HEAD_BYTES];
    let mut a = vec![0u8; SLOT_BYTES];
    let mut b = vec![0u8; SLOT_BYTES];
    let Some(j) = geometry::journal_sector(n_sectors).filter(|_| n_sectors >= Sectors::in_len(evidence::HEAD_BYTES).0)
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
pub fn read_header_copy<D: Disk>(disk: &mut D, rec: &Record) -> EResult<Vec<u8>> {
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

/// Keep an undo step's failure (never drop it): `what` it was undoing, and why it failed.
fn undone<T, E: std::fmt::Display>(failed: &mut Vec<String>, what: impl FnOnce() -> String, r: Result<T, E>) {
    if let Err(e) = r {
        failed.push(format!("{} failed too: {e}", what()));
    }
}

/// The bytes of a hex string (the engine keeps the volume key as the hex a crypt table takes).
fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len() / 2).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap_or(0)).collect()
}

/// The end of the piece of [x, b) that one read takes: at most `piece` sectors, never
/// across the fence boundary (where the source changes from the shadow to the raw device).
fn piece_end(g: &Geometry, x: u64, b: u64, piece: u64) -> u64 {
    (x + piece).min(g.source_run_end(x, b))
}
