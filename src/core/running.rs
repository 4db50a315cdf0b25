//! Whether a luksify runs on a device now, and how fast: the progress file a running
//! luksify keeps (`/run/luksify/<kname>.progress.json`), its rate over the last seconds,
//! who holds the device lock (from `/proc/locks`), and what `status` makes of them.
//! Pure: the adapters read and write the files.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Seconds of progress the rate is averaged over.
pub const RATE_WINDOW_S: f64 = 10.0;
/// The progress file is rewritten at most this often (seconds).
pub const WRITE_EVERY_S: f64 = 1.0;

/// What a running luksify (convert or resume, either engine) writes of its progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ProgressFile {
    /// The luksify process.
    pub pid: u32,
    /// Bytes moved (encrypted) so far, and in all.
    pub moved_bytes: u64,
    pub total_bytes: u64,
    /// Bytes per second over the last [`RATE_WINDOW_S`] s; null until two samples are apart.
    pub rate_bytes_per_s: Option<f64>,
    /// When this was written (wall clock, ms since the epoch).
    pub epoch_ms: u64,
}

/// Samples of (seconds, bytes moved) over the last [`RATE_WINDOW_S`] seconds.
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: VecDeque<(f64, u64)>,
}

impl RateWindow {
    /// Record that `moved` bytes are moved at time `t` (seconds, monotonic).
    pub fn push(&mut self, t: f64, moved: u64) {
        self.samples.push_back((t, moved));
        // keep one sample at or before the window's start, so the window stays full
        while self.samples.len() > 2 && self.samples[1].0 <= t - RATE_WINDOW_S {
            self.samples.pop_front();
        }
    }

    /// Bytes per second between the oldest sample kept and the newest; None without two
    /// samples apart in time.
    pub fn rate(&self) -> Option<f64> {
        let (&(t0, m0), &(t1, m1)) = (self.samples.front()?, self.samples.back()?);
        (t1 > t0).then(|| m1.saturating_sub(m0) as f64 / (t1 - t0))
    }
}

/// Whether it is time to rewrite the progress file (at most once per [`WRITE_EVERY_S`]).
pub fn due(last_write: Option<f64>, now: f64) -> bool {
    last_write.is_none_or(|l| now - l >= WRITE_EVERY_S)
}

/// The pids holding a BSD lock (`FLOCK`) on the inode `ino` of the filesystem `major:minor`,
/// from the text of `/proc/locks` (`1: FLOCK  ADVISORY  WRITE 1234 00:05:321 0 EOF`; the
/// device in hex, the inode in decimal). Waiters (`->`) hold nothing and are skipped.
pub fn flock_holders(proc_locks: &str, major: u32, minor: u32, ino: u64) -> Vec<u32> {
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    proc_locks
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // id, kind, mode, access, pid, dev:ino, start, end ("->" after the id for a waiter)
            if f.len() < 6 || f[1] != "FLOCK" {
                return None;
            }
            (f[5] == want).then(|| f[4].parse().ok()).flatten()
        })
        .collect()
}

/// What `status` says of a luksify running on the device.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "running", rename_all = "lowercase")]
pub enum Running {
    /// Nobody holds the device lock: nothing runs (a progress file left is stale).
    No,
    /// `pid` holds the device lock; rate and time left when its progress file says them.
    Yes { pid: u32, rate_bytes_per_s: Option<f64>, eta_s: Option<f64>, moved_bytes: Option<u64> },
}

/// Judge from the device lock's holders and the progress file: running only while a process
/// holds the lock, with the rate only from that process's own file.
pub fn judge(lock_holders: &[u32], file: Option<&ProgressFile>) -> Running {
    let Some(&holder) = lock_holders.first() else { return Running::No };
    match file.filter(|f| lock_holders.contains(&f.pid)) {
        Some(f) => {
            let rate = f.rate_bytes_per_s.filter(|r| *r > 0.0);
            let left = f.total_bytes.saturating_sub(f.moved_bytes);
            Running::Yes {
                pid: f.pid,
                rate_bytes_per_s: rate,
                eta_s: rate.map(|r| left as f64 / r),
                moved_bytes: Some(f.moved_bytes),
            }
        }
        None => Running::Yes { pid: holder, rate_bytes_per_s: None, eta_s: None, moved_bytes: None },
    }
}

/// Bytes for a person: `512 B`, `3.2 KiB`, `120.0 MiB`, `1.5 GiB`, `2.0 TiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A duration for a person: `45 s`, `3 min 05 s`, `2 h 07 min`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// The `running:` line of `status` (without its label).
pub fn describe(r: &Running, device: &str) -> String {
    match r {
        Running::No => format!("not running: `luksify resume {device}` continues"),
        Running::Yes { pid, rate_bytes_per_s: Some(rate), eta_s, .. } => {
            let eta = eta_s.map(|e| format!(", about {} left", human_duration(e))).unwrap_or_default();
            format!("yes, luksify process {pid}, {}/s{eta}", human_bytes(rate.round() as u64))
        }
        Running::Yes { pid, .. } => format!("yes, luksify process {pid} (rate not measured yet)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn file(pid: u32, moved: u64, total: u64, rate: Option<f64>) -> ProgressFile {
        ProgressFile { pid, moved_bytes: moved, total_bytes: total, rate_bytes_per_s: rate, epoch_ms: 0 }
    }

    #[test]
    fn rate_is_averaged_over_the_last_ten_seconds() {
        let mut w = RateWindow::default();
        assert_eq!(w.rate(), None);
        w.push(0.0, 0);
        assert_eq!(w.rate(), None, "one sample is no rate");
        // 100 MiB/s for 20 s, then 10 MiB/s for 10 s: the window sees only the slow part
        for t in 1..=20 {
            w.push(t as f64, t * 100 * MIB);
        }
        assert_eq!(w.rate(), Some(100.0 * MIB as f64));
        for t in 21..=30 {
            w.push(t as f64, 2000 * MIB + (t - 20) * 10 * MIB);
        }
        assert_eq!(w.rate(), Some(10.0 * MIB as f64));
        assert!(w.samples.len() <= 12, "old samples are dropped: {}", w.samples.len());
    }

    #[test]
    fn the_file_is_written_at_most_once_a_second() {
        assert!(due(None, 0.0));
        assert!(!due(Some(5.0), 5.9));
        assert!(due(Some(5.0), 6.0));
    }

    #[test]
    fn flock_holders_match_device_and_inode_and_skip_waiters() {
        let locks = "\
1: FLOCK  ADVISORY  WRITE 4242 00:05:321 0 EOF
1: -> FLOCK  ADVISORY  WRITE 4343 00:05:321 0 EOF
2: POSIX  ADVISORY  WRITE 99 00:05:321 0 EOF
3: FLOCK  ADVISORY  WRITE 77 00:05:322 0 EOF
4: FLOCK  ADVISORY  WRITE 78 fd:01:321 0 EOF
5: OFDLCK ADVISORY  READ  -1 00:05:321 0 EOF
";
        assert_eq!(flock_holders(locks, 0, 5, 321), vec![4242]);
        assert_eq!(flock_holders(locks, 0xfd, 1, 321), vec![78]);
        assert_eq!(flock_holders(locks, 0, 5, 999), Vec::<u32>::new());
        assert_eq!(flock_holders("", 0, 5, 321), Vec::<u32>::new());
    }

    #[test]
    fn running_needs_the_lock_and_the_rate_needs_the_holders_own_file() {
        let f = file(10, 256 * MIB, 1024 * MIB, Some(64.0 * MIB as f64));
        // nobody holds the lock: a file left behind (a luksify killed) is stale
        assert_eq!(judge(&[], Some(&f)), Running::No);
        assert_eq!(judge(&[], None), Running::No);
        // the holder's own file: rate and time left (768 MiB at 64 MiB/s = 12 s)
        assert_eq!(
            judge(&[10], Some(&f)),
            Running::Yes {
                pid: 10,
                rate_bytes_per_s: Some(64.0 * MIB as f64),
                eta_s: Some(12.0),
                moved_bytes: Some(256 * MIB)
            }
        );
        // another process holds the lock (the file is an older run's): running, no rate
        assert_eq!(
            judge(&[11], Some(&f)),
            Running::Yes { pid: 11, rate_bytes_per_s: None, eta_s: None, moved_bytes: None }
        );
        // not measured yet, or a zero rate: no time left
        let g = file(10, 0, MIB, None);
        assert!(matches!(judge(&[10], Some(&g)), Running::Yes { rate_bytes_per_s: None, eta_s: None, .. }));
        let z = file(10, 0, MIB, Some(0.0));
        assert!(matches!(judge(&[10], Some(&z)), Running::Yes { rate_bytes_per_s: None, eta_s: None, .. }));
    }

    #[test]
    fn sizes_and_durations_read_as_a_person_says_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 + 200), "3.2 KiB");
        assert_eq!(human_bytes(120 * MIB), "120.0 MiB");
        assert_eq!(human_bytes(1536 * MIB), "1.5 GiB");
        assert_eq!(human_bytes(2 << 40), "2.0 TiB");
        assert_eq!(human_duration(44.6), "45 s");
        assert_eq!(human_duration(185.0), "3 min 05 s");
        assert_eq!(human_duration(7620.0), "2 h 07 min");
    }

    #[test]
    fn the_running_line_says_pid_rate_and_time_left_or_how_to_continue() {
        let d = "/dev/sda5";
        assert_eq!(describe(&Running::No, d), "not running: `luksify resume /dev/sda5` continues");
        let f = file(10, 256 * MIB, 1024 * MIB, Some(64.0 * MIB as f64));
        assert_eq!(describe(&judge(&[10], Some(&f)), d), "yes, luksify process 10, 64.0 MiB/s, about 12 s left");
        assert_eq!(describe(&judge(&[12], None), d), "yes, luksify process 12 (rate not measured yet)");
    }
}
