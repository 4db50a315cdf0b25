//! Typed device-mapper tables for every phase of a conversion.
//!
//! The pure core never holds the volume key: crypt lines carry a placeholder and are
//! rendered with the key only by the device-mapper adapter, at load time
//! ([`Line::params`]). [`std::fmt::Display`] shows `<key>` instead.

use super::geometry::Geometry;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A block device by major:minor (device nodes may be missing: tables use numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DevRef {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for DevRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// Cipher parameters of a crypt line, without the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CryptSpec {
    /// e.g. "aes-xts-plain64".
    pub cipher: String,
    pub allow_discards: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Linear {
        dev: DevRef,
        offset: u64,
    },
    /// dm-crypt: sector `x` of the target is encrypted with IV `iv_offset + x` and stored at
    /// `offset + x` of `dev`.
    Crypt {
        spec: CryptSpec,
        iv_offset: u64,
        dev: DevRef,
        offset: u64,
    },
    /// dm-mirror with a core log: leg 0 is the source, leg 1 the destination.
    Mirror {
        region: u64,
        legs: [(DevRef, u64); 2],
    },
    /// dm-switch: sector `x` of the target goes to path `p` of region `x / region` at
    /// `offset + x`, `p` as the device's messages set it (the kernel starts with the paths
    /// round robin: a switch table means nothing until its regions are set).
    Switch {
        region: u64,
        paths: [(DevRef, u64); 2],
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub start: u64,
    pub length: u64,
    pub target: Target,
}

impl Line {
    pub fn target_type(&self) -> &'static str {
        match self.target {
            Target::Linear { .. } => "linear",
            Target::Crypt { .. } => "crypt",
            Target::Mirror { .. } => "mirror",
            Target::Switch { .. } => "switch",
        }
    }

    /// The parameter string the kernel takes; `key_hex` is substituted into crypt lines.
    pub fn params(&self, key_hex: &str) -> String {
        match &self.target {
            Target::Linear { dev, offset } => format!("{dev} {offset}"),
            Target::Crypt { spec, iv_offset, dev, offset } => {
                let mut p = format!("{} {} {} {} {}", spec.cipher, key_hex, iv_offset, dev, offset);
                if spec.allow_discards {
                    p.push_str(" 1 allow_discards");
                }
                p
            }
            // "nosync": the mirror is only ever loaded over legs that luksify has just made
            // identical (checked while the bridge was suspended); it copies nothing, it only
            // keeps them identical by writing to both. No handle_errors: without dmeventd it
            // would hold I/O.
            Target::Mirror { region, legs } => {
                format!("core 2 {region} nosync 2 {} {} {} {}", legs[0].0, legs[0].1, legs[1].0, legs[1].1)
            }
            Target::Switch { region, paths } => {
                format!("2 {region} 0 {} {} {} {}", paths[0].0, paths[0].1, paths[1].0, paths[1].1)
            }
        }
    }

    pub fn is_mirror(&self) -> bool {
        matches!(self.target, Target::Mirror { .. })
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.start, self.length, self.target_type(), self.params("<key>"))
    }
}

/// A whole table: lines sorted by start, contiguous from 0.
pub type Table = Vec<Line>;

#[cfg(test)]
/// Render a table for logs (keys hidden).
pub fn show(table: &[Line]) -> String {
    table.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("\n")
}

/// Which devices the tables of one conversion refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    /// The partition being converted.
    pub raw: DevRef,
    /// The staging crypt device (maps [0, L) to raw at S with the new key).
    pub staging: DevRef,
    /// The private mirror device that holds a step whose commit failed (both copies
    /// identical, kept so by a nosync mirror until a resume). The mirror lives in its own
    /// helper, not in the bridge, because LVM skips every dm device with a mirror target
    /// (`devices/ignore_lvm_mirrors`, on by default): with the mirror in the bridge, LVM on
    /// the live system would lose sight of the PV during every copy.
    pub mirror: DevRef,
}

/// What the bridge maps, phase by phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BridgePhase {
    /// Before the fence: the identity map of [0, L) onto the raw device.
    Linear,
    /// Fenced, chunks [cursor, L) moved; nothing in flight.
    Steady { cursor: u64 },
    /// Fenced, [to, L) moved, step [from, to) on both copies through the mirror device
    /// (only after a commit failed: either cursor reads the same data).
    Mirroring { from: u64, to: u64 },
    /// Everything moved: exactly what `cryptsetup open` maps.
    Final,
}

/// Source of the unmoved plaintext [a, b): the shadow for the fenced label sectors [0, F),
/// the raw device (in place) for the rest.
fn source_lines(g: &Geometry, raw: DevRef, a: u64, b: u64, out: &mut Table) {
    let mut x = a;
    while x < b {
        let e = g.source_run_end(x, b);
        out.push(Line { start: x, length: e - x, target: Target::Linear { dev: raw, offset: g.source_of(x) } });
        x = e;
    }
}

/// The mirror device's table over step [a, b): sector x of it is bridge sector a+x. Leg 0
/// is the same source as [`source_lines`], leg 1 the staging device at the same plaintext
/// sector (so IV = plaintext sector); one target per source line (the fence boundary is
/// where the source changes from the shadow to the raw device). Only loaded when a commit
/// failed with both copies identical: it keeps them so, whichever cursor the journal holds.
pub fn mirror_table(g: &Geometry, d: Devices, a: u64, b: u64) -> Table {
    assert!(a < b && b <= g.l && b - a <= g.k);
    let mut src = Vec::new();
    source_lines(g, d.raw, a, b, &mut src);
    src.into_iter()
        .map(|l| {
            let Target::Linear { offset, .. } = l.target else { unreachable!() };
            Line {
                start: l.start - a,
                length: l.length,
                target: Target::Mirror {
                    region: g.region_for(l.length),
                    legs: [(d.raw, offset), (d.staging, l.start)],
                },
            }
        })
        .collect()
}

/// What the mirror device maps when it holds no step: an idle placeholder of the
/// largest chunk's size (a table that references it must fit in it), reading staging.
pub fn mirror_idle_table(g: &Geometry, d: Devices) -> Table {
    vec![Line { start: 0, length: g.k.min(g.l), target: Target::Linear { dev: d.staging, offset: 0 } }]
}

/// The moved part [a, L): ciphertext shifted by S, IV = plaintext sector.
fn crypt_line(g: &Geometry, spec: &CryptSpec, raw: DevRef, a: u64, b: u64) -> Line {
    Line {
        start: a,
        length: b - a,
        target: Target::Crypt { spec: spec.clone(), iv_offset: a, dev: raw, offset: g.s + a },
    }
}

/// The bridge's table in `phase`.
pub fn bridge_table(g: &Geometry, spec: &CryptSpec, d: Devices, phase: BridgePhase) -> Table {
    let mut t = Vec::new();
    match phase {
        BridgePhase::Linear => {
            t.push(Line { start: 0, length: g.l, target: Target::Linear { dev: d.raw, offset: 0 } });
        }
        BridgePhase::Steady { cursor } => {
            assert!(cursor <= g.l);
            source_lines(g, d.raw, 0, cursor, &mut t);
            if cursor < g.l {
                t.push(crypt_line(g, spec, d.raw, cursor, g.l));
            }
        }
        BridgePhase::Mirroring { from, to } => {
            assert!(from < to && to <= g.l && to - from <= g.k);
            source_lines(g, d.raw, 0, from, &mut t);
            t.push(Line { start: from, length: to - from, target: Target::Linear { dev: d.mirror, offset: 0 } });
            if to < g.l {
                t.push(crypt_line(g, spec, d.raw, to, g.l));
            }
        }
        BridgePhase::Final => {
            t.push(crypt_line(g, spec, d.raw, 0, g.l));
        }
    }
    t
}

/// LUKS2, between two steps: the table `cryptsetup open` builds for the reencryption in
/// progress whose ciphertext starts at logical sector `x` (S <= x <= L, or 0): the moved
/// first S sectors (linear at L + S) while x > 0, the plaintext [S, x) in place, the
/// ciphertext [x, L) (crypt, IV the logical sector, stored S further on). `x = L`: right
/// after the cut-over; `x = 0`: every step done (one crypt line).
pub fn standard_table(l: u64, s: u64, spec: &CryptSpec, raw: DevRef, x: u64) -> Table {
    let mut t = Vec::with_capacity(3);
    if x > 0 {
        t.push(Line { start: 0, length: s, target: Target::Linear { dev: raw, offset: l + s } });
    }
    if x > s {
        t.push(Line { start: s, length: x - s, target: Target::Linear { dev: raw, offset: s } });
    }
    if x < l {
        t.push(Line {
            start: x,
            length: l - x,
            target: Target::Crypt { spec: spec.clone(), iv_offset: x, dev: raw, offset: x + s },
        });
    }
    t
}

/// The staging crypt device: [0, L) → raw at S, new key, IV = sector.
pub fn staging_table(g: &Geometry, spec: &CryptSpec, raw: DevRef) -> Table {
    vec![crypt_line(g, spec, raw, 0, g.l)]
}

/// LUKS2's own steps through a switch (issue 22): the hotzones of a full S, from L down,
/// are the regions of a private dm-switch device over [z, L) whose path 0 is the plaintext
/// in place and path 1 the staging crypt device (the ciphertext S further on, IV the logical
/// sector), so that a step flips its region by a message instead of a new bridge table (a
/// resume without a table swap waits for no RCU grace period). `z` is where those regions
/// start: the lowest sector >= S that is L less a multiple of S. None when not even one
/// hotzone of S is above S.
pub fn switch_start(l: u64, s: u64) -> Option<u64> {
    if s == 0 || l < 2 * s {
        return None;
    }
    Some(s + (l - s) % s)
}

/// The switch device's table: [0, L − z) of it is bridge sector z + x, regions of S.
pub fn switch_table(l: u64, s: u64, z: u64, raw: DevRef, staging: DevRef) -> Table {
    vec![Line { start: 0, length: l - z, target: Target::Switch { region: s, paths: [(raw, z), (staging, z)] } }]
}

/// The `set_region_mappings` message that makes the switch device over [z, L) map the
/// ciphertext from `x` on (regions at or above x: path 1) and the plaintext below (path 0),
/// every region set (hex, as dm-switch takes it; `R1,n` repeats the last region n times).
pub fn switch_mappings(l: u64, s: u64, z: u64, x: u64) -> String {
    let regions = (l - z) / s;
    let first_crypt = (x.clamp(z, l) - z).div_ceil(s);
    let mut m = String::from("set_region_mappings");
    if first_crypt > 0 {
        m.push_str(&format!(" 0:0 R1,{:x}", first_crypt - 1));
    }
    if first_crypt < regions {
        m.push_str(&format!(" {first_crypt:x}:1 R1,{:x}", regions - first_crypt - 1));
    }
    m
}

/// The message that flips the region holding hotzone [a, a + S) to the ciphertext.
pub fn switch_flip(s: u64, z: u64, a: u64) -> String {
    format!("set_region_mappings {:x}:1", (a - z) / s)
}

/// What dm-switch does with a `set_region_mappings` message (its words after the first), on
/// `regions` (one path number each): `<region>:<path>` (hex), `:<path>` for the next region,
/// `R<cycle>,<count>` to repeat the last `cycle` entries `count` times; every check the
/// kernel makes (drivers/md/dm-switch.c), so that the simulator refuses what it refuses.
/// On an error the regions set before the bad word stay set, as in the kernel.
#[cfg(test)]
pub fn apply_region_mappings(regions: &mut [u8], paths: u8, words: &[&str]) -> Result<(), String> {
    fn hex(s: &str) -> Option<(u64, &str)> {
        let end = s.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(s.len());
        let v = if end == 0 { 0 } else { u64::from_str_radix(&s[..end], 16).ok()? };
        Some((v, &s[end..]))
    }
    let n = regions.len() as u64;
    let bad = |w: &str| format!("invalid set_region_mappings argument: '{w}'");
    let mut index = 0u64;
    for w in words {
        if let Some(rest) = w.strip_prefix(['R', 'r']) {
            if rest.starts_with(',') {
                return Err(bad(w));
            }
            let (cycle, rest) = hex(rest).ok_or_else(|| bad(w))?;
            let rest = rest.strip_prefix(',').filter(|r| !r.is_empty()).ok_or_else(|| bad(w))?;
            let (count, rest) = hex(rest).ok_or_else(|| bad(w))?;
            if !rest.is_empty() {
                return Err(bad(w));
            }
            if cycle == 0 || cycle - 1 > index {
                return Err(format!("invalid set_region_mappings cycle length: {} > {index}", cycle.wrapping_sub(1)));
            }
            if index.checked_add(count).is_none_or(|e| e >= n) {
                return Err(format!("invalid set_region_mappings region number: {index} + {count} >= {n}"));
            }
            for _ in 0..count {
                index += 1;
                regions[index as usize] = regions[(index - cycle) as usize];
            }
            continue;
        }
        let rest = match w.strip_prefix(':') {
            Some(r) => {
                index += 1;
                r
            }
            None => {
                let (i, r) = hex(w).ok_or_else(|| bad(w))?;
                index = i;
                r.strip_prefix(':').ok_or_else(|| bad(w))?
            }
        };
        if rest.is_empty() {
            return Err(bad(w));
        }
        let (path, rest) = hex(rest).ok_or_else(|| bad(w))?;
        if !rest.is_empty() {
            return Err(bad(w));
        }
        if index >= n {
            return Err(format!("invalid set_region_mappings region number: {index} >= {n}"));
        }
        if path >= paths as u64 {
            return Err(format!("invalid set_region_mappings device: {path} >= {paths}"));
        }
        regions[index as usize] = path as u8;
    }
    Ok(())
}

/// The bridge between two of luksify's own LUKS2 steps through the switch device `sw` (see
/// [`switch_start`]): the moved first S, the plaintext [S, z) in place, then [z, L) through
/// the switch. With the switch's regions set by [`switch_mappings`] for ciphertext from x,
/// every sector maps where [`standard_table`]`(x)` maps it.
pub fn standard_switch_table(l: u64, s: u64, z: u64, raw: DevRef, sw: DevRef) -> Table {
    let mut t = vec![Line { start: 0, length: s, target: Target::Linear { dev: raw, offset: l + s } }];
    if z > s {
        t.push(Line { start: s, length: z - s, target: Target::Linear { dev: raw, offset: s } });
    }
    t.push(Line { start: z, length: l - z, target: Target::Linear { dev: sw, offset: 0 } });
    t
}

#[cfg(test)]
/// Check that a table covers [0, len) exactly, in order, with no gap or overlap.
pub fn covers(table: &[Line], len: u64) -> bool {
    let mut pos = 0;
    for l in table {
        if l.start != pos || l.length == 0 {
            return false;
        }
        pos += l.length;
    }
    pos == len
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW: DevRef = DevRef { major: 98, minor: 5 };
    const STG: DevRef = DevRef { major: 254, minor: 1 };
    const MIR: DevRef = DevRef { major: 254, minor: 2 };
    const D: Devices = Devices { raw: RAW, staging: STG, mirror: MIR };

    fn spec() -> CryptSpec {
        CryptSpec { cipher: "aes-xts-plain64".into(), allow_discards: false }
    }

    fn geo(l: u64, s: u64, k: u64) -> Geometry {
        Geometry::new(l + s + 10_000, l, s, k, 1024).unwrap()
    }

    /// Where a bridge sector is read from, following the table: Some((dev, sector, encrypted_iv)).
    fn resolve(t: &Table, x: u64) -> Vec<(DevRef, u64, Option<u64>)> {
        for l in t {
            if x >= l.start && x < l.start + l.length {
                let o = x - l.start;
                return match &l.target {
                    Target::Linear { dev, offset } => vec![(*dev, offset + o, None)],
                    Target::Crypt { iv_offset, dev, offset, .. } => vec![(*dev, offset + o, Some(iv_offset + o))],
                    Target::Mirror { legs, .. } => legs.iter().map(|(d, off)| (*d, off + o, None)).collect(),
                    Target::Switch { .. } => panic!("a switch line needs its region mappings: resolve_switched"),
                };
            }
        }
        panic!("sector {x} not mapped");
    }

    #[test]
    fn standard_tables_map_each_sector_where_its_luks2_segment_keeps_it() {
        for (l, s) in [(16_384u64, 4096u64), (12_289, 4096), (9192, 8192), (4096, 4096)] {
            // every cursor a LUKS2 step leaves: L, then S down from it, never below S
            let mut xs = vec![l];
            let mut x = l;
            while x > s {
                x = x.saturating_sub(s).max(s);
                xs.push(x);
            }
            xs.push(0);
            for &x in &xs {
                let t = standard_table(l, s, &spec(), RAW, x);
                assert!(covers(&t, l), "L {l} S {s} x {x}: {}", show(&t));
                for y in [0, s - 1, s, x.saturating_sub(1).max(s), x, l - 1] {
                    if y >= l {
                        continue;
                    }
                    let want = if y < s && x > 0 {
                        (RAW, l + s + y, None) // the moved segment
                    } else if y < x {
                        (RAW, y, None) // plaintext, in place
                    } else {
                        (RAW, y + s, Some(y)) // ciphertext, S further on, IV its logical sector
                    };
                    assert_eq!(resolve(&t, y), vec![want], "L {l} S {s} x {x} sector {y}");
                }
            }
        }
    }

    /// The bridge through the switch device (its regions set by one message, then flipped one
    /// step at a time) maps every sector where the standard table of the same cursor does.
    #[test]
    fn the_bridge_through_the_switch_maps_each_sector_as_the_standard_table() {
        const SW: DevRef = DevRef { major: 253, minor: 7 };
        const STAGING: DevRef = DevRef { major: 253, minor: 8 };
        assert_eq!(switch_start(4096, 4096), None, "no hotzone of S above S");
        for (l, s) in [(16_384u64, 4096u64), (12_289, 4096), (9192, 4096), (8192, 4096), (40_000, 1024)] {
            let z = switch_start(l, s).unwrap();
            assert!(z >= s && z < 2 * s && (l - z).is_multiple_of(s), "L {l} S {s} z {z}");
            let sw = switch_table(l, s, z, RAW, STAGING);
            assert!(covers(&sw, l - z));
            let Target::Switch { region, paths } = sw[0].target else { panic!() };
            let bridge = standard_switch_table(l, s, z, RAW, SW);
            assert!(covers(&bridge, l), "{}", show(&bridge));
            // through the bridge, the switch (its regions) and the staging device
            let through = |regions: &[u8], y: u64| -> Vec<(DevRef, u64, Option<u64>)> {
                resolve(&bridge, y)
                    .into_iter()
                    .flat_map(|(d, o, iv)| {
                        if d != SW {
                            return vec![(d, o, iv)];
                        }
                        let (pd, po) = paths[regions[(o / region) as usize] as usize];
                        if pd == STAGING {
                            // the staging device: logical sector t encrypted at S + t, IV t
                            vec![(RAW, s + po + o, Some(po + o))]
                        } else {
                            vec![(pd, po + o, None)]
                        }
                    })
                    .collect()
            };
            let mut regions = vec![0u8; ((l - z) / s) as usize];
            // the message made for a cursor x sets every region whatever it was before
            for (i, r) in regions.iter_mut().enumerate() {
                *r = (i % 2) as u8; // the kernel's round robin
            }
            let mut x = l;
            let words = |m: &str| m.split_whitespace().skip(1).map(str::to_string).collect::<Vec<_>>();
            let set = |regions: &mut Vec<u8>, m: String| {
                let w = words(&m);
                apply_region_mappings(regions, 2, &w.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
            };
            set(&mut regions, switch_mappings(l, s, z, x));
            loop {
                let want = standard_table(l, s, &spec(), RAW, x);
                for y in (0..l).step_by(97).chain([0, s - 1, s, z.saturating_sub(1), z, x.saturating_sub(1), l - 1]) {
                    assert_eq!(through(&regions, y), resolve(&want, y), "L {l} S {s} z {z} x {x} sector {y}");
                }
                if x == z {
                    break;
                }
                x -= s;
                // a step: its region flipped by one message, or all set again for this cursor
                if x % (2 * s) == 0 {
                    set(&mut regions, switch_flip(s, z, x));
                } else {
                    set(&mut regions, switch_mappings(l, s, z, x));
                }
            }
        }
    }

    #[test]
    fn region_mappings_are_parsed_as_dm_switch_parses_them() {
        let mut r = vec![9u8; 6];
        apply_region_mappings(&mut r, 2, &["0:1", ":0", "R2,3"]).unwrap();
        assert_eq!(r, [1, 0, 1, 0, 1, 9]);
        apply_region_mappings(&mut r, 2, &["5:1"]).unwrap();
        assert_eq!(r[5], 1);
        apply_region_mappings(&mut r, 2, &["a:0"]).unwrap_err(); // region 10 of 6
        apply_region_mappings(&mut r, 2, &["1:2"]).unwrap_err(); // no path 2
        apply_region_mappings(&mut r, 2, &["0:0", "R1,6"]).unwrap_err(); // 0 + 6 >= 6
        apply_region_mappings(&mut r, 2, &["0:0", "R1,5"]).unwrap();
        assert_eq!(r, [0; 6]);
        apply_region_mappings(&mut r, 2, &["R2,1"]).unwrap_err(); // cycle 2 at region 0
        for w in ["1", "1:", ":", "R,1", "R1", "R1,", "1:1x", "x:1"] {
            assert!(apply_region_mappings(&mut r, 2, &[w]).is_err(), "{w}");
        }
        assert_eq!(switch_mappings(16_384, 4096, 4096, 16_384), "set_region_mappings 0:0 R1,2");
        assert_eq!(switch_mappings(16_384, 4096, 4096, 8192), "set_region_mappings 0:0 R1,0 1:1 R1,1");
        assert_eq!(switch_mappings(16_384, 4096, 4096, 4096), "set_region_mappings 0:1 R1,2");
        assert_eq!(switch_flip(4096, 4096, 12_288), "set_region_mappings 2:1");
    }

    #[test]
    fn every_phase_covers_l_and_maps_each_sector_where_its_data_is() {
        for (l, s, k) in
            [(40_960u64, 4096u64, 4096u64), (10_000, 4096, 4096), (16, 4096, 4096), (4104, 4096, 1024), (12, 8, 8)]
        {
            let l = l / 8 * 8;
            let g = geo(l.max(8), s, k);
            let l = g.l;
            let sch = g.schedule();
            let lin = bridge_table(&g, &spec(), D, BridgePhase::Linear);
            assert!(covers(&lin, l));
            let mut cursors = vec![l];
            cursors.extend(sch.iter().map(|(m, _)| *m));
            for &c in &cursors {
                let t = bridge_table(&g, &spec(), D, BridgePhase::Steady { cursor: c });
                assert!(covers(&t, l), "steady {c}: {}", show(&t));
                for x in (0..l).step_by(1).filter(|x| x % 7 == 0 || *x < 16 || *x + 16 > l) {
                    let r = resolve(&t, x);
                    assert_eq!(r.len(), 1);
                    let (dev, sec, iv) = r[0];
                    assert_eq!(dev, RAW);
                    if x >= c {
                        assert_eq!((sec, iv), (s + x, Some(x)), "moved sector {x} at cursor {c}");
                    } else if x < g.f {
                        assert_eq!((sec, iv), (g.shadow + x, None), "fenced sector {x}");
                    } else {
                        assert_eq!((sec, iv), (x, None), "unmoved sector {x}");
                    }
                }
            }
            for &(m, c) in &sch {
                let t = bridge_table(&g, &spec(), D, BridgePhase::Mirroring { from: m, to: c });
                assert!(covers(&t, l), "mirroring {m}..{c}: {}", show(&t));
                assert!(t.iter().all(|l| !l.is_mirror()), "the bridge itself never holds a mirror (LVM would skip it)");
                let mt = mirror_table(&g, D, m, c);
                let fence_cut = u64::from(m < g.f && c > g.f);
                assert_eq!(mt.len() as u64, 1 + fence_cut, "one target, cut only at the fence: {}", show(&mt));
                assert!(covers(&mt, c - m));
                for x in m..c {
                    let via = resolve(&t, x);
                    assert_eq!(via, vec![(MIR, x - m, None)], "chunk sector {x} goes through the mirror device");
                    let r = resolve(&mt, x - m);
                    assert_eq!(r.len(), 2, "sector {x} in flight must be mirrored");
                    let want_src = if x < g.f { g.shadow + x } else { x };
                    assert_eq!(r[0], (RAW, want_src, None), "leg 0 is the intact source");
                    assert_eq!(r[1], (STG, x, None), "leg 1 is staging at the same sector");
                }
                for l in mt.iter().filter(|l| l.is_mirror()) {
                    let Target::Mirror { region, .. } = l.target else { unreachable!() };
                    assert!(region <= l.length.max(8) && region.is_power_of_two());
                }
                assert!(mt.iter().all(|l| l.is_mirror()));
            }
            let f = bridge_table(&g, &spec(), D, BridgePhase::Final);
            assert_eq!(f, staging_table(&g, &spec(), RAW));
            assert_eq!(f[0].to_string(), format!("0 {l} crypt aes-xts-plain64 <key> 0 98:5 {s}"));
        }
    }

    #[test]
    fn key_is_only_in_rendered_params() {
        let g = geo(40_960, 4096, 4096);
        let t = bridge_table(&g, &spec(), D, BridgePhase::Mirroring { from: 32768, to: 36864 });
        let shown = show(&t);
        assert!(!shown.contains("deadbeef"));
        assert!(t.iter().any(|l| l.params("deadbeef").contains("deadbeef")));
        assert_eq!(t[2].params("k"), "254:2 0");
        assert_eq!(
            show(&mirror_table(&g, D, 32768, 36864)),
            "0 4096 mirror core 2 1024 nosync 2 98:5 32768 254:1 32768"
        );
        // The last step reads the fenced label sectors from the shadow.
        let mt = mirror_table(&g, D, 0, 4096);
        assert_eq!(mt[0].to_string(), format!("0 8 mirror core 2 8 nosync 2 98:5 {} 254:1 0", g.shadow));
        assert_eq!(mt[1].to_string(), "8 4088 mirror core 2 1024 nosync 2 98:5 8 254:1 8");
        assert_eq!(mt.len(), 2);
    }

    #[test]
    fn discards_only_when_asked() {
        let g = geo(40_960, 4096, 4096);
        let mut sp = spec();
        assert!(!staging_table(&g, &sp, RAW)[0].params("k").contains("allow_discards"));
        sp.allow_discards = true;
        assert!(staging_table(&g, &sp, RAW)[0].params("k").ends_with(" 1 allow_discards"));
    }
}
