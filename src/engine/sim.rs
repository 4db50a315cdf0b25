//! A deterministic simulator of the outside world the engine drives: a disk with a volatile
//! write cache ([`SimDisk`]), a device-mapper ([`SimKernel`]) with linear, striped, crypt
//! (real AES-XTS-plain64) and mirror (dm-mirror region semantics) targets, and a live system
//! (LVs, a writer that fsyncs, a reader that checks every read) running between the engine's
//! operations.
//!
//! Every Disk call, every Kernel call and every mirror recovery write is an *operation*,
//! numbered from 0. [`Sim::set_fault`] makes operation `i` fail in one of three ways:
//!
//! - [`Fault::PowerCut`]: the machine stops. [`Sim::power_cut`] then builds the rebooted
//!   machine: the durable image survives, plus a seeded subset of the unflushed writes
//!   (multi-sector writes possibly torn); no dm device exists; no LV is active.
//! - [`Fault::Kill`]: the luksify process dies; the kernel, the disk cache, the LVs and the
//!   writer keep running (mirror recovery too); `luksify resume` runs on the live system.
//! - [`Fault::Error`]: that one operation fails (EIO, ENOMEM…), everything else keeps working:
//!   the engine's own error paths run.
//!
//! The expected content is tracked per plaintext sector of the PV: the last *acknowledged*
//! write (a write followed by a successful flush through the stack), and the writes issued
//! since. After a power cut a sector may hold any of those, never anything else.
//! [`Sim::check_final`] checks the whole device against that.
//!
//! All randomness comes from a seed: a failing case replays exactly.

use super::traits::{Disk, HolderTable, KResult, Kernel, KernelError};
use super::{EResult, Engine, Hooks};
use crate::core::facts::TableLineFacts;
use crate::core::geometry::Geometry;
use crate::core::journal::{self, Record, State, SLOT_BYTES};
use crate::core::tables::{DevRef, Line};
use aes::cipher::KeyInit;
use aes::Aes256;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::rc::Rc;
use xts_mode::{get_tweak_default, Xts128};

pub const SECTOR: usize = 512;
/// The raw partition.
pub const RAW: DevRef = DevRef { major: 98, minor: 5 };
/// dm devices get 254:N.
pub const DM_MAJOR: u32 = 254;
pub const BRIDGE: &str = "sda5_crypt";
pub const LUKS_UUID: &str = "0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10";
pub const PV_UUID_RAW: &str = "Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56";
pub const PV_UUID: &str = "Ab12Cd-34Ef-56Gh-78Ij-90Kl-12Mn-34Op56";
pub const CIPHER: &str = "aes-xts-plain64";
/// Content id of the sectors past the PV ([L, N)) at the start.
const FILLER: u64 = u64::MAX;
/// One volume key for every simulated run (so the AES memo is shared by all of them).
const KEY_SEED: u64 = 0x6b6579;

// ---------------------------------------------------------------------------------------
// Content
// ---------------------------------------------------------------------------------------

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The LVM label sector (sector 1 of the PV), carrying [`PV_UUID`].
pub fn label_sector() -> Vec<u8> {
    let mut l = vec![0u8; SECTOR];
    l[..8].copy_from_slice(b"LABELONE");
    l[8..16].copy_from_slice(&1u64.to_le_bytes());
    l[20..24].copy_from_slice(&32u32.to_le_bytes());
    l[24..32].copy_from_slice(b"LVM2 001");
    l[32..64].copy_from_slice(PV_UUID_RAW.as_bytes());
    l
}

/// The bytes of plaintext sector `x` as written by write number `id` (0 = original content).
/// Every (id, sector) pair is distinct, so a misplaced or stale sector is always noticed.
pub fn content(id: u64, x: u64) -> Vec<u8> {
    if id == 0 && x == 1 {
        return label_sector();
    }
    let mut b = vec![0u8; SECTOR];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&x.to_le_bytes());
    b[16..24].copy_from_slice(b"SIMDATA!");
    let mut s = splitmix(id.wrapping_mul(0x1000_0000_01B3) ^ x);
    for c in b[24..].chunks_mut(8) {
        s = splitmix(s);
        c.copy_from_slice(&s.to_le_bytes()[..c.len()]);
    }
    b
}

fn describe(b: &[u8]) -> String {
    if &b[16..24] == b"SIMDATA!" {
        let id = u64::from_le_bytes(b[..8].try_into().unwrap());
        let x = u64::from_le_bytes(b[8..16].try_into().unwrap());
        if content(id, x) == b {
            return format!("write #{id} of sector {x}");
        }
        return format!("corrupted data claiming write #{id} of sector {x}");
    }
    if b == label_sector().as_slice() {
        return "the LVM label".into();
    }
    if is_zero(b) {
        return "zeros".into();
    }
    format!("garbage ({:02x?}…)", &b[..16])
}

/// A deterministic key (512-bit, AES-XTS) and a fake LUKS header of 8 KiB.
pub fn key_and_header(seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut z = seed;
    let mut next = || {
        z = splitmix(z);
        z
    };
    let key: Vec<u8> = (0..8).flat_map(|_| next().to_le_bytes()).collect();
    let mut header: Vec<u8> = (0..1024).flat_map(|_| next().to_le_bytes()).map(|b| b | 1).collect();
    header[..6].copy_from_slice(b"LUKS\xba\xbe");
    (key, header)
}

/// Whether `b` is all zeros (fast even unoptimised: memcmp).
fn is_zero(b: &[u8]) -> bool {
    static Z: [u8; 4096] = [0; 4096];
    b.chunks(4096).all(|c| c == &Z[..c.len()])
}

/// AES-XTS with a 512-bit key, plain64 IVs, 512-byte sectors: what dm-crypt does with
/// `aes-xts-plain64`. Results are memoised per thread (the same sectors are encrypted over and
/// over by thousands of simulated runs, and unoptimised AES is slow); the memo is keyed by
/// the full key, IV and input, so it is exactly the function.
pub struct XtsSim {
    xts: Xts128<Aes256>,
    fp: u64,
}

#[derive(PartialEq, Eq, Hash)]
struct MemoKey {
    fp: u64,
    enc: bool,
    iv: u64,
    data: Vec<u8>,
}

/// A cheap hasher for the memo (the default SipHash over 512 bytes costs as much as the
/// work it saves in an unoptimised build).
#[derive(Default)]
struct FastHasher(u64);
impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

type Memo = std::collections::HashMap<MemoKey, Vec<u8>, std::hash::BuildHasherDefault<FastHasher>>;
thread_local! {
    static XTS_MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

impl XtsSim {
    pub fn new(key: &[u8]) -> XtsSim {
        assert_eq!(key.len(), 64);
        let xts = Xts128::new(Aes256::new_from_slice(&key[..32]).unwrap(), Aes256::new_from_slice(&key[32..]).unwrap());
        let fp = key.chunks(8).fold(0u64, |a, c| splitmix(a ^ u64::from_le_bytes(c.try_into().unwrap())));
        XtsSim { xts, fp }
    }

    fn run(&self, enc: bool, iv: u64, buf: &mut [u8]) {
        let k = MemoKey { fp: self.fp, enc, iv, data: buf.to_vec() };
        let hit = XTS_MEMO.with(|m| m.borrow().get(&k).map(|v| buf.copy_from_slice(v)).is_some());
        if hit {
            return;
        }
        if enc {
            self.xts.encrypt_sector(buf, get_tweak_default(iv as u128));
        } else {
            self.xts.decrypt_sector(buf, get_tweak_default(iv as u128));
        }
        XTS_MEMO.with(|m| {
            let mut m = m.borrow_mut();
            if m.len() > 400_000 {
                m.clear();
            }
            m.insert(k, buf.to_vec());
        });
    }

    pub fn encrypt(&self, iv: u64, buf: &mut [u8]) {
        self.run(true, iv, buf)
    }

    /// Decrypt sector `iv` the way `cryptsetup open` would read it.
    pub fn decrypt(&self, iv: u64, buf: &mut [u8]) {
        self.run(false, iv, buf)
    }
}

fn xts_from_key(key: &[u8]) -> XtsSim {
    XtsSim::new(key)
}

// ---------------------------------------------------------------------------------------
// The disk
// ---------------------------------------------------------------------------------------

/// A failing area of the raw disk (sectors [start, end)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadArea {
    pub start: u64,
    pub end: u64,
    pub reads: bool,
    pub writes: bool,
    /// Writes do not fail: they are acknowledged and lost (a disk that lies).
    pub silent: bool,
}

/// The physical disk: what is durable, what reads return, and the volatile cache between.
#[derive(Clone)]
pub struct DiskImage {
    pub n: u64,
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Completed but unflushed writes, in completion order.
    cache: Vec<(u64, Vec<u8>)>,
    pub bad: Vec<BadArea>,
    pub writes: u64,
    pub flushes: u64,
}

impl DiskImage {
    fn new(image: Vec<u8>) -> DiskImage {
        let n = (image.len() / SECTOR) as u64;
        DiskImage {
            n,
            durable: image.clone(),
            current: image,
            cache: Vec::new(),
            bad: Vec::new(),
            writes: 0,
            flushes: 0,
        }
    }

    fn range(&self, sector: u64, len: usize) -> Result<std::ops::Range<usize>, String> {
        if !len.is_multiple_of(SECTOR) || len == 0 {
            return Err(format!("unaligned I/O of {len} bytes"));
        }
        let end = sector + (len / SECTOR) as u64;
        if end > self.n {
            return Err(format!("I/O beyond the end of the disk: {sector}+{} > {}", len / SECTOR, self.n));
        }
        Ok(sector as usize * SECTOR..end as usize * SECTOR)
    }

    fn is_bad(&self, sector: u64, len: usize, write: bool) -> bool {
        let end = sector + (len / SECTOR) as u64;
        self.bad
            .iter()
            .any(|b| (if write { b.writes && !b.silent } else { b.reads }) && b.start < end && sector < b.end)
    }

    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), String> {
        let r = self.range(sector, buf.len())?;
        if self.is_bad(sector, buf.len(), false) {
            return Err(format!("EIO reading sector {sector}"));
        }
        buf.copy_from_slice(&self.current[r]);
        Ok(())
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), String> {
        let r = self.range(sector, data.len())?;
        if self.is_bad(sector, data.len(), true) {
            return Err(format!("EIO writing sector {sector}"));
        }
        let end = sector + (data.len() / SECTOR) as u64;
        if self.bad.iter().any(|b| b.silent && b.writes && b.start < end && sector < b.end) {
            self.writes += 1;
            return Ok(());
        }
        self.current[r].copy_from_slice(data);
        self.cache.push((sector, data.to_vec()));
        self.writes += 1;
        Ok(())
    }

    /// Make the `p` oldest cached writes durable (what a flush that failed half-way did).
    fn flush_prefix(&mut self, p: usize) {
        for (s, d) in self.cache.drain(..p) {
            let a = s as usize * SECTOR;
            self.durable[a..a + d.len()].copy_from_slice(&d);
        }
    }

    pub fn flush(&mut self) {
        for (s, d) in self.cache.drain(..) {
            let a = s as usize * SECTOR;
            self.durable[a..a + d.len()].copy_from_slice(&d);
        }
        self.flushes += 1;
    }

    /// What survives a power cut: the durable image plus a random subset of the cached writes,
    /// in a random order, each possibly torn (only some of its sectors).
    pub fn crash_image(&self, rng: &mut ChaCha8Rng, policy: CachePolicy) -> Vec<u8> {
        let mut img = self.durable.clone();
        let mut kept: Vec<(u64, Vec<u8>)> = Vec::new();
        for (s, d) in &self.cache {
            let sectors = d.len() / SECTOR;
            let keep: Vec<bool> = match policy {
                CachePolicy::LoseAll => vec![false; sectors],
                CachePolicy::KeepAll => vec![true; sectors],
                CachePolicy::TearAll => {
                    let p = if sectors > 1 { rng.gen_range(1..sectors) } else { 0 };
                    (0..sectors).map(|i| i < p).collect()
                }
                CachePolicy::Random => match rng.gen_range(0..10) {
                    0..=3 => vec![false; sectors],
                    4..=7 => vec![true; sectors],
                    8 => {
                        let p = rng.gen_range(0..=sectors);
                        (0..sectors).map(|i| i < p).collect()
                    }
                    _ => (0..sectors).map(|_| rng.gen_bool(0.5)).collect(),
                },
            };
            for (i, k) in keep.into_iter().enumerate() {
                if k {
                    kept.push((s + i as u64, d[i * SECTOR..(i + 1) * SECTOR].to_vec()));
                }
            }
        }
        if policy == CachePolicy::Random {
            kept.shuffle(rng);
        }
        for (s, d) in kept {
            let a = s as usize * SECTOR;
            img[a..a + SECTOR].copy_from_slice(&d);
        }
        img
    }

    pub fn durable(&self) -> &[u8] {
        &self.durable
    }
    pub fn current(&self) -> &[u8] {
        &self.current
    }
    pub fn cached_writes(&self) -> usize {
        self.cache.len()
    }
}

/// Which unflushed writes survive a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    Random,
    LoseAll,
    KeepAll,
    /// Every unflushed multi-sector write keeps a strict, non-empty prefix of its sectors.
    TearAll,
}

// ---------------------------------------------------------------------------------------
// The device-mapper
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
enum STarget {
    Linear { dev: DevRef, offset: u64 },
    Striped { chunk: u64, stripes: Vec<(DevRef, u64)> },
    Crypt { cipher: String, xts: Rc<XtsSim>, iv_offset: u64, dev: DevRef, offset: u64, discards: bool },
    Mirror { region: u64, legs: [(DevRef, u64); 2], sync: Vec<bool>, health: [u8; 2], nosync: bool },
}

#[derive(Clone)]
struct SLine {
    start: u64,
    length: u64,
    target: STarget,
}

impl SLine {
    fn type_name(&self) -> &'static str {
        match self.target {
            STarget::Linear { .. } => "linear",
            STarget::Striped { .. } => "striped",
            STarget::Crypt { .. } => "crypt",
            STarget::Mirror { .. } => "mirror",
        }
    }

    /// As the kernel reports it, the key replaced by "-".
    fn facts(&self) -> TableLineFacts {
        let params = match &self.target {
            STarget::Linear { dev, offset } => format!("{dev} {offset}"),
            STarget::Striped { chunk, stripes } => {
                let mut p = format!("{} {chunk}", stripes.len());
                for (d, o) in stripes {
                    let _ = write!(p, " {d} {o}");
                }
                p
            }
            STarget::Crypt { cipher, iv_offset, dev, offset, discards, .. } => {
                let mut p = format!("{cipher} - {iv_offset} {dev} {offset}");
                if *discards {
                    p.push_str(" 1 allow_discards");
                }
                p
            }
            STarget::Mirror { region, legs, nosync, .. } => {
                let log = if *nosync { format!("core 2 {region} nosync") } else { format!("core 1 {region}") };
                format!("{log} 2 {} {} {} {}", legs[0].0, legs[0].1, legs[1].0, legs[1].1)
            }
        };
        TableLineFacts { start: self.start, length: self.length, target_type: self.type_name().into(), params }
    }

    fn devs(&self) -> Vec<DevRef> {
        match &self.target {
            STarget::Linear { dev, .. } | STarget::Crypt { dev, .. } => vec![*dev],
            STarget::Striped { stripes, .. } => stripes.iter().map(|s| s.0).collect(),
            STarget::Mirror { legs, .. } => legs.iter().map(|l| l.0).collect(),
        }
    }

    /// (device, first sector, sectors) of every range this line maps onto.
    fn extents(&self) -> Vec<(DevRef, u64, u64)> {
        match &self.target {
            STarget::Linear { dev, offset } | STarget::Crypt { dev, offset, .. } => vec![(*dev, *offset, self.length)],
            STarget::Striped { stripes, .. } => {
                let per = self.length / stripes.len() as u64;
                stripes.iter().map(|(d, o)| (*d, *o, per)).collect()
            }
            STarget::Mirror { legs, .. } => legs.iter().map(|(d, o)| (*d, *o, self.length)).collect(),
        }
    }
}

struct DmDev {
    dev: DevRef,
    uuid: String,
    private: bool,
    live: Option<Vec<SLine>>,
    inactive: Option<Vec<SLine>>,
    suspended: bool,
}

fn size_of(t: &Option<Vec<SLine>>) -> u64 {
    t.as_ref().and_then(|t| t.last()).map(|l| l.start + l.length).unwrap_or(0)
}

#[derive(Default)]
struct DmState {
    devs: BTreeMap<String, DmDev>,
    next_minor: u32,
}

fn parse_dev(w: &str) -> Result<DevRef, String> {
    let (a, b) = w.split_once(':').ok_or_else(|| format!("not a major:minor: {w:?}"))?;
    Ok(DevRef {
        major: a.parse().map_err(|_| format!("bad major {w:?}"))?,
        minor: b.parse().map_err(|_| format!("bad minor {w:?}"))?,
    })
}

fn parse_u64(w: Option<&&str>, what: &str) -> Result<u64, String> {
    w.ok_or_else(|| format!("missing {what}"))?.parse().map_err(|_| format!("bad {what}"))
}

/// Parse one table line as the kernel would (the same strings the real adapter sends).
fn parse_line(start: u64, length: u64, ty: &str, params: &str) -> Result<SLine, String> {
    let w: Vec<&str> = params.split_whitespace().collect();
    if length == 0 {
        return Err("zero-length target".into());
    }
    let target = match ty {
        "linear" => {
            if w.len() != 2 {
                return Err(format!("linear: invalid argument count in {params:?}"));
            }
            STarget::Linear { dev: parse_dev(w[0])?, offset: parse_u64(w.get(1), "offset")? }
        }
        "striped" => {
            let n = parse_u64(w.first(), "stripe count")? as usize;
            let chunk = parse_u64(w.get(1), "chunk size")?;
            if n == 0 || w.len() != 2 + 2 * n {
                return Err(format!("striped: invalid argument count in {params:?}"));
            }
            if chunk == 0 || !length.is_multiple_of(n as u64) || !(length / n as u64).is_multiple_of(chunk) {
                return Err("striped: target length not divisible by stripes × chunk".into());
            }
            let mut stripes = Vec::new();
            for i in 0..n {
                stripes.push((parse_dev(w[2 + 2 * i])?, parse_u64(w.get(3 + 2 * i), "stripe offset")?));
            }
            STarget::Striped { chunk, stripes }
        }
        "crypt" => {
            if w.len() < 5 {
                return Err(format!("crypt: not enough arguments in a crypt line ({} words)", w.len()));
            }
            if w[0] != CIPHER {
                return Err(format!("crypt: the simulator only has {CIPHER}, not {}", w[0]));
            }
            if w[1] == "-" {
                return Err("crypt: no key (a table read back from the kernel cannot be loaded again)".into());
            }
            let key = hex::decode(w[1]).map_err(|_| "crypt: key is not hex".to_string())?;
            if key.len() != 64 {
                return Err(format!(
                    "crypt: {CIPHER} in the simulator needs a 512-bit key, got {} bits",
                    key.len() * 8
                ));
            }
            let iv_offset = parse_u64(w.get(2), "iv_offset")?;
            let dev = parse_dev(w[3])?;
            let offset = parse_u64(w.get(4), "offset")?;
            let mut discards = false;
            if w.len() > 5 {
                let nopt = parse_u64(w.get(5), "optional argument count")? as usize;
                if w.len() != 6 + nopt {
                    return Err("crypt: optional argument count mismatch".into());
                }
                for o in &w[6..] {
                    match *o {
                        "allow_discards" => discards = true,
                        other => return Err(format!("crypt: unknown option {other}")),
                    }
                }
            }
            STarget::Crypt { cipher: w[0].into(), xts: Rc::new(xts_from_key(&key)), iv_offset, dev, offset, discards }
        }
        "mirror" => {
            // core 1 <region> | core 2 <region> nosync, then 2 <dev> <off> <dev> <off> [0]
            let nosync = match (w.first(), w.get(1)) {
                (Some(&"core"), Some(&"1")) => false,
                (Some(&"core"), Some(&"2")) if w.get(3) == Some(&"nosync") => true,
                _ => return Err(format!("mirror: the simulator only has a core log, with nosync or not: {params:?}")),
            };
            let region = parse_u64(w.get(2), "region size")?;
            if region < 2 || !region.is_power_of_two() || region > length {
                return Err(format!("mirror: invalid region size {region} for a target of {length} sectors"));
            }
            let w = if nosync { [&w[..3], &w[4..]].concat() } else { w };
            if w.get(3) != Some(&"2") || !(w.len() == 8 || (w.len() == 9 && w[8] == "0")) {
                return Err(format!("mirror: the simulator only has 2 legs and no features: {params:?}"));
            }
            let legs = [
                (parse_dev(w[4])?, parse_u64(w.get(5), "leg offset")?),
                (parse_dev(w[6])?, parse_u64(w.get(7), "leg offset")?),
            ];
            let regions = length.div_ceil(region) as usize;
            STarget::Mirror { region, legs, sync: vec![nosync; regions], health: *b"AA", nosync }
        }
        other => return Err(format!("unknown target type {other:?}")),
    };
    Ok(SLine { start, length, target })
}

// ---------------------------------------------------------------------------------------
// The live system
// ---------------------------------------------------------------------------------------

/// How a logical volume maps onto the PV (in PV sectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Linear { pv: u64 },
    Striped { chunk: u64, pvs: Vec<u64> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    pub name: String,
    /// (LV start, length, mapping).
    pub segs: Vec<(u64, u64, Seg)>,
}

impl Lv {
    pub fn len(&self) -> u64 {
        self.segs.last().map(|s| s.0 + s.1).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// PV sector of LV sector `o`.
    pub fn pv(&self, o: u64) -> u64 {
        for (start, len, seg) in &self.segs {
            if o >= *start && o < start + len {
                let r = o - start;
                return match seg {
                    Seg::Linear { pv } => pv + r,
                    Seg::Striped { chunk, pvs } => {
                        let c = r / chunk;
                        let n = pvs.len() as u64;
                        pvs[(c % n) as usize] + (c / n) * chunk + r % chunk
                    }
                };
            }
        }
        panic!("LV sector {o} beyond {}", self.name);
    }

    /// The dm table of the LV on device `on` (LVM's own lines).
    pub fn table(&self, on: DevRef) -> Vec<TableLineFacts> {
        self.segs
            .iter()
            .map(|(start, len, seg)| match seg {
                Seg::Linear { pv } => TableLineFacts {
                    start: *start,
                    length: *len,
                    target_type: "linear".into(),
                    params: format!("{on} {pv}"),
                },
                Seg::Striped { chunk, pvs } => {
                    let mut p = format!("{} {chunk}", pvs.len());
                    for o in pvs {
                        let _ = write!(p, " {on} {o}");
                    }
                    TableLineFacts { start: *start, length: *len, target_type: "striped".into(), params: p }
                }
            })
            .collect()
    }
}

/// How busy the live system is: probabilities per operation of the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterConfig {
    /// Issue a write of 1..=max_len sectors through an LV.
    pub p_write: f64,
    /// Then fsync (flush through the LV; acknowledges every write issued before).
    pub p_flush: f64,
    /// Read random sectors through the LVs and check them against the latest writes.
    pub p_read: f64,
    /// Write/read LVM metadata sectors [0, pe_start) (not the label) through the PV device.
    pub p_meta: f64,
    /// Fraction of writes aimed at the chunk being moved (or just moved).
    pub p_hot: f64,
    /// Let the kernel copy one mirror region in the background.
    pub p_recover: f64,
    pub max_len: u64,
    /// LVM writes into the label sectors [0, F) when it sees the PV on the raw device (a
    /// label rewrite). With the PV seen through the bridge it always may.
    pub raw_label_area: bool,
}

impl WriterConfig {
    pub fn busy() -> WriterConfig {
        WriterConfig {
            p_write: 0.5,
            p_flush: 0.3,
            p_read: 0.3,
            p_meta: 0.08,
            p_hot: 0.6,
            p_recover: 0.15,
            max_len: 4,
            raw_label_area: false,
        }
    }
    pub fn off() -> WriterConfig {
        WriterConfig {
            p_write: 0.0,
            p_flush: 0.0,
            p_read: 0.0,
            p_meta: 0.0,
            p_hot: 0.0,
            p_recover: 0.0,
            max_len: 1,
            raw_label_area: true,
        }
    }
    /// LVM metadata writes (including the label sectors [0, F)) and fsyncs at every turn.
    pub fn meta_heavy() -> WriterConfig {
        WriterConfig {
            p_write: 0.2,
            p_flush: 1.0,
            p_read: 0.3,
            p_meta: 1.0,
            p_hot: 0.5,
            p_recover: 0.1,
            max_len: 2,
            raw_label_area: true,
        }
    }
    /// Writes and fsyncs before every operation, aimed at the chunk in flight.
    pub fn relentless() -> WriterConfig {
        WriterConfig {
            p_write: 1.0,
            p_flush: 1.0,
            p_read: 0.5,
            p_meta: 0.2,
            p_hot: 0.9,
            p_recover: 0.0,
            max_len: 4,
            raw_label_area: false,
        }
    }
}

/// What the live system expects of every plaintext sector of the PV, [0, L).
#[derive(Clone)]
pub struct Model {
    /// What the disk durably holds, as far as the live system knows: one write id (0 = the
    /// original content), the last acknowledged one; after a power cut, every write that may
    /// have survived, until a read tells which one did.
    pub base: Vec<Vec<u64>>,
    /// Ids of writes issued since, in order.
    pub pending: Vec<Vec<u64>>,
    pub next_id: u64,
    pub writes: u64,
    pub acks: u64,
    pub reads_checked: u64,
}

impl Model {
    fn new(l: u64) -> Model {
        Model {
            base: vec![vec![0]; l as usize],
            pending: vec![Vec::new(); l as usize],
            next_id: 1,
            writes: 0,
            acks: 0,
            reads_checked: 0,
        }
    }
    /// What a read must return now: one id, or (after a power cut, not yet read) any of several.
    pub fn latest(&self, x: u64) -> Vec<u64> {
        match self.pending[x as usize].last() {
            Some(&id) => vec![id],
            None => self.base[x as usize].clone(),
        }
    }
    /// What the disk may hold after a power cut now.
    pub fn allowed(&self, x: u64) -> Vec<u64> {
        let mut v = self.base[x as usize].clone();
        v.extend(&self.pending[x as usize]);
        v
    }
    /// The acknowledged write of `x`, if it is known and not the original content.
    pub fn acked(&self, x: u64) -> Option<u64> {
        match self.base[x as usize][..] {
            [id] if id != 0 => Some(id),
            _ => None,
        }
    }
    fn ack_all(&mut self) {
        for (a, p) in self.base.iter_mut().zip(self.pending.iter_mut()) {
            if let Some(&last) = p.last() {
                *a = vec![last];
                p.clear();
            }
        }
        self.acks += 1;
    }
    /// A read saw `id` on a sector with nothing pending: that is what survived.
    fn observed(&mut self, x: u64, id: u64) {
        if self.pending[x as usize].is_empty() {
            self.base[x as usize] = vec![id];
        }
    }
    /// The power went: each sector now holds one of the writes that may have survived.
    fn power_cut(&mut self) {
        for (a, p) in self.base.iter_mut().zip(self.pending.iter_mut()) {
            a.append(p);
        }
    }
}

/// The live system: LVs active on some device, the writer, the reader.
#[derive(Clone)]
pub struct Live {
    /// Device the LVs are mapped onto (raw, or the bridge once rerouted by a fresh activation).
    pub on: DevRef,
    /// Whether the LVs are active (after a power cut: no, until activated).
    pub active: bool,
}

// ---------------------------------------------------------------------------------------
// The scenario and the world
// ---------------------------------------------------------------------------------------

/// Sizes of the simulated device and PV, and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub n: u64,
    pub l: u64,
    pub s: u64,
    pub k: u64,
    pub region: u64,
    pub pe_start: u64,
    pub extent: u64,
    pub seed: u64,
    pub writer: WriterConfig,
    /// Mutation for the tests of the tests: every chunk commit reaches the disk only after the
    /// bridge has flipped to crypt (what an engine with the wrong commit order would do).
    pub late_commit_mutant: bool,
    /// Cut every suspended window that can be cut (`max_stall` zero, the last comparison
    /// read in pieces of 8 sectors): each step is tried [`super::MAX_CUTS`] + 1 times, its windows
    /// cut after their first piece, live I/O running in between.
    pub cut_every_window: bool,
}

impl Scenario {
    /// L = 256, S = 32, k = 24 (11 chunks, the last one 16 sectors: L mod k != 0), region 16
    /// (a chunk is one full and one partial region), device of the minimum size (the tail is
    /// exactly full: [S+L, shadow) is empty; N is not a multiple of 8).
    pub fn small(seed: u64) -> Scenario {
        let (l, s) = (256, 32);
        let n = (l..).find(|&n| n - l >= Geometry::tail_needed(n, s)).unwrap();
        Scenario {
            n,
            l,
            s,
            k: 24,
            region: 16,
            pe_start: 16,
            extent: 8,
            seed,
            writer: WriterConfig::busy(),
            late_commit_mutant: false,
            cut_every_window: false,
        }
    }

    /// L = 2048, S = 128, k = 120 (L mod k != 0), region 16, some unused room in the tail.
    pub fn larger(seed: u64) -> Scenario {
        let (l, s) = (2048, 128);
        let n = (l..).find(|&n| n - l >= Geometry::tail_needed(n, s)).unwrap() + 301;
        Scenario {
            n,
            l,
            s,
            k: 120,
            region: 16,
            pe_start: 64,
            extent: 32,
            seed,
            writer: WriterConfig::busy(),
            late_commit_mutant: false,
            cut_every_window: false,
        }
    }

    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.n, self.l, self.s, self.k, self.region).expect("scenario geometry")
    }

    /// Three LVs: root in two non-contiguous segments, home linear, swap striped over 2 stripes
    /// of the same PV; two ranges of free extents.
    pub fn lvs(&self) -> Vec<Lv> {
        let e = self.extent;
        let p = (self.l - self.pe_start) / e;
        let pv = |x: u64| self.pe_start + x * e;
        let (r0, h0, f0, r1, sw) = (0, p / 4, p / 2, p / 2 + p / 8, 3 * p / 4);
        let sw_ext = 2 * ((p - sw - 1) / 2);
        let chunk = 8;
        assert!(sw_ext >= 2 && f0 < r1);
        vec![
            Lv {
                name: "vg0-root".into(),
                segs: vec![
                    (0, (h0 - r0) * e, Seg::Linear { pv: pv(r0) }),
                    ((h0 - r0) * e, (sw - r1) * e, Seg::Linear { pv: pv(r1) }),
                ],
            },
            Lv { name: "vg0-home".into(), segs: vec![(0, (f0 - h0) * e, Seg::Linear { pv: pv(h0) })] },
            Lv {
                name: "vg0-swap".into(),
                segs: vec![(0, sw_ext * e, Seg::Striped { chunk, pvs: vec![pv(sw), pv(sw + sw_ext / 2)] })],
            },
        ]
    }
}

/// How operation `i` fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    PowerCut,
    Kill,
    Error,
}

/// Everything simulated, shared by the engine's [`SimDisk`] and [`SimKernel`] handles.
pub struct World {
    pub sc: Scenario,
    pub g: Geometry,
    pub key: Vec<u8>,
    pub header: Vec<u8>,
    pub disk: DiskImage,
    dm: DmState,
    pub lvs: Vec<Lv>,
    pub live: Live,
    pub model: Model,
    /// Reverse map: PV sector → (LV index, LV sector), for sectors inside LVs.
    pv_owner: Vec<Option<(usize, u64)>>,
    rng: ChaCha8Rng,
    /// Operations performed so far (the next one gets this number).
    pub ops: u64,
    pub fault: Option<(u64, Fault)>,
    /// The fault fired.
    pub fired: Option<(u64, Fault)>,
    /// The luksify process is dead (kill or power cut): every engine operation fails.
    dead: bool,
    /// The machine is off (power cut): nothing runs any more.
    off: bool,
    /// Operation log (number, what), for failure reports.
    pub trace: Vec<String>,
    /// Things the live system saw that it must never see (stale or wrong reads).
    pub violations: Vec<String>,
    /// Mutation: hold every chunk commit back until after the bridge's next resume.
    pub defer_chunk_commits: bool,
    deferred: Option<(u64, Vec<u8>)>,
    swallow_flush: bool,
    release_armed: bool,
    /// Mirror recovery writes (the kernel's).
    pub recovery_steps: u64,
    /// Devices the running luksify process resumes with the udev-disable flags (its
    /// `set_udev_hidden`); a new process starts with none.
    udev_hidden: BTreeSet<String>,
    /// The bridge's last uevent let udev (and LVM's autoactivation) see it, and it was the
    /// finished LUKS mapping then. A later hidden resume clears it again.
    pub bridge_shown_to_udev: bool,
}

type Shared = Rc<RefCell<World>>;

fn io_err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

#[derive(Debug)]
enum IoFail {
    Blocked,
    Error(#[allow(dead_code)] String),
}

impl World {
    fn new(sc: &Scenario, image: Vec<u8>, model: Model, live_on: Option<DevRef>) -> World {
        let g = sc.geometry();
        let (key, header) = key_and_header(KEY_SEED);
        let lvs = sc.lvs();
        let mut pv_owner = vec![None; sc.l as usize];
        for (i, lv) in lvs.iter().enumerate() {
            for o in 0..lv.len() {
                let x = lv.pv(o) as usize;
                assert!(pv_owner[x].is_none(), "LVs overlap at {x}");
                pv_owner[x] = Some((i, o));
            }
        }
        let mut w = World {
            sc: sc.clone(),
            g,
            key,
            header,
            disk: DiskImage::new(image),
            dm: DmState::default(),
            lvs,
            live: Live { on: RAW, active: false },
            model,
            pv_owner,
            rng: ChaCha8Rng::seed_from_u64(sc.seed),
            ops: 0,
            fault: None,
            fired: None,
            dead: false,
            off: false,
            trace: Vec::new(),
            violations: Vec::new(),
            defer_chunk_commits: sc.late_commit_mutant,
            deferred: None,
            swallow_flush: false,
            release_armed: false,
            recovery_steps: 0,
            udev_hidden: BTreeSet::new(),
            bridge_shown_to_udev: false,
        };
        if let Some(on) = live_on {
            w.activate_lvs(on).expect("activating the LVs");
        }
        w
    }

    // ----- operations: numbering, faults, the live system in between -----

    /// Every engine-visible operation goes through here: the live system gets a turn, then
    /// the fault (if this is its number) fires.
    fn op(&mut self, what: impl FnOnce() -> String) -> Result<(), String> {
        if self.dead {
            return Err("the luksify process is dead".into());
        }
        let i = self.ops;
        self.ops += 1;
        let what = what();
        self.tick();
        if let Some((at, f)) = self.fault {
            if at == i {
                self.fired = Some((i, f));
                self.trace.push(format!("#{i} {what}  <-- {f:?}"));
                match f {
                    Fault::PowerCut => {
                        self.dead = true;
                        self.off = true;
                    }
                    Fault::Kill => self.dead = true,
                    Fault::Error => {}
                }
                if self.dead {
                    // A commit the (mutant) engine still held back dies with it.
                    self.deferred = None;
                    self.release_armed = false;
                    self.swallow_flush = false;
                }
                return Err(format!("injected {f:?} at operation {i} ({what})"));
            }
        }
        self.trace.push(format!("#{i} {what}"));
        if self.release_armed {
            // Mutation: the held-back commit lands only now, after the table flipped.
            self.release_armed = false;
            if let Some((s, d)) = self.deferred.take() {
                self.trace.push(format!("   (deferred journal write at {s} lands now)"));
                let _ = self.disk.write(s, &d);
                self.disk.flush();
            }
        }
        Ok(())
    }

    /// The live system's turn: maybe a write, an fsync, a check read, a metadata write,
    /// a background mirror recovery step.
    pub fn tick(&mut self) {
        if self.off {
            return;
        }
        let c = self.sc.writer.clone();
        if self.rng.gen_bool(c.p_recover) {
            self.recover_step(None);
        }
        if !self.live.active {
            return;
        }
        if self.rng.gen_bool(c.p_write) {
            self.writer_write();
        }
        if self.rng.gen_bool(c.p_meta) {
            self.meta_write();
        }
        if self.rng.gen_bool(c.p_flush) {
            self.writer_flush();
        }
        if self.rng.gen_bool(c.p_read) {
            self.reader_check(4);
        }
    }

    /// Let the machine run for `n` turns without the engine (after a kill or an error).
    pub fn idle(&mut self, n: usize) {
        for _ in 0..n {
            self.tick();
        }
    }

    /// Whether `dev` is a dm device whose live table holds a mirror target.
    fn is_mirror_dev(&self, dev: DevRef) -> bool {
        self.dm_by_dev(dev)
            .and_then(|(_, d)| d.live.as_ref())
            .is_some_and(|t| t.iter().any(|l| matches!(l.target, STarget::Mirror { .. })))
    }

    /// The sector range the writer likes to hit: the chunk in flight, or the one just moved.
    fn hot_range(&self) -> Option<(u64, u64)> {
        let bridge = self.dm.devs.get(BRIDGE)?;
        let t = bridge.live.as_ref()?;
        let in_flight = t.iter().find(|l| match &l.target {
            STarget::Mirror { .. } => true,
            STarget::Linear { dev, .. } => self.is_mirror_dev(*dev),
            _ => false,
        });
        if let Some(m) = in_flight {
            let end = (m.start + m.length + self.g.k).min(self.g.l);
            return Some((m.start, end.max(m.start + 1)));
        }
        let c = t.iter().find(|l| matches!(l.target, STarget::Crypt { .. }))?;
        Some((c.start.saturating_sub(self.g.k), (c.start + self.g.k).min(self.g.l)))
    }

    fn pick_lv_sector(&mut self) -> Option<(usize, u64)> {
        let hot = if self.rng.gen_bool(self.sc.writer.p_hot) { self.hot_range() } else { None };
        for _ in 0..16 {
            let x = match hot {
                Some((a, b)) => self.rng.gen_range(a..b),
                None => self.rng.gen_range(0..self.sc.l),
            };
            if let Some(o) = self.pv_owner[x as usize] {
                return Some(o);
            }
        }
        None
    }

    fn lv_dev(&self, i: usize) -> Option<DevRef> {
        self.dm.devs.get(&self.lvs[i].name).map(|d| d.dev)
    }

    /// The device LVM sees the PV on: the bridge once it has a live table, else the raw one.
    fn pv_dev(&self) -> DevRef {
        match self.dm.devs.get(BRIDGE) {
            Some(b) if b.live.is_some() => b.dev,
            _ => RAW,
        }
    }

    fn writer_write(&mut self) {
        let Some((lv, o)) = self.pick_lv_sector() else { return };
        let Some(dev) = self.lv_dev(lv) else { return };
        let len = self.rng.gen_range(1..=self.sc.writer.max_len).min(self.lvs[lv].len() - o);
        if (o..o + len).any(|s| self.blocked(dev, s)) {
            return; // the write waits behind a suspended device: it is issued later, or never
        }
        let id = self.model.next_id;
        self.model.next_id += 1;
        for s in o..o + len {
            let x = self.lvs[lv].pv(s);
            let mut b = content(id, x);
            // Recorded before the I/O: once issued, it may be on the disk.
            self.model.pending[x as usize].push(id);
            if let Err(e) = self.dev_io(dev, s, &mut b, true) {
                self.violations.push(format!("write #{id} to {} sector {s} failed: {e:?}", self.lvs[lv].name));
            }
        }
        self.model.writes += 1;
    }

    fn meta_write(&mut self) {
        let dev = self.pv_dev();
        let lo = if dev == RAW && !self.sc.writer.raw_label_area { self.g.f } else { 0 };
        let x = loop {
            let x = self.rng.gen_range(lo..self.sc.pe_start);
            if x != 1 {
                break x;
            }
        };
        if self.blocked(dev, x) {
            return;
        }
        let id = self.model.next_id;
        self.model.next_id += 1;
        self.model.pending[x as usize].push(id);
        let mut b = content(id, x);
        if let Err(e) = self.dev_io(dev, x, &mut b, true) {
            self.violations.push(format!("metadata write #{id} to PV sector {x} on {dev} failed: {e:?}"));
        }
        self.model.writes += 1;
        // Read a metadata sector back through the PV device.
        let y = self.rng.gen_range(0..self.sc.pe_start);
        self.check_read(dev, y, y);
    }

    fn writer_flush(&mut self) {
        // fsync through one LV: the flush reaches every device below it, down to the disk.
        let lv = self.rng.gen_range(0..self.lvs.len());
        let Some(dev) = self.lv_dev(lv) else { return };
        if self.flush_blocked(dev) {
            return;
        }
        match self.dev_flush(dev) {
            Ok(()) => self.model.ack_all(),
            Err(e) => self.violations.push(format!("fsync through {} failed: {e:?}", self.lvs[lv].name)),
        }
    }

    fn reader_check(&mut self, count: usize) {
        for _ in 0..count {
            let Some((lv, o)) = self.pick_lv_sector() else { continue };
            let Some(dev) = self.lv_dev(lv) else { continue };
            let x = self.lvs[lv].pv(o);
            self.check_read(dev, o, x);
        }
    }

    /// Read sector `s` of `dev` (which holds plaintext PV sector `x`) and compare it with the
    /// latest write.
    fn check_read(&mut self, dev: DevRef, s: u64, x: u64) {
        if self.blocked(dev, s) {
            return;
        }
        let mut b = vec![0u8; SECTOR];
        match self.dev_io(dev, s, &mut b, false) {
            Ok(()) => {
                let want = self.model.latest(x);
                match want.iter().find(|&&id| b == content(id, x)) {
                    Some(&id) => self.model.observed(x, id),
                    None => {
                        let msg = format!(
                            "read of PV sector {x} (sector {s} of {dev}) after op #{} returned {} instead of write {want:?}",
                            self.ops,
                            describe(&b)
                        );
                        self.violations.push(msg);
                    }
                }
                self.model.reads_checked += 1;
            }
            Err(e) => self.violations.push(format!("read of PV sector {x} through {dev} failed: {e:?}")),
        }
    }

    /// Read every sector of every active LV and the PV metadata through the stack: all must
    /// be the latest writes.
    pub fn check_all_reads(&mut self) -> Result<(), String> {
        let before = self.violations.len();
        if self.live.active {
            for i in 0..self.lvs.len() {
                let Some(dev) = self.lv_dev(i) else { return Err(format!("{} is not active", self.lvs[i].name)) };
                for o in 0..self.lvs[i].len() {
                    if self.blocked(dev, o) {
                        return Err(format!("{} is blocked behind a suspended device", self.lvs[i].name));
                    }
                    let x = self.lvs[i].pv(o);
                    self.check_read(dev, o, x);
                }
            }
            let dev = self.pv_dev();
            for x in 0..self.sc.pe_start {
                self.check_read(dev, x, x);
            }
        }
        if self.violations.len() > before {
            return Err(self.violations[before..].join("\n"));
        }
        Ok(())
    }

    // ----- the live system's LVs -----

    /// Activate every LV with its table on `on` (what `vgchange -ay` does).
    pub fn activate_lvs(&mut self, on: DevRef) -> Result<(), String> {
        for i in 0..self.lvs.len() {
            let name = self.lvs[i].name.clone();
            let table = self.lvs[i].table(on);
            let minor = self.dm.next_minor;
            self.dm.next_minor += 1;
            let dev = DevRef { major: DM_MAJOR, minor };
            self.dm.devs.insert(
                name.clone(),
                DmDev {
                    dev,
                    uuid: format!("LVM-{name}"),
                    private: false,
                    live: None,
                    inactive: None,
                    suspended: false,
                },
            );
            let lines =
                self.parse_table(table.iter().map(|l| (l.start, l.length, l.target_type.clone(), l.params.clone())))?;
            let d = self.dm.devs.get_mut(&name).unwrap();
            d.live = Some(lines);
        }
        self.live = Live { on, active: true };
        Ok(())
    }

    // ----- block I/O through the dm stack -----

    fn dm_by_dev(&self, dev: DevRef) -> Option<(&String, &DmDev)> {
        self.dm.devs.iter().find(|(_, d)| d.dev == dev)
    }

    fn dev_size(&self, dev: DevRef) -> Option<u64> {
        if dev == RAW {
            return Some(self.disk.n);
        }
        self.dm_by_dev(dev).map(|(_, d)| size_of(&d.live))
    }

    fn line_at(t: &[SLine], s: u64) -> Option<usize> {
        t.iter().position(|l| s >= l.start && s < l.start + l.length)
    }

    /// Whether an I/O to sector `s` of `dev` would wait behind a suspended device.
    fn blocked(&self, dev: DevRef, s: u64) -> bool {
        if dev == RAW {
            return false;
        }
        let Some((_, d)) = self.dm_by_dev(dev) else { return false };
        if d.suspended {
            return true;
        }
        let Some(t) = &d.live else { return false };
        let Some(i) = Self::line_at(t, s) else { return false };
        let l = &t[i];
        let o = s - l.start;
        match &l.target {
            STarget::Linear { dev, offset } | STarget::Crypt { dev, offset, .. } => self.blocked(*dev, offset + o),
            STarget::Striped { .. } => {
                let (d2, s2) = striped_map(l, o);
                self.blocked(d2, s2)
            }
            STarget::Mirror { legs, .. } => legs.iter().any(|(d2, off)| self.blocked(*d2, off + o)),
        }
    }

    fn flush_blocked(&self, dev: DevRef) -> bool {
        if dev == RAW {
            return false;
        }
        let Some((_, d)) = self.dm_by_dev(dev) else { return false };
        d.suspended || d.live.iter().flatten().flat_map(|l| l.devs()).any(|d2| self.flush_blocked(d2))
    }

    fn dev_flush(&mut self, dev: DevRef) -> Result<(), IoFail> {
        if dev == RAW {
            self.disk.flush();
            return Ok(());
        }
        let (_, d) = self.dm_by_dev(dev).ok_or_else(|| IoFail::Error(format!("no device {dev}")))?;
        if d.suspended {
            return Err(IoFail::Blocked);
        }
        let below: Vec<DevRef> = d.live.iter().flatten().flat_map(|l| l.devs()).collect();
        for b in below {
            self.dev_flush(b)?;
        }
        Ok(())
    }

    /// One sector of I/O to `dev` through its live table.
    fn dev_io(&mut self, dev: DevRef, s: u64, buf: &mut [u8], write: bool) -> Result<(), IoFail> {
        debug_assert_eq!(buf.len(), SECTOR);
        if dev == RAW {
            return if write { self.disk.write(s, buf) } else { self.disk.read(s, buf) }.map_err(IoFail::Error);
        }
        let (name, d) = self.dm_by_dev(dev).ok_or_else(|| IoFail::Error(format!("no device {dev}")))?;
        if d.suspended {
            return Err(IoFail::Blocked);
        }
        let name = name.clone();
        let t = d.live.as_ref().ok_or_else(|| IoFail::Error(format!("{name} has no table")))?;
        let li = Self::line_at(t, s).ok_or_else(|| IoFail::Error(format!("sector {s} beyond the end of {name}")))?;
        let l = &t[li];
        let o = s - l.start;
        match l.target.clone() {
            STarget::Linear { dev, offset } => self.dev_io(dev, offset + o, buf, write),
            STarget::Striped { .. } => {
                let (d2, s2) = striped_map(l, o);
                self.dev_io(d2, s2, buf, write)
            }
            STarget::Crypt { xts, iv_offset, dev, offset, .. } => {
                if write {
                    let mut c = buf.to_vec();
                    xts.encrypt(iv_offset + o, &mut c);
                    self.dev_io(dev, offset + o, &mut c, true)
                } else {
                    self.dev_io(dev, offset + o, buf, false)?;
                    xts.decrypt(iv_offset + o, buf);
                    Ok(())
                }
            }
            STarget::Mirror { region, legs, sync, health, .. } => {
                let r = (o / region) as usize;
                let in_sync = sync[r];
                if write {
                    let r0 = self.dev_io(legs[0].0, legs[0].1 + o, buf, true);
                    if r0.is_err() {
                        self.set_health(&name, li, 0, b'D');
                    }
                    let mut r1 = Err(IoFail::Error("not written".into()));
                    if in_sync {
                        r1 = self.dev_io(legs[1].0, legs[1].1 + o, buf, true);
                        if r1.is_err() {
                            self.set_health(&name, li, 1, b'D');
                        }
                    }
                    // Without handle_errors, a write that reached one leg completes as success.
                    if r0.is_ok() || r1.is_ok() {
                        Ok(())
                    } else {
                        r0
                    }
                } else {
                    // Out-of-sync regions are read from the primary; in-sync ones from either
                    // healthy leg (a failed primary hands over to the other leg, as
                    // dm-raid1's fail_mirror does).
                    let primary_failed = health[0] != b'A' && health[1] == b'A';
                    let leg =
                        if in_sync && (primary_failed || (health == *b"AA" && self.rng.gen_bool(0.5))) { 1 } else { 0 };
                    let r = self.dev_io(legs[leg].0, legs[leg].1 + o, buf, false);
                    if r.is_err() {
                        self.set_health(&name, li, leg, b'R');
                        if in_sync {
                            let other = 1 - leg;
                            return self.dev_io(legs[other].0, legs[other].1 + o, buf, false);
                        }
                    }
                    r
                }
            }
        }
    }

    fn set_health(&mut self, name: &str, li: usize, leg: usize, c: u8) {
        if let Some(STarget::Mirror { health, .. }) =
            self.dm.devs.get_mut(name).and_then(|d| d.live.as_mut()).map(|t| &mut t[li].target)
        {
            if health[leg] == b'A' {
                health[leg] = c;
            }
        }
    }

    /// Copy one out-of-sync region of a mirror (of `only`, or of any device), as kcopyd does:
    /// read the primary, write the secondary, into the disk's volatile cache (no FUA).
    /// Returns whether a region was copied (or failed).
    fn recover_step(&mut self, only: Option<&str>) -> bool {
        let mut job = None;
        'find: for (name, d) in &self.dm.devs {
            if only.is_some_and(|o| o != name) || d.suspended {
                continue;
            }
            for (li, l) in d.live.iter().flatten().enumerate() {
                if let STarget::Mirror { region, legs, sync, health, .. } = &l.target {
                    if health != b"AA" {
                        continue;
                    }
                    if let Some(r) = sync.iter().position(|s| !s) {
                        let a = r as u64 * region;
                        let b = (a + region).min(l.length);
                        job = Some((name.clone(), li, r, a, b, *legs));
                        break 'find;
                    }
                }
            }
        }
        let Some((name, li, r, a, b, legs)) = job else { return false };
        if (a..b).any(|o| self.blocked(legs[0].0, legs[0].1 + o) || self.blocked(legs[1].0, legs[1].1 + o)) {
            return false;
        }
        let mut data = vec![0u8; ((b - a) as usize) * SECTOR];
        let mut failed = None;
        for (i, o) in (a..b).enumerate() {
            if self.dev_io(legs[0].0, legs[0].1 + o, &mut data[i * SECTOR..(i + 1) * SECTOR], false).is_err() {
                failed = Some(0);
                break;
            }
        }
        if failed.is_none() {
            for (i, o) in (a..b).enumerate() {
                if self.dev_io(legs[1].0, legs[1].1 + o, &mut data[i * SECTOR..(i + 1) * SECTOR], true).is_err() {
                    failed = Some(1);
                    break;
                }
            }
        }
        self.recovery_steps += 1;
        match failed {
            // A failed copy is a sync error on that leg; the region stays out of sync.
            Some(leg) => self.set_health(&name, li, leg, b'S'),
            None => {
                if let Some(STarget::Mirror { sync, .. }) =
                    self.dm.devs.get_mut(&name).and_then(|d| d.live.as_mut()).map(|t| &mut t[li].target)
                {
                    sync[r] = true;
                }
            }
        }
        true
    }

    /// Remove the LVs (`vgchange -an`): they must not be held by anything.
    pub fn deactivate_lvs(&mut self) {
        for lv in &self.lvs {
            self.dm.devs.remove(&lv.name);
        }
        self.live.active = false;
    }

    /// Whether the raw device shows the PV label in its durable image (what LVM on a freshly
    /// booted machine would find).
    pub fn raw_shows_pv(&self) -> bool {
        self.disk.durable()[..SECTOR * 4].chunks(SECTOR).any(|s| s == label_sector().as_slice())
    }

    // ----- tables -----

    fn parse_table(&self, lines: impl Iterator<Item = (u64, u64, String, String)>) -> Result<Vec<SLine>, String> {
        let mut out: Vec<SLine> = Vec::new();
        let mut pos = 0;
        for (start, length, ty, params) in lines {
            if start != pos {
                return Err(format!("gap or overlap in the table at sector {start} (expected {pos})"));
            }
            let l = parse_line(start, length, &ty, &params)?;
            for (d, off, len) in l.extents() {
                let size = self.dev_size(d).ok_or_else(|| format!("device {d} does not exist"))?;
                if off + len > size {
                    return Err(format!("{ty} line {start}+{length}: device {d} too small ({off}+{len} > {size})"));
                }
            }
            pos = start + length;
            out.push(l);
        }
        if out.is_empty() {
            return Err("empty table".into());
        }
        Ok(out)
    }

    fn dev_mut(&mut self, name: &str) -> KResult<&mut DmDev> {
        self.dm.devs.get_mut(name).ok_or_else(|| KernelError(format!("{name}: no such device (ENXIO)")))
    }

    /// Whether any other device's live or inactive table refers to `dev`, or the live system
    /// holds it open.
    fn in_use(&self, name: &str, dev: DevRef) -> Option<String> {
        for (n, d) in &self.dm.devs {
            if n != name && d.live.iter().chain(d.inactive.iter()).flatten().any(|l| l.devs().contains(&dev)) {
                return Some(n.clone());
            }
        }
        if self.live.active && self.lvs.iter().any(|l| l.name == name) {
            return Some("a mounted filesystem".into());
        }
        None
    }

    // ----- final checks -----

    fn plain_ok(&self, x: u64, b: &[u8], exact: bool) -> Result<(), String> {
        let allowed = if exact { self.model.latest(x) } else { self.model.allowed(x) };
        let id =
            if x == 1 && b == label_sector().as_slice() { 0 } else { u64::from_le_bytes(b[..8].try_into().unwrap()) };
        if allowed.contains(&id) && content(id, x) == b {
            return Ok(());
        }
        let found = describe(b);
        let lost = match self.model.acked(x) {
            Some(id) => format!(" (acknowledged write #{id} LOST)"),
            None => String::new(),
        };
        Err(format!("plaintext sector {x} holds {found}, expected one of writes {allowed:?}{lost}"))
    }

    /// Check a durable image: either untouched (no journal, plaintext in place) or fully
    /// converted (LUKS header, ciphertext, tail wiped). `exact`: every issued write must be
    /// there (no power was lost since), not merely every acknowledged one.
    pub fn check_image(&self, img: &[u8], exact: bool) -> Result<&'static str, String> {
        let g = self.g;
        let sec = |x: u64| &img[x as usize * SECTOR..(x as usize + 1) * SECTOR];
        let mut errs = Vec::new();
        let mut a = vec![0u8; SLOT_BYTES];
        let mut b = vec![0u8; SLOT_BYTES];
        a.copy_from_slice(&img[g.journal as usize * SECTOR..][..SLOT_BYTES]);
        b.copy_from_slice(&img[g.journal_slot(1) as usize * SECTOR..][..SLOT_BYTES]);
        match journal::choose(&a, &b) {
            Ok(None) => {}
            Ok(Some(r)) => return Err(format!("a journal remains: {:?} seq {}", r.state, r.seq)),
            Err(e) => return Err(format!("the journal is corrupt: {e}")),
        }
        let converted = img[..self.header.len()] == self.header[..];
        let what = if converted {
            let mut area = vec![0u8; (g.s as usize) * SECTOR];
            area[..self.header.len()].copy_from_slice(&self.header);
            if img[..area.len()] != area[..] {
                errs.push("[0, S) is not the LUKS header followed by zeros".to_string());
            }
            let xts = xts_from_key(&self.key);
            for x in 0..g.l {
                let mut p = sec(g.s + x).to_vec();
                xts.decrypt(x, &mut p);
                if let Err(e) = self.plain_ok(x, &p, exact) {
                    errs.push(e);
                }
            }
            for x in g.s + g.l..g.shadow {
                if sec(x) != content(FILLER, x).as_slice() {
                    errs.push(format!("sector {x} past S+L was changed: {}", describe(sec(x))));
                }
            }
            // The shadow and the header copy (keyslot material) must be wiped. The journal
            // slots must hold no journal (checked above); residue of a clear that failed
            // half-way is harmless.
            if !is_zero(&img[g.shadow as usize * SECTOR..g.journal as usize * SECTOR]) {
                errs.push("the shadow or the header copy (keyslot material) was not wiped".to_string());
            }
            "converted"
        } else {
            for x in 0..g.l {
                if let Err(e) = self.plain_ok(x, sec(x), exact) {
                    errs.push(e);
                }
            }
            for x in g.l..g.shadow {
                if sec(x) != content(FILLER, x).as_slice() {
                    errs.push(format!(
                        "sector {x} past L was changed although nothing was converted: {}",
                        describe(sec(x))
                    ));
                }
            }
            "untouched"
        };
        if errs.is_empty() {
            Ok(what)
        } else {
            let n = errs.len();
            errs.truncate(12);
            Err(format!("the {what} device is wrong in {n} places:\n  {}", errs.join("\n  ")))
        }
    }
}

fn striped_map(l: &SLine, o: u64) -> (DevRef, u64) {
    let STarget::Striped { chunk, stripes } = &l.target else { unreachable!() };
    let c = o / chunk;
    let n = stripes.len() as u64;
    let (d, off) = stripes[(c % n) as usize];
    (d, off + (c / n) * chunk + o % chunk)
}

// ---------------------------------------------------------------------------------------
// The engine's handles
// ---------------------------------------------------------------------------------------

/// The raw partition, as the engine sees it.
pub struct SimDisk(Shared);
/// The device-mapper, as the engine sees it.
pub struct SimKernel(Shared);

impl Disk for SimDisk {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("disk read {sector}+{}", buf.len() / SECTOR)).map_err(io_err)?;
        w.disk.read(sector, buf).map_err(io_err)
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> std::io::Result<()> {
        let mut w = self.0.borrow_mut();
        let g = w.g;
        let slot = (sector == g.journal_slot(0) || sector == g.journal_slot(1)) && buf.len() == SLOT_BYTES;
        w.op(|| {
            let mut s = format!("disk write {sector}+{}", buf.len() / SECTOR);
            if slot {
                match Record::decode(buf) {
                    Ok(r) => {
                        let _ = write!(s, " (journal seq {} {:?})", r.seq, r.state);
                    }
                    Err(_) => s.push_str(" (journal clear)"),
                }
            }
            s
        })
        .map_err(|e| {
            if !w.dead {
                // EIO on a write: some prefix of it (maybe none, maybe all) may have landed.
                let n = buf.len() / SECTOR;
                let p = w.rng.gen_range(0..=n);
                if p > 0 {
                    let _ = w.disk.write(sector, &buf[..p * SECTOR]);
                }
            }
            io_err(e)
        })?;
        if slot && w.defer_chunk_commits {
            if let Ok(Record { state: State::Migrating { cursor }, .. }) = Record::decode(buf) {
                if cursor < g.l {
                    w.deferred = Some((sector, buf.to_vec()));
                    w.swallow_flush = true;
                    return Ok(());
                }
            }
        }
        w.disk.write(sector, buf).map_err(io_err)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| "disk flush".into()).map_err(|e| {
            if !w.dead {
                // A failed flush may still have made the older part of the cache durable.
                let n = w.disk.cache.len();
                let p = w.rng.gen_range(0..=n);
                w.disk.flush_prefix(p);
            }
            io_err(e)
        })?;
        if w.swallow_flush {
            w.swallow_flush = false;
            return Ok(());
        }
        w.disk.flush();
        Ok(())
    }
}

fn kerr(e: String) -> KernelError {
    KernelError(e)
}

impl Kernel for SimKernel {
    /// The simulated kernel has no keyring: the final table carries the key in hex (the
    /// path cryptsetup takes on such kernels too).
    fn keyring_add(&mut self, _desc: &str, _key: &[u8]) -> KResult<Option<String>> {
        Ok(None)
    }

    fn keyring_drop(&mut self, _desc: &str) {}

    fn lookup(&mut self, name: &str) -> KResult<Option<DevRef>> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("lookup {name}")).map_err(kerr)?;
        Ok(w.dm.devs.get(name).map(|d| d.dev))
    }

    fn create(&mut self, name: &str, uuid: &str, private: bool) -> KResult<DevRef> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("create {name}")).map_err(kerr)?;
        if w.dm.devs.contains_key(name) {
            return Err(KernelError(format!("creating {name}: device exists (EBUSY)")));
        }
        if w.dm.devs.values().any(|d| d.uuid == uuid) {
            return Err(KernelError(format!("creating {name}: uuid {uuid} in use (EBUSY)")));
        }
        let dev = DevRef { major: DM_MAJOR, minor: w.dm.next_minor };
        w.dm.next_minor += 1;
        w.dm.devs.insert(
            name.into(),
            DmDev { dev, uuid: uuid.into(), private, live: None, inactive: None, suspended: false },
        );
        Ok(dev)
    }

    fn load(&mut self, name: &str, table: &[Line], key_hex: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("load {name}: {}", table.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(" | ")))
            .map_err(kerr)?;
        w.dev_mut(name)?;
        let t = w
            .parse_table(table.iter().map(|l| (l.start, l.length, l.target_type().to_string(), l.params(key_hex))))
            .map_err(|e| KernelError(format!("loading {name}: {e} (EINVAL)")))?;
        w.dev_mut(name)?.inactive = Some(t);
        Ok(())
    }

    fn load_lines(&mut self, name: &str, lines: &[TableLineFacts]) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| {
            format!(
                "load {name}: {}",
                lines
                    .iter()
                    .map(|l| format!("{} {} {} {}", l.start, l.length, l.target_type, l.params))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
        })
        .map_err(kerr)?;
        w.dev_mut(name)?;
        let t = w
            .parse_table(lines.iter().map(|l| (l.start, l.length, l.target_type.clone(), l.params.clone())))
            .map_err(|e| KernelError(format!("loading {name}: {e} (EINVAL)")))?;
        w.dev_mut(name)?.inactive = Some(t);
        Ok(())
    }

    fn clear_inactive(&mut self, name: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("clear inactive {name}")).map_err(kerr)?;
        w.dev_mut(name)?.inactive = None;
        Ok(())
    }

    fn suspend(&mut self, name: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("suspend {name}")).map_err(kerr)?;
        // Suspending waits for in-flight I/O (none: the simulator's I/O is synchronous) and
        // for a region being recovered (recovery steps are atomic here).
        w.dev_mut(name)?.suspended = true;
        Ok(())
    }

    fn resume(&mut self, name: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        if let Err(e) = w.op(|| format!("resume {name}")) {
            // A resume that fails may fail after the table swap: new table, still suspended.
            if !w.dead && w.rng.gen_bool(0.5) {
                if let Some(d) = w.dm.devs.get_mut(name) {
                    if let Some(t) = d.inactive.take() {
                        d.live = Some(t);
                    }
                }
            }
            return Err(KernelError(e));
        }
        let d = w.dev_mut(name)?;
        if let Some(t) = d.inactive.take() {
            d.live = Some(t);
        }
        d.suspended = false;
        if name == BRIDGE && w.deferred.is_some() {
            w.release_armed = true;
        }
        if name == BRIDGE {
            // The uevent of this resume: hidden from udev rules and pvscan, or not. Shown, the
            // bridge must be the finished LUKS mapping (pure crypt table, header on disk):
            // before, udev and LVM would scan a device that still shows the plaintext PV.
            if w.udev_hidden.contains(name) {
                w.bridge_shown_to_udev = false;
            } else {
                let d = &w.dm.devs[name];
                let pure = matches!(d.live.as_deref(), Some([l]) if matches!(l.target, STarget::Crypt { .. }) && (l.length == w.g.l || l.length == w.g.n - w.g.s));
                let header = w.disk.current().get(..w.header.len()) == Some(&w.header[..]);
                if pure && header {
                    w.bridge_shown_to_udev = true;
                } else {
                    let msg = format!("the bridge was resumed without the udev flags before it was the finished LUKS mapping (pure crypt table {pure}, header on disk {header})");
                    w.violations.push(msg);
                }
            }
        }
        Ok(())
    }

    fn set_udev_hidden(&mut self, name: &str, hidden: bool) {
        let mut w = self.0.borrow_mut();
        if hidden {
            w.udev_hidden.insert(name.to_string());
        } else {
            w.udev_hidden.remove(name);
        }
    }

    fn remove(&mut self, name: &str) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("remove {name}")).map_err(kerr)?;
        let dev = w.dev_mut(name)?.dev;
        if let Some(user) = w.in_use(name, dev) {
            return Err(KernelError(format!("removing {name}: in use by {user} (EBUSY)")));
        }
        w.dm.devs.remove(name);
        Ok(())
    }

    fn table(&mut self, name: &str) -> KResult<Vec<TableLineFacts>> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("table {name}")).map_err(kerr)?;
        let d = w.dev_mut(name)?;
        Ok(d.live.iter().flatten().map(|l| l.facts()).collect())
    }

    fn holders_of(&mut self, dev: DevRef, except: &[&str]) -> KResult<Vec<HolderTable>> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("holders of {dev}")).map_err(kerr)?;
        Ok(w.dm
            .devs
            .iter()
            .filter(|(n, d)| !except.contains(&n.as_str()) && d.live.iter().flatten().any(|l| l.devs().contains(&dev)))
            .map(|(n, d)| HolderTable { name: n.clone(), table: d.live.iter().flatten().map(|l| l.facts()).collect() })
            .collect())
    }

    fn mirror_health(&mut self, name: &str) -> KResult<Vec<Vec<char>>> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("status {name}")).map_err(kerr)?;
        let d = w.dev_mut(name)?;
        Ok(d.live
            .iter()
            .flatten()
            .filter_map(|l| match &l.target {
                STarget::Mirror { health, .. } => Some(health.iter().map(|&c| c as char).collect()),
                _ => None,
            })
            .collect())
    }

    fn read(&mut self, name: &str, sector: u64, buf: &mut [u8]) -> KResult<()> {
        let mut w = self.0.borrow_mut();
        w.op(|| format!("read {name} {sector}+{}", buf.len() / SECTOR)).map_err(kerr)?;
        let dev = w.dm.devs.get(name).map(|d| d.dev).ok_or_else(|| KernelError(format!("{name}: no such device")))?;
        for (i, b) in buf.chunks_mut(SECTOR).enumerate() {
            match w.dev_io(dev, sector + i as u64, b, false) {
                Ok(()) => {}
                Err(IoFail::Blocked) => {
                    return Err(KernelError(format!("reading suspended {name}: this would hang forever")))
                }
                Err(IoFail::Error(e)) => return Err(KernelError(e)),
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The simulation: set-up, faults, reboot, resume, checks
// ---------------------------------------------------------------------------------------

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
        let mut e = Engine::prepare(
            self.disk(),
            self.kernel(),
            RAW,
            g,
            BRIDGE,
            2,
            LUKS_UUID,
            CIPHER,
            false,
            PV_UUID,
            &key,
            header,
        )?;
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
        if self.w.borrow().sc.cut_every_window {
            e.max_stall = Some(std::time::Duration::ZERO);
            e.piece = 8;
        }
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
        let Some(rec) = Engine::<SimDisk, SimKernel>::read_journal(&mut disk, n)? else {
            return Ok(Resumed::NoJournal);
        };
        let header = Engine::<SimDisk, SimKernel>::read_header_copy(&mut disk, &rec)?;
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

// ---------------------------------------------------------------------------------------
// Tests: the simulator itself, then the engine under every fault
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tables::{CryptSpec, Target};
    use crate::engine::{ChunkStats, EngineError, Event, NoHooks, MAX_CUTS};

    // ----- the simulator's own semantics -----

    fn bare(sc: &Scenario) -> Sim {
        let mut sc = sc.clone();
        sc.writer = WriterConfig::off();
        Sim::new(&sc)
    }

    #[test]
    fn crypt_target_is_aes_xts_plain64_as_cryptsetup_reads_it() {
        let sim = bare(&Scenario::small(1));
        let mut k = sim.kernel();
        let key = sim.key();
        let key_hex = hex::encode(&key);
        let dev = k.create("c", "U-c", true).unwrap();
        let spec = CryptSpec { cipher: CIPHER.into(), allow_discards: false };
        let t = [Line { start: 0, length: 100, target: Target::Crypt { spec, iv_offset: 7, dev: RAW, offset: 40 } }];
        k.load("c", &t, &key_hex).unwrap();
        k.resume("c").unwrap();
        let mut w = sim.w.borrow_mut();
        let mut p = content(99, 3);
        w.dev_io(dev, 3, &mut p, true).unwrap();
        // Reference: the aes + xts-mode crates directly, IV = iv_offset + sector, 512-byte sectors.
        let mut c = w.disk.current()[43 * SECTOR..44 * SECTOR].to_vec();
        assert_ne!(c, content(99, 3));
        Xts128::new(Aes256::new_from_slice(&key[..32]).unwrap(), Aes256::new_from_slice(&key[32..]).unwrap())
            .decrypt_sector(&mut c, get_tweak_default(10));
        assert_eq!(c, content(99, 3));
        let mut r = vec![0u8; SECTOR];
        w.dev_io(dev, 3, &mut r, false).unwrap();
        assert_eq!(r, content(99, 3));
        // The table read back carries no key.
        drop(w);
        let tf = k.table("c").unwrap();
        assert_eq!(tf[0].params, format!("{CIPHER} - 7 98:5 40"));
        assert!(!tf[0].params.contains(&key_hex[..16]));
        // ...and cannot be loaded again as it is.
        assert!(k.load_lines("c", &tf).is_err());
    }

    #[test]
    fn mirror_writes_unsynced_regions_to_the_primary_only_and_recovers_one_region_at_a_time() {
        let sim = bare(&Scenario::small(2));
        let mut k = sim.kernel();
        k.create("m", "U-m", false).unwrap();
        let lines = [TableLineFacts {
            start: 0,
            length: 32,
            target_type: "mirror".into(),
            params: "core 1 8 2 98:5 100 98:5 200".into(),
        }];
        k.load_lines("m", &lines).unwrap();
        k.resume("m").unwrap();
        let dev = k.lookup("m").unwrap().unwrap();
        let raw = |w: &World, x: u64| w.disk.current()[x as usize * SECTOR..(x as usize + 1) * SECTOR].to_vec();
        {
            let mut w = sim.w.borrow_mut();
            let mut b = content(5, 1000);
            w.dev_io(dev, 3, &mut b, true).unwrap();
            assert_eq!(raw(&w, 103), content(5, 1000));
            assert_ne!(raw(&w, 203), content(5, 1000), "out-of-sync region: primary only");
            assert!(w.recover_step(Some("m")));
            assert_eq!(raw(&w, 203), content(5, 1000), "recovery copied region 0");
            assert_ne!(raw(&w, 208), raw(&w, 108), "region 1 not yet copied");
            let mut b = content(6, 1000);
            w.dev_io(dev, 4, &mut b, true).unwrap();
            assert_eq!(raw(&w, 204), content(6, 1000), "in-sync region: both legs");
        }
        assert_eq!(k.table("m").unwrap()[0].params, "core 1 8 2 98:5 100 98:5 200");
        // nosync: every region in sync from the start, writes reach both legs.
        k.create("n", "U-n", false).unwrap();
        let lines = [TableLineFacts {
            start: 0,
            length: 32,
            target_type: "mirror".into(),
            params: "core 2 8 nosync 2 98:5 300 98:5 400".into(),
        }];
        k.load_lines("n", &lines).unwrap();
        k.resume("n").unwrap();
        let dev = k.lookup("n").unwrap().unwrap();
        let mut w = sim.w.borrow_mut();
        let mut b = content(7, 1000);
        w.dev_io(dev, 3, &mut b, true).unwrap();
        assert_eq!((raw(&w, 303), raw(&w, 403)), (content(7, 1000), content(7, 1000)), "nosync: both legs");
        assert!(!w.recover_step(Some("n")), "nosync: nothing to recover");
        drop(w);
        assert_eq!(k.table("n").unwrap()[0].params, "core 2 8 nosync 2 98:5 300 98:5 400");
    }

    #[test]
    fn failed_loads_leave_tables_and_busy_devices_stay() {
        let sim = bare(&Scenario::small(3));
        let mut k = sim.kernel();
        let lv = "vg0-home";
        let before = k.table(lv).unwrap();
        let bad = [TableLineFacts { start: 0, length: 8, target_type: "linear".into(), params: "98:5 999999".into() }];
        assert!(k.load_lines(lv, &bad).is_err());
        k.suspend(lv).unwrap();
        k.resume(lv).unwrap();
        assert_eq!(k.table(lv).unwrap(), before);
        assert!(k.remove(lv).is_err(), "a mounted LV cannot be removed");
        let gap = [
            TableLineFacts { start: 0, length: 8, target_type: "linear".into(), params: "98:5 0".into() },
            TableLineFacts { start: 16, length: 8, target_type: "linear".into(), params: "98:5 0".into() },
        ];
        assert!(k.load_lines(lv, &gap).is_err());
        assert_eq!(k.holders_of(RAW, &[]).unwrap().len(), 3);
        assert_eq!(k.holders_of(RAW, &["vg0-root"]).unwrap().len(), 2);
    }

    #[test]
    fn power_cut_keeps_the_durable_image_and_some_of_the_cache() {
        let sim = bare(&Scenario::small(4));
        let mut d = sim.disk();
        d.write(600, &content(1, 600)).unwrap();
        d.flush().unwrap();
        d.write(600, &[content(2, 600), content(2, 601)].concat()).unwrap();
        let lose = sim.power_cut(1, CachePolicy::LoseAll);
        let keep = sim.power_cut(1, CachePolicy::KeepAll);
        let sec = |s: &Sim, x: usize| s.w.borrow().disk.durable()[x * SECTOR..(x + 1) * SECTOR].to_vec();
        assert_eq!(sec(&lose, 600), content(1, 600));
        assert_eq!(sec(&keep, 601), content(2, 601));
        let mut torn = 0;
        for seed in 0..64 {
            let s = sim.power_cut(seed, CachePolicy::Random);
            let (a, b) = (sec(&s, 600) == content(2, 600), sec(&s, 601) == content(2, 601));
            torn += (a != b) as u32;
        }
        assert!(torn > 0, "some power cuts tear the two-sector write");
        assert!(lose.w.borrow().dm.devs.is_empty(), "no dm device survives a reboot");
    }

    // ----- the engine, whole runs -----

    #[derive(Default)]
    struct Recorder {
        events: Vec<Event>,
        stop_after_chunks: Option<usize>,
        chunks: usize,
    }

    impl Hooks for Recorder {
        fn event(&mut self, e: &Event) {
            if matches!(e, Event::ChunkDone { .. }) {
                self.chunks += 1;
            }
            self.events.push(e.clone());
        }
        fn stop_requested(&self) -> bool {
            self.stop_after_chunks.is_some_and(|n| self.chunks >= n)
        }
    }

    #[test]
    fn a_full_run_produces_the_luks_layout() {
        for sc in [Scenario::small(10), Scenario::larger(11), {
            let mut s = Scenario::small(12);
            s.writer = WriterConfig::off();
            s
        }] {
            let sim = Sim::new(&sc);
            let mut rec = Recorder::default();
            sim.convert(&mut rec).unwrap_or_else(|e| panic!("{e}\n{}", sim.trace_tail(30)));
            assert_eq!(sim.check_final(true), Ok("converted"));
            let g = sc.geometry();
            let chunks: Vec<_> = rec
                .events
                .iter()
                .filter_map(|e| if let Event::ChunkDone { from, to, .. } = e { Some((*from, *to)) } else { None })
                .collect();
            assert_eq!(chunks, g.schedule());
            assert_eq!(rec.events.last(), Some(&Event::Done));
            // What `cryptsetup open` + LVM would read: every sector, exactly the latest write.
            let (writes, acks, reads) = sim.model_stats();
            if sc.writer.p_write > 0.0 {
                assert!(
                    writes > 20 && acks > 5 && reads > 20,
                    "writer too idle: {writes} writes, {acks} acks, {reads} reads"
                );
            }
            assert_eq!(Engine::<SimDisk, SimKernel>::read_journal(&mut sim.disk(), sc.n).unwrap(), None);
        }
    }

    /// udev and LVM's autoactivation stay off the bridge until it is the finished LUKS
    /// mapping, then see it once: every resume of the bridge before the header is on disk is
    /// hidden, the last is not. And the check bites: a bridge left visible to udev from the
    /// start, or never shown at the end, fails it.
    #[test]
    fn the_bridge_is_hidden_from_udev_until_the_finish_and_shown_after() {
        let sim = Sim::new(&Scenario::small(13));
        sim.convert(&mut NoHooks).unwrap_or_else(|e| panic!("{e}\n{}", sim.trace_tail(30)));
        assert_eq!(sim.check_final(true), Ok("converted"));
        assert!(sim.w.borrow().bridge_shown_to_udev);

        // Mutant: the bridge is never hidden (every resume raises a plain uevent).
        let sim = Sim::new(&Scenario::small(13));
        let _ = sim.convert_with(&mut NoHooks, &mut |e| e.kernel.set_udev_hidden(BRIDGE, false));
        let v = sim.w.borrow().violations.clone();
        assert!(
            v.iter().any(|m| m.contains("without the udev flags before it was the finished LUKS mapping")),
            "{v:?}"
        );
        assert!(sim.check_final(true).is_err());

        // Mutant: the final resume keeps the flags (udev never processes the LUKS device).
        let sim = Sim::new(&Scenario::small(13));
        let _ = sim.convert(&mut NoHooks).unwrap();
        sim.w.borrow_mut().bridge_shown_to_udev = false;
        let e = sim.check_final(true).unwrap_err();
        assert!(e.contains("udev-disable flags"), "{e}");
    }

    #[test]
    fn rate_caps_the_copy_and_a_stop_request_cuts_the_wait_short() {
        let sc = {
            let mut s = Scenario::small(13);
            s.writer = WriterConfig::off();
            s
        };
        let g = sc.geometry();
        let bytes = g.l * 512;
        // A cap at which the whole move takes at least 0.4 s: the engine must wait that long.
        let rate = bytes * 5 / 2;
        let sim = Sim::new(&sc);
        let t = std::time::Instant::now();
        sim.convert_with(&mut Recorder::default(), &mut |e| e.rate = Some(rate)).unwrap();
        let paced = t.elapsed();
        assert!(paced.as_secs_f64() >= 0.9 * bytes as f64 / rate as f64, "{paced:?} for {bytes} bytes at {rate} B/s");
        assert_eq!(sim.check_final(true), Ok("converted"));
        // A crawl (a full move would take an hour) stopped after the first chunk returns at
        // once, at a commit point.
        let sim = Sim::new(&sc);
        let mut rec = Recorder { stop_after_chunks: Some(1), ..Default::default() };
        let t = std::time::Instant::now();
        let r = sim.convert_with(&mut rec, &mut |e| e.rate = Some(bytes / 3600));
        assert!(t.elapsed().as_secs() < 60, "the pause ignored the stop request");
        assert!(matches!(r, Err(EngineError::Stopped(_))), "{:?}", r.err());
    }

    // ----- faults -----

    /// What to do after the fault fired.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum After {
        /// Reboot (rescue media), `luksify resume`, possibly crashing that too.
        Reboot { nested: bool },
        /// `luksify resume` on the live machine.
        LiveResume,
        /// LiveResume at even fault points, Reboot (not nested) at odd ones.
        Alternate,
    }

    struct Outcome {
        /// The run finished before reaching the fault.
        completed_before_fault: bool,
        state: &'static str,
    }

    /// Run the conversion with `f` at operation `i`, recover as `after` says, check.
    fn fault_case(sc: &Scenario, i: u64, f: Fault, after: After) -> Result<Outcome, String> {
        let after = match after {
            After::Alternate if i.is_multiple_of(2) => After::LiveResume,
            After::Alternate => After::Reboot { nested: false },
            other => other,
        };
        let sim = Sim::new(sc);
        sim.set_fault(i, f);
        let r = sim.convert(&mut NoHooks);
        let ctx = |sim: &Sim, msg: String| {
            format!(
                "fault {f:?} at op {i} (seed {}), then {after:?}: {msg}\n--- trace ---\n{}",
                sc.seed,
                sim.trace_tail(45)
            )
        };
        if sim.fired().is_none() {
            r.map_err(|e| ctx(&sim, format!("the run failed without a fault: {e}")))?;
            let state = sim.check_final(true).map_err(|e| ctx(&sim, e))?;
            return Ok(Outcome { completed_before_fault: true, state });
        }
        if f != Fault::Error && r.is_ok() {
            return Err(ctx(&sim, "the engine reported success although an operation failed".into()));
        }
        let seed = sc.seed.wrapping_mul(1_000_003) ^ i;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let state = match after {
            After::LiveResume => {
                sim.revive();
                sim.idle(6);
                // After a kill, kill the resume too, sometimes, and resume again.
                if f == Fault::Kill && rng.gen_bool(0.5) {
                    sim.set_fault(rng.gen_range(0..60), Fault::Kill);
                    let r = sim.resume(&mut NoHooks);
                    if sim.fired().is_none() {
                        r.map_err(|e| ctx(&sim, format!("live resume failed: {e}")))?;
                    }
                    sim.revive();
                    sim.idle(6);
                }
                let r = sim.resume(&mut NoHooks);
                r.map_err(|e| ctx(&sim, format!("live resume failed: {e}")))?;
                sim.idle(6);
                sim.check_final(true).map_err(|e| ctx(&sim, e))?
            }
            After::Alternate => unreachable!(),
            After::Reboot { nested } => {
                if f != Fault::PowerCut {
                    // The machine ran on after the error; now the power goes.
                    sim.revive();
                    sim.idle(6);
                }
                let mut cur = sim.power_cut(seed, CachePolicy::Random);
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    if attempt > 6 {
                        return Err(ctx(&cur, "no progress after 6 resumes".into()));
                    }
                    if nested && attempt <= 2 && rng.gen_bool(0.5) {
                        cur.set_fault(rng.gen_range(0..80), Fault::PowerCut);
                    }
                    // The rescue system's LVM activates the VG where it sees the PV.
                    let writer = rng.gen_bool(0.5);
                    if writer && cur.w.borrow().raw_shows_pv() {
                        cur.activate_lvs().map_err(|e| ctx(&cur, e))?;
                    }
                    let mut activate = |s: &Sim| {
                        if writer && !s.w.borrow().live.active {
                            let _ = s.activate_lvs();
                        }
                    };
                    let r = cur.resume_with(&mut NoHooks, &mut activate);
                    if matches!(cur.fired(), Some((_, Fault::PowerCut))) {
                        let s2 = cur.power_cut(seed + attempt, CachePolicy::Random);
                        cur = s2;
                        continue;
                    }
                    match r {
                        Ok(_) => break,
                        // LVs activated on the raw device over a fenced conversion: the engine
                        // refuses; the operator deactivates them and resumes again.
                        Err(EngineError::Refused(m)) if m.contains("deactivate them") => {
                            cur.w.borrow_mut().deactivate_lvs();
                            cur.revive();
                            continue;
                        }
                        Err(e) => return Err(ctx(&cur, format!("resume after the power cut failed: {e}"))),
                    }
                }
                cur.check_final(false).map_err(|e| ctx(&cur, e))?
            }
        };
        Ok(Outcome { completed_before_fault: false, state })
    }

    pub(super) fn debug_case(seed: u64, i: u64, f: Fault, reboot: bool) {
        let mut sc = Scenario::small(0);
        sc.seed = seed;
        let after = if reboot { After::Reboot { nested: f == Fault::PowerCut } } else { After::LiveResume };
        match fault_case(&sc, i, f, after) {
            Ok(_) => eprintln!("ok"),
            Err(e) => panic!("{e}"),
        }
    }

    // ----- the tests of the tests: a wrong commit order must be caught -----

    /// Every chunk commit held back until after the bridge has flipped to crypt: a crash in
    /// between finds the old cursor, maps the chunk to its source again, and loses what the
    /// live system wrote (and fsynced) through the crypt mapping meanwhile.
    #[test]
    fn a_late_commit_is_caught_by_the_sweeps() {
        let mut sc = Scenario::small(800);
        sc.late_commit_mutant = true;
        sc.writer = WriterConfig::relentless();
        let mut caught = 0;
        // (Other failures, of other causes, may come first: look for a loss.)
        let loss = |e: &str| e.contains("LOST") || e.contains("instead of write");
        let probe = Sim::new(&sc);
        let _ = probe.convert(&mut NoHooks);
        let first_chunk = probe.find_op(&format!("read {BRIDGE}-luksify"), 0).unwrap();
        for (f, after) in [(Fault::PowerCut, After::Reboot { nested: false }), (Fault::Kill, After::LiveResume)] {
            let s = sweep_from(&sc, first_chunk, f, after, 1000, &loss);
            eprintln!("mutant, {f:?}: caught after {} fault points", s.points);
            assert!(s.failures.last().is_some_and(|e| loss(e)), "the late commit went unnoticed");
            caught += 1;
        }
        assert_eq!(caught, 2);
    }

    /// The same, with the wrong order inside the engine itself (`wrong_order_for_tests`:
    /// `move_chunk` flips the bridge to crypt before the flush + journal commit).
    #[test]
    fn a_wrong_commit_order_in_the_engine_is_caught() {
        let mut sc = Scenario::small(810);
        sc.writer = WriterConfig::relentless();
        let mut lost = None;
        for i in 0.. {
            let mut sc = sc.clone();
            sc.seed += i;
            let sim = Sim::new(&sc);
            sim.set_fault(i, Fault::PowerCut);
            let _ = sim.convert_with(&mut NoHooks, &mut |e| e.wrong_order_for_tests = true);
            if sim.fired().is_none() {
                break;
            }
            let cur = sim.power_cut(i, CachePolicy::Random);
            let r = cur.resume(&mut NoHooks).map_err(|e| e.to_string()).and_then(|_| cur.check_final(false));
            if let Err(e) = r {
                lost = Some(e);
                break;
            }
        }
        let e = lost.expect("flipping the table before the journal commit must lose data at some crash point");
        assert!(e.contains("LOST"), "{e}");
    }

    // ----- copy failures -----

    /// A step whose copy fails (`area` on the raw disk, found by `expect` in the error) stops
    /// at a safe point: the journal keeps the step's cursor, the live system keeps reading
    /// the right data; once the disk is fixed a resume (live, or after a reboot) completes
    /// with nothing lost.
    fn copy_failure_case(seed: u64, chunk: usize, area: impl Fn(u64, u64, u64) -> BadArea, expect: &str, reboot: bool) {
        let mut sc = Scenario::small(seed);
        sc.writer = WriterConfig::relentless();
        let g = sc.geometry();
        let (m, c) = g.schedule()[chunk];
        let sim = Sim::new(&sc);
        // The area goes bad when the step starts: before, it held live plaintext of sectors
        // that have moved since, which the live system may have written.
        struct Arm(Shared, u64, BadArea);
        impl Hooks for Arm {
            fn event(&mut self, e: &Event) {
                if matches!(e, Event::ChunkStart { to, .. } if *to == self.1) {
                    self.0.borrow_mut().disk.bad.push(self.2);
                }
            }
        }
        match sim.convert(&mut Arm(sim.w.clone(), c, area(g.s, m, c))) {
            Err(EngineError::CopyFailed { from, to, why, .. }) => {
                assert_eq!((from, to), (m, c));
                assert!(why.contains(expect), "{why}");
            }
            Err(e) => panic!("expected CopyFailed, got {e}\n{}", sim.trace_tail(30)),
            Ok(_) => panic!("the run ignored the failing disk\n{}", sim.trace_tail(30)),
        }
        assert_eq!(sim.durable_journal().map(|r| r.state), Some(State::Migrating { cursor: c }));
        let r = sim.w.borrow_mut().check_all_reads();
        if let Err(e) = r {
            panic!("{e}\n{}", sim.trace_tail(200));
        }
        if !sim.w.borrow().violations.is_empty() {
            panic!("{}\n{}", sim.w.borrow().violations.join("\n"), sim.trace_tail(60));
        }
        sim.idle(10);
        sim.w.borrow_mut().disk.bad.clear();
        if reboot {
            let cur = sim.power_cut(seed, CachePolicy::Random);
            assert_eq!(cur.resume(&mut NoHooks).unwrap(), Resumed::Done);
            assert_eq!(cur.check_final(false), Ok("converted"));
        } else {
            assert_eq!(sim.resume(&mut NoHooks).unwrap(), Resumed::Done);
            assert_eq!(sim.check_final(true), Ok("converted"));
        }
    }

    #[test]
    fn a_failed_write_of_the_copy_stops_safely_and_resumes() {
        let area = |s: u64, m: u64, c: u64| BadArea {
            start: s + (m + c) / 2,
            end: s + (m + c) / 2 + 1,
            reads: false,
            writes: true,
            silent: false,
        };
        for (seed, chunk, reboot) in [(900, 3, false), (901, 10, true), (902, 0, false)] {
            copy_failure_case(seed, chunk, area, "writing the copy", reboot);
        }
    }

    /// A disk that acknowledges writes it does not store: the read-back of every step finds
    /// it before anything is committed.
    #[test]
    fn a_disk_that_drops_writes_of_the_copy_is_caught_by_the_read_back() {
        let area = |s: u64, _m: u64, c: u64| BadArea {
            start: s + c - 2,
            end: s + c,
            reads: false,
            writes: true,
            silent: true,
        };
        for (seed, chunk, reboot) in [(910, 2, false), (911, 7, true)] {
            copy_failure_case(seed, chunk, area, "other data than was written", reboot);
        }
    }

    /// A failed commit leaves the step's two copies under a nosync mirror (`keep_both`). If
    /// a write then fails on one copy (the disk is failing), that copy misses it: a live
    /// resume must never map it. For every operation whose error leaves such a mirror, and
    /// for each copy in turn: break that copy, let the system write, resume live. Either
    /// the journal maps the healthy copy and the resume completes with nothing lost, or it
    /// refuses and the system keeps reading the right data.
    #[test]
    fn a_copy_that_went_stale_after_a_failed_commit_is_never_mapped() {
        let (mut refused, mut completed) = (0, 0);
        for i in 0.. {
            for broken in [0usize, 1] {
                let mut sc = Scenario::small(940);
                sc.writer = WriterConfig::relentless();
                let g = sc.geometry();
                let sim = Sim::new(&sc);
                sim.set_fault(i, Fault::Error);
                let _ = sim.convert(&mut NoHooks);
                if sim.fired().is_none() {
                    eprintln!("stale copy after a failed commit: {refused} resumes refused, {completed} completed");
                    assert!(refused > 0 && completed > 0, "refused {refused}, completed {completed}");
                    return;
                }
                // The step the mirror holds, if the error left one: leg 1 is staging at a.
                let span = {
                    let w = sim.w.borrow();
                    w.dm.devs.values().flat_map(|d| d.live.iter().flatten()).find_map(|l| match &l.target {
                        STarget::Mirror { legs, .. } => Some((legs[1].1, legs[1].1 + l.length)),
                        _ => None,
                    })
                };
                let Some((a, b)) = span else { break };
                // Break copy `broken`: the source (raw, above the fence) or the destination.
                let (s0, s1) =
                    if broken == 0 { (g.source_of(a), g.source_of(a) + (b - a)) } else { (g.s + a, g.s + b) };
                sim.revive();
                sim.w.borrow_mut().disk.bad.push(BadArea {
                    start: s0,
                    end: s1,
                    reads: false,
                    writes: true,
                    silent: false,
                });
                sim.idle(30);
                sim.w.borrow_mut().disk.bad.clear();
                let stale = sim
                    .w
                    .borrow()
                    .dm
                    .devs
                    .values()
                    .flat_map(|d| d.live.iter().flatten())
                    .any(|l| matches!(&l.target, STarget::Mirror { health, .. } if health != b"AA"));
                if !stale {
                    continue; // no write reached the broken copy
                }
                match sim.resume(&mut NoHooks) {
                    Ok(_) => {
                        sim.idle(6);
                        if let Err(e) = sim.check_final(true) {
                            panic!(
                                "op {i}, copy {broken} broken: resumed onto the stale copy: {e}\n{}",
                                sim.trace_tail(40)
                            );
                        }
                        completed += 1;
                    }
                    Err(EngineError::Refused(m)) if m.contains("may have missed writes") => {
                        let r = sim.w.borrow_mut().check_all_reads();
                        if let Err(e) = r {
                            panic!(
                                "op {i}: after the refusal the system reads wrong data: {e}\n{}",
                                sim.trace_tail(40)
                            );
                        }
                        assert!(sim.w.borrow().violations.is_empty(), "{:?}", sim.w.borrow().violations);
                        refused += 1;
                    }
                    Err(e) => panic!("op {i}, copy {broken} broken: {e}\n{}", sim.trace_tail(40)),
                }
            }
        }
    }

    /// luksify encrypts the copy itself, and the kernel's dm-crypt decrypts it after the
    /// commit: if the two ciphers differed, every moved sector would read as garbage. The
    /// read through the staging device after each step's copy catches a difference before
    /// the first commit. Here luksify's cipher gets another key than the kernel's tables.
    #[test]
    fn a_cipher_other_than_the_kernels_is_caught_before_the_first_commit() {
        let sc = Scenario::small(920);
        let g = sc.geometry();
        let sim = Sim::new(&sc);
        let other = key_and_header(921).0;
        let r = sim.convert_with(&mut NoHooks, &mut |e| e.xts = crate::core::xts::Xts::new(&other));
        match r {
            Err(EngineError::CopyFailed { why, .. }) => assert!(why.contains("not the kernel's"), "{why}"),
            Err(e) => panic!("expected CopyFailed, got {e}"),
            Ok(_) => panic!("a wrong cipher went unnoticed"),
        }
        assert_eq!(sim.durable_journal().map(|r| r.state), Some(State::Migrating { cursor: g.l }));
        assert_eq!(sim.resume(&mut NoHooks).unwrap(), Resumed::Done);
        assert_eq!(sim.check_final(true), Ok("converted"));
    }

    // ----- pause, torn journal -----

    #[test]
    fn a_stop_request_pauses_at_a_commit_point_and_resume_finishes() {
        let sim = Sim::new(&Scenario::small(950));
        let mut rec = Recorder { stop_after_chunks: Some(5), ..Default::default() };
        let c = match sim.convert(&mut rec) {
            Err(EngineError::Stopped(c)) => c,
            other => panic!("expected Stopped, got {:?}", other.err()),
        };
        let g = Scenario::small(950).geometry();
        assert_eq!(c, g.schedule()[4].0);
        assert_eq!(sim.durable_journal().map(|r| r.state), Some(State::Migrating { cursor: c }));
        sim.idle(20);
        sim.w.borrow_mut().check_all_reads().unwrap();
        assert_eq!(sim.resume(&mut NoHooks).unwrap(), Resumed::Done);
        assert_eq!(sim.check_final(true), Ok("converted"));
    }

    #[test]
    fn a_torn_journal_write_falls_back_to_the_previous_record() {
        let mut sc = Scenario::small(960);
        sc.writer = WriterConfig::off(); // no fsync from the live system makes it durable
                                         // Where is the journal write of seq 9? (Same seed, same run.)
        let probe = Sim::new(&sc);
        probe.convert(&mut NoHooks).unwrap();
        let i = probe.find_op("journal seq 9 ", 0).unwrap();
        let sim = Sim::new(&sc);
        sim.set_fault(i + 1, Fault::PowerCut); // the flush after it
        assert!(sim.convert(&mut NoHooks).is_err());
        let cur = sim.power_cut(1, CachePolicy::TearAll);
        let rec = Engine::<SimDisk, SimKernel>::read_journal(&mut cur.disk(), sc.n).unwrap().unwrap();
        assert_eq!(rec.seq, 8, "the torn slot is ignored, the previous record wins");
        assert_eq!(cur.resume(&mut NoHooks).unwrap(), Resumed::Done);
        assert_eq!(cur.check_final(false), Ok("converted"));
    }

    // ----- engine bugs found by the sweeps, one deterministic case each (the first five
    // were fixed in b4a7dd6; the comments describe the bug as it was) -----

    /// Cleanup wipes the header copy, then clears the journal. A crash between the two leaves
    /// a HeaderWritten journal whose header copy is zeros: `resume` refuses ("the copy of the
    /// LUKS header in the tail is corrupt") for ever, although the conversion is complete.
    #[test]
    fn regression_crash_between_header_copy_wipe_and_journal_clear_blocks_resume() {
        let mut sc = Scenario::small(970);
        sc.writer = WriterConfig::off();
        let g = sc.geometry();
        let probe = Sim::new(&sc);
        probe.convert(&mut NoHooks).unwrap();
        let wipe = probe.find_op(&format!("disk write {}+", g.shadow), 1).unwrap(); // 0 = the fence's shadow write
        let sim = Sim::new(&sc);
        sim.set_fault(wipe + 2, Fault::PowerCut); // wipe written and flushed; journal not yet cleared
        assert!(sim.convert(&mut NoHooks).is_err());
        let cur = sim.power_cut(0, CachePolicy::LoseAll);
        assert_eq!(cur.durable_journal().map(|r| r.state), Some(State::HeaderWritten));
        let r = cur.resume(&mut NoHooks);
        assert!(r.is_ok(), "resume after a crash in cleanup failed: {}\n{}", r.unwrap_err(), cur.trace_tail(20));
        assert_eq!(cur.check_final(false), Ok("converted"));
    }

    /// `ensure_staging` (and `ensure_helpers` for the mirror device) trust an existing helper
    /// device. Killed between its `create` and its table's `resume`, luksify leaves a helper
    /// with no table (size 0); every later `luksify resume` on the live system fails to load
    /// the tables that reference it ("device too small"): stuck until someone runs
    /// `dmsetup remove` by hand.
    #[test]
    fn regression_helper_device_left_without_a_table_blocks_resume() {
        let sc = Scenario::small(980);
        let probe = Sim::new(&sc);
        probe.convert(&mut NoHooks).unwrap();
        for what in [format!("load {BRIDGE}-luksify:"), format!("resume {BRIDGE}-luksify-mirror")] {
            let at = probe.find_op(&what, 0).unwrap();
            let sim = Sim::new(&sc);
            sim.set_fault(at, Fault::Kill);
            assert!(sim.convert(&mut NoHooks).is_err());
            sim.revive();
            let r = sim.resume(&mut NoHooks);
            assert!(
                r.is_ok(),
                "killed at `{what}`, then live resume failed: {}\n{}",
                r.unwrap_err(),
                sim.trace_tail(12)
            );
            assert_eq!(sim.check_final(true), Ok("converted"));
        }
    }

    /// The fence commits Migrating{L} (the shadow is now the source of [0, F)) and only
    /// then writes the marker. If the journal flush *fails* (EIO, not a crash), the error
    /// path reverts the bridge to the linear table, so writes to [0, F) go to the raw device
    /// again; but the record is in the disk cache and becomes durable with the next flush.
    /// Resume then trusts Migrating{L}, maps [0, F) to the stale shadow and overwrites the
    /// raw [0, F) with the marker: every write to [0, F) since the failure is lost.
    #[test]
    fn regression_failed_fence_commit_loses_label_area_writes() {
        let mut sc = Scenario::small(990);
        sc.writer = WriterConfig::meta_heavy();
        let probe = Sim::new(&sc);
        probe.convert(&mut NoHooks).unwrap();
        let commit = probe.find_op("Migrating { cursor: 256 }", 0).unwrap();
        for after in [After::LiveResume, After::Reboot { nested: false }] {
            let r = fault_case(&sc, commit + 1, Fault::Error, after);
            assert!(r.is_ok(), "{}", r.err().unwrap());
        }
    }

    /// Between the fence's commit (Migrating{L} durable) and the marker being flushed, the
    /// raw device still carries the PV label: the journal says "fence in place" before the
    /// fence is on the disk. A machine rebooted in that window activates the VG on the raw
    /// device (initramfs, rescue media); the engine then refuses to resume until the LVs are
    /// removed (good), but whatever LVM wrote into [0, F) of the raw device meanwhile is
    /// silently replaced by the shadow and the marker.
    /// Invariant checked: at every crash point, if the durable journal says Migrating, the
    /// raw device does not look like a PV; and the rescue scenario loses nothing.
    #[test]
    fn regression_fenced_journal_never_leaves_a_plain_pv_on_disk() {
        let mut sc = Scenario::small(995);
        sc.writer = WriterConfig::meta_heavy();
        let probe = Sim::new(&sc);
        probe.convert(&mut NoHooks).unwrap();
        let from = probe.find_op("journal seq 2 Bridged", 0).unwrap();
        let to = probe.find_op("journal seq 4 ", 0).unwrap();
        let mut window = Vec::new();
        for i in from..=to {
            let sim = Sim::new(&sc);
            sim.set_fault(i, Fault::PowerCut);
            let _ = sim.convert(&mut NoHooks);
            let cur = sim.power_cut(0, CachePolicy::LoseAll);
            let fenced = matches!(cur.durable_journal().map(|r| r.state), Some(State::Migrating { .. }));
            if fenced && cur.w.borrow().raw_shows_pv() {
                window.push(i);
                // The rebooted system's LVM finds the PV on the raw device and writes.
                cur.activate_lvs().unwrap();
                cur.idle(30);
                match cur.resume(&mut NoHooks) {
                    Err(EngineError::Refused(m)) if m.contains("deactivate") => {}
                    other => panic!("expected a refusal, got {other:?}"),
                }
                cur.w.borrow_mut().deactivate_lvs();
                assert_eq!(cur.resume(&mut NoHooks).unwrap(), Resumed::Done);
                let r = cur.check_final(false);
                assert!(
                    window.is_empty(),
                    "crash at op {i}: the journal says the fence is in place but the raw device shows the PV; after the rescue system wrote to it: {r:?}\n{}",
                    cur.trace_tail(30)
                );
            }
        }
    }

    /// The fence marker is one 4 KiB write: on a disk with 512-byte sectors a power cut can
    /// tear it, e.g. sectors 2..8 (zeros in the marker) on the disk but not sector 0 (the
    /// magic). Journal `Bridged`, no recognisable marker: the resume maps [0, F) from the
    /// raw device again, where part of the label area is now zeros. (Found by the
    /// exploration sweep, seed 3003, on a larger device.)
    #[test]
    fn a_torn_fence_marker_is_survived() {
        let mut sc = Scenario::small(1200);
        sc.writer = WriterConfig::off();
        let probe = Sim::new(&sc);
        probe.convert(&mut NoHooks).unwrap();
        let marker_write = probe.find_op("disk write 0+8", 0).unwrap();
        let mut tears = 0;
        for seed in 0..48 {
            let sim = Sim::new(&sc);
            sim.set_fault(marker_write + 1, Fault::PowerCut); // the marker's flush
            assert!(sim.convert(&mut NoHooks).is_err());
            let cur = sim.power_cut(seed, CachePolicy::Random);
            let raw0 = cur.w.borrow().disk.durable()[..8 * SECTOR].to_vec();
            let orig: Vec<u8> = (0..8).flat_map(|x| content(0, x)).collect();
            let marker = crate::core::marker::encode(LUKS_UUID, cur.w.borrow().g.journal);
            if raw0 != orig && raw0 != marker[..8 * SECTOR] {
                tears += 1;
            }
            let r = cur.resume(&mut NoHooks).map_err(|e| e.to_string()).and_then(|_| cur.check_final(false));
            assert!(r.is_ok(), "seed {seed}: marker torn: {:?}\n{}", r.err().unwrap(), cur.trace_tail(8));
        }
        assert!(tears > 0);
    }

    /// Long exploration (ignored by default): SEEDS=n sweeps of every mode with other seeds.
    #[test]
    #[ignore]
    fn explore_many_seeds() {
        let seeds: u64 = std::env::var("SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
        let base: u64 = std::env::var("BASE").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
        let mut all = Vec::new();
        for k in 0..seeds {
            for (f, after) in [
                (Fault::PowerCut, After::Reboot { nested: true }),
                (Fault::Kill, After::LiveResume),
                (Fault::Error, After::Alternate),
                (Fault::Kill, After::Reboot { nested: true }),
            ] {
                let mut sc = if k % 2 == 0 { Scenario::small(base + k) } else { Scenario::larger(base + k) };
                if k % 3 == 1 {
                    sc.writer = WriterConfig::relentless();
                }
                let s = sweep(&sc, f, after, 5);
                eprintln!("seed {} {f:?} {after:?}: {} points, {} failures", base + k, s.points, s.failures.len());
                for e in &s.failures {
                    eprintln!("FAILURE {e}\n");
                }
                all.extend(s.failures);
            }
        }
        assert!(all.is_empty());
    }

    struct Sweep {
        points: u64,
        failures: Vec<String>,
        converted: u64,
        untouched: u64,
    }

    /// Fault at every operation in turn, until a run completes without reaching it.
    fn sweep(sc: &Scenario, f: Fault, after: After, max_failures: usize) -> Sweep {
        sweep_until(sc, f, after, max_failures, &|_| false)
    }

    /// [`sweep`], stopping at the first failure that `stop` likes.
    fn sweep_until(sc: &Scenario, f: Fault, after: After, max_failures: usize, stop: &dyn Fn(&str) -> bool) -> Sweep {
        sweep_from(sc, 0, f, after, max_failures, stop)
    }

    fn sweep_from(
        sc: &Scenario,
        start: u64,
        f: Fault,
        after: After,
        max_failures: usize,
        stop: &dyn Fn(&str) -> bool,
    ) -> Sweep {
        let mut s = Sweep { points: 0, failures: Vec::new(), converted: 0, untouched: 0 };
        for i in start.. {
            let mut sc = sc.clone();
            sc.seed = sc.seed.wrapping_add(i * 7919);
            match fault_case(&sc, i, f, after) {
                Ok(o) if o.completed_before_fault => break,
                Ok(o) => {
                    s.points += 1;
                    if o.state == "converted" {
                        s.converted += 1;
                    } else {
                        s.untouched += 1;
                    }
                }
                Err(e) => {
                    s.points += 1;
                    let done = stop(&e);
                    s.failures.push(e);
                    if done || s.failures.len() >= max_failures {
                        break;
                    }
                }
            }
        }
        s
    }

    fn assert_clean(name: &str, s: &Sweep) {
        for f in &s.failures {
            eprintln!("FAILURE {}", f.lines().next().unwrap_or(""));
        }
        eprintln!(
            "{name}: {} fault points, {} converted, {} left untouched, {} failures",
            s.points,
            s.converted,
            s.untouched,
            s.failures.len()
        );
        assert!(s.failures.is_empty(), "{name}: {} failing fault points; first:\n{}", s.failures.len(), s.failures[0]);
        assert!(s.points > 100, "{name}: only {} fault points", s.points);
    }

    /// `--max-stall`: windows cut after their first piece, each step tried again with the
    /// relentless writer running in between, lose nothing; the cuts are reported.
    #[test]
    fn cut_windows_lose_nothing_and_are_reported() {
        let mut rechecked = 0;
        for seed in [950, 951, 952] {
            let mut sc = Scenario::small(seed);
            sc.writer = WriterConfig::relentless();
            sc.cut_every_window = true;
            let sim = Sim::new(&sc);
            let mut rec = Recorder::default();
            sim.convert(&mut rec).unwrap_or_else(|e| panic!("{e}\n{}", sim.trace_tail(30)));
            assert_eq!(sim.check_final(true), Ok("converted"));
            let stats: Vec<ChunkStats> = rec
                .events
                .iter()
                .filter_map(|e| if let Event::ChunkDone { stats, .. } = e { Some(*stats) } else { None })
                .collect();
            assert_eq!(stats.len(), sc.geometry().schedule().len());
            // Every chunk is one step of at least two pieces: cut MAX_CUTS times, then done.
            assert!(stats.iter().all(|s| s.cut_windows == MAX_CUTS), "{stats:?}");
            rechecked += stats.iter().map(|s| s.rechecked).sum::<u64>();
        }
        assert!(rechecked > 0, "the writer never changed a step between its copy and its last window");
    }

    /// Faults anywhere while windows are being cut: the cut path (clear the flipped table,
    /// resume, pause, try again) is a safe point like any other.
    #[test]
    fn faults_while_windows_are_cut_lose_nothing() {
        let mut sc = Scenario::small(960);
        sc.cut_every_window = true;
        assert_clean("power cut, windows cut", &sweep(&sc, Fault::PowerCut, After::Reboot { nested: true }, 20));
        // The writer changing the step in every gap, so that cut windows copy sectors again
        // (this sweep did not catch an engine that skipped their flush and read-back when
        // the last window found nothing new: that needs the power cut to keep the journal
        // write and drop the data write; the engine now counts every window's copies).
        let mut busy = Scenario::small(963);
        busy.cut_every_window = true;
        busy.writer = WriterConfig::relentless();
        assert_clean(
            "power cut, windows cut, relentless writer",
            &sweep(&busy, Fault::PowerCut, After::Reboot { nested: true }, 20),
        );
        sc.seed = 961;
        assert_clean("kill + live resume, windows cut", &sweep(&sc, Fault::Kill, After::LiveResume, 20));
        sc.seed = 962;
        assert_clean("error + resume, windows cut", &sweep(&sc, Fault::Error, After::Alternate, 20));
    }

    #[test]
    fn power_cut_at_every_operation_loses_nothing() {
        let s = sweep(&Scenario::small(100), Fault::PowerCut, After::Reboot { nested: true }, 40);
        assert_clean("power cut", &s);
    }

    #[test]
    fn killing_luksify_at_every_operation_then_resuming_live_loses_nothing() {
        let s = sweep(&Scenario::small(200), Fault::Kill, After::LiveResume, 40);
        assert_clean("kill + live resume", &s);
    }

    /// An error at every operation; then, alternately, `luksify resume` on the live machine,
    /// or a power cut (the error left the journal write in the cache, maybe) and a resume
    /// from rescue media.
    #[test]
    fn an_error_at_every_operation_then_resume_loses_nothing() {
        let s = sweep(&Scenario::small(300), Fault::Error, After::Alternate, 40);
        assert_clean("error + live resume / power cut", &s);
    }

    #[test]
    fn random_faults_on_a_larger_device() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let total = {
            let sim = Sim::new(&Scenario::larger(500));
            sim.convert(&mut NoHooks).unwrap();
            sim.ops()
        };
        let mut failures = Vec::new();
        for j in 0..24u64 {
            let sc = Scenario::larger(600 + j);
            let i = rng.gen_range(0..total);
            let (f, after) = match j % 3 {
                0 | 1 => (Fault::PowerCut, After::Reboot { nested: true }),
                _ => (Fault::Kill, After::LiveResume),
            };
            if let Err(e) = fault_case(&sc, i, f, after) {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "{} failures; first:\n{}", failures.len(), failures[0]);
    }
}
/// Replay one fault case of a sweep: `F=p|k|e I=<op> SEED=<seed> [R=1] cargo test --lib
/// sim::replay -- --ignored` (the sweep failures print op and seed; R=1: reboot after).
#[cfg(test)]
mod replay {
    #[test]
    #[ignore]
    fn replay() {
        let f: super::Fault = match std::env::var("F").unwrap().as_str() {
            "p" => super::Fault::PowerCut,
            "k" => super::Fault::Kill,
            _ => super::Fault::Error,
        };
        let i: u64 = std::env::var("I").unwrap().parse().unwrap();
        let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
        let reboot = std::env::var("R").is_ok();
        super::tests::debug_case(seed, i, f, reboot);
    }
}
