//! ProcessDistro Mandelbrot tile kernel.
//!
//! The pure logic (input decoding, the escape-time loop, tile rendering) is plain Rust and is
//! unit-tested natively with `cargo test`. On `wasm32` the crate is `no_std` + `alloc`, brings
//! its own bump allocator over `memory.grow`, and exports the ProcessDistro task ABI from the
//! small block at the bottom of this file. The module has no imports. See docs/wasm-abi.md.
//!
//! Semantics (float64, no fused multiply-add; Rust never fuses `a * b + c` on its own):
//!
//! ```text
//! dx = (xmax - xmin) / W;  dy = (ymax - ymin) / H
//! cx = xmin + (i + 0.5) * dx;  cy = ymax - (j + 0.5) * dy
//! n = 0; x = 0; y = 0
//! while n < M and x*x + y*y <= 4.0 { (x, y) = ((x*x - y*y) + cx, (2.0*x)*y + cy); n += 1 }
//! ```
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec::Vec;

/// Exact length of a task input in bytes.
pub const INPUT_LEN: usize = 64;

/// Status codes returned by `pd_run` (and as the `Err` value of [`run`]).
pub const STATUS_OK: u32 = 0;
/// The input is not exactly [`INPUT_LEN`] bytes (or not inside linear memory).
pub const STATUS_BAD_LENGTH: u32 = 1;
/// Bad parameters: zero W/H or tile size, tile outside the image, reserved != 0,
/// non-finite bounds (or a non-finite pixel step).
pub const STATUS_BAD_PARAMS: u32 = 2;
/// The output buffer could not be allocated.
pub const STATUS_OUT_OF_MEMORY: u32 = 3;

/// Decoded task input (layout: docs/wasm-abi.md, all little-endian).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub xmin: f64,
    pub xmax: f64,
    pub ymin: f64,
    pub ymax: f64,
    pub width: u32,
    pub height: u32,
    pub x0: u32,
    pub y0: u32,
    pub tile_w: u32,
    pub tile_h: u32,
    pub max_iter: u32,
    /// Must be 0.
    pub reserved: u32,
}

fn f64_at(b: &[u8; INPUT_LEN], off: usize) -> f64 {
    match b.get(off..).and_then(<[u8]>::first_chunk::<8>) {
        Some(a) => f64::from_le_bytes(*a),
        None => f64::NAN, // unreachable for the fixed offsets used below
    }
}

fn u32_at(b: &[u8; INPUT_LEN], off: usize) -> u32 {
    match b.get(off..).and_then(<[u8]>::first_chunk::<4>) {
        Some(a) => u32::from_le_bytes(*a),
        None => u32::MAX, // unreachable for the fixed offsets used below
    }
}

impl Params {
    /// Decode and validate an input buffer. `Err` carries a status code (1 or 2).
    pub fn decode(input: &[u8]) -> Result<Params, u32> {
        let b: &[u8; INPUT_LEN] = input.try_into().map_err(|_| STATUS_BAD_LENGTH)?;
        let p = Params {
            xmin: f64_at(b, 0),
            xmax: f64_at(b, 8),
            ymin: f64_at(b, 16),
            ymax: f64_at(b, 24),
            width: u32_at(b, 32),
            height: u32_at(b, 36),
            x0: u32_at(b, 40),
            y0: u32_at(b, 44),
            tile_w: u32_at(b, 48),
            tile_h: u32_at(b, 52),
            max_iter: u32_at(b, 56),
            reserved: u32_at(b, 60),
        };
        p.validate()?;
        Ok(p)
    }

    /// Encode into the 64-byte input layout (used by tests and host-side tooling).
    pub fn encode(&self) -> [u8; INPUT_LEN] {
        let mut b = [0u8; INPUT_LEN];
        b[0..8].copy_from_slice(&self.xmin.to_le_bytes());
        b[8..16].copy_from_slice(&self.xmax.to_le_bytes());
        b[16..24].copy_from_slice(&self.ymin.to_le_bytes());
        b[24..32].copy_from_slice(&self.ymax.to_le_bytes());
        let words = [
            self.width,
            self.height,
            self.x0,
            self.y0,
            self.tile_w,
            self.tile_h,
            self.max_iter,
            self.reserved,
        ];
        for (k, w) in words.iter().enumerate() {
            b[32 + 4 * k..36 + 4 * k].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Check the parameters; `Err(STATUS_BAD_PARAMS)` when they are unusable.
    pub fn validate(&self) -> Result<(), u32> {
        let bounds_ok = self.xmin.is_finite()
            && self.xmax.is_finite()
            && self.ymin.is_finite()
            && self.ymax.is_finite();
        let sizes_ok = self.width != 0 && self.height != 0 && self.tile_w != 0 && self.tile_h != 0;
        let inside = u64::from(self.x0) + u64::from(self.tile_w) <= u64::from(self.width)
            && u64::from(self.y0) + u64::from(self.tile_h) <= u64::from(self.height);
        if !(bounds_ok && sizes_ok && inside && self.reserved == 0) {
            return Err(STATUS_BAD_PARAMS);
        }
        // e.g. xmin = -1e308, xmax = 1e308 overflows the width to infinity.
        let (dx, dy) = self.steps();
        if !(dx.is_finite() && dy.is_finite()) {
            return Err(STATUS_BAD_PARAMS);
        }
        Ok(())
    }

    /// Pixel steps `(dx, dy)`.
    pub fn steps(&self) -> (f64, f64) {
        let dx = (self.xmax - self.xmin) / f64::from(self.width);
        let dy = (self.ymax - self.ymin) / f64::from(self.height);
        (dx, dy)
    }

    /// Output length in bytes (4 per pixel), `None` if it does not fit in `usize`.
    pub fn output_len(&self) -> Option<usize> {
        (self.tile_w as usize)
            .checked_mul(self.tile_h as usize)?
            .checked_mul(4)
    }
}

/// Escape count of one point `c = cx + i*cy`, capped at `max_iter`.
#[inline(always)]
pub fn escape_count(cx: f64, cy: f64, max_iter: u32) -> u32 {
    let mut n = 0u32;
    let mut x = 0.0f64;
    let mut y = 0.0f64;
    // Exactly the specification's loop. A NaN makes the comparison false and stops it.
    // (LLVM computes x*x and y*y once per step; that does not change any rounding.)
    while n < max_iter && x * x + y * y <= 4.0 {
        let nx = (x * x - y * y) + cx;
        y = (2.0 * x) * y + cy; // uses the old x
        x = nx;
        n += 1;
    }
    n
}

/// Render the tile described by `p` into `out` (`tile_w * tile_h` little-endian u32, row-major).
/// `p` must be valid and `out.len()` must equal `p.output_len()`; otherwise nothing is written.
/// Written without indexing so that no panic path (and no panic message) reaches the module.
pub fn render_tile_into(p: &Params, out: &mut [u8]) {
    if p.output_len() != Some(out.len()) {
        return;
    }
    let (dx, dy) = p.steps();
    let mut cells = out.chunks_exact_mut(4);
    for r in 0..p.tile_h {
        let j = f64::from(p.y0) + f64::from(r);
        let cy = p.ymax - (j + 0.5) * dy;
        for c in 0..p.tile_w {
            let i = f64::from(p.x0) + f64::from(c);
            let cx = p.xmin + (i + 0.5) * dx;
            let n = escape_count(cx, cy, p.max_iter);
            if let Some(Ok(cell)) = cells.next().map(<&mut [u8; 4]>::try_from) {
                *cell = n.to_le_bytes();
            }
        }
    }
}

/// Run one task: decode `input`, render the tile, return the output bytes or a status code.
pub fn run(input: &[u8]) -> Result<Vec<u8>, u32> {
    let p = Params::decode(input)?;
    let len = p.output_len().ok_or(STATUS_OUT_OF_MEMORY)?;
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|_| STATUS_OUT_OF_MEMORY)?;
    // SAFETY: capacity >= len was just reserved and all `len` bytes are initialised (zeroed)
    // before `set_len`. (`resize` would keep a "capacity overflow" panic path in the module.)
    unsafe {
        core::ptr::write_bytes(out.as_mut_ptr(), 0, len);
        out.set_len(len);
    }
    render_tile_into(&p, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Params = Params {
        xmin: -2.0,
        xmax: 1.0,
        ymin: -1.5,
        ymax: 1.5,
        width: 0,
        height: 0,
        x0: 0,
        y0: 0,
        tile_w: 0,
        tile_h: 0,
        max_iter: 500,
        reserved: 0,
    };

    fn image(width: u32, height: u32) -> Params {
        Params {
            width,
            height,
            tile_w: width,
            tile_h: height,
            ..DEFAULT
        }
    }

    fn counts(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The specification, written as plainly as possible.
    fn reference_pixel(p: &Params, i: u32, j: u32) -> u32 {
        let dx = (p.xmax - p.xmin) / p.width as f64;
        let dy = (p.ymax - p.ymin) / p.height as f64;
        let cx = p.xmin + (i as f64 + 0.5) * dx;
        let cy = p.ymax - (j as f64 + 0.5) * dy;
        let (mut n, mut x, mut y) = (0u32, 0.0f64, 0.0f64);
        while n < p.max_iter && x * x + y * y <= 4.0 {
            let (old_x, old_y) = (x, y);
            x = (old_x * old_x - old_y * old_y) + cx;
            y = (2.0 * old_x) * old_y + cy;
            n += 1;
        }
        n
    }

    #[test]
    fn pixels_match_reference_loop() {
        let p = image(97, 61);
        let out = counts(&run(&p.encode()).unwrap());
        assert_eq!(out.len(), 97 * 61);
        for &(i, j) in &[
            (0, 0),
            (96, 60),
            (48, 30),
            (66, 30),
            (10, 45),
            (70, 12),
            (33, 29),
        ] {
            assert_eq!(
                out[(j * 97 + i) as usize],
                reference_pixel(&p, i, j),
                "pixel ({i},{j})"
            );
        }
        // Every pixel, to be thorough (small image).
        for j in 0..61 {
            for i in 0..97 {
                assert_eq!(out[(j * 97 + i) as usize], reference_pixel(&p, i, j));
            }
        }
        // Known values: the centre row passes through the set (cap reached) and the corner
        // escapes at once.
        assert_eq!(out[0], 1);
        assert!(out.contains(&500));
    }

    #[test]
    fn tile_equals_slice_of_whole_image() {
        let (w, h) = (130u32, 90u32);
        let whole = counts(&run(&image(w, h).encode()).unwrap());
        for &(x0, y0, tw, th) in &[
            (0, 0, 130, 90),
            (17, 5, 40, 33),
            (100, 70, 30, 20),
            (129, 89, 1, 1),
            (0, 89, 130, 1),
        ] {
            let p = Params {
                x0,
                y0,
                tile_w: tw,
                tile_h: th,
                ..image(w, h)
            };
            let tile = counts(&run(&p.encode()).unwrap());
            assert_eq!(tile.len(), (tw * th) as usize);
            for r in 0..th {
                for c in 0..tw {
                    let want = whole[((y0 + r) * w + x0 + c) as usize];
                    assert_eq!(
                        tile[(r * tw + c) as usize],
                        want,
                        "tile {x0},{y0} at r={r} c={c}"
                    );
                }
            }
        }
    }

    #[test]
    fn max_iter_zero_and_one() {
        let p = Params {
            max_iter: 0,
            ..image(8, 8)
        };
        assert!(counts(&run(&p.encode()).unwrap()).iter().all(|&n| n == 0));
        let p = Params {
            max_iter: 1,
            ..image(8, 8)
        };
        assert!(counts(&run(&p.encode()).unwrap()).iter().all(|&n| n == 1));
    }

    #[test]
    fn encode_decode_roundtrip() {
        let p = Params {
            x0: 3,
            y0: 4,
            tile_w: 5,
            tile_h: 6,
            max_iter: 77,
            ..image(10, 12)
        };
        assert_eq!(Params::decode(&p.encode()), Ok(p));
        let b = p.encode();
        assert_eq!(&b[0..8], &(-2.0f64).to_le_bytes());
        assert_eq!(&b[56..60], &77u32.to_le_bytes());
    }

    #[test]
    fn bad_length() {
        let b = image(4, 4).encode();
        assert_eq!(run(&b[..63]), Err(STATUS_BAD_LENGTH));
        assert_eq!(run(&[]), Err(STATUS_BAD_LENGTH));
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(run(&long), Err(STATUS_BAD_LENGTH));
    }

    #[test]
    fn bad_params() {
        let ok = image(16, 8);
        assert!(run(&ok.encode()).is_ok());
        let bad = [
            Params { width: 0, ..ok },
            Params { height: 0, ..ok },
            Params { tile_w: 0, ..ok },
            Params { tile_h: 0, ..ok },
            Params { x0: 1, ..ok }, // 1 + 16 > 16
            Params {
                y0: 8,
                tile_h: 1,
                ..ok
            }, // row 8 of 8
            Params {
                x0: u32::MAX,
                tile_w: 1,
                ..ok
            }, // no overflow wrap-around
            Params { reserved: 1, ..ok },
            Params {
                xmin: f64::NAN,
                ..ok
            },
            Params {
                xmax: f64::INFINITY,
                ..ok
            },
            Params {
                ymin: f64::NEG_INFINITY,
                ..ok
            },
            Params {
                ymax: f64::NAN,
                ..ok
            },
            Params {
                xmin: -1e308,
                xmax: 1e308,
                ..ok
            }, // width overflows to infinity
        ];
        for p in bad {
            assert_eq!(run(&p.encode()), Err(STATUS_BAD_PARAMS), "{p:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// wasm32 only: allocator, panic handler and the exported ABI.
// ---------------------------------------------------------------------------------------------

/// A bump allocator over the module's own linear memory (grown with `memory.grow`).
///
/// One run's allocations live in an arena that starts at `__heap_base`. `pd_alloc` empties the
/// arena and places the input at its start, then sets a mark after it; `pd_run` rewinds the arena
/// to that mark before allocating its output. So memory never grows beyond what the largest
/// single run needed, however many runs an instance serves.
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

    fn base() -> usize {
        core::ptr::addr_of!(__heap_base) as usize
    }

    fn get(v: &AtomicUsize) -> usize {
        match v.load(Relaxed) {
            0 => base(),
            t => t,
        }
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
mod abi {
    use super::{INPUT_LEN, STATUS_BAD_LENGTH, STATUS_OK, heap, run};
    use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

    static OUT_PTR: AtomicU32 = AtomicU32::new(0);
    static OUT_LEN: AtomicU32 = AtomicU32::new(0);

    fn clear_output() {
        OUT_PTR.store(0, Relaxed);
        OUT_LEN.store(0, Relaxed);
    }

    /// Reserve `len` bytes for the next input and return their address (0 on failure).
    /// Invalidates every earlier pointer, including the previous output.
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_alloc(len: u32) -> u32 {
        clear_output();
        heap::reset();
        let p = heap::bump(len as usize, 8);
        heap::set_mark();
        p as usize as u32
    }

    /// Run the task on the `len` bytes at `ptr`; returns a status code (0 = ok).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_run(ptr: u32, len: u32) -> u32 {
        clear_output();
        if len as usize != INPUT_LEN || u64::from(ptr) + u64::from(len) > heap::memory_bytes() {
            return STATUS_BAD_LENGTH;
        }
        let mut input = [0u8; INPUT_LEN];
        // SAFETY: the range was checked to lie inside linear memory; we copy it out before
        // allocating anything, so a later allocation may reuse that memory.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr as usize as *const u8, input.as_mut_ptr(), INPUT_LEN)
        };
        heap::rewind();
        match run(&input) {
            Ok(out) => {
                let out = out.leak(); // reclaimed by the next pd_alloc / pd_run
                OUT_PTR.store(out.as_ptr() as usize as u32, Relaxed);
                OUT_LEN.store(out.len() as u32, Relaxed);
                STATUS_OK
            }
            Err(status) => status,
        }
    }

    /// Address of the last successful run's output (0 if none).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_output_ptr() -> u32 {
        OUT_PTR.load(Relaxed)
    }

    /// Length in bytes of the last successful run's output (0 if none).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_output_len() -> u32 {
        OUT_LEN.load(Relaxed)
    }
}
