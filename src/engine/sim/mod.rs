//! A deterministic simulator of the outside world the engine drives: a disk with a volatile
//! write cache ([`SimDisk`]), a device-mapper ([`SimKernel`]) with linear, striped, crypt
//! (real AES-XTS-plain64) and mirror (dm-mirror region semantics) targets, and a live system
//! (LVs, a writer that fsyncs, a reader that checks every read) running between the engine's
//! operations.
//!
//! Every Disk call, every Kernel call and every mirror recovery write is an *operation*,
//! numbered from 0. [`Sim::set_fault`] makes operation `i` fail in one of three ways:
//!
//! - [`Fault::PowerCut`]: the machine stops. [`Sim::power_cut`] then builds the rebooted
//!   machine: the durable image survives, plus a seeded subset of the unflushed writes
//!   (multi-sector writes possibly torn); no dm device exists; no LV is active.
//! - [`Fault::Kill`]: the luksify process dies; the kernel, the disk cache, the LVs and the
//!   writer keep running (mirror recovery too); `luksify resume` runs on the live system.
//! - [`Fault::Error`]: that one operation fails (EIO, ENOMEM…), everything else keeps working:
//!   the engine's own error paths run.
//!
//! The expected content is tracked per plaintext sector of the PV: the last *acknowledged*
//! write (a write followed by a successful flush through the stack), and the writes issued
//! since. After a power cut a sector may hold any of those, never anything else.
//! [`Sim::check_final`] checks the whole device against that.
//!
//! All randomness comes from a seed: a failing case replays exactly.

mod content;
mod disk;
mod dm;
mod handles;
mod live;
mod simulation;
mod world;

#[cfg(test)]
mod cutover_tests;
#[cfg(test)]
mod replay;
#[cfg(test)]
mod steps_tests;
#[cfg(test)]
mod sweep;
#[cfg(test)]
mod tests;

pub use content::{content, key_and_header, label_sector, XtsSim};
pub use disk::{BadArea, CachePolicy, DiskImage};
pub use handles::{SimDisk, SimKernel};
pub use live::{Live, Lv, Model, Seg, WriterConfig};
pub use simulation::{Resumed, Sim};
pub use world::{Fault, Scenario, World};

use crate::core::tables::DevRef;

pub const SECTOR: usize = 512;
/// The raw partition.
pub const RAW: DevRef = DevRef { major: 98, minor: 5 };
/// dm devices get 254:N.
pub const DM_MAJOR: u32 = 254;
pub const BRIDGE: &str = "sda5_crypt";
pub const LUKS_UUID: &str = "0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10";
pub const PV_UUID_RAW: &str = "Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56";
pub const PV_UUID: &str = "Ab12Cd-34Ef-56Gh-78Ij-90Kl-12Mn-34Op56";
pub const CIPHER: &str = "aes-xts-plain64";
/// Content id of the sectors past the PV ([L, N)) at the start.
const FILLER: u64 = u64::MAX;
/// One volume key for every simulated run (so the AES memo is shared by all of them).
const KEY_SEED: u64 = 0x6b6579;
