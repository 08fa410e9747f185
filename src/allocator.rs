//! The sluice binary's global allocator: mimalloc, called the way its own `malloc` is.
//!
//! A request allocates and frees many small buffers (headers, pingora's tasks, log lines);
//! glibc's malloc spent ~17 % of sluice's user CPU on them in the load bench, mimalloc's
//! thread-local free lists much less (BENCHMARKS.md). The `mimalloc` crate's `GlobalAlloc`
//! passes every allocation to `mi_malloc_aligned`, even at alignment 1 to 8. mimalloc's
//! aligned path is fast only up to 1 KiB, and only while the next free block happens to
//! be aligned. Past that it falls back to a generic path; a block whose size class is not a
//! power of two is over-allocated by `align - 1` bytes and its page marked as holding
//! interior pointers. callgrind counted ~19 allocations per warm request there, at ~190
//! instructions each (BENCHMARKS.md, twelfth round).
//!
//! Every mimalloc block is word-aligned: size classes are multiples of the word size, laid
//! out from a word-aligned start (with or without mimalloc's debug padding, which goes after
//! the block). So a layout whose alignment is at most a word is served by plain
//! `mi_malloc`, `mi_zalloc` and `mi_realloc`; anything stricter still goes through the
//! aligned functions.
//!
//! `unsafe` is denied everywhere else in the package and forbidden in the library: a
//! `GlobalAlloc` cannot be written without it. What each call relies on is stated beside it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has whatever its size.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc as the global allocator (see the module docs).
pub struct MiMalloc;

// SAFETY: every method hands mimalloc a layout's size (and, above a word, its alignment) and
// returns what mimalloc returns: a block of at least that size at that alignment, or null on
// failure, as `GlobalAlloc` requires. Blocks are freed and resized only through mimalloc, with
// pointers it returned (the `GlobalAlloc` contract on the caller).
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation functions accept any size; see above for the alignment.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the caller's contract), so from mimalloc,
        // aligned or not: `mi_free` takes both.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract); the
        // new block keeps the alignment the old one was asked for.
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to 64 KiB that a size class boundary could matter for, at every
    /// alignment from 1 to 4 KiB: aligned, writable, zeroed when asked, and its contents kept
    /// by a resize either way.
    #[test]
    fn blocks_are_aligned_and_keep_their_contents() {
        let a = MiMalloc;
        let mut sizes: Vec<usize> = (1..=1100).collect();
        sizes.extend([
            1500, 2000, 3000, 4095, 4096, 5000, 8000, 12_345, 40_000, 65_536,
        ]);
        for align in (0..=12).map(|p| 1usize << p) {
            for &size in &sizes {
                let size = size.next_multiple_of(align);
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY (test): each block is used within its size and freed once, with the
                // layout it was allocated or resized to.
                unsafe {
                    let zeroed = a.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "zeroed {size}/{align}");
                    assert!(
                        std::slice::from_raw_parts(zeroed, size)
                            .iter()
                            .all(|&b| b == 0)
                    );
                    a.dealloc(zeroed, layout);

                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "{size}/{align}");
                    for i in 0..size {
                        *p.add(i) = i as u8;
                    }
                    // Grown, then shrunk below the original size.
                    let grown = size * 2 + align;
                    let p = a.realloc(p, layout, grown);
                    assert_eq!(p as usize % align, 0, "grown {size}/{align}");
                    for i in 0..size {
                        assert_eq!(*p.add(i), i as u8);
                    }
                    let shrunk = (size / 2).max(align);
                    let p = a.realloc(p, Layout::from_size_align(grown, align).unwrap(), shrunk);
                    assert_eq!(p as usize % align, 0, "shrunk {size}/{align}");
                    for i in 0..shrunk.min(size) {
                        assert_eq!(*p.add(i), i as u8);
                    }
                    a.dealloc(p, Layout::from_size_align(shrunk, align).unwrap());
                }
            }
        }
    }
}
