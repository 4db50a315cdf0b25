//! The planner: from the facts about a device and the user's options, the plan of the
//! conversion, or every reason it would refuse. Pure: `--dry-run` prints exactly this.

use super::boot::{self, BootFacts, BootReport, LuksChoice};
use super::dmline::TargetKind;
use super::facts::{Content, DeviceFacts};
use super::geometry::{
    standard_tail_needed, Geometry, GeometryError, FENCE_SECTORS, HEADER_COPY_SECTORS, JOURNAL_SLOT_SECTORS, MAX_STEP,
};
use super::units::Sectors;
use serde::Serialize;

pub use super::kinds::{LuksVersion, Refusal};

/// Version of the `--dry-run --json` schema (documented in README.md). Bump on any change
/// that is not a pure addition.
pub const PLAN_SCHEMA_VERSION: u32 = 1;

/// Throughput assumed for the time estimate (dm-crypt aes-xts without AES-NI runs at about
/// 80–100 MiB/s; with AES-NI the disk is usually the limit).
pub const ASSUMED_MIB_PER_S: u64 = 100;

/// The largest data offset the planner picks by itself: that of the largest step
/// ([`MAX_STEP`], 8 MiB; a step moves at most S). A larger S than the header needs means
/// fewer, larger steps (each has a fixed cost: a table load, a suspend, a journal commit)
/// and costs nothing when the tail past the PV is unused anyway; beyond the largest step
/// it would only waste space. LUKS1's 2 MiB default is raised up to this.
pub const MAX_AUTO_SHIFT: u64 = MAX_STEP;

/// LUKS2 with luksify's own steps (aes-xts-plain64, 512-bit key): the 16 MiB default is
/// raised up to 32 MiB, a step being S. A step's suspended window does not grow with S
/// while no write reaches its hotzone (the last comparison is skipped on dm-stats' word,
/// `engine/standard_steps.rs`); in the test bed a step took five 10 ms ticks at 16 MiB,
/// most of it the fixed suspend, so larger steps move more per tick. The cost: the step's
/// buffers (four of S, locked in memory: 128 MiB), a comparison of 32 MiB (~14 ms in the
/// bed) in a window whose hotzone a write did reach, and steps libcryptsetup runs (a resume
/// after a crash) of S too, their hotzone suspended through each. Other ciphers keep 16 MiB.
pub const MAX_AUTO_SHIFT_LUKS2: u64 = 65536;

/// The data offset S to use when the user gave none: the LUKS version's default, doubled
/// while the doubled value still fits in the tail past the PV (`tail_have` sectors of a
/// device of `n`), stays at most [`MAX_AUTO_SHIFT`] (LUKS2 with luksify's own steps,
/// `own_steps`: [`MAX_AUTO_SHIFT_LUKS2`]) and is below L (one step moves everything
/// already).
pub fn auto_shift(luks: LuksVersion, own_steps: bool, n: u64, l: u64, tail_have: u64) -> u64 {
    let cap = match luks {
        LuksVersion::Luks2 if own_steps => MAX_AUTO_SHIFT_LUKS2,
        _ => MAX_AUTO_SHIFT,
    };
    let mut s = luks.default_shift();
    while s * 2 <= cap && s < l && room_needed(luks, n, s * 2) <= tail_have {
        s *= 2;
    }
    s
}

/// Sectors past the PV a conversion of a device of `n` sectors with a data offset of `s`
/// needs: for LUKS1 S and luksify's journal, header copy and shadow
/// ([`Geometry::tail_needed`]); for LUKS2 2S, the header's shift and cryptsetup's moved
/// first segment ([`standard_tail_needed`]).
pub fn room_needed(luks: LuksVersion, n: u64, s: u64) -> u64 {
    match luks {
        LuksVersion::Luks1 => Geometry::tail_needed(n, s),
        LuksVersion::Luks2 => standard_tail_needed(n, s),
    }
}

/// How many steps cryptsetup's online reencryption takes to encrypt L sectors backward
/// behind a data offset of S with a moved first segment (its hotzones, at most S each):
/// floor((L-S)/S) + ((L-S) mod S != 0) + 1, for L >= S (0 for nothing to encrypt).
pub fn luks2_hotzones(l: u64, s: u64) -> u64 {
    if l == 0 || s == 0 {
        return 0;
    }
    let rest = l.saturating_sub(s);
    rest / s + u64::from(!rest.is_multiple_of(s)) + 1
}

/// What a half-converted device holds, in the plan (`midway_format` in the dry-run JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MidwayFormat {
    /// "luks2-reencrypt" (cryptsetup's own) or "luksify-journal" (LUKS1).
    pub kind: &'static str,
    /// The LUKS2 requirement the header carries mid-way (null for LUKS1).
    pub requirement: Option<&'static str>,
    /// The oldest cryptsetup releases (2.3.x / 2.4.x lines) that open, recover and finish
    /// it (null for LUKS1).
    pub oldest_cryptsetup: Option<&'static str>,
    /// Where the first S plaintext sectors are kept mid-way, [L+S, L+2S) in sectors (null
    /// for LUKS1, or without a PV).
    pub moved_segment: Option<[u64; 2]>,
    /// Whether stock cryptsetup can resume a half-converted disk without luksify.
    pub resume_without_luksify: bool,
}

impl MidwayFormat {
    /// The format a conversion of L sectors behind a data offset of S keeps mid-way.
    pub fn of(luks: LuksVersion, l: u64, s: u64) -> MidwayFormat {
        match luks {
            LuksVersion::Luks2 => MidwayFormat {
                kind: "luks2-reencrypt",
                requirement: Some("online-reencrypt-v2"),
                oldest_cryptsetup: Some("2.3.7 / 2.4.3"),
                moved_segment: (l > 0).then_some([l + s, l + 2 * s]),
                resume_without_luksify: true,
            },
            LuksVersion::Luks1 => MidwayFormat {
                kind: "luksify-journal",
                requirement: None,
                oldest_cryptsetup: None,
                moved_segment: None,
                resume_without_luksify: false,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub luks: LuksVersion,
    pub cipher: String,
    pub key_bits: u32,
    /// Bridge / final mapping name; default `<kname>_crypt`.
    pub name: Option<String>,
    /// Data offset S in sectors; default by LUKS version.
    pub shift: Option<u64>,
    /// Chunk k in sectors; default S.
    pub chunk: Option<u64>,
    /// dm-mirror region size in sectors.
    pub region: u64,
    /// `--pbkdf` (None: cryptsetup's default for the type); GRUB cannot open Argon2 keyslots.
    pub pbkdf: Option<String>,
    /// `--force-unknown-boot`: convert although the root's initramfs generator is unknown.
    pub force_unknown_boot: bool,
    /// What the kernel said when the app tried `cipher` with a `key_bits` key in a throwaway
    /// dm-crypt mapping (`adapters::dm::probe_cipher`): None when it maps it (or when it was
    /// not tried, as in unit tests).
    pub kernel_cipher_error: Option<String>,
    /// `--recovery-key`: a second keyslot with a generated recovery key.
    pub recovery_key: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            luks: LuksVersion::Luks2,
            cipher: "aes-xts-plain64".into(),
            key_bits: 512,
            name: None,
            shift: None,
            chunk: None,
            region: 8192,
            pbkdf: None,
            force_unknown_boot: false,
            kernel_cipher_error: None,
            recovery_key: false,
        }
    }
}

/// Whether `spec` has cryptsetup's `cipher-chainmode[-ivmode[:ivopts]]` form (no spaces, no
/// empty part) and `bits` is a key size a cipher can take (a whole number of bytes, 128 to
/// 1024 bits): the rest is up to the kernel (`kernel_cipher_error`).
pub fn cipher_form_ok(spec: &str, bits: u32) -> bool {
    let parts: Vec<&str> = spec.split('-').collect();
    parts.len() >= 2
        && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b":_(),".contains(&b)))
        && bits.is_multiple_of(8)
        && (128..=1024).contains(&bits)
}

/// The read the time estimate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EstimateRead {
    /// MiB read, and how fast (MiB/s, rounded).
    pub read_mib: u64,
    pub read_mib_per_s: u64,
    /// The read rate is divided by this: the I/O every moved byte costs on the same disk
    /// (LUKS2: read and written; LUKS1: read, written and read back).
    pub io_per_byte: u64,
}

/// The rate of the time estimate (MiB/s) and where it comes from: a measured read divided
/// by the I/O a moved byte costs, at least 1; else [`ASSUMED_MIB_PER_S`].
pub fn estimate_rate(
    sample: Option<&crate::core::facts::ReadSample>,
    luks: LuksVersion,
) -> (u64, Option<EstimateRead>) {
    let io_per_byte = match luks {
        LuksVersion::Luks2 => 2,
        LuksVersion::Luks1 => 3,
    };
    match sample.and_then(|s| s.mib_per_s().map(|r| (s, r))) {
        Some((s, read)) => {
            let e = EstimateRead { read_mib: s.bytes >> 20, read_mib_per_s: read.round() as u64, io_per_byte };
            (((read / io_per_byte as f64).round() as u64).max(1), Some(e))
        }
        None => (ASSUMED_MIB_PER_S, None),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Reroute {
    pub dm_name: String,
    pub mounts: Vec<String>,
    pub swap: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub schema: u32,
    pub device: String,
    pub size_sectors: u64,
    pub name: String,
    pub luks: LuksVersion,
    pub cipher: String,
    pub key_bits: u32,
    /// Header size / data offset S in sectors.
    pub shift_sectors: u64,
    /// The LUKS version's default offset; `shift_sectors` is larger when the planner raised
    /// it because the tail had room (fewer steps), or when `--offset` asked for more.
    pub default_shift_sectors: u64,
    pub chunk_sectors: u64,
    pub region_sectors: u64,
    /// Sectors to move and encrypt: L.
    pub move_sectors: u64,
    pub move_bytes: u64,
    /// Space past the PV: what luksify needs and what there is (LUKS2: 2S, the header's
    /// shift and the moved first segment; LUKS1: S and luksify's journal).
    pub tail_need_sectors: u64,
    pub tail_have_sectors: u64,
    /// Where the journal lives (first sector of slot A), when the plan is possible; null for
    /// LUKS2, which keeps cryptsetup's own format mid-way and no luksify journal.
    pub journal_sector: Option<u64>,
    /// What a half-converted device holds (cryptsetup's reencryption or luksify's journal).
    pub midway_format: MidwayFormat,
    pub steps: u64,
    pub estimate_seconds: u64,
    pub estimate_assumes_mib_per_s: u64,
    /// What the estimate's rate comes from: a timed O_DIRECT read of the device, or null
    /// (then [`ASSUMED_MIB_PER_S`]).
    pub estimate_from_read: Option<EstimateRead>,
    pub vg: Option<String>,
    pub reroute: Vec<Reroute>,
    pub actions: Vec<String>,
    pub refusals: Vec<Refusal>,
    pub warnings: Vec<String>,
    /// Choices the planner made by itself, and why (e.g. a raised data offset).
    pub notes: Vec<String>,
    /// When the tail is too small: what `--make-room` would do (null otherwise).
    pub make_room: Option<MakeRoom>,
    /// The boot checks (null when they were not run).
    pub boot: Option<BootReport>,
    /// `--recovery-key`: keyslot 1 will hold a generated recovery key (never in the plan:
    /// the dry-run makes none).
    pub recovery_key: bool,
    /// One-line suggestions (`core::recovery::suggestions`; the app fills them in, as they
    /// depend on the machine: a TPM).
    pub suggestions: Vec<String>,
    #[serde(skip)]
    pub geometry: Option<Geometry>,
}

impl Plan {
    pub fn ok(&self) -> bool {
        self.refusals.is_empty()
    }
}

fn refuse(out: &mut Vec<Refusal>, code: &'static str, message: String) {
    out.push(Refusal { code, message });
}

fn mib(sectors: u64) -> String {
    let b = Sectors(sectors).bytes();
    if b >= 10 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

const SUPPORTED_SEGTYPES: &[&str] = &["linear", "striped"];

/// Build the plan without boot checks (see [`plan_with_boot`]).
pub fn plan(f: &DeviceFacts, o: &Options) -> Plan {
    plan_with_boot(f, None, o)
}

/// Build the plan, with the boot checks of the target root when its facts are given.
/// Never fails: impossibilities are refusals inside the plan.
pub fn plan_with_boot(f: &DeviceFacts, bf: Option<&BootFacts>, o: &Options) -> Plan {
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    let dev = &f.path;
    let name = o.name.clone().unwrap_or_else(|| format!("{}_crypt", f.kname));
    let s0 = o.luks.default_shift();
    // Provisional (S is raised below once L and the tail are known).
    let mut s = o.shift.unwrap_or(s0);

    let in_progress = f.luksify_journal || f.luksify_marker || f.content == Content::LuksifyMarker;
    if in_progress {
        refuse(
            &mut refusals,
            "conversion_in_progress",
            format!("a luksify conversion is already in progress on {dev}: run `luksify resume {dev}` (or `luksify status {dev}`)"),
        );
    }
    match &f.content {
        Content::Luks { version } => refuse(
            &mut refusals,
            "already_luks",
            format!("{dev} is already a LUKS{version} device: nothing to convert"),
        ),
        Content::Filesystem { fstype } => {
            if f.direct_mounts.is_empty() {
                refuse(&mut refusals, "not_lvm", format!(
                    "{dev} holds a {fstype} filesystem, not an LVM physical volume: luksify converts LVM PVs online; for a plain filesystem use `cryptsetup reencrypt --encrypt --reduce-device-size 32M {dev}` while it is unmounted"
                ));
            }
        }
        Content::Swap => refuse(&mut refusals, "not_lvm", format!(
            "{dev} is a swap area, not an LVM physical volume: swapoff it and use `cryptsetup luksFormat`, or set up swap with a random key in /etc/crypttab"
        )),
        Content::Nothing => refuse(&mut refusals, "not_lvm", format!(
            "{dev} holds no LVM physical volume (no known signature): for an unused device use `cryptsetup luksFormat {dev}`"
        )),
        Content::Other { what } => refuse(&mut refusals, "not_lvm", format!(
            "{dev} holds {what}, not an LVM physical volume: luksify only converts LVM PVs"
        )),
        Content::LvmPv | Content::LuksifyMarker => {}
    }
    if !f.direct_mounts.is_empty() {
        refuse(&mut refusals, "mounted_directly", format!(
            "{dev} is mounted directly at {} with no device-mapper layer to reroute: it needs an offline conversion (`cryptsetup reencrypt --encrypt` from rescue media)",
            f.direct_mounts.join(", ")
        ));
    }
    if f.direct_swap {
        refuse(&mut refusals, "swap_directly", format!("{dev} is in use as swap directly: swapoff it first"));
    }
    if !cipher_form_ok(&o.cipher, o.key_bits) {
        refuse(&mut refusals, "bad_cipher", format!(
            "--cipher {} --key-size {}: a cipher is given as cipher-chainmode-ivmode (e.g. aes-xts-plain64, serpent-xts-plain64, aes-cbc-essiv:sha256) and a key size as a multiple of 8 from 128 to 1024 bits",
            o.cipher, o.key_bits
        ));
    } else if let Some(e) = &o.kernel_cipher_error {
        refuse(&mut refusals, "cipher_unavailable", format!("{dev}: {e}; nothing was changed"));
    }
    if f.read_only {
        refuse(&mut refusals, "read_only", format!("{dev} is read-only"));
    }
    if f.logical_block_size != 512 {
        refuse(
            &mut refusals,
            "block_size",
            format!(
                "{dev} has {}-byte logical blocks; this luksify converts only 512-byte-sector devices",
                f.logical_block_size
            ),
        );
    }

    // Holders: every dm device that maps this device must be rerouteable.
    let mut reroute = Vec::new();
    for h in &f.holders {
        // Judged by the target type alone: a malformed linear or striped line passes here;
        // the engine reroutes only lines that parse and refuses one that names the device.
        let bad: Vec<&str> =
            h.table.iter().map(|l| l.target_type.as_str()).filter(|t| !TargetKind::of(t).reroutable()).collect();
        if !bad.is_empty() {
            refuse(&mut refusals, "unsupported_target", format!(
                "{} maps {dev} with a {} target; luksify reroutes only linear and striped mappings (finish or remove snapshots, thin pools, RAID/mirror LVs and any pvmove first)",
                h.name,
                bad.join("/")
            ));
        }
        if !h.uuid.starts_with("LVM-") {
            warnings.push(format!("{} maps {dev} but is not an LVM device; it will be rerouted too", h.name));
        }
        reroute.push(Reroute { dm_name: h.name.clone(), mounts: h.mounts.clone(), swap: h.swap });
    }

    // LVM: the extent of what moves, and LVs of types we cannot follow.
    let mut l = 0;
    let mut vg = None;
    if let Some(lvm) = &f.lvm {
        vg = Some(lvm.vg_name.clone());
        l = lvm.pe_start + lvm.pe_count * lvm.extent_size;
        if lvm.mda_count > 1 {
            refuse(&mut refusals, "metadata_at_end", format!(
                "the PV on {dev} keeps a second metadata area at its end, which would be overwritten: `pvchange --metadataignore y {dev}` is not enough; recreate the PV with one metadata area (`--pvmetadatacopies 1`)"
            ));
        }
        for lv in &lvm.lvs {
            let bad: Vec<&String> = lv.segtypes.iter().filter(|t| !SUPPORTED_SEGTYPES.contains(&t.as_str())).collect();
            let special = lv.attr.chars().next().map(|c| "pvsSorOtTVmMrRiIleC".contains(c)).unwrap_or(false);
            if !bad.is_empty() || special {
                let what = if bad.is_empty() {
                    lv.attr.clone()
                } else {
                    bad.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("/")
                };
                refuse(&mut refusals, "unsupported_lv", format!(
                    "LV {}/{} on {dev} is a {what} volume; luksify converts PVs holding only linear and striped LVs (merge or remove snapshots, finish any pvmove, convert RAID/mirror/thin/cache LVs first)",
                    lvm.vg_name, lv.name
                ));
            }
        }
        if l > f.size_sectors {
            refuse(
                &mut refusals,
                "pv_larger_than_device",
                format!(
                    "the PV on {dev} claims {} sectors but the device has {}: run `pvresize {dev}` first",
                    l, f.size_sectors
                ),
            );
        }
    }

    let tail_have = f.size_sectors.saturating_sub(l);
    if o.shift.is_none() && l > 0 {
        let own_steps = o.cipher == "aes-xts-plain64" && o.key_bits == 512;
        s = auto_shift(o.luks, own_steps, f.size_sectors, l, tail_have);
    }
    let k = o.chunk.unwrap_or(s.min(MAX_STEP));
    // The room needed is the room for the smallest header that works, not the raised one.
    let tail_need = room_needed(o.luks, f.size_sectors, o.shift.unwrap_or(s0));
    let mut geometry = None;
    let mut make_room_plan = None;
    if f.lvm.is_some() && l <= f.size_sectors {
        // LUKS2's moved first segment holds the first S sectors of the PV.
        let pv_below_offset = o.luks == LuksVersion::Luks2 && l > 0 && l < s;
        if pv_below_offset {
            refuse(&mut refusals, "geometry", format!(
                "cannot lay out the conversion of {dev}: the PV is smaller than the LUKS2 data offset (L = {l} sectors, S = {s} sectors)"
            ));
        }
        // The room this S needs (LUKS2: more than the in-memory geometry checks).
        let need = room_needed(o.luks, f.size_sectors, s);
        let too_little = |refusals: &mut Vec<Refusal>, have: u64| {
            let missing = need - have;
            let room = make_room(f, missing);
            refuse(
                refusals,
                "too_little_tail",
                too_little_tail_message(&f.path, o.luks, need, have, missing, room.as_ref()),
            );
            room
        };
        match Geometry::new(f.size_sectors, l, s, k, o.region) {
            Ok(_) if tail_have < need => make_room_plan = too_little(&mut refusals, tail_have),
            Ok(g) => geometry = (!pv_below_offset).then_some(g),
            Err(GeometryError::TooLittleTail { have, .. }) => make_room_plan = too_little(&mut refusals, have),
            Err(e) => refuse(&mut refusals, "geometry", format!("cannot lay out the conversion of {dev}: {e}")),
        }
    }

    let mut boot_report = None;
    if let Some(bf) = bf {
        let choice = LuksChoice { luks: o.luks, pbkdf: o.pbkdf.clone(), force_unknown_boot: o.force_unknown_boot };
        let (r, mut refs) = boot::check(f, bf, &choice);
        refusals.append(&mut refs);
        boot_report = Some(r);
    }

    if in_progress {
        // Everything else follows from the conversion itself (its bridge and helpers hold
        // the device, its marker hides the PV): say only what matters.
        refusals.retain(|r| r.code == "conversion_in_progress");
        if let Some(b) = &mut boot_report {
            b.refusals.clear();
        }
        geometry = None;
        make_room_plan = None;
    }
    // Without a geometry (the tail is too small) the count the default offset would give.
    let steps = match o.luks {
        LuksVersion::Luks2 => luks2_hotzones(l, s),
        LuksVersion::Luks1 => geometry.map(|g| g.steps()).unwrap_or_else(|| if k > 0 { l.div_ceil(k) } else { 0 }),
    };
    let move_bytes = Sectors(l).bytes();
    let (estimate_mib_per_s, estimate_from_read) = estimate_rate(f.read_sample.as_ref(), o.luks);
    let estimate_seconds = move_bytes.div_ceil(estimate_mib_per_s << 20);
    let mut actions = vec![format!(
        "generate a {}-bit volume key and format a {} header ({} cipher, data offset {} sectors = {}) in memory",
        o.key_bits,
        match o.luks {
            LuksVersion::Luks1 => "LUKS1",
            LuksVersion::Luks2 => "LUKS2",
        },
        o.cipher,
        s,
        mib(s)
    )];
    if o.recovery_key {
        let grub = boot_report.as_ref().is_some_and(|b| b.boot_on_pv);
        let hash = match (o.luks, grub) {
            (LuksVersion::Luks1, _) => "the header's hash (LUKS1)",
            (LuksVersion::Luks2, true) => "the passphrase keyslot's hash (GRUB opens /boot on this PV)",
            (LuksVersion::Luks2, false) => "sha512, as systemd-cryptenroll",
        };
        actions.push(format!(
            "add keyslot 1 for a recovery key: 32 random bytes in systemd-cryptenroll's format (8 groups of 8 letters), PBKDF2 with {} iterations and {hash}{}; shown once on standard output, before anything is written to {dev}",
            crate::core::recovery::PBKDF2_ITERATIONS,
            if o.luks == LuksVersion::Luks2 { ", with systemd's `systemd-recovery` token" } else { "" }
        ));
    }
    let mut notes = Vec::new();
    if o.shift.is_none() && s > s0 {
        let default_steps = geometry.map(|g| g.l.div_ceil(o.chunk.unwrap_or(s0).min(s0))).unwrap_or(0);
        notes.push(format!(
            "data offset raised from the default {} to {} because the tail past the PV has room: {steps} step(s) instead of {default_steps}, each with a fixed cost (`--offset {s0}` keeps the default)",
            mib(s0), mib(s)
        ));
    }
    let rerouted = if reroute.is_empty() {
        "none".to_string()
    } else {
        reroute.iter().map(|r| r.dm_name.clone()).collect::<Vec<_>>().join(", ")
    };
    match o.luks {
        LuksVersion::Luks2 => {
            if let Some(b) = boot_report.as_ref().filter(|b| b.root_on_pv && b.initramfs == Some("initramfs-tools")) {
                actions.push(format!(
                    "set up the boot chain (unless --no-integrate) in {}: the crypttab line for the new LUKS UUID with luksify's keyscript, an initramfs hook and local-top script, luksify-resume.service, then `update-initramfs -u -k all`: from here on a reboot or power cut boots (the plain PV until the cut-over, then the usual passphrase prompt, and the unit finishes the conversion); taken out again if luksify stops before the cut-over",
                    b.root_dir
                ));
            }
            actions.push(format!(
                "insert the bridge /dev/mapper/{name} (linear over [0, {l}) of {dev}) under the LVs: reroute {} LV mapping(s) onto it, each under a brief suspend: {rerouted}",
                reroute.len()
            ));
            actions.push(format!(
                "cut-over (bridge suspended): copy the first {s} sectors to sectors [{}, {}) (the moved segment), write the LUKS2 header with the reencryption in progress (online-reencrypt-v2) over [0, {s}), map the bridge as cryptsetup would",
                l + s,
                l + 2 * s
            ));
            // luksify steps itself where it has the cipher in userspace (engine/standard_steps.rs)
            let how = if o.cipher == "aes-xts-plain64" && o.key_bits == 512 {
                "luksify's own steps in cryptsetup's format (each step: the hotzone copied encrypted and read back live, then one short suspended window: compare, both metadata copies committed as libcryptsetup writes them, flip)"
            } else {
                "libcryptsetup's own online reencryption (each step: header flags the hotzone, data written and flushed, header commits)"
            };
            actions.push(format!(
                "encrypt {} ({l} sectors) backward in {steps} step(s) of up to {s} sectors with {how}",
                mib(l)
            ));
            actions.push(format!(
                "finish: cryptsetup's final header (one crypt segment), pvresize the PV on /dev/mapper/{name}"
            ));
        }
        LuksVersion::Luks1 => {
            if let Some(g) = &geometry {
                actions.push(format!(
                    "write the journal (sectors {}..{}) and a copy of the header (sector {}) into the free tail of {dev}",
                    g.journal,
                    g.journal + 2 * JOURNAL_SLOT_SECTORS,
                    g.header_copy
                ));
            }
            actions.push(format!(
                "create the bridge /dev/mapper/{name} (linear over [0, {l}) of {dev}) and a private staging crypt device"
            ));
            actions.push(format!(
                "reroute {} LV mapping(s) onto the bridge, each under a brief suspend: {rerouted}",
                reroute.len()
            ));
            actions.push(format!(
                "fence: shadow the first {} KiB in the tail and overwrite them on {dev} with luksify's marker, so nothing sees a PV there mid-way",
                Sectors(FENCE_SECTORS).bytes() / 1024
            ));
            actions.push(format!(
                "move {} ({} sectors) from the end towards the start in {steps} step(s) of up to {} sectors: read, encrypted and written by luksify while the system runs, read back (also through dm-crypt), then rechecked against the source under a brief suspend and committed to the journal before the step is mapped through crypt",
                mib(l), l, k
            ));
            actions.push(format!("load the pure crypt table, write the LUKS header at [0, {s}) of {dev}"));
            actions.push(format!(
                "pvresize the PV on /dev/mapper/{name}; wipe the journal, header copy and shadow from the tail"
            ));
        }
    }
    if let Some(b) = &boot_report {
        actions.push(format!(
            "integrate (unless --no-integrate) into {}: add `{name} UUID=<new LUKS UUID> none luks` to etc/crypttab, update the LVM devices file if there is one, regenerate the initramfs{}",
            b.root_dir,
            b.initramfs.map(|g| format!(" ({g})")).unwrap_or_default()
        ));
    }

    Plan {
        schema: PLAN_SCHEMA_VERSION,
        device: f.path.clone(),
        size_sectors: f.size_sectors,
        name,
        luks: o.luks,
        cipher: o.cipher.clone(),
        key_bits: o.key_bits,
        shift_sectors: s,
        default_shift_sectors: s0,
        chunk_sectors: k,
        region_sectors: geometry.map(|g| g.region).unwrap_or(o.region),
        move_sectors: l,
        move_bytes,
        tail_need_sectors: tail_need,
        tail_have_sectors: tail_have,
        journal_sector: geometry.filter(|_| o.luks == LuksVersion::Luks1).map(|g| g.journal),
        midway_format: MidwayFormat::of(o.luks, l, s),
        steps,
        estimate_seconds,
        estimate_assumes_mib_per_s: estimate_mib_per_s,
        estimate_from_read,
        vg,
        reroute,
        actions,
        refusals,
        warnings,
        notes,
        make_room: make_room_plan,
        boot: boot_report,
        recovery_key: o.recovery_key,
        suggestions: Vec::new(),
        geometry,
    }
}

/// What `--make-room` can do when the tail past the PV is too small.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MakeRoom {
    /// The last `extents` extents of the PV are free: shrink the PV to `new_pv_sectors`.
    ShrinkPv { extents: u64, new_pv_sectors: u64 },
    /// The last `extents` extents, `first..=last`, hold data of `lvs`, and the PV has that
    /// many free extents elsewhere: move them there (`pvmove`), then shrink the PV.
    MoveThenShrink { extents: u64, first: u64, last: u64, lvs: Vec<String>, new_pv_sectors: u64 },
    /// Nothing safe to do automatically: `lvs` on this PV could give `extents` extents
    /// (`swap` lists the ones in use as swap, the easiest to shrink).
    Manual { extents: u64, lvs: Vec<String>, swap: Vec<String> },
}

/// What would make `missing` more sectors of room past the PV of `f`.
pub fn make_room(f: &DeviceFacts, missing: u64) -> Option<MakeRoom> {
    let lvm = f.lvm.as_ref()?;
    let ext = lvm.extent_size.max(1);
    let extents = missing.div_ceil(ext);
    if extents > lvm.pe_count {
        return Some(MakeRoom::Manual { extents, lvs: vec![], swap: vec![] });
    }
    let mut segs = lvm.segments.clone();
    segs.sort_by_key(|s| s.start_extent);
    let free_at_end = match segs.last() {
        Some(seg) if seg.lv.is_none() && seg.start_extent + seg.extents == lvm.pe_count => seg.extents,
        _ => 0,
    };
    let first = lvm.pe_count - extents;
    let new_pv_sectors = lvm.pe_start + first * ext;
    if free_at_end >= extents {
        return Some(MakeRoom::ShrinkPv { extents, new_pv_sectors });
    }
    // Free extents below `first` (those at or past it are about to be given up).
    let free_below: u64 =
        segs.iter().filter(|s| s.lv.is_none()).map(|s| s.extents.min(first.saturating_sub(s.start_extent))).sum();
    let mut owners: Vec<String> =
        segs.iter().filter(|s| s.start_extent + s.extents > first).filter_map(|s| s.lv.clone()).collect();
    owners.dedup();
    let used_at_end: u64 = segs
        .iter()
        .filter(|s| s.lv.is_some() && s.start_extent + s.extents > first)
        .map(|s| s.start_extent + s.extents - s.start_extent.max(first))
        .sum();
    if free_below >= used_at_end {
        return Some(MakeRoom::MoveThenShrink { extents, first, last: lvm.pe_count - 1, lvs: owners, new_pv_sectors });
    }
    let mut lvs: Vec<String> = lvm.lvs.iter().map(|l| l.name.clone()).collect();
    lvs.sort();
    let swap = lvs
        .iter()
        .filter(|lv| {
            let dm = lvm.lvs.iter().find(|l| &l.name == *lv).map(|l| l.dm_name.clone()).unwrap_or_default();
            f.holders.iter().any(|h| {
                h.swap
                    && (h.name == dm
                        || h.name == format!("{}-{}", lvm.vg_name.replace('-', "--"), lv.replace('-', "--")))
            })
        })
        .cloned()
        .collect();
    Some(MakeRoom::Manual { extents, lvs, swap })
}

impl MakeRoom {
    /// The LVM commands that carry it out, in order (none for [`MakeRoom::Manual`]).
    pub fn commands(&self, dev: &str) -> Vec<Vec<String>> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            MakeRoom::ShrinkPv { new_pv_sectors, .. } => {
                vec![v(&["pvresize", "--yes", "--setphysicalvolumesize", &format!("{new_pv_sectors}s"), dev])]
            }
            MakeRoom::MoveThenShrink { first, last, new_pv_sectors, .. } => vec![
                // Destination: only the extents the PV keeps.
                v(&[
                    "pvmove",
                    "--alloc",
                    "anywhere",
                    &format!("{dev}:{first}-{last}"),
                    &format!("{dev}:0-{}", first - 1),
                ]),
                v(&["pvresize", "--yes", "--setphysicalvolumesize", &format!("{new_pv_sectors}s"), dev]),
            ],
            MakeRoom::Manual { .. } => vec![],
        }
    }

    /// One sentence of advice.
    pub fn advice(&self, dev: &str) -> String {
        let cmds = self.commands(dev).iter().map(|c| format!("`{}`", c.join(" "))).collect::<Vec<_>>().join(", then ");
        match self {
            MakeRoom::ShrinkPv { extents, .. } => format!(
                "the last {extents} extent(s) of the PV are free: shrink it with {cmds} (or run luksify with --make-room)"
            ),
            MakeRoom::MoveThenShrink { lvs, .. } => format!(
                "the last extents are used by LV {}, and the PV has enough free extents before them: move them with {cmds} (or run luksify with --make-room, which does both)",
                lvs.join(", ")
            ),
            MakeRoom::Manual { extents, lvs, swap } => {
                let mut m = format!(
                    "the PV has too few free extents: shrink an LV or a filesystem on it by {extents} extent(s) (LVs on it: {}), then run luksify with --make-room",
                    if lvs.is_empty() { "none".to_string() } else { lvs.join(", ") }
                );
                if !swap.is_empty() {
                    m.push_str(&format!(
                        "; a swap LV is the easiest ({}): swapoff, lvreduce -l -{extents}, mkswap, swapon",
                        swap.join(", ")
                    ));
                }
                m
            }
        }
    }
}

fn too_little_tail_message(
    dev: &str,
    luks: LuksVersion,
    need: u64,
    have: u64,
    missing: u64,
    room: Option<&MakeRoom>,
) -> String {
    let why = match luks {
        LuksVersion::Luks2 => " (twice the data offset: the LUKS2 header's shift and the moved first segment; and 4 KiB for luksify's cut-over record)",
        LuksVersion::Luks1 => "",
    };
    let mut m = format!(
        "too little space past the PV on {dev}: luksify needs {need} sectors ({}) after it{why} and there are {have} ({}); {missing} sectors ({}) are missing",
        mib(need), mib(have), mib(missing)
    );
    if let Some(r) = room {
        m.push_str("; ");
        m.push_str(&r.advice(dev));
    }
    m
}

/// The human form of the plan, as `--dry-run` prints it.
pub fn render(p: &Plan) -> String {
    let mut s = String::new();
    s.push_str(&format!("luksify plan for {} ({} sectors, {})\n", p.device, p.size_sectors, mib(p.size_sectors)));
    if let Some(vg) = &p.vg {
        s.push_str(&format!("  LVM volume group:  {vg}\n"));
    }
    if !p.refusals.is_empty() {
        // a plan that will not run has no steps, time or layout worth reading: what is wrong
        // (and the boot report, which may say why)
        if let Some(b) = &p.boot {
            s.push_str(&boot::render(b));
        }
        for w in &p.warnings {
            s.push_str(&format!("  warning: {w}\n"));
        }
        s.push_str("  verdict: REFUSED (nothing was changed):\n");
        for r in &p.refusals {
            s.push_str(&format!("    - [{}] {}\n", r.code, r.message));
        }
        return s;
    }
    s.push_str(&format!("  new mapping:       /dev/mapper/{}\n", p.name));
    s.push_str(&format!(
        "  header:            {} {} {}-bit, data offset S = {} sectors ({})\n",
        match p.luks {
            LuksVersion::Luks1 => "LUKS1",
            LuksVersion::Luks2 => "LUKS2",
        },
        p.cipher,
        p.key_bits,
        p.shift_sectors,
        mib(p.shift_sectors)
    ));

    s.push_str(&format!("  to move:           {} sectors ({})\n", p.move_sectors, mib(p.move_sectors)));
    match p.luks {
        LuksVersion::Luks2 => s.push_str(&format!(
            "  steps:             {} of up to {} sectors (the hotzones of cryptsetup's format)\n",
            p.steps, p.shift_sectors
        )),
        LuksVersion::Luks1 => s.push_str(&format!(
            "  chunk:             {} sectors, {} step(s), mirror region {} sectors\n",
            p.chunk_sectors, p.steps, p.region_sectors
        )),
    }
    s.push_str(&format!(
        "  tail space:        need {} sectors ({}), have {} sectors ({}){}\n",
        p.tail_need_sectors,
        mib(p.tail_need_sectors),
        p.tail_have_sectors,
        mib(p.tail_have_sectors),
        match p.luks {
            LuksVersion::Luks2 =>
                "; 2 x S + 4 KiB: the LUKS2 header's shift, the moved first segment and luksify's cut-over record",
            LuksVersion::Luks1 => "",
        }
    ));
    s.push_str(match p.luks {
        LuksVersion::Luks2 => "  mid-way format:    standard LUKS2 reencryption in progress (online-reencrypt-v2): stock cryptsetup >= 2.3.7 / 2.4.3 opens, recovers and finishes a half-converted disk\n",
        LuksVersion::Luks1 => "  mid-way format:    luksify's own journal (LUKS1 has no standard state for a conversion in progress): a half-converted LUKS1 disk needs luksify to resume\n",
    });
    if let Some(j) = p.journal_sector {
        s.push_str(&format!("  journal:           sectors {j}..{} (the last 8 KiB)\n", j + 2 * JOURNAL_SLOT_SECTORS));
        s.push_str(&format!("  header copy:       {} sectors reserved before it\n", HEADER_COPY_SECTORS));
    }
    let basis = match &p.estimate_from_read {
        Some(r) => format!(
            "an estimate from an O_DIRECT read of {} MiB at {} MiB/s: the copy {} every byte on the same disk",
            r.read_mib,
            r.read_mib_per_s,
            if r.io_per_byte == 3 { "reads, writes and reads back" } else { "reads and writes" }
        ),
        None => "not measured".to_string(),
    };
    s.push_str(&format!(
        "  estimated time:    about {} (assuming {} MiB/s; {basis})\n",
        crate::core::running::human_duration(p.estimate_seconds as f64),
        p.estimate_assumes_mib_per_s
    ));
    if !p.reroute.is_empty() {
        s.push_str("  mappings to reroute onto the bridge:\n");
        for r in &p.reroute {
            let mut what = r.mounts.join(", ");
            if r.swap {
                what = if what.is_empty() { "swap".into() } else { format!("{what}, swap") };
            }
            if what.is_empty() {
                what = "not mounted".into();
            }
            s.push_str(&format!("    {} ({what})\n", r.dm_name));
        }
    }
    s.push_str("  steps:\n");
    for (i, a) in p.actions.iter().enumerate() {
        s.push_str(&format!("    {}. {a}\n", i + 1));
    }
    for n in &p.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    if let Some(b) = &p.boot {
        s.push_str(&boot::render(b));
    }
    for w in &p.warnings {
        s.push_str(&format!("  warning: {w}\n"));
    }
    for t in &p.suggestions {
        s.push_str(&format!("  suggestion: {t}\n"));
    }
    s.push_str("  verdict: can convert (dry run: nothing was changed)\n");
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::facts::samples::laptop;
    use crate::core::facts::*;

    fn codes(p: &Plan) -> Vec<&'static str> {
        p.refusals.iter().map(|r| r.code).collect()
    }

    /// The laptop with `tail` sectors past its PV (the sample has 40960: room for LUKS1,
    /// and for LUKS2's 16 MiB with luksify's journal, but not for LUKS2's 2S).
    fn laptop_with_tail(tail: u64) -> DeviceFacts {
        let mut f = laptop();
        let l = f.lvm.as_ref().map(|l| l.pe_start + l.pe_count * l.extent_size).unwrap();
        f.size_sectors = l + tail;
        f.lvm.as_mut().unwrap().dev_size = l + tail;
        f
    }

    /// A laptop with room for a LUKS2 conversion (2S past the PV and some more).
    fn roomy_laptop() -> DeviceFacts {
        laptop_with_tail(2 * 32768 + 8192)
    }

    /// `--recovery-key` is a step of the plan, with the keyslot's hash: systemd's sha512,
    /// LUKS1's header hash, or the passphrase keyslot's when GRUB opens /boot on the PV.
    #[test]
    fn recovery_key_step_follows_grub_and_the_luks_type() {
        use crate::core::boot::FsSource;
        let grub_boot = BootFacts {
            root_dir: "/".into(),
            root_fs: Some(FsSource { spec: "/dev/mapper/vg0-root".into(), dev: Some((254, 0)) }),
            boot_fs: None, // /boot on the root LV: GRUB opens the PV
            mounts_from: "mountinfo".into(),
            update_initramfs: true,
            initramfs_tools_conf: true,
            cryptroot_hook: true,
            grub_default: Some("GRUB_ENABLE_CRYPTODISK=y\n".into()),
            ..Default::default()
        };
        let step = |p: &Plan| p.actions.iter().find(|a| a.contains("recovery key")).cloned();
        let o = Options { recovery_key: true, pbkdf: Some("pbkdf2".into()), ..Options::default() };
        let p = plan_with_boot(&roomy_laptop(), Some(&grub_boot), &o);
        assert!(p.ok(), "{:?}", p.refusals);
        assert!(p.boot.as_ref().unwrap().boot_on_pv);
        let a = step(&p).expect("a recovery key step");
        assert!(a.contains("the passphrase keyslot's hash") && a.contains("systemd-recovery"), "{a}");
        assert!(p.recovery_key);
        assert!(serde_json::to_string(&p).unwrap().contains("\"recovery_key\":true"));
        let a = step(&plan(&roomy_laptop(), &o)).unwrap();
        assert!(a.contains("sha512"), "{a}");
        let l1 = Options { luks: LuksVersion::Luks1, ..o.clone() };
        let a = step(&plan(&roomy_laptop(), &l1)).unwrap();
        assert!(a.contains("the header's hash") && !a.contains("systemd-recovery"), "{a}");
        let without = plan(&roomy_laptop(), &Options::default());
        assert!(step(&without).is_none() && !without.recovery_key);
    }

    #[test]
    fn laptop_plan_is_accepted() {
        let p = plan(&roomy_laptop(), &Options::default());
        assert!(p.ok(), "{:?}", p.refusals);
        assert_eq!(p.move_sectors, 2048 + 60 * 8192);
        assert_eq!(p.shift_sectors, 32768);
        assert_eq!((p.chunk_sectors, p.steps), (16384, (2048 + 60 * 8192u64).div_ceil(32768)));
        assert_eq!(p.name, "sda5_crypt");
        let text = render(&p);
        assert!(text.contains("can convert"), "{text}");
        let j: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(j["schema"], 1);
        assert_eq!(j["refusals"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn too_little_tail_says_how_much_and_how_to_make_room() {
        let mut f = laptop();
        f.size_sectors = 2048 + 60 * 8192 + 1000;
        let p = plan(&f, &Options::default());
        assert_eq!(codes(&p), vec!["too_little_tail"]);
        let m = &p.refusals[0].message;
        let need = standard_tail_needed(f.size_sectors, 32768);
        assert_eq!(p.tail_need_sectors, need);
        assert!(m.contains(&format!("{} sectors", need - 1000)), "{m}");
        assert!(m.contains("--setphysicalvolumesize"), "{m}");
        // Last extents allocated, free space elsewhere: pvmove advice.
        f.lvm.as_mut().unwrap().segments = vec![
            PvSegment { start_extent: 0, extents: 30, lv: None },
            PvSegment { start_extent: 30, extents: 30, lv: Some("home".into()) },
        ];
        let p = plan(&f, &Options::default());
        let m = &p.refusals[0].message;
        assert!(m.contains("pvmove") && m.contains("home"), "{m}");
        let ext = missing_extents(&p);
        match p.make_room.clone().unwrap() {
            MakeRoom::MoveThenShrink { first, last, lvs, new_pv_sectors, .. } => {
                assert_eq!((first, last, lvs), (60 - ext, 59, vec!["home".to_string()]));
                assert_eq!(new_pv_sectors, 2048 + (60 - ext) * 8192);
            }
            other => panic!("{other:?}"),
        }
        let cmds = p.make_room.as_ref().unwrap().commands("/dev/sda5");
        assert_eq!(
            cmds[0].join(" "),
            format!("pvmove --alloc anywhere /dev/sda5:{}-59 /dev/sda5:0-{}", 60 - ext, 59 - ext)
        );
        assert_eq!(cmds[1][..3].join(" "), "pvresize --yes --setphysicalvolumesize");
        // Free extents only among the ones given up: not enough to move into.
        f.lvm.as_mut().unwrap().segments = vec![
            PvSegment { start_extent: 0, extents: 58, lv: Some("root".into()) },
            PvSegment { start_extent: 58, extents: 1, lv: None },
            PvSegment { start_extent: 59, extents: 1, lv: Some("home".into()) },
        ];
        assert!(matches!(plan(&f, &Options::default()).make_room, Some(MakeRoom::Manual { .. })));
        // Full PV: which LVs could give room, the swap one first.
        f.lvm.as_mut().unwrap().segments = vec![PvSegment { start_extent: 0, extents: 60, lv: Some("swap".into()) }];
        let swap_lv =
            LvFacts { name: "swap".into(), dm_name: "vg0-swap".into(), ..f.lvm.as_ref().unwrap().lvs[0].clone() };
        f.lvm.as_mut().unwrap().lvs.push(swap_lv);
        f.holders.push(Holder { name: "vg0-swap".into(), swap: true, mounts: vec![], ..f.holders[0].clone() });
        let p = plan(&f, &Options::default());
        let m = &p.refusals[0].message;
        assert!(m.contains("swap") && m.contains("lvreduce") && m.contains("root"), "{m}");
        assert_eq!(
            p.make_room.unwrap(),
            MakeRoom::Manual { extents: ext, lvs: vec!["root".into(), "swap".into()], swap: vec!["swap".into()] }
        );
        // Plenty of room: nothing to make.
        assert_eq!(plan(&roomy_laptop(), &Options::default()).make_room, None);
    }

    fn missing_extents(p: &Plan) -> u64 {
        (p.tail_need_sectors - p.tail_have_sectors).div_ceil(8192)
    }

    #[test]
    fn luks2_needs_twice_the_offset_past_the_pv() {
        // The sample laptop: 40960 sectors past the PV hold S + luksify's journal
        // (32768 + 2072) but not 2S + the cut-over record (65544): refused, 24584 sectors
        // (4 extents) missing.
        let f = laptop();
        assert!(f.size_sectors - 493_568 >= Geometry::tail_needed(f.size_sectors, 32768));
        let p = plan(&f, &Options::default());
        assert_eq!(codes(&p), vec!["too_little_tail"]);
        assert_eq!((p.tail_need_sectors, p.tail_have_sectors), (65544, 40960));
        let m = &p.refusals[0].message;
        assert!(m.contains("luksify needs 65544 sectors (32 MiB)"), "{m}");
        assert!(m.contains("the moved first segment"), "{m}");
        assert!(m.contains("24584 sectors (12 MiB) are missing"), "{m}");
        assert!(m.contains("--setphysicalvolumesize 460800s") && m.contains("--make-room"), "{m}");
        assert_eq!(p.make_room, Some(MakeRoom::ShrinkPv { extents: 4, new_pv_sectors: 2048 + 56 * 8192 }));
        assert!(p.geometry.is_none() && p.journal_sector.is_none());
        // Exactly 2S + 8: accepted; 8 sectors less (2S, no room for the record): refused,
        // those 8 missing.
        let p = plan(&laptop_with_tail(65544), &Options::default());
        assert!(p.ok(), "{:?}", p.refusals);
        assert_eq!(p.tail_need_sectors, 65544);
        assert!(p.geometry.is_some());
        let p = plan(&laptop_with_tail(65536), &Options::default());
        assert_eq!(codes(&p), vec!["too_little_tail"]);
        assert!(p.refusals[0].message.contains("; 8 sectors (0.00 MiB) are missing"), "{}", p.refusals[0].message);
        // An unaligned end costs its odd sectors, as before.
        let p = plan(&laptop_with_tail(65544 + 5), &Options::default());
        assert!(p.ok() && p.tail_need_sectors == 65549, "{:?}", p.refusals);
        // --offset: 2S of that offset.
        let o = Options { shift: Some(16384), ..Options::default() };
        let p = plan(&laptop(), &o);
        assert!(p.ok(), "{:?}", p.refusals);
        assert_eq!((p.shift_sectors, p.tail_need_sectors), (16384, 32776));
        // LUKS1 is unchanged: S and luksify's journal (the sample laptop converts).
        let o = Options { luks: LuksVersion::Luks1, shift: Some(4096), ..Options::default() };
        let p = plan(&laptop(), &o);
        assert!(p.ok(), "{:?}", p.refusals);
        assert_eq!(p.tail_need_sectors, Geometry::tail_needed(p.size_sectors, 4096));
        assert_eq!(p.tail_need_sectors, 4096 + 2072);
        let p = plan(&laptop_with_tail(4096 + 2072 - 8), &o);
        assert_eq!(codes(&p), vec!["too_little_tail"]);
        assert!(p.refusals[0].message.contains("; 8 sectors (0.00 MiB) are missing"), "{}", p.refusals[0].message);
        assert!(!p.refusals[0].message.contains("moved first segment"));
    }

    #[test]
    fn luks2_refuses_a_pv_smaller_than_the_offset() {
        let mut f = laptop_with_tail(100_000);
        let lvm = f.lvm.as_mut().unwrap();
        lvm.pe_count = 3;
        lvm.pv_size = 3 * 8192;
        lvm.segments = vec![PvSegment { start_extent: 0, extents: 3, lv: Some("root".into()) }];
        f.size_sectors = 2048 + 3 * 8192 + 100_000;
        let p = plan(&f, &Options::default());
        assert_eq!(codes(&p), vec!["geometry"]);
        assert!(p.refusals[0].message.contains("the PV is smaller than the LUKS2 data offset"), "{:?}", p.refusals);
        assert!(p.geometry.is_none());
        // LUKS1 (a smaller S) converts it.
        assert!(plan(&f, &Options { luks: LuksVersion::Luks1, ..Options::default() }).ok());
        // L = S is enough: one step.
        let o = Options { shift: Some(2048 + 3 * 8192), ..Options::default() };
        let p = plan(&f, &o);
        assert!(p.ok(), "{:?}", p.refusals);
        assert_eq!(p.steps, 1);
    }

    #[test]
    fn luks2_steps_are_cryptsetups_hotzones() {
        let s = 32768;
        let formula = |l: u64| (l - s) / s + u64::from(!(l - s).is_multiple_of(s)) + 1;
        for l in [s, s + 8, 2 * s - 8, 2 * s, 2 * s + 8, 493_568, 10 * s, 10 * s + 4096] {
            assert_eq!(luks2_hotzones(l, s), formula(l), "{l}");
        }
        assert_eq!((luks2_hotzones(s, s), luks2_hotzones(2 * s, s), luks2_hotzones(2 * s + 8, s)), (1, 2, 3));
        assert_eq!(luks2_hotzones(0, s), 0);
        let p = plan(&roomy_laptop(), &Options::default());
        assert_eq!(p.steps, formula(493_568));
        assert_eq!(p.steps, 16);
        // LUKS1 keeps its own steps of k.
        let o = Options { luks: LuksVersion::Luks1, shift: Some(4096), ..Options::default() };
        assert_eq!(plan(&laptop(), &o).steps, 493_568u64.div_ceil(4096));
    }

    #[test]
    fn midway_format_says_who_can_resume() {
        let p = plan(&roomy_laptop(), &Options::default());
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(
            j["midway_format"],
            serde_json::json!({
                "kind": "luks2-reencrypt",
                "requirement": "online-reencrypt-v2",
                "oldest_cryptsetup": "2.3.7 / 2.4.3",
                "moved_segment": [493_568 + 32768, 493_568 + 2 * 32768],
                "resume_without_luksify": true
            })
        );
        assert_eq!(j["schema"], 1);
        assert!(j["journal_sector"].is_null(), "LUKS2 keeps no luksify journal");
        let text = render(&p);
        assert!(text.contains("  mid-way format:    standard LUKS2 reencryption in progress (online-reencrypt-v2): stock cryptsetup >= 2.3.7 / 2.4.3 opens, recovers and finishes a half-converted disk\n"), "{text}");
        assert!(
            text.contains(
                "2 x S + 4 KiB: the LUKS2 header's shift, the moved first segment and luksify's cut-over record"
            ),
            "{text}"
        );
        assert!(!text.contains("journal:"), "{text}");
        let o = Options { luks: LuksVersion::Luks1, ..Options::default() };
        let p = plan(&laptop(), &o);
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(
            j["midway_format"],
            serde_json::json!({
                "kind": "luksify-journal",
                "requirement": null,
                "oldest_cryptsetup": null,
                "moved_segment": null,
                "resume_without_luksify": false
            })
        );
        assert!(j["journal_sector"].is_u64());
        let text = render(&p);
        assert!(text.contains("  mid-way format:    luksify's own journal (LUKS1 has no standard state for a conversion in progress): a half-converted LUKS1 disk needs luksify to resume\n"), "{text}");
        assert!(text.contains("  journal:           sectors "), "{text}");
    }

    #[test]
    fn the_dry_run_says_when_the_boot_chain_goes_in() {
        use crate::core::boot::{samples::debian, BootFacts, FsSource};
        let debian = debian();
        let p = plan_with_boot(&roomy_laptop(), Some(&debian), &Options::default());
        assert!(p.ok(), "{:?}", p.refusals);
        let i = p.actions.iter().position(|a| a.starts_with("set up the boot chain")).expect("no boot chain action");
        let cut = p.actions.iter().position(|a| a.starts_with("cut-over")).unwrap();
        assert!(i < cut, "the boot chain goes in before the cut-over: {:?}", p.actions);
        // not for LUKS1 (no standard state mid-way), nor when the root is elsewhere
        let p1 =
            plan_with_boot(&roomy_laptop(), Some(&debian), &Options { luks: LuksVersion::Luks1, ..Options::default() });
        assert!(!p1.actions.iter().any(|a| a.contains("boot chain")));
        let elsewhere =
            BootFacts { root_fs: Some(FsSource { spec: "/dev/sdb1".into(), dev: Some((8, 17)) }), ..debian };
        let p2 = plan_with_boot(&roomy_laptop(), Some(&elsewhere), &Options::default());
        assert!(!p2.actions.iter().any(|a| a.contains("boot chain")), "{:?}", p2.actions);
    }

    #[test]
    fn both_formats_take_any_cipher_the_kernel_maps() {
        let roomy = roomy_laptop();
        for (c, bits) in [
            ("serpent-xts-plain64", 512),
            ("aes-cbc-essiv:sha256", 256),
            ("aes-xts-plain64", 256),
            ("twofish-xts-plain64", 512),
        ] {
            let p = plan(&roomy, &Options { cipher: c.into(), key_bits: bits, ..Options::default() });
            assert!(p.ok(), "LUKS2 {c} {bits}: {:?}", codes(&p));
            assert!(render(&p).contains(&format!("LUKS2 {c} {bits}-bit")), "{}", render(&p));
            let p1 = plan(
                &roomy,
                &Options { cipher: c.into(), key_bits: bits, luks: LuksVersion::Luks1, ..Options::default() },
            );
            assert!(p1.ok(), "LUKS1 {c} {bits}: {:?}", codes(&p1));
            assert!(render(&p1).contains(&format!("LUKS1 {c} {bits}-bit")), "{}", render(&p1));
        }
        for (c, bits) in [
            ("aes", 512),
            ("aes-xts plain64", 512),
            ("aes--plain64", 512),
            ("aes-xts-plain64", 500),
            ("aes-xts-plain64", 2048),
            ("aes-xts-plain64", 64),
        ] {
            let p = plan(&roomy, &Options { cipher: c.into(), key_bits: bits, ..Options::default() });
            assert_eq!(codes(&p), vec!["bad_cipher"], "{c:?} {bits}");
        }
        let no = Options {
            cipher: "serpent-xts-plain64".into(),
            kernel_cipher_error: Some("the kernel's dm-crypt refuses cipher serpent-xts-plain64".into()),
            ..Options::default()
        };
        let p = plan(&roomy, &no);
        assert_eq!(codes(&p), vec!["cipher_unavailable"]);
        assert!(
            p.refusals[0].message.contains("serpent-xts-plain64")
                && p.refusals[0].message.contains("nothing was changed")
        );
    }

    #[test]
    fn the_time_estimate_comes_from_a_measured_read_when_there_is_one() {
        use crate::core::facts::ReadSample;
        // not measured: the assumed rate, and the text says so
        let p = plan(&roomy_laptop(), &Options::default());
        assert_eq!((p.estimate_assumes_mib_per_s, p.estimate_from_read), (ASSUMED_MIB_PER_S, None));
        assert!(render(&p).contains(&format!("(assuming {ASSUMED_MIB_PER_S} MiB/s; not measured)")), "{}", render(&p));
        // 64 MiB read in 0.5 s = 128 MiB/s: LUKS2 reads and writes (64 MiB/s), LUKS1 also
        // reads back (43 MiB/s)
        let mut f = roomy_laptop();
        f.read_sample = Some(ReadSample { bytes: 64 << 20, micros: 500_000 });
        let p = plan(&f, &Options::default());
        assert_eq!(p.estimate_assumes_mib_per_s, 64);
        assert_eq!(p.estimate_from_read, Some(EstimateRead { read_mib: 64, read_mib_per_s: 128, io_per_byte: 2 }));
        assert_eq!(p.estimate_seconds, p.move_bytes.div_ceil(64 << 20));
        let text = render(&p);
        assert!(
            text.contains("(assuming 64 MiB/s; an estimate from an O_DIRECT read of 64 MiB at 128 MiB/s: the copy reads and writes every byte on the same disk)"),
            "{text}"
        );
        let p1 = plan(&f, &Options { luks: LuksVersion::Luks1, ..Options::default() });
        assert_eq!(p1.estimate_assumes_mib_per_s, 43);
        assert!(render(&p1).contains("reads, writes and reads back"), "{}", render(&p1));
        // a slow disk: never 0 MiB/s; a sample too small says nothing
        assert_eq!(estimate_rate(Some(&ReadSample { bytes: 1 << 20, micros: 10_000_000 }), LuksVersion::Luks1).0, 1);
        assert_eq!(
            estimate_rate(Some(&ReadSample { bytes: 4096, micros: 10 }), LuksVersion::Luks2),
            (ASSUMED_MIB_PER_S, None)
        );
        assert_eq!(
            estimate_rate(Some(&ReadSample { bytes: 0, micros: 0 }), LuksVersion::Luks2),
            (ASSUMED_MIB_PER_S, None)
        );
        // JSON: the basis is there for scripts
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["estimate_from_read"]["read_mib_per_s"], 128, "{v}");
    }

    #[test]
    fn a_refused_plan_renders_the_refusals_without_steps_or_estimate() {
        let o = Options {
            cipher: "serpent-cbc-essiv:sha256".into(),
            key_bits: 100,
            luks: LuksVersion::Luks1,
            ..Options::default()
        };
        let p = plan(&laptop(), &o);
        assert!(codes(&p).contains(&"bad_cipher"), "{:?}", codes(&p));
        let text = render(&p);
        assert!(text.starts_with("luksify plan for /dev/sda5"), "{text}");
        assert!(text.contains("  verdict: REFUSED (nothing was changed):\n    - [bad_cipher] "), "{text}");
        for absent in ["steps:", "estimated time", "to move:", "step(s)", "header:"] {
            assert!(!text.contains(absent), "a refused plan shows '{absent}':\n{text}");
        }
    }

    #[test]
    fn luks2_actions_are_cryptsetups_steps_luks1_keeps_the_journal() {
        let p = plan(&roomy_laptop(), &Options::default());
        let a = &p.actions;
        assert_eq!(a.len(), 5, "{a:#?}");
        assert!(a[1].starts_with("insert the bridge /dev/mapper/sda5_crypt") && a[1].contains("vg0-root"), "{a:#?}");
        assert_eq!(
            a[2],
            "cut-over (bridge suspended): copy the first 32768 sectors to sectors [526336, 559104) (the moved segment), write the LUKS2 header with the reencryption in progress (online-reencrypt-v2) over [0, 32768), map the bridge as cryptsetup would"
        );
        assert!(
            a[3].contains(
                "backward in 16 step(s) of up to 32768 sectors with luksify's own steps in cryptsetup's format"
            ),
            "{a:#?}"
        );
        assert_eq!(
            a[4],
            "finish: cryptsetup's final header (one crypt segment), pvresize the PV on /dev/mapper/sda5_crypt"
        );
        assert!(
            a.iter().all(|x| !x.contains("journal") && !x.contains("fence") && !x.contains("header copy")),
            "{a:#?}"
        );
        let p = plan(&laptop(), &Options { luks: LuksVersion::Luks1, ..Options::default() });
        let a = &p.actions;
        assert_eq!(a.len(), 8, "{a:#?}");
        assert!(a[1].starts_with("write the journal") && a[4].starts_with("fence:"), "{a:#?}");
    }

    #[test]
    fn every_refusal_has_its_code() {
        let o = Options::default();
        let mut f = laptop();
        f.content = Content::Luks { version: 2 };
        f.lvm = None;
        assert!(codes(&plan(&f, &o)).contains(&"already_luks"));

        let mut f = laptop();
        f.content = Content::Filesystem { fstype: "ext4".into() };
        f.lvm = None;
        f.holders.clear();
        f.direct_mounts = vec!["/mnt".into()];
        assert_eq!(codes(&plan(&f, &o)), vec!["mounted_directly"]);

        let mut f = laptop();
        f.holders[0].table[0].target_type = "snapshot-origin".into();
        assert!(codes(&plan(&f, &o)).contains(&"unsupported_target"));

        let mut f = laptop();
        f.lvm.as_mut().unwrap().lvs[0].segtypes = vec!["thin-pool".into()];
        assert!(codes(&plan(&f, &o)).contains(&"unsupported_lv"));

        let mut f = laptop();
        f.lvm.as_mut().unwrap().lvs[0].attr = "pwi-ao----".into();
        assert!(codes(&plan(&f, &o)).contains(&"unsupported_lv"));

        let mut f = laptop();
        f.luksify_journal = true;
        assert!(codes(&plan(&f, &o)).contains(&"conversion_in_progress"));

        let mut f = laptop();
        f.lvm.as_mut().unwrap().mda_count = 2;
        assert!(codes(&plan(&f, &o)).contains(&"metadata_at_end"));

        let mut f = laptop();
        f.content = Content::Nothing;
        f.lvm = None;
        assert!(codes(&plan(&f, &o)).contains(&"not_lvm"));

        let mut f = laptop();
        f.logical_block_size = 4096;
        assert!(codes(&plan(&f, &o)).contains(&"block_size"));
    }

    #[test]
    fn luks1_uses_a_2_mib_offset_when_the_tail_has_no_more_room() {
        let mut f = laptop();
        // Room for a 2 MiB header and the journal, not for a 4 MiB one.
        f.size_sectors = f.lvm.as_ref().map(|l| l.pe_start + l.pe_count * l.extent_size).unwrap() + 4096 + 2072 + 100;
        let o = Options { luks: LuksVersion::Luks1, ..Options::default() };
        let p = plan(&f, &o);
        assert!(p.ok(), "{:?}", p.refusals);
        assert_eq!(p.shift_sectors, 4096);
        assert_eq!(p.chunk_sectors, 4096);
        assert!(p.notes.is_empty());
    }

    #[test]
    fn the_offset_is_raised_while_the_tail_has_room_and_the_dry_run_says_so() {
        // The laptop's tail is 40960 sectors: room for 32768 + the journal's 2072, not 65536.
        let o = Options { luks: LuksVersion::Luks1, ..Options::default() };
        let p = plan(&laptop(), &o);
        assert!(p.ok(), "{:?}", p.refusals);
        assert_eq!((p.default_shift_sectors, p.shift_sectors, p.chunk_sectors), (4096, 16384, 16384));
        assert_eq!(p.steps, p.move_sectors.div_ceil(16384));
        // Room needed is still that of the default header.
        assert_eq!(p.tail_need_sectors, Geometry::tail_needed(p.size_sectors, 4096));
        let text = render(&p);
        assert!(text.contains("note: data offset raised from the default 2.00 MiB to 8.00 MiB"), "{text}");
        // An explicit --offset is kept as it is.
        let p = plan(&laptop(), &Options { luks: LuksVersion::Luks1, shift: Some(4096), ..Options::default() });
        assert_eq!(p.shift_sectors, 4096);
        assert!(p.notes.is_empty());
    }

    #[test]
    fn auto_shift_is_bounded() {
        let big = 1u64 << 40;
        // A huge tail: capped at the largest step; LUKS2's default is already larger.
        assert_eq!(auto_shift(LuksVersion::Luks1, true, big, big / 2, big / 2), MAX_AUTO_SHIFT);
        // LUKS2: 32 MiB with luksify's own steps, else cryptsetup's 16 MiB
        assert_eq!(auto_shift(LuksVersion::Luks2, true, big, big / 2, big / 2), MAX_AUTO_SHIFT_LUKS2);
        assert_eq!(auto_shift(LuksVersion::Luks2, false, big, big / 2, big / 2), 32768);
        // LUKS2 raised only where the tail holds 2S and the cut-over record
        let need = standard_tail_needed(big, 65536);
        assert_eq!(auto_shift(LuksVersion::Luks2, true, big, big / 2, need), 65536);
        assert_eq!(auto_shift(LuksVersion::Luks2, true, big, big / 2, need - 1), 32768);
        // Never beyond the first power-of-two multiple of the default that covers L.
        assert_eq!(auto_shift(LuksVersion::Luks1, true, big, 6_000, big - 6_000), 8192);
        // No room: the default.
        assert_eq!(auto_shift(LuksVersion::Luks1, true, big, big - 10, 10), 4096);
        for (l, tail) in [(1u64 << 20, 9_000u64), (1 << 22, 300_000), (1 << 30, 1 << 20)] {
            let s = auto_shift(LuksVersion::Luks1, true, l + tail, l, tail);
            assert!(Geometry::tail_needed(l + tail, s) <= tail && s <= MAX_AUTO_SHIFT, "{l} {tail} {s}");
        }
    }
}
