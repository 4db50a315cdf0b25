//! Progress on the terminal (a bar, or a line every 10%) or as `--progress-json` lines.
//! The JSON lines are serde types; their bytes are what tests and `qemu/bench` read.

use crate::adapters::lvmlock::VgLock;
use crate::adapters::{lvm, progressfile};
use crate::cli::RunOpts;
use crate::core::journal::State;
use crate::core::running::{self, ProgressFile, RateWindow};
use crate::core::units::Sectors;
use crate::engine::{Event, Hooks};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::Path;

/// When this run started: `--progress-json` lines carry `t_ms`, the time since then.
pub(super) fn start_clock() {
    START.get_or_init(std::time::Instant::now);
}

static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

pub(super) fn t_ms() -> f64 {
    ms(START.get_or_init(std::time::Instant::now).elapsed())
}

/// The wall clock in milliseconds since the epoch (to line progress up with other logs).
fn epoch_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

pub(super) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The line that reports an undo step's own failure ([`Event::UndoFailed`]).
pub(super) fn undo_warning(m: &str) -> String {
    format!("luksify: warning: while undoing after a failure, {m}")
}

/// Milliseconds to one decimal, as the progress lines print them.
fn ms1(d: std::time::Duration) -> f64 {
    (ms(d) * 10.0).round() / 10.0
}

/// `--progress-json` lines, in the order of their fields on the wire.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Line<'a> {
    Phase {
        phase: &'a str,
        t_ms: u64,
    },
    Chunk {
        cursor: u64,
        moved_sectors: u64,
        total_sectors: u64,
        copy_ms: f64,
        verify_ms: f64,
        tick_wait_ms: f64,
        stall_ms: f64,
        stall_split_ms: [f64; 4],
        rechecked_sectors: u64,
        cut_windows: u32,
        read_ahead_ms: f64,
        compare_skipped: bool,
        t_ms: u64,
        epoch_ms: u128,
    },
    Commit {
        state: &'a str,
        t_ms: u64,
    },
    /// LUKS2: the tick learnt before the cut-over (`engine::tick_marks`): how many suspends
    /// of the private device returned, and the tick period they sit on (null: none found,
    /// suspends then start at once until the conversion's own suspends show one).
    Tick {
        marks: usize,
        period_ms: Option<f64>,
        t_ms: u64,
    },
    /// LUKS2: the device is a standard reencryption in progress from here on.
    #[serde(rename = "cut_over")]
    CutOver {
        stall_ms: f64,
        t_ms: u64,
    },
    Done {
        steps: u64,
        max_stall_ms: f64,
        cut_windows: u64,
        t_ms: u64,
    },
}

fn emit(l: &Line) {
    eprintln!("{}", serde_json::to_string(l).expect("serialises"));
}

fn t_ms_whole() -> u64 {
    t_ms().round() as u64
}

/// `--progress-json`: the `tick` line ([`Line::Tick`]) for the moments `marks`.
pub(super) fn tick_learned(run: &RunOpts, marks: &[std::time::Instant]) {
    if !run.progress_json {
        return;
    }
    let mut g = crate::core::tick::TickGrid::new();
    if let Some(&first) = marks.first() {
        g.observe_since(first, marks);
    }
    let period_ms = g.grid().map(|(p, _)| p as f64 / 1e6);
    emit(&Line::Tick { marks: marks.len(), period_ms, t_ms: t_ms_whole() });
}

/// `--progress-json`: a line saying that a phase of the start-up is done (where the time
/// before the first step goes).
pub(super) fn phase(run: &RunOpts, name: &str) {
    if run.progress_json {
        emit(&Line::Phase { phase: name, t_ms: t_ms_whole() });
    }
}

/// Progress on the terminal (a bar) or as JSON lines.
pub(super) struct CliHooks {
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
    pub(super) vg_lock: Option<VgLock>,
    /// LVM started as a shell while the steps run, for the finish's `pvresize`
    /// ([`crate::adapters::lvmshell`]).
    pub(super) lvm_shell: Option<crate::adapters::lvmshell::LvmShell>,
    /// The progress file `status` reads (removed when the hooks are dropped).
    runfile: RunFile,
}

/// The progress file of this run ([`progressfile`]): the rate over the last seconds,
/// rewritten at most once a second. A failure to write it is warned about once, and the
/// conversion goes on (only `status` misses the rate).
struct RunFile {
    path: std::path::PathBuf,
    total_bytes: u64,
    window: RateWindow,
    last_write: Option<f64>,
    warned: bool,
}

impl RunFile {
    fn new(device: &Path, total_bytes: u64) -> RunFile {
        let path = progressfile::path_of(device);
        RunFile { path, total_bytes, window: RateWindow::default(), last_write: None, warned: false }
    }

    fn update(&mut self, moved_bytes: u64, force: bool) {
        let now = t_ms() / 1000.0;
        self.window.push(now, moved_bytes);
        if !force && !running::due(self.last_write, now) {
            return;
        }
        self.last_write = Some(now);
        let f = ProgressFile {
            pid: std::process::id(),
            moved_bytes,
            total_bytes: self.total_bytes,
            rate_bytes_per_s: self.window.rate(),
            epoch_ms: epoch_ms() as u64,
        };
        if let Err(e) = progressfile::write(&self.path, &f) {
            if !std::mem::replace(&mut self.warned, true) {
                eprintln!(
                    "luksify: warning: cannot write {} ({e}): `luksify status` will not show the rate",
                    self.path.display()
                );
            }
        }
    }
}

impl Drop for RunFile {
    fn drop(&mut self) {
        progressfile::remove_own(&self.path);
    }
}

impl CliHooks {
    pub(super) fn new(run: &RunOpts, device: &Path, l: u64, moved: u64, name: &str) -> CliHooks {
        let mut runfile = RunFile::new(device, Sectors(l).bytes());
        runfile.update(Sectors(moved).bytes(), true);
        let tty = std::io::stderr().is_terminal();
        let bar = (!run.progress_json && tty).then(|| {
            let b = ProgressBar::new(Sectors(l).bytes());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b.set_position(Sectors(moved).bytes());
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
            lvm_shell: None,
            runfile,
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
                self.runfile.update(Sectors(moved).bytes(), false);
                if let Some(b) = &self.bar {
                    b.set_position(Sectors(moved).bytes());
                } else if self.json {
                    emit(&Line::Chunk {
                        cursor: *from,
                        moved_sectors: moved,
                        total_sectors: self.l,
                        copy_ms: ms1(stats.copy),
                        verify_ms: ms1(stats.verify),
                        tick_wait_ms: ms1(stats.tick_wait),
                        stall_ms: ms1(stats.stall),
                        stall_split_ms: stats.stall_split.map(ms1),
                        rechecked_sectors: stats.rechecked,
                        cut_windows: stats.cut_windows,
                        read_ahead_ms: ms1(stats.read_ahead),
                        compare_skipped: stats.compare_skipped,
                        t_ms: t_ms_whole(),
                        epoch_ms: epoch_ms(),
                    });
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
                    emit(&Line::Commit { state: st.name(), t_ms: t_ms_whole() });
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
            Event::CutOver { stall } => {
                if self.json {
                    emit(&Line::CutOver { stall_ms: ms1(*stall), t_ms: t_ms_whole() });
                } else {
                    let line = format!(
                        "luksify: cut-over done (live I/O waited {:.1} ms): {} is now a standard LUKS2 reencryption in progress; cryptsetup's own reencryption moves the data",
                        ms(*stall),
                        self.name
                    );
                    match &self.bar {
                        Some(b) => b.println(line),
                        None => eprintln!("{line}"),
                    }
                }
                self.max_stall = self.max_stall.max(*stall);
            }
            Event::UndoFailed(m) => {
                let line = undo_warning(m);
                match &self.bar {
                    Some(b) => b.println(line),
                    None => eprintln!("{line}"),
                }
            }
            Event::Done => {
                if let Some(b) = &self.bar {
                    b.finish();
                }
                if self.chunks > 0 {
                    if self.json {
                        emit(&Line::Done {
                            steps: self.chunks,
                            max_stall_ms: ms1(self.max_stall),
                            cut_windows: self.cut_windows,
                            t_ms: t_ms_whole(),
                        });
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
        super::power::stop_here()
    }

    fn lvm_resize(&mut self, bridge: &str) -> std::result::Result<(), String> {
        let dev = format!("/dev/mapper/{bridge}");
        // Our own LVM command would wait for the lock we hold: give it back first.
        if let Some(l) = self.vg_lock.take() {
            l.release();
        }
        // The shell started early has LVM's start-up behind it; if it did not resize the PV
        // (it could not start, or LVM said otherwise), a command of its own does, and says why.
        if let Some(sh) = self.lvm_shell.take() {
            if sh.pvresize(Path::new(&dev)).is_ok() {
                return Ok(());
            }
        }
        lvm::pvresize(Path::new(&dev), None).map_err(|e| {
            eprintln!("luksify: warning: `pvresize {dev}` failed ({e}); run it yourself, the data is intact");
            e.to_string()
        })
    }
}
