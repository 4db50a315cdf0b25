//! The pure core: no I/O, no syscalls. Given facts (a [`facts::DeviceFacts`]) and options,
//! it computes the plan, the device-mapper tables of every phase, the journal's bytes and
//! what to do next from any journaled state.

pub mod boot;
pub(crate) mod bootchain;
pub mod cutover;
pub(crate) mod dmline;
pub mod dmstats;
pub(crate) mod evidence;
pub mod facts;
pub mod geometry;
pub(crate) mod integrate;
pub(crate) mod journal;
pub mod kinds;
pub mod luks2meta;
pub mod marker;
pub mod plan;
pub mod recovery;
pub mod running;
pub(crate) mod state;
pub(crate) mod tables;
pub mod tick;
pub(crate) mod units;
pub(crate) mod xts;
