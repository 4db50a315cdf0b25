//! luksify's own LUKS2 steps ([`Engine::standard_steps`]) under every fault: after the
//! cut-over, a crash at every operation of the steps (the copy, the read-back, the table
//! load, the suspend, the comparison, the two metadata copies, the resume, the last step's
//! wipes and final metadata), the crash image built under each cache policy. Then the device
//! is read as stock cryptsetup maps it: the metadata copy that verifies with the higher seqid
//! ([`luks2meta::parse`]), its regular segments in order (linear in place or at the moved
//! segment, crypt decrypted with the volume key, IV its `iv_tweak`); every logical sector
//! must be one the live system may find there. An error at every operation instead: the
//! engine's error paths keep the live system's reads right, then the power goes.

use super::content::xts_from_key;
use super::cutover_tests::{header_for, standard_l};
use super::sweep::{sweep, Sweep};
use super::*;
use crate::core::luks2meta::{self, SegmentKind, Size};
use crate::engine::standard_steps::Mutant;
use crate::engine::{NoHooks, StepsEnd, CUT_OVER_ORDER};
use std::sync::OnceLock;

/// L = 3392, S = 1024: the plaintext segment [S, L) takes two full hotzones and one of 320
/// sectors, then the moved first S: four steps. The switch device's regions start at
/// z = 1344: the first step sets it up (the bridge's table through it), the second flips its
/// region by a message, the third (the remainder) swaps in the standard table again.
const L: u64 = 3392;

/// L = 5440: four full hotzones, so three steps by message between the set-up and the
/// remainder.
const L_LONG: u64 = 5440;

fn scenario(seed: u64) -> Scenario {
    standard_l(L, seed)
}

fn header_of(l: u64) -> &'static [u8] {
    static H: OnceLock<Vec<u8>> = OnceLock::new();
    static H_LONG: OnceLock<Vec<u8>> = OnceLock::new();
    match l {
        L => H.get_or_init(|| header_for(&scenario(0))),
        L_LONG => H_LONG.get_or_init(|| header_for(&standard_l(L_LONG, 0))),
        _ => panic!("no header made for L = {l}"),
    }
}

/// The device `img` as cryptsetup maps it: which state ("midway", "committed", "finished"),
/// or what is wrong.
fn check_mapped(sim: &Sim, img: &[u8], exact: bool) -> Result<&'static str, String> {
    let w = sim.w.borrow();
    let (l, s) = (w.g.l, w.g.s);
    let m = match luks2meta::parse(&img[..luks2meta::HEAD_BYTES]) {
        Ok(Some(m)) => m,
        other => return Err(format!("no LUKS2 metadata cryptsetup would take: {other:?}")),
    };
    let xts = xts_from_key(&w.key);
    let regular: Vec<_> = m.segments.iter().filter(|x| !x.is_backup()).collect();
    let what = match &m.reencrypt {
        Some(r) if r.crashed => return Err("a segment flagged in-reencryption (luksify never writes one)".into()),
        Some(_) if regular.len() == 1 => "committed",
        Some(_) => "midway",
        None => "finished",
    };
    let mut errs = Vec::new();
    let mut start = 0u64;
    for seg in &regular {
        let len = match seg.size {
            Size::Bytes(b) => b / 512,
            Size::Dynamic => l - start,
        };
        for x in start..(start + len).min(l) {
            let raw = seg.offset / 512 + (x - start);
            let mut b = img[raw as usize * SECTOR..][..SECTOR].to_vec();
            if let SegmentKind::Crypt { iv_tweak, .. } = seg.kind {
                xts.decrypt(iv_tweak + (x - start), &mut b);
            }
            if let Err(e) = w.plain_ok(x, &b, exact) {
                errs.push(format!("{e} (segment {}, raw sector {raw})", seg.index));
            }
        }
        start += len;
    }
    if start < l {
        errs.push(format!("the segments map {start} sectors of {l}"));
    }
    if what == "finished" && (regular.len() != 1 || !regular[0].is_crypt() || regular[0].offset != s * 512) {
        errs.push(format!("the final metadata is not one crypt segment at S: {:?}", m.segments));
    }
    if errs.is_empty() {
        return Ok(what);
    }
    let n = errs.len();
    errs.truncate(8);
    Err(format!("the {what} device is wrong in {n} places:\n  {}", errs.join("\n  ")))
}

/// A run that ended without a fault: finished, the live system saw every write it made,
/// the device (as written, and as durable) maps every sector, the bridge is what `cryptsetup
/// open` maps (N − S sectors of crypt).
fn finished_ok(sim: &Sim, end: StepsEnd) -> Result<(), String> {
    if end != StepsEnd::Finished {
        return Err(format!("the steps ended {end:?} without a fault"));
    }
    let cur = sim.w.borrow().disk.current().to_vec();
    let dur = sim.w.borrow().disk.durable().to_vec();
    let mut w = sim.w.borrow_mut();
    if !w.violations.is_empty() {
        return Err(format!("the live system saw:\n  {}", w.violations.join("\n  ")));
    }
    w.check_all_reads()?;
    let (n, s) = (w.g.n, w.g.s);
    let d = w.dm.devs.get(BRIDGE).ok_or("the bridge is gone")?;
    let t: Vec<String> = d
        .live
        .iter()
        .flatten()
        .map(|l| l.facts())
        .map(|l| format!("{} {} {} {}", l.start, l.length, l.target_type, l.params))
        .collect();
    let want = format!("0 {} crypt {CIPHER} - 0 {RAW} {s}", n - s);
    if t != [want.clone()] {
        return Err(format!("the final bridge table is {t:?}, expected [{want:?}]"));
    }
    drop(w);
    match (check_mapped(sim, &cur, true)?, check_mapped(sim, &dur, false)?) {
        ("finished", "finished") => Ok(()),
        other => Err(format!("a finished run left {other:?}")),
    }
}

/// The cut-over, then luksify's own steps to the end, then the finish.
fn convert(sim: &Sim) -> Result<StepsEnd, String> {
    convert_as(sim, None)
}

fn convert_as(sim: &Sim, mutant: Option<Mutant>) -> Result<StepsEnd, String> {
    let l = sim.w.borrow().g.l;
    let mut e =
        sim.cut_over_standard(&mut NoHooks, header_of(l), CUT_OVER_ORDER).map_err(|(e, _)| format!("cut-over: {e}"))?;
    e.standard_mutant = mutant;
    let end = e.standard_steps(&mut NoHooks).map_err(|e| format!("steps: {e}"))?;
    if end == StepsEnd::Finished {
        e.finish_standard(&mut NoHooks).map_err(|e| format!("finish: {e}"))?;
    }
    Ok(end)
}

/// `fault` at every operation after the cut-over, each followed by a power cut under every
/// cache policy ([`sweep`]); the image read as cryptsetup maps it.
fn steps_sweep(sc: &Scenario, fault: Fault, max_failures: usize) -> Sweep {
    steps_sweep_as(sc, fault, max_failures, None)
}

fn steps_sweep_as(sc: &Scenario, fault: Fault, max_failures: usize, mutant: Option<Mutant>) -> Sweep {
    // where the steps begin: a run without a fault, counted
    let probe = Sim::new(sc);
    probe.cut_over_standard(&mut NoHooks, header_of(sc.l), CUT_OVER_ORDER).map_err(|(e, _)| e).unwrap();
    let run = |sim: &Sim| {
        let r = convert_as(sim, mutant);
        match sim.fired() {
            Some(_) => Ok(()),
            None => r.and_then(|end| finished_ok(sim, end)),
        }
    };
    let mut image = |cur: Sim, _: CachePolicy, _: &mut _| {
        let img = cur.w.borrow().disk.durable().to_vec();
        check_mapped(&cur, &img, false)
    };
    // (runs differ in length: the live system's writes make some steps copy again; a few
    // seeds past the first run the fault does not reach)
    sweep(sc, fault, probe.ops(), 3, max_failures, &run, &mut image)
}

fn assert_clean(name: &str, s: &Sweep) {
    s.assert_no_failures(name);
    assert!(s.points > 30, "{name}: only {} fault points", s.points);
    assert!(s.count("midway") > 0 && s.count("finished") > 0, "{name}: {:?}", s.outcomes);
}

#[test]
fn a_power_cut_at_every_operation_of_luksifys_own_luks2_steps_loses_nothing() {
    let s = steps_sweep(&scenario(3100), Fault::PowerCut, 20);
    assert_clean("LUKS2 own steps, power cut", &s);
}

#[test]
fn an_error_at_every_operation_of_luksifys_own_luks2_steps_then_a_power_cut_loses_nothing() {
    let s = steps_sweep(&scenario(3200), Fault::Error, 20);
    assert_clean("LUKS2 own steps, error then power cut", &s);
}

/// The uninterrupted run with the live system busy: finished, every sector mapped as written.
#[test]
fn luksifys_own_luks2_steps_finish_with_the_live_system_running() {
    let sim = Sim::new(&scenario(3300));
    let end = convert(&sim).unwrap();
    finished_ok(&sim, end).unwrap();
    let (writes, acks, reads) = sim.model_stats();
    assert!(writes > 0 && acks > 0 && reads > 0, "the live system did nothing: {writes} {acks} {reads}");
}

/// The tests of the test: each wrong order is caught by the power-cut sweep (with the live
/// system quiet, then busy under a few seeds).
#[test]
fn a_wrong_order_in_luksifys_own_luks2_steps_is_caught_by_the_sweep() {
    for m in [
        Mutant::FlipBeforeCommit,
        Mutant::UnflushedCopy,
        Mutant::OneFlushForBothCopies,
        Mutant::TrustReadAhead,
        Mutant::IgnoreWatchCount,
        Mutant::LateWatch,
        Mutant::OneAreaLess,
        Mutant::WrongLines,
    ] {
        let mut quiet = scenario(3400);
        quiet.writer = WriterConfig::off();
        let tries = std::iter::once(quiet).chain((0..12).map(|k| scenario(3401 + k)));
        let caught = tries.map(|sc| steps_sweep_as(&sc, Fault::PowerCut, 1, Some(m))).find(|s| !s.failures.is_empty());
        let s = caught.unwrap_or_else(|| panic!("the sweep did not catch the wrong order {m:?}"));
        eprintln!("{m:?} caught: {}", s.failures[0].lines().next().unwrap_or(""));
    }
}

/// The run's operations whose trace line contains `what`.
fn ops_named(sim: &Sim, what: &str) -> usize {
    sim.w.borrow().trace.iter().filter(|t| t.contains(what)).count()
}

/// The private devices of the switch, if any are left.
fn switch_devices_left(sim: &Sim) -> Vec<String> {
    let names = crate::engine::Names::new(BRIDGE, 2, super::LUKS_UUID);
    let w = sim.w.borrow();
    [names.switch, names.staging].into_iter().filter(|n| w.dm.devs.contains_key(n)).collect()
}

/// With four full hotzones: the first sets up the switch device, the next three flip their
/// regions by a message each (no bridge table loaded for them), the remainder's table ends
/// the switch's part and its devices go.
#[test]
fn luksifys_own_luks2_steps_flip_the_switch_regions_by_messages() {
    let sim = Sim::new(&standard_l(L_LONG, 3500));
    let end = convert(&sim).unwrap();
    finished_ok(&sim, end).unwrap();
    let names = crate::engine::Names::new(BRIDGE, 2, super::LUKS_UUID);
    let messages = ops_named(&sim, &format!("message {}: set_region_mappings", names.switch));
    assert_eq!(messages, 4, "one to set the regions up, one flip per step after it");
    assert!(switch_devices_left(&sim).is_empty(), "{:?}", switch_devices_left(&sim));
}

#[test]
fn a_power_cut_at_every_operation_of_the_steps_through_the_switch_loses_nothing() {
    let s = steps_sweep(&standard_l(L_LONG, 3600), Fault::PowerCut, 20);
    assert_clean("LUKS2 own steps through the switch, power cut", &s);
}

#[test]
fn an_error_at_every_operation_of_the_steps_through_the_switch_then_a_power_cut_loses_nothing() {
    let s = steps_sweep(&standard_l(L_LONG, 3700), Fault::Error, 20);
    assert_clean("LUKS2 own steps through the switch, error then power cut", &s);
}

/// A stop asked for after `after` steps.
struct StopAfter {
    after: usize,
    done: usize,
}

impl crate::engine::Hooks for StopAfter {
    fn event(&mut self, e: &crate::engine::Event) {
        if matches!(e, crate::engine::Event::ChunkDone { .. }) {
            self.done += 1;
        }
    }
    fn stop_requested(&self) -> bool {
        self.done >= self.after
    }
}

/// A stop between two steps through the switch: the bridge gets the table `cryptsetup open`
/// builds for that state (stock cryptsetup's resume compares the live table with it), the
/// switch and staging devices go; the steps then continue from the metadata to the end.
#[test]
fn a_stop_between_steps_through_the_switch_leaves_the_standard_table() {
    let sim = Sim::new(&standard_l(L_LONG, 3800));
    let mut e = sim.cut_over_standard(&mut NoHooks, header_of(L_LONG), CUT_OVER_ORDER).map_err(|(e, _)| e).unwrap();
    let end = e.standard_steps(&mut StopAfter { after: 2, done: 0 }).unwrap();
    let x = {
        let w = sim.w.borrow();
        let m = luks2meta::parse(&w.disk.current()[..luks2meta::HEAD_BYTES]).unwrap().unwrap();
        L_LONG - m.reencrypt.as_ref().unwrap().encrypted_bytes / 512
    };
    assert_eq!(end, StepsEnd::Stopped(L_LONG - x));
    assert_eq!(x, L_LONG - 2 * 1024, "two steps done");
    {
        let w = sim.w.borrow();
        let live: Vec<String> = w.dm.devs[BRIDGE]
            .live
            .iter()
            .flatten()
            .map(|l| l.facts())
            .map(|l| format!("{} {} {} {}", l.start, l.length, l.target_type, l.params))
            .collect();
        let (s, n) = (w.g.s, w.g.n);
        let _ = n;
        let want = vec![
            format!("0 {s} linear {RAW} {}", L_LONG + s),
            format!("{s} {} linear {RAW} {s}", x - s),
            format!("{x} {} crypt {CIPHER} - {x} {RAW} {}", L_LONG - x, x + s),
        ];
        assert_eq!(live, want, "the standard table of the state the metadata says");
    }
    assert!(switch_devices_left(&sim).is_empty(), "{:?}", switch_devices_left(&sim));
    sim.w.borrow_mut().check_all_reads().unwrap();
    let end = e.standard_steps(&mut NoHooks).unwrap();
    e.finish_standard(&mut NoHooks).unwrap();
    finished_ok(&sim, end).unwrap();
}

/// The test of the test: a step that flips the wrong region is caught.
#[test]
fn a_wrong_switch_region_is_caught() {
    let s = steps_sweep_as(&standard_l(L_LONG, 3900), Fault::PowerCut, 1, Some(Mutant::WrongRegion));
    assert!(!s.failures.is_empty(), "the sweep did not catch a wrong region");
}

/// luksify's dm-stats regions on the bridge (program id luksify).
fn watches_left(sim: &Sim) -> usize {
    sim.w.borrow().dm.devs.get(BRIDGE).map_or(0, |d| d.stats.iter().filter(|r| r.program == "luksify").count())
}

/// With the live system quiet, every step's region counts no write and every last
/// comparison is skipped; with it busy, the steps whose hotzone was written compare (and a
/// run without the regions would have compared every step). No region is left on the bridge.
#[test]
fn the_last_comparison_is_skipped_only_where_no_write_was_counted() {
    struct Count {
        skipped: usize,
        steps: usize,
    }
    impl crate::engine::Hooks for Count {
        fn event(&mut self, e: &crate::engine::Event) {
            if let crate::engine::Event::ChunkDone { stats, .. } = e {
                self.steps += 1;
                self.skipped += usize::from(stats.compare_skipped);
            }
        }
    }
    let run = |sc: &Scenario| {
        let sim = Sim::new(sc);
        let mut e = sim.cut_over_standard(&mut NoHooks, header_of(sc.l), CUT_OVER_ORDER).map_err(|(e, _)| e).unwrap();
        let mut c = Count { skipped: 0, steps: 0 };
        let end = e.standard_steps(&mut c).unwrap();
        e.finish_standard(&mut NoHooks).unwrap();
        finished_ok(&sim, end).unwrap();
        assert_eq!(watches_left(&sim), 0, "dm-stats regions left on the bridge");
        (c.skipped, c.steps, ops_named(&sim, "@stats_print"), ops_named(&sim, "@stats_create"))
    };
    let mut quiet = standard_l(L_LONG, 4000);
    quiet.writer = WriterConfig::off();
    let (skipped, steps, prints, creates) = run(&quiet);
    assert!(steps >= 5, "{steps} steps");
    // (two prints a step: before its source is read and under its suspend; one print more:
    // the cut-over's, over the first S it copied before its suspend)
    assert_eq!((skipped, prints), (steps, 2 * steps + 1), "a quiet system: every comparison skipped");
    // (one region serves several steps: two in the tests, so the cut-over's and three over
    // the six steps here, each created before the first read of its first step's source)
    assert_eq!((steps, creates), (6, 4));
    let (mut busy_skipped, mut busy_compared) = (0, 0);
    for k in 0..4 {
        let (skipped, steps, _, _) = run(&standard_l(L_LONG, 4001 + k));
        busy_skipped += skipped;
        busy_compared += steps - skipped;
    }
    assert!(busy_compared > 0, "a busy system wrote no hotzone in flight: the test shows nothing");
    eprintln!("busy: {busy_skipped} comparisons skipped, {busy_compared} run");
}

/// Regions a killed luksify left on the bridge are deleted by the next run.
#[test]
fn regions_left_by_a_killed_luksify_are_deleted() {
    let sim = Sim::new(&standard_l(L, 4100));
    let mut e = sim.cut_over_standard(&mut NoHooks, header_of(L), CUT_OVER_ORDER).map_err(|(e, _)| e).unwrap();
    {
        use crate::engine::Kernel;
        e.kernel.message(BRIDGE, &crate::core::dmstats::create_msg(0, 8)).unwrap();
        e.kernel.message(BRIDGE, "@stats_create 0+8 /1 dmstats").unwrap();
    }
    assert_eq!(watches_left(&sim), 1);
    let end = e.standard_steps(&mut NoHooks).unwrap();
    e.finish_standard(&mut NoHooks).unwrap();
    finished_ok(&sim, end).unwrap();
    assert_eq!(watches_left(&sim), 0);
    let other = sim.w.borrow().dm.devs[BRIDGE].stats.len();
    assert_eq!(other, 1, "another program's region stays");
}
