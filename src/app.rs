//! Dispatch of the command line onto the planner, the engine and the adapters.

use crate::adapters::blockdev::{BlockDev, OpenMode};
use crate::adapters::integrate::{self as integ, SystemRunner};
use crate::adapters::kernel::DmKernel;
use crate::adapters::lvmlock::{self, VgLock};
use crate::adapters::rawdisk::RawDisk;
use crate::adapters::{bootprobe, luks, lvm, probe, sys};
use crate::cli::{Cli, Command, ConvertOpts, KeyOpts, RunOpts};
use crate::core::boot::{self, LuksChoice};
use crate::core::integrate::{crypttab_discard, luks_uuid, mapping_name_of};
use crate::core::journal::{Record, State};
use crate::core::plan::{self, LuksVersion};
use crate::core::state as fsm;
use crate::core::tables::DevRef;
use crate::engine::{Disk, Engine, EngineError, Event, Hooks};
use crate::error::{exit, Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::path::Path;

/// When this run started: `--progress-json` lines carry `t_ms`, the time since then.
static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn t_ms() -> f64 {
    ms(START.get_or_init(std::time::Instant::now).elapsed())
}

/// The wall clock in milliseconds since the epoch (to line progress up with other logs).
fn epoch_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

pub fn run(cli: Cli) -> Result<i32> {
    START.get_or_init(std::time::Instant::now);
    match cli.command {
        Some(Command::Status { json, device }) => status(&device, json),
        Some(Command::Resume { opts, run, device }) => resume(&device, &opts, &run),
        None => {
            let device = cli.device.expect("clap requires DEVICE");
            if cli.dry_run {
                dry_run(&device, &cli.opts, cli.json)
            } else {
                convert(&device, &cli.opts)
            }
        }
    }
}

/// `--progress-json`: a line saying that a phase of the start-up is done (where the time
/// before the first step goes).
fn phase(run: &RunOpts, name: &str) {
    if run.progress_json {
        eprintln!("{{\"event\":\"phase\",\"phase\":\"{name}\",\"t_ms\":{:.0}}}", t_ms());
    }
}

/// [`sys::protect_from_oom_killer`]; a failure is only a warning (the conversion is as safe
/// as before, just not spared by the OOM killer).
fn spare_from_oom_killer() {
    if let Err(e) = sys::protect_from_oom_killer() {
        eprintln!("luksify: warning: cannot set oom_score_adj to -1000 ({e}): the OOM killer may pick luksify");
    }
}

fn probe_device(device: &Path) -> Result<crate::core::facts::DeviceFacts> {
    probe::probe(device).map_err(|e| Error::Refused(e.to_string()))
}

/// `--root` must be a directory.
fn check_root(run: &RunOpts) -> Result<()> {
    if !run.root.is_dir() {
        return Err(Error::Usage(format!("--root {}: not a directory; nothing was changed", run.root.display())));
    }
    Ok(())
}

/// The plan with the boot checks of `--root`.
fn plan_for(facts: &crate::core::facts::DeviceFacts, o: &ConvertOpts) -> Result<plan::Plan> {
    check_root(&o.run)?;
    let boot = bootprobe::probe_boot(&o.run.root);
    Ok(plan::plan_with_boot(facts, Some(&boot), &o.plan_options()))
}

fn dry_run(device: &Path, o: &ConvertOpts, json: bool) -> Result<i32> {
    let facts = probe_device(device)?;
    let p = plan_for(&facts, o)?;
    let room = room_commands(&p).filter(|_| o.make_room);
    if json {
        println!("{}", serde_json::to_string_pretty(&p).expect("plan serialises"));
    } else {
        print!("{}", plan::render(&p));
        if let Some(cmds) = &room {
            println!("  with --make-room, luksify would first run (then plan again):");
            for c in cmds {
                println!("    {}", c.join(" "));
            }
            println!("  verdict with --make-room: GO once the room is made");
        }
    }
    if p.ok() {
        Ok(exit::OK)
    } else if room.is_some() {
        // `luksify --make-room DEVICE` would make the room and go ahead: the dry-run of
        // that command says yes.
        Ok(exit::OK)
    } else {
        for r in &p.refusals {
            eprintln!("luksify: refused: {}", r.message);
        }
        Ok(exit::REFUSED)
    }
}

/// Size of a block device (or file) in sectors, by seeking to its end.
fn size_sectors(device: &Path) -> Result<u64> {
    let mut f =
        std::fs::File::open(device).map_err(|e| Error::Refused(format!("cannot open {}: {e}", device.display())))?;
    let bytes =
        f.seek(SeekFrom::End(0)).map_err(|e| Error::Failed(format!("cannot size {}: {e}", device.display())))?;
    Ok(bytes / 512)
}

fn raw_devref(device: &Path) -> Result<DevRef> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(device).map_err(|e| Error::Refused(format!("{}: {e}", device.display())))?;
    if !md.file_type().is_block_device() {
        return Err(Error::Refused(format!("{} is not a block device", device.display())));
    }
    let rdev = md.rdev();
    Ok(DevRef { major: nix::sys::stat::major(rdev) as u32, minor: nix::sys::stat::minor(rdev) as u32 })
}

fn open_disk(device: &Path, writable: bool) -> Result<RawDisk> {
    RawDisk::open(device, writable).map_err(|e| Error::Failed(format!("cannot open {}: {e}", device.display())))
}

fn engine_err(e: EngineError, device: &Path) -> Error {
    match e {
        EngineError::Stopped(c) => Error::Paused(format!("cursor {c}"), device.display().to_string()),
        EngineError::Refused(m) => Error::Refused(m),
        EngineError::Damaged(d) => damaged(&d, device),
        // the journal (or the header copy it points at) cannot be used: no hint that it can
        EngineError::Journal(m) => Error::Failed(format!(
            "{}: {m}; nothing was changed: keep the disk as it is and report with `luksify status --json {0}`",
            device.display()
        )),
        other => Error::Failed(format!(
            "{other}\nluksify: the journal on {} records the last safe state; `luksify status {0}` shows it and `luksify resume {0}` continues",
            device.display()
        )),
    }
}

fn damaged(d: &crate::core::evidence::Damage, device: &Path) -> Error {
    Error::Damaged { message: d.message(&device.display().to_string()), damage: Box::new(d.clone()) }
}

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
}

fn status(device: &Path, json: bool) -> Result<i32> {
    let n = size_sectors(device)?;
    let mut disk = open_disk(device, false)?;
    let rec = Engine::<RawDisk, DmKernel>::read_journal(&mut disk, n).map_err(|e| engine_err(e, device))?;
    let cursor = rec.as_ref().and_then(|r| match r.state {
        State::Migrating { cursor } => Some(cursor),
        _ => None,
    });
    if json {
        let s = StatusJson {
            device: device.display().to_string(),
            in_progress: rec.is_some(),
            state: rec.as_ref().map(|r| r.state.name()),
            cursor,
            move_sectors: rec.as_ref().map(|r| r.geometry.l),
            progress: rec.as_ref().map(|r| fsm::progress(&r.geometry, r.state)),
            name: rec.as_ref().map(|r| r.name.as_str()),
            luks_version: rec.as_ref().map(|r| r.luks_version),
            luks_uuid: rec.as_ref().map(|r| r.luks_uuid.as_str()),
            seq: rec.as_ref().map(|r| r.seq),
        };
        println!("{}", serde_json::to_string_pretty(&s).expect("serialises"));
    } else {
        match &rec {
            None => println!("{}: no luksify conversion in progress", device.display()),
            Some(r) => {
                println!("{}: luksify conversion in progress", device.display());
                println!("  state:    {}", r.state.name());
                if let Some(c) = cursor {
                    println!("  cursor:   sector {c} of {} ({} sectors left to move)", r.geometry.l, c);
                }
                println!("  progress: {:.1}%", 100.0 * fsm::progress(&r.geometry, r.state));
                println!(
                    "  target:   LUKS{} {} as /dev/mapper/{} (UUID {})",
                    r.luks_version, r.cipher, r.name, r.luks_uuid
                );
                println!("  continue: luksify resume {}", device.display());
            }
        }
    }
    Ok(exit::OK)
}

fn passphrase(k: &KeyOpts, confirm: bool) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let src = match &k.key_file {
        Some(p) => sys::KeySource::File(p),
        None => {
            if !std::io::stdin().is_terminal() {
                return Err(Error::Usage(
                    "no terminal to ask for the passphrase: use --key-file FILE (or - for standard input)".into(),
                ));
            }
            sys::KeySource::Terminal { confirm }
        }
    };
    sys::read_passphrase(src).map_err(Error::Usage)
}

fn lock(device: &Path) -> Result<std::fs::File> {
    match sys::lock_device(device) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(Error::Refused(format!(
            "another luksify is running on {} (it holds the device lock); wait for it or stop it with Ctrl-C",
            device.display()
        ))),
        Err(e) => Err(Error::Refused(format!("cannot open {}: {e}", device.display()))),
    }
}

/// How long to wait for an LVM command holding the VG lock (`LUKSIFY_LVM_LOCK_WAIT_SECS`
/// overrides it, for tests).
fn vg_lock_wait() -> std::time::Duration {
    std::env::var("LUKSIFY_LVM_LOCK_WAIT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_secs)
        .unwrap_or(lvmlock::DEFAULT_WAIT)
}

/// Take LVM's own lock on `vg`, exclusively, for the whole migration: no lvcreate, lvextend,
/// lvchange or autoactivation can reload an LV table of the VG while luksify converts.
/// Asks LVM for its locking directory first (an LVM command: none may run once the lock is
/// held, it would wait for us).
fn lock_vg(vg: &str) -> Result<VgLock> {
    let dir = lvmlock::locking_dir();
    let l = VgLock::acquire(&dir, vg, vg_lock_wait(), &mut |p| {
        eprintln!("luksify: waiting for LVM's lock on VG {vg} ({}): another LVM command holds it", p.display())
    })
    .map_err(|e| Error::Refused(e.to_string()))?;
    eprintln!("luksify: holding LVM's lock on VG {vg} until the finish (LVM commands on it wait until then)");
    Ok(l)
}

/// The VG of the PV that `dev` shows, read from its LVM label and metadata area (no LVM
/// command: a resume may need it while LVM cannot run, or before taking LVM's lock).
fn vg_on(dev: &Path) -> Option<String> {
    use crate::core::marker;
    let mut d = RawDisk::open(dev, false).ok()?;
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

/// The VG on the bridge `name`, if the bridge exists (its node is made if missing).
fn vg_on_bridge(kernel: &DmKernel, name: &str) -> Option<String> {
    kernel.ensure_node(name).ok()?;
    vg_on(&Path::new("/dev/mapper").join(name))
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Progress on the terminal (a bar) or as JSON lines.
struct CliHooks {
    bar: Option<ProgressBar>,
    json: bool,
    l: u64,
    name: String,
    last_line_pct: i64,
    /// The longest time live I/O waited on the bridge, over every step of this run.
    max_stall: std::time::Duration,
    /// Suspended windows cut for running past `--max-stall`, over every step of this run.
    cut_windows: u64,
    chunks: u64,
    /// LVM's VG lock: released right before luksify's own `pvresize` (and on every exit).
    vg_lock: Option<VgLock>,
}

impl CliHooks {
    fn new(run: &RunOpts, l: u64, moved: u64, name: &str) -> CliHooks {
        let tty = std::io::stderr().is_terminal();
        let bar = (!run.progress_json && tty).then(|| {
            let b = ProgressBar::new(l * 512);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b.set_position(moved * 512);
            b
        });
        CliHooks {
            bar,
            json: run.progress_json,
            l,
            name: name.to_string(),
            last_line_pct: -1,
            max_stall: Default::default(),
            cut_windows: 0,
            chunks: 0,
            vg_lock: None,
        }
    }
}

impl Hooks for CliHooks {
    fn event(&mut self, e: &Event) {
        match e {
            Event::ChunkDone { from, stats, .. } => {
                let moved = self.l - from;
                self.max_stall = self.max_stall.max(stats.stall);
                self.cut_windows += u64::from(stats.cut_windows);
                self.chunks += 1;
                if let Some(b) = &self.bar {
                    b.set_position(moved * 512);
                } else if self.json {
                    eprintln!(
                        "{{\"event\":\"chunk\",\"cursor\":{from},\"moved_sectors\":{moved},\"total_sectors\":{},\"copy_ms\":{:.1},\"verify_ms\":{:.1},\"stall_ms\":{:.1},\"stall_split_ms\":[{:.1},{:.1},{:.1},{:.1}],\"rechecked_sectors\":{},\"cut_windows\":{},\"t_ms\":{:.0},\"epoch_ms\":{}}}",
                        self.l,
                        ms(stats.copy),
                        ms(stats.verify),
                        ms(stats.stall),
                        ms(stats.stall_split[0]),
                        ms(stats.stall_split[1]),
                        ms(stats.stall_split[2]),
                        ms(stats.stall_split[3]),
                        stats.rechecked,
                        stats.cut_windows,
                        t_ms(),
                        epoch_ms()
                    );
                } else {
                    let pct = (moved * 100 / self.l) as i64;
                    if pct / 10 != self.last_line_pct / 10 {
                        self.last_line_pct = pct;
                        eprintln!("luksify: {pct}% moved ({moved} of {} sectors)", self.l);
                    }
                }
            }
            Event::Committed(st) => {
                if self.json {
                    eprintln!("{{\"event\":\"commit\",\"state\":\"{}\",\"t_ms\":{:.0}}}", st.name(), t_ms());
                } else if self.bar.is_none() {
                    match st {
                        State::Bridged => {
                            eprintln!("luksify: bridge /dev/mapper/{} inserted under the live mappings", self.name)
                        }
                        State::Migrating { cursor } if *cursor == self.l => {
                            eprintln!("luksify: raw partition fenced; moving data")
                        }
                        State::HeaderWritten => eprintln!("luksify: LUKS header written"),
                        _ => {}
                    }
                }
            }
            Event::Done => {
                if let Some(b) = &self.bar {
                    b.finish();
                }
                if self.chunks > 0 {
                    if self.json {
                        eprintln!(
                            "{{\"event\":\"done\",\"steps\":{},\"max_stall_ms\":{:.1},\"cut_windows\":{},\"t_ms\":{:.0}}}",
                            self.chunks,
                            ms(self.max_stall),
                            self.cut_windows,
                            t_ms()
                        );
                    } else {
                        let cut = match self.cut_windows {
                            0 => String::new(),
                            n => format!(" ({n} longer window(s) cut short and the step tried again)"),
                        };
                        eprintln!(
                            "luksify: {} step(s); live I/O waited at most {:.1} ms at a step{cut}",
                            self.chunks,
                            ms(self.max_stall)
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn stop_requested(&self) -> bool {
        sys::stop_requested()
    }

    fn lvm_resize(&mut self, bridge: &str) -> std::result::Result<(), String> {
        let dev = format!("/dev/mapper/{bridge}");
        // Our own LVM command would wait for the lock we hold: give it back first.
        if let Some(l) = self.vg_lock.take() {
            l.release();
        }
        lvm::pvresize(Path::new(&dev), None).map_err(|e| {
            eprintln!("luksify: warning: `pvresize {dev}` failed ({e}); run it yourself, the data is intact");
            e.to_string()
        })
    }
}

fn confirm(device: &Path, run: &RunOpts) -> Result<()> {
    if run.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage("not asking for confirmation without a terminal: pass --yes".into()));
    }
    eprint!(
        "luksify will encrypt {} in place while it is in use. Back up what you cannot lose.\nType YES to go on: ",
        device.display()
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| Error::Usage(e.to_string()))?;
    if line.trim() != "YES" {
        return Err(Error::Usage("not confirmed; nothing was changed".into()));
    }
    Ok(())
}

fn announce_done(device: &Path, name: &str, uuid: &str) {
    eprintln!("luksify: done: {} is now LUKS (UUID {uuid}), open as /dev/mapper/{name}", device.display());
}

fn print_after(device: &Path, name: &str, uuid: &str, discard: bool) {
    announce_done(device, name, uuid);
    eprintln!(
        "luksify: to boot from it, add to /etc/crypttab:  {}",
        crate::core::integrate::crypttab_line(name, uuid, discard)
    );
    eprintln!("luksify: and regenerate the initramfs (Debian/Ubuntu: update-initramfs -u -k all; Fedora: dracut -f)");
}

/// The commands `--make-room` would run: only when the sole refusal is too little tail and
/// there is something safe to do (not for `MakeRoom::Manual`).
fn room_commands(p: &plan::Plan) -> Option<Vec<Vec<String>>> {
    if p.refusals.len() != 1 || p.refusals[0].code != "too_little_tail" {
        return None;
    }
    let cmds = p.make_room.as_ref()?.commands(&p.device);
    (!cmds.is_empty()).then_some(cmds)
}

fn refused(p: &plan::Plan) -> Error {
    let msgs: Vec<String> = p.refusals.iter().map(|r| r.message.clone()).collect();
    Error::Refused(msgs.join("\nluksify: "))
}

/// Whether /boot of `--root` is on the PV now open as /dev/mapper/`name` (its LVs hold it).
fn boot_on_pv_after(name: &str, root: &Path) -> bool {
    let Ok(facts) = probe::probe(Path::new(&format!("/dev/mapper/{name}"))) else { return false };
    let choice = LuksChoice { luks: LuksVersion::Luks2, pbkdf: None, force_unknown_boot: true };
    boot::check(&facts, &bootprobe::probe_boot(root), &choice).0.boot_on_pv
}

/// After the finish: integrate into `--root` (unless --no-integrate). Exit 5 when something
/// is left to do by hand.
fn finish(
    device: &Path,
    name: &str,
    uuid: &str,
    discard: bool,
    run: &RunOpts,
    boot_on_pv: bool,
    announce: bool,
) -> Result<i32> {
    if run.no_integrate {
        print_after(device, name, uuid, discard);
        return Ok(exit::OK);
    }
    if announce {
        announce_done(device, name, uuid);
    }
    let raw = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let input = integ::gather(&run.root, name, uuid, discard, &raw.display().to_string(), boot_on_pv);
    let out = integ::integrate(&input, &mut SystemRunner, &integ::stamp());
    for d in &out.done {
        eprintln!("luksify: integration: {d}");
    }
    if out.manual.is_empty() {
        eprintln!("luksify: the system in {} is set up to unlock /dev/mapper/{name} at boot", run.root.display());
        Ok(exit::OK)
    } else {
        let root = if run.root == Path::new("/") { String::new() } else { format!("--root {} ", run.root.display()) };
        Err(Error::Integration(format!(
            "{}; then `luksify resume {root}{}` checks the integration again",
            out.manual.join("; "),
            device.display()
        )))
    }
}

/// `resume` on a device whose conversion has finished (LUKS header, no journal): only the
/// integration is (re)done. The device must be open (its mapping name is taken from it).
fn resume_finished(device: &Path, run: &RunOpts) -> Result<i32> {
    let nothing = || {
        Error::Refused(format!(
            "no luksify conversion in progress on {} (no journal): nothing to resume",
            device.display()
        ))
    };
    if run.no_integrate {
        return Err(nothing());
    }
    let dev = BlockDev::open(device, OpenMode::READ_DIRECT)
        .map_err(|e| Error::Refused(format!("cannot open {}: {e}", device.display())))?;
    let mut head = vec![0u8; 4096];
    dev.read_at(0, &mut head).map_err(|e| Error::Failed(format!("cannot read {}: {e}", device.display())))?;
    drop(dev);
    let uuid = luks_uuid(&head).ok_or_else(nothing)?;
    let dm = crate::adapters::dm::Dm::open().map_err(|e| Error::Failed(e.to_string()))?;
    let list = dm.list().map_err(|e| Error::Failed(e.to_string()))?;
    let name = list
        .iter()
        .find_map(|d| mapping_name_of(&d.uuid, &uuid).map(str::to_string))
        .ok_or_else(|| Error::Refused(format!(
            "{} is LUKS (UUID {uuid}) and no conversion is in progress, but it is not open: `cryptsetup open {} <name>`, then `luksify resume {}` sets up the system integration",
            device.display(), device.display(), device.display()
        )))?;
    eprintln!("luksify: {}: the conversion has finished (LUKS UUID {uuid}, open as /dev/mapper/{name}); checking the system integration", device.display());
    let crypttab = std::fs::read_to_string(bootprobe::in_root(&run.root, "/etc/crypttab")).unwrap_or_default();
    let discard = crypttab_discard(&crypttab, &name);
    let boot_on_pv = boot_on_pv_after(&name, &run.root);
    finish(device, &name, &uuid, discard, run, boot_on_pv, false)
}

fn convert(device: &Path, o: &ConvertOpts) -> Result<i32> {
    let _lock = lock(device)?;
    let mut facts = probe_device(device)?;
    phase(&o.run, "probed");
    let popts = o.plan_options();
    let mut p = plan_for(&facts, o)?;
    phase(&o.run, "planned");
    let room = if o.make_room { room_commands(&p) } else { None };
    if !p.ok() && room.is_none() {
        return Err(refused(&p));
    }
    if !o.key_size.is_multiple_of(8) || o.key_size == 0 {
        return Err(Error::Usage(format!("--key-size {} is not a whole number of bytes", o.key_size)));
    }
    let pass = passphrase(&o.key, true)?;
    if let Some(cmds) = &room {
        eprintln!("luksify: to make room past the PV, luksify will first run:");
        for c in cmds {
            eprintln!("luksify:   {}", c.join(" "));
        }
    }
    confirm(device, &o.run)?;
    if let Some(cmds) = &room {
        lvm::make_room(cmds).map_err(|e| {
            Error::Failed(format!("making room failed: {e}; the conversion did not start (LVM reports what, if anything, it changed: see `pvs -o+pv_used {}`)", device.display()))
        })?;
        facts = probe_device(device)?;
        p = plan_for(&facts, o)?;
        if !p.ok() {
            return Err(Error::Refused(format!(
                "after making room the plan still refuses (the PV was shrunk; nothing else changed): {}",
                p.refusals.iter().map(|r| r.message.clone()).collect::<Vec<_>>().join("; ")
            )));
        }
        eprintln!("luksify: room made: {} sectors past the PV now", p.tail_have_sectors);
    }
    let g = p.geometry.expect("an accepted plan has a geometry");

    let (cipher, mode) = o
        .cipher
        .split_once('-')
        .ok_or_else(|| Error::Usage(format!("--cipher {} is not of the form cipher-mode", o.cipher)))?;
    let key = luks::VolumeKey::generate((o.key_size / 8) as usize).map_err(|e| Error::Failed(e.to_string()))?;
    let params = luks::HeaderParams {
        luks_type: popts.luks,
        cipher: cipher.to_string(),
        cipher_mode: mode.to_string(),
        key_bytes: (o.key_size / 8) as usize,
        hash: o.hash.clone(),
        pbkdf: o.pbkdf.clone(),
        pbkdf_force_iterations: o.pbkdf_force_iterations,
        iter_time_ms: o.iter_time,
        data_offset_sectors: g.s,
        uuid: None,
        label: None,
    };
    let header = luks::format_header(&params, &key, &pass)
        .map_err(|e| Error::Failed(format!("formatting the LUKS header: {e}; nothing was changed")))?;
    drop(pass);
    phase(&o.run, "header_formatted");
    let pv_uuid = facts.lvm.as_ref().map(|l| l.pv_uuid.clone()).unwrap_or_default();
    let raw = raw_devref(device)?;
    // From here to the finish, no LVM command may change the VG (ours included).
    let vg_lock = match facts.lvm.as_ref().map(|l| l.vg_name.clone()).filter(|v| !v.is_empty()) {
        Some(vg) => Some(lock_vg(&vg).map_err(|e| Error::Refused(format!("{e}; nothing was changed")))?),
        None => None,
    };

    sys::install_stop_handlers().map_err(|e| Error::Failed(format!("installing signal handlers: {e}")))?;
    sys::lock_memory().map_err(|e| {
        Error::Failed(format!("mlockall failed ({e}); refusing to suspend devices without it; nothing was changed"))
    })?;
    spare_from_oom_killer();
    phase(&o.run, "memory_locked");
    let disk = open_disk(device, true)?;
    let kernel = DmKernel::new().map_err(|e| Error::Failed(e.to_string()))?;
    let mut engine = Engine::prepare(
        disk,
        kernel,
        raw,
        g,
        &p.name,
        popts.luks.number(),
        &header.uuid,
        &o.cipher,
        o.allow_discards,
        &pv_uuid,
        key.as_bytes(),
        header.bytes.clone(),
    )
    .map_err(|e| engine_err(e, device))?;
    drop(key);
    phase(&o.run, "prepared");
    engine.rate = o.run.rate_bytes();
    engine.max_stall = o.run.max_stall();
    let mut hooks = CliHooks::new(&o.run, g.l, 0, &p.name);
    hooks.vg_lock = vg_lock;
    if let Err(e) = engine.run(&mut hooks) {
        // Failed before anything but the tail changed (e.g. an LV table that would not
        // reroute): put the tail back, so the device is exactly as it was.
        return match engine.abandon() {
            Ok(true) => Err(Error::Failed(format!("{e}; nothing was changed (the device is as it was)"))),
            Ok(false) => Err(engine_err(e, device)),
            Err(e2) => Err(Error::Failed(format!(
                "{e}; then restoring the tail failed too ({e2}): run `luksify resume {}`",
                device.display()
            ))),
        };
    }
    let _ = engine.kernel.ensure_node(&p.name);
    // The VG lock goes before anything runs LVM again (integration, probes).
    drop(hooks);
    let boot_on_pv = p.boot.as_ref().map(|b| b.boot_on_pv).unwrap_or(false);
    finish(device, &p.name, &header.uuid, o.allow_discards, &o.run, boot_on_pv, true)
}

fn resume(device: &Path, k: &KeyOpts, run: &RunOpts) -> Result<i32> {
    let _lock = lock(device)?;
    if !run.no_integrate {
        check_root(run)?;
    }
    let n = size_sectors(device)?;
    let raw = raw_devref(device)?;
    let mut disk = open_disk(device, true)?;
    let rec: Record =
        match Engine::<RawDisk, DmKernel>::read_journal(&mut disk, n).map_err(|e| engine_err(e, device))? {
            Some(r) => r,
            None => {
                drop(disk);
                return resume_finished(device, run);
            }
        };
    let discard = rec.allow_discards;
    let header = Engine::<RawDisk, DmKernel>::read_header_copy(&mut disk, &rec).map_err(|e| engine_err(e, device))?;
    let pass = passphrase(k, false)?;
    let key = luks::unlock(&header, &pass).map_err(|e| Error::Refused(format!("{e}; nothing was changed")))?;
    drop(pass);
    sys::install_stop_handlers().map_err(|e| Error::Failed(format!("installing signal handlers: {e}")))?;
    sys::lock_memory().map_err(|e| Error::Failed(format!("mlockall failed ({e}); nothing was changed")))?;
    spare_from_oom_killer();
    let kernel = DmKernel::new().map_err(|e| Error::Failed(e.to_string()))?;
    let name = rec.name.clone();
    // LVM's VG lock, as for a conversion. On a live system the bridge already shows the PV:
    // lock before rebuilding anything. On rescue media the bridge is made by `reopen`, and
    // the lock is taken right after (nothing of LVM's maps the device by then).
    // (Only if reading the bridge cannot block: a luksify killed mid-step may have left it,
    // or a helper under it, suspended; `reopen` resumes them.)
    let names = crate::engine::Names::new(&name, rec.luks_version, &rec.luks_uuid);
    let readable = kernel.is_live(&name) && ![&names.staging, &names.mirror].iter().any(|n| kernel.is_suspended(n));
    let mut vg_lock = match readable {
        true => vg_on_bridge(&kernel, &name).map(|vg| lock_vg(&vg)).transpose()?,
        false => None,
    };
    let uuid = rec.luks_uuid.clone();
    let l = rec.geometry.l;
    let moved = match rec.state {
        State::Migrating { cursor } => l - cursor,
        State::HeaderWritten => l,
        _ => 0,
    };
    eprintln!(
        "luksify: resuming from state {} ({:.1}% moved)",
        rec.state.name(),
        100.0 * fsm::progress(&rec.geometry, rec.state)
    );
    let mut engine =
        Engine::reopen(disk, kernel, raw, rec, key.as_bytes(), header).map_err(|e| engine_err(e, device))?;
    drop(key);
    if vg_lock.is_none() {
        match vg_on_bridge(&engine.kernel, &name) {
            Some(vg) => vg_lock = Some(lock_vg(&vg)?),
            None => eprintln!("luksify: warning: no LVM metadata found on /dev/mapper/{name}; not holding any VG lock"),
        }
    }
    engine.rate = run.rate_bytes();
    engine.max_stall = run.max_stall();
    let mut hooks = CliHooks::new(run, l, moved, &name);
    hooks.vg_lock = vg_lock;
    engine.run(&mut hooks).map_err(|e| engine_err(e, device))?;
    let _ = engine.kernel.ensure_node(&name);
    drop(engine);
    // The VG lock goes before anything runs LVM again (integration, probes).
    drop(hooks);
    let boot_on_pv = !run.no_integrate && boot_on_pv_after(&name, &run.root);
    finish(device, &name, &uuid, discard, run, boot_on_pv, true)
}
