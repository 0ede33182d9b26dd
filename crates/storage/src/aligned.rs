//! Page-aligned buffers for direct I/O (`O_DIRECT`), which needs the memory, the file offset
//! and the length of each transfer aligned to the device's logical block size.

use std::alloc::Layout;
use std::ptr::NonNull;

/// Alignment used for direct I/O: the page size, a multiple of every logical block size in
/// use.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Size of a transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// A zero-initialised heap buffer whose start is aligned to [`DIRECT_IO_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its memory exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1), DIRECT_IO_ALIGN).expect("valid layout")
    }

    /// Whether a buffer of `len` bytes is mapped directly (see [`AlignedBuf::new`]).
    fn mapped(len: usize) -> bool {
        cfg!(target_os = "linux") && len >= HUGE_PAGE
    }

    /// A buffer of `len` zero bytes.
    ///
    /// One of 2 MiB or more is an anonymous mapping of its own, with transparent huge pages
    /// asked for: the allocator zeroes an over-aligned allocation with a memset that touches
    /// every page at once (a restore spent 8% of its CPU faulting in ~28 000 pages that way),
    /// while a fresh mapping is zero already and is faulted in one 2 MiB page at a time as it
    /// is first written.
    pub fn new(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if Self::mapped(len) {
            // SAFETY: an anonymous private mapping, checked below; `drop` unmaps it.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(Self::layout(len));
            }
            // SAFETY: the range is the mapping just made; a refusal (THP disabled) only
            // loses the hint.
            unsafe { libc::madvise(raw, len, libc::MADV_HUGEPAGE) };
            let ptr = NonNull::new(raw.cast()).expect("mmap does not return null");
            return AlignedBuf { ptr, len };
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        let ptr =
            NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len)));
        AlignedBuf { ptr, len }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if Self::mapped(self.len) {
            // SAFETY: mapped in `new` with this length and not used after this.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            return;
        }
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_writable() {
        for len in [0, 1, 4095, 4096, (2 << 20) - 1, 2 << 20, 3 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_IO_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
            assert!(b.as_slice().iter().all(|&x| x == 7));
        }
    }
}
