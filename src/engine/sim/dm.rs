//! The device-mapper: the tables of the simulated dm devices, parsed from the same strings
//! the real adapter sends.

use super::content::{xts_from_key, XtsSim};
use super::CIPHER;
use crate::core::facts::TableLineFacts;
use crate::core::tables::DevRef;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::rc::Rc;

#[derive(Clone)]
pub(super) enum STarget {
    Linear {
        dev: DevRef,
        offset: u64,
    },
    Striped {
        chunk: u64,
        stripes: Vec<(DevRef, u64)>,
    },
    Crypt {
        cipher: String,
        xts: Rc<XtsSim>,
        iv_offset: u64,
        dev: DevRef,
        offset: u64,
        discards: bool,
    },
    Mirror {
        region: u64,
        legs: [(DevRef, u64); 2],
        sync: Vec<bool>,
        health: [u8; 2],
        nosync: bool,
    },
    /// dm-switch with two paths; `map`: each region's path, set by messages.
    Switch {
        region: u64,
        paths: [(DevRef, u64); 2],
        map: Vec<u8>,
    },
    /// dm-zero: reads zeros, writes vanish (the private device the tick is learnt on).
    Zero,
}

#[derive(Clone)]
pub(super) struct SLine {
    pub(super) start: u64,
    pub(super) length: u64,
    pub(super) target: STarget,
}

impl SLine {
    fn type_name(&self) -> &'static str {
        match self.target {
            STarget::Linear { .. } => "linear",
            STarget::Striped { .. } => "striped",
            STarget::Crypt { .. } => "crypt",
            STarget::Mirror { .. } => "mirror",
            STarget::Switch { .. } => "switch",
            STarget::Zero => "zero",
        }
    }

    /// As the kernel reports it, the key replaced by "-".
    pub(super) fn facts(&self) -> TableLineFacts {
        let params = match &self.target {
            STarget::Linear { dev, offset } => format!("{dev} {offset}"),
            STarget::Striped { chunk, stripes } => {
                let mut p = format!("{} {chunk}", stripes.len());
                for (d, o) in stripes {
                    let _ = write!(p, " {d} {o}");
                }
                p
            }
            STarget::Crypt { cipher, iv_offset, dev, offset, discards, .. } => {
                let mut p = format!("{cipher} - {iv_offset} {dev} {offset}");
                if *discards {
                    p.push_str(" 1 allow_discards");
                }
                p
            }
            STarget::Mirror { region, legs, nosync, .. } => {
                let log = if *nosync { format!("core 2 {region} nosync") } else { format!("core 1 {region}") };
                format!("{log} 2 {} {} {} {}", legs[0].0, legs[0].1, legs[1].0, legs[1].1)
            }
            STarget::Switch { region, paths, .. } => {
                format!("2 {region} 0 {} {} {} {}", paths[0].0, paths[0].1, paths[1].0, paths[1].1)
            }
            STarget::Zero => String::new(),
        };
        TableLineFacts { start: self.start, length: self.length, target_type: self.type_name().into(), params }
    }

    pub(super) fn devs(&self) -> Vec<DevRef> {
        match &self.target {
            STarget::Linear { dev, .. } | STarget::Crypt { dev, .. } => vec![*dev],
            STarget::Striped { stripes, .. } => stripes.iter().map(|s| s.0).collect(),
            STarget::Mirror { legs, .. } => legs.iter().map(|l| l.0).collect(),
            STarget::Switch { paths, .. } => paths.iter().map(|p| p.0).collect(),
            STarget::Zero => Vec::new(),
        }
    }

    /// The devices a flush is passed on to: dm-switch sets no flush bios (a flush of a
    /// device that maps only a switch reaches nothing below it).
    pub(super) fn flush_devs(&self) -> Vec<DevRef> {
        match &self.target {
            STarget::Switch { .. } => Vec::new(),
            _ => self.devs(),
        }
    }

    /// (device, first sector, sectors) of every range this line maps onto.
    pub(super) fn extents(&self) -> Vec<(DevRef, u64, u64)> {
        match &self.target {
            STarget::Linear { dev, offset } | STarget::Crypt { dev, offset, .. } => vec![(*dev, *offset, self.length)],
            STarget::Striped { stripes, .. } => {
                let per = self.length / stripes.len() as u64;
                stripes.iter().map(|(d, o)| (*d, *o, per)).collect()
            }
            STarget::Mirror { legs, .. } => legs.iter().map(|(d, o)| (*d, *o, self.length)).collect(),
            STarget::Switch { paths, .. } => paths.iter().map(|(d, o)| (*d, *o, self.length)).collect(),
            STarget::Zero => Vec::new(),
        }
    }
}

pub(super) struct DmDev {
    pub(super) dev: DevRef,
    pub(super) uuid: String,
    pub(super) private: bool,
    pub(super) live: Option<Vec<SLine>>,
    pub(super) inactive: Option<Vec<SLine>>,
    pub(super) suspended: bool,
    /// dm-stats regions (`@stats_create`): id, [start, end), writes counted since created.
    pub(super) stats: Vec<SimStat>,
}

#[derive(Debug, Clone)]
pub(super) struct SimStat {
    pub(super) id: u64,
    pub(super) start: u64,
    pub(super) end: u64,
    /// The areas' length (the last one may reach past `end`, as the kernel's does).
    pub(super) step: u64,
    /// Writes counted, per area.
    pub(super) writes: Vec<u64>,
    pub(super) program: String,
}

pub(super) fn size_of(t: &Option<Vec<SLine>>) -> u64 {
    t.as_ref().and_then(|t| t.last()).map(|l| l.start + l.length).unwrap_or(0)
}

#[derive(Default)]
pub(super) struct DmState {
    pub(super) devs: BTreeMap<String, DmDev>,
    pub(super) next_minor: u32,
}

fn parse_dev(w: &str) -> Result<DevRef, String> {
    let (a, b) = w.split_once(':').ok_or_else(|| format!("not a major:minor: {w:?}"))?;
    Ok(DevRef {
        major: a.parse().map_err(|_| format!("bad major {w:?}"))?,
        minor: b.parse().map_err(|_| format!("bad minor {w:?}"))?,
    })
}

fn parse_u64(w: Option<&&str>, what: &str) -> Result<u64, String> {
    w.ok_or_else(|| format!("missing {what}"))?.parse().map_err(|_| format!("bad {what}"))
}

/// Parse one table line as the kernel would (the same strings the real adapter sends).
pub(super) fn parse_line(start: u64, length: u64, ty: &str, params: &str) -> Result<SLine, String> {
    let w: Vec<&str> = params.split_whitespace().collect();
    if length == 0 {
        return Err("zero-length target".into());
    }
    let target = match ty {
        "zero" => {
            if !w.is_empty() {
                return Err(format!("zero: invalid argument count in {params:?}"));
            }
            STarget::Zero
        }
        "linear" => {
            if w.len() != 2 {
                return Err(format!("linear: invalid argument count in {params:?}"));
            }
            STarget::Linear { dev: parse_dev(w[0])?, offset: parse_u64(w.get(1), "offset")? }
        }
        "striped" => {
            let n = parse_u64(w.first(), "stripe count")? as usize;
            let chunk = parse_u64(w.get(1), "chunk size")?;
            if n == 0 || w.len() != 2 + 2 * n {
                return Err(format!("striped: invalid argument count in {params:?}"));
            }
            if chunk == 0 || !length.is_multiple_of(n as u64) || !(length / n as u64).is_multiple_of(chunk) {
                return Err("striped: target length not divisible by stripes × chunk".into());
            }
            let mut stripes = Vec::new();
            for i in 0..n {
                stripes.push((parse_dev(w[2 + 2 * i])?, parse_u64(w.get(3 + 2 * i), "stripe offset")?));
            }
            STarget::Striped { chunk, stripes }
        }
        "crypt" => {
            if w.len() < 5 {
                return Err(format!("crypt: not enough arguments in a crypt line ({} words)", w.len()));
            }
            if w[0] != CIPHER {
                return Err(format!("crypt: the simulator only has {CIPHER}, not {}", w[0]));
            }
            if w[1] == "-" {
                return Err("crypt: no key (a table read back from the kernel cannot be loaded again)".into());
            }
            let key = hex::decode(w[1]).map_err(|_| "crypt: key is not hex".to_string())?;
            if key.len() != 64 {
                return Err(format!(
                    "crypt: {CIPHER} in the simulator needs a 512-bit key, got {} bits",
                    key.len() * 8
                ));
            }
            let iv_offset = parse_u64(w.get(2), "iv_offset")?;
            let dev = parse_dev(w[3])?;
            let offset = parse_u64(w.get(4), "offset")?;
            let mut discards = false;
            if w.len() > 5 {
                let nopt = parse_u64(w.get(5), "optional argument count")? as usize;
                if w.len() != 6 + nopt {
                    return Err("crypt: optional argument count mismatch".into());
                }
                for o in &w[6..] {
                    match *o {
                        "allow_discards" => discards = true,
                        other => return Err(format!("crypt: unknown option {other}")),
                    }
                }
            }
            STarget::Crypt { cipher: w[0].into(), xts: Rc::new(xts_from_key(&key)), iv_offset, dev, offset, discards }
        }
        "mirror" => {
            // core 1 <region> | core 2 <region> nosync, then 2 <dev> <off> <dev> <off> [0]
            let nosync = match (w.first(), w.get(1)) {
                (Some(&"core"), Some(&"1")) => false,
                (Some(&"core"), Some(&"2")) if w.get(3) == Some(&"nosync") => true,
                _ => return Err(format!("mirror: the simulator only has a core log, with nosync or not: {params:?}")),
            };
            let region = parse_u64(w.get(2), "region size")?;
            if region < 2 || !region.is_power_of_two() || region > length {
                return Err(format!("mirror: invalid region size {region} for a target of {length} sectors"));
            }
            let w = if nosync { [&w[..3], &w[4..]].concat() } else { w };
            if w.get(3) != Some(&"2") || !(w.len() == 8 || (w.len() == 9 && w[8] == "0")) {
                return Err(format!("mirror: the simulator only has 2 legs and no features: {params:?}"));
            }
            let legs = [
                (parse_dev(w[4])?, parse_u64(w.get(5), "leg offset")?),
                (parse_dev(w[6])?, parse_u64(w.get(7), "leg offset")?),
            ];
            let regions = length.div_ceil(region) as usize;
            STarget::Mirror { region, legs, sync: vec![nosync; regions], health: *b"AA", nosync }
        }
        "switch" => {
            // <paths> <region size> <optional args: 0> (<dev> <offset>){paths}
            if w.len() != 7 || w[0] != "2" || w[2] != "0" {
                return Err(format!("switch: the simulator only has 2 paths and no options: {params:?}"));
            }
            let region = parse_u64(w.get(1), "region size")?;
            if region == 0 || region > u32::MAX as u64 {
                return Err("switch: invalid region size".into());
            }
            let paths = [
                (parse_dev(w[3])?, parse_u64(w.get(4), "path offset")?),
                (parse_dev(w[5])?, parse_u64(w.get(6), "path offset")?),
            ];
            // the kernel's initial table: the paths round robin
            let map = (0..length.div_ceil(region)).map(|i| (i % 2) as u8).collect();
            STarget::Switch { region, paths, map }
        }
        other => return Err(format!("unknown target type {other:?}")),
    };
    Ok(SLine { start, length, target })
}
