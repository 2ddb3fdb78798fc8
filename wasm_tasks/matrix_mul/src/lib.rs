//! ProcessDistro matrix-multiplication tile kernel: `C = A @ B` for one block of rows of `A`
//! and one block of columns of `B`.
//!
//! Input (little-endian, layout in docs/wasm-abi.md): a 16-byte header `dtype, m, k, n` (u32
//! each; dtype 0 = float64, 1 = float32), then `A` (m x k, row-major), then `B` (k x n,
//! row-major). Output: `C` (m x n, row-major) in the same dtype.
//!
//! Arithmetic (every build, scalar or SIMD, gives the same bits): each element is accumulated
//! in the input dtype, starting from +0.0, over `p = 0, 1, ..., k-1` in ascending order, each
//! product rounded and then added (no fused multiply-add):
//!
//! ```text
//! c = 0.0;  for p in 0..k { c = c + a[i][p] * b[p][j] }
//! ```
//!
//! The loops are cache-blocked (column block of `B`, depth block, then `i`, then `p` unrolled
//! by four, then `j` innermost and contiguous), which changes the memory order but not the
//! order of the additions into any one element. With the `simd` feature on wasm32 (+simd128)
//! the innermost loop uses `f64x2`/`f32x4` mul and add from `core::arch::wasm32`.
//!
//! The pure logic is plain Rust and is unit-tested natively with `cargo test`. On `wasm32` the
//! crate is `no_std` + `alloc`; the allocator, panic handler and ABI plumbing come from
//! `pd_abi`, and the exports are the small block at the bottom of this file.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

#[cfg(all(
    feature = "simd",
    target_arch = "wasm32",
    not(target_feature = "simd128")
))]
compile_error!("the `simd` feature needs `-C target-feature=+simd128` (see wasm_tasks/build.sh)");

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::ops::{Add, Mul};

pub use pd_abi::{STATUS_BAD_LENGTH, STATUS_BAD_PARAMS, STATUS_OK, STATUS_OUT_OF_MEMORY};

/// Header length in bytes.
pub const HEADER_LEN: usize = 16;
/// `dtype` value for float64 elements.
pub const DTYPE_F64: u32 = 0;
/// `dtype` value for float32 elements.
pub const DTYPE_F32: u32 = 1;

/// Element type of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
        }
    }

    /// The header code.
    pub fn code(self) -> u32 {
        match self {
            Dtype::F64 => DTYPE_F64,
            Dtype::F32 => DTYPE_F32,
        }
    }
}

/// Decoded and validated task header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub dtype: Dtype,
    /// Rows of `A` and `C`.
    pub m: u32,
    /// Columns of `A`, rows of `B`.
    pub k: u32,
    /// Columns of `B` and `C`.
    pub n: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    match b.get(off..).and_then(<[u8]>::first_chunk::<4>) {
        Some(a) => u32::from_le_bytes(*a),
        None => 0, // unreachable: callers check the length first
    }
}

impl Header {
    /// The 16-byte header (used by tests and host-side tooling).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        for (w, v) in b
            .chunks_exact_mut(4)
            .zip([self.dtype.code(), self.m, self.k, self.n])
        {
            w.copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Byte lengths of the `A` block, the `B` block and the whole input (checked to be below
    /// 4 GiB, so they also fit `usize` on wasm32).
    fn input_sizes(&self) -> Option<(usize, usize, usize)> {
        let s = self.dtype.size();
        let (m, k, n) = (u64::from(self.m), u64::from(self.k), u64::from(self.n));
        let a = m.checked_mul(k)?.checked_mul(s)?;
        let b = k.checked_mul(n)?.checked_mul(s)?;
        let total = (HEADER_LEN as u64).checked_add(a)?.checked_add(b)?;
        if total > u64::from(u32::MAX) {
            return None;
        }
        Some((
            usize::try_from(a).ok()?,
            usize::try_from(b).ok()?,
            usize::try_from(total).ok()?,
        ))
    }

    /// Number of output elements (`m * n`), `None` if the output would not fit in 4 GiB.
    pub fn output_elems(&self) -> Option<usize> {
        let elems = u64::from(self.m) * u64::from(self.n);
        if elems.checked_mul(self.dtype.size())? > u64::from(u32::MAX) {
            return None;
        }
        usize::try_from(elems).ok()
    }

    /// Decode and validate an input; returns the header and the `A` and `B` byte blocks.
    /// `Err` carries a status code (1 = length, 2 = parameters).
    pub fn decode(input: &[u8]) -> Result<(Header, &[u8], &[u8]), u32> {
        if input.len() < HEADER_LEN {
            return Err(STATUS_BAD_LENGTH);
        }
        let dtype = match u32_at(input, 0) {
            DTYPE_F64 => Dtype::F64,
            DTYPE_F32 => Dtype::F32,
            _ => return Err(STATUS_BAD_PARAMS),
        };
        let h = Header {
            dtype,
            m: u32_at(input, 4),
            k: u32_at(input, 8),
            n: u32_at(input, 12),
        };
        if h.m == 0 || h.k == 0 || h.n == 0 {
            return Err(STATUS_BAD_PARAMS);
        }
        let (a_len, b_len, total) = h.input_sizes().ok_or(STATUS_BAD_PARAMS)?;
        if input.len() != total {
            return Err(STATUS_BAD_LENGTH);
        }
        let body = input.get(HEADER_LEN..).ok_or(STATUS_BAD_LENGTH)?;
        let (a, b) = body.split_at_checked(a_len).ok_or(STATUS_BAD_LENGTH)?;
        if b.len() != b_len {
            return Err(STATUS_BAD_LENGTH);
        }
        Ok((h, a, b))
    }
}

/// A float element type (`f64` or `f32`).
pub trait Elem:
    Copy + Default + PartialEq + Add<Output = Self> + Mul<Output = Self> + core::fmt::Debug
{
    const SIZE: usize;
    fn from_le(bytes: &[u8]) -> Self;
    /// The value whose in-memory bytes are its little-endian encoding (identity on LE hosts).
    fn to_le_repr(self) -> Self;

    /// `c[j] = (((c[j] + a[0]*b[0][j]) + a[1]*b[1][j]) + a[2]*b[2][j]) + a[3]*b[3][j]`
    /// for every `j`. All five slices have the same length.
    #[inline(always)]
    fn update4(c: &mut [Self], a: [Self; 4], b: [&[Self]; 4]) {
        update4_scalar(c, a, b);
    }

    /// [`Elem::update4`] for two rows of `C` at once (`c0` with `a0`, `c1` with `a1`), sharing
    /// the loads of `B`.
    #[inline(always)]
    fn update4x2(c0: &mut [Self], c1: &mut [Self], a0: [Self; 4], a1: [Self; 4], b: [&[Self]; 4]) {
        update4x2_scalar(c0, c1, a0, a1, b);
    }

    /// `c$r[j] += a$r[q] * B[p0 + q][j0 + j]` for `q` ascending, rows `r` = 0, 1, with the
    /// sums held in registers across the depth (a register-blocked micro-kernel). Returns
    /// false when the type has none (then the `update4x2` loops do the block).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn block2(
        _c0: &mut [Self],
        _c1: &mut [Self],
        _a0: &[Self],
        _a1: &[Self],
        _b: &[Self],
        _n: usize,
        _p0: usize,
        _j0: usize,
    ) -> bool {
        false
    }

    /// `c[j] = c[j] + a*b[j]` for every `j`. Both slices have the same length.
    #[inline(always)]
    fn update1(c: &mut [Self], a: Self, b: &[Self]) {
        update1_scalar(c, a, b);
    }
}

#[inline(always)]
fn update4_scalar<T: Elem>(c: &mut [T], a: [T; 4], b: [&[T]; 4]) {
    let [b0, b1, b2, b3] = b;
    for ((((c, &x0), &x1), &x2), &x3) in c.iter_mut().zip(b0).zip(b1).zip(b2).zip(b3) {
        *c = (((*c + a[0] * x0) + a[1] * x1) + a[2] * x2) + a[3] * x3;
    }
}

#[inline(always)]
fn update4x2_scalar<T: Elem>(c0: &mut [T], c1: &mut [T], a0: [T; 4], a1: [T; 4], b: [&[T]; 4]) {
    let [b0, b1, b2, b3] = b;
    let bs = b0.iter().zip(b1).zip(b2).zip(b3);
    for ((y0, y1), (((&x0, &x1), &x2), &x3)) in c0.iter_mut().zip(c1.iter_mut()).zip(bs) {
        *y0 = (((*y0 + a0[0] * x0) + a0[1] * x1) + a0[2] * x2) + a0[3] * x3;
        *y1 = (((*y1 + a1[0] * x0) + a1[1] * x1) + a1[2] * x2) + a1[3] * x3;
    }
}

#[inline(always)]
fn update1_scalar<T: Elem>(c: &mut [T], a: T, b: &[T]) {
    for (c, &x) in c.iter_mut().zip(b) {
        *c = *c + a * x;
    }
}

impl Elem for f64 {
    const SIZE: usize = 8;
    fn from_le(bytes: &[u8]) -> f64 {
        match bytes.first_chunk::<8>() {
            Some(a) => f64::from_le_bytes(*a),
            None => 0.0, // unreachable: callers pass 8-byte chunks
        }
    }
    fn to_le_repr(self) -> f64 {
        f64::from_bits(self.to_bits().to_le())
    }
    #[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    fn update4(c: &mut [f64], a: [f64; 4], b: [&[f64]; 4]) {
        simd::update4_f64(c, a, b);
    }
    #[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    fn update4x2(c0: &mut [f64], c1: &mut [f64], a0: [f64; 4], a1: [f64; 4], b: [&[f64]; 4]) {
        simd::update4x2_f64(c0, c1, a0, a1, b);
    }
    #[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    fn update1(c: &mut [f64], a: f64, b: &[f64]) {
        simd::update1_f64(c, a, b);
    }
    #[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    fn block2(
        c0: &mut [f64],
        c1: &mut [f64],
        a0: &[f64],
        a1: &[f64],
        b: &[f64],
        n: usize,
        p0: usize,
        j0: usize,
    ) -> bool {
        simd::block2_f64(c0, c1, a0, a1, b, n, p0, j0)
    }
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn from_le(bytes: &[u8]) -> f32 {
        match bytes.first_chunk::<4>() {
            Some(a) => f32::from_le_bytes(*a),
            None => 0.0, // unreachable: callers pass 4-byte chunks
        }
    }
    fn to_le_repr(self) -> f32 {
        f32::from_bits(self.to_bits().to_le())
    }
    #[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    fn update4(c: &mut [f32], a: [f32; 4], b: [&[f32]; 4]) {
        simd::update4_f32(c, a, b);
    }
    #[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    fn update4x2(c0: &mut [f32], c1: &mut [f32], a0: [f32; 4], a1: [f32; 4], b: [&[f32]; 4]) {
        simd::update4x2_f32(c0, c1, a0, a1, b);
    }
    #[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    fn update1(c: &mut [f32], a: f32, b: &[f32]) {
        simd::update1_f32(c, a, b);
    }
    #[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(always)]
    fn block2(
        c0: &mut [f32],
        c1: &mut [f32],
        a0: &[f32],
        a1: &[f32],
        b: &[f32],
        n: usize,
        p0: usize,
        j0: usize,
    ) -> bool {
        simd::block2_f32(c0, c1, a0, a1, b, n, p0, j0)
    }
}

/// WebAssembly SIMD128 inner loops: the same operations as the scalar loops, two f64 or four
/// f32 lanes at a time (mul, then add: no relaxed-SIMD FMA), so the results are bit-identical.
#[cfg(all(feature = "simd", target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use core::arch::wasm32::*;

    /// Common length of `c` and the `b` rows (they are equal by construction; the minimum keeps
    /// every access in bounds regardless).
    #[inline(always)]
    fn common_len(c: usize, b: &[usize]) -> usize {
        b.iter().fold(c, |n, &x| n.min(x))
    }

    macro_rules! simd_impl {
        ($update4:ident, $update4x2:ident, $update1:ident, $t:ty, $lanes:expr, $splat:ident, $mul:ident, $add:ident) => {
            #[inline(always)]
            pub fn $update4(c: &mut [$t], a: [$t; 4], b: [&[$t]; 4]) {
                let n = common_len(c.len(), &[b[0].len(), b[1].len(), b[2].len(), b[3].len()]);
                let (a0, a1, a2, a3) = ($splat(a[0]), $splat(a[1]), $splat(a[2]), $splat(a[3]));
                let (cp, p0, p1, p2, p3) = (
                    c.as_mut_ptr(),
                    b[0].as_ptr(),
                    b[1].as_ptr(),
                    b[2].as_ptr(),
                    b[3].as_ptr(),
                );
                let mut j = 0;
                // SAFETY: j + $lanes <= n <= the length of every slice; v128 loads and stores
                // need no alignment.
                unsafe {
                    while j + $lanes <= n {
                        let at = |p: *const $t| v128_load(p.add(j) as *const v128);
                        let mut acc = at(cp);
                        acc = $add(acc, $mul(a0, at(p0)));
                        acc = $add(acc, $mul(a1, at(p1)));
                        acc = $add(acc, $mul(a2, at(p2)));
                        acc = $add(acc, $mul(a3, at(p3)));
                        v128_store(cp.add(j) as *mut v128, acc);
                        j += $lanes;
                    }
                }
                if let (Some(c), Some(x0), Some(x1), Some(x2), Some(x3)) = (
                    c.get_mut(j..n),
                    b[0].get(j..n),
                    b[1].get(j..n),
                    b[2].get(j..n),
                    b[3].get(j..n),
                ) {
                    super::update4_scalar(c, a, [x0, x1, x2, x3]);
                }
            }

            #[inline(always)]
            pub fn $update4x2(
                c0: &mut [$t],
                c1: &mut [$t],
                a0: [$t; 4],
                a1: [$t; 4],
                b: [&[$t]; 4],
            ) {
                let lens = [c1.len(), b[0].len(), b[1].len(), b[2].len(), b[3].len()];
                let n = common_len(c0.len(), &lens);
                let s0 = [$splat(a0[0]), $splat(a0[1]), $splat(a0[2]), $splat(a0[3])];
                let s1 = [$splat(a1[0]), $splat(a1[1]), $splat(a1[2]), $splat(a1[3])];
                let (q0, q1) = (c0.as_mut_ptr(), c1.as_mut_ptr());
                let p = [b[0].as_ptr(), b[1].as_ptr(), b[2].as_ptr(), b[3].as_ptr()];
                let mut j = 0;
                // SAFETY: j + $lanes <= n <= the length of every slice; v128 loads and stores
                // need no alignment.
                unsafe {
                    while j + $lanes <= n {
                        let at = |p: *const $t| v128_load(p.add(j) as *const v128);
                        let x = [at(p[0]), at(p[1]), at(p[2]), at(p[3])];
                        let mut y0 = at(q0);
                        let mut y1 = at(q1);
                        y0 = $add(y0, $mul(s0[0], x[0]));
                        y1 = $add(y1, $mul(s1[0], x[0]));
                        y0 = $add(y0, $mul(s0[1], x[1]));
                        y1 = $add(y1, $mul(s1[1], x[1]));
                        y0 = $add(y0, $mul(s0[2], x[2]));
                        y1 = $add(y1, $mul(s1[2], x[2]));
                        y0 = $add(y0, $mul(s0[3], x[3]));
                        y1 = $add(y1, $mul(s1[3], x[3]));
                        v128_store(q0.add(j) as *mut v128, y0);
                        v128_store(q1.add(j) as *mut v128, y1);
                        j += $lanes;
                    }
                }
                if let (Some(c0), Some(c1), Some(x0), Some(x1), Some(x2), Some(x3)) = (
                    c0.get_mut(j..n),
                    c1.get_mut(j..n),
                    b[0].get(j..n),
                    b[1].get(j..n),
                    b[2].get(j..n),
                    b[3].get(j..n),
                ) {
                    super::update4x2_scalar(c0, c1, a0, a1, [x0, x1, x2, x3]);
                }
            }

            #[inline(always)]
            pub fn $update1(c: &mut [$t], a: $t, b: &[$t]) {
                let n = common_len(c.len(), &[b.len()]);
                let av = $splat(a);
                let (cp, bp) = (c.as_mut_ptr(), b.as_ptr());
                let mut j = 0;
                // SAFETY: as above.
                unsafe {
                    while j + $lanes <= n {
                        let acc = v128_load(cp.add(j) as *const v128);
                        let x = v128_load(bp.add(j) as *const v128);
                        v128_store(cp.add(j) as *mut v128, $add(acc, $mul(av, x)));
                        j += $lanes;
                    }
                }
                if let (Some(c), Some(x)) = (c.get_mut(j..n), b.get(j..n)) {
                    super::update1_scalar(c, a, x);
                }
            }
        };
    }

    macro_rules! block2_impl {
        ($name:ident, $t:ty, $lanes:expr, $splat:ident, $mul:ident, $add:ident) => {
            /// [`super::Elem::block2`]: three vectors of columns x two rows of `C` in six
            /// accumulators for the whole depth (12 live vectors: no spills on x86-64), `B`
            /// streamed row by row; then one vector, then single columns. Each element is
            /// `c + a[0]*b[0] + a[1]*b[1] + ...` in ascending depth, as everywhere.
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            pub fn $name(
                c0: &mut [$t],
                c1: &mut [$t],
                a0: &[$t],
                a1: &[$t],
                b: &[$t],
                n: usize,
                p0: usize,
                j0: usize,
            ) -> bool {
                const L: usize = $lanes;
                let (w, depth) = (c0.len(), a0.len());
                // Every B element read is b[(p0 + q) * n + j0 + j], q < depth, j < w.
                let fits = depth > 0
                    && c1.len() == w
                    && a1.len() == depth
                    && (p0 + depth - 1)
                        .checked_mul(n)
                        .and_then(|x| x.checked_add(j0 + w))
                        .is_some_and(|end| end <= b.len());
                if !fits {
                    return false;
                }
                let (q0, q1, x0, x1) = (c0.as_mut_ptr(), c1.as_mut_ptr(), a0.as_ptr(), a1.as_ptr());
                // SAFETY: the bounds were checked above; v128 loads and stores need no alignment.
                unsafe {
                    let bp = b.as_ptr().add(p0 * n + j0);
                    let ld = |p: *const $t| v128_load(p as *const v128);
                    let mut j = 0;
                    while j + 3 * L <= w {
                        let mut r0 = [ld(q0.add(j)), ld(q0.add(j + L)), ld(q0.add(j + 2 * L))];
                        let mut r1 = [ld(q1.add(j)), ld(q1.add(j + L)), ld(q1.add(j + 2 * L))];
                        let mut row = bp.add(j);
                        for q in 0..depth {
                            let (s0, s1) = ($splat(*x0.add(q)), $splat(*x1.add(q)));
                            let x = [ld(row), ld(row.add(L)), ld(row.add(2 * L))];
                            for v in 0..3 {
                                r0[v] = $add(r0[v], $mul(s0, x[v]));
                                r1[v] = $add(r1[v], $mul(s1, x[v]));
                            }
                            row = row.add(n);
                        }
                        for v in 0..3 {
                            v128_store(q0.add(j + v * L) as *mut v128, r0[v]);
                            v128_store(q1.add(j + v * L) as *mut v128, r1[v]);
                        }
                        j += 3 * L;
                    }
                    while j + L <= w {
                        let (mut r0, mut r1) = (ld(q0.add(j)), ld(q1.add(j)));
                        let mut row = bp.add(j);
                        for q in 0..depth {
                            let x = ld(row);
                            r0 = $add(r0, $mul($splat(*x0.add(q)), x));
                            r1 = $add(r1, $mul($splat(*x1.add(q)), x));
                            row = row.add(n);
                        }
                        v128_store(q0.add(j) as *mut v128, r0);
                        v128_store(q1.add(j) as *mut v128, r1);
                        j += L;
                    }
                    while j < w {
                        let (mut y0, mut y1) = (*q0.add(j), *q1.add(j));
                        let mut at = bp.add(j);
                        for q in 0..depth {
                            y0 = y0 + *x0.add(q) * *at;
                            y1 = y1 + *x1.add(q) * *at;
                            at = at.add(n);
                        }
                        *q0.add(j) = y0;
                        *q1.add(j) = y1;
                        j += 1;
                    }
                }
                true
            }
        };
    }

    block2_impl!(block2_f64, f64, 2, f64x2_splat, f64x2_mul, f64x2_add);
    block2_impl!(block2_f32, f32, 4, f32x4_splat, f32x4_mul, f32x4_add);

    simd_impl!(
        update4_f64,
        update4x2_f64,
        update1_f64,
        f64,
        2,
        f64x2_splat,
        f64x2_mul,
        f64x2_add
    );
    simd_impl!(
        update4_f32,
        update4x2_f32,
        update1_f32,
        f32,
        4,
        f32x4_splat,
        f32x4_mul,
        f32x4_add
    );
}

/// Column block of `B` / `C` (a `C` row segment of this many elements stays in L1).
const NB: usize = 256;
/// Depth block: `KB x NB` elements of `B` are reused by every row of `A`.
const KB: usize = 128;

/// `c += a @ b` for row-major `a` (m x k), `b` (k x n), `c` (m x n), with the additions into each
/// element of `c` in ascending `p` order. Does nothing unless the lengths match the dimensions.
pub fn matmul_into<T: Elem>(a: &[T], b: &[T], c: &mut [T], m: usize, k: usize, n: usize) {
    let sizes_ok = m.checked_mul(k) == Some(a.len())
        && k.checked_mul(n) == Some(b.len())
        && m.checked_mul(n) == Some(c.len());
    // (Also proves the chunk sizes below non-zero, so no panic path reaches the module.)
    let (Some(k2), Some(n2)) = (k.checked_mul(2), n.checked_mul(2)) else {
        return;
    };
    if !sizes_ok || m == 0 || k == 0 || n == 0 || k2 == 0 || n2 == 0 {
        return;
    }
    let mut j0 = 0;
    while j0 < n {
        let j1 = n.min(j0 + NB);
        let mut p0 = 0;
        while p0 < k {
            let p1 = k.min(p0 + KB);
            let block = Block {
                b,
                n,
                j0,
                j1,
                p0,
                p1,
            };
            // Two rows of A and C at a time (each B vector is loaded once for both), then the
            // last row if m is odd.
            let mut a_pairs = a.chunks_exact(k2);
            let mut c_pairs = c.chunks_exact_mut(n2);
            for (a2, c2) in (&mut a_pairs).zip(&mut c_pairs) {
                if let (Some((a_r0, a_r1)), Some((c_r0, c_r1))) =
                    (a2.split_at_checked(k), c2.split_at_mut_checked(n))
                {
                    block.two_rows(a_r0, a_r1, c_r0, c_r1);
                }
            }
            block.one_row(a_pairs.remainder(), c_pairs.into_remainder());
            p0 = p1;
        }
        j0 = j1;
    }
}

/// One (column block, depth block) step of [`matmul_into`]: columns `j0..j1` of `C`, depth
/// `p0..p1`.
struct Block<'a, T> {
    b: &'a [T],
    n: usize,
    j0: usize,
    j1: usize,
    p0: usize,
    p1: usize,
}

impl<T: Elem> Block<'_, T> {
    /// Row `p` of `B`, columns `j0..j1`.
    #[inline(always)]
    fn b_row(&self, p: usize) -> Option<&[T]> {
        self.b.get(p * self.n + self.j0..p * self.n + self.j1)
    }

    /// Rows `p..p+4` of `B`, columns `j0..j1`.
    #[inline(always)]
    fn b_quad(&self, p: usize) -> Option<[&[T]; 4]> {
        Some([
            self.b_row(p)?,
            self.b_row(p + 1)?,
            self.b_row(p + 2)?,
            self.b_row(p + 3)?,
        ])
    }

    /// `c_row[j0..j1] += a_row[p0..p1] @ B[p0..p1, j0..j1]`, in ascending `p`.
    #[inline(always)]
    fn one_row(&self, a_row: &[T], c_row: &mut [T]) {
        let (Some(c), Some(a)) = (c_row.get_mut(self.j0..self.j1), a_row.get(self.p0..self.p1))
        else {
            return; // an empty remainder (m even), or unreachable
        };
        let mut p = self.p0;
        let mut quads = a.chunks_exact(4);
        for q in &mut quads {
            if let (Some(bq), &[x0, x1, x2, x3]) = (self.b_quad(p), q) {
                T::update4(c, [x0, x1, x2, x3], bq);
            }
            p += 4;
        }
        for &x in quads.remainder() {
            if let Some(b_row) = self.b_row(p) {
                T::update1(c, x, b_row);
            }
            p += 1;
        }
    }

    /// [`Block::one_row`] for two rows at once.
    #[inline(always)]
    fn two_rows(&self, a_r0: &[T], a_r1: &[T], c_r0: &mut [T], c_r1: &mut [T]) {
        let (j0, j1, p0, p1) = (self.j0, self.j1, self.p0, self.p1);
        let (Some(c0), Some(c1), Some(a0), Some(a1)) = (
            c_r0.get_mut(j0..j1),
            c_r1.get_mut(j0..j1),
            a_r0.get(p0..p1),
            a_r1.get(p0..p1),
        ) else {
            return; // unreachable: j1 <= n, p1 <= k
        };
        if T::block2(c0, c1, a0, a1, self.b, self.n, p0, j0) {
            return;
        }
        let mut p = p0;
        let (mut quads0, mut quads1) = (a0.chunks_exact(4), a1.chunks_exact(4));
        for (q0, q1) in (&mut quads0).zip(&mut quads1) {
            if let (Some(bq), &[x0, x1, x2, x3], &[y0, y1, y2, y3]) = (self.b_quad(p), q0, q1) {
                T::update4x2(c0, c1, [x0, x1, x2, x3], [y0, y1, y2, y3], bq);
            }
            p += 4;
        }
        for (&x, &y) in quads0.remainder().iter().zip(quads1.remainder()) {
            if let Some(b_row) = self.b_row(p) {
                T::update1(c0, x, b_row);
                T::update1(c1, y, b_row);
            }
            p += 1;
        }
    }
}

/// The elements of a little-endian byte block: borrowed when the bytes are suitably aligned
/// (and the host is little-endian, as wasm32 always is), otherwise decoded into a new vector.
fn elems<T: Elem>(bytes: &[u8]) -> Result<Cow<'_, [T]>, u32> {
    if cfg!(target_endian = "little") {
        // SAFETY: every bit pattern is a valid f32/f64.
        let (pre, mid, post) = unsafe { bytes.align_to::<T>() };
        if pre.is_empty() && post.is_empty() {
            return Ok(Cow::Borrowed(mid));
        }
    }
    let count = bytes.len() / T::SIZE;
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(count)
        .map_err(|_| STATUS_OUT_OF_MEMORY)?;
    for chunk in bytes.chunks_exact(T::SIZE) {
        if v.len() < v.capacity() {
            v.push(T::from_le(chunk)); // never reallocates: capacity was reserved
        }
    }
    Ok(Cow::Owned(v))
}

fn zeroed<T: Elem>(len: usize) -> Result<Vec<T>, u32> {
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| STATUS_OUT_OF_MEMORY)?;
    // SAFETY: capacity >= len was just reserved; all-zero bytes are +0.0 for f32 and f64.
    // (`resize` would keep a "capacity overflow" panic path in the module.)
    unsafe {
        core::ptr::write_bytes(v.as_mut_ptr(), 0, len);
        v.set_len(len);
    }
    Ok(v)
}

fn compute<T: Elem>(h: &Header, a: &[u8], b: &[u8]) -> Result<Vec<T>, u32> {
    let out_elems = h.output_elems().ok_or(STATUS_OUT_OF_MEMORY)?;
    let mut c = zeroed::<T>(out_elems)?;
    let a = elems::<T>(a)?;
    let b = elems::<T>(b)?;
    matmul_into(&a, &b, &mut c, h.m as usize, h.k as usize, h.n as usize);
    if cfg!(target_endian = "big") {
        for x in c.iter_mut() {
            *x = x.to_le_repr();
        }
    }
    Ok(c)
}

/// The output `C` (elements already in little-endian byte order in memory).
#[derive(Debug, PartialEq)]
pub enum Output {
    F64(Vec<f64>),
    F32(Vec<f32>),
}

impl Output {
    /// The output bytes (borrowed).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: plain floats, viewed as their bytes; the lifetime follows `self`.
        unsafe {
            match self {
                Output::F64(v) => core::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 8),
                Output::F32(v) => core::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4),
            }
        }
    }

    /// The output bytes, leaked (the arena reclaims them on the next `pd_alloc` / `pd_run`).
    pub fn leak(self) -> &'static [u8] {
        let (ptr, len) = match self {
            Output::F64(v) => {
                let s = v.leak();
                (s.as_ptr().cast::<u8>(), s.len() * 8)
            }
            Output::F32(v) => {
                let s = v.leak();
                (s.as_ptr().cast::<u8>(), s.len() * 4)
            }
        };
        // SAFETY: the leaked allocation is never freed or written again.
        unsafe { core::slice::from_raw_parts(ptr, len) }
    }
}

/// Run one task: decode `input`, compute the tile, return `C` or a status code.
pub fn run(input: &[u8]) -> Result<Output, u32> {
    let (h, a, b) = Header::decode(input)?;
    match h.dtype {
        Dtype::F64 => compute::<f64>(&h, a, b).map(Output::F64),
        Dtype::F32 => compute::<f32>(&h, a, b).map(Output::F32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1) (xorshift64*).
    fn values(seed: u64, count: usize) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..count)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
                (r >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    fn naive<T: Elem>(a: &[T], b: &[T], m: usize, k: usize, n: usize) -> Vec<T> {
        let mut c = vec![T::default(); m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = T::default();
                for p in 0..k {
                    s = s + a[i * k + p] * b[p * n + j];
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    fn input_f64(m: u32, k: u32, n: u32, a: &[f64], b: &[f64]) -> Vec<u8> {
        let h = Header {
            dtype: Dtype::F64,
            m,
            k,
            n,
        };
        let mut v = h.encode().to_vec();
        a.iter()
            .chain(b)
            .for_each(|x| v.extend_from_slice(&x.to_le_bytes()));
        v
    }

    fn input_f32(m: u32, k: u32, n: u32, a: &[f32], b: &[f32]) -> Vec<u8> {
        let h = Header {
            dtype: Dtype::F32,
            m,
            k,
            n,
        };
        let mut v = h.encode().to_vec();
        a.iter()
            .chain(b)
            .for_each(|x| v.extend_from_slice(&x.to_le_bytes()));
        v
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 1),
        (3, 5, 2),
        (7, 3, 9),
        (13, 17, 11),
        (1, 300, 1),
        (5, 129, 257), // crosses the depth and column blocks by one
        (2, 131, 515), // and by a remainder of three / odd widths
        (33, 64, 31),
        (9, 4, 1),
    ];

    #[test]
    fn f64_matches_naive_triple_loop_bit_for_bit() {
        for (t, &(m, k, n)) in SHAPES.iter().enumerate() {
            let a = values(2 * t as u64 + 1, m * k);
            let b = values(2 * t as u64 + 2, k * n);
            let out = run(&input_f64(m as u32, k as u32, n as u32, &a, &b)).unwrap();
            let Output::F64(c) = out else { panic!("dtype") };
            assert_eq!(c, naive(&a, &b, m, k, n), "shape {m}x{k}x{n}");
        }
    }

    #[test]
    fn f32_matches_naive_triple_loop_bit_for_bit() {
        for (t, &(m, k, n)) in SHAPES.iter().enumerate() {
            let a: Vec<f32> = values(100 + t as u64, m * k)
                .iter()
                .map(|&x| x as f32)
                .collect();
            let b: Vec<f32> = values(200 + t as u64, k * n)
                .iter()
                .map(|&x| x as f32)
                .collect();
            let out = run(&input_f32(m as u32, k as u32, n as u32, &a, &b)).unwrap();
            assert_eq!(out.as_bytes().len(), m * n * 4);
            let Output::F32(c) = out else { panic!("dtype") };
            assert_eq!(c, naive(&a, &b, m, k, n), "shape {m}x{k}x{n}");
        }
    }

    #[test]
    fn small_exact_product_and_output_bytes() {
        // [[1,2,3],[4,5,6]] @ [[7,8],[9,10],[11,12]] = [[58,64],[139,154]]
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let out = run(&input_f64(2, 3, 2, &a, &b)).unwrap();
        let want: Vec<u8> = [58.0f64, 64.0, 139.0, 154.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(out.as_bytes(), &want[..]);
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
        let out = run(&input_f32(2, 3, 2, &a32, &b32)).unwrap();
        let want: Vec<u8> = [58.0f32, 64.0, 139.0, 154.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(out.as_bytes(), &want[..]);
    }

    #[test]
    fn unaligned_input_is_decoded() {
        let (m, k, n) = (3, 5, 4);
        let a = values(7, m * k);
        let b = values(8, k * n);
        let data = input_f64(m as u32, k as u32, n as u32, &a, &b);
        let mut shifted = vec![0u8; data.len() + 1];
        shifted[1..].copy_from_slice(&data);
        let Output::F64(c) = run(&shifted[1..]).unwrap() else {
            panic!("dtype")
        };
        assert_eq!(c, naive(&a, &b, m, k, n));
    }

    #[test]
    fn header_roundtrip() {
        let h = Header {
            dtype: Dtype::F32,
            m: 2,
            k: 3,
            n: 4,
        };
        let data = input_f32(2, 3, 4, &[0.0; 6], &[0.0; 12]);
        let (d, a, b) = Header::decode(&data).unwrap();
        assert_eq!(d, h);
        assert_eq!((a.len(), b.len()), (24, 48));
        assert_eq!(
            &h.encode(),
            &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]
        );
    }

    #[test]
    fn bad_length() {
        let good = input_f64(2, 3, 4, &[1.0; 6], &[1.0; 12]);
        assert!(run(&good).is_ok());
        assert_eq!(run(&[]), Err(STATUS_BAD_LENGTH));
        assert_eq!(run(&good[..15]), Err(STATUS_BAD_LENGTH));
        assert_eq!(run(&good[..good.len() - 1]), Err(STATUS_BAD_LENGTH));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(run(&long), Err(STATUS_BAD_LENGTH));
        // an f64 body announced as f32 is twice too long
        let mut as_f32 = good.clone();
        as_f32[0] = 1;
        assert_eq!(run(&as_f32), Err(STATUS_BAD_LENGTH));
    }

    #[test]
    fn bad_params() {
        let header = |dtype: u32, m: u32, k: u32, n: u32| {
            let mut v = Vec::new();
            for x in [dtype, m, k, n] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v.extend_from_slice(&[0u8; 64]);
            v
        };
        for data in [
            header(2, 1, 1, 1),
            header(u32::MAX, 1, 1, 1),
            header(0, 0, 1, 1),
            header(0, 1, 0, 1),
            header(0, 1, 1, 0),
            header(0, 65536, 65536, 1),       // A alone is 32 GiB
            header(1, 1, u32::MAX, u32::MAX), // B overflows 64 bits of bytes
            header(0, 1 << 29, 1, 1),         // 16 + 4 GiB + 8 > 4 GiB - 1
        ] {
            assert_eq!(run(&data), Err(STATUS_BAD_PARAMS), "{:?}", &data[..16]);
        }
    }

    #[test]
    fn huge_output_is_out_of_memory() {
        // m = n = 65536, k = 1: a 1 MiB input whose f64 output would be 32 GiB.
        let (m, k, n) = (65536u32, 1u32, 65536u32);
        let h = Header {
            dtype: Dtype::F64,
            m,
            k,
            n,
        };
        let mut data = h.encode().to_vec();
        data.resize(HEADER_LEN + 8 * (m as usize + n as usize), 0);
        assert_eq!(run(&data), Err(STATUS_OUT_OF_MEMORY));
    }

    #[test]
    fn matmul_into_ignores_mismatched_lengths() {
        let mut c = vec![0.0f64; 4];
        matmul_into(&[1.0; 3], &[1.0; 4], &mut c, 2, 2, 2);
        assert_eq!(c, vec![0.0; 4]);
    }
}

// ---------------------------------------------------------------------------------------------
// wasm32 only: the exported ABI (allocator, panic handler and plumbing live in `pd_abi`).
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "wasm32")]
mod abi {
    /// Reserve `len` bytes for the next input and return their address (0 on failure).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_alloc(len: u32) -> u32 {
        pd_abi::alloc(len)
    }

    /// Run the task on the `len` bytes at `ptr`; returns a status code (0 = ok).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_run(ptr: u32, len: u32) -> u32 {
        pd_abi::run(ptr, len, |input| super::run(input).map(super::Output::leak))
    }

    /// Address of the last successful run's output (0 if none).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_output_ptr() -> u32 {
        pd_abi::output_ptr()
    }

    /// Length in bytes of the last successful run's output (0 if none).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_output_len() -> u32 {
        pd_abi::output_len()
    }
}
