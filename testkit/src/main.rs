//! `lktest`: helpers the UML test bed runs inside the guest (and the host).
//!
//! Every subcommand exits 0 on success and non-zero with one clear line on
//! stderr (prefixed `lktest <cmd>: FAIL`) naming what is wrong.

mod aligned;
mod fill;
mod manifest;
mod records;
mod uevents;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "lktest", about = "luksify test-bed helpers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Append numbered, checksummed records to FILE, fsync each, then ack the
    /// number in ACKED (fsync'd too). Runs until SIGTERM/SIGINT, --count or --stop-file.
    Writer {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        acked: PathBuf,
        #[arg(long, default_value_t = 4096)]
        record_size: usize,
        /// per-record "number micros epoch-ms" (write+fsync latency, and when the write
        /// began: milliseconds since the epoch, to line slow writes up with other logs)
        #[arg(long)]
        latency_out: Option<PathBuf>,
        /// stop after this many records
        #[arg(long)]
        count: Option<u64>,
        /// stop when this file exists
        #[arg(long)]
        stop_file: Option<PathBuf>,
        /// sleep between records
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Every number in ACKED must be present and intact in FILE.
    VerifyRecords {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        acked: PathBuf,
        #[arg(long, default_value_t = 4096)]
        record_size: usize,
        /// fail unless at least this many numbers were acked
        #[arg(long, default_value_t = 0)]
        min_acked: u64,
    },
    /// sha256 of every regular file under ROOT, written to OUT.
    Manifest {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// relative paths (prefixes) to leave out
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Recompute and compare a manifest (extra files are allowed).
    VerifyManifest {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        manifest: PathBuf,
    },
    /// sha256 of a device or file (whole, or the first --bytes).
    HashDev {
        dev: PathBuf,
        #[arg(long)]
        bytes: Option<u64>,
    },
    /// Keep re-reading the manifest's files (O_DIRECT or fadvise DONTNEED) until FILE exists.
    Reader {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        until: PathBuf,
        /// where to write "checks N failures M" (rewritten after each pass)
        #[arg(long)]
        status: Option<PathBuf>,
        /// stop after this many passes
        #[arg(long)]
        passes: Option<u64>,
    },
    /// Fill a device/file with deterministic pseudo-random bytes from SEED.
    Fill {
        dev: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        bytes: Option<u64>,
    },
    /// Create a deterministic tree of FILES files (varied sizes, nested dirs,
    /// text and binary) totalling about MIB MiB under DIR.
    Tree {
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 300)]
        files: u64,
        #[arg(long, default_value_t = 4)]
        mib: u64,
    },
    /// Sleep PERIOD ms at a time until --until exists; append to --out each wake-up that
    /// came more than --min-gap-ms late, as "EPOCH_MS LATE_MS" (the wall clock when the
    /// late sleep began, and how late it ended). Run on the machine that hosts the test
    /// bed, it shows when that machine itself stalled (a VM whose vCPUs the host did not
    /// run): every process on it, the UML guest included, stood still that long.
    Heartbeat {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        until: PathBuf,
        #[arg(long, default_value_t = 1)]
        period_ms: u64,
        #[arg(long, default_value_t = 20)]
        min_gap_ms: u64,
    },
    /// Append every kernel uevent (NETLINK_KOBJECT_UEVENT) to --out, one line of KEY=value
    /// pairs per event, until --until FILE exists.
    Uevents {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        until: Option<PathBuf>,
        /// written once the socket listens
        #[arg(long)]
        ready: Option<PathBuf>,
        /// only these keys, in this order (e.g. ACTION DM_NAME DM_COOKIE); default all
        #[arg(long)]
        keys: Vec<String>,
    },
    /// Check a device/file holds what `fill --seed SEED` wrote.
    Check {
        dev: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        bytes: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, res) = match cli.cmd {
        Cmd::Writer { file, acked, record_size, latency_out, count, stop_file, interval_ms } => (
            "writer",
            records::writer(&records::WriterOpts {
                file,
                acked,
                record_size,
                latency_out,
                count,
                stop_file,
                interval_ms,
            }),
        ),
        Cmd::VerifyRecords { file, acked, record_size, min_acked } => {
            ("verify-records", records::verify(&file, &acked, record_size, min_acked))
        }
        Cmd::Manifest { root, out, exclude } => ("manifest", manifest::make(&root, &out, &exclude)),
        Cmd::VerifyManifest { root, manifest } => ("verify-manifest", manifest::verify(&root, &manifest)),
        Cmd::HashDev { dev, bytes } => ("hash-dev", manifest::hash_dev(&dev, bytes)),
        Cmd::Reader { root, manifest, until, status, passes } => {
            ("reader", manifest::reader(&root, &manifest, &until, status.as_deref(), passes))
        }
        Cmd::Fill { dev, seed, bytes } => ("fill", fill::fill(&dev, seed, bytes)),
        Cmd::Check { dev, seed, bytes } => ("check", fill::check(&dev, seed, bytes)),
        Cmd::Tree { dir, seed, files, mib } => ("tree", fill::tree(&dir, seed, files, mib)),
        Cmd::Heartbeat { out, until, period_ms, min_gap_ms } => {
            ("heartbeat", heartbeat(&out, &until, period_ms, min_gap_ms))
        }
        Cmd::Uevents { out, until, ready, keys } => {
            ("uevents", uevents::listen(&out, until.as_deref(), ready.as_deref(), &keys))
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lktest {name}: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

pub type Result<T> = std::result::Result<T, String>;

/// Map an io error to a message naming the path.
pub fn ioe<P: AsRef<std::path::Path>>(what: &str, p: P) -> impl FnOnce(std::io::Error) -> String {
    let p = p.as_ref().display().to_string();
    let what = what.to_string();
    move |e| format!("{what} {p}: {e}")
}

/// Size of a regular file or block device, in bytes.
pub fn dev_size(f: &std::fs::File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// `lktest heartbeat`: see [`Cmd::Heartbeat`].
fn heartbeat(out: &std::path::Path, until: &std::path::Path, period_ms: u64, min_gap_ms: u64) -> Result<()> {
    use std::io::Write;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(out).map_err(ioe("opening", out))?;
    let period = Duration::from_millis(period_ms.max(1));
    let mut n = 0u64;
    loop {
        // Checking the stop file every 100 periods keeps the loop to a sleep per period.
        if n.is_multiple_of(100) && until.exists() {
            return Ok(());
        }
        n += 1;
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let t = Instant::now();
        std::thread::sleep(period);
        let late = t.elapsed().saturating_sub(period);
        if late >= Duration::from_millis(min_gap_ms) {
            writeln!(f, "{:.1} {:.1}", wall.as_secs_f64() * 1e3, late.as_secs_f64() * 1e3)
                .map_err(ioe("writing", out))?;
        }
    }
}
