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

    #[cfg(test)]
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

    #[cfg(test)]
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

    #[cfg(test)]
    pub fn target_type(&self) -> &str {
        self.target.target_type()
    }

    #[cfg(test)]
    /// Exactly the kernel's parameter string (see [`ReadTarget::params`]).
    pub fn params(&self) -> String {
        self.target.params()
    }

    #[cfg(test)]
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

/// Rewrite an LV table so that every reference to `from` points at `to` (same offsets).
/// Returns None if the table does not reference `from` at all, or does not parse
/// ([`ReadTarget::parse`]). Only linear and striped targets are understood; the planner
/// refuses anything else before we get here.
pub fn reroute_params(target_type: &str, params: &str, from: DevRef, to: DevRef) -> Option<String> {
    let mut t = ReadTarget::parse(target_type, params).ok()?;
    t.reroute(from, to).then(|| t.params())
}

#[cfg(test)]
mod tests;
