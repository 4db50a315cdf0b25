//! System integration on a real kernel (User-Mode Linux): the realistic laptop disk is
//! converted with `--root` pointing at a minimal fake Debian root in the guest's tmpfs
//! (never the host's /etc): crypttab gets the new device's line by LUKS UUID (the old line
//! kept, a backup made), the LVM devices file follows the PV onto the mapping, the
//! initramfs hook runs inside `chroot ROOT`; `resume` on the finished device changes
//! nothing; a failing initramfs hook gives exit 12 with what to do by hand.
//!
//! The fake root (tests/support FAKE_ROOT_SH) carries a copy of /bin/sh and its libraries
//! so that `chroot ROOT update-initramfs` runs its fake update-initramfs script.
mod support;

use support::*;

#[test]
fn convert_integrates_into_a_scratch_root_and_resume_is_idempotent() {
    let dir = test_dir("integrate");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{FAKE_ROOT_SH}
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/root; mount /dev/vg0/root /mnt/root
printf 'correct horse battery staple' > "$OUT/key"
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
R=/tmp/target
fake_root $R --devices-file /dev/ubda5
cp $R/etc/crypttab "$OUT/crypttab.before"
cp $R/etc/lvm/devices/system.devices "$OUT/devices.before"
"$LUKSIFY" --dry-run --root $R /dev/ubda5 | tee "$OUT/plan.txt"
"$LUKSIFY" --dry-run --json --root $R /dev/ubda5 > "$OUT/plan.json"
set +e; "$LUKSIFY" --yes --key-file "$OUT/key" $FAST --root $R /dev/ubda5 2> "$OUT/convert.err"; rc=$?; set -e
cat "$OUT/convert.err"
[ $rc = 0 ] || die "convert with integration: exit $rc"
cryptsetup luksUUID /dev/ubda5 > "$OUT/uuid"
cp $R/etc/crypttab "$OUT/crypttab.after"
cp $R/etc/lvm/devices/system.devices "$OUT/devices.after"
cp $R/update-initramfs.log "$OUT/hook.1"
for f in var/lib/luksify etc/initramfs-tools/hooks/luksify etc/initramfs-tools/scripts/local-top/luksify etc/systemd/system/luksify-resume.service; do
    [ ! -e $R/$f ] || die "the boot chain's $f is left after the finish"
done
ls -a $R/etc > "$OUT/etc.ls"
# Resume on the finished device: the same crypttab, no new backup.
set +e; "$LUKSIFY" resume --yes --root $R /dev/ubda5 2> "$OUT/resume.err"; rc=$?; set -e
cat "$OUT/resume.err"
[ $rc = 0 ] || die "resume on the finished device: exit $rc"
cmp $R/etc/crypttab "$OUT/crypttab.after" || die "resume changed crypttab: $(cat $R/etc/crypttab)"
cmp $R/etc/lvm/devices/system.devices "$OUT/devices.after" || die "resume changed the devices file"
ls -a $R/etc > "$OUT/etc2.ls"
cp $R/update-initramfs.log "$OUT/hook.2"
# A root whose initramfs hook fails: converted, integration incomplete, exit 12.
fake_root /tmp/broken --failing
set +e; "$LUKSIFY" resume --yes --root /tmp/broken /dev/ubda5 2> "$OUT/broken.err"; rc=$?; set -e
cat "$OUT/broken.err"
[ $rc = 12 ] || die "failing update-initramfs: exit $rc, expected 12"
cp /tmp/broken/etc/crypttab "$OUT/crypttab.broken"
umount /mnt/root; vgchange -an vg0 >/dev/null; dmsetup remove ubda5_crypt
echo INTEGRATED
"#
    ));
    run.assert_ok().assert_log_contains("INTEGRATED");
    let uuid = run.file("uuid").trim().to_string();
    assert_eq!(uuid.len(), 36, "{uuid}");
    let before = run.file("crypttab.before");
    let after = run.file("crypttab.after");
    assert_eq!(after, format!("{before}ubda5_crypt UUID={uuid} none luks\n"), "crypttab after the conversion");
    assert!(after.contains("swap_crypt /dev/sdb2 /dev/urandom swap"), "the old line is kept: {after}");
    let ls = run.file("etc.ls");
    let backups: Vec<&str> = ls.lines().filter(|l| l.starts_with("crypttab.luksify-backup-")).collect();
    // one before the boot chain's line went in, one at the finish (of that line)
    assert_eq!(backups.len(), 2, "two backups: {ls}");
    assert!(!ls.contains("luksify-tmp"), "temp file left: {ls}");
    assert_eq!(run.file("etc2.ls"), ls, "resume made a new backup or left a file");
    // before the cut-over (the boot chain) and at the finish, in the chroot
    let u = "update-initramfs -u -k all\n";
    assert_eq!(run.file("hook.1"), u.repeat(2), "the initramfs hook ran twice, in the chroot");
    assert_eq!(run.file("hook.2"), u.repeat(3));
    let dbefore = run.file("devices.before");
    let dafter = run.file("devices.after");
    assert!(dbefore.contains("DEVNAME=/dev/ubda5 "), "{dbefore}");
    assert!(!dafter.contains("DEVNAME=/dev/ubda5 "), "the raw partition is still in the devices file: {dafter}");
    assert!(
        dafter.contains(&format!("CRYPT-LUKS2-{}-ubda5_crypt", uuid.replace('-', ""))),
        "the mapping is not in the devices file: {dafter}"
    );
    let broken = run.file("broken.err");
    assert!(
        broken.contains("converted, but integration incomplete") && broken.contains("update-initramfs -u -k all"),
        "{broken}"
    );
    assert!(run.file("crypttab.broken").contains(&format!("ubda5_crypt UUID={uuid} none luks")));
    // The boot checks in the dry-run: root on the PV, initramfs-tools can unlock.
    let j: serde_json::Value = serde_json::from_str(&run.file("plan.json")).unwrap();
    let b = &j["boot"];
    assert_eq!(b["root_on_pv"], true, "{b}");
    assert_eq!(b["boot_on_pv"], false, "{b}");
    assert_eq!(b["initramfs"], "initramfs-tools");
    assert_eq!(b["initramfs_can_unlock"], true);
    assert_eq!(b["mounts_from"], "fstab");
    assert!(run.file("plan.txt").contains("initramfs-tools, can unlock LUKS"));
}
