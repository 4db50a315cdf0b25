//! LUKS2: the cut-over record, and what a device found after a crash during the cut-over
//! is (journal-format.md, "LUKS2", "The cut-over record").
//!
//! While the cut-over overwrites [0, S) with the LUKS2 header, the device is briefly neither
//! a PV nor a LUKS2 device: the plaintext of [0, S) is only in the moved segment
//! [L+S, L+2S). The record, written and flushed before anything in [0, S) changes, is what
//! finds it again without the LVM metadata: it sits in the device's last 4 KiB (4 KiB
//! aligned, like LUKS1's journal slot B) and holds L, S, the header's length and the
//! SHA-256 of the moved sectors. It exists only during the cut-over: the cut-over erases it
//! once the header is durable and the rest of the header area is zeroed; a rollback erases
//! it once the plaintext is back.
//!
//! Pure: bytes in, bytes or decisions out.

use super::geometry::align_down;
use sha2::{Digest, Sha256};

/// Bytes of the record (one 4 KiB block).
pub const RECORD_BYTES: usize = 4096;
/// Sectors of the record.
pub const RECORD_SECTORS: u64 = 8;
/// Magic at byte 0.
pub const MAGIC: &[u8; 8] = b"LUKSIFYC";
/// Format version of the record.
pub const VERSION: u32 = 1;
/// Bytes of the record that carry fields (the rest up to the checksum is zero).
const USED: usize = 144;
/// Where the checksum (SHA-256 of bytes [0, CSUM_AT)) is.
const CSUM_AT: usize = RECORD_BYTES - 32;
/// The LVM label's magic, in one of the first four sectors of a PV.
pub const LVM_LABEL: &[u8; 8] = b"LABELONE";
/// The sectors LVM searches for its label.
pub const LABEL_SECTORS: usize = 4;

/// Where the record of a device of `n` sectors is: its last 4 KiB, 4 KiB aligned. None if
/// the device is smaller than that.
pub fn record_sector(n: u64) -> Option<u64> {
    align_down(n, 8).checked_sub(RECORD_SECTORS)
}

/// What the cut-over record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutRecord {
    /// Device size in sectors (the record's own position follows from it).
    pub n: u64,
    /// The PV's end, L.
    pub l: u64,
    /// The data offset S: [0, S) was copied to [L+S, L+2S).
    pub s: u64,
    /// Bytes of the LUKS2 header written over [0, H) (H; [H, S) is zeroed after).
    pub header_len: u64,
    /// SHA-256 of the S sectors copied to [L+S, L+2S).
    pub moved_sha256: [u8; 32],
    /// The LVM PV UUID (for the messages).
    pub pv_uuid: String,
}

/// Why bytes with the record's magic are not a usable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the cut-over record's checksum does not match")]
    Checksum,
    #[error("the cut-over record has version {0}, which this luksify does not know")]
    Version(u32),
    #[error("the cut-over record describes an impossible layout: {0}")]
    Layout(String),
}

impl CutRecord {
    /// The record's 4096 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; RECORD_BYTES];
        self.encode_into(&mut b);
        b
    }

    /// [`CutRecord::encode`] into `b` (4096 bytes; allocates nothing).
    pub fn encode_into(&self, b: &mut [u8]) {
        assert_eq!(b.len(), RECORD_BYTES);
        b.fill(0);
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(USED as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.n.to_le_bytes());
        b[24..32].copy_from_slice(&self.l.to_le_bytes());
        b[32..40].copy_from_slice(&self.s.to_le_bytes());
        b[40..48].copy_from_slice(&self.header_len.to_le_bytes());
        b[48..80].copy_from_slice(&self.moved_sha256);
        let u = self.pv_uuid.as_bytes();
        let u = &u[..u.len().min(63)];
        b[80..80 + u.len()].copy_from_slice(u);
        let c = Sha256::digest(&b[..CSUM_AT]);
        b[CSUM_AT..].copy_from_slice(&c);
    }

    /// Read a record for a device of `n` sectors. `Ok(None)`: no record (no magic).
    pub fn decode(b: &[u8], n: u64) -> Result<Option<CutRecord>, RecordError> {
        if b.len() < RECORD_BYTES || &b[..8] != MAGIC {
            return Ok(None);
        }
        let b = &b[..RECORD_BYTES];
        if Sha256::digest(&b[..CSUM_AT])[..] != b[CSUM_AT..] {
            return Err(RecordError::Checksum);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if u32_at(8) != VERSION {
            return Err(RecordError::Version(u32_at(8)));
        }
        let bad = |m: String| Err(RecordError::Layout(m));
        if u32_at(12) as usize != USED || b[USED..CSUM_AT].iter().any(|&x| x != 0) {
            return bad("unknown fields".into());
        }
        let (rn, l, s, h) = (u64_at(16), u64_at(24), u64_at(32), u64_at(40));
        if rn != n {
            return bad(format!("it is for a device of {rn} sectors, this one has {n}"));
        }
        let end = record_sector(n).unwrap_or(0);
        if s == 0 || !s.is_multiple_of(8) || l < s || l.checked_add(2 * s).is_none_or(|e| e > end) {
            return bad(format!("L {l} S {s} on a device of {n} sectors"));
        }
        if h < 4096 || !h.is_multiple_of(4096) || h > s * 512 {
            return bad(format!("a header of {h} bytes for S = {s}"));
        }
        let uuid = &b[80..144];
        let len = uuid.iter().position(|&x| x == 0).unwrap_or(64);
        if len == 64 || uuid[len..].iter().any(|&x| x != 0) {
            return bad("the PV UUID is not NUL-terminated".into());
        }
        let pv_uuid = String::from_utf8(uuid[..len].to_vec()).map_err(|_| RecordError::Layout("PV UUID".into()))?;
        Ok(Some(CutRecord { n, l, s, header_len: h, moved_sha256: b[48..80].try_into().unwrap(), pv_uuid }))
    }

    /// The moved segment's first sector, L + S.
    pub fn moved_at(&self) -> u64 {
        self.l + self.s
    }
}

/// SHA-256 of `data` (the moved sectors).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// [`sha256`] of data that may still change, computed ahead: the hash's state is kept every
/// `every` bytes, so that once part of the data changed, the sum is finished from the last
/// kept state before the first changed byte ([`EarlySum::finish`]) instead of from the
/// start. (The cut-over computes the record's checksum of its early copy of the first S
/// live, and under the suspend only what a live write changed since is hashed again.)
#[derive(Clone)]
pub struct EarlySum {
    /// `states[k]`: the hash after `data[..k * every]`; the last one after all of it.
    states: Vec<Sha256>,
    every: usize,
    len: usize,
}

impl EarlySum {
    pub fn of(data: &[u8], every: usize) -> EarlySum {
        let every = every.max(1);
        let mut states = Vec::with_capacity(data.len() / every + 2);
        let mut h = Sha256::new();
        states.push(h.clone());
        for c in data.chunks(every) {
            h.update(c);
            states.push(h.clone());
        }
        EarlySum { states, every, len: data.len() }
    }

    /// The sum of `data` (the same length as what [`EarlySum::of`] hashed), whose bytes
    /// before `first_changed` are the ones hashed then. Allocates nothing.
    pub fn finish(&self, data: &[u8], first_changed: usize) -> [u8; 32] {
        assert_eq!(data.len(), self.len, "the data's length changed");
        let k = (first_changed.min(self.len) / self.every).min(self.states.len() - 1);
        let mut h = self.states[k].clone();
        h.update(&data[(k * self.every).min(self.len)..]);
        h.finalize().into()
    }
}

/// Which of the first [`LABEL_SECTORS`] sectors of `head` carry the LVM label's magic.
pub fn label_sectors(head: &[u8]) -> Vec<usize> {
    (0..LABEL_SECTORS).filter(|&i| head.len() >= (i + 1) * 512 && &head[i * 512..i * 512 + 8] == LVM_LABEL).collect()
}

/// What the first sectors and the record say, before the moved segment is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// No record, or the LVM label is in place: nothing of [0, S) was overwritten (the fence,
    /// the label's removal, is flushed before anything else there, and a rollback writes the
    /// label last). `stale`: a record (valid or not) is left in the tail and may be erased.
    PlainPv { stale: bool },
    /// The primary LUKS2 header verifies: the cut-over is complete on disk (a standard
    /// reencryption in progress). `record`: a valid record left behind ([H, S) may still hold
    /// plaintext: zero it, then erase the record); `leftover`: the record area holds
    /// something of a record (valid or torn) to erase.
    Luks2 { record: Option<CutRecord>, leftover: bool },
    /// Neither the label nor a valid primary header, and a valid record: the cut-over was
    /// interrupted inside its window; the moved segment must be checked against the record,
    /// then copied back ([`Decision::RollBack`]).
    Window(CutRecord),
    /// Nothing of luksify's cut-over: whatever else it is (a journal, LUKS, a damaged header)
    /// is for the other paths to say.
    Other,
}

/// The decision from the first sectors: `head_is_luks2_primary` says whether luks2meta
/// verified the primary LUKS2 header at sector 0; `record` is the record area's bytes
/// decoded (`Err`: magic with a bad checksum or fields).
pub fn classify(head: &[u8], head_is_luks2_primary: bool, record: &Result<Option<CutRecord>, RecordError>) -> Finding {
    let has_record = !matches!(record, Ok(None));
    if !label_sectors(head).is_empty() {
        return if has_record { Finding::PlainPv { stale: true } } else { Finding::Other };
    }
    if head_is_luks2_primary {
        return Finding::Luks2 { record: record.clone().ok().flatten(), leftover: has_record };
    }
    match record {
        Ok(Some(r)) => Finding::Window(r.clone()),
        _ => Finding::Other,
    }
}

/// What a recovery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing of the cut-over's (or only a stale record, now erased): carry on as before.
    Nothing,
    /// The device is the plain PV; a stale record was erased.
    ErasedStale,
    /// The device is a LUKS2 reencryption in progress; the cut-over's leftovers (plaintext
    /// behind the header, the record) were cleaned up if any.
    Luks2 { cleaned: bool },
    /// The cut-over was rolled back: the device is the plain PV again.
    RolledBack,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_early_sum_finished_from_the_first_change_is_the_sum_of_the_changed_data() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for every in [1usize, 512, 1000, 4096, 10_000, 20_000] {
            let e = EarlySum::of(&data, every);
            assert_eq!(e.finish(&data, data.len()), sha256(&data), "every {every}, unchanged");
            assert_eq!(e.finish(&data, 0), sha256(&data));
            for at in [0usize, 1, 511, 512, 4095, 4096, 5000, 9_999] {
                let mut d = data.clone();
                d[at] ^= 0x5a;
                d[9_999] ^= 1;
                assert_eq!(e.finish(&d, at), sha256(&d), "every {every}, changed at {at}");
                // (told a later first change than the real one: the sum is wrong)
                if at / every < 9_999 / every {
                    assert_ne!(e.finish(&d, 9_999), sha256(&d), "every {every}, changed at {at}");
                }
            }
        }
    }

    fn rec() -> CutRecord {
        CutRecord {
            n: 100_003,
            l: 30_000,
            s: 2048,
            header_len: 299_008 / 4096 * 4096,
            moved_sha256: [7; 32],
            pv_uuid: "Ab12Cd-34Ef".into(),
        }
    }

    #[test]
    fn a_record_round_trips_and_sits_in_the_last_aligned_4k() {
        let r = rec();
        let b = r.encode();
        assert_eq!(b.len(), 4096);
        assert_eq!(CutRecord::decode(&b, r.n), Ok(Some(r.clone())));
        assert_eq!(record_sector(100_003), Some(100_000 - 8));
        assert_eq!(record_sector(7), None);
        assert_eq!(CutRecord::decode(&[0u8; 4096], r.n), Ok(None));
    }

    #[test]
    fn a_damaged_or_foreign_record_is_refused() {
        let r = rec();
        let mut b = r.encode();
        b[30] ^= 1;
        assert_eq!(CutRecord::decode(&b, r.n), Err(RecordError::Checksum));
        assert!(matches!(CutRecord::decode(&r.encode(), r.n + 8), Err(RecordError::Layout(_))));
        let mut big = r.clone();
        big.s = 40_000;
        assert!(matches!(CutRecord::decode(&big.encode(), r.n), Err(RecordError::Layout(_))));
    }

    #[test]
    fn the_label_wins_then_the_primary_header_then_the_record() {
        let mut head = vec![0u8; 4096];
        let r = Ok(Some(rec()));
        assert_eq!(classify(&head, false, &r), Finding::Window(rec()));
        assert_eq!(classify(&head, true, &r), Finding::Luks2 { record: Some(rec()), leftover: true });
        assert_eq!(classify(&head, true, &Err(RecordError::Checksum)), Finding::Luks2 { record: None, leftover: true });
        assert_eq!(classify(&head, false, &Ok(None)), Finding::Other);
        assert_eq!(classify(&head, false, &Err(RecordError::Checksum)), Finding::Other);
        head[512..520].copy_from_slice(LVM_LABEL);
        assert_eq!(label_sectors(&head), vec![1]);
        assert_eq!(classify(&head, false, &r), Finding::PlainPv { stale: true });
        assert_eq!(classify(&head, false, &Err(RecordError::Checksum)), Finding::PlainPv { stale: true });
        assert_eq!(classify(&head, false, &Ok(None)), Finding::Other);
    }
}
