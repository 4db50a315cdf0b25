//! The progress file of a running luksify, `/run/luksify/<kname>.progress.json`
//! ([`crate::core::running::ProgressFile`]): written (atomically, by rename) by convert and
//! resume at most once a second, removed when they end; read by `status`.

use crate::core::running::ProgressFile;
use std::path::{Path, PathBuf};

/// Where the progress files live (a tmpfs: never on the device being converted).
pub const DIR: &str = "/run/luksify";

/// The progress file of `device`: named after its kernel name (`sda5`), whatever path
/// named it (a symlink in /dev/disk/by-id leads to the same file).
pub fn path_of(device: &Path) -> PathBuf {
    let canon = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let kname = canon.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "device".into());
    Path::new(DIR).join(format!("{kname}.progress.json"))
}

/// Write `f` to `path` through a temporary file and a rename: a reader sees the old or the
/// new file, never half of one.
pub fn write(path: &Path, f: &ProgressFile) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(f).expect("serialises"))?;
    std::fs::rename(&tmp, path)
}

/// The progress file of `device`, if there is one that parses.
pub fn read(device: &Path) -> Option<ProgressFile> {
    serde_json::from_slice(&std::fs::read(path_of(device)).ok()?).ok()
}

/// Remove `path` if it is ours (written by this process): another luksify's file stays.
pub fn remove_own(path: &Path) {
    let own = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<ProgressFile>(&b).ok())
        .is_some_and(|f| f.pid == std::process::id());
    if own {
        let _ = std::fs::remove_file(path);
    }
}
