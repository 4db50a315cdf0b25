//! Gathers the boot facts of a root directory (`--root DIR`, default `/`) for the pure boot
//! checks in `core::boot`: which initramfs generator files exist, GRUB's defaults, and
//! where "/" and "/boot" live. For `/` the live mount table says where; for another root
//! its etc/fstab does. Read-only.

use crate::adapters::blockdev;
use crate::core::boot::{parse_fstab, BootFacts, FsSource};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// `root` joined with an absolute path inside it.
pub fn in_root(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

/// The device number of a block device path, following symlinks.
fn dev_of(p: &Path) -> Option<(u32, u32)> {
    let md = std::fs::metadata(p).ok()?;
    md.file_type().is_block_device().then(|| (libc::major(md.rdev()), libc::minor(md.rdev())))
}

/// Resolve an fstab source to a device number on this machine (the host's /dev), if it can.
fn resolve_spec(spec: &str) -> Option<(u32, u32)> {
    let link = |dir: &str, v: &str| dev_of(&Path::new("/dev/disk").join(dir).join(v));
    if let Some(v) = spec.strip_prefix("UUID=") {
        link("by-uuid", v.trim_matches('"'))
    } else if let Some(v) = spec.strip_prefix("LABEL=") {
        link("by-label", v.trim_matches('"'))
    } else if let Some(v) = spec.strip_prefix("PARTUUID=") {
        link("by-partuuid", v.trim_matches('"'))
    } else if spec.starts_with("/dev/") {
        dev_of(Path::new(spec))
    } else {
        None
    }
}

/// Probe the root directory `root` with the mount table at `mountinfo` (used only when
/// `root` is `/`).
pub fn probe_boot_at(root: &Path, mountinfo: &Path) -> BootFacts {
    let mut f = BootFacts { root_dir: root.display().to_string(), ..Default::default() };
    let exists = |p: &str| in_root(root, p).exists();
    let read = |p: &str| std::fs::read_to_string(in_root(root, p)).ok();
    f.update_initramfs = exists("/usr/sbin/update-initramfs") || exists("/sbin/update-initramfs");
    f.initramfs_tools_conf = exists("/etc/initramfs-tools");
    f.cryptroot_hook = exists("/usr/share/initramfs-tools/hooks/cryptroot");
    f.dracut_bin = exists("/usr/bin/dracut") || exists("/usr/sbin/dracut");
    f.dracut_conf = exists("/etc/dracut.conf") || exists("/etc/dracut.conf.d");
    f.dracut_crypt_module = exists("/usr/lib/dracut/modules.d/90crypt");
    f.dracut_systemd =
        exists("/usr/lib/dracut/modules.d/00systemd") && exists("/usr/lib/dracut/modules.d/01systemd-ask-password");
    f.mkinitcpio_conf = read("/etc/mkinitcpio.conf");
    let mut grub = read("/etc/default/grub");
    if let Ok(rd) = std::fs::read_dir(in_root(root, "/etc/default/grub.d")) {
        let mut names: Vec<PathBuf> =
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cfg")).collect();
        names.sort();
        for n in names {
            if let Ok(t) = std::fs::read_to_string(&n) {
                let g = grub.get_or_insert_with(String::new);
                g.push('\n');
                g.push_str(&t);
            }
        }
    }
    f.grub_default = grub;

    if root == Path::new("/") {
        f.mounts_from = "mountinfo".into();
        match std::fs::read_to_string(mountinfo) {
            Ok(t) => {
                let m = blockdev::parse_mountinfo(&t);
                // The last mount on a mount point is the visible one.
                let at = |mp: &str| {
                    m.iter()
                        .rev()
                        .find(|e| e.mount_point == mp)
                        .map(|e| FsSource { spec: e.source.clone(), dev: Some((e.major, e.minor)) })
                };
                f.root_fs = at("/");
                f.boot_fs = at("/boot");
            }
            Err(e) => f.notes.push(format!("cannot read {} ({e})", mountinfo.display())),
        }
    } else {
        f.mounts_from = "fstab".into();
        match read("/etc/fstab") {
            Some(t) => {
                let entries = parse_fstab(&t);
                let at = |mp: &str| {
                    entries
                        .iter()
                        .rev()
                        .find(|(_, m)| m == mp)
                        .map(|(s, _)| FsSource { spec: s.clone(), dev: resolve_spec(s) })
                };
                f.root_fs = at("/");
                f.boot_fs = at("/boot");
            }
            None => f.notes.push(format!("{} has no etc/fstab", root.display())),
        }
    }
    f
}

/// Probe `root` on this machine.
pub fn probe_boot(root: &Path) -> BootFacts {
    probe_boot_at(root, Path::new("/proc/self/mountinfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        crate::adapters::scratch_dir("bootprobe", name)
    }

    fn touch(root: &Path, p: &str) {
        let p = in_root(root, p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "").unwrap();
    }

    #[test]
    fn fake_debian_root_from_its_fstab() {
        let r = scratch("debian");
        touch(&r, "/usr/sbin/update-initramfs");
        std::fs::create_dir_all(in_root(&r, "/etc/initramfs-tools")).unwrap();
        touch(&r, "/usr/share/initramfs-tools/hooks/cryptroot");
        std::fs::create_dir_all(in_root(&r, "/etc/default/grub.d")).unwrap();
        std::fs::write(in_root(&r, "/etc/default/grub"), "GRUB_ENABLE_CRYPTODISK=n\n").unwrap();
        std::fs::write(in_root(&r, "/etc/default/grub.d/crypt.cfg"), "GRUB_ENABLE_CRYPTODISK=y\n").unwrap();
        std::fs::write(
            in_root(&r, "/etc/fstab"),
            "/dev/mapper/vg0-root / ext4 defaults 0 1\nUUID=no-such-uuid-here /boot ext2 defaults 0 2\n",
        )
        .unwrap();
        let f = probe_boot(&r);
        assert!(f.update_initramfs && f.initramfs_tools_conf && f.cryptroot_hook);
        assert!(!f.dracut_bin && !f.dracut_conf && f.mkinitcpio_conf.is_none());
        assert_eq!(f.mounts_from, "fstab");
        assert_eq!(f.root_fs.as_ref().unwrap().spec, "/dev/mapper/vg0-root");
        assert_eq!(f.boot_fs, Some(FsSource { spec: "UUID=no-such-uuid-here".into(), dev: None }));
        assert_eq!(
            crate::core::boot::shell_var(f.grub_default.as_deref().unwrap(), "GRUB_ENABLE_CRYPTODISK").as_deref(),
            Some("y")
        );
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn slash_reads_the_mount_table() {
        let d = scratch("mountinfo");
        let mi = d.join("mountinfo");
        std::fs::write(
            &mi,
            "21 1 254:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg0-root rw\n22 21 8:1 / /boot rw - ext2 /dev/sda1 rw\n",
        )
        .unwrap();
        let f = probe_boot_at(Path::new("/"), &mi);
        assert_eq!(f.mounts_from, "mountinfo");
        assert_eq!(f.root_fs, Some(FsSource { spec: "/dev/mapper/vg0-root".into(), dev: Some((254, 0)) }));
        assert_eq!(f.boot_fs, Some(FsSource { spec: "/dev/sda1".into(), dev: Some((8, 1)) }));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
