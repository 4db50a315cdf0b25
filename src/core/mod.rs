//! The pure core: no I/O, no syscalls. Given facts (a [`facts::DeviceFacts`]) and options,
//! it computes the plan, the device-mapper tables of every phase, the journal's bytes and
//! what to do next from any journaled state.

pub mod boot;
pub mod dmline;
pub mod evidence;
pub mod facts;
pub mod geometry;
pub mod integrate;
pub mod journal;
pub mod kinds;
pub mod marker;
pub mod plan;
pub mod state;
pub mod tables;
pub mod units;
pub mod xts;
