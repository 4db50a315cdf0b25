//! `luksify status [--json] DEVICE`: what the device shows of a conversion. Needs no
//! passphrase and writes nothing. A damaged journal is an error that says what is known.

use super::{device_size, engine_err, open_disk};
use crate::core::journal::State;
use crate::core::state as fsm;
use crate::engine;
use crate::error::{exit, Result};
use std::path::Path;

#[derive(serde::Serialize)]
struct StatusJson<'a> {
    device: String,
    in_progress: bool,
    state: Option<&'a str>,
    cursor: Option<u64>,
    move_sectors: Option<u64>,
    progress: Option<f64>,
    name: Option<&'a str>,
    luks_version: Option<u8>,
    luks_uuid: Option<&'a str>,
    seq: Option<u64>,
}

pub(super) fn status(device: &Path, json: bool) -> Result<i32> {
    let n = device_size(device)?;
    let mut disk = open_disk(device, false)?;
    let rec = engine::read_journal(&mut disk, n).map_err(|e| engine_err(e, device))?;
    let cursor = rec.as_ref().and_then(|r| match r.state {
        State::Migrating { cursor } => Some(cursor),
        _ => None,
    });
    if json {
        let s = StatusJson {
            device: device.display().to_string(),
            in_progress: rec.is_some(),
            state: rec.as_ref().map(|r| r.state.name()),
            cursor,
            move_sectors: rec.as_ref().map(|r| r.geometry.l),
            progress: rec.as_ref().map(|r| fsm::progress(&r.geometry, r.state)),
            name: rec.as_ref().map(|r| r.name.as_str()),
            luks_version: rec.as_ref().map(|r| r.luks_version),
            luks_uuid: rec.as_ref().map(|r| r.luks_uuid.as_str()),
            seq: rec.as_ref().map(|r| r.seq),
        };
        println!("{}", serde_json::to_string_pretty(&s).expect("serialises"));
    } else {
        match &rec {
            None => println!("{}: no luksify conversion in progress", device.display()),
            Some(r) => {
                println!("{}: luksify conversion in progress", device.display());
                println!("  state:    {}", r.state.name());
                if let Some(c) = cursor {
                    println!("  cursor:   sector {c} of {} ({} sectors left to move)", r.geometry.l, c);
                }
                println!("  progress: {:.1}%", 100.0 * fsm::progress(&r.geometry, r.state));
                println!(
                    "  target:   LUKS{} {} as /dev/mapper/{} (UUID {})",
                    r.luks_version, r.cipher, r.name, r.luks_uuid
                );
                println!("  continue: luksify resume {}", device.display());
            }
        }
    }
    Ok(exit::OK)
}
