//! A damaged conversion state is never reported as "no conversion" (real kernel, UML). LUKS1:
//! the journal is luksify's own there (LUKS2 keeps cryptsetup's header; its damage is
//! covered by tests/status_luks2.rs).
//!
//! A conversion of the laptop disk is paused mid-way with SIGINT (exit 11), its mappings torn
//! down as a reboot would, then its journal damaged the two ways a bad sector or a stray `dd`
//! would: (1) both slots zeroed, (2) one bit of the cursor flipped in both slots. In each case
//! `status`, `status --json` and `resume` must exit 13 with one line that says what is known
//! (luksify's fence marker, which slot holds what), that nothing may write to the device, and
//! no hint that cannot work; `--json` prints JSON; and the disk is byte for byte unchanged.
//! With the journal put back, `resume` finishes and a fresh boot verifies every byte.
//!
//! Never skips: without UML it fails with the command that installs it.
mod support;

use support::*;

const SCRIPT: &str = r#"
vgchange -ay vg0 >/dev/null; mknodes
printf 'correct horse battery staple' > "$OUT/key"
FAST="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" $FAST --type luks1 --chunk 2048 --rate 16 /dev/ubda5 2> "$OUT/run1.err" &
P=$!
while ! "$LUKSIFY" status --json /dev/ubda5 2>/dev/null | grep '"state": "migrating"' >/dev/null; do
    kill -0 $P 2>/dev/null || die "luksify ended before migrating: $(cat "$OUT/run1.err")"
    sleep 0.1
done
sleep 1.5
kill -INT $P
set +e; wait $P; rc=$?; set -e
cat "$OUT/run1.err"
[ $rc = 11 ] || die "SIGINT: expected exit 11 (paused), got $rc"
"$LUKSIFY" status --json /dev/ubda5 > "$OUT/paused.json"
# as after a reboot: no mapping of the disk left
vgchange -an vg0 >/dev/null
dmsetup remove_all
[ -z "$(dmsetup ls 2>/dev/null | grep -v 'No devices')" ] || die "dm devices left: $(dmsetup ls)"

N=$(blockdev --getsz /dev/ubda5); J=$((N / 8 * 8 - 16))
echo "$J" > "$OUT/journal_sector"
dd if=/dev/ubda5 of="$OUT/journal.bak" bs=512 skip=$J count=16 iflag=direct status=none
put_journal() { dd if="$1" of=/dev/ubda5 bs=512 seek=$J count=16 oflag=direct conv=notrunc status=none; }
try() {   # TAG ARGS...: run luksify, keep stdout, stderr and the exit status
    local tag=$1; shift
    set +e; "$LUKSIFY" "$@" < /dev/null > "$OUT/$tag.out" 2> "$OUT/$tag.err"; echo $? > "$OUT/$tag.rc"; set -e
    echo "-- $tag: exit $(cat "$OUT/$tag.rc")"; cat "$OUT/$tag.err"
}
three() {   # CASE: status, status --json, resume; the disk must not change
    local h
    h=$(devhash /dev/ubda)
    try "$1-status" status /dev/ubda5
    try "$1-json" status --json /dev/ubda5
    try "$1-resume" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5
    [ "$(devhash /dev/ubda)" = "$h" ] || die "case $1 changed the disk"
    [ -z "$(dmsetup ls 2>/dev/null | grep -v 'No devices')" ] || die "case $1 left dm devices: $(dmsetup ls)"
    echo "unchanged: $1"
}

# 1. both slots zeroed
dd if=/dev/zero bs=512 count=16 of=/tmp/zero status=none
put_journal /tmp/zero
three zeroed

# 2. one bit of the cursor (byte 32 of a slot) flipped in both slots
cp "$OUT/journal.bak" /tmp/flipped
for slot in 0 1; do
    at=$((slot * 4096 + 32))
    b=$(dd if=/tmp/flipped bs=1 skip=$at count=1 status=none | od -An -tu1 | tr -d ' ')
    printf "\\$(printf %03o $((b ^ 1)))" | dd of=/tmp/flipped bs=1 seek=$at conv=notrunc status=none
done
cmp -s /tmp/flipped "$OUT/journal.bak" && die "the flip changed nothing"
put_journal /tmp/flipped
three flipped

# 3. the journal put back: resume finishes
put_journal "$OUT/journal.bak"
"$LUKSIFY" status /dev/ubda5
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5
vgchange -an vg0 >/dev/null 2>&1 || true
dmsetup remove ubda5_crypt
echo DAMAGED-DONE
"#;

fn check_case(run: &GuestRun, case: &str, journal_sector: &str, what: &str) {
    for cmd in ["status", "json", "resume"] {
        let tag = format!("{case}-{cmd}");
        let rc = run.file(&format!("{tag}.rc"));
        assert_eq!(rc.trim(), "13", "{tag}: exit {rc}, stderr: {}", run.file(&format!("{tag}.err")));
        let err = run.file(&format!("{tag}.err"));
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{tag}: one line on stderr, got:\n{err}");
        let l = lines[0];
        for want in [
            "a luksify conversion is in progress",
            "luksify's fence marker is in sector 0",
            &format!("but its journal is {what}"),
            &format!("slot A (sector {journal_sector})"),
            "do not write to /dev/ubda5",
            "luksify status --json /dev/ubda5",
        ] {
            assert!(l.contains(want), "{tag}: lacks {want:?}: {l}");
        }
        assert!(!l.contains("no luksify conversion"), "{tag}: {l}");
        assert!(!l.contains("luksify resume"), "{tag}: a hint that cannot work: {l}");
    }
    // --json prints JSON, the error included
    let out = run.file(&format!("{case}-json.out"));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{case}: status --json is not JSON ({e}): {out}"));
    assert_eq!(v["error"]["code"], 13, "{v}");
    assert_eq!(v["in_progress"], true, "{v}");
    assert_eq!(v["state"], "damaged", "{v}");
    assert_eq!(v["damage"]["journal_sector"].to_string(), journal_sector, "{v}");
    assert!(v["damage"]["marker"]["luks_uuid"].as_str().is_some_and(|u| u.len() == 36), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("do not write"), "{v}");
    // human status prints nothing on stdout that could read as "all clear"
    assert!(run.file(&format!("{case}-status.out")).trim().is_empty());
}

#[test]
fn a_damaged_journal_is_reported_as_a_conversion_in_progress_and_nothing_changes() {
    let dir = test_dir("damaged");
    let d = fresh_copy(&dir);
    let run = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(SCRIPT);
    run.assert_ok().assert_log_contains("DAMAGED-DONE");
    let paused: serde_json::Value = serde_json::from_str(&run.file("paused.json")).unwrap();
    assert_eq!(paused["state"], "migrating", "{paused}");
    assert!(paused["progress"].as_f64().unwrap() > 0.0, "nothing had moved before the pause: {paused}");
    let j = run.file("journal_sector").trim().to_string();
    check_case(&run, "zeroed", &j, "missing");
    assert!(
        run.file("zeroed-resume.err").contains("slot A (sector")
            && run.file("zeroed-resume.err").contains("no journal")
    );
    check_case(&run, "flipped", &j, "damaged");
    assert!(run.file("flipped-status.err").contains("checksum mismatch"));
    for case in ["zeroed", "flipped"] {
        assert!(run.log.contains(&format!("unchanged: {case}")), "{case} not checked");
    }

    // with the journal back, the resumed conversion is complete and every byte is there
    verify_luks_boot(&d, "");
}
