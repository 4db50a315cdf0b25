//! AES-256-XTS with plain64 IVs over 512-byte sectors, as dm-crypt's `aes-xts-plain64`
//! with a 512-bit key stores them: what the chunk check encrypts the source with before it
//! compares it with the copy.
//!
//! Each sector's 32 blocks go through the cipher together (`encrypt_blocks`, which the
//! `aes` crate pipelines with AES-NI) and the sectors' tweaks too, instead of one block at
//! a time: the check runs several times faster than with `xts-mode`, whose output it must
//! equal (tested below).

use aes::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use aes::Aes256;
use zeroize::Zeroize;

type Block = GenericArray<u8, aes::cipher::consts::U16>;

const SECTOR: usize = 512;
const BLOCKS: usize = SECTOR / 16;
/// Sectors whose tweaks are encrypted in one batch.
const BATCH: usize = 64;

pub struct Xts {
    data: Aes256,
    tweak: Aes256,
}

/// Multiply a tweak by α in GF(2^128), little-endian as IEEE 1619 has it.
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
}

impl Xts {
    /// `key`: 64 bytes, the data key then the tweak key (dm-crypt's order).
    pub fn new(key: &[u8]) -> Option<Xts> {
        if key.len() != 64 {
            return None;
        }
        Some(Xts { data: Aes256::new_from_slice(&key[..32]).ok()?, tweak: Aes256::new_from_slice(&key[32..]).ok()? })
    }

    /// Encrypt whole sectors `src` into `dst` (of the same length; no copy of `src` first);
    /// the first has IV (plaintext sector number) `sector`.
    pub fn encrypt_into(&self, src: &[u8], dst: &mut [u8], sector: u64) {
        assert_eq!(src.len(), dst.len(), "encrypt_into: lengths differ");
        assert!(dst.len().is_multiple_of(SECTOR), "whole sectors only");
        let mut tweaks = [Block::default(); BATCH];
        let mut blocks = [Block::default(); BLOCKS];
        for (b, batch) in dst.chunks_mut(SECTOR * BATCH).enumerate() {
            let n = batch.len() / SECTOR;
            let first = sector + (b * BATCH) as u64;
            for (i, t) in tweaks[..n].iter_mut().enumerate() {
                t.copy_from_slice(&u128::from(first + i as u64).to_le_bytes());
            }
            self.tweak.encrypt_blocks(&mut tweaks[..n]);
            for (s, data) in batch.chunks_exact_mut(SECTOR).enumerate() {
                let mut t = u128::from_le_bytes(tweaks[s].into());
                let mut ts = [0u128; BLOCKS];
                let input = &src[(b * BATCH + s) * SECTOR..][..SECTOR];
                for (j, blk) in blocks.iter_mut().enumerate() {
                    ts[j] = t;
                    let x = u128::from_le_bytes(input[j * 16..j * 16 + 16].try_into().unwrap()) ^ t;
                    blk.copy_from_slice(&x.to_le_bytes());
                    t = mul_alpha(t);
                }
                self.data.encrypt_blocks(&mut blocks);
                for (j, blk) in blocks.iter().enumerate() {
                    let x = u128::from_le_bytes((*blk).into()) ^ ts[j];
                    data[j * 16..j * 16 + 16].copy_from_slice(&x.to_le_bytes());
                }
            }
        }
        // The blocks held plaintext: do not leave it on the stack.
        for blk in blocks.iter_mut() {
            blk.as_mut_slice().zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn equals_xts_mode_for_any_length_and_start() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let key: Vec<u8> = (0..64).map(|_| rng.gen()).collect();
        let ours = Xts::new(&key).unwrap();
        let theirs = xts_mode::Xts128::new(
            Aes256::new_from_slice(&key[..32]).unwrap(),
            Aes256::new_from_slice(&key[32..]).unwrap(),
        );
        for (sectors, start) in
            [(1usize, 0u64), (2, 1), (63, 5), (64, 1 << 33), (65, 77), (200, u64::MAX - 300), (2048, 123_456)]
        {
            let plain: Vec<u8> = (0..sectors * SECTOR).map(|_| rng.gen()).collect();
            let mut a = vec![0u8; plain.len()];
            ours.encrypt_into(&plain, &mut a, start);
            let mut b = plain.clone();
            theirs.encrypt_area(&mut b, SECTOR, start as u128, xts_mode::get_tweak_default);
            assert!(a == b, "{sectors} sectors from {start}");
            assert!(a != plain);
        }
    }

    /// IEEE 1619-2007 vector 10 (AES-256-XTS, data unit sequence number 0xff, 512 bytes):
    /// ties both implementations to the standard, not only to each other.
    #[test]
    fn ieee_1619_vector_10() {
        let mut key = Vec::new();
        key.extend_from_slice(
            &hex::decode("2718281828459045235360287471352662497757247093699959574966967627").unwrap(),
        );
        key.extend_from_slice(
            &hex::decode("3141592653589793238462643383279502884197169399375105820974944592").unwrap(),
        );
        let plain: Vec<u8> = (0..SECTOR).map(|i| i as u8).collect();
        let mut data = vec![0u8; SECTOR];
        Xts::new(&key).unwrap().encrypt_into(&plain, &mut data, 0xff);
        assert_eq!(hex::encode(&data[..32]), "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b");
        assert_eq!(hex::encode(&data[SECTOR - 16..]), "c4f36ffda9fcea70b9c6e693e148c151");
    }
}
