//! Bad input and old tools on a half-converted LUKS2 disk (real kernel, UML; issue 19,
//! item 4): a header whose checksums do not verify, a reencryption whose digest does not
//! verify, a wrong passphrase, a requirement luksify does not know, and a device that
//! another program is reencrypting (cryptsetup's reencryption lock held). Each is a clear
//! refusal and changes nothing: the whole disk's sha256, `dmsetup table` and the dm
//! devices' state are the same after `luksify status` and `luksify resume` as before.
//!
//! One conversion is stopped by SIGINT after its first committed step (the mapping stays
//! active, as on a live system after a pause). Every case runs twice: with that mapping
//! active ("open": `resume` would continue online through libcryptsetup's run) and with
//! every mapping torn down, as after a reboot ("closed": `resume` would first activate).
//! Header edits are made on the raw partition by a small Python helper (the LUKS2 checksum
//! is sha256 over the copy's `hdr_size` bytes with the checksum field zeroed), each case
//! starting from the header as the conversion left it.
//!
//! Only one copy broken: luksify does what `cryptsetup open` does — the valid copy is used
//! (`status` says which copy does not verify) and libcryptsetup rewrites the other from it.
//! The last case resumes with the primary copy broken, to the end; a second boot verifies
//! every byte through `cryptsetup open`.
//!
//! Never skips: without UML it fails with the command that installs it.
mod support;

use support::*;

const SCRIPT: &str = r#"
cat > /tmp/hdr.py <<'PY'
# hdr.py FILE OP: edit a copy of the device's first 2 * hdr_size bytes (both LUKS2 copies)
import hashlib, json, struct, sys
path, op = sys.argv[1], sys.argv[2]
b = bytearray(open(path, "rb").read())
hs = struct.unpack(">Q", b[8:16])[0]
assert hs == 16384 and len(b) >= 2 * hs, (hs, len(b))
CSUM = 448

def csum(at):
    a = bytearray(b[at:at + hs])
    a[CSUM:CSUM + 64] = bytes(64)
    return hashlib.sha256(a).digest()

def reseal(at):
    b[at + CSUM:at + CSUM + 32] = csum(at)

def edit(f):
    for at in (0, hs):
        j = json.loads(bytes(b[at + 4096:at + hs]).split(b"\0")[0])
        f(j)
        t = json.dumps(j, separators=(",", ":")).encode()
        assert len(t) < hs - 4096
        b[at + 4096:at + hs] = t + bytes(hs - 4096 - len(t))
        reseal(at)

def require(j):
    j["config"]["requirements"]["mandatory"].append("future-thing")

def tweak(j):
    # the IV tweak of the final segment: covered by the reencryption's digest
    n = 0
    for s in j["segments"].values():
        if "backup-final" in s.get("flags", []):
            s["iv_tweak"] = str(int(s["iv_tweak"]) + 8)
            n += 1
    assert n == 1, n

if op == "check":
    print(" ".join("valid" if csum(at) == bytes(b[at + CSUM:at + CSUM + 32]) else "bad" for at in (0, hs)))
    sys.exit(0)
elif op == "flip-primary":
    b[4096 + 1] ^= 1
elif op == "flip-both":
    b[4096 + 1] ^= 1
    b[hs + 4096 + 1] ^= 1
elif op == "require":
    edit(require)
elif op == "tweak":
    edit(tweak)
else:
    sys.exit("unknown op " + op)
open(path, "wb").write(b)
PY
get_hdr() { dd if=/dev/ubda5 of="$1" bs=4096 count=8 iflag=direct status=none; }
put_hdr() { dd if="$1" of=/dev/ubda5 bs=4096 count=8 oflag=direct conv=notrunc status=none; }
snapdm() { { dmsetup table; dmsetup info -c --noheadings -o name,attr,open; } 2>&1 | sort; }
try() {   # TAG ARGS...: run luksify, keep stdout, stderr and the exit status
    local tag=$1; shift
    set +e; "$LUKSIFY" "$@" < /dev/null > "$OUT/$tag.out" 2> "$OUT/$tag.err"; echo $? > "$OUT/$tag.rc"; set -e
    echo "-- $tag: exit $(cat "$OUT/$tag.rc")"; cat "$OUT/$tag.err"
}
one_case() {   # STATE CASE: the header edited for CASE; status, status --json, resume; nothing may change
    local st=$1 c=$2 key="$OUT/key" h d
    local tag=$st-$c
    cp /tmp/hdr.orig /tmp/hdr.case
    case $c in
        both) python3 /tmp/hdr.py /tmp/hdr.case flip-both ;;
        require) python3 /tmp/hdr.py /tmp/hdr.case require ;;
        digest) python3 /tmp/hdr.py /tmp/hdr.case tweak ;;
        wrongpass) key=/tmp/wrong ;;
        lock) ;;
    esac
    put_hdr /tmp/hdr.case
    python3 /tmp/hdr.py /tmp/hdr.case check > "$OUT/$tag.copies"
    if [ $c = lock ]; then
        rm -f /tmp/locked /tmp/unlock
        ( exec 9> "/run/cryptsetup/LUKS2-reencryption-$UUID"; flock -x 9; touch /tmp/locked
          while [ ! -e /tmp/unlock ]; do sleep 0.1; done ) &
        HOLDER=$!
        while [ ! -e /tmp/locked ]; do sleep 0.05; done
    fi
    h=$(devhash /dev/ubda); d=$(snapdm)
    try "$tag-status" status /dev/ubda5
    try "$tag-json" status --json /dev/ubda5
    try "$tag-resume" resume --yes --no-integrate --key-file "$key" /dev/ubda5
    if [ $c = require ] || [ $c = both ]; then   # stock cryptsetup, for comparison
        set +e
        cryptsetup luksDump /dev/ubda5 > "$OUT/$tag-dump.txt" 2>&1; echo "exit $?" >> "$OUT/$tag-dump.txt"
        cryptsetup open --test-passphrase --key-file "$OUT/key" /dev/ubda5 > "$OUT/$tag-open.txt" 2>&1; echo "exit $?" >> "$OUT/$tag-open.txt"
        set -e
    fi
    [ "$(devhash /dev/ubda)" = "$h" ] || die "$tag changed the disk"
    [ "$(snapdm)" = "$d" ] || die "$tag changed the dm devices: $(snapdm)"
    if [ $c = lock ]; then touch /tmp/unlock; wait $HOLDER; fi
    echo "unchanged: $tag"
    put_hdr /tmp/hdr.orig
}
all_cases() { for c in both require digest wrongpass lock; do one_case $1 $c; done; }

vgchange -ay vg0 >/dev/null; mknodes
printf 'correct horse battery staple' > "$OUT/key"
printf 'wrong horse' > /tmp/wrong
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
# a conversion stopped at a commit point, after its first step
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --progress-json /dev/ubda5 2> "$OUT/run1.err" &
P=$!
while kill -0 $P 2>/dev/null && ! grep -q '"event":"chunk"' "$OUT/run1.err"; do sleep 0.01; done
# while it runs, luksify holds cryptsetup's reencryption lock (a stock `cryptsetup reencrypt`
# is refused); status says so (it runs until the SIGINT: exit 11 below)
echo $P > "$OUT/convert.pid"
"$LUKSIFY" status /dev/ubda5 > "$OUT/running-status.out" 2>&1 || true
kill -INT $P
set +e; wait $P; rc=$?; set -e
[ $rc = 11 ] || die "SIGINT: expected exit 11 (paused), got $rc: $(cat "$OUT/run1.err")"
UUID=$(cryptsetup luksUUID /dev/ubda5)
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-paused.txt"
grep -q online-reencrypt-v2 "$OUT/dump-paused.txt" || die "not a LUKS2 reencryption: $(cat "$OUT/dump-paused.txt")"
get_hdr /tmp/hdr.orig
python3 /tmp/hdr.py /tmp/hdr.orig check > "$OUT/orig.copies"
[ "$(cat "$OUT/orig.copies")" = "valid valid" ] || die "the helper's checksum: $(cat "$OUT/orig.copies")"

# with the paused mapping active
dmsetup table ubda5_crypt > "$OUT/table-paused.txt"
all_cases open

# every mapping torn down, as after a reboot
vgchange -an vg0 >/dev/null
dmsetup remove ubda5_crypt
[ -z "$(dmsetup ls 2>/dev/null | grep -v 'No devices')" ] || die "dm devices left: $(dmsetup ls)"
all_cases closed

# only the primary copy broken: used as cryptsetup uses it; the resume finishes
cp /tmp/hdr.orig /tmp/hdr.case; python3 /tmp/hdr.py /tmp/hdr.case flip-primary; put_hdr /tmp/hdr.case
python3 /tmp/hdr.py /tmp/hdr.case check > "$OUT/onecopy.copies"
try onecopy-status status /dev/ubda5
try onecopy-resume resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5
get_hdr /tmp/hdr.after; python3 /tmp/hdr.py /tmp/hdr.after check > "$OUT/after.copies"
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-done.txt"
try done-status status /dev/ubda5
vgchange -an vg0 >/dev/null
dmsetup remove ubda5_crypt
echo BADHDR-DONE
"#;

fn rc(run: &GuestRun, tag: &str) -> i32 {
    let s = run.file(&format!("{tag}.rc"));
    s.trim().parse().unwrap_or_else(|_| panic!("{tag}: no exit status ({s:?})"))
}

/// The last line of a command's stderr (the error; resume says what it found first).
fn last_err(run: &GuestRun, tag: &str) -> String {
    let err = run.file(&format!("{tag}.err"));
    err.lines().last().unwrap_or_default().to_string()
}

fn refused(run: &GuestRun, tag: &str, code: i32, wants: &[&str]) {
    let r = rc(run, tag);
    let l = last_err(run, tag);
    assert_eq!(r, code, "{tag}: exit {r}, expected {code}; stderr:\n{}", run.file(&format!("{tag}.err")));
    assert!(l.starts_with("luksify: "), "{tag}: {l}");
    for w in wants {
        assert!(l.contains(w), "{tag}: lacks {w:?}: {l}");
    }
    assert!(l.contains("nothing was changed"), "{tag}: does not say nothing was changed: {l}");
    assert!(!l.contains("luksify resume /dev"), "{tag}: a hint that cannot work: {l}");
}

fn status_in_progress(run: &GuestRun, tag: &str) {
    assert_eq!(rc(run, &format!("{tag}-status")), 0, "{tag}: status: {}", run.file(&format!("{tag}-status.err")));
    let out = run.file(&format!("{tag}-status.out"));
    assert!(out.contains("luksify conversion in progress") && out.contains("reencrypting"), "{tag}: {out}");
    let j: serde_json::Value = serde_json::from_str(&run.file(&format!("{tag}-json.out"))).unwrap();
    assert_eq!((j["in_progress"].as_bool(), j["format"].as_str()), (Some(true), Some("luks2-reencrypt")), "{tag}: {j}");
}

fn unreadable_header(run: &GuestRun, tag: &str, wants: &[&str]) {
    for cmd in ["status", "json", "resume"] {
        let t = format!("{tag}-{cmd}");
        refused(run, &t, 13, wants);
        assert!(last_err(run, &t).contains("do not write to /dev/ubda5"), "{t}");
        // status: the one line is all; resume may not even start
        assert_eq!(run.file(&format!("{t}.err")).lines().count(), 1, "{t}: {}", run.file(&format!("{t}.err")));
    }
    let j: serde_json::Value = serde_json::from_str(&run.file(&format!("{tag}-json.out")))
        .unwrap_or_else(|e| panic!("{tag}: status --json is not JSON ({e})"));
    assert_eq!(j["error"]["code"], 13, "{j}");
    assert_eq!(j["state"], "damaged", "{j}");
    assert!(j["in_progress"].is_null(), "{j}");
}

#[test]
fn bad_luks2_headers_and_a_foreign_reencryption_are_refused_and_nothing_changes() {
    let dir = test_dir("luks2-refusals");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(600).run_script(SCRIPT);
    run.assert_ok().assert_log_contains("BADHDR-DONE");
    for st in ["open", "closed"] {
        for c in ["both", "require", "digest", "wrongpass", "lock"] {
            assert!(run.log.contains(&format!("unchanged: {st}-{c}")), "{st}-{c} not checked");
        }
        let t = |c: &str| format!("{st}-{c}");
        // a. both copies' checksums broken
        assert_eq!(run.file(&format!("{st}-both.copies")).trim(), "bad bad");
        unreadable_header(
            &run,
            &t("both"),
            &["no copy of the LUKS2 header verifies (primary: checksum mismatch; secondary: checksum mismatch)"],
        );
        // c. a requirement luksify does not know (checksums recomputed: both copies verify)
        assert_eq!(run.file(&format!("{st}-require.copies")).trim(), "valid valid");
        unreadable_header(&run, &t("require"), &["a requirement luksify does not know: future-thing"]);
        // b. the reencryption's digest does not verify (checksums valid, passphrase right)
        assert_eq!(run.file(&format!("{st}-digest.copies")).trim(), "valid valid");
        status_in_progress(&run, &t("digest"));
        refused(
            &run,
            &format!("{st}-digest-resume"),
            13,
            &["the LUKS2 reencryption metadata does not verify against its digest", "do not write to /dev/ubda5"],
        );
        // b'. the wrong passphrase
        status_in_progress(&run, &t("wrongpass"));
        refused(&run, &format!("{st}-wrongpass-resume"), 2, &["wrong passphrase"]);
        // d. another program holds cryptsetup's reencryption lock
        status_in_progress(&run, &t("lock"));
        let out = run.file(&format!("{st}-lock-status.out"));
        assert!(out.contains("a reencryption runs now: process "), "{st}: status does not say it runs: {out}");
        for c in ["digest", "wrongpass"] {
            assert!(!run.file(&format!("{st}-{c}-status.out")).contains("runs now"), "{st}-{c}: no lock was held");
        }
        refused(
            &run,
            &format!("{st}-lock-resume"),
            5,
            &["another program is reencrypting this device", "/run/cryptsetup/LUKS2-reencryption-", "held by process"],
        );
        for c in ["both", "require", "digest", "wrongpass", "lock"] {
            let tag = format!("{st}-{c}-resume");
            eprintln!("{tag}: exit {}: {}", rc(&run, &tag), last_err(&run, &tag));
        }
    }
    // stock cryptsetup on the same headers, for comparison (printed, not judged)
    for f in ["closed-both-dump.txt", "closed-both-open.txt", "closed-require-dump.txt", "closed-require-open.txt"] {
        eprintln!("--- {f}\n{}", run.file(f));
    }
    // the conversion's own run held cryptsetup's reencryption lock
    let pid = run.file("convert.pid").trim().to_string();
    let running = run.file("running-status.out");
    assert!(
        running.contains(&format!("a reencryption runs now: process {pid} holds cryptsetup's reencryption lock")),
        "luksify (pid {pid}) did not hold the reencryption lock while converting: {running}"
    );
    // and status names it as the luksify running on the device (LUKS2 engine: device lock)
    assert!(
        running.contains(&format!("running:  yes, luksify process {pid}")),
        "status does not say luksify {pid} runs: {running}"
    );
    // one copy broken: status says which; resume uses the other, finishes, both copies valid
    assert_eq!(run.file("onecopy.copies").trim(), "bad valid");
    assert_eq!(rc(&run, "onecopy-status"), 0, "{}", run.file("onecopy-status.err"));
    assert!(
        run.file("onecopy-status.out").contains("the primary copy does not verify"),
        "{}",
        run.file("onecopy-status.out")
    );
    assert_eq!(rc(&run, "onecopy-resume"), 0, "{}", run.file("onecopy-resume.err"));
    assert!(run.file("onecopy-resume.err").contains("the primary copy of the LUKS2 header does not verify"));
    assert_eq!(run.file("after.copies").trim(), "valid valid");
    assert!(!run.file("dump-done.txt").contains("online-reencrypt"), "not finished: {}", run.file("dump-done.txt"));
    assert!(run.file("done-status.out").contains("no luksify conversion in progress"));
    verify_luks_boot(&d, "--name ubda5_crypt");
}
