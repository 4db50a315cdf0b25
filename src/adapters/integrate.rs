//! Carries out the integration steps decided by `core::integrate` on a root directory:
//! etc/crypttab edited with a backup and an atomic write (temp file, fsync, rename, fsync of
//! the directory); commands run through a [`Runner`], so tests record them instead.

use crate::adapters::bootprobe::{in_root, probe_boot};
use crate::core::boot::{generator, mkinitcpio_has_encrypt};
use crate::core::integrate::{edit_crypttab, steps, Cmd, Input, Step};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs a command; Err carries a one-line reason.
pub trait Runner {
    fn run(&mut self, cmd: &Cmd) -> Result<(), String>;
}

/// Runs commands on this machine, output to luksify's stderr.
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&mut self, cmd: &Cmd) -> Result<(), String> {
        let (prog, args) = cmd.argv.split_first().ok_or("empty command")?;
        let mut c = Command::new(prog);
        c.args(args).stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
        if prog == "lvm" {
            c.env("LVM_SUPPRESS_FD_WARNINGS", "1");
        }
        for (k, v) in &cmd.env {
            c.env(k, v);
        }
        let st = c.status().map_err(|e| format!("cannot run {prog}: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("it failed: {st}"))
        }
    }
}

#[cfg(test)]
/// Records every command; those whose argv contains `fail_on` fail.
#[derive(Debug, Default)]
pub struct Recorder {
    pub calls: Vec<Cmd>,
    pub fail_on: Option<String>,
}

#[cfg(test)]
impl Runner for Recorder {
    fn run(&mut self, cmd: &Cmd) -> Result<(), String> {
        self.calls.push(cmd.clone());
        match &self.fail_on {
            Some(f) if cmd.argv.iter().any(|a| a == f) => Err("it failed: exit status: 1".into()),
            _ => Ok(()),
        }
    }
}

/// What the integration did and what is left to the user.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: Vec<String>,
    /// Non-empty: integration incomplete (exit 12); each entry says what to do by hand.
    pub manual: Vec<String>,
    pub backups: Vec<PathBuf>,
}

/// The integration input for `root`, read from it.
pub fn gather(root: &Path, name: &str, uuid: &str, discard: bool, raw_device: &str, boot_on_pv: bool) -> Input {
    let bf = probe_boot(root);
    Input {
        root_dir: root.display().to_string(),
        name: name.to_string(),
        uuid: uuid.to_string(),
        discard,
        raw_device: raw_device.to_string(),
        generator: generator(&bf),
        mkinitcpio_has_encrypt: bf.mkinitcpio_conf.as_deref().map(mkinitcpio_has_encrypt).unwrap_or(false),
        devices_file: std::fs::read_to_string(in_root(root, "/etc/lvm/devices/system.devices")).ok(),
        boot_on_pv,
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn write_synced(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(content)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()
}

/// Replace `path` with `content` atomically, first copying the old file (if any) to
/// `<path>.luksify-backup-<stamp>`. Nothing is written when the content is already right.
/// Returns the backup's path, if one was made.
pub fn replace_file(path: &Path, content: &str, stamp: &str) -> io::Result<Option<PathBuf>> {
    let dir = path.parent().ok_or_else(|| io::Error::other("no parent directory"))?;
    let file_name = path.file_name().ok_or_else(|| io::Error::other("no file name"))?.to_string_lossy().into_owned();
    let (old, mode) = match std::fs::read(path) {
        Ok(b) => (Some(b), std::fs::metadata(path)?.permissions().mode() & 0o7777),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (None, 0o644),
        Err(e) => return Err(e),
    };
    if old.as_deref() == Some(content.as_bytes()) {
        return Ok(None);
    }
    let mut backup = None;
    if let Some(old) = &old {
        let mut b = dir.join(format!("{file_name}.luksify-backup-{stamp}"));
        let mut n = 1;
        while b.exists() {
            b = dir.join(format!("{file_name}.luksify-backup-{stamp}.{n}"));
            n += 1;
        }
        write_synced(&b, old, mode)?;
        backup = Some(b);
    }
    let tmp = dir.join(format!(".{file_name}.luksify-tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let r = write_synced(&tmp, content.as_bytes(), mode).and_then(|_| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    fsync_dir(dir)?;
    Ok(backup)
}

/// A timestamp for backup names: seconds since the epoch.
pub fn stamp() -> String {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).to_string()
}

/// Run the integration steps for `input`. Never fails: what could not be done is in
/// `manual`. A step that fails does not stop the next one, except that the initramfs is not
/// regenerated over a crypttab that could not be written.
pub fn integrate(input: &Input, runner: &mut dyn Runner, stamp: &str) -> Outcome {
    let mut o = Outcome::default();
    let root = Path::new(&input.root_dir);
    let mut crypttab_ok = true;
    for step in steps(input) {
        match step {
            Step::Crypttab { line } => {
                let path = in_root(root, "/etc/crypttab");
                let r = match std::fs::read_to_string(&path) {
                    Ok(t) => Ok(t),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
                    Err(e) => Err(e),
                }
                .and_then(|old| {
                    replace_file(&path, &edit_crypttab(&old, &input.name, &input.uuid, input.discard), stamp)
                });
                match r {
                    Ok(Some(b)) => {
                        o.done.push(format!("{}: added `{line}` (backup {})", path.display(), b.display()));
                        o.backups.push(b);
                    }
                    Ok(None) if path.exists() => o.done.push(format!("{}: has `{line}`", path.display())),
                    Ok(None) => o.done.push(format!("{}: created with `{line}`", path.display())),
                    Err(e) => {
                        crypttab_ok = false;
                        o.manual.push(format!("add `{line}` to {} ({e})", path.display()));
                    }
                }
            }
            Step::Run(cmd) => {
                let initramfs = cmd.argv.iter().any(|a| a == "update-initramfs" || a == "dracut");
                if initramfs && !crypttab_ok {
                    o.manual.push(format!("then run `{}`", cmd.by_hand));
                    continue;
                }
                match runner.run(&cmd) {
                    Ok(()) => o.done.push(format!("ran `{}`", cmd.by_hand)),
                    Err(e) => o.manual.push(format!("run `{}` ({e})", cmd.by_hand)),
                }
            }
            Step::Manual(m) => o.manual.push(m),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::boot::Generator;

    const U: &str = "0b2c6f3e-1111-2222-3333-444455556666";

    fn scratch(name: &str) -> PathBuf {
        let d = crate::adapters::scratch_dir("integrate", name);
        std::fs::create_dir_all(d.join("etc")).unwrap();
        d
    }

    fn mk(root: &Path, p: &str, content: &str) {
        let p = in_root(root, p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn argvs(r: &Recorder) -> Vec<String> {
        r.calls.iter().map(|c| c.argv.join(" ")).collect()
    }

    fn backups(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("luksify-backup"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn debian_root_crypttab_with_backup_then_update_initramfs_in_a_chroot() {
        let r = scratch("debian");
        mk(&r, "/usr/sbin/update-initramfs", "");
        mk(&r, "/etc/crypttab", "# comment\nswap_crypt /dev/sdb2 /dev/urandom swap\n");
        std::fs::set_permissions(in_root(&r, "/etc/crypttab"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let input = gather(&r, "sda5_crypt", U, false, "/dev/sda5", false);
        assert_eq!(input.generator, Some(Generator::InitramfsTools));
        let mut rec = Recorder::default();
        let o = integrate(&input, &mut rec, "100");
        assert!(o.manual.is_empty(), "{:?}", o.manual);
        let ct = std::fs::read_to_string(in_root(&r, "/etc/crypttab")).unwrap();
        assert_eq!(ct, format!("# comment\nswap_crypt /dev/sdb2 /dev/urandom swap\nsda5_crypt UUID={U} none luks\n"));
        assert_eq!(std::fs::metadata(in_root(&r, "/etc/crypttab")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(backups(&r.join("etc")), vec!["crypttab.luksify-backup-100"]);
        assert_eq!(
            std::fs::read_to_string(r.join("etc/crypttab.luksify-backup-100")).unwrap(),
            "# comment\nswap_crypt /dev/sdb2 /dev/urandom swap\n"
        );
        assert_eq!(argvs(&rec), vec![format!("chroot {} update-initramfs -u -k all", r.display())]);
        assert!(!rec.calls[0].env.iter().any(|(k, _)| k == "LVM_SYSTEM_DIR"));
        // Again: same crypttab, no new backup, the initramfs regenerated again (harmless).
        let mut rec2 = Recorder::default();
        let o2 = integrate(&input, &mut rec2, "200");
        assert!(o2.manual.is_empty() && o2.backups.is_empty());
        assert_eq!(std::fs::read_to_string(in_root(&r, "/etc/crypttab")).unwrap(), ct);
        assert_eq!(backups(&r.join("etc")), vec!["crypttab.luksify-backup-100"]);
        // No temp file left behind.
        assert!(!std::fs::read_dir(r.join("etc")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("tmp")));
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn same_name_replaced_and_discard_only_when_asked() {
        let r = scratch("replace");
        mk(&r, "/etc/dracut.conf", "");
        mk(&r, "/etc/crypttab", "sda5_crypt UUID=old none luks\n# end\n");
        let input = gather(&r, "sda5_crypt", U, true, "/dev/sda5", false);
        let mut rec = Recorder::default();
        let o = integrate(&input, &mut rec, "1");
        assert!(o.manual.is_empty(), "{:?}", o.manual);
        assert_eq!(
            std::fs::read_to_string(in_root(&r, "/etc/crypttab")).unwrap(),
            format!("sda5_crypt UUID={U} none luks,discard\n# end\n")
        );
        assert_eq!(argvs(&rec), vec![format!("chroot {} dracut --regenerate-all --force", r.display())]);
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn no_crypttab_yet_creates_one_without_backup() {
        let r = scratch("fresh");
        mk(&r, "/usr/sbin/update-initramfs", "");
        let o = integrate(&gather(&r, "x_crypt", U, false, "/dev/sda5", false), &mut Recorder::default(), "1");
        assert!(o.manual.is_empty() && o.backups.is_empty());
        assert_eq!(std::fs::read_to_string(r.join("etc/crypttab")).unwrap(), format!("x_crypt UUID={U} none luks\n"));
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn devices_file_present_or_absent() {
        let r = scratch("devices");
        mk(&r, "/usr/sbin/update-initramfs", "");
        let input = gather(&r, "sda5_crypt", U, false, "/dev/sda5", false);
        let mut rec = Recorder::default();
        integrate(&input, &mut rec, "1");
        assert!(!argvs(&rec).iter().any(|a| a.contains("lvmdevices")), "{:?}", argvs(&rec));

        mk(
            &r,
            "/etc/lvm/devices/system.devices",
            "VERSION=1.1.1\nIDTYPE=devname IDNAME=/dev/sda5 DEVNAME=/dev/sda5 PVID=x\n",
        );
        let input = gather(&r, "sda5_crypt", U, false, "/dev/sda5", false);
        let mut rec = Recorder::default();
        let o = integrate(&input, &mut rec, "2");
        assert!(o.manual.is_empty());
        assert_eq!(
            argvs(&rec),
            vec![
                "lvm lvmdevices --yes --config devices/use_devicesfile=1 --adddev /dev/mapper/sda5_crypt".to_string(),
                "lvm lvmdevices --yes --config devices/use_devicesfile=1 --deldev /dev/sda5".to_string(),
                format!("chroot {} update-initramfs -u -k all", r.display()),
            ]
        );
        let lvm_dir = format!("{}/etc/lvm", r.display());
        assert!(rec.calls[0].env.contains(&("LVM_SYSTEM_DIR".to_string(), lvm_dir.clone())));
        assert!(rec.calls[1].env.contains(&("LVM_SYSTEM_DIR".to_string(), lvm_dir)));
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn the_running_system_runs_commands_directly() {
        let input = Input {
            devices_file: Some("IDTYPE=devname IDNAME=/dev/sda5 DEVNAME=/dev/sda5 PVID=x\n".into()),
            ..crate::core::integrate::tests::input()
        };
        // Only the command sequence (steps); the crypttab of "/" is never touched in tests.
        let cmds: Vec<String> = steps(&input)
            .into_iter()
            .filter_map(|s| if let Step::Run(c) = s { Some((c.argv.join(" "), c.env)) } else { None })
            .map(|(a, env)| {
                assert!(!env.iter().any(|(k, _)| k == "LVM_SYSTEM_DIR"));
                a
            })
            .collect();
        assert_eq!(
            cmds,
            vec![
                "lvm lvmdevices --yes --config devices/use_devicesfile=1 --adddev /dev/mapper/sda5_crypt",
                "lvm lvmdevices --yes --config devices/use_devicesfile=1 --deldev /dev/sda5",
                "update-initramfs -u -k all"
            ]
        );
    }

    #[test]
    fn mkinitcpio_prints_steps_and_failures_become_manual() {
        let r = scratch("arch");
        mk(&r, "/etc/mkinitcpio.conf", "HOOKS=(base udev block lvm2 filesystems)\n");
        let mut rec = Recorder::default();
        let o = integrate(&gather(&r, "sda5_crypt", U, false, "/dev/sda5", false), &mut rec, "1");
        assert!(rec.calls.is_empty());
        assert_eq!(o.manual.len(), 1);
        assert!(o.manual[0].contains("mkinitcpio -P") && o.manual[0].contains("encrypt"), "{:?}", o.manual);

        let r2 = scratch("fail");
        mk(&r2, "/usr/sbin/update-initramfs", "");
        let mut rec = Recorder { fail_on: Some("update-initramfs".into()), ..Default::default() };
        let o = integrate(&gather(&r2, "sda5_crypt", U, false, "/dev/sda5", false), &mut rec, "1");
        assert_eq!(o.manual.len(), 1);
        assert!(o.manual[0].contains(&format!("chroot {} update-initramfs -u -k all", r2.display())), "{:?}", o.manual);
        // The crypttab was still written.
        assert!(std::fs::read_to_string(r2.join("etc/crypttab")).unwrap().contains(U));
        std::fs::remove_dir_all(&r).unwrap();
        std::fs::remove_dir_all(&r2).unwrap();
    }

    #[test]
    fn an_unwritable_crypttab_skips_the_initramfs() {
        let r = scratch("noetc");
        mk(&r, "/usr/sbin/update-initramfs", "");
        std::fs::remove_dir_all(r.join("etc")).unwrap();
        let mut rec = Recorder::default();
        let o = integrate(&gather(&r, "sda5_crypt", U, false, "/dev/sda5", false), &mut rec, "1");
        assert!(rec.calls.is_empty());
        assert_eq!(o.manual.len(), 2, "{:?}", o.manual);
        assert!(o.manual[0].contains("crypttab"));
        std::fs::remove_dir_all(&r).unwrap();
    }
}
