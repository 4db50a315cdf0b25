//! The LUKS2 metadata at the start of a device, as cryptsetup writes it (both binary headers
//! and their JSON areas; docs/luks2-reencrypt-notes.md §1 and §2): which copy is valid, the
//! segments, luksify's own token, and — while the `online-reencrypt-v2` requirement is set —
//! how far the reencryption got. Pure: it reads bytes the caller read from the device.
//!
//! How much to read: [`parse`] needs the primary header and the secondary one after it, i.e.
//! `2 * hdr_size` bytes. [`HEAD_BYTES`] (32 KiB) covers the default `hdr_size` of 16 KiB (the
//! only one luksify writes). A header with a larger `hdr_size` (up to 4 MiB) makes [`parse`]
//! answer [`MetaError::NeedMore`] with the length it needs: read that much and call again.
//! When the primary copy is unusable the secondary is searched at the offsets cryptsetup
//! searches (16 KiB, 32 KiB, … 4 MiB), but only those inside `head`: a caller that wants to
//! find a secondary at a large offset behind a wiped primary passes [`MAX_HEAD_BYTES`] (or
//! the whole device, if smaller). `luksify status` does.
//!
//! A LUKS1 header (same magic, version 1) is not LUKS2 metadata: [`parse`] says `None`.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Bytes of the binary header (the JSON area follows it, up to `hdr_size`).
pub const BIN_BYTES: usize = 4096;
/// The smallest `hdr_size` (and cryptsetup's default).
pub const MIN_HDR_SIZE: usize = 16 * 1024;
/// The largest `hdr_size` LUKS2 allows.
pub const MAX_HDR_SIZE: usize = 4 * 1024 * 1024;
/// What [`parse`] needs for a header with the default `hdr_size`: both copies.
pub const HEAD_BYTES: usize = 2 * MIN_HDR_SIZE;
/// Enough for any LUKS2 header (both copies at the largest `hdr_size`).
pub const MAX_HEAD_BYTES: usize = 2 * MAX_HDR_SIZE;

/// The only requirement luksify understands (cryptsetup's in-place reencryption, 2.3.7+).
pub const REENCRYPT_V2: &str = "online-reencrypt-v2";

const MAGIC_1ST: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_2ND: &[u8; 6] = b"SKUL\xba\xbe";
const OFF_VERSION: usize = 6;
const OFF_HDR_SIZE: usize = 8;
const OFF_SEQID: usize = 16;
const OFF_CSUM_ALG: usize = 72;
const OFF_UUID: usize = 168;
const OFF_HDR_OFFSET: usize = 256;
const OFF_CSUM: usize = 448;
const CSUM_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// The header is larger than the bytes given: call again with at least this many.
    #[error("the LUKS2 header needs the first {0} bytes of the device")]
    NeedMore(usize),
    /// A LUKS2 magic is there but neither copy verifies; what was wrong with each.
    #[error("no copy of the LUKS2 header verifies (primary: {primary}; secondary: {secondary})")]
    NoValidCopy { primary: String, secondary: String },
    /// The chosen copy verifies but its JSON does not parse (or lacks what LUKS2 requires).
    #[error("the LUKS2 header's JSON metadata cannot be read: {0}")]
    Json(String),
    /// A mandatory requirement other than `online-reencrypt-v2`.
    #[error("the LUKS2 header has a requirement luksify does not know: {0}")]
    UnknownRequirement(String),
    /// The segments do not describe a reencryption luksify can read.
    #[error("the LUKS2 reencryption metadata is inconsistent: {0}")]
    Layout(String),
}

/// A segment's size: bytes, or "dynamic" (up to the end of the device / of the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Bytes(u64),
    Dynamic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentKind {
    Linear,
    Crypt { encryption: String, sector_size: u32, iv_tweak: u64 },
}

/// One entry of `segments`, in index order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub index: u32,
    pub kind: SegmentKind,
    /// Byte offset on the data device.
    pub offset: u64,
    pub size: Size,
    /// `in-reencryption`, `backup-previous`, `backup-final`, `backup-moved-segment`, …
    pub flags: Vec<String>,
}

impl Segment {
    pub fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }
    /// A backup segment (any `backup-*` flag): not part of the mapping.
    pub fn is_backup(&self) -> bool {
        self.flags.iter().any(|x| x.starts_with("backup-"))
    }
    pub fn is_crypt(&self) -> bool {
        matches!(self.kind, SegmentKind::Crypt { .. })
    }
}

/// luksify's settings, kept in a LUKS2 token of type "luksify".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LuksifyToken {
    /// The mapping's name (`/dev/mapper/NAME`).
    pub name: String,
    pub allow_discards: bool,
    /// The UUID of the PV being converted.
    pub pv_uuid: String,
    pub luksify_version: u32,
}

/// How far a reencryption (requirement `online-reencrypt-v2`) got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reencrypt {
    /// A regular segment is flagged `in-reencryption`: a step was interrupted after its
    /// first header write (`cryptsetup open` or `repair` recovers it).
    pub crashed: bool,
    /// L: the plaintext bytes being encrypted (the backup-previous segment's size).
    pub total_bytes: u64,
    /// S: where the ciphertext starts (the backup-final segment's offset).
    pub data_offset: u64,
    /// Where the first S bytes of plaintext were moved (backup-moved-segment), if any.
    pub moved_offset: Option<u64>,
    /// The bytes already encrypted: the regular crypt segments not flagged in-reencryption.
    pub encrypted_bytes: u64,
    /// The new cipher (backup-final's encryption).
    pub cipher: String,
}

impl Reencrypt {
    /// `encrypted_bytes / total_bytes` (0 for an empty device).
    pub fn progress(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            self.encrypted_bytes as f64 / self.total_bytes as f64
        }
    }
}

/// What the LUKS2 metadata says.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub uuid: String,
    /// The seqid of the copy taken (cryptsetup's "Epoch").
    pub seqid: u64,
    pub hdr_size: u64,
    /// `config.requirements.mandatory` (only `online-reencrypt-v2` is ever accepted).
    pub requirements: Vec<String>,
    /// Which copies verified: (primary, secondary).
    pub copies_valid: (bool, bool),
    /// Every segment, regular and backup, in index order.
    pub segments: Vec<Segment>,
    pub token: Option<LuksifyToken>,
    /// Some while the reencryption requirement is set.
    pub reencrypt: Option<Reencrypt>,
}

/// One copy of the binary header, checked.
struct Copy {
    hdr_size: usize,
    seqid: u64,
    uuid: String,
    json: Vec<u8>,
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn valid_hdr_size(n: u64) -> bool {
    n.is_power_of_two() && (MIN_HDR_SIZE as u64..=MAX_HDR_SIZE as u64).contains(&n)
}

/// The checksum cryptsetup stores: sha256 over the binary header with its csum field zeroed,
/// then the JSON area (`area` is the copy's whole `hdr_size` bytes).
pub fn checksum(area: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&area[..OFF_CSUM]);
    h.update([0u8; CSUM_LEN]);
    h.update(&area[OFF_CSUM + CSUM_LEN..]);
    h.finalize().into()
}

/// Read and verify the copy at `at` (0 for the primary). Err: why it is not usable, or
/// NeedMore.
fn read_copy(head: &[u8], at: usize, magic: &[u8; 6]) -> Result<Copy, CopyError> {
    match head.get(at..at + 6) {
        None => return Err(CopyError::NeedMore(at + BIN_BYTES)),
        Some(m) if m != magic => return Err(CopyError::Bad("no LUKS2 magic".into())),
        Some(_) => {}
    }
    let Some(bin) = head.get(at..at + BIN_BYTES) else {
        return Err(CopyError::NeedMore(at + BIN_BYTES));
    };
    let version = u16::from_be_bytes([bin[OFF_VERSION], bin[OFF_VERSION + 1]]);
    if version != 2 {
        return Err(CopyError::Bad(format!("version {version}, not 2")));
    }
    let hdr_size = be64(bin, OFF_HDR_SIZE);
    if !valid_hdr_size(hdr_size) {
        return Err(CopyError::Bad(format!("invalid hdr_size {hdr_size}")));
    }
    let hdr_size = hdr_size as usize;
    if at != 0 && hdr_size != at {
        return Err(CopyError::Bad(format!("hdr_size {hdr_size} but found at {at}")));
    }
    if be64(bin, OFF_HDR_OFFSET) != at as u64 {
        return Err(CopyError::Bad(format!("hdr_offset {} is not its place {at}", be64(bin, OFF_HDR_OFFSET))));
    }
    let alg = cstr(&bin[OFF_CSUM_ALG..OFF_CSUM_ALG + 32]);
    if alg != "sha256" {
        return Err(CopyError::Bad(format!("checksum algorithm {alg:?} (luksify reads sha256 only)")));
    }
    let Some(area) = head.get(at..at + hdr_size) else {
        return Err(CopyError::NeedMore(at + hdr_size));
    };
    if checksum(area)[..] != bin[OFF_CSUM..OFF_CSUM + 32] {
        return Err(CopyError::Bad("checksum mismatch".into()));
    }
    let json_area = &area[BIN_BYTES..];
    let end = json_area.iter().position(|&c| c == 0).unwrap_or(json_area.len());
    Ok(Copy {
        hdr_size,
        seqid: be64(bin, OFF_SEQID),
        uuid: cstr(&bin[OFF_UUID..OFF_UUID + 40]),
        json: json_area[..end].to_vec(),
    })
}

enum CopyError {
    NeedMore(usize),
    Bad(String),
}

/// What finishing an encryption whose last step is committed writes, in cryptsetup's own
/// order ([`finalized_header`]): the areas to wipe first (byte offsets, lengths), then the
/// new metadata for `[0, 2 * hdr_size)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalize {
    /// The reencrypt keyslot's area, and the moved segment (stale plaintext of the first S).
    pub wipe: Vec<(u64, u64)>,
    /// Both metadata copies, seqid + 1, checksummed: write at 0 (primary first).
    pub metadata: Vec<u8>,
}

fn str_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_str()?.parse().ok()
}

/// The state cryptsetup cannot leave by itself: every step committed (one regular segment,
/// crypt, dynamic, not in reencryption) but the final metadata not yet written (its
/// `reencrypt_teardown_ok`: `--resume-only` then fails with "Failed to set device segments
/// for next reencryption hotzone", `repair` finds nothing). Returns what cryptsetup's
/// teardown writes: the reencrypt keyslot and the backup segments dropped, the requirement
/// removed, the keyslots area sized to the data offset, digests bound to segment 0. `None`
/// when the header is not in that state. Both copies must verify with the same seqid
/// (what cryptsetup leaves after a committed write).
pub fn finalized_header(head: &[u8]) -> Result<Option<Finalize>, MetaError> {
    use serde_json::{json, Value};
    let Some(meta) = parse(head)? else { return Ok(None) };
    let Some(r) = &meta.reencrypt else { return Ok(None) };
    let regular: Vec<&Segment> = meta.segments.iter().filter(|s| !s.is_backup()).collect();
    if r.crashed || regular.len() != 1 || !regular[0].is_crypt() || regular[0].size != Size::Dynamic {
        return Ok(None);
    }
    let hs = meta.hdr_size as usize;
    let p = read_copy(head, 0, MAGIC_1ST);
    let s2 = read_copy(head, hs, MAGIC_2ND);
    let (Ok(p), Ok(s2)) = (p, s2) else {
        return Err(MetaError::Layout(
            "finishing needs both metadata copies intact (`cryptsetup repair` first)".into(),
        ));
    };
    if p.seqid != s2.seqid {
        return Err(MetaError::Layout("the metadata copies differ (`cryptsetup repair` first)".into()));
    }
    let mut j: Value = serde_json::from_slice(&p.json).map_err(|e| MetaError::Json(e.to_string()))?;
    let bad = |m: &str| MetaError::Layout(m.to_string());
    let segs = j["segments"].as_object().ok_or_else(|| bad("no segments"))?.clone();
    let mut fin = segs
        .values()
        .find(|v| v["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "backup-final")))
        .cloned()
        .ok_or_else(|| bad("no backup-final segment"))?;
    fin.as_object_mut().ok_or_else(|| bad("segment"))?.remove("flags");
    let data_offset = str_u64(&fin["offset"]).ok_or_else(|| bad("backup-final offset"))?;
    let mut wipe = Vec::new();
    if let Some(m) =
        segs.values().find(|v| v["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "backup-moved-segment")))
    {
        wipe.push((
            str_u64(&m["offset"]).ok_or_else(|| bad("moved offset"))?,
            str_u64(&m["size"]).ok_or_else(|| bad("moved size"))?,
        ));
    }
    let keyslots = j["keyslots"].as_object_mut().ok_or_else(|| bad("no keyslots"))?;
    let reenc: Vec<String> =
        keyslots.iter().filter(|(_, v)| v["type"] == "reencrypt").map(|(k, _)| k.clone()).collect();
    for k in &reenc {
        let area = &keyslots[k]["area"];
        if let (Some(o), Some(l)) = (str_u64(&area["offset"]), str_u64(&area["size"])) {
            wipe.insert(0, (o, l));
        }
        keyslots.remove(k);
    }
    j["segments"] = json!({ "0": fin });
    let digests = j["digests"].as_object_mut().ok_or_else(|| bad("no digests"))?;
    digests.retain(|_, d| !d["keyslots"].as_array().is_some_and(|ks| ks.iter().any(|k| reenc.iter().any(|r| k == r))));
    for d in digests.values_mut() {
        d["segments"] = json!(["0"]);
    }
    let config = j["config"].as_object_mut().ok_or_else(|| bad("no config"))?;
    config.insert("keyslots_size".into(), json!((data_offset - 2 * hs as u64).to_string()));
    if let Some(req) = config.get_mut("requirements").and_then(|r| r.as_object_mut()) {
        if let Some(m) = req.get_mut("mandatory").and_then(|m| m.as_array_mut()) {
            m.retain(|x| x != REENCRYPT_V2);
            if m.is_empty() {
                req.remove("mandatory");
            }
        }
        if req.is_empty() {
            config.remove("requirements");
        }
    }
    Ok(Some(Finalize { wipe, metadata: both_copies(head, hs, p.seqid + 1, &j)? }))
}

/// Both metadata copies of `[0, 2 * hs)` with the JSON `j` and `seqid`, each checksummed, the
/// rest of the binary headers as in `head` (cryptsetup writes the primary first).
fn both_copies(head: &[u8], hs: usize, seqid: u64, j: &serde_json::Value) -> Result<Vec<u8>, MetaError> {
    let text = serde_json::to_vec(j).map_err(|e| MetaError::Json(e.to_string()))?;
    if text.len() >= hs - BIN_BYTES {
        return Err(MetaError::Layout("the new metadata does not fit the JSON area".into()));
    }
    let mut out = vec![0u8; 2 * hs];
    for at in [0usize, hs] {
        let area = &mut out[at..at + hs];
        area[..BIN_BYTES].copy_from_slice(&head[at..at + BIN_BYTES]);
        area[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&seqid.to_be_bytes());
        area[OFF_CSUM..OFF_CSUM + CSUM_LEN].fill(0);
        area[BIN_BYTES..BIN_BYTES + text.len()].copy_from_slice(&text);
        let c = checksum(area);
        area[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&c);
    }
    Ok(out)
}

/// One step of an encryption in progress (`encrypt`, `backward`, `datashift` S with a moved
/// first segment: what luksify's cut-over leaves), as metadata: the next hotzone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// Plaintext bytes `[from, from + len)` of the device as mapped (logical offsets) are
    /// encrypted by this step to `from + S` on the device (the moved segment's bytes, read at
    /// its offset, when `from` is 0).
    pub from: u64,
    pub len: u64,
    /// The step's last: the metadata is the all-committed state (one crypt segment) that
    /// [`finalized_header`] then finishes.
    pub last: bool,
    /// Both metadata copies after the step, seqid + 1, checksummed: write at 0, primary first.
    pub metadata: Vec<u8>,
}

/// The clean state one hotzone later, as libcryptsetup's datashift encryption writes it after
/// its step (`reencrypt_step`'s second commit; `tests/uml_luks2_steps` checks every step of
/// libcryptsetup's own runs against it): hotzones of S taken from the end of the plaintext
/// segment, the lowest one shorter, then the moved first S; the regular segments in logical
/// order — moved (linear at M), plaintext (linear, in place at S), crypt (at its logical offset
/// plus S, `iv_tweak` its logical sector) — then the backups: previous, final, moved; the volume
/// key's digest bound to [final, crypt]. `None`: no such encryption in progress between steps
/// (none at all, a crashed step, another mode, or every step committed).
pub fn advanced_header(head: &[u8]) -> Result<Option<Advance>, MetaError> {
    use serde_json::{json, Value};
    let Some(meta) = parse(head)? else { return Ok(None) };
    let Some(r) = &meta.reencrypt else { return Ok(None) };
    let Some(m) = r.moved_offset else { return Ok(None) };
    if r.crashed {
        return Ok(None);
    }
    let hs = meta.hdr_size as usize;
    let (l, s) = (r.total_bytes, r.data_offset);
    let bad = |m: &str| MetaError::Layout(m.to_string());
    let regular: Vec<&Segment> = meta.segments.iter().filter(|x| !x.is_backup()).collect();
    let moved_left = regular.iter().any(|x| !x.is_crypt() && x.offset == m);
    let plain = regular.iter().find(|x| !x.is_crypt() && x.offset == s && x.offset != m);
    let plain_bytes = match plain.map(|x| x.size) {
        None => 0,
        Some(Size::Bytes(b)) => b,
        Some(Size::Dynamic) => return Err(bad("a dynamic plaintext segment")),
    };
    // logical start of the ciphertext: everything above the moved and plaintext segments
    let x = if moved_left { s + plain_bytes } else { 0 };
    if !moved_left || x > l || regular.len() != 1 + usize::from(plain_bytes > 0) + usize::from(x < l) {
        return Ok(None);
    }
    let crypt_ok = |c: &Segment| {
        matches!(c.kind, SegmentKind::Crypt { iv_tweak, .. } if iv_tweak == x / 512)
            && c.offset == x + s
            && c.size == Size::Bytes(l - x)
    };
    if x < l && !regular.iter().any(|c| crypt_ok(c)) {
        return Err(bad("the crypt segment is not where the plaintext ends"));
    }
    let (from, len) = if plain_bytes > 0 {
        let hz = plain_bytes.min(s);
        (x - hz, hz)
    } else {
        (0, s)
    };
    let p = read_copy(head, 0, MAGIC_1ST);
    let s2 = read_copy(head, hs, MAGIC_2ND);
    let (Ok(p), Ok(s2)) = (p, s2) else {
        return Err(bad("a step needs both metadata copies intact (`cryptsetup repair` first)"));
    };
    if p.seqid != s2.seqid {
        return Err(bad("the metadata copies differ (`cryptsetup repair` first)"));
    }
    let mut j: Value = serde_json::from_slice(&p.json).map_err(|e| MetaError::Json(e.to_string()))?;
    let segs = j["segments"].as_object().ok_or_else(|| bad("no segments"))?.clone();
    let flagged = |f: &str| {
        segs.iter()
            .find(|(_, v)| v["flags"].as_array().is_some_and(|a| a.iter().any(|x| x == f)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .ok_or_else(|| bad(&format!("no {f} segment")))
    };
    let (_, prev) = flagged("backup-previous")?;
    let (old_final, fin) = flagged("backup-final")?;
    let (_, moved) = flagged("backup-moved-segment")?;
    let crypt = |at: u64, size: Value| {
        let mut c = fin.clone();
        let o = c.as_object_mut().expect("a segment is an object");
        o.remove("flags");
        o.insert("offset".into(), json!((at + s).to_string()));
        o.insert("iv_tweak".into(), json!((at / 512).to_string()));
        o.insert("size".into(), size);
        c
    };
    let mut order: Vec<Value> = Vec::new();
    let last = from == 0;
    if last {
        order.push(crypt(0, json!("dynamic")));
    } else {
        let mut mv = moved.clone();
        mv.as_object_mut().expect("a segment is an object").remove("flags");
        order.push(mv);
        if from > s {
            order.push(json!({ "type": "linear", "offset": s.to_string(), "size": (from - s).to_string() }));
        }
        order.push(crypt(from, json!((l - from).to_string())));
    }
    let crypt_id = order.len() - 1;
    let final_new = order.len() + 1;
    order.extend([prev, fin, moved]);
    let new_segs: serde_json::Map<String, Value> =
        order.into_iter().enumerate().map(|(i, v)| (i.to_string(), v)).collect();
    j["segments"] = Value::Object(new_segs);
    let digests = j["digests"].as_object_mut().ok_or_else(|| bad("no digests"))?;
    for d in digests.values_mut() {
        if d["segments"].as_array().is_some_and(|a| a.iter().any(|x| *x == json!(old_final))) {
            d["segments"] = json!([final_new.to_string(), crypt_id.to_string()]);
        }
    }
    Ok(Some(Advance { from, len, last, metadata: both_copies(head, hs, p.seqid + 1, &j)? }))
}

/// Parse the LUKS2 metadata from the device's first bytes (see the module's doc for how many).
/// `Ok(None)`: no LUKS2 header (neither copy has its magic, or a LUKS1 header).
pub fn parse(head: &[u8]) -> Result<Option<Meta>, MetaError> {
    if head.len() >= 8 && &head[..6] == MAGIC_1ST && u16::from_be_bytes([head[6], head[7]]) == 1 {
        return Ok(None); // LUKS1: no secondary copy, no JSON
    }
    let primary = read_copy(head, 0, MAGIC_1ST);
    if let Err(CopyError::NeedMore(n)) = primary {
        // the primary's magic is there: its binary header, or its own (sane) hdr_size, is longer
        return Err(MetaError::NeedMore(n.max(HEAD_BYTES)));
    }
    // where the secondary is: after the primary's hdr_size if its binary header says so
    // (even when its checksum failed: the binary header may be intact), else search
    let hinted = (head.len() >= BIN_BYTES && &head[..6] == MAGIC_1ST)
        .then(|| be64(head, OFF_HDR_SIZE))
        .filter(|&n| valid_hdr_size(n))
        .map(|n| n as usize);
    let secondary = match hinted {
        Some(at) => read_copy(head, at, MAGIC_2ND),
        None => {
            let mut found = Err(CopyError::Bad("no LUKS2 magic".into()));
            let mut at = MIN_HDR_SIZE;
            while at <= MAX_HDR_SIZE && at + BIN_BYTES <= head.len() {
                if head[at..at + 6] == MAGIC_2ND[..] {
                    found = read_copy(head, at, MAGIC_2ND);
                    break;
                }
                at *= 2;
            }
            found
        }
    };
    if let Err(CopyError::NeedMore(n)) = secondary {
        return Err(MetaError::NeedMore(n));
    }
    let words = |r: &Result<Copy, CopyError>| match r {
        Ok(_) => "valid".to_string(),
        Err(CopyError::Bad(m)) => m.clone(),
        Err(CopyError::NeedMore(n)) => format!("needs {n} bytes"),
    };
    let no_magic = |r: &Result<Copy, CopyError>| matches!(r, Err(CopyError::Bad(m)) if m == "no LUKS2 magic");
    if no_magic(&primary) && no_magic(&secondary) {
        return Ok(None);
    }
    let copies_valid = (primary.is_ok(), secondary.is_ok());
    let (pw, sw) = (words(&primary), words(&secondary));
    let chosen = match (primary, secondary) {
        (Ok(p), Ok(s)) => {
            if s.seqid > p.seqid {
                s
            } else {
                p
            }
        }
        (Ok(p), Err(_)) => p,
        (Err(_), Ok(s)) => s,
        (Err(_), Err(_)) => return Err(MetaError::NoValidCopy { primary: pw, secondary: sw }),
    };
    from_json(&chosen, copies_valid).map(Some)
}

#[derive(Deserialize)]
struct JsonMeta {
    segments: BTreeMap<String, JsonSegment>,
    #[serde(default)]
    tokens: BTreeMap<String, serde_json::Value>,
    config: JsonConfig,
}

#[derive(Deserialize)]
struct JsonSegment {
    #[serde(rename = "type")]
    kind: String,
    offset: String,
    size: String,
    iv_tweak: Option<String>,
    encryption: Option<String>,
    sector_size: Option<u32>,
    #[serde(default)]
    flags: Vec<String>,
}

#[derive(Deserialize)]
struct JsonConfig {
    #[serde(default)]
    requirements: Option<JsonRequirements>,
}

#[derive(Deserialize)]
struct JsonRequirements {
    #[serde(default)]
    mandatory: Vec<String>,
}

fn num(s: &str, what: &str) -> Result<u64, MetaError> {
    s.parse().map_err(|_| MetaError::Json(format!("{what} {s:?} is not a decimal number")))
}

fn segment(key: &str, j: JsonSegment) -> Result<Segment, MetaError> {
    let index: u32 = key.parse().map_err(|_| MetaError::Json(format!("segment key {key:?} is not a number")))?;
    let what = |f: &str| format!("segment {index}'s {f}");
    let kind = match j.kind.as_str() {
        "linear" => SegmentKind::Linear,
        "crypt" => SegmentKind::Crypt {
            encryption: j.encryption.ok_or_else(|| MetaError::Json(format!("{} is missing", what("encryption"))))?,
            sector_size: j.sector_size.ok_or_else(|| MetaError::Json(format!("{} is missing", what("sector_size"))))?,
            iv_tweak: num(
                j.iv_tweak.as_deref().ok_or_else(|| MetaError::Json(format!("{} is missing", what("iv_tweak"))))?,
                &what("iv_tweak"),
            )?,
        },
        other => {
            return Err(MetaError::Json(format!("segment {index} has type {other:?} (luksify knows linear and crypt)")))
        }
    };
    let size = if j.size == "dynamic" { Size::Dynamic } else { Size::Bytes(num(&j.size, &what("size"))?) };
    Ok(Segment { index, kind, offset: num(&j.offset, &what("offset"))?, size, flags: j.flags })
}

fn from_json(c: &Copy, copies_valid: (bool, bool)) -> Result<Meta, MetaError> {
    let j: JsonMeta = serde_json::from_slice(&c.json).map_err(|e| MetaError::Json(e.to_string()))?;
    let requirements = j.config.requirements.map(|r| r.mandatory).unwrap_or_default();
    if let Some(r) = requirements.iter().find(|r| *r != REENCRYPT_V2) {
        return Err(MetaError::UnknownRequirement(r.clone()));
    }
    let mut segments = j.segments.into_iter().map(|(k, s)| segment(&k, s)).collect::<Result<Vec<_>, _>>()?;
    segments.sort_by_key(|s| s.index);
    let mut token = None;
    for t in j.tokens.values() {
        if t.get("type").and_then(|v| v.as_str()) == Some("luksify") {
            let tok: LuksifyToken = serde_json::from_value(t.clone())
                .map_err(|e| MetaError::Json(format!("the luksify token cannot be read: {e}")))?;
            token = Some(tok);
        }
    }
    let reencrypt = if requirements.iter().any(|r| r == REENCRYPT_V2) { Some(reencrypt(&segments)?) } else { None };
    Ok(Meta {
        uuid: c.uuid.clone(),
        seqid: c.seqid,
        hdr_size: c.hdr_size as u64,
        requirements,
        copies_valid,
        segments,
        token,
        reencrypt,
    })
}

fn reencrypt(segments: &[Segment]) -> Result<Reencrypt, MetaError> {
    let backup = |f: &str| segments.iter().find(|s| s.has_flag(f));
    let previous = backup("backup-previous").ok_or_else(|| MetaError::Layout("no backup-previous segment".into()))?;
    let final_ = backup("backup-final").ok_or_else(|| MetaError::Layout("no backup-final segment".into()))?;
    let Size::Bytes(total_bytes) = previous.size else {
        return Err(MetaError::Layout("the backup-previous segment has no fixed size".into()));
    };
    let SegmentKind::Crypt { encryption: cipher, .. } = &final_.kind else {
        return Err(MetaError::Layout("the backup-final segment is not a crypt segment".into()));
    };
    let regular: Vec<&Segment> = segments.iter().filter(|s| !s.is_backup()).collect();
    // a dynamic regular segment runs to the end of the mapping, whose size is L
    let fixed: u64 = regular.iter().map(|s| if let Size::Bytes(b) = s.size { b } else { 0 }).sum();
    let dynamic = total_bytes.checked_sub(fixed).ok_or_else(|| {
        MetaError::Layout(format!("the regular segments ({fixed} bytes) exceed backup-previous ({total_bytes} bytes)"))
    })?;
    let bytes = |s: &Segment| if let Size::Bytes(b) = s.size { b } else { dynamic };
    let encrypted_bytes =
        regular.iter().filter(|s| s.is_crypt() && !s.has_flag("in-reencryption")).map(|s| bytes(s)).sum();
    Ok(Reencrypt {
        crashed: regular.iter().any(|s| s.has_flag("in-reencryption")),
        total_bytes,
        data_offset: final_.offset,
        moved_offset: backup("backup-moved-segment").map(|s| s.offset),
        encrypted_bytes,
        cipher: cipher.clone(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const UUID: &str = "0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10";
    const MIB: u64 = 1 << 20;

    /// One copy of a LUKS2 header: binary header + JSON area, `hdr_size` bytes, checksummed.
    pub fn copy(json: &str, seqid: u64, hdr_size: usize, at: usize) -> Vec<u8> {
        let mut a = vec![0u8; hdr_size];
        a[..6].copy_from_slice(if at == 0 { MAGIC_1ST } else { MAGIC_2ND });
        a[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&2u16.to_be_bytes());
        a[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&(hdr_size as u64).to_be_bytes());
        a[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&seqid.to_be_bytes());
        a[OFF_CSUM_ALG..OFF_CSUM_ALG + 6].copy_from_slice(b"sha256");
        a[104..168].fill(0x5a); // salt
        a[OFF_UUID..OFF_UUID + UUID.len()].copy_from_slice(UUID.as_bytes());
        a[OFF_HDR_OFFSET..OFF_HDR_OFFSET + 8].copy_from_slice(&(at as u64).to_be_bytes());
        a[BIN_BYTES..BIN_BYTES + json.len()].copy_from_slice(json.as_bytes());
        let c = checksum(&a);
        a[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&c);
        a
    }

    /// Both copies (same JSON and seqid), default hdr_size.
    pub fn image(json: &str, seqid: u64) -> Vec<u8> {
        let mut v = copy(json, seqid, MIN_HDR_SIZE, 0);
        v.extend(copy(json, seqid, MIN_HDR_SIZE, MIN_HDR_SIZE));
        v
    }

    const KEYSLOTS: &str = r#""keyslots":{
      "0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},
           "area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},
           "kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"c2FsdA=="}},
      "1":{"area":{"offset":"290816","size":"4096","type":"datashift","shift_size":"16777216"},
           "type":"reencrypt","key_size":1,"mode":"encrypt","direction":"backward","priority":0}}"#;
    const TOKEN: &str = r#""tokens":{"0":{"type":"luksify","keyslots":[],"luksify_version":1,"name":"sda5_crypt","allow_discards":false,"pv_uuid":"Ab12Cd-34Ef-56Gh-78Ij-90Kl-12Mn-34OpQr"}}"#;
    const BACKUPS: &str = r#""3":{"type":"linear","offset":"0","size":"71303168","flags":["backup-previous"]},
      "4":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0",
           "encryption":"aes-xts-plain64","sector_size":512,"flags":["backup-final"]},
      "5":{"type":"linear","offset":"88080384","size":"16777216","flags":["backup-moved-segment"]}"#;
    const DIGESTS_CONFIG: &str = r#""digests":{
      "0":{"type":"pbkdf2","keyslots":["0"],"segments":["4","2"],"hash":"sha256","iterations":1000,"salt":"c2FsdA==","digest":"ZGlnZXN0"},
      "1":{"type":"pbkdf2","keyslots":["1"],"segments":[],"hash":"sha256","iterations":1000,"salt":"c2FsdA==","digest":"ZGlnZXN0"}},
     "config":{"json_size":"12288","keyslots_size":"16744448","requirements":{"mandatory":["online-reencrypt-v2"]}}"#;

    /// The notes' §1a: after init, D = 100 MiB, S = 16 MiB (no token: as the CLI writes it).
    fn init_json() -> String {
        format!(
            r#"{{{KEYSLOTS},
 "tokens":{{}},
 "segments":{{
  "0":{{"type":"linear","offset":"88080384","size":"16777216"}},
  "1":{{"type":"linear","offset":"16777216","size":"54525952"}},
  "2":{{"type":"linear","offset":"88080384","size":"16777216","flags":["backup-moved-segment"]}},
  "3":{{"type":"linear","offset":"0","size":"71303168","flags":["backup-previous"]}},
  "4":{{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0",
       "encryption":"aes-xts-plain64","sector_size":512,"flags":["backup-final"]}}}},
 {DIGESTS_CONFIG}}}"#
        )
    }

    /// The notes' §1c: clean, after step 2 (32 MiB encrypted), with luksify's token.
    fn mid_json() -> String {
        format!(
            r#"{{{KEYSLOTS},{TOKEN},
 "segments":{{
  "0":{{"type":"linear","offset":"88080384","size":"16777216"}},
  "1":{{"type":"linear","offset":"16777216","size":"20971520"}},
  "2":{{"type":"crypt","offset":"54525952","size":"33554432","iv_tweak":"73728","encryption":"aes-xts-plain64","sector_size":512}},
  {BACKUPS}}},
 {DIGESTS_CONFIG}}}"#
        )
    }

    /// The notes' §1b: step 2 hot (crashed): its 16 MiB flagged in-reencryption, 16 MiB done.
    fn crashed_json() -> String {
        let b = BACKUPS.replace("\"3\":", "\"4\":").replace("\"4\":{\"type\":\"crypt\"", "\"5\":{\"type\":\"crypt\"");
        let b = b.replace("\"5\":{\"type\":\"linear\"", "\"6\":{\"type\":\"linear\"");
        format!(
            r#"{{{KEYSLOTS},{TOKEN},
 "segments":{{
  "0":{{"type":"linear","offset":"88080384","size":"16777216"}},
  "1":{{"type":"linear","offset":"16777216","size":"20971520"}},
  "2":{{"type":"crypt","offset":"54525952","size":"16777216","iv_tweak":"73728",
       "encryption":"aes-xts-plain64","sector_size":512,"flags":["in-reencryption"]}},
  "3":{{"type":"crypt","offset":"71303168","size":"16777216","iv_tweak":"106496","encryption":"aes-xts-plain64","sector_size":512}},
  {b}}},
 {DIGESTS_CONFIG}}}"#
        )
    }

    /// The notes' §1e: finished.
    fn finished_json() -> String {
        format!(
            r#"{{"keyslots":{{"0":{{"type":"luks2","key_size":64}}}},{TOKEN},
 "segments":{{"0":{{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":512}}}},
 "digests":{{"0":{{"type":"pbkdf2","keyslots":["0"],"segments":["0"]}}}},
 "config":{{"json_size":"12288","keyslots_size":"16744448"}}}}"#
        )
    }

    #[test]
    fn init_state_from_the_notes() {
        let m = parse(&image(&init_json(), 4)).unwrap().unwrap();
        assert_eq!((m.uuid.as_str(), m.seqid, m.hdr_size), (UUID, 4, 16384));
        assert_eq!(m.requirements, vec![REENCRYPT_V2.to_string()]);
        assert_eq!(m.copies_valid, (true, true));
        assert_eq!(m.segments.len(), 5);
        assert_eq!(
            m.segments[0],
            Segment {
                index: 0,
                kind: SegmentKind::Linear,
                offset: 88080384,
                size: Size::Bytes(16 * MIB),
                flags: vec![]
            }
        );
        assert_eq!(m.segments[4].size, Size::Dynamic);
        assert_eq!(
            m.segments[4].kind,
            SegmentKind::Crypt { encryption: "aes-xts-plain64".into(), sector_size: 512, iv_tweak: 0 }
        );
        assert_eq!(m.token, None);
        assert_eq!(
            m.reencrypt,
            Some(Reencrypt {
                crashed: false,
                total_bytes: 71303168,
                data_offset: 16 * MIB,
                moved_offset: Some(88080384),
                encrypted_bytes: 0,
                cipher: "aes-xts-plain64".into(),
            })
        );
        assert_eq!(m.reencrypt.unwrap().progress(), 0.0);
    }

    #[test]
    fn clean_mid_way_state_with_the_token() {
        let m = parse(&image(&mid_json(), 8)).unwrap().unwrap();
        assert_eq!(
            m.token,
            Some(LuksifyToken {
                name: "sda5_crypt".into(),
                allow_discards: false,
                pv_uuid: "Ab12Cd-34Ef-56Gh-78Ij-90Kl-12Mn-34OpQr".into(),
                luksify_version: 1,
            })
        );
        let r = m.reencrypt.unwrap();
        assert!(!r.crashed);
        assert_eq!((r.total_bytes, r.data_offset, r.moved_offset), (71303168, 16 * MIB, Some(88080384)));
        assert_eq!(r.encrypted_bytes, 32 * MIB);
        assert!((r.progress() - 32.0 / 68.0).abs() < 1e-12);
    }

    #[test]
    fn crashed_state_counts_only_committed_segments() {
        let m = parse(&image(&crashed_json(), 7)).unwrap().unwrap();
        assert_eq!(m.segments.len(), 7);
        assert!(m.segments[2].has_flag("in-reencryption"));
        let r = m.reencrypt.unwrap();
        assert!(r.crashed);
        assert_eq!(r.encrypted_bytes, 16 * MIB);
        assert_eq!((r.total_bytes, r.data_offset, r.moved_offset), (71303168, 16 * MIB, Some(88080384)));
    }

    #[test]
    fn last_step_posted_but_not_finalised_is_all_encrypted() {
        // §1d/§8: one dynamic crypt segment, backups and requirement still there
        let j = mid_json().replace(
            r#""0":{"type":"linear","offset":"88080384","size":"16777216"},
  "1":{"type":"linear","offset":"16777216","size":"20971520"},
  "2":{"type":"crypt","offset":"54525952","size":"33554432","iv_tweak":"73728","#,
            r#""0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0","#,
        );
        let m = parse(&image(&j, 20)).unwrap().unwrap();
        let r = m.reencrypt.unwrap();
        assert_eq!((r.encrypted_bytes, r.total_bytes), (71303168, 71303168));
        assert_eq!(r.progress(), 1.0);
    }

    #[test]
    fn finished_has_no_reencryption() {
        let m = parse(&image(&finished_json(), 15)).unwrap().unwrap();
        assert!(m.requirements.is_empty());
        assert_eq!(m.segments.len(), 1);
        assert_eq!(m.reencrypt, None);
        assert_eq!(m.token.unwrap().name, "sda5_crypt");
    }

    #[test]
    fn torn_primary_the_secondary_wins() {
        // the primary half-written with the next step's state: its checksum fails
        let mut img = copy(&crashed_json(), 9, MIN_HDR_SIZE, 0);
        img.extend(copy(&mid_json(), 8, MIN_HDR_SIZE, MIN_HDR_SIZE));
        img[BIN_BYTES + 100] ^= 1;
        let m = parse(&img).unwrap().unwrap();
        assert_eq!(m.copies_valid, (false, true));
        assert_eq!(m.seqid, 8);
        assert!(!m.reencrypt.unwrap().crashed);
        // the primary zeroed entirely: still found at 16 KiB
        img[..MIN_HDR_SIZE].fill(0);
        let m = parse(&img).unwrap().unwrap();
        assert_eq!((m.copies_valid, m.seqid), ((false, true), 8));
    }

    #[test]
    fn the_higher_seqid_wins_and_the_secondary_may_be_stale() {
        let mut img = copy(&crashed_json(), 9, MIN_HDR_SIZE, 0);
        img.extend(copy(&mid_json(), 8, MIN_HDR_SIZE, MIN_HDR_SIZE));
        let m = parse(&img).unwrap().unwrap();
        assert_eq!((m.copies_valid, m.seqid), ((true, true), 9));
        assert!(m.reencrypt.unwrap().crashed);
        // secondary newer (primary written first, so only after a repair-less oddity): still the higher
        let mut img = copy(&mid_json(), 8, MIN_HDR_SIZE, 0);
        img.extend(copy(&crashed_json(), 9, MIN_HDR_SIZE, MIN_HDR_SIZE));
        assert_eq!(parse(&img).unwrap().unwrap().seqid, 9);
    }

    #[test]
    fn both_copies_bad_is_an_error_saying_why() {
        let mut img = image(&mid_json(), 8);
        img[BIN_BYTES + 10] ^= 1;
        img[MIN_HDR_SIZE + OFF_SEQID] ^= 1;
        let e = parse(&img).unwrap_err();
        assert!(matches!(e, MetaError::NoValidCopy { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("primary: checksum mismatch; secondary: checksum mismatch"), "{msg}");
        // a secondary's magic alone, its checksum wrong, under a zeroed primary
        img[..MIN_HDR_SIZE].fill(0);
        let msg = parse(&img).unwrap_err().to_string();
        assert!(msg.contains("primary: no LUKS2 magic; secondary: checksum mismatch"), "{msg}");
    }

    #[test]
    fn unknown_requirement_is_an_error() {
        let j = mid_json().replace(r#"["online-reencrypt-v2"]"#, r#"["online-reencrypt-v2","online-reencrypt-v3"]"#);
        let e = parse(&image(&j, 8)).unwrap_err();
        assert_eq!(e, MetaError::UnknownRequirement("online-reencrypt-v3".into()));
        assert!(e.to_string().contains("a requirement luksify does not know: online-reencrypt-v3"));
    }

    #[test]
    fn bad_json_and_inconsistent_layout_are_errors() {
        let e = parse(&image("{\"segments\": [", 3)).unwrap_err();
        assert!(matches!(e, MetaError::Json(_)), "{e:?}");
        let j = mid_json().replace("backup-previous", "backup-other");
        assert!(matches!(parse(&image(&j, 8)).unwrap_err(), MetaError::Layout(_)));
        let j = mid_json().replace(r#""size":"33554432""#, r#""size":"32MiB""#);
        assert!(matches!(parse(&image(&j, 8)).unwrap_err(), MetaError::Json(_)));
    }

    #[test]
    fn nothing_luks2_is_none() {
        assert_eq!(parse(&[0u8; HEAD_BYTES]), Ok(None));
        assert_eq!(parse(&vec![0x5au8; MAX_HEAD_BYTES]), Ok(None));
        // a LUKS1 header (same magic, version 1)
        let mut l1 = vec![0u8; HEAD_BYTES];
        l1[..6].copy_from_slice(MAGIC_1ST);
        l1[7] = 1;
        l1[MIN_HDR_SIZE..MIN_HDR_SIZE + 6].copy_from_slice(MAGIC_2ND); // random keyslot bytes, say
        assert_eq!(parse(&l1), Ok(None));
    }

    #[test]
    fn a_larger_header_asks_for_more_bytes() {
        let hs = 64 * 1024;
        let mut img = copy(&mid_json(), 8, hs, 0);
        img.extend(copy(&mid_json(), 8, hs, hs));
        assert_eq!(parse(&img[..HEAD_BYTES]), Err(MetaError::NeedMore(hs)));
        assert_eq!(parse(&img[..hs]), Err(MetaError::NeedMore(hs + BIN_BYTES)));
        assert_eq!(parse(&img[..hs + BIN_BYTES]), Err(MetaError::NeedMore(2 * hs)));
        let m = parse(&img).unwrap().unwrap();
        assert_eq!((m.hdr_size, m.copies_valid), (hs as u64, (true, true)));
        // too short even for a binary header
        assert_eq!(parse(&img[..100]), Err(MetaError::NeedMore(HEAD_BYTES)));
    }
}
