//! Thin wrappers over the outside world.
pub mod rawdisk;
pub mod sys;
pub mod kernel;
pub mod blockdev;
pub mod dm;
pub mod lvm;
pub mod lvmlock;
pub mod probe;
pub mod luks;
pub mod bootprobe;
pub mod integrate;
