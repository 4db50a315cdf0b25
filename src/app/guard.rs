//! The one guarded run that `luksify DEVICE` and `luksify resume` share: from the moment
//! luksify may suspend the device its own binary lives on to the last commit. In order:
//! stop requests become commit points (SIGINT/SIGTERM), memory is locked and pre-touched
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

/// Before the first suspend: stop requests, locked memory, the OOM guard.
pub(super) fn arm() -> Result<()> {
    sys::install_stop_handlers().map_err(|e| Error::Failed(format!("installing signal handlers: {e}")))?;
    sys::lock_memory().map_err(|e| {
        Error::Failed(format!("mlockall failed ({e}); refusing to suspend devices without it; nothing was changed"))
    })?;
    // A failure is only a warning: the conversion is as safe as before, just not spared.
    if let Err(e) = sys::protect_from_oom_killer() {
        eprintln!("luksify: warning: cannot set oom_score_adj to -1000 ({e}): the OOM killer may pick luksify");
    }
    Ok(())
}

/// What the progress shows of the conversion being driven.
pub(super) struct Progress<'a> {
    pub name: &'a str,
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
    let mut hooks = CliHooks::new(run, p.l, p.moved, p.name);
    hooks.vg_lock = vg_lock;
    engine.run(&mut hooks)?;
    if let Err(e) = engine.kernel.ensure_node(p.name) {
        eprintln!("luksify: warning: cannot make /dev/mapper/{} ({e}); `dmsetup mknodes` makes it", p.name);
    }
    // (dropping the hooks gives the VG lock back, before anything runs LVM again)
    Ok(())
}
