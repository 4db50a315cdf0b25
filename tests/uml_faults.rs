//! Faults that are not crashes, on a real kernel (User-Mode Linux), in luksify's own copy
//! protocol (LUKS1; a LUKS2 conversion's data phase is libcryptsetup's): the PV sits on a dm-dust
//! device that passes through to the partition, and a few sectors in the middle of the data
//! are made unreadable (dm-flakey cannot be used: in its error state it fails flushes too,
//! so nothing could ever be committed). The copy of the chunk holding them fails;
//! luksify must stop at a safe state with a clear error, the live system keeps its data, and
//! once the fault is gone `luksify resume` completes and a fresh boot verifies everything.
//! (dm-dust fails reads only. Write errors, writes a disk drops silently, and errors of
//! every other operation, are injected at every step by the crash simulation in
//! `src/engine/sim/`.) The second test covers a double fault the simulator also sweeps:
//! a write failing on one copy of a step kept under the mirror of a failed commit.
mod support;

use support::*;

#[test]
fn a_read_error_on_the_source_stops_safely_and_resume_completes() {
    let dir = test_dir("fault-dest");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(
        r#"
# The "disk" luksify converts: a pass-through of ubda5 (LVM sees only it, not ubda5).
pass_through dm-dust dust 512
vgchange -ay vg0 >/dev/null; mknodes
pvs | tee "$OUT/pvs-before.txt"
mkdir -p /mnt/root; mount /dev/vg0/root /mnt/root
printf 'fault passphrase' > "$OUT/key"
start_writer /mnt/root/records.dat "$OUT/acked"; wait_acked 20
# Eight sectors in the middle of the data (inside LV raw's neighbourhood, never read by the
# writer) fail every read.
L=$("$LUKSIFY" --dry-run --json --type luks1 --name fake_crypt /dev/mapper/fake | sed -n 's/.*"move_sectors": \([0-9]*\).*/\1/p')
X=$(( L / 2 / 8 * 8 ))
for b in $(seq $X $((X + 7))); do dmsetup message fake 0 addbadblock $b; done
dmsetup message fake 0 enable
set +e
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --type luks1 --name fake_crypt --chunk 8192 --progress-json /dev/mapper/fake 2> "$OUT/fail.err"
rc=$?
set -e
cat "$OUT/fail.err"
[ $rc -ne 0 ] || die "the conversion did not notice the read errors"
grep -q "safe point" "$OUT/fail.err" || die "no safe-state message"
"$LUKSIFY" status /dev/mapper/fake | tee "$OUT/status-fault.txt"
# The live system still reads the right data.
"$LKTEST" verify-records --file /mnt/root/records.dat --acked "$OUT/acked"
# The fault goes away; resume finishes online.
dmsetup message fake 0 disable
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/mapper/fake
stop_writer
umount /mnt/root; vgchange -an vg0 >/dev/null
dmsetup remove fake_crypt; dmsetup remove fake
echo FAULT-DONE
"#,
    );
    run.assert_ok().assert_log_contains("FAULT-DONE");
    let err = run.file("fail.err");
    assert!(err.contains("reading the source") && err.contains("safe point"), "{err}");
    assert!(run.file("status-fault.txt").contains("migrating"));
    assert!(err.contains("\"event\":\"chunk\""), "chunks before the bad one were moved: {err}");
    let n = acked_count(&d.state.join("acked"), 20);
    verify_luks_boot(&d, &format!("--min-acked {n}"));
}

/// The double fault after a failed commit (HACKING.md, "How a step moves"): `keep_both` has
/// put the step's two copies under a nosync mirror, and a write then fails on one of them.
/// A commit failure cannot be injected here (dm-flakey fails flushes too, dm-dust only
/// reads), so the state is built by hand on a paused conversion, as the engine builds it:
/// the step below the journal's cursor mapped through the mirror device, leg 0 its source,
/// leg 1 the staging crypt device; one of the legs is a dm `error` device. A sector is read
/// and written back through the bridge (content unchanged, but the write fails on the broken
/// leg and the kernel marks it `D`).
/// 1. Source leg broken: the journal (cursor above the step) maps the source, which missed
///    the write: `luksify resume` must refuse and load nothing.
/// 2. Destination leg broken: the journal maps the source, which is whole: the resume
///    completes, and a fresh boot verifies every LV.
#[test]
fn resume_never_maps_a_copy_that_missed_a_write_under_the_mirror() {
    let dir = test_dir("fault-stale-leg");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(
        r#"
printf 'stale leg passphrase' > "$OUT/key"
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
K=4096
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --type luks1 --chunk $K /dev/ubda5 2> "$OUT/run1.err" &
P=$!
while ! "$LUKSIFY" status --json /dev/ubda5 2>/dev/null | grep '"state": "migrating"' >/dev/null; do sleep 0.1; done
sleep 0.5
kill -INT $P
set +e; wait $P; rc=$?; set -e
[ $rc = 11 ] || { cat "$OUT/run1.err"; die "SIGINT: expected exit 11 (paused), got $rc"; }
C=$("$LUKSIFY" status --json /dev/ubda5 | sed -n 's/.*"cursor": *\([0-9]*\).*/\1/p')
A=$((C - K))
[ "$A" -gt 8 ] || die "cursor $C too low for the test"
devno() { printf '%d:%d' $(stat -L -c '0x%t 0x%T' "$1"); }
RAW=$(devno /dev/ubda5)
dmsetup mknodes
STG=$(devno /dev/mapper/ubda5_crypt-luksify)
MIR=$(devno /dev/mapper/ubda5_crypt-luksify-mirror)
dmsetup create lkt_err --table "0 $K error"; dmsetup mknodes
ERR=$(devno /dev/mapper/lkt_err)
dmsetup table --showkeys ubda5_crypt > /tmp/bridge.orig
dmsetup table ubda5_crypt-luksify-mirror > /tmp/mirror.orig
# The bridge with [A, C) through the mirror (the Steady{C} table has [F, C) linear to raw).
awk -v a=$A -v c=$C -v m=$MIR '{ if ($3 == "linear" && $1 <= a && a < $1 + $2 && $1 + $2 == c) {
    if (a > $1) print $1, a - $1, "linear", $4, $5; print a, c - a, "linear", m, 0 } else print }' \
    /tmp/bridge.orig > /tmp/bridge.mirrored
grep -q " $MIR 0" /tmp/bridge.mirrored || { cat /tmp/bridge.orig; die "no linear line ending at the cursor"; }
# leg0 leg1: the mirror over the step, then a read-and-write-back of its first sector.
break_leg() {
    dmsetup load ubda5_crypt-luksify-mirror --table "0 $K mirror core 2 1024 nosync 2 $1 $2 $3 $4"
    dmsetup suspend ubda5_crypt-luksify-mirror; dmsetup resume ubda5_crypt-luksify-mirror
    dmsetup load ubda5_crypt --table "$(cat /tmp/bridge.mirrored)"
    dmsetup suspend ubda5_crypt; dmsetup resume ubda5_crypt
    dd if=/dev/mapper/ubda5_crypt of=/tmp/sector bs=512 skip=$A count=1 iflag=direct status=none
    dd if=/tmp/sector of=/dev/mapper/ubda5_crypt bs=512 seek=$A count=1 oflag=direct conv=fsync status=none
    dmsetup status ubda5_crypt-luksify-mirror
}
# 1. The source leg misses the write; the journal maps the source.
break_leg $ERR 0 $STG $A | tee "$OUT/status1.txt"
grep -q " DA " "$OUT/status1.txt" || die "the kernel did not mark the source leg: $(cat "$OUT/status1.txt")"
dmsetup table ubda5_crypt > /tmp/bridge.before
set +e
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/resume1.err"
rc=$?
set -e
cat "$OUT/resume1.err"
[ $rc -ne 0 ] || die "resume mapped the stale source"
dmsetup table ubda5_crypt > /tmp/bridge.after
cmp /tmp/bridge.before /tmp/bridge.after || die "the refused resume changed the bridge"
# Back to the paused state, by hand.
dmsetup load ubda5_crypt --table "$(cat /tmp/bridge.orig)"; dmsetup suspend ubda5_crypt; dmsetup resume ubda5_crypt
dmsetup load ubda5_crypt-luksify-mirror --table "$(cat /tmp/mirror.orig)"
dmsetup suspend ubda5_crypt-luksify-mirror; dmsetup resume ubda5_crypt-luksify-mirror
# 2. The destination leg misses the write; the journal maps the source: resume completes.
break_leg $RAW $A $ERR 0 | tee "$OUT/status2.txt"
grep -q " AD " "$OUT/status2.txt" || die "the kernel did not mark the destination leg: $(cat "$OUT/status2.txt")"
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/resume2.err" || { cat "$OUT/resume2.err"; die "resume over a healthy source failed"; }
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-done.txt"
dmsetup remove ubda5_crypt; dmsetup remove lkt_err
echo STALE-LEG-DONE
"#,
    );
    run.assert_ok().assert_log_contains("STALE-LEG-DONE");
    let e = run.file("resume1.err");
    assert!(e.contains("may have missed writes") && e.contains("health DA"), "{e}");
    assert!(run.file("status-done.txt").contains("no luksify conversion in progress"));
    verify_luks_boot(&d, "");
}
