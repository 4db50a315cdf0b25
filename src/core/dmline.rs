//! Device-mapper table lines as the kernel reports them, typed: the read side of
//! [`super::tables`], which types what luksify loads.
//!
//! The kernel prints a table (DM_TABLE_STATUS with the table flag, what `dmsetup table`
//! shows) with single spaces, canonical decimals and devices as `major:minor`.
//! [`DmLine::parse`] reads such a line (a [`TableLineFacts`]) and [`DmLine::params`] renders
//! it back: on what the kernel prints, parse → render is the identity. Linear, striped,
//! crypt and mirror lines are typed; any other target (snapshot, thin, raid, error…) is kept
//! verbatim as [`ReadTarget::Other`]. A malformed line is an error, never a panic.
//!
//! A crypt line read back carries its key field as the kernel shows it: `-` (no key, or a
//! key the adapter scrubbed), a kernel keyring reference (`:64:logon:cryptsetup:…`, not
//! secret) or the key itself in hex. A hex key is held in a [`HexKey`], zeroed on drop and
//! shown by no `Debug` or `Display` (they print `-` in its place, as the adapter's scrubbed
//! tables do): only [`DmLine::params`] and [`ReadTarget::params`] render it.

use super::facts::TableLineFacts;
use super::tables::DevRef;
use std::fmt;
use std::str::FromStr;
use zeroize::Zeroizing;

/// Why a table line read back did not parse. Never carries a crypt key (replaced by `-`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read the {target_type} table line {params:?}: {why}")]
pub struct DmParseError {
    pub target_type: String,
    /// The parameters as given, a crypt key replaced by `-`.
    pub params: String,
    pub why: &'static str,
}

/// A device reference that is not `major:minor`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a major:minor device number: {0:?}")]
pub struct DevRefParseError(pub String);

/// A decimal as the kernel prints it: digits only, no sign, no leading zero (so that it
/// renders back the same). None if it is not, or does not fit.
pub(crate) fn decimal<T: FromStr>(s: &str) -> Option<T> {
    let canonical = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// `major:minor`, as the kernel prints device references in tables.
impl FromStr for DevRef {
    type Err = DevRefParseError;
    fn from_str(s: &str) -> Result<DevRef, DevRefParseError> {
        let err = || DevRefParseError(s.to_string());
        let (a, b) = s.split_once(':').ok_or_else(err)?;
        Ok(DevRef { major: decimal(a).ok_or_else(err)?, minor: decimal(b).ok_or_else(err)? })
    }
}

/// The kind of a target type name. The one place that names the targets luksify reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Linear,
    Striped,
    Crypt,
    Mirror,
    Other,
}

impl TargetKind {
    pub fn of(target_type: &str) -> TargetKind {
        match target_type {
            "linear" => TargetKind::Linear,
            "striped" => TargetKind::Striped,
            "crypt" => TargetKind::Crypt,
            "mirror" => TargetKind::Mirror,
            _ => TargetKind::Other,
        }
    }

    /// Whether luksify can reroute a line of this kind from one device to another (point
    /// it at the bridge, same offsets): linear and striped only.
    pub fn reroutable(self) -> bool {
        matches!(self, TargetKind::Linear | TargetKind::Striped)
    }
}

/// A crypt key in hex, as a table read back with its key shows it. Zeroed on drop; its
/// `Debug` shows only its size.
#[derive(Clone, PartialEq, Eq)]
pub struct HexKey(Zeroizing<String>);

impl HexKey {
    /// Key size in bytes.
    pub fn bytes(&self) -> usize {
        self.0.len() / 2
    }

    /// The hex digits, to load the line back. Never log them.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for HexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HexKey(<{} bytes>)", self.bytes())
    }
}

/// The key field of a crypt line read back. Opaque: luksify never needs its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadKey {
    /// `-`: no key in the table (the adapter scrubs hex keys to this).
    Dash,
    /// `:<size>:<type>:<description>`, a kernel keyring reference (not secret), verbatim.
    Keyring(String),
    /// The key itself.
    Hex(HexKey),
}

impl ReadKey {
    fn parse(w: &str) -> Option<ReadKey> {
        if w == "-" {
            return Some(ReadKey::Dash);
        }
        if let Some(rest) = w.strip_prefix(':') {
            let mut it = rest.splitn(3, ':');
            let (size, ty, desc) = (it.next()?, it.next()?, it.next()?);
            return (decimal::<u32>(size).is_some() && !ty.is_empty() && !desc.is_empty())
                .then(|| ReadKey::Keyring(w.to_string()));
        }
        (!w.is_empty() && w.len().is_multiple_of(2) && w.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| ReadKey::Hex(HexKey(Zeroizing::new(w.to_string()))))
    }

    /// As the kernel shows it when `reveal`, else with a hex key replaced by `-`.
    fn field(&self, reveal: bool) -> &str {
        match self {
            ReadKey::Dash => "-",
            ReadKey::Keyring(r) => r,
            ReadKey::Hex(k) if reveal => k.expose(),
            ReadKey::Hex(_) => "-",
        }
    }
}

/// A log's `sync`/`nosync` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSync {
    /// Neither given: the mirror resynchronises what the log does not know to be in sync.
    Default,
    Sync,
    NoSync,
}

impl LogSync {
    fn parse(w: &str) -> Option<LogSync> {
        match w {
            "sync" => Some(LogSync::Sync),
            "nosync" => Some(LogSync::NoSync),
            _ => None,
        }
    }

    fn word(self) -> Option<&'static str> {
        match self {
            LogSync::Default => None,
            LogSync::Sync => Some("sync"),
            LogSync::NoSync => Some("nosync"),
        }
    }
}

/// The dirty-region log of a mirror line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorLog {
    /// `core <1|2> <region> [sync|nosync]` (luksify's own mirrors: `core 2 <region> nosync`).
    Core { region: u64, sync: LogSync },
    /// `disk <2|3> <dev> <region> [sync|nosync]`.
    Disk { dev: DevRef, region: u64, sync: LogSync },
    /// Another log type (userspace, clustered-…): its name and arguments, verbatim.
    Other { kind: String, args: Vec<String> },
}

impl MirrorLog {
    fn parse(kind: &str, args: &[&str]) -> Option<MirrorLog> {
        let sync = |w: Option<&&str>| match w {
            None => Some(LogSync::Default),
            Some(w) => LogSync::parse(w),
        };
        Some(match kind {
            "core" if matches!(args.len(), 1 | 2) => {
                MirrorLog::Core { region: decimal(args[0])?, sync: sync(args.get(1))? }
            }
            "disk" if matches!(args.len(), 2 | 3) => {
                MirrorLog::Disk { dev: args[0].parse().ok()?, region: decimal(args[1])?, sync: sync(args.get(2))? }
            }
            "core" | "disk" => return None,
            _ => MirrorLog::Other { kind: kind.to_string(), args: args.iter().map(|a| a.to_string()).collect() },
        })
    }

    pub fn kind(&self) -> &str {
        match self {
            MirrorLog::Core { .. } => "core",
            MirrorLog::Disk { .. } => "disk",
            MirrorLog::Other { kind, .. } => kind,
        }
    }

    /// Region size in sectors (None for a log type this module does not read).
    pub fn region(&self) -> Option<u64> {
        match self {
            MirrorLog::Core { region, .. } | MirrorLog::Disk { region, .. } => Some(*region),
            MirrorLog::Other { .. } => None,
        }
    }

    /// The arguments, as the kernel prints them (without their count).
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        match self {
            MirrorLog::Core { region, sync } => {
                a.push(region.to_string());
                a.extend(sync.word().map(str::to_string));
            }
            MirrorLog::Disk { dev, region, sync } => {
                a.push(dev.to_string());
                a.push(region.to_string());
                a.extend(sync.word().map(str::to_string));
            }
            MirrorLog::Other { args, .. } => a.clone_from(args),
        }
        a
    }
}

/// The target of a table line read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadTarget {
    /// `<dev> <offset>`.
    Linear { dev: DevRef, offset: u64 },
    /// `<#stripes> <chunk> (<dev> <offset>)…`; each stripe holds `length / #stripes` sectors.
    Striped { chunk: u64, stripes: Vec<(DevRef, u64)> },
    /// `<cipher> <key> <iv_offset> <dev> <offset> [<#opt> <opt>…]`.
    Crypt {
        /// e.g. "aes-xts-plain64" or "capi:xts(aes)-plain64", verbatim.
        cipher: String,
        key: ReadKey,
        iv_offset: u64,
        dev: DevRef,
        offset: u64,
        /// Optional arguments (without their count), e.g. ["allow_discards", "sector_size:4096"].
        options: Vec<String>,
    },
    /// `<log> <#log args> <log args…> <#legs> (<dev> <offset>)… [<#features> <feature>…]`.
    Mirror {
        log: MirrorLog,
        legs: Vec<(DevRef, u64)>,
        /// e.g. ["handle_errors"] (without their count).
        features: Vec<String>,
    },
    /// Any other target, verbatim.
    Other { target_type: String, params: String },
}

/// `<#n> <word>…` at the end of `w` from `i` (absent: none). An explicit count of 0 reads
/// as none (the kernel never prints one).
fn counted_tail<'a>(w: &[&'a str], i: usize) -> Option<Vec<&'a str>> {
    let Some(c) = w.get(i) else { return Some(Vec::new()) };
    let c: usize = decimal(c)?;
    (w.len() - i - 1 == c).then(|| w[i + 1..].to_vec())
}

/// `(<dev> <offset>)` × n at `w[i..]` (None if there are fewer than 2n words there).
fn dev_offsets(w: &[&str], i: usize, n: usize) -> Option<Vec<(DevRef, u64)>> {
    if n > w.len() / 2 || w.len() < i + 2 * n {
        return None;
    }
    (0..n).map(|k| Some((w[i + 2 * k].parse().ok()?, decimal(w[i + 2 * k + 1])?))).collect()
}

fn strings(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

/// The parameters with a crypt key (the second word, unless `-` or a keyring reference)
/// replaced by `-`, for error messages.
fn redacted(target_type: &str, params: &str) -> String {
    if target_type != "crypt" {
        return params.to_string();
    }
    let mut w: Vec<&str> = params.split_whitespace().collect();
    if w.len() > 1 && !w[1].starts_with(':') {
        w[1] = "-";
    }
    w.join(" ")
}

impl ReadTarget {
    /// Parse the parameters of a `target_type` line as the kernel prints them.
    pub fn parse(target_type: &str, params: &str) -> Result<ReadTarget, DmParseError> {
        let err =
            |why| DmParseError { target_type: target_type.to_string(), params: redacted(target_type, params), why };
        if target_type.is_empty() || target_type.contains(char::is_whitespace) {
            return Err(err("the target type is empty or has spaces"));
        }
        let w: Vec<&str> = params.split_whitespace().collect();
        let dev = |s: &str, why| s.parse::<DevRef>().map_err(|_| err(why));
        let num = |s: &str, why| decimal::<u64>(s).ok_or_else(|| err(why));
        Ok(match TargetKind::of(target_type) {
            TargetKind::Linear => {
                if w.len() != 2 {
                    return Err(err("linear takes 2 arguments: <dev> <offset>"));
                }
                ReadTarget::Linear {
                    dev: dev(w[0], "the device is not major:minor")?,
                    offset: num(w[1], "bad offset")?,
                }
            }
            TargetKind::Striped => {
                let n: usize = w.first().and_then(|s| decimal(s)).ok_or_else(|| err("bad stripe count"))?;
                let chunk = num(w.get(1).copied().unwrap_or(""), "bad chunk size")?;
                if n == 0 || n.checked_mul(2).and_then(|x| x.checked_add(2)) != Some(w.len()) {
                    return Err(err("the stripe count does not match the (<dev> <offset>) pairs"));
                }
                let stripes = dev_offsets(&w, 2, n).ok_or_else(|| err("a stripe is not <major:minor> <offset>"))?;
                ReadTarget::Striped { chunk, stripes }
            }
            TargetKind::Crypt => {
                if w.len() < 5 {
                    return Err(err("crypt takes at least 5 arguments: <cipher> <key> <iv_offset> <dev> <offset>"));
                }
                let key = ReadKey::parse(w[1])
                    .ok_or_else(|| err("the key is neither hex, '-', nor :<size>:<type>:<desc>"))?;
                let options = counted_tail(&w, 5).ok_or_else(|| err("the optional argument count does not match"))?;
                ReadTarget::Crypt {
                    cipher: w[0].to_string(),
                    key,
                    iv_offset: num(w[2], "bad iv_offset")?,
                    dev: dev(w[3], "the device is not major:minor")?,
                    offset: num(w[4], "bad offset")?,
                    options: strings(&options),
                }
            }
            TargetKind::Mirror => {
                let kind = *w.first().ok_or_else(|| err("no log type"))?;
                let nlog: usize = w.get(1).and_then(|s| decimal(s)).ok_or_else(|| err("bad log argument count"))?;
                if nlog > w.len() - 2 {
                    return Err(err("fewer log arguments than announced"));
                }
                let log =
                    MirrorLog::parse(kind, &w[2..2 + nlog]).ok_or_else(|| err("bad core or disk log arguments"))?;
                let i = 2 + nlog;
                let nlegs: usize = w.get(i).and_then(|s| decimal(s)).ok_or_else(|| err("bad leg count"))?;
                if nlegs == 0 {
                    return Err(err("no legs"));
                }
                let legs = dev_offsets(&w, i + 1, nlegs).ok_or_else(|| err("a leg is not <major:minor> <offset>"))?;
                let features =
                    counted_tail(&w, i + 1 + 2 * nlegs).ok_or_else(|| err("the feature count does not match"))?;
                ReadTarget::Mirror { log, legs, features: strings(&features) }
            }
            TargetKind::Other => ReadTarget::Other { target_type: target_type.to_string(), params: params.to_string() },
        })
    }

    pub fn kind(&self) -> TargetKind {
        match self {
            ReadTarget::Linear { .. } => TargetKind::Linear,
            ReadTarget::Striped { .. } => TargetKind::Striped,
            ReadTarget::Crypt { .. } => TargetKind::Crypt,
            ReadTarget::Mirror { .. } => TargetKind::Mirror,
            ReadTarget::Other { .. } => TargetKind::Other,
        }
    }

    pub fn target_type(&self) -> &str {
        match self {
            ReadTarget::Linear { .. } => "linear",
            ReadTarget::Striped { .. } => "striped",
            ReadTarget::Crypt { .. } => "crypt",
            ReadTarget::Mirror { .. } => "mirror",
            ReadTarget::Other { target_type, .. } => target_type,
        }
    }

    /// The parameter string exactly as the kernel shows it, a hex key included (to load
    /// the line back; never log it: [`fmt::Display`] hides it).
    pub fn params(&self) -> String {
        let mut s = String::new();
        self.write_params(&mut s, true).expect("writing to a String");
        s
    }

    fn write_params(&self, out: &mut impl fmt::Write, reveal_key: bool) -> fmt::Result {
        let list = |out: &mut dyn fmt::Write, v: &[String]| -> fmt::Result {
            if !v.is_empty() {
                write!(out, " {}", v.len())?;
                for x in v {
                    write!(out, " {x}")?;
                }
            }
            Ok(())
        };
        match self {
            ReadTarget::Linear { dev, offset } => write!(out, "{dev} {offset}"),
            ReadTarget::Striped { chunk, stripes } => {
                write!(out, "{} {chunk}", stripes.len())?;
                stripes.iter().try_for_each(|(d, o)| write!(out, " {d} {o}"))
            }
            ReadTarget::Crypt { cipher, key, iv_offset, dev, offset, options } => {
                write!(out, "{cipher} {} {iv_offset} {dev} {offset}", key.field(reveal_key))?;
                list(out, options)
            }
            ReadTarget::Mirror { log, legs, features } => {
                let args = log.args();
                write!(out, "{} {}", log.kind(), args.len())?;
                args.iter().try_for_each(|a| write!(out, " {a}"))?;
                write!(out, " {}", legs.len())?;
                legs.iter().try_for_each(|(d, o)| write!(out, " {d} {o}"))?;
                list(out, features)
            }
            ReadTarget::Other { params, .. } => out.write_str(params),
        }
    }

    /// Point every reference to `from` at `to` (same offsets). Only linear and striped
    /// targets are rerouted; false if nothing changed.
    pub fn reroute(&mut self, from: DevRef, to: DevRef) -> bool {
        let mut changed = false;
        let mut swap = |d: &mut DevRef| {
            if *d == from {
                *d = to;
                changed = true;
            }
        };
        match self {
            ReadTarget::Linear { dev, .. } => swap(dev),
            ReadTarget::Striped { stripes, .. } => stripes.iter_mut().for_each(|(d, _)| swap(d)),
            _ => {}
        }
        changed
    }

    /// Whether the line refers to `dev`. For [`ReadTarget::Other`], whether `major:minor`
    /// is one of its words (its device fields are not known).
    pub fn references(&self, dev: DevRef) -> bool {
        match self {
            ReadTarget::Linear { dev: d, .. } | ReadTarget::Crypt { dev: d, .. } => *d == dev,
            ReadTarget::Striped { stripes: v, .. } => v.iter().any(|(d, _)| *d == dev),
            ReadTarget::Mirror { log, legs, .. } => {
                legs.iter().any(|(d, _)| *d == dev) || matches!(log, MirrorLog::Disk { dev: d, .. } if *d == dev)
            }
            ReadTarget::Other { params, .. } => mentions(params, dev),
        }
    }
}

/// Whether `dev`'s `major:minor` is a word of `params`.
fn mentions(params: &str, dev: DevRef) -> bool {
    let d = dev.to_string();
    params.split_whitespace().any(|w| w == d)
}

impl fmt::Display for ReadTarget {
    /// `<type> <params>`, a hex key shown as `-`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.target_type())?;
        if !matches!(self, ReadTarget::Other { params, .. } if params.is_empty()) {
            f.write_str(" ")?;
        }
        self.write_params(f, false)
    }
}

/// One table line read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmLine {
    pub start: u64,
    pub length: u64,
    pub target: ReadTarget,
}

impl DmLine {
    pub fn parse(l: &TableLineFacts) -> Result<DmLine, DmParseError> {
        Ok(DmLine { start: l.start, length: l.length, target: ReadTarget::parse(&l.target_type, &l.params)? })
    }

    pub fn target_type(&self) -> &str {
        self.target.target_type()
    }

    /// Exactly the kernel's parameter string (see [`ReadTarget::params`]).
    pub fn params(&self) -> String {
        self.target.params()
    }

    /// Back to the untyped form, exactly (a hex key included).
    pub fn to_facts(&self) -> TableLineFacts {
        TableLineFacts {
            start: self.start,
            length: self.length,
            target_type: self.target_type().to_string(),
            params: self.params(),
        }
    }

    /// Whether every sector this line maps onto `raw` lies below `l` (true if it maps
    /// nothing onto `raw`, or is neither linear nor striped: those are not checked).
    pub fn maps_only_below(&self, raw: DevRef, l: u64) -> bool {
        let below = |o: u64, n: u64| o.checked_add(n).is_some_and(|e| e <= l);
        match &self.target {
            ReadTarget::Linear { dev, offset } => *dev != raw || below(*offset, self.length),
            ReadTarget::Striped { stripes, .. } => {
                let per = self.length / stripes.len() as u64;
                stripes.iter().all(|(d, o)| *d != raw || below(*o, per))
            }
            _ => true,
        }
    }
}

impl FromStr for DmLine {
    type Err = DmParseError;
    /// `<start> <length> <type> <params>`, a line of `dmsetup table`.
    fn from_str(s: &str) -> Result<DmLine, DmParseError> {
        /// The first word of `s` and the rest, leading whitespace skipped.
        fn word(s: &str) -> (&str, &str) {
            let s = s.trim_start();
            s.split_once(char::is_whitespace).unwrap_or((s, ""))
        }
        let (a, rest) = word(s);
        let (b, rest) = word(rest);
        let (t, rest) = word(rest);
        let params = rest.trim();
        let err = |why| DmParseError { target_type: t.to_string(), params: redacted(t, params), why };
        let start = decimal(a).ok_or_else(|| err("bad start sector"))?;
        let length = decimal(b).ok_or_else(|| err("bad length"))?;
        Ok(DmLine { start, length, target: ReadTarget::parse(t, params)? })
    }
}

impl fmt::Display for DmLine {
    /// `<start> <length> <type> <params>`, a hex key shown as `-`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.start, self.length, self.target)
    }
}

/// Whether every linear or striped line of `table` (read back from the kernel) that maps
/// onto `raw` maps only sectors below `l`; lines of other targets are not checked. A
/// linear or striped line that does not parse passes only if `raw` is none of its words.
/// (What `maps_within` in engine/mod.rs computes.)
pub fn maps_only_below(table: &[TableLineFacts], raw: DevRef, l: u64) -> bool {
    table.iter().all(|line| match DmLine::parse(line) {
        Ok(d) => d.maps_only_below(raw, l),
        Err(_) => !TargetKind::of(&line.target_type).reroutable() || !mentions(&line.params, raw),
    })
}

/// The first linear line of `table` that maps onto `dev` (at any offset).
pub fn linear_onto(table: &[TableLineFacts], dev: DevRef) -> Option<&TableLineFacts> {
    table.iter().find(
        |l| matches!(ReadTarget::parse(&l.target_type, &l.params), Ok(ReadTarget::Linear { dev: d, .. }) if d == dev),
    )
}

/// Whether a line read back refers to `dev`; a line that does not parse, whether
/// `major:minor` is one of its words.
pub fn references(line: &TableLineFacts, dev: DevRef) -> bool {
    match ReadTarget::parse(&line.target_type, &line.params) {
        Ok(t) => t.references(dev),
        Err(_) => mentions(&line.params, dev),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::geometry::Geometry;
    use crate::core::tables::{self, BridgePhase, CryptSpec, Devices};

    const RAW: DevRef = DevRef { major: 98, minor: 5 };

    fn tl(start: u64, length: u64, t: &str, p: &str) -> TableLineFacts {
        TableLineFacts { start, length, target_type: t.into(), params: p.into() }
    }

    fn d(major: u32, minor: u32) -> DevRef {
        DevRef { major, minor }
    }

    /// Parses, and renders back exactly; also through `dmsetup table`'s line form.
    fn round_trip(t: &str, p: &str) -> ReadTarget {
        let r = ReadTarget::parse(t, p).unwrap_or_else(|e| panic!("{t} {p:?}: {e}"));
        assert_eq!(r.params(), p);
        assert_eq!(r.target_type(), t);
        let line = tl(8, 4096, t, p);
        let dl = DmLine::parse(&line).unwrap();
        assert_eq!(dl.to_facts(), line);
        let text = format!("8 4096 {t} {p}").trim_end().to_string();
        assert_eq!(text.parse::<DmLine>().unwrap(), dl);
        if !matches!(r, ReadTarget::Crypt { key: ReadKey::Hex(_), .. }) {
            assert_eq!(dl.to_string(), text);
        }
        r
    }

    #[test]
    fn dev_refs_are_major_minor_as_the_kernel_prints_them() {
        assert_eq!("98:5".parse::<DevRef>().unwrap(), RAW);
        assert_eq!("0:0".parse::<DevRef>().unwrap(), d(0, 0));
        assert_eq!("4294967295:1".parse::<DevRef>().unwrap(), d(u32::MAX, 1));
        for bad in [
            "",
            "98",
            "98:",
            ":5",
            "98:5:1",
            "/dev/sda5",
            "+98:5",
            "98:-5",
            "098:5",
            "98:05",
            "4294967296:0",
            " 98:5",
            "a:b",
        ] {
            assert!(bad.parse::<DevRef>().is_err(), "{bad:?}");
        }
        assert_eq!(d(254, 12).to_string().parse::<DevRef>().unwrap(), d(254, 12));
    }

    #[test]
    fn linear() {
        let r = round_trip("linear", "8:5 2048");
        assert_eq!(r, ReadTarget::Linear { dev: d(8, 5), offset: 2048 });
        round_trip("linear", "98:5 0");
        round_trip("linear", "254:2 0");
        for bad in ["", "8:5", "8:5 2048 1", "sda5 2048", "8:5 -1", "8:5 x", "8:5 02048", "8:5 18446744073709551616"] {
            assert!(ReadTarget::parse("linear", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn striped() {
        let r = round_trip("striped", "2 128 98:5 2048 98:17 4096");
        assert_eq!(r, ReadTarget::Striped { chunk: 128, stripes: vec![(RAW, 2048), (d(98, 17), 4096)] });
        round_trip("striped", "1 8 8:5 0");
        round_trip("striped", "3 64 8:5 0 8:5 100 8:21 7");
        for bad in [
            "",
            "2",
            "2 128",
            "0 128",
            "2 128 98:5 2048",
            "2 128 98:5 2048 98:17",
            "2 128 98:5 2048 98:17 4096 1",
            "1 128 98:5 2048 98:17 4096",
            "x 128 98:5 2048",
            "1 x 98:5 2048",
            "1 128 sda 2048",
            "18446744073709551615 128 98:5 2048",
            "9223372036854775808 8 8:5 0",
        ] {
            assert!(ReadTarget::parse("striped", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crypt_as_read_back() {
        // The adapter's scrubbed form, the simulator's, and what the engine loads.
        let r = round_trip("crypt", "aes-xts-plain64 - 0 8:5 32768");
        assert_eq!(
            r,
            ReadTarget::Crypt {
                cipher: "aes-xts-plain64".into(),
                key: ReadKey::Dash,
                iv_offset: 0,
                dev: d(8, 5),
                offset: 32768,
                options: vec![],
            }
        );
        let r = round_trip("crypt", "aes-xts-plain64 - 1000 8:5 33768 1 allow_discards");
        assert!(matches!(r, ReadTarget::Crypt { iv_offset: 1000, ref options, .. } if options == &["allow_discards"]));
        // Keyring references are kept (not secret), description with colons and all.
        let kr = "aes-xts-plain64 :64:logon:cryptsetup:3f2a-d0 0 8:5 32768";
        let r = round_trip("crypt", kr);
        assert!(
            matches!(r, ReadTarget::Crypt { key: ReadKey::Keyring(ref k), .. } if k == ":64:logon:cryptsetup:3f2a-d0")
        );
        assert_eq!(DmLine::parse(&tl(0, 8, "crypt", kr)).unwrap().to_string(), format!("0 8 crypt {kr}"));
        round_trip("crypt", "capi:xts(aes)-plain64 - 0 8:5 4096 2 allow_discards sector_size:4096");
    }

    #[test]
    fn a_hex_key_is_kept_but_never_shown() {
        let key = "0f".repeat(64);
        let p = format!("aes-xts-plain64 {key} 4096 8:5 36864 2 allow_discards sector_size:512");
        let r = round_trip("crypt", &p);
        let ReadTarget::Crypt { key: ReadKey::Hex(k), options, iv_offset, offset, dev, .. } = &r else {
            panic!("{r:?}")
        };
        assert_eq!((k.bytes(), k.expose()), (64, key.as_str()));
        assert_eq!((*iv_offset, *offset, *dev), (4096, 36864, d(8, 5)));
        assert_eq!(options, &["allow_discards", "sector_size:512"]);
        assert_eq!(r.params(), p, "params() renders the key, to load the line back");
        let line = DmLine::parse(&tl(0, 8, "crypt", &p)).unwrap();
        for shown in [format!("{r:?}"), r.to_string(), format!("{line:?}"), line.to_string()] {
            assert!(!shown.contains("0f0f"), "{shown}");
        }
        assert_eq!(line.to_string(), "0 8 crypt aes-xts-plain64 - 4096 8:5 36864 2 allow_discards sector_size:512");
        // Upper-case hex is a key too.
        assert!(matches!(
            ReadTarget::parse("crypt", "aes-xts-plain64 ABCDEF01 0 8:5 0").unwrap(),
            ReadTarget::Crypt { key: ReadKey::Hex(_), .. }
        ));
    }

    #[test]
    fn malformed_crypt_lines_are_errors_that_never_carry_the_key() {
        let key = "0f".repeat(64);
        for bad in [
            String::new(),
            "aes-xts-plain64".into(),
            format!("aes-xts-plain64 {key} 0 8:5"),
            format!("aes-xts-plain64 {key} x 8:5 0"),
            format!("aes-xts-plain64 {key} 0 sda5 0"),
            format!("aes-xts-plain64 {key} 0 8:5 x"),
            format!("aes-xts-plain64 {key} 0 8:5 0 2 allow_discards"),
            format!("aes-xts-plain64 {key} 0 8:5 0 1 allow_discards x"),
            format!("aes-xts-plain64 {key} 0 8:5 0 x"),
            format!("aes-xts-plain64 {key}0 0 8:5 0"),
            "aes-xts-plain64 0fzz 0 8:5 0".into(),
            "aes-xts-plain64 :64 0 8:5 0".into(),
            "aes-xts-plain64 :x:logon:d 0 8:5 0".into(),
            "aes-xts-plain64 :64::d 0 8:5 0".into(),
            "aes-xts-plain64 - 0 8:5 32768 2 x".into(),
        ] {
            let e = ReadTarget::parse("crypt", &bad).expect_err(&bad.replace(&key, "<key>"));
            assert!(!e.to_string().contains("0f0f") && !format!("{e:?}").contains("0f0f"), "{e}");
            assert_eq!(e.target_type, "crypt");
        }
    }

    #[test]
    fn mirror_as_luksify_and_the_simulator_load_it() {
        let r = round_trip("mirror", "core 2 1024 nosync 2 98:5 32768 254:1 32768");
        assert_eq!(
            r,
            ReadTarget::Mirror {
                log: MirrorLog::Core { region: 1024, sync: LogSync::NoSync },
                legs: vec![(RAW, 32768), (d(254, 1), 32768)],
                features: vec![],
            }
        );
        let r = round_trip("mirror", "core 1 8 2 98:5 100 98:5 200");
        let ReadTarget::Mirror { log, .. } = &r else { panic!() };
        assert_eq!((log.kind(), log.region(), log.args()), ("core", Some(8), vec!["8".to_string()]));
        round_trip("mirror", "core 2 8 sync 2 98:5 300 98:5 400");
        round_trip("mirror", "core 2 8 nosync 2 98:5 300 98:5 400 1 handle_errors");
        round_trip("mirror", "core 1 1024 3 8:5 0 8:21 0 8:37 0 2 handle_errors keep_log");
        let r = round_trip("mirror", "disk 3 254:3 1024 nosync 2 8:5 0 8:21 0");
        let ReadTarget::Mirror { log, .. } = &r else { panic!() };
        assert_eq!(*log, MirrorLog::Disk { dev: d(254, 3), region: 1024, sync: LogSync::NoSync });
        assert!(r.references(d(254, 3)) && r.references(d(8, 21)) && !r.references(d(8, 37)));
        round_trip("mirror", "disk 2 254:3 1024 2 8:5 0 8:21 0");
        let r = round_trip("mirror", "userspace 4 LVM-xyz clustered-disk 254:3 1024 2 8:5 0 8:21 0");
        let ReadTarget::Mirror { log, .. } = &r else { panic!() };
        assert_eq!((log.kind(), log.region()), ("userspace", None));
        // An explicit empty feature list reads as none (the kernel never prints one).
        let r = ReadTarget::parse("mirror", "core 1 8 2 98:5 100 98:5 200 0").unwrap();
        assert_eq!(r.params(), "core 1 8 2 98:5 100 98:5 200");
        for bad in [
            "",
            "core",
            "core 2 1024",
            "core 2 1024 nosync",
            "core 2 1024 nosync 2 98:5 32768",
            "core 2 1024 nosync 2 98:5 32768 254:1",
            "core 2 1024 nosync 2 98:5 32768 254:1 x",
            "core 2 1024 nosync 0",
            "core 2 1024 nosync x 98:5 0",
            "core 2 1024 nosync 2 98:5 0 254:1 0 1",
            "core 2 1024 nosync 2 98:5 0 254:1 0 2 handle_errors",
            "core 2 1024 nosync 2 98:5 0 254:1 0 x",
            "core 2 1024 maybe 2 98:5 0 254:1 0",
            "core 3 1024 nosync x 2 98:5 0 254:1 0",
            "core 0 2 98:5 0 254:1 0",
            "disk 2 sda 1024 2 98:5 0 254:1 0",
            "disk 1 254:3 2 98:5 0 254:1 0",
            "core 99 1",
            "core 18446744073709551615 1",
            "core 1 8 18446744073709551615 98:5 0",
            "core 1 8 9223372036854775808 98:5 0",
        ] {
            assert!(ReadTarget::parse("mirror", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn other_targets_are_kept_verbatim() {
        for (t, p) in [
            ("snapshot", "98:5 98:6 P 8"),
            ("snapshot-origin", "98:5"),
            ("error", ""),
            ("zero", ""),
            ("thin-pool", "254:1 254:2 128 0 1 skip_block_zeroing"),
            ("raid", "raid1 3 0 region_size 1024 2 254:1 254:2 254:3 254:4"),
            ("integrity", "8:5 0 28 J 3 internal_hash:hmac(sha256):- journal_crypt:ctr(aes):- block_size:4096"),
        ] {
            let r = round_trip(t, p);
            assert_eq!(r, ReadTarget::Other { target_type: t.into(), params: p.into() });
            assert_eq!(r.kind(), TargetKind::Other);
        }
        assert_eq!(DmLine::parse(&tl(0, 8, "error", "")).unwrap().to_string(), "0 8 error");
        assert!(ReadTarget::parse("snapshot", "98:5 98:6 P 8").unwrap().references(d(98, 6)));
        assert!(ReadTarget::parse("", "8:5 0").is_err());
    }

    #[test]
    fn dmsetup_lines() {
        let l: DmLine = "0 81920 linear 8:5 2048".parse().unwrap();
        assert_eq!(l, DmLine { start: 0, length: 81920, target: ReadTarget::Linear { dev: d(8, 5), offset: 2048 } });
        assert_eq!(l.to_string(), "0 81920 linear 8:5 2048");
        let l: DmLine = "  8  4088   mirror core 2 1024 nosync 2 98:5 8 254:1 8\n".parse().unwrap();
        assert_eq!(l.to_string(), "8 4088 mirror core 2 1024 nosync 2 98:5 8 254:1 8");
        assert_eq!("0 8 error".parse::<DmLine>().unwrap().target_type(), "error");
        for bad in ["", "0", "0 8", "x 8 linear 8:5 0", "0 -8 linear 8:5 0", "0 8 linear 8:5", "0 8 linear"] {
            assert!(bad.parse::<DmLine>().is_err(), "{bad:?}");
        }
        let e = format!("0 8 crypt aes-xts-plain64 {} 0 8:5", "ab".repeat(32)).parse::<DmLine>().unwrap_err();
        assert!(!e.to_string().contains("abab"), "{e}");
    }

    #[test]
    fn what_luksify_loads_reads_back_the_same() {
        let g = Geometry::new(40_960 + 4096 + 10_000, 40_960, 4096, 4096, 1024).unwrap();
        let dv = Devices { raw: RAW, staging: d(254, 1), mirror: d(254, 2) };
        for discards in [false, true] {
            let spec = CryptSpec { cipher: "aes-xts-plain64".into(), allow_discards: discards };
            let key = "5a".repeat(64);
            let mut all = tables::staging_table(&g, &spec, RAW);
            all.extend(tables::bridge_table(&g, &spec, dv, BridgePhase::Mirroring { from: 0, to: 4096 }));
            all.extend(tables::bridge_table(&g, &spec, dv, BridgePhase::Steady { cursor: 8192 }));
            all.extend(tables::mirror_table(&g, dv, 0, 4096));
            all.extend(tables::mirror_idle_table(&g, dv));
            for line in &all {
                let p = line.params(&key);
                let r = round_trip(line.target_type(), &p);
                let dl = DmLine { start: line.start, length: line.length, target: r.clone() };
                assert_eq!(dl.to_string(), line.to_string().replace("<key>", "-"));
                match (&line.target, &r) {
                    (tables::Target::Linear { dev, offset }, ReadTarget::Linear { dev: d2, offset: o2 }) => {
                        assert_eq!((dev, offset), (d2, o2))
                    }
                    (
                        tables::Target::Crypt { spec: s, iv_offset, dev, offset },
                        ReadTarget::Crypt { cipher, key: ReadKey::Hex(k), iv_offset: i2, dev: d2, offset: o2, options },
                    ) => {
                        assert_eq!((&s.cipher, iv_offset, dev, offset, k.expose()), (cipher, i2, d2, o2, key.as_str()));
                        assert_eq!(options.contains(&"allow_discards".to_string()), s.allow_discards);
                    }
                    (
                        tables::Target::Mirror { region, legs },
                        ReadTarget::Mirror {
                            log: MirrorLog::Core { region: r2, sync: LogSync::NoSync },
                            legs: l2,
                            features,
                        },
                    ) => {
                        assert_eq!((region, &legs[..], features.len()), (r2, &l2[..], 0));
                    }
                    (w, r) => panic!("{w:?} read back as {r:?}"),
                }
            }
        }
    }

    /// Every prefix and every one-word corruption of good lines: an error or a line that
    /// renders back to what it parses from; never a panic.
    #[test]
    fn mangled_lines_never_panic() {
        let good = [
            ("linear", "8:5 2048"),
            ("striped", "2 128 98:5 2048 98:17 4096"),
            ("crypt", "aes-xts-plain64 0f0f 4096 8:5 36864 2 allow_discards sector_size:512"),
            ("crypt", "aes-xts-plain64 :64:logon:cryptsetup:3f2a-d0 0 8:5 32768"),
            ("mirror", "core 2 1024 nosync 2 98:5 32768 254:1 32768 1 handle_errors"),
            ("mirror", "disk 3 254:3 1024 sync 2 8:5 0 8:21 0"),
        ];
        let junk =
            ["", "0", "1", "2", "3", "-1", "x", "8:5", ":", "-", "18446744073709551615", "4294967296:0", "nosync"];
        for (t, p) in good {
            let w: Vec<&str> = p.split_whitespace().collect();
            let mut variants: Vec<String> = (0..=w.len()).map(|n| w[..n].join(" ")).collect();
            for i in 0..w.len() {
                for j in junk {
                    let mut v = w.clone();
                    v[i] = j;
                    variants.push(v.join(" "));
                    v.insert(i, j);
                    variants.push(v.join(" "));
                }
            }
            for v in variants {
                for ty in [t, "linear", "striped", "crypt", "mirror"] {
                    if let Ok(r) = ReadTarget::parse(ty, &v) {
                        assert_eq!(ReadTarget::parse(ty, &r.params()).unwrap(), r, "{ty} {v:?}");
                    }
                    let _ = format!("0 8 {ty} {v}").parse::<DmLine>();
                }
            }
        }
    }

    #[test]
    fn kinds() {
        assert!(TargetKind::of("linear").reroutable() && TargetKind::of("striped").reroutable());
        for t in ["crypt", "mirror", "snapshot", "snapshot-origin", "thin", "raid", "error", "Linear", ""] {
            assert!(!TargetKind::of(t).reroutable(), "{t}");
        }
        assert_eq!(ReadTarget::parse("crypt", "c - 0 8:5 0").unwrap().kind(), TargetKind::Crypt);
        assert_eq!(ReadTarget::parse("mirror", "core 1 8 2 8:5 0 8:6 0").unwrap().kind(), TargetKind::Mirror);
    }

    #[test]
    fn reroute_only_linear_and_striped() {
        let to = d(254, 9);
        let mut t = ReadTarget::parse("striped", "2 128 98:5 2048 98:5 4096").unwrap();
        assert!(t.reroute(RAW, to));
        assert_eq!(t.params(), "2 128 254:9 2048 254:9 4096");
        assert!(!t.reroute(RAW, to), "nothing left to reroute");
        let mut t = ReadTarget::parse("crypt", "aes-xts-plain64 - 0 98:5 32768").unwrap();
        assert!(!t.reroute(RAW, to));
        let mut t = ReadTarget::parse("mirror", "core 1 8 2 98:5 0 98:5 8").unwrap();
        assert!(!t.reroute(RAW, to));
        assert_eq!(t.params(), "core 1 8 2 98:5 0 98:5 8");
    }

    /// engine/mod.rs's `maps_within` as it was when [`maps_only_below`] was written from it.
    fn maps_within_before(table: &[TableLineFacts], raw: DevRef, l: u64) -> bool {
        let r = raw.to_string();
        table.iter().all(|line| {
            let w: Vec<&str> = line.params.split_whitespace().collect();
            match line.target_type.as_str() {
                "linear" => {
                    w.first() != Some(&r.as_str())
                        || w.get(1).and_then(|o| o.parse::<u64>().ok()).map(|o| o + line.length <= l).unwrap_or(false)
                }
                "striped" => {
                    let n: u64 = w.first().and_then(|x| x.parse().ok()).unwrap_or(0);
                    let per = line.length.checked_div(n).unwrap_or(0);
                    (0..n as usize).all(|i| {
                        w.get(2 + 2 * i) != Some(&r.as_str())
                            || w.get(3 + 2 * i)
                                .and_then(|o| o.parse::<u64>().ok())
                                .map(|o| o + per <= l)
                                .unwrap_or(false)
                    })
                }
                _ => true,
            }
        })
    }

    #[test]
    fn maps_only_below_is_what_the_engine_checked() {
        let l = 100_000;
        let lines = [
            // linear onto raw: inside, up to the end, one past it
            tl(0, 1000, "linear", "98:5 2048"),
            tl(0, 1000, "linear", "98:5 99000"),
            tl(0, 1000, "linear", "98:5 99001"),
            // onto another device: never checked
            tl(0, 1000, "linear", "98:6 999999"),
            tl(0, 1000, "linear", "98:50 999999"),
            // striped, 2 stripes of 500
            tl(0, 1000, "striped", "2 128 98:5 2048 98:17 4096"),
            tl(0, 1000, "striped", "2 128 98:17 2048 98:5 99500"),
            tl(0, 1000, "striped", "2 128 98:17 2048 98:5 99501"),
            tl(0, 1000, "striped", "2 128 98:17 999999 98:17 999999"),
            // other targets, even onto raw and past l: not checked here
            tl(0, 1000, "crypt", "aes-xts-plain64 - 0 98:5 999999"),
            tl(0, 1000, "mirror", "core 1 8 2 98:5 999999 98:5 0"),
            tl(0, 1000, "snapshot", "98:5 98:6 P 8"),
        ];
        for line in &lines {
            let one = std::slice::from_ref(line);
            assert_eq!(maps_only_below(one, RAW, l), maps_within_before(one, RAW, l), "{line:?}");
        }
        let want = [true, true, false, true, true, true, true, false, true, true, true, true];
        let got: Vec<bool> = lines.iter().map(|x| maps_only_below(std::slice::from_ref(x), RAW, l)).collect();
        assert_eq!(got, want);
        assert!(!maps_only_below(&lines, RAW, l), "one line out is enough");
        assert!(maps_only_below(&[lines[0].clone(), lines[5].clone()], RAW, l));
        assert!(maps_only_below(&[], RAW, l));
        // No overflow near u64::MAX.
        assert!(!maps_only_below(&[tl(0, 1000, "linear", "98:5 18446744073709551615")], RAW, u64::MAX));
        // Lines that do not parse: fine only if they do not name raw at all (the engine
        // checked the first word of a linear line, or the stripes it could find).
        for (line, before) in [
            (tl(0, 1000, "linear", "98:5"), false),
            (tl(0, 1000, "linear", "98:6"), true),
            (tl(0, 1000, "linear", "98:6 0 98:5"), true),
            (tl(0, 1000, "striped", "2 128 98:5 2048"), true),
            (tl(0, 1000, "striped", "x 128 98:5 2048"), true),
            (tl(0, 1000, "striped", "2 128 98:6 0 98:7"), true),
        ] {
            let one = std::slice::from_ref(&line);
            assert_eq!(maps_within_before(one, RAW, l), before, "{line:?}");
            assert_eq!(maps_only_below(one, RAW, l), !line.params.contains("98:5"), "{line:?}");
        }
    }

    #[test]
    fn linear_onto_finds_where_the_bridge_maps_the_mirror_device() {
        let g = Geometry::new(40_960 + 4096 + 10_000, 40_960, 4096, 4096, 1024).unwrap();
        let dv = Devices { raw: RAW, staging: d(254, 1), mirror: d(254, 2) };
        let spec = CryptSpec { cipher: "aes-xts-plain64".into(), allow_discards: false };
        let bridge: Vec<TableLineFacts> =
            tables::bridge_table(&g, &spec, dv, BridgePhase::Mirroring { from: 32768, to: 36864 })
                .iter()
                .map(|l| tl(l.start, l.length, l.target_type(), &l.params("-")))
                .collect();
        let span = linear_onto(&bridge, dv.mirror).unwrap();
        assert_eq!((span.start, span.length), (32768, 4096));
        assert_eq!(linear_onto(&bridge, RAW).map(|s| s.start), Some(0), "the first linear line onto raw");
        assert_eq!(linear_onto(&bridge, d(254, 1)), None, "staging is not in the bridge");
        // Not a crypt or mirror line onto it, not a longer device number, not a malformed line.
        let t = [
            tl(0, 8, "crypt", "aes-xts-plain64 - 0 254:2 0"),
            tl(8, 8, "mirror", "core 1 8 2 254:2 0 254:1 0"),
            tl(16, 8, "linear", "254:20 0"),
            tl(24, 8, "linear", "254:2"),
            tl(32, 8, "linear", "254:2 7"),
        ];
        assert_eq!(linear_onto(&t, dv.mirror).map(|s| s.start), Some(32));
    }

    #[test]
    fn references_reads_devices_where_it_can() {
        assert!(references(&tl(0, 8, "crypt", "aes-xts-plain64 - 0 98:5 0"), RAW));
        assert!(!references(&tl(0, 8, "crypt", "aes-xts-plain64 - 0 98:50 0"), RAW));
        assert!(references(&tl(0, 8, "snapshot", "98:6 98:5 P 8"), RAW));
        assert!(references(&tl(0, 8, "linear", "98:5 0 junk"), RAW), "a malformed line: by its words");
        assert!(!references(&tl(0, 8, "linear", "98:6 0"), RAW));
        assert!(references(&tl(0, 8, "striped", "2 8 98:6 0 98:5 0"), RAW));
    }
}
