//! qemu/uml/kernel, the test bed's one choice of User-Mode Linux kernel, tried with stand-in
//! kernels (shell scripts that print what a real kernel prints on its console), so that both
//! branches run on any machine: the packaged kernel where it boots, the fetched one where it
//! panics, and a loud failure where nothing boots. A stand-in never runs the probe's init (that
//! would mount /proc and power off the host): it only prints.
//!
//! The real choice on this machine is exercised by every UML test (they all boot through it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch directory for a test's cache: under target/, unless the checkout itself lies
/// where the guest mounts its own tmpfs (a clone under /tmp), which the script rightly
/// refuses for a cache: then under $HOME/.cache.
fn scratch(name: &str) -> PathBuf {
    let covered = ["/tmp", "/run", "/mnt", "/var/tmp"];
    let target = repo().join("target");
    let base = if covered.iter().any(|c| target.starts_with(c)) {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/luksify-tests")
    } else {
        target
    };
    let d = base.join("testbed-kernel-choice").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_exec(p: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, body).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A stand-in kernel that boots: prints what the probe's init prints, counts its boots.
fn booting_kernel(dir: &Path, name: &str, release: &str) -> PathBuf {
    let p = dir.join(name);
    write_exec(
        &p,
        &format!(
            "#!/bin/sh\necho boot >> {count}\necho 'Linux version {release}'\n\
             echo 'Run /x/probe-init as init process'\necho 'LUKSIFY-UML-PROBE-OK {release}'\n\
             echo 'reboot: Power down'\n",
            count = dir.join(format!("{name}.boots")).display()
        ),
    );
    p
}

/// A stand-in kernel that dies as bookworm's 6.1 does on a host with AVX-512.
fn panicking_kernel(dir: &Path) -> PathBuf {
    let p = dir.join("panics");
    write_exec(
        &p,
        "#!/bin/sh\necho 'Run /x/probe-init as init process'\n\
         echo 'userspace - ptrace set fp regs failed, errno = 14'\n\
         echo 'Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b'\nkill -ABRT $$\n",
    );
    p
}

fn modules(dir: &Path, release: &str) -> PathBuf {
    let m = dir.join("modules");
    std::fs::create_dir_all(m.join(release)).unwrap();
    m
}

fn boots(dir: &Path, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{name}.boots"))).map(|s| s.lines().count()).unwrap_or(0)
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn choose(dir: &Path, packaged: &Path, mods: &Path, extra_env: &[(&str, String)]) -> Out {
    let mut c = Command::new(repo().join("qemu/uml/kernel"));
    c.env("LUKSIFY_UML_CACHE", dir.join("cache"))
        .env("LUKSIFY_UML_PACKAGED", packaged)
        .env("LUKSIFY_UML_PACKAGED_MODULES", mods);
    for (k, v) in extra_env {
        c.env(k, v);
    }
    let o = c.output().expect("run qemu/uml/kernel");
    Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).unwrap_or_else(|| panic!("no {name}= in {out:?}"))
}

#[test]
fn the_packaged_kernel_is_chosen_when_it_boots_and_the_choice_is_remembered() {
    let d = scratch("packaged");
    let k = booting_kernel(&d, "linux.uml", "6.1.176");
    let m = modules(&d, "6.1.176");
    let o = choose(&d, &k, &m, &[]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(field(&o.stdout, "UML_KERNEL"), k.to_str().unwrap());
    assert_eq!(field(&o.stdout, "UML_MODULES"), m.to_str().unwrap());
    assert_eq!(field(&o.stdout, "UML_KVER"), "6.1.176");
    assert_eq!(field(&o.stdout, "UML_ORIGIN"), "packaged");
    assert_eq!(boots(&d, "linux.uml"), 1);
    // remembered: the second call does not boot the kernel again and says the same
    let o2 = choose(&d, &k, &m, &[]);
    assert!(o2.ok, "{}", o2.stderr);
    assert_eq!(o2.stdout, o.stdout);
    assert_eq!(boots(&d, "linux.uml"), 1, "a remembered choice must not probe again");
    // a changed packaged kernel (an upgrade) is probed again
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let k = booting_kernel(&d, "linux.uml", "6.1.177");
    std::fs::create_dir_all(m.join("6.1.177")).unwrap();
    let o3 = choose(&d, &k, &m, &[]);
    assert!(o3.ok, "{}", o3.stderr);
    assert_eq!(field(&o3.stdout, "UML_KVER"), "6.1.177");
    assert_eq!(boots(&d, "linux.uml"), 2);
}

#[test]
fn a_panicking_packaged_kernel_falls_back_to_the_fetched_one() {
    let d = scratch("fallback");
    let k = panicking_kernel(&d);
    let m = modules(&d, "6.1.176");
    // a fallback fetched and probed earlier (same versions): reused without the network
    let fb = d.join("cache/fallback-7.2um1-libc-2.43-7");
    std::fs::create_dir_all(fb.join("root/usr/lib/uml/modules/7.2.7")).unwrap();
    booting_kernel(&fb, "linux.uml", "7.2.7");
    std::fs::write(fb.join("probed"), "7.2.7\n").unwrap();
    let o = choose(&d, &k, &m, &[]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(field(&o.stdout, "UML_KERNEL"), fb.join("linux.uml").to_str().unwrap());
    assert_eq!(field(&o.stdout, "UML_MODULES"), fb.join("root/usr/lib/uml/modules").to_str().unwrap());
    assert_eq!(field(&o.stdout, "UML_KVER"), "7.2.7");
    assert_eq!(field(&o.stdout, "UML_ORIGIN"), "fetched");
    // the packaged kernel's failure is shown, with its console's telling lines
    assert!(o.stderr.contains("does not boot on this host"), "{}", o.stderr);
    assert!(o.stderr.contains("ptrace set fp regs failed"), "{}", o.stderr);
}

#[test]
fn no_kernel_that_boots_is_a_loud_failure_with_what_was_tried() {
    let d = scratch("none");
    let k = panicking_kernel(&d);
    let m = modules(&d, "6.1.176");
    // no package source: an apt-get that fails as one without a network would
    let bin = d.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    write_exec(&bin.join("apt-get"), "#!/bin/sh\necho 'E: Failed to fetch (no network)' >&2\nexit 100\n");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let o = choose(&d, &k, &m, &[("PATH", path)]);
    assert!(!o.ok, "succeeded without a kernel that boots: {}", o.stdout);
    assert!(o.stdout.is_empty(), "printed a choice: {}", o.stdout);
    assert!(o.stderr.contains("ptrace set fp regs failed"), "{}", o.stderr);
    assert!(o.stderr.contains("tried: packaged"), "{}", o.stderr);
    assert!(!d.join("cache/choice").exists(), "a failure must not be remembered");
}

#[test]
fn a_cache_the_guest_cannot_see_is_refused() {
    let d = scratch("tmpcache");
    let k = booting_kernel(&d, "linux.uml", "6.1.176");
    let m = modules(&d, "6.1.176");
    let o = choose(&d, &k, &m, &[("LUKSIFY_UML_CACHE", "/tmp/luksify-uml-cache".into())]);
    assert!(!o.ok);
    assert!(o.stderr.contains("choose another directory"), "{}", o.stderr);
    assert_eq!(boots(&d, "linux.uml"), 0);
}
