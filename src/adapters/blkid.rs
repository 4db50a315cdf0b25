//! libblkid's low-level probe of a device (`libblkid-rs`): superblocks and partition tables
//! in safe mode, as `blkid -p` and `wipefs` see them. The decision what that means is
//! `core::facts::reconcile`.

use crate::core::facts::BlkidSays;
use libblkid_rs::{BlkidProbe, BlkidSafeprobeRet};
use std::path::Path;

/// What libblkid finds on `path` (opened read-only; nothing is written).
pub fn probe(path: &Path) -> Result<BlkidSays, String> {
    let e =
        |what: &'static str| move |err: libblkid_rs::BlkidErr| format!("libblkid: {what} {}: {err}", path.display());
    let mut p = BlkidProbe::new_from_filename(path).map_err(e("opening"))?;
    p.enable_superblocks(true).map_err(e("enabling superblock probing on"))?;
    p.enable_partitions(true).map_err(e("enabling partition table probing on"))?;
    Ok(match p.do_safeprobe().map_err(e("probing"))? {
        BlkidSafeprobeRet::None => BlkidSays::Nothing,
        BlkidSafeprobeRet::Ambiguous => BlkidSays::Ambivalent,
        BlkidSafeprobeRet::Success => {
            BlkidSays::Found { fs_type: p.lookup_value("TYPE").ok(), pt_type: p.lookup_value("PTTYPE").ok() }
        }
    })
}
