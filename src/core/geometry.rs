//! Geometry of a conversion: where everything lives on the device, in 512-byte sectors.
//!
//! ```text
//! [0, S)            final: LUKS header.  during: plaintext, the fence marker at [0, F)
//! [S, S+L)          ciphertext of the plaintext sectors [0, L)
//! [S+L, tail_start) unused
//! [shadow, +F)      shadow of the label sectors [0, F)
//! [hdr_copy, +HC)   copy of the new LUKS header (keyslot material) for resume
//! [E-16, E-8)       journal slot A      (E = N rounded down to 8 sectors)
//! [E-8, E)          journal slot B
//! ```
//!
//! The journal is always in the last 8 KiB of the device (4 KiB aligned), so rescue media
//! find it from the device alone.
//!
//! That tail layout is LUKS1's. A LUKS2 conversion keeps cryptsetup's own format mid-way
//! instead (see [`standard_tail_needed`]): the first S plaintext sectors move to
//! [L+S, L+2S), and the tail must hold 2S.

use serde::{Deserialize, Serialize};

/// Label sectors shadowed by the fence: 4 KiB, where LVM's label (sectors 0..3) and blkid look.
pub const FENCE_SECTORS: u64 = 8;
/// The most sectors one step moves (8 MiB): each step's plaintext and ciphertext are held
/// in memory, and while the bridge is suspended its source is read once more to catch the
/// last live writes, so this bounds both the memory and the stall.
pub const MAX_STEP: u64 = 16384;
/// LUKS2: luksify's cut-over record, the device's last aligned 4 KiB (`core::cutover`).
pub const CUT_OVER_RECORD_SECTORS: u64 = 8;
/// One journal slot: 4 KiB.
pub const JOURNAL_SLOT_SECTORS: u64 = 8;
/// Room reserved for the copy of the LUKS header (binary header, JSON, used keyslot areas).
/// A LUKS2 header with one 512-bit keyslot needs 284 KiB, LUKS1 256 KiB; with the recovery
/// keyslot (`--recovery-key`) 536 KiB and 508 KiB (tests/luks_header.rs checks that they
/// fit); 1 MiB leaves room for bigger keys and metadata.
pub const HEADER_COPY_SECTORS: u64 = 2048;

/// Where the journal's slot A of a device of `n` sectors is (slot B follows it): its last
/// 8 KiB, 4 KiB aligned. None if the device is too small to hold one.
pub fn journal_sector(n: u64) -> Option<u64> {
    align_down(n, 8).checked_sub(2 * JOURNAL_SLOT_SECTORS)
}

/// Round `x` down to a multiple of `a` (a > 0).
pub const fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

/// Round `x` up to a multiple of `a` (a > 0).
pub const fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Where everything is. Every number is in 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Device size.
    pub n: u64,
    /// Sectors to encrypt: [0, L) of plaintext.
    pub l: u64,
    /// LUKS data offset ("shift").
    pub s: u64,
    /// Chunk size, k <= S.
    pub k: u64,
    /// Fence size (label sectors shadowed).
    pub f: u64,
    /// dm-mirror region size (power of two, >= 8).
    pub region: u64,
    /// First sector of the shadow of [0, F).
    pub shadow: u64,
    /// First sector of the header copy.
    pub header_copy: u64,
    /// Sectors reserved for the header copy.
    pub header_copy_len: u64,
    /// First sector of journal slot A (slot B follows).
    pub journal: u64,
}

/// Why a geometry is impossible. Pure numbers; the planner turns them into advice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("the device is too small to hold luksify's journal")]
    DeviceTooSmall,
    #[error("nothing to encrypt (L = 0)")]
    Empty,
    #[error("L = {0} sectors is not a multiple of 8 sectors (4 KiB)")]
    Unaligned(u64),
    #[error("the LUKS data offset S = {0} is not a multiple of 8 sectors")]
    UnalignedShift(u64),
    #[error("the chunk ({k}) must be between 8 sectors and S = {s} sectors and a multiple of 8")]
    BadChunk { k: u64, s: u64 },
    #[error("{missing} more sectors are needed past the physical volume (have {have}, need {need})")]
    TooLittleTail { need: u64, have: u64, missing: u64 },
}

impl Geometry {
    /// Lay out a conversion of a device of `n` sectors whose first `l` sectors are encrypted
    /// behind a header of `s` sectors, moving `k` sectors per step.
    pub fn new(n: u64, l: u64, s: u64, k: u64, region: u64) -> Result<Geometry, GeometryError> {
        if l == 0 {
            return Err(GeometryError::Empty);
        }
        if !l.is_multiple_of(8) {
            return Err(GeometryError::Unaligned(l));
        }
        if s == 0 || !s.is_multiple_of(8) {
            return Err(GeometryError::UnalignedShift(s));
        }
        if k < 8 || k > s || !k.is_multiple_of(8) {
            return Err(GeometryError::BadChunk { k, s });
        }
        let e = align_down(n, 8);
        let reserved = 2 * JOURNAL_SLOT_SECTORS + HEADER_COPY_SECTORS + FENCE_SECTORS;
        if e < reserved {
            return Err(GeometryError::DeviceTooSmall);
        }
        let journal = journal_sector(n).expect("e >= reserved");
        let header_copy = journal - HEADER_COPY_SECTORS;
        let shadow = header_copy - FENCE_SECTORS;
        let need = s + Self::tail_reserve(n);
        let have = n.saturating_sub(l);
        if have < need {
            return Err(GeometryError::TooLittleTail { need, have, missing: need - have });
        }
        debug_assert!(s + l <= shadow);
        let region = region.clamp(8, k.max(8));
        Ok(Geometry {
            n,
            l,
            s,
            k,
            f: FENCE_SECTORS,
            region: prev_power_of_two(region),
            shadow,
            header_copy,
            header_copy_len: HEADER_COPY_SECTORS,
            journal,
        })
    }

    /// Sectors that luksify needs in the tail besides S: journal, header copy, shadow, and the
    /// sectors lost to aligning the end of the device down to 4 KiB.
    pub fn tail_reserve(n: u64) -> u64 {
        (n - align_down(n, 8)) + 2 * JOURNAL_SLOT_SECTORS + HEADER_COPY_SECTORS + FENCE_SECTORS
    }

    /// Sectors past the PV that a device of `n` sectors needs for a header of `s` sectors.
    pub fn tail_needed(n: u64, s: u64) -> u64 {
        s + Self::tail_reserve(n)
    }

    /// Journal slot `i` (0 = A, 1 = B) first sector.
    pub fn journal_slot(&self, i: usize) -> u64 {
        self.journal + i as u64 * JOURNAL_SLOT_SECTORS
    }

    /// Number of migration steps.
    pub fn steps(&self) -> u64 {
        self.l.div_ceil(self.k)
    }

    /// The chunk that is moved when the cursor is at `c` (c > 0): [m, c).
    /// The schedule counts from L down: chunk boundaries are L, L-k, L-2k, …, 0.
    pub fn chunk_below(&self, c: u64) -> (u64, u64) {
        assert!(c > 0 && c <= self.l, "cursor {c} out of (0, {}]", self.l);
        (c.saturating_sub(self.k), c)
    }

    /// Where the unmoved plaintext of sector `x` is while converting: the shadow for the
    /// fenced label sectors [0, F), in place for the rest.
    pub fn source_of(&self, x: u64) -> u64 {
        if x < self.f {
            self.shadow + x
        } else {
            x
        }
    }

    /// The end of the run of [x, b) whose source ([`Self::source_of`]) is contiguous: the
    /// fence boundary F, where the source changes from the shadow to the raw device, or b.
    pub fn source_run_end(&self, x: u64, b: u64) -> u64 {
        if x < self.f {
            self.f.min(b)
        } else {
            b
        }
    }

    /// Every chunk in the order they move: from the tail down to sector 0.
    pub fn schedule(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(self.steps() as usize);
        let mut c = self.l;
        while c > 0 {
            let (m, _) = self.chunk_below(c);
            out.push((m, c));
            c = m;
        }
        out
    }

    /// Region size for a mirror segment of `len` sectors: the plan's region, but never more
    /// than the segment (dm-mirror refuses a region larger than the target).
    pub fn region_for(&self, len: u64) -> u64 {
        region_within(self.region, len)
    }
}

/// Sectors past the PV that a LUKS2 conversion of a device of `n` sectors needs for a data
/// offset of `s` sectors, now that it keeps cryptsetup's own on-disk format mid-way (a LUKS2
/// reencryption in progress, `online-reencrypt-v2`, datashift with a moved first segment, as
/// `cryptsetup reencrypt --encrypt --reduce-device-size 2S` writes it): the data shifts by S
/// behind the header at [0, S), and the first S plaintext sectors are copied to the moved
/// segment [L+S, L+2S), so 2S past the PV, plus the sectors lost to aligning the end of the
/// device down to 4 KiB, plus the 4 KiB of luksify's cut-over record in the device's last
/// aligned 4 KiB past the moved segment (it exists only while the cut-over writes the header;
/// `core::cutover`). LUKS2 keeps no luksify journal, header copy or shadow in the tail.
///
/// Never less than [`Geometry::tail_needed`]: the engine still lays out its in-memory
/// [`Geometry`] with [`Geometry::new`], which must accept every tail this accepts (the two
/// differ only for S below the journal's reserve, about 1 MiB).
pub fn standard_tail_needed(n: u64, s: u64) -> u64 {
    (2 * s + CUT_OVER_RECORD_SECTORS + (n - align_down(n, 8))).max(Geometry::tail_needed(n, s))
}

/// A region of at most `region` sectors for a mirror segment of `len` sectors: a power of
/// two, never more than the segment (dm-mirror refuses that), at least 8.
pub fn region_within(region: u64, len: u64) -> u64 {
    prev_power_of_two(region.min(len.max(8)))
}

/// Largest power of two <= x (x >= 1).
pub fn prev_power_of_two(x: u64) -> u64 {
    assert!(x >= 1);
    1u64 << (63 - x.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(n: u64, l: u64, s: u64, k: u64) -> Geometry {
        Geometry::new(n, l, s, k, 1024).unwrap()
    }

    #[test]
    fn tail_layout_is_disjoint_and_in_the_tail() {
        for n in [600_000u64, 600_001, 600_007, 600_008] {
            let geo = g(n, 500_000, 32768, 32768);
            assert!(geo.s + geo.l <= geo.shadow);
            assert_eq!(geo.shadow + geo.f, geo.header_copy);
            assert_eq!(geo.header_copy + geo.header_copy_len, geo.journal);
            assert_eq!(geo.journal_slot(1) + JOURNAL_SLOT_SECTORS, align_down(n, 8));
            assert!(geo.journal_slot(1) + JOURNAL_SLOT_SECTORS <= n);
            assert_eq!(geo.journal % 8, 0);
        }
    }

    #[test]
    fn smallest_tail_is_accepted_and_one_less_refused() {
        for (l, s) in [(1_000_000u64, 4096u64), (1_000_000, 32768), (8, 8)] {
            let n_min = (l..l + s + 10_000).find(|&n| Geometry::new(n, l, s, s, 1024).is_ok()).unwrap();
            assert_eq!(n_min - l, Geometry::tail_needed(n_min, s));
            match Geometry::new(n_min - 1, l, s, s, 1024) {
                Err(GeometryError::TooLittleTail { missing, .. }) => assert!(missing >= 1),
                other => panic!("expected TooLittleTail, got {other:?}"),
            }
        }
    }

    #[test]
    fn standard_tail_is_two_headers_and_never_less_than_the_geometry_needs() {
        // LUKS2's default 16 MiB: 2S, the cut-over record's 4 KiB, plus what aligning the
        // end down to 4 KiB loses.
        assert_eq!(standard_tail_needed(600_000, 32768), 65544);
        assert_eq!(standard_tail_needed(600_003, 32768), 65547);
        // More than luksify's own tail (S + journal, header copy, shadow) for any real S.
        assert!(standard_tail_needed(600_000, 32768) > Geometry::tail_needed(600_000, 32768));
        // A tiny S: the geometry's reserve decides, so Geometry::new accepts the tail.
        for (n, s) in [(600_000u64, 8u64), (600_005, 1024), (600_000, 2048), (600_001, 4096)] {
            let need = standard_tail_needed(n, s);
            assert_eq!(need, (2 * s + 8 + n % 8).max(Geometry::tail_needed(n, s)));
            let rec = crate::core::cutover::record_sector(n).unwrap();
            assert!(n - need + 2 * s <= rec, "{n} {s}: the record overlaps the moved segment");
            assert!(Geometry::new(n, n - need, s, s, 1024).is_ok(), "{n} {s}");
        }
    }

    #[test]
    fn schedule_edge_cases() {
        // L < k
        let geo = g(200_000, 16, 4096, 4096);
        assert_eq!(geo.schedule(), vec![(0, 16)]);
        // L = k
        let geo = g(200_000, 4096, 4096, 4096);
        assert_eq!(geo.schedule(), vec![(0, 4096)]);
        // L mod k != 0: the last step is the remainder, at the start of the device.
        let geo = g(200_000, 10_000, 4096, 4096);
        assert_eq!(geo.schedule(), vec![(5904, 10_000), (1808, 5904), (0, 1808)]);
        assert_eq!(geo.steps(), 3);
        // Chunks tile [0, L) exactly, each at most k, none empty.
        for l in [8u64, 4088, 4096, 4104, 65536, 99_992] {
            let geo = g(400_000, l, 4096, 1024);
            let sch = geo.schedule();
            assert_eq!(sch.first().unwrap().1, l);
            assert_eq!(sch.last().unwrap().0, 0);
            for w in sch.windows(2) {
                assert_eq!(w[0].0, w[1].1);
            }
            assert!(sch.iter().all(|(m, c)| c > m && c - m <= geo.k));
        }
    }

    #[test]
    fn destinations_never_overlap_unmoved_sources() {
        // The invariant that makes k <= S safe: when [m, c) is copied to [S+m, S+c),
        // the destination does not overlap any sector that still holds unmoved data [0, c).
        for (l, s, k) in [(100_000u64, 4096u64, 4096u64), (100_000, 4096, 1024), (8, 8, 8)] {
            let geo = g(l + s + 10_000, l, s, k);
            for (m, c) in geo.schedule() {
                assert!(s + m >= c, "dest [{}, {}) overlaps source [0, {c})", s + m, s + c);
                assert!(s + c <= geo.shadow);
            }
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(Geometry::new(100_000, 0, 4096, 4096, 8), Err(GeometryError::Empty));
        assert_eq!(Geometry::new(100_000, 1001, 4096, 4096, 8), Err(GeometryError::Unaligned(1001)));
        assert!(matches!(Geometry::new(100_000, 1000, 4096, 8192, 8), Err(GeometryError::BadChunk { .. })));
        assert!(matches!(Geometry::new(100_000, 1000, 4096, 4, 8), Err(GeometryError::BadChunk { .. })));
        assert_eq!(Geometry::new(100, 8, 8, 8, 8), Err(GeometryError::DeviceTooSmall));
    }

    #[test]
    fn region_never_exceeds_segment() {
        let geo = g(400_000, 100_000, 4096, 4096);
        assert_eq!(geo.region, 1024);
        assert_eq!(geo.region_for(4096), 1024);
        assert_eq!(geo.region_for(1000), 512);
        assert_eq!(geo.region_for(8), 8);
        assert_eq!(geo.region_for(3), 8);
    }
}
