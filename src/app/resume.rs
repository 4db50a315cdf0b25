//! `luksify resume DEVICE`: continue from the journal under the guarded run, or, on a
//! finished device, redo the integration.

use super::guard::{self, Progress};
use super::{
    boot_on_pv_after, check_root, device_size, engine_err, finish, lock, lock_vg, open_disk, passphrase, raw_devref,
    suggest_after,
};
use crate::adapters::blockdev::{BlockDev, OpenMode};
use crate::adapters::bootprobe;
use crate::adapters::kernel::DmKernel;
use crate::adapters::luks;
use crate::adapters::lvm;
use crate::cli::{KeyOpts, RunOpts};
use crate::core::integrate::{crypttab_discard, luks_uuid};
use crate::core::journal::{Record, State};
use crate::core::state as fsm;
use crate::engine::{self, Engine};
use crate::error::{Error, Result};
use std::path::Path;

/// The VG on the bridge `name`, if the bridge exists (its node is made if missing).
fn vg_on_bridge(kernel: &DmKernel, name: &str) -> Option<String> {
    kernel.ensure_node(name).ok()?;
    lvm::vg_on_label(&Path::new("/dev/mapper").join(name))
}

/// `resume` on a device whose conversion has finished (LUKS header, no journal): only the
/// integration is (re)done. The device must be open (its mapping name is taken from it).
fn resume_finished(device: &Path, run: &RunOpts) -> Result<i32> {
    let nothing = || {
        Error::Refused(format!(
            "no luksify conversion in progress on {} (no journal): nothing to resume",
            device.display()
        ))
    };
    if run.no_integrate {
        return Err(nothing());
    }
    let dev = BlockDev::open(device, OpenMode::READ_DIRECT).map_err(|e| super::cannot_open(device, &e))?;
    let mut head = vec![0u8; 4096];
    dev.read_at(0, &mut head).map_err(|e| Error::Failed(format!("cannot read {}: {e}", device.display())))?;
    drop(dev);
    let uuid = luks_uuid(&head).ok_or_else(nothing)?;
    let name = DmKernel::luks_mapping_of(&uuid)
        .map_err(|e| Error::Failed(e.to_string()))?
        .ok_or_else(|| Error::Refused(format!(
            "{} is LUKS (UUID {uuid}) and no conversion is in progress, but it is not open: `cryptsetup open {} <name>`, then `luksify resume {}` sets up the system integration",
            device.display(), device.display(), device.display()
        )))?;
    eprintln!("luksify: {}: the conversion has finished (LUKS UUID {uuid}, open as /dev/mapper/{name}); checking the system integration", device.display());
    let crypttab = std::fs::read_to_string(bootprobe::in_root(&run.root, "/etc/crypttab")).unwrap_or_default();
    let discard = crypttab_discard(&crypttab, &name);
    let boot_on_pv = boot_on_pv_after(&name, &run.root);
    finish(device, &name, &uuid, discard, run, boot_on_pv, false)
}

pub(super) fn resume(device: &Path, k: &KeyOpts, run: &RunOpts) -> Result<i32> {
    let _lock = lock(device)?;
    if !run.no_integrate {
        check_root(run)?;
    }
    let n = device_size(device)?;
    let raw = raw_devref(device)?;
    let mut disk = open_disk(device, true)?;
    if let Some(rc) = finish_interrupted_cut_over(&mut disk, n, device)? {
        return Ok(rc);
    }
    if let Some((meta, r)) =
        super::status::read_luks2(&mut disk, n, device)?.and_then(|m| m.reencrypt.clone().map(|r| (m, r)))
    {
        return resume_standard(device, k, run, disk, raw, n, &meta, &r);
    }
    let rec: Record = match engine::read_journal(&mut disk, n).map_err(|e| engine_err(e, device))? {
        Some(r) => r,
        None => {
            drop(disk);
            return resume_finished(device, run);
        }
    };
    let discard = rec.allow_discards;
    let header = engine::read_header_copy(&mut disk, &rec).map_err(|e| engine_err(e, device))?;
    let pass = passphrase(k, &format!("Enter the passphrase for {}: ", device.display()), false)?;
    let key = luks::unlock(&header, &pass).map_err(|e| unlock_err(e, device))?;
    drop(pass);
    let _power = guard::arm(device)?;
    let kernel = DmKernel::new().map_err(|e| Error::Failed(e.to_string()))?;
    let name = rec.name.clone();
    // LVM's VG lock, as for a conversion. On a live system the bridge already shows the PV:
    // lock before rebuilding anything. On rescue media the bridge is made by `reopen`, and
    // the lock is taken right after (nothing of LVM's maps the device by then).
    // (Only if reading the bridge cannot block: a luksify killed mid-step may have left it,
    // or a helper under it, suspended; `reopen` resumes them.)
    let names = crate::engine::Names::new(&name, rec.luks_version, &rec.luks_uuid);
    let readable = kernel.is_live(&name) && ![&names.staging, &names.mirror].iter().any(|n| kernel.is_suspended(n));
    let mut vg_lock = match readable {
        true => vg_on_bridge(&kernel, &name).map(|vg| lock_vg(&vg, None)).transpose()?,
        false => None,
    };
    let uuid = rec.luks_uuid.clone();
    let l = rec.geometry.l;
    let moved = match rec.state {
        State::Migrating { cursor } => l - cursor,
        State::HeaderWritten => l,
        _ => 0,
    };
    eprintln!(
        "luksify: resuming from state {} ({:.1}% moved)",
        rec.state.name(),
        100.0 * fsm::progress(&rec.geometry, rec.state)
    );
    let mut engine =
        Engine::reopen(disk, kernel, raw, rec, key.as_bytes(), header).map_err(|e| engine_err(e, device))?;
    drop(key);
    if vg_lock.is_none() {
        match vg_on_bridge(&engine.kernel, &name) {
            Some(vg) => vg_lock = Some(lock_vg(&vg, None)?),
            None => eprintln!("luksify: warning: no LVM metadata found on /dev/mapper/{name}; not holding any VG lock"),
        }
    }
    let progress = Progress { device, name: &name, l, moved };
    guard::drive(&mut engine, run, progress, vg_lock).map_err(|e| engine_err(e, device))?;
    drop(engine);
    let boot_on_pv = !run.no_integrate && boot_on_pv_after(&name, &run.root);
    let r = finish(device, &name, &uuid, discard, run, boot_on_pv, true);
    suggest_after(device, &r);
    r
}

/// LUKS2: a cut-over interrupted by a crash (journal-format.md, "The cut-over record"). If
/// luksify's cut-over record is on the device: the plain PV (a stale record erased) or a
/// rollback end the command (`Some(0)`: run luksify again); a complete LUKS2 header gets
/// the cut-over's last cleanup and the resume goes on (`None`). Nothing without a record.
fn finish_interrupted_cut_over(
    disk: &mut crate::adapters::rawdisk::RawDisk,
    n: u64,
    device: &Path,
) -> Result<Option<i32>> {
    use crate::core::cutover::Decision;
    let dev = device.display();
    let d = engine::recover_cut_over(disk, n).map_err(|e| match e {
        crate::engine::EngineError::Refused(m) => Error::Refused(format!("{dev}: {m}")),
        e => Error::Failed(format!(
            "{dev}: recovering an interrupted cut-over to LUKS2: {e}; luksify's cut-over record is still on the device: fix the device and run `luksify resume {dev}` again"
        )),
    })?;
    match d {
        Decision::Nothing => Ok(None),
        Decision::Luks2 { cleaned } => {
            if cleaned {
                eprintln!(
                    "luksify: {dev}: the cut-over to LUKS2 had written its header; finished its cleanup (the rest of the header area zeroed, luksify's cut-over record removed)"
                );
            }
            Ok(None)
        }
        Decision::ErasedStale => {
            eprintln!(
                "luksify: {dev}: the conversion had stopped before it changed the physical volume; removed luksify's cut-over record. {dev} is the plain PV it was: run luksify again to convert it"
            );
            Ok(Some(0))
        }
        Decision::RolledBack => {
            eprintln!(
                "luksify: {dev}: the cut-over to LUKS2 was interrupted before its header was complete; the conversion was rolled back to the plain PV (its first sectors put back from their copy in the tail). Run luksify again to convert it"
            );
            Ok(Some(0))
        }
    }
}

/// LUKS2: the device is a standard reencryption in progress. Open it (an interrupted step
/// is recovered by libcryptsetup's activation, as `cryptsetup open` does) unless its mapping
/// is active already (a paused luksify, or the initramfs opened it), then run
/// libcryptsetup's online reencryption on the mapping to the end and finish.
#[allow(clippy::too_many_arguments)]
fn resume_standard(
    device: &Path,
    k: &KeyOpts,
    run: &RunOpts,
    mut disk: crate::adapters::rawdisk::RawDisk,
    raw: crate::core::tables::DevRef,
    n: u64,
    meta: &crate::core::luks2meta::Meta,
    r: &crate::core::luks2meta::Reencrypt,
) -> Result<i32> {
    use crate::adapters::luks::reencrypt;
    use crate::core::geometry::{Geometry, MAX_STEP};
    use crate::core::units::Sectors;
    let dev = device.display().to_string();
    let token = meta.token.clone();
    let default_name = format!(
        "{}_crypt",
        device.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "luksify".into())
    );
    let active = DmKernel::luks_mapping_of(&meta.uuid).map_err(|e| Error::Failed(e.to_string()))?;
    let name = active.clone().or_else(|| token.as_ref().map(|t| t.name.clone())).unwrap_or(default_name);
    let discard = token.as_ref().map(|t| t.allow_discards).unwrap_or(false);
    let pv_uuid = token.as_ref().map(|t| t.pv_uuid.clone()).unwrap_or_default();
    let (l, s) = (Sectors::in_len(r.total_bytes as usize).0, Sectors::in_len(r.data_offset as usize).0);
    eprintln!(
        "luksify: {dev} is a standard LUKS2 reencryption in progress ({:.1}% encrypted{})",
        100.0 * r.progress(),
        if r.crashed { ", a step was interrupted" } else { "" }
    );
    match meta.copies_valid {
        (false, _) => eprintln!("luksify: the primary copy of the LUKS2 header does not verify: the secondary is used, and libcryptsetup rewrites the primary from it (as `cryptsetup open` does)"),
        (_, false) => eprintln!("luksify: the secondary copy of the LUKS2 header does not verify: the primary is used, and libcryptsetup rewrites the secondary from it (as `cryptsetup open` does)"),
        _ => {}
    }
    // Another libcryptsetup reencrypting it (`cryptsetup reencrypt`): refuse before anything.
    // libcryptsetup checks the lock again itself (reencrypt_err maps its -EBUSY).
    if let Some((lock, pid)) = reencrypt::lock_held(&meta.uuid) {
        return Err(Error::Busy(format!(
            "{dev}: another program is reencrypting this device: cryptsetup's reencryption lock {} is held by process {pid} (a running `cryptsetup reencrypt`, or another luksify); nothing was changed; wait until it ends, then see `luksify status {dev}`",
            lock.display()
        )));
    }
    let pass = passphrase(k, &format!("Enter the passphrase for {}: ", device.display()), false)?;
    // The key, for the final table (libcryptsetup keeps its own copy in the kernel keyring
    // only while it runs). Checks the passphrase before anything changes, then the
    // reencryption's digest (what libcryptsetup's activation and resume check), both on a
    // copy of the header in memory.
    let mut head = vec![0u8; Sectors(s).byte_len()];
    crate::engine::Disk::read(&mut disk, 0, &mut head)
        .map_err(|e| Error::Failed(format!("{dev}: reading the LUKS2 header: {e}")))?;
    let key = luks::unlock(&head, &pass).map_err(|e| unlock_err(e, device))?;
    reencrypt::verify(&head, &pass).map_err(|e| standard_err(e, &dev, "checking the LUKS2 header"))?;
    let mut start = guard::Start::Resume;
    let fin = crate::core::luks2meta::finalized_header(&head)
        .map_err(|e| Error::Failed(format!("{dev}: {e}; nothing was changed")))?;
    if let Some(f) = fin {
        // cryptsetup's own resume cannot leave this state; write what its teardown writes
        eprintln!("luksify: every step is committed; writing the final LUKS2 metadata (the reencryption's teardown)");
        crate::engine::write_final(&mut disk, &f).map_err(|e| {
            Error::Failed(format!("{dev}: writing the final LUKS2 metadata: {e}; every step is committed, `luksify resume {dev}` tries again"))
        })?;
        start = guard::Start::Finished;
    }
    match &active {
        Some(a) => eprintln!("luksify: /dev/mapper/{a} is active: continuing online"),
        None => {
            eprintln!(
                "luksify: opening {dev} as /dev/mapper/{name} (cryptsetup's activation{})",
                if r.crashed { ", which first recovers the interrupted step" } else { "" }
            );
            reencrypt::activate(device, &name, &pass).map_err(|e| standard_err(e, &dev, "opening it"))?;
            // The recovery of an interrupted last step ends the reencryption: libcryptsetup
            // then writes the final metadata (reencrypt_recovery's teardown), and only the
            // finish is left (power-cut seed 1796327513: 93.7% of 253 MiB, the last hotzone).
            if r.crashed {
                let now = reencrypt::status(device)
                    .map_err(|e| standard_err(e, &dev, "reading its header after the recovery"))?;
                if now == reencrypt::Reencryption::None {
                    eprintln!("luksify: the recovered step was the last one: the reencryption has finished (libcryptsetup wrote the final LUKS2 metadata)");
                    start = guard::Start::Finished;
                }
            }
        }
    }
    // A mapping made by another process (the initramfs's cryptsetup, an earlier luksify)
    // names its key in the kernel keyring: libcryptsetup reloads that table, so the key
    // must be found from here too.
    let held = active.as_deref().and_then(|a| hold_active_key(a, &meta.uuid, key.as_bytes()));
    let g = Geometry::new(n, l, s, s.min(MAX_STEP), 8192)
        .map_err(|e| Error::Failed(format!("{dev}: the LUKS2 metadata describes an impossible layout: {e}")))?;
    let kernel = DmKernel::new().map_err(|e| Error::Failed(e.to_string()))?;
    // A luksify killed in a step's suspended window leaves the bridge suspended: nothing may
    // read it (LVM's label below) before it has its table again.
    // (not after a crashed step: that one was libcryptsetup's, whose recovery comes first)
    let suspended = active.is_some() && !r.crashed && kernel.is_suspended(&name);
    let mut vg_lock = match suspended {
        false => vg_on_bridge(&kernel, &name).map(|vg| lock_vg(&vg, None)).transpose()?,
        true => None,
    };
    let _power = guard::arm(device)?;
    let conversion = crate::engine::NewConversion {
        raw,
        geometry: g,
        name: &name,
        luks_version: 2,
        luks_uuid: &meta.uuid,
        cipher: &r.cipher,
        allow_discards: discard,
        pv_uuid: &pv_uuid,
        key: key.as_bytes(),
        header: head[..head.len() / 4096 * 4096].to_vec(),
    };
    let mut engine = Engine::prepare_standard(disk, kernel, conversion).map_err(|e| engine_err(e, device))?;
    drop(key);
    let moved = Sectors::in_len(r.encrypted_bytes as usize).0.min(l);
    if active.is_some() && !r.crashed {
        // a luksify killed between its own steps leaves the bridge through its switch device,
        // one killed in a step's window leaves it suspended
        match engine.leave_leftover_switch(l - moved, suspended) {
            Ok(true) => eprintln!("luksify: /dev/mapper/{name} was left {} by a luksify that was killed: it has the standard table of the metadata's state again", if suspended { "suspended" } else { "going through luksify's switch device" }),
            Ok(false) => {}
            Err(e) => return Err(Error::Failed(format!("{dev}: {e}; nothing is lost: `luksify resume {dev}` tries again, or reboot"))),
        }
    }
    if suspended {
        if let Some(vg) = vg_on_bridge(&engine.kernel, &name) {
            vg_lock = Some(lock_vg(&vg, None)?);
        }
    }
    let progress = Progress { device, name: &name, l, moved };
    let driven = guard::drive_standard(&mut engine, run, progress, vg_lock, device, &pass, start, None);
    if let Some(id) = held {
        reencrypt::release_key(id);
    }
    driven?;
    drop(pass);
    drop(engine);
    let boot_on_pv = !run.no_integrate && boot_on_pv_after(&name, &run.root);
    let r = finish(device, &name, &meta.uuid, discard, run, boot_on_pv, true);
    suggest_after(device, &r);
    r
}

/// The header copy or header did not open with the passphrase: a wrong passphrase is exit 2
/// (cryptsetup's), anything else a refusal; nothing was changed either way.
fn unlock_err(e: luks::LuksError, device: &Path) -> Error {
    let d = device.display();
    match e {
        luks::LuksError::WrongPassphrase => Error::BadPassphrase(format!(
            "{d}: {e}; nothing was changed: give the passphrase set when the conversion of {d} started"
        )),
        e => Error::Refused(format!("{d}: {e}; nothing was changed")),
    }
}

/// A libcryptsetup refusal before the reencryption runs, for the user: another program
/// reencrypting (busy, exit 5), a digest that does not verify (damaged header, exit 13), a
/// wrong passphrase (exit 2), else a failure. libcryptsetup refuses these before writing anything.
fn standard_err(e: luks::LuksError, dev: &str, doing: &str) -> Error {
    match e {
        luks::LuksError::ReencryptionLocked(_) => Error::Busy(format!(
            "{dev}: {e}; nothing was changed; wait until it ends, then see `luksify status {dev}`"
        )),
        luks::LuksError::BadReencryptDigest(_) => Error::DamagedHeader(format!(
            "{dev}: {e}: the reencryption's parameters were altered or are corrupt, and continuing with them would destroy data; nothing was changed: do not write to {dev}; keep the disk as it is and report with `luksify status --json {dev}` and `cryptsetup luksDump {dev}`"
        )),
        luks::LuksError::WrongPassphrase => unlock_err(e, Path::new(dev)),
        e => Error::Failed(format!("{dev}: {doing} failed: {e}; nothing was changed by luksify")),
    }
}

/// The keyring description in the live table of `name` (`:64:logon:cryptsetup:<uuid>-d0`;
/// `dmsetup table` masks it without `--showkeys`, which for such a table shows only the
/// description), put into the keyring of libcryptsetup's thread with `key`; its serial number.
/// A table without one (the key in hex) needs nothing: None.
fn hold_active_key(name: &str, uuid: &str, key: &[u8]) -> Option<i32> {
    let out = std::process::Command::new("dmsetup")
        .args(["table", "--showkeys", name])
        .env("PATH", crate::core::integrate::PATH)
        .output();
    let table = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let desc = match keyring_desc_in_table(&table) {
        Some(d) => d,
        None if table.contains(" crypt ") => return None,
        // (no table read: cryptsetup's own name for the segment key of luksify's headers)
        None => format!("cryptsetup:{uuid}-d0"),
    };
    match crate::adapters::luks::reencrypt::hold_key(&desc, key) {
        Ok(id) => {
            eprintln!("luksify: /dev/mapper/{name} reads its key from the kernel keyring ({desc}): holding it for libcryptsetup");
            Some(id)
        }
        Err(e) => {
            eprintln!("luksify: warning: cannot put the volume key of /dev/mapper/{name} into the keyring ({e})");
            None
        }
    }
}

/// The first `logon` key description a crypt table names (`:<len>:logon:<desc>`).
fn keyring_desc_in_table(table: &str) -> Option<String> {
    table.split_whitespace().find_map(|w| {
        let rest = w.strip_prefix(':')?;
        let (_, rest) = rest.split_once(':')?;
        rest.strip_prefix("logon:").map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_key_description_of_a_live_crypt_table() {
        let t = "0 32768 linear 254:5 1230848\n32768 1000 crypt aes-xts-plain64 :64:logon:cryptsetup:035d9171-8721-4d95-8a2e-4199351531e4-d0 0 254:5 32768\n";
        assert_eq!(
            super::keyring_desc_in_table(t).as_deref(),
            Some("cryptsetup:035d9171-8721-4d95-8a2e-4199351531e4-d0")
        );
        assert_eq!(super::keyring_desc_in_table("0 8 crypt aes-xts-plain64 00ff 0 8:1 0"), None);
    }
}
