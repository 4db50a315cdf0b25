//! System integration after the finish, as pure decisions: the new /etc/crypttab text, the
//! LVM devices file edits, the initramfs command, and what the user must do by hand.
//! `adapters::integrate` carries them out (files with backups and atomic writes, commands
//! through a `Runner`).

use super::boot::Generator;

/// The crypttab line for the new device: `<name> UUID=<uuid> none luks[,discard]`.
pub fn crypttab_line(name: &str, uuid: &str, discard: bool) -> String {
    format!("{name} UUID={uuid} none luks{}", if discard { ",discard" } else { "" })
}

/// The first field of a crypttab line, unless it is a comment or blank.
fn target_of(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    t.split_whitespace().next()
}

/// `existing` (the current crypttab, "" if none) with the line for `name`: a line for the
/// same name is replaced in place (later duplicates dropped), every other line (comments
/// included) is kept as it was, otherwise the line is appended. Idempotent.
pub fn edit_crypttab(existing: &str, name: &str, uuid: &str, discard: bool) -> String {
    edit_crypttab_line(existing, name, &crypttab_line(name, uuid, discard))
}

/// [`edit_crypttab`] with a line of the caller's (whose first field is `name`).
pub fn edit_crypttab_line(existing: &str, name: &str, line: &str) -> String {
    let mut out = String::with_capacity(existing.len() + line.len() + 1);
    let mut placed = false;
    for l in existing.lines() {
        if target_of(l) == Some(name) {
            if !placed {
                out.push_str(line);
                out.push('\n');
                placed = true;
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    if !placed {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The UUID in a LUKS1 or LUKS2 binary header (the first 512 bytes of the device), if
/// `head` starts with one.
pub fn luks_uuid(head: &[u8]) -> Option<String> {
    if head.len() < 208 || &head[..6] != b"LUKS\xba\xbe" {
        return None;
    }
    let raw = &head[168..208];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let u = std::str::from_utf8(&raw[..end]).ok()?.trim();
    (!u.is_empty()).then(|| u.to_string())
}

/// The mapping name in a DM UUID cryptsetup gives an open LUKS device of `uuid`
/// (`CRYPT-LUKS<v>-<uuid without dashes>-<name>`), if `dm_uuid` is one.
pub fn mapping_name_of<'a>(dm_uuid: &'a str, uuid: &str) -> Option<&'a str> {
    let rest = dm_uuid.strip_prefix("CRYPT-LUKS")?;
    let rest = rest.get(1..)?.strip_prefix('-')?;
    rest.strip_prefix(&uuid.replace('-', ""))?.strip_prefix('-').filter(|n| !n.is_empty())
}

/// Whether the crypttab line for `name` (if any) has the `discard` option.
pub fn crypttab_discard(text: &str, name: &str) -> bool {
    text.lines()
        .filter(|l| target_of(l) == Some(name))
        .any(|l| l.split_whitespace().nth(3).is_some_and(|o| o.split(',').any(|x| x == "discard")))
}

/// Whether the LVM devices file (system.devices) has an entry whose DEVNAME is `dev`.
pub fn devices_file_has(text: &str, dev: &str) -> bool {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .any(|l| l.split_whitespace().any(|w| w.strip_prefix("DEVNAME=") == Some(dev)))
}

/// Whether the devices file has the open LUKS device `uuid` as `name` (IDTYPE=crypt_uuid
/// IDNAME=CRYPT-LUKS2-<uuid>-<name>), whatever DEVNAME LVM chose for it.
pub fn devices_file_has_crypt(text: &str, uuid: &str, name: &str) -> bool {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("IDNAME="))
        .any(|id| mapping_name_of(id, uuid) == Some(name))
}

/// A command to run (`lvm lvmdevices`: some distributions ship no `lvmdevices` link): argv, extra environment, and how to tell the user to do it by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The command line as the user would type it (on the target system).
    pub by_hand: String,
}

/// One step of the integration, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write etc/crypttab (adding or replacing the line), with a backup.
    Crypttab {
        line: String,
    },
    Run(Cmd),
    /// Something luksify cannot do: the text says what the user must do.
    Manual(String),
}

/// What the integration needs to know.
#[derive(Debug, Clone)]
pub struct Input {
    /// Target root directory ("/" for the running system).
    pub root_dir: String,
    pub name: String,
    pub uuid: String,
    pub discard: bool,
    /// The raw partition, canonical (e.g. /dev/sda5).
    pub raw_device: String,
    pub generator: Option<Generator>,
    /// mkinitcpio.conf's HOOKS already have encrypt / sd-encrypt.
    pub mkinitcpio_has_encrypt: bool,
    /// etc/lvm/devices/system.devices, if it exists.
    pub devices_file: Option<String>,
    /// /boot is on the converted PV (GRUB must be reinstalled with cryptodisk).
    pub boot_on_pv: bool,
}

/// PATH for the commands (also inside a chroot: `chroot` looks the command up there).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `lvm lvmdevices --yes --config devices/use_devicesfile=1 ARGS`: the file exists, so it is
/// edited even where lvm.conf leaves the devices file off (lvmdevices refuses then).
fn lvmdevices(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> =
        ["lvm", "lvmdevices", "--yes", "--config", "devices/use_devicesfile=1"].iter().map(|s| s.to_string()).collect();
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// The steps for `i`, in order: crypttab, LVM devices file, initramfs, then what is left
/// to the user.
/// `argv` run in the system at `root_dir`: as is for "/", else through `chroot root_dir`.
fn run_in_root(root_dir: &str, argv: &[&str]) -> Cmd {
    let root = root_dir.trim_end_matches('/');
    let mut v: Vec<String> = Vec::new();
    if root_dir != "/" {
        v.push("chroot".into());
        v.push(root.into());
    }
    v.extend(argv.iter().map(|s| s.to_string()));
    let by_hand = if root_dir != "/" { format!("chroot {root} {}", argv.join(" ")) } else { argv.join(" ") };
    Cmd { argv: v, env: vec![("PATH".into(), PATH.into())], by_hand }
}

/// The command that regenerates every initramfs of the system at `root_dir` with `g`, for
/// the integration at the finish and for the boot chain before the cut-over. None for
/// mkinitcpio, whose steps luksify prints instead.
pub fn regenerate_initramfs(root_dir: &str, g: Generator) -> Option<Cmd> {
    match g {
        Generator::InitramfsTools => Some(run_in_root(root_dir, &["update-initramfs", "-u", "-k", "all"])),
        Generator::Dracut => Some(run_in_root(root_dir, &["dracut", "--regenerate-all", "--force"])),
        Generator::Mkinitcpio => None,
    }
}

pub fn steps(i: &Input) -> Vec<Step> {
    let chrooted = i.root_dir != "/";
    let root = i.root_dir.trim_end_matches('/').to_string();
    let mut out = vec![Step::Crypttab { line: crypttab_line(&i.name, &i.uuid, i.discard) }];
    let mapper = format!("/dev/mapper/{}", i.name);
    let path_env = ("PATH".to_string(), PATH.to_string());
    if let Some(df) = &i.devices_file {
        let mut env = vec![path_env.clone()];
        let mut hint = String::new();
        if chrooted {
            env.push(("LVM_SYSTEM_DIR".into(), format!("{root}/etc/lvm")));
            hint = format!("LVM_SYSTEM_DIR={root}/etc/lvm ");
        }
        if !devices_file_has(df, &mapper) && !devices_file_has_crypt(df, &i.uuid, &i.name) {
            out.push(Step::Run(Cmd {
                argv: lvmdevices(&["--adddev", &mapper]),
                env: env.clone(),
                by_hand: format!("{hint}lvmdevices --adddev {mapper}"),
            }));
        }
        if devices_file_has(df, &i.raw_device) {
            out.push(Step::Run(Cmd {
                argv: lvmdevices(&["--deldev", &i.raw_device]),
                env,
                by_hand: format!("{hint}lvmdevices --deldev {}", i.raw_device),
            }));
        }
    }
    match i.generator {
        Some(g @ (Generator::InitramfsTools | Generator::Dracut)) => {
            out.extend(regenerate_initramfs(&i.root_dir, g).map(Step::Run))
        }
        Some(Generator::Mkinitcpio) => {
            let mut m = String::from("mkinitcpio: ");
            if !i.mkinitcpio_has_encrypt {
                m.push_str(&format!("add the `encrypt` hook to HOOKS in {root}/etc/mkinitcpio.conf (after `block`, before `lvm2`); "));
            }
            m.push_str(&format!(
                "add `cryptdevice=UUID={}:{}` to the kernel command line (e.g. GRUB_CMDLINE_LINUX in {root}/etc/default/grub, then `grub-mkconfig -o /boot/grub/grub.cfg`); then run `mkinitcpio -P`",
                i.uuid, i.name
            ));
            out.push(Step::Manual(m));
        }
        None => out.push(Step::Manual(format!(
            "no known initramfs generator in {}: make your initramfs unlock UUID={} as {} (see {root}/etc/crypttab) and regenerate it",
            i.root_dir, i.uuid, i.name
        ))),
    }
    if i.boot_on_pv {
        out.push(Step::Manual(
            "/boot is on the encrypted volume: reinstall GRUB so it can unlock it (`grub-install <disk>`, then `update-grub`)".into(),
        ));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const U: &str = "0b2c6f3e-1111-2222-3333-444455556666";

    #[test]
    fn existing_lines_and_comments_are_kept_and_the_line_appended() {
        let old = "# <target name> <source device> <key file> <options>\nswap_crypt /dev/sdb2 /dev/urandom swap\n\n";
        let new = edit_crypttab(old, "sda5_crypt", U, false);
        assert_eq!(new, format!("{old}sda5_crypt UUID={U} none luks\n"));
        // A file without a final newline keeps its last line whole.
        let new = edit_crypttab("home_crypt UUID=x none luks", "sda5_crypt", U, true);
        assert_eq!(new, format!("home_crypt UUID=x none luks\nsda5_crypt UUID={U} none luks,discard\n"));
        assert_eq!(edit_crypttab("", "a", U, false), format!("a UUID={U} none luks\n"));
    }

    #[test]
    fn a_line_for_the_same_name_is_replaced_in_place() {
        let old = "# keep me\nsda5_crypt UUID=old none luks,discard\nother UUID=o none luks\n  sda5_crypt UUID=dup none luks\n";
        let new = edit_crypttab(old, "sda5_crypt", U, false);
        assert_eq!(new, format!("# keep me\nsda5_crypt UUID={U} none luks\nother UUID=o none luks\n"));
        // A commented-out line for the name stays a comment.
        let old = "#sda5_crypt UUID=old none luks\n";
        assert_eq!(edit_crypttab(old, "sda5_crypt", U, false), format!("{old}sda5_crypt UUID={U} none luks\n"));
    }

    #[test]
    fn discard_option_is_read_back() {
        let t = "a UUID=1 none luks,discard\nb UUID=2 none luks\n#c UUID=3 none discard\n";
        assert!(crypttab_discard(t, "a"));
        assert!(!crypttab_discard(t, "b"));
        assert!(!crypttab_discard(t, "c"));
    }

    #[test]
    fn editing_is_idempotent() {
        let old = "# c\nswap_crypt /dev/sdb2 /dev/urandom swap\n";
        let once = edit_crypttab(old, "sda5_crypt", U, false);
        assert_eq!(edit_crypttab(&once, "sda5_crypt", U, false), once);
    }

    #[test]
    fn luks_uuid_and_mapping_name() {
        let mut h = vec![0u8; 512];
        assert_eq!(luks_uuid(&h), None);
        h[..6].copy_from_slice(b"LUKS\xba\xbe");
        h[168..168 + U.len()].copy_from_slice(U.as_bytes());
        assert_eq!(luks_uuid(&h).as_deref(), Some(U));
        let dm = format!("CRYPT-LUKS2-{}-sda5_crypt", U.replace('-', ""));
        assert_eq!(mapping_name_of(&dm, U), Some("sda5_crypt"));
        assert_eq!(mapping_name_of(&dm, "0b2c6f3e-1111-2222-3333-444455556667"), None);
        assert_eq!(mapping_name_of("CRYPT-SUBDEV-x", U), None);
    }

    #[test]
    fn devices_file_entries_by_devname() {
        let t = "# LVM uses devices listed in this file.\nVERSION=1.1.2\nIDTYPE=devname IDNAME=/dev/sda5 DEVNAME=/dev/sda5 PVID=abc PART=5\n";
        assert!(devices_file_has(t, "/dev/sda5"));
        assert!(!devices_file_has(t, "/dev/sda"));
        assert!(!devices_file_has(t, "/dev/mapper/sda5_crypt"));
    }

    /// A Debian-like running system (`/`, initramfs-tools, no devices file).
    pub(crate) fn input() -> Input {
        Input {
            root_dir: "/".into(),
            name: "sda5_crypt".into(),
            uuid: U.into(),
            discard: false,
            raw_device: "/dev/sda5".into(),
            generator: Some(Generator::InitramfsTools),
            mkinitcpio_has_encrypt: false,
            devices_file: None,
            boot_on_pv: false,
        }
    }

    #[test]
    fn steps_for_debian_without_a_devices_file() {
        let s = steps(&input());
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], Step::Crypttab { line: format!("sda5_crypt UUID={U} none luks") });
        let Step::Run(c) = &s[1] else { panic!("{s:?}") };
        assert_eq!(c.argv, vec!["update-initramfs", "-u", "-k", "all"]);
    }

    #[test]
    fn devices_file_steps_are_skipped_when_already_done() {
        let mut i = input();
        i.devices_file = Some("IDTYPE=devname IDNAME=/dev/sda5 DEVNAME=/dev/sda5 PVID=abc\n".into());
        let s = steps(&i);
        let runs: Vec<&Vec<String>> =
            s.iter().filter_map(|s| if let Step::Run(c) = s { Some(&c.argv) } else { None }).collect();
        assert_eq!(
            runs[0],
            &vec![
                "lvm",
                "lvmdevices",
                "--yes",
                "--config",
                "devices/use_devicesfile=1",
                "--adddev",
                "/dev/mapper/sda5_crypt"
            ]
        );
        assert_eq!(
            runs[1],
            &vec!["lvm", "lvmdevices", "--yes", "--config", "devices/use_devicesfile=1", "--deldev", "/dev/sda5"]
        );
        i.devices_file =
            Some("IDTYPE=crypt_uuid IDNAME=CRYPT-LUKS2-x DEVNAME=/dev/mapper/sda5_crypt PVID=abc\n".into());
        let s = steps(&i);
        assert!(!s.iter().any(|s| matches!(s, Step::Run(c) if c.argv[1] == "lvmdevices")), "{s:?}");
        i.devices_file = Some(format!(
            "IDTYPE=crypt_uuid IDNAME=CRYPT-LUKS2-{}-sda5_crypt DEVNAME=/dev/dm-3 PVID=abc\n",
            U.replace('-', "")
        ));
        let s = steps(&i);
        assert!(!s.iter().any(|s| matches!(s, Step::Run(c) if c.argv[1] == "lvmdevices")), "{s:?}");
    }

    #[test]
    fn another_root_runs_in_a_chroot_with_its_lvm_dir() {
        let mut i = input();
        i.root_dir = "/mnt/target/".into();
        i.generator = Some(Generator::Dracut);
        i.devices_file = Some(String::new());
        let s = steps(&i);
        let Step::Run(add) = &s[1] else { panic!() };
        assert!(add.env.contains(&("LVM_SYSTEM_DIR".into(), "/mnt/target/etc/lvm".into())));
        let Step::Run(d) = &s[2] else { panic!() };
        assert_eq!(d.argv, vec!["chroot", "/mnt/target", "dracut", "--regenerate-all", "--force"]);
        assert_eq!(d.by_hand, "chroot /mnt/target dracut --regenerate-all --force");
    }

    #[test]
    fn mkinitcpio_and_unknown_generators_leave_manual_steps() {
        let mut i = input();
        i.generator = Some(Generator::Mkinitcpio);
        let s = steps(&i);
        let Step::Manual(m) = &s[1] else { panic!() };
        assert!(
            m.contains("encrypt")
                && m.contains(&format!("cryptdevice=UUID={U}:sda5_crypt"))
                && m.contains("mkinitcpio -P"),
            "{m}"
        );
        i.generator = None;
        assert!(matches!(&steps(&i)[1], Step::Manual(m) if m.contains("no known initramfs generator")));
        i.boot_on_pv = true;
        assert!(matches!(steps(&i).last(), Some(Step::Manual(m)) if m.contains("grub-install")));
    }
}
