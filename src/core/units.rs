//! Sectors of 512 bytes: the unit of every table, geometry and journal field. A count or an
//! address in sectors is a [`Sectors`]; bytes come out of it only at the edge of an I/O
//! buffer ([`Sectors::byte_len`], [`sector`]), so `* 512` is written once, here.

use serde::Serialize;
use std::ops::Range;

/// Bytes in a sector (the encryption sector size stays 512 too: DESIGN.md).
pub const SECTOR: u64 = 512;
/// [`SECTOR`] as a buffer index.
pub const SECTOR_BYTES: usize = SECTOR as usize;

/// A number of 512-byte sectors (or a sector address).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Sectors(pub u64);

impl Sectors {
    /// Its size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0 * SECTOR
    }

    /// Its size in bytes, as a buffer length.
    pub const fn byte_len(self) -> usize {
        (self.0 * SECTOR) as usize
    }

    #[cfg(test)]
    /// The whole sectors in `bytes` bytes (rounded down).
    pub const fn in_bytes(bytes: u64) -> Sectors {
        Sectors(bytes / SECTOR)
    }

    /// The whole sectors in a buffer of `len` bytes (rounded down).
    pub const fn in_len(len: usize) -> Sectors {
        Sectors((len / SECTOR_BYTES) as u64)
    }
}

impl std::ops::Add for Sectors {
    type Output = Sectors;
    fn add(self, o: Sectors) -> Sectors {
        Sectors(self.0 + o.0)
    }
}

impl std::ops::Sub for Sectors {
    type Output = Sectors;
    fn sub(self, o: Sectors) -> Sectors {
        Sectors(self.0 - o.0)
    }
}

impl std::fmt::Display for Sectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} sectors", self.0)
    }
}

/// The bytes of sector `i` of a buffer.
pub const fn sector(i: usize) -> Range<usize> {
    i * SECTOR_BYTES..(i + 1) * SECTOR_BYTES
}

/// The bytes of sectors `[a, b)` of a buffer.
pub const fn sectors(a: usize, b: usize) -> Range<usize> {
    a * SECTOR_BYTES..b * SECTOR_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_and_bytes() {
        assert_eq!(Sectors(8).bytes(), 4096);
        assert_eq!(Sectors(8).byte_len(), 4096usize);
        assert_eq!(Sectors::in_bytes(4097), Sectors(8));
        assert_eq!(Sectors::in_len(1023), Sectors(1));
        assert_eq!(sector(2), 1024..1536);
        assert_eq!(sectors(1, 3), 512..1536);
        assert_eq!(Sectors(5) + Sectors(3) - Sectors(2), Sectors(6));
        assert_eq!(Sectors(7).to_string(), "7 sectors");
        assert_eq!(serde_json::to_string(&Sectors(9)).unwrap(), "9");
    }
}
