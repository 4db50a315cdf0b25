//! The fence marker (written over the first 4 KiB of the raw partition while it is being
//! converted) and the LVM label reader used to check a device's identity. Pure.

/// Magic at byte 0 of the marker.
pub const FENCE_MAGIC: &[u8; 16] = b"LUKSIFY-FENCE-V1";
pub const MARKER_BYTES: usize = 4096;

/// The marker: in every one of its 512-byte sectors the magic, the LUKS UUID the conversion
/// will produce, the journal's sector and the sector's index, so that no sector of it is
/// zero and a torn write of it can be recognised sector by sector ([`is_marker_sector`]);
/// sector 0 also carries a sentence for whoever looks at the raw sectors.
pub fn encode(luks_uuid: &str, journal_sector: u64) -> Vec<u8> {
    let mut b = vec![0u8; MARKER_BYTES];
    for (i, s) in b.chunks_mut(512).enumerate() {
        s[..16].copy_from_slice(FENCE_MAGIC);
        let u = luks_uuid.as_bytes();
        let u = &u[..u.len().min(47)];
        s[16..16 + u.len()].copy_from_slice(u);
        s[64..72].copy_from_slice(&journal_sector.to_le_bytes());
        s[72..80].copy_from_slice(&(i as u64).to_le_bytes());
    }
    let text = b"\nThis partition is being encrypted in place by luksify. Do not use it.\n\
Boot rescue media with luksify and run: luksify resume <this partition>\n";
    b[128..128 + text.len()].copy_from_slice(text);
    b
}

/// Whether sector `i` of the raw device holds sector `i` of our marker (exactly).
pub fn is_marker_sector(sector: &[u8], i: usize, luks_uuid: &str, journal_sector: u64) -> bool {
    let m = encode(luks_uuid, journal_sector);
    sector == &m[i * 512..(i + 1) * 512]
}

/// If `b` (at least 4 KiB from sector 0) is a marker: (LUKS UUID, journal sector).
pub fn decode(b: &[u8]) -> Option<(String, u64)> {
    if b.len() < 72 || &b[..16] != FENCE_MAGIC {
        return None;
    }
    let end = b[16..64].iter().position(|&c| c == 0).unwrap_or(48);
    let uuid = String::from_utf8(b[16..16 + end].to_vec()).ok()?;
    Some((uuid, u64::from_le_bytes(b[64..72].try_into().unwrap())))
}

/// The PV UUID (LVM's dashed form) from an LVM2 label found in sectors 0..3 of `b`.
pub fn pv_uuid(b: &[u8]) -> Option<String> {
    for s in 0..4 {
        let lab = b.get(s * 512..(s + 1) * 512)?;
        if &lab[..8] == b"LABELONE" && &lab[24..32] == b"LVM2 001" {
            let off = u32::from_le_bytes(lab[20..24].try_into().unwrap()) as usize;
            let raw = lab.get(off..off + 32)?;
            let raw = std::str::from_utf8(raw).ok()?;
            let mut out = String::new();
            let mut i = 0;
            for (n, len) in [6usize, 4, 4, 4, 4, 4, 6].iter().enumerate() {
                if n > 0 {
                    out.push('-');
                }
                out.push_str(&raw[i..i + len]);
                i += len;
            }
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip_and_no_false_positive() {
        let m = encode("0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", 123_456);
        assert_eq!(m.len(), 4096);
        assert_eq!(decode(&m), Some(("0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10".into(), 123_456)));
        assert_eq!(decode(&[0u8; 4096]), None);
        // No LVM label, no LUKS magic in the marker.
        assert!(pv_uuid(&m).is_none());
        // Every sector is recognisable on its own, and none is all zeros.
        for i in 0..8 {
            assert!(is_marker_sector(&m[i * 512..(i + 1) * 512], i, "0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", 123_456));
            assert!(!is_marker_sector(&[0u8; 512], i, "0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", 123_456));
            assert!(m[i * 512..(i + 1) * 512].iter().any(|&x| x != 0));
        }
        assert_ne!(&m[..6], b"LUKS\xba\xbe");
    }

    #[test]
    fn pv_uuid_from_a_label() {
        let mut b = vec![0u8; 4096];
        let l = &mut b[512..1024];
        l[..8].copy_from_slice(b"LABELONE");
        l[8..16].copy_from_slice(&1u64.to_le_bytes());
        l[20..24].copy_from_slice(&32u32.to_le_bytes());
        l[24..32].copy_from_slice(b"LVM2 001");
        l[32..64].copy_from_slice(b"Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56");
        assert_eq!(pv_uuid(&b).as_deref(), Some("Ab12Cd-34Ef-56Gh-78Ij-90Kl-12Mn-34Op56"));
    }
}
