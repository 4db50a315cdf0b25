//! The real kernel's dm-stats counts what luksify's LUKS2 steps rely on when they skip the
//! last comparison under the suspend (`luksify::core::dmstats`): a region created before a
//! read of the source, read once the device is suspended, counts every write that changed
//! the source since that read began, in the area it changed. These boot User-Mode Linux;
//! they never skip.
mod support;

use luksify::core::dmstats;
use support::*;

/// The protocol of a step, many times over, with a writer changing the region at random
/// moments: create the region (luksify's own message: areas of a sixteenth), read the
/// source, (time passes), suspend, print the region, read the source again (underneath, as
/// luksify does), resume. Whenever an area says no write, that area of the two reads must be
/// the same (and when all of them say so, the whole region). The writer pauses often enough
/// that some rounds are quiet, and writes often enough that in some the source did change,
/// and sparsely enough that in some only part of the areas counted a write: all three must
/// occur, or the test shows nothing.
#[test]
fn a_region_that_counts_no_write_proves_the_source_unchanged() {
    let dir = test_dir("dmstats");
    let d1 = sparse_image(&dir, "d1.img", 64);
    let create = dmstats::create_msg(2048, 6144);
    let run = uml().disk(&d1).out_dir(dir.join("out")).timeout(240).run_script(&format!(
        r#"
dmsetup create lkst --table "0 65536 linear /dev/ubda 0"
dmsetup mknodes lkst
M=/dev/mapper/lkst
msg() {{ dmsetup message lkst 0 "$@"; }}
# the region: sectors [2048, 6144); the writer hits 4 KiB blocks 256..767 of it, at times
(
    while :; do
        dd if=/dev/urandom of=$M bs=4096 seek=$((256 + RANDOM % 512)) count=1 oflag=direct conv=notrunc status=none
        sleep 0.$((RANDOM % 10))
    done
) &
W=$!
T=$(mktemp -d)
mkdir -p "$OUT/rounds"
for i in $(seq 60); do
    id=$(msg "{create}")
    dd if=/dev/ubda of=$T/a bs=512 skip=2048 count=4096 iflag=direct status=none
    sleep 0.0$((RANDOM % 3))
    dmsetup suspend lkst
    msg "@stats_print $id" > "$OUT/rounds/$i.reply"
    dd if=/dev/ubda of=$T/b bs=512 skip=2048 count=4096 iflag=direct status=none
    dmsetup resume lkst
    # the sectors (from 2048) where the two reads differ
    cmp -l $T/a $T/b | awk '{{ s = 2048 + int(($1 - 1) / 512); if (s != p) print s; p = s }}' > "$OUT/rounds/$i.changed" || true
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
"#
    ));
    run.assert_ok().assert_log_contains("DMSTATS-OK");
    let (mut quiet, mut changed, mut partial) = (0, 0, 0);
    let mut areas = Vec::with_capacity(dmstats::MAX_AREAS);
    for i in 1..=60 {
        let reply = run.file(&format!("rounds/{i}.reply"));
        let diff: Vec<u64> =
            run.file(&format!("rounds/{i}.changed")).lines().map(|l| l.trim().parse().unwrap()).collect();
        assert!(dmstats::written_areas(&reply, &mut areas), "round {i}: the reply does not parse: {reply:?}");
        let n = reply.lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(n, 16, "round {i}: luksify's region has 16 areas: {reply}");
        for s in &diff {
            assert!(
                areas.iter().any(|&(a, b)| (a..b).contains(s)),
                "round {i}: sector {s} changed in an area that counted no write: {reply}"
            );
        }
        let q = dmstats::quiet(&reply);
        assert!(!q || diff.is_empty(), "round {i}: the region said quiet but the source changed");
        quiet += usize::from(q);
        changed += usize::from(!diff.is_empty());
        partial += usize::from(!areas.is_empty() && areas.len() < n);
    }
    eprintln!(
        "60 rounds: {quiet} quiet, {changed} with the source changed, {partial} with only part of the areas written"
    );
    assert!(quiet > 0, "no round was quiet: the writer never paused");
    assert!(changed > 0, "the writer never changed the source in a round: the test shows nothing");
    assert!(partial > 0, "no round had writes in only part of the areas: the areas were not tested");
    let id = dmstats::parse_created(&run.file("created")).expect("the create's reply is the region id");
    assert!(dmstats::parse_created(&run.file("other-created")).is_some());
    assert_eq!(dmstats::parse_list(&run.file("list")), vec![id], "list: {}", run.file("list"));
    assert!(!dmstats::quiet(&run.file("straddling")), "a write over the region's end: {}", run.file("straddling"));
}
