//! LVM's own VG lock, held by luksify while it converts, so that no LVM command (lvcreate,
//! lvextend, lvchange, vgchange, event-driven autoactivation) can reload an LV table of the
//! VG — back onto the raw partition, or anywhere — behind the bridge's back.
//!
//! LVM (lvm2 2.03 with file locking, `locking_type` 1, no lvmlockd) takes `flock(2)` on
//! `<locking_dir>/V_<vgname>` (lib/locking/file_locking.c: the VG name verbatim, no escaping;
//! orphan and global locks are `P_*`): shared for reporting commands, exclusive for commands
//! that change the VG or activate LVs. luksify takes it exclusive. Two details of LVM's
//! protocol (lib/misc/lvm-flock.c) matter:
//!
//! - a releasing LVM process unlinks the lock file when it can take it exclusive, so a
//!   locker must check after `flock` that the path still names the inode it locked (else it
//!   locked an orphan: open again);
//! - with `prioritise_write_locks` (the default), writers first take `V_<vg>:aux`
//!   exclusively, so readers queue behind a waiting writer; luksify does the same while it
//!   waits.
//!
//! While luksify holds the lock, **no LVM command may run in this process tree**: a child
//! LVM would wait for the lock its parent holds. luksify's only LVM command during a
//! conversion, the final `pvresize`, runs after the lock is released.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// LVM's default `global/locking_dir`.
pub const DEFAULT_LOCKING_DIR: &str = "/run/lock/lvm";

/// How long luksify waits for an LVM command that holds the VG lock.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// The lock file LVM uses for VG `vg` in `locking_dir`: `<locking_dir>/V_<vg>`. LVM puts the
/// name in verbatim (VG names are `[A-Za-z0-9+_.-]`, never '/'); a name that LVM would not
/// accept is refused here (None) rather than turned into some other path.
pub fn vg_lock_path(locking_dir: &Path, vg: &str) -> Option<PathBuf> {
    let ok = !vg.is_empty()
        && vg != "."
        && vg != ".."
        && !vg.starts_with('-')
        && vg.bytes().all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b));
    ok.then(|| locking_dir.join(format!("V_{vg}")))
}

/// `global/locking_dir` from the output of `lvm config --typeconfig full global/locking_dir`
/// (`locking_dir="/run/lock/lvm"`).
pub fn parse_locking_dir(out: &str) -> Option<PathBuf> {
    out.lines().find_map(|l| {
        let v = l.trim().strip_prefix("locking_dir")?.trim_start().strip_prefix('=')?.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        (!v.is_empty() && v.starts_with('/')).then(|| PathBuf::from(v))
    })
}

/// The locking directory LVM uses on this system (asks `lvm config` once per process; the
/// default if that fails). Runs an LVM command the first time: call it **before** taking
/// any lock. (A conversion learns the VG's lock file from its LVM report instead:
/// [`crate::adapters::lvm::vg_lock_file_in_log`].)
pub fn locking_dir() -> PathBuf {
    LOCKING_DIR.get_or_init(ask_locking_dir).clone()
}

static LOCKING_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn ask_locking_dir() -> PathBuf {
    let mut c = std::process::Command::new("lvm");
    super::sys::in_background(&mut c).args(["config", "--typeconfig", "full", "global/locking_dir"]);
    c.stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    c.env("LVM_SUPPRESS_FD_WARNINGS", "1");
    match c.output() {
        Ok(o) if o.status.success() => {
            parse_locking_dir(&String::from_utf8_lossy(&o.stdout)).unwrap_or_else(|| PathBuf::from(DEFAULT_LOCKING_DIR))
        }
        _ => PathBuf::from(DEFAULT_LOCKING_DIR),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{0:?} is not a VG name LVM would lock")]
    BadName(String),
    #[error("another LVM command has held LVM's lock on VG {vg} ({path}) for {secs} s; let it finish (or stop it), then run luksify again")]
    Timeout { vg: String, path: String, secs: u64 },
    #[error("taking LVM's lock on VG {vg} ({path}): {err}")]
    Io { vg: String, path: String, err: io::Error },
}

/// LVM's VG lock, held exclusively until dropped (then released the way LVM releases it).
#[derive(Debug)]
pub struct VgLock {
    file: Option<File>,
    path: PathBuf,
}

fn open_lock_file(p: &Path) -> io::Result<File> {
    // As LVM: O_CREAT | O_APPEND | O_RDWR, mode 0777 (less the umask).
    OpenOptions::new().read(true).append(true).create(true).mode(0o777).open(p)
}

fn flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) || e.raw_os_error() == Some(libc::EINTR) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether `path` still names the file `f` has open (a releasing LVM may have unlinked it).
fn same_inode(path: &Path, f: &File) -> bool {
    match (std::fs::metadata(path), f.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Take `path` exclusively without blocking: Some(file) when it is ours.
fn try_lock(path: &Path) -> io::Result<Option<File>> {
    // Bounded: each round either fails to lock (None) or loses a race with an unlink.
    for _ in 0..100 {
        let f = open_lock_file(path)?;
        if !flock(&f, libc::LOCK_EX | libc::LOCK_NB)? {
            return Ok(None);
        }
        if same_inode(path, &f) {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// Release as LVM does: unlock; unlink the file if nobody else holds it; close.
fn release(path: &Path, f: File) {
    if flock(&f, libc::LOCK_EX | libc::LOCK_NB).unwrap_or(false) && same_inode(path, &f) {
        let _ = std::fs::remove_file(path);
    }
    let _ = flock(&f, libc::LOCK_UN);
    drop(f);
}

impl VgLock {
    /// Take LVM's lock on `vg` exclusively, waiting up to `wait` for LVM commands that hold
    /// it (`on_wait` is called once, when the first attempt finds it taken). While waiting,
    /// luksify holds `V_<vg>:aux` as an LVM writer would, so new readers queue behind it.
    pub fn acquire(
        locking_dir: &Path,
        vg: &str,
        wait: Duration,
        on_wait: &mut dyn FnMut(&Path),
    ) -> Result<VgLock, LockError> {
        let path = vg_lock_path(locking_dir, vg).ok_or_else(|| LockError::BadName(vg.to_string()))?;
        let ioe = |err: io::Error| LockError::Io { vg: vg.to_string(), path: path.display().to_string(), err };
        if !locking_dir.exists() {
            // LVM creates it on first use (0700); so do we.
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(locking_dir).map_err(ioe)?;
        }
        if let Some(f) = try_lock(&path).map_err(ioe)? {
            return Ok(VgLock { file: Some(f), path });
        }
        on_wait(&path);
        let aux_path = PathBuf::from(format!("{}:aux", path.display()));
        let start = Instant::now();
        let mut aux: Option<File> = None;
        loop {
            if aux.is_none() {
                aux = try_lock(&aux_path).map_err(ioe)?;
            }
            if let Some(f) = try_lock(&path).map_err(ioe)? {
                if let Some(a) = aux.take() {
                    release(&aux_path, a);
                }
                return Ok(VgLock { file: Some(f), path });
            }
            if start.elapsed() >= wait {
                if let Some(a) = aux.take() {
                    release(&aux_path, a);
                }
                return Err(LockError::Timeout {
                    vg: vg.to_string(),
                    path: path.display().to_string(),
                    secs: wait.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Release now (also what dropping does).
    pub fn release(mut self) {
        self.unlock();
    }

    fn unlock(&mut self) {
        if let Some(f) = self.file.take() {
            release(&self.path, f);
        }
    }
}

impl Drop for VgLock {
    fn drop(&mut self) {
        self.unlock();
    }
}

/// How long to wait for an LVM command holding the VG lock (`LUKSIFY_LVM_LOCK_WAIT_SECS`
/// overrides it, for tests).
pub fn wait_from_env() -> Duration {
    std::env::var("LUKSIFY_LVM_LOCK_WAIT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        crate::adapters::scratch_dir("lvmlock", name)
    }

    #[test]
    fn lock_path_is_lvms() {
        let d = Path::new("/run/lock/lvm");
        assert_eq!(vg_lock_path(d, "vg0").unwrap(), Path::new("/run/lock/lvm/V_vg0"));
        // Dashes are not doubled (that is dm names, not LVM's lock files).
        assert_eq!(vg_lock_path(d, "my-vg").unwrap(), Path::new("/run/lock/lvm/V_my-vg"));
        assert_eq!(vg_lock_path(d, "a+b_c.d").unwrap(), Path::new("/run/lock/lvm/V_a+b_c.d"));
        for bad in ["", ".", "..", "a/b", "-x", "sp ace", "x\0"] {
            assert!(vg_lock_path(d, bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn locking_dir_from_lvm_config() {
        assert_eq!(parse_locking_dir("locking_dir=\"/run/lock/lvm\"\n").unwrap(), Path::new("/run/lock/lvm"));
        assert_eq!(parse_locking_dir("  locking_dir = \"/var/lock/lvm\"").unwrap(), Path::new("/var/lock/lvm"));
        assert!(parse_locking_dir("").is_none());
        assert!(parse_locking_dir("locking_dir=\"\"").is_none());
        assert!(parse_locking_dir("locking_type=1").is_none());
    }

    #[test]
    fn second_locker_times_out_and_gets_it_after_release() {
        let d = tmpdir("second");
        let first = VgLock::acquire(&d, "vg0", Duration::from_secs(1), &mut |_| panic!("free lock")).unwrap();
        assert!(d.join("V_vg0").exists());
        let mut waited = 0;
        let t = Instant::now();
        let e = VgLock::acquire(&d, "vg0", Duration::from_millis(500), &mut |p| {
            assert_eq!(p, d.join("V_vg0"));
            waited += 1;
        })
        .unwrap_err();
        assert_eq!(waited, 1);
        assert!(t.elapsed() >= Duration::from_millis(500) && t.elapsed() < Duration::from_secs(5));
        assert!(matches!(e, LockError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("VG vg0"), "{e}");
        // The aux lock a waiting writer takes is given back.
        assert!(!d.join("V_vg0:aux").exists());
        drop(first);
        // Released as LVM releases: the file is gone, and the next locker gets it.
        assert!(!d.join("V_vg0").exists());
        let again = VgLock::acquire(&d, "vg0", Duration::from_millis(200), &mut |_| panic!("released")).unwrap();
        again.release();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_shared_holder_blocks_it_too_and_a_waiter_gets_it_when_released() {
        // What an LVM reporting command holds: LOCK_SH on the same file.
        let d = tmpdir("shared");
        let p = d.join("V_vg-x");
        let f = open_lock_file(&p).unwrap();
        assert!(flock(&f, libc::LOCK_SH | libc::LOCK_NB).unwrap());
        let t = std::thread::spawn({
            let d = d.clone();
            move || VgLock::acquire(&d, "vg-x", Duration::from_secs(10), &mut |_| {}).map(|l| l.path().to_path_buf())
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!t.is_finished());
        // LVM releasing: unlink (it can take it exclusively only if nobody waits... it
        // cannot here, but unlink anyway to exercise the inode check), unlock.
        let _ = std::fs::remove_file(&p);
        let _ = flock(&f, libc::LOCK_UN);
        drop(f);
        let got = t.join().unwrap().unwrap();
        assert_eq!(got, p);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn another_process_holding_it_blocks_us() {
        // Another process (as an LVM command would), via util-linux flock(1) if present.
        let d = tmpdir("process");
        let p = d.join("V_vg0");
        let Ok(mut child) =
            std::process::Command::new("flock").arg("-o").arg("-x").arg(&p).arg("sleep").arg("20").spawn()
        else {
            return;
        };
        let t = Instant::now();
        while !p.exists() || try_lock(&p).unwrap().is_some() {
            assert!(t.elapsed() < Duration::from_secs(10), "flock(1) never took the lock");
            std::thread::sleep(Duration::from_millis(50));
        }
        let e = VgLock::acquire(&d, "vg0", Duration::from_millis(300), &mut |_| {}).unwrap_err();
        assert!(matches!(e, LockError::Timeout { .. }), "{e}");
        let _ = child.kill();
        let _ = child.wait();
        let l = VgLock::acquire(&d, "vg0", Duration::from_secs(5), &mut |_| {}).unwrap();
        drop(l);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn missing_locking_dir_is_created() {
        let d = tmpdir("mkdir").join("lock").join("lvm");
        let l = VgLock::acquire(&d, "vg0", Duration::from_millis(100), &mut |_| {}).unwrap();
        assert!(l.path().exists());
        drop(l);
        let _ = std::fs::remove_dir_all(d.parent().unwrap().parent().unwrap());
    }
}
