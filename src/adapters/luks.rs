//! LUKS headers through libcryptsetup (libcryptsetup-rs), without touching a disk.
//!
//! * [`format_header`] formats a LUKS1/LUKS2 header with *our* volume key and one keyslot
//!   (slot 0) for the passphrase, in a memfd (never a file on disk), and returns its first
//!   H bytes: the binary header(s), the JSON area and the used keyslot area, H rounded up
//!   to 4096. Written at sector 0 of the device and followed by zeros up to the data offset
//!   S, those bytes are a valid LUKS device, as `cryptsetup luksFormat` would make it.
//!   With a [`RecoverySlot`] (`--recovery-key`) it adds keyslot 1 for a [`RecoveryKey`] as
//!   `systemd-cryptenroll --recovery-key` would: PBKDF2 with 1000 iterations (the key has
//!   256 bits of entropy) and, in LUKS2, the `systemd-recovery` token naming the keyslot.
//! * [`unlock`] recovers the volume key from such header bytes (e.g. luksify's journal copy)
//!   with a passphrase (`crypt_volume_key_get`: no activation, no kernel keyring).
//! * [`inspect`] reads data offset, UUID, cipher and key size without a passphrase.
//!
//! Threading: libcryptsetup-rs is built without its `mutex` feature, so it panics when
//! called from a thread other than the first one that used it. Every libcryptsetup call of
//! this module therefore runs on one private worker thread (started on first use); the
//! public functions may be called from any thread and block until the job is done.
//! Nothing else in luksify may call libcryptsetup-rs directly.
//!
//! Secrets: the volume key and passphrase live in `Zeroizing` buffers (the copies handed to
//! the worker too), are never logged and never appear in `Debug` output. libcryptsetup's
//! log callback is replaced: its messages are never printed; error-level messages are kept
//! (they never contain key material) and attached to the [`LuksError`] of the failed call.
//! `LUKSIFY_CRYPTSETUP_DEBUG=1` prints libcryptsetup's debug log (as `cryptsetup --debug`).
//!
//! Traps met (kept here so nobody re-learns them):
//! * libcryptsetup fills the unused LUKS2 keyslots area (LUKS1: all 8 keyslot areas) with
//!   random data when formatting; luksify writes zeros there instead ([H, S) zero). Both
//!   load, open and dump identically: only the used area matters.
//! * Loading refuses a "device" smaller than the data offset (LUKS2: "Need at least S
//!   bytes"; LUKS1: smaller than the keyslot areas). [`unlock`]/[`inspect`] get only H bytes,
//!   so the memfd is sized (sparse) from the offset read directly out of the header.
//! * Metadata locking stays ON (libcryptsetup's default). `crypt_metadata_locking(cd, 0)`
//!   is process-wide and cannot be turned back on: luksify once turned it off for its
//!   memfds, which silently disabled cryptsetup's reencryption lock (and header
//!   auto-repair) for every later call on the real device, so `luksify resume` ran
//!   alongside a `cryptsetup reencrypt` of the same device. On a memfd (a regular file) the
//!   locks are `flock`s on the memfd itself, and a repair on load writes only the memfd.
//!   One exception: [`reencrypt::format_reencrypt_header`] must turn it off (its init opens
//!   the memfd exclusively, which libcryptsetup asserts is unlocked); from then on
//!   [`reencrypt::run`] takes cryptsetup's reencryption lock itself.
//! * The argon2 benchmark overshoots short targets (its minimum is 64 MiB × 4 passes);
//!   tests wanting speed should use `pbkdf2` with `pbkdf_force_iterations`.
//! * Format runs the PBKDF twice (LUKS2 digest pbkdf2 benchmark + keyslot benchmark and
//!   derivation): with defaults expect 4-15 s on a slow or busy machine, and up to 1 GiB
//!   of memory for argon2id; call it before `mlockall(MCL_FUTURE)`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use libcryptsetup_rs::consts::flags::{CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, EncryptionFormat};
use libcryptsetup_rs::consts::vals::{KeyslotsSize, MetadataSize};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks1, CryptParamsLuks1Ref, CryptParamsLuks2, CryptParamsLuks2Ref,
    CryptPbkdfType, CryptSettingsHandle, Either, LibcryptErr,
};
use zeroize::Zeroizing;

/// Bytes per sector in every offset of this module.
pub const SECTOR: u64 = 512;
/// H is rounded up to this.
pub const HEADER_ALIGN: u64 = 4096;
/// Anti-forensic stripes per keyslot (LUKS1 and LUKS2).
const AF_STRIPES: u64 = 4000;
/// Default LUKS2 metadata size (binary header + JSON area), one copy; there are two.
const LUKS2_DEFAULT_METADATA: u64 = 16 * 1024;
/// The keyslots area cryptsetup gives a LUKS2 header at its default 16 MiB data offset.
pub const LUKS2_DEFAULT_KEYSLOTS_BYTES: u64 = 16 * 1024 * 1024 - 2 * LUKS2_DEFAULT_METADATA;
/// Sparse room after the data offset in the memfd "device".
const DEVICE_MARGIN: u64 = 1024 * 1024;

/// Errors of the LUKS adapter. Messages never contain key material or passphrases.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// No keyslot of the header opens with the passphrase given.
    #[error("wrong passphrase: no keyslot of the LUKS header opens with it")]
    WrongPassphrase,
    /// The header has no usable keyslot at all.
    #[error("the LUKS header has no usable keyslot")]
    NoKeyslot,
    /// Parameters that cannot make a header.
    #[error("invalid LUKS parameters: {0}")]
    InvalidParams(String),
    /// The bytes are not a LUKS header libcryptsetup accepts.
    #[error("not a valid LUKS header: {0}")]
    BadHeader(String),
    /// A LUKS2 reencryption's metadata (its `reencrypt` keyslot and backup segments) does
    /// not verify against the digest cryptsetup keeps of it with the volume key: altered or
    /// corrupt. libcryptsetup will not continue it.
    #[error("the LUKS2 reencryption metadata does not verify against its digest ({0})")]
    BadReencryptDigest(String),
    /// Another process holds cryptsetup's reencryption lock for this device (a running
    /// `cryptsetup reencrypt`, or another libcryptsetup user reencrypting it).
    #[error("another program is reencrypting this device: cryptsetup's reencryption lock is held ({0})")]
    ReencryptionLocked(String),
    /// A libcryptsetup call failed.
    #[error("libcryptsetup: {op} failed: {detail}")]
    Crypt {
        /// What we asked libcryptsetup to do.
        op: &'static str,
        /// The errno it returned, if any.
        errno: Option<i32>,
        /// Its error text and log messages.
        detail: String,
    },
    /// memfd or I/O on it.
    #[error("{op}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The random number generator failed.
    #[error("random number generator: {0}")]
    Random(String),
    /// The libcryptsetup worker thread is gone (a job panicked) or could not start.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, LuksError>;

/// LUKS version: the core's type (one definition for the plan, the journal and here).
pub use crate::core::plan::LuksVersion as LuksType;

/// What to format. Option names follow cryptsetup's CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderParams {
    /// `--type`.
    pub luks_type: LuksType,
    /// Cipher, e.g. "aes".
    pub cipher: String,
    /// Cipher mode, e.g. "xts-plain64".
    pub cipher_mode: String,
    /// Volume key size in bytes (`--key-size` / 8), e.g. 64. Must equal the key's length.
    pub key_bytes: usize,
    /// `--hash`: the PBKDF2 hash, the LUKS2 digest's hash, LUKS1's header hash. "sha256".
    pub hash: String,
    /// `--pbkdf`: "argon2id", "argon2i" or "pbkdf2"; `None` = argon2id (LUKS2), pbkdf2 (LUKS1).
    pub pbkdf: Option<String>,
    /// `--pbkdf-force-iterations`: no benchmark, this many iterations (argon2: time cost,
    /// at least 4, with the default memory cost).
    pub pbkdf_force_iterations: Option<u32>,
    /// `--iter-time` in ms (default 2000); ignored with forced iterations.
    pub iter_time_ms: Option<u32>,
    /// Data offset S in 512-byte sectors; a multiple of 8, room for the header and keyslots.
    pub data_offset_sectors: u64,
    /// `--uuid`; `None` = a fresh random one.
    pub uuid: Option<String>,
    /// `--label` (LUKS2 only).
    pub label: Option<String>,
}

impl HeaderParams {
    /// cryptsetup's defaults for `luks_type`: aes-xts-plain64, 512-bit key, sha256, default
    /// pbkdf and cost, default data offset, random UUID, no label.
    pub fn defaults(luks_type: LuksType) -> HeaderParams {
        HeaderParams {
            luks_type,
            cipher: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            key_bytes: 64,
            hash: "sha256".into(),
            pbkdf: None,
            pbkdf_force_iterations: None,
            iter_time_ms: None,
            data_offset_sectors: luks_type.default_shift(),
            uuid: None,
            label: None,
        }
    }

    /// "aes-xts-plain64".
    pub fn cipher_spec(&self) -> String {
        format!("{}-{}", self.cipher, self.cipher_mode)
    }
}

/// A volume (master) key. Zeroized on drop; `Debug` shows only its length.
#[derive(Clone)]
pub struct VolumeKey(Zeroizing<Vec<u8>>);

impl VolumeKey {
    /// `bytes` random bytes from the OS (getrandom).
    pub fn generate(bytes: usize) -> Result<VolumeKey> {
        if bytes == 0 {
            return Err(LuksError::InvalidParams("a volume key of 0 bytes".into()));
        }
        let mut k = Zeroizing::new(vec![0u8; bytes]);
        getrandom::fill(&mut k[..]).map_err(|e| LuksError::Random(e.to_string()))?;
        Ok(VolumeKey(k))
    }

    /// Takes ownership of key bytes (already in a zeroizing buffer).
    pub fn from_bytes(bytes: Zeroizing<Vec<u8>>) -> VolumeKey {
        VolumeKey(bytes)
    }

    /// Copies key bytes (the caller wipes its own copy).
    pub fn from_slice(bytes: &[u8]) -> VolumeKey {
        VolumeKey(Zeroizing::new(bytes.to_vec()))
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the key is empty (never, for a usable key).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Lowercase hex, as a dm-crypt table wants it; wiped on drop.
    pub fn hex(&self) -> Zeroizing<String> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        // Capacity fixed up front: no reallocation leaves a copy behind.
        let mut s = Zeroizing::new(String::with_capacity(self.0.len() * 2));
        for b in self.0.iter() {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeKey(<{} bytes, redacted>)", self.0.len())
    }
}

impl PartialEq for VolumeKey {
    /// Constant-time comparison.
    fn eq(&self, other: &VolumeKey) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(other.0.iter()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    }
}
impl Eq for VolumeKey {}

/// A recovery key (`--recovery-key`): 32 random bytes in systemd-cryptenroll's modhex
/// format (`core::recovery`), the passphrase of its keyslot as printed. Wiped on drop;
/// `Debug` never shows it. It is shown once, on standard output (`app::convert`), and
/// nowhere else.
pub struct RecoveryKey(Zeroizing<String>);

impl RecoveryKey {
    /// A new key from the OS's random number generator (getrandom, as systemd's
    /// `crypto_random_bytes`).
    pub fn generate() -> Result<RecoveryKey> {
        RecoveryKey::generate_with(|b| getrandom::fill(b).map_err(|e| LuksError::Random(e.to_string())))
    }

    /// A new key from the bytes `fill` writes (all of [`crate::core::recovery::RAW_BYTES`]:
    /// nothing else goes into the key); tests pass their own source.
    pub fn generate_with(fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<RecoveryKey> {
        let mut raw = Zeroizing::new([0u8; crate::core::recovery::RAW_BYTES]);
        fill(&mut raw[..])?;
        Ok(RecoveryKey(crate::core::recovery::format(&raw)))
    }

    /// The formatted key (`cbdefghi-…`, 71 characters).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The keyslot that holds it, with the PBKDF2 hash `hash` (see
    /// `core::recovery::keyslot_hash`).
    pub fn slot(&self, hash: &str) -> RecoverySlot {
        RecoverySlot { passphrase: Zeroizing::new(self.0.as_bytes().to_vec()), hash: hash.to_string() }
    }
}

impl fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryKey(<redacted>)")
    }
}

/// What [`format_header`] needs to add the recovery keyslot (keyslot 1): the key as its
/// passphrase (a wiped copy) and the PBKDF2 hash. `Debug` shows the hash only.
#[derive(Clone)]
pub struct RecoverySlot {
    passphrase: Zeroizing<Vec<u8>>,
    hash: String,
}

impl fmt::Debug for RecoverySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecoverySlot(<redacted>, pbkdf2 {} x{})", self.hash, crate::core::recovery::PBKDF2_ITERATIONS)
    }
}

/// The keyslot luksify gives the recovery key.
pub const RECOVERY_KEYSLOT: u32 = 1;

/// A formatted header: what goes to [0, H) of the device; [H, S) must be zeros.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// The first H bytes (binary header(s), JSON, used keyslot area); H is a multiple of 4096.
    pub bytes: Vec<u8>,
    /// S, in 512-byte sectors.
    pub data_offset_sectors: u64,
    /// The header's UUID, e.g. "0b2c…-…".
    pub uuid: String,
    /// LUKS1 or LUKS2.
    pub luks_type: LuksType,
    /// "aes-xts-plain64".
    pub cipher_spec: String,
    /// Volume key size in bytes.
    pub key_bytes: usize,
    /// The recovery key's keyslot, when there is one.
    pub recovery_keyslot: Option<u32>,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .field("data_offset_sectors", &self.data_offset_sectors)
            .field("uuid", &self.uuid)
            .field("luks_type", &self.luks_type)
            .field("cipher_spec", &self.cipher_spec)
            .field("key_bytes", &self.key_bytes)
            .field("recovery_keyslot", &self.recovery_keyslot)
            .finish()
    }
}

/// What a header says, read without a passphrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    /// LUKS1 or LUKS2.
    pub luks_type: LuksType,
    /// S, in 512-byte sectors.
    pub data_offset_sectors: u64,
    /// UUID.
    pub uuid: String,
    /// "aes-xts-plain64".
    pub cipher_spec: String,
    /// Volume key size in bytes.
    pub key_bytes: usize,
    /// Encryption sector size in bytes (512 for LUKS1).
    pub sector_size: u32,
}

/// H for the given type and key size with cryptsetup's default metadata size, computed
/// without formatting: LUKS2 = 2 × 16 KiB metadata + keyslot 0 area; LUKS1 = 4 KiB +
/// keyslot 0 material; rounded up to 4096. [`format_header`] checks its result against it.
/// LUKS2, 64-byte key: 290816 bytes (568 sectors); LUKS1, 64-byte key: 262144 (512 sectors).
pub fn header_size_estimate(luks_type: LuksType, key_bytes: usize) -> u64 {
    let af = (key_bytes as u64 * AF_STRIPES).div_ceil(SECTOR) * SECTOR;
    let end = match luks_type {
        LuksType::Luks1 => HEADER_ALIGN + af,
        LuksType::Luks2 => 2 * LUKS2_DEFAULT_METADATA + af.div_ceil(HEADER_ALIGN) * HEADER_ALIGN,
    };
    end.div_ceil(HEADER_ALIGN) * HEADER_ALIGN
}

/// Formats a header in memory (a memfd) with `key` as volume key and one keyslot (0) for
/// `passphrase`, data offset exactly `params.data_offset_sectors`, encryption sector size
/// 512; with `recovery`, keyslot 1 for the recovery key. Runs the PBKDF once (≈ the
/// iteration time, 2 s by default). Checks that the first H bytes followed by zeros load
/// back with the same offset, UUID and cipher.
pub fn format_header(
    params: &HeaderParams,
    key: &VolumeKey,
    passphrase: &[u8],
    recovery: Option<&RecoverySlot>,
) -> Result<Header> {
    validate(params, key)?;
    let params = params.clone();
    let key = key.clone();
    let pass = Zeroizing::new(passphrase.to_vec());
    let recovery = recovery.cloned();
    let header = on_worker(move || worker::format(&params, &key, &pass, recovery.as_ref()))?;
    // Self-check: the truncated image is what goes on disk.
    let info = inspect(&header.bytes)?;
    if info.data_offset_sectors != header.data_offset_sectors
        || info.uuid != header.uuid
        || info.cipher_spec != header.cipher_spec
        || info.key_bytes != header.key_bytes
        || info.luks_type != header.luks_type
        || info.sector_size != SECTOR as u32
    {
        return Err(LuksError::Internal(format!(
            "the formatted header does not read back as formatted ({info:?} vs {header:?})"
        )));
    }
    Ok(header)
}

/// Unlocks the volume key from header bytes (at least the first H bytes of a LUKS device;
/// what follows them up to the data offset is taken as zeros) with `passphrase`.
/// Wrong passphrase: [`LuksError::WrongPassphrase`].
pub fn unlock(header_bytes: &[u8], passphrase: &[u8]) -> Result<VolumeKey> {
    let bytes = header_bytes.to_vec();
    let pass = Zeroizing::new(passphrase.to_vec());
    on_worker(move || worker::unlock(&bytes, &pass))
}

/// Reads type, data offset, UUID, cipher, key size and sector size from header bytes.
pub fn inspect(header_bytes: &[u8]) -> Result<HeaderInfo> {
    let bytes = header_bytes.to_vec();
    on_worker(move || worker::inspect(&bytes))
}

fn validate(p: &HeaderParams, key: &VolumeKey) -> Result<()> {
    let bad = |m: String| Err(LuksError::InvalidParams(m));
    if p.key_bytes == 0 || key.len() != p.key_bytes {
        return bad(format!("the volume key has {} bytes, the parameters ask for {}", key.len(), p.key_bytes));
    }
    if p.cipher.is_empty() || p.cipher_mode.is_empty() || p.cipher.contains('-') {
        return bad(format!("cipher {:?} mode {:?}", p.cipher, p.cipher_mode));
    }
    if p.hash.is_empty() {
        return bad("empty hash".into());
    }
    if p.data_offset_sectors == 0 || !p.data_offset_sectors.is_multiple_of(8) {
        return bad(format!("data offset {} sectors is not a positive multiple of 8", p.data_offset_sectors));
    }
    let need = header_size_estimate(p.luks_type, p.key_bytes) / SECTOR;
    if p.data_offset_sectors < need {
        return bad(format!(
            "data offset {} sectors cannot hold the {} header ({} sectors at least)",
            p.data_offset_sectors, p.luks_type, need
        ));
    }
    kdf_of(p)?;
    if p.luks_type == LuksType::Luks1 && p.label.is_some() {
        return bad("LUKS1 has no label".into());
    }
    if let Some(u) = &p.uuid {
        uuid::Uuid::parse_str(u).map_err(|e| LuksError::InvalidParams(format!("UUID {u:?}: {e}")))?;
    }
    if let Some(n) = p.pbkdf_force_iterations {
        let min = if kdf_of(p)? == Kdf::Pbkdf2 { 1000 } else { 4 };
        if n < min {
            return bad(format!("--pbkdf-force-iterations {n} is below the minimum {min}"));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kdf {
    Pbkdf2,
    Argon2i,
    Argon2id,
}

fn kdf_of(p: &HeaderParams) -> Result<Kdf> {
    let k = match p.pbkdf.as_deref() {
        None => match p.luks_type {
            LuksType::Luks1 => Kdf::Pbkdf2,
            LuksType::Luks2 => Kdf::Argon2id,
        },
        Some("pbkdf2") => Kdf::Pbkdf2,
        Some("argon2i") => Kdf::Argon2i,
        Some("argon2id") => Kdf::Argon2id,
        Some(o) => return Err(LuksError::InvalidParams(format!("unknown --pbkdf {o:?} (argon2id, argon2i, pbkdf2)"))),
    };
    if p.luks_type == LuksType::Luks1 && k != Kdf::Pbkdf2 {
        return Err(LuksError::InvalidParams("LUKS1 supports only --pbkdf pbkdf2".into()));
    }
    Ok(k)
}

// ---------------------------------------------------------------------------------------
// The worker thread: the only thread that calls libcryptsetup.

type Job = Box<dyn FnOnce() + Send + 'static>;

static WORKER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

fn on_worker<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let (tx, rx) = mpsc::sync_channel::<Result<T>>(1);
    submit(Box::new(move || {
        let _ = tx.send(f());
    }))?;
    rx.recv().map_err(|_| LuksError::Internal("a libcryptsetup call panicked (see the message above)".into()))?
}

/// Hand `job` to the worker thread (started if needed).
fn submit(job: Job) -> Result<()> {
    {
        let mut w = WORKER.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            *w = Some(spawn_worker()?);
        }
        if let Err(mpsc::SendError(job)) = w.as_ref().expect("just set").send(job) {
            // The thread died (cannot happen: jobs are caught); start a new one once.
            let s = spawn_worker()?;
            s.send(job).map_err(|_| LuksError::Internal("the libcryptsetup worker does not run".into()))?;
            *w = Some(s);
        }
    }
    Ok(())
}

fn spawn_worker() -> Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("luksify-cryptsetup".into())
        .spawn(move || {
            libcryptsetup_rs::set_log_callback::<()>(Some(log_callback), None);
            if std::env::var_os(DEBUG_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
                DEBUG.store(true, Ordering::Relaxed);
                libcryptsetup_rs::set_debug_level(libcryptsetup_rs::consts::vals::CryptDebugLevel::All);
            }
            for job in rx {
                // A panic drops the job's reply sender: the caller gets Internal.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        })
        .map_err(|e| LuksError::Internal(format!("cannot start the libcryptsetup thread: {e}")))?;
    Ok(tx)
}

/// Set (non-empty, not "0") to print libcryptsetup's debug log on stderr, as
/// `cryptsetup --debug` would (it never contains keys or passphrases). Off by default:
/// then libcryptsetup prints nothing at all.
pub const DEBUG_ENV: &str = "LUKSIFY_CRYPTSETUP_DEBUG";
static DEBUG: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Error-level libcryptsetup messages since the last `take_log()` (worker thread only).
    static LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// libcryptsetup's log sink: prints nothing; keeps error messages for our error values.
unsafe extern "C" fn log_callback(level: c_int, msg: *const c_char, _usr: *mut c_void) {
    if DEBUG.load(Ordering::Relaxed) && !msg.is_null() {
        // SAFETY: as below. libcryptsetup's debug output (what `cryptsetup --debug` prints)
        // carries no key material or passphrases.
        eprintln!("libcryptsetup: {}", unsafe { CStr::from_ptr(msg) }.to_string_lossy().trim_end());
    }
    if level != libcryptsetup_rs_sys_log_error() || msg.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string valid during the call.
    let m = unsafe { CStr::from_ptr(msg) }.to_string_lossy().trim().to_string();
    if m.is_empty() {
        return;
    }
    let _ = LOG.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            if l.len() < 16 {
                l.push(m);
            }
        }
    });
}

fn libcryptsetup_rs_sys_log_error() -> c_int {
    libcryptsetup_rs::consts::vals::CryptLogLevel::Error as c_int
}

fn take_log() -> String {
    LOG.with(|l| std::mem::take(&mut *l.borrow_mut())).join("; ")
}

fn errno_of(e: &LibcryptErr) -> Option<i32> {
    match e {
        LibcryptErr::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

fn crypt_err(op: &'static str, e: LibcryptErr) -> LuksError {
    let log = take_log();
    let errno = errno_of(&e);
    let detail = if log.is_empty() { e.to_string() } else { format!("{e} ({log})") };
    LuksError::Crypt { op, errno, detail }
}

/// A sparse in-memory "device" that libcryptsetup opens as /proc/self/fd/N.
struct MemDev {
    file: File,
    path: PathBuf,
}

impl MemDev {
    fn new(size: u64) -> Result<MemDev> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(c"luksify-header", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| LuksError::Io { op: "memfd_create", source: e.into() })?;
        let file = File::from(fd);
        file.set_len(size).map_err(|source| LuksError::Io { op: "sizing the memfd", source })?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Ok(MemDev { file, path })
    }

    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.file.write_all_at(buf, off).map_err(|source| LuksError::Io { op: "writing the memfd", source })
    }

    fn read_at(&self, len: u64, off: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.file.read_exact_at(&mut v, off).map_err(|source| LuksError::Io { op: "reading the memfd", source })?;
        Ok(v)
    }

    fn open(&self) -> Result<CryptDevice> {
        let _ = take_log();
        let mut cd = CryptInit::init(&self.path).map_err(|e| crypt_err("crypt_init", e))?;
        // No volume key in the kernel keyring. Metadata locking stays on: it is process-wide
        // (see the module's doc); on a memfd it only flocks the memfd.
        cd.context_handle().volume_key_keyring(false).map_err(|e| crypt_err("crypt_volume_key_keyring", e))?;
        Ok(cd)
    }
}

/// Size of the memfd for header bytes: room up to the data offset the bytes announce (some
/// checks want the device to reach past the keyslot area), plus margin. Sparse.
fn device_size_for(bytes: &[u8]) -> u64 {
    let len = bytes.len() as u64;
    let s = data_offset_hint(bytes).unwrap_or(0).min(1 << 40);
    len.max(s) + DEVICE_MARGIN
}

/// Data offset in bytes, read directly from a LUKS1 or LUKS2 binary header (best effort).
fn data_offset_hint(b: &[u8]) -> Option<u64> {
    if b.len() < 512 || &b[..6] != b"LUKS\xba\xbe" {
        return None;
    }
    match u16::from_be_bytes([b[6], b[7]]) {
        1 => Some(u32::from_be_bytes(b[104..108].try_into().ok()?) as u64 * SECTOR),
        2 => {
            let hdr_size = u64::from_be_bytes(b[8..16].try_into().ok()?);
            let end = (hdr_size as usize).min(b.len());
            let json = b.get(4096..end)?;
            let json = &json[..json.iter().position(|&c| c == 0).unwrap_or(json.len())];
            let v: serde_json::Value = serde_json::from_slice(json).ok()?;
            let mut max = 0u64;
            for seg in v.get("segments")?.as_object()?.values() {
                if let Some(o) = seg.get("offset").and_then(|o| o.as_str()).and_then(|o| o.parse::<u64>().ok()) {
                    max = max.max(o);
                }
            }
            Some(max)
        }
        _ => None,
    }
}

pub mod reencrypt;

mod worker {
    //! Bodies of the jobs; run on the worker thread only.
    use super::*;

    fn pbkdf(p: &HeaderParams) -> Result<CryptPbkdfType> {
        let kdf = match kdf_of(p)? {
            Kdf::Pbkdf2 => CryptKdf::Pbkdf2,
            Kdf::Argon2i => CryptKdf::Argon2I,
            Kdf::Argon2id => CryptKdf::Argon2Id,
        };
        // libcryptsetup's defaults for this kdf (time 2000 ms, argon2: 1 GiB, 4 threads),
        // then cryptsetup CLI's overrides.
        let mut t = CryptSettingsHandle::get_pbkdf_type_params(&kdf)
            .map_err(|e| crypt_err("crypt_get_pbkdf_type_params", e))?;
        t.hash = Some(p.hash.clone());
        if let Some(ms) = p.iter_time_ms {
            t.time_ms = ms;
        }
        if kdf != CryptKdf::Pbkdf2 {
            let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
            t.parallel_threads = t.parallel_threads.clamp(1, cpus.max(1));
        } else {
            t.max_memory_kb = 0;
            t.parallel_threads = 0;
        }
        if let Some(n) = p.pbkdf_force_iterations {
            t.iterations = n;
            t.time_ms = 0;
            t.flags |= CryptPbkdf::NO_BENCHMARK;
        }
        Ok(t)
    }

    pub(super) fn format(
        p: &HeaderParams,
        key: &VolumeKey,
        pass: &[u8],
        recovery: Option<&RecoverySlot>,
    ) -> Result<Header> {
        let s = p.data_offset_sectors;
        let dev = MemDev::new(s * SECTOR + DEVICE_MARGIN)?;
        let mut cd = format_on(&dev, p, key, pass, recovery)?;
        header_of(&dev, &mut cd, p, recovery.map(|_| RECOVERY_KEYSLOT))
    }

    /// Format `dev` (LUKS1/LUKS2, data offset S, `key`, keyslot 0 for `pass`, keyslot 1 for
    /// the recovery key if any).
    pub(super) fn format_on(
        dev: &MemDev,
        p: &HeaderParams,
        key: &VolumeKey,
        pass: &[u8],
        recovery: Option<&RecoverySlot>,
    ) -> Result<CryptDevice> {
        let s = p.data_offset_sectors;
        let mut cd = dev.open()?;
        let pbkdf = pbkdf(p)?;
        cd.settings_handle().set_pbkdf_type(&pbkdf).map_err(|e| crypt_err("crypt_set_pbkdf_type", e))?;
        cd.set_data_offset(s).map_err(|e| crypt_err("crypt_set_data_offset", e))?;
        let uuid = match &p.uuid {
            Some(u) => {
                Some(uuid::Uuid::parse_str(u).map_err(|e| LuksError::InvalidParams(format!("UUID {u:?}: {e}")))?)
            }
            None => None,
        };
        let cipher = (p.cipher.as_str(), p.cipher_mode.as_str());
        let vk = Either::Left(key.as_bytes());
        match p.luks_type {
            LuksType::Luks2 => {
                // libcryptsetup sizes the keyslots area to fill the whole data offset (up to
                // 128 MiB with luksify's raised offsets) and fills it with random bytes, which
                // luksify then replaces by zeros: at S = 128 MiB the format took 626 ms on
                // the host instead of 160. Keep cryptsetup's default area (16 MiB less the two
                // metadata copies, room for 32 keyslots) whatever the offset.
                let room = (s * SECTOR).saturating_sub(2 * LUKS2_DEFAULT_METADATA) / 4096 * 4096;
                let ks = LUKS2_DEFAULT_KEYSLOTS_BYTES.min(room);
                cd.settings_handle()
                    .set_metadata_size(
                        MetadataSize::Default,
                        KeyslotsSize::try_from(ks).map_err(|e| crypt_err("LUKS2 keyslots size", e))?,
                    )
                    .map_err(|e| crypt_err("crypt_set_metadata_size", e))?;
                let lp = CryptParamsLuks2 {
                    pbkdf: Some(pbkdf),
                    integrity: None,
                    integrity_params: None,
                    data_alignment: 0,
                    data_device: None,
                    // Never let libcryptsetup pick 4096: the stack's logical block size must not grow.
                    sector_size: SECTOR as u32,
                    label: p.label.clone(),
                    subsystem: None,
                };
                let mut r: CryptParamsLuks2Ref<'_> = (&lp).try_into().map_err(|e| crypt_err("LUKS2 parameters", e))?;
                cd.context_handle()
                    .format(EncryptionFormat::Luks2, cipher, uuid, vk, Some(&mut r))
                    .map_err(|e| crypt_err("crypt_format (LUKS2)", e))?;
            }
            LuksType::Luks1 => {
                let lp = CryptParamsLuks1 { hash: p.hash.clone(), data_alignment: 0, data_device: None };
                let mut r: CryptParamsLuks1Ref<'_> = (&lp).try_into().map_err(|e| crypt_err("LUKS1 parameters", e))?;
                cd.context_handle()
                    .format(EncryptionFormat::Luks1, cipher, uuid, vk, Some(&mut r))
                    .map_err(|e| crypt_err("crypt_format (LUKS1)", e))?;
            }
        }
        let slot = cd
            .keyslot_handle()
            .add_by_key(Some(0), Some(Either::Left(key.as_bytes())), pass, CryptVolumeKey::empty())
            .map_err(|e| crypt_err("crypt_keyslot_add_by_key", e))?;
        if slot != 0 {
            return Err(LuksError::Internal(format!("the passphrase went to keyslot {slot}, not 0")));
        }
        if let Some(r) = recovery {
            add_recovery(&mut cd, p, key, r)?;
        }
        Ok(cd)
    }

    /// Keyslot 1 for the recovery key, as systemd-cryptenroll adds one: PBKDF2, 1000
    /// iterations, no benchmark (`cryptsetup_set_minimal_pbkdf`), then (LUKS2) the
    /// `systemd-recovery` token naming the keyslot. The device's PBKDF is set back to the
    /// passphrase keyslot's afterwards.
    fn add_recovery(cd: &mut CryptDevice, p: &HeaderParams, key: &VolumeKey, r: &RecoverySlot) -> Result<()> {
        use crate::core::recovery;
        let mut t = CryptSettingsHandle::get_pbkdf_type_params(&CryptKdf::Pbkdf2)
            .map_err(|e| crypt_err("crypt_get_pbkdf_type_params", e))?;
        t.hash = Some(r.hash.clone());
        t.iterations = recovery::PBKDF2_ITERATIONS;
        t.time_ms = 0;
        t.max_memory_kb = 0;
        t.parallel_threads = 0;
        t.flags |= CryptPbkdf::NO_BENCHMARK;
        cd.settings_handle().set_pbkdf_type(&t).map_err(|e| crypt_err("crypt_set_pbkdf_type (recovery keyslot)", e))?;
        let slot = cd
            .keyslot_handle()
            .add_by_key(
                Some(RECOVERY_KEYSLOT),
                Some(Either::Left(key.as_bytes())),
                &r.passphrase,
                CryptVolumeKey::empty(),
            )
            .map_err(|e| crypt_err("crypt_keyslot_add_by_key (recovery key)", e))?;
        if slot != RECOVERY_KEYSLOT {
            return Err(LuksError::Internal(format!(
                "the recovery key went to keyslot {slot}, not {RECOVERY_KEYSLOT}"
            )));
        }
        let back = pbkdf(p)?;
        cd.settings_handle().set_pbkdf_type(&back).map_err(|e| crypt_err("crypt_set_pbkdf_type", e))?;
        if p.luks_type == LuksType::Luks2 {
            cd.token_handle()
                .json_set(libcryptsetup_rs::TokenInput::AddToken(&recovery::token_json(slot)))
                .map_err(|e| crypt_err("crypt_token_json_set (systemd-recovery)", e))?;
        }
        Ok(())
    }

    /// The first H bytes of `dev` as a [`Header`], checked against `p`: H is the end of the
    /// last used area (every keyslot in use: the passphrase's, the recovery key's, LUKS2's
    /// `reencrypt` keyslot; the metadata copies), rounded up to 4 KiB.
    pub(super) fn header_of(
        dev: &MemDev,
        cd: &mut CryptDevice,
        p: &HeaderParams,
        recovery_keyslot: Option<u32>,
    ) -> Result<Header> {
        use libcryptsetup_rs::consts::vals::KeyslotInfo;
        let s = p.data_offset_sectors;
        let (area_off, area_len) = cd.keyslot_handle().area(0).map_err(|e| crypt_err("crypt_keyslot_area", e))?;
        let mut end = area_off + area_len;
        let slots = match p.luks_type {
            LuksType::Luks1 => 8,
            LuksType::Luks2 => 32,
        };
        for slot in 1..slots {
            // LUKS1 gives every slot index an area, used or not; LUKS2 only the used ones
            // (the `reencrypt` keyslot included), an error for the others.
            let used = p.luks_type == LuksType::Luks2
                || matches!(cd.keyslot_handle().status(slot), Ok(KeyslotInfo::Active | KeyslotInfo::ActiveLast));
            if !used {
                continue;
            }
            if let Ok((o, l)) = cd.keyslot_handle().area(slot) {
                end = end.max(o + l);
            }
        }
        let _ = take_log();
        if p.luks_type == LuksType::Luks2 {
            let (md, _ks) =
                cd.settings_handle().get_metadata_size().map_err(|e| crypt_err("crypt_get_metadata_size", e))?;
            end = end.max(2 * *md);
        }
        let h = end.div_ceil(HEADER_ALIGN) * HEADER_ALIGN;
        let info = info_of(cd)?;
        if info.data_offset_sectors != s {
            return Err(LuksError::Internal(format!(
                "libcryptsetup put the data at sector {}, not {s}",
                info.data_offset_sectors
            )));
        }
        if info.sector_size != SECTOR as u32 {
            return Err(LuksError::Internal(format!("encryption sector size {} instead of 512", info.sector_size)));
        }
        if h > s * SECTOR {
            return Err(LuksError::InvalidParams(format!(
                "the header needs {h} bytes, more than the data offset {s} sectors"
            )));
        }
        if let Some(u) = &p.uuid {
            if !u.eq_ignore_ascii_case(&info.uuid) {
                return Err(LuksError::Internal(format!("the header has UUID {}, not {u}", info.uuid)));
            }
        }
        let bytes = dev.read_at(h, 0)?;
        Ok(Header {
            bytes,
            data_offset_sectors: s,
            uuid: info.uuid,
            luks_type: p.luks_type,
            cipher_spec: info.cipher_spec,
            key_bytes: info.key_bytes,
            recovery_keyslot,
        })
    }

    pub(super) fn load(bytes: &[u8]) -> Result<(MemDev, CryptDevice)> {
        if bytes.len() < 4096 {
            return Err(LuksError::BadHeader(format!("{} bytes is too short for a LUKS header", bytes.len())));
        }
        let dev = MemDev::new(device_size_for(bytes))?;
        dev.write_at(bytes, 0)?;
        let mut cd = dev.open()?;
        cd.context_handle().load::<()>(None, None).map_err(|e| {
            let log = take_log();
            let mut d = e.to_string();
            if !log.is_empty() {
                d = format!("{d} ({log})");
            }
            LuksError::BadHeader(d)
        })?;
        Ok((dev, cd))
    }

    pub(super) fn info_of(cd: &mut CryptDevice) -> Result<HeaderInfo> {
        let luks_type = match cd.format_handle().get_type().map_err(|e| crypt_err("crypt_get_type", e))? {
            EncryptionFormat::Luks1 => LuksType::Luks1,
            EncryptionFormat::Luks2 => LuksType::Luks2,
            _ => return Err(LuksError::BadHeader("not a LUKS1 or LUKS2 header".into())),
        };
        let mut st = cd.status_handle();
        let cipher = st.get_cipher().map_err(|e| crypt_err("crypt_get_cipher", e))?;
        let mode = st.get_cipher_mode().map_err(|e| crypt_err("crypt_get_cipher_mode", e))?;
        let uuid = st.get_uuid().map_err(|e| crypt_err("crypt_get_uuid", e))?.hyphenated().to_string();
        let data_offset_sectors = st.get_data_offset();
        let key_bytes = st.get_volume_key_size();
        if key_bytes <= 0 {
            return Err(LuksError::BadHeader(format!("volume key size {key_bytes}")));
        }
        let sector_size = libcryptsetup_rs::get_sector_size(Some(cd));
        Ok(HeaderInfo {
            luks_type,
            data_offset_sectors,
            uuid,
            cipher_spec: format!("{cipher}-{mode}"),
            key_bytes: key_bytes as usize,
            sector_size: sector_size.max(0) as u32,
        })
    }

    pub(super) fn inspect(bytes: &[u8]) -> Result<HeaderInfo> {
        let (_dev, mut cd) = load(bytes)?;
        info_of(&mut cd)
    }

    pub(super) fn unlock(bytes: &[u8], pass: &[u8]) -> Result<VolumeKey> {
        let (_dev, mut cd) = load(bytes)?;
        let n = cd.status_handle().get_volume_key_size();
        if n <= 0 {
            return Err(LuksError::BadHeader(format!("volume key size {n}")));
        }
        let mut buf = Zeroizing::new(vec![0u8; n as usize]);
        let r = cd.volume_key_handle().get(None, &mut buf[..], Some(pass));
        let _ = take_log();
        match r {
            Ok((_slot, len)) => {
                buf.truncate(len);
                Ok(VolumeKey::from_bytes(buf))
            }
            Err(e) => match errno_of(&e) {
                Some(libc::EPERM) => Err(LuksError::WrongPassphrase),
                Some(libc::ENOENT) => Err(LuksError::NoKeyslot),
                _ => Err(crypt_err("crypt_volume_key_get", e)),
            },
        }
    }
}

/// The libcryptsetup this process runs with: the shared object the dynamic linker loaded
/// (e.g. `/lib/x86_64-linux-gnu/libcryptsetup.so.12.9.0`; the library has no call that
/// returns its release), for `luksify --version`.
pub fn library_file() -> String {
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|m| {
            m.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| p.contains("/libcryptsetup.so"))
                .map(String::from)
        })
        .unwrap_or_else(|| "not loaded".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates() {
        assert_eq!(header_size_estimate(LuksType::Luks2, 64), 290816);
        assert_eq!(header_size_estimate(LuksType::Luks1, 64), 262144);
        assert_eq!(header_size_estimate(LuksType::Luks2, 32) % 4096, 0);
    }

    #[test]
    fn key_debug_and_hex() {
        let k = VolumeKey::from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&*k.hex(), "deadbeef");
        let d = format!("{k:?}");
        assert!(!d.contains("deadbeef") && !d.contains("222"), "{d}");
    }

    /// The key is made of exactly the 32 bytes the source gives (nothing else), and
    /// `generate` takes them from getrandom: two keys differ, and over a few keys every
    /// letter of the alphabet shows up.
    #[test]
    fn recovery_key_comes_from_its_entropy_source() {
        use crate::core::recovery::{FORMATTED_LEN, MODHEX, RAW_BYTES};
        let mut asked = 0;
        let k = RecoveryKey::generate_with(|b| {
            asked = b.len();
            b.fill(0x5a);
            Ok(())
        })
        .unwrap();
        assert_eq!(asked, RAW_BYTES);
        assert_eq!(k.as_str(), ["glglglgl"; 8].join("-"));
        assert!(RecoveryKey::generate_with(|_| Err(LuksError::Random("no entropy".into()))).is_err());
        let a = RecoveryKey::generate().unwrap();
        let b = RecoveryKey::generate().unwrap();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.as_str().len(), FORMATTED_LEN);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..16 {
            seen.extend(RecoveryKey::generate().unwrap().as_str().bytes().filter(|c| *c != b'-'));
        }
        assert_eq!(seen.into_iter().collect::<Vec<u8>>(), {
            let mut v = MODHEX.to_vec();
            v.sort();
            v
        });
        // never in Debug output, nor in the keyslot parameters' Debug
        assert!(!format!("{a:?}").contains(&a.as_str()[..8]));
        let slot = a.slot("sha512");
        let d = format!("{slot:?}");
        assert!(!d.contains(&a.as_str()[..8]) && d.contains("sha512"), "{d}");
    }

    #[test]
    fn params_validation() {
        let k = VolumeKey::generate(64).unwrap();
        let mut p = HeaderParams::defaults(LuksType::Luks1);
        p.pbkdf = Some("argon2id".into());
        assert!(matches!(validate(&p, &k), Err(LuksError::InvalidParams(_))));
        let mut p = HeaderParams::defaults(LuksType::Luks2);
        p.data_offset_sectors = 100;
        assert!(matches!(validate(&p, &k), Err(LuksError::InvalidParams(_))));
        let p = HeaderParams::defaults(LuksType::Luks2);
        assert!(matches!(validate(&p, &VolumeKey::generate(32).unwrap()), Err(LuksError::InvalidParams(_))));
        assert!(validate(&p, &k).is_ok());
    }
}
