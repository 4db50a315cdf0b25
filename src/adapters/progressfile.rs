//! The progress file of a running luksify, `/run/luksify/<kname>.progress.json`
//! ([`crate::core::running::ProgressFile`]): written (atomically, by rename) by convert and
//! resume at most once a second, removed when they end; read by `status`.

use crate::core::running::ProgressFile;
use std::path::{Path, PathBuf};

/// Where the progress files live (a tmpfs: never on the device being converted); the boot
/// chain keeps its passphrase file there too, so the directory is made 0700, as it makes it.
pub const DIR: &str = crate::core::bootchain::RUN_DIR;

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
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(d)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(pid: u32) -> ProgressFile {
        ProgressFile { pid, moved_bytes: 1, total_bytes: 2, rate_bytes_per_s: Some(3.0), epoch_ms: 4 }
    }

    #[test]
    fn written_whole_in_a_private_directory_and_only_our_own_file_is_removed() {
        use std::os::unix::fs::PermissionsExt;
        let d = crate::adapters::scratch_dir("progressfile", "own").join("run");
        let p = d.join("sda5.progress.json");
        write(&p, &file(std::process::id())).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let back: ProgressFile = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back, file(std::process::id()));
        // no temporary file left beside it
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        remove_own(&p);
        assert!(!p.exists());
        // another process's file stays
        write(&p, &file(1)).unwrap();
        remove_own(&p);
        assert!(p.exists());
        let _ = std::fs::remove_dir_all(d.parent().unwrap());
    }

    #[test]
    fn named_after_the_kernel_name() {
        assert_eq!(
            path_of(Path::new("/dev/luksify-no-such-device")),
            Path::new("/run/luksify/luksify-no-such-device.progress.json")
        );
    }
}
