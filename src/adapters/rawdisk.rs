//! The raw partition as the engine's [`Disk`]: O_DIRECT I/O through a bounce buffer that is
//! allocated once (so nothing is allocated while the bridge is suspended), and a flush that
//! reaches the disk's cache (fsync on a block device issues a cache flush).

use crate::engine::{Disk, IoBuf};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const ALIGN: usize = 4096;
const BOUNCE: usize = 1 << 20;

pub struct RawDisk {
    file: File,
    bounce: IoBuf,
    /// Test-only fault injection (LUKSIFY_TEST_HANG_AFTER_FLUSH_OF=<sector>, read-write
    /// opens only): the first flush after a write that starts at that sector completes, then
    /// the process says so on stderr and hangs (a test bed cuts the power there). Used to stop
    /// a LUKS2 cut-over inside its window (sector 8: the header's bulk is durable, its first
    /// 4 KiB not yet written).
    hang_after_flush_of: Option<u64>,
    /// A write at that sector happened since the last flush.
    hang_armed: bool,
}

impl RawDisk {
    /// Open read-write with O_DIRECT (a block device that refuses it is an error; a plain
    /// file on tmpfs in tests falls back to buffered I/O + fsync: see `open_direct`).
    pub fn open(path: &Path, writable: bool) -> io::Result<RawDisk> {
        Self::open_with_bounce(path, writable, BOUNCE)
    }

    /// As [`RawDisk::open`], with a bounce buffer of `bounce` bytes (a multiple of 4096):
    /// larger I/O loops over it.
    pub fn open_with_bounce(path: &Path, writable: bool, bounce: usize) -> io::Result<RawDisk> {
        assert!(bounce > 0 && bounce.is_multiple_of(ALIGN));
        let (file, _) = crate::adapters::blockdev::open_direct(path, |extra| {
            OpenOptions::new().read(true).write(writable).custom_flags(extra).open(path)
        })?;
        let hang_after_flush_of = match writable {
            true => std::env::var("LUKSIFY_TEST_HANG_AFTER_FLUSH_OF").ok().and_then(|v| v.parse().ok()),
            false => None,
        };
        Ok(RawDisk { file, bounce: IoBuf::new(bounce)?, hang_after_flush_of, hang_armed: false })
    }
}

fn check(sector: u64, len: usize) -> io::Result<u64> {
    if !len.is_multiple_of(512) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "I/O length is not a multiple of 512"));
    }
    sector.checked_mul(512).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "sector out of range"))
}

/// Whether `buf` can go to O_DIRECT as it is (no bounce): 4 KiB-aligned in memory (the
/// engine's step buffers are: see [`IoBuf`]) and whole sectors long.
fn direct_ok(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(ALIGN) && buf.len().is_multiple_of(512)
}

impl Disk for RawDisk {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut off = check(sector, buf.len())?;
        if direct_ok(buf) {
            return self.file.read_exact_at(buf, off);
        }
        let bounce = self.bounce.len();
        for piece in buf.chunks_mut(bounce) {
            // O_DIRECT needs the length aligned too: round up, copy out what was asked.
            let n = piece.len().div_ceil(512) * 512;
            let b = &mut self.bounce[..n];
            self.file.read_exact_at(b, off)?;
            piece.copy_from_slice(&b[..piece.len()]);
            off += piece.len() as u64;
        }
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> io::Result<()> {
        let mut off = check(sector, buf.len())?;
        if self.hang_after_flush_of == Some(sector) {
            self.hang_armed = true;
        }
        if direct_ok(buf) {
            return self.file.write_all_at(buf, off);
        }
        let bounce = self.bounce.len();
        for piece in buf.chunks(bounce) {
            let b = &mut self.bounce[..piece.len()];
            b.copy_from_slice(piece);
            self.file.write_all_at(b, off)?;
            off += piece.len() as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        if self.hang_armed {
            eprintln!(
                "luksify: test hook: the write at sector {} is flushed; hanging (LUKSIFY_TEST_HANG_AFTER_FLUSH_OF)",
                self.hang_after_flush_of.unwrap_or(0)
            );
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_on_a_file_unaligned_lengths_in_sectors() {
        let dir = std::env::temp_dir().join(format!("luksify-rawdisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        std::fs::write(&p, vec![0u8; 4 << 20]).unwrap();
        let mut d = RawDisk::open(&p, true).unwrap();
        let data: Vec<u8> = (0..(3 * BOUNCE / 2 + 512)).map(|i| (i * 7 % 251) as u8).collect();
        d.write(3, &data).unwrap();
        d.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        d.read(3, &mut back).unwrap();
        assert_eq!(back, data);
        let mut one = vec![0u8; 512];
        d.read(2, &mut one).unwrap();
        assert!(one.iter().all(|&b| b == 0));
        assert!(d.write(0, &[1u8; 100]).is_err());
        // An aligned buffer goes to the file as it is (no bounce); both paths agree.
        let mut a = IoBuf::new(8192).unwrap();
        assert!(direct_ok(&a));
        a.copy_from_slice(&data[..8192]);
        d.write(40, &a).unwrap();
        let mut back = vec![0u8; 8192 + 512];
        d.read(40, &mut back[512..]).unwrap();
        assert_eq!(&back[512..], &data[..8192]);
        a.fill(0);
        d.read(40, &mut a).unwrap();
        assert_eq!(&a[..], &data[..8192]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
