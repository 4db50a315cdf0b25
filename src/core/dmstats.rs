//! device-mapper statistics (the kernel's `@stats_*` messages, Documentation/admin-guide/
//! device-mapper/statistics.rst) as luksify uses them: one region over a step's hotzone on
//! the bridge, created before the first read of the step's source, read under the step's
//! suspend. A region that counted no write since it was created proves that no write to the
//! hotzone completed since before the copy read its source, so the last comparison under
//! the suspend would find nothing and is skipped.
//!
//! Why the count is enough, from the kernel's dm.c and dm-stats.c: a bio is accounted to
//! the regions it overlaps when it *completes* (`dm_stat_for_entry` with `end`: `ios` and
//! `sectors` incremented whether or not its start was accounted), and that happens before
//! the mapped device's in-flight count drops, which a (flushing) suspend waits for. So once
//! the bridge is suspended, every write that reached the hotzone after the region was
//! created has been counted; a write that completed before it was created was on the disk
//! before the copy's first read was issued. The counters are per-CPU and not atomic: a lost
//! update can make a count too small, never zero when a write completed.

/// The program id luksify's regions carry (`@stats_list luksify` finds leftovers).
pub const PROGRAM_ID: &str = "luksify";

/// Create one region over sectors [from, to) of the device, in areas of
/// [`area_sectors`]; the reply is its id.
pub fn create_msg(from: u64, to: u64) -> String {
    let len = to - from;
    format!("@stats_create {from}+{len} {} {PROGRAM_ID}", area_sectors(len))
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

/// The areas of the reply to [`print_msg`] that counted a write or have one in flight, as
/// sector ranges `[start, start + length)`, into `out` (cleared; never grown past its
/// capacity, so nothing is allocated under a suspend). The reply: `<start>+<length> <reads>
/// <reads merged> <sectors read> <ms reading> <writes> <writes merged> <sectors written> <ms
/// writing> <in progress> ...`, one line per area, in order. The kernel prints an area's
/// whole step even where the region ends sooner: the caller clips to the region. False when
/// the reply does not parse as that, has no area, or has more written areas than `out` holds:
/// then nothing is known, and all of the region counts as written.
pub fn written_areas(reply: &str, out: &mut Vec<(u64, u64)>) -> bool {
    out.clear();
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
        // writes, writes merged, sectors written, in progress
        if c[4] != 0 || c[5] != 0 || c[6] != 0 || c[8] != 0 {
            if out.len() == out.capacity() {
                return false;
            }
            out.push((start, start + len));
        }
    }
    areas > 0
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
    fn the_list_yields_luksifys_regions() {
        let r = "0: 0+1024 1024 dmstats -\n1: 2048+32768 32768 luksify -\n7: 0+8 8 luksify -\n";
        assert_eq!(parse_list(r), vec![1, 7]);
        assert!(parse_list("").is_empty());
    }
}
