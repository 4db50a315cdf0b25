//! The online conversion on a real kernel (User-Mode Linux): the realistic laptop disk is
//! converted while its filesystems are mounted, written (fsync'd records) and read (static
//! files checked continuously); then a fresh boot verifies everything through cryptsetup.
//! These never skip: without UML they fail with the install command.
mod support;

use std::time::Duration;
use support::*;

/// Bring the laptop up as a running system would have it: VG active, root and home mounted,
/// the fsync'ing writer on root and a reader checking root's static files.
const LIVE: &str = r#"
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/root /mnt/home
mount /dev/vg0/root /mnt/root; mount /dev/vg0/home /mnt/home
printf 'correct horse battery staple' > "$OUT/key"
start_writer /mnt/root/records.dat "$OUT/acked"
"$LKTEST" reader --root /mnt/home --manifest "$OUT/manifest.home" --until "$OUT/stop-reader" > "$OUT/reader.log" 2>&1 &
READER=$!
wait_acked 20
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
"#;

/// Stop the writer and the reader; the reader must have seen no mismatch.
const STOP_LIVE: &str = r#"
stop_writer
touch "$OUT/stop-reader"; wait $READER || die "the reader saw wrong data during the conversion: $(cat "$OUT/reader.log")"
cat "$OUT/reader.log"
umount /mnt/root /mnt/home
vgchange -an vg0 >/dev/null
"#;

/// The mapping luksify leaves, then the one `cryptsetup open` makes of the same device
/// after a close: table (keys hidden and shown), DM UUID. Leaves nothing open.
const SAME_AS_OPEN: &str = r#"
snap_map() {   # PREFIX
    dmsetup table ubda5_crypt > "$OUT/$1-table.txt"
    dmsetup table --showkeys ubda5_crypt > "$OUT/$1-keys.txt"
    dmsetup info -c --noheadings -o uuid ubda5_crypt > "$OUT/$1-uuid.txt"
}
snap_map live
dmsetup remove ubda5_crypt
cryptsetup open --key-file "$OUT/key" /dev/ubda5 ubda5_crypt
snap_map open
cryptsetup close ubda5_crypt
"#;

/// The finished mapping is what `cryptsetup open` makes: same table, same DM UUID, and the
/// key not shown where cryptsetup's is not (LUKS2: through the kernel keyring).
fn assert_same_as_open(run: &GuestRun, luks2: bool) {
    for what in ["table", "uuid", "keys"] {
        let live = run.file(&format!("live-{what}.txt"));
        let open = run.file(&format!("open-{what}.txt"));
        assert!(!live.trim().is_empty(), "no {what} of the finished mapping");
        assert_eq!(live, open, "the finished mapping's {what} differs from cryptsetup open's");
    }
    let keys = run.file("live-keys.txt");
    if luks2 {
        assert!(
            keys.contains(":64:logon:cryptsetup:"),
            "the LUKS2 key is not in the keyring: {}",
            keys.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
    }
}

fn verify_fresh_boot(d: &BuiltDisk, min_acked: usize, name: &str) -> GuestRun {
    verify_luks_boot(d, &format!("--name {name} --min-acked {min_acked}"))
}

fn acked(d: &BuiltDisk) -> usize {
    acked_count(&d.state.join("acked"), 0)
}

#[test]
fn luks2_online_with_live_writer_and_reader_then_fresh_boot_verifies() {
    let dir = test_dir("convert-luks2");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
# While converting (after the cut-over), LVM and blkid must see the PV once, on the bridge.
# The look is taken with luksify held still (SIGSTOP) after its first step, at an instant
# when no device-mapper device is suspended (else it is let go and stopped again), and
# luksify goes on after it (SIGCONT): mid-way for certain, however slow the machine. The
# writer and the reader run on meanwhile.
: > "$OUT/convert.err"
t0=$EPOCHREALTIME
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --chunk 8192 --progress-json /dev/ubda5 2> "$OUT/convert.err" &
P=$!
all_stopped() {{ local s; for s in /proc/$P/task/*/stat; do [ "$(cut -d' ' -f3 "$s" 2>/dev/null)" = T ] || return 1; done; }}
hold() {{   # 0: $P is stopped and nothing is suspended; 1: $P ended first
    local i j
    for i in $(seq 400); do
        kill -STOP $P 2>/dev/null || return 1
        for j in $(seq 200); do all_stopped && break; sleep 0.005; done
        all_stopped || {{ kill -CONT $P 2>/dev/null; return 1; }}
        dmsetup info -c --noheadings -o suspended | grep -q Suspended || return 0
        kill -CONT $P; sleep 0.0$((RANDOM % 5 + 1))
    done
    return 1
}}
while kill -0 $P 2>/dev/null && ! grep -q '"event":"chunk"' "$OUT/convert.err"; do sleep 0.01; done
if hold; then
    # The OOM killer must spare luksify (killed in a suspended window, it would freeze root).
    for p in $(pgrep -x luksify); do cat /proc/$p/oom_score_adj; done > "$OUT/oom-during.txt" 2>&1 || true
    # (no locks: luksify may be held inside its own header update)
    cryptsetup --disable-locks luksDump /dev/ubda5 > "$OUT/dump-during.txt" 2>&1 || true
    blkid -p /dev/ubda5 > "$OUT/blkid-raw.txt" 2>&1 || true
    # luksify holds LVM's VG lock until the finish: look without locking, or LVM would wait.
    lvm pvscan --nolocking > "$OUT/pvscan.txt" 2>&1 || true
    pvs --nolocking --noheadings -o pv_name > "$OUT/pvs-during.txt" 2>&1 || true
    "$LUKSIFY" status /dev/ubda5 > "$OUT/status-during.txt" 2>&1 || true
    # luksify's LVM shell for the finish (`lvm` without arguments), waiting for its command
    for q in $(pgrep -x lvm); do [ "$(tr '\0' ' ' < /proc/$q/cmdline)" = "lvm " ] && echo "$q"; done > "$OUT/shell-during.txt" 2>/dev/null || true
    kill -0 $P && touch "$OUT/checked-during"
    kill -CONT $P
else
    echo "the checker could not hold luksify mid-way (it ended, or a device stayed suspended)"
fi
set +e; wait $P; rc=$?; set -e
echo "$EPOCHREALTIME - $t0" | bc > "$OUT/convert.secs" 2>/dev/null || echo "?" > "$OUT/convert.secs"
grep -v '"event":"chunk"' "$OUT/convert.err" || true
[ $rc = 0 ] || die "luksify failed ($rc): $(tail -5 "$OUT/convert.err")"
{STOP_LIVE}
cryptsetup status ubda5_crypt | tee "$OUT/cs-status.txt"
dmsetup message ubda5_crypt 0 "@stats_list" > "$OUT/stats-after.txt"
dmsetup ls > "$OUT/dm-ls-after.txt"
vgchange -ay vg0 >/dev/null; pvs 2>&1 | tee "$OUT/pvs-after.txt"
pvs --noheadings --units s --nosuffix -o dev_size,pe_start,pv_size,vg_extent_size /dev/mapper/ubda5_crypt > "$OUT/pv-fill.txt"
vgchange -an vg0 >/dev/null
{SAME_AS_OPEN}
echo CONVERTED
"#
    ));
    run.assert_ok().assert_log_contains("CONVERTED");
    assert!(d.state.join("checked-during").exists(), "no look mid-way: luksify was not held after its first step");
    // mid-way, stock cryptsetup reads a standard LUKS2 reencryption in progress
    let dump = run.file("dump-during.txt");
    assert!(dump.contains("online-reencrypt-v2") && dump.contains("backup-moved-segment"), "luksDump mid-way: {dump}");
    let blkid = run.file("blkid-raw.txt");
    assert!(!blkid.contains("LVM2_member"), "blkid sees a PV on the raw partition mid-way: {blkid}");
    let pvs = run.file("pvs-during.txt");
    assert!(pvs.contains("/dev/mapper/ubda5_crypt") || pvs.contains("/dev/dm-"), "pvs during: {pvs}");
    assert!(!pvs.contains("/dev/ubda5"), "pvs sees the raw partition mid-way: {pvs}");
    assert_eq!(
        pvs.lines().filter(|l| l.contains("ubda5") || l.contains("dm-")).count(),
        1,
        "PV seen more than once: {pvs}"
    );
    // status while luksify runs: running, and no hint to start a second one
    let st = run.file("status-during.txt");
    assert!(st.contains("state:    reencrypting") && st.contains("running:  yes, luksify process"), "{st}");
    assert!(!st.contains("continue:"), "a resume hint while luksify runs: {st}");
    let oom = run.file("oom-during.txt");
    assert_eq!(oom.trim(), "-1000", "luksify's oom_score_adj while converting: {oom:?}");
    let scan = run.file("pvscan.txt");
    assert!(!scan.contains("/dev/ubda5 "), "pvscan sees the raw partition: {scan}");
    let st = run.file("cs-status.txt");
    assert!(st.contains("type:    LUKS2") && st.contains("device:  /dev/ubda5") && st.contains("is active"), "{st}");
    assert_same_as_open(&run, true);
    let after = run.file("pvs-after.txt");
    assert!(!after.contains("WARNING"), "LVM still disagrees on sizes after pvresize: {after}");
    // mid-way, one LVM shell waited for the finish's pvresize; after it, the PV fills the
    // LUKS mapping (its extents end less than one extent before the mapping does)
    assert_eq!(
        run.file("shell-during.txt").lines().count(),
        1,
        "LVM shells mid-way: {:?}",
        run.file("shell-during.txt")
    );
    let fill = run.file("pv-fill.txt");
    let v: Vec<u64> = fill.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert!(v.len() == 4 && v[0] - v[1] - v[2] < v[3], "the PV does not fill /dev/mapper/ubda5_crypt: {fill}");
    let n = acked(&d);
    assert!(n > 20, "the writer acked only {n} records");
    // luksify's own steps skipped the last comparison where the hotzone's dm-stats region
    // counted no write (the real kernel's replies parsed: tests/uml_dmstats.rs shows the
    // count is right); the writer's records are checked below all the same
    let progress = run.file("convert.err");
    let chunks: Vec<&str> = progress.lines().filter(|l| l.contains(r#""event":"chunk""#)).collect();
    let skipped = chunks.iter().filter(|l| l.contains(r#""compare_skipped":true"#)).count();
    assert!(skipped > 0, "no step skipped its last comparison: {}", chunks.join("\n"));
    let left = run.file("stats-after.txt");
    assert!(left.trim().is_empty(), "dm-stats regions left on the LUKS mapping: {left}");
    // the tick was learnt on a private device before the cut-over (all its suspends
    // returned), and that device is gone
    let tick = progress.lines().find(|l| l.contains(r#""event":"tick""#)).unwrap_or_default();
    assert!(tick.contains(&format!(r#""marks":{}"#, luksify::core::tick::NEED)), "tick line: {tick:?}");
    let ls = run.file("dm-ls-after.txt");
    assert!(!ls.contains("luksify-tick"), "the tick's private device was left: {ls}");
    // the staging, mirror and switch devices (removed by a thread of their own while the
    // next step copied) are gone too
    assert!(!ls.contains("-luksify"), "private devices left after the conversion: {ls}");
    eprintln!(
        "converted in {} s with {n} records acked; {skipped} of {} steps skipped the last comparison; {tick}",
        run.file("convert.secs").trim(),
        chunks.len()
    );
    verify_fresh_boot(&d, n, "ubda5_crypt");
}

/// LUKS1; a chunk that does not divide L; the smallest tail the plan accepts (the data
/// offset is chosen so that the tail is exactly what luksify needs, and 8 sectors more
/// is refused); the LV that spans a second PV keeps its other segment in place; and
/// `--max-stall 0`: every suspended window that can be cut is cut (the flipped table
/// cleared, the bridge resumed on the old one, the step tried again) while the writer and
/// the reader run.
#[test]
fn luks1_odd_chunk_smallest_tail_and_spanning_lv() {
    let dir = test_dir("convert-luks1");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
"$LUKSIFY" --dry-run --json --type luks1 /dev/ubda5 > "$OUT/plan.json"
have=$(sed -n 's/.*"tail_have_sectors": \([0-9]*\).*/\1/p' "$OUT/plan.json")
need=$(sed -n 's/.*"tail_need_sectors": \([0-9]*\).*/\1/p' "$OUT/plan.json")
# The room needed is that of the default offset (the planner raises S when there is more).
s=$(sed -n 's/.*"default_shift_sectors": \([0-9]*\).*/\1/p' "$OUT/plan.json")
S=$(( s + have - need ))
echo "tail have=$have need=$need: using data offset $S" | tee "$OUT/offset.txt"
if "$LUKSIFY" --dry-run --type luks1 --offset $((S + 8)) /dev/ubda5 > "$OUT/too-big.txt" 2>&1; then die "an offset 8 sectors too big was accepted"; fi
grep -q too_little_tail "$OUT/too-big.txt" || die "wrong refusal: $(cat "$OUT/too-big.txt")"
dmsetup table vg0-span | tee "$OUT/span-before.txt"
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --type luks1 --offset $S --chunk 3000 --max-stall 0 --progress-json /dev/ubda5 2> "$OUT/progress.jsonl" \
    || die "luksify failed: $(tail -5 "$OUT/progress.jsonl")"
dmsetup table vg0-span | tee "$OUT/span-after.txt"
{STOP_LIVE}
cryptsetup luksDump /dev/ubda5 | tee "$OUT/dump.txt"
{SAME_AS_OPEN}
echo CONVERTED
"#
    ));
    run.assert_ok().assert_log_contains("CONVERTED");
    // Chunks of 3000 sectors: their last comparison reads 2048 sectors, then the rest; the
    // window is cut before the rest, 4 times (MAX_CUTS), then runs to its end.
    let progress = run.file("progress.jsonl");
    let chunks: Vec<&str> = progress.lines().filter(|l| l.contains("\"event\":\"chunk\"")).collect();
    assert!(chunks.len() > 5, "{progress}");
    let cuts = |l: &str| {
        l.split("\"cut_windows\":")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u32>().ok())
    };
    let cut: Vec<Option<u32>> = chunks.iter().map(|l| cuts(l)).collect();
    assert!(cut.iter().all(|c| c.is_some()), "chunk lines without cut_windows: {progress}");
    let full = cut.iter().filter(|c| **c == Some(luksify::engine::MAX_CUTS)).count();
    assert!(full >= chunks.len() - 1, "not every step's windows were cut {} times: {cut:?}", luksify::engine::MAX_CUTS);
    assert_same_as_open(&run, false);
    let dump = run.file("dump.txt");
    assert!(
        dump.contains("Version:       \t1") || dump.contains("Version:        1") || dump.contains("Version:\t1"),
        "{dump}"
    );
    let before = run.file("span-before.txt");
    let after = run.file("span-after.txt");
    // The segment on disk 2 (98:16 + partition) is untouched; the one on ubda5 moved to the bridge.
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    assert_eq!(b.len(), 2, "{before}");
    assert_eq!(b[1], a[1], "the segment on the second PV must not change");
    assert_ne!(b[0], a[0], "the segment on the converted PV must move to the bridge");
    verify_fresh_boot(&d, acked(&d), "ubda5_crypt");
}

/// SIGINT stops at a commit point with the system running on the bridge; `resume` on the
/// live system continues. A kill -9 mid-way leaves the raw partition fenced (blkid sees no
/// PV), and resume on the live system picks up from the journal.
/// LUKS2, the standard format: a conversion stopped by SIGINT at a commit point is a
/// reencryption in progress that `luksify resume` continues online and, stopped again,
/// stock `cryptsetup reencrypt --resume-only --active-name` finishes online while the writer
/// runs. At the pause the bridge's table is exactly what `cryptsetup open` builds for the
/// same header, and `cryptsetup repair` finds nothing to repair.
#[test]
fn luks2_pause_resume_then_stock_cryptsetup_finishes_online() {
    let dir = test_dir("convert-handover");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
pause_at() {{ # run luksify ($@) and stop it with SIGINT after its first step
    : > "$OUT/run.err"
    "$@" --progress-json 2> "$OUT/run.err" &
    P=$!
    while kill -0 $P 2>/dev/null && ! grep -q '"event":"chunk"' "$OUT/run.err"; do sleep 0.01; done
    kill -INT $P
    set +e; wait $P; rc=$?; set -e
    cat "$OUT/run.err"
    [ $rc = 11 ] || die "SIGINT: expected exit 11 (paused), got $rc"
}}
pause_at "$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST /dev/ubda5
grep -q "luksify resume" "$OUT/run.err" || die "no resume hint"
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-paused.txt"
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-paused.txt"
dmsetup table ubda5_crypt > "$OUT/table-paused.txt"
# nothing to repair at a commit point (repair would print what it did and bump the seqid)
cryptsetup repair -q --key-file "$OUT/key" /dev/ubda5 2>&1 | tee "$OUT/repair.txt"
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-after-repair.txt"
# a second luksify while the device is converting is refused
if "$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/second.err"; then die "second conversion accepted"; fi
pause_at "$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5
"$LUKSIFY" status --json /dev/ubda5 | tee "$OUT/status-paused2.json"
# stock cryptsetup takes over, online, while the writer runs
cryptsetup reencrypt --resume-only --active-name ubda5_crypt --key-file "$OUT/key" /dev/ubda5
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-done.txt"
{STOP_LIVE}
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-done.txt"
vgchange -an vg0 >/dev/null
dmsetup remove ubda5_crypt
# the paused table, against what stock cryptsetup opens for the header it paused with
echo HANDED-OVER
"#
    ));
    run.assert_ok().assert_log_contains("HANDED-OVER");
    assert!(run.file("status-paused.txt").contains("reencrypting"));
    let dump = run.file("dump-paused.txt");
    assert!(dump.contains("online-reencrypt-v2") && dump.contains("crypt"), "{dump}");
    let epoch = |t: &str| t.lines().find(|l| l.starts_with("Epoch:")).map(|l| l.to_string());
    assert_eq!(epoch(&dump), epoch(&run.file("dump-after-repair.txt")), "cryptsetup repair changed the header mid-way");
    let table = run.file("table-paused.txt");
    let kinds: Vec<&str> = table.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    assert_eq!(kinds.first(), Some(&"linear"), "the moved segment first: {table}");
    assert_eq!(kinds.last(), Some(&"crypt"), "the encrypted part last: {table}");
    assert!(run.file("status-paused2.json").contains("\"format\": \"luks2-reencrypt\""));
    assert!(!run.file("dump-done.txt").contains("online-reencrypt"), "not finished by cryptsetup");
    assert!(run.file("status-done.txt").contains("no luksify conversion in progress"));
    verify_fresh_boot(&d, acked(&d), "ubda5_crypt");
}

/// LUKS2, luksify's own steps through its switch device (issue 22), killed with SIGKILL
/// mid-way while the writer runs: no way out runs, so the bridge is left going through the
/// private switch device (between steps: stock cryptsetup's online resume refuses that table
/// as mismatching) or suspended (in a step's window). `luksify status` says so, and
/// `luksify resume` gives the bridge the standard table of the metadata's state and finishes
/// online; nothing the writer was told is written is lost, and the fresh boot verifies.
#[test]
fn luks2_killed_during_its_own_steps_then_luksify_resume_finishes_online() {
    let dir = test_dir("convert-kill9-switch");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
: > "$OUT/run.err"
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --progress-json /dev/ubda5 2> "$OUT/run.err" &
P=$!
# luksify's LVM shell (started before the header is made), found now so that the kill below
# comes at once; stopped there as in a suspended window, it must die with luksify all the
# same (it never got a command: the PV must not have grown over the tail)
S=""
while [ -z "$S" ] && kill -0 $P 2>/dev/null; do
    S=$(for q in $(pgrep -x lvm); do [ "$(tr '\0' ' ' < /proc/$q/cmdline 2>/dev/null)" = "lvm " ] && echo "$q"; done || true)
done
while kill -0 $P 2>/dev/null && [ "$(grep -c '"event":"chunk"' "$OUT/run.err")" -lt 3 ]; do sleep 0.003; done
[ -n "$S" ] && kill -STOP $S
kill -9 $P; set +e; wait $P; set -e
for i in $(seq 200); do [ -n "$S" ] && [ -e /proc/$S ] && [ "$(cut -d' ' -f3 /proc/$S/stat 2>/dev/null)" != Z ] || break; sleep 0.01; done
st=$([ -n "$S" ] && cut -d' ' -f3 /proc/$S/stat 2>/dev/null || true); [ "$st" != Z ] || st=
echo "shell:${{S:-none}} left:$st" > "$OUT/shell-killed.txt"
dmsetup table > "$OUT/tables-killed.txt"
dmsetup info -c --noheadings -o attr ubda5_crypt > "$OUT/attr-killed.txt"
dmsetup message ubda5_crypt 0 "@stats_list" > "$OUT/stats-killed.txt"
"$LUKSIFY" status /dev/ubda5 > "$OUT/status-killed.txt"
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/resume.err" || die "resume: $(tail -5 "$OUT/resume.err")"
cat "$OUT/resume.err"
dmsetup ls > "$OUT/ls-after.txt"
dmsetup message ubda5_crypt 0 "@stats_list" > "$OUT/stats-after.txt"
{STOP_LIVE}
{SAME_AS_OPEN}
echo KILLED-RESUMED
"#
    ));
    run.assert_ok().assert_log_contains("KILLED-RESUMED");
    let shell = run.file("shell-killed.txt");
    assert!(shell.starts_with("shell:") && !shell.contains("shell:none"), "no LVM shell while luksify ran: {shell}");
    assert!(shell.trim_end().ends_with("left:"), "the stopped LVM shell outlived the killed luksify: {shell}");
    let tables = run.file("tables-killed.txt");
    assert!(
        tables.contains("ubda5_crypt-luksify-switch: ") && tables.contains(" switch 2 "),
        "no switch device: {tables}"
    );
    let suspended = run.file("attr-killed.txt").contains('s');
    assert!(run.file("status-killed.txt").contains("luksify's switch device"), "{}", run.file("status-killed.txt"));
    let want = if suspended { "was left suspended" } else { "was left going through luksify's switch device" };
    assert!(run.file("resume.err").contains(want), "{want:?} not in: {}", run.file("resume.err"));
    let ls = run.file("ls-after.txt");
    assert!(!ls.contains("luksify"), "private devices left after the resume: {ls}");
    // the killed run's dm-stats regions were on the bridge; the resume deleted them
    let killed = run.file("stats-killed.txt");
    assert!(killed.contains(" luksify "), "no dm-stats region of the killed run: {killed:?}");
    let left = run.file("stats-after.txt");
    assert!(left.trim().is_empty(), "dm-stats regions left after the resume: {left}");
    assert_same_as_open(&run, true);
    verify_fresh_boot(&d, acked(&d), "ubda5_crypt");
}

/// Issue 21, "any cipher the kernel has": with LUKS2 the kernel's dm-crypt encrypts (through
/// libcryptsetup's reencryption), so `--cipher serpent-xts-plain64` converts the live disk and
/// stock cryptsetup opens it. Before that, with the disk idle: a cipher the kernel does not
/// have (for LUKS2 and for `--type luks1`) and a malformed key size are refused, the disk
/// byte for byte unchanged and no device-mapper device left over from the probe.
#[test]
fn luks2_with_another_cipher_the_kernel_maps_and_refusals_change_nothing() {
    let dir = test_dir("convert-cipher");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"printf 'correct horse battery staple' > "$OUT/key"
sha256sum /dev/ubda5 | cut -d' ' -f1 > "$OUT/sha-before.txt"
dmsetup ls > "$OUT/dm-before.txt" 2>&1 || true
refused() {{ # NAME ARGS...: luksify must refuse, nothing changed
    local n=$1; shift
    set +e; "$LUKSIFY" "$@" > "$OUT/$n.out" 2> "$OUT/$n.err"; echo $? > "$OUT/$n.rc"; set -e
    [ "$(cat "$OUT/$n.rc")" != 0 ] || die "$n: accepted"
}}
refused dry-nosuch --dry-run --cipher nosuch-xts-plain64 /dev/ubda5
refused run-nosuch --yes --no-integrate --key-file "$OUT/key" --cipher nosuch-xts-plain64 /dev/ubda5
refused run-badsize --yes --no-integrate --key-file "$OUT/key" --cipher serpent-xts-plain64 --key-size 500 /dev/ubda5
refused run-luks1-nosuch --yes --no-integrate --key-file "$OUT/key" --type luks1 --cipher nosuch-xts-plain64 /dev/ubda5
sha256sum /dev/ubda5 | cut -d' ' -f1 > "$OUT/sha-after.txt"
dmsetup ls > "$OUT/dm-after.txt" 2>&1 || true
{LIVE}
"$LUKSIFY" --dry-run --cipher serpent-xts-plain64 --key-size 512 /dev/ubda5 > "$OUT/dry-serpent.txt"
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --cipher serpent-xts-plain64 --key-size 512 /dev/ubda5
{STOP_LIVE}
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-done.txt"
{SAME_AS_OPEN}
echo CONVERTED
"#
    ));
    run.assert_ok().assert_log_contains("CONVERTED");
    assert_eq!(run.file("sha-before.txt"), run.file("sha-after.txt"), "a refused run changed the disk");
    assert_eq!(run.file("dm-before.txt"), run.file("dm-after.txt"), "the cipher probe left a device behind");
    for n in ["dry-nosuch", "run-nosuch"] {
        let all = run.file(&format!("{n}.out")) + &run.file(&format!("{n}.err"));
        assert!(all.contains("cipher_unavailable") || all.contains("refuses cipher nosuch-xts-plain64"), "{n}: {all}");
    }
    let e = run.file("run-badsize.out") + &run.file("run-badsize.err");
    assert!(e.contains("--key-size 500: a cipher is given as"), "{e}");
    let e = run.file("run-luks1-nosuch.out") + &run.file("run-luks1-nosuch.err");
    assert!(e.contains("refuses cipher nosuch-xts-plain64"), "{e}");
    assert!(
        run.file("dry-serpent.txt").contains("LUKS2 serpent-xts-plain64 512-bit"),
        "{}",
        run.file("dry-serpent.txt")
    );
    let dump = run.file("dump-done.txt");
    assert!(dump.contains("cipher: serpent-xts-plain64") && !dump.contains("online-reencrypt"), "{dump}");
    assert!(dump.contains("sector: 512 [bytes]"), "the encryption sector must stay 512 bytes: {dump}");
    assert_same_as_open(&run, true);
    verify_fresh_boot(&d, acked(&d), "ubda5_crypt");
}

/// LUKS1 with a cipher luksify has no userspace implementation of (serpent-xts-plain64,
/// 256-bit key): every step is written and read back through the kernel's staging crypt
/// device. Live writer and reader; paused by SIGINT mid-way and resumed live (the resume
/// takes the same path); then the finished mapping is what `cryptsetup open` makes, the
/// header is stock LUKS1 with that cipher, and a fresh boot verifies every file and record.
#[test]
fn luks1_with_a_cipher_only_the_kernel_has_encrypts_through_dm_crypt() {
    let dir = test_dir("convert-luks1-cipher");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
C="--type luks1 --cipher serpent-xts-plain64 --key-size 256"
"$LUKSIFY" --dry-run $C /dev/ubda5 > "$OUT/dry.txt"
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST $C --chunk 4096 /dev/ubda5 2> "$OUT/run1.err" &
P=$!
while ! "$LUKSIFY" status --json /dev/ubda5 2>/dev/null | grep '"state": "migrating"' >/dev/null; do sleep 0.1; done
sleep 1
kill -INT $P
set +e; wait $P; rc=$?; set -e
cat "$OUT/run1.err"
[ $rc = 11 ] || die "SIGINT: expected exit 11 (paused), got $rc"
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-paused.txt"
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/resume.err" || {{ cat "$OUT/resume.err"; die "resume failed"; }}
{STOP_LIVE}
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-done.txt"
{SAME_AS_OPEN}
echo CONVERTED
"#
    ));
    run.assert_ok().assert_log_contains("CONVERTED");
    assert!(run.file("dry.txt").contains("LUKS1 serpent-xts-plain64 256-bit"), "{}", run.file("dry.txt"));
    assert!(run.file("status-paused.txt").contains("migrating"), "{}", run.file("status-paused.txt"));
    // cryptsetup's LUKS1 dump, its padding of spaces and tabs made one space
    let dump = run.file("dump-done.txt");
    let lines: Vec<String> = dump.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    for want in ["Version: 1", "Cipher name: serpent", "Cipher mode: xts-plain64", "MK bits: 256"] {
        assert!(lines.iter().any(|l| l == want), "no '{want}' in the LUKS1 dump:\n{dump}");
    }
    assert_same_as_open(&run, false);
    verify_fresh_boot(&d, acked(&d), "ubda5_crypt");
}

/// LUKS1 (luksify's own journal): pause by SIGINT, `luksify resume` killed with SIGKILL
/// mid-way, `luksify resume` again, live.
#[test]
fn luks1_pause_and_kill_then_live_resume() {
    let dir = test_dir("convert-pause");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --type luks1 --chunk 4096 /dev/ubda5 2> "$OUT/run1.err" &
P=$!
while ! "$LUKSIFY" status --json /dev/ubda5 2>/dev/null | grep '"state": "migrating"' >/dev/null; do sleep 0.1; done
sleep 1
kill -INT $P
set +e; wait $P; rc=$?; set -e
echo "first run exit $rc"; cat "$OUT/run1.err"
[ $rc = 11 ] || die "SIGINT: expected exit 11 (paused), got $rc"
grep -q "luksify resume" "$OUT/run1.err" || die "no resume hint"
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-paused.txt"
grep -q migrating "$OUT/status-paused.txt" || die "status after pause"
# a second luksify while the device is converting is refused
if "$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/second.err"; then die "second conversion accepted"; fi
grep -q "resume" "$OUT/second.err" || die "second conversion: $(cat "$OUT/second.err")"
# resume, then kill -9 it mid-way
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/run2.err" &
P=$!
sleep 1.5
kill -9 $P; wait $P || true
blkid -p /dev/ubda5 > "$OUT/blkid-killed.txt" 2>&1 || true
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-killed.txt"
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5
{STOP_LIVE}
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-done.txt"
dmsetup remove ubda5_crypt
echo RESUMED
"#
    ));
    run.assert_ok().assert_log_contains("RESUMED");
    let b = run.file("blkid-killed.txt");
    assert!(!b.contains("LVM2_member"), "after kill -9 the raw partition shows a PV: {b}");
    assert!(run.file("status-killed.txt").contains("in progress"));
    assert!(run.file("status-done.txt").contains("no luksify conversion in progress"));
    verify_fresh_boot(&d, acked(&d), "ubda5_crypt");
    let _ = Duration::from_secs(0);
}
