//! Host-side tests of the block-device adapter against the real tools: images made by
//! mkfs.ext2/3/4, mkfs.xfs, mkswap and cryptsetup luksFormat (LUKS1 and LUKS2) must be
//! recognised as blkid recognises them; block-device ioctls on a loop device. A missing tool
//! fails the test loudly (never a silent skip).

use luksify::adapters::blockdev::{self, BlockDev, OpenMode, Signature, PROBE_BYTES};
use luksify::core::facts::Content;
use std::path::{Path, PathBuf};
use std::process::Command;

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

fn image(dir: &Path, mb: u64) -> PathBuf {
    let p = dir.join("img");
    std::fs::File::create(&p).unwrap().set_len(mb << 20).unwrap();
    p
}

fn tool(cmd: &str, args: &[&str], img: &Path) -> bool {
    match Command::new(cmd).args(args).arg(img).stdin(std::process::Stdio::null()).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            panic!("cannot run: {cmd} failed: {} (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)", String::from_utf8_lossy(&o.stderr));
        }
        Err(e) => {
            panic!("cannot run: {cmd}: {e} (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)");
        }
    }
}

fn blkid_type(img: &Path) -> Option<String> {
    let o = Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE"]).arg(img).output().ok()?;
    Some(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn head(img: &Path) -> Vec<u8> {
    let d = BlockDev::open(img, OpenMode::READ_DIRECT).unwrap();
    let n = (PROBE_BYTES as u64).min(d.size_bytes().unwrap()) as usize;
    let mut b = vec![0u8; n];
    d.read_at(0, &mut b).unwrap();
    b
}

fn check(cmd: &str, args: &[&str], mb: u64, want: Content, blkid: &str) {
    let t = tmpdir("sig");
    let img = image(&t.0, mb);
    if !tool(cmd, args, &img) {
        return;
    }
    let got = blockdev::content_of(&blockdev::detect_signatures(&head(&img)));
    assert_eq!(got, want, "{cmd} {args:?}");
    if let Some(b) = blkid_type(&img) {
        assert_eq!(b, blkid, "blkid agrees that {cmd} {args:?} made a {blkid}");
    }
}

#[test]
fn ext2_ext3_ext4_as_mkfs_makes_them() {
    check("mkfs.ext2", &["-q", "-F"], 32, Content::Filesystem { fstype: "ext2".into() }, "ext2");
    check("mkfs.ext3", &["-q", "-F"], 32, Content::Filesystem { fstype: "ext3".into() }, "ext3");
    check("mkfs.ext4", &["-q", "-F"], 32, Content::Filesystem { fstype: "ext4".into() }, "ext4");
}

#[test]
fn xfs_as_mkfs_makes_it() {
    check("mkfs.xfs", &["-q", "-f"], 320, Content::Filesystem { fstype: "xfs".into() }, "xfs");
}

#[test]
fn swap_as_mkswap_makes_it() {
    check("mkswap", &[], 16, Content::Swap, "swap");
}

#[test]
fn luks1_and_luks2_as_cryptsetup_makes_them() {
    for (ty, v) in [("luks1", 1u16), ("luks2", 2)] {
        let t = tmpdir("luks");
        let img = image(&t.0, 32);
        let key = t.0.join("key");
        std::fs::write(&key, b"test passphrase").unwrap();
        let args =
            ["luksFormat", "-q", "--type", ty, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file"];
        let mut c = Command::new("cryptsetup");
        c.args(args).arg(&key).arg(&img);
        match c.output() {
            Ok(o) if o.status.success() => {}
            _ => {
                panic!("cannot run: cryptsetup luksFormat --type {ty} is not available here (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)");
            }
        }
        let sigs = blockdev::detect_signatures(&head(&img));
        assert_eq!(blockdev::content_of(&sigs), Content::Luks { version: v });
        if let Some(b) = blkid_type(&img) {
            assert_eq!(b, "crypto_LUKS");
        }
    }
}

#[test]
fn a_wiped_luks2_primary_leaves_the_secondary_visible() {
    let t = tmpdir("luks2sec");
    let img = image(&t.0, 32);
    let key = t.0.join("key");
    std::fs::write(&key, b"k").unwrap();
    let ok = Command::new("cryptsetup")
        .args([
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(&key)
        .arg(&img)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        panic!("cannot run: no cryptsetup (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)");
    }
    let d = BlockDev::open(&img, OpenMode { write: true, ..OpenMode::READ }).unwrap();
    d.write_at(0, &[0u8; 4096]).unwrap();
    d.flush().unwrap();
    let sigs = blockdev::detect_signatures(&head(&img));
    assert_eq!(sigs, vec![Signature::Luks2Secondary { offset: 0x4000 }]);
    assert!(matches!(blockdev::content_of(&sigs), Content::Other { .. }));
}

#[test]
fn mountinfo_and_swaps_of_this_host_parse() {
    let m = blockdev::read_mountinfo().unwrap();
    assert!(m.iter().any(|e| e.mount_point == "/"));
    assert!(m.iter().all(|e| !e.fstype.is_empty()));
    let _ = blockdev::read_swaps().unwrap();
}

#[test]
fn loop_device_ioctls_and_sysfs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("cannot run: not root (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)");
    }
    let t = tmpdir("loopioctl");
    let img = image(&t.0, 8);
    let out = match Command::new("losetup").args(["-f", "--show", "-r"]).arg(&img).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            panic!("cannot run: no free loop device (these tests need root, free loop devices and: apt-get install lvm2 cryptsetup-bin e2fsprogs xfsprogs util-linux)");
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _g = Detach(out.clone());
    let d = BlockDev::open(Path::new(&out), OpenMode::READ_DIRECT).unwrap();
    assert!(d.is_block_device());
    assert_eq!(d.size_bytes().unwrap(), 8 << 20);
    assert_eq!(d.size_sectors().unwrap(), 16384);
    assert_eq!(d.logical_block_size().unwrap(), 512);
    assert!(d.physical_block_size().unwrap() >= 512);
    assert!(d.read_only_flag().unwrap(), "losetup -r makes a read-only device");
    let (ma, mi) = d.dev_number().unwrap().unwrap();
    assert_eq!(ma, 7);
    let s = blockdev::sysfs_info(ma, mi).unwrap();
    assert_eq!(format!("/dev/{}", s.kname), out);
    assert_eq!(s.partition_of, None);
    assert!(s.read_only);
    assert_eq!(s.size_sectors, Some(16384));
    assert!(s.holders.is_empty());
    let mut b = vec![0u8; 100];
    d.read_at(12345, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert!(d.flush().is_ok());
    // O_EXCL on a device nobody holds works; a second O_EXCL opener is refused.
    let ex = OpenMode { exclusive: true, ..OpenMode::READ };
    let first = BlockDev::open(Path::new(&out), ex).unwrap();
    let second = BlockDev::open(Path::new(&out), ex);
    assert_eq!(second.err().and_then(|e| e.raw_os_error()), Some(libc::EBUSY));
    drop(first);
}
