//! The LUKS2 cut-over under every fault: a crash at every operation of `prepare_standard` +
//! `bridge_and_cut_over` (bridge insertion, then the header's writes), the crash image
//! built under each cache policy (unflushed writes lost, kept, torn, or a random subset in
//! a random order), then the recovery decision ([`crate::engine::recover_cut_over`]; itself
//! crashed half-way, sometimes). Afterwards the device must be the plain PV (every sector of
//! [0, L) one the live system may find there) or a LUKS2 reencryption in progress whose
//! primary header verifies, is exactly the header written (keyslots included), whose moved
//! segment holds [0, S) and whose [S, L) is in place. Before the recovery, a device that
//! shows the LVM label must be the intact PV (the fence). A wrong order of the writes must
//! make the sweep fail.

use super::content::is_zero;
use super::sweep::{sweep, Sweep};
use super::*;
use crate::adapters::luks::reencrypt::{format_reencrypt_header, LuksifyToken};
use crate::adapters::luks::{HeaderParams, LuksType, VolumeKey};
use crate::core::cutover::{self, Decision};
use crate::core::geometry::{standard_tail_needed, Geometry};
use crate::core::luks2meta;
use crate::engine::standard_steps::Mutant;
use crate::engine::{recover_cut_over, CutStep, NoHooks, CUT_OVER_ORDER};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

/// L = 2048, S = 1024 (the smallest power of two that holds cryptsetup's header with one
/// 512-bit keyslot, ~292 KiB), the device a few odd sectors larger than the minimum both
/// formats need (so the record's 4 KiB alignment matters), LVM metadata [0, 64) written by
/// the live system, which runs busy.
pub(super) fn standard(seed: u64) -> Scenario {
    standard_l(2048, seed)
}

/// [`standard`] with another L (a multiple of the 32-sector extent past 64).
pub(super) fn standard_l(l: u64, seed: u64) -> Scenario {
    let s = 1024u64;
    let n = (l..).find(|&n| n - l >= Geometry::tail_needed(n, s).max(standard_tail_needed(n, s))).unwrap() + 3;
    let sc = Scenario { n, l, s, k: 1024, pe_start: 64, extent: 32, ..Scenario::small(seed) };
    assert!(cutover::record_sector(n).unwrap() >= l + 2 * s);
    sc
}

/// The header luksify writes for that scenario: libcryptsetup's own (cheap PBKDF2), made
/// once per test process.
pub(super) fn header() -> &'static [u8] {
    static H: OnceLock<Vec<u8>> = OnceLock::new();
    H.get_or_init(|| header_for(&standard(0)))
}

/// libcryptsetup's reencryption header for the scenario `sc` (its L and S).
pub(super) fn header_for(sc: &Scenario) -> Vec<u8> {
    let mut p = HeaderParams::defaults(LuksType::Luks2);
    p.pbkdf = Some("pbkdf2".into());
    p.pbkdf_force_iterations = Some(1000);
    p.uuid = Some(LUKS_UUID.into());
    p.data_offset_sectors = sc.s;
    let (key, _) = key_and_header(KEY_SEED);
    let token = LuksifyToken { name: BRIDGE.into(), allow_discards: false, pv_uuid: PV_UUID.into() };
    let h = format_reencrypt_header(&p, &VolumeKey::from_slice(&key), b"sim passphrase", sc.l, &token, None)
        .expect("libcryptsetup makes the reencryption header")
        .bytes;
    assert!(h.len() > luks2meta::HEAD_BYTES && h.len() <= sc.s as usize * SECTOR, "header of {} bytes", h.len());
    h
}

/// The fence: a device that shows the LVM label is the intact PV.
fn check_fence(sim: &Sim) -> Result<(), String> {
    let w = sim.w.borrow();
    if !w.raw_shows_pv() {
        return Ok(());
    }
    let img = w.disk.durable();
    let errs: Vec<String> =
        (0..w.g.l).filter_map(|x| w.plain_ok(x, &img[x as usize * SECTOR..][..SECTOR], false).err()).collect();
    match errs.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "the raw device shows the LVM label over a changed PV ({} sectors wrong; first: {})",
            errs.len(),
            errs[0]
        )),
    }
}

/// The device `img` (`exact`: every write issued, else every acknowledged one) is the plain
/// PV ("intact") or the LUKS2 reencryption the cut-over makes ("converted"); the record is
/// gone either way.
fn check_image(sim: &Sim, img: &[u8], exact: bool) -> Result<&'static str, String> {
    let w = sim.w.borrow();
    let (g, header) = (w.g, header());
    let (l, s) = (g.l, g.s);
    let sec = |x: u64| &img[x as usize * SECTOR..][..SECTOR];
    let rec_at = cutover::record_sector(g.n).unwrap() as usize * SECTOR;
    if img[rec_at..rec_at + 8] == cutover::MAGIC[..] {
        return Err("luksify's cut-over record is still on the device".into());
    }
    let mut errs = Vec::new();
    let meta = luks2meta::parse(&img[..luks2meta::HEAD_BYTES]);
    let what = match meta {
        Ok(Some(m)) if m.copies_valid.0 => {
            let r = m.reencrypt.clone().ok_or("a LUKS2 header without a reencryption")?;
            let want = (Some((l + s) * 512), s * 512, l * 512, 0, false);
            let got = (r.moved_offset, r.data_offset, r.total_bytes, r.encrypted_bytes, r.crashed);
            if got != want {
                errs.push(format!("reencryption (moved, offset, total, done, crashed) {got:?}, expected {want:?}"));
            }
            if img[..header.len()] != header[..] {
                let at = (0..header.len()).find(|&i| img[i] != header[i]).unwrap();
                errs.push(format!(
                    "the primary header verifies but the header area differs from the one written at byte {at} (keyslots lost)"
                ));
            }
            if !is_zero(&img[header.len()..s as usize * SECTOR]) {
                errs.push("[H, S) is not zeroed (plaintext behind the header)".into());
            }
            for x in 0..s {
                if let Err(e) = w.plain_ok(x, sec(l + s + x), exact) {
                    errs.push(format!("moved segment: {e}"));
                }
            }
            for x in s..l {
                if let Err(e) = w.plain_ok(x, sec(x), exact) {
                    errs.push(e);
                }
            }
            "converted"
        }
        _ => {
            for x in 0..l {
                if let Err(e) = w.plain_ok(x, sec(x), exact) {
                    errs.push(e);
                }
            }
            "intact"
        }
    };
    if errs.is_empty() {
        return Ok(what);
    }
    let n = errs.len();
    errs.truncate(8);
    Err(format!("the {what} device is wrong in {n} places:\n  {}", errs.join("\n  ")))
}

/// `luksify resume` on rescue media: the recovery decision, crashed at a random operation
/// of its own (then the power cut, another crash image, and the recovery again) if `nested`.
fn recover(sim: Sim, rng: &mut ChaCha8Rng, nested: bool) -> Result<(Sim, Decision), String> {
    let n = sim.n();
    if nested {
        sim.set_fault(rng.gen_range(0..14), Fault::PowerCut);
    }
    let r = recover_cut_over(&mut sim.disk(), n);
    if sim.fired().is_some() {
        let again = sim.power_cut(rng.gen(), CachePolicy::Random);
        check_fence(&again).map_err(|e| format!("after a crash of the recovery: {e}"))?;
        let d = recover_cut_over(&mut again.disk(), n).map_err(|e| format!("the second recovery failed: {e}"))?;
        return Ok((again, d));
    }
    let d = r.map_err(|e| format!("the recovery failed: {e}"))?;
    Ok((sim, d))
}

/// The outcomes of a cut-over crash image.
const CONVERTED: &str = "converted";
const INTACT: &str = "intact";
const ROLLED_BACK: &str = "rolled back to the PV";

/// `fault` at every operation of the LUKS2 conversion up to the end of the cut-over (in the
/// order `order`), each followed by a power cut (an error: the machine runs on a little
/// first) under every cache policy and the recovery ([`sweep`]). Stops after `max_failures`.
fn cut_over_sweep(sc: &Scenario, order: &'static [CutStep], fault: Fault, max_failures: usize) -> Sweep {
    cut_over_sweep_as(sc, order, fault, max_failures, false, None)
}

/// [`cut_over_sweep`], the first S copied only under the suspend (`no_precopy`), or with a
/// mutant.
fn cut_over_sweep_as(
    sc: &Scenario,
    order: &'static [CutStep],
    fault: Fault,
    max_failures: usize,
    no_precopy: bool,
    mutant: Option<Mutant>,
) -> Sweep {
    let header = header();
    let run = |sim: &Sim| {
        let r = sim.cut_over_standard_as(&mut NoHooks, header, order, no_precopy, mutant);
        if sim.fired().is_some() {
            return Ok(());
        }
        // The run got past its last operation: the live machine is a LUKS2 reencryption.
        r.map_err(|(e, _)| format!("the cut-over failed without a fault: {e}")).and_then(|_| {
            sim.w.borrow_mut().check_all_reads()?;
            let cur = sim.w.borrow().disk.current().to_vec();
            let dur = sim.w.borrow().disk.durable().to_vec();
            match (check_image(sim, &cur, true)?, check_image(sim, &dur, false)?) {
                ("converted", "converted") => Ok(()),
                other => Err(format!("a completed cut-over left {other:?}")),
            }
        })
    };
    let mut image = |cur: Sim, policy: CachePolicy, rng: &mut ChaCha8Rng| {
        let nested = policy == CachePolicy::Random && rng.gen_bool(0.5);
        check_fence(&cur).and_then(|()| recover(cur, rng, nested)).and_then(|(cur, d)| {
            let img = cur.w.borrow().disk.durable().to_vec();
            match check_image(&cur, &img, false) {
                Ok("converted") => Ok(CONVERTED),
                Ok(_) if d == Decision::RolledBack => Ok(ROLLED_BACK),
                Ok(_) => Ok(INTACT),
                Err(e) => Err(format!("after recovery ({d:?}): {e}\n--- trace ---\n{}", cur.trace_tail(16))),
            }
        })
    };
    sweep(sc, fault, 0, 1, max_failures, &run, &mut image)
}

/// Intact: left the PV, by the recovery's rollback or untouched.
fn intact(s: &Sweep) -> u64 {
    s.count(INTACT) + s.count(ROLLED_BACK)
}

fn assert_clean(name: &str, s: &Sweep) {
    s.assert_no_failures(name);
    assert!(s.points > 30, "{name}: only {} fault points", s.points);
    assert!(s.count(CONVERTED) > 0 && s.count(ROLLED_BACK) > 0, "{name}: the sweep never reached both outcomes");
}

#[test]
fn a_power_cut_at_every_cut_over_operation_converts_or_leaves_the_pv() {
    let s = cut_over_sweep(&standard(1900), CUT_OVER_ORDER, Fault::PowerCut, 20);
    assert_clean("LUKS2 cut-over, power cut", &s);
}

/// An error at every operation: the engine's own error paths (the plaintext put back from
/// memory, the old table resumed), the machine running on, then the power goes.
#[test]
fn an_error_at_every_cut_over_operation_converts_or_leaves_the_pv() {
    let s = cut_over_sweep(&standard(1950), CUT_OVER_ORDER, Fault::Error, 20);
    s.assert_no_failures("LUKS2 cut-over, error then power cut");
    assert!(s.points > 30 && s.count(CONVERTED) > 0 && intact(&s) > 0);
}

/// Writes to the first 4 KiB fail (the fence, then the rollback's own first write): the
/// old table goes back (nothing landed), the LVs return to the raw device, the live system
/// reads what it wrote, and after a power cut the device is the intact PV.
#[test]
fn a_cut_over_that_cannot_write_the_first_sectors_leaves_the_pv_running() {
    let mut sc = standard(2100);
    sc.writer.p_meta = 0.0; // (LVM's own metadata writes would hit the failing sectors)
    let sim = Sim::new(&sc);
    sim.w.borrow_mut().disk.bad.push(BadArea { start: 0, end: 8, reads: false, writes: true, silent: false });
    let r = sim.cut_over_standard(&mut NoHooks, header(), CUT_OVER_ORDER);
    let Err((e, may)) = r else { panic!("the cut-over succeeded over failing sectors") };
    assert!(!may, "the engine says the header may be on the device: {e}");
    sim.w.borrow_mut().disk.bad.clear();
    sim.idle(30);
    assert!(!sim.w.borrow().dm.devs.contains_key(BRIDGE), "the bridge is still there after {e}");
    sim.w.borrow_mut().check_all_reads().unwrap();
    assert!(sim.w.borrow().violations.is_empty(), "{:?}", sim.w.borrow().violations);
    let cur = sim.power_cut(1, CachePolicy::Random);
    let (cur, d) = recover(cur, &mut ChaCha8Rng::seed_from_u64(1), false).unwrap();
    let img = cur.w.borrow().disk.durable().to_vec();
    assert_eq!(check_image(&cur, &img, false), Ok("intact"), "after {d:?}");
}

/// The header's bulk cannot be written and neither can the plaintext be put back (the
/// fence landed): the bridge maps the moved copy (the new table) and says the header may be
/// there. With nothing written since, a resume after the disk is fixed rolls back; after the
/// live system wrote to those sectors, the copy no longer matches the record and the
/// recovery refuses (saying how to restore by hand), never leaving a PV that lost writes.
#[test]
fn a_rollback_that_fails_too_runs_on_the_moved_copy_and_is_never_silently_lost() {
    for (busy, no_precopy) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut sc = standard(2200 + busy as u64);
        sc.writer = if busy { WriterConfig::busy() } else { WriterConfig::off() };
        let s = sc.s;
        // The sectors start failing at the cut-over window's first write (the record's).
        let probe = Sim::new(&sc);
        let cut = |sim: &Sim| sim.cut_over_standard_as(&mut NoHooks, header(), CUT_OVER_ORDER, no_precopy, None);
        cut(&probe).map_err(|(e, _)| e).unwrap();
        let rec_at = cutover::record_sector(probe.n()).unwrap();
        let at = probe.find_op(&format!("disk write {rec_at}+"), 0).unwrap();
        let sim = Sim::new(&sc);
        let bad = BadArea { start: 8, end: s, reads: false, writes: true, silent: false };
        sim.w.borrow_mut().bad_from = Some((at, bad));
        let r = cut(&sim);
        let Err((e, may)) = r else { panic!("the cut-over succeeded over failing sectors") };
        assert!(may, "{e}");
        assert!(e.to_string().contains("by hand"), "{e}");
        sim.idle(30);
        sim.w.borrow_mut().check_all_reads().unwrap();
        assert!(sim.w.borrow().violations.is_empty(), "{:?}", sim.w.borrow().violations);
        sim.w.borrow_mut().disk.bad.clear();
        let cur = sim.power_cut(2, CachePolicy::LoseAll);
        check_fence(&cur).unwrap();
        let wrote = sim.w.borrow().model.writes > 0;
        match recover_cut_over(&mut cur.disk(), cur.n()) {
            Ok(d) => {
                assert!(!wrote, "rolled back ({d:?}) although the live system wrote to the copy");
                let img = cur.w.borrow().disk.durable().to_vec();
                assert_eq!(check_image(&cur, &img, false), Ok("intact"));
            }
            Err(e) => {
                assert!(wrote, "refused with nothing written: {e}");
                assert!(e.to_string().contains("no longer matches") && e.to_string().contains("by hand"), "{e}");
            }
        }
    }
}

// ----- the tests of the tests: a wrong order must be caught -----

use CutStep::*;

/// The primary binary header before the rest of the header: a primary that verifies while
/// the keyslot areas are not all on disk.
const PRIMARY_FIRST: &[CutStep] = &[
    Moved,
    Record,
    Flush,
    ReadBack,
    Fence,
    Flush,
    HeaderFirst,
    Flush,
    HeaderRest,
    Flush,
    Resume,
    WipeRest,
    Flush,
    EraseRecord,
    Flush,
];
/// No fence: the header's bulk lands while the LVM label is still there.
const NO_FENCE: &[CutStep] = &[
    Moved,
    Record,
    Flush,
    ReadBack,
    HeaderRest,
    Flush,
    HeaderFirst,
    Flush,
    Resume,
    WipeRest,
    Flush,
    EraseRecord,
    Flush,
];
/// No record: nothing finds the moved copy after a crash in the window.
const NO_RECORD: &[CutStep] =
    &[Moved, Flush, ReadBack, Fence, Flush, HeaderRest, Flush, HeaderFirst, Flush, Resume, WipeRest, Flush];
/// The moved copy not flushed before the fence: the fence may land without it.
const UNFLUSHED_COPY: &[CutStep] = &[
    Record,
    Flush,
    Moved,
    Fence,
    Flush,
    HeaderRest,
    Flush,
    HeaderFirst,
    Flush,
    Resume,
    WipeRest,
    Flush,
    EraseRecord,
    Flush,
];
/// The record erased in the same flush as the zeroing of [H, S).
const ERASE_WITH_WIPE: &[CutStep] = &[
    Moved,
    Record,
    Flush,
    ReadBack,
    Fence,
    Flush,
    HeaderRest,
    Flush,
    HeaderFirst,
    Flush,
    Resume,
    WipeRest,
    EraseRecord,
    Flush,
];

/// Each wrong order, swept with the live system quiet (its fsyncs would make some of the
/// engine's unflushed writes durable early, by chance), then, if that did not catch it, with
/// the busy live system under a few seeds.
#[test]
fn a_wrong_order_of_the_cut_over_writes_is_caught_by_the_sweep() {
    for (name, order) in [
        ("the primary header first", PRIMARY_FIRST),
        ("no fence", NO_FENCE),
        ("no record", NO_RECORD),
        ("the moved copy unflushed", UNFLUSHED_COPY),
        ("the record erased with the wipe", ERASE_WITH_WIPE),
    ] {
        let mut quiet = standard(2000);
        quiet.writer = WriterConfig::off();
        let tries = std::iter::once(quiet).chain((0..4).map(|k| standard(2001 + k)));
        // (the order of the copy under the suspend: with the copy made before it, as when
        // no write reaches the first S, the copy's own writes are not in the order)
        let caught = tries.map(|sc| cut_over_sweep_as(&sc, order, Fault::PowerCut, 1, true, None)).find(|s| {
            s.report(&format!("wrong order ({name})"));
            !s.failures.is_empty()
        });
        let s = caught.unwrap_or_else(|| panic!("the sweep did not catch a wrong cut-over order: {name}"));
        eprintln!("  caught: {}", s.failures[0].lines().next().unwrap_or(""));
    }
    // And the right order passes the same quiet sweep.
    let mut quiet = standard(2000);
    quiet.writer = WriterConfig::off();
    assert_clean("the right order, quiet", &cut_over_sweep_as(&quiet, CUT_OVER_ORDER, Fault::PowerCut, 5, true, None));
}

/// The copy of the first S made before the suspend is used only if the dm-stats region
/// counted no write: the busy system writes into the first S (its PV metadata, its LVs)
/// between that copy and the suspend, and a cut-over that trusts the copy anyway loses it.
/// So is one that brings up to date all but one of the areas the region counted writes in
/// (only those areas are read again under the suspend: the others hold what was copied).
#[test]
fn a_cut_over_that_trusts_its_early_copy_whatever_was_counted_is_caught() {
    for m in [Mutant::TrustPrecopy, Mutant::OneAreaLess, Mutant::EarlyChecksum] {
        let caught = (0..12).map(|k| standard(2100 + k)).find_map(|sc| {
            let s = cut_over_sweep_as(&sc, CUT_OVER_ORDER, Fault::PowerCut, 1, false, Some(m));
            s.failures.first().cloned()
        });
        let f = caught.unwrap_or_else(|| panic!("the sweep did not catch a cut-over with {m:?}"));
        eprintln!("  {m:?} caught: {}", f.lines().next().unwrap_or(""));
    }
}

/// Without the early copy (no region, or a write counted), the copy under the suspend: the
/// sweeps of the right order pass on that path too.
#[test]
fn a_power_cut_at_every_cut_over_operation_without_the_early_copy_converts_or_leaves_the_pv() {
    let s = cut_over_sweep_as(&standard(2200), CUT_OVER_ORDER, Fault::PowerCut, 20, true, None);
    assert_clean("LUKS2 cut-over without the early copy, power cut", &s);
}

/// The early copy is used as it is when the region is quiet (the live system idle), and
/// brought up to date under the suspend when the busy system wrote to the first S (only the
/// changed sectors copied again); every cut-over leaves the stack reading the latest writes.
#[test]
fn the_early_copy_is_used_when_quiet_and_brought_up_to_date_when_written() {
    let (mut quiet, mut refreshed) = (0, 0);
    for k in 0..6 {
        let mut sc = standard(2300 + k);
        if k == 0 {
            sc.writer = WriterConfig::off();
        }
        let (l, s) = (sc.l, sc.s);
        let sim = Sim::new(&sc);
        sim.cut_over_standard(&mut NoHooks, header(), CUT_OVER_ORDER).map_err(|(e, _)| e).unwrap();
        sim.w.borrow_mut().check_all_reads().unwrap();
        let trace = sim.w.borrow().trace.clone();
        let after = trace.iter().skip_while(|t| !t.contains("suspend sda5_crypt")).cloned().collect::<Vec<_>>();
        let rewrote_all = after.iter().any(|t| t.contains(&format!("disk write {}+{s}", l + s)));
        let rewrote_runs = after.iter().any(|t| {
            t.contains(&format!("disk write {}", l + s)) || {
                t.split_whitespace()
                    .nth(3)
                    .and_then(|w| w.split_once('+'))
                    .and_then(|(a, _)| a.parse::<u64>().ok())
                    .is_some_and(|a| a > l + s && a < l + 2 * s)
            }
        });
        assert!(!rewrote_all, "seed {k}: the window copied all of the first S again");

        if rewrote_runs {
            refreshed += 1;
        } else {
            quiet += 1;
        }
    }
    eprintln!("early copy: {quiet} used as it was, {refreshed} brought up to date");
    assert!(quiet > 0 && refreshed > 0, "{quiet} quiet, {refreshed} refreshed: a path never ran");
}
