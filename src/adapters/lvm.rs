//! LVM through its own reporting commands (`lvm fullreport`, or `lvm pvs` / `lvm lvs`, with
//! `--reportformat json --units s --nosuffix`): no crate reads LVM metadata properly, and the
//! commands apply the system's LVM configuration (filters, devices file) exactly as LVM
//! itself will.
//!
//! Reading ([`Lvm::facts`]) never changes LVM state. The only commands here that do are
//! [`Lvm::pvresize`] and [`Lvm::pvscan_cache`], kept separate and named for what they do;
//! the engine calls them at the points the design names (after the finish, to let LVM see
//! the PV's new size on the crypt mapping; to refresh LVM's view of which PVs are online).
//!
//! Every command runs as `lvm <command> …` (rescue systems and initramfs images often carry
//! only the `lvm` binary), with `LVM_SUPPRESS_FD_WARNINGS=1`, `LC_ALL=C`, stdin from
//! /dev/null (a prompt answers itself "no"). LVM's JSON puts every number in a string
//! (`"pe_start":"2048"`); both strings and numbers are accepted.

pub use super::sys::HELPER_NICE;
use crate::core::facts::{LvFacts, LvmFacts, PvSegment};
use serde_json::Value;
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};

/// Fields asked of `pvs` for the PV itself.
pub const PV_FIELDS: &str =
    "pv_name,pv_uuid,vg_name,vg_uuid,pe_start,pv_size,dev_size,pv_pe_count,pv_pe_alloc_count,pv_mda_count,vg_extent_size";
/// Fields asked of `pvs --segments` for the PV's extent map, after [`PV_FIELDS`] (one call
/// reports both: every segment row repeats its PV's fields).
pub const PVSEG_FIELDS: &str = "pvseg_start,pvseg_size,lv_name";
/// Fields asked of `lvs -a` (one row per LV segment).
pub const LV_FIELDS: &str = "vg_name,lv_name,lv_uuid,lv_attr,lv_active,segtype,lv_dm_path,devices,seg_pe_ranges";

#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    #[error("cannot run {program}: {source} (is lvm2 installed?)")]
    Spawn { program: String, source: std::io::Error },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed { cmd: String, status: String, stderr: String },
    #[error("cannot understand the output of `{cmd}`: {why}")]
    Parse { cmd: String, why: String },
    #[error("LVM reports no physical volume on {0} (is it excluded by the LVM filter or devices file?)")]
    NoPv(String),
    #[error("{0}")]
    Refused(String),
}

pub type Result<T> = std::result::Result<T, LvmError>;

/// How to run LVM: the program (default `lvm`, or `$LUKSIFY_LVM`) and extra environment
/// (tests point `LVM_SYSTEM_DIR` at a private configuration).
#[derive(Debug, Clone)]
pub struct Lvm {
    program: OsString,
    env: Vec<(OsString, OsString)>,
}

impl Default for Lvm {
    fn default() -> Self {
        Lvm::system()
    }
}

/// Keep the end of LVM's stderr for messages: the reason is usually on the last lines.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let keep = &lines[lines.len().saturating_sub(6)..];
    keep.join("; ")
}

impl Lvm {
    pub fn system() -> Lvm {
        let program = std::env::var_os("LUKSIFY_LVM").unwrap_or_else(|| "lvm".into());
        Lvm { program, env: Vec::new() }
    }

    pub fn with_program(program: impl Into<OsString>) -> Lvm {
        Lvm { program: program.into(), env: Vec::new() }
    }

    /// Add an environment variable for every LVM command.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Lvm {
        self.env.push((key.into(), value.into()));
        self
    }

    /// This LVM started as a shell for a command sent later ([`super::lvmshell`]).
    pub(crate) fn start_shell(&self) -> Option<super::lvmshell::LvmShell> {
        super::lvmshell::LvmShell::start(&self.program, &self.env)
    }

    fn command_line(&self, args: &[&str]) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// Run `lvm <args>`; stdout on success, an error carrying stderr otherwise.
    fn run(&self, args: &[&str]) -> Result<String> {
        self.run_logged(args).map(|(out, _)| out)
    }

    /// [`Lvm::run`], with LVM's stderr (its log) too on success.
    fn run_logged(&self, args: &[&str]) -> Result<(String, String)> {
        let mut c = Command::new(&self.program);
        crate::adapters::sys::in_background(&mut c)
            .args(args)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c
            .output()
            .map_err(|e| LvmError::Spawn { program: self.program.to_string_lossy().into_owned(), source: e })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(LvmError::Failed {
                cmd: self.command_line(args),
                status: out.status.to_string(),
                stderr: tail(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok((stdout, String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    fn report(&self, args: &[&str], key: &str) -> Result<Vec<Row>> {
        let out = self.run(args)?;
        rows(&out, key).map_err(|why| LvmError::Parse { cmd: self.command_line(args), why })
    }

    /// Everything the planner needs to know from LVM about the PV on `device`. Read-only.
    pub fn facts(&self, device: &Path) -> Result<LvmFacts> {
        let numbers = crate::adapters::blockdev::devref_of(device).ok().map(|d| (d.major, d.minor));
        self.facts_of(device, numbers)
    }

    /// [`Lvm::facts`] for `device` whose device number is `numbers` (major, minor), if known.
    ///
    /// One LVM command when it can: `lvm fullreport -a` gives every PV with its segments
    /// and every LV segment of every VG (one process and one device scan: each costs
    /// ~0.1 s in the test bed, and `pvs` and `lvs` side by side took 0.19 s there against
    /// the full report's 0.10-0.12); the PV is the one whose `pv_major`/`pv_minor` are
    /// `numbers`. When that report fails (an LVM without those fields, another VG broken)
    /// or does not list the device, or the number is unknown, the PV is asked for by name
    /// ([`Lvm::facts_by_name`]), so LVM's own reason reaches the user.
    pub fn facts_of(&self, device: &Path, numbers: Option<(u32, u32)>) -> Result<LvmFacts> {
        let dev = device.to_str().ok_or_else(|| LvmError::NoPv(device.display().to_string()))?;
        let Some((major, minor)) = numbers else { return self.facts_by_name(device) };
        let args = full_report_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let report = self.run_logged(&args).and_then(|(out, log)| {
            let parse = |key| rows(&out, key).map_err(|why| LvmError::Parse { cmd: self.command_line(&args), why });
            Ok((parse("pvseg")?, parse("seg")?, log))
        });
        let Ok((pvsegs, lvsegs, log)) = report else { return self.facts_by_name(device) };
        let is_dev = |r: &Row| r.num("pv_major") == Ok(u64::from(major)) && r.num("pv_minor") == Ok(u64::from(minor));
        let segs: Vec<Row> = pvsegs.into_iter().filter(is_dev).collect();
        // (not listed, or listed twice: LVM says what it makes of the device by its name)
        let pv = match distinct_pvs(&segs) {
            Ok(pv) if pv.len() == 1 => pv,
            _ => return self.facts_by_name(device),
        };
        let vg = pv[0].str("vg_name").map_err(|why| LvmError::Parse { cmd: "lvm fullreport".into(), why })?;
        let lvs: Vec<Row> = match vg.is_empty() {
            true => Vec::new(),
            false => lvsegs.into_iter().filter(|r| r.str("vg_name").as_deref() == Ok(vg.as_str())).collect(),
        };
        let mut facts = assemble(dev, &pv, &segs, &lvs)?;
        facts.vg_lock_file = vg_lock_file_in_log(&log, &vg);
        Ok(facts)
    }

    /// [`Lvm::facts`] by the device's name: `pvs --segments DEVICE` beside `lvs -a`.
    pub fn facts_by_name(&self, device: &Path) -> Result<LvmFacts> {
        let dev = device.to_str().ok_or_else(|| LvmError::NoPv(device.display().to_string()))?;
        let common = ["--reportformat", "json", "--units", "s", "--nosuffix"];
        // One LVM command for the PV and its segments (each LVM command costs a process
        // and a device scan: most of the start-up time in the test bed).
        let fields = format!("{PV_FIELDS},{PVSEG_FIELDS}");
        let mut a = vec!["pvs", "--segments"];
        a.extend(common);
        a.extend(["-o", fields.as_str(), dev]);
        // The LVs of every VG, asked for at the same time (the PV's VG is not known yet; the
        // two processes and scans overlap: ~0.1 s less in the test bed); the PV's VG is
        // picked from them below. Should that report fail (another VG is broken), the PV's
        // VG is asked for alone, as before.
        let mut every = vec!["lvs", "-a"];
        every.extend(common);
        every.extend(["-o", LV_FIELDS]);
        let (segs, every_lv) = std::thread::scope(|sc| {
            let h = sc.spawn(|| self.report(&every, "lv"));
            let segs = self.report(&a, "pvseg");
            let lvs = h.join().unwrap_or_else(|_| {
                Err(LvmError::Parse { cmd: self.command_line(&every), why: "the report's thread panicked".into() })
            });
            (segs, lvs)
        });
        let segs = segs?;
        let pv = distinct_pvs(&segs).map_err(|why| LvmError::Parse { cmd: self.command_line(&a), why })?;
        let vg = pv
            .first()
            .map(|r| r.str("vg_name"))
            .transpose()
            .map_err(|why| LvmError::Parse { cmd: "pvs".into(), why })?;
        let lvs = match (vg, every_lv) {
            (Some(vg), Ok(rows)) if !vg.is_empty() => {
                rows.into_iter().filter(|r| r.str("vg_name").as_deref() == Ok(vg.as_str())).collect()
            }
            (Some(vg), Err(_)) if !vg.is_empty() => {
                let mut a = vec!["lvs", "-a"];
                a.extend(common);
                a.extend(["-o", LV_FIELDS, vg.as_str()]);
                self.report(&a, "lv")?
            }
            _ => Vec::new(),
        };
        assemble(dev, &pv, &segs, &lvs)
    }

    /// **Changes LVM state.** `lvm pvresize DEVICE`: make the PV fill its device (None), or
    /// `--setphysicalvolumesize <n>s` (Some(n)); with a size LVM asks for confirmation, and
    /// since this call is the explicit decision, `--yes` is passed.
    pub fn pvresize(&self, device: &Path, size_sectors: Option<u64>) -> Result<()> {
        let dev = device.to_string_lossy().into_owned();
        let size = size_sectors.map(|s| format!("{s}s"));
        let mut a = vec!["pvresize"];
        if let Some(s) = &size {
            a.extend(["--yes", "--setphysicalvolumesize", s.as_str()]);
        }
        a.push(&dev);
        self.run(&a).map(|_| ())
    }

    /// **Changes LVM metadata and moves data**: carry out the commands of a
    /// [`crate::core::plan::MakeRoom`] (`pvmove` of the last extents into free ones, then
    /// `pvresize --setphysicalvolumesize`), in order, stopping at the first failure. Only
    /// those two LVM commands are accepted.
    pub fn make_room(&self, commands: &[Vec<String>]) -> Result<()> {
        for c in commands {
            let a: Vec<&str> = c.iter().map(|s| s.as_str()).collect();
            if !matches!(a.first(), Some(&"pvmove") | Some(&"pvresize")) {
                return Err(LvmError::Refused(format!("not a command that makes room: {}", c.join(" "))));
            }
            self.run(&a)?;
        }
        Ok(())
    }

    /// **Changes LVM's run-time state** (not metadata): `lvm pvscan --cache [DEVICE]`, which
    /// re-reads the device(s) and updates LVM's record of online PVs.
    pub fn pvscan_cache(&self, device: Option<&Path>) -> Result<()> {
        let dev = device.map(|d| d.to_string_lossy().into_owned());
        let mut a = vec!["pvscan", "--cache"];
        if let Some(d) = &dev {
            a.push(d);
        }
        self.run(&a).map(|_| ())
    }
}

/// The PVs of PV segment rows (each row repeats its PV's fields): the first row of each
/// `pv_name`, in order.
fn distinct_pvs(segs: &[Row]) -> std::result::Result<Vec<Row>, String> {
    let mut pv: Vec<Row> = Vec::new();
    for r in segs {
        let name = r.str("pv_name")?;
        if !pv.iter().any(|p| p.str("pv_name").as_deref() == Ok(name.as_str())) {
            pv.push(r.clone());
        }
    }
    Ok(pv)
}

/// The arguments of the full report [`Lvm::facts_of`] asks for: PV segments with the PV's
/// fields and device number ([`PV_FIELDS`], [`PVSEG_FIELDS`]), LV segments with
/// [`LV_FIELDS`] (`-a`: hidden LVs too, as `lvs -a`), the other sub-reports reduced to a name.
pub fn full_report_args() -> Vec<String> {
    let mut a: Vec<String> =
        ["fullreport", "-a", "--reportformat", "json", "--units", "s", "--nosuffix", "-vv"].map(String::from).into();
    for (sub, fields) in [
        ("pvseg", format!("{PV_FIELDS},pv_major,pv_minor,{PVSEG_FIELDS}")),
        ("seg", LV_FIELDS.to_string()),
        ("vg", "vg_name".to_string()),
        ("pv", "pv_name".to_string()),
        ("lv", "lv_name".to_string()),
    ] {
        a.extend(["--configreport".to_string(), sub.to_string(), "-o".to_string(), fields]);
    }
    a
}

/// The file LVM locked for VG `vg`, from the log of a command run with `-vv`: LVM's file
/// locking says `Locking <locking_dir>/V_<vg> RB` (lib/misc/lvm-flock.c, the same words since
/// lvm2 2.02) as it takes the VG's lock. This is the path every LVM command on this system
/// locks for the VG, `global/locking_dir` applied, so luksify needs no `lvm config` process
/// to learn it. None when the log does not say (another locking type, another wording).
pub fn vg_lock_file_in_log(log: &str, vg: &str) -> Option<String> {
    let file = crate::adapters::lvmlock::vg_lock_path(Path::new("/"), vg)?;
    let file = file.file_name()?.to_str()?;
    log.lines().find_map(|l| {
        let path = l.trim_start().strip_prefix("Locking ")?.split(' ').next()?;
        let (dir, name) = path.rsplit_once('/')?;
        (name == file && dir.starts_with('/')).then(|| path.to_string())
    })
}

/// [`Lvm::facts`] with the system's `lvm`.
pub fn facts(device: &Path) -> Result<LvmFacts> {
    Lvm::system().facts(device)
}

/// [`Lvm::pvresize`] with the system's `lvm`. Changes LVM metadata.
pub fn pvresize(device: &Path, size_sectors: Option<u64>) -> Result<()> {
    Lvm::system().pvresize(device, size_sectors)
}

/// [`Lvm::make_room`] with the system's `lvm`.
pub fn make_room(commands: &[Vec<String>]) -> Result<()> {
    Lvm::system().make_room(commands)
}

/// [`Lvm::pvscan_cache`] with the system's `lvm`.
pub fn pvscan_cache(device: Option<&Path>) -> Result<()> {
    Lvm::system().pvscan_cache(device)
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// One report row.
#[derive(Debug, Clone)]
pub struct Row(serde_json::Map<String, Value>);

impl Row {
    pub fn str(&self, f: &str) -> std::result::Result<String, String> {
        match self.0.get(f) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Null) | None => Err(format!("field {f} is missing")),
            Some(v) => Err(format!("field {f} is not a string: {v}")),
        }
    }

    pub fn num(&self, f: &str) -> std::result::Result<u64, String> {
        match self.0.get(f) {
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| format!("field {f} is not a whole number: {n}")),
            Some(Value::String(s)) => parse_number(s).ok_or_else(|| format!("field {f} is not a whole number: {s:?}")),
            Some(Value::Null) | None => Err(format!("field {f} is missing")),
            Some(v) => Err(format!("field {f} is not a number: {v}")),
        }
    }
}

/// A number as LVM prints it in a string: "2048", " 2048", "2048s" / "2048S" (if the suffix
/// was not suppressed), "2048.00" (whole numbers only).
pub fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_suffix(['s', 'S']).unwrap_or(s);
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !frac.bytes().all(|b| b == b'0') {
        return None;
    }
    int.parse().ok()
}

/// The rows under `key` (e.g. "pv", "pvseg", "lv") in every section of a JSON report.
pub fn rows(json: &str, key: &str) -> std::result::Result<Vec<Row>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let report = v.get("report").and_then(Value::as_array).ok_or("no \"report\" array")?;
    let mut out = Vec::new();
    for sec in report {
        let Some(arr) = sec.get(key) else { continue };
        let arr = arr.as_array().ok_or_else(|| format!("\"{key}\" is not an array"))?;
        for r in arr {
            let m = r.as_object().ok_or_else(|| format!("a \"{key}\" row is not an object"))?;
            out.push(Row(m.clone()));
        }
    }
    Ok(out)
}

/// LVM's name for hidden LVs is bracketed ("[pool_tdata]"); facts use the bare name.
pub fn bare_lv_name(n: &str) -> &str {
    n.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(n)
}

/// The dm name LVM gives an LV: VG and LV names with '-' doubled, joined by '-'.
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// The `devices` field: "/dev/sda5(0),/dev/sdb1(10)" or "pool_tdata(0)" → (name, start).
pub fn parse_devices(s: &str) -> Vec<(String, u64)> {
    s.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| match d.rsplit_once('(') {
            Some((name, rest)) => (name.to_string(), rest.trim_end_matches(')').parse().unwrap_or(0)),
            None => (d.to_string(), 0),
        })
        .collect()
}

/// Whether a `devices` entry names a PV (a device path, or "[unknown]" for a missing PV)
/// rather than a sub-LV.
fn is_pv_entry(name: &str) -> bool {
    name.starts_with('/') || name == "[unknown]"
}

/// lv_attr's 5th character (state): anything but '-' (inactive), 'h' (historical) and 'X'
/// (unknown: no device-mapper) means a dm device exists for the LV.
fn attr_active(attr: &str) -> bool {
    attr.chars().nth(4).map(|c| "asISmMdicC".contains(c)).unwrap_or(false)
}

/// Build the facts from the three reports. `device` is what the PV was asked by; the PV's
/// name as LVM reports it is what the LVs' `devices` fields use.
pub fn assemble(device: &str, pv: &[Row], segs: &[Row], lvs: &[Row]) -> Result<LvmFacts> {
    let perr = |why: String| LvmError::Parse { cmd: "pvs".into(), why };
    let p = match pv {
        [] => return Err(LvmError::NoPv(device.to_string())),
        [p] => p,
        _ => return Err(perr(format!("{} PVs reported for {device}, expected one", pv.len()))),
    };
    let pv_name = p.str("pv_name").map_err(perr)?;
    let vg_name = p.str("vg_name").map_err(perr)?;
    let mut segments = Vec::new();
    for s in segs {
        let serr = |why: String| LvmError::Parse { cmd: "pvs --segments".into(), why };
        if s.0.contains_key("pv_name") && s.str("pv_name").map_err(serr)? != pv_name {
            continue;
        }
        let extents = s.num("pvseg_size").map_err(serr)?;
        if extents == 0 {
            continue; // an orphan PV reports one empty segment
        }
        let lv = s.str("lv_name").map_err(serr)?;
        segments.push(PvSegment {
            start_extent: s.num("pvseg_start").map_err(serr)?,
            extents,
            lv: if lv.is_empty() { None } else { Some(bare_lv_name(&lv).to_string()) },
        });
    }
    segments.sort_by_key(|s| s.start_extent);

    // LVs, one row per segment: keep those with a segment on this PV.
    struct Acc {
        key: String,
        f: LvFacts,
        on_this_pv: bool,
    }
    let mut acc: Vec<Acc> = Vec::new();
    for r in lvs {
        let lerr = |why: String| LvmError::Parse { cmd: "lvs".into(), why };
        let name = bare_lv_name(&r.str("lv_name").map_err(lerr)?).to_string();
        let vg = r.str("vg_name").unwrap_or_else(|_| vg_name.clone());
        let key = match r.str("lv_uuid") {
            Ok(u) if !u.is_empty() => u,
            _ => format!("{vg}/{name}"),
        };
        let attr = r.str("lv_attr").map_err(lerr)?;
        let segtype = r.str("segtype").map_err(lerr)?;
        let devices = parse_devices(&r.str("devices").unwrap_or_default());
        let active_field = r.str("lv_active").unwrap_or_default();
        let path = r.str("lv_dm_path").unwrap_or_default();
        let dm = match path.rsplit_once('/') {
            Some((_, n)) if !n.is_empty() => n.to_string(),
            _ => dm_name(&vg, &name),
        };
        let idx = match acc.iter().position(|a| a.key == key) {
            Some(i) => i,
            None => {
                acc.push(Acc {
                    key: key.clone(),
                    f: LvFacts {
                        name: name.clone(),
                        attr: attr.clone(),
                        segtypes: Vec::new(),
                        dm_name: dm,
                        active: attr_active(&attr) || active_field == "active",
                        spans_other_pvs: false,
                    },
                    on_this_pv: false,
                });
                acc.len() - 1
            }
        };
        let a = &mut acc[idx];
        if !a.f.segtypes.contains(&segtype) {
            a.f.segtypes.push(segtype);
        }
        for (d, _) in &devices {
            if *d == pv_name {
                a.on_this_pv = true;
            } else if is_pv_entry(d) {
                a.f.spans_other_pvs = true;
            }
        }
    }
    let mut lvs: Vec<LvFacts> = acc.into_iter().filter(|a| a.on_this_pv).map(|a| a.f).collect();
    lvs.sort_by(|a, b| a.name.cmp(&b.name));

    Ok(LvmFacts {
        pv_uuid: p.str("pv_uuid").map_err(perr)?,
        vg_name,
        vg_uuid: p.str("vg_uuid").map_err(perr)?,
        pe_start: p.num("pe_start").map_err(perr)?,
        extent_size: p.num("vg_extent_size").map_err(perr)?,
        pe_count: p.num("pv_pe_count").map_err(perr)?,
        pe_alloc_count: p.num("pv_pe_alloc_count").map_err(perr)?,
        pv_size: p.num("pv_size").map_err(perr)?,
        dev_size: p.num("dev_size").map_err(perr)?,
        mda_count: p.num("pv_mda_count").map_err(perr)? as u32,
        segments,
        lvs,
        vg_lock_file: None,
    })
}

/// The VG of the PV that `dev` shows, read from its LVM label and metadata area (no LVM
/// command: a resume may need it while LVM cannot run, or before taking LVM's lock).
pub fn vg_on_label(dev: &Path) -> Option<String> {
    use crate::core::marker;
    use crate::engine::Disk;
    let mut d = crate::adapters::rawdisk::RawDisk::open(dev, false).ok()?;
    let mut lab = vec![0u8; 4096];
    d.read(0, &mut lab).ok()?;
    let (mda, _) = marker::first_mda(&lab)?;
    let mut h = vec![0u8; 512];
    d.read(mda / 512, &mut h).ok()?;
    let (off, len) = marker::mda_text_pieces(&h)?[0];
    let at = mda + off;
    let n = len.min(4096) as usize;
    let skip = (at % 512) as usize;
    let mut buf = vec![0u8; (skip + n).div_ceil(512) * 512];
    d.read(at / 512, &mut buf).ok()?;
    marker::vg_name_of_text(&buf[skip..skip + n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_strings() {
        assert_eq!(parse_number("2048"), Some(2048));
        assert_eq!(parse_number(" 2048 "), Some(2048));
        assert_eq!(parse_number("2048S"), Some(2048));
        assert_eq!(parse_number("2048s"), Some(2048));
        assert_eq!(parse_number("2048.00"), Some(2048));
        assert_eq!(parse_number("2048.50"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("1.00g"), None);
    }

    #[test]
    fn names() {
        assert_eq!(dm_name("vg0", "root"), "vg0-root");
        assert_eq!(dm_name("my-vg", "lv-one"), "my--vg-lv--one");
        assert_eq!(bare_lv_name("[pool_tdata]"), "pool_tdata");
        assert_eq!(bare_lv_name("root"), "root");
        assert_eq!(
            parse_devices("/dev/loop0(30),/dev/loop1(0)"),
            vec![("/dev/loop0".to_string(), 30), ("/dev/loop1".to_string(), 0)]
        );
        assert_eq!(parse_devices("pool_tdata(0)"), vec![("pool_tdata".to_string(), 0)]);
        assert!(parse_devices("").is_empty());
    }

    #[test]
    fn empty_report_is_no_pv() {
        // What `pvs --reportformat json` prints (LVM 2.03.16) when it finds nothing.
        let empty = "  {\n      \"report\": [\n          {\n              \"pv\": [\n              ]\n          }\n      ]\n  }\n";
        let r = rows(empty, "pv").unwrap();
        assert!(r.is_empty());
        assert!(matches!(assemble("/dev/sda5", &r, &[], &[]), Err(LvmError::NoPv(_))));
        assert!(rows("not json", "pv").is_err());
        assert!(rows("{\"report\": 3}", "pv").is_err());
    }

    #[test]
    fn json_numbers_are_accepted_too() {
        let r = rows(r#"{"report":[{"pv":[{"pe_start":2048,"pv_name":"/dev/x"}]}]}"#, "pv").unwrap();
        assert_eq!(r[0].num("pe_start"), Ok(2048));
        assert!(r[0].num("nothing").is_err());
    }
}
