//! Thin wrappers over the outside world.
pub mod rawdisk;
pub mod sys;
pub mod kernel;
