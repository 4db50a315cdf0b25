//! Host-side tests of the probe on real block devices (loop devices over image files), with
//! the real lvm2 under a private configuration. Skipped unless root with free loop devices.
//! The host has no device-mapper: the probe must say so in its warnings. Probing must not
//! change a single byte of the device.

use luksify::adapters::lvm::Lvm;
use luksify::adapters::probe::{probe, ProbeError, Prober, JOURNAL_MAGIC};
use luksify::core::facts::Content;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn tmpdir(tag: &str) -> Tmp {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d =
        std::env::temp_dir().join(format!("luksify-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&d).unwrap();
    Tmp(d)
}

/// A loop device over a sparse image of `bytes` bytes; detached on drop.
struct Loop {
    dev: String,
    img: PathBuf,
    _dir: Tmp,
}
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn attach(bytes: u64, tag: &str, prepare: impl FnOnce(&Path), ro: bool) -> Option<Loop> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("cannot run: not root (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)");
    }
    let dir = tmpdir(tag);
    let img = dir.0.join("disk.img");
    std::fs::File::create(&img).ok()?.set_len(bytes).ok()?;
    prepare(&img);
    let mut c = Command::new("losetup");
    c.args(["-f", "--show"]);
    if ro {
        c.arg("-r");
    }
    let out = c.arg(&img).output().ok()?;
    if !out.status.success() {
        panic!("cannot run: no free loop device (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)");
    }
    Some(Loop { dev: String::from_utf8(out.stdout).ok()?.trim().to_string(), img, _dir: dir })
}

fn write_at(img: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(img).unwrap().write_all_at(data, off).unwrap();
}

fn contents(img: &Path) -> Vec<u8> {
    std::fs::read(img).unwrap()
}

fn private_lvm(dir: &Path, dev: &str) -> Lvm {
    std::fs::write(
        dir.join("lvm.conf"),
        format!(
            "devices {{ filter = [ \"a|^{dev}$|\", \"r|.*|\" ] use_devicesfile = 0 obtain_device_list_from_udev = 0 }}\n\
             activation {{ udev_sync = 0 udev_rules = 0 }}\nbackup {{ backup = 0 archive = 0 }}\n"
        ),
    )
    .unwrap();
    Lvm::system().env("LVM_SYSTEM_DIR", dir)
}

fn lvm_ok(conf: &Path, args: &[&str]) -> bool {
    Command::new("lvm")
        .args(args)
        .env("LVM_SYSTEM_DIR", conf)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn errors_name_the_problem() {
    let e = probe(Path::new("/dev/no-such-disk-luksify")).unwrap_err();
    assert!(matches!(e, ProbeError::NotFound { .. }));
    assert_eq!(
        e.to_string(),
        "/dev/no-such-disk-luksify: no such device (check the name: `lsblk` lists block devices)"
    );
    let e = probe(Path::new("/etc")).unwrap_err();
    assert!(e.to_string().starts_with("/etc is not a block device (it is a directory)"), "{e}");
    let e = probe(Path::new("/dev/zero")).unwrap_err();
    assert!(e.to_string().contains("a character device"), "{e}");
}

#[test]
fn real_pv_on_a_loop_device() {
    let Some(l) = attach(128 << 20, "probe-pv", |_| {}, false) else { return };
    let conf = tmpdir("probe-conf");
    let lvm = private_lvm(&conf.0, &l.dev);
    let vg = format!("luksifyprobe{}", std::process::id());
    if !(lvm_ok(&conf.0, &["pvcreate", "-y", &l.dev])
        && lvm_ok(&conf.0, &["vgcreate", &vg, &l.dev])
        && lvm_ok(&conf.0, &["lvcreate", "--driverloaded", "n", "-an", "-Zn", "-L", "40M", "-n", "root", &vg]))
    {
        panic!("cannot run: lvm could not make a PV here (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)");
    }
    let before = contents(&l.img);
    let pr = Prober { lvm: lvm.clone(), ..Prober::system() };
    let f = pr.probe(Path::new(&l.dev)).unwrap();
    assert!(contents(&l.img) == before, "probing changed the device");

    assert_eq!(f.path, l.dev);
    assert_eq!(f.canonical, l.dev);
    assert_eq!(format!("/dev/{}", f.kname), l.dev);
    assert_eq!(f.major, 7);
    assert_eq!(f.size_sectors, 128 * 2048);
    assert_eq!(f.logical_block_size, 512);
    assert!(f.physical_block_size >= 512);
    assert_eq!(f.partition_of, None);
    assert!(!f.read_only);
    assert_eq!(f.content, Content::LvmPv);
    assert!(f.holders.is_empty());
    assert!(f.direct_mounts.is_empty());
    assert!(!f.direct_swap);
    assert!(!f.luksify_journal && !f.luksify_marker);
    let lf = f.lvm.as_ref().expect("LVM facts for a PV");
    assert_eq!(lf.vg_name, vg);
    assert_eq!(lf.pe_start, 2048);
    assert_eq!(lf.lvs.len(), 1);
    assert_eq!(lf.lvs[0].dm_name, format!("{vg}-root"));
    if !std::path::Path::new("/dev/mapper/control").exists() {
        assert!(f.warnings.iter().any(|w| w.contains("device-mapper is not available")), "{:?}", f.warnings);
    }
    // The planner accepts these facts as a convertible PV (there is room: the VG uses 40M).
    let plan = luksify::core::plan::plan(&f, &luksify::core::plan::Options::default());
    assert!(plan.refusals.iter().all(|r| r.code != "not_lvm"), "{:?}", plan.refusals);

    // A symlink to the device: same facts, path as given.
    let link = conf.0.join("by-id-link");
    std::os::unix::fs::symlink(&l.dev, &link).unwrap();
    let f2 = pr.probe(&link).unwrap();
    assert_eq!(f2.path, link.display().to_string());
    assert_eq!(f2.canonical, l.dev);
    assert_eq!(f2.lvm.as_ref().map(|x| x.pv_uuid.clone()), Some(lf.pv_uuid.clone()));

    let _ = lvm_ok(&conf.0, &["vgremove", "-f", "--driverloaded", "n", &vg]);
}

#[test]
fn fence_marker_and_journal_in_an_odd_sized_tail() {
    // 32 MiB + 3 sectors: E = N rounded down to 8 sectors; the journal is at E-16 / E-8.
    let n: u64 = 65_536 + 3;
    let Some(l) = attach(
        n * 512,
        "probe-fence",
        |img| {
            let m = luksify::core::marker::encode("0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", 65_520);
            write_at(img, 0, &m);
            write_at(img, 65_528 * 512, JOURNAL_MAGIC);
        },
        false,
    ) else {
        panic!("cannot attach a loop device (these tests need root and free loop devices)");
    };
    let before = contents(&l.img);
    // No LVM configuration at all: the probe must not call LVM for a marker.
    let pr = Prober { lvm: Lvm::with_program("/nonexistent/lvm"), ..Prober::system() };
    let f = pr.probe(Path::new(&l.dev)).unwrap();
    assert!(contents(&l.img) == before, "probing changed the device");
    assert_eq!(f.size_sectors, n);
    assert_eq!(f.content, Content::LuksifyMarker);
    assert!(f.luksify_marker);
    assert!(f.luksify_journal);
    assert!(f.lvm.is_none());
    let plan = luksify::core::plan::plan(&f, &luksify::core::plan::Options::default());
    assert!(plan.refusals.iter().any(|r| r.code == "conversion_in_progress"));
}

#[test]
fn journal_magic_past_the_aligned_end_is_not_a_journal() {
    // Magic in the last 3 sectors (past E) or mid-slot is not where luksify writes it.
    let n: u64 = 65_536 + 3;
    let Some(l) = attach(
        n * 512,
        "probe-nojournal",
        |img| {
            write_at(img, 65_536 * 512, JOURNAL_MAGIC);
            write_at(img, 65_520 * 512 + 8, JOURNAL_MAGIC);
        },
        false,
    ) else {
        panic!("cannot attach a loop device (these tests need root and free loop devices)");
    };
    let pr = Prober { lvm: Lvm::with_program("/nonexistent/lvm"), ..Prober::system() };
    let f = pr.probe(Path::new(&l.dev)).unwrap();
    assert!(!f.luksify_journal);
    assert_eq!(f.content, Content::Nothing);
}

#[test]
fn read_only_device_and_a_filesystem_mounted_directly() {
    let Some(l) = attach(
        32 << 20,
        "probe-ext4",
        |img| {
            let _ = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(img).output();
        },
        true,
    ) else {
        panic!("cannot attach a loop device (these tests need root and free loop devices)");
    };
    let pr = Prober { lvm: Lvm::with_program("/nonexistent/lvm"), ..Prober::system() };
    let f = pr.probe(Path::new(&l.dev)).unwrap();
    assert!(f.read_only);
    if f.content != (Content::Filesystem { fstype: "ext4".into() }) {
        panic!("no ext4 on the test image ({:?}): apt-get install e2fsprogs", f.content);
    }
    let mnt = tmpdir("probe-mnt");
    let mp = mnt.0.join("with space");
    std::fs::create_dir_all(&mp).unwrap();
    let mounted = Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&l.dev)
        .arg(&mp)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        panic!("mounting the test image failed (needs root)");
    }
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mp.clone());
    let f = pr.probe(Path::new(&l.dev)).unwrap();
    assert_eq!(f.direct_mounts, vec![mp.display().to_string()], "mountinfo's \\040 is decoded");
    let plan = luksify::core::plan::plan(&f, &luksify::core::plan::Options::default());
    assert!(plan.refusals.iter().any(|r| r.code == "mounted_directly"));
    assert!(plan.refusals.iter().any(|r| r.code == "read_only"));
}
