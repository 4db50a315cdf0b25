//! Guards while converting, on a real kernel (User-Mode Linux), in luksify's own protocol
//! (LUKS1, whose bridge luksify resumes at every step; --rate slows it enough to look):
//!
//! - LVM's VG lock: luksify holds `<locking_dir>/V_vg0` exclusively for the whole migration
//!   (here a locking directory that is not LVM's default),
//!   so an `lvcreate` started mid-way waits until the finish, then lands on the new mapping;
//!   and luksify refuses (nothing changed) when an LVM command holds the lock too long.
//! - udev: every resume of the bridge before the finish raises a uevent whose DM_COOKIE
//!   carries DM_UDEV_DISABLE_DISK_RULES_FLAG | DM_UDEV_DISABLE_OTHER_RULES_FLAG (so udev
//!   rules and LVM's autoactivation leave the plaintext PV alone); the last one does not.
//!
//! These never skip: without UML they fail with the install command.
mod support;

use support::*;

const SCRIPT: &str = r#"
vgchange -ay vg0 >/dev/null; mknodes
printf 'correct horse battery staple' > "$OUT/key"
# A locking directory of this system's own, not LVM's default: luksify must lock the VG
# where LVM does (it learns the lock file from its LVM report).
sed -i 's|^global {|global {\n    locking_dir = "/run/lock/lvm-guards"|' "$LVM_SYSTEM_DIR/lvm.conf"
[ "$(lvm config --typeconfig full global/locking_dir)" = 'locking_dir="/run/lock/lvm-guards"' ] \
    || die "could not set LVM's locking directory: $(cat "$LVM_SYSTEM_DIR/lvm.conf")"
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
ts() { while IFS= read -r l; do echo "$EPOCHREALTIME $l"; done; }

# 1. Another LVM command holds the VG lock: refused, nothing changed. A shared holder (a long
#    reporting command): luksify's own probe (pvs, lvs) shares it, luksify's exclusive lock
#    cannot. (An exclusive holder would make the probe's LVM commands wait for it first, as
#    LVM always waits; luksify's own bounded wait comes after the probe.)
LOCKDIR=$(lvm config --typeconfig full global/locking_dir | sed 's/.*="\(.*\)"/\1/')
echo "locking_dir $LOCKDIR"
mkdir -p "$LOCKDIR"
flock -o -s "$LOCKDIR/V_vg0" sleep 60 &   # -o: the lock is flock's alone, gone when it is killed
HOLDER=$!
n=0; while flock -n -x "$LOCKDIR/V_vg0" true; do n=$((n + 1)); [ $n -lt 300 ] || die "flock never took the lock"; sleep 0.1; done
set +e
LUKSIFY_LVM_LOCK_WAIT_SECS=2 "$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST /dev/ubda5 2> "$OUT/refused.err"
rc=$?
set -e
cat "$OUT/refused.err"
[ $rc = 5 ] || die "luksify with the VG lock held elsewhere: expected exit 5 (busy), got $rc"
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-refused.txt"
kill $HOLDER; wait $HOLDER 2>/dev/null || true

# 2. A conversion with a uevent listener, and an lvcreate started mid-way.
"$LKTEST" uevents --out "$OUT/uevents.txt" --until "$OUT/stop-uevents" --ready "$OUT/uevents.ready" &
UEV=$!
while [ ! -e "$OUT/uevents.ready" ]; do sleep 0.05; done
mkfifo /run/luksify.fifo   # (no /dev/fd here for a process substitution)
ts < /run/luksify.fifo > "$OUT/luksify.err" &
TS=$!
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --type luks1 --chunk 4096 --rate 16 --progress-json /dev/ubda5 2> /run/luksify.fifo &
P=$!
while ! grep -q '"event":"chunk"' "$OUT/luksify.err" 2>/dev/null; do
    kill -0 $P 2>/dev/null || { sleep 0.5; die "luksify ended before its first chunk: $(cat "$OUT/luksify.err")"; }
    sleep 0.05
done
dmsetup info -c --noheadings -o major,minor ubda5_crypt | tr -d ' ' > "$OUT/bridge.devno"
echo "$EPOCHREALTIME" > "$OUT/lvcreate.start"
( set +e; lvcreate -q -y -Wn -Zn -n x -L 4M vg0 /dev/mapper/ubda5_crypt > "$OUT/lvcreate.out" 2>&1
  echo $? > "$OUT/lvcreate.rc"; echo "$EPOCHREALTIME" > "$OUT/lvcreate.end" ) &
LVC=$!
sleep 4
if kill -0 $P 2>/dev/null; then
    echo "luksify still converting after 4 s" > "$OUT/still-running"
    [ -e "$OUT/lvcreate.rc" ] && die "lvcreate finished while luksify converts: $(cat "$OUT/lvcreate.out")"
    dmsetup info vg0-x > "$OUT/x-during.txt" 2>&1 && die "LV x is active while luksify converts"
fi
set +e; wait $P; rc=$?; set -e
echo "$EPOCHREALTIME" > "$OUT/luksify.end"
wait $TS
cat "$OUT/luksify.err"
[ $rc = 0 ] || die "luksify failed ($rc)"
wait $LVC || true
cat "$OUT/lvcreate.out"
[ "$(cat "$OUT/lvcreate.rc")" = 0 ] || die "lvcreate failed after the conversion: $(cat "$OUT/lvcreate.out")"
mknodes
dmsetup table vg0-x | tee "$OUT/x-table.txt"
touch "$OUT/stop-uevents"; sync; wait $UEV || die "uevent listener failed"
lvremove -q -y vg0/x >/dev/null
vgchange -an vg0 >/dev/null
dmsetup remove ubda5_crypt
echo GUARDS-DONE
"#;

fn secs(s: &str) -> f64 {
    s.split_whitespace().next().unwrap().parse().unwrap_or_else(|_| panic!("not a timestamp: {s:?}"))
}

#[test]
fn lvm_waits_for_the_vg_lock_and_udev_sees_the_bridge_only_at_the_finish() {
    let dir = test_dir("guards");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(SCRIPT);
    run.assert_ok().assert_log_contains("GUARDS-DONE");

    // --- the refusal while another LVM command holds the lock
    let refused = run.file("refused.err");
    assert!(refused.contains("waiting for LVM's lock on VG vg0"), "{refused}");
    assert!(refused.contains("lock on VG vg0") && refused.contains("nothing was changed"), "{refused}");
    assert!(run.file("status-refused.txt").contains("no luksify conversion in progress"));

    // --- lvcreate waited for the conversion
    let err = run.file("luksify.err");
    assert!(err.contains("holding LVM's lock on VG vg0"), "{err}");
    assert!(d.state.join("still-running").exists(), "the conversion was too quick to test the lock:\n{err}");
    let header_at = err
        .lines()
        .find(|l| l.contains("\"state\":\"header-written\""))
        .map(secs)
        .unwrap_or_else(|| panic!("no header-written commit in\n{err}"));
    let lv_start = secs(&run.file("lvcreate.start"));
    let lv_end = secs(&run.file("lvcreate.end"));
    let lk_end = secs(&run.file("luksify.end"));
    eprintln!("lvcreate {lv_start:.2}..{lv_end:.2}, header written at {header_at:.2}, luksify ended {lk_end:.2}");
    // (the commit line is stamped when the shell reads it: allow it a moment)
    assert!(lv_end + 0.5 >= header_at, "lvcreate ended at {lv_end} before the header was written ({header_at})");
    assert!(lv_end - lv_start > 3.0, "lvcreate did not wait: {lv_start}..{lv_end}");
    // ... and its LV maps onto the new mapping (the bridge), not the raw partition.
    let bridge = run.file("bridge.devno").trim().to_string();
    let x = run.file("x-table.txt");
    assert!(x.contains(&format!(" linear {bridge} ")), "vg0-x does not map onto the bridge {bridge}: {x}");

    // --- uevents of the bridge: hidden until the finish, shown once at the end
    let (maj, min) = bridge.split_once(':').unwrap();
    let uev = run.file("uevents.txt");
    let bridge_changes: Vec<&str> = uev
        .lines()
        .filter(|l| l.split(' ').any(|kv| kv == "ACTION=change"))
        .filter(|l| {
            l.split(' ').any(|kv| kv == format!("MAJOR={maj}")) && l.split(' ').any(|kv| kv == format!("MINOR={min}"))
        })
        .collect();
    assert!(!uev.contains("LOST"), "the listener lost events:\n{uev}");
    assert!(bridge_changes.len() >= 3, "too few change events for the bridge {bridge}:\n{uev}");
    let flags = |l: &str| -> u32 {
        l.split(' ').find_map(|kv| kv.strip_prefix("DM_COOKIE=")).map(|c| c.parse::<u32>().unwrap() >> 16).unwrap_or(0)
    };
    const HIDE: u32 = 0x04 | 0x08; // DM_UDEV_DISABLE_DISK_RULES_FLAG | DM_UDEV_DISABLE_OTHER_RULES_FLAG
    let (last, before) = bridge_changes.split_last().unwrap();
    for l in before {
        assert_eq!(
            flags(l) & HIDE,
            HIDE,
            "a change event of the bridge before the finish lacks the udev-disable flags: {l}\nall:\n{}",
            bridge_changes.join("\n")
        );
    }
    assert_eq!(flags(last) & HIDE, 0, "the last change event of the bridge still hides it from udev: {last}");
}
