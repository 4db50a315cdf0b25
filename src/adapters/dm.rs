//! Device-mapper, thinly: a checked wrapper over the `devicemapper` crate's ioctls, plus two
//! ioctls done by hand where the crate cannot do what luksify needs:
//!
//! - `DM_TABLE_LOAD` with `DM_SECURE_DATA` ([`Dm::load`] with `secure = true`): the crate
//!   copies the parameters into buffers it frees without wiping; ours are `Zeroizing`, and the
//!   kernel wipes its own copy (and our input buffer) because of the flag.
//! - `DM_TABLE_STATUS` with `DM_STATUS_TABLE` ([`Dm::table`]): the kernel returns crypt keys in
//!   hex to anyone who reads a table back; we read into a wiped buffer and scrub the keys
//!   ([`scrub_key`]) before anything leaves this module.
//!
//! `DM_DEV_WAIT` is hand-made too, in `raw`; luksify no longer waits on dm-mirror's events
//! since the copy moved to userspace (HACKING.md, "How a step moves").
//!
//! Every ioctl's result is checked and mapped to [`DmError`]. Nothing here creates
//! /dev/mapper nodes: tables name devices by `major:minor`.

use crate::core::facts::TableLineFacts;
use devicemapper::{DevId, DmFlags, DmName, DmOptions, DmUdevFlags, DmUuid, DM};
use nix::errno::Errno;
use std::collections::HashSet;

use std::path::Path;
use zeroize::Zeroize;

/// The control node; without it there is no device-mapper in this kernel (or no permission).
pub const CONTROL_PATH: &str = "/dev/mapper/control";

/// DM UUID prefix of luksify's (and cryptsetup's) private helper devices: hidden from udev
/// rules, blkid and LVM.
pub const PRIVATE_UUID_PREFIX: &str = "CRYPT-SUBDEV-";

/// The udev flags of a public device that udev rules and LVM must leave alone for now (the
/// bridge while it still shows the plaintext PV): no blkid, no /dev/disk links, no `pvscan`
/// autoactivation (DM_UDEV_DISABLE_DISK_RULES_FLAG 0x04 | DM_UDEV_DISABLE_OTHER_RULES_FLAG
/// 0x08, libdevmapper.h). Unlike a private device's flags, the DM rules still run, so
/// /dev/mapper/<name> is made.
pub(crate) fn hidden_udev_flags() -> DmUdevFlags {
    DmUdevFlags::DM_UDEV_DISABLE_DISK_RULES_FLAG | DmUdevFlags::DM_UDEV_DISABLE_OTHER_RULES_FLAG
}

/// Where udev listens; without it nobody waits for uevents (rescue media, the test bed).
const UDEV_CONTROL: &str = "/run/udev/control";

/// A table or status line: `(start, length, target type, params)`, sectors of 512 bytes.
/// Same type as the facts carry, so probe results need no conversion.
pub type TableLine = TableLineFacts;

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("device-mapper is not available: cannot open {CONTROL_PATH} ({0}); is the dm-mod module loaded, and are you root?")]
    Unavailable(String),
    #[error("no device-mapper device named {0:?}")]
    NotFound(String),
    #[error("{op} {name}: the device is busy (open, or in use by another device)")]
    Busy { op: &'static str, name: String },
    #[error("{op} {name}: interrupted by a signal")]
    Interrupted { op: &'static str, name: String },
    #[error("{op} {name}: {errno}")]
    Ioctl { op: &'static str, name: String, errno: Errno },
    #[error("invalid {what} {value:?}: {why}")]
    Invalid { what: &'static str, value: String, why: String },
    #[error("{op} {name}: {msg}")]
    Other { op: &'static str, name: String, msg: String },
}

pub type Result<T> = std::result::Result<T, DmError>;

impl DmError {
    /// The errno of a failed ioctl, if that is what this is.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            DmError::Ioctl { errno, .. } => Some(*errno),
            DmError::NotFound(_) => Some(Errno::ENXIO),
            DmError::Busy { .. } => Some(Errno::EBUSY),
            DmError::Interrupted { .. } => Some(Errno::EINTR),
            _ => None,
        }
    }
}

fn from_errno(op: &'static str, name: &str, errno: Errno) -> DmError {
    match errno {
        Errno::ENXIO => DmError::NotFound(name.to_string()),
        Errno::EBUSY => DmError::Busy { op, name: name.to_string() },
        Errno::EINTR => DmError::Interrupted { op, name: name.to_string() },
        e => DmError::Ioctl { op, name: name.to_string(), errno: e },
    }
}

/// Map an error of the `devicemapper` crate. Its messages carry ioctl headers (names, UUIDs,
/// flags), never table parameters.
fn map_crate(op: &'static str, name: &str, e: devicemapper::DmError) -> DmError {
    use devicemapper::errors::Error as CoreErr;
    match e {
        devicemapper::DmError::Core(CoreErr::Ioctl(_, _, _, errno)) => from_errno(op, name, *errno),
        devicemapper::DmError::Core(CoreErr::ContextInit(m)) => DmError::Unavailable(m),
        other => DmError::Other { op, name: name.to_string(), msg: other.to_string() },
    }
}

/// A dm device as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmDev {
    pub name: String,
    /// "" when the device has no UUID.
    pub uuid: String,
    pub major: u32,
    pub minor: u32,
    pub open_count: i32,
    pub event_nr: u32,
    pub suspended: bool,
    /// A table is live (the device maps something).
    pub active_table: bool,
    /// A table is loaded in the inactive slot (the next resume swaps it in).
    pub inactive_table: bool,
}

/// How to suspend. The default flushes in-flight I/O and freezes a filesystem mounted directly
/// on the device (LVM freezes only snapshot origins and cows; its other table swaps skip it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SuspendFlags {
    /// DM_NOFLUSH: do not wait for in-flight I/O to complete; queue it instead.
    pub noflush: bool,
    /// DM_SKIP_LOCKFS: do not freeze a filesystem mounted on the device.
    pub skip_lockfs: bool,
}

/// Check a dm name the way the kernel does (NUL-terminated in 128 bytes, no '/').
pub(crate) fn check_name(name: &str) -> Result<&DmName> {
    let bad = |why: &str| DmError::Invalid { what: "dm name", value: name.to_string(), why: why.to_string() };
    if name.is_empty() || name.len() > 127 {
        return Err(bad("must be 1 to 127 bytes long"));
    }
    if !name.is_ascii() || name.bytes().any(|b| b == b'/' || b.is_ascii_control() || b == b' ') {
        return Err(bad("only printable ASCII without '/' or spaces"));
    }
    if name == "." || name == ".." {
        return Err(bad("reserved name"));
    }
    DmName::new(name).map_err(|e| bad(&e.to_string()))
}

/// A name to look an existing device up by: whatever the kernel accepts (strict rules are
/// for names we create, [`check_name`]).
fn lookup_name(name: &str) -> Result<&DmName> {
    if name.is_empty() || name.len() > 127 || name.contains('\0') {
        return Err(DmError::Invalid {
            what: "dm name",
            value: name.to_string(),
            why: "must be 1 to 127 bytes long".into(),
        });
    }
    DmName::new(name).map_err(|e| DmError::Invalid { what: "dm name", value: name.to_string(), why: e.to_string() })
}

fn check_uuid(uuid: &str) -> Result<&DmUuid> {
    let bad = |why: &str| DmError::Invalid { what: "dm uuid", value: uuid.to_string(), why: why.to_string() };
    if uuid.is_empty()
        || uuid.len() > 128
        || !uuid.is_ascii()
        || uuid.bytes().any(|b| b.is_ascii_control() || b == b' ')
    {
        return Err(bad("must be 1 to 128 printable ASCII bytes without spaces"));
    }
    DmUuid::new(uuid).map_err(|e| bad(&e.to_string()))
}

/// A handle on /dev/mapper/control.
pub struct Dm {
    dm: DM,
    /// Devices this handle created private: their resume and remove carry the udev flags.
    private: HashSet<String>,
    /// Public devices whose resumes carry [`hidden_udev_flags`] ([`Dm::set_hidden`]).
    hidden: HashSet<String>,
}

impl Dm {
    #[cfg(test)]
    /// Whether device-mapper can be used here: the control node exists *and* opens (the node
    /// can exist on a kernel without dm-mod: opening it then fails with ENODEV).
    pub fn available() -> bool {
        Path::new(CONTROL_PATH).exists() && Dm::open().is_ok()
    }

    pub fn open() -> Result<Dm> {
        let dm = DM::new().map_err(|e| match e {
            devicemapper::DmError::Core(devicemapper::errors::Error::ContextInit(m)) => DmError::Unavailable(m),
            other => DmError::Unavailable(other.to_string()),
        })?;
        Ok(Dm { dm, private: HashSet::new(), hidden: HashSet::new() })
    }

    #[cfg(test)]
    /// The kernel's dm ioctl interface version.
    pub fn version(&self) -> Result<(u32, u32, u32)> {
        self.dm.version().map_err(|e| map_crate("querying the version of", "device-mapper", e))
    }

    fn info_of(&self, name: &str) -> Result<DmDev> {
        let id = DevId::Name(lookup_name(name)?);
        let info = self.dm.device_info(&id).map_err(|e| map_crate("querying", name, e))?;
        let f = info.flags();
        Ok(DmDev {
            name: name.to_string(),
            uuid: info.uuid().map(|u| u.to_string()).unwrap_or_default(),
            major: info.device().major,
            minor: info.device().minor,
            open_count: info.open_count(),
            event_nr: info.event_nr(),
            suspended: f.contains(DmFlags::DM_SUSPEND),
            active_table: f.contains(DmFlags::DM_ACTIVE_PRESENT),
            inactive_table: f.contains(DmFlags::DM_INACTIVE_PRESENT),
        })
    }

    /// One device, or None if there is none by that name.
    pub fn info(&self, name: &str) -> Result<Option<DmDev>> {
        match self.info_of(name) {
            Ok(d) => Ok(Some(d)),
            Err(DmError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every dm device, sorted by name. A device removed while listing is left out.
    pub fn list(&self) -> Result<Vec<DmDev>> {
        let names = self.dm.list_devices().map_err(|e| map_crate("listing", "dm devices", e))?;
        let mut out = Vec::with_capacity(names.len());
        for (n, _, _) in names {
            if let Some(d) = self.info(&n.to_string())? {
                out.push(d);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The live table, with keys scrubbed ([`scrub_key`]): safe to print. A scrubbed crypt
    /// line cannot be loaded back.
    pub fn table(&self, name: &str) -> Result<Vec<TableLine>> {
        let flags = DmFlags::DM_STATUS_TABLE.bits();
        let (hdr, buf) = raw::ioctl(&self.dm, raw::TABLE_STATUS, name, flags, 0, 0, &[], "reading the table of")?;
        let mut lines = raw::parse_targets(&buf, hdr.data_start, hdr.target_count).map_err(|msg| DmError::Other {
            op: "reading the table of",
            name: name.to_string(),
            msg,
        })?;
        for l in lines.iter_mut() {
            let s = scrub_key(&l.target_type, &l.params);
            l.params.zeroize();
            l.params = s;
        }
        Ok(lines)
    }

    /// The live table's status lines (target-specific: for a mirror, sync and leg health).
    /// Asked with DM_NOFLUSH (never makes a target write metadata).
    pub fn status(&self, name: &str) -> Result<Vec<TableLine>> {
        let id = DevId::Name(lookup_name(name)?);
        let (_, st) = self
            .dm
            .table_status(&id, DmOptions::default().set_flags(DmFlags::DM_NOFLUSH))
            .map_err(|e| map_crate("reading the status of", name, e))?;
        Ok(st
            .into_iter()
            .map(|(start, length, target_type, params)| TableLine { start, length, target_type, params })
            .collect())
    }

    /// The devices the live table uses, as (major, minor).
    pub fn deps(&self, name: &str) -> Result<Vec<(u32, u32)>> {
        let id = DevId::Name(lookup_name(name)?);
        let d = self
            .dm
            .table_deps(&id, DmOptions::default())
            .map_err(|e| map_crate("reading the dependencies of", name, e))?;
        Ok(d.into_iter().map(|d| (d.major, d.minor)).collect())
    }

    /// Create an empty device (no table; the kernel starts it suspended). `private`: a helper
    /// device; its UUID should start with [`PRIVATE_UUID_PREFIX`]. The udev flags that keep
    /// udev rules, blkid and LVM away travel with the ioctls that raise uevents (resume,
    /// remove), so this handle remembers the name and [`Dm::resume`] / [`Dm::remove`] send
    /// them (they also do for any device whose UUID has the private prefix).
    pub fn create(&mut self, name: &str, uuid: &str, private: bool) -> Result<(u32, u32)> {
        let n = check_name(name)?;
        let u = check_uuid(uuid)?;
        let opts = if private { DmOptions::private() } else { DmOptions::default() };
        let info = self.dm.device_create(n, Some(u), opts).map_err(|e| match e {
            devicemapper::DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno))
                if *errno == Errno::EBUSY =>
            {
                DmError::Other {
                    op: "creating",
                    name: name.to_string(),
                    msg: "a device with this name or UUID already exists".into(),
                }
            }
            other => map_crate("creating", name, other),
        })?;
        if private {
            self.private.insert(name.to_string());
        }
        Ok((info.device().major, info.device().minor))
    }

    /// Load a table into the inactive slot. A failed load leaves the live table as it was.
    /// `secure`: the lines hold key material: sent with DM_SECURE_DATA from buffers that are
    /// wiped afterwards (the caller still owns, and should wipe, `lines`).
    pub fn load(&self, name: &str, lines: &[TableLine], secure: bool) -> Result<()> {
        lookup_name(name)?;
        if lines.is_empty() {
            return Err(DmError::Invalid { what: "table for", value: name.to_string(), why: "no lines".into() });
        }
        for l in lines {
            if l.target_type.is_empty() || l.target_type.len() > 15 || !l.target_type.is_ascii() {
                return Err(DmError::Invalid {
                    what: "target type",
                    value: l.target_type.clone(),
                    why: "1 to 15 ASCII bytes".into(),
                });
            }
            if l.params.contains('\0') {
                return Err(DmError::Invalid {
                    what: "table line for",
                    value: name.to_string(),
                    why: "NUL in the parameters".into(),
                });
            }
        }
        if secure {
            let payload = raw::encode_targets(lines);
            let flags = DmFlags::DM_SECURE_DATA.bits();
            raw::ioctl(
                &self.dm,
                raw::TABLE_LOAD,
                name,
                flags,
                0,
                lines.len() as u32,
                &payload,
                "loading a table into",
            )?;
            Ok(())
        } else {
            let t: Vec<(u64, u64, String, String)> =
                lines.iter().map(|l| (l.start, l.length, l.target_type.clone(), l.params.clone())).collect();
            self.dm
                .table_load(&DevId::Name(lookup_name(name)?), &t, DmOptions::default())
                .map(|_| ())
                .map_err(|e| map_crate("loading a table into", name, e))
        }
    }

    pub fn suspend(&self, name: &str, how: SuspendFlags) -> Result<()> {
        let mut f = DmFlags::DM_SUSPEND;
        if how.noflush {
            f |= DmFlags::DM_NOFLUSH;
        }
        if how.skip_lockfs {
            f |= DmFlags::DM_SKIP_LOCKFS;
        }
        self.dm
            .device_suspend(&DevId::Name(lookup_name(name)?), DmOptions::default().set_flags(f))
            .map(|_| ())
            .map_err(|e| map_crate("suspending", name, e))
    }

    fn is_private(&self, name: &str) -> Result<bool> {
        if self.private.contains(name) {
            return Ok(true);
        }
        Ok(self.info_of(name)?.uuid.starts_with(PRIVATE_UUID_PREFIX))
    }

    /// From now on, resume `name` with [`hidden_udev_flags`] (`hidden`) or without any flags.
    /// The flags travel in the resume's uevent (DM_COOKIE) and udev keeps them in its
    /// database, so un-hiding takes a real resume without them (a synthetic "change" event
    /// would re-import the old flags).
    pub fn set_hidden(&mut self, name: &str, hidden: bool) {
        if hidden {
            self.hidden.insert(name.to_string());
        } else {
            self.hidden.remove(name);
        }
    }

    /// The udev flags a resume of `name` carries.
    pub(crate) fn resume_udev_flags(&self, name: &str) -> Result<DmUdevFlags> {
        Ok(if self.is_private(name)? {
            DmOptions::private().udev_flags()
        } else if self.hidden.contains(name) {
            hidden_udev_flags()
        } else {
            DmUdevFlags::empty()
        })
    }

    /// Resume: the inactive table, if one is loaded, becomes live. A private or hidden
    /// device's resume carries its udev flags in the uevent cookie. Where udev runs the crate
    /// sends them (and waits for udev to process the event); where it does not, the crate
    /// would drop them, so the ioctl is made here with the flags as the cookie, as
    /// libdevmapper does without udev synchronisation, and a udev started later (or a
    /// uevent listener) still sees them.
    pub fn resume(&self, name: &str) -> Result<()> {
        let flags = self.resume_udev_flags(name)?;
        if !flags.is_empty() && !Path::new(UDEV_CONTROL).exists() {
            let cookie = flags.bits() << 16; // DM_UDEV_FLAGS_SHIFT
            raw::ioctl(&self.dm, raw::DEV_SUSPEND, name, 0, cookie, 0, &[], "resuming")?;
            return Ok(());
        }
        self.dm
            .device_suspend(&DevId::Name(lookup_name(name)?), DmOptions::default().set_udev_flags(flags))
            .map(|_| ())
            .map_err(|e| map_crate("resuming", name, e))
    }

    /// DM_TARGET_MSG: a message to the target at sector 0 (or, `@...`, to device-mapper's core: dm-stats);
    /// its reply, empty if none.
    pub fn message(&self, name: &str, msg: &str) -> Result<String> {
        self.dm
            .target_msg(&DevId::Name(lookup_name(name)?), Some(0), msg)
            .map(|(_, reply)| reply.unwrap_or_default())
            .map_err(|e| map_crate("sending a message to", name, e))
    }

    /// Drop the table loaded in the inactive slot (the live one stays).
    pub fn clear_inactive(&self, name: &str) -> Result<()> {
        self.dm
            .table_clear(&DevId::Name(lookup_name(name)?))
            .map(|_| ())
            .map_err(|e| map_crate("clearing the inactive table of", name, e))
    }

    /// Remove the device (the crate retries a few times while it is busy, then gives up:
    /// [`DmError::Busy`]).
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let opts = if self.is_private(name)? { DmOptions::private() } else { DmOptions::default() };
        self.dm.device_remove(&DevId::Name(lookup_name(name)?), opts).map_err(|e| map_crate("removing", name, e))?;
        self.private.remove(name);
        Ok(())
    }
}

/// Whether the kernel's dm-crypt maps `cipher_spec` (e.g. `serpent-xts-plain64`) with a key
/// of `key_bytes`: the crypt target's constructor (run by the table load) allocates the cipher
/// and its IV generator and checks the key size, as it will for the real mapping. The target
/// is a private 8-sector `error` device; a random key is used and wiped; both devices are
/// removed again. Nothing else is touched. Err says what the kernel refused.
pub fn probe_cipher(cipher_spec: &str, key_bytes: usize) -> std::result::Result<(), String> {
    let mut dm = Dm::open().map_err(|e| e.to_string())?;
    let tag = format!("luksify-cipher-probe-{}", std::process::id());
    let (under, over) = (format!("{tag}-e"), format!("{tag}-c"));
    let mut key = vec![0u8; key_bytes];
    getrandom::fill(&mut key).map_err(|e| format!("random key: {e}"))?;
    let mut hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    key.zeroize();
    let run = |dm: &mut Dm, hex: &str| -> std::result::Result<(), String> {
        let (maj, min) =
            dm.create(&under, &format!("{PRIVATE_UUID_PREFIX}{under}"), true).map_err(|e| e.to_string())?;
        let err = [TableLine { start: 0, length: 8, target_type: "error".into(), params: String::new() }];
        dm.load(&under, &err, false).and_then(|()| dm.resume(&under)).map_err(|e| e.to_string())?;
        dm.create(&over, &format!("{PRIVATE_UUID_PREFIX}{over}"), true).map_err(|e| e.to_string())?;
        let mut crypt = [TableLine {
            start: 0,
            length: 8,
            target_type: "crypt".into(),
            params: format!("{cipher_spec} {hex} 0 {maj}:{min} 0"),
        }];
        let r = dm.load(&over, &crypt, true);
        crypt[0].params.zeroize();
        r.map_err(|e| match e.errno() {
            Some(Errno::EINVAL) | Some(Errno::ENOENT) => format!(
                "the kernel's dm-crypt refuses cipher {cipher_spec} with a {}-bit key (unknown cipher or IV mode, a module that is not there, or a key size the cipher does not take; `dmesg` says which)",
                key_bytes * 8
            ),
            _ => e.to_string(),
        })
    };
    let r = run(&mut dm, &hex);
    hex.zeroize();
    for n in [&over, &under] {
        if dm.info(n).ok().flatten().is_some() {
            if let Err(e) = dm.remove(n) {
                eprintln!(
                    "luksify: warning: removing the cipher probe device {n}: {e} (remove it with `dmsetup remove {n}`)"
                );
            }
        }
    }
    r
}

/// Replace key material in a table line by `-`, so the line can be printed or logged:
/// crypt's key field (hex keys; keyring references `:<size>:<type>:<desc>` are not secret and
/// are kept), and dm-integrity's `internal_hash:`, `journal_crypt:`, `journal_mac:` keys.
pub(crate) fn scrub_key(target_type: &str, params: &str) -> String {
    match target_type {
        "crypt" => {
            let mut w: Vec<&str> = params.split_whitespace().collect();
            if w.len() > 1 && !w[1].starts_with(':') && w[1] != "-" {
                w[1] = "-";
            }
            w.join(" ")
        }
        "integrity" => params
            .split_whitespace()
            .map(|t| {
                for p in ["internal_hash:", "journal_crypt:", "journal_mac:"] {
                    if let Some(rest) = t.strip_prefix(p) {
                        if let Some((alg, _key)) = rest.split_once(':') {
                            return format!("{p}{alg}:-");
                        }
                    }
                }
                t.to_string()
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => params.to_string(),
    }
}

/// Why a status line did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse the {target} status {line:?}: {why}")]
pub struct StatusParseError {
    pub target: &'static str,
    pub line: String,
    pub why: &'static str,
}

/// The status of one dm-mirror (`mirror` target) line:
/// `<#legs> <dev>… <in_sync>/<total> 1 <health letters> <#log args> <log args…>`.
/// Health letters (kernel dm-raid1.c `device_status_char`): `A` alive, `F` flush error,
/// `D` write error, `S` sync error, `R` read error, `U` unknown error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorStatus {
    /// Leg devices, as the kernel names them (`major:minor`).
    pub legs: Vec<String>,
    /// Regions in sync.
    pub in_sync: u64,
    /// Regions in all.
    pub total: u64,
    /// One letter per leg.
    pub health: Vec<char>,
    /// The dirty log's status, e.g. `["core"]` or `["disk", "254:3", "A"]`.
    pub log: Vec<String>,
}

impl MirrorStatus {
    pub fn parse(params: &str) -> std::result::Result<MirrorStatus, StatusParseError> {
        let err = |why| StatusParseError { target: "mirror", line: params.to_string(), why };
        let w: Vec<&str> = params.split_whitespace().collect();
        let n: usize = w.first().ok_or(err("empty"))?.parse().map_err(|_| err("leg count is not a number"))?;
        if n == 0 || n > 32 {
            return Err(err("leg count out of range"));
        }
        let legs: Vec<String> =
            w.get(1..1 + n).ok_or(err("fewer legs than announced"))?.iter().map(|s| s.to_string()).collect();
        let (a, b) = w
            .get(1 + n)
            .ok_or(err("no sync count"))?
            .split_once('/')
            .ok_or(err("sync count is not <in_sync>/<total>"))?;
        let in_sync: u64 = a.parse().map_err(|_| err("in-sync count is not a number"))?;
        let total: u64 = b.parse().map_err(|_| err("region count is not a number"))?;
        if in_sync > total {
            return Err(err("more regions in sync than regions"));
        }
        if *w.get(2 + n).ok_or(err("no health field count"))? != "1" {
            return Err(err("health field count is not 1"));
        }
        let health: Vec<char> = w.get(3 + n).ok_or(err("no health letters"))?.chars().collect();
        if health.len() != n {
            return Err(err("not one health letter per leg"));
        }
        if health.iter().any(|c| !"AFDSRU".contains(*c)) {
            return Err(err("unknown health letter"));
        }
        let mut log = Vec::new();
        if let Some(cnt) = w.get(4 + n) {
            let c: usize = cnt.parse().map_err(|_| err("log argument count is not a number"))?;
            log = w
                .get(5 + n..5 + n + c)
                .ok_or(err("fewer log arguments than announced"))?
                .iter()
                .map(|s| s.to_string())
                .collect();
            if w.len() != 5 + n + c {
                return Err(err("trailing fields"));
            }
        }
        Ok(MirrorStatus { legs, in_sync, total, health, log })
    }
}

/// The hand-made ioctls: DM_DEV_WAIT, secure DM_TABLE_LOAD, DM_TABLE_STATUS (table) into
/// wiped buffers. Layout from <linux/dm-ioctl.h> (interface 4), checked by unit tests.
mod raw {
    use super::{from_errno, lookup_name, DmError, TableLine};
    use devicemapper::DM;
    use std::os::fd::AsRawFd;
    use zeroize::Zeroizing;

    pub const DM_IOCTL: u8 = 0xfd;
    pub const DEV_SUSPEND: u8 = 6;
    pub const DEV_WAIT: u8 = 8;
    pub const TABLE_LOAD: u8 = 9;
    pub const TABLE_STATUS: u8 = 12;

    /// sizeof(struct dm_ioctl)
    pub const HDR: usize = 312;
    /// sizeof(struct dm_target_spec)
    pub const SPEC: usize = 40;
    const BUFFER_FULL: u32 = 1 << 8;
    const MIN_BUF: usize = 16 * 1024;
    const MAX_BUF: usize = 64 << 20;

    const O_VERSION: usize = 0;
    const O_DATA_SIZE: usize = 12;
    const O_DATA_START: usize = 16;
    const O_TARGET_COUNT: usize = 20;
    const O_OPEN_COUNT: usize = 24;
    const O_FLAGS: usize = 28;
    const O_EVENT_NR: usize = 32;
    const O_NAME: usize = 48;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_ne_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_ne_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[derive(Debug, Clone, Copy)]
    #[allow(dead_code)]
    pub struct Hdr {
        pub data_size: u32,
        pub data_start: u32,
        pub target_count: u32,
        pub open_count: i32,
        pub flags: u32,
        pub event_nr: u32,
    }

    pub fn header(name: &str, flags: u32, event_nr: u32, target_count: u32, data_size: usize) -> [u8; HDR] {
        let mut h = [0u8; HDR];
        for (i, v) in [4u32, 0, 0].iter().enumerate() {
            h[O_VERSION + 4 * i..O_VERSION + 4 * i + 4].copy_from_slice(&v.to_ne_bytes());
        }
        h[O_DATA_SIZE..O_DATA_SIZE + 4].copy_from_slice(&(data_size as u32).to_ne_bytes());
        h[O_DATA_START..O_DATA_START + 4].copy_from_slice(&(HDR as u32).to_ne_bytes());
        h[O_TARGET_COUNT..O_TARGET_COUNT + 4].copy_from_slice(&target_count.to_ne_bytes());
        h[O_FLAGS..O_FLAGS + 4].copy_from_slice(&flags.to_ne_bytes());
        h[O_EVENT_NR..O_EVENT_NR + 4].copy_from_slice(&event_nr.to_ne_bytes());
        h[O_NAME..O_NAME + name.len()].copy_from_slice(name.as_bytes());
        h
    }

    pub(crate) fn parse_header(b: &[u8]) -> Hdr {
        Hdr {
            data_size: u32_at(b, O_DATA_SIZE),
            data_start: u32_at(b, O_DATA_START),
            target_count: u32_at(b, O_TARGET_COUNT),
            open_count: u32_at(b, O_OPEN_COUNT) as i32,
            flags: u32_at(b, O_FLAGS),
            event_nr: u32_at(b, O_EVENT_NR),
        }
    }

    /// Targets in the DM_TABLE_LOAD layout: each spec's `next` is relative to itself, each
    /// parameter string NUL-terminated and padded to 8 bytes.
    pub(crate) fn encode_targets(lines: &[TableLine]) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(lines.iter().map(|l| SPEC + l.params.len() + 8).sum()));
        for l in lines {
            let plen = (l.params.len() + 1).div_ceil(8) * 8;
            let mut spec = [0u8; SPEC];
            spec[0..8].copy_from_slice(&l.start.to_ne_bytes());
            spec[8..16].copy_from_slice(&l.length.to_ne_bytes());
            spec[20..24].copy_from_slice(&((SPEC + plen) as u32).to_ne_bytes());
            spec[24..24 + l.target_type.len()].copy_from_slice(l.target_type.as_bytes());
            out.extend_from_slice(&spec);
            out.extend_from_slice(l.params.as_bytes());
            let n = out.len() + plen - l.params.len();
            out.resize(n, 0);
        }
        out
    }

    /// Targets in the DM_TABLE_STATUS reply layout: `next` is relative to the first spec.
    pub(crate) fn parse_targets(buf: &[u8], data_start: u32, count: u32) -> Result<Vec<TableLine>, String> {
        let base = data_start as usize;
        let mut off = 0usize;
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count {
            let s = base + off;
            let spec = buf.get(s..s + SPEC).ok_or_else(|| format!("target {i} lies outside the reply"))?;
            let tt = &spec[24..40];
            let tt = &tt[..tt.iter().position(|&c| c == 0).unwrap_or(16)];
            let rest = &buf[s + SPEC..];
            let end =
                rest.iter().position(|&c| c == 0).ok_or_else(|| format!("target {i}: unterminated parameters"))?;
            let params =
                std::str::from_utf8(&rest[..end]).map_err(|_| format!("target {i}: parameters are not UTF-8"))?;
            out.push(TableLine {
                start: u64_at(spec, 0),
                length: u64_at(spec, 8),
                target_type: String::from_utf8_lossy(tt).into_owned(),
                params: params.trim_end().to_string(),
            });
            off = u32_at(spec, 20) as usize;
        }
        Ok(out)
    }

    /// One ioctl on the control node, buffers wiped on drop, retried with a larger buffer
    /// while the kernel says DM_BUFFER_FULL. Returns the reply header and the whole buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn ioctl(
        dm: &DM,
        cmd: u8,
        name: &str,
        flags: u32,
        event_nr: u32,
        target_count: u32,
        payload: &[u8],
        op: &'static str,
    ) -> Result<(Hdr, Zeroizing<Vec<u8>>), DmError> {
        lookup_name(name)?;
        let req = nix::request_code_readwrite!(DM_IOCTL, cmd, HDR);
        let mut size = (HDR + payload.len()).max(MIN_BUF).next_multiple_of(8);
        loop {
            let mut buf = Zeroizing::new(vec![0u8; size]);
            buf[..HDR].copy_from_slice(&header(name, flags, event_nr, target_count, size));
            buf[HDR..HDR + payload.len()].copy_from_slice(payload);
            // SAFETY: `buf` is a valid, writable buffer of `size` bytes and the header's
            // data_size says exactly that; the kernel reads and writes within it.
            let r = unsafe { libc::ioctl(dm.file().as_raw_fd(), req as _, buf.as_mut_ptr()) };
            if r < 0 {
                return Err(from_errno(op, name, nix::errno::Errno::last()));
            }
            let h = parse_header(&buf);
            // A wait already happened: its reply's status is not needed, so never repeat it.
            if h.flags & BUFFER_FULL == 0 || cmd == DEV_WAIT {
                return Ok((h, buf));
            }
            if !payload.is_empty() || size >= MAX_BUF {
                return Err(DmError::Other {
                    op,
                    name: name.to_string(),
                    msg: "the kernel's reply does not fit the buffer".into(),
                });
            }
            size *= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(start: u64, length: u64, t: &str, p: &str) -> TableLine {
        TableLine { start, length, target_type: t.into(), params: p.into() }
    }

    // Status lines in the exact shapes the kernel's dm-raid1.c (mirror_status,
    // STATUSTYPE_INFO) and dm-log.c (core_status "1 core", disk_status
    // "3 disk <dev> <A|D|F>") emit: "%d " legs, "%s " per leg, "%llu/%llu 1 %s " then the log.
    #[test]
    fn mirror_status_in_sync_core_log() {
        let m = MirrorStatus::parse("2 254:1 254:2 64/64 1 AA 1 core").unwrap();
        assert_eq!(m.legs, vec!["254:1", "254:2"]);
        assert_eq!((m.in_sync, m.total), (64, 64));
        assert_eq!(m.health, vec!['A', 'A']);
        assert_eq!(m.log, vec!["core"]);
        assert!(m.health.iter().all(|&c| c == 'A'));
    }

    #[test]
    fn mirror_status_recovering_is_not_done() {
        // The kernel emits a trailing space before the log status in some versions.
        let m = MirrorStatus::parse("2 8:5 253:7 30/64 1 AA 1 core ").unwrap();
        assert_eq!((m.in_sync, m.total), (30, 64));
    }

    #[test]
    fn mirror_status_failed_legs_each_letter() {
        for c in ['D', 'R', 'S', 'F', 'U'] {
            let m = MirrorStatus::parse(&format!("2 8:5 253:7 64/64 1 A{c} 1 core")).unwrap();
            assert_eq!(m.health, vec!['A', c]);
        }
        // Synced but a leg failed: never "done" (a failed write to a leg without
        // handle_errors completes as success and shows only here).
        let m = MirrorStatus::parse("2 8:5 253:7 8/8 1 DA 1 core").unwrap();
        assert_eq!(m.health, vec!['D', 'A']);
    }

    #[test]
    fn mirror_status_disk_log_and_three_legs() {
        let m = MirrorStatus::parse("3 253:2 253:3 253:4 400/400 1 AAA 3 disk 253:1 A").unwrap();
        assert_eq!(m.legs.len(), 3);
        assert_eq!(m.log, vec!["disk", "253:1", "A"]);
        // A failed disk log reports its own letter last.
        let m = MirrorStatus::parse("2 253:2 253:3 400/400 1 AA 3 disk 253:1 D").unwrap();
        assert_eq!(m.log.last().map(String::as_str), Some("D"));
    }

    #[test]
    fn mirror_status_rejects_malformed() {
        for bad in [
            "",
            "garbage",
            "2 8:5 253:7",
            "2 8:5 253:7 8/8",
            "2 8:5 253:7 8/8 1",
            "2 8:5 253:7 8/8 1 A 1 core",
            "2 8:5 253:7 9/8 1 AA 1 core",
            "2 8:5 253:7 x/8 1 AA 1 core",
            "2 8:5 253:7 8-8 1 AA 1 core",
            "2 8:5 253:7 8/8 2 AA 1 core",
            "2 8:5 253:7 8/8 1 AX 1 core",
            "2 8:5 253:7 8/8 1 AA 3 disk 253:1",
            "0 8/8 1  1 core",
        ] {
            assert!(MirrorStatus::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn crypt_and_integrity_keys_are_scrubbed() {
        let key = "a".repeat(128);
        let line = format!("aes-xts-plain64 {key} 0 8:5 32768 1 allow_discards");
        let s = scrub_key("crypt", &line);
        assert_eq!(s, "aes-xts-plain64 - 0 8:5 32768 1 allow_discards");
        assert!(!s.contains("aaaa"));
        // Keyring references are not secret: kept.
        let kr = "aes-xts-plain64 :64:logon:cryptsetup:3f2a-d0 0 8:5 32768";
        assert_eq!(scrub_key("crypt", kr), kr);
        assert_eq!(scrub_key("linear", "8:5 2048"), "8:5 2048");
        let integ = "8:5 0 28 J 3 internal_hash:hmac(sha256):00112233 journal_crypt:ctr(aes):4455 block_size:4096";
        let s = scrub_key("integrity", integ);
        assert_eq!(s, "8:5 0 28 J 3 internal_hash:hmac(sha256):- journal_crypt:ctr(aes):- block_size:4096");
        assert!(!s.contains("0011") && !s.contains("4455"));
    }

    #[test]
    fn names_are_checked_like_the_kernel() {
        assert!(check_name("sda5_crypt").is_ok());
        assert!(check_name("vg0-root").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("..").is_err());
        assert!(check_name(&"x".repeat(127)).is_ok());
        assert!(check_name(&"x".repeat(128)).is_err());
        assert!(check_uuid("CRYPT-SUBDEV-luksify-0b6c").is_ok());
        assert!(check_uuid(&"u".repeat(129)).is_err());
    }

    #[test]
    fn ioctl_layout_matches_linux_dm_ioctl_h() {
        // struct dm_ioctl is 312 bytes; the version is 4.x; the name starts at byte 48.
        let h = raw::header("sda5_crypt", 0x8000, 7, 2, 16384);
        assert_eq!(h.len(), 312);
        assert_eq!(&h[0..4], &4u32.to_ne_bytes());
        assert_eq!(&h[12..16], &16384u32.to_ne_bytes());
        assert_eq!(&h[16..20], &312u32.to_ne_bytes());
        assert_eq!(&h[20..24], &2u32.to_ne_bytes());
        assert_eq!(&h[28..32], &0x8000u32.to_ne_bytes());
        assert_eq!(&h[32..36], &7u32.to_ne_bytes());
        assert_eq!(&h[48..58], b"sda5_crypt");
        assert_eq!(h[58], 0);
        let p = raw::parse_header(&h);
        assert_eq!((p.data_start, p.target_count, p.event_nr, p.flags), (312, 2, 7, 0x8000));
        // _IOWR(0xfd, 8, struct dm_ioctl) = 0xc138fd08 (DM_DEV_WAIT as libdevmapper uses it).
        assert_eq!(nix::request_code_readwrite!(raw::DM_IOCTL, raw::DEV_WAIT, raw::HDR) as u32, 0xc138_fd08);
        assert_eq!(nix::request_code_readwrite!(raw::DM_IOCTL, raw::TABLE_LOAD, raw::HDR) as u32, 0xc138_fd09);
        assert_eq!(nix::request_code_readwrite!(raw::DM_IOCTL, raw::DEV_SUSPEND, raw::HDR) as u32, 0xc138_fd06);
        // libdevmapper.h: DISABLE_DISK_RULES 0x04, DISABLE_OTHER_RULES 0x08, in the cookie's
        // upper 16 bits.
        assert_eq!(hidden_udev_flags().bits(), 0x04 | 0x08);
        assert_eq!(nix::request_code_readwrite!(raw::DM_IOCTL, raw::TABLE_STATUS, raw::HDR) as u32, 0xc138_fd0c);
        assert_eq!(DmFlags::DM_SECURE_DATA.bits(), 1 << 15);
        assert_eq!(DmFlags::DM_STATUS_TABLE.bits(), 1 << 4);
    }

    #[test]
    fn target_specs_encode_for_load_and_parse_from_status() {
        let lines = vec![tl(0, 1000, "linear", "8:5 0"), tl(1000, 24, "crypt", "aes-xts-plain64 - 1000 8:5 33768")];
        let enc = raw::encode_targets(&lines);
        // Load layout: next is relative to the current spec, params padded to 8 bytes.
        let next0 = u32::from_ne_bytes(enc[20..24].try_into().unwrap()) as usize;
        assert_eq!(next0, 40 + 8);
        assert_eq!(&enc[24..30], b"linear");
        assert_eq!(&enc[40..45], b"8:5 0");
        assert_eq!(enc.len() % 8, 0);
        // Turn it into the status-reply layout (next relative to the first spec) and parse.
        let mut reply = vec![0u8; 312];
        let mut body = enc.to_vec();
        let next1 = u32::from_ne_bytes(body[next0 + 20..next0 + 24].try_into().unwrap()) as usize;
        body[next0 + 20..next0 + 24].copy_from_slice(&((next0 + next1) as u32).to_ne_bytes());
        reply.extend_from_slice(&body);
        let back = raw::parse_targets(&reply, 312, 2).unwrap();
        assert_eq!(back, lines);
        assert!(raw::parse_targets(&reply, 312, 3).is_err());
    }

    #[test]
    fn errnos_map_to_distinct_errors() {
        assert!(matches!(from_errno("x", "d", Errno::ENXIO), DmError::NotFound(_)));
        assert!(matches!(from_errno("x", "d", Errno::EBUSY), DmError::Busy { .. }));
        assert!(matches!(from_errno("x", "d", Errno::EINTR), DmError::Interrupted { .. }));
        let e = from_errno("loading a table into", "sda5_crypt", Errno::EINVAL);
        assert_eq!(e.errno(), Some(Errno::EINVAL));
        assert!(e.to_string().contains("loading a table into sda5_crypt"));
    }

    #[test]
    fn no_device_mapper_is_unavailable_not_a_panic() {
        match Dm::open() {
            Ok(dm) => {
                // A host with dm (the UML test bed): the version is 4.x.
                assert!(Dm::available());
                assert_eq!(dm.version().unwrap().0, 4);
            }
            Err(DmError::Unavailable(m)) => {
                assert!(!m.is_empty());
                assert!(!Dm::available());
                let e = DmError::Unavailable(m);
                assert!(e.to_string().contains("/dev/mapper/control"), "{e}");
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}
