//! The full-system acceptance test: a real Debian bookworm (systemd, udev, lvm2,
//! cryptsetup-initramfs) booted under QEMU converts its own root PV online, then boots
//! through its encrypted root, the test typing the passphrase at the initramfs prompt on
//! the serial console. A second scenario cuts the power mid-conversion, finishes it from
//! rescue media, and boots the system normally.
//!
//! The image comes from `qemu/debian/build-image` (cached; see qemu/debian/README.md).
//! Each boot gets a control disk (ext4 `LKCTL`) with the luksify .deb, lktest and one stage script
//! of `qemu/debian/stages/`, which the image's `luksify-ctl.service` runs; the stage
//! reports `LKRESULT key=value` lines on the console. Acks of the live writer leave the
//! guest on its second serial port, into a host file that survives the power cut.
//!
//! Missing QEMU or debootstrap is a loud failure, never a skip.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
const PASSPHRASE: &str = "correct horse battery staple";
const NAME: &str = "vda5_crypt";

fn check_installed() {
    for (tool, _pkg) in [(QEMU, "qemu-system-x86"), ("debootstrap", "debootstrap"), ("debugfs", "e2fsprogs")] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        if !found {
            panic!("{tool} missing: apt-get install qemu-system-x86 debootstrap e2fsprogs (this test never skips)");
        }
    }
}

/// Runs a build script of the repository (its messages go to stderr) and returns the path
/// its last line of output names: the cached Debian image, the .deb.
fn built_path(script: &str) -> Result<PathBuf, String> {
    let mut words = script.split_whitespace();
    let out = Command::new(support::repo().join(words.next().unwrap()))
        .args(words)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run {script}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{script} failed (its messages are above)"));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let p = s.lines().last().map(|l| PathBuf::from(l.trim())).ok_or(format!("{script} printed no path"))?;
    let p = if p.is_absolute() { p } else { support::repo().join(p) };
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("{script} printed {}, which does not exist", p.display()))
    }
}

/// Which initramfs generator the test system boots with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flavor {
    /// Debian's default: initramfs-tools with cryptsetup-initramfs.
    InitramfsTools,
    /// dracut with systemd in the initramfs, hostonly (`build-image dracut`).
    Dracut,
}

/// The cached image directory of `flavor` (built on first use: once per test process, and
/// a lock in build-image serialises processes). The other tests wait here without a guest
/// slot.
fn image_of(flavor: Flavor) -> PathBuf {
    static IMAGES: [std::sync::OnceLock<Result<PathBuf, String>>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let (cell, script) = match flavor {
        Flavor::InitramfsTools => (&IMAGES[0], "qemu/debian/build-image"),
        Flavor::Dracut => (&IMAGES[1], "qemu/debian/build-image dracut"),
    };
    cell.get_or_init(|| {
        check_installed();
        let _slot = support::slot(); // the build boots a UML guest
        built_path(script)
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The Debian package of this tree (`packaging/build-deb`: the release build, stripped, with
/// its man page and completions; once per test process). The guests install luksify from
/// it with `dpkg -i`, the path a user takes, so a dependency it does not declare fails here.
fn deb() -> PathBuf {
    static DEB: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    DEB.get_or_init(|| built_path("packaging/build-deb")).clone().unwrap_or_else(|e| panic!("{e}"))
}

/// A control disk for one boot: the luksify package (common.sh installs it with `dpkg -i`),
/// lktest, the stage script as stage.sh, common.sh, and `extra` files (name, content).
fn ctl_disk(dir: &Path, stage: &str, extra: &[(&str, String)]) -> PathBuf {
    let c = dir.join("ctl");
    let _ = std::fs::remove_dir_all(&c);
    std::fs::create_dir_all(&c).unwrap();
    let stages = support::repo().join("qemu/debian/stages");
    std::fs::copy(stages.join(format!("{stage}.sh")), c.join("stage.sh")).unwrap();
    std::fs::copy(stages.join("common.sh"), c.join("common.sh")).unwrap();
    std::fs::copy(deb(), c.join("luksify.deb")).unwrap();
    std::fs::copy(support::lktest(), c.join("lktest")).unwrap();
    std::fs::write(c.join("passphrase"), PASSPHRASE).unwrap();
    std::fs::write(c.join("name"), NAME).unwrap();
    for (n, s) in extra {
        std::fs::write(c.join(n), s).unwrap();
    }
    let img = dir.join("ctl.img");
    let _ = std::fs::remove_file(&img);
    let st = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "LKCTL", "-d"])
        .arg(&c)
        .arg(&img)
        .arg("128M")
        .status()
        .unwrap();
    assert!(st.success(), "mke2fs for the control disk");
    img
}

/// Copies /vmlinuz-* and /initrd.img-* out of the /boot partition (p1) of `disk` with
/// debugfs (nothing is mounted on the host): the files the installed system made itself.
fn boot_files(disk: &Path, kver: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let out = Command::new("sfdisk").arg("-J").arg(disk).output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sfdisk -J");
    let start = j["partitiontable"]["partitions"][0]["start"].as_u64().expect("p1 start");
    let dev = format!("{}?offset={}", disk.display(), start * 512);
    let mut got = Vec::new();
    for f in [format!("vmlinuz-{kver}"), format!("initrd.img-{kver}")] {
        let to = dir.join(&f);
        let _ = std::fs::remove_file(&to);
        let st = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{f} {}", to.display()))
            .arg(&dev)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success() && to.exists(), "debugfs could not read /{f} from the /boot partition");
        got.push(to);
    }
    (got[0].clone(), got[1].clone())
}

/// One QEMU boot: console on stdio (kept in a buffer and in `<log>`), acks on the second
/// serial port into `acks`.
struct Vm {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
    started: Instant,
    name: String,
    _slot: support::Slot,
}

struct Boot<'a> {
    kernel: &'a Path,
    initrd: &'a Path,
    append: &'a str,
    disks: Vec<&'a Path>,
    acks: &'a Path,
    log: PathBuf,
}

impl Vm {
    fn start(name: &str, b: Boot) -> Vm {
        let slot = support::slot();
        let mut cmd = Command::new(QEMU);
        // -erms: with ERMS the guest kernel clears and copies pages with `rep stosb/movsb`,
        // which TCG runs slowly (soft lockups in clear_page_erms on the consoles); without
        // it the dracut scenario took 430 s instead of 485 (same image, more data left to
        // convert after its cut), its initramfs regeneration 77 s instead of 88 (2026-12-05)
        cmd.args(["-accel", "tcg", "-cpu", "max,-erms", "-smp", "1", "-m", "1024"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot", "-serial", "stdio"])
            .arg("-serial")
            .arg(format!("file:{}", b.acks.display()))
            .arg("-kernel")
            .arg(b.kernel)
            .arg("-initrd")
            .arg(b.initrd)
            .arg("-append")
            .arg(format!("{} console=ttyS0 panic=-1", b.append));
        for d in &b.disks {
            cmd.arg("-drive").arg(format!("file={},if=virtio,format=raw", d.display()));
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        eprintln!("[{name}] boot: {}", b.append);
        let mut child = cmd.spawn().expect("start qemu-system-x86_64");
        let stdin = child.stdin.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let log = std::fs::File::create(&b.log).unwrap();
        for mut src in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let out = out.clone();
            let mut log = log.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = src.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock().unwrap().extend_from_slice(&buf[..n]);
                    let _ = log.write_all(&buf[..n]);
                }
            });
        }
        Vm { child, stdin, out, started: Instant::now(), name: name.into(), _slot: slot }
    }

    /// Holds the whole guest still (SIGSTOP to QEMU, every thread of it stopped before this
    /// returns): its disk file then holds exactly what a power cut at this instant would
    /// leave (QEMU has written what the guest sent it; nothing else is there).
    fn freeze(&self) {
        let pid = self.child.id() as i32;
        // SAFETY: a signal to our own child
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP to QEMU");
        let all_stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|rd| {
                rd.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .is_ok_and(|st| st.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')))
                })
            })
        };
        let t0 = Instant::now();
        while !all_stopped() {
            assert!(t0.elapsed() < Duration::from_secs(30), "[{}] QEMU did not stop", self.name);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets a frozen guest go on (SIGCONT).
    fn thaw(&self) {
        // SAFETY: a signal to our own child
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) }, 0, "SIGCONT to QEMU");
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits until the console shows `pat` (panics on timeout or when QEMU ends first).
    fn wait_for(&mut self, pat: &str, timeout: Duration) {
        self.wait_for_any(&[pat], timeout)
    }

    /// Waits until the console shows one of `pats`.
    fn wait_for_any(&mut self, pats: &[&str], timeout: Duration) {
        let t0 = Instant::now();
        let pat = pats.join("\" or \"");
        loop {
            if let Some(p) = pats.iter().find(|p| self.console().contains(**p)) {
                eprintln!("[{}] {:.0} s: saw {p:?}", self.name, self.started.elapsed().as_secs_f64());
                return;
            }
            if self.exited() {
                std::thread::sleep(Duration::from_millis(300)); // let the readers drain
                if pats.iter().any(|p| self.console().contains(p)) {
                    return;
                }
                panic!(
                    "[{}] QEMU ended before the console showed {pat:?}; console:\n{}",
                    self.name,
                    tail(&self.console(), 60)
                );
            }
            if t0.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "[{}] no {pat:?} on the console after {timeout:?}; console:\n{}",
                    self.name,
                    tail(&self.console(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the console has a luksify progress line with moved_sectors at least
    /// `frac` of the total.
    fn wait_for_progress(&mut self, frac: f64, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            let c = self.console();
            let reached = c.lines().filter(|l| l.contains("\"event\":\"chunk\"")).any(|l| {
                let j: serde_json::Value = match serde_json::from_str(l[l.find('{').unwrap_or(0)..].trim()) {
                    Ok(j) => j,
                    Err(_) => return false,
                };
                let (m, t) = (j["moved_sectors"].as_f64().unwrap_or(0.0), j["total_sectors"].as_f64().unwrap_or(1.0));
                m >= frac * t
            });
            if reached {
                eprintln!(
                    "[{}] {:.0} s: conversion {:.0}% moved",
                    self.name,
                    self.started.elapsed().as_secs_f64(),
                    frac * 100.0
                );
                return;
            }
            assert!(
                !self.exited(),
                "[{}] QEMU ended before the conversion got {frac} of the way:\n{}",
                self.name,
                tail(&c, 60)
            );
            assert!(
                t0.elapsed() < timeout,
                "[{}] the conversion did not get {frac} of the way in {timeout:?}:\n{}",
                self.name,
                tail(&c, 60)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types the passphrase at the initramfs prompt until the initramfs reports the device
    /// set up: cryptroot's (initramfs-tools) or luksify-unlock's (dracut, mid-way) line
    /// "<name>: set up successfully", or systemd's "Finished" line of the unit that unlocks
    /// it (dracut, after the finish). A line typed before askpass has set up the terminal
    /// can be flushed away, so after a minute without an answer it is typed again (at most
    /// three times).
    fn unlock(&mut self) {
        let ok = format!("{NAME}: set up successfully");
        let for_name = format!("for {NAME}");
        let unlocked = |c: &str| c.contains(&ok) || c.lines().any(|l| l.contains("Finished") && l.contains(&for_name));
        for attempt in 1..=3 {
            std::thread::sleep(Duration::from_millis(500));
            self.type_line(PASSPHRASE);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) {
                if unlocked(&self.console()) {
                    eprintln!(
                        "[{}] {:.0} s: unlocked (passphrase typed {attempt} time(s))",
                        self.name,
                        self.started.elapsed().as_secs_f64()
                    );
                    return;
                }
                assert!(
                    !self.exited(),
                    "[{}] QEMU ended at the passphrase prompt:\n{}",
                    self.name,
                    tail(&self.console(), 60)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        panic!("[{}] the initramfs never reported {ok:?}:\n{}", self.name, tail(&self.console(), 60));
    }

    fn type_line(&mut self, s: &str) {
        self.stdin.write_all(format!("{s}\r").as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// The power cut: SIGKILL to QEMU (what the guest wrote and had acknowledged is in the
    /// image file; nothing else is).
    fn power_cut(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        eprintln!("[{}] power cut at {:.0} s", self.name, self.started.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(300));
        self.console()
    }

    /// Waits for the guest to power off; returns the console and the stage's results.
    fn finish(mut self, timeout: Duration) -> (String, BTreeMap<String, String>) {
        let t0 = Instant::now();
        while !self.exited() {
            if t0.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("[{}] still running after {timeout:?}; console:\n{}", self.name, tail(&self.console(), 80));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(300));
        let c = self.console();
        eprintln!("[{}] powered off after {:.0} s", self.name, self.started.elapsed().as_secs_f64());
        let r = results(&c);
        let times: Vec<String> =
            r.iter().filter(|(k, _)| k.starts_with("t_")).map(|(k, v)| format!("{}={v}s", &k[2..])).collect();
        eprintln!("[{}] stage times since its start: {}", self.name, times.join(" "));
        (c, r)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn results(console: &str) -> BTreeMap<String, String> {
    let mut r = BTreeMap::new();
    for l in console.lines() {
        if let Some(kv) = l.trim_end_matches('\r').strip_prefix("LKRESULT ") {
            if let Some((k, v)) = kv.split_once('=') {
                r.insert(k.to_string(), v.to_string());
            }
        }
        if let Some(rc) = l.trim_end_matches('\r').strip_prefix("LKCTL: stage rc=") {
            r.insert("stage_rc".into(), rc.into());
        }
    }
    r
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

fn get<'a>(r: &'a BTreeMap<String, String>, k: &str, console: &str) -> &'a str {
    r.get(k).map(String::as_str).unwrap_or_else(|| panic!("no LKRESULT {k}; console:\n{}", tail(console, 80)))
}

const SYSTEM_ROOT: &str = "root=/dev/mapper/vg0-root ro";
/// How long one boot may take before the test calls it hung: a dracut boot that finishes a
/// conversion regenerates the initramfs, which under emulation beside other guests can take
/// ten minutes on its own.
const BOOT_LIMIT: Duration = Duration::from_secs(1500);
/// The passphrase prompts on the console: initramfs-tools' cryptroot and luksify's dracut
/// unit (mid-way) ask "Please unlock disk <name>:", systemd-cryptsetup (dracut, after the
/// finish) "Please enter passphrase for disk <what>:".
const PROMPTS: [&str; 2] = ["Please unlock disk vda5_crypt", "Please enter passphrase for disk"];

/// Boots the converted system: the initramfs must ask for the passphrase on the console,
/// the root must come up on the LVs over the LUKS mapping, and every acked record and
/// every file of /usr must be intact.
fn boot_encrypted_and_verify(dir: &Path, disk: &Path, kver: &str, acks: &Path, usr_digest: &str, tag: &str) {
    let (kernel, initrd) = boot_files(disk, kver, dir);
    let n = support::acked_count(acks, 20);
    let ctl =
        ctl_disk(dir, "verify", &[("acked", std::fs::read_to_string(acks).unwrap()), ("min_acked", n.to_string())]);
    let sink = dir.join(format!("acks-{tag}.log"));
    let mut vm = Vm::start(
        tag,
        Boot {
            kernel: &kernel,
            initrd: &initrd,
            append: SYSTEM_ROOT,
            disks: vec![disk, &ctl],
            acks: &sink,
            log: dir.join(format!("{tag}.console.log")),
        },
    );
    vm.wait_for_any(&PROMPTS, BOOT_LIMIT);
    vm.unlock();
    let (c, r) = vm.finish(BOOT_LIMIT);
    assert_eq!(get(&r, "stage_rc", &c), "0", "verify stage failed:\n{}", tail(&c, 80));
    assert_eq!(get(&r, "root_source", &c), "/dev/mapper/vg0-root");
    let stack = get(&r, "root_stack", &c);
    assert!(
        stack.contains(&format!("{NAME} crypt")) && stack.contains("vda5 part"),
        "root is not on vg0 over {NAME} over vda5: {stack}"
    );
    assert_eq!(get(&r, "usr_digest", &c), usr_digest, "/usr changed across the conversion");
    assert_eq!(get(&r, "records_verified", &c), "yes");
}

/// A fresh copy of the installed system booted with the "convert" stage: the image, the
/// kernel version, the scratch dir, the disk, the acks file, the running VM.
struct Converting {
    img: PathBuf,
    kver: String,
    dir: support::TestDir,
    disk: PathBuf,
    acks: PathBuf,
}

fn start_converting(test: &str, vm_name: &str) -> (Converting, Vm) {
    start_converting_on(Flavor::InitramfsTools, test, vm_name)
}

fn start_converting_on(flavor: Flavor, test: &str, vm_name: &str) -> (Converting, Vm) {
    let img = image_of(flavor);
    let kver = std::fs::read_to_string(img.join("kver")).unwrap().trim().to_string();
    let dir = support::test_dir(test);
    let disk = dir.join("system.img");
    support::copy_sparse(&img.join("system.img"), &disk);
    let acks = dir.join("acks");
    let ctl = ctl_disk(&dir, "convert", &[]);
    let vm = Vm::start(
        vm_name,
        Boot {
            kernel: &img.join("vmlinuz"),
            initrd: &img.join("initrd.img"),
            append: SYSTEM_ROOT,
            disks: vec![&disk, &ctl],
            acks: &acks,
            log: dir.join("convert.console.log"),
        },
    );
    (Converting { img, kver, dir, disk, acks }, vm)
}

/// Scenario 1, the uninterrupted conversion. Not in the default run: its boot 1 is the
/// first boot of scenario 3 (the same `stages/convert.sh`) run to the end, and its finish
/// (luksify's integration, the initramfs regenerated without the boot chain) and boot 2
/// (the encrypted boot and check) are what scenario 3's `luksify-resume.service` and last
/// boot do; under emulation the suite cannot carry both within its budget on a slow CI
/// machine (CI 2026-12-04: the QEMU lane alone 77 min). `cargo test --test qemu_debian --
/// --ignored booted_debian`.
#[test]
#[ignore = "overlaps scenario 3 (see its doc), ~30 min under emulation: cargo test --test qemu_debian -- --ignored booted_debian"]
fn booted_debian_converts_its_root_pv_online_and_boots_through_the_passphrase_prompt() {
    let (Converting { kver, dir, disk, acks, .. }, vm) = start_converting("qemu_convert", "convert");
    let (c, r) = vm.finish(BOOT_LIMIT);
    assert_eq!(get(&r, "root_source", &c), "/dev/mapper/vg0-root");
    assert_eq!(get(&r, "luksify_rc", &c), "0", "luksify failed in the booted system:\n{}", tail(&c, 80));
    assert_eq!(get(&r, "stage_rc", &c), "0");
    assert!(c.contains("\"event\":\"done\""), "no done line from luksify");
    assert_ne!(get(&r, "initramfs_cryptsetup", &c), "0", "the regenerated initramfs has no cryptsetup");
    let usr = get(&r, "usr_digest", &c).to_string();
    boot_encrypted_and_verify(&dir, &disk, &kver, &acks, &usr, "verify");
}

/// The rescue-media branch: `disk` was cut off mid-conversion after the cut-over (its /usr
/// digest `usr`, the writer's acks in `acks`). Boot the rescue media (the same kernel and
/// initramfs, root on `rescue.img`) with `stages/rescue.sh`: the fence held, `luksify
/// resume` finishes, the installed system is integrated from the rescue system; then the
/// normal encrypted boot and check.
fn rescue_media_resume_then_the_system_boots_encrypted(
    img: &Path,
    dir: &Path,
    disk: &Path,
    kver: &str,
    acks: &Path,
    usr: &str,
) {
    // Rescue media: the same kernel and initramfs, root on the rescue disk; its udev and
    // LVM autoactivation see the half-converted disk.
    let rescue = dir.join("rescue.img");
    support::copy_sparse(&img.join("rescue.img"), &rescue);
    let ctl = ctl_disk(dir, "rescue", &[]);
    let vm = Vm::start(
        "rescue",
        Boot {
            kernel: &img.join("vmlinuz"),
            initrd: &img.join("initrd.img"),
            append: "root=LABEL=LKRESCUE rw",
            disks: vec![disk, &rescue, &ctl],
            acks: &dir.join("acks-rescue.log"),
            log: dir.join("rescue.console.log"),
        },
    );
    let (c, r) = vm.finish(BOOT_LIMIT);
    assert_eq!(get(&r, "rescue_root", &c), "/dev/vdb");
    // The fence: after udev and LVM autoactivation ran over every disk, nothing on the
    // half-converted partition looks like a PV (it is LUKS2), and no mapping was made from it.
    let blkid = get(&r, "fence_blkid", &c);
    // (PART_ENTRY_* describe the partition-table entry, not its contents)
    let seen: Vec<&str> = blkid
        .split_whitespace()
        .filter(|t| t.starts_with("TYPE=") || t.starts_with("PTTYPE=") || t.starts_with("UUID="))
        .collect();
    // (LUKS2: the half-converted partition is a LUKS2 reencryption in progress; blkid says
    // crypto_LUKS, never LVM2_member)
    assert!(
        seen.iter().any(|t| t.trim_matches('"').ends_with("crypto_LUKS")) && !blkid.contains("LVM2_member"),
        "blkid on the half-converted partition: {blkid}"
    );
    assert_eq!(get(&r, "fence_dm", &c), "", "device-mapper devices exist before luksify resume (autoactivation?)");
    assert_eq!(get(&r, "fence_pvs", &c), "", "LVM sees a PV on the half-converted partition");
    // ... and that is the fence's doing: once the PV shows (on the LUKS mapping), this
    // same rescue system activates its LVs by itself.
    assert!(
        get(&r, "autoactivated", &c).contains("root"),
        "the rescue system does not autoactivate LVM, so the fence check above proves nothing"
    );
    assert_eq!(get(&r, "resume_rc", &c), "0", "luksify resume failed on the rescue system:\n{}", tail(&c, 80));
    assert_eq!(get(&r, "integrate_rc", &c), "0", "integration into the installed system failed:\n{}", tail(&c, 80));
    assert_ne!(get(&r, "initramfs_cryptsetup", &c), "0", "the installed system's initramfs has no cryptsetup");
    assert_eq!(get(&r, "stage_rc", &c), "0");
    boot_encrypted_and_verify(dir, disk, kver, acks, usr, "after-rescue");
}

/// The seed of the random moments below: `LUKSIFY_QEMU_SEED`, or the clock (printed, so a
/// failure can be replayed).
fn seed() -> u64 {
    let s = std::env::var("LUKSIFY_QEMU_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("seed: LUKSIFY_QEMU_SEED={s}");
    s
}

/// A number in [0, 1) from `state` (splitmix64).
fn uniform(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// Boots the half-converted system with its own kernel and initramfs (made by luksify
/// before its cut-over): the test types the passphrase at the prompt, the system comes up
/// on the LUKS2 reencryption in progress, and `stages/resumeboot.sh` waits for
/// luksify-resume.service to finish the conversion and its integration.
fn boot_through_the_prompt_and_the_unit_finishes(dir: &Path, disk: &Path, kver: &str, tag: &str, scenario: &str) {
    let (kernel, initrd) = boot_files(disk, kver, dir);
    let ctl = ctl_disk(dir, "resumeboot", &[]);
    let mut vm = Vm::start(
        tag,
        Boot {
            kernel: &kernel,
            initrd: &initrd,
            append: SYSTEM_ROOT,
            disks: vec![disk, &ctl],
            acks: &dir.join(format!("acks-{tag}.log")),
            log: dir.join(format!("{tag}.console.log")),
        },
    );
    vm.wait_for(&format!("Please unlock disk {NAME}"), BOOT_LIMIT);
    vm.unlock();
    let (c, r) = vm.finish(BOOT_LIMIT);
    assert_eq!(get(&r, "root_source", &c), "/dev/mapper/vg0-root");
    assert!(get(&r, "root_stack", &c).contains(&format!("{NAME} crypt")), "{}", tail(&c, 80));
    assert_eq!(get(&r, "unit_enabled", &c), "enabled");
    assert_eq!(get(&r, "unit_result", &c), "success", "luksify-resume.service failed:\n{}", tail(&c, 120));
    assert_eq!(get(&r, "unit_exit", &c), "0");
    assert_eq!(get(&r, "unit_left", &c), "", "the boot chain was not removed at the finish");
    assert_eq!(get(&r, "initramfs_luksify", &c), "0", "the final initramfs still has luksify's scripts");
    assert_ne!(get(&r, "initramfs_cryptsetup", &c), "0");
    let ct = get(&r, "crypttab", &c);
    assert!(ct.starts_with(&format!("{NAME} UUID=")) && ct.ends_with(" none luks"), "final crypttab line: {ct}");
    let log = c.lines().skip_while(|l| !l.contains("Please unlock disk")).collect::<Vec<_>>();
    let done = log.iter().position(|l| l.contains("luksify: done:")).expect("no done line from the unit");
    eprintln!("[{scenario}] boot log from the prompt to the unit's done line:\n{}", log[..=done].join("\n"));
}

/// Issue 20 (a): a power cut at a random moment after the cut-over; the machine boots
/// through its own initramfs (the passphrase prompt on the console), the system comes up,
/// luksify-resume.service finishes the conversion, and the next boot is the ordinary
/// encrypted one with every file and acknowledged record intact.
///
/// The same first boot also serves the rescue-media scenario (2): once the power is cut,
/// the disk is copied, and the copy is finished from rescue media (`luksify resume`, as
/// README "Recovery" describes) and booted encrypted, beside the machine that boots
/// itself.
///
/// And it serves scenario 4 (issue 20 (d), (b); see
/// [`plain_boot_then_a_reboot_mid_conversion`]): when the console says "boot chain ready"
/// the guest is frozen, its disk and acks are copied (what a power cut at that instant
/// leaves: before the cut-over), and it goes on; the copy boots in a branch of its own.
/// One first boot instead of three: the suite's QEMU lane is its longest.
#[test]
fn one_first_boot_cut_before_and_after_the_cut_over_boots_itself_or_from_rescue_media() {
    let t0 = Instant::now();
    let pdir = support::test_dir("qemu_plaincut");
    let (pdisk, packs) = (pdir.join("system.img"), pdir.join("acks"));
    let mut plain: Option<std::thread::JoinHandle<()>> = None;
    let cut = cut_after_the_cut_over_with(Flavor::InitramfsTools, "bootcut", |vm, conv| {
        vm.freeze();
        support::copy_sparse(&conv.disk, &pdisk);
        std::fs::copy(&conv.acks, &packs).unwrap();
        let c = vm.console();
        vm.thaw();
        eprintln!("[plaincut] a copy of the disk at \"boot chain ready\" (before the cut-over)");
        let usr = get(&results(&c), "usr_digest", &c).to_string();
        let kver = conv.kver.clone();
        plain = Some(std::thread::spawn(move || {
            let t = Instant::now();
            plain_boot_then_a_reboot_mid_conversion(&pdir, &pdisk, &kver, &packs, &usr);
            eprintln!("[plaincut] branch took {:.0} s", t.elapsed().as_secs_f64());
        }));
    });
    let rdir = support::test_dir("qemu_rescue");
    let rdisk = rdir.join("system.img");
    support::copy_sparse(&cut.disk, &rdisk);
    let racks = rdir.join("acks");
    std::fs::copy(&cut.acks, &racks).unwrap();
    let (img, kver, usr) = (cut.img.clone(), cut.kver.clone(), cut.usr.clone());
    let rescue = std::thread::spawn(move || {
        let t = Instant::now();
        rescue_media_resume_then_the_system_boots_encrypted(&img, &rdir, &rdisk, &kver, &racks, &usr);
        eprintln!("[rescue] branch took {:.0} s", t.elapsed().as_secs_f64());
    });
    let own = std::thread::spawn(move || {
        let t = Instant::now();
        the_machine_boots_itself(cut, "bootcut");
        eprintln!("[bootcut] branch took {:.0} s", t.elapsed().as_secs_f64());
    });
    let ends = [own.join(), rescue.join(), plain.expect("no boot chain ready").join()];
    for r in ends {
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    }
    eprintln!("[first boot and its three branches] took {:.0} s", t0.elapsed().as_secs_f64());
}

/// Issue 20 (c): the same on a Debian that makes its initramfs with dracut (systemd in the
/// initramfs, hostonly): luksify's dracut module asks at the prompt and opens the
/// conversion in progress, luksify-resume.service finishes it, and the final boot goes
/// through dracut's own crypt module (systemd-cryptsetup and the crypttab entry).
///
/// In the suite since its boots lost the kvm module (build-image): about 11 minutes alone,
/// its own image build included (2026-12-05: image 189 s, first boot to the cut 209 s, the
/// boot through the prompt and the unit 212 s, the final boot 61 s).
#[test]
fn dracut_power_cut_after_the_cut_over_boots_through_the_prompt_and_the_unit_finishes() {
    power_cut_after_the_cut_over(Flavor::Dracut, "dracutcut");
}

fn power_cut_after_the_cut_over(flavor: Flavor, tag: &str) {
    let t0 = Instant::now();
    let cut = cut_after_the_cut_over(flavor, tag);
    the_machine_boots_itself(cut, tag);
    eprintln!("[{tag}] scenario took {:.0} s", t0.elapsed().as_secs_f64());
}

/// A disk cut off by a power cut at a seeded random moment after the cut-over, and what
/// its first boot left: the image, kernel version, scratch dir, disk, acks, /usr digest.
struct Cut {
    img: PathBuf,
    kver: String,
    dir: support::TestDir,
    disk: PathBuf,
    acks: PathBuf,
    usr: String,
}

/// Boot 1 of scenarios 2, 3 and (c): `stages/convert.sh` on a fresh copy of the system,
/// the power cut once the conversion is a seeded fraction of the way (5-90%, plus up to
/// 400 ms) past its cut-over.
fn cut_after_the_cut_over(flavor: Flavor, tag: &str) -> Cut {
    cut_after_the_cut_over_with(flavor, tag, |_, _| {})
}

/// The same, calling `at_ready(vm, converting)` once the console says "boot chain ready"
/// (luksify set up the boot chain, its cut-over has not begun).
fn cut_after_the_cut_over_with(flavor: Flavor, tag: &str, at_ready: impl FnOnce(&Vm, &Converting)) -> Cut {
    let mut rng = seed();
    let frac = 0.05 + 0.85 * uniform(&mut rng);
    let extra = Duration::from_millis((uniform(&mut rng) * 400.0) as u64);
    let (converting, mut vm) = start_converting_on(flavor, &format!("qemu_{tag}"), tag);
    vm.wait_for("boot chain ready", BOOT_LIMIT);
    at_ready(&vm, &converting);
    let Converting { img, kver, dir, disk, acks } = converting;
    vm.wait_for_progress(frac, BOOT_LIMIT);
    std::thread::sleep(extra);
    eprintln!("[{tag}] cut at {:.0}% moved + {extra:?}", frac * 100.0);
    let c = vm.power_cut();
    let r = results(&c);
    let usr = get(&r, "usr_digest", &c).to_string();
    assert!(!c.contains("\"event\":\"done\""), "the conversion finished before the cut; nothing was tested");
    if flavor == Flavor::Dracut {
        assert!(c.contains("dracut --regenerate-all --force"), "the boot chain did not use dracut:\n{}", tail(&c, 80));
    }
    Cut { img, kver, dir, disk, acks, usr }
}

/// Boot 2 with the installed system's own kernel and initramfs (made before the cut-over):
/// the prompt, the unit finishing; boot 3 the encrypted boot and check.
fn the_machine_boots_itself(cut: Cut, tag: &str) {
    let Cut { kver, dir, disk, acks, usr, .. } = cut;
    boot_through_the_prompt_and_the_unit_finishes(&dir, &disk, &kver, &format!("resumeboot-{tag}"), tag);
    boot_encrypted_and_verify(&dir, &disk, &kver, &acks, &usr, &format!("after-unit-{tag}"));
}

/// Issue 20 (d) and (b): a power cut after luksify set up the boot chain but before its
/// cut-over. The regenerated initramfs boots the plain PV without waiting for the LUKS
/// device that does not exist, and a later `luksify` run converts it; (b) that run is
/// interrupted by `systemctl reboot` at a seeded moment after its cut-over: logind tells
/// luksify, which holds a delay inhibitor (shown by `systemd-inhibit --list`), stops at
/// its next commit point and exits "paused". The reboot then goes through the passphrase
/// prompt, luksify-resume.service finishes, and the encrypted boot verifies everything.
///
/// `disk` is the system as a power cut at "boot chain ready" left it (`acks` the writer's
/// acks until then, `usr` its /usr digest); the first boot is shared with scenarios 2 and
/// 3 (the test above).
fn plain_boot_then_a_reboot_mid_conversion(dir: &Path, disk: &Path, kver: &str, acks: &Path, usr: &str) {
    let mut rng = seed();
    let reboot_at = 50 + (750.0 * uniform(&mut rng)) as u64; // per mille of the PV moved
    let (kernel, initrd) = boot_files(disk, kver, dir);
    let convert = std::fs::read_to_string(support::repo().join("qemu/debian/stages/convert.sh")).unwrap();
    let ctl = ctl_disk(dir, "plainboot", &[("convert.sh", convert), ("reboot_at", reboot_at.to_string())]);
    let acks2 = dir.join("acks-plainboot.log");
    eprintln!("[plaincut] the second run is to be rebooted at {:.1}% moved", reboot_at as f64 / 10.0);
    let vm = Vm::start(
        "plainboot",
        Boot {
            kernel: &kernel,
            initrd: &initrd,
            append: SYSTEM_ROOT,
            disks: vec![&disk, &ctl],
            acks: &acks2,
            log: dir.join("plainboot.console.log"),
        },
    );
    // (QEMU runs with -no-reboot: the guest's reboot ends it, and the test boots it again)
    let (c, r) = vm.finish(BOOT_LIMIT);
    assert_eq!(get(&r, "plain_blkid", &c), "LVM2_member", "the cut came after the cut-over: nothing tested");
    assert!(!c.contains("Please unlock disk"), "the plain boot asked for a passphrase");
    assert!(!c.contains("Waiting for encrypted source device"), "the plain boot waited for the LUKS device");
    assert!(c.contains("still the plain LVM PV"), "luksify's local-top script did not run:\n{}", tail(&c, 80));
    assert!(!get(&r, "plain_stack", &c).contains("crypt"));
    assert_eq!(get(&r, "unit_ran", &c), "0", "luksify-resume.service ran on the plain boot");
    let up: f64 = get(&r, "uptime_at_stage", &c).parse().unwrap();
    eprintln!("[plaincut] the plain system was up (stage start) {up:.0} s after the kernel started");
    // (b): the reboot came mid-conversion, with luksify's inhibitor held; luksify stopped at
    // a commit point because logind said the system was going down, and exited "paused" (4)
    let list = c
        .lines()
        .skip_while(|l| !l.contains("----- systemd-inhibit --list -----"))
        .take_while(|l| !l.contains("----- end of list -----"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("[plaincut] inhibitors when `systemctl reboot` was run:\n{list}");
    assert_ne!(get(&r, "inhibitor_luksify", &c), "0", "luksify held no logind inhibitor:\n{list}");
    assert!(
        list.contains("delay") && list.contains("shutdown:sleep"),
        "not a delay inhibitor for shutdown and sleep:\n{list}"
    );
    assert!(c.contains("holding a logind delay inhibitor"), "{}", tail(&c, 80));
    eprintln!("[plaincut] reboot issued at {} sectors moved", get(&r, "reboot_at_moved", &c));
    assert!(!c.contains("\"event\":\"done\""), "the conversion finished before the reboot; nothing was tested");
    let pause: Vec<&str> = c
        .lines()
        .filter(|l| l.contains("the system is shutting down") || l.contains("stopped at a safe point"))
        .collect();
    eprintln!("[plaincut] luksify at the reboot:\n{}", pause.join("\n"));
    assert!(c.contains("the system is shutting down: stopping at this commit point"), "{}", tail(&c, 80));
    assert!(c.contains("stopped at a safe point"), "no pause line:\n{}", tail(&c, 80));
    assert_eq!(get(&r, "luksify_rc", &c), "11", "luksify did not exit \"paused\":\n{}", tail(&c, 80));

    boot_through_the_prompt_and_the_unit_finishes(dir, disk, kver, "rebootresume", "plaincut");
    let both = dir.join("acks-both");
    let mut a = std::fs::read(acks).unwrap();
    a.extend(std::fs::read(&acks2).unwrap());
    std::fs::write(&both, a).unwrap();
    boot_encrypted_and_verify(dir, disk, kver, &both, usr, "after-plaincut");
}
