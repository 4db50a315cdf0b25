//! What a device shows of a conversion: the journal's record, or, when the journal is missing
//! or damaged, every other sign that a conversion was under way (luksify's fence marker over
//! the first sectors, a LUKS header already written, the LVM label still in place), so that a
//! damaged state is never reported as "no conversion in progress". Pure: it reads bytes the
//! caller read from the device.
//!
//! The marker wins over a missing journal: it is written before the first data moves and is
//! replaced only by the LUKS header at the finish, so a marker means data has moved.

use crate::core::journal::{self, JournalError, Record};
use crate::core::marker;
use serde::Serialize;

/// Bytes of the device's start the caller must read (the marker and the LVM label are there).
pub const HEAD_BYTES: usize = marker::MARKER_BYTES;

#[derive(Debug, Clone, PartialEq)]
pub enum Evidence {
    /// No journal and no sign of a conversion.
    Nothing,
    /// A readable journal (one slot may be torn: the other is the last commit).
    Journal(Record),
    /// Signs of a conversion, but no journal record that can be trusted.
    Damaged(Damage),
}

/// The fence marker found over the first sectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MarkerFacts {
    /// The sector (0..8) that held it intact.
    pub sector: u64,
    /// The LUKS UUID the conversion produces.
    pub luks_uuid: String,
    /// Where the marker says the journal is.
    pub journal_sector: u64,
}

/// What is known of a conversion whose journal cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// Where the device's size puts the journal (slot A; slot B follows 8 sectors later).
    pub journal_sector: u64,
    /// What slot A and slot B hold, in words.
    pub slots: [String; 2],
    /// luksify's fence marker, if one of the first 8 sectors holds it.
    pub marker: Option<MarkerFacts>,
    /// An LVM2 label is in the first sectors (the plaintext PV's start is still in place).
    pub pv_label: bool,
    /// A LUKS header starts at sector 0 (the conversion had written its header).
    pub luks_header: bool,
}

fn slot_words(r: &Result<Record, JournalError>) -> String {
    match r {
        Ok(rec) => format!("a valid record (seq {}, state {})", rec.seq, rec.state.name()),
        Err(JournalError::NoMagic) => "no journal (no luksify magic)".into(),
        Err(JournalError::Crc) => "a damaged record (checksum mismatch)".into(),
        Err(e) => format!("an unusable record ({e})"),
    }
}

fn find_marker(head: &[u8]) -> Option<MarkerFacts> {
    head.chunks(512).take(8).enumerate().find_map(|(i, s)| {
        let (luks_uuid, journal_sector) = marker::decode(s)?;
        Some(MarkerFacts { sector: i as u64, luks_uuid, journal_sector })
    })
}

/// Examine a device: `head` its first [`HEAD_BYTES`], `a` and `b` its two journal slots, read
/// at `journal_sector` (slot A) as the device's size places them.
pub fn examine(head: &[u8], a: &[u8], b: &[u8], journal_sector: u64) -> Evidence {
    let chosen = journal::choose(a, b);
    let marker = find_marker(head);
    match chosen {
        Ok(Some(r)) => Evidence::Journal(r),
        Ok(None) if marker.is_none() => Evidence::Nothing,
        Ok(None) | Err(_) => Evidence::Damaged(Damage {
            journal_sector,
            slots: [slot_words(&journal::Record::decode(a)), slot_words(&journal::Record::decode(b))],
            marker,
            pv_label: marker::pv_uuid(head).is_some(),
            luks_header: head.starts_with(b"LUKS\xba\xbe"),
        }),
    }
}

impl Damage {
    /// Whether neither slot has the journal's magic (as opposed to damaged records).
    pub fn journal_missing(&self) -> bool {
        self.slots.iter().all(|s| s.starts_with("no journal"))
    }

    /// One line for the user: what is known, what is safe, how to recover where a way exists.
    pub fn message(&self, device: &str) -> String {
        let j = self.journal_sector;
        let what = if self.journal_missing() { "missing" } else { "damaged" };
        let slots =
            format!("slot A (sector {j}) holds {}, slot B (sector {}) holds {}", self.slots[0], j + 8, self.slots[1]);
        let keep = format!("keep the disk as it is and report with `luksify status --json {device}`");
        let dont = format!("do not write to {device} (no pvcreate, mkfs, fsck, partitioning or luksFormat)");
        match (&self.marker, self.luks_header, self.pv_label) {
            (Some(m), _, _) => {
                let moved = if m.journal_sector != j {
                    format!(
                        " (the marker puts the journal at sector {}, the device's size at {j}: is this the same partition, at the same size?)",
                        m.journal_sector
                    )
                } else {
                    String::new()
                };
                format!(
                    "{device}: a luksify conversion is in progress (luksify's fence marker is in sector {} of the device, for LUKS UUID {}), but its journal is {what}: {slots}{moved}. Part of the data has moved, and LVM cannot see it on the raw device: {dont}; luksify cannot resume without its journal: {keep}",
                    m.sector, m.luks_uuid
                )
            }
            (None, true, _) => format!(
                "{device}: a luksify journal is at sector {j} but it is {what}: {slots}. The LUKS header is already on the device, which luksify writes only once every sector has moved: `cryptsetup open {device} NAME` should open it; {dont} until it does, else {keep}"
            ),
            (None, false, true) => format!(
                "{device}: a luksify journal is at sector {j} but it is {what}: {slots}. The LVM label is still in place and luksify's fence marker is not there, so no data had moved yet; {dont}: {keep}"
            ),
            (None, false, false) => format!(
                "{device}: a luksify journal is at sector {j} but it is {what}: {slots}; neither the LVM label, nor luksify's fence marker, nor a LUKS header is in the first sectors, so how far the conversion got cannot be told: {dont}; {keep}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::journal::{State, SLOT_BYTES};

    fn record(seq: u64, state: State) -> [u8; SLOT_BYTES] {
        journal::tests::sample(seq, state).encode().unwrap()
    }

    const J: u64 = 599_984;

    #[test]
    fn a_readable_journal_is_the_answer_whatever_the_head_shows() {
        let m = marker::encode("0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", J);
        let a = record(7, State::Migrating { cursor: 1000 });
        let mut b = record(8, State::Migrating { cursor: 900 });
        b[200] ^= 1; // the newer slot torn: the older is the last commit
        match examine(&m, &a, &b, J) {
            Evidence::Journal(r) => assert_eq!(r.seq, 7),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn no_journal_and_no_marker_is_no_conversion() {
        let z = [0u8; SLOT_BYTES];
        assert_eq!(examine(&[0u8; HEAD_BYTES], &z, &z, J), Evidence::Nothing);
    }

    #[test]
    fn a_marker_without_a_journal_is_a_damaged_conversion_not_none() {
        let z = [0u8; SLOT_BYTES];
        let m = marker::encode("0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", J);
        let Evidence::Damaged(d) = examine(&m, &z, &z, J) else {
            panic!("zeroed journal under a marker must be damage")
        };
        assert!(d.journal_missing());
        assert_eq!(d.marker.as_ref().unwrap().journal_sector, J);
        let msg = d.message("/dev/sda5");
        assert!(msg.contains("a luksify conversion is in progress"), "{msg}");
        assert!(msg.contains("journal is missing"), "{msg}");
        assert!(msg.contains("do not write to /dev/sda5"), "{msg}");
        assert!(msg.contains("luksify status --json /dev/sda5"), "{msg}");
        assert!(!msg.contains("luksify resume"), "no hint that cannot work: {msg}");
        // only sector 3 of the marker survived (the others overwritten): still found
        let mut torn = vec![0u8; HEAD_BYTES];
        torn[1536..2048].copy_from_slice(&m[1536..2048]);
        let Evidence::Damaged(d) = examine(&torn, &z, &z, J) else { panic!() };
        assert_eq!(d.marker.unwrap().sector, 3);
    }

    #[test]
    fn both_slots_corrupt_is_damage_with_what_each_holds() {
        let m = marker::encode("0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", J + 8);
        let mut a = record(7, State::Migrating { cursor: 1000 });
        let mut b = record(8, State::Migrating { cursor: 900 });
        a[40] ^= 4;
        b[40] ^= 4;
        let Evidence::Damaged(d) = examine(&m, &a, &b, J) else { panic!() };
        assert!(!d.journal_missing());
        let msg = d.message("/dev/sda5");
        assert!(msg.contains("journal is damaged"), "{msg}");
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(msg.contains("is this the same partition"), "a marker naming another journal sector is said: {msg}");
    }

    #[test]
    fn without_a_marker_the_head_says_how_far_it_got() {
        let mut a = record(7, State::Bridged);
        let mut b = record(8, State::Bridged);
        a[40] ^= 4;
        b[40] ^= 4;
        // the LVM label still in place: nothing moved yet
        let mut head = vec![0u8; HEAD_BYTES];
        head[512..520].copy_from_slice(b"LABELONE");
        head[512 + 20..512 + 24].copy_from_slice(&32u32.to_le_bytes());
        head[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        head[512 + 32..512 + 64].copy_from_slice(b"abcdefghijklmnopqrstuvwxyz012345");
        let Evidence::Damaged(d) = examine(&head, &a, &b, J) else { panic!() };
        assert!(d.pv_label && d.marker.is_none());
        assert!(d.message("/dev/x").contains("no data had moved yet"));
        // a LUKS header written
        let mut head = vec![0u8; HEAD_BYTES];
        head[..6].copy_from_slice(b"LUKS\xba\xbe");
        let Evidence::Damaged(d) = examine(&head, &a, &b, J) else { panic!() };
        assert!(d.message("/dev/x").contains("cryptsetup open /dev/x"));
        // nothing recognisable
        let Evidence::Damaged(d) = examine(&[0u8; HEAD_BYTES], &a, &b, J) else { panic!() };
        assert!(d.message("/dev/x").contains("cannot be told"));
    }
}
