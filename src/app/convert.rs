//! `luksify [--dry-run [--json]] DEVICE`: plan, and convert under the guarded run.

use super::guard::{self, Progress};
use super::progress::{self, phase, undo_warning};
use super::{
    check_root, confirm, engine_err, finish, has_tpm, lock, lock_vg, open_disk, passphrase, probe_device,
    probe_device_timed, raw_devref, suggest_after,
};
use crate::adapters::blockdev::{BlockDev, OpenMode};
use crate::adapters::integrate::SystemRunner;
use crate::adapters::kernel::DmKernel;
use crate::adapters::lvmshell::LvmShell;
use crate::adapters::{bootchain, bootprobe, luks, lvm, sys};
use crate::cli::ConvertOpts;
use crate::core::boot::generator;
use crate::core::integrate::luks_uuid;
use crate::core::plan;
use crate::engine::{Engine, NewConversion};
use crate::error::{exit, Error, Result};
use std::path::Path;

/// A LUKS2 cut-over interrupted inside its window (luksify's cut-over record, no PV label, no
/// LUKS2 header) is not something to plan on: `luksify resume` rolls it back first.
fn refuse_interrupted_cut_over(device: &Path) -> Result<()> {
    let Ok(n) = super::device_size(device) else { return Ok(()) };
    let Ok(mut disk) = open_disk(device, false) else { return Ok(()) };
    if let Ok(Some(x)) = crate::engine::examine_cut_over(&mut disk, n) {
        if let crate::core::cutover::Finding::Window(r) = x.finding {
            return Err(Error::Refused(format!(
                "a conversion of {d} to LUKS2 was interrupted during its cut-over (its first {} sectors are at sector {}, luksify's cut-over record says so): run `luksify resume {d}`, which puts them back (the plain PV again), then luksify again",
                r.s,
                r.moved_at(),
                d = device.display()
            )));
        }
    }
    Ok(())
}

/// The plan with the boot checks of `--root`.
fn plan_for(facts: &crate::core::facts::DeviceFacts, o: &ConvertOpts) -> Result<plan::Plan> {
    check_root(&o.run)?;
    let boot = bootprobe::probe_boot(&o.run.root);
    let mut po = o.plan_options();
    // The kernel must map the cipher before anything changes: tried in a throwaway dm-crypt
    // mapping over an `error` device (a malformed spec is the plan's own refusal).
    if plan::cipher_form_ok(&po.cipher, po.key_bits) {
        po.kernel_cipher_error = crate::adapters::dm::probe_cipher(&po.cipher, (po.key_bits / 8) as usize).err();
    }
    Ok(plan::plan_with_boot(facts, Some(&boot), &po))
}

pub(super) fn dry_run(device: &Path, o: &ConvertOpts, json: bool) -> Result<i32> {
    refuse_interrupted_cut_over(device)?;
    let facts = probe_device_timed(device)?;
    let mut p = plan_for(&facts, o)?;
    if p.ok() {
        p.suggestions = crate::core::recovery::suggestions(
            &device.display().to_string(),
            p.luks == plan::LuksVersion::Luks1,
            o.recovery_key,
            has_tpm(),
            false,
        );
    }
    let room = room_commands(&p).filter(|_| o.make_room);
    if json {
        println!("{}", serde_json::to_string_pretty(&p).expect("plan serialises"));
    } else {
        print!("{}", plan::render(&p));
        if let Some(cmds) = &room {
            println!("  with --make-room, luksify would first run (then plan again):");
            for c in cmds {
                println!("    {}", c.join(" "));
            }
            println!("  verdict with --make-room: GO once the room is made");
        }
    }
    if p.ok() {
        Ok(exit::OK)
    } else if room.is_some() {
        // `luksify --make-room DEVICE` would make the room and go ahead: the dry-run of
        // that command says yes.
        Ok(exit::OK)
    } else {
        for r in &p.refusals {
            eprintln!("luksify: refused: {}", r.message);
        }
        Ok(exit::REFUSED)
    }
}

/// The commands `--make-room` would run: only when the sole refusal is too little tail and
/// there is something safe to do (not for `MakeRoom::Manual`).
fn room_commands(p: &plan::Plan) -> Option<Vec<Vec<String>>> {
    if p.refusals.len() != 1 || p.refusals[0].code != "too_little_tail" {
        return None;
    }
    let cmds = p.make_room.as_ref()?.commands(&p.device);
    (!cmds.is_empty()).then_some(cmds)
}

fn refused(p: &plan::Plan) -> Error {
    let msgs: Vec<String> = p.refusals.iter().map(|r| r.message.clone()).collect();
    Error::Refused(msgs.join("\nluksify: "))
}

pub(super) fn convert(device: &Path, o: &ConvertOpts) -> Result<i32> {
    let _lock = lock(device)?;
    refuse_interrupted_cut_over(device)?;
    let mut facts = probe_device(device)?;
    phase(&o.run, "probed");
    let popts = o.plan_options();
    let mut p = plan_for(&facts, o)?;
    phase(&o.run, "planned");
    let room = if o.make_room { room_commands(&p) } else { None };
    if !p.ok() && room.is_none() {
        return Err(refused(&p));
    }
    if !o.key_size.is_multiple_of(8) || o.key_size == 0 {
        return Err(Error::Usage(format!("--key-size {} is not a whole number of bytes", o.key_size)));
    }
    let pass = passphrase(&o.key, "Enter the new passphrase: ", true)?;
    if let Some(file) = o.key.key_file.as_ref().filter(|_| sys::ends_in_newline(&pass)) {
        let boot = p.boot.as_ref().is_some_and(|b| b.root_on_pv || b.boot_on_pv);
        let msg = format!(
            "the passphrase in {} ends in a line end (`echo` adds one): it becomes part of the passphrase, as with cryptsetup's --key-file",
            file.display()
        );
        if boot && !o.run.no_integrate {
            return Err(Error::Usage(format!(
                "{msg}, and nobody can type it at the boot prompt that must unlock {}'s root; write the file without it (printf '%s' PASSPHRASE > FILE); nothing was changed",
                device.display()
            )));
        }
        eprintln!("luksify: warning: {msg}: it can be given only by a key file, never typed at a prompt");
    }
    if let Some(cmds) = &room {
        eprintln!("luksify: to make room past the PV, luksify will first run:");
        for c in cmds {
            eprintln!("luksify:   {}", c.join(" "));
        }
    }
    confirm(device, &o.run)?;
    if let Some(cmds) = &room {
        lvm::make_room(cmds).map_err(|e| {
            Error::Failed(format!("making room failed: {e}; the conversion did not start (LVM reports what, if anything, it changed: see `pvs -o+pv_used {}`)", device.display()))
        })?;
        facts = probe_device(device)?;
        p = plan_for(&facts, o)?;
        if !p.ok() {
            return Err(Error::Refused(format!(
                "after making room the plan still refuses (the PV was shrunk; nothing else changed): {}",
                p.refusals.iter().map(|r| r.message.clone()).collect::<Vec<_>>().join("; ")
            )));
        }
        eprintln!("luksify: room made: {} sectors past the PV now", p.tail_have_sectors);
    }
    let g = p.geometry.expect("an accepted plan has a geometry");

    let (cipher, mode) = o
        .cipher
        .split_once('-')
        .ok_or_else(|| Error::Usage(format!("--cipher {} is not of the form cipher-mode", o.cipher)))?;
    let key = luks::VolumeKey::generate((o.key_size / 8) as usize).map_err(|e| Error::Failed(e.to_string()))?;
    let params = luks::HeaderParams {
        luks_type: popts.luks,
        cipher: cipher.to_string(),
        cipher_mode: mode.to_string(),
        key_bytes: (o.key_size / 8) as usize,
        hash: o.hash.clone(),
        pbkdf: o.pbkdf.clone(),
        pbkdf_force_iterations: o.pbkdf_force_iterations,
        iter_time_ms: o.iter_time,
        data_offset_sectors: g.s,
        uuid: None,
        label: None,
    };
    let pv_uuid = facts.lvm.as_ref().map(|l| l.pv_uuid.clone()).unwrap_or_default();
    let standard = popts.luks == plan::LuksVersion::Luks2;
    let recovery = match o.recovery_key {
        true => Some(luks::RecoveryKey::generate().map_err(|e| Error::Failed(format!("{e}; nothing was changed")))?),
        false => None,
    };
    let recovery_slot = recovery.as_ref().map(|k| {
        let grub_opens = p.boot.as_ref().is_some_and(|b| b.boot_on_pv);
        k.slot(&crate::core::recovery::keyslot_hash(!standard, grub_opens, &params.hash))
    });
    // The LVM shell for the finish's `pvresize` (`adapters::lvmshell`), started now, while
    // luksify is small (a fork after `mlockall` and the steps' buffers took 20-30 ms in the
    // test bed), and stopped until the first step's window has ended (`guard`).
    let lvm_shell = standard.then(|| lvm::Lvm::system().start_shell()).flatten();
    if let Some(sh) = &lvm_shell {
        sh.stop(true);
    }
    // Beside the header's format (CPU work), LUKS2's own steps learn the kernel's tick on a
    // private idle device (`engine::tick_marks`): mostly waiting, it costs the format almost
    // nothing, and the cut-over's and first steps' windows start just before a tick.
    let tick = standard.then(|| {
        let name = format!("{}-luksify-tick", p.name);
        let uuid =
            format!("{}luksify-tick-{}-{}", crate::adapters::dm::PRIVATE_UUID_PREFIX, std::process::id(), p.name);
        std::thread::spawn(move || match DmKernel::new() {
            Ok(mut k) => crate::engine::tick_marks(&mut k, &name, &uuid, crate::core::tick::NEED),
            Err(_) => Vec::new(),
        })
    });
    let header = if standard {
        let token = luks::reencrypt::LuksifyToken {
            name: p.name.clone(),
            allow_discards: o.allow_discards,
            pv_uuid: pv_uuid.clone(),
        };
        luks::reencrypt::format_reencrypt_header(&params, &key, &pass, g.l, &token, recovery_slot.as_ref())
    } else {
        luks::format_header(&params, &key, &pass, recovery_slot.as_ref())
    };
    // (joined on every path: the private device is gone before anything else happens)
    let ticks = tick.map(|t| t.join().unwrap_or_default());
    if let Some(t) = &ticks {
        progress::tick_learned(&o.run, t);
    }
    let ticks = ticks.unwrap_or_default();
    let header = header.map_err(|e| Error::Failed(format!("formatting the LUKS header: {e}; nothing was changed")))?;
    drop(recovery_slot);
    // The recovery key is shown now, before anything is written: from the moment the
    // header (or, LUKS1, its copy in the tail) is on the disk, the key opens it. If it
    // cannot be shown, nothing is written.
    if let (Some(k), Some(slot)) = (recovery, header.recovery_keyslot) {
        show_recovery_key(device, &k, slot, standard)?;
    }
    let pass = if standard { Some(pass) } else { None };
    phase(&o.run, "header_formatted");
    // LUKS2 with the root on the PV: the boot chain goes in before the cut-over.
    let chain = if standard { boot_chain(device, &p, o, &header.uuid)? } else { None };
    let r = convert_formatted(device, o, &p, facts, g, key, header, pass, pv_uuid, &ticks, lvm_shell);
    suggest_after(device, &r);
    if let (Err(_), Some(inst)) = (&r, &chain) {
        if device_is_plain_pv(device) {
            // stopped before the cut-over: crypttab and the initramfs as they were
            if let Err(e) = bootchain::undo(inst, &mut SystemRunner, true) {
                eprintln!("luksify: warning: taking the boot chain out again: {e}");
            }
        }
    }
    r
}

/// The frame around the recovery key on standard output: (before, after). No key in it.
fn recovery_frame(device: &Path, slot: u32, luks2: bool) -> (String, String) {
    let d = device.display();
    let rule = "-".repeat(75);
    let before = format!("\n{rule}\nRECOVERY KEY for {d} (LUKS keyslot {slot}):\n\n        ");
    let remove = if luks2 {
        format!("systemd-cryptenroll --wipe-slot=recovery {d}")
    } else {
        format!("cryptsetup luksKillSlot {d} {slot}")
    };
    let after = format!(
        "\n\nWrite this key down or store it off this machine now: it is shown only this\n\
once, and luksify keeps no copy. It opens {d} wherever the passphrase is\n\
asked for (the boot prompt, `cryptsetup open`, `luksify resume`), mid-way through\n\
the conversion and after it; anyone who has it can read the disk.\n\
To remove it later: {remove}\n{rule}\n\n"
    );
    (before, after)
}

/// Shows the recovery key once, framed, on standard output only: written straight to file
/// descriptor 1 from one buffer that is wiped afterwards (the standard library's stdout
/// buffer would keep a copy), after flushing what that buffer holds. When standard output
/// is not a terminal, a line on stderr (without the key) says where it went.
fn show_recovery_key(device: &Path, key: &luks::RecoveryKey, slot: u32, luks2: bool) -> Result<()> {
    use std::io::{IsTerminal, Write};
    use std::os::fd::FromRawFd;
    let (before, after) = recovery_frame(device, slot, luks2);
    let mut text = zeroize::Zeroizing::new(String::with_capacity(before.len() + key.as_str().len() + after.len()));
    text.push_str(&before);
    text.push_str(key.as_str());
    text.push_str(&after);
    let failed = |e: std::io::Error| {
        Error::Failed(format!(
            "cannot show the recovery key on standard output ({e}); the conversion of {} did not start",
            device.display()
        ))
    };
    std::io::stdout().flush().map_err(failed)?;
    // SAFETY: fd 1 stays open for the process's life; ManuallyDrop never closes it.
    let mut out = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    out.write_all(text.as_bytes()).map_err(failed)?;
    if !std::io::stdout().is_terminal() {
        eprintln!(
            "luksify: the recovery key for {} went to standard output (not a terminal): keep that copy as safe as the key itself",
            device.display()
        );
    }
    Ok(())
}

/// Whether `device` still starts with the plain LVM PV's label (the cut-over did not
/// happen, or was put back).
fn device_is_plain_pv(device: &Path) -> bool {
    let mut head = vec![0u8; 4096];
    let Ok(dev) = BlockDev::open(device, OpenMode::READ_DIRECT) else { return false };
    if dev.read_at(0, &mut head).is_err() {
        return false;
    }
    (0..4).any(|s| &head[s * 512..s * 512 + 8] == b"LABELONE") && luks_uuid(&head).is_none()
}

/// When the root is on the PV and the system uses initramfs-tools or dracut (with systemd),
/// set up the boot chain (`core::bootchain`) for the LUKS UUID `uuid`; refuse when the
/// initramfs's cryptsetup cannot open a reencryption in progress. Other generators: a
/// warning.
fn boot_chain(device: &Path, p: &plan::Plan, o: &ConvertOpts, uuid: &str) -> Result<Option<bootchain::Installed>> {
    let root_on_pv = p.boot.as_ref().is_some_and(|b| b.root_on_pv);
    if o.run.no_integrate || !root_on_pv {
        return Ok(None);
    }
    let facts = bootprobe::probe_boot(&o.run.root);
    let g = match generator(&facts) {
        Some(g) if crate::core::boot::has_boot_chain(g, &facts) => g,
        _ => {
            // (the plan refused this unless --force-unknown-boot, and said why)
            eprintln!("luksify: warning: the root is on {} and luksify cannot set up the boot through a conversion in progress with this initramfs generator: until the finish, a reboot needs rescue media (README, \"Recovery\")", device.display());
            return Ok(None);
        }
    };
    let v = bootchain::cryptsetup_version(&o.run.root).map_err(|e| {
        Error::Refused(format!(
            "{e}: cannot tell whether the initramfs could open the conversion in progress; nothing was changed"
        ))
    })?;
    if !crate::core::bootchain::opens_reencryption(v) {
        return Err(Error::Refused(format!(
            "the initramfs of {} would have cryptsetup {}.{}.{}, which cannot open a LUKS2 reencryption in progress (2.3.7 or later 2.3, 2.4.3 or later needed): a reboot mid-way could not boot; upgrade cryptsetup first; nothing was changed",
            o.run.root.display(), v.0, v.1, v.2
        )));
    }
    let raw = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let c = crate::core::bootchain::Chain {
        name: p.name.clone(),
        uuid: uuid.to_string(),
        discard: o.allow_discards,
        device: raw.display().to_string(),
        partuuid: bootchain::partuuid(&raw),
    };
    bootchain::install(&o.run.root, &c, &o.cipher, g, &mut SystemRunner, &integ_stamp())
        .map(Some)
        .map_err(|e| Error::Failed(format!("setting up the boot chain: {e}; nothing was changed")))
}

fn integ_stamp() -> String {
    crate::adapters::integrate::stamp()
}

#[allow(clippy::too_many_arguments)]
fn convert_formatted(
    device: &Path,
    o: &ConvertOpts,
    p: &plan::Plan,
    facts: crate::core::facts::DeviceFacts,
    g: crate::core::geometry::Geometry,
    key: luks::VolumeKey,
    header: luks::Header,
    pass: Option<zeroize::Zeroizing<Vec<u8>>>,
    pv_uuid: String,
    ticks: &[std::time::Instant],
    lvm_shell: Option<LvmShell>,
) -> Result<i32> {
    let popts = o.plan_options();
    let raw = raw_devref(device)?;
    // From here to the finish, no LVM command may change the VG (ours included).
    let vg_lock = match facts.lvm.as_ref().filter(|l| !l.vg_name.is_empty()) {
        Some(l) => Some(lock_vg(&l.vg_name, l.vg_lock_file.as_deref())?),
        None => None,
    };

    let _power = guard::arm(device)?;
    phase(&o.run, "memory_locked");
    let disk = open_disk(device, true)?;
    let kernel = DmKernel::new().map_err(|e| Error::Failed(e.to_string()))?;
    let conversion = NewConversion {
        raw,
        geometry: g,
        name: &p.name,
        luks_version: popts.luks.number(),
        luks_uuid: &header.uuid,
        cipher: &o.cipher,
        allow_discards: o.allow_discards,
        pv_uuid: &pv_uuid,
        key: key.as_bytes(),
        header: header.bytes.clone(),
    };
    if let Some(pass) = pass {
        let mut engine = Engine::prepare_standard(disk, kernel, conversion).map_err(|e| engine_err(e, device))?;
        engine.seed_ticks(ticks);
        drop(key);
        phase(&o.run, "prepared");
        let progress = Progress { device, name: &p.name, l: g.l, moved: 0 };
        guard::drive_standard(&mut engine, &o.run, progress, vg_lock, device, &pass, guard::Start::CutOver, lvm_shell)?;
        drop(pass);
        drop(engine);
        let boot_on_pv = p.boot.as_ref().map(|b| b.boot_on_pv).unwrap_or(false);
        return finish(device, &p.name, &header.uuid, o.allow_discards, &o.run, boot_on_pv, true);
    }
    let mut engine = Engine::prepare(disk, kernel, conversion).map_err(|e| engine_err(e, device))?;
    drop(key);
    phase(&o.run, "prepared");
    let progress = Progress { device, name: &p.name, l: g.l, moved: 0 };
    if let Err(e) = guard::drive(&mut engine, &o.run, progress, vg_lock) {
        // Failed before anything but the tail changed (e.g. an LV table that would not
        // reroute): put the tail back, so the device is exactly as it was.
        let abandoned = engine.abandon();
        for m in engine.take_undo_failures() {
            eprintln!("{}", undo_warning(&m));
        }
        return match abandoned {
            Ok(true) => Err(Error::Failed(format!("{e}; nothing was changed (the device is as it was)"))),
            Ok(false) => Err(engine_err(e, device)),
            Err(e2) => Err(Error::Failed(format!(
                "{e}; then restoring the tail failed too ({e2}): run `luksify resume {}`",
                device.display()
            ))),
        };
    }
    let boot_on_pv = p.boot.as_ref().map(|b| b.boot_on_pv).unwrap_or(false);
    finish(device, &p.name, &header.uuid, o.allow_discards, &o.run, boot_on_pv, true)
}
