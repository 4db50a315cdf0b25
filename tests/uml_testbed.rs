//! The UML test bed tests itself: every piece works, and every check can fail.
//! These boot User-Mode Linux (apt-get install user-mode-linux ...); they never skip.
mod support;

use std::time::{Duration, SystemTime};
use support::*;

#[test]
fn boot_sees_dm_targets_and_ubd_partitions_and_rc_propagates() {
    let dir = test_dir("boot");
    let d1 = sparse_image(&dir, "d1.img", 64);
    let run = uml().disk(&d1).out_dir(dir.join("out")).timeout(60).run_script(
        r#"
dmsetup targets | tee "$OUT/targets"
for t in linear mirror crypt flakey; do dmsetup targets | grep -w "^$t" >/dev/null || die "no dm target $t"; done
# partitions appear as ubda1, ubda5 (logical) on devtmpfs
printf 'label: dos\n,16M,83\n,,5\n,8M,8e\n' | sfdisk -q /dev/ubda
wait_dev /dev/ubda1; wait_dev /dev/ubda5
cat /proc/partitions
[ -c /dev/mapper/control ] || die "no /dev/mapper/control"
test -x "$LUKSIFY" || die "LUKSIFY=$LUKSIFY not executable"
test -x "$LKTEST" || die "LKTEST=$LKTEST not executable"
echo "env: OUT=$OUT LUKSIFY=$LUKSIFY LKTEST=$LKTEST QEMU_DIR=$QEMU_DIR LVM_SYSTEM_DIR=$LVM_SYSTEM_DIR"
lvmconfig --validate
echo BOOT-OK
"#,
    );
    run.assert_ok().assert_log_contains("BOOT-OK").assert_log_contains("ubda5");
    let targets = run.file("targets");
    for t in ["mirror", "crypt", "flakey"] {
        assert!(targets.lines().any(|l| l.starts_with(t)), "no {t} in {targets}");
    }
    eprintln!("boot+modules run took {:.1}s", run.elapsed.as_secs_f64());

    // and a failing scenario's status comes back as it is
    let fail = uml().out_dir(dir.join("out2")).timeout(60).run_script("echo about to fail; exit 7");
    fail.assert_rc(7).assert_log_contains("about to fail");
    // set -e in the scenario: a failing command fails the run
    let fail = uml().out_dir(dir.join("out3")).timeout(60).run_script("false\necho NOT-REACHED");
    assert_eq!(fail.rc, 1, "{}", fail.log);
    assert!(!fail.log.contains("NOT-REACHED"));
}

#[test]
fn runner_timeout_kills_the_guest() {
    let dir = test_dir("timeout");
    let run = uml().out_dir(dir.join("out")).timeout(8).run_script("sleep 600");
    assert_eq!(run.rc, 124, "{}", run.runner_output);
    assert!(run.runner_output.contains("TIMEOUT"), "{}", run.runner_output);
    assert!(run.elapsed < Duration::from_secs(30));
}

#[test]
fn disk_builder_makes_the_laptop_layout_and_plain_verify_passes() {
    let g = golden();
    eprintln!("mkdisk (boot + build) took {:.1}s", g.build_secs);
    let env = std::fs::read_to_string(g.state.join("disk.env")).unwrap();
    assert!(env.contains("PV_DEV=/dev/ubda5"), "{env}");
    let lvs = std::fs::read_to_string(g.state.join("lvs.txt")).unwrap();
    // split: two segments on the PV with a hole; span: on both PVs
    assert_eq!(lvs.lines().filter(|l| l.trim_start().starts_with("split")).count(), 2, "{lvs}");
    assert!(lvs.contains("/dev/ubdb1"), "{lvs}");
    for m in ["manifest.root", "manifest.home", "lvhash.txt", "boot.sha256"] {
        assert!(g.state.join(m).exists(), "{m} missing");
    }
    let files = std::fs::read_to_string(g.state.join("manifest.root")).unwrap().lines().count();
    assert!(files > 200, "root holds only {files} files");

    // second boot: vg0 is there with all its LVs, and the plain verifier passes
    let dir = test_dir("builder");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).run_script(
        r#"
pvs; vgs; lvs -a -o lv_name,lv_size,seg_pe_ranges vg0
for lv in root home split raw span; do lvs vg0/$lv >/dev/null || die "no LV $lv"; done
[ "$(pvs --noheadings -o pv_name | wc -l)" = 2 ] || die "expected 2 PVs"
# room past the PV's end inside ubda5
dev=$(blockdev --getsz /dev/ubda5)
pv=$(pvs --noheadings --units s --nosuffix -o dev_size,pv_size /dev/ubda5 | awk '{print $2}')
echo "ubda5 $dev sectors, PV $pv sectors"
[ $((dev - pv)) -ge $((20 * 2048)) ] || die "no 20 MiB tail"
bash "$UML_LIB/verify.sh" --plain
"#,
    );
    run.assert_ok().assert_log_contains("VERIFY OK (plain)");
    eprintln!("verify boot took {:.1}s", run.elapsed.as_secs_f64());
}

#[test]
fn verifier_catches_a_missing_record_and_a_plain_disk_posing_as_luks() {
    let dir = test_dir("verifier-records");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).run_script(
        r#"
vgchange -ay vg0; mknodes
mkdir -p /mnt/r; mount /dev/vg0/root /mnt/r
"$LKTEST" writer --file /mnt/r/records.dat --acked "$OUT/acked" --count 20
umount /mnt/r; vgchange -an vg0
# all good first
bash "$UML_LIB/verify.sh" --plain --min-acked 20

# (1) an acked number that is not in the file
echo 25 >> "$OUT/acked"
if bash "$UML_LIB/verify.sh" --plain 2>"$OUT/v1.err"; then die "verify passed with a missing record"; fi
cat "$OUT/v1.err"
grep -q "VERIFY FAILED: acked records" "$OUT/v1.err" || die "wrong failure for a missing record"
grep -q "record #25: missing" "$OUT/v1.err" || die "the missing record is not named"
sed -i '$d' "$OUT/acked"

# a plain disk is not LUKS: the LUKS verifier refuses it
printf 'some key' > /tmp/key
if bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file /tmp/key 2>"$OUT/plain.err"; then die "plain disk passed as LUKS"; fi
grep -q "VERIFY FAILED: isLuks" "$OUT/plain.err" || { cat "$OUT/plain.err"; die "wrong failure"; }
echo CAUGHT-MISSING
"#,
    );
    run.assert_ok().assert_log_contains("CAUGHT-MISSING");
    eprintln!("verifier (records) test boot took {:.1}s", run.elapsed.as_secs_f64());
}

#[test]
fn verifier_and_reader_catch_a_flipped_byte() {
    let dir = test_dir("verifier-bytes");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).run_script(
        r#"
# (2) one byte flipped on the device under a static file of root
vgchange -ay vg0; mknodes
# the continuous reader first passes (O_DIRECT reads), then catches it
mkdir -p /mnt/r; mount -o ro /dev/vg0/root /mnt/r
"$LKTEST" reader --root /mnt/r --manifest "$OUT/manifest.root" --until /tmp/never --passes 2 --status "$OUT/reader.status"
grep -q "failures 0" "$OUT/reader.status" || die "reader status: $(cat "$OUT/reader.status")"
umount /mnt/r
bs=$(dumpe2fs -h /dev/vg0/root 2>/dev/null | awk '/^Block size:/ {print $3}')
blk=$(debugfs -R "bmap /srv/random/r65536 3" /dev/vg0/root 2>/dev/null)
echo "flipping a byte in block $blk (block size $bs)"
off=$((blk * bs + 100))
old=$(dd if=/dev/vg0/root bs=1 skip=$off count=1 status=none | od -An -tu1 | tr -d ' ')
printf "\\$(printf %o $(( (old ^ 1) & 255 )))" | dd of=/dev/vg0/root bs=1 seek=$off count=1 conv=notrunc,fsync status=none
mkdir -p /mnt/r; mount -o ro /dev/vg0/root /mnt/r
if "$LKTEST" reader --root /mnt/r --manifest "$OUT/manifest.root" --until /tmp/never --passes 1 --status "$OUT/reader.status" 2>"$OUT/reader.err"; then
    die "reader passed with a flipped byte"
fi
cat "$OUT/reader.err"; grep -q "r65536: sha256" "$OUT/reader.err" || die "reader did not name the file"
umount /mnt/r
vgchange -an vg0
if bash "$UML_LIB/verify.sh" --plain 2>"$OUT/v2.err"; then die "verify passed with a flipped byte"; fi
cat "$OUT/v2.err"
grep -q "VERIFY FAILED: root files" "$OUT/v2.err" || die "wrong failure for a flipped byte"
grep -q "srv/random/r65536: sha256" "$OUT/v2.err" || die "the corrupt file is not named"
# put the byte back: verify passes again
vgchange -ay vg0; mknodes
printf "\\$(printf %o "$old")" | dd of=/dev/vg0/root bs=1 seek=$off count=1 conv=notrunc,fsync status=none
vgchange -an vg0
bash "$UML_LIB/verify.sh" --plain --no-replay

# (3) a raw LV byte
vgchange -ay vg0; mknodes
printf 'X' | dd of=/dev/vg0/raw bs=1 seek=12345 conv=notrunc,fsync status=none
vgchange -an vg0
if bash "$UML_LIB/verify.sh" --plain --no-replay 2>"$OUT/v3.err"; then die "verify passed with a changed raw LV"; fi
grep -q "VERIFY FAILED: LV vg0/raw content changed" "$OUT/v3.err" || { cat "$OUT/v3.err"; die "wrong failure for raw LV"; }
echo CAUGHT-CORRUPTION
"#,
    );
    run.assert_ok().assert_log_contains("CAUGHT-CORRUPTION");
    eprintln!("verifier (bytes) test boot took {:.1}s", run.elapsed.as_secs_f64());
}

#[test]
fn writer_survives_power_cut_and_acked_records_verify() {
    let dir = test_dir("powercut");
    let d = fresh_copy(&dir);
    let mut g = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).spawn_script(
        r#"
vgchange -ay vg0; mknodes
mkdir -p /mnt/r; mount /dev/vg0/root /mnt/r
WRITER_ARGS="--latency-out $OUT/latency" start_writer /mnt/r/records.dat "$OUT/acked"
sleep 600
"#,
    );
    g.wait_for_lines("acked", 200, Duration::from_secs(60));
    g.power_cut();
    let cut = g.wait();
    assert_eq!(cut.rc, 125, "a power cut must read as 125 (no rc): {}", cut.runner_output);
    let acked = std::fs::read_to_string(d.state.join("acked")).unwrap();
    let n = acked.lines().count();
    assert!(n >= 200, "only {n} acked");
    let lat = std::fs::read_to_string(d.state.join("latency")).unwrap();
    assert!(lat.lines().count() >= 32, "latency log has {} lines", lat.lines().count());

    let run = uml()
        .disk(&d.disk1)
        .disk(&d.disk2)
        .out_dir(&d.state)
        .run_script(r#"bash "$UML_LIB/verify.sh" --plain --min-acked 200"#);
    run.assert_ok().assert_log_contains("VERIFY OK (plain)").assert_log_contains("acked records intact");
    eprintln!("{n} records acked before the cut; verify boot took {:.1}s", run.elapsed.as_secs_f64());
}

#[test]
fn guest_cannot_write_host_etc() {
    let dir = test_dir("etc");
    let stamp = SystemTime::now();
    std::thread::sleep(Duration::from_millis(20));
    let run = uml().out_dir(dir.join("out")).timeout(60).run_script(
        r#"
if touch /etc/luksify-probe 2>"$OUT/err"; then echo "WROTE /etc"; exit 1; fi
cat "$OUT/err"
grep -q "Read-only file system" "$OUT/err" || die "unexpected error: $(cat "$OUT/err")"
if echo x > /usr/luksify-probe 2>/dev/null; then echo "WROTE /usr"; exit 1; fi
# LVM and cryptsetup still work: their state goes to tmpfs
lvmconfig --validate
echo > /etc/lvm/harmless   # tmpfs over /etc/lvm
echo RO-OK
"#,
    );
    run.assert_ok().assert_log_contains("RO-OK");
    assert!(!std::path::Path::new("/etc/luksify-probe").exists(), "/etc/luksify-probe exists on the host");
    assert!(!std::path::Path::new("/etc/lvm/harmless").exists(), "/etc/lvm/harmless exists on the host");
    let changed = changed_since(std::path::Path::new("/etc"), stamp);
    assert!(changed.is_empty(), "files under the host's /etc changed during the test: {changed:?}");
}

#[test]
fn luks_variant_verifies_through_cryptsetup_and_a_wrong_key_fails() {
    let dir = test_dir("luks-variant");
    let (d1, d2) = laptop_disks(&dir);
    let run = uml().disk(&d1).disk(&d2).out_dir(dir.join("out")).run_script(&format!(
        r#"
{MKDISK} --variant luks --quick
cryptsetup isLuks /dev/ubda5 || die "not LUKS"
bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file "$OUT/key"
grep -q "^Version:.*2" "$OUT/luksDump.txt" || die "luksDump not recorded"
printf 'wrong key' > /tmp/wrong
if bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file /tmp/wrong 2>"$OUT/wrong.err"; then die "opened with a wrong key"; fi
grep -q "VERIFY FAILED: cryptsetup open" "$OUT/wrong.err" || {{ cat "$OUT/wrong.err"; die "wrong failure"; }}
echo LUKS-VERIFY-OK
"#
    ));
    run.assert_ok().assert_log_contains("VERIFY OK (luks)").assert_log_contains("LUKS-VERIFY-OK");
    eprintln!("luks variant test boot took {:.1}s", run.elapsed.as_secs_f64());
}

/// Shell helpers for the variant tests.
const VARIANT_HELPERS: &str = r#"
tail_sectors() { # sectors of ubda5 past the PV's last extent (pe_start + pe_count * extent)
    local dev
    dev=$(blockdev --getsz /dev/ubda5)
    pvs --noheadings --units s --nosuffix -o pe_start,pv_pe_count,vg_extent_size /dev/ubda5 |
        awk -v dev="$dev" '{ print dev - ($1 + $2 * $3) }'
}
last_seg_lv() { pvs --noheadings --segments -o lv_name /dev/ubda5 | tail -1 | tr -d ' '; }
"#;

fn variant_test(name: &str, script: &str) {
    let dir = test_dir(name);
    let (d1, d2) = laptop_disks(&dir);
    let run = uml()
        .disk(&d1)
        .disk(&d2)
        .out_dir(dir.join("out"))
        .run_script(&format!("{VARIANT_HELPERS}\n{}\necho VARIANTS-OK", script.replace("MKDISK", MKDISK)));
    run.assert_ok().assert_log_contains("VARIANTS-OK");
    eprintln!("{name} test boot took {:.1}s", run.elapsed.as_secs_f64());
}

#[test]
fn variants_last_extents_allocated_or_free() {
    variant_test(
        "variants-last",
        r#"
MKDISK --variant lastused --quick
vgchange -ay vg0 >/dev/null
[ "$(last_seg_lv)" = filler ] || die "lastused: last extents are not allocated"
[ "$(tail_sectors)" -ge $((20 * 2048)) ] || die "lastused: no tail"
vgchange -an vg0 >/dev/null
MKDISK --quick
[ -z "$(last_seg_lv)" ] || die "realistic: last extents should be free"
"#,
    );
}

#[test]
fn variants_no_tail_room_and_snapshot() {
    variant_test(
        "variants-notail",
        r#"
MKDISK --variant notail --quick
t=$(tail_sectors); echo "notail: $t sectors past the PV"
[ "$t" -lt 32768 ] || die "notail: $t sectors of tail, room for a 16 MiB header"
MKDISK --variant snapshot --quick
lvs --noheadings -o lv_name,origin vg0 | grep "rootsnap *root" >/dev/null || die "snapshot: no rootsnap of root"
"#,
    );
}

#[test]
fn variants_plain_filesystem_and_blank() {
    variant_test(
        "variants-plain",
        r#"
MKDISK --variant plainfs --quick
[ "$(blkid -o value -s TYPE /dev/ubda5)" = ext4 ] || die "plainfs: not ext4"
mount -o ro /dev/ubda5 /mnt && "$LKTEST" verify-manifest --root /mnt --manifest "$OUT/manifest.plain" && umount /mnt
MKDISK --variant blank
[ -z "$(blkid -p -o value -s TYPE /dev/ubda5)" ] || die "blank: has a signature"
# the unrelated partition is always there
[ "$(blkid -o value -s LABEL /dev/ubda1)" = boot ] || die "no boot partition"
"#,
    );
}
