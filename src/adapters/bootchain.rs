//! Puts the boot chain of `core::bootchain` in place in a root directory before the
//! cut-over (initramfs-tools: crypttab line, luksify's hook and local-top script, keyscript,
//! then `update-initramfs`; dracut: luksify's dracut module and configuration, then
//! `dracut --regenerate-all --force`; both: a copy of luksify and the resume unit), takes
//! it out again when the conversion stops before the cut-over, and removes it at the finish.

use crate::adapters::bootprobe::in_root;
use crate::adapters::integrate::{replace_file, Runner};
use crate::core::boot::Generator;
use crate::core::bootchain::{self as bc, Chain};
use crate::core::integrate::{edit_crypttab_line, regenerate_initramfs, Cmd, PATH};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What [`install`] changed, for [`undo`].
#[derive(Debug)]
pub struct Installed {
    root: PathBuf,
    /// etc/crypttab before (None: there was none).
    crypttab_before: Option<String>,
    /// Whether [`install`] wrote etc/crypttab (not for dracut).
    crypttab_written: bool,
    /// The command that regenerates the initramfs.
    regen: Cmd,
}

/// The partition's PARTUUID from its partition table (`blkid -p`, no udev needed), as udev
/// names it in /dev/disk/by-partuuid; None when the table gives none or blkid cannot tell.
pub fn partuuid(raw: &Path) -> Option<String> {
    let out = Command::new("blkid").args(["-p", "-o", "value", "-s", "PART_ENTRY_UUID"]).arg(raw).output().ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_ascii_lowercase();
    (out.status.success() && !v.is_empty() && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(v)
}

/// The version of `cryptsetup` in `root` (the one its initramfs gets), or why it is unknown.
pub fn cryptsetup_version(root: &Path) -> Result<(u32, u32, u32), String> {
    let mut c = if root == Path::new("/") {
        Command::new("cryptsetup")
    } else {
        let mut c = Command::new("chroot");
        c.arg(root).arg("cryptsetup");
        c
    };
    let out = c
        .arg("--version")
        .env("PATH", PATH)
        .output()
        .map_err(|e| format!("cannot run cryptsetup --version in {}: {e}", root.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    bc::parse_cryptsetup_version(&text)
        .filter(|_| out.status.success())
        .ok_or_else(|| format!("`cryptsetup --version` in {} gave no version ({})", root.display(), text.trim()))
}

fn write_file(root: &Path, p: &str, content: &[u8], mode: u32) -> io::Result<()> {
    let path = in_root(root, p);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("luksify-tmp");
    std::fs::write(&tmp, content)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)
}

fn files(root: &Path, c: &Chain, cipher: &str, g: Generator, omit_crypt: bool) -> io::Result<()> {
    let state = in_root(root, bc::STATE_DIR);
    std::fs::create_dir_all(&state)?;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))?;
    let exe = std::fs::read("/proc/self/exe")?;
    write_file(root, bc::BINARY, &exe, 0o755)?;
    if g == Generator::Dracut {
        write_file(root, bc::DRACUT_MODULE_SETUP, bc::dracut_module_setup(cipher).as_bytes(), 0o755)?;
        write_file(root, bc::DRACUT_UNLOCK, bc::dracut_unlock_script(c).as_bytes(), 0o755)?;
        write_file(root, bc::DRACUT_UNLOCK_UNIT, bc::dracut_unlock_unit(c).as_bytes(), 0o644)?;
        write_file(root, bc::DRACUT_CONF, bc::dracut_conf(omit_crypt).as_bytes(), 0o644)?;
    } else {
        write_file(root, bc::KEYSCRIPT, bc::keyscript(c).as_bytes(), 0o755)?;
        write_file(root, bc::HOOK, bc::hook_script(cipher).as_bytes(), 0o755)?;
        write_file(root, bc::LOCAL_TOP, bc::local_top_script(c).as_bytes(), 0o755)?;
    }
    write_file(root, bc::UNIT, bc::unit_text(c).as_bytes(), 0o644)?;
    let wants = in_root(root, bc::UNIT_WANTS);
    if let Some(d) = wants.parent() {
        std::fs::create_dir_all(d)?;
    }
    let _ = std::fs::remove_file(&wants);
    std::os::unix::fs::symlink(bc::UNIT, &wants)
}

/// Remove every file of the boot chain from `root` (and the pass file when `root` is `/`).
/// Returns whether there was anything to remove.
fn remove_files(root: &Path) -> bool {
    let mut any = false;
    for f in bc::FILES.iter().chain([&bc::BINARY]) {
        let p = in_root(root, f);
        if std::fs::symlink_metadata(&p).is_ok() {
            any = true;
            let _ = std::fs::remove_file(&p);
        }
    }
    let _ = std::fs::remove_dir(in_root(root, bc::STATE_DIR));
    let _ = std::fs::remove_dir(in_root(root, bc::DRACUT_MODULE_DIR));
    if root == Path::new("/") {
        let _ = std::fs::remove_dir_all(bc::RUN_DIR);
    }
    any
}

/// Set up the boot chain for `c` in `root` for the generator `g` (initramfs-tools or
/// dracut): crypttab (initramfs-tools; a backup of the old one), the files, the initramfs.
/// On failure everything is put back and the reason returned.
pub fn install(
    root: &Path,
    c: &Chain,
    cipher: &str,
    g: Generator,
    runner: &mut dyn Runner,
    stamp: &str,
) -> Result<Installed, String> {
    let ct = in_root(root, "/etc/crypttab");
    let before = match std::fs::read_to_string(&ct) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", ct.display())),
    };
    let Some(regen) = regenerate_initramfs(&root.display().to_string(), g) else {
        return Err(format!("luksify has no boot chain for {}; nothing was changed", g.as_str()));
    };
    let dracut = g == Generator::Dracut;
    let others = before.as_deref().map(|t| bc::other_crypttab_entries(t, &c.name)).unwrap_or_default();
    let inst =
        Installed { root: root.to_path_buf(), crypttab_before: before.clone(), crypttab_written: !dracut, regen };
    if dracut {
        // crypttab stays: dracut's hostonly mode leaves out an entry for a device that does
        // not exist yet, and the unlock unit does the entry's work until the finish
        if !others.is_empty() {
            eprintln!(
                "luksify: warning: {} has other entries ({}): dracut's crypt module stays in the initramfs for them, and where it unlocks every LUKS device it sees (dracut without hostonly), a boot mid-way may ask for {}'s passphrase twice",
                ct.display(),
                others.join(", "),
                c.name
            );
        }
    } else {
        let line = bc::crypttab_line_during(c);
        let new = edit_crypttab_line(before.as_deref().unwrap_or(""), &c.name, &line);
        if let Err(e) = replace_file(&ct, &new, stamp) {
            return Err(format!("writing {}: {e}", ct.display()));
        }
        eprintln!("luksify: boot chain: {}: `{line}`", ct.display());
    }
    if let Err(e) = files(root, c, cipher, g, others.is_empty()) {
        let _ = undo(&inst, runner, false);
        return Err(format!("installing luksify's initramfs hook and resume unit in {}: {e}", root.display()));
    }
    eprintln!(
        "luksify: boot chain: running `{}` (the initramfs opens the device from the cut-over on)",
        inst.regen.by_hand
    );
    if let Err(e) = runner.run(&inst.regen) {
        let _ = undo(&inst, runner, true);
        return Err(format!("`{}` {e}", inst.regen.by_hand));
    }
    eprintln!(
        "luksify: boot chain ready: a reboot from now on boots (the plain PV until the cut-over, then the passphrase prompt) and {} continues the conversion",
        bc::UNIT_NAME
    );
    Ok(inst)
}

/// Put `root` back as it was before [`install`] (crypttab, files, initramfs when
/// `regen`). Err: what could not be put back (for the user to do by hand).
pub fn undo(inst: &Installed, runner: &mut dyn Runner, regen: bool) -> Result<(), String> {
    let root = &inst.root;
    let ct = in_root(root, "/etc/crypttab");
    let mut left = Vec::new();
    let r = match &inst.crypttab_before {
        _ if !inst.crypttab_written => Ok(()),
        Some(t) => write_file(root, "/etc/crypttab", t.as_bytes(), {
            std::fs::metadata(&ct).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644)
        }),
        None => {
            std::fs::remove_file(&ct).or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        }
    };
    if let Err(e) = r {
        left.push(format!("put {} back as it was ({e}; the backup next to it has it)", ct.display()));
    }
    remove_files(root);
    if regen {
        if let Err(e) = runner.run(&inst.regen) {
            left.push(format!("run `{}` ({e})", inst.regen.by_hand));
        }
    }
    if left.is_empty() {
        eprintln!("luksify: boot chain taken out: {} and the initramfs are as they were", ct.display());
        Ok(())
    } else {
        Err(left.join("; "))
    }
}

/// At the finish, before the integration (which rewrites the crypttab line and regenerates
/// the initramfs): remove the hook, the local-top script, the keyscript, the unit and
/// luksify's copy. Returns a line for the user when something was removed.
pub fn remove_at_finish(root: &Path) -> Option<String> {
    if !remove_files(root) {
        return None;
    }
    if root == Path::new("/") && Path::new("/run/systemd/system").exists() {
        let _ = Command::new("systemctl").arg("daemon-reload").env("PATH", PATH).status();
    }
    Some(format!(
        "removed luksify's boot chain ({}, its initramfs hook or dracut module) from {}",
        bc::UNIT_NAME,
        root.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::integrate::Recorder;

    fn chain() -> Chain {
        Chain {
            name: "sda5_crypt".into(),
            uuid: "u-1".into(),
            discard: false,
            device: "/dev/sda5".into(),
            partuuid: None,
        }
    }

    #[test]
    fn install_then_undo_puts_the_root_back() {
        let r = crate::adapters::scratch_dir("bootchain", "undo");
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/crypttab"), "# mine\n").unwrap();
        let mut rec = Recorder::default();
        let inst = install(&r, &chain(), "aes-xts-plain64", Generator::InitramfsTools, &mut rec, "7").unwrap();
        let ct = std::fs::read_to_string(r.join("etc/crypttab")).unwrap();
        assert!(ct.starts_with("# mine\nsda5_crypt UUID=u-1 none luks,initramfs,nofail,keyscript="), "{ct}");
        for f in [bc::HOOK, bc::LOCAL_TOP, bc::UNIT, bc::UNIT_WANTS, bc::KEYSCRIPT, bc::BINARY] {
            assert!(std::fs::symlink_metadata(in_root(&r, f)).is_ok(), "{f} missing");
        }
        assert!(!in_root(&r, bc::DRACUT_MODULE_DIR).exists(), "dracut's module on an initramfs-tools system");
        assert_eq!(std::fs::read_link(in_root(&r, bc::UNIT_WANTS)).unwrap(), Path::new(bc::UNIT));
        assert_eq!(rec.calls.len(), 1);
        assert_eq!(rec.calls[0].argv[..2], [String::from("chroot"), r.display().to_string()]);
        undo(&inst, &mut rec, true).unwrap();
        assert_eq!(std::fs::read_to_string(r.join("etc/crypttab")).unwrap(), "# mine\n");
        for f in bc::FILES.iter().chain([&bc::BINARY]) {
            assert!(std::fs::symlink_metadata(in_root(&r, f)).is_err(), "{f} left");
        }
        assert!(!in_root(&r, bc::STATE_DIR).exists());
        assert_eq!(rec.calls.len(), 2, "the initramfs regenerated again");
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn a_failing_update_initramfs_undoes_and_the_finish_removes_the_files() {
        let r = crate::adapters::scratch_dir("bootchain", "fail");
        std::fs::create_dir_all(r.join("etc")).unwrap();
        let mut rec = Recorder { fail_on: Some("update-initramfs".into()), ..Default::default() };
        let e = install(&r, &chain(), "aes-xts-plain64", Generator::InitramfsTools, &mut rec, "7").unwrap_err();
        assert!(e.contains("update-initramfs"), "{e}");
        assert!(!r.join("etc/crypttab").exists(), "there was none before");
        assert!(!in_root(&r, bc::HOOK).exists());
        let mut rec = Recorder::default();
        install(&r, &chain(), "aes-xts-plain64", Generator::InitramfsTools, &mut rec, "7").unwrap();
        assert!(remove_at_finish(&r).is_some());
        assert!(remove_at_finish(&r).is_none(), "nothing left the second time");
        assert!(!in_root(&r, bc::UNIT).exists() && !in_root(&r, bc::BINARY).exists());
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn dracut_gets_its_module_and_conf_crypttab_stays_and_undo_takes_them_out() {
        let r = crate::adapters::scratch_dir("bootchain", "dracut");
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/crypttab"), "# mine\n").unwrap();
        let mut rec = Recorder::default();
        let inst = install(&r, &chain(), "aes-xts-plain64", Generator::Dracut, &mut rec, "7").unwrap();
        assert_eq!(std::fs::read_to_string(r.join("etc/crypttab")).unwrap(), "# mine\n");
        for f in [
            bc::DRACUT_MODULE_SETUP,
            bc::DRACUT_UNLOCK,
            bc::DRACUT_UNLOCK_UNIT,
            bc::DRACUT_CONF,
            bc::UNIT,
            bc::UNIT_WANTS,
            bc::BINARY,
        ] {
            assert!(std::fs::symlink_metadata(in_root(&r, f)).is_ok(), "{f} missing");
        }
        for f in [bc::HOOK, bc::LOCAL_TOP, bc::KEYSCRIPT] {
            assert!(!in_root(&r, f).exists(), "{f}: initramfs-tools' file on a dracut system");
        }
        assert!(std::fs::read_to_string(in_root(&r, bc::DRACUT_CONF))
            .unwrap()
            .contains("omit_dracutmodules+=\" crypt \""));
        assert_eq!(rec.calls.len(), 1);
        assert_eq!(rec.calls[0].argv[2..], ["dracut", "--regenerate-all", "--force"].map(String::from));
        undo(&inst, &mut rec, true).unwrap();
        assert_eq!(rec.calls.len(), 2);
        assert_eq!(rec.calls[1].argv[2..], ["dracut", "--regenerate-all", "--force"].map(String::from));
        for f in bc::FILES.iter().chain([&bc::BINARY, &bc::DRACUT_MODULE_DIR, &bc::STATE_DIR]) {
            assert!(std::fs::symlink_metadata(in_root(&r, f)).is_err(), "{f} left");
        }
        // another crypttab entry keeps dracut's crypt module in
        std::fs::write(r.join("etc/crypttab"), "swap_crypt /dev/sdb2 /dev/urandom swap\n").unwrap();
        install(&r, &chain(), "aes-xts-plain64", Generator::Dracut, &mut rec, "7").unwrap();
        assert!(!std::fs::read_to_string(in_root(&r, bc::DRACUT_CONF)).unwrap().contains("omit"));
        assert!(remove_at_finish(&r).is_some());
        assert!(!in_root(&r, bc::DRACUT_MODULE_DIR).exists() && !in_root(&r, bc::DRACUT_CONF).exists());
        std::fs::remove_dir_all(&r).unwrap();
    }
}
