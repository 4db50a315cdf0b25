//! LUKS2 encryption in progress, the standard way: the header that `cryptsetup reencrypt
//! --encrypt --reduce-device-size 2S --init-only` writes ([`format_reencrypt_header`]),
//! libcryptsetup's own online reencryption run on the active mapping
//! ([`run`], as `cryptsetup reencrypt --resume-only --active-name NAME` runs it), and the
//! activation that recovers an interrupted step ([`activate`], as `cryptsetup open`).
//!
//! Every call runs on the module's libcryptsetup worker thread ([`super::on_worker`]); the
//! reencryption calls go through libcryptsetup-rs-sys with exactly the parameters the
//! cryptsetup CLI passes (its status first, then a resume with what the status returned).

use super::worker::{format_on, header_of};
use super::*;
use libcryptsetup_rs::consts::flags::{CryptActivate, CryptReencrypt};
use libcryptsetup_rs::consts::vals::{CryptReencryptDirectionInfo, CryptReencryptModeInfo};
use libcryptsetup_rs::{CryptParamsReencrypt, TokenInput};
use libcryptsetup_rs_sys as sys;
use std::ffi::CString;
use std::path::Path;

/// luksify's own LUKS2 token type: what a resume needs beyond cryptsetup's metadata.
/// cryptsetup keeps tokens of unknown types untouched and ignores them.
pub const TOKEN_TYPE: &str = "luksify";

/// What luksify keeps in its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksifyToken {
    /// The mapping name (`sda5_crypt`).
    pub name: String,
    /// `--allow-discards` (the crypttab line's `discard`).
    pub allow_discards: bool,
    /// The LVM PV's UUID (the device's identity).
    pub pv_uuid: String,
}

impl LuksifyToken {
    /// The token's JSON object (LUKS2 wants `type` and `keyslots` in every token).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "type": TOKEN_TYPE,
            "keyslots": [],
            "luksify_version": 1,
            "name": self.name,
            "allow_discards": self.allow_discards,
            "pv_uuid": self.pv_uuid,
        })
    }
}

/// The header of an encryption in progress for a device whose plaintext is `l` sectors
/// (the PV) and whose data offset is S = `params.data_offset_sectors`: the state that
/// `cryptsetup reencrypt --encrypt --reduce-device-size 2S --init-only` writes on a device
/// of L + 2S sectors (LUKS2 only): requirement `online-reencrypt-v2`, segments linear
/// [moved first S sectors at L + S] + linear [S, L) in place, the `reencrypt` keyslot
/// (encrypt, backward, datashift S) and its digest, keyslot 0 for `passphrase`, keyslot 1
/// for the recovery key with its `systemd-recovery` token if `recovery`, and luksify's token. Made in a memfd by libcryptsetup itself. Returns the first H bytes
/// (through the reencrypt keyslot's area); [H, S) must be zeros on the device.
pub fn format_reencrypt_header(
    params: &HeaderParams,
    key: &VolumeKey,
    passphrase: &[u8],
    l: u64,
    token: &LuksifyToken,
    recovery: Option<&RecoverySlot>,
) -> Result<Header> {
    validate(params, key)?;
    if params.luks_type != LuksType::Luks2 {
        return Err(LuksError::InvalidParams("a reencryption in progress is a LUKS2 state".into()));
    }
    let s = params.data_offset_sectors;
    if l < s {
        return Err(LuksError::InvalidParams(format!("L = {l} sectors is smaller than the data offset S = {s}")));
    }
    let (params, key, token) = (params.clone(), key.clone(), token.json());
    let pass = Zeroizing::new(passphrase.to_vec());
    let recovery = recovery.cloned();
    on_worker(move || {
        let dev = MemDev::new((l + 2 * s) * SECTOR)?;
        let mut cd = format_on(&dev, &params, &key, &pass, recovery.as_ref())?;
        cd.token_handle().json_set(TokenInput::AddToken(&token)).map_err(|e| crypt_err("crypt_token_json_set", e))?;
        let luks2 = CryptParamsLuks2 {
            pbkdf: None,
            integrity: None,
            integrity_params: None,
            data_alignment: 0,
            data_device: None,
            sector_size: SECTOR as u32,
            label: None,
            subsystem: None,
        };
        let rp = CryptParamsReencrypt {
            mode: CryptReencryptModeInfo::Encrypt,
            direction: CryptReencryptDirectionInfo::Backward,
            resilience: "datashift".into(),
            hash: "sha256".into(),
            data_shift: s,
            max_hotzone_size: 0,
            device_size: 0,
            luks2: Some(luks2),
            flags: CryptReencrypt::INITIALIZE_ONLY | CryptReencrypt::MOVE_FIRST_SEGMENT,
        };
        let cipher = (params.cipher.as_str(), params.cipher_mode.as_str());
        // The init moves the first segment with the data device opened exclusively, which
        // libcryptsetup asserts is not locked; here data and metadata are the same memfd,
        // write-locked by the init itself (the CLI uses a temporary detached header file).
        // So metadata locking goes off, for the whole process (it cannot be turned back on):
        // from now on luksify holds cryptsetup's reencryption lock itself ([`run`]).
        cd.settings_handle().metadata_locking(false).map_err(|e| crypt_err("crypt_metadata_locking", e))?;
        LOCKING_OFF.store(true, Ordering::SeqCst);
        cd.reencrypt_handle()
            .reencrypt_init_by_passphrase(None, &pass, None, Some(0), Some(cipher), rp)
            .map_err(|e| crypt_err("crypt_reencrypt_init_by_passphrase (encrypt, datashift, move first segment)", e))?;
        header_of(&dev, &mut cd, &params, recovery.as_ref().map(|_| RECOVERY_KEYSLOT))
    })
}

/// Where a device's LUKS2 reencryption stands, as libcryptsetup reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reencryption {
    /// None in progress (or not LUKS2).
    None,
    /// In progress, between steps: `run` continues it.
    Clean,
    /// A step was interrupted: an activation (`cryptsetup open`) recovers it first.
    Crash,
}

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The reencryption finished: the header is the final one, the mapping its final table.
    Finished,
    /// A stop was requested: libcryptsetup stopped after a committed step (state Clean).
    Stopped,
}

/// A libcryptsetup device on `device` with its header loaded (any LUKS version).
struct Loaded {
    cd: CryptDevice,
    ptr: *mut sys::crypt_device,
}

fn load_device(device: &Path) -> Result<Loaded> {
    let _ = take_log();
    let path = CString::new(device.as_os_str().as_encoded_bytes())
        .map_err(|_| LuksError::InvalidParams(format!("{}: a path with a NUL byte", device.display())))?;
    let mut ptr: *mut sys::crypt_device = std::ptr::null_mut();
    // SAFETY: crypt_init fills `ptr` with a new context on success (0).
    let r = unsafe { sys::crypt_init(&mut ptr, path.as_ptr()) };
    if r < 0 || ptr.is_null() {
        return Err(sys_err("crypt_init", r));
    }
    // From here the binding owns the context (crypt_free on drop).
    let cd = CryptDevice::from_ptr(ptr);
    // SAFETY: a valid context; NULL type = any LUKS version, NULL params.
    let r = unsafe { sys::crypt_load(ptr, std::ptr::null(), std::ptr::null_mut()) };
    if r < 0 {
        return Err(LuksError::BadHeader(format!("{}: {}", device.display(), sys_err("crypt_load", r))));
    }
    Ok(Loaded { cd, ptr })
}

fn sys_err(op: &'static str, r: c_int) -> LuksError {
    let log = take_log();
    let e = std::io::Error::from_raw_os_error(-r);
    let detail = if log.is_empty() { e.to_string() } else { format!("{e} ({log})") };
    LuksError::Crypt { op, errno: Some(-r), detail }
}

fn status_of(l: &Loaded) -> (Reencryption, sys::crypt_params_reencrypt) {
    // SAFETY: all-zero is a valid value of this plain C struct (NULL pointers, 0 numbers).
    let mut p: sys::crypt_params_reencrypt = unsafe { std::mem::zeroed() };
    // SAFETY: valid context; `p` is filled with pointers into the context's own metadata.
    let ri = unsafe { sys::crypt_reencrypt_status(l.ptr, &mut p) };
    let st = match ri {
        sys::crypt_reencrypt_info_CRYPT_REENCRYPT_CLEAN => Reencryption::Clean,
        sys::crypt_reencrypt_info_CRYPT_REENCRYPT_CRASH => Reencryption::Crash,
        _ => Reencryption::None,
    };
    (st, p)
}

/// The reencryption state of the LUKS header on `device` (read only).
pub fn status(device: &Path) -> Result<Reencryption> {
    let device = device.to_path_buf();
    on_worker(move || {
        let l = load_device(&device)?;
        Ok(status_of(&l).0)
    })
}

/// The LUKS version of the header on `device` and its keyslots that hold a key (active),
/// read only (e.g. whether a recovery keyslot is there, for the finish's suggestions).
pub fn active_keyslots(device: &Path) -> Result<(LuksType, Vec<u32>)> {
    use libcryptsetup_rs::consts::vals::KeyslotInfo;
    let device = device.to_path_buf();
    on_worker(move || {
        let mut l = load_device(&device)?;
        let t = match l.cd.format_handle().get_type().map_err(|e| crypt_err("crypt_get_type", e))? {
            EncryptionFormat::Luks1 => LuksType::Luks1,
            EncryptionFormat::Luks2 => LuksType::Luks2,
            _ => return Err(LuksError::BadHeader("not a LUKS1 or LUKS2 header".into())),
        };
        let max = match t {
            LuksType::Luks1 => 8,
            LuksType::Luks2 => 32,
        };
        let slots = (0..max)
            .filter(|&k| matches!(l.cd.keyslot_handle().status(k), Ok(KeyslotInfo::Active | KeyslotInfo::ActiveLast)))
            .collect();
        let _ = take_log();
        Ok((t, slots))
    })
}

/// Set once libcryptsetup's metadata locking is off in this process (process-wide, for
/// good: see [`format_reencrypt_header`]). libcryptsetup then takes no reencryption lock,
/// so [`run`] takes it itself.
static LOCKING_OFF: AtomicBool = AtomicBool::new(false);

/// cryptsetup's reencryption lock for `uuid`, taken by luksify itself (exclusive, not
/// waiting), held until dropped. Only while libcryptsetup's own locking is off: with it on,
/// libcryptsetup takes the same lock and would find luksify's own flock in its way.
fn take_lock(uuid: &str) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = lock_path(uuid);
    let io = |source| LuksError::Io { op: "cryptsetup's reencryption lock", source };
    if !Path::new(LOCK_DIR).exists() {
        std::fs::DirBuilder::new().mode(0o700).create(LOCK_DIR).map_err(io)?;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on an fd we own; released when `f` closes
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LuksError::ReencryptionLocked(format!("{} is held", path.display())));
        }
        return Err(io(e));
    }
    Ok(f)
}

/// cryptsetup's reencryption lock for the LUKS2 header `uuid`, held (exclusive, not waiting)
/// while luksify runs steps of its own: `cryptsetup reencrypt` and another luksify stay
/// out, and `luksify status` names the holder. Release it before [`run`], which takes it.
pub fn hold_lock(uuid: &str) -> Result<std::fs::File> {
    take_lock(uuid)
}

/// libcryptsetup's log line when its reencryption digest does not verify.
const DIGEST_INVALID: &str = "Reencryption metadata is invalid";

/// The directory of cryptsetup's lock files (its compiled-in `DEFAULT_LUKS2_LOCK_PATH`,
/// `/run/cryptsetup` on Debian and Fedora).
pub const LOCK_DIR: &str = "/run/cryptsetup";

/// The file whose `flock` is cryptsetup's reencryption lock for the LUKS2 header `uuid`
/// (`reencrypt_lock_internal` in lib/luks2/luks2_reencrypt.c: resource
/// `LUKS2-reencryption-<uuid>` under the lock directory). Every libcryptsetup reencryption
/// (`cryptsetup reencrypt`, its activation of a device in reencryption, luksify's run)
/// holds it exclusively while it works.
pub fn lock_path(uuid: &str) -> std::path::PathBuf {
    Path::new(LOCK_DIR).join(format!("LUKS2-reencryption-{uuid}"))
}

/// Whether a process holds cryptsetup's reencryption lock for `uuid` now: the lock file's
/// path and the holder's pid if so. Read from /proc/locks, without taking the lock (a
/// probing `flock` would make a `cryptsetup reencrypt` starting at that instant fail);
/// a missing lock file is a free lock. libcryptsetup takes the lock itself when it runs:
/// this only lets a refusal come first, with a clear message, and `status` say it.
pub fn lock_held(uuid: &str) -> Option<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    let path = lock_path(uuid);
    let md = std::fs::symlink_metadata(&path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let dev = md.dev();
    let pid = flock_holder(&locks, libc::major(dev), libc::minor(dev), md.ino())?;
    Some((path, pid))
}

/// The pid of a process holding a `flock` (shared or exclusive, not waiting) on the inode
/// `ino` of the filesystem `major:minor`, from the text of /proc/locks (lines such as
/// `3: FLOCK  ADVISORY  WRITE 5341 00:1a:6266944 0 EOF`; waiters are `3: -> FLOCK ...`).
fn flock_holder(proc_locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    proc_locks.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            [_, "FLOCK", _, _, pid, id, ..] if *id == want => pid.parse().ok(),
            _ => None,
        }
    })
}

/// A libcryptsetup failure of a reencryption call, named: its reencryption lock held by
/// another process (-EBUSY), or its digest not verifying.
fn reencrypt_err(op: &'static str, errno: Option<i32>, log: String, detail: String) -> LuksError {
    if errno == Some(libc::EBUSY) && (log.contains("already running") || log.contains("in-progress")) {
        return LuksError::ReencryptionLocked(log);
    }
    if log.contains(DIGEST_INVALID) {
        return LuksError::BadReencryptDigest(format!("libcryptsetup: {log}"));
    }
    LuksError::Crypt { op, errno, detail }
}

/// Check, without touching any device, that `passphrase` opens the LUKS2 header in
/// `header_bytes` (the device's first S bytes) and, while a reencryption is in progress,
/// that its metadata verifies against its digest: what `cryptsetup open --test-passphrase`
/// checks (`crypt_activate_by_passphrase` with no name), on a memfd copy. The reencryption
/// lock is not taken. Errors: [`LuksError::WrongPassphrase`],
/// [`LuksError::BadReencryptDigest`], [`LuksError::BadHeader`].
pub fn verify(header_bytes: &[u8], passphrase: &[u8]) -> Result<()> {
    let bytes = Zeroizing::new(header_bytes.to_vec());
    let pass = Zeroizing::new(passphrase.to_vec());
    on_worker(move || {
        let (_dev, mut cd) = super::worker::load(&bytes)?;
        let r = cd.activate_handle().activate_by_passphrase(None, None, &pass, CryptActivate::empty());
        let Err(e) = r else { return Ok(()) };
        let log = take_log();
        if log.contains(DIGEST_INVALID) {
            return Err(LuksError::BadReencryptDigest(format!("libcryptsetup: {log}")));
        }
        if errno_of(&e) == Some(libc::EPERM) {
            return Err(LuksError::WrongPassphrase);
        }
        let detail = if log.is_empty() { e.to_string() } else { format!("{e} ({log})") };
        Err(LuksError::Crypt { op: "crypt_activate_by_passphrase (no name: check only)", errno: errno_of(&e), detail })
    })
}

/// `cryptsetup open DEVICE NAME`: activate the mapping `name` with `passphrase`. On a
/// header whose step was interrupted, libcryptsetup first recovers that step (it needs the
/// device to itself). Wrong passphrase: [`LuksError::WrongPassphrase`]; another process
/// reencrypting it: [`LuksError::ReencryptionLocked`].
pub fn activate(device: &Path, name: &str, passphrase: &[u8]) -> Result<()> {
    let (device, name) = (device.to_path_buf(), name.to_string());
    let pass = Zeroizing::new(passphrase.to_vec());
    on_worker(move || {
        let mut l = load_device(&device)?;
        let r = l.cd.activate_handle().activate_by_passphrase(Some(&name), None, &pass, CryptActivate::empty());
        let Err(e) = r else { return Ok(()) };
        let log = take_log();
        if errno_of(&e) == Some(libc::EPERM) && !log.contains(DIGEST_INVALID) {
            return Err(LuksError::WrongPassphrase);
        }
        let detail = if log.is_empty() { e.to_string() } else { format!("{e} ({log})") };
        Err(reencrypt_err("crypt_activate_by_passphrase", errno_of(&e), log, detail))
    })
}

enum Msg {
    Progress(u64, u64),
    Done(Result<RunEnd>),
}

struct RunCtx {
    tx: mpsc::Sender<Msg>,
    stop: fn() -> bool,
    stopped: bool,
}

/// libcryptsetup's progress callback: after each committed step. Non-zero stops the run
/// cleanly there.
unsafe extern "C" fn progress_cb(size: u64, offset: u64, usr: *mut c_void) -> c_int {
    // SAFETY: `usr` is the RunCtx that `run_job` passed and keeps alive during the run.
    let ctx = unsafe { &mut *(usr as *mut RunCtx) };
    let _ = ctx.tx.send(Msg::Progress(offset, size));
    if (ctx.stop)() {
        ctx.stopped = true;
        return 1;
    }
    0
}

fn run_job(device: &Path, name: Option<&str>, pass: &[u8], ctx: &mut RunCtx) -> Result<RunEnd> {
    let mut l = load_device(device)?;
    let _lock = match LOCKING_OFF.load(Ordering::SeqCst) {
        true => {
            let uuid = l.cd.status_handle().get_uuid().map_err(|e| crypt_err("crypt_get_uuid", e))?;
            Some(take_lock(&uuid.hyphenated().to_string())?)
        }
        false => None,
    };
    // `crypt_volume_key_keyring` is process-wide in libcryptsetup, and the header work in
    // memfds turns it off. A mapping that names its key in the kernel keyring (made by
    // cryptsetup itself: the initramfs) needs it on, as cryptsetup has it: else the reload
    // of its table fails (ENOKEY), and libcryptsetup later crashed on the missing key
    // description (seen in the QEMU boot test).
    // SAFETY: a valid context; the call only sets a flag.
    unsafe { sys::crypt_volume_key_keyring(l.ptr, 1) };
    let (st, mut params) = status_of(&l);
    match st {
        Reencryption::Clean => {}
        Reencryption::None => {
            return Err(LuksError::BadHeader(format!("{}: no LUKS2 reencryption in progress", device.display())))
        }
        Reencryption::Crash => {
            return Err(LuksError::BadHeader(format!(
                "{}: a reencryption step was interrupted; it is recovered when the device is opened (closed first, then `cryptsetup open`)",
                device.display()
            )))
        }
    }
    // As the CLI resumes (src/utils_reencrypt.c, without --resilience): the status's own
    // parameters but no resilience (NULL: no change requested; passing the status's own
    // "datashift" made libcryptsetup re-validate the reencrypt keyslot's area and refuse
    // with "Invalid reencryption resilience mode change requested." after some recovered
    // crashes: power-cut seed 1796311877), no hotzone limit, the device's size.
    params.resilience = std::ptr::null();
    params.flags = sys::CRYPT_REENCRYPT_RESUME_ONLY;
    params.max_hotzone_size = 0;
    params.device_size = 0;
    params.luks2 = std::ptr::null();
    let cname = match name {
        Some(n) => Some(CString::new(n).map_err(|_| LuksError::InvalidParams("a name with a NUL byte".into()))?),
        None => None,
    };
    // SAFETY: valid context, name and passphrase buffers live across the call.
    let r = unsafe {
        sys::crypt_reencrypt_init_by_passphrase(
            l.ptr,
            cname.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            pass.as_ptr() as *const c_char,
            pass.len(),
            sys::CRYPT_ANY_SLOT,
            sys::CRYPT_ANY_SLOT,
            std::ptr::null(),
            std::ptr::null(),
            &params,
        )
    };
    if r < 0 {
        let log = take_log();
        if r == -libc::EPERM && !log.contains(DIGEST_INVALID) {
            return Err(LuksError::WrongPassphrase);
        }
        let e = std::io::Error::from_raw_os_error(-r);
        let detail = if log.is_empty() { e.to_string() } else { format!("{e} ({log})") };
        return Err(reencrypt_err("crypt_reencrypt_init_by_passphrase (resume)", Some(-r), log, detail));
    }
    // SAFETY: valid context; `ctx` outlives the call; the callback matches the C type.
    let r = unsafe { sys::crypt_reencrypt_run(l.ptr, Some(progress_cb), ctx as *mut RunCtx as *mut c_void) };
    if r < 0 {
        return Err(sys_err("crypt_reencrypt_run", r));
    }
    drop(l);
    Ok(if ctx.stopped { RunEnd::Stopped } else { RunEnd::Finished })
}

/// `cryptsetup reencrypt --resume-only --active-name NAME DEVICE`: continue the encryption
/// in progress on `device`, online, through its active mapping `name` (whose table must be
/// the one the header implies), until it finishes or `stop()` says so after a step.
/// `progress(done_bytes, total_bytes)` is called on this thread after every step.
pub fn run(
    device: &Path,
    name: &str,
    passphrase: &[u8],
    stop: fn() -> bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RunEnd> {
    run_on(device, Some(name.to_string()), passphrase, stop, progress)
}

/// `cryptsetup reencrypt --resume-only DEVICE`: as [`run`], offline (no mapping of `device`
/// may be active): libcryptsetup reads and writes the device itself.
pub fn run_offline(
    device: &Path,
    passphrase: &[u8],
    stop: fn() -> bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RunEnd> {
    run_on(device, None, passphrase, stop, progress)
}

fn run_on(
    device: &Path,
    name: Option<String>,
    passphrase: &[u8],
    stop: fn() -> bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RunEnd> {
    let device = device.to_path_buf();
    let pass = Zeroizing::new(passphrase.to_vec());
    let (tx, rx) = mpsc::channel::<Msg>();
    submit(Box::new(move || {
        let mut ctx = RunCtx { tx: tx.clone(), stop, stopped: false };
        let r = run_job(&device, name.as_deref(), &pass, &mut ctx);
        let _ = tx.send(Msg::Done(r));
    }))?;
    loop {
        match rx.recv() {
            Ok(Msg::Progress(done, total)) => progress(done, total),
            Ok(Msg::Done(r)) => return r,
            Err(_) => return Err(LuksError::Internal("the libcryptsetup reencryption panicked".into())),
        }
    }
}

/// Put the `logon` key `desc` with `key` into the libcryptsetup worker thread's own keyring,
/// for a mapping that another process made with its volume key in the kernel keyring (the
/// initramfs's cryptsetup): [`run`] reloads that table (libcryptsetup's overlay device),
/// and dm-crypt looks the key up in the keyrings of the thread that loads it. Returns the
/// key's serial number for [`release_key`].
pub fn hold_key(desc: &str, key: &[u8]) -> Result<i32> {
    let desc = desc.to_string();
    let key = Zeroizing::new(key.to_vec());
    on_worker(move || {
        crate::adapters::sys::keyring_add_logon(&desc, &key)
            .map_err(|e| LuksError::Internal(format!("add_key logon {desc}: {e}")))
    })
}

/// Revoke a key of [`hold_key`].
pub fn release_key(id: i32) {
    let _ = on_worker(move || {
        crate::adapters::sys::keyring_revoke(id);
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flock_is_found_in_proc_locks_and_a_waiter_or_posix_lock_is_not() {
        let locks = "1: POSIX  ADVISORY  WRITE 8069 fe:00:6299736 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 812 00:1a:4242 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 900 00:1a:4242 0 EOF\n\
                     3: FLOCK  ADVISORY  READ 77 fe:00:10135836 0 EOF\n";
        assert_eq!(flock_holder(locks, 0, 0x1a, 4242), Some(812));
        assert_eq!(flock_holder(locks, 0xfe, 0, 10135836), Some(77));
        assert_eq!(flock_holder(locks, 0xfe, 0, 6299736), None, "a POSIX lock is not cryptsetup's");
        assert_eq!(flock_holder(locks, 0, 0x1a, 424), None);
        assert_eq!(flock_holder("", 0, 0x1a, 4242), None);
    }

    #[test]
    fn libcryptsetups_refusals_are_named() {
        let e =
            reencrypt_err("op", Some(libc::EBUSY), "Reencryption process is already running.".into(), String::new());
        assert!(matches!(e, LuksError::ReencryptionLocked(_)), "{e}");
        let e = reencrypt_err(
            "op",
            Some(libc::EBUSY),
            "Reencryption in-progress. Cannot activate device.".into(),
            "".into(),
        );
        assert!(e.to_string().starts_with("another program is reencrypting this device"), "{e}");
        let e = reencrypt_err("op", Some(libc::EPERM), "Reencryption metadata is invalid.".into(), String::new());
        assert!(matches!(e, LuksError::BadReencryptDigest(_)), "{e}");
        let e = reencrypt_err("op", Some(libc::EBUSY), "Cannot use device, already in use.".into(), "d".into());
        assert!(matches!(e, LuksError::Crypt { errno: Some(libc::EBUSY), .. }), "{e}");
    }

    /// The reencrypt header luksify formats, its backup-final segment's `iv_tweak` moved
    /// (a parameter the reencryption digest covers), both copies' checksums recomputed.
    fn tweaked(bytes: &[u8]) -> Vec<u8> {
        use crate::core::luks2meta::{checksum, BIN_BYTES, MIN_HDR_SIZE as HS};
        let mut b = bytes.to_vec();
        for at in [0, HS] {
            let area = &b[at + BIN_BYTES..at + HS];
            let end = area.iter().position(|&c| c == 0).unwrap();
            let mut j: serde_json::Value = serde_json::from_slice(&area[..end]).unwrap();
            let segs = j["segments"].as_object_mut().unwrap();
            let fin = segs
                .values_mut()
                .find(|s| s["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "backup-final")));
            fin.unwrap()["iv_tweak"] = "8".into();
            let t = serde_json::to_vec(&j).unwrap();
            b[at + BIN_BYTES..at + HS].fill(0);
            b[at + BIN_BYTES..at + BIN_BYTES + t.len()].copy_from_slice(&t);
            b[at + 448..at + 512].fill(0);
            let c = checksum(&b[at..at + HS]);
            b[at + 448..at + 480].copy_from_slice(&c);
        }
        assert!(crate::core::luks2meta::parse(&b).unwrap().unwrap().copies_valid == (true, true));
        b
    }

    #[test]
    fn verify_checks_the_passphrase_then_the_reencryption_digest() {
        let mut p = HeaderParams::defaults(LuksType::Luks2);
        p.pbkdf = Some("pbkdf2".into());
        p.pbkdf_force_iterations = Some(1000);
        let key = VolumeKey::generate(p.key_bytes).unwrap();
        let token = LuksifyToken { name: "t_crypt".into(), allow_discards: false, pv_uuid: "pv".into() };
        let h = format_reencrypt_header(&p, &key, b"pass", 4 * p.data_offset_sectors, &token, None).unwrap();
        verify(&h.bytes, b"pass").unwrap();
        assert!(matches!(verify(&h.bytes, b"wrong"), Err(LuksError::WrongPassphrase)));
        let bad = tweaked(&h.bytes);
        // the passphrase still opens it: only the reencryption's digest fails
        assert_eq!(unlock(&bad, b"pass").unwrap(), key);
        match verify(&bad, b"pass") {
            Err(LuksError::BadReencryptDigest(m)) => assert!(m.contains("Reencryption metadata is invalid"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(verify(&bad, b"wrong"), Err(LuksError::WrongPassphrase)));
    }

    #[test]
    fn the_lock_file_is_cryptsetups() {
        let p = lock_path("0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10");
        assert_eq!(p, Path::new("/run/cryptsetup/LUKS2-reencryption-0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10"));
    }
}
