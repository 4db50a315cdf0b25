//! `lvm` started early as a shell (no arguments: commands on its standard input) to run the
//! finish's `pvresize` later. Most of an LVM command's time is LVM's own start-up (in the
//! test bed ~120 of ~200 ms: the binary's page faults and its command definitions). The
//! shell is started before the LUKS header is made (while luksify is small: a fork after
//! `mlockall` and the steps' buffers took 20-30 ms in the bed), stopped at once, and let go
//! when the steps begin; it then runs at SCHED_IDLE while they wait for the disk, stopped in
//! their suspended windows ([`crate::adapters::kernel::DmKernel::pause_during_suspends`]), so
//! that at the finish only the command itself is left (~60 ms in the bed against ~200).
//!
//! Until the command is sent the shell waits for a line: it holds no LVM lock and no device
//! open (LVM takes its locks per command). luksify gone, the kernel kills it
//! (`PR_SET_PDEATHSIG`, stopped or not), and it would get EOF on its input anyway and exit
//! having done nothing. So nothing but luksify's own finish, after the journal is cleared
//! and LVM's VG lock given back, makes it change anything.
//!
//! Best effort, as the `pvresize` it serves: if the shell cannot be started, or its output
//! does not say the PV was resized, the caller runs `lvm pvresize` as before.

use super::lvm::LvmError;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

/// The shell, started; killed (SIGKILL, not waited for) when dropped unused.
pub struct LvmShell {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pidfd: Option<OwnedFd>,
}

impl LvmShell {
    /// Start `program` (the system's `lvm`, or `$LUKSIFY_LVM`) as a shell in the background
    /// (SCHED_IDLE, its own process group, killed with luksify: `PR_SET_PDEATHSIG`), with
    /// `env` besides luksify's own; None if it cannot be started.
    pub fn start(program: &OsStr, env: &[(OsString, OsString)]) -> Option<LvmShell> {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        let mut c = Command::new(program);
        c.envs(env.iter().map(|(k, v)| (k, v)));
        // (no HOME: an LVM shell keeps its history in $HOME/.lvm_history otherwise)
        c.env_remove("HOME")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .env("LC_ALL", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls (setpgid,
        // sched_setscheduler, setpriority, prctl, getppid, _exit).
        unsafe {
            c.pre_exec(move || {
                // its own process group: a Ctrl-C on luksify's terminal is luksify's stop
                // request, not the shell's end
                libc::setpgid(0, 0);
                // SCHED_IDLE: it runs only when nothing else would (in the A/B of HACKING.md,
                // beside luksify's steps, it cost them less than at niceness 10)
                let p = libc::sched_param { sched_priority: 0 };
                if libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) != 0 {
                    libc::setpriority(libc::PRIO_PROCESS, 0, super::sys::HELPER_NICE);
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = c.spawn().ok()?;
        let stdin = child.stdin.take();
        // SAFETY: pidfd_open on our own unreaped child; the fd returned is ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
        Some(LvmShell { child: Some(child), stdin, pidfd })
    }

    /// Stop the shell (SIGSTOP) or let it go on (SIGCONT): started before the work whose
    /// CPU it must not take, it waits stopped until the steps begin.
    pub fn stop(&self, stop: bool) {
        if let Some(p) = &self.pidfd {
            signal(p, if stop { libc::SIGSTOP } else { libc::SIGCONT });
        }
    }

    /// A pidfd of the shell (a signal sent through it never reaches another process, even
    /// once the shell is gone and its pid reused). None where the kernel has no pidfds.
    pub fn pidfd(&self) -> Option<OwnedFd> {
        self.pidfd.as_ref().and_then(|f| f.try_clone().ok())
    }

    /// **Changes LVM metadata.** `pvresize DEVICE` through the shell (the PV made to fill
    /// its device), then EOF: the shell exits. Ok only if LVM says it resized one PV and
    /// failed none.
    pub fn pvresize(mut self, device: &Path) -> Result<(), LvmError> {
        let dev = device.to_string_lossy().into_owned();
        let cmd = format!("pvresize {dev}");
        let failed =
            |why: String| LvmError::Failed { cmd: format!("lvm (shell): {cmd}"), status: "-".into(), stderr: why };
        // (the shell splits its line at blanks and reads quotes: such a path goes the long way)
        if dev.chars().any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '#')) {
            return Err(failed("the device's path needs quoting".into()));
        }
        // (stopped around a suspended window that never resumed: it goes on now)
        if let Some(p) = &self.pidfd {
            signal(p, libc::SIGCONT);
        }
        let mut stdin = self.stdin.take().ok_or_else(|| failed("no input to the shell".into()))?;
        let sent = stdin.write_all(format!("{cmd}\n").as_bytes());
        drop(stdin);
        let child = self.child.take().expect("a shell not yet used");
        let out = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
        sent.map_err(|e| failed(format!("writing to the shell: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match resized(&stdout) {
            Some((1.., 0)) => Ok(()),
            _ => Err(failed(format!(
                "{}{}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .map(|l| format!(" {}", l.trim()))
                    .unwrap_or_default()
            ))),
        }
    }
}

impl Drop for LvmShell {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // (not waited for: it may be stopped, or waiting for a suspended device)
            let _ = c.kill();
            let _ = c.try_wait();
        }
    }
}

/// From `pvresize`'s output, its summary: (PVs resized or updated, PVs not resized).
/// lvm2 2.02 and 2.03 both end with `%d physical volume(s) resized[ or updated] / %d
/// physical volume(s) not resized`.
pub fn resized(stdout: &str) -> Option<(u32, u32)> {
    let line = stdout.lines().find(|l| l.contains("physical volume(s) not resized"))?;
    let (done, not) = line.split_once('/')?;
    let first = |s: &str| s.split_whitespace().next()?.parse().ok();
    Some((first(done)?, first(not)?))
}

/// Send `sig` to the process of `pidfd` (`pidfd_send_signal`): a process already gone
/// (reaped) gets nothing, and no other process can.
pub fn signal(pidfd: &OwnedFd, sig: libc::c_int) {
    // SAFETY: a plain system call on an fd we own; errors (ESRCH: gone) are ignored.
    unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_says_what_was_resized() {
        let ok = "  Physical volume \"/dev/mapper/x\" changed\n  1 physical volume(s) resized or updated / 0 physical volume(s) not resized\n";
        assert_eq!(resized(ok), Some((1, 0)));
        let old = "  1 physical volume(s) resized / 0 physical volume(s) not resized\n";
        assert_eq!(resized(old), Some((1, 0)));
        let failed = "  0 physical volume(s) resized or updated / 1 physical volume(s) not resized\n";
        assert_eq!(resized(failed), Some((0, 1)));
        assert_eq!(resized("  No such command.  Try 'lvm help'.\n"), None);
        assert_eq!(resized(""), None);
    }
}
