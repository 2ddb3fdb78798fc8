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
//!
//! With the `simd` feature the tile is rendered by [`lockstep`]: four pixels of a row iterate
//! together in two `f64x2` registers (WebAssembly SIMD128), each lane doing exactly the scalar
//! operations (mul, then add/sub: SIMD128 has no fused multiply-add), and a lane that has
//! escaped keeps its count while the others continue. The output is bit-identical.
#![cfg_attr(target_arch = "wasm32", no_std)]

#[cfg(all(
    feature = "simd",
    target_arch = "wasm32",
    not(target_feature = "simd128")
))]
compile_error!("the `simd` feature needs `-C target-feature=+simd128` (see wasm_tasks/build.sh)");

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
#[cfg_attr(feature = "simd", allow(unreachable_code))]
pub fn render_tile_into(p: &Params, out: &mut [u8]) {
    if p.output_len() != Some(out.len()) {
        return;
    }
    #[cfg(feature = "simd")]
    {
        lockstep::render(p, out);
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

/// Lockstep rendering (the `simd` feature): `LANES` pixels of a row per step. Also compiled
/// for `cargo test` without the feature, so the plain test run checks it against the scalar
/// loop (on [f64; 2] lanes).
#[cfg(any(feature = "simd", test))]
pub mod lockstep {
    use super::Params;

    /// Independent `f64x2` chains per group: two registers interleaved hide the latency of the
    /// mul -> sub -> add chain; more would spill on x86-64 (16 vector registers) under Cranelift.
    const NV: usize = 2;
    /// Pixels per group.
    pub const LANES: usize = 2 * NV;

    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    mod v {
        use core::arch::wasm32::*;

        /// Two f64 lanes.
        #[derive(Clone, Copy)]
        pub struct F2(v128);
        /// Two lane masks (all ones = true), or two i64 counters.
        #[derive(Clone, Copy)]
        pub struct M2(v128);

        #[inline(always)]
        pub fn pair(a: f64, b: f64) -> F2 {
            F2(f64x2(a, b))
        }
        #[inline(always)]
        pub fn splat(a: f64) -> F2 {
            F2(f64x2_splat(a))
        }
        #[inline(always)]
        pub fn add(a: F2, b: F2) -> F2 {
            F2(f64x2_add(a.0, b.0))
        }
        #[inline(always)]
        pub fn sub(a: F2, b: F2) -> F2 {
            F2(f64x2_sub(a.0, b.0))
        }
        #[inline(always)]
        pub fn mul(a: F2, b: F2) -> F2 {
            F2(f64x2_mul(a.0, b.0))
        }
        /// `a <= b` per lane (false when either is NaN, like the scalar comparison).
        #[inline(always)]
        pub fn le(a: F2, b: F2) -> M2 {
            M2(f64x2_le(a.0, b.0))
        }
        #[inline(always)]
        pub fn all_true() -> M2 {
            M2(i64x2_splat(-1))
        }
        #[inline(always)]
        pub fn zero() -> M2 {
            M2(i64x2_splat(0))
        }
        #[inline(always)]
        pub fn and(a: M2, b: M2) -> M2 {
            M2(v128_and(a.0, b.0))
        }
        #[inline(always)]
        pub fn or(a: M2, b: M2) -> M2 {
            M2(v128_or(a.0, b.0))
        }
        #[inline(always)]
        pub fn any(a: M2) -> bool {
            v128_any_true(a.0)
        }
        /// Counter + 1 where the mask is set (a set mask lane is -1).
        #[inline(always)]
        pub fn count(n: M2, m: M2) -> M2 {
            M2(i64x2_sub(n.0, m.0))
        }
        #[inline(always)]
        pub fn lanes(n: M2) -> [u32; 2] {
            [
                i64x2_extract_lane::<0>(n.0) as u32,
                i64x2_extract_lane::<1>(n.0) as u32,
            ]
        }
    }

    /// The same operations on plain arrays (native builds: `cargo test --features simd`).
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    mod v {
        #[derive(Clone, Copy)]
        pub struct F2([f64; 2]);
        #[derive(Clone, Copy)]
        pub struct M2([i64; 2]);

        #[inline(always)]
        fn map(a: F2, b: F2, f: impl Fn(f64, f64) -> f64) -> F2 {
            F2([f(a.0[0], b.0[0]), f(a.0[1], b.0[1])])
        }
        #[inline(always)]
        fn imap(a: M2, b: M2, f: impl Fn(i64, i64) -> i64) -> M2 {
            M2([f(a.0[0], b.0[0]), f(a.0[1], b.0[1])])
        }
        #[inline(always)]
        pub fn pair(a: f64, b: f64) -> F2 {
            F2([a, b])
        }
        #[inline(always)]
        pub fn splat(a: f64) -> F2 {
            F2([a, a])
        }
        #[inline(always)]
        pub fn add(a: F2, b: F2) -> F2 {
            map(a, b, |x, y| x + y)
        }
        #[inline(always)]
        pub fn sub(a: F2, b: F2) -> F2 {
            map(a, b, |x, y| x - y)
        }
        #[inline(always)]
        pub fn mul(a: F2, b: F2) -> F2 {
            map(a, b, |x, y| x * y)
        }
        #[inline(always)]
        pub fn le(a: F2, b: F2) -> M2 {
            M2([-i64::from(a.0[0] <= b.0[0]), -i64::from(a.0[1] <= b.0[1])])
        }
        #[inline(always)]
        pub fn all_true() -> M2 {
            M2([-1, -1])
        }
        #[inline(always)]
        pub fn zero() -> M2 {
            M2([0, 0])
        }
        #[inline(always)]
        pub fn and(a: M2, b: M2) -> M2 {
            imap(a, b, |x, y| x & y)
        }
        #[inline(always)]
        pub fn or(a: M2, b: M2) -> M2 {
            imap(a, b, |x, y| x | y)
        }
        #[inline(always)]
        pub fn any(a: M2) -> bool {
            (a.0[0] | a.0[1]) != 0
        }
        #[inline(always)]
        pub fn count(n: M2, m: M2) -> M2 {
            imap(n, m, i64::wrapping_sub)
        }
        #[inline(always)]
        pub fn lanes(n: M2) -> [u32; 2] {
            [n.0[0] as u32, n.0[1] as u32]
        }
    }

    /// Escape counts of `LANES` points `cx[k] + i*cy`, in lockstep. Each lane runs the scalar
    /// loop's exact operations; a lane stops counting at its first failed test (escape or
    /// NaN) and keeps iterating harmlessly until every lane has stopped or `max_iter` steps.
    #[inline(always)]
    pub fn escape_counts(cx: [f64; LANES], cy: f64, max_iter: u32) -> [u32; LANES] {
        let cxs: [v::F2; NV] = core::array::from_fn(|k| v::pair(cx[2 * k], cx[2 * k + 1]));
        let cyv = v::splat(cy);
        let four = v::splat(4.0);
        let two = v::splat(2.0);
        let mut x = [v::splat(0.0); NV];
        let mut y = [v::splat(0.0); NV];
        let mut active = [v::all_true(); NV];
        let mut n = [v::zero(); NV];
        let mut k = 0u32;
        while k < max_iter {
            let mut any = v::zero();
            for q in 0..NV {
                let xx = v::mul(x[q], x[q]);
                let yy = v::mul(y[q], y[q]);
                let m = v::and(active[q], v::le(v::add(xx, yy), four));
                active[q] = m;
                any = v::or(any, m);
                n[q] = v::count(n[q], m);
                let nx = v::add(v::sub(xx, yy), cxs[q]);
                y[q] = v::add(v::mul(v::mul(two, x[q]), y[q]), cyv);
                x[q] = nx;
            }
            if !v::any(any) {
                break;
            }
            k += 1;
        }
        let mut out = [0u32; LANES];
        for q in 0..NV {
            let [a, b] = v::lanes(n[q]);
            out[2 * q] = a;
            out[2 * q + 1] = b;
        }
        out
    }

    /// Render the tile (`out.len() == p.output_len()`, checked by the caller): each row in
    /// groups of `LANES` pixels; a short last group repeats its last pixel in the spare lanes.
    pub fn render(p: &Params, out: &mut [u8]) {
        let (dx, dy) = p.steps();
        // `max(4)`: tile_w >= 1 already; this lets the compiler drop chunks_exact_mut's panic.
        let mut rows = out.chunks_exact_mut((4 * p.tile_w as usize).max(4));
        for r in 0..p.tile_h {
            let Some(row) = rows.next() else { return };
            let j = f64::from(p.y0) + f64::from(r);
            let cy = p.ymax - (j + 0.5) * dy;
            let mut c = 0u32;
            for group in row.chunks_mut(4 * LANES) {
                let pixels = group.len() / 4;
                let mut cx = [0.0f64; LANES];
                for (k, slot) in cx.iter_mut().enumerate() {
                    let col = c + (k.min(pixels - 1)) as u32;
                    let i = f64::from(p.x0) + f64::from(col);
                    *slot = p.xmin + (i + 0.5) * dx;
                }
                let counts = escape_counts(cx, cy, p.max_iter);
                for (cell, n) in group.chunks_exact_mut(4).zip(counts) {
                    if let Ok(cell) = <&mut [u8; 4]>::try_from(cell) {
                        *cell = n.to_le_bytes();
                    }
                }
                c += pixels as u32;
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

    /// The lockstep renderer gives the scalar renderer's bytes for every tile width (full and
    /// short groups), view and cap, including views where neighbouring lanes escape at very
    /// different steps.
    #[test]
    fn lockstep_equals_scalar() {
        let views = [
            (-2.0, 1.0, -1.5, 1.5),
            (-0.75, -0.73, 0.1, 0.12),
            (-1.5e-3, 1e-3, -2e-3, 0.5e-3),
            (1.0, -2.0, 1.5, -1.5), // reversed bounds mirror the image
        ];
        for (xmin, xmax, ymin, ymax) in views {
            for (w, h, x0, y0, tw, th) in [
                (97, 61, 0, 0, 97, 61),
                (64, 64, 3, 5, 1, 7),
                (64, 64, 10, 0, 2, 3),
                (64, 64, 11, 9, 3, 4),
                (64, 64, 20, 30, 5, 2),
                (64, 64, 0, 31, 9, 3),
                (64, 64, 60, 60, 4, 4),
            ] {
                for max_iter in [0, 1, 2, 7, 300] {
                    let p = Params {
                        xmin,
                        xmax,
                        ymin,
                        ymax,
                        width: w,
                        height: h,
                        x0,
                        y0,
                        tile_w: tw,
                        tile_h: th,
                        max_iter,
                        reserved: 0,
                    };
                    let mut got = vec![0u8; p.output_len().unwrap()];
                    lockstep::render(&p, &mut got);
                    let want: Vec<u32> = (y0..y0 + th)
                        .flat_map(|j| (x0..x0 + tw).map(move |i| (i, j)))
                        .map(|(i, j)| reference_pixel(&p, i, j))
                        .collect();
                    assert_eq!(counts(&got), want, "{p:?}");
                }
            }
        }
        // Lanes with very different fates in one group: inside the set, escaping at once, NaN.
        let counts = lockstep::escape_counts([-1.0, 2.5, f64::NAN, 0.25], 0.0, 1000);
        assert_eq!(counts, [1000, 1, 1, 1000]); // NaN: one step, then the test fails
        let counts = lockstep::escape_counts([0.3, -2.0, 0.26, 0.2501], 0.0, 100_000);
        for (k, cx) in [0.3, -2.0, 0.26, 0.2501].into_iter().enumerate() {
            assert_eq!(counts[k], escape_count(cx, 0.0, 100_000), "lane {k}");
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
