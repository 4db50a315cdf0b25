//! The command line's types (clap derive): what the user can say, nothing else. `main.rs`
//! parses, `app` runs, `error` says how it ended.

use crate::core::plan::{self, LuksVersion};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "luksify",
    version,
    about = "Encrypt a live LVM physical volume with LUKS, in place and online",
    long_about = "Converts DEVICE, an LVM physical volume that may hold the running system's root, /home and swap, \
into a standard LUKS volume while everything stays mounted. A power cut at any instant loses nothing: \
`luksify resume DEVICE` (also from rescue media) finishes the job.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Print the plan and change nothing at all.
    #[arg(long)]
    pub dry_run: bool,

    /// With --dry-run: print the plan as JSON (schema in README.md).
    #[arg(long, requires = "dry_run")]
    pub json: bool,

    #[command(flatten)]
    pub opts: ConvertOpts,

    /// The device to convert, e.g. /dev/sda5.
    #[arg(required = true)]
    pub device: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Continue a conversion after a crash or a pause (live system or rescue media).
    Resume {
        #[command(flatten)]
        opts: KeyOpts,
        #[command(flatten)]
        run: RunOpts,
        device: PathBuf,
    },
    /// Show what the journal, or the LUKS2 header in reencryption, on DEVICE says: state,
    /// progress. Needs no passphrase.
    Status {
        #[arg(long)]
        json: bool,
        device: PathBuf,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum TypeArg {
    Luks1,
    Luks2,
}

#[derive(Args, Debug, Clone)]
pub struct ConvertOpts {
    /// LUKS header format.
    #[arg(long = "type", value_enum, default_value = "luks2")]
    pub luks_type: TypeArg,
    /// Cipher, as cryptsetup names it: any the kernel's dm-crypt maps (tried before anything
    /// changes), with a 512-byte encryption sector.
    #[arg(long, default_value = "aes-xts-plain64")]
    pub cipher: String,
    /// Volume key size in bits.
    #[arg(long, default_value_t = 512)]
    pub key_size: u32,
    /// Hash for the keyslot (LUKS1: also the AF hash).
    #[arg(long, default_value = "sha256")]
    pub hash: String,
    /// Key derivation: argon2id, argon2i or pbkdf2 (LUKS1: pbkdf2 only).
    #[arg(long)]
    pub pbkdf: Option<String>,
    /// Fixed PBKDF iteration count (disables benchmarking).
    #[arg(long)]
    pub pbkdf_force_iterations: Option<u32>,
    /// PBKDF time to spend, in milliseconds.
    #[arg(long)]
    pub iter_time: Option<u32>,
    /// Name of the new mapping (default: <device basename>_crypt).
    #[arg(long)]
    pub name: Option<String>,
    /// LUKS data offset: 512-byte sectors, or a size with K, M, G (KiB, MiB, GiB) such as
    /// 16M (default: 32768 sectors = 16M for LUKS2, 4096 = 2M for LUKS1).
    #[arg(long, value_name = "SECTORS|SIZE", value_parser = parse_sectors)]
    pub offset: Option<u64>,
    /// Sectors moved per chunk (at most the data offset; default: the data offset or 16384,
    /// whichever is less). A step never moves more than 16384 sectors (8 MiB): a larger
    /// chunk is committed in steps of that size.
    /// Sectors, or a size such as 4M.
    #[arg(long, value_name = "SECTORS|SIZE", value_parser = parse_sectors)]
    pub chunk: Option<u64>,
    /// Region size in sectors (a power of two) of the dm-mirror luksify falls back to
    /// when a journal commit fails (it keeps both copies of the step identical).
    /// Sectors, or a size such as 4M.
    #[arg(long, value_name = "SECTORS|SIZE", default_value = "8192", value_parser = parse_sectors)]
    pub region: u64,
    /// Pass discards through the new mapping (leaks which blocks are unused); the crypttab
    /// line gets `discard`.
    #[arg(long)]
    pub allow_discards: bool,
    /// When the room past the PV is too small, make it first: shrink the PV over free
    /// extents at its end (`pvresize`), moving the last extents into free ones elsewhere on
    /// the PV first if they are in use (`pvmove`). Never shrinks an LV or a filesystem.
    #[arg(long)]
    pub make_room: bool,
    /// Add a second keyslot holding a generated recovery key, in the format
    /// `systemd-cryptenroll --recovery-key` uses (32 random bytes as 8 groups of 8 letters).
    /// It opens the disk wherever the passphrase is asked for (boot prompt, `cryptsetup
    /// open`, `luksify resume`). It is printed once, on standard output only, when the LUKS
    /// header is made and before anything is written: write it down or store it off the
    /// machine. luksify keeps no copy and never logs it.
    #[arg(long)]
    pub recovery_key: bool,
    /// Convert even when the root filesystem is on DEVICE and luksify knows no initramfs
    /// generator that could unlock it at boot (you make sure yours will), or (LUKS2) the
    /// generator is mkinitcpio or dracut without systemd, where a reboot mid-way needs rescue media.
    #[arg(long)]
    pub force_unknown_boot: bool,
    #[command(flatten)]
    pub key: KeyOpts,
    #[command(flatten)]
    pub run: RunOpts,
}

#[derive(Args, Debug, Clone)]
pub struct KeyOpts {
    /// Read the passphrase from FILE (`-` = standard input) instead of asking on the terminal.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RunOpts {
    /// Do not ask for confirmation (cryptsetup's -q/--batch-mode; `--yes` is the same).
    #[arg(short = 'q', long = "batch-mode", visible_alias = "yes")]
    pub yes: bool,
    /// Do not touch /etc/crypttab, the initramfs or the LVM devices file.
    #[arg(long)]
    pub no_integrate: bool,
    /// The root directory of the system to check and integrate (its etc/crypttab, initramfs,
    /// LVM devices file, fstab); commands for it run in `chroot DIR`.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,

    /// Print machine-readable progress lines (one JSON object per step) instead of a bar.
    #[arg(long)]
    pub progress_json: bool,
    /// Cap the copy at MB/s (10^6 bytes per second, on average over each step), to stay
    /// out of the way of a machine in use. Default: as fast as the device goes.
    #[arg(long, value_name = "MB/s", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Cut a step's suspended window (live I/O on the device waits) that runs longer than
    /// MS milliseconds: resume live I/O, pause, try the step again (4 times at most; the
    /// fifth window runs to its end). Default: 50, or twice what the step's read-back took
    /// a moment earlier if that is longer (a disk slow all the time is not cut in vain).
    /// 0 cuts every window that can be cut (after its first MiB).
    #[arg(long, value_name = "MS")]
    pub max_stall: Option<u64>,
}

impl RunOpts {
    /// `--rate` in bytes per second.
    pub fn rate_bytes(&self) -> Option<u64> {
        self.rate.map(|r| (r * 1e6) as u64)
    }

    /// `--max-stall` as a duration.
    pub fn max_stall(&self) -> Option<std::time::Duration> {
        self.max_stall.map(std::time::Duration::from_millis)
    }
}

/// A number of 512-byte sectors: a plain number is sectors; with a suffix K, M, G or T
/// (also KiB, MiB, GiB, TiB; binary units, as cryptsetup's sizes) a size.
pub fn parse_sectors(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("`{s}` is not a size: a number of 512-byte sectors, or a number with K, M, G or T (e.g. 16M)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => return Ok(n),
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        _ => return Err(bad()),
    };
    // every unit is a whole number of sectors (1K = 2)
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or_else(bad)?;
    Ok(bytes / 512)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.1 => Ok(r),
        _ => Err(format!("`{s}` is not a rate in MB/s (a number, at least 0.1)")),
    }
}

impl ConvertOpts {
    pub fn plan_options(&self) -> plan::Options {
        plan::Options {
            luks: match self.luks_type {
                TypeArg::Luks1 => LuksVersion::Luks1,
                TypeArg::Luks2 => LuksVersion::Luks2,
            },
            cipher: self.cipher.clone(),
            key_bits: self.key_size,
            name: self.name.clone(),
            shift: self.offset,
            chunk: self.chunk,
            region: self.region,
            pbkdf: self.pbkdf.clone(),
            force_unknown_boot: self.force_unknown_boot,
            kernel_cipher_error: None,
            recovery_key: self.recovery_key,
        }
    }
}

/// Parses the command line; `--version` also names the libcryptsetup luksify runs with
/// (`runtime`) and the one it was built against, the line a bug report should quote.
pub fn parse_with_version(runtime: &str) -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let long = format!(
        "{} (libcryptsetup {runtime}; built against {})",
        env!("CARGO_PKG_VERSION"),
        env!("LUKSIFY_LIBCRYPTSETUP_BUILT")
    );
    let long: &'static str = Box::leak(long.into_boxed_str()); // once per process
    let exits: &'static str = Box::leak(crate::error::exit::help_text().into_boxed_str());
    let mut m = Cli::command().long_version(long).after_long_help(exits).get_matches();
    Cli::from_arg_matches_mut(&mut m).unwrap_or_else(|e| e.exit())
}

impl Cli {
    /// `--json` was asked for: standard output is JSON, errors included.
    pub fn wants_json(&self) -> bool {
        self.json || matches!(self.command, Some(Command::Status { json: true, .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_sectors_or_binary_units() {
        assert_eq!(parse_sectors("32768"), Ok(32768));
        assert_eq!(parse_sectors("16M"), Ok(32768));
        assert_eq!(parse_sectors("16MiB"), Ok(32768));
        assert_eq!(parse_sectors("2m"), Ok(4096));
        assert_eq!(parse_sectors("4K"), Ok(8));
        assert_eq!(parse_sectors("1G"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_sectors("1K"), Ok(2));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_reason() {
        for s in ["", "M", "16MB", "1.5M", "-4", "16 M", "99999999999999999999T", "16X"] {
            assert!(parse_sectors(s).is_err(), "{s} accepted");
        }
        assert!(parse_sectors("1X").unwrap_err().contains("e.g. 16M"));
    }

    #[test]
    fn offset_parses_with_a_suffix_on_the_command_line() {
        use clap::Parser;
        let c = Cli::try_parse_from(["luksify", "--offset", "16M", "--chunk", "4M", "--dry-run", "/dev/sda5"]).unwrap();
        assert_eq!(c.opts.offset, Some(32768));
        assert_eq!(c.opts.chunk, Some(8192));
        assert_eq!(c.opts.region, 8192);
    }
}
