//! File manifests (sha256 of every regular file), raw device hashes, and the
//! continuous reader.
//!
//! Manifest format, one line per regular file, sorted by path:
//!     <sha256 hex> <size> <relative path>
use crate::aligned::AlignedBuf;
use crate::{ioe, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const BUF: usize = 1 << 20;

pub struct Entry {
    pub hash: String,
    pub size: u64,
    pub path: String,
}

fn walk(root: &Path, rel: &Path, dev: u64, exclude: &[String], out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(ioe("read dir", &dir))?
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(ioe("read dir", &dir))?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let r = rel.join(e.file_name());
        let rs = r.to_string_lossy();
        if exclude.iter().any(|x| rs == x.as_str() || rs.starts_with(&format!("{x}/"))) {
            continue;
        }
        let md = std::fs::symlink_metadata(root.join(&r)).map_err(ioe("stat", root.join(&r)))?;
        if md.is_dir() {
            if md.dev() == dev {
                walk(root, &r, dev, exclude, out)?;
            }
        } else if md.is_file() {
            out.push(r);
        }
    }
    Ok(())
}

fn hash_reader<R: Read>(mut r: R, limit: Option<u64>) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let want = match limit {
            Some(l) if l - total < BUF as u64 => (l - total) as usize,
            _ => BUF,
        };
        if want == 0 {
            break;
        }
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&h.finalize()), total))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn make(root: &Path, out: &Path, exclude: &[String]) -> Result<()> {
    let dev = std::fs::metadata(root).map_err(ioe("stat", root))?.dev();
    let mut files = Vec::new();
    walk(root, Path::new(""), dev, exclude, &mut files)?;
    let mut text = String::new();
    let mut bytes = 0;
    for r in &files {
        let p = root.join(r);
        let (h, n) = hash_reader(File::open(&p).map_err(ioe("open", &p))?, None).map_err(ioe("read", &p))?;
        bytes += n;
        let rs = r.to_string_lossy();
        if rs.contains('\n') {
            return Err(format!("file name with a newline not supported: {rs:?}"));
        }
        text.push_str(&format!("{h} {n} {rs}\n"));
    }
    let mut f = File::create(out).map_err(ioe("create", out))?;
    f.write_all(text.as_bytes()).map_err(ioe("write", out))?;
    f.sync_all().map_err(ioe("fsync", out))?;
    println!("manifest: {} files, {bytes} bytes under {} -> {}", files.len(), root.display(), out.display());
    Ok(())
}

pub fn load(m: &Path) -> Result<Vec<Entry>> {
    let text = std::fs::read_to_string(m).map_err(ioe("read", m))?;
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut it = line.splitn(3, ' ');
        let (h, s, p) = (it.next(), it.next(), it.next());
        match (h, s.and_then(|s| s.parse::<u64>().ok()), p) {
            (Some(h), Some(size), Some(p)) if h.len() == 64 => {
                v.push(Entry { hash: h.to_string(), size, path: p.to_string() })
            }
            _ => return Err(format!("{}: line {} malformed: {line:?}", m.display(), i + 1)),
        }
    }
    if v.is_empty() {
        return Err(format!("{}: empty manifest", m.display()));
    }
    Ok(v)
}

pub fn verify(root: &Path, m: &Path) -> Result<()> {
    let entries = load(m)?;
    let mut bad = Vec::new();
    for e in &entries {
        let p = root.join(&e.path);
        match File::open(&p).and_then(|f| hash_reader(f, None)) {
            Err(err) => bad.push(format!("{}: {err}", e.path)),
            Ok((_, n)) if n != e.size => bad.push(format!("{}: size {n}, expected {}", e.path, e.size)),
            Ok((h, _)) if h != e.hash => bad.push(format!("{}: sha256 {h}, expected {}", e.path, e.hash)),
            Ok(_) => {}
        }
    }
    if !bad.is_empty() {
        return Err(format!(
            "{} of {} files under {} differ from {}: {}{}",
            bad.len(),
            entries.len(),
            root.display(),
            m.display(),
            bad.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
            if bad.len() > 5 { "; ..." } else { "" }
        ));
    }
    println!("ok: {} files under {} match {}", entries.len(), root.display(), m.display());
    Ok(())
}

pub fn hash_dev(dev: &Path, bytes: Option<u64>) -> Result<()> {
    let f = File::open(dev).map_err(ioe("open", dev))?;
    let (h, n) = hash_reader(f, bytes).map_err(ioe("read", dev))?;
    if let Some(b) = bytes {
        if n != b {
            return Err(format!("{}: only {n} of {b} bytes readable", dev.display()));
        }
    }
    println!("{h}  {}", dev.display());
    Ok(())
}

/// Read a file bypassing (or evicting) the page cache; returns (sha256, size).
fn cold_hash(p: &Path, buf: &mut AlignedBuf) -> std::io::Result<(String, u64)> {
    let f = match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(p) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let f = File::open(p)?;
            // SAFETY: plain fadvise on an open fd
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            f
        }
        Err(e) => return Err(e),
    };
    let mut f = f;
    let mut h = Sha256::new();
    let mut total = 0u64;
    let b = buf.as_mut_slice();
    loop {
        let n = f.read(b)?;
        if n == 0 {
            break;
        }
        h.update(&b[..n]);
        total += n as u64;
    }
    Ok((hex(&h.finalize()), total))
}

pub fn reader(root: &Path, m: &Path, until: &Path, status: Option<&Path>, passes: Option<u64>) -> Result<()> {
    let entries = load(m)?;
    let mut buf = AlignedBuf::new(BUF);
    let (mut checks, mut pass) = (0u64, 0u64);
    let write_status = |checks: u64, failures: u64| {
        if let Some(s) = status {
            let _ = std::fs::write(s, format!("checks {checks} failures {failures}\n"));
        }
    };
    while !until.exists() && passes.is_none_or(|p| pass < p) {
        for e in &entries {
            let p = root.join(&e.path);
            let res = cold_hash(&p, &mut buf);
            checks += 1;
            let why = match res {
                Err(err) => Some(format!("read error: {err}")),
                Ok((_, n)) if n != e.size => Some(format!("size {n}, expected {}", e.size)),
                Ok((h, _)) if h != e.hash => Some(format!("sha256 {h}, expected {}", e.hash)),
                Ok(_) => None,
            };
            if let Some(w) = why {
                write_status(checks, 1);
                return Err(format!("{}: {w} (after {checks} checks)", p.display()));
            }
            if until.exists() {
                break;
            }
        }
        pass += 1;
        write_status(checks, 0);
    }
    write_status(checks, 0);
    println!("ok: reader made {checks} checks in {pass} passes, no failure");
    Ok(())
}
