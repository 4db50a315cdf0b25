//! luksify: encrypt a live LVM physical volume with LUKS, in place and online.
//!
//! Layers (see HACKING.md): [`core`] is pure (plan, tables, journal, state machine);
//! [`adapters`] talk to the kernel, libcryptsetup, LVM and the block device; [`engine`]
//! drives the core through traits so a simulator can run it; [`cli`] and [`app`] are thin.

pub mod adapters;
pub mod app;
pub mod cli;
pub mod core;
pub mod engine;
pub mod error;
pub(crate) mod iobuf;
