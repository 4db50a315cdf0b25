//! Process-level system calls: memory locking, stop signals, the per-device lock, and
//! reading the passphrase.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroizing;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The niceness of the helper programs luksify runs (LVM's reports and `pvresize`): they
/// are background work beside the running system (in the one-CPU test bed, `lvm`'s device
/// scans at full priority delayed a writer's fsync'd records by 20-30 ms). luksify itself
/// keeps its priority: its suspended windows must not wait for the CPU.
pub const HELPER_NICE: i32 = 10;

/// `c` runs at [`HELPER_NICE`].
pub fn in_background(c: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only makes one
    // async-signal-safe system call; a failure is ignored (the helper runs at our priority).
    unsafe {
        c.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, HELPER_NICE);
            Ok(())
        })
    }
}

/// SIGINT and SIGTERM set a flag (no SA_RESTART, so a blocking DM_DEV_WAIT returns EINTR
/// and the engine notices); the engine stops at its next commit point.
pub fn install_stop_handlers() -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(SigHandler::Handler(on_stop), SaFlags::empty(), SigSet::empty());
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(s, &act) }.map_err(io::Error::from)?;
    }
    Ok(())
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Lock every page of the process, now and future: the binary may live on the device
/// whose bridge gets suspended, and a page fault then would deadlock the machine.
pub fn lock_memory() -> io::Result<()> {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE).map_err(io::Error::from)
}

/// Tell the OOM killer to leave this process alone (`oom_score_adj` -1000, as LVM does in
/// its critical sections): killed while the bridge is suspended, luksify would leave every
/// filesystem on the device frozen; killed between steps, a conversion paused that only a
/// `resume` continues. Its memory is locked and bounded, so sparing it costs the system
/// little.
pub fn protect_from_oom_killer() -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", b"-1000")
}

/// An exclusive, non-blocking BSD lock on the device node: a second luksify on the same
/// device is refused while the first runs. Held until the returned file is dropped.
pub fn lock_device(path: &Path) -> io::Result<Option<File>> {
    let f = File::open(path)?;
    // SAFETY: plain flock on an fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(Some(f))
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// Where the passphrase comes from.
pub enum KeySource<'a> {
    /// A file, read whole (cryptsetup's --key-file semantics: every byte counts); "-" = stdin.
    File(&'a Path),
    /// Asked on the terminal with `prompt`, without echo; `confirm` asks twice.
    Terminal { prompt: &'a str, confirm: bool },
    /// Standard input that is not a terminal, without --key-file: one line, its newline
    /// not part of the passphrase (as cryptsetup reads a piped passphrase).
    StdinLine,
}

/// Read the passphrase. Errors name the problem; nothing is changed by a failure here.
pub fn read_passphrase(src: KeySource<'_>) -> Result<Zeroizing<Vec<u8>>, String> {
    let key = match src {
        KeySource::File(p) if p == Path::new("-") => {
            let mut v = Zeroizing::new(Vec::new());
            io::stdin().read_to_end(&mut v).map_err(|e| format!("cannot read the key from standard input: {e}"))?;
            v
        }
        KeySource::File(p) => {
            let mut f = File::open(p).map_err(|e| format!("cannot read the key file {}: {e}", p.display()))?;
            let mut v = Zeroizing::new(Vec::new());
            f.read_to_end(&mut v).map_err(|e| format!("cannot read the key file {}: {e}", p.display()))?;
            v
        }
        KeySource::StdinLine => {
            let mut v = Zeroizing::new(Vec::new());
            read_line(&mut io::stdin().lock(), &mut v)
                .map_err(|e| format!("cannot read the passphrase from standard input: {e}"))?;
            v
        }
        KeySource::Terminal { prompt, confirm } => {
            let a = Zeroizing::new(
                rpassword::prompt_password(prompt)
                    .map_err(|e| format!("cannot read the passphrase from the terminal ({e}); use --key-file"))?,
            );
            if confirm {
                let b = Zeroizing::new(
                    rpassword::prompt_password("Verify the passphrase: ")
                        .map_err(|e| format!("cannot read the passphrase from the terminal ({e}); use --key-file"))?,
                );
                if *a != *b {
                    return Err("the passphrases do not match; nothing was changed".into());
                }
            }
            Zeroizing::new(a.as_bytes().to_vec())
        }
    };
    if key.is_empty() {
        return Err("the passphrase is empty; nothing was changed".into());
    }
    Ok(key)
}

/// One line of `r` into `out`, without its line end ("\n", or "\r\n"); bytes after it stay
/// unread in spirit (a piped passphrase is one line, as cryptsetup reads it).
pub fn read_line(r: &mut impl io::BufRead, out: &mut Zeroizing<Vec<u8>>) -> io::Result<()> {
    r.read_until(b'\n', out)?;
    if out.last() == Some(&b'\n') {
        out.pop();
        if out.last() == Some(&b'\r') {
            out.pop();
        }
    }
    Ok(())
}

/// Whether a passphrase read whole from a key file ends in a line end, which nobody can type
/// at a boot prompt (`echo pw > file` writes "pw\n").
pub fn ends_in_newline(key: &[u8]) -> bool {
    matches!(key.last(), Some(b'\n' | b'\r'))
}

/// The calling thread's keyring (keyctl(2)'s KEY_SPEC_THREAD_KEYRING).
const KEY_SPEC_THREAD_KEYRING: libc::c_long = -1;

/// Add a `logon` key `desc` holding `key` to the calling thread's keyring (where dm-crypt
/// looks up a key named in a table being loaded by this thread); its serial number.
pub fn keyring_add_logon(desc: &str, key: &[u8]) -> io::Result<i32> {
    let ty = c"logon";
    let d = std::ffi::CString::new(desc).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: add_key(2) with NUL-terminated strings and a payload of `key.len()` bytes, all
    // live for the call.
    let r = unsafe {
        libc::syscall(libc::SYS_add_key, ty.as_ptr(), d.as_ptr(), key.as_ptr(), key.len(), KEY_SPEC_THREAD_KEYRING)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// Revoke and unlink a key added by [`keyring_add_logon`] (best effort: the thread keyring
/// goes with the thread anyway).
pub fn keyring_revoke(id: i32) {
    const KEYCTL_REVOKE: libc::c_long = 3;
    const KEYCTL_UNLINK: libc::c_long = 9;
    // SAFETY: keyctl(2) with integer arguments only.
    unsafe {
        libc::syscall(libc::SYS_keyctl, KEYCTL_REVOKE, id as libc::c_long);
        libc::syscall(libc::SYS_keyctl, KEYCTL_UNLINK, id as libc::c_long, KEY_SPEC_THREAD_KEYRING);
    }
}

/// The processes holding the device lock ([`lock_device`]) on `path` now, from
/// `/proc/locks` (nothing is locked to find out, so a luksify starting meanwhile is not
/// refused because of `status`). Empty when nobody holds it or `path` cannot be read.
pub fn device_lock_holders(path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(path) else { return Vec::new() };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else { return Vec::new() };
    let (major, minor) = (libc::major(md.dev()), libc::minor(md.dev()));
    crate::core::running::flock_holders(&locks, major, minor, md.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(input: &[u8]) -> Vec<u8> {
        let mut v = Zeroizing::new(Vec::new());
        read_line(&mut io::Cursor::new(input), &mut v).unwrap();
        v.to_vec()
    }

    #[test]
    fn a_piped_passphrase_is_one_line_without_its_line_end() {
        assert_eq!(line(b"pw\n"), b"pw");
        assert_eq!(line(b"pw\r\n"), b"pw");
        assert_eq!(line(b"pw"), b"pw");
        assert_eq!(line(b"two words\nsecond line\n"), b"two words");
        assert_eq!(line(b"\n"), b"");
    }

    #[test]
    fn a_key_file_ending_in_a_line_end_is_told_apart() {
        assert!(ends_in_newline(b"pw\n"));
        assert!(ends_in_newline(b"pw\r"));
        assert!(!ends_in_newline(b"pw"));
        assert!(!ends_in_newline(b""));
        // a key file is read whole, as cryptsetup reads it: the line end stays in the key
        let p = std::env::temp_dir().join(format!("luksify-keyfile-{}", std::process::id()));
        std::fs::write(&p, b"pw\n").unwrap();
        let k = read_passphrase(KeySource::File(&p)).unwrap();
        assert_eq!(&k[..], b"pw\n");
        let _ = std::fs::remove_file(&p);
    }
}
