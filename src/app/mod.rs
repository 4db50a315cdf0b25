//! The front door: one module per command ([`status`], [`convert`] with `--dry-run`,
//! [`resume`]), the guarded run that converting and resuming share ([`guard`]), progress
//! output ([`progress`]), and below the helpers more than one command uses (passphrase,
//! confirmation, locks, the finish's integration). Adapter work lives in the adapters.

mod convert;
mod guard;
mod power;
mod progress;
mod resume;
mod status;

use crate::adapters::blockdev::{devref_of, size_sectors_of};
use crate::adapters::integrate::{self as integ, SystemRunner};
use crate::adapters::lvmlock::{self, VgLock};
use crate::adapters::rawdisk::RawDisk;
use crate::adapters::{bootprobe, probe, sys};
use crate::cli::{Cli, Command, KeyOpts, RunOpts};
use crate::core::boot::{self, LuksChoice};
use crate::core::plan::LuksVersion;
use crate::core::tables::DevRef;
use crate::engine::EngineError;
use crate::error::{exit, Error, Result};
use std::io::{IsTerminal, Write};
use std::path::Path;

pub fn run(cli: Cli) -> Result<i32> {
    progress::start_clock();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(not_root(&cli));
    }
    match cli.command {
        Some(Command::Status { json, device }) => status::status(&device, json),
        Some(Command::Resume { opts, run, device }) => resume::resume(&device, &opts, &run),
        None => {
            let device = cli.device.expect("clap requires DEVICE");
            if cli.dry_run {
                convert::dry_run(&device, &cli.opts, cli.json)
            } else {
                convert::convert(&device, &cli.opts)
            }
        }
    }
}

/// Every command needs root: it reads the raw device, device-mapper's tables and LVM's
/// metadata, and (convert, resume) loads tables and takes LVM's locks. One line, exit 2
/// (cryptsetup's "no permission"), before anything is looked at.
fn not_root(cli: &Cli) -> Error {
    let (what, device) = match &cli.command {
        Some(Command::Status { device, .. }) => ("status", device),
        Some(Command::Resume { device, .. }) => ("resume", device),
        None if cli.dry_run => ("--dry-run", cli.device.as_ref().expect("clap requires DEVICE")),
        None => ("", cli.device.as_ref().expect("clap requires DEVICE")),
    };
    let cmd = if what.is_empty() { String::new() } else { format!("{what} ") };
    Error::NotRoot(format!(
        "`luksify {cmd}{d}` must run as root (it reads the raw device, device-mapper's tables and LVM's metadata); nothing was done: run it again with sudo",
        d = device.display()
    ))
}

pub(super) fn probe_device(device: &Path) -> Result<crate::core::facts::DeviceFacts> {
    probe_err(probe::probe(device))
}

/// [`probe_device`] with the timed read the plan's time estimate comes from (`--dry-run`).
pub(super) fn probe_device_timed(device: &Path) -> Result<crate::core::facts::DeviceFacts> {
    probe_err(probe::probe_timed(device))
}

fn probe_err(
    r: std::result::Result<crate::core::facts::DeviceFacts, probe::ProbeError>,
) -> Result<crate::core::facts::DeviceFacts> {
    r.map_err(|e| match e {
        probe::ProbeError::NotFound { .. }
        | probe::ProbeError::NotBlockDevice { .. }
        | probe::ProbeError::Access { .. } => Error::WrongDevice(e.to_string()),
        e => Error::Refused(e.to_string()),
    })
}

/// `--root` must be a directory.
pub(super) fn check_root(run: &RunOpts) -> Result<()> {
    if !run.root.is_dir() {
        return Err(Error::Usage(format!("--root {}: not a directory; nothing was changed", run.root.display())));
    }
    Ok(())
}

/// The device's size in sectors.
fn device_size(device: &Path) -> Result<u64> {
    size_sectors_of(device).map_err(|e| cannot_open(device, &e))
}

/// The device number of the raw partition (tables name devices by it).
fn raw_devref(device: &Path) -> Result<DevRef> {
    devref_of(device).map_err(|e| Error::WrongDevice(format!("{}: {e}", device.display())))
}

/// The device cannot be opened (missing, not a block device, refused O_DIRECT): exit 4.
pub(super) fn cannot_open(device: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::WrongDevice(format!("cannot open {}: {e}; check the name (`lsblk` lists block devices)", device.display()))
}

fn open_disk(device: &Path, writable: bool) -> Result<RawDisk> {
    RawDisk::open(device, writable).map_err(|e| cannot_open(device, &e))
}

fn engine_err(e: EngineError, device: &Path) -> Error {
    match e {
        EngineError::Stopped(c) => Error::Paused(format!("cursor {c}"), device.display().to_string()),
        EngineError::Refused(m) => Error::Refused(m),
        EngineError::Damaged(d) => damaged(&d, device),
        // the journal (or the header copy it points at) cannot be used: no hint that it can
        EngineError::Journal(m) => Error::Failed(format!(
            "{}: {m}; nothing was changed: keep the disk as it is and report with `luksify status --json {0}`",
            device.display()
        )),
        other => Error::Failed(format!(
            "{other}\nluksify: the journal on {} records the last safe state; `luksify status {0}` shows it and `luksify resume {0}` continues",
            device.display()
        )),
    }
}

fn damaged(d: &crate::core::evidence::Damage, device: &Path) -> Error {
    Error::Damaged { message: d.message(&device.display().to_string()), damage: Box::new(d.clone()) }
}

/// The passphrase: from `--key-file` (read whole, as cryptsetup does), else one line of piped
/// standard input, else asked on the terminal with `prompt` (twice with `confirm`).
fn passphrase(k: &KeyOpts, prompt: &str, confirm: bool) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let src = match &k.key_file {
        Some(p) => sys::KeySource::File(p),
        None if !std::io::stdin().is_terminal() => sys::KeySource::StdinLine,
        None => sys::KeySource::Terminal { prompt, confirm },
    };
    sys::read_passphrase(src).map_err(Error::Usage)
}

fn lock(device: &Path) -> Result<std::fs::File> {
    match sys::lock_device(device) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(Error::Busy(format!(
            "another luksify is running on {} (it holds the device lock; `luksify status {0}` shows it); wait for it or stop it with Ctrl-C",
            device.display()
        ))),
        Err(e) => Err(cannot_open(device, &e)),
    }
}

/// Take LVM's own lock on `vg`, exclusively, for the whole migration: no lvcreate, lvextend,
/// lvchange or autoactivation can reload an LV table of the VG while luksify converts.
/// The lock file is the one LVM named while reporting (`seen`, [`LvmFacts::vg_lock_file`]);
/// without it, asks LVM for its locking directory first (an LVM command: none may run once
/// the lock is held, it would wait for us).
///
/// [`LvmFacts::vg_lock_file`]: crate::core::facts::LvmFacts::vg_lock_file
fn lock_vg(vg: &str, seen: Option<&str>) -> Result<VgLock> {
    let seen_dir = seen.and_then(|f| Path::new(f).parent()).filter(|d| d.is_absolute());
    let dir = seen_dir.map(Path::to_path_buf).unwrap_or_else(lvmlock::locking_dir);
    let l = VgLock::acquire(&dir, vg, lvmlock::wait_from_env(), &mut |p| {
        eprintln!("luksify: waiting for LVM's lock on VG {vg} ({}): another LVM command holds it", p.display())
    })
    .map_err(|e| match e {
        lvmlock::LockError::Timeout { .. } => Error::Busy(format!("{e}; nothing was changed")),
        e => Error::Refused(format!("{e}; nothing was changed")),
    })?;
    eprintln!("luksify: holding LVM's lock on VG {vg} until the finish (LVM commands on it wait until then)");
    Ok(l)
}

fn confirm(device: &Path, run: &RunOpts) -> Result<()> {
    if run.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage("not asking for confirmation without a terminal: pass --yes".into()));
    }
    eprint!(
        "luksify will encrypt {} in place while it is in use. Back up what you cannot lose.\nType YES to go on: ",
        device.display()
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| Error::Usage(e.to_string()))?;
    if line.trim() != "YES" {
        return Err(Error::Usage("not confirmed; nothing was changed".into()));
    }
    Ok(())
}

fn announce_done(device: &Path, name: &str, uuid: &str) {
    eprintln!("luksify: done: {} is now LUKS (UUID {uuid}), open as /dev/mapper/{name}", device.display());
}

fn print_after(device: &Path, name: &str, uuid: &str, discard: bool) {
    announce_done(device, name, uuid);
    eprintln!(
        "luksify: to boot from it, add to /etc/crypttab:  {}",
        crate::core::integrate::crypttab_line(name, uuid, discard)
    );
    eprintln!("luksify: and regenerate the initramfs (Debian/Ubuntu: update-initramfs -u -k all; Fedora: dracut -f)");
}

/// Whether /boot of `--root` is on the PV now open as /dev/mapper/`name` (its LVs hold it).
fn boot_on_pv_after(name: &str, root: &Path) -> bool {
    let Ok(facts) = probe::probe(Path::new(&format!("/dev/mapper/{name}"))) else { return false };
    let choice = LuksChoice { luks: LuksVersion::Luks2, pbkdf: None, force_unknown_boot: true };
    boot::check(&facts, &bootprobe::probe_boot(root), &choice).0.boot_on_pv
}

/// After the finish: integrate into `--root` (unless --no-integrate). Exit 12 when something
/// is left to do by hand.
fn finish(
    device: &Path,
    name: &str,
    uuid: &str,
    discard: bool,
    run: &RunOpts,
    boot_on_pv: bool,
    announce: bool,
) -> Result<i32> {
    if run.no_integrate {
        print_after(device, name, uuid, discard);
        return Ok(exit::OK);
    }
    if announce {
        announce_done(device, name, uuid);
    }
    if let Some(m) = crate::adapters::bootchain::remove_at_finish(&run.root) {
        eprintln!("luksify: integration: {m}");
    }
    let raw = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let input = integ::gather(&run.root, name, uuid, discard, &raw.display().to_string(), boot_on_pv);
    let out = integ::integrate(&input, &mut SystemRunner, &integ::stamp());
    for d in &out.done {
        eprintln!("luksify: integration: {d}");
    }
    if out.manual.is_empty() {
        eprintln!("luksify: the system in {} is set up to unlock /dev/mapper/{name} at boot", run.root.display());
        Ok(exit::OK)
    } else {
        let root = if run.root == Path::new("/") { String::new() } else { format!("--root {} ", run.root.display()) };
        Err(Error::Integration(format!(
            "{}; then `luksify resume {root}{}` checks the integration again",
            out.manual.join("; "),
            device.display()
        )))
    }
}

/// Whether this machine has a TPM (for the TPM2 enrollment suggestion).
fn has_tpm() -> bool {
    Path::new("/sys/class/tpm/tpm0").exists()
}

/// After a finish (the conversion done, integrated or not): what the header on `device` has
/// beyond the passphrase, and the suggestions (`core::recovery::suggestions`), on stderr.
/// A header with a second keyslot gets no recovery key suggestion. Never any key.
fn suggest_after(device: &Path, finished: &Result<i32>) {
    if !matches!(finished, Ok(_) | Err(Error::Integration(_))) {
        return;
    }
    let Ok((t, slots)) = crate::adapters::luks::reencrypt::active_keyslots(device) else { return };
    let luks1 = t == LuksVersion::Luks1;
    let d = device.display();
    let recovery = slots.len() > 1;
    if slots.contains(&crate::adapters::luks::RECOVERY_KEYSLOT) {
        eprintln!(
            "luksify: keyslot {} holds a second key (the recovery key, if luksify made it: shown once when the header was made); {}",
            crate::adapters::luks::RECOVERY_KEYSLOT,
            if luks1 {
                format!("`cryptsetup luksKillSlot {d} 1` removes it")
            } else {
                format!("`systemd-cryptenroll --wipe-slot=recovery {d}` removes it")
            }
        );
    }
    for s in crate::core::recovery::suggestions(&d.to_string(), luks1, recovery, has_tpm(), true) {
        eprintln!("luksify: suggestion: {s}");
    }
}

/// What `luksify --version` says of the libcryptsetup it runs with.
pub fn libcryptsetup_version() -> String {
    crate::adapters::luks::library_file()
}
