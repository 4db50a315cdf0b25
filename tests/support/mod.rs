//! Shared harness for the User-Mode Linux tests (`tests/uml_*.rs`).
//!
//! Each test file does `mod support;` and then, for example:
//!
//! ```ignore
//! let dir = support::test_dir("my_test");
//! let (d1, d2) = support::laptop_disks(&dir);
//! let run = support::uml().disk(&d1).disk(&d2).out_dir(dir.join("out"))
//!     .run_script(&format!("{}\nbash \"$UML_LIB/verify.sh\" --plain", support::MKDISK));
//! run.assert_ok();
//! ```
//!
//! The guest's root is the host's / mounted read-only; scripts run as bash with
//! `set -euo pipefail` and `$UML_LIB/common.sh` already sourced, and get
//! OUT (= the out dir, shared with the host), LUKSIFY, LKTEST, REPO, QEMU_DIR,
//! UML_LIB in their environment (see qemu/uml/init).
//!
//! Missing User-Mode Linux is a loud failure, never a skip.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Builds the realistic laptop disks on /dev/ubda + /dev/ubdb (see qemu/uml/lib/mkdisk.sh).
pub const MKDISK: &str = r#"bash "$UML_LIB/mkdisk.sh" --disk1 /dev/ubda --disk2 /dev/ubdb"#;

/// Guest shell helper: `fake_root DIR [options]` builds a minimal Debian-like root directory
/// for `luksify --root DIR` (never the host's /etc: the scratch root lives in the guest's
/// tmpfs). It has etc/fstab with root on `/dev/mapper/vg0-root` (so "/" is on the PV being
/// converted), etc/crypttab with a comment and an existing line, etc/initramfs-tools, and a
/// fake usr/sbin/update-initramfs that appends its arguments to DIR/update-initramfs.log.
/// `chroot DIR update-initramfs` must work, so /bin/sh and the libraries `ldd` names are
/// copied in. Options: `--no-cryptroot` (no cryptsetup-initramfs hook), `--no-generator`
/// (no initramfs-tools at all), `--boot-on-root` (no separate /boot in fstab), `--failing`
/// (update-initramfs exits 1), `--devices-file DEV` (an LVM devices file listing DEV, made
/// by `lvmdevices --adddev` with the guest's lvm.conf).
pub const FAKE_ROOT_SH: &str = r#"
fake_root() {
    local R=$1; shift
    local cryptroot=1 generator=1 boot=1 failing=0 devfile=
    while [ $# -gt 0 ]; do case "$1" in
        --no-cryptroot) cryptroot=0 ;; --no-generator) generator=0 ;;
        --boot-on-root) boot=0 ;; --failing) failing=1 ;;
        --devices-file) devfile=$2; shift ;;
        *) die "fake_root: unknown option $1" ;; esac; shift; done
    rm -rf "$R"; mkdir -p "$R/etc" "$R/usr/sbin" "$R/bin" "$R/tmp"
    printf '/dev/mapper/vg0-root / ext4 errors=remount-ro 0 1
' > "$R/etc/fstab"
    [ $boot = 1 ] && printf 'UUID=0000-fake-boot /boot ext2 defaults 0 2
' >> "$R/etc/fstab"
    printf '# <target name> <source device> <key file> <options>
swap_crypt /dev/sdb2 /dev/urandom swap,cipher=aes-xts-plain64
' > "$R/etc/crypttab"
    if [ $generator = 1 ]; then
        mkdir -p "$R/etc/initramfs-tools" "$R/usr/share/initramfs-tools/hooks"
        [ $cryptroot = 1 ] && printf '#!/bin/sh
' > "$R/usr/share/initramfs-tools/hooks/cryptroot"
        printf '#!/bin/sh
echo "update-initramfs $*" >> /update-initramfs.log
exit %s
' $failing > "$R/usr/sbin/update-initramfs"
        chmod 755 "$R/usr/sbin/update-initramfs"
    fi
    # the version luksify checks before setting up the boot chain (>= 2.3.7)
    printf '#!/bin/sh\necho "cryptsetup 2.6.1 flags: fake"\n' > "$R/usr/sbin/cryptsetup"
    chmod 755 "$R/usr/sbin/cryptsetup"
    cp /bin/sh "$R/bin/sh"
    for lib in $(ldd /bin/sh | grep -o '/[^ ]*'); do mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"; done
    if [ -n "$devfile" ]; then
        mkdir -p "$R/etc/lvm/devices"; cp "$LVM_SYSTEM_DIR/lvm.conf" "$R/etc/lvm/lvm.conf"
        LVM_SYSTEM_DIR="$R/etc/lvm" lvm lvmdevices --yes --config devices/use_devicesfile=1 --adddev "$devfile" || die "lvmdevices --adddev $devfile"
    fi
}
"#;

/// The repository root (where Cargo.toml of luksify is).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Root of per-test scratch directories: $CARGO_TARGET_TMPDIR/uml-tests if
/// cargo gives one, else <repo>/target/uml-tests.
pub fn tests_root() -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    let p = base.join("uml-tests");
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// A fresh scratch directory for one test: tests_root()/<name>-<pid>. The
/// pid keeps two `cargo test` runs on one machine (two developers sharing a
/// target dir) out of each other's way; directories of runs that are no
/// longer alive are removed here.
///
/// The directory goes when the returned guard drops: all of it after a test
/// that passed; after a failure the logs stay for diagnosis and only the disk
/// images (`*.img`, hundreds of MiB each) go. `LUKSIFY_KEEP_IMAGES=1` keeps everything, passed
/// or failed (to read a run's logs and dumps afterwards).
/// A whole suite keeping its images filled CI's disk (ENOSPC, 2026-12-03).
pub fn test_dir(name: &str) -> TestDir {
    let root = tests_root();
    let pid = std::process::id();
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(old) = n.strip_prefix(&format!("{name}-")).and_then(|s| s.parse::<i32>().ok()) {
                // SAFETY: signal 0 only checks whether the process exists
                let alive = unsafe { libc::kill(old, 0) } == 0
                    || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
                if old as u32 != pid && !alive {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let p = root.join(format!("{name}-{pid}"));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    TestDir(p)
}

/// A test's scratch directory; see [`test_dir`] for what its drop removes.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("LUKSIFY_KEEP_IMAGES").is_some_and(|v| v == "1") {
            eprintln!("kept {} (LUKSIFY_KEEP_IMAGES=1)", self.0.display());
            return;
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
            return;
        }
        let removed = remove_images(&self.0);
        eprintln!(
            "kept the logs of the failed test in {} ({removed} disk images removed; LUKSIFY_KEEP_IMAGES=1 keeps them)",
            self.0.display()
        );
    }
}

/// Removes every `*.img` under `dir` (recursively); returns how many.
fn remove_images(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n += remove_images(&p);
            } else if p.extension().is_some_and(|x| x == "img" || x == "qcow2" || x == "raw")
                && std::fs::remove_file(&p).is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

/// A sparse image file of `mib` MiB (created or resized; content kept).
pub fn sparse_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

/// Image sizes for `mkdisk.sh` with the given PV and tail sizes (MiB).
pub fn disk1_mib(pv_mib: u64, tail_mib: u64) -> u64 {
    1 + 8 + 1 + pv_mib + tail_mib + 2
}

/// The default layout's room past the PV (MiB).
pub const LAPTOP_TAIL_MIB: u64 = 30;

/// Two sparse images sized for the default mkdisk.sh layout (PV 256 MiB, tail 30 MiB: room
/// for a LUKS2 conversion, 2S = 32 MiB past the PV).
pub fn laptop_disks(dir: &Path) -> (PathBuf, PathBuf) {
    (sparse_image(dir, "disk1.img", disk1_mib(256, LAPTOP_TAIL_MIB)), sparse_image(dir, "disk2.img", 64))
}

/// sha256 of a host file, hex.
pub fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Copy a (sparse) image or a directory tree of small files, keeping holes.
pub fn copy_sparse(from: &Path, to: &Path) {
    let st = Command::new("cp").args(["-a", "--sparse=always", "--reflink=auto"]).arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

fn check_uml_installed() {
    static KERNEL: OnceLock<Result<String, String>> = OnceLock::new();
    // qemu/uml/kernel is the one place that chooses the kernel (the packaged one if it boots
    // here, else a newer one it fetches); qemu/uml/run asks it again, from its cache.
    let chosen = KERNEL.get_or_init(|| {
        let o = Command::new(repo().join("qemu/uml/kernel"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run qemu/uml/kernel: {e}"))?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    });
    if let Err(why) = chosen {
        panic!(
            "no User-Mode Linux kernel boots on this machine; run qemu/setup as root \
             (these tests never skip). qemu/uml/kernel said:\n{why}"
        );
    }
    for tool in ["/usr/sbin/lvm", "/usr/sbin/cryptsetup", "/usr/sbin/sfdisk", "/usr/sbin/mkfs.xfs", "/usr/sbin/dmsetup"]
    {
        if !Path::new(tool).exists() {
            panic!("{tool} missing: run qemu/setup as root (it installs lvm2 cryptsetup-bin fdisk xfsprogs dmsetup)");
        }
    }
}

/// Newest mtime of the files under `dir` (recursive).
fn newest_mtime(dir: &Path) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if let Ok(md) = std::fs::symlink_metadata(&p) {
                let m = if md.is_dir() { newest_mtime(&p) } else { md.modified().unwrap() };
                t = t.max(m);
            }
        }
    }
    t
}

/// Path of an up-to-date `lktest` binary, building it if needed. When the
/// lktest next to the luksify binary under test (`cargo build --workspace`
/// puts it there) is missing or older than testkit's sources, it is
/// built into target/uml-tests/testkit-target (a separate target dir, so this
/// never waits on the build lock of the `cargo test` that runs us).
pub fn lktest() -> PathBuf {
    static LK: OnceLock<PathBuf> = OnceLock::new();
    LK.get_or_init(|| {
        if let Ok(p) = std::env::var("LKTEST_BIN") {
            return PathBuf::from(p);
        }
        let src = newest_mtime(&repo().join("testkit"));
        let fresh = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).map(|m| m >= src).unwrap_or(false);
        let main = Path::new(env!("CARGO_BIN_EXE_luksify")).with_file_name("lktest");
        if fresh(&main) {
            return main;
        }
        let tdir = tests_root().join("testkit-target");
        let side = tdir.join("debug/lktest");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .current_dir(repo())
            .args(["build", "-p", "luksify-testkit", "--bin", "lktest", "--target-dir"])
            .arg(&tdir)
            .status()
            .expect("run cargo build -p luksify-testkit");
        assert!(st.success(), "cargo build -p luksify-testkit failed");
        assert!(side.exists(), "{} missing after build", side.display());
        side
    })
    .clone()
}

/// The luksify binary under test (cargo builds it for integration tests).
pub fn luksify_bin() -> PathBuf {
    std::env::var("LUKSIFY_BIN").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_luksify")))
}

// ---- limiting concurrent guests ------------------------------------------------

/// A slot among $LUKSIFY_UML_JOBS (default 2) concurrent UML guests, shared by
/// every test process on the machine (flock on files in tests_root()).
pub struct Slot {
    _f: std::fs::File,
}

pub fn slot() -> Slot {
    let jobs: usize = std::env::var("LUKSIFY_UML_JOBS").ok().and_then(|s| s.parse().ok()).unwrap_or(2).max(1);
    loop {
        for i in 0..jobs {
            let p = tests_root().join(format!(".uml-slot-{i}.lock"));
            let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).unwrap();
            // SAFETY: flock on an fd we own
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Slot { _f: f };
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- the builder ------------------------------------------------------------------

/// Start describing a guest. Panics (never skips) if UML is not installed.
pub fn uml() -> Uml {
    check_uml_installed();
    Uml { disks: Vec::new(), timeout: 120, mem: "384M".into(), out_dir: None, env: Vec::new() }
}

#[derive(Clone)]
pub struct Uml {
    disks: Vec<PathBuf>,
    timeout: u64,
    mem: String,
    out_dir: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Uml {
    /// Add a disk: the first is /dev/ubda, then /dev/ubdb, ...
    pub fn disk(mut self, p: impl AsRef<Path>) -> Self {
        self.disks.push(p.as_ref().to_path_buf());
        self
    }
    /// Guest wall-clock limit in seconds (default 120); the runner then kills it.
    pub fn timeout(mut self, secs: u64) -> Self {
        self.timeout = secs;
        self
    }
    /// Guest memory, e.g. "384M" (default).
    pub fn mem(mut self, m: &str) -> Self {
        self.mem = m.into();
        self
    }
    /// Host directory mounted at /run/out ($OUT) in the guest. Use the same one
    /// for several boots to carry state (manifests, acked records) across them.
    /// Default: a fresh temp dir per run.
    pub fn out_dir(mut self, p: impl AsRef<Path>) -> Self {
        self.out_dir = Some(p.as_ref().to_path_buf());
        self
    }
    /// Extra variable for the script: exported at the top of it.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    fn prepare(&self, script: &str) -> (PathBuf, PathBuf) {
        let out = match &self.out_dir {
            Some(p) => p.clone(),
            None => {
                static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // small (logs only); kept until a later run's sweep, as the run's
                // results are read from it after this returns
                let d = test_dir(&format!("anon-{n}"));
                let p = d.0.clone();
                std::mem::forget(d);
                p
            }
        };
        std::fs::create_dir_all(&out).unwrap();
        let mut text = String::from("set -euo pipefail\n. \"$UML_LIB/common.sh\"\n");
        for (k, v) in &self.env {
            text.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
        }
        text.push_str(script);
        text.push('\n');
        let sp = out.join("scenario.sh");
        std::fs::write(&sp, text).unwrap();
        (out, sp)
    }

    fn command(&self, out: &Path, scenario: &Path) -> Command {
        let mut c = Command::new(repo().join("qemu/uml/run"));
        c.arg("--out").arg(out).arg("--mem").arg(&self.mem).arg("--timeout").arg(self.timeout.to_string());
        for d in &self.disks {
            c.arg("--disk").arg(d);
        }
        c.arg(scenario);
        c.env("LUKSIFY_BIN", luksify_bin()).env("LKTEST_BIN", lktest());
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    /// Boot, run `script` (bash) as the guest's payload, power off; wait.
    pub fn run_script(&self, script: &str) -> GuestRun {
        self.spawn_script(script).wait()
    }

    /// Boot and run `script` in the background; returns at once (once UML started).
    pub fn spawn_script(&self, script: &str) -> RunningGuest {
        let slot = slot();
        let (out, sp) = self.prepare(script);
        let _ = std::fs::remove_file(out.join("uml.pgid"));
        // an out dir reused from an earlier boot still holds that boot's status
        let _ = std::fs::remove_file(out.join("rc"));
        let started = Instant::now();
        let child = self.command(&out, &sp).spawn().expect("start qemu/uml/run");
        let g = RunningGuest { child: Some(child), out_dir: out, started, _slot: slot };
        // the runner writes the pgid right after starting UML
        g.wait_for_file("uml.pgid", Duration::from_secs(30));
        g
    }
}

/// A finished guest.
#[derive(Debug)]
pub struct GuestRun {
    /// the scenario's exit status; 124 = timed out, 125 = died without rc (power cut, crash)
    pub rc: i32,
    /// the guest's log: init messages + the scenario's stdout and stderr
    pub log: String,
    /// what the runner printed (its own summary line, errors)
    pub runner_output: String,
    pub out_dir: PathBuf,
    pub elapsed: Duration,
}

impl GuestRun {
    fn tail(&self) -> String {
        let lines: Vec<&str> = self.log.lines().collect();
        let from = lines.len().saturating_sub(80);
        format!(
            "--- last {} lines of {}/guest.log ---\n{}\n--- runner ---\n{}",
            lines.len() - from,
            self.out_dir.display(),
            lines[from..].join("\n"),
            self.runner_output
        )
    }
    /// Panic with the log's tail unless the scenario exited 0.
    pub fn assert_ok(&self) -> &Self {
        self.assert_rc(0)
    }
    pub fn assert_rc(&self, rc: i32) -> &Self {
        assert_eq!(self.rc, rc, "guest exit status {} (expected {rc})\n{}", self.rc, self.tail());
        self
    }
    /// Panic unless the log contains `s`.
    pub fn assert_log_contains(&self, s: &str) -> &Self {
        assert!(self.log.contains(s), "guest log lacks {s:?}\n{}", self.tail());
        self
    }
    /// Contents of a file the guest wrote in $OUT.
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.out_dir.join(name))
            .unwrap_or_else(|e| panic!("{}/{name}: {e}\n{}", self.out_dir.display(), self.tail()))
    }
}

/// A guest running in the background.
pub struct RunningGuest {
    child: Option<Child>,
    pub out_dir: PathBuf,
    started: Instant,
    _slot: Slot,
}

impl RunningGuest {
    /// Process group of the UML kernel (all its host processes).
    pub fn pgid(&self) -> i32 {
        std::fs::read_to_string(self.out_dir.join("uml.pgid")).unwrap().trim().parse().unwrap()
    }
    fn alive(&self) -> bool {
        let pg = self.pgid();
        // The runner writes the pid of setsid's child before that child has made itself a
        // process group leader: until it has, no group `pg` exists, but the process does
        // (under load this window was long enough to read a live guest as ended).
        // SAFETY: signal 0 only checks existence
        unsafe { libc::kill(pg, 0) == 0 || libc::kill(-pg, 0) == 0 }
    }
    /// Wait until $OUT/name exists; panic after `timeout` or if the guest ended.
    pub fn wait_for_file(&self, name: &str, timeout: Duration) {
        self.wait_until(&format!("{name} to exist"), timeout, |_| true, name)
    }
    /// Wait until $OUT/name has at least `n` complete lines.
    pub fn wait_for_lines(&self, name: &str, n: usize, timeout: Duration) {
        self.wait_until(
            &format!("{n} lines in {name}"),
            timeout,
            |t| t.bytes().filter(|&b| b == b'\n').count() >= n,
            name,
        )
    }
    fn wait_until(&self, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool, name: &str) {
        let p = self.out_dir.join(name);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(t) = std::fs::read(&p) {
                if ok(&String::from_utf8_lossy(&t)) {
                    return;
                }
            }
            let ended = self.out_dir.join("rc").exists() || (name != "uml.pgid" && !self.alive());
            if ended || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.out_dir.join("guest.log")).unwrap_or_default();
                panic!(
                    "waited {:?} for {what}: {}\n--- {}/guest.log ---\n{log}",
                    timeout,
                    if ended { "the guest ended first" } else { "timed out" },
                    self.out_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// Cut the power: SIGKILL the whole UML process group, at once.
    pub fn power_cut(&mut self) {
        let pg = self.pgid();
        // SAFETY: kill on the process group we started
        let r = unsafe { libc::kill(-pg, libc::SIGKILL) };
        assert!(r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH));
    }
    /// Wait for the guest to end (normally, by timeout or by power_cut).
    pub fn wait(mut self) -> GuestRun {
        let child = self.child.take().unwrap();
        let o = child.wait_with_output().expect("wait for qemu/uml/run");
        let rc = o.status.code().unwrap_or(-1);
        let log = std::fs::read_to_string(self.out_dir.join("guest.log")).unwrap_or_default();
        let runner_output = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
        let run = GuestRun { rc, log, runner_output, out_dir: self.out_dir.clone(), elapsed: self.started.elapsed() };
        eprintln!("uml guest in {} ended with {rc} after {:.1}s", run.out_dir.display(), run.elapsed.as_secs_f64());
        run
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        // a panicking test must not leave a guest behind
        if let Some(mut c) = self.child.take() {
            if let Ok(s) = std::fs::read_to_string(self.out_dir.join("uml.pgid")) {
                if let Ok(pg) = s.trim().parse::<i32>() {
                    // SAFETY: our own process group
                    unsafe { libc::kill(-pg, libc::SIGKILL) };
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- a shared, once-built realistic disk ----------------------------------------

/// State of a disk built by mkdisk.sh: the images and the out dir holding its
/// manifests (disk.env, manifest.*, lvhash.txt, boot.sha256).
pub struct BuiltDisk {
    pub disk1: PathBuf,
    pub disk2: PathBuf,
    pub state: PathBuf,
    /// the guest run that built it
    pub build_log: String,
    pub build_secs: f64,
}

/// Hash of everything that decides what mkdisk.sh builds: the guest-side
/// scripts and lktest's sources.
fn golden_key() -> String {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    for d in ["qemu/uml/lib", "qemu/uml/init", "testkit/src", "testkit/Cargo.toml"] {
        let mut stack = vec![repo().join(d)];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                for e in std::fs::read_dir(&p).unwrap().flatten() {
                    stack.push(e.path());
                }
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    // the image sizes are part of the layout
    h.update(format!("disk1 {} MiB", disk1_mib(256, LAPTOP_TAIL_MIB)).as_bytes());
    for f in files {
        h.update(f.strip_prefix(repo()).unwrap().to_string_lossy().as_bytes());
        h.update(std::fs::read(&f).unwrap_or_default());
    }
    hex::encode(&h.finalize()[..8])
}

/// The realistic laptop disk (default mkdisk.sh), built once and cached in
/// tests_root()/golden-<key> (key: hash of the scripts and lktest sources, so
/// a change rebuilds it); shared by test processes. Copy it with `fresh_copy`.
pub fn golden() -> &'static BuiltDisk {
    static G: OnceLock<BuiltDisk> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    let _g = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    G.get_or_init(|| {
        let key = golden_key();
        let dir = tests_root().join(format!("golden-{key}"));
        // one builder at a time across processes
        let lockf = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(tests_root().join(".golden.lock"))
            .unwrap();
        // SAFETY: flock on an fd we own; released when lockf drops
        unsafe { libc::flock(lockf.as_raw_fd(), libc::LOCK_EX) };
        let done = |dir: &Path| BuiltDisk {
            disk1: dir.join("disk1.img"),
            disk2: dir.join("disk2.img"),
            state: dir.join("state"),
            build_log: std::fs::read_to_string(dir.join("state/guest.log")).unwrap_or_default(),
            build_secs: std::fs::read_to_string(dir.join("build_secs"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0.0),
        };
        if dir.join("complete").exists() {
            eprintln!("using the cached golden disk {}", dir.display());
            return done(&dir);
        }
        // goldens of older scripts go, once nobody can still be using them
        // (another checkout's tests may share this directory)
        for e in std::fs::read_dir(tests_root()).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if n.starts_with("golden-") && e.path() != dir && age.is_some_and(|a| a > Duration::from_secs(3600)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (d1, d2) = laptop_disks(&dir);
        let state = dir.join("state");
        let run = uml().disk(&d1).disk(&d2).out_dir(&state).timeout(180).run_script(MKDISK);
        run.assert_ok();
        std::fs::write(dir.join("build_secs"), format!("{:.1}", run.elapsed.as_secs_f64())).unwrap();
        std::fs::write(dir.join("complete"), "").unwrap();
        done(&dir)
    })
}

/// A private copy of the golden disk for one test: images and state in `dir`
/// (the state dir is `dir/out`, to be used as the guest's out dir).
pub fn fresh_copy(dir: &Path) -> BuiltDisk {
    let g = golden();
    let d1 = dir.join("disk1.img");
    let d2 = dir.join("disk2.img");
    copy_sparse(&g.disk1, &d1);
    copy_sparse(&g.disk2, &d2);
    let state = dir.join("out");
    std::fs::create_dir_all(&state).unwrap();
    for e in std::fs::read_dir(&g.state).unwrap().flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with("manifest.") || ["disk.env", "lvhash.txt", "boot.sha256", "key"].contains(&n.as_ref()) {
            std::fs::copy(e.path(), state.join(&*n)).unwrap();
        }
    }
    BuiltDisk { disk1: d1, disk2: d2, state, build_log: String::new(), build_secs: 0.0 }
}

/// A fresh boot of a converted copy: `verify.sh --luks /dev/ubda5 --key-file $OUT/key`
/// with `extra` arguments (`--name`, `--min-acked N`, ...) opens it with cryptsetup and checks
/// LVM, fsck, every file and acked record; it must end in `VERIFY OK (luks)`.
pub fn verify_luks_boot(d: &BuiltDisk, extra: &str) -> GuestRun {
    let run = uml()
        .disk(&d.disk1)
        .disk(&d.disk2)
        .out_dir(&d.state)
        .run_script(&format!(r#"bash "$UML_LIB/verify.sh" --luks /dev/ubda5 --key-file "$OUT/key" {extra}"#));
    run.assert_ok().assert_log_contains("VERIFY OK (luks)");
    run
}

// ---- host-side checks ------------------------------------------------------------

/// How many records the writer acknowledged: the complete, non-blank lines of its ack file
/// (a line cut short by a power cut does not count; 0 if there is no file). Tests whose
/// writer must have acked give the least they expect.
pub fn acked_count(acks: &Path, at_least: usize) -> usize {
    let s = std::fs::read_to_string(acks).unwrap_or_default();
    let n = s.split_inclusive('\n').filter(|l| l.ends_with('\n') && !l.trim().is_empty()).count();
    assert!(n >= at_least, "{}: {n} records acked, expected at least {at_least}", acks.display());
    n
}

/// Files under `dir` whose mtime or ctime is at or after `since` (unreadable entries skipped).
pub fn changed_since(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let since_ns = since.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i128;
    let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
            if ns(md.mtime(), md.mtime_nsec()) >= since_ns || ns(md.ctime(), md.ctime_nsec()) >= since_ns {
                out.push(p.clone());
            }
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}
