//! ProcessDistro WASM task ABI glue, shared by the `matrix_mul` and `password_hash` kernels.
//!
//! On `wasm32` this crate provides what every kernel module needs besides its own task logic:
//! the bump allocator over `memory.grow` (the `#[global_allocator]`), the panic handler (a trap;
//! nothing is imported), and the bodies of the four exported ABI functions. A kernel keeps its
//! `#[unsafe(no_mangle)]` exports in a small block at the bottom of its own `lib.rs` and forwards
//! them to [`alloc`], [`run`], [`output_ptr`] and [`output_len`]. See docs/wasm-abi.md.
//!
//! Unlike `mandelbrot` (which copies its fixed 64-byte input), kernels built on this crate read
//! their input **in place**: the buffer `pd_alloc` returned is left untouched while `pd_run`
//! allocates its output after it, so a large input (a matrix block, a wordlist) is never copied.
//! An input range anywhere else in linear memory is copied into the arena first.
//!
//! On other targets (native `cargo test`) only the status codes are compiled.
#![no_std]

/// Status codes returned by `pd_run` (shared meaning across kernels, docs/wasm-abi.md).
pub const STATUS_OK: u32 = 0;
/// The input length is wrong for its header, or the input range is not inside linear memory.
pub const STATUS_BAD_LENGTH: u32 = 1;
/// Bad parameters (see the kernel).
pub const STATUS_BAD_PARAMS: u32 = 2;
/// The output (or a working buffer) could not be allocated.
pub const STATUS_OUT_OF_MEMORY: u32 = 3;

#[cfg(target_arch = "wasm32")]
pub use wasm::{alloc, output_len, output_ptr, run};

/// A bump allocator over the module's own linear memory (grown with `memory.grow`).
///
/// One run's allocations live in an arena that starts at `__heap_base`. `pd_alloc` empties the
/// arena and places the input at its start, then sets a mark after it; `pd_run` rewinds the arena
/// to that mark before allocating its output. So memory never grows beyond what the largest
/// single run needed, however many runs an instance serves. (Same allocator as `mandelbrot`.)
#[cfg(target_arch = "wasm32")]
mod heap {
    use core::alloc::{GlobalAlloc, Layout};
    use core::arch::wasm32;
    use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    const PAGE: u64 = 65536;

    unsafe extern "C" {
        // Synthesized by wasm-ld: first free byte after data and stack. Not an import.
        static __heap_base: u8;
    }

    // Without the `atomics` feature these compile to plain loads and stores.
    static TOP: AtomicUsize = AtomicUsize::new(0); // 0 = at __heap_base
    static MARK: AtomicUsize = AtomicUsize::new(0); // 0 = at __heap_base

    pub fn base() -> usize {
        core::ptr::addr_of!(__heap_base) as usize
    }

    fn get(v: &AtomicUsize) -> usize {
        match v.load(Relaxed) {
            0 => base(),
            t => t,
        }
    }

    /// End of the region kept across `rewind` (the input placed by `pd_alloc`).
    pub fn mark() -> usize {
        get(&MARK)
    }

    /// Bytes of linear memory currently available.
    pub fn memory_bytes() -> u64 {
        wasm32::memory_size(0) as u64 * PAGE
    }

    /// Empty the arena (everything allocated before becomes invalid).
    pub fn reset() {
        TOP.store(0, Relaxed);
        MARK.store(0, Relaxed);
    }

    /// Keep everything allocated so far across the next `rewind`.
    pub fn set_mark() {
        MARK.store(get(&TOP), Relaxed);
    }

    /// Free everything allocated after the mark.
    pub fn rewind() {
        TOP.store(get(&MARK), Relaxed);
    }

    /// Bump-allocate `size` bytes aligned to `align` (a power of two); null on failure.
    pub fn bump(size: usize, align: usize) -> *mut u8 {
        let top = get(&TOP) as u64;
        let start = (top + (align as u64 - 1)) & !(align as u64 - 1);
        let end = start + size as u64;
        if end > u32::MAX as u64 {
            return core::ptr::null_mut();
        }
        let have = memory_bytes();
        if end > have {
            let pages = (end - have).div_ceil(PAGE) as usize;
            if wasm32::memory_grow(0, pages) == usize::MAX {
                return core::ptr::null_mut();
            }
        }
        TOP.store(end as usize, Relaxed);
        start as usize as *mut u8
    }

    pub struct Bump;

    unsafe impl GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            bump(layout.size(), layout.align())
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // Only the most recent allocation can be given back; the rest waits for a reset.
            let p = ptr as usize;
            if p + layout.size() == get(&TOP) && p >= get(&MARK) {
                TOP.store(p, Relaxed);
            }
        }
    }

    #[global_allocator]
    static GLOBAL: Bump = Bump;

    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        // Not reachable from the exported functions; trap rather than import anything.
        wasm32::unreachable()
    }
}

#[cfg(target_arch = "wasm32")]
mod wasm {
    use super::{STATUS_BAD_LENGTH, STATUS_OK, STATUS_OUT_OF_MEMORY, heap};
    use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

    static OUT_PTR: AtomicU32 = AtomicU32::new(0);
    static OUT_LEN: AtomicU32 = AtomicU32::new(0);

    fn clear_output() {
        OUT_PTR.store(0, Relaxed);
        OUT_LEN.store(0, Relaxed);
    }

    /// `pd_alloc`: reserve `len` bytes for the next input and return their address (8-aligned;
    /// 0 on failure). Invalidates every earlier pointer, including the previous output.
    pub fn alloc(len: u32) -> u32 {
        clear_output();
        heap::reset();
        let p = heap::bump(len as usize, 8);
        heap::set_mark();
        p as usize as u32
    }

    /// `pd_run`: run `task` on the `len` input bytes at `ptr` and record its output.
    ///
    /// `task` returns its output as a leaked slice (it lives in the arena until the next
    /// `pd_alloc`/`pd_run`) or a status code. The input is borrowed in place when it lies in
    /// the buffer reserved by `pd_alloc`, otherwise it is first copied into the arena.
    pub fn run(ptr: u32, len: u32, task: impl FnOnce(&[u8]) -> Result<&'static [u8], u32>) -> u32 {
        clear_output();
        let (start, end) = (u64::from(ptr), u64::from(ptr) + u64::from(len));
        if end > heap::memory_bytes() {
            return STATUS_BAD_LENGTH;
        }
        heap::rewind();
        let input: &[u8] = if len == 0 {
            &[]
        } else if start >= heap::base() as u64 && end <= heap::mark() as u64 {
            // SAFETY: the range lies inside linear memory, in the part of the arena kept across
            // `rewind`; nothing allocated during this run can overlap it, and the module writes
            // it nowhere else.
            unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, len as usize) }
        } else {
            let dst = heap::bump(len as usize, 8);
            if dst.is_null() {
                return STATUS_OUT_OF_MEMORY;
            }
            // SAFETY: both ranges lie inside linear memory; `copy` allows them to overlap (a
            // stale pointer into the arena). From here on only the copy is read.
            unsafe {
                core::ptr::copy(ptr as usize as *const u8, dst, len as usize);
                core::slice::from_raw_parts(dst, len as usize)
            }
        };
        match task(input) {
            Ok(out) => {
                OUT_PTR.store(out.as_ptr() as usize as u32, Relaxed);
                OUT_LEN.store(out.len() as u32, Relaxed);
                STATUS_OK
            }
            Err(status) => status,
        }
    }

    /// `pd_output_ptr`: address of the last successful run's output (0 if none).
    pub fn output_ptr() -> u32 {
        OUT_PTR.load(Relaxed)
    }

    /// `pd_output_len`: its length in bytes (0 if none).
    pub fn output_len() -> u32 {
        OUT_LEN.load(Relaxed)
    }
}
