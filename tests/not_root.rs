//! Every command run by a user who is not root says so in one line, naming the command
//! and the device, and exits 2 (cryptsetup's "no permission"), before it looks at anything;
//! with `--json` the error is JSON on stdout too.
//!
//! Tests here usually run as root: the binary is then run as `nobody` through `setpriv`
//! (util-linux). Without setpriv the test fails: it never skips.

use std::process::{Command, Output};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// luksify with `args` as a user who is not root (`nobody` when the test runs as root).
fn luksify_unprivileged(args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_luksify");
    let mut c = if is_root() {
        let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("setpriv (util-linux) is needed to run luksify as nobody: apt-get install util-linux");
        let mut c = Command::new(setpriv);
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", bin]);
        c
    } else {
        Command::new(bin)
    };
    let o = c.args(args).stdin(std::process::Stdio::null()).output().expect("runs");
    // the check must have run as an unprivileged user, not root
    assert!(!String::from_utf8_lossy(&o.stderr).contains("setpriv:"), "setpriv failed: {o:?}");
    o
}

#[test]
fn every_command_says_in_one_line_that_it_must_run_as_root_and_exits_2() {
    let dev = "/dev/luksify-test-not-root";
    let cases: [(&[&str], &str); 5] = [
        (&["--yes", "--no-integrate", dev], "`luksify /dev/luksify-test-not-root`"),
        (&["--dry-run", dev], "`luksify --dry-run /dev/luksify-test-not-root`"),
        (&["resume", "--no-integrate", dev], "`luksify resume /dev/luksify-test-not-root`"),
        (&["status", dev], "`luksify status /dev/luksify-test-not-root`"),
        (&["status", "--json", dev], "`luksify status /dev/luksify-test-not-root`"),
    ];
    for (args, names) in cases {
        let o = luksify_unprivileged(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("luksify: "), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: names the command and device: {err}");
        assert!(err.contains("must run as root"), "{args:?}: {err}");
        assert!(err.contains("sudo"), "{args:?}: says what to do: {err}");
        if args.contains(&"--json") {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
            assert_eq!(v["error"]["code"], 2, "{v}");
            assert!(v["error"]["message"].as_str().unwrap().contains("must run as root"), "{v}");
        } else {
            assert!(o.stdout.is_empty(), "{args:?}: {o:?}");
        }
    }
}

#[test]
fn dry_run_json_as_not_root_is_json_too() {
    let o = luksify_unprivileged(&["--dry-run", "--json", "/dev/luksify-test-not-root"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(v["error"]["code"], 2, "{v}");
}

#[test]
fn help_and_version_need_no_root() {
    for a in ["--help", "--version"] {
        let o = luksify_unprivileged(&[a]);
        assert_eq!(o.status.code(), Some(0), "{a}: {o:?}");
    }
}
