//! The planner and every refusal on a real kernel (User-Mode Linux): the dry-run reads only
//! (device hashes identical, no dm device created), and bad input leaves the device byte
//! for byte as it was. These never skip: without UML they fail with the install command.
mod support;

use support::*;

/// Guest helpers: `snap` records the device hashes and the dm device list; `same` checks
/// that nothing changed since; `refused CODE ARGS…` runs a dry-run that must refuse with CODE.
const HELPERS: &str = r#"
# O_DIRECT: the whole disk's page cache does not see writes made through a partition or dm.
dh() { dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1; }
snap() { dh /dev/ubda > /tmp/h1; dh /dev/ubdb > /tmp/h2; dmsetup ls | sort > /tmp/dm; }
same() {
    [ "$(dh /dev/ubda)" = "$(cat /tmp/h1)" ] || die "$1: disk 1 changed"
    [ "$(dh /dev/ubdb)" = "$(cat /tmp/h2)" ] || die "$1: disk 2 changed"
    dmsetup ls | sort | cmp -s - /tmp/dm || die "$1: dm devices changed: $(dmsetup ls)"
    echo "unchanged: $1"
}
refused() {
    local code=$1; shift
    snap
    set +e; "$LUKSIFY" --dry-run "$@" > /tmp/out 2> /tmp/err; local rc=$?; set -e
    cat /tmp/out /tmp/err
    [ $rc = 10 ] || die "dry-run $*: exit $rc, expected 10 (refused)"
    grep -q "\[$code\]" /tmp/out || die "dry-run $*: no [$code] in the plan"
    grep -q "^luksify: refused: " /tmp/err || die "dry-run $*: no refusal line on stderr"
    "$LUKSIFY" --dry-run --json "$@" > "$OUT/$code.json" 2>/dev/null || true
    same "dry-run $code"
    echo "REFUSED-OK $code"
}
MK() { bash "$UML_LIB/mkdisk.sh" --disk1 /dev/ubda --disk2 /dev/ubdb --quick "$@" > "$OUT/mkdisk.log" 2>&1 || { tail -20 "$OUT/mkdisk.log"; die "mkdisk $*"; }; }
"#;

#[test]
fn dry_run_reads_only_and_every_refusal_is_clear() {
    let dir = test_dir("dryrun");
    let (d1, d2) = laptop_disks(&dir);
    let run = uml().disk(&d1).disk(&d2).out_dir(dir.join("out")).timeout(400).run_script(&format!(
        r#"{HELPERS}
# The realistic disk, as a running system has it (read-only mounts keep it quiet).
MK
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/r /mnt/h; mount -o ro /dev/vg0/root /mnt/r; mount -o ro,norecovery /dev/vg0/home /mnt/h
snap
"$LUKSIFY" --dry-run /dev/ubda5 | tee "$OUT/plan.txt"
"$LUKSIFY" --dry-run --json /dev/ubda5 > "$OUT/plan.json"
"$LUKSIFY" --dry-run --json --type luks1 /dev/ubda5 > "$OUT/plan-luks1.json"
same "dry-run realistic"
# the time estimate comes from a short O_DIRECT read of the device, and says so
grep -q "estimated time: .*; an estimate from an O_DIRECT read of [1-9][0-9]* MiB at [0-9]* MiB/s" "$OUT/plan.txt" \
    || die "the estimate is not from a measured read: $(grep 'estimated time' "$OUT/plan.txt")"

umount /mnt/r /mnt/h; vgchange -an vg0 >/dev/null

# Not found, not a block device: cryptsetup's "wrong device specified", exit 4, for every
# command.
set +e; "$LUKSIFY" --dry-run /dev/nonexistent 2> "$OUT/nf.err"; rc=$?; set -e
[ $rc = 4 ] && grep -qi "not found\|no such" "$OUT/nf.err" || die "not found: rc $rc $(cat "$OUT/nf.err")"
set +e; "$LUKSIFY" --dry-run /etc/hostname 2> "$OUT/nb.err"; rc=$?; set -e
[ $rc = 4 ] && grep -q "not a block device" "$OUT/nb.err" || die "not a block device: rc $rc $(cat "$OUT/nb.err")"
for c in status resume; do
    set +e; "$LUKSIFY" $c /dev/nonexistent < /dev/null 2> "$OUT/nf-$c.err"; rc=$?; set -e
    [ $rc = 4 ] && grep -q "/dev/nonexistent" "$OUT/nf-$c.err" || die "$c on a missing device: rc $rc $(cat "$OUT/nf-$c.err")"
done
set +e; "$LUKSIFY" --yes --no-integrate /dev/nonexistent < /dev/null 2> "$OUT/nf-convert.err"; rc=$?; set -e
[ $rc = 4 ] || die "convert on a missing device: rc $rc $(cat "$OUT/nf-convert.err")"

# Free extents at the end but too little room: pvresize advice.
MK --variant notail
refused too_little_tail /dev/ubda5
grep -q "pvresize --yes --setphysicalvolumesize" /tmp/out || die "no pvresize advice"
# Last extents allocated: which LV, and how to move it.
MK --variant lastused --tail-mib 1
refused too_little_tail /dev/ubda5
grep -q "filler" /tmp/out || die "the advice does not name the LV at the end"
# A snapshot on the PV (active): not linear/striped.
MK --variant snapshot
vgchange -ay vg0 >/dev/null
refused unsupported_lv /dev/ubda5
vgchange -an vg0 >/dev/null
# A plain filesystem mounted directly on the partition.
MK --variant plainfs
mkdir -p /mnt/p; mount -o ro /dev/ubda5 /mnt/p
refused mounted_directly /dev/ubda5
grep -q "offline" /tmp/out || die "no offline hint"
umount /mnt/p
# Already LUKS.
MK --variant luks
refused already_luks /dev/ubda5
# Nothing on it.
MK --variant blank
refused not_lvm /dev/ubda5
# The PV's partition also carries a partition table (stale, in its unused first sector):
# luksify's own reading sees the LVM label, but libblkid (udev's, LVM's view) a partitioned
# device. Refused, naming what libblkid sees.
MK
echo 'start=2048, size=4096, type=83' | sfdisk -q --wipe never --no-reread --no-tell-kernel /dev/ubda5 >/dev/null
refused not_lvm /dev/ubda5
grep -q "an LVM label and a dos partition table" /tmp/out || die "libblkid's partition table not named"
echo "LIBBLKID-OK"
echo DRYRUN-DONE
"#
    ));
    run.assert_ok().assert_log_contains("DRYRUN-DONE").assert_log_contains("LIBBLKID-OK");
    for code in ["too_little_tail", "unsupported_lv", "mounted_directly", "already_luks", "not_lvm"] {
        assert!(run.log.contains(&format!("REFUSED-OK {code}")), "{code} not tested");
    }
    // The JSON schema (README.md, "Dry-run JSON") on the realistic disk.
    let j: serde_json::Value = serde_json::from_str(&run.file("plan.json")).expect("plan.json parses");
    assert_eq!(j["schema"], 1);
    assert_eq!(j["device"], "/dev/ubda5");
    assert_eq!(j["name"], "ubda5_crypt");
    assert_eq!(j["luks"], "luks2");
    assert_eq!(j["shift_sectors"], 32768);
    assert!(j["refusals"].as_array().unwrap().is_empty(), "{j}");
    let l = j["move_sectors"].as_u64().unwrap();
    assert_eq!(j["move_bytes"].as_u64().unwrap(), l * 512);
    assert!(j["tail_have_sectors"].as_u64().unwrap() >= j["tail_need_sectors"].as_u64().unwrap());
    // the estimate's rate is the measured read's, divided by the I/O a moved byte costs
    let r = &j["estimate_from_read"];
    assert!(r["read_mib"].as_u64().is_some_and(|m| m >= 1) && r["read_mib_per_s"].as_u64().is_some(), "{j}");
    assert_eq!(r["io_per_byte"], 2, "{j}");
    let rate = j["estimate_assumes_mib_per_s"].as_u64().unwrap();
    let half = (r["read_mib_per_s"].as_u64().unwrap() as f64 / 2.0).max(1.0);
    assert!((rate as f64 - half).abs() <= 1.0, "rate {rate}, half the read {half}: {j}");
    eprintln!("estimate: {}", run.file("plan.txt").lines().find(|l| l.contains("estimated time")).unwrap_or_default());
    // LUKS2 keeps cryptsetup's own format mid-way: no luksify journal; LUKS1 keeps one.
    assert!(j["steps"].as_u64().unwrap() >= 1 && j["journal_sector"].is_null(), "{j}");
    assert_eq!(j["midway_format"]["kind"], "luks2-reencrypt", "{j}");
    let reroute: Vec<String> =
        j["reroute"].as_array().unwrap().iter().map(|r| r["dm_name"].as_str().unwrap().to_string()).collect();
    for lv in ["vg0-root", "vg0-home", "vg0-raw", "vg0-split", "vg0-span"] {
        assert!(reroute.contains(&lv.to_string()), "{lv} missing from {reroute:?}");
    }
    let root = j["reroute"].as_array().unwrap().iter().find(|r| r["dm_name"] == "vg0-root").unwrap();
    assert_eq!(root["mounts"][0], "/mnt/r");
    let j1: serde_json::Value = serde_json::from_str(&run.file("plan-luks1.json")).unwrap();
    // LUKS1's default offset is 2 MiB; the realistic disk's tail (23 MiB) has room for a
    // larger one, so the planner raises it to that of the largest step (8 MiB) to take 4x
    // fewer steps, and says so.
    assert_eq!(j1["default_shift_sectors"], 4096);
    assert!(j1["journal_sector"].as_u64().is_some(), "{j1}");
    assert_eq!(j1["midway_format"]["kind"], "luksify-journal", "{j1}");
    assert_eq!((j1["shift_sectors"].as_u64(), j1["chunk_sectors"].as_u64()), (Some(16384), Some(16384)));
    assert!(j1["notes"][0].as_str().unwrap().contains("data offset raised"), "{j1}");
    assert_eq!(j["default_shift_sectors"], 32768);
    assert!(j["notes"].as_array().unwrap().is_empty(), "{j}");
    assert_eq!(j["boot"]["root_dir"], "/");
    assert_eq!(j["boot"]["root_on_pv"], false, "the guest's / is not on the test disk");
    let t: serde_json::Value = serde_json::from_str(&run.file("too_little_tail.json")).unwrap();
    assert_eq!(t["refusals"][0]["code"], "too_little_tail");
    eprintln!("{}", run.file("plan.txt"));
}

/// The boot checks refuse before any change, against scratch roots in the guest's tmpfs
/// (never the host's /etc) whose fstab puts / on vg0-root, an LV of the PV being converted:
/// no cryptsetup-initramfs (dry-run and convert: exit 10, disks and dm devices unchanged), no
/// known initramfs generator (and `--force-unknown-boot`), /boot on the PV without a GRUB
/// that can open it; a passphrase file ending in a line end for such a root (exit 2, crypttab
/// and initramfs untouched).
#[test]
fn boot_checks_refuse_before_any_change() {
    let dir = test_dir("bootchecks");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(400).run_script(&format!(
        r#"{HELPERS}{FAKE_ROOT_SH}
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/r; mount -o ro /dev/vg0/root /mnt/r
fake_root /tmp/nocrypt --no-cryptroot
refused initramfs_cannot_unlock --root /tmp/nocrypt /dev/ubda5
grep -q "apt-get install cryptsetup-initramfs" /tmp/out || die "the refusal does not name the package"
# The conversion itself refuses the same way: exit 10, before any change.
printf 'good passphrase' > "$OUT/key"
snap
set +e; "$LUKSIFY" --yes --key-file "$OUT/key" --root /tmp/nocrypt /dev/ubda5 < /dev/null > /tmp/out 2> /tmp/err; rc=$?; set -e
cat /tmp/err
[ $rc = 10 ] || die "convert with root on the PV and no cryptsetup-initramfs: exit $rc, expected 10 (refused)"
[ "$(wc -l < /tmp/err)" = 1 ] && grep -q "cryptsetup-initramfs" /tmp/err || die "convert refusal: not one clear line"
same "convert initramfs_cannot_unlock"
echo "REFUSED-OK convert initramfs_cannot_unlock"
# A passphrase file that ends in a line end, for a root the boot prompt must unlock: nobody
# could type it there. Usage error (exit 2), one line naming the fix, nothing changed.
fake_root /tmp/okroot
"$LUKSIFY" --dry-run --root /tmp/okroot /dev/ubda5 > /tmp/out || die "a root ready to boot is refused: $(cat /tmp/out)"
printf 'good passphrase\n' > "$OUT/key-nl"
cp /tmp/okroot/etc/crypttab /tmp/crypttab.before
snap
set +e; "$LUKSIFY" --yes --key-file "$OUT/key-nl" --root /tmp/okroot /dev/ubda5 < /dev/null > /tmp/out 2> /tmp/err; rc=$?; set -e
cat /tmp/err
[ $rc = 2 ] || die "a key file ending in a line end for the root: exit $rc, expected 2"
[ "$(wc -l < /tmp/err)" = 1 ] && grep -q "ends in a line end" /tmp/err && grep -q "printf '%s'" /tmp/err || die "newline refusal: not one clear line"
[ -e /tmp/okroot/update-initramfs.log ] && die "the initramfs was regenerated for a refused conversion"
cmp -s /tmp/okroot/etc/crypttab /tmp/crypttab.before || die "crypttab changed: $(cat /tmp/okroot/etc/crypttab)"
same "convert newline_passphrase"
echo "REFUSED-OK convert newline_passphrase"
fake_root /tmp/unknown --no-generator
refused unknown_initramfs --root /tmp/unknown /dev/ubda5
grep -q -- "--force-unknown-boot" /tmp/out || die "no --force-unknown-boot hint"
"$LUKSIFY" --dry-run --force-unknown-boot --root /tmp/unknown /dev/ubda5 > /tmp/out || die "--force-unknown-boot still refuses: $(cat /tmp/out)"
grep -q "warning \[unknown_initramfs\]" /tmp/out || die "no unknown_initramfs warning"
fake_root /tmp/bootonroot --boot-on-root
refused grub_cannot_open --root /tmp/bootonroot /dev/ubda5
grep -q "\[grub_cryptodisk_disabled\]" /tmp/out || die "no grub_cryptodisk_disabled"
refused grub_cryptodisk_disabled --type luks1 --root /tmp/bootonroot /dev/ubda5
grep -q "\[grub_cannot_open\]" /tmp/out && die "LUKS1 is openable by GRUB"
mkdir -p /tmp/bootonroot/etc/default; echo 'GRUB_ENABLE_CRYPTODISK=y' > /tmp/bootonroot/etc/default/grub
"$LUKSIFY" --dry-run --pbkdf pbkdf2 --root /tmp/bootonroot /dev/ubda5 > /tmp/out || die "GRUB-ready root refused: $(cat /tmp/out)"
"$LUKSIFY" --dry-run --json --root /tmp/nocrypt /dev/ubda5 > "$OUT/boot-nocrypt.json" || true
umount /mnt/r; vgchange -an vg0 >/dev/null
echo BOOTCHECKS-DONE
"#
    ));
    run.assert_ok().assert_log_contains("BOOTCHECKS-DONE");
    for code in [
        "initramfs_cannot_unlock",
        "convert initramfs_cannot_unlock",
        "convert newline_passphrase",
        "unknown_initramfs",
        "grub_cannot_open",
        "grub_cryptodisk_disabled",
    ] {
        assert!(run.log.contains(&format!("REFUSED-OK {code}")), "{code} not tested");
    }
    let b: serde_json::Value = serde_json::from_str(&run.file("boot-nocrypt.json")).unwrap();
    assert_eq!(b["boot"]["root_on_pv"], true, "{b}");
    assert_eq!(b["boot"]["initramfs_can_unlock"], false, "{b}");
    assert_eq!(b["boot"]["refusals"][0], "initramfs_cannot_unlock", "{b}");
    assert_eq!(b["refusals"][0]["code"], "initramfs_cannot_unlock", "{b}");
}

/// Bad input changes nothing: an empty, missing or unreadable key file; no --yes without a
/// terminal; an injected failure while rerouting the LV tables (every table back, no bridge
/// left, the tail restored); a wrong passphrase on resume. A second luksify while one runs
/// is refused by the lock. A passphrase piped without --key-file is its first line, without
/// the line end (the resume takes it; stock cryptsetup opens the result with it).
#[test]
fn bad_input_leaves_the_device_unchanged() {
    let dir = test_dir("badinput");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(400).run_script(&format!(
        r#"{HELPERS}
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/r; mount -o ro /dev/vg0/root /mnt/r
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
printf 'good passphrase' > "$OUT/key"; : > /tmp/empty
fails() {{
    local what=$1 want=$2; shift 2
    snap
    dmsetup table > /tmp/tables
    set +e; "$LUKSIFY" "$@" < /dev/null > /tmp/out 2> /tmp/err; local rc=$?; set -e
    cat /tmp/err
    [ $rc -ne 0 ] || die "$what: accepted"
    [ "$(wc -l < /tmp/err)" -ge 1 ] || die "$what: no message"
    grep -q -- "$want" /tmp/err || die "$what: message lacks '$want'"
    dmsetup table | cmp -s - /tmp/tables || die "$what: dm tables changed"
    same "$what"
}}
fails "empty key file" "empty" --yes --no-integrate --key-file /tmp/empty /dev/ubda5
fails "missing key file" "cannot read the key file" --yes --no-integrate --key-file /tmp/nope /dev/ubda5
fails "key file is a directory" "cannot read the key file" --yes --no-integrate --key-file /tmp /dev/ubda5
fails "no --yes without a terminal" "--yes" --no-integrate --key-file "$OUT/key" $FAST /dev/ubda5
fails "--root not a directory" "not a directory" --yes --root /nonexistent --key-file "$OUT/key" $FAST /dev/ubda5
LUKSIFY_TEST_FAIL_LOAD=vg0-split fails "reroute failure" "nothing was changed" --yes --no-integrate --key-file "$OUT/key" $FAST /dev/ubda5
dmsetup ls | grep -q ubda5_crypt && die "a bridge was left behind"
"$LUKSIFY" status /dev/ubda5 | grep "no luksify conversion" >/dev/null || die "a journal was left behind"

# A second luksify while one runs: refused by the lock (busy: exit 5). `status` meanwhile
# says a luksify runs, which process, its rate and the time left (--rate keeps it running).
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --type luks1 --chunk 2048 --rate 16 /dev/ubda5 2> "$OUT/first.err" &
P=$!
echo $P > "$OUT/first.pid"
while ! "$LUKSIFY" status --json /dev/ubda5 2>/dev/null | grep '"state": "migrating"' >/dev/null; do sleep 0.1; done
n=0
until "$LUKSIFY" status /dev/ubda5 > "$OUT/running-status.txt" 2>&1 && grep -q "running:  yes, luksify process $P, .*/s, about .* left" "$OUT/running-status.txt"; do
    n=$((n + 1)); [ $n -lt 100 ] || die "status never showed the running luksify's rate: $(cat "$OUT/running-status.txt")"; sleep 0.1
done
cat "$OUT/running-status.txt"
"$LUKSIFY" status --json /dev/ubda5 > "$OUT/running-status.json"
ls /run/luksify/ubda5.progress.json
[ "$(stat -c %a /run/luksify)" = 700 ] || die "/run/luksify is not private: $(stat -c %a /run/luksify)"
set +e; "$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/second.err"; rc=$?; set -e
cat "$OUT/second.err"
[ $rc = 5 ] && grep -q "another luksify is running" "$OUT/second.err" || die "second luksify: rc $rc, expected 5 (busy)"
set +e; "$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 2> "$OUT/third.err"; rc=$?; set -e
[ $rc = 5 ] && grep -q "another luksify is running" "$OUT/third.err" || die "concurrent resume: rc $rc, expected 5 (busy)"
kill -INT $P; set +e; wait $P; rc=$?; set -e
[ $rc = 11 ] || die "pause: exit $rc, expected 11 (paused)"
[ ! -e /run/luksify/ubda5.progress.json ] || die "the progress file outlived its luksify"
"$LUKSIFY" status /dev/ubda5 > "$OUT/stopped-status.txt"
"$LUKSIFY" status --json /dev/ubda5 > "$OUT/stopped-status.json"
# A progress file of a live process that does not hold the device lock is not a running luksify.
printf '{{"pid":%d,"moved_bytes":1048576,"total_bytes":2097152,"rate_bytes_per_s":1000000.0,"epoch_ms":0}}' $$ > /run/luksify/ubda5.progress.json
"$LUKSIFY" status /dev/ubda5 > "$OUT/stale-status.txt"
rm /run/luksify/ubda5.progress.json
# A wrong passphrase on resume changes nothing (cryptsetup's "no permission": exit 2).
printf 'wrong' > /tmp/wrong
fails "wrong passphrase on resume" "passphrase" resume --yes --no-integrate --key-file /tmp/wrong /dev/ubda5
set +e; "$LUKSIFY" resume --yes --no-integrate --key-file /tmp/wrong /dev/ubda5 2> /dev/null; rc=$?; set -e
[ $rc = 2 ] || die "wrong passphrase on resume: exit $rc, expected 2"
# Piped standard input without --key-file: one line, its line end not part of the
# passphrase (as cryptsetup reads it). "good passphrase\n" as a whole would be refused above.
printf 'good passphrase\n' | "$LUKSIFY" resume --yes --no-integrate /dev/ubda5 || die "resume with the passphrase piped as one line"
umount /mnt/r; vgchange -an vg0 >/dev/null; dmsetup remove ubda5_crypt
# stock cryptsetup opens the result with the passphrase without a line end
cryptsetup open --test-passphrase --key-file "$OUT/key" /dev/ubda5 || die "cryptsetup does not take the passphrase"
echo "PIPED-OK"
echo BADINPUT-DONE
"#
    ));
    run.assert_ok().assert_log_contains("BADINPUT-DONE").assert_log_contains("PIPED-OK");
    for what in [
        "empty key file",
        "missing key file",
        "reroute failure",
        "--root not a directory",
        "wrong passphrase on resume",
        "no --yes without a terminal",
    ] {
        assert!(run.log.contains(&format!("unchanged: {what}")), "{what} not checked");
    }
    // status while the conversion ran: running, its pid, a rate, the time left; sizes in MiB
    let pid: u64 = run.file("first.pid").trim().parse().unwrap();
    let text = run.file("running-status.txt");
    eprintln!("status while a luksify runs:\n{text}");
    assert!(text.contains(&format!("running:  yes, luksify process {pid}, ")), "{text}");
    assert!(text.contains(" MiB encrypted)"), "sizes a person reads: {text}");
    assert!(!text.contains("continue: luksify resume"), "no resume hint while it runs: {text}");
    let j: serde_json::Value = serde_json::from_str(&run.file("running-status.json")).unwrap();
    assert_eq!((j["running"].as_bool(), j["pid"].as_u64()), (Some(true), Some(pid)), "{j}");
    let rate = j["rate_bytes_per_s"].as_f64().unwrap_or_else(|| panic!("no rate: {j}"));
    // --rate 16 (MB/s) caps it; anything far above says the rate is not the copy's
    assert!(rate > 0.0 && rate < 24e6, "rate {rate}: {j}");
    assert!(j["eta_s"].as_f64().is_some_and(|e| e > 0.0), "{j}");
    assert!(j["total_bytes"].as_u64().is_some_and(|t| t > 200 << 20), "{j}");
    // after the pause: not running, and how to go on
    let text = run.file("stopped-status.txt");
    assert!(text.contains("running:  not running: `luksify resume /dev/ubda5` continues"), "{text}");
    assert!(text.contains("continue: luksify resume /dev/ubda5"), "{text}");
    let j: serde_json::Value = serde_json::from_str(&run.file("stopped-status.json")).unwrap();
    assert_eq!(
        (j["running"].as_bool(), j["pid"].is_null(), j["rate_bytes_per_s"].is_null()),
        (Some(false), true, true),
        "{j}"
    );
    // a progress file whose process does not hold the device lock: not running, no rate
    let text = run.file("stale-status.txt");
    assert!(text.contains("running:  not running: `luksify resume /dev/ubda5` continues"), "{text}");
}
