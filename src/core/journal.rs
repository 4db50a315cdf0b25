//! The on-disk journal: two 4 KiB slots in the last 8 KiB of the device, written
//! alternately, each with a sequence number and a CRC32; the newest valid slot wins.
//! The byte layout is specified in `journal-format.md` (version 1); keep them in step.

use super::geometry::Geometry;
use super::units::Sectors;
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"LUKSIFYJ";
pub const VERSION: u32 = 1;
pub const SLOT_BYTES: usize = 4096;
/// The CRC covers [0, CRC_AT); the CRC itself is stored little-endian at CRC_AT.
pub const CRC_AT: usize = SLOT_BYTES - 4;

/// What has been done, durably. Each state has exactly one recovery action
/// (see [`super::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Journal and header copy written in the tail; nothing else on the device changed.
    Prepared,
    /// Bridge and staging devices made, LVs rerouted; the device is unchanged below S+L.
    Bridged,
    /// Fence in place (shadow valid; marker on [0, F) of the raw device); [cursor, L) moved.
    Migrating { cursor: u64 },
    /// Pure crypt table loaded, LUKS header written at [0, S) and flushed.
    HeaderWritten,
}

impl State {
    fn code(&self) -> (u32, u64) {
        match *self {
            State::Prepared => (1, 0),
            State::Bridged => (2, 0),
            State::Migrating { cursor } => (3, cursor),
            State::HeaderWritten => (4, 0),
        }
    }

    fn from_code(code: u32, cursor: u64) -> Option<State> {
        Some(match code {
            1 => State::Prepared,
            2 => State::Bridged,
            3 => State::Migrating { cursor },
            4 => State::HeaderWritten,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            State::Prepared => "prepared",
            State::Bridged => "bridged",
            State::Migrating { .. } => "migrating",
            State::HeaderWritten => "header-written",
        }
    }
}

/// Everything a resume needs, besides the passphrase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub state: State,
    pub geometry: Geometry,
    /// 1 or 2.
    pub luks_version: u8,
    /// LUKS UUID (with dashes), the final device's.
    pub luks_uuid: String,
    /// e.g. "aes-xts-plain64".
    pub cipher: String,
    /// Volume key length in bytes.
    pub key_bytes: u32,
    pub allow_discards: bool,
    /// Name of the bridge (the final mapping), e.g. "sda5_crypt".
    pub name: String,
    /// Identity of the device: LVM PV UUID (or empty if none).
    pub pv_uuid: String,
    /// Bytes of the header copy actually used, and their CRC32.
    pub header_len: u32,
    pub header_crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("journal slot has no luksify magic")]
    NoMagic,
    #[error("journal slot has version {0}, this luksify reads version {VERSION}")]
    Version(u32),
    #[error("journal slot checksum mismatch (torn or corrupt write)")]
    Crc,
    #[error("journal slot field is invalid: {0}")]
    Field(&'static str),
    #[error("both journal slots are corrupt: refusing to guess ({0}; {1})")]
    BothCorrupt(Box<JournalError>, Box<JournalError>),
}

// Field offsets (see journal-format.md).
const O_MAGIC: usize = 0;
const O_VERSION: usize = 8;
const O_SEQ: usize = 16;
const O_STATE: usize = 24;
const O_FLAGS: usize = 28;
const O_CURSOR: usize = 32;
const O_N: usize = 40;
const O_L: usize = 48;
const O_S: usize = 56;
const O_K: usize = 64;
const O_F: usize = 72;
const O_REGION: usize = 80;
const O_SHADOW: usize = 88;
const O_HDR_COPY: usize = 96;
const O_HDR_COPY_LEN: usize = 104;
const O_JOURNAL: usize = 112;
const O_HDR_LEN: usize = 120;
const O_HDR_CRC: usize = 124;
const O_LUKS_VERSION: usize = 128;
const O_KEY_BYTES: usize = 132;
const O_UUID: usize = 136; // 48 bytes, ASCII, NUL-padded
const O_CIPHER: usize = 184; // 64 bytes
const O_NAME: usize = 248; // 128 bytes
const O_PV_UUID: usize = 376; // 64 bytes
const O_END: usize = 440;

const FLAG_DISCARDS: u32 = 1;

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put_str(b: &mut [u8], at: usize, len: usize, s: &str) -> Result<(), JournalError> {
    let bytes = s.as_bytes();
    if bytes.len() >= len || bytes.contains(&0) {
        return Err(JournalError::Field("string too long"));
    }
    b[at..at + bytes.len()].copy_from_slice(bytes);
    Ok(())
}
fn get_str(b: &[u8], at: usize, len: usize) -> Result<String, JournalError> {
    let f = &b[at..at + len];
    let end = f.iter().position(|&c| c == 0).ok_or(JournalError::Field("string not terminated"))?;
    if f[end..].iter().any(|&c| c != 0) {
        return Err(JournalError::Field("string padding not zero"));
    }
    String::from_utf8(f[..end].to_vec()).map_err(|_| JournalError::Field("string not UTF-8"))
}

impl Record {
    pub fn encode(&self) -> Result<[u8; SLOT_BYTES], JournalError> {
        let mut b = [0u8; SLOT_BYTES];
        let g = &self.geometry;
        b[O_MAGIC..O_MAGIC + 8].copy_from_slice(MAGIC);
        put_u32(&mut b, O_VERSION, VERSION);
        put_u32(&mut b, O_VERSION + 4, O_END as u32);
        put_u64(&mut b, O_SEQ, self.seq);
        let (code, cursor) = self.state.code();
        put_u32(&mut b, O_STATE, code);
        put_u32(&mut b, O_FLAGS, if self.allow_discards { FLAG_DISCARDS } else { 0 });
        put_u64(&mut b, O_CURSOR, cursor);
        put_u64(&mut b, O_N, g.n);
        put_u64(&mut b, O_L, g.l);
        put_u64(&mut b, O_S, g.s);
        put_u64(&mut b, O_K, g.k);
        put_u64(&mut b, O_F, g.f);
        put_u64(&mut b, O_REGION, g.region);
        put_u64(&mut b, O_SHADOW, g.shadow);
        put_u64(&mut b, O_HDR_COPY, g.header_copy);
        put_u64(&mut b, O_HDR_COPY_LEN, g.header_copy_len);
        put_u64(&mut b, O_JOURNAL, g.journal);
        put_u32(&mut b, O_HDR_LEN, self.header_len);
        put_u32(&mut b, O_HDR_CRC, self.header_crc);
        put_u32(&mut b, O_LUKS_VERSION, self.luks_version as u32);
        put_u32(&mut b, O_KEY_BYTES, self.key_bytes);
        put_str(&mut b, O_UUID, 48, &self.luks_uuid)?;
        put_str(&mut b, O_CIPHER, 64, &self.cipher)?;
        put_str(&mut b, O_NAME, 128, &self.name)?;
        put_str(&mut b, O_PV_UUID, 64, &self.pv_uuid)?;
        let crc = crc32fast::hash(&b[..CRC_AT]);
        put_u32(&mut b, CRC_AT, crc);
        Ok(b)
    }

    pub fn decode(b: &[u8]) -> Result<Record, JournalError> {
        if b.len() < SLOT_BYTES || &b[O_MAGIC..O_MAGIC + 8] != MAGIC {
            return Err(JournalError::NoMagic);
        }
        let version = get_u32(b, O_VERSION);
        if crc32fast::hash(&b[..CRC_AT]) != get_u32(b, CRC_AT) {
            return Err(JournalError::Crc);
        }
        if version != VERSION {
            return Err(JournalError::Version(version));
        }
        let state =
            State::from_code(get_u32(b, O_STATE), get_u64(b, O_CURSOR)).ok_or(JournalError::Field("unknown state"))?;
        let geometry = Geometry {
            n: get_u64(b, O_N),
            l: get_u64(b, O_L),
            s: get_u64(b, O_S),
            k: get_u64(b, O_K),
            f: get_u64(b, O_F),
            region: get_u64(b, O_REGION),
            shadow: get_u64(b, O_SHADOW),
            header_copy: get_u64(b, O_HDR_COPY),
            header_copy_len: get_u64(b, O_HDR_COPY_LEN),
            journal: get_u64(b, O_JOURNAL),
        };
        // The geometry must be exactly what the planner would compute from its own inputs.
        let again = Geometry::new(geometry.n, geometry.l, geometry.s, geometry.k, geometry.region)
            .map_err(|_| JournalError::Field("geometry"))?;
        if again != geometry {
            return Err(JournalError::Field("geometry"));
        }
        if let State::Migrating { cursor } = state {
            if cursor > geometry.l {
                return Err(JournalError::Field("cursor beyond L"));
            }
        }
        let luks_version = get_u32(b, O_LUKS_VERSION);
        if luks_version != 1 && luks_version != 2 {
            return Err(JournalError::Field("luks version"));
        }
        let header_len = get_u32(b, O_HDR_LEN);
        if header_len as u64 > Sectors(geometry.header_copy_len).bytes() {
            return Err(JournalError::Field("header length"));
        }
        Ok(Record {
            seq: get_u64(b, O_SEQ),
            state,
            geometry,
            luks_version: luks_version as u8,
            luks_uuid: get_str(b, O_UUID, 48)?,
            cipher: get_str(b, O_CIPHER, 64)?,
            key_bytes: get_u32(b, O_KEY_BYTES),
            allow_discards: get_u32(b, O_FLAGS) & FLAG_DISCARDS != 0,
            name: get_str(b, O_NAME, 128)?,
            pv_uuid: get_str(b, O_PV_UUID, 64)?,
            header_len,
            header_crc: get_u32(b, O_HDR_CRC),
        })
    }
}

/// Pick the journal from the two slots: the valid one with the highest sequence number.
/// `Ok(None)`: no journal at all (neither slot has the magic).
/// A slot that has the magic but fails its CRC is ignored if the other is valid (a torn
/// write of the newer slot); if both carry the magic and neither is valid, refuse.
/// A valid CRC over invalid fields, or an unknown version, is never ignored.
pub fn choose(a: &[u8], b: &[u8]) -> Result<Option<Record>, JournalError> {
    match (Record::decode(a), Record::decode(b)) {
        (Ok(x), Ok(y)) => Ok(Some(if y.seq > x.seq { y } else { x })),
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(Some(x)),
        (Err(JournalError::NoMagic), Err(JournalError::NoMagic)) => Ok(None),
        // One slot torn, the other never written (or already cleared): this happens only
        // while the very first record is written (nothing but the tail has changed yet) or
        // while the last one is cleared (the conversion is complete). Both mean: no journal.
        (Err(JournalError::Crc), Err(JournalError::NoMagic)) | (Err(JournalError::NoMagic), Err(JournalError::Crc)) => {
            Ok(None)
        }
        (Err(e1), Err(e2)) => Err(JournalError::BothCorrupt(Box::new(e1), Box::new(e2))),
    }
}

/// The slot the record with sequence `seq` is written to: alternating, so the previous
/// committed record survives a torn write.
pub fn slot_for(seq: u64) -> usize {
    (seq % 2) as usize
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(seq: u64, state: State) -> Record {
        Record {
            seq,
            state,
            geometry: Geometry::new(600_000, 500_000, 32768, 32768, 1024).unwrap(),
            luks_version: 2,
            luks_uuid: "0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10".into(),
            cipher: "aes-xts-plain64".into(),
            key_bytes: 64,
            allow_discards: false,
            name: "sda5_crypt".into(),
            pv_uuid: "Ab12Cd-34Ef-56Gh-78Ij-90Kl-12Mn-34Op56".into(),
            header_len: 290_816,
            header_crc: 0xdead_beef,
        }
    }

    #[test]
    fn round_trip_every_state() {
        for st in [
            State::Prepared,
            State::Bridged,
            State::Migrating { cursor: 500_000 },
            State::Migrating { cursor: 0 },
            State::Migrating { cursor: 123_456 },
            State::HeaderWritten,
        ] {
            let r = sample(7, st);
            let b = r.encode().unwrap();
            assert_eq!(Record::decode(&b).unwrap(), r);
        }
        let mut r = sample(1, State::Bridged);
        r.allow_discards = true;
        r.luks_version = 1;
        assert_eq!(Record::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let b = sample(3, State::Migrating { cursor: 65536 }).encode().unwrap();
        for byte in (0..SLOT_BYTES).step_by(1) {
            for bit in [0u8, 3, 7] {
                let mut c = b;
                c[byte] ^= 1 << bit;
                assert!(Record::decode(&c).is_err(), "flip at byte {byte} bit {bit} accepted");
            }
        }
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_is_ignored() {
        let old = sample(4, State::Migrating { cursor: 100_000 }).encode().unwrap();
        let new = sample(5, State::Migrating { cursor: 67_232 }).encode().unwrap();
        assert_eq!(choose(&old, &new).unwrap().unwrap().seq, 5);
        assert_eq!(choose(&new, &old).unwrap().unwrap().seq, 5);
        // Torn write of the new slot: half new, half zero.
        let mut torn = new;
        torn[2048..].fill(0);
        assert_eq!(choose(&old, &torn).unwrap().unwrap().seq, 4);
        // No journal.
        let zero = [0u8; SLOT_BYTES];
        assert_eq!(choose(&zero, &zero).unwrap(), None);
        // A single valid slot.
        assert_eq!(choose(&zero, &old).unwrap().unwrap().seq, 4);
        // Both corrupt: a clear error.
        let mut bad = old;
        bad[100] ^= 1;
        assert!(matches!(choose(&bad, &torn), Err(JournalError::BothCorrupt(..))));
        // Torn first write (or torn final clear), other slot never written: no journal.
        assert_eq!(choose(&bad, &zero).unwrap(), None);
        assert_eq!(choose(&zero, &torn).unwrap(), None);
        // A journal from a newer luksify is never ignored.
        let mut v2 = old;
        v2[8] = 2;
        let crc = crc32fast::hash(&v2[..CRC_AT]);
        v2[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(Record::decode(&v2), Err(JournalError::Version(2))));
        assert!(choose(&v2, &zero).is_err());
    }

    #[test]
    fn slots_alternate() {
        assert_ne!(slot_for(10), slot_for(11));
        assert_eq!(slot_for(10), slot_for(12));
    }

    #[test]
    fn inconsistent_geometry_and_cursor_are_rejected() {
        let mut r = sample(1, State::Migrating { cursor: 500_008 });
        let b = r.encode().unwrap();
        assert!(matches!(Record::decode(&b), Err(JournalError::Field(_))));
        r.state = State::Bridged;
        r.geometry.shadow -= 8;
        let b = r.encode().unwrap();
        assert!(matches!(Record::decode(&b), Err(JournalError::Field("geometry"))));
    }

    #[test]
    fn layout_matches_the_documented_offsets() {
        // journal-format.md documents these offsets; a change here must change the doc.
        let b = sample(0x0102_0304_0506_0708, State::Migrating { cursor: 0x1111 }).encode().unwrap();
        assert_eq!(&b[0..8], b"LUKSIFYJ");
        assert_eq!(get_u32(&b, 8), 1);
        assert_eq!(get_u32(&b, 12), 440);
        assert_eq!(get_u64(&b, 16), 0x0102_0304_0506_0708);
        assert_eq!(get_u32(&b, 24), 3);
        assert_eq!(get_u64(&b, 32), 0x1111);
        assert_eq!(get_u64(&b, 40), 600_000);
        assert_eq!(&b[136..136 + 36], b"0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10");
        assert_eq!(&b[184..184 + 15], b"aes-xts-plain64");
        assert_eq!(&b[248..248 + 10], b"sda5_crypt");
        assert!(b[440..CRC_AT].iter().all(|&x| x == 0));
        assert_eq!(get_u32(&b, CRC_AT), crc32fast::hash(&b[..CRC_AT]));
    }
}
