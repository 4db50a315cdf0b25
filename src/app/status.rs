//! `luksify status [--json] DEVICE`: what the device shows of a conversion. Needs no
//! passphrase and writes nothing. A damaged journal is an error that says what is known.
//!
//! A LUKS2 conversion keeps, from its cut-over on, cryptsetup's standard format: a LUKS2
//! header at sector 0 with the `online-reencrypt-v2` requirement (read first, by
//! [`luks2meta`]); a LUKS1 conversion (and a LUKS2 one before its cut-over) keeps luksify's
//! journal in the tail. A LUKS2 header without the requirement (finished) says nothing of a
//! conversion: the journal decides, as before.

use super::{device_size, engine_err, open_disk};
use crate::adapters::rawdisk::RawDisk;
use crate::adapters::{progressfile, sys};
use crate::core::cutover::{CutRecord, Finding};
use crate::core::journal::{Record, State};
use crate::core::luks2meta::{self, Meta, MetaError, Reencrypt};
use crate::core::running::{self, human_bytes, Running};
use crate::core::state as fsm;
use crate::core::units::Sectors;
use crate::engine::{self, Disk};
use crate::error::{exit, Error, Result};
use std::path::Path;

/// `format` in `status --json`: where the conversion's state is recorded.
const FORMAT_JOURNAL: &str = "luksify-journal";
const FORMAT_LUKS2: &str = "luks2-reencrypt";
/// A LUKS2 cut-over interrupted before its header was complete: luksify's cut-over record.
const FORMAT_CUT_OVER: &str = "luksify-cut-over-record";

#[derive(serde::Serialize)]
struct StatusJson<'a> {
    device: String,
    in_progress: bool,
    state: Option<&'a str>,
    cursor: Option<u64>,
    move_sectors: Option<u64>,
    progress: Option<f64>,
    name: Option<&'a str>,
    luks_version: Option<u8>,
    luks_uuid: Option<&'a str>,
    seq: Option<u64>,
    /// "luksify-journal", "luks2-reencrypt", or null when nothing is in progress.
    format: Option<&'a str>,
    /// Bytes to encrypt in all, and encrypted so far (as the journal or header says).
    total_bytes: Option<u64>,
    moved_bytes: Option<u64>,
    #[serde(flatten)]
    run: RunningJson,
}

/// The `running`, `pid`, `rate_bytes_per_s`, `eta_s` of `status --json`: whether a luksify
/// runs on the device now (holds its lock), which, how fast, how long.
#[derive(serde::Serialize)]
struct RunningJson {
    running: bool,
    pid: Option<u32>,
    rate_bytes_per_s: Option<f64>,
    eta_s: Option<f64>,
}

impl From<&Running> for RunningJson {
    fn from(r: &Running) -> Self {
        match r {
            Running::No => RunningJson { running: false, pid: None, rate_bytes_per_s: None, eta_s: None },
            Running::Yes { pid, rate_bytes_per_s, eta_s, .. } => {
                RunningJson { running: true, pid: Some(*pid), rate_bytes_per_s: *rate_bytes_per_s, eta_s: *eta_s }
            }
        }
    }
}

/// Whether a luksify runs on `device` now: who holds the device lock, and its progress file.
fn running_on(device: &Path) -> Running {
    running::judge(&sys::device_lock_holders(device), progressfile::read(device).as_ref())
}

/// The progress line: percent and sizes a person reads.
fn progress_line(fraction: f64, moved_bytes: u64, total_bytes: u64) -> String {
    format!("{:.1}% ({} of {} encrypted)", 100.0 * fraction, human_bytes(moved_bytes), human_bytes(total_bytes))
}

pub(super) fn status(device: &Path, json: bool) -> Result<i32> {
    let n = device_size(device)?;
    let mut disk = open_disk(device, false)?;
    let run = running_on(device);
    if let Some(x) = engine::examine_cut_over(&mut disk, n).map_err(|e| engine_err(e, device))? {
        if let Finding::Window(r) = &x.finding {
            print_cut_over_window(device, r, x.moved_matches(), &run, json);
            return Ok(exit::OK);
        }
    }
    if let Some((meta, r)) = read_luks2(&mut disk, n, device)?.and_then(|m| m.reencrypt.clone().map(|r| (m, r))) {
        print_luks2(device, &meta, &r, &run, json);
        return Ok(exit::OK);
    }
    let rec = engine::read_journal(&mut disk, n).map_err(|e| engine_err(e, device))?;
    print_journal(device, rec.as_ref(), &run, json);
    Ok(exit::OK)
}

/// A LUKS2 cut-over interrupted inside its window (neither the PV nor a LUKS2 header): what
/// luksify's cut-over record says, and what `luksify resume` will do.
fn print_cut_over_window(device: &Path, r: &CutRecord, moved_ok: bool, run: &Running, json: bool) {
    if json {
        let s = StatusJson {
            device: device.display().to_string(),
            in_progress: true,
            state: Some(if moved_ok { "cut-over-interrupted" } else { "cut-over-copy-mismatch" }),
            cursor: None,
            move_sectors: Some(r.l),
            progress: Some(0.0),
            name: None,
            luks_version: Some(2),
            luks_uuid: None,
            seq: None,
            format: Some(FORMAT_CUT_OVER),
            total_bytes: Some(Sectors(r.l).bytes()),
            moved_bytes: Some(0),
            run: run.into(),
        };
        println!("{}", serde_json::to_string_pretty(&s).expect("serialises"));
        return;
    }
    let d = device.display();
    println!(
        "{d}: a conversion to LUKS2 was interrupted during its cut-over, before the LUKS2 header was complete: neither a PV nor LUKS2 on disk. Sectors 0..{} are at sector {} (luksify's cut-over record, in the last 4 KiB)",
        r.s,
        r.moved_at()
    );
    if moved_ok {
        println!("  `luksify resume {d}` puts them back: the plain PV again (then run luksify again)");
    } else {
        println!("  their copy does NOT match the record: `luksify resume` will refuse; do not write to {d}, report with `luksify status --json {d}`");
    }
    if let Running::Yes { .. } = run {
        println!("  running:  {}", running::describe(run, &d.to_string()));
    }
}

/// The LUKS2 metadata at the device's start, if any (the first [`luks2meta::MAX_HEAD_BYTES`]
/// or the whole device if smaller: any header size, and a secondary copy behind a wiped
/// primary at any offset). Unreadable metadata is [`Error::DamagedHeader`].
pub(super) fn read_luks2(disk: &mut RawDisk, n_sectors: u64, device: &Path) -> Result<Option<Meta>> {
    let len = n_sectors.saturating_mul(512).min(luks2meta::MAX_HEAD_BYTES as u64) as usize;
    let mut head = vec![0u8; len];
    disk.read(0, &mut head)
        .map_err(|e| Error::Failed(format!("{}: reading the device's first {len} bytes: {e}", device.display())))?;
    luks2meta::parse(&head).map_err(|e| damaged_header(&e, device))
}

fn damaged_header(e: &MetaError, device: &Path) -> Error {
    let d = device.display();
    let what = match e {
        // parse was given all there is (or 8 MiB, enough for any header): the header claims more
        MetaError::NeedMore(k) => {
            format!(
                "a LUKS2 header at its start claims {k} bytes, more than luksify read ({} or the device's end)",
                luks2meta::MAX_HEAD_BYTES
            )
        }
        e => e.to_string(),
    };
    Error::DamagedHeader(format!(
        "{d}: {what}. It may record a conversion in progress, so luksify cannot say there is none; nothing was changed: do not write to {d} (no pvcreate, mkfs, fsck, partitioning or luksFormat); keep the disk as it is and report with `luksify status --json {d}` and `cryptsetup luksDump {d}`"
    ))
}

fn print_luks2(device: &Path, m: &Meta, r: &Reencrypt, run: &Running, json: bool) {
    let state = if r.crashed { "crashed" } else { "reencrypting" };
    let name = m.token.as_ref().map(|t| t.name.as_str());
    if json {
        let s = StatusJson {
            device: device.display().to_string(),
            in_progress: true,
            state: Some(state),
            cursor: None,
            move_sectors: Some(r.total_bytes / 512),
            progress: Some(r.progress()),
            name,
            luks_version: Some(2),
            luks_uuid: Some(&m.uuid),
            seq: Some(m.seqid),
            format: Some(FORMAT_LUKS2),
            total_bytes: Some(r.total_bytes),
            moved_bytes: Some(r.encrypted_bytes),
            run: run.into(),
        };
        println!("{}", serde_json::to_string_pretty(&s).expect("serialises"));
        return;
    }
    let d = device.display();
    println!("{d}: luksify conversion in progress");
    let words = if r.crashed { "step interrupted (cryptsetup open recovers it)" } else { "reencrypting" };
    println!("  state:    {words}");
    println!("  progress: {}", progress_line(r.progress(), r.encrypted_bytes, r.total_bytes));
    println!("  target:   LUKS2 {} as /dev/mapper/{} (UUID {})", r.cipher, name.unwrap_or("<unknown>"), m.uuid);
    println!("  format:   standard LUKS2 reencryption ({})", luks2meta::REENCRYPT_V2);
    // luksify's own run (the device lock) and any reencryption (cryptsetup's lock: luksify's
    // own engine holds it too, a stock `cryptsetup reencrypt` only that one)
    match (run, crate::adapters::luks::reencrypt::lock_held(&m.uuid)) {
        (Running::No, Some(_)) => {}
        (run, _) => println!("  running:  {}", running::describe(run, &d.to_string())),
    }
    if let Some((lock, pid)) = crate::adapters::luks::reencrypt::lock_held(&m.uuid) {
        println!(
            "  reencrypt: a reencryption runs now: process {pid} holds cryptsetup's reencryption lock {}",
            lock.display()
        );
    }
    match m.copies_valid {
        (true, false) => println!("  header:   the secondary copy does not verify (the next header write repairs it)"),
        (false, true) => println!("  header:   the primary copy does not verify (the next header write repairs it)"),
        _ => {}
    }
    // (no hint while a luksify or a reencryption runs: a second one would be refused as busy)
    if *run == Running::No && crate::adapters::luks::reencrypt::lock_held(&m.uuid).is_none() {
        let n = name.unwrap_or("NAME");
        let names = crate::engine::Names::new(n, 2, &m.uuid);
        if crate::adapters::dm::Dm::open().is_ok_and(|dm| dm.info(&names.switch).is_ok_and(|i| i.is_some())) {
            println!(
                "  mapping:  /dev/mapper/{n} still goes through luksify's switch device {} (luksify was killed between steps): every sector is mapped right, but stock cryptsetup's online resume refuses this table; `luksify resume {d}` gives it the standard table (so does a reboot)",
                names.switch
            );
        }
        println!(
            "  continue: luksify resume {d} (or stock: cryptsetup open {d} {n}, then cryptsetup reencrypt --resume-only --active-name {n})"
        );
    }
}

fn print_journal(device: &Path, rec: Option<&Record>, run: &Running, json: bool) {
    let cursor = rec.and_then(|r| match r.state {
        State::Migrating { cursor } => Some(cursor),
        _ => None,
    });
    let total = rec.map(|r| Sectors(r.geometry.l).bytes());
    let moved =
        rec.map(|r| (fsm::progress(&r.geometry, r.state) * Sectors(r.geometry.l).bytes() as f64).round() as u64);
    if json {
        let s = StatusJson {
            device: device.display().to_string(),
            in_progress: rec.is_some(),
            state: rec.map(|r| r.state.name()),
            cursor,
            move_sectors: rec.map(|r| r.geometry.l),
            progress: rec.map(|r| fsm::progress(&r.geometry, r.state)),
            name: rec.map(|r| r.name.as_str()),
            luks_version: rec.map(|r| r.luks_version),
            luks_uuid: rec.map(|r| r.luks_uuid.as_str()),
            seq: rec.map(|r| r.seq),
            format: rec.map(|_| FORMAT_JOURNAL),
            total_bytes: total,
            moved_bytes: moved,
            run: run.into(),
        };
        println!("{}", serde_json::to_string_pretty(&s).expect("serialises"));
    } else {
        match rec {
            None => {
                println!("{}: no luksify conversion in progress", device.display());
                if let Running::Yes { pid, .. } = run {
                    println!("  running:  luksify process {pid} holds the device lock (starting, or finishing)");
                }
            }
            Some(r) => {
                println!("{}: luksify conversion in progress", device.display());
                println!("  state:    {}", r.state.name());
                if let Some(c) = cursor {
                    println!("  cursor:   sector {c} of {} ({} sectors left to move)", r.geometry.l, c);
                }
                let f = fsm::progress(&r.geometry, r.state);
                println!("  progress: {}", progress_line(f, moved.unwrap_or(0), total.unwrap_or(0)));
                println!("  running:  {}", running::describe(run, &device.display().to_string()));
                println!(
                    "  target:   LUKS{} {} as /dev/mapper/{} (UUID {})",
                    r.luks_version, r.cipher, r.name, r.luks_uuid
                );
                if *run == Running::No {
                    println!("  continue: luksify resume {}", device.display());
                }
            }
        }
    }
}
