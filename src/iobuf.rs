//! [`IoBuf`]: the byte buffers of the copy — 4 KiB-aligned (O_DIRECT takes them as they
//! are) and with every page in place before the first use.
//!
//! Why "in place" matters: the engine touches its buffers while the bridge is suspended,
//! and nothing may fault or allocate there. A zeroed allocation is mapped lazily; the
//! first write to each page faults, even under `mlockall`. In the User-Mode Linux test bed
//! each of those faults is a round trip to the host (about 0.1 s per MiB touched, measured:
//! 8 MiB took 520–1100 ms; 1 MiB touched first inside a suspended window made it 95 ms).
//!
//! So a buffer is its own anonymous mapping, populated by the kernel (`MAP_POPULATE`), and
//! then its protection is set to read-only and back: the change of protection makes the
//! kernel bring the whole range into the address space at once (in UML: one batch of host
//! mappings instead of one host round trip per page; 8 MiB in 4–10 ms). On other kernels
//! both steps are cheap and harmless.

use nix::sys::mman::{mmap_anonymous, mprotect, munmap, MapFlags, ProtFlags};
use std::ffi::c_void;
use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

const PAGE: usize = 4096;

/// A zeroed byte buffer of its own pages, page-aligned, every page mapped at creation.
pub struct IoBuf {
    ptr: NonNull<u8>,
    /// The bytes the buffer shows.
    len: usize,
    /// The bytes mapped: `len` rounded up to whole pages (at least one).
    map_len: usize,
}

// SAFETY: an IoBuf owns its mapping exclusively, like a Vec<u8> owns its heap block.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only read.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// `len` zero bytes, page-aligned and mapped in. Fails like `mmap` (no memory, or more
    /// than the process may lock under `mlockall(MCL_FUTURE)`).
    pub fn new(len: usize) -> io::Result<IoBuf> {
        let map_len = len.max(1).div_ceil(PAGE) * PAGE;
        let rw = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        let n = NonZeroUsize::new(map_len).expect("at least one page");
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p: NonNull<c_void> = unsafe { mmap_anonymous(None, n, rw, MapFlags::MAP_PRIVATE | MapFlags::MAP_POPULATE) }
            .map_err(io::Error::from)?;
        let buf = IoBuf { ptr: p.cast(), len, map_len };
        // SAFETY: the mapping just made, whole; no reference into it exists yet.
        unsafe {
            mprotect(p, map_len, ProtFlags::PROT_READ).map_err(io::Error::from)?;
            mprotect(p, map_len, rw).map_err(io::Error::from)?;
        }
        Ok(buf)
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping this IoBuf made; no borrow of it outlives self.
        let _ = unsafe { munmap(self.ptr.cast(), self.map_len) };
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` ≤ `map_len` readable bytes (zero-filled at mapping), owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for deref, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_writable() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20] {
            let mut b = IoBuf::new(len).unwrap();
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % PAGE, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0xa5);
            assert!(b.iter().all(|&x| x == 0xa5));
        }
    }
}
