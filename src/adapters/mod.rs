//! Thin wrappers over the outside world.
pub(crate) mod blkid;
pub mod blockdev;
pub(crate) mod bootchain;
pub(crate) mod bootprobe;
pub(crate) mod dm;
pub(crate) mod integrate;
pub(crate) mod kernel;
pub(crate) mod logind;
pub mod luks;
pub mod lvm;
pub(crate) mod lvmlock;
pub(crate) mod lvmshell;
pub mod probe;
pub(crate) mod progressfile;
pub(crate) mod rawdisk;
pub(crate) mod sys;

/// A fresh, empty scratch directory for one unit test: `luksify-<module>-<name>-<pid>` under
/// the temporary directory, whatever an earlier run left there removed first.
#[cfg(test)]
pub(crate) fn scratch_dir(module: &str, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("luksify-{module}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
