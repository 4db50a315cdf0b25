//! The recovery key (`--recovery-key`): the format `systemd-cryptenroll --recovery-key`
//! makes (systemd's src/shared/recovery-key.c), so that the two are interchangeable:
//! 32 random bytes, each written as two "modhex" characters (YubiKey's alphabet
//! `cbdefghijklnrtuv`: the nibble 0..15 indexes it, high nibble first), a `-` after every 8
//! characters (4 bytes): 8 groups of 8 characters, 71 in all. The key is the passphrase of
//! its keyslot exactly as printed (dashes included, lower case), as systemd enrolls it.
//!
//! Pure: the random bytes come from the caller (`adapters::luks::RecoveryKey::generate`
//! reads them with getrandom). The formatted text lives in a buffer sized once up front (no
//! reallocation leaves a copy behind) that is wiped on drop.

use zeroize::Zeroizing;

/// Random bytes in a recovery key (systemd's RECOVERY_KEY_MODHEX_RAW_LENGTH).
pub const RAW_BYTES: usize = 32;
/// Characters of the formatted key: 64 modhex characters and 7 dashes.
pub const FORMATTED_LEN: usize = RAW_BYTES * 2 + RAW_BYTES / 4 - 1;
/// systemd's modhex alphabet: index = nibble value.
pub const MODHEX: &[u8; 16] = b"cbdefghijklnrtuv";
/// PBKDF2 iterations of the recovery keyslot: systemd's `cryptsetup_set_minimal_pbkdf`
/// (the minimum libcryptsetup accepts, NIST SP 800-132's recommended minimum). The key has
/// 256 bits of entropy: no key stretching makes guessing it any harder.
pub const PBKDF2_ITERATIONS: u32 = 1000;
/// The hash systemd uses for that PBKDF2 (when luksify may choose; see `keyslot_hash`).
pub const SYSTEMD_HASH: &str = "sha512";
/// The LUKS2 token systemd-cryptenroll adds next to a recovery keyslot
/// (`systemd-cryptenroll --wipe-slot=recovery` finds the keyslot through it).
pub const TOKEN_TYPE: &str = "systemd-recovery";

/// The formatted key of `raw`: 71 characters, e.g. `cbdefghi-jklnrtuv-…` (never logged).
pub fn format(raw: &[u8; RAW_BYTES]) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(FORMATTED_LEN));
    for (i, b) in raw.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            s.push('-');
        }
        s.push(MODHEX[(b >> 4) as usize] as char);
        s.push(MODHEX[(b & 15) as usize] as char);
    }
    debug_assert_eq!(s.len(), FORMATTED_LEN);
    s
}

/// The PBKDF2 hash of the recovery keyslot. LUKS1: the header's hash (every LUKS1 keyslot
/// uses it). LUKS2 when GRUB must open the keyslots (/boot on the PV): the passphrase
/// keyslot's hash, so that GRUB needs no hash module the passphrase keyslot does not.
/// Otherwise systemd's choice, sha512.
pub fn keyslot_hash(luks1: bool, grub_opens: bool, passphrase_hash: &str) -> String {
    if luks1 || grub_opens {
        passphrase_hash.to_string()
    } else {
        SYSTEMD_HASH.to_string()
    }
}

/// The `systemd-recovery` token's JSON object for `keyslot`, as systemd-cryptenroll writes it
/// (`keyslots` holds the slot number as a string).
pub fn token_json(keyslot: u32) -> serde_json::Value {
    serde_json::json!({ "type": TOKEN_TYPE, "keyslots": [keyslot.to_string()] })
}

/// What the dry-run and the finish suggest for `device` (one line each, no key in them):
/// without `--recovery-key`, adding a recovery key (after the finish: systemd-cryptenroll's
/// for LUKS2, which writes the same format; `cryptsetup luksAddKey` for LUKS1, which
/// systemd-cryptenroll does not handle); on a machine with a TPM (`tpm`) and LUKS2,
/// systemd-cryptenroll's TPM2 enrollment. `after` = the conversion is done (the dry-run
/// suggests luksify's own flag instead).
pub fn suggestions(device: &str, luks1: bool, recovery_key: bool, tpm: bool, after: bool) -> Vec<String> {
    let mut v = Vec::new();
    if !recovery_key {
        v.push(match (after, luks1) {
            (false, _) => format!(
                "add --recovery-key: a second keyslot with a generated recovery key (systemd-cryptenroll's format), shown once, opens {device} if the passphrase is ever lost"
            ),
            (true, false) => format!(
                "a recovery key opens {device} if the passphrase is ever lost: `systemd-cryptenroll --recovery-key {device}` adds one"
            ),
            (true, true) => format!(
                "a second way in helps if the passphrase is ever lost: `cryptsetup luksAddKey {device}` adds another passphrase (systemd-cryptenroll's recovery keys need LUKS2)"
            ),
        });
    }
    if tpm && !luks1 {
        v.push(format!(
            "this machine has a TPM: `systemd-cryptenroll --tpm2-device=auto {device}`{} lets it unlock {device} at boot without the passphrase (crypttab option tpm2-device=auto; needs an initramfs with systemd-cryptsetup, such as dracut's)",
            if after { "" } else { " after the conversion" }
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_name_the_flag_then_the_tools() {
        let d = suggestions("/dev/sda5", false, false, false, false);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("--recovery-key"), "{d:?}");
        assert!(suggestions("/dev/sda5", false, true, false, false).is_empty());
        let a = suggestions("/dev/sda5", false, false, true, true);
        assert!(a[0].contains("systemd-cryptenroll --recovery-key /dev/sda5"), "{a:?}");
        assert!(a[1].contains("systemd-cryptenroll --tpm2-device=auto /dev/sda5"), "{a:?}");
        // LUKS1: systemd-cryptenroll does not apply
        let l1 = suggestions("/dev/sda5", true, false, true, true);
        assert_eq!(l1.len(), 1);
        assert!(l1[0].contains("cryptsetup luksAddKey /dev/sda5"), "{l1:?}");
        assert_eq!(suggestions("/dev/sda5", false, true, true, true).len(), 1);
    }

    #[test]
    fn length_groups_and_alphabet() {
        let k = format(&[0xa5; RAW_BYTES]);
        assert_eq!(k.len(), 71);
        assert_eq!(FORMATTED_LEN, 71);
        let groups: Vec<&str> = k.split('-').collect();
        assert_eq!(groups.len(), 8, "{groups:?}");
        assert!(groups.iter().all(|g| g.len() == 8));
        assert!(k.chars().all(|c| c == '-' || MODHEX.contains(&(c as u8))));
        assert!(!k.ends_with('-') && !k.starts_with('-'));
    }

    /// Known answer, by hand from systemd's table: nibble n -> "cbdefghijklnrtuv"[n],
    /// high nibble first, a dash after every 4 bytes.
    #[test]
    fn known_answer_matches_systemds_encoding() {
        let mut raw = [0u8; RAW_BYTES];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = i as u8;
        }
        raw[4] = 0x0f;
        raw[5] = 0xf0;
        raw[6] = 0x9a;
        raw[7] = 0xbc;
        raw[31] = 0xff;
        let k = format(&raw);
        assert!(k.starts_with("cccbcdce-cvvcklnr-cjckclcn-cr"), "{}", &k[..29]);
        assert!(k.ends_with("-brbtbuvv"), "{}", &k[62..]);
    }

    #[test]
    fn every_nibble_maps_to_its_own_letter() {
        // 0x01 0x23 .. 0xef: every nibble once, in order
        let mut raw = [0u8; RAW_BYTES];
        for (i, b) in raw.iter_mut().take(8).enumerate() {
            *b = (2 * i as u8) << 4 | (2 * i as u8 + 1);
        }
        let k = format(&raw);
        assert_eq!(&k[..17], "cbdefghi-jklnrtuv");
        let distinct: std::collections::BTreeSet<char> = k[..17].chars().filter(|c| *c != '-').collect();
        assert_eq!(distinct.len(), 16);
    }

    #[test]
    fn keyslot_hash_follows_grub_and_luks1() {
        assert_eq!(keyslot_hash(true, false, "sha256"), "sha256");
        assert_eq!(keyslot_hash(false, true, "sha256"), "sha256");
        assert_eq!(keyslot_hash(false, false, "sha256"), "sha512");
    }

    #[test]
    fn token_is_systemds() {
        assert_eq!(token_json(1).to_string(), r#"{"keyslots":["1"],"type":"systemd-recovery"}"#);
    }
}
