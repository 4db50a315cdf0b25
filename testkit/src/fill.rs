//! Deterministic pseudo-random content, a pure function of (seed, byte offset),
//! so any range can be checked independently.
use crate::{dev_size, ioe, Result};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;

const CHUNK: usize = 1 << 20;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fill `buf` with the content that belongs at byte `offset` (8-byte aligned).
pub fn gen(seed: u64, offset: u64, buf: &mut [u8]) {
    debug_assert!(offset.is_multiple_of(8));
    let base = splitmix(seed);
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let word = splitmix(base ^ (offset / 8 + i as u64)).to_le_bytes();
        w.copy_from_slice(&word[..w.len()]);
    }
}

pub fn fill(dev: &Path, seed: u64, bytes: Option<u64>) -> Result<()> {
    let mut f = OpenOptions::new().write(true).open(dev).map_err(ioe("open", dev))?;
    let total = match bytes {
        Some(b) => b,
        None => dev_size(&f).map_err(ioe("size of", dev))?,
    };
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < total {
        let n = ((total - off) as usize).min(CHUNK);
        gen(seed, off, &mut buf[..n]);
        f.write_all(&buf[..n]).map_err(ioe("write", dev))?;
        off += n as u64;
    }
    f.sync_all().map_err(ioe("fsync", dev))?;
    println!("filled {total} bytes of {} with seed {seed}", dev.display());
    Ok(())
}

pub fn check(dev: &Path, seed: u64, bytes: Option<u64>) -> Result<()> {
    let mut f = OpenOptions::new().read(true).open(dev).map_err(ioe("open", dev))?;
    let total = match bytes {
        Some(b) => b,
        None => dev_size(&f).map_err(ioe("size of", dev))?,
    };
    let mut want = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < total {
        let n = ((total - off) as usize).min(CHUNK);
        gen(seed, off, &mut want[..n]);
        f.read_exact(&mut got[..n]).map_err(ioe("read", dev))?;
        if want[..n] != got[..n] {
            let i = (0..n).find(|&i| want[i] != got[i]).unwrap();
            return Err(format!(
                "{}: content differs from seed {seed} at byte {} (sector {})",
                dev.display(),
                off + i as u64,
                (off + i as u64) / 512
            ));
        }
        off += n as u64;
    }
    println!("ok: {total} bytes of {} match seed {seed}", dev.display());
    Ok(())
}

/// A deterministic tree: `files` files spread over nested directories, sizes
/// from 0 bytes to a few hundred KiB (some not block-aligned), half text,
/// half binary, about `mib` MiB in all.
pub fn tree(dir: &Path, seed: u64, files: u64, mib: u64) -> Result<()> {
    let budget = mib << 20;
    let mut total = 0u64;
    let mut made = 0u64;
    for i in 0..files {
        let r = splitmix(seed ^ (i.wrapping_mul(0x1234_5678_9abc_def1)));
        let depth = r % 4;
        let mut p = dir.to_path_buf();
        for d in 0..depth {
            p.push(format!("d{}", (r >> (8 + 4 * d)) % 5));
        }
        std::fs::create_dir_all(&p).map_err(ioe("mkdir", &p))?;
        // mostly small files, a few big ones; average ~ budget / files
        let avg = (budget / files.max(1)).max(1);
        let size = match (r >> 32) % 16 {
            0 => 0,
            1..=9 => (r >> 40) % (avg / 2 + 1),
            10..=13 => avg / 2 + (r >> 40) % (avg + 1),
            _ => avg * 2 + (r >> 40) % (avg * 4 + 1),
        };
        let size = size.min(budget.saturating_sub(total));
        let text = (r >> 20) & 1 == 0;
        p.push(format!("f{i:04}{}", if text { ".txt" } else { ".bin" }));
        let mut buf = vec![0u8; size as usize];
        gen(seed ^ i, 0, &mut buf);
        if text {
            const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz      ETAOIN.,\n";
            for b in buf.iter_mut() {
                *b = ALPHA[*b as usize % ALPHA.len()];
            }
        }
        std::fs::write(&p, &buf).map_err(ioe("write", &p))?;
        total += size;
        made += 1;
    }
    println!("tree: {made} files, {total} bytes under {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn gen_is_position_independent() {
        let mut a = vec![0u8; 64];
        let mut b = vec![0u8; 32];
        gen(7, 0, &mut a);
        gen(7, 32, &mut b);
        assert_eq!(&a[32..], &b[..]);
        let mut c = vec![0u8; 64];
        gen(8, 0, &mut c);
        assert_ne!(a, c);
    }
}
