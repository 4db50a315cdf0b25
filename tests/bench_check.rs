//! The benchmark command `qemu/bench` (README.md, "Benchmark"): its quick self-test
//! `--check` boots User-Mode Linux once and must produce every measurement; bad arguments
//! are refused before anything runs. Never skips: without UML it fails, naming the package.
mod support;

use std::path::Path;
use std::process::{Command, Output};
use support::*;

fn bench(args: &[&str]) -> Output {
    Command::new(repo().join("qemu/bench")).args(args).output().expect("run qemu/bench")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every measurement `qemu/bench` reports for a size, as a positive number.
const POSITIVE: &[&str] = &[
    "size_mib",
    "device_bytes",
    "move_bytes",
    "shift_sectors",
    "key_bits",
    "raw_write_s",
    "raw_write_mib_s",
    "raw_read_s",
    "raw_read_mib_s",
    "raw_copy_s",
    "raw_copy_mib_s",
    "cs_bench_enc_mib_s",
    "cs_bench_dec_mib_s",
    "dd_crypt_s",
    "dd_crypt_mib_s",
    "reencrypt_s",
    "reencrypt_mib_s",
    "luksify_offline_s",
    "luksify_offline_mib_s",
    "luksify_offline_steps",
    "luksify_offline_max_stall_ms",
    "luksify_online_s",
    "luksify_online_mib_s",
    "luksify_online_steps",
    "luksify_online_max_stall_ms",
    "ratio_offline_to_dd_crypt",
    "ratio_offline_to_reencrypt",
    "ratio_online_to_dd_crypt",
    "ratio_online_to_reencrypt",
    "ratio_offline_to_raw_copy",
    "ratio_online_to_raw_copy",
    "luksify_offline_step_median_ms",
    "luksify_offline_step_max_ms",
    "luksify_online_step_median_ms",
    "luksify_online_step_max_ms",
    "lat_baseline_count",
    "lat_baseline_median_ms",
    "lat_baseline_p99_ms",
    "lat_baseline_max_ms",
    "lat_during_count",
    "lat_during_median_ms",
    "lat_during_p99_ms",
    "lat_during_max_ms",
];
/// ... and those of one format: LUKS1 steps are luksify's own, each with its stall and the
/// medians of where its time goes; a LUKS2 conversion's one suspended window is the cut-over
/// (libcryptsetup's steps report none).
const POSITIVE_LUKS1: &[&str] = &[
    "luksify_offline_unfrozen_max_stall_ms",
    "luksify_online_unfrozen_max_stall_ms",
    "luksify_offline_split_copy_median_ms",
    "luksify_offline_split_readback_median_ms",
    "luksify_offline_split_suspend_median_ms",
    "luksify_offline_split_resume_median_ms",
    "luksify_online_split_copy_median_ms",
    "luksify_online_split_readback_median_ms",
    "luksify_online_split_suspend_median_ms",
    "luksify_online_split_resume_median_ms",
];
const POSITIVE_LUKS2: &[&str] = &["luksify_offline_cutover_ms", "luksify_online_cutover_ms"];
/// LUKS1: medians that may round to 0 ms (a step's last comparison and its commit).
const ZERO_OK_LUKS1: &[&str] = &[
    "luksify_offline_split_compare_median_ms",
    "luksify_offline_split_commit_median_ms",
    "luksify_online_split_compare_median_ms",
    "luksify_online_split_commit_median_ms",
];
/// Counts that may be zero.
const COUNTS: &[&str] = &[
    "lat_baseline_over_100ms",
    "lat_during_over_100ms",
    "luksify_offline_cut_windows",
    "luksify_online_cut_windows",
    "luksify_offline_vm_freezes",
    "luksify_online_vm_freezes",
    "luksify_offline_vm_freeze_max_ms",
    "luksify_online_vm_freeze_max_ms",
];

/// One boot per format, one after the other (two benchmarks side by side would measure each
/// other).
#[test]
fn check_runs_every_measurement_in_one_boot_per_format() {
    check("luks2", POSITIVE_LUKS2, &[], "luksify LUKS2 cut-over");
    check("luks1", POSITIVE_LUKS1, ZERO_OK_LUKS1, "online step, medians in ms: copy");
}

fn check(luks_type: &str, positive: &[&str], zero_ok: &[&str], table_line: &str) {
    uml(); // panics, naming the package, when User-Mode Linux is missing
    let dir = test_dir(&format!("bench-check-{luks_type}"));
    let out = dir.join("out");
    let _slot = slot();
    let t0 = std::time::Instant::now();
    let o = Command::new(repo().join("qemu/bench"))
        .arg("--check")
        .arg("--luks-type")
        .arg(luks_type)
        .arg("--out")
        .arg(&out)
        .arg("--luksify")
        .arg(luksify_bin())
        .env("LKTEST_BIN", lktest())
        .output()
        .expect("run qemu/bench --check");
    let secs = t0.elapsed().as_secs_f64();
    let log = || {
        let g = std::fs::read_to_string(out.join("96M/guest.log")).unwrap_or_default();
        let lines: Vec<&str> = g.lines().collect();
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}\n--- last lines of {}/96M/guest.log ---\n{}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o),
            out.display(),
            lines[lines.len().saturating_sub(60)..].join("\n")
        )
    };
    assert!(o.status.success(), "qemu/bench --check exited with {:?}\n{}", o.status.code(), log());
    assert!(stderr(&o).contains("bench --check: OK"), "{}", log());
    let table = String::from_utf8_lossy(&o.stdout);
    for row in [
        "dd through dm-crypt",
        "cryptsetup reencrypt",
        "luksify offline",
        "luksify online",
        "during luksify online",
        "/raw copy",
        "luksify step time",
        table_line,
    ] {
        assert!(table.contains(row), "the table lacks {row:?}\n{}", log());
    }
    assert!(!table.contains("FAILED"), "{}", log());

    let json = std::fs::read_to_string(out.join("bench.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("bench.json: {e}\n{json}"));
    assert_eq!(v["schema"], 1, "{json}");
    let sizes = v["sizes"].as_array().unwrap_or_else(|| panic!("no sizes: {json}"));
    assert_eq!(sizes.len(), 1, "{json}");
    let s = &sizes[0];
    assert_eq!(s["size_mib"], 96, "{json}");
    assert_eq!(s["cipher"], "aes-xts-plain64", "{json}");
    assert_eq!(s["key_bits"], 512, "{json}");
    assert_eq!(s["luks_type"], luks_type, "{json}");
    let bad: Vec<String> = POSITIVE
        .iter()
        .chain(positive)
        .filter(|k| !s[**k].as_f64().is_some_and(|x| x > 0.0))
        .map(|k| format!("{k}={}", s[*k]))
        .chain(COUNTS.iter().filter(|k| s[**k].as_u64().is_none()).map(|k| format!("{k}={}", s[*k])))
        .chain(zero_ok.iter().filter(|k| !s[**k].as_f64().is_some_and(|x| x >= 0.0)).map(|k| format!("{k}={}", s[*k])))
        .collect();
    assert!(bad.is_empty(), "bench.json lacks positive measurements: {bad:?}\n{json}");
    assert!(!s.as_object().unwrap().keys().any(|k| k.ends_with("_error")), "a measurement failed: {json}");
    // the writer ran before and during the online conversion
    assert!(s["lat_baseline_count"].as_u64().unwrap() >= 10, "{json}");
    assert!(s["lat_during_count"].as_u64().unwrap() >= 1, "{json}");
    // one step per chunk line; the raw files behind the numbers are kept
    for f in ["progress.offline.jsonl", "progress.online.jsonl", "latency.us", "results.env", "plan.json"] {
        assert!(Path::new(&out.join("96M").join(f)).exists(), "{f} missing in {}", out.display());
    }
    assert!(out.join("tables.txt").exists());
    eprintln!("qemu/bench --check --luks-type {luks_type} took {secs:.1} s");
}

#[test]
fn bad_size_is_refused_with_a_clear_message() {
    for (arg, want) in [
        ("12X", "bad size '12X'"),
        ("256", "bad size '256'"),
        ("1.5G", "bad size '1.5G'"),
        ("256M,", "expected a list like 256M,2G"),
        ("-1M", "bad size '-1M'"),
        ("32M", "at least 96M"),
        ("0G", "bad size '0G'"),
    ] {
        let o = bench(&["--sizes", arg, "--out", "/nonexistent/never-created"]);
        assert_eq!(o.status.code(), Some(2), "--sizes {arg}: {:?} {}", o.status.code(), stderr(&o));
        assert!(stderr(&o).contains(want), "--sizes {arg}: stderr lacks {want:?}: {}", stderr(&o));
        assert!(!Path::new("/nonexistent/never-created").exists());
    }
}

#[test]
fn other_bad_arguments_are_refused() {
    for (args, want) in [
        (&["--frobnicate"][..], "unknown argument '--frobnicate'"),
        (&["--sizes"][..], "--sizes needs a value"),
        (&["--check", "--sizes", "256M"][..], "do not combine it with --sizes"),
        (&["--baseline-secs", "0"][..], "bad --baseline-secs '0'"),
        (&["--writer-interval-ms", "x"][..], "bad --writer-interval-ms 'x'"),
        (&["--luks-type", "luks3"][..], "bad --luks-type 'luks3'"),
        (&["--luksify", "/nonexistent/luksify", "--sizes", "96M"][..], "not an executable"),
    ] {
        let o = bench(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {:?} {}", o.status.code(), stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: stderr lacks {want:?}: {}", stderr(&o));
    }
}
