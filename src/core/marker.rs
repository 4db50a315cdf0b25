//! The fence marker (written over the first 4 KiB of the raw partition while it is being
//! converted) and the LVM label reader used to check a device's identity. Pure.

use super::units::sector;

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
pub fn is_marker_sector(bytes: &[u8], i: usize, luks_uuid: &str, journal_sector: u64) -> bool {
    let m = encode(luks_uuid, journal_sector);
    bytes == &m[sector(i)]
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
        let lab = b.get(sector(s))?;
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

/// The first metadata area of the PV whose LVM2 label is in sectors 0..3 of `b`: (offset,
/// size) in bytes from the start of the PV (pv_header: UUID, device size, data areas and
/// metadata areas as `{offset, size}` lists each ended by a zero entry; little endian).
pub fn first_mda(b: &[u8]) -> Option<(u64, u64)> {
    let u64_at = |x: &[u8], o: usize| x.get(o..o + 8).map(|v| u64::from_le_bytes(v.try_into().unwrap()));
    for s in 0..4 {
        let lab = b.get(sector(s))?;
        if &lab[..8] != b"LABELONE" || &lab[24..32] != b"LVM2 001" {
            continue;
        }
        let off = u32::from_le_bytes(lab[20..24].try_into().unwrap()) as usize;
        // UUID (32) + device size (8), then the data areas, then the metadata areas.
        let mut o = off + 40;
        let mut list = 0;
        while o + 16 <= 512 {
            let (a, z) = (u64_at(lab, o)?, u64_at(lab, o + 8)?);
            o += 16;
            if a == 0 && z == 0 {
                list += 1;
                if list == 2 {
                    return None;
                }
                continue;
            }
            if list == 1 {
                return Some((a, z));
            }
        }
        return None;
    }
    None
}

/// Where the current metadata text lies in a metadata area whose first 512 bytes (the
/// mda_header: checksum, magic " LVM2 x[5A%r0N*>", version, start, size, then raw_locn
/// `{offset, size, checksum, flags}`) are `h`: pieces of (offset from the area's start,
/// length); two pieces when the text wraps around the circular buffer (it continues right
/// after the 512-byte header).
pub fn mda_text_pieces(h: &[u8]) -> Option<Vec<(u64, u64)>> {
    if h.len() < 64 || &h[4..20] != b" LVM2 x[5A%r0N*>" {
        return None;
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
    let (area, off, len) = (u64_at(32), u64_at(40), u64_at(48));
    if off == 0 || len == 0 || off >= area || len > area {
        return None;
    }
    if off + len <= area {
        Some(vec![(off, len)])
    } else {
        let first = area - off;
        Some(vec![(off, first), (512, len - first)])
    }
}

/// The VG name from LVM's text metadata, which starts `<vgname> {`.
pub fn vg_name_of_text(text: &[u8]) -> Option<String> {
    let t = std::str::from_utf8(&text[..text.len().min(512)]).ok().or_else(|| {
        let end = text.iter().position(|&c| c == b'{')?;
        std::str::from_utf8(&text[..end]).ok()
    })?;
    let (name, _) = t.split_once('{')?;
    let name = name.trim();
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b)))
        .then(|| name.to_string())
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
            assert!(is_marker_sector(&m[sector(i)], i, "0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", 123_456));
            assert!(!is_marker_sector(&[0u8; 512], i, "0b6c1e39-5d8b-4d4f-9a35-2f7e3c1d9a10", 123_456));
            assert!(m[sector(i)].iter().any(|&x| x != 0));
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

    fn label_with_mda(mda_off: u64, mda_size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 2048];
        let lab = &mut b[512..1024];
        lab[..8].copy_from_slice(b"LABELONE");
        lab[8..16].copy_from_slice(&1u64.to_le_bytes());
        lab[20..24].copy_from_slice(&32u32.to_le_bytes());
        lab[24..32].copy_from_slice(b"LVM2 001");
        lab[32..64].copy_from_slice(b"abcdefghijklmnopqrstuvwxyz012345");
        lab[64..72].copy_from_slice(&(100u64 << 20).to_le_bytes());
        // one data area {1 MiB, 0}, end; one metadata area, end
        lab[72..80].copy_from_slice(&(1u64 << 20).to_le_bytes());
        lab[104..112].copy_from_slice(&mda_off.to_le_bytes());
        lab[112..120].copy_from_slice(&mda_size.to_le_bytes());
        b
    }

    #[test]
    fn vg_name_from_label_mda_and_text() {
        let b = label_with_mda(4096, 1044480);
        assert_eq!(first_mda(&b), Some((4096, 1044480)));
        assert_eq!(pv_uuid(&b).unwrap(), "abcdef-ghij-klmn-opqr-stuv-wxyz-012345");
        assert_eq!(first_mda(&vec![0u8; 2048]), None);
        let mut h = vec![0u8; 512];
        h[4..20].copy_from_slice(b" LVM2 x[5A%r0N*>");
        h[32..40].copy_from_slice(&1044480u64.to_le_bytes());
        h[40..48].copy_from_slice(&5120u64.to_le_bytes());
        h[48..56].copy_from_slice(&1500u64.to_le_bytes());
        assert_eq!(mda_text_pieces(&h), Some(vec![(5120, 1500)]));
        // Wrapping around the circular buffer: the rest follows the header.
        h[40..48].copy_from_slice(&(1044480u64 - 1000).to_le_bytes());
        assert_eq!(mda_text_pieces(&h), Some(vec![(1044480 - 1000, 1000), (512, 500)]));
        h[5] = b'X';
        assert_eq!(mda_text_pieces(&h), None);
        assert_eq!(vg_name_of_text(b"vg0 {\nid = \"x\"\nseqno = 3\n").as_deref(), Some("vg0"));
        assert_eq!(vg_name_of_text(b"my-vg.2 {\n").as_deref(), Some("my-vg.2"));
        assert_eq!(vg_name_of_text(b"no brace here"), None);
        assert_eq!(vg_name_of_text(b"bad/name {"), None);
    }
}
