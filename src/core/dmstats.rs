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

/// Create one region over sectors [from, to) of the device, one area; the reply is its id.
pub fn create_msg(from: u64, to: u64) -> String {
    format!("@stats_create {from}+{} /1 {PROGRAM_ID}", to - from)
}

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

/// Whether the reply to [`print_msg`] says no write was counted and none is in flight:
/// `<start>+<length> <reads> <reads merged> <sectors read> <ms reading> <writes>
/// <writes merged> <sectors written> <ms writing> <in progress> ...` for each area. Anything
/// that does not parse as that says "not quiet" (the comparison runs).
pub fn quiet(reply: &str) -> bool {
    let mut areas = 0;
    for line in reply.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || !f[0].contains('+') {
            return false;
        }
        let n = |i: usize| f[i].parse::<u64>().ok();
        match (n(5), n(6), n(7), n(9)) {
            (Some(0), Some(0), Some(0), Some(0)) => areas += 1,
            _ => return false,
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
        assert_eq!(create_msg(2048, 34816), "@stats_create 2048+32768 /1 luksify");
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
    fn the_list_yields_luksifys_regions() {
        let r = "0: 0+1024 1024 dmstats -\n1: 2048+32768 32768 luksify -\n7: 0+8 8 luksify -\n";
        assert_eq!(parse_list(r), vec![1, 7]);
        assert!(parse_list("").is_empty());
    }
}
