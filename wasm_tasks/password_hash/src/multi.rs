//! Multi-buffer PBKDF2-HMAC-SHA256 (the `simd` feature): four independent PBKDF2 chains at
//! once, one per 32-bit lane of a SIMD128 register (`i32x4` add, `v128` and/xor, rotates as
//! shift + shift + or), the technique of CPU and GPU password crackers.
//!
//! A chain is one 32-byte block of one derived key: (password, salt, block index). After the
//! per-lane set-up (the HMAC key's inner and outer states, and `U1 = HMAC(P, salt || INT(i))`,
//! in scalar code), every further iteration is two compressions of a fixed-size block (32 bytes
//! of message + constant padding) in all four lanes: `U_j = H(outer, H(inner, U_{j-1}))`,
//! `T ^= U_j`. That loop is all of the cost, and it is the same for every lane, which is what
//! makes four chains in lockstep exact: no lane ever waits on another's data.
//!
//! On wasm32 with `+simd128` the lanes are a `v128`; elsewhere (native `cargo test --features
//! simd`) they are a `[u32; 4]` running the very same generic code.

//! No slice indexing that could panic: a reachable panic would put a source path in the module
//! (tests/test_kernel_password_hash.py checks there is none).

use super::{BLOCK, Reader, STATUS_BAD_PARAMS};

/// Chains per group.
pub const LANES: usize = 4;

/// A 32-bit word, or four of them in lanes.
pub trait Word: Copy {
    fn splat(x: u32) -> Self;
    fn add(self, o: Self) -> Self;
    fn xor(self, o: Self) -> Self;
    fn and(self, o: Self) -> Self;
    fn shr(self, n: u32) -> Self;
    fn rotr(self, n: u32) -> Self;
}

#[inline(always)]
fn big_s0<W: Word>(x: W) -> W {
    x.rotr(2).xor(x.rotr(13)).xor(x.rotr(22))
}
#[inline(always)]
fn big_s1<W: Word>(x: W) -> W {
    x.rotr(6).xor(x.rotr(11)).xor(x.rotr(25))
}
#[inline(always)]
fn small_s0<W: Word>(x: W) -> W {
    x.rotr(7).xor(x.rotr(18)).xor(x.shr(3))
}
#[inline(always)]
fn small_s1<W: Word>(x: W) -> W {
    x.rotr(17).xor(x.rotr(19)).xor(x.shr(10))
}
/// Ch(e, f, g) = (e & f) ^ (!e & g), in three operations.
#[inline(always)]
fn ch<W: Word>(e: W, f: W, g: W) -> W {
    g.xor(e.and(f.xor(g)))
}

include!("sha256_rounds.rs");

impl Word for u32 {
    #[inline(always)]
    fn splat(x: u32) -> u32 {
        x
    }
    #[inline(always)]
    fn add(self, o: u32) -> u32 {
        self.wrapping_add(o)
    }
    #[inline(always)]
    fn xor(self, o: u32) -> u32 {
        self ^ o
    }
    #[inline(always)]
    fn and(self, o: u32) -> u32 {
        self & o
    }
    #[inline(always)]
    fn shr(self, n: u32) -> u32 {
        self >> n
    }
    #[inline(always)]
    fn rotr(self, n: u32) -> u32 {
        self.rotate_right(n)
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod x4 {
    use super::Word;
    use core::arch::wasm32::*;

    /// Four u32 lanes in a SIMD128 register.
    #[derive(Clone, Copy)]
    pub struct X4(v128);

    impl X4 {
        #[inline(always)]
        pub fn from_lanes(l: [u32; 4]) -> X4 {
            X4(u32x4(l[0], l[1], l[2], l[3]))
        }
        #[inline(always)]
        pub fn lanes(self) -> [u32; 4] {
            [
                u32x4_extract_lane::<0>(self.0),
                u32x4_extract_lane::<1>(self.0),
                u32x4_extract_lane::<2>(self.0),
                u32x4_extract_lane::<3>(self.0),
            ]
        }
    }

    impl Word for X4 {
        #[inline(always)]
        fn splat(x: u32) -> X4 {
            X4(u32x4_splat(x))
        }
        #[inline(always)]
        fn add(self, o: X4) -> X4 {
            X4(i32x4_add(self.0, o.0))
        }
        #[inline(always)]
        fn xor(self, o: X4) -> X4 {
            X4(v128_xor(self.0, o.0))
        }
        #[inline(always)]
        fn and(self, o: X4) -> X4 {
            X4(v128_and(self.0, o.0))
        }
        #[inline(always)]
        fn shr(self, n: u32) -> X4 {
            X4(u32x4_shr(self.0, n))
        }
        #[inline(always)]
        fn rotr(self, n: u32) -> X4 {
            // No vector rotate in SIMD128: (x >> n) | (x << (32 - n)).
            X4(v128_or(u32x4_shr(self.0, n), i32x4_shl(self.0, 32 - n)))
        }
    }
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
mod x4 {
    use super::Word;

    /// Four u32 lanes as a plain array (native builds).
    #[derive(Clone, Copy)]
    pub struct X4([u32; 4]);

    impl X4 {
        #[inline(always)]
        pub fn from_lanes(l: [u32; 4]) -> X4 {
            X4(l)
        }
        #[inline(always)]
        pub fn lanes(self) -> [u32; 4] {
            self.0
        }
        #[inline(always)]
        fn map(self, f: impl Fn(u32) -> u32) -> X4 {
            X4(self.0.map(f))
        }
        #[inline(always)]
        fn zip(self, o: X4, f: impl Fn(u32, u32) -> u32) -> X4 {
            X4(core::array::from_fn(|k| f(self.0[k], o.0[k])))
        }
    }

    impl Word for X4 {
        #[inline(always)]
        fn splat(x: u32) -> X4 {
            X4([x; 4])
        }
        #[inline(always)]
        fn add(self, o: X4) -> X4 {
            self.zip(o, u32::wrapping_add)
        }
        #[inline(always)]
        fn xor(self, o: X4) -> X4 {
            self.zip(o, |a, b| a ^ b)
        }
        #[inline(always)]
        fn and(self, o: X4) -> X4 {
            self.zip(o, |a, b| a & b)
        }
        #[inline(always)]
        fn shr(self, n: u32) -> X4 {
            self.map(|a| a >> n)
        }
        #[inline(always)]
        fn rotr(self, n: u32) -> X4 {
            self.map(|a| a.rotate_right(n))
        }
    }
}

pub use x4::X4;

const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];

/// `state` after compressing a block of 32 message bytes (`m`, 8 words) that ends a message
/// of 64 + 32 bytes: HMAC-SHA256's inner and outer hashes of a 32-byte input. The 8 padding
/// words are constants, which LLVM folds into the rounds and the message schedule.
#[inline(always)]
fn compress32<W: Word>(state: &[W; 8], m: &[W; 8]) -> [W; 8] {
    let z = W::splat(0);
    let block = [
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        m[6],
        m[7],
        W::splat(0x8000_0000),
        z,
        z,
        z,
        z,
        z,
        z,
        W::splat((64 + 32) * 8),
    ];
    let mut s = *state;
    compress(&mut s, &block);
    s
}

fn words(block: &[u8; 64]) -> [u32; 16] {
    let mut w = [0u32; 16];
    for (dst, src) in w.iter_mut().zip(block.as_chunks::<4>().0) {
        *dst = u32::from_be_bytes(*src);
    }
    w
}

/// SHA-256 state after absorbing the concatenation of `parts` behind `absorbed` bytes already
/// compressed into `state` (a multiple of 64), and the final padding.
fn finish(mut state: [u32; 8], absorbed: u64, parts: &[&[u8]]) -> [u32; 8] {
    let mut buf = [0u8; 64];
    let mut fill = 0usize;
    let mut total = absorbed;
    for part in parts {
        for &b in *part {
            if let Some(slot) = buf.get_mut(fill) {
                *slot = b;
            }
            fill += 1;
            total += 1;
            if fill == 64 {
                compress(&mut state, &words(&buf));
                fill = 0;
            }
        }
    }
    if let Some(slot) = buf.get_mut(fill) {
        *slot = 0x80;
    }
    fill += 1;
    if fill > 56 {
        buf.iter_mut().skip(fill).for_each(|b| *b = 0);
        compress(&mut state, &words(&buf));
        fill = 0;
    }
    buf.iter_mut().take(56).skip(fill).for_each(|b| *b = 0);
    if let Some(len) = buf.last_chunk_mut::<8>() {
        *len = (total * 8).to_be_bytes();
    }
    compress(&mut state, &words(&buf));
    state
}

/// HMAC-SHA256 with a password as key: the states after its ipad and opad blocks.
struct Keyed {
    inner: [u32; 8],
    outer: [u32; 8],
}

fn keyed(password: &[u8]) -> Keyed {
    let mut key = [0u8; 64];
    if password.len() > 64 {
        let digest = finish(IV, 0, &[password]);
        for (dst, w) in key.as_chunks_mut::<4>().0.iter_mut().zip(digest) {
            *dst = w.to_be_bytes();
        }
    } else {
        for (dst, b) in key.iter_mut().zip(password) {
            *dst = *b;
        }
    }
    let pad = |p: u8| {
        let mut state = IV;
        compress(&mut state, &words(&key.map(|b| b ^ p)));
        state
    };
    Keyed {
        inner: pad(0x36),
        outer: pad(0x5C),
    }
}

/// One PBKDF2 chain: block `index` (1-based) of the key derived from `password` and `salt`.
#[derive(Clone, Copy)]
pub struct Chain<'a> {
    pub password: &'a [u8],
    pub salt: &'a [u8],
    pub index: u32,
}

/// Four chains in lockstep; each result is one 32-byte PBKDF2 block (`T_index`).
pub fn derive4(chains: &[Chain<'_>; LANES], iterations: u32) -> [[u8; BLOCK]; LANES] {
    let keys: [Keyed; LANES] = core::array::from_fn(|l| keyed(chains[l].password));
    let u1: [[u32; 8]; LANES] = core::array::from_fn(|l| {
        let c = &chains[l];
        let inner = finish(keys[l].inner, 64, &[c.salt, &c.index.to_be_bytes()]);
        compress32(&keys[l].outer, &inner)
    });
    let gather = |f: &dyn Fn(usize) -> [u32; 8]| -> [X4; 8] {
        let rows: [[u32; 8]; LANES] = core::array::from_fn(f);
        core::array::from_fn(|k| X4::from_lanes(core::array::from_fn(|l| rows[l][k])))
    };
    let inner = gather(&|l| keys[l].inner);
    let outer = gather(&|l| keys[l].outer);
    let mut u = gather(&|l| u1[l]);
    let mut t = u;
    for _ in 1..iterations {
        u = compress32(&outer, &compress32(&inner, &u));
        for (tk, uk) in t.iter_mut().zip(u) {
            *tk = tk.xor(uk);
        }
    }
    let lanes: [[u32; LANES]; 8] = t.map(X4::lanes);
    let mut out = [[0u8; BLOCK]; LANES];
    for (l, key) in out.iter_mut().enumerate() {
        for (dst, words) in key.as_chunks_mut::<4>().0.iter_mut().zip(&lanes) {
            if let Some(w) = words.get(l) {
                *dst = w.to_be_bytes();
            }
        }
    }
    out
}

/// The whole key `out` (any length) of one password, its blocks four at a time.
pub fn derive(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    let mut index = 1u32;
    for part in out.chunks_mut(LANES * BLOCK) {
        let chains: [Chain<'_>; LANES] = core::array::from_fn(|l| Chain {
            password,
            salt,
            index: index + l as u32,
        });
        let keys = derive4(&chains, iterations);
        for (dst, key) in part.chunks_mut(BLOCK).zip(&keys) {
            for (d, k) in dst.iter_mut().zip(key) {
                *d = *k;
            }
        }
        index += LANES as u32;
    }
}

/// Mode 0 over validated `records` (`count` of them): every (record, block) chain, four at a
/// time in record order, into `out` (`count * dklen` bytes).
pub fn hash_into(
    iterations: u32,
    dklen: usize,
    records: &[u8],
    count: u32,
    out: &mut [u8],
) -> Result<(), u32> {
    let blocks = dklen.div_ceil(BLOCK) as u32;
    let mut r = Reader { rest: records };
    let mut rec: (&[u8], &[u8]) = (&[], &[]);
    let mut left = count;
    let mut next_block = blocks + 1; // > blocks: read a record first
    // The destinations of the chains in the group: (output offset, bytes).
    let mut dst = [(0usize, 0usize); LANES];
    let mut group = [Chain {
        password: &[],
        salt: &[],
        index: 1,
    }; LANES];
    let mut offset = 0usize;
    loop {
        let mut n = 0;
        for (c, d) in group.iter_mut().zip(dst.iter_mut()) {
            if next_block > blocks {
                if left == 0 {
                    break;
                }
                rec = (r.prefixed()?, r.prefixed()?);
                left -= 1;
                next_block = 1;
            }
            let len = (dklen - (next_block as usize - 1) * BLOCK).min(BLOCK);
            *c = Chain {
                password: rec.0,
                salt: rec.1,
                index: next_block,
            };
            *d = (offset, len);
            offset += len;
            next_block += 1;
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        // Spare lanes repeat the group's first chain; their output is dropped.
        let spare = group[0];
        group.iter_mut().skip(n).for_each(|c| *c = spare);
        let keys = derive4(&group, iterations);
        for (&(at, len), key) in dst.iter().zip(&keys).take(n) {
            let to = out.get_mut(at..at + len).ok_or(STATUS_BAD_PARAMS)?;
            for (d, k) in to.iter_mut().zip(key) {
                *d = *k;
            }
        }
    }
}

/// Mode 1 over validated `candidates`: the first candidate (in list order) whose key equals
/// `target`, and how many candidates that is (`index + 1`), or `None` after all `count`.
/// Candidates are checked four at a time on their first block; a lane whose first block
/// matches is confirmed on the whole key (into `full`) when `target` is longer than one block.
pub fn crack(
    iterations: u32,
    salt: &[u8],
    target: &[u8],
    candidates: &[u8],
    count: u32,
    full: &mut [u8],
) -> Result<Option<u32>, u32> {
    let (first, _) = target
        .split_at_checked(target.len().min(BLOCK))
        .ok_or(STATUS_BAD_PARAMS)?;
    let mut r = Reader { rest: candidates };
    let mut group = [Chain {
        password: &[],
        salt,
        index: 1,
    }; LANES];
    let mut base = 0u32;
    while base < count {
        let n = (count - base).min(LANES as u32) as usize;
        for slot in group.iter_mut().take(n) {
            slot.password = r.prefixed()?;
        }
        let spare = group[0];
        group.iter_mut().skip(n).for_each(|c| *c = spare);
        let keys = derive4(&group, iterations);
        // Lanes in list order: the first whole-key match is the answer.
        for (l, (key, chain)) in keys.iter().zip(&group).take(n).enumerate() {
            if key.get(..first.len()) != Some(first) {
                continue;
            }
            if !full.is_empty() {
                derive(chain.password, salt, iterations, full);
                if &*full != target {
                    continue;
                }
            }
            return Ok(Some(base + l as u32));
        }
        base += n as u32;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HEADER_LEN, Header, MODE_CRACK, MODE_HASH, NOT_FOUND, derive, run};
    use alloc::vec;
    use alloc::vec::Vec;
    use sha2::Digest;

    /// A small deterministic generator (xorshift) for varied inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, max: usize) -> Vec<u8> {
            let n = (self.next() % (max as u64 + 1)) as usize;
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn prefixed(v: &mut Vec<u8>, b: &[u8]) {
        v.extend_from_slice(&(b.len() as u32).to_le_bytes());
        v.extend_from_slice(b);
    }

    #[test]
    fn scalar_sha256_matches_sha2_crate() {
        let mut rng = Rng(7);
        for len in (0..200).chain([511, 512, 1000]) {
            let msg: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let want = sha2::Sha256::digest(&msg);
            let got: Vec<u8> = finish(IV, 0, &[&msg[..len / 3], &msg[len / 3..]])
                .iter()
                .flat_map(|w| w.to_be_bytes())
                .collect();
            assert_eq!(got, want.to_vec(), "len {len}");
        }
    }

    #[test]
    fn derive4_equals_pbkdf2_crate_per_lane() {
        let mut rng = Rng(99);
        for round in 0..40 {
            let pw: Vec<Vec<u8>> = (0..LANES).map(|_| rng.bytes(150)).collect();
            let salts: Vec<Vec<u8>> = (0..LANES).map(|_| rng.bytes(130)).collect();
            let iterations = 1 + (rng.next() % 40) as u32;
            let chains: [Chain<'_>; LANES] = core::array::from_fn(|l| Chain {
                password: &pw[l],
                salt: &salts[l],
                index: 1 + (rng.next() % 3) as u32,
            });
            let got = derive4(&chains, iterations);
            for l in 0..LANES {
                let c = chains[l];
                let mut want = vec![0u8; BLOCK * c.index as usize];
                derive(c.password, c.salt, iterations, &mut want).unwrap();
                assert_eq!(
                    got[l][..],
                    want[want.len() - BLOCK..],
                    "round {round} lane {l}"
                );
            }
        }
    }

    #[test]
    fn hash_mode_equals_scalar_for_every_group_shape() {
        let mut rng = Rng(3);
        for count in 1..=9u32 {
            for dklen in [1u32, 20, 32, 33, 64, 65, 100] {
                let rows: Vec<(Vec<u8>, Vec<u8>)> =
                    (0..count).map(|_| (rng.bytes(80), rng.bytes(70))).collect();
                let iterations = 1 + (rng.next() % 5) as u32;
                let h = Header {
                    mode: MODE_HASH,
                    iterations,
                    dklen,
                    count,
                };
                let mut input = h.encode().to_vec();
                for (p, s) in &rows {
                    prefixed(&mut input, p);
                    prefixed(&mut input, s);
                }
                let mut want = Vec::new();
                for (p, s) in &rows {
                    let mut dk = vec![0u8; dklen as usize];
                    derive(p, s, iterations, &mut dk).unwrap();
                    want.extend(dk);
                }
                // This module directly (also without the feature), and `run` (this module
                // with the `simd` feature, the scalar code without it).
                let mut direct = vec![0u8; want.len()];
                hash_into(
                    iterations,
                    dklen as usize,
                    &input[HEADER_LEN..],
                    count,
                    &mut direct,
                )
                .unwrap();
                assert_eq!(direct, want, "count {count} dklen {dklen}");
                assert_eq!(run(&input).unwrap(), want, "count {count} dklen {dklen}");
            }
        }
    }

    fn crack_run(iterations: u32, salt: &[u8], target: &[u8], words: &[Vec<u8>]) -> (u32, u32) {
        let h = Header {
            mode: MODE_CRACK,
            iterations,
            dklen: target.len() as u32,
            count: words.len() as u32,
        };
        let mut input = h.encode().to_vec();
        assert_eq!(input.len(), HEADER_LEN);
        prefixed(&mut input, salt);
        input.extend_from_slice(target);
        for w in words {
            prefixed(&mut input, w);
        }
        let out = run(&input).unwrap();
        let w = |i: usize| u32::from_le_bytes(out[i..i + 4].try_into().unwrap());
        // This module directly must agree with `run` (see hash_mode_equals_scalar...).
        let mut full = if target.len() > BLOCK {
            vec![0u8; target.len()]
        } else {
            Vec::new()
        };
        let cands = &input[HEADER_LEN + 4 + salt.len() + target.len()..];
        let direct = match crack(
            iterations,
            salt,
            target,
            cands,
            words.len() as u32,
            &mut full,
        )
        .unwrap()
        {
            Some(index) => (index, index + 1),
            None => (NOT_FOUND, words.len() as u32),
        };
        assert_eq!(direct, (w(0), w(4)));
        direct
    }

    /// The first hit in list order wins wherever it falls in a group (and with later hits in
    /// the same group), and `hashed` is `index + 1`; a miss hashes `count`.
    #[test]
    fn crack_first_hit_in_list_order() {
        let salt = b"job-salt";
        for dklen in [16usize, 32, 48] {
            let mut target = vec![0u8; dklen];
            derive(b"secret", salt, 2, &mut target).unwrap();
            for count in 1..=10usize {
                for hit in 0..count {
                    let mut words: Vec<Vec<u8>> = (0..count)
                        .map(|k| alloc::format!("w{k}").into_bytes())
                        .collect();
                    words[hit] = b"secret".to_vec();
                    if hit + 1 < count {
                        words[count - 1] = b"secret".to_vec(); // a later duplicate
                    }
                    let got = crack_run(2, salt, &target, &words);
                    assert_eq!(
                        got,
                        (hit as u32, hit as u32 + 1),
                        "dklen {dklen} count {count} hit {hit}"
                    );
                }
                let words: Vec<Vec<u8>> = (0..count)
                    .map(|k| alloc::format!("w{k}").into_bytes())
                    .collect();
                assert_eq!(
                    crack_run(2, salt, &target, &words),
                    (NOT_FOUND, count as u32)
                );
            }
        }
    }
}
