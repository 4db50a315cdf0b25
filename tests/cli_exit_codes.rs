//! The exit codes as the user reads them: `luksify --help` and the man page list the one
//! table (src/error.rs `exit::TABLE`), and a usage error clap catches exits 2. Nothing here
//! needs root (`--help` and clap's errors come before the root check).

use std::process::Command;

fn luksify(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_luksify")).args(args).output().expect("runs")
}

#[test]
fn help_lists_every_exit_code() {
    let o = luksify(&["--help"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Exit status (0-5 as cryptsetup's where the case is the same):"), "{out}");
    for (c, what) in luksify::error::exit::TABLE {
        assert!(out.contains(&format!("  {c:<3} {what}")), "--help lacks exit {c}: {out}");
    }
}

#[test]
fn a_usage_error_exits_2() {
    for args in [&["--bogus", "/dev/sda5"][..], &["status"][..], &["--json", "/dev/sda5"][..]] {
        let o = luksify(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
    }
}

#[test]
fn the_man_page_has_the_exit_status_section() {
    let dir = std::env::temp_dir().join(format!("luksify-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = Command::new(env!("CARGO_BIN_EXE_luksify-gen-docs")).arg(&dir).output().expect("runs");
    assert!(o.status.success(), "{o:?}");
    let page = std::fs::read_to_string(dir.join("luksify.8")).unwrap();
    assert!(page.contains(".SH \"EXIT STATUS\"\n"), "{page}");
    for (c, _) in luksify::error::exit::TABLE {
        assert!(page.contains(&format!(".TP\n\\fB{c}\\fR\n")), "the man page lacks exit {c}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
