//! `--recovery-key` on a real kernel (User-Mode Linux): the conversion of the mounted laptop
//! disk prints the key once on standard output; mid-way (stopped by SIGINT) and after the
//! finish, stock cryptsetup opens the volume's keyslot 1 with it and keyslot 0 with the
//! passphrase; `luksify resume` accepts it in place of the passphrase; a fresh boot opens
//! the converted disk with the recovery key alone and finds every file. The key appears
//! nowhere but that one place on standard output: not on stderr, not in the --progress-json
//! lines, not in the guest's log, not anywhere on the disk (journal, header copy, header:
//! neither as text nor as its 32 raw bytes).
//! These never skip: without UML they fail with the install command.
mod support;

use support::*;

/// The laptop's root and home mounted (a running system), the passphrase file.
const LIVE: &str = r#"
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/root /mnt/home
mount /dev/vg0/root /mnt/root; mount /dev/vg0/home /mnt/home
printf 'correct horse battery staple' > "$OUT/key"
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
# the one line of standard output that is a recovery key (8 groups of 8 modhex letters)
recovery_key() { sed -n 's/^ *\([cbdefghijklnrtuv]\{8\}\(-[cbdefghijklnrtuv]\{8\}\)\{7\}\) *$/\1/p' "$1"; }
slot_opens() { # SLOT KEYFILE: stock cryptsetup opens keyslot SLOT of /dev/ubda5 with KEYFILE
    cryptsetup open --test-passphrase --key-slot "$1" --key-file "$2" /dev/ubda5
}
both_slots() { # WHEN
    slot_opens 1 "$OUT/recovery.key" || die "$1: the recovery key does not open keyslot 1"
    slot_opens 0 "$OUT/key" || die "$1: the passphrase does not open keyslot 0"
    if slot_opens 0 "$OUT/recovery.key" 2>/dev/null; then die "$1: the recovery key opened keyslot 0"; fi
    if slot_opens 1 "$OUT/key" 2>/dev/null; then die "$1: the passphrase opened keyslot 1"; fi
    echo "$1: keyslot 1 opens with the recovery key, keyslot 0 with the passphrase"
}
convert_paused_with_key() { # EXTRA ARGS: convert with --recovery-key, SIGINT after the first
    # step (exit 11, paused); the key from standard output into $OUT/recovery.key
    "$LUKSIFY" --yes --no-integrate --recovery-key --key-file "$OUT/key" $FAST "$@" --progress-json /dev/ubda5 \
        > "$OUT/convert.out" 2> "$OUT/convert.err" &
    local p=$! rc k
    while kill -0 $p 2>/dev/null && ! grep -q '"event":"chunk"' "$OUT/convert.err"; do sleep 0.01; done
    kill -INT $p
    set +e; wait $p; rc=$?; set -e
    [ $rc = 11 ] || die "SIGINT: expected exit 11 (paused), got $rc: $(tail -3 "$OUT/convert.err")"
    k=$(recovery_key "$OUT/convert.out")
    [ -n "$k" ] || die "no recovery key on standard output"
    printf '%s' "$k" > "$OUT/recovery.key"
}
"#;

/// After the finish: both keyslots, then everything closed for the fresh boot.
const DONE: &str = r#"
both_slots "after the finish"
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-done.txt"
umount /mnt/root /mnt/home
vgchange -an vg0 >/dev/null
dmsetup remove ubda5_crypt
"#;

/// Decodes a modhex recovery key into its 32 bytes.
fn raw_of(key: &str) -> Vec<u8> {
    const MODHEX: &[u8] = b"cbdefghijklnrtuv";
    let nib = |c: u8| MODHEX.iter().position(|&m| m == c).unwrap() as u8;
    let s: Vec<u8> = key.bytes().filter(|&c| c != b'-').collect();
    assert_eq!(s.len(), 64, "{key:?}");
    s.chunks(2).map(|p| nib(p[0]) << 4 | nib(p[1])).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether the image holds `needle` anywhere (read in 8 MiB pieces that overlap).
fn image_contains(img: &std::path::Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let mut f = std::fs::File::open(img).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut keep = 0usize;
    loop {
        let n = f.read(&mut buf[keep..]).unwrap();
        if n == 0 {
            return false;
        }
        let end = keep + n;
        if contains(&buf[..end], needle) {
            return true;
        }
        keep = (needle.len() - 1).min(end);
        buf.copy_within(end - keep..end, 0);
    }
}

/// The key shown once on stdout; nowhere else the test can read.
fn key_shown_once_and_nowhere_else(run: &GuestRun, d: &BuiltDisk, stdout: &str, elsewhere: &[&str]) -> String {
    let out = run.file(stdout);
    let key = run.file("recovery.key");
    assert_eq!(key.len(), 71, "recovery key {:?} from stdout:\n{out}", key.len());
    assert_eq!(out.matches(key.as_str()).count(), 1, "the key is not shown exactly once:\n{out}");
    assert!(out.contains("Write this key down or store it off this machine now"), "{out}");
    assert!(out.contains("RECOVERY KEY for /dev/ubda5 (LUKS keyslot 1)"), "{out}");
    for f in elsewhere {
        let t = run.file(f);
        assert!(!t.contains(key.as_str()), "the recovery key is in {f}");
        assert!(!t.contains(&key[..17]), "part of the recovery key is in {f}");
    }
    // the guest's log holds the scenario's own output and stderr
    assert!(!run.log.contains(&key[..17]), "the recovery key is in the guest log");
    let raw = raw_of(&key);
    for img in [&d.disk1, &d.disk2] {
        assert!(!image_contains(img, key.as_bytes()), "the recovery key (text) is on {}", img.display());
        assert!(!image_contains(img, &key.as_bytes()[..17]), "part of the recovery key is on {}", img.display());
        assert!(!image_contains(img, &raw), "the recovery key's bytes are on {}", img.display());
    }
    key
}

/// A fresh boot opens the converted disk with the recovery key alone (stock cryptsetup
/// through verify.sh) and finds every file, LV hash and fs intact.
fn verify_with_recovery_key(d: &BuiltDisk) {
    uml()
        .disk(&d.disk1)
        .disk(&d.disk2)
        .out_dir(&d.state)
        .run_script(r#"bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file "$OUT/recovery.key" --name ubda5_crypt"#)
        .assert_ok()
        .assert_log_contains("VERIFY OK (luks)");
}

/// LUKS2 (cryptsetup's reencryption mid-way): stopped after its first step, the recovery
/// key opens keyslot 1 of the reencryption in progress, `luksify resume` finishes with it as
/// the passphrase, and both keyslots open the finished volume.
#[test]
fn luks2_recovery_key_opens_mid_way_and_after_the_finish() {
    let dir = test_dir("recovery-luks2");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
"$LUKSIFY" --dry-run /dev/ubda5 > "$OUT/dry-plain.txt"
"$LUKSIFY" --dry-run --recovery-key /dev/ubda5 > "$OUT/dry-recovery.txt"
"$LUKSIFY" --dry-run --json --recovery-key /dev/ubda5 > "$OUT/dry-recovery.json"
# nowhere to show the key (standard output is /dev/full): luksify stops, nothing written
ends() {{ n=$(blockdev --getsz /dev/ubda5); {{ dd if=/dev/ubda5 bs=512 count=2048 status=none; dd if=/dev/ubda5 bs=512 skip=$((n - 65536)) status=none; }} | sha256sum; }}
before=$(ends)
if "$LUKSIFY" --yes --no-integrate --recovery-key --key-file "$OUT/key" $FAST /dev/ubda5 > /dev/full 2> "$OUT/full.err"; then
    die "converted with nowhere to show the recovery key"
fi
[ "$(ends)" = "$before" ] || die "the device's first MiB or last 32 MiB changed although the key could not be shown"
"$LUKSIFY" status /dev/ubda5 > "$OUT/status-full.txt"
convert_paused_with_key
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-mid.txt"
grep -q online-reencrypt-v2 "$OUT/dump-mid.txt" || die "not a reencryption in progress"
both_slots "mid-way"
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/recovery.key" --progress-json /dev/ubda5 \
    > "$OUT/resume.out" 2> "$OUT/resume.err" || die "resume with the recovery key failed: $(tail -3 "$OUT/resume.err")"
{DONE}
echo RECOVERED
"#
    ));
    run.assert_ok().assert_log_contains("RECOVERED");
    let key = key_shown_once_and_nowhere_else(
        &run,
        &d,
        "convert.out",
        &[
            "convert.err",
            "resume.out",
            "resume.err",
            "dump-mid.txt",
            "dump-done.txt",
            "dry-recovery.txt",
            "dry-recovery.json",
            "full.err",
        ],
    );
    // stdout holds the key's frame and nothing else of the conversion
    let out = run.file("convert.out");
    assert!(!out.contains("\"event\""), "progress lines on stdout: {out}");
    assert!(!key.is_empty());
    // the header: keyslot 1 with systemd's PBKDF and token, mid-way and at the end
    for f in ["dump-mid.txt", "dump-done.txt"] {
        let dump = run.file(f);
        let ks1 = dump.split("  1: luks2").nth(1).unwrap_or_else(|| panic!("no keyslot 1 in {f}:\n{dump}"));
        assert!(ks1.contains("PBKDF:      pbkdf2") && ks1.contains("Hash:       sha512"), "{f}: {ks1}");
        assert!(dump.contains("systemd-recovery"), "{f}: no systemd-recovery token:\n{dump}");
    }
    // with nowhere to show it, no conversion
    let full = run.file("full.err");
    assert!(
        full.contains("cannot show the recovery key on standard output") && full.contains("did not start"),
        "{full}"
    );
    assert!(
        run.file("status-full.txt").contains("no luksify conversion in progress"),
        "{}",
        run.file("status-full.txt")
    );
    // the dry-runs: the flag's step, or the suggestion to use it
    let plain = run.file("dry-plain.txt");
    assert!(plain.contains("suggestion: add --recovery-key"), "{plain}");
    let with = run.file("dry-recovery.txt");
    assert!(
        with.contains("add keyslot 1 for a recovery key") && !with.contains("suggestion: add --recovery-key"),
        "{with}"
    );
    assert!(run.file("dry-recovery.json").contains("\"recovery_key\": true"));
    // the finish (by resume) knows keyslot 1 and suggests no recovery key
    let err = run.file("resume.err");
    assert!(err.contains("keyslot 1 holds a second key"), "{err}");
    assert!(!err.contains("systemd-cryptenroll --recovery-key"), "{err}");
    verify_with_recovery_key(&d);
}

/// LUKS1 (luksify's journal mid-way, the header's copy in the tail): `luksify resume`
/// continues with the recovery key in place of the passphrase (it unlocks the header copy);
/// after the finish stock cryptsetup opens keyslot 1 with it and keyslot 0 with the
/// passphrase. Without the flag, the finish suggests a second key.
#[test]
fn luks1_recovery_key_resumes_and_opens_after_the_finish() {
    let dir = test_dir("recovery-luks1");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
convert_paused_with_key --type luks1 --chunk 4096
"$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-mid.txt"
grep -q migrating "$OUT/status-mid.txt" || die "not mid-way"
printf 'not the key' > "$OUT/wrong.key"
if "$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/wrong.key" /dev/ubda5 2> "$OUT/wrong.err"; then die "a wrong key resumed"; fi
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/recovery.key" --progress-json /dev/ubda5 \
    > "$OUT/resume.out" 2> "$OUT/resume.err" || die "resume with the recovery key failed: $(tail -3 "$OUT/resume.err")"
{DONE}
echo RECOVERED
"#
    ));
    run.assert_ok().assert_log_contains("RECOVERED");
    key_shown_once_and_nowhere_else(
        &run,
        &d,
        "convert.out",
        &["convert.err", "resume.out", "resume.err", "wrong.err", "status-mid.txt", "dump-done.txt"],
    );
    let dump = run.file("dump-done.txt");
    assert!(dump.contains("Key Slot 1: ENABLED") && dump.contains("Key Slot 0: ENABLED"), "{dump}");
    assert!(run.file("convert.out").contains("cryptsetup luksKillSlot /dev/ubda5 1"));
    verify_with_recovery_key(&d);
}

/// Without `--recovery-key` there is one keyslot, and the finish suggests adding a recovery
/// key with systemd-cryptenroll (LUKS2), in one line on stderr; nothing on stdout.
#[test]
fn without_the_flag_the_finish_suggests_a_recovery_key() {
    let dir = test_dir("recovery-none");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"{LIVE}
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST /dev/ubda5 > "$OUT/convert.out" 2> "$OUT/convert.err" \
    || die "convert: $(tail -3 "$OUT/convert.err")"
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-done.txt"
slot_opens 0 "$OUT/key" || die "the passphrase does not open keyslot 0"
umount /mnt/root /mnt/home
vgchange -an vg0 >/dev/null
dmsetup remove ubda5_crypt
echo CONVERTED
"#
    ));
    run.assert_ok().assert_log_contains("CONVERTED");
    assert_eq!(run.file("convert.out"), "", "stdout without --recovery-key");
    let err = run.file("convert.err");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("suggestion:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("systemd-cryptenroll --recovery-key /dev/ubda5"), "{err}");
    let dump = run.file("dump-done.txt");
    assert!(!dump.contains("  1: luks2") && !dump.contains("systemd-recovery"), "{dump}");
}
