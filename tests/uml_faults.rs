//! Faults that are not crashes, on a real kernel (User-Mode Linux): the PV sits on a dm-dust
//! device that passes through to the partition, and a few sectors in the middle of the data
//! are made unreadable (dm-flakey cannot be used: in its error state it fails flushes too,
//! so nothing could ever be committed). The copy of the chunk holding them fails;
//! luksify must stop at a safe state with a clear error, the live system keeps its data, and
//! once the fault is gone `luksify resume` completes and a fresh boot verifies everything.
//! (dm-dust fails reads only. Write errors, writes a disk drops silently, and errors of
//! every other operation, are injected at every step by the crash simulation in
//! `src/engine/sim.rs`.)
mod support;

use support::*;

#[test]
fn a_read_error_on_the_source_stops_safely_and_resume_completes() {
    let dir = test_dir("fault-dest");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(
        r#"
N=$(blockdev --getsz /dev/ubda5)
MAJMIN=$(printf '%d:%d' $(stat -c '0x%t 0x%T' /dev/ubda5))
# The "disk" luksify converts: a pass-through of ubda5 (LVM sees only it, not ubda5).
modprobe -d /run/modroot dm-dust
dmsetup create fake --table "0 $N dust $MAJMIN 0 512"
cat >> "$LVM_SYSTEM_DIR/lvm.conf" <<'CONF'
devices { global_filter = [ "a|^/dev/mapper/|", "a|^/dev/dm-|", "a|^/dev/ubdb|", "r|.*|" ] }
CONF
vgchange -ay vg0 >/dev/null; mknodes
pvs | tee "$OUT/pvs-before.txt"
mkdir -p /mnt/root; mount /dev/vg0/root /mnt/root
printf 'fault passphrase' > "$OUT/key"
start_writer /mnt/root/records.dat "$OUT/acked"; wait_acked 20
# Eight sectors in the middle of the data (inside LV raw's neighbourhood, never read by the
# writer) fail every read.
L=$("$LUKSIFY" --dry-run --json --name fake_crypt /dev/mapper/fake | sed -n 's/.*"move_sectors": \([0-9]*\).*/\1/p')
X=$(( L / 2 / 8 * 8 ))
for b in $(seq $X $((X + 7))); do dmsetup message fake 0 addbadblock $b; done
dmsetup message fake 0 enable
set +e
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --name fake_crypt --chunk 8192 --progress-json /dev/mapper/fake 2> "$OUT/fail.err"
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
    let v = uml()
        .disk(&d.disk1)
        .disk(&d.disk2)
        .out_dir(&d.state)
        .run_script(&format!(r#"bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file "$OUT/key" --min-acked {n}"#));
    v.assert_ok().assert_log_contains("VERIFY OK (luks)");
}
