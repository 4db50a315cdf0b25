//! Helpers for the plain tests (no UML): a scratch directory removed on drop, and running a
//! program with its output checked. The UML tests have `tests/support`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A scratch directory removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `$TMPDIR/luksify-<prefix>-<tag>-<pid>-<n>`.
    pub fn new(prefix: &str, tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "luksify-{prefix}-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run `prog` with `args` in the C locale.
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog).args(args).env("LC_ALL", "C").output().unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

/// The standard output of a run that must have succeeded (else a panic showing both streams).
pub fn stdout_ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
