//! The disk: what is durable, what reads return, the volatile write cache between, and
//! failing areas.

use super::SECTOR;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A failing area of the raw disk (sectors [start, end)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadArea {
    pub start: u64,
    pub end: u64,
    pub reads: bool,
    pub writes: bool,
    /// Writes do not fail: they are acknowledged and lost (a disk that lies).
    pub silent: bool,
}

/// The physical disk: what is durable, what reads return, and the volatile cache between.
#[derive(Clone)]
pub struct DiskImage {
    pub n: u64,
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Completed but unflushed writes, in completion order.
    pub(super) cache: Vec<(u64, Vec<u8>)>,
    pub bad: Vec<BadArea>,
    pub writes: u64,
    pub flushes: u64,
}

impl DiskImage {
    pub(super) fn new(image: Vec<u8>) -> DiskImage {
        let n = (image.len() / SECTOR) as u64;
        DiskImage {
            n,
            durable: image.clone(),
            current: image,
            cache: Vec::new(),
            bad: Vec::new(),
            writes: 0,
            flushes: 0,
        }
    }

    fn range(&self, sector: u64, len: usize) -> Result<std::ops::Range<usize>, String> {
        if !len.is_multiple_of(SECTOR) || len == 0 {
            return Err(format!("unaligned I/O of {len} bytes"));
        }
        let end = sector + (len / SECTOR) as u64;
        if end > self.n {
            return Err(format!("I/O beyond the end of the disk: {sector}+{} > {}", len / SECTOR, self.n));
        }
        Ok(sector as usize * SECTOR..end as usize * SECTOR)
    }

    fn is_bad(&self, sector: u64, len: usize, write: bool) -> bool {
        let end = sector + (len / SECTOR) as u64;
        self.bad
            .iter()
            .any(|b| (if write { b.writes && !b.silent } else { b.reads }) && b.start < end && sector < b.end)
    }

    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), String> {
        let r = self.range(sector, buf.len())?;
        if self.is_bad(sector, buf.len(), false) {
            return Err(format!("EIO reading sector {sector}"));
        }
        buf.copy_from_slice(&self.current[r]);
        Ok(())
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), String> {
        let r = self.range(sector, data.len())?;
        if self.is_bad(sector, data.len(), true) {
            return Err(format!("EIO writing sector {sector}"));
        }
        let end = sector + (data.len() / SECTOR) as u64;
        if self.bad.iter().any(|b| b.silent && b.writes && b.start < end && sector < b.end) {
            self.writes += 1;
            return Ok(());
        }
        self.current[r].copy_from_slice(data);
        self.cache.push((sector, data.to_vec()));
        self.writes += 1;
        Ok(())
    }

    /// Make the `p` oldest cached writes durable (what a flush that failed half-way did).
    pub(super) fn flush_prefix(&mut self, p: usize) {
        for (s, d) in self.cache.drain(..p) {
            let a = s as usize * SECTOR;
            self.durable[a..a + d.len()].copy_from_slice(&d);
        }
    }

    pub fn flush(&mut self) {
        for (s, d) in self.cache.drain(..) {
            let a = s as usize * SECTOR;
            self.durable[a..a + d.len()].copy_from_slice(&d);
        }
        self.flushes += 1;
    }

    /// What survives a power cut: the durable image plus a random subset of the cached writes,
    /// in a random order, each possibly torn (only some of its sectors).
    pub fn crash_image(&self, rng: &mut ChaCha8Rng, policy: CachePolicy) -> Vec<u8> {
        let mut img = self.durable.clone();
        let mut kept: Vec<(u64, Vec<u8>)> = Vec::new();
        for (s, d) in &self.cache {
            let sectors = d.len() / SECTOR;
            let keep: Vec<bool> = match policy {
                CachePolicy::LoseAll => vec![false; sectors],
                CachePolicy::KeepAll => vec![true; sectors],
                CachePolicy::TearAll => {
                    let p = if sectors > 1 { rng.gen_range(1..sectors) } else { 0 };
                    (0..sectors).map(|i| i < p).collect()
                }
                CachePolicy::Random => match rng.gen_range(0..10) {
                    0..=3 => vec![false; sectors],
                    4..=7 => vec![true; sectors],
                    8 => {
                        let p = rng.gen_range(0..=sectors);
                        (0..sectors).map(|i| i < p).collect()
                    }
                    _ => (0..sectors).map(|_| rng.gen_bool(0.5)).collect(),
                },
            };
            for (i, k) in keep.into_iter().enumerate() {
                if k {
                    kept.push((s + i as u64, d[i * SECTOR..(i + 1) * SECTOR].to_vec()));
                }
            }
        }
        if policy == CachePolicy::Random {
            kept.shuffle(rng);
        }
        for (s, d) in kept {
            let a = s as usize * SECTOR;
            img[a..a + SECTOR].copy_from_slice(&d);
        }
        img
    }

    pub fn durable(&self) -> &[u8] {
        &self.durable
    }
    pub fn current(&self) -> &[u8] {
        &self.current
    }
    pub fn cached_writes(&self) -> usize {
        self.cache.len()
    }
}

/// Which unflushed writes survive a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    Random,
    LoseAll,
    KeepAll,
    /// Every unflushed multi-sector write keeps a strict, non-empty prefix of its sectors.
    TearAll,
}
