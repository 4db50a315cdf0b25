//! The one guarded run that `luksify DEVICE` and `luksify resume` share: from the moment
//! luksify may suspend the device its own binary lives on to the last commit. In order:
//! stop requests become commit points (SIGINT/SIGTERM, logind's shutdown; a sleep waits at
//! one), memory is locked and pre-touched
//! (never page-fault on a suspended device), the OOM killer spares luksify, the engine runs
//! with the progress hooks holding LVM's VG lock (given back right before luksify's own
//! `pvresize`, and on every exit), and the finished mapping gets its /dev/mapper node.
//! The device lock and the VG lock are taken by the callers, before and after their own
//! checks; the integration comes after ([`super::finish`]).

use super::progress::CliHooks;
use crate::adapters::kernel::DmKernel;
use crate::adapters::lvmlock::VgLock;
use crate::adapters::rawdisk::RawDisk;
use crate::adapters::sys;
use crate::cli::RunOpts;
use crate::engine::{Engine, EngineError, Options};
use crate::error::{Error, Result};

/// Before the first suspend: stop requests, logind's delay inhibitor for shutdown and sleep
/// (held until the returned value is dropped, or the process exits: [`super::power`]),
/// locked memory, the OOM guard.
pub(super) fn arm(device: &std::path::Path) -> Result<super::power::Armed> {
    sys::install_stop_handlers().map_err(|e| Error::Failed(format!("installing signal handlers: {e}")))?;
    sys::lock_memory().map_err(|e| {
        Error::Failed(format!("mlockall failed ({e}); refusing to suspend devices without it; nothing was changed"))
    })?;
    // A failure is only a warning: the conversion is as safe as before, just not spared.
    if let Err(e) = sys::protect_from_oom_killer() {
        eprintln!("luksify: warning: cannot set oom_score_adj to -1000 ({e}): the OOM killer may pick luksify");
    }
    Ok(super::power::arm(device))
}

/// What the progress shows of the conversion being driven.
pub(super) struct Progress<'a> {
    pub name: &'a str,
    /// The device converted (its progress file is named after it).
    pub device: &'a std::path::Path,
    /// Sectors to move in all (L) and already moved.
    pub l: u64,
    pub moved: u64,
}

/// Run `engine` to the end (or a safe stop) with the options of `run`, the progress hooks
/// holding `vg_lock` until luksify's own `pvresize`; the VG lock is given back when this
/// returns, whatever happened. On success the mapping has its /dev/mapper node.
pub(super) fn drive(
    engine: &mut Engine<RawDisk, DmKernel>,
    run: &RunOpts,
    p: Progress,
    vg_lock: Option<VgLock>,
) -> std::result::Result<(), EngineError> {
    engine.set_options(Options { rate: run.rate_bytes(), max_stall: run.max_stall(), ..Options::default() });
    let mut hooks = CliHooks::new(run, p.device, p.l, p.moved, p.name);
    hooks.vg_lock = vg_lock;
    engine.run(&mut hooks)?;
    if let Err(e) = engine.kernel.ensure_node(p.name) {
        eprintln!("luksify: warning: cannot make /dev/mapper/{} ({e}); `dmsetup mknodes` makes it", p.name);
    }
    // (dropping the hooks gives the VG lock back, before anything runs LVM again)
    Ok(())
}

/// How a LUKS2 run of [`drive_standard`] starts.
pub(super) enum Start {
    /// A new conversion: insert the bridge and cut over first.
    CutOver,
    /// The device already is a LUKS2 reencryption in progress, active as the engine's mapping.
    Resume,
    /// Every step is committed and the final metadata written: only the finish is left.
    Finished,
}

/// LUKS2: (bridge and cut-over, then luksify's own steps over the plaintext segment, then)
/// libcryptsetup's own online reencryption on the mapping until it finishes or a stop
/// request ends it after a step, then the finish (the mapping as `cryptsetup open` maps it,
/// `pvresize`, through `lvm_shell` if one was started). `pass` opens the header.
#[allow(clippy::too_many_arguments)]
pub(super) fn drive_standard(
    engine: &mut Engine<RawDisk, DmKernel>,
    run: &RunOpts,
    p: Progress,
    vg_lock: Option<VgLock>,
    device: &std::path::Path,
    pass: &[u8],
    start: Start,
    lvm_shell: Option<crate::adapters::lvmshell::LvmShell>,
) -> Result<()> {
    use crate::adapters::luks::reencrypt::{self, RunEnd};
    use crate::core::units::Sectors;
    use crate::engine::{ChunkStats, Event, Hooks, StepsEnd};
    let dev = device.display().to_string();
    let mut hooks = CliHooks::new(run, p.device, p.l, p.moved, p.name);
    hooks.vg_lock = vg_lock;
    if let Start::CutOver = start {
        engine.bridge_and_cut_over(&mut hooks).map_err(|e| match e {
            (EngineError::Refused(m), _) => Error::Refused(m),
            (e, false) => Error::Failed(format!("{e}; nothing was changed (the device is the plain PV it was)")),
            (e, true) => Error::Failed(format!(
                "{e}\nluksify: `luksify status {dev}` shows what {dev} is now: the plain PV as before, or a LUKS2 reencryption in progress that `luksify resume {dev}` continues"
            )),
        })?;
    }
    // LVM's start-up for the finish's `pvresize` runs while the steps wait for the disk, and
    // stops in their suspended windows (it holds nothing while it waits for its command).
    // Stopped since it was started, it goes on after the first step's window (the one that
    // swaps the bridge's table into the switch device: it grew by a tick, 21.7 -> 31.5 ms
    // in qemu/bench, with the shell's start-up running through that step).
    if let Some(sh) = lvm_shell {
        engine.kernel.pause_during_suspends(sh.pidfd());
        hooks.lvm_shell = Some(sh);
    }
    let l = p.l;
    let mut last = p.moved;
    let again = format!("`luksify resume {dev}` continues (or, with stock cryptsetup: `cryptsetup reencrypt --resume-only --active-name {} {dev}`)", p.name);
    // A new conversion: luksify's own steps (one short suspended window each) to the end;
    // libcryptsetup takes over where luksify does not step itself (another cipher).
    let (mut stopped, mut finished) = (false, false);
    if let Start::CutOver = start {
        let lock = reencrypt::hold_lock(&engine.rec.luks_uuid).map_err(|e| {
            Error::Failed(format!("{e}\nluksify: {dev} is a LUKS2 reencryption in progress, nothing is lost; {again}"))
        })?;
        match engine.standard_steps(&mut hooks) {
            Ok(StepsEnd::Handover(done)) => last = done,
            Ok(StepsEnd::Stopped(done)) => (last, stopped) = (done, true),
            Ok(StepsEnd::Finished) => finished = true,
            Err(e) => {
                return Err(Error::Failed(format!(
                    "the reencryption stopped: {e}\nluksify: {dev} is a LUKS2 reencryption in progress, every committed step is safe; {again}"
                )))
            }
        }
        drop(lock);
    }
    let end = if matches!(start, Start::Finished) || finished {
        Ok(RunEnd::Finished)
    } else if stopped {
        Ok(RunEnd::Stopped)
    } else {
        reencrypt::run(device, p.name, pass, super::power::stop_here, &mut |done, _total| {
            let moved = Sectors::in_len(done as usize).0.min(l);
            hooks.event(&Event::ChunkDone { from: l - moved, to: l - last, stats: ChunkStats::default() });
            last = moved;
        })
    };
    match end {
        Ok(RunEnd::Finished) => {}
        Ok(RunEnd::Stopped) => {
            return Err(Error::Paused(format!("after a committed step: a LUKS2 reencryption in progress; `luksify status {dev}` shows how far"), dev))
        }
        Err(e) => {
            return Err(Error::Failed(format!(
                "the reencryption stopped: {e}\nluksify: {dev} is a LUKS2 reencryption in progress, every committed step is safe; {again}"
            )))
        }
    }
    let r = engine.finish_standard(&mut hooks);
    engine.kernel.pause_during_suspends(None);
    r.map_err(|e| {
        Error::Failed(format!("the data is all encrypted, but giving /dev/mapper/{} its final table failed: {e}; `cryptsetup close` and `cryptsetup open` give it", p.name))
    })?;
    if let Err(e) = engine.kernel.ensure_node(p.name) {
        eprintln!("luksify: warning: cannot make /dev/mapper/{} ({e}); `dmsetup mknodes` makes it", p.name);
    }
    Ok(())
}
