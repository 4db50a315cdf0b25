//! Boot checks: will the machine still boot once its PV is LUKS? Pure: the facts about the
//! target root directory (`--root`, default `/`) are gathered by `adapters::bootprobe`; this
//! decides which initramfs generator is in charge, whether it can unlock LUKS, whether the
//! root filesystem and /boot live on the PV being converted, and whether GRUB can read
//! /boot from it. The planner turns the findings into refusals (exit 10, nothing changed).

use super::facts::DeviceFacts;
use super::kinds::{LuksVersion, Refusal};
use serde::{Deserialize, Serialize};

/// A filesystem the system boots from, as the root directory describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsSource {
    /// The source as written (mountinfo's source or fstab's first field), e.g.
    /// "/dev/mapper/vg0-root", "/dev/vg0/root", "UUID=…".
    pub spec: String,
    /// Its device number, when the adapter could resolve it.
    pub dev: Option<(u32, u32)>,
}

/// What the adapter found in the root directory. Paths are relative to that root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFacts {
    /// The root directory examined, e.g. "/" or "/mnt/target".
    pub root_dir: String,
    /// "/" of the target system (None: not found in mountinfo / fstab).
    pub root_fs: Option<FsSource>,
    /// A separate /boot (None: /boot is a directory on the root filesystem).
    pub boot_fs: Option<FsSource>,
    /// Where root_fs / boot_fs came from: "mountinfo" or "fstab".
    pub mounts_from: String,
    /// usr/sbin/update-initramfs exists.
    pub update_initramfs: bool,
    /// etc/initramfs-tools exists.
    pub initramfs_tools_conf: bool,
    /// usr/share/initramfs-tools/hooks/cryptroot exists (package cryptsetup-initramfs).
    pub cryptroot_hook: bool,
    /// usr/bin/dracut (or usr/sbin/dracut) exists.
    pub dracut_bin: bool,
    /// etc/dracut.conf or etc/dracut.conf.d exists.
    pub dracut_conf: bool,
    /// usr/lib/dracut/modules.d/90crypt exists.
    pub dracut_crypt_module: bool,
    /// usr/lib/dracut/modules.d/00systemd and 01systemd-ask-password exist: dracut puts
    /// systemd and its password agent into the initramfs (what luksify's dracut module for
    /// a boot mid-way builds on).
    pub dracut_systemd: bool,
    /// Content of etc/mkinitcpio.conf, if it exists.
    pub mkinitcpio_conf: Option<String>,
    /// Content of etc/default/grub then etc/default/grub.d/*.cfg (in name order),
    /// concatenated; None if none exists.
    pub grub_default: Option<String>,
    /// What the adapter could not read, one sentence each.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    InitramfsTools,
    Dracut,
    Mkinitcpio,
}

impl Generator {
    pub fn as_str(self) -> &'static str {
        match self {
            Generator::InitramfsTools => "initramfs-tools",
            Generator::Dracut => "dracut",
            Generator::Mkinitcpio => "mkinitcpio",
        }
    }
}

/// Which generator rules the root: initramfs-tools, then dracut, then mkinitcpio (they
/// exclude each other in practice; the order only settles leftovers of a removed one).
pub fn generator(f: &BootFacts) -> Option<Generator> {
    if f.update_initramfs || (f.initramfs_tools_conf && !f.dracut_bin) {
        Some(Generator::InitramfsTools)
    } else if f.dracut_bin || f.dracut_conf {
        Some(Generator::Dracut)
    } else if f.mkinitcpio_conf.is_some() {
        Some(Generator::Mkinitcpio)
    } else {
        None
    }
}

/// The value of a shell-style `KEY=value` assignment in a config text; the last one wins
/// (later files override earlier ones). Quotes are stripped; comments ignored.
pub fn shell_var(text: &str, key: &str) -> Option<String> {
    let mut v = None;
    for line in text.lines() {
        let l = line.trim();
        let l = l.strip_prefix("export ").unwrap_or(l).trim_start();
        if l.starts_with('#') {
            continue;
        }
        if let Some(rest) = l.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            let rest = rest.split(" #").next().unwrap_or(rest).trim();
            let unq = rest.trim_matches(|c| c == '"' || c == '\'');
            v = Some(unq.to_string());
        }
    }
    v
}

/// The `(spec, mount point)` pairs of an fstab text (comments and blank lines skipped,
/// `\040` unescaped).
pub fn parse_fstab(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let spec = it.next()?.replace("\\040", " ");
            let mp = it.next()?.replace("\\040", " ");
            Some((spec, mp))
        })
        .collect()
}

/// mkinitcpio's HOOKS: whether it has `encrypt` or `sd-encrypt`.
pub fn mkinitcpio_has_encrypt(conf: &str) -> bool {
    let Some(h) = shell_var(conf, "HOOKS") else { return false };
    h.trim_matches(|c| c == '(' || c == ')').split_whitespace().any(|w| w == "encrypt" || w == "sd-encrypt")
}

/// The LUKS parameters GRUB cares about.
#[derive(Debug, Clone)]
pub struct LuksChoice {
    pub luks: LuksVersion,
    /// `--pbkdf` (None: cryptsetup's default, argon2id for LUKS2).
    pub pbkdf: Option<String>,
    /// `--force-unknown-boot`: go on although the initramfs generator is unknown.
    pub force_unknown_boot: bool,
}

/// GRUB 2.06/2.12 opens LUKS1 and LUKS2 keyslots with PBKDF2, not Argon2.
pub fn grub_can_open(c: &LuksChoice) -> bool {
    match c.luks {
        LuksVersion::Luks1 => true,
        LuksVersion::Luks2 => c.pbkdf.as_deref().map(|p| p.eq_ignore_ascii_case("pbkdf2")).unwrap_or(false),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootWarning {
    pub code: &'static str,
    pub message: String,
}

/// The `boot` object of the dry-run (README: "Dry-run JSON").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootReport {
    pub root_dir: String,
    /// Where the root and /boot sources were read: "mountinfo" or "fstab".
    pub mounts_from: String,
    pub root_source: Option<String>,
    pub root_on_pv: bool,
    /// None: /boot is not a separate filesystem (it lives on the root filesystem).
    pub boot_source: Option<String>,
    pub boot_on_pv: bool,
    /// "initramfs-tools", "dracut", "mkinitcpio" or null.
    pub initramfs: Option<&'static str>,
    /// Whether the generator's initramfs can unlock LUKS (null: unknown generator).
    pub initramfs_can_unlock: Option<bool>,
    /// GRUB_ENABLE_CRYPTODISK=y (null: no etc/default/grub).
    pub grub_cryptodisk: Option<bool>,
    /// Whether GRUB can open the chosen LUKS type and PBKDF.
    pub grub_can_open: bool,
    /// Refusal codes raised by these checks (the messages are in the plan's `refusals`).
    pub refusals: Vec<&'static str>,
    pub warnings: Vec<BootWarning>,
}

/// Whether a filesystem source is one of the LVs on the PV being converted.
fn on_pv(src: &FsSource, dev: &DeviceFacts) -> bool {
    if let Some(d) = src.dev {
        if dev.holders.iter().any(|h| (h.major, h.minor) == d) {
            return true;
        }
    }
    let spec = src.spec.as_str();
    let by_mapper = |n: &str| spec == format!("/dev/mapper/{n}");
    if dev.holders.iter().any(|h| by_mapper(&h.name)) {
        return true;
    }
    if let Some(l) = &dev.lvm {
        for lv in &l.lvs {
            if by_mapper(&lv.dm_name) || spec == format!("/dev/{}/{}", l.vg_name, lv.name) {
                return true;
            }
        }
    }
    false
}

/// What cannot be guaranteed when luksify sets up no boot chain (generator `g`, None:
/// unknown): a reboot between the cut-over and the finish.
fn mid_way(g: Option<Generator>) -> String {
    let with = match g {
        Some(Generator::Dracut) => "not with dracut without systemd in the initramfs".into(),
        Some(g) => format!("not with {}", g.as_str()),
        None => "not with an unknown generator".into(),
    };
    format!(
        "luksify can make a reboot in the middle of the conversion boot only with initramfs-tools or with dracut and systemd ({with}): from the cut-over until the finish, a reboot, crash or power cut leaves a machine that does not boot without rescue media (with luksify, or cryptsetup 2.3.7/2.4.3 or later: README, \"Recovery\"), and nothing continues the conversion by itself"
    )
}

/// Whether luksify's boot chain (`core::bootchain`: a reboot mid-way opens the LUKS2
/// reencryption in progress and luksify-resume.service finishes it) works with `g`.
pub fn has_boot_chain(g: Generator, f: &BootFacts) -> bool {
    match g {
        Generator::InitramfsTools => true,
        Generator::Dracut => f.dracut_systemd,
        Generator::Mkinitcpio => false,
    }
}

/// Run the boot checks. Refusals are returned with their messages, for the plan.
pub fn check(dev: &DeviceFacts, f: &BootFacts, c: &LuksChoice) -> (BootReport, Vec<Refusal>) {
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    let root_on_pv = f.root_fs.as_ref().map(|s| on_pv(s, dev)).unwrap_or(false);
    let boot_on_pv = match &f.boot_fs {
        Some(b) => on_pv(b, dev),
        None => root_on_pv,
    };
    if f.root_fs.is_none() {
        warnings.push(BootWarning {
            code: "root_unknown",
            message: format!(
                "could not tell where the root filesystem of {} lives (no \"/\" in its {}): boot checks assume it is not on {}",
                f.root_dir,
                if f.mounts_from == "fstab" { "etc/fstab" } else { "mount table" },
                dev.path
            ),
        });
    }
    let gen = generator(f);
    let can_unlock = match gen {
        Some(Generator::InitramfsTools) => Some(f.cryptroot_hook),
        Some(Generator::Dracut) => Some(f.dracut_crypt_module),
        Some(Generator::Mkinitcpio) => Some(f.mkinitcpio_conf.as_deref().map(mkinitcpio_has_encrypt).unwrap_or(false)),
        None => None,
    };
    let root = if f.root_dir == "/" { String::new() } else { f.root_dir.trim_end_matches('/').to_string() };
    if root_on_pv {
        match gen {
            Some(Generator::InitramfsTools) if !f.cryptroot_hook => refusals.push(Refusal {
                code: "initramfs_cannot_unlock",
                message: format!(
                    "the root filesystem is on {} but initramfs-tools cannot unlock LUKS at boot ({root}/usr/share/initramfs-tools/hooks/cryptroot is missing): install it with `apt-get install cryptsetup-initramfs`{}",
                    dev.path,
                    if root.is_empty() { String::new() } else { format!(" inside {root}") }
                ),
            }),
            Some(Generator::Dracut) if !f.dracut_crypt_module => refusals.push(Refusal {
                code: "initramfs_cannot_unlock",
                message: format!(
                    "the root filesystem is on {} but dracut has no crypt module ({root}/usr/lib/dracut/modules.d/90crypt is missing): install it (Fedora: `dnf install cryptsetup`; Debian/Ubuntu: `apt-get install dracut cryptsetup`) so dracut can unlock LUKS at boot",
                    dev.path
                ),
            }),
            Some(Generator::Mkinitcpio) if can_unlock != Some(true) => warnings.push(BootWarning {
                code: "mkinitcpio_hooks",
                message: format!(
                    "the root filesystem is on {} and {root}/etc/mkinitcpio.conf has no `encrypt` (or `sd-encrypt`) hook: after the conversion add it to HOOKS before `lvm2`, add `cryptdevice=UUID=<luks uuid>:<name>` to the kernel command line and run `mkinitcpio -P` (luksify prints these steps)",
                    dev.path
                ),
            }),
            None => {
                let m = format!(
                    "the root filesystem is on {} but luksify knows no initramfs generator in {} (none of initramfs-tools, dracut, mkinitcpio): after the conversion your initramfs must unlock /dev/{} (UUID in the crypttab line luksify writes) before LVM starts, or the machine will not boot",
                    dev.path,
                    f.root_dir,
                    dev.kname
                );
                // (LUKS2: also no boot chain through the conversion in progress)
                let m = match c.luks {
                    LuksVersion::Luks2 => format!("{m}; and {}", mid_way(None)),
                    _ => m,
                };
                if c.force_unknown_boot {
                    warnings.push(BootWarning { code: "unknown_initramfs", message: m });
                } else {
                    refusals.push(Refusal {
                        code: "unknown_initramfs",
                        message: format!("{m}; make sure it will, then pass --force-unknown-boot"),
                    });
                }
            }
            _ => {}
        }
        // luksify's boot chain (a reboot mid-way opens the LUKS2 reencryption in progress
        // and luksify-resume.service finishes it: core::bootchain) exists for
        // initramfs-tools and for dracut with systemd.
        if let (LuksVersion::Luks2, Some(g)) = (c.luks, gen.filter(|g| !has_boot_chain(*g, f))) {
            let m = format!("the root filesystem is on {} and {}", dev.path, mid_way(Some(g)));
            if c.force_unknown_boot {
                warnings.push(BootWarning { code: "no_boot_chain", message: m });
            } else {
                refusals.push(Refusal {
                    code: "no_boot_chain",
                    message: format!("{m}; to convert anyway (rescue media at hand), pass --force-unknown-boot"),
                });
            }
        }
    }
    let cryptodisk = f.grub_default.as_deref().map(|t| shell_var(t, "GRUB_ENABLE_CRYPTODISK").as_deref() == Some("y"));
    let grub_ok = grub_can_open(c);
    if boot_on_pv {
        let what = if f.boot_fs.is_some() { "/boot" } else { "/boot (on the root filesystem)" };
        if !grub_ok {
            refusals.push(Refusal {
                code: "grub_cannot_open",
                message: format!(
                    "{what} is on {} and GRUB cannot open LUKS2 keyslots made with {}: use `--type luks1` or `--pbkdf pbkdf2`",
                    dev.path,
                    c.pbkdf.as_deref().unwrap_or("argon2id (the LUKS2 default)")
                ),
            });
        }
        if cryptodisk != Some(true) {
            refusals.push(Refusal {
                code: "grub_cryptodisk_disabled",
                message: format!(
                    "{what} is on {} and GRUB must read it from the encrypted volume, but {root}/etc/default/grub does not set GRUB_ENABLE_CRYPTODISK=y: add that line (the grub config is regenerated after the conversion), or move /boot off the PV",
                    dev.path
                ),
            });
        }
    }
    let report = BootReport {
        root_dir: f.root_dir.clone(),
        mounts_from: f.mounts_from.clone(),
        root_source: f.root_fs.as_ref().map(|s| s.spec.clone()),
        root_on_pv,
        boot_source: f.boot_fs.as_ref().map(|s| s.spec.clone()),
        boot_on_pv,
        initramfs: gen.map(Generator::as_str),
        initramfs_can_unlock: can_unlock,
        grub_cryptodisk: cryptodisk,
        grub_can_open: grub_ok,
        refusals: refusals.iter().map(|r| r.code).collect(),
        warnings,
    };
    (report, refusals)
}

/// The human lines of the dry-run for the boot checks.
pub fn render(b: &BootReport) -> String {
    let mut s = String::new();
    let yn = |v: bool| if v { "yes" } else { "no" };
    s.push_str(&format!("  boot checks (root directory {}, mounts from {}):\n", b.root_dir, b.mounts_from));
    s.push_str(&format!(
        "    root filesystem:   {} (on this PV: {})\n",
        b.root_source.as_deref().unwrap_or("unknown"),
        yn(b.root_on_pv)
    ));
    s.push_str(&format!(
        "    /boot:             {} (on this PV: {})\n",
        b.boot_source.as_deref().unwrap_or("on the root filesystem"),
        yn(b.boot_on_pv)
    ));
    s.push_str(&format!(
        "    initramfs:         {}{}\n",
        b.initramfs.unwrap_or("unknown generator"),
        match b.initramfs_can_unlock {
            Some(true) => ", can unlock LUKS",
            Some(false) => ", CANNOT unlock LUKS",
            None => "",
        }
    ));
    s.push_str(&format!(
        "    GRUB:              GRUB_ENABLE_CRYPTODISK {}; can open this LUKS type: {}\n",
        match b.grub_cryptodisk {
            Some(true) => "=y",
            Some(false) => "not set",
            None => "(no etc/default/grub)",
        },
        yn(b.grub_can_open)
    ));
    for w in &b.warnings {
        s.push_str(&format!("    warning [{}]: {}\n", w.code, w.message));
    }
    s
}

/// Boot facts for tests elsewhere (the planner's): a Debian with initramfs-tools and
/// cryptsetup-initramfs, root on vg0-root (on the sample laptop's PV), /boot on sda1.
#[cfg(test)]
pub mod samples {
    use super::{BootFacts, FsSource};

    pub fn debian() -> BootFacts {
        BootFacts {
            root_dir: "/".into(),
            root_fs: Some(FsSource { spec: "/dev/mapper/vg0-root".into(), dev: Some((254, 0)) }),
            boot_fs: Some(FsSource { spec: "/dev/sda1".into(), dev: Some((8, 1)) }),
            mounts_from: "mountinfo".into(),
            update_initramfs: true,
            initramfs_tools_conf: true,
            cryptroot_hook: true,
            grub_default: Some("GRUB_DEFAULT=0\n".into()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::facts::samples::laptop;

    use samples::debian;

    fn luks2() -> LuksChoice {
        LuksChoice { luks: LuksVersion::Luks2, pbkdf: None, force_unknown_boot: false }
    }

    fn codes(r: &[Refusal]) -> Vec<&'static str> {
        r.iter().map(|r| r.code).collect()
    }

    #[test]
    fn debian_with_cryptsetup_initramfs_and_separate_boot_passes() {
        let (b, r) = check(&laptop(), &debian(), &luks2());
        assert!(r.is_empty(), "{r:?}");
        assert!(b.root_on_pv && !b.boot_on_pv);
        assert_eq!(b.initramfs, Some("initramfs-tools"));
        assert_eq!(b.initramfs_can_unlock, Some(true));
        assert_eq!(b.grub_cryptodisk, Some(false));
        assert!(!b.grub_can_open);
        assert!(b.warnings.is_empty());
        assert!(render(&b).contains("initramfs-tools, can unlock LUKS"));
    }

    #[test]
    fn initramfs_tools_without_cryptroot_refuses_naming_the_package() {
        let mut f = debian();
        f.cryptroot_hook = false;
        let (b, r) = check(&laptop(), &f, &luks2());
        assert_eq!(codes(&r), vec!["initramfs_cannot_unlock"]);
        assert!(r[0].message.contains("apt-get install cryptsetup-initramfs"), "{}", r[0].message);
        assert_eq!(b.refusals, vec!["initramfs_cannot_unlock"]);
        assert_eq!(b.initramfs_can_unlock, Some(false));
    }

    #[test]
    fn dracut_without_crypt_module_refuses() {
        let mut f = debian();
        f.update_initramfs = false;
        f.initramfs_tools_conf = false;
        f.cryptroot_hook = false;
        f.dracut_bin = true;
        let (b, r) = check(&laptop(), &f, &luks2());
        assert_eq!(b.initramfs, Some("dracut"));
        assert_eq!(codes(&r), vec!["initramfs_cannot_unlock", "no_boot_chain"]);
        assert!(r[0].message.contains("90crypt") && r[0].message.contains("dracut"), "{}", r[0].message);
        f.dracut_crypt_module = true;
        // a crypt module opens the finished device, but without systemd in the initramfs
        // nothing opens LUKS2 mid-way
        let (b, r) = check(&laptop(), &f, &luks2());
        assert_eq!(codes(&r), vec!["no_boot_chain"]);
        assert!(b.refusals == vec!["no_boot_chain"]);
        let forced = LuksChoice { force_unknown_boot: true, ..luks2() };
        let (b, r) = check(&laptop(), &f, &forced);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(b.warnings.iter().map(|w| w.code).collect::<Vec<_>>(), vec!["no_boot_chain"]);
        // with systemd in dracut's initramfs, luksify's dracut module opens it
        f.dracut_systemd = true;
        let (b, r) = check(&laptop(), &f, &luks2());
        assert!(r.is_empty() && b.warnings.iter().all(|w| w.code != "no_boot_chain"), "{r:?} {:?}", b.warnings);
        f.dracut_crypt_module = false;
        assert_eq!(codes(&check(&laptop(), &f, &luks2()).1), vec!["initramfs_cannot_unlock"]);
    }

    #[test]
    fn without_a_boot_chain_a_luks2_root_pv_is_refused_unless_forced_saying_what_a_reboot_mid_way_does() {
        let mut dracut = debian();
        dracut.update_initramfs = false;
        dracut.initramfs_tools_conf = false;
        dracut.dracut_bin = true;
        dracut.dracut_crypt_module = true;
        let mut arch = debian();
        arch.update_initramfs = false;
        arch.initramfs_tools_conf = false;
        arch.mkinitcpio_conf = Some("HOOKS=(base udev block encrypt lvm2 filesystems)\n".into());
        for (f, gen, not_with) in
            [(&dracut, "dracut", "not with dracut without systemd"), (&arch, "mkinitcpio", "not with mkinitcpio")]
        {
            let (b, r) = check(&laptop(), f, &luks2());
            assert_eq!(b.initramfs, Some(gen));
            assert_eq!(codes(&r), vec!["no_boot_chain"], "{gen}");
            let m = &r[0].message;
            for want in [
                "--force-unknown-boot",
                not_with,
                "does not boot without rescue media",
                "from the cut-over until the finish",
            ] {
                assert!(m.contains(want), "{gen}: no {want:?} in: {m}");
            }
            let forced = LuksChoice { force_unknown_boot: true, ..luks2() };
            let (b, r) = check(&laptop(), f, &forced);
            assert!(r.is_empty(), "{gen}: {r:?}");
            assert!(b.warnings.iter().any(|w| w.code == "no_boot_chain" && w.message.contains("rescue media")));
            // LUKS1 has no standard mid-way format and no boot chain anyway: not this refusal
            let luks1 = LuksChoice { luks: LuksVersion::Luks1, ..luks2() };
            assert!(!codes(&check(&laptop(), f, &luks1).1).contains(&"no_boot_chain"), "{gen}");
            // the root elsewhere: no boot at stake
            let mut away = f.clone();
            away.root_fs = Some(FsSource { spec: "/dev/sdb1".into(), dev: Some((8, 17)) });
            assert!(check(&laptop(), &away, &luks2()).1.is_empty(), "{gen}");
        }
        // initramfs-tools (with its boot chain) is not refused
        assert!(check(&laptop(), &debian(), &luks2()).1.is_empty());
    }

    #[test]
    fn unknown_generator_refuses_unless_forced() {
        let mut f = debian();
        f.update_initramfs = false;
        f.initramfs_tools_conf = false;
        let (b, r) = check(&laptop(), &f, &luks2());
        assert_eq!(b.initramfs, None);
        assert_eq!(codes(&r), vec!["unknown_initramfs"]);
        assert!(r[0].message.contains("--force-unknown-boot"));
        assert!(r[0].message.contains("does not boot without rescue media"), "{}", r[0].message);
        let forced = LuksChoice { force_unknown_boot: true, ..luks2() };
        let (b, r) = check(&laptop(), &f, &forced);
        assert!(r.is_empty());
        assert_eq!(b.warnings.iter().map(|w| w.code).collect::<Vec<_>>(), vec!["unknown_initramfs"]);
    }

    #[test]
    fn boot_on_pv_needs_grub_cryptodisk_and_an_openable_type() {
        let mut f = debian();
        f.boot_fs = None; // /boot lives on the root LV
        let (b, r) = check(&laptop(), &f, &luks2());
        assert!(b.boot_on_pv);
        assert_eq!(codes(&r), vec!["grub_cannot_open", "grub_cryptodisk_disabled"]);
        assert!(r[0].message.contains("--type luks1") && r[0].message.contains("--pbkdf pbkdf2"));
        assert!(r[1].message.contains("GRUB_ENABLE_CRYPTODISK=y"));
        f.grub_default = Some("GRUB_DEFAULT=0\n# GRUB_ENABLE_CRYPTODISK=n\nGRUB_ENABLE_CRYPTODISK=\"y\"\n".into());
        assert_eq!(codes(&check(&laptop(), &f, &luks2()).1), vec!["grub_cannot_open"]);
        let pbkdf2 = LuksChoice { pbkdf: Some("pbkdf2".into()), ..luks2() };
        assert!(check(&laptop(), &f, &pbkdf2).1.is_empty());
        let luks1 = LuksChoice { luks: LuksVersion::Luks1, ..luks2() };
        assert!(check(&laptop(), &f, &luks1).1.is_empty());
        // A separate /boot on an LV of the PV, named /dev/VG/LV in fstab.
        let mut f = debian();
        f.boot_fs = Some(FsSource { spec: "/dev/vg0/root".into(), dev: None });
        assert_eq!(codes(&check(&laptop(), &f, &luks2()).1), vec!["grub_cannot_open", "grub_cryptodisk_disabled"]);
    }

    #[test]
    fn root_not_on_the_pv_raises_nothing() {
        let mut f = BootFacts {
            root_dir: "/".into(),
            root_fs: Some(FsSource { spec: "/dev/sdb2".into(), dev: Some((8, 18)) }),
            mounts_from: "mountinfo".into(),
            ..Default::default()
        };
        let (b, r) = check(&laptop(), &f, &luks2());
        assert!(r.is_empty() && b.warnings.is_empty(), "{r:?} {b:?}");
        assert!(!b.root_on_pv && !b.boot_on_pv);
        // Not even with /boot on the root filesystem and no GRUB config.
        f.boot_fs = None;
        assert!(check(&laptop(), &f, &luks2()).1.is_empty());
    }

    #[test]
    fn fstab_specs_match_by_mapper_name_or_vg_lv_path() {
        let mut f = debian();
        f.mounts_from = "fstab".into();
        f.cryptroot_hook = false;
        for spec in ["/dev/mapper/vg0-root", "/dev/vg0/root"] {
            f.root_fs = Some(FsSource { spec: spec.into(), dev: None });
            assert_eq!(codes(&check(&laptop(), &f, &luks2()).1), vec!["initramfs_cannot_unlock"], "{spec}");
        }
        f.root_fs = Some(FsSource { spec: "UUID=1234".into(), dev: None });
        assert!(check(&laptop(), &f, &luks2()).1.is_empty());
        f.root_fs = None;
        let (b, r) = check(&laptop(), &f, &luks2());
        assert!(r.is_empty());
        assert_eq!(b.warnings[0].code, "root_unknown");
    }

    #[test]
    fn mkinitcpio_is_detected_and_its_hooks_read() {
        let mut f = debian();
        f.update_initramfs = false;
        f.initramfs_tools_conf = false;
        f.mkinitcpio_conf = Some("HOOKS=(base udev autodetect modconf block lvm2 filesystems fsck)\n".into());
        let (b, r) = check(&laptop(), &f, &luks2());
        assert_eq!(b.initramfs, Some("mkinitcpio"));
        assert_eq!(codes(&r), vec!["no_boot_chain"]);
        assert_eq!(b.warnings[0].code, "mkinitcpio_hooks");
        f.mkinitcpio_conf = Some("HOOKS=(base udev block encrypt lvm2 filesystems)\n".into());
        let (b, _) = check(&laptop(), &f, &luks2());
        assert_eq!(b.initramfs_can_unlock, Some(true));
        assert!(b.warnings.is_empty());
    }

    #[test]
    fn fstab_parses() {
        let t = "# comment\n\n/dev/mapper/vg0-root / ext4 errors=remount-ro 0 1\nUUID=ab-cd /boot ext2 defaults 0 2\n/dev/sdb1 /my\\040disk ext4 defaults\n";
        assert_eq!(
            parse_fstab(t),
            vec![
                ("/dev/mapper/vg0-root".to_string(), "/".to_string()),
                ("UUID=ab-cd".to_string(), "/boot".to_string()),
                ("/dev/sdb1".to_string(), "/my disk".to_string()),
            ]
        );
    }

    #[test]
    fn shell_var_last_assignment_wins() {
        assert_eq!(shell_var("A=1\nA='2'\n#A=3\n", "A").as_deref(), Some("2"));
        assert_eq!(shell_var("AB=1\n", "A"), None);
        assert_eq!(shell_var("export A=\"y\" # yes\n", "A").as_deref(), Some("y"));
    }
}
