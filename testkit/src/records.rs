//! The fsync'd record writer and its verifier.
//!
//! Record `n` lives at byte `n * record_size` of the file:
//!
//!     0..8    magic  b"LKREC\0\x01\0"
//!     8..16   n      u64 LE
//!     16..20  record_size u32 LE
//!     20..24  crc32 of bytes [0..20] ++ [24..record_size]
//!     24..    payload = fill::gen(PAYLOAD_SEED ^ n, 0, ..)
//!
//! The writer appends record n, fsyncs the file, and only after fsync returned
//! appends "n\n" to the ack file and fsyncs that. So every number in the ack
//! file was durable on the device under test before it was acknowledged.
use crate::{fill, ioe, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const MAGIC: &[u8; 8] = b"LKREC\0\x01\0";
const PAYLOAD_SEED: u64 = 0x6c6b_7265_636f_7264;

pub fn encode(n: u64, rs: usize, buf: &mut [u8]) {
    assert!(rs >= 64 && buf.len() == rs);
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&n.to_le_bytes());
    buf[16..20].copy_from_slice(&(rs as u32).to_le_bytes());
    fill::gen(PAYLOAD_SEED ^ n, 0, &mut buf[24..]);
    let crc = crc_of(buf);
    buf[20..24].copy_from_slice(&crc.to_le_bytes());
}

fn crc_of(buf: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[0..20]);
    h.update(&buf[24..]);
    h.finalize()
}

/// Why record `n` (as read from the file) is not intact, if it is not.
pub fn check(n: u64, rs: usize, buf: &[u8]) -> std::result::Result<(), String> {
    if &buf[0..8] != MAGIC {
        return Err(if buf.iter().all(|&b| b == 0) {
            "all zeroes (never written or lost)".into()
        } else {
            "bad magic (overwritten by other data)".into()
        });
    }
    let got_n = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    if got_n != n {
        return Err(format!("holds record number {got_n} instead"));
    }
    let got_rs = u32::from_le_bytes(buf[16..20].try_into().unwrap()) as usize;
    if got_rs != rs {
        return Err(format!("record size {got_rs}, expected {rs} (use --record-size {got_rs})"));
    }
    let crc = u32::from_le_bytes(buf[20..24].try_into().unwrap());
    if crc != crc_of(buf) {
        return Err("checksum mismatch (torn or corrupted)".into());
    }
    let mut want = vec![0u8; rs - 24];
    fill::gen(PAYLOAD_SEED ^ n, 0, &mut want);
    if want[..] != buf[24..] {
        return Err("payload differs from what was written".into());
    }
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub struct WriterOpts {
    pub file: PathBuf,
    pub acked: PathBuf,
    pub record_size: usize,
    pub latency_out: Option<PathBuf>,
    pub count: Option<u64>,
    pub stop_file: Option<PathBuf>,
    pub interval_ms: u64,
}

pub fn writer(o: &WriterOpts) -> Result<()> {
    let rs = o.record_size;
    if rs < 64 || !rs.is_multiple_of(8) {
        return Err(format!("--record-size {rs}: must be a multiple of 8, at least 64"));
    }
    // SAFETY: installing a handler that only stores an atomic
    unsafe {
        let h = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, h);
        libc::signal(libc::SIGINT, h);
    }
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(&o.file)
        .map_err(ioe("open", &o.file))?;
    // Continue after the last whole record (a torn tail was never acked).
    let len = f.metadata().map_err(ioe("stat", &o.file))?.len();
    let mut n = len / rs as u64;
    if len % rs as u64 != 0 {
        f.set_len(n * rs as u64).map_err(ioe("truncate", &o.file))?;
    }
    f.seek(SeekFrom::Start(n * rs as u64)).map_err(ioe("seek", &o.file))?;
    let mut ack = OpenOptions::new().create(true).append(true).open(&o.acked).map_err(ioe("open", &o.acked))?;
    // A serial port (the QEMU full-system test acks on /dev/ttyS1) cannot be fsync'd:
    // wait instead until the tty has sent the line. An ack that never leaves the guest
    // only weakens the check; the record it names was fsync'd before the ack was written.
    let ack_is_tty = {
        use std::os::unix::fs::FileTypeExt;
        ack.metadata().map_err(ioe("stat", &o.acked))?.file_type().is_char_device()
    };
    let mut lat = match &o.latency_out {
        Some(p) => Some(BufWriter::new(OpenOptions::new().create(true).append(true).open(p).map_err(ioe("open", p))?)),
        None => None,
    };
    let first = n;
    let mut buf = vec![0u8; rs];
    eprintln!("lktest writer: appending {rs}-byte records to {} from #{n}", o.file.display());
    loop {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        if let Some(c) = o.count {
            if n - first >= c {
                break;
            }
        }
        if let Some(s) = &o.stop_file {
            if s.exists() {
                break;
            }
        }
        encode(n, rs, &mut buf);
        let t0 = Instant::now();
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        f.write_all(&buf).map_err(ioe("write", &o.file))?;
        f.sync_all().map_err(ioe("fsync", &o.file))?;
        let us = t0.elapsed().as_micros();
        writeln!(ack, "{n}").map_err(ioe("write", &o.acked))?;
        if ack_is_tty {
            use std::os::unix::io::AsRawFd;
            // SAFETY: tcdrain on a file descriptor we own; it only waits.
            if unsafe { libc::tcdrain(ack.as_raw_fd()) } != 0 {
                return Err(ioe("tcdrain", &o.acked)(std::io::Error::last_os_error()));
            }
        } else {
            ack.sync_all().map_err(ioe("fsync", &o.acked))?;
        }
        if let Some(l) = lat.as_mut() {
            writeln!(l, "{n} {us} {:.1}", started.as_secs_f64() * 1000.0)
                .map_err(ioe("write", o.latency_out.as_ref().unwrap()))?;
            if n.is_multiple_of(32) {
                let _ = l.flush();
            }
        }
        n += 1;
        if o.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(o.interval_ms));
        }
    }
    if let Some(mut l) = lat {
        let _ = l.flush();
    }
    eprintln!("lktest writer: stopped after {} records (#{first}..#{})", n - first, n.saturating_sub(1));
    Ok(())
}

/// Numbers in the ack file; a last line without its newline is ignored (it
/// was being written when the power went).
pub fn read_acks(p: &Path) -> Result<Vec<u64>> {
    let f = File::open(p).map_err(ioe("open", p))?;
    let mut out = Vec::new();
    let mut r = BufReader::new(f);
    let mut line = String::new();
    let mut lineno = 0;
    loop {
        line.clear();
        let got = r.read_line(&mut line).map_err(ioe("read", p))?;
        if got == 0 || !line.ends_with('\n') {
            break;
        }
        lineno += 1;
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        out.push(
            t.parse::<u64>().map_err(|_| format!("{}: line {lineno} is not a record number: {t:?}", p.display()))?,
        );
    }
    Ok(out)
}

pub fn verify(file: &Path, acked: &Path, rs: usize, min_acked: u64) -> Result<()> {
    let acks = read_acks(acked)?;
    if (acks.len() as u64) < min_acked {
        return Err(format!(
            "{} lists {} acked records, fewer than the --min-acked {min_acked}",
            acked.display(),
            acks.len()
        ));
    }
    let mut f = File::open(file).map_err(ioe("open", file))?;
    let len = f.metadata().map_err(ioe("stat", file))?.len();
    let whole = len / rs as u64;
    let mut buf = vec![0u8; rs];
    let mut bad = Vec::new();
    for &n in &acks {
        let why = if n >= whole {
            Some(format!("missing: file holds only {whole} whole records ({len} bytes)"))
        } else {
            f.seek(SeekFrom::Start(n * rs as u64)).map_err(ioe("seek", file))?;
            f.read_exact(&mut buf).map_err(ioe("read", file))?;
            check(n, rs, &buf).err()
        };
        if let Some(w) = why {
            bad.push(format!("record #{n}: {w}"));
        }
    }
    let max = acks.iter().max().copied();
    if !bad.is_empty() {
        let shown: Vec<_> = bad.iter().take(5).cloned().collect();
        return Err(format!(
            "{} of {} acked records are not intact in {}: {}{}",
            bad.len(),
            acks.len(),
            file.display(),
            shown.join("; "),
            if bad.len() > 5 { "; ..." } else { "" }
        ));
    }
    let beyond = match max {
        Some(m) => whole.saturating_sub(m + 1),
        None => whole,
    };
    println!(
        "ok: {} acked records intact in {} (last ack #{}); file holds {whole} whole records, {beyond} beyond the last ack",
        acks.len(),
        file.display(),
        max.map(|m| m.to_string()).unwrap_or_else(|| "-".into())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_and_corruption() {
        let mut b = vec![0u8; 4096];
        encode(42, 4096, &mut b);
        assert!(check(42, 4096, &b).is_ok());
        assert!(check(43, 4096, &b).unwrap_err().contains("number 42"));
        b[1000] ^= 1;
        assert!(check(42, 4096, &b).unwrap_err().contains("checksum"));
        assert!(check(1, 4096, &vec![0u8; 4096]).unwrap_err().contains("zeroes"));
    }
}
