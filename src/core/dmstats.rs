//! device-mapper statistics (the kernel's `@stats_*` messages, Documentation/admin-guide/
//! device-mapper/statistics.rst) as luksify uses them: a region on the bridge over the
//! hotzones of several steps ([`batch_region`]), created before the first read of the first
//! of their sources; before each step's first read the counters of the areas over its
//! hotzone are printed (the step's snapshot), and under the step's suspend printed again. An
//! area whose write counters are what the snapshot said counted no write since, so no write
//! to it completed since before the copy read its source, and the last comparison under the
//! suspend would find nothing there; where no area counted one it is skipped.
//!
//! Why the count is enough, from the kernel's dm.c and dm-stats.c: a bio is accounted to
//! the regions it overlaps when it *completes* (`dm_stat_for_entry` with `end`: `ios` and
//! `sectors` incremented whether or not its start was accounted), and that happens before
//! the mapped device's in-flight count drops, which a (flushing) suspend waits for. So once
//! the bridge is suspended, every write that reached the hotzone after the snapshot has
//! been counted; a write whose completion the snapshot had counted was on the disk before
//! the copy's first read was issued (the read is issued after the print returned). The
//! counters only grow (nothing of luksify's clears them): a write completed since makes
//! them differ. They are per-CPU and not atomic: a lost update can make a count too small,
//! never leave it unchanged when a write completed.
//!
//! Why one region for many steps: creating a region suspends the device internally for an
//! RCU grace period (`dm_stats_create`, `dm_internal_suspend_fast`), holding the running
//! system's I/O meanwhile; where grace periods end on the timer tick (the test bed) that
//! cost every step a tick. A print holds nothing.

/// The program id luksify's regions carry (`@stats_list luksify` finds leftovers).
pub const PROGRAM_ID: &str = "luksify";

/// Create one region over sectors [from, to) of the device, in areas of
/// [`area_sectors`]; the reply is its id.
pub fn create_msg(from: u64, to: u64) -> String {
    create_region_msg(from, to, area_sectors(to - from))
}

/// Create one region over sectors [from, to) in areas of `area` sectors; the reply is its id.
pub fn create_region_msg(from: u64, to: u64, area: u64) -> String {
    format!("@stats_create {from}+{} {area} {PROGRAM_ID}", to - from)
}

/// The most areas a region of several steps ([`batch_region`]) has: the kernel keeps
/// counters per area and per CPU, so a region over a whole disk is out of the question.
/// (The simulator's tests take two steps a region, so that its crash sweeps cross from one
/// region to the next many times.)
pub const MAX_REGION_AREAS: u64 = if cfg!(test) { 32 } else { 256 };

/// The region a step's hotzone [a, b) is watched in when none covers it, with steps of `s`
/// sectors going down from b: [b − k·s, b) for as many steps k as [`MAX_REGION_AREAS`] areas
/// of [`area_sectors`]`(s)` hold (at least one), from 0 at the lowest; its area length. The
/// steps below b are then watched in it without creating another.
pub fn batch_region(a: u64, b: u64, s: u64) -> (u64, u64, u64) {
    let area = area_sectors(s);
    let steps = (MAX_REGION_AREAS / s.div_ceil(area)).max(1);
    (b.saturating_sub(steps * s).min(a), b, area)
}

/// The lines of a region starting at `start` in areas of `area` that sectors [a, b) (within
/// it) fall in: (first line, number of lines).
pub fn lines_of(start: u64, area: u64, a: u64, b: u64) -> (u64, u64) {
    let first = (a - start) / area;
    (first, (b - start).div_ceil(area) - first)
}

/// The counters of `n` areas of region `id` from line `first` (reply: one line per area).
pub fn print_lines_msg(id: u64, first: u64, n: u64) -> String {
    format!("@stats_print {id} {first} {n}")
}

/// The areas a region of `len` sectors is counted in: a sixteenth of it, rounded up to 4
/// KiB, at least 4 KiB and at most 1 MiB. Each area's counters prove what the region's prove,
/// for the area alone (a bio is accounted to every area it overlaps: dm-stats.c
/// `__dm_stat_bio` walks them), so under the suspend only the areas that counted a write are
/// read again.
pub fn area_sectors(len: u64) -> u64 {
    len.div_ceil(16).next_multiple_of(8).clamp(8, 2048)
}

/// Room for this many written areas ([`written_areas`]): every area of a region up to 64
/// MiB (luksify's largest step is 32 MiB; more written areas than this count as unknown).
pub const MAX_AREAS: usize = 64;

/// The region's counters (reply: one line per area).
pub fn print_msg(id: u64) -> String {
    format!("@stats_print {id}")
}

pub fn delete_msg(id: u64) -> String {
    format!("@stats_delete {id}")
}

/// luksify's regions on the device (reply: one line each).
pub fn list_msg() -> String {
    format!("@stats_list {PROGRAM_ID}")
}

/// The id in the reply to [`create_msg`].
pub fn parse_created(reply: &str) -> Option<u64> {
    reply.trim().parse().ok()
}

/// Whether the reply to [`print_msg`] says no write was counted and none is in flight, in
/// any area ([`written_areas`]). Anything that does not parse says "not quiet" (the
/// comparison runs).
pub fn quiet(reply: &str) -> bool {
    let mut written = Vec::with_capacity(MAX_AREAS);
    written_areas(reply, &mut written) && written.is_empty()
}

/// An area's write counters as [`print_msg`] prints them: its range and (writes, writes
/// merged, sectors written, in progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AreaWrites {
    pub start: u64,
    pub len: u64,
    pub counts: [u64; 4],
}

/// The areas of the reply to a print: `<start>+<length> <reads> <reads merged> <sectors
/// read> <ms reading> <writes> <writes merged> <sectors written> <ms writing> <in progress>
/// ...`, one line per area, in order. Calls `each` with every area; false when a line does not
/// parse as that (or `each` says stop), or there is no area.
fn for_each_area(reply: &str, mut each: impl FnMut(AreaWrites) -> bool) -> bool {
    let mut areas = 0;
    for line in reply.lines().filter(|l| !l.trim().is_empty()) {
        let mut f = line.split_whitespace();
        let Some((start, len)) = f.next().and_then(|r| r.split_once('+')) else { return false };
        let (Ok(start), Ok(len)) = (start.parse::<u64>(), len.parse::<u64>()) else { return false };
        let mut c = [0u64; 9];
        for v in c.iter_mut() {
            match f.next().map(str::parse::<u64>) {
                Some(Ok(x)) => *v = x,
                _ => return false,
            }
        }
        areas += 1;
        if !each(AreaWrites { start, len, counts: [c[4], c[5], c[6], c[8]] }) {
            return false;
        }
    }
    areas > 0
}

/// The reply to a print as areas, into `out` (cleared; false, and nothing known, when it
/// does not parse or has more areas than `out` holds: its capacity is kept).
pub fn area_writes(reply: &str, out: &mut Vec<AreaWrites>) -> bool {
    out.clear();
    for_each_area(reply, |a| {
        let room = out.len() < out.capacity();
        if room {
            out.push(a);
        }
        room
    })
}

/// The areas of the reply to [`print_msg`] that counted a write or have one in flight, as
/// sector ranges `[start, start + length)`, into `out` (cleared; never grown past its
/// capacity, so nothing is allocated under a suspend): [`written_since`] the region was
/// created, every counter zero then.
pub fn written_areas(reply: &str, out: &mut Vec<(u64, u64)>) -> bool {
    written_since(&[], reply, out)
}

/// The areas of a print's reply whose write counters are not what they were in `before`
/// (the same print's areas, [`area_writes`], taken earlier; empty: all zero, as a region is
/// created), into `out` as sector ranges `[start, start + length)` (cleared; never grown past
/// its capacity, so nothing is allocated under a suspend). Any counter differing counts, in
/// flight too (a bio begun before the region was created wraps it, and keeps it wrapped: the
/// same in both prints then). The kernel prints an area's whole step even where the region
/// ends sooner: the caller clips to the region. False when the reply does not parse, has no
/// area, other areas than `before`, or more written areas than `out` holds: then nothing is
/// known, and all of it counts as written.
pub fn written_since(before: &[AreaWrites], reply: &str, out: &mut Vec<(u64, u64)>) -> bool {
    out.clear();
    let mut i = 0;
    let all = for_each_area(reply, |a| {
        let was = match before.is_empty() {
            true => AreaWrites { counts: [0; 4], ..a },
            false => match before.get(i) {
                Some(b) if (b.start, b.len) == (a.start, a.len) => *b,
                _ => return false,
            },
        };
        i += 1;
        if a.counts != was.counts {
            if out.len() == out.capacity() {
                return false;
            }
            out.push((a.start, a.start + a.len));
        }
        true
    });
    all && (before.is_empty() || i == before.len())
}

/// The region ids in the reply to [`list_msg`] (`<id>: <start>+<length> <step> <program id>
/// <aux data> ...`), luksify's only.
pub fn parse_list(reply: &str) -> Vec<u64> {
    reply
        .lines()
        .filter_map(|l| {
            let (id, rest) = l.split_once(':')?;
            let program = rest.split_whitespace().nth(2)?;
            (program == PROGRAM_ID).then(|| id.trim().parse().ok()).flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_the_kernels_syntax() {
        assert_eq!(create_msg(2048, 34816), "@stats_create 2048+32768 2048 luksify");
        assert_eq!(create_msg(0, 65536), "@stats_create 0+65536 2048 luksify");
        assert_eq!(create_msg(0, 256), "@stats_create 0+256 16 luksify");
        assert_eq!(create_msg(0, 100), "@stats_create 0+100 8 luksify");
        assert_eq!(print_msg(3), "@stats_print 3");
        assert_eq!(delete_msg(3), "@stats_delete 3");
        assert_eq!(list_msg(), "@stats_list luksify");
        assert_eq!(parse_created("0\n"), Some(0));
        assert_eq!(parse_created("x"), None);
    }

    #[test]
    fn only_a_region_without_writes_is_quiet() {
        // as dm-stats prints them (kernel 6.x): reads, ..., writes at field 5
        assert!(quiet("2048+32768 12 0 96 1 0 0 0 0 0 1 1 1 0\n"));
        assert!(!quiet("2048+32768 12 0 96 1 1 0 8 0 0 1 1 1 0\n"));
        assert!(!quiet("2048+32768 0 0 0 0 0 0 8 0 0 0 0 0 0\n"));
        assert!(!quiet("2048+32768 0 0 0 0 0 1 0 0 0 0 0 0 0\n"));
        // in flight (or its counter wrapped by a bio begun before the region)
        assert!(!quiet("2048+32768 0 0 0 0 0 0 0 0 18446744073709551615 0 0 0 0\n"));
        assert!(!quiet(""));
        assert!(!quiet("garbage"));
        assert!(!quiet("2048+32768 0 0 0 0 0 0 0"));
        // every area must be quiet
        assert!(!quiet("0+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n8+8 0 0 0 0 2 0 16 0 0 0 0 0 0\n"));
    }

    #[test]
    fn areas_are_a_sixteenth_of_the_region_and_never_more_than_max_areas() {
        for len in [1u64, 7, 8, 100, 256, 4096, 32768, 32769, 65536, 1 << 20, 1 << 30] {
            let a = area_sectors(len);
            assert!(a.is_multiple_of(8) && (8..=2048).contains(&a), "{len}: {a}");
            // (regions are at most one step of luksify's own: 64 MiB)
            if len <= 131072 {
                assert!(len.div_ceil(a) as usize <= MAX_AREAS, "{len}: {a}");
            }
        }
    }

    #[test]
    fn the_written_areas_are_those_with_a_write_or_one_in_flight() {
        // as the 7.2 kernel printed a region 2048+8192 in areas of 2048 after writes at
        // sectors 5000 and 6140-6147 (the last one straddles two areas)
        let r = "2048+2048 0 0 0 0 0 0 0 0 0 0 0 0 0\n4096+2048 0 0 0 0 12 10 12 10 0 10 10 0 10\n\
                 6144+2048 0 0 0 0 4 4 4 0 0 0 0 0 0\n8192+2048 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        let mut w = Vec::with_capacity(MAX_AREAS);
        assert!(written_areas(r, &mut w));
        assert_eq!(w, vec![(4096, 6144), (6144, 8192)]);
        assert!(!quiet(r));
        // in flight only
        assert!(written_areas("0+8 0 0 0 0 0 0 0 0 1 0 0 0 0\n8+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n", &mut w));
        assert_eq!(w, vec![(0, 8)]);
        // none written
        assert!(written_areas("0+2048 5 0 40 1 0 0 0 0 0 1 1 1 0\n", &mut w) && w.is_empty());
        // unknown: no area, a short line, a bad range, more written areas than room
        assert!(!written_areas("", &mut w));
        assert!(!written_areas("0+8 0 0 0 0 0 0 0 0\n", &mut w));
        assert!(!written_areas("0-8 0 0 0 0 0 0 0 0 0 0 0 0 0\n", &mut w));
        let mut small = Vec::with_capacity(1);
        assert!(!written_areas("0+8 0 0 0 0 1 0 8 0 0 0 0 0 0\n8+8 0 0 0 0 1 0 8 0 0 0 0 0 0\n", &mut small));
        assert_eq!(small.capacity(), 1, "grown under a suspend");
    }

    #[test]
    fn a_region_serves_as_many_steps_as_its_areas_allow_and_the_lines_are_a_steps_areas() {
        let s = 32768; // 16 MiB: areas of 1 MiB, 16 a step
        assert_eq!(area_sectors(s), 2048);
        let per_region = MAX_REGION_AREAS / 16;
        let (from, to, area) = batch_region(1_000_000 - s, 1_000_000, s);
        assert_eq!((from, to, area), (1_000_000 - per_region * s, 1_000_000, 2048));
        // every step below the first, down to the region's start, is in it, in lines of its own
        for k in 0..per_region {
            let (a, b) = (to - (k + 1) * s, to - k * s);
            assert!(from <= a);
            assert_eq!(lines_of(from, area, a, b), ((per_region - 1 - k) * 16, 16));
        }
        // near the start of the device: from 0, and the moved first S [0, S) in it
        assert!(per_region >= 2);
        assert_eq!(batch_region(s, 2 * s, s), (0, 2 * s, 2048));
        assert_eq!(lines_of(0, 2048, 0, s), (0, 16));
        // a remainder step shorter than S (and not on an area's boundary) is in lines of its own
        assert_eq!(batch_region(s, s + 5000, s), (0, s + 5000, 2048));
        assert_eq!(lines_of(0, 2048, s, s + 5000), (16, 3));
        // a region never starts above the hotzone it is made for, whatever S says
        assert_eq!(batch_region(100, 200, 50), (0, 200, 8));
        // S of 32 MiB: areas of 1 MiB still, 32 a step, so half as many steps
        assert_eq!(
            batch_region(10 << 20, (10 << 20) + 65536, 65536).0,
            (10 << 20) + 65536 - MAX_REGION_AREAS / 32 * 65536
        );
        assert_eq!(create_region_msg(0, 65536, 2048), "@stats_create 0+65536 2048 luksify");
        assert_eq!(print_lines_msg(3, 16, 16), "@stats_print 3 16 16");
    }

    #[test]
    fn written_since_a_print_are_the_areas_whose_write_counters_moved() {
        let before = "0+8 9 0 72 3 2 0 16 1 0 4 4 3 1\n8+8 0 0 0 0 5 1 48 2 0 3 3 0 3\n";
        let mut b = Vec::with_capacity(MAX_AREAS);
        assert!(area_writes(before, &mut b));
        assert_eq!(b[1], AreaWrites { start: 8, len: 8, counts: [5, 1, 48, 0] });
        let mut w = Vec::with_capacity(MAX_AREAS);
        // reads (and their times) moved, no write: nothing written
        assert!(written_since(&b, "0+8 99 0 792 30 2 0 16 1 0 40 40 30 1\n8+8 1 0 8 0 5 1 48 2 0 3 3 0 3\n", &mut w));
        assert!(w.is_empty());
        // a write completed in the second area (any of its counters), or one in flight
        for after in [
            "0+8 9 0 72 3 2 0 16 1 0 4 4 3 1\n8+8 0 0 0 0 6 1 56 2 0 3 3 0 3\n",
            "0+8 9 0 72 3 2 0 16 1 0 4 4 3 1\n8+8 0 0 0 0 5 2 48 2 0 3 3 0 3\n",
            "0+8 9 0 72 3 2 0 16 1 0 4 4 3 1\n8+8 0 0 0 0 5 1 56 2 0 3 3 0 3\n",
            "0+8 9 0 72 3 2 0 16 1 0 4 4 3 1\n8+8 0 0 0 0 5 1 48 2 1 3 3 0 3\n",
        ] {
            assert!(written_since(&b, after, &mut w), "{after}");
            assert_eq!(w, vec![(8, 16)], "{after}");
        }
        // a counter wrapped by a bio begun before the region: the same in both prints
        let wrapped = "0+8 0 0 0 0 0 0 0 0 18446744073709551615 0 0 0 0\n";
        assert!(area_writes(wrapped, &mut b));
        assert!(written_since(&b, wrapped, &mut w) && w.is_empty());
        // from a region just made (no print before): any write counter not zero
        assert!(written_since(&[], wrapped, &mut w) && w == vec![(0, 8)]);
        // unknown: other areas than before, fewer, more, or a reply that does not parse
        assert!(area_writes(before, &mut b));
        assert!(!written_since(&b, "0+8 9 0 72 3 2 0 16 1 0 4 4 3 1\n16+8 0 0 0 0 5 1 48 2 0 3 3 0 3\n", &mut w));
        assert!(!written_since(&b, "0+8 9 0 72 3 2 0 16 1 0 4 4 3 1\n", &mut w));
        assert!(!written_since(&b, &format!("{before}16+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n"), &mut w));
        assert!(!written_since(&b, "", &mut w));
        assert!(!written_since(&b, "garbage", &mut w));
        // a print with more areas than room: nothing known
        let mut small = Vec::with_capacity(1);
        assert!(!area_writes(before, &mut small));
        assert_eq!(small.capacity(), 1);
    }

    #[test]
    fn the_list_yields_luksifys_regions() {
        let r = "0: 0+1024 1024 dmstats -\n1: 2048+32768 32768 luksify -\n7: 0+8 8 luksify -\n";
        assert_eq!(parse_list(r), vec![1, 7]);
        assert!(parse_list("").is_empty());
    }
}
