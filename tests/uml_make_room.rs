//! `--make-room` on a real kernel (User-Mode Linux): when the room past the PV is too small,
//! luksify shrinks the PV over free extents at its end, first moving the last extents into
//! free ones elsewhere on the PV when an LV holds them (`pvmove`, online), then converts;
//! when nothing safe can be done it refuses and changes nothing. These never skip.
mod support;

use support::*;

#[test]
fn make_room_moves_the_last_extents_shrinks_the_pv_and_converts_online() {
    let dir = test_dir("makeroom");
    let (d1, d2) = laptop_disks(&dir);
    let run = uml().disk(&d1).disk(&d2).out_dir(dir.join("out")).timeout(500).run_script(
        r#"
dh() { dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1; }
MK() { bash "$UML_LIB/mkdisk.sh" --disk1 /dev/ubda --disk2 /dev/ubdb --quick "$@" > "$OUT/mkdisk.log" 2>&1 || { tail -20 "$OUT/mkdisk.log"; die "mkdisk $*"; }; }
printf 'room passphrase' > "$OUT/key"
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"

# 1. Nothing safe to do (the last extents are used and no free ones are left before them):
#    refused, nothing changed, even with --make-room.
MK --variant lastused --tail-mib 1
h1=$(dh /dev/ubda); h2=$(dh /dev/ubdb)
set +e; "$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --make-room /dev/ubda5 2> "$OUT/manual.err"; rc=$?; set -e
cat "$OUT/manual.err"
[ $rc = 10 ] || die "make-room with nothing safe to do: exit $rc, expected 10 (refused)"
grep -q "too few free extents" "$OUT/manual.err" || die "no advice on which LV to shrink"
[ "$(dh /dev/ubda)" = "$h1" ] && [ "$(dh /dev/ubdb)" = "$h2" ] || die "a refused --make-room changed a disk"
echo "MANUAL-REFUSED-OK"

# 2. The PV fills the partition and an LV holds its last extents; free extents before them.
MK --variant notail
vgchange -ay vg0 >/dev/null; mknodes
pe=$(pvs --noheadings -o pv_pe_count /dev/ubda5 | tr -d ' ')
lvcreate -q -y -Wy -Zy -n tailer -l 6 vg0 /dev/ubda5:$((pe - 6))-$((pe - 1)) >/dev/null
"$LKTEST" fill /dev/vg0/tailer --seed 9 >/dev/null
th=$(dh /dev/vg0/tailer)
mkdir -p /mnt/root; mount /dev/vg0/root /mnt/root
h1=$(dh /dev/ubda)
# The dry-run says what it would run, and runs nothing.
set +e; "$LUKSIFY" --dry-run --make-room /dev/ubda5 > "$OUT/dry.txt" 2>&1; rc=$?; set -e
cat "$OUT/dry.txt"
[ $rc = 0 ] || die "dry-run --make-room: exit $rc, expected 0 (the room can be made, so it would go ahead)"
grep -q "GO once the room is made" "$OUT/dry.txt" && grep -q "would first run" "$OUT/dry.txt" && grep -q "pvmove --alloc anywhere /dev/ubda5:" "$OUT/dry.txt" || die "the dry-run does not show the pvmove"
[ "$(dh /dev/ubda)" = "$h1" ] || die "the dry-run changed the disk"
"$LUKSIFY" --dry-run --json /dev/ubda5 > "$OUT/plan.json" 2>/dev/null || true
# Without --make-room: refused.
set +e; "$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST /dev/ubda5 2>/dev/null; rc=$?; set -e
[ $rc = 10 ] || die "without --make-room: exit $rc, expected 10 (refused)"
# With it, online, the writer running.
start_writer /mnt/root/records.dat "$OUT/acked"; wait_acked 20
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --make-room /dev/ubda5 2> "$OUT/convert.err"
cat "$OUT/convert.err"
grep -q "room made" "$OUT/convert.err" || die "no room-made line"
stop_writer
[ "$(dh /dev/vg0/tailer)" = "$th" ] || die "the moved LV's data changed"
pvs -o pv_name,pv_size,pv_pe_count 2>&1 | tee "$OUT/pvs.txt"
grep -q "ubda5_crypt" "$OUT/pvs.txt" || die "the PV is not on the new mapping"
lvs --noheadings -o lv_name,devices vg0 | tee "$OUT/lvs.txt"
echo "$th" > "$OUT/tailer.sha"
umount /mnt/root; vgchange -an vg0 >/dev/null; cryptsetup close ubda5_crypt
echo MAKEROOM-DONE
"#,
    );
    run.assert_ok().assert_log_contains("MANUAL-REFUSED-OK").assert_log_contains("MAKEROOM-DONE");
    let j: serde_json::Value = serde_json::from_str(&run.file("plan.json")).expect("plan.json parses");
    assert_eq!(j["make_room"]["kind"], "move_then_shrink", "{j}");
    assert_eq!(j["make_room"]["lvs"][0], "tailer", "{j}");
    // A fresh boot: LUKS opens, every filesystem, file, LV hash and acknowledged record verifies,
    // and the LV moved by pvmove holds what it held.
    let n = acked_count(&dir.join("out/acked"), 20);
    let v = uml().disk(&d1).disk(&d2).out_dir(dir.join("out")).run_script(&format!(
        r#"bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file "$OUT/key" --min-acked {n} --keep-open
[ "$(dd if=/dev/vg0/tailer bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)" = "$(cat "$OUT/tailer.sha")" ] || die "tailer changed"
echo TAILER-OK"#
    ));
    v.assert_ok().assert_log_contains("VERIFY OK (luks)").assert_log_contains("TAILER-OK");
}
