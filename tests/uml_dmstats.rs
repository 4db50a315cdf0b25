//! The real kernel's dm-stats counts what luksify's LUKS2 steps rely on when they skip the
//! last comparison under the suspend (`luksify::core::dmstats`): a region's areas over the
//! source, printed before a read of the source (or the region created then), printed again
//! once the device is suspended, count every write that changed the source since that read
//! began, in the area it changed. These boot User-Mode Linux; they never skip.
mod support;

use luksify::core::dmstats;
use support::*;

/// The protocol of a step, many times over, with a writer changing the source at random
/// moments, both ways luksify watches a source: (a) the cut-over's, a region over just the
/// source created before the read (luksify's own message: areas of a sixteenth), printed
/// whole under the suspend and deleted; (b) the steps', one region over many hotzones made
/// once, the lines of the source's areas printed before the read and again under the
/// suspend (the writer also writes the region's other areas, which must not matter). Each
/// round: (watch), read the source, (time passes), suspend, print, read the source again
/// (underneath, as luksify does), resume. Whenever an area says no write, that area of the
/// two reads must be the same (and when all of them say so, the whole source). The writer
/// pauses often enough that some rounds are quiet, and writes often enough that in some the
/// source did change, and sparsely enough that in some only part of the areas counted a
/// write: all three must occur each way, or the test shows nothing.
#[test]
fn areas_that_count_no_write_prove_the_source_unchanged() {
    let dir = test_dir("dmstats");
    let d1 = sparse_image(&dir, "d1.img", 64);
    let create = dmstats::create_msg(2048, 6144);
    // (b): the region [0, 16384) in areas of 256 sectors; the source [2048, 6144) is its
    // lines 8..24
    let create_many = dmstats::create_region_msg(0, 16384, 256);
    let (first, n) = dmstats::lines_of(0, 256, 2048, 6144);
    assert_eq!((first, n), (8, 16));
    assert_eq!(dmstats::print_lines_msg(5, first, n), "@stats_print 5 8 16");
    let run = uml().disk(&d1).out_dir(dir.join("out")).timeout(240).run_script(&format!(
        r#"
dmsetup create lkst --table "0 65536 linear /dev/ubda 0"
dmsetup mknodes lkst
M=/dev/mapper/lkst
msg() {{ dmsetup message lkst 0 "$@"; }}
# the source: sectors [2048, 6144); the writer hits 4 KiB blocks 256..767 of it, at times,
# and 768..1279 (the rest of the region of (b)) as often
(
    while :; do
        dd if=/dev/urandom of=$M bs=4096 seek=$((256 + RANDOM % 1024)) count=1 oflag=direct conv=notrunc status=none
        sleep 0.$((RANDOM % 10))
    done
) &
W=$!
T=$(mktemp -d)
mkdir -p "$OUT/rounds"
many=$(msg "{create_many}")
for i in $(seq 80); do
    if [ $i -le 40 ]; then
        id=$(msg "{create}")
    else
        msg "@stats_print $many {first} {n}" > "$OUT/rounds/$i.before"
    fi
    dd if=/dev/ubda of=$T/a bs=512 skip=2048 count=4096 iflag=direct status=none
    sleep 0.0$((RANDOM % 3))
    dmsetup suspend lkst
    if [ $i -le 40 ]; then
        msg "@stats_print $id" > "$OUT/rounds/$i.reply"
    else
        msg "@stats_print $many {first} {n}" > "$OUT/rounds/$i.reply"
    fi
    dd if=/dev/ubda of=$T/b bs=512 skip=2048 count=4096 iflag=direct status=none
    dmsetup resume lkst
    # the sectors (from 2048) where the two reads differ
    cmp -l $T/a $T/b | awk '{{ s = 2048 + int(($1 - 1) / 512); if (s != p) print s; p = s }}' > "$OUT/rounds/$i.changed" || true
    [ $i -gt 40 ] || msg "@stats_delete $id"
done
kill $W; wait $W 2>/dev/null || true
msg "@stats_delete $many"
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
    for (way, rounds) in [("(a) a region made for the read", 1..=40), ("(b) lines of a region made once", 41..=80)] {
        let (mut quiet, mut changed, mut partial) = (0, 0, 0);
        let mut areas = Vec::with_capacity(dmstats::MAX_AREAS);
        let mut before = Vec::with_capacity(dmstats::MAX_AREAS);
        for i in rounds {
            let reply = run.file(&format!("rounds/{i}.reply"));
            let diff: Vec<u64> =
                run.file(&format!("rounds/{i}.changed")).lines().map(|l| l.trim().parse().unwrap()).collect();
            if i > 40 {
                let b = run.file(&format!("rounds/{i}.before"));
                assert!(dmstats::area_writes(&b, &mut before), "{way}, round {i}: the print does not parse: {b:?}");
            }
            assert!(
                dmstats::written_since(&before, &reply, &mut areas),
                "{way}, round {i}: the reply does not parse (or other areas than before): {reply:?}"
            );
            let n = reply.lines().filter(|l| !l.trim().is_empty()).count();
            assert_eq!(n, 16, "{way}, round {i}: the source's 16 areas: {reply}");
            assert!(reply.starts_with("2048+256 "), "{way}, round {i}: the source's areas from 2048: {reply}");
            for s in &diff {
                assert!(
                    areas.iter().any(|&(a, b)| (a..b).contains(s)),
                    "{way}, round {i}: sector {s} changed in an area that counted no write: {reply}"
                );
            }
            let q = areas.is_empty();
            assert!(!q || diff.is_empty(), "{way}, round {i}: the areas said quiet but the source changed");
            if i <= 40 {
                assert_eq!(q, dmstats::quiet(&reply), "{way}, round {i}: quiet() says otherwise");
            }
            quiet += usize::from(q);
            changed += usize::from(!diff.is_empty());
            partial += usize::from(!areas.is_empty() && areas.len() < n);
        }
        eprintln!(
            "{way}, 40 rounds: {quiet} quiet, {changed} with the source changed, {partial} with only part of the areas written"
        );
        assert!(quiet > 0, "{way}: no round was quiet: the writer never paused");
        assert!(changed > 0, "{way}: the writer never changed the source in a round: the test shows nothing");
        assert!(partial > 0, "{way}: no round had writes in only part of the areas: the areas were not tested");
    }
    let id = dmstats::parse_created(&run.file("created")).expect("the create's reply is the region id");
    assert!(dmstats::parse_created(&run.file("other-created")).is_some());
    assert_eq!(dmstats::parse_list(&run.file("list")), vec![id], "list: {}", run.file("list"));
    assert!(!dmstats::quiet(&run.file("straddling")), "a write over the region's end: {}", run.file("straddling"));
}
