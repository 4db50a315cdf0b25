//! The real kernel's dm-stats counts what luksify's LUKS2 steps rely on when they skip the
//! last comparison under the suspend (`luksify::core::dmstats`): a region created before a
//! read of the source, read once the device is suspended, counts every write that changed
//! the source since that read began. These boot User-Mode Linux; they never skip.
mod support;

use luksify::core::dmstats;
use support::*;

/// The protocol of a step, many times over, with a writer changing the region at random
/// moments: create the region, read the source, (time passes), suspend, print the region,
/// read the source again (underneath, as luksify does), resume. Whenever the region says
/// quiet, the two reads must be the same. The writer pauses often enough that some rounds
/// are quiet, and writes often enough that in some the source did change: both must occur,
/// or the test shows nothing.
#[test]
fn a_region_that_counts_no_write_proves_the_source_unchanged() {
    let dir = test_dir("dmstats");
    let d1 = sparse_image(&dir, "d1.img", 64);
    let run = uml().disk(&d1).out_dir(dir.join("out")).timeout(240).run_script(
        r#"
dmsetup create lkst --table "0 65536 linear /dev/ubda 0"
dmsetup mknodes lkst
M=/dev/mapper/lkst
msg() { dmsetup message lkst 0 "$@"; }
# the region: sectors [2048, 6144); the writer hits 4 KiB blocks 256..767 of it, at times
(
    while :; do
        dd if=/dev/urandom of=$M bs=4096 seek=$((256 + RANDOM % 512)) count=1 oflag=direct conv=notrunc status=none
        sleep 0.$((RANDOM % 10))
    done
) &
W=$!
T=$(mktemp -d)
: > "$OUT/rounds"
for i in $(seq 60); do
    id=$(msg "@stats_create 2048+4096 /1 luksify")
    dd if=/dev/ubda of=$T/a bs=512 skip=2048 count=4096 iflag=direct status=none
    sleep 0.0$((RANDOM % 3))
    dmsetup suspend lkst
    r=$(msg "@stats_print $id")
    dd if=/dev/ubda of=$T/b bs=512 skip=2048 count=4096 iflag=direct status=none
    dmsetup resume lkst
    cmp -s $T/a $T/b && same=same || same=changed
    echo "$same $r" >> "$OUT/rounds"
    msg "@stats_delete $id"
done
kill $W; wait $W 2>/dev/null || true
# the other messages' replies: create, list (luksify's only), delete
msg "@stats_create 0+8 /1 dmstats" > "$OUT/other-created"
msg "@stats_create 2048+4096 /1 luksify" > "$OUT/created"
msg "@stats_list luksify" > "$OUT/list"
# a write over the region's end is counted in it
dd if=/dev/urandom of=$M bs=512 seek=6140 count=8 oflag=direct conv=notrunc status=none
dmsetup suspend lkst; msg "@stats_print $(cat "$OUT/created")" > "$OUT/straddling"; dmsetup resume lkst
dmsetup remove lkst
echo DMSTATS-OK
"#,
    );
    run.assert_ok().assert_log_contains("DMSTATS-OK");
    let rounds = run.file("rounds");
    let (mut quiet, mut changed) = (0, 0);
    for line in rounds.lines() {
        let (same, reply) = line.split_once(' ').unwrap_or((line, ""));
        let q = dmstats::quiet(reply);
        assert!(!(q && same == "changed"), "the region said quiet but the source changed: {line}");
        quiet += usize::from(q);
        changed += usize::from(same == "changed");
    }
    eprintln!("{} rounds: {quiet} quiet, {changed} with the source changed", rounds.lines().count());
    assert_eq!(rounds.lines().count(), 60, "{rounds}");
    assert!(quiet > 0, "no round was quiet: the writer never paused, or the reply never parses:\n{rounds}");
    assert!(changed > 0, "the writer never changed the source in a round: the test shows nothing");
    let id = dmstats::parse_created(&run.file("created")).expect("the create's reply is the region id");
    assert!(dmstats::parse_created(&run.file("other-created")).is_some());
    assert_eq!(dmstats::parse_list(&run.file("list")), vec![id], "list: {}", run.file("list"));
    assert!(!dmstats::quiet(&run.file("straddling")), "a write over the region's end: {}", run.file("straddling"));
}
