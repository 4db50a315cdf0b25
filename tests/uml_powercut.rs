//! Power cuts on a real kernel (User-Mode Linux): convert the realistic disk (LUKS2, the
//! standard format mid-way) with the live writer running, cut the power (SIGKILL of the
//! whole UML process group) at a seeded moment, then boot "rescue media" that behaves like
//! real ones (LVM autoactivation and `fsck -p` on whatever comes up). Even seeds: rescue
//! media **without luksify**: stock `cryptsetup luksDump`, `cryptsetup open` (its own
//! recovery of an interrupted step) with LVM, fsck, every file and every acknowledged
//! record verified on the half-converted disk (qemu/uml/lib/verify.sh uses only stock
//! tools), then `cryptsetup reencrypt --resume-only` finishes it and everything verifies
//! again. Odd seeds: `luksify resume` on the rescue media, then the same verification.
//!
//! LUKSIFY_POWERCUTS=N runs N cuts (default 20); LUKSIFY_POWERCUT_SEED=S replays a run (the
//! seed of every cut is printed).
mod support;

use std::time::{Duration, SystemTime};
use support::*;

/// Phases of the conversion at which a cut is aimed, by the journal the guest polls.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Before or during the cut-over: header formatted, bridge inserted, cut-over.
    Insertion,
    /// Reencrypting with the cursor in the top, middle or bottom third.
    Early,
    Middle,
    Late,
    /// After the last step: cryptsetup's final header, the final table, pvresize.
    Finish,
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn one_cut(seed: u64) {
    let mut r = rng(seed);
    let phases = [Phase::Insertion, Phase::Early, Phase::Middle, Phase::Late, Phase::Finish];
    let phase = phases[(seed % 5) as usize];
    // Aimed at insertion, every other such seed waits for the bridge's commit, so that cuts
    // land in the cut-over and the first step as well as before it.
    let after_bridge = matches!(phase, Phase::Insertion) && (seed / 5) % 2 == 1;
    let delay_ms = match phase {
        Phase::Insertion if after_bridge => r() % 300,
        Phase::Insertion => r() % 1500,
        // The finish (header write, header-written commit, pvresize, journal cleared) takes
        // about a second after the last step in the debug build.
        Phase::Finish => r() % 1500,
        _ => r() % 400,
    };
    let stock = seed.is_multiple_of(2);
    eprintln!(
        "power cut seed {seed}: phase {phase:?}{}, {delay_ms} ms after the trigger, rescue with {}",
        if after_bridge { " (after the bridge)" } else { "" },
        if stock { "stock cryptsetup only" } else { "luksify resume" }
    );
    let (l_third_lo, l_third_hi) = match phase {
        Phase::Early => (2, 3),
        Phase::Middle => (1, 2),
        Phase::Late => (0, 1),
        _ => (0, 0),
    };
    // The guest's trigger: a shell test on luksify's own --progress-json events (cheap to
    // poll; `luksify status` takes about a second per call in the guest).
    let cursor = r#"c=$(grep -o '"cursor":[0-9]*' /tmp/progress | tail -1 | cut -d: -f2)"#;
    let trigger = match phase {
        // Right after the bridge went in: the cut-over, the first step.
        Phase::Insertion if after_bridge => r#"grep -q '"state":"bridged"' /tmp/progress"#.to_string(),
        // Right after luksify starts: header, bridge insertion, cut-over.
        Phase::Insertion => "true".to_string(),
        Phase::Finish => r#"grep -q '"cursor":0,' /tmp/progress"#.to_string(),
        _ => format!(
            r#"{cursor}; [ -n "$c" ] && [ "$c" -le $((L * {l_third_hi} / 3)) ] && [ "$c" -ge $((L * {l_third_lo} / 3)) ]"#
        ),
    };
    let dir = test_dir(&format!("powercut-{seed}"));
    let d = fresh_copy(&dir);
    let mut g = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).spawn_script(&format!(
        r#"
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/root /mnt/home
mount /dev/vg0/root /mnt/root; mount /dev/vg0/home /mnt/home
printf 'power cut passphrase' > "$OUT/key"
start_writer /mnt/root/records.dat "$OUT/acked"
wait_acked 20
L=$("$LUKSIFY" --dry-run --json /dev/ubda5 | sed -n 's/.*"move_sectors": \([0-9]*\).*/\1/p')
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --progress-json /dev/ubda5 2> /tmp/progress &
P=$!
while kill -0 $P 2>/dev/null; do
    if {trigger}; then echo go > "$OUT/cut-now"; sync; break; fi
    sleep 0.02
done
set +e; wait $P; set -e
cp /tmp/progress "$OUT/progress.log"
echo "CONVERSION FINISHED BEFORE THE CUT"; echo done > "$OUT/cut-now"; sync
sleep 600
"#
    ));
    g.wait_for_file("cut-now", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(delay_ms));
    g.power_cut();
    let cut = g.wait();
    let acked_n = acked_count(&d.state.join("acked"), 0);
    let finished_before = cut.log.contains("CONVERSION FINISHED BEFORE THE CUT");
    eprintln!("seed {seed}: cut with {acked_n} records acked (finished before the cut: {finished_before})");

    // Rescue media: autoactivation and fsck -p on whatever comes up; then, with luksify,
    // resume; without it, only look.
    let resume = if stock {
        ""
    } else {
        r#"if "$LUKSIFY" status --json /dev/ubda5 | grep '"in_progress": true' >/dev/null; then
    # (set +e: under set -e a failing resume ended the script before its messages were shown)
    set +e; "$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" --progress-json /dev/ubda5 2> "$OUT/resume.jsonl"
    rc=$?; set -e; cat "$OUT/resume.jsonl" >&2; [ $rc -eq 0 ] || die "resume failed ($rc)"
fi
vgchange -an vg0 >/dev/null 2>&1 || true
dmsetup remove ubda5_crypt 2>/dev/null || true"#
    };
    let rescue = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(&format!(
        r#"
{status}
blkid -p /dev/ubda5 > "$OUT/blkid-rescue.txt" 2>&1 || true
vgchange -aay > "$OUT/autoactivate.txt" 2>&1 || true
vgchange -ay vg0 >> "$OUT/autoactivate.txt" 2>&1 || true
mknodes
for lv in /dev/mapper/vg0-root /dev/mapper/vg0-home; do
    if [ -b "$lv" ]; then echo "rescue: $lv came up"; fsck -p "$lv" || true; fi
done | tee "$OUT/rescue-fsck.txt"
vgchange -an vg0 >/dev/null 2>&1 || true
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-rescue.txt" 2>&1 || true
{resume}
if cryptsetup isLuks /dev/ubda5; then
    if cryptsetup luksDump /dev/ubda5 | grep -q online-reencrypt-v2; then echo midway > "$OUT/after-rescue"; else echo luks > "$OUT/after-rescue"; fi
else echo plain > "$OUT/after-rescue"; fi
echo RESCUE-DONE
"#,
        status = if stock { "" } else { r#""$LUKSIFY" status /dev/ubda5 | tee "$OUT/status-rescue.txt""# },
    ));
    rescue.assert_ok().assert_log_contains("RESCUE-DONE");
    let after = rescue.file("after-rescue").trim().to_string();
    let dump = rescue.file("dump-rescue.txt");
    if dump.contains("online-reencrypt-v2") {
        // Mid-way nothing saw a PV on the raw partition, nothing came up to fsck.
        let b = rescue.file("blkid-rescue.txt");
        assert!(!b.contains("LVM2_member"), "seed {seed}: rescue media sees a PV on the raw partition mid-way: {b}");
        let f = rescue.file("rescue-fsck.txt");
        assert!(!f.contains("came up"), "seed {seed}: LVs came up on a half-converted disk: {f}");
    }
    // A cut before the cut-over leaves the disk as it was: plain, and intact.
    let plain = after == "plain";
    if plain {
        assert!(!finished_before, "seed {seed}: the conversion finished, yet the disk is not LUKS");
        if !stock {
            let status = rescue.file("status-rescue.txt");
            // (or a cut inside the cut-over's window, which `luksify resume` rolled back)
            assert!(
                status.contains("no luksify conversion") || status.contains("interrupted during its cut-over"),
                "seed {seed}: plain disk but a conversion: {status}"
            );
        }
    }
    assert!(stock || after != "midway", "seed {seed}: luksify resume left the reencryption unfinished");
    let verify = |what: &str| {
        let v = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).run_script(&if plain {
            format!(r#"bash "$UML_LIB/verify.sh" --plain --min-acked {acked_n}"#)
        } else {
            format!(r#"bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file "$OUT/key" --min-acked {acked_n}"#)
        });
        v.assert_ok().assert_log_contains(if plain { "VERIFY OK (plain)" } else { "VERIFY OK (luks)" });
        eprintln!("seed {seed}: {what}: verified");
    };
    verify(&format!("phase {phase:?}, {after} after the rescue"));
    if after == "midway" {
        // Stock cryptsetup alone finishes what luksify started.
        let fin = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(
            r#"
set +e; cryptsetup reencrypt --resume-only --key-file "$OUT/key" /dev/ubda5 > "$OUT/cs-finish.txt" 2>&1; rc=$?; set -e
cat "$OUT/cs-finish.txt"
if [ $rc != 0 ]; then
    # The one state stock cryptsetup cannot leave (every step committed, its teardown not
    # written): cryptsetup open still maps it; luksify writes the teardown.
    grep -q "Failed to set device segments for next reencryption hotzone" "$OUT/cs-finish.txt" || die "cryptsetup reencrypt --resume-only failed ($rc)"
    echo gap > "$OUT/cs-gap"
    "$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5
    vgchange -an vg0 >/dev/null 2>&1 || true
    dmsetup remove ubda5_crypt
fi
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-finished.txt"
! grep -q online-reencrypt "$OUT/dump-finished.txt" || die "still in reencryption after cryptsetup's resume"
echo CS-FINISHED
"#,
        );
        fin.assert_ok().assert_log_contains("CS-FINISHED");
        verify(if d.state.join("cs-gap").exists() {
            "cryptsetup's resume could not leave the all-steps-committed state; luksify resume finished it"
        } else {
            "finished by cryptsetup reencrypt --resume-only"
        });
    }
}

#[test]
fn power_cuts_at_seeded_moments_then_stock_cryptsetup_or_luksify_finish_and_nothing_is_lost() {
    let n: u64 = std::env::var("LUKSIFY_POWERCUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let base: u64 = std::env::var("LUKSIFY_POWERCUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() / 5 * 5);
    eprintln!("power cuts: {n}, base seed {base} (replay with LUKSIFY_POWERCUT_SEED={base})");
    let seeds: Vec<u64> = (0..n).map(|i| base + i).collect();
    // Two guests at a time (each cut boots three times).
    let mut handles = Vec::new();
    for pair in seeds.chunks(2) {
        for &s in pair {
            handles.push(std::thread::spawn(move || one_cut(s)));
        }
        for h in handles.drain(..) {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
    }
}

/// The LUKS2 cut-over's window on a real kernel: luksify stopped (the test hook
/// LUKSIFY_TEST_HANG_AFTER_FLUSH_OF=8) right after the header's bulk is durable, before its
/// first 4 KiB is written, and the power cut there, the live writer running. On the rescue
/// media the raw partition shows no PV (the label went first) and nothing comes up;
/// `luksify status` says the cut-over was interrupted; `luksify resume` rolls it back
/// (exit 0, saying so); then the disk is the plain PV with every acknowledged record, and
/// `luksify status` says no conversion is in progress.
#[test]
fn a_power_cut_inside_the_cut_over_window_is_rolled_back_to_the_plain_pv() {
    let dir = test_dir("powercut-cutover-window");
    let d = fresh_copy(&dir);
    let mut g = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).spawn_script(
        r#"
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/root /mnt/home
mount /dev/vg0/root /mnt/root; mount /dev/vg0/home /mnt/home
printf 'window passphrase' > "$OUT/key"
start_writer /mnt/root/records.dat "$OUT/acked"
wait_acked 20
LUKSIFY_TEST_HANG_AFTER_FLUSH_OF=8 "$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --progress-json /dev/ubda5 2> /tmp/progress &
P=$!
while kill -0 $P 2>/dev/null; do
    if grep -q 'test hook: the write at sector 8 is flushed' /tmp/progress; then
        cp /tmp/progress "$OUT/progress.log"; echo go > "$OUT/cut-now"; sync; break
    fi
    sleep 0.02
done
cp /tmp/progress "$OUT/progress.log"
echo "LUKSIFY ENDED BEFORE THE HOOK"; echo done > "$OUT/cut-now"; sync
sleep 600
"#,
    );
    g.wait_for_file("cut-now", Duration::from_secs(180));
    g.power_cut();
    let cut = g.wait();
    assert!(
        !cut.log.contains("LUKSIFY ENDED BEFORE THE HOOK"),
        "luksify ended before the hook:\n{}",
        cut.file("progress.log")
    );
    let acked_n = acked_count(&d.state.join("acked"), 20);
    eprintln!("cut inside the cut-over window with {acked_n} records acked");

    let rescue = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(
        r#"
blkid -p /dev/ubda5 > "$OUT/blkid-window.txt" 2>&1 || true
vgchange -aay > "$OUT/autoactivate.txt" 2>&1 || true
mknodes
if [ -b /dev/mapper/vg0-root ]; then echo "rescue: vg0-root came up" > "$OUT/came-up.txt"; vgchange -an vg0 >/dev/null 2>&1 || true; fi
"$LUKSIFY" status /dev/ubda5 > "$OUT/status-window.txt" 2>&1 || die "status failed: $(cat "$OUT/status-window.txt")"
"$LUKSIFY" status --json /dev/ubda5 > "$OUT/status-window.json" 2>&1 || die "status --json failed"
"$LUKSIFY" --dry-run /dev/ubda5 > "$OUT/dryrun-window.txt" 2>&1 && die "the dry-run accepted a device inside the window"
set +e
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 > "$OUT/resume.txt" 2>&1
echo $? > "$OUT/resume-rc"
set -e
cat "$OUT/resume.txt"
"$LUKSIFY" status /dev/ubda5 > "$OUT/status-after.txt" 2>&1 || true
blkid -p /dev/ubda5 > "$OUT/blkid-after.txt" 2>&1 || true
echo RESCUE-DONE
"#,
    );
    rescue.assert_ok().assert_log_contains("RESCUE-DONE");
    let blkid = rescue.file("blkid-window.txt");
    assert!(!blkid.contains("LVM2_member"), "the raw partition shows a PV inside the window: {blkid}");
    assert!(!d.state.join("came-up.txt").exists(), "an LV came up inside the window");
    let status = rescue.file("status-window.txt");
    assert!(status.contains("interrupted during its cut-over"), "status inside the window: {status}");
    let dry = rescue.file("dryrun-window.txt");
    assert!(dry.contains("interrupted during its cut-over") && dry.contains("luksify resume"), "dry-run: {dry}");
    let json = rescue.file("status-window.json");
    assert!(json.contains("\"cut-over-interrupted\"") && json.contains("luksify-cut-over-record"), "{json}");
    let resume = rescue.file("resume.txt");
    assert_eq!(rescue.file("resume-rc").trim(), "0", "luksify resume: {resume}");
    assert!(resume.contains("rolled back to the plain PV"), "luksify resume: {resume}");
    let after = rescue.file("status-after.txt");
    assert!(after.contains("no luksify conversion"), "status after the rollback: {after}");
    let blkid = rescue.file("blkid-after.txt");
    assert!(blkid.contains("LVM2_member"), "no PV after the rollback: {blkid}");
    let v = uml()
        .disk(&d.disk1)
        .disk(&d.disk2)
        .out_dir(&d.state)
        .run_script(&format!(r#"bash "$UML_LIB/verify.sh" --plain --min-acked {acked_n}"#));
    v.assert_ok().assert_log_contains("VERIFY OK (plain)");
}

/// A power cut inside the *last* step of the LUKS2 reencryption (CI, power-cut seed
/// 1796327513: cut at 93.7% of 253 MiB). Opening the device recovers the interrupted
/// step, and libcryptsetup's recovery, when that step was the last, also writes the final
/// metadata: the reencryption is over before luksify's resume would run it. luksify must
/// see that and only finish (it failed with "no LUKS2 reencryption in progress").
/// The cut is aimed, not seeded: the PV sits on a pass-through (`fake`) whose data region
/// delays every write and flush by half a second (dm-delay; the header region is
/// immediate), so each step holds its "in progress" metadata on the disk for seconds
/// before its commit (a step takes about 3.7 s so). libcryptsetup's progress callback
/// reports the offset from *before* the step just committed (crypt_reencrypt_run calls it
/// ahead of reencrypt_context_update; 2.6.1): a reported cursor in (S, 2S] means every step
/// but the last one (the hotzone [0, S)) is committed. The guest signals that, and the
/// cut comes 1.8 s later, inside the last step. The rescue boot checks that the cut landed
/// there before anything else.
/// The conversion runs with a 256-bit key, which luksify has no userspace cipher for: its
/// steps are libcryptsetup's, as in every `luksify resume` (luksify's own steps never leave
/// an interrupted step on the disk; `engine::sim::steps_tests` sweeps them).
#[test]
fn a_power_cut_inside_the_last_step_is_recovered_by_the_open_and_luksify_resume_finishes() {
    let dir = test_dir("powercut-last-step");
    let d = fresh_copy(&dir);
    let mut g = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).spawn_script(
        r#"
exec 2> "$OUT/boot1.err"
pass_through dm-delay linear
vgchange -ay vg0 >/dev/null; mknodes
mkdir -p /mnt/root; mount /dev/vg0/root /mnt/root
printf 'last step passphrase' > "$OUT/key"
start_writer /mnt/root/records.dat "$OUT/acked"; wait_acked 20
DRY=$("$LUKSIFY" --dry-run --json /dev/mapper/fake)
S=$(echo "$DRY" | sed -n 's/.*"shift_sectors": \([0-9]*\).*/\1/p')
[ -n "$S" ] || die "no shift in the dry-run: $DRY"
echo "$S" > "$OUT/shift"
printf '0 %s linear %s 0\n%s %s delay %s %s 0 %s %s 500\n' $S $MAJMIN $S $((N - S)) $MAJMIN $S $MAJMIN $S | dmsetup load fake
dmsetup suspend fake; dmsetup resume fake
dmsetup table fake > "$OUT/fake-table.txt"
"$LUKSIFY" --yes --no-integrate --key-file "$OUT/key" --key-size 256 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --progress-json /dev/mapper/fake 2> /tmp/progress &
P=$!
while kill -0 $P 2>/dev/null; do
    c=$(grep -o '"cursor":[0-9]*' /tmp/progress | tail -1 | cut -d: -f2 || true)
    if [ -n "$c" ] && [ "$c" -gt "$S" ] && [ "$c" -le $((2 * S)) ]; then
        cp /tmp/progress "$OUT/progress.log"; echo go > "$OUT/cut-now"; sync "$OUT/cut-now"; break
    fi
    sleep 0.02
done
set +e; wait $P; set -e
cp /tmp/progress "$OUT/progress.log"
echo "LUKSIFY ENDED BEFORE THE LAST STEP"; echo done > "$OUT/cut-now"; sync "$OUT/cut-now"
sleep 600
"#,
    );
    g.wait_for_file("cut-now", Duration::from_secs(240));
    std::thread::sleep(Duration::from_millis(1800));
    g.power_cut();
    let cut = g.wait();
    assert!(
        !cut.log.contains("LUKSIFY ENDED BEFORE THE LAST STEP"),
        "luksify ended before its last step:\n{}",
        cut.file("progress.log")
    );
    let acked_n = acked_count(&d.state.join("acked"), 20);
    eprintln!("cut inside the last step with {acked_n} records acked");

    // Rescue media, on the partition itself (no pass-through now).
    let rescue = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).timeout(300).run_script(
        r#"
"$LUKSIFY" status /dev/ubda5 > "$OUT/status-cut.txt" 2>&1 || die "status failed: $(cat "$OUT/status-cut.txt")"
"$LUKSIFY" status --json /dev/ubda5 > "$OUT/status-cut.json" 2>&1 || die "status --json failed"
set +e
"$LUKSIFY" resume --yes --no-integrate --key-file "$OUT/key" /dev/ubda5 > "$OUT/resume.txt" 2>&1
echo $? > "$OUT/resume-rc"
set -e
cat "$OUT/resume.txt"
cryptsetup luksDump /dev/ubda5 > "$OUT/dump-after.txt" 2>&1 || true
"$LUKSIFY" status /dev/ubda5 > "$OUT/status-after.txt" 2>&1 || true
vgchange -an vg0 >/dev/null 2>&1 || true
dmsetup remove fake_crypt 2>/dev/null || true
echo RESCUE-DONE
"#,
    );
    rescue.assert_ok().assert_log_contains("RESCUE-DONE");
    // The cut landed inside the last step: a step interrupted, one hotzone from the end.
    let status = rescue.file("status-cut.txt");
    let json = rescue.file("status-cut.json");
    let num = |k: &str| -> u64 {
        let at = json.find(&format!("\"{k}\": ")).unwrap_or_else(|| panic!("no {k} in {json}"));
        json[at + k.len() + 4..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap()
    };
    let s: u64 = rescue.file("shift").trim().parse().unwrap();
    let (l, enc) = (num("total_bytes") / 512, num("moved_bytes") / 512);
    assert!(
        json.contains("\"state\": \"crashed\"") && status.contains("step interrupted") && l - enc <= s && enc < l,
        "the cut missed the last step (test-bed timing; {enc} of {l} sectors encrypted, hotzone {s}):\n{status}\n{json}"
    );
    let resume = rescue.file("resume.txt");
    assert_eq!(rescue.file("resume-rc").trim(), "0", "luksify resume: {resume}");
    assert!(resume.contains("the recovered step was the last one"), "luksify resume: {resume}");
    let dump = rescue.file("dump-after.txt");
    assert!(dump.contains("LUKS header information") && !dump.contains("online-reencrypt"), "{dump}");
    assert!(rescue.file("status-after.txt").contains("no luksify conversion"), "{}", rescue.file("status-after.txt"));
    let v = uml().disk(&d.disk1).disk(&d.disk2).out_dir(&d.state).run_script(&format!(
        r#"bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file "$OUT/key" --min-acked {acked_n}"#
    ));
    v.assert_ok().assert_log_contains("VERIFY OK (luks)");
}
