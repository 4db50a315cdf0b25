//! Content: the bytes each simulated write puts in a sector, the LUKS key and header, and
//! the AES-XTS the simulated dm-crypt runs.

use super::{PV_UUID_RAW, SECTOR};
use aes::cipher::KeyInit;
use aes::Aes256;
use std::cell::RefCell;
use xts_mode::{get_tweak_default, Xts128};

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The LVM label sector (sector 1 of the PV), carrying [`PV_UUID`](super::PV_UUID).
pub fn label_sector() -> Vec<u8> {
    let mut l = vec![0u8; SECTOR];
    l[..8].copy_from_slice(b"LABELONE");
    l[8..16].copy_from_slice(&1u64.to_le_bytes());
    l[20..24].copy_from_slice(&32u32.to_le_bytes());
    l[24..32].copy_from_slice(b"LVM2 001");
    l[32..64].copy_from_slice(PV_UUID_RAW.as_bytes());
    l
}

/// The bytes of plaintext sector `x` as written by write number `id` (0 = original content).
/// Every (id, sector) pair is distinct, so a misplaced or stale sector is always noticed.
pub fn content(id: u64, x: u64) -> Vec<u8> {
    if id == 0 && x == 1 {
        return label_sector();
    }
    let mut b = vec![0u8; SECTOR];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&x.to_le_bytes());
    b[16..24].copy_from_slice(b"SIMDATA!");
    let mut s = splitmix(id.wrapping_mul(0x1000_0000_01B3) ^ x);
    for c in b[24..].chunks_mut(8) {
        s = splitmix(s);
        c.copy_from_slice(&s.to_le_bytes()[..c.len()]);
    }
    b
}

pub(super) fn describe(b: &[u8]) -> String {
    if &b[16..24] == b"SIMDATA!" {
        let id = u64::from_le_bytes(b[..8].try_into().unwrap());
        let x = u64::from_le_bytes(b[8..16].try_into().unwrap());
        if content(id, x) == b {
            return format!("write #{id} of sector {x}");
        }
        return format!("corrupted data claiming write #{id} of sector {x}");
    }
    if b == label_sector().as_slice() {
        return "the LVM label".into();
    }
    if is_zero(b) {
        return "zeros".into();
    }
    format!("garbage ({:02x?}…)", &b[..16])
}

/// A deterministic key (512-bit, AES-XTS) and a fake LUKS header of 8 KiB.
pub fn key_and_header(seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut z = seed;
    let mut next = || {
        z = splitmix(z);
        z
    };
    let key: Vec<u8> = (0..8).flat_map(|_| next().to_le_bytes()).collect();
    let mut header: Vec<u8> = (0..1024).flat_map(|_| next().to_le_bytes()).map(|b| b | 1).collect();
    header[..6].copy_from_slice(b"LUKS\xba\xbe");
    (key, header)
}

/// Whether `b` is all zeros (fast even unoptimised: memcmp).
pub(super) fn is_zero(b: &[u8]) -> bool {
    static Z: [u8; 4096] = [0; 4096];
    b.chunks(4096).all(|c| c == &Z[..c.len()])
}

/// AES-XTS with a 512-bit key, plain64 IVs, 512-byte sectors: what dm-crypt does with
/// `aes-xts-plain64`. Results are memoised per thread (the same sectors are encrypted over and
/// over by thousands of simulated runs, and unoptimised AES is slow); the memo is keyed by
/// the full key, IV and input, so it is exactly the function.
pub struct XtsSim {
    xts: Xts128<Aes256>,
    fp: u64,
}

#[derive(PartialEq, Eq, Hash)]
struct MemoKey {
    fp: u64,
    enc: bool,
    iv: u64,
    data: Vec<u8>,
}

/// A cheap hasher for the memo (the default SipHash over 512 bytes costs as much as the
/// work it saves in an unoptimised build).
#[derive(Default)]
struct FastHasher(u64);
impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

type Memo = std::collections::HashMap<MemoKey, Vec<u8>, std::hash::BuildHasherDefault<FastHasher>>;
thread_local! {
    static XTS_MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

impl XtsSim {
    pub fn new(key: &[u8]) -> XtsSim {
        assert_eq!(key.len(), 64);
        let xts = Xts128::new(Aes256::new_from_slice(&key[..32]).unwrap(), Aes256::new_from_slice(&key[32..]).unwrap());
        let fp = key.chunks(8).fold(0u64, |a, c| splitmix(a ^ u64::from_le_bytes(c.try_into().unwrap())));
        XtsSim { xts, fp }
    }

    fn run(&self, enc: bool, iv: u64, buf: &mut [u8]) {
        let k = MemoKey { fp: self.fp, enc, iv, data: buf.to_vec() };
        let hit = XTS_MEMO.with(|m| m.borrow().get(&k).map(|v| buf.copy_from_slice(v)).is_some());
        if hit {
            return;
        }
        if enc {
            self.xts.encrypt_sector(buf, get_tweak_default(iv as u128));
        } else {
            self.xts.decrypt_sector(buf, get_tweak_default(iv as u128));
        }
        XTS_MEMO.with(|m| {
            let mut m = m.borrow_mut();
            if m.len() > 400_000 {
                m.clear();
            }
            m.insert(k, buf.to_vec());
        });
    }

    pub fn encrypt(&self, iv: u64, buf: &mut [u8]) {
        self.run(true, iv, buf)
    }

    /// Decrypt sector `iv` the way `cryptsetup open` would read it.
    pub fn decrypt(&self, iv: u64, buf: &mut [u8]) {
        self.run(false, iv, buf)
    }
}

pub(super) fn xts_from_key(key: &[u8]) -> XtsSim {
    XtsSim::new(key)
}
