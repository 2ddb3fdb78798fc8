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
//! The optional fifth export, `pd_run_batch` ([`run_batch`]), runs many small inputs in one
//! call (one host-to-module round trip per batch instead of per input); a kernel forwards it
//! with the same task closure as `pd_run`.
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
pub use wasm::{alloc, output_len, output_ptr, run, run_batch};

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

    /// Current end of the arena.
    pub fn top() -> usize {
        get(&TOP)
    }

    /// Move the end of the arena to `end` (>= the mark), growing memory to cover it; false
    /// (nothing changed) when `memory.grow` refuses or `end` is past 4 GiB.
    pub fn set_top(end: u64) -> bool {
        if end > u32::MAX as u64 {
            return false;
        }
        let have = memory_bytes();
        if end > have {
            let pages = (end - have).div_ceil(PAGE) as usize;
            if wasm32::memory_grow(0, pages) == usize::MAX {
                return false;
            }
        }
        TOP.store(end as usize, Relaxed);
        true
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

    /// `pd_run_batch`: run `task` on every input of a batch, each exactly as `pd_run` would,
    /// and record one output holding all their results (docs/wasm-abi.md, "Batches").
    ///
    /// The `len` bytes at `ptr` are `u32 count` then `count` times `u32 len, len bytes`; the
    /// output is `u32 count` then, per input in order, `u32 status, u32 len, len bytes` (len 0
    /// unless status is 0). Returns 1 for a malformed batch or a range outside memory, 3 when
    /// the results cannot be allocated; otherwise 0, each input's own status in the output.
    ///
    /// Between inputs, everything `task` allocated is freed (the arena is rewound to just past
    /// the results so far), as `pd_run` rewinds between runs: an input sees what it would see
    /// alone, except for addresses, so a task whose output depends only on its input gives the
    /// same bytes batched or not.
    pub fn run_batch(ptr: u32, len: u32, mut task: impl FnMut(&[u8]) -> Result<&'static [u8], u32>) -> u32 {
        clear_output();
        let (start, end) = (u64::from(ptr), u64::from(ptr) + u64::from(len));
        if end > heap::memory_bytes() {
            return STATUS_BAD_LENGTH;
        }
        heap::rewind();
        let batch: &[u8] = if start >= heap::base() as u64 && end <= heap::mark() as u64 {
            // SAFETY: inside linear memory, in the part of the arena kept across `rewind`.
            unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, len as usize) }
        } else {
            let dst = heap::bump(len as usize, 8);
            if dst.is_null() {
                return STATUS_OUT_OF_MEMORY;
            }
            // SAFETY: both ranges lie inside linear memory; `copy` allows overlap.
            unsafe {
                core::ptr::copy(ptr as usize as *const u8, dst, len as usize);
                core::slice::from_raw_parts(dst, len as usize)
            }
        };
        let Some(count) = batch_count(batch) else {
            return STATUS_BAD_LENGTH;
        };
        let out_start = heap::top() as u64;
        if !heap::set_top(out_start + 4) {
            return STATUS_OUT_OF_MEMORY;
        }
        put_u32(out_start, count);
        let mut out_end = out_start + 4;
        let mut at = 4usize;
        for _ in 0..count {
            let n = read_u32(batch, at) as usize;
            let input = &batch[at + 4..at + 4 + n];
            at += 4 + n;
            // the entry's header, then the task's scratch above it (freed after the input)
            if !heap::set_top(out_end + 8) {
                return STATUS_OUT_OF_MEMORY;
            }
            let (status, out): (u32, &[u8]) = match task(input) {
                Ok(out) => (STATUS_OK, out),
                Err(status) => (status, &[]),
            };
            let data = out_end + 8;
            if !heap::set_top(data + out.len() as u64) {
                return STATUS_OUT_OF_MEMORY;
            }
            // SAFETY: `data..data+len` is inside memory (set_top grew it); the output is in
            // memory (the arena above `data`, the input, or static data); `copy` allows overlap.
            unsafe { core::ptr::copy(out.as_ptr(), data as usize as *mut u8, out.len()) };
            put_u32(out_end, status);
            put_u32(out_end + 4, out.len() as u32);
            out_end = data + out.len() as u64;
        }
        OUT_PTR.store(out_start as u32, Relaxed);
        OUT_LEN.store((out_end - out_start) as u32, Relaxed);
        STATUS_OK
    }

    /// The count of a well-formed batch (its inputs exactly fill it), else None.
    fn batch_count(batch: &[u8]) -> Option<u32> {
        if batch.len() < 4 {
            return None;
        }
        let count = read_u32(batch, 0);
        let mut at = 4usize;
        for _ in 0..count {
            if batch.len() - at < 4 {
                return None;
            }
            let n = read_u32(batch, at) as usize;
            if batch.len() - at - 4 < n {
                return None;
            }
            at += 4 + n;
        }
        (at == batch.len()).then_some(count)
    }

    fn read_u32(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    }

    fn put_u32(addr: u64, value: u32) {
        // SAFETY: callers pass an address below the arena's end, which set_top grew memory to.
        unsafe { core::ptr::write_unaligned(addr as usize as *mut [u8; 4], value.to_le_bytes()) };
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
