//! ProcessDistro PBKDF2-HMAC-SHA256 kernel with two modes (layouts in docs/wasm-abi.md):
//!
//! - mode 0 "hash": derive `dk = PBKDF2-HMAC-SHA256(password, salt, iterations, dklen)` for
//!   `count` (password, salt) records; the output is the `count * dklen` derived-key bytes in
//!   record order.
//! - mode 1 "crack": one salt and a target `dk`; find the first of `count` candidate passwords
//!   whose derived key equals the target. The output is two u32: the index of that candidate
//!   (`0xFFFF_FFFF` if none) and the number of candidates hashed.
//!
//! PBKDF2, HMAC and SHA-256 are the RustCrypto `pbkdf2`, `hmac` and `sha2` crates (no_std, no
//! default features). The whole input is validated (header and every record) before any
//! hashing, so a malformed input fails at once.
//!
//! The pure logic is plain Rust and is unit-tested natively with `cargo test`. On `wasm32` the
//! crate is `no_std` + `alloc`; the allocator, panic handler and ABI plumbing come from
//! `pd_abi`, and the exports are the small block at the bottom of this file.
//!
//! With the `simd` feature both modes run on [`multi`]: multi-buffer SHA-256, four PBKDF2
//! chains at once in the lanes of a SIMD128 register. Same outputs, same `hashed` count.
#![cfg_attr(target_arch = "wasm32", no_std)]

#[cfg(all(
    feature = "simd",
    target_arch = "wasm32",
    not(target_feature = "simd128")
))]
compile_error!("the `simd` feature needs `-C target-feature=+simd128` (see wasm_tasks/build.sh)");

extern crate alloc;

// Also compiled for `cargo test` without the feature, so the plain test run checks it (on
// [u32; 4] lanes) against the scalar code.
#[cfg(any(feature = "simd", test))]
pub mod multi;

use alloc::vec::Vec;
use hmac::Hmac;
use sha2::Sha256;

pub use pd_abi::{STATUS_BAD_LENGTH, STATUS_BAD_PARAMS, STATUS_OK, STATUS_OUT_OF_MEMORY};

/// Mode byte of a "hash" task.
pub const MODE_HASH: u8 = 0;
/// Mode byte of a "crack" task.
pub const MODE_CRACK: u8 = 1;
/// Length of the common header (mode, padding, iterations, dklen, count).
pub const HEADER_LEN: usize = 16;
/// Crack output index when no candidate matches.
pub const NOT_FOUND: u32 = u32::MAX;
/// SHA-256 output length: one PBKDF2 block.
const BLOCK: usize = 32;

/// `dk = PBKDF2-HMAC-SHA256(password, salt, iterations, out.len())` into `out`.
pub fn derive(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) -> Result<(), u32> {
    // HMAC accepts keys of any length, so this never fails; no panic path either way.
    pbkdf2::pbkdf2::<Hmac<Sha256>>(password, salt, iterations, out).map_err(|_| STATUS_BAD_PARAMS)
}

/// A zero-filled byte vector, `Err(STATUS_OUT_OF_MEMORY)` if it cannot be allocated.
fn zeroed(len: usize) -> Result<Vec<u8>, u32> {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| STATUS_OUT_OF_MEMORY)?;
    // SAFETY: capacity >= len was just reserved and all `len` bytes are initialised before
    // `set_len`. (`resize` would keep a "capacity overflow" panic path in the module.)
    unsafe {
        core::ptr::write_bytes(v.as_mut_ptr(), 0, len);
        v.set_len(len);
    }
    Ok(v)
}

/// Reads little-endian fields and length-prefixed byte strings from the front of a slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, len: usize) -> Result<&'a [u8], u32> {
        let (head, tail) = self.rest.split_at_checked(len).ok_or(STATUS_BAD_LENGTH)?;
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, u32> {
        let b = self.bytes(4)?;
        let a = b.first_chunk::<4>().ok_or(STATUS_BAD_LENGTH)?;
        Ok(u32::from_le_bytes(*a))
    }

    /// A `u32` length followed by that many bytes.
    fn prefixed(&mut self) -> Result<&'a [u8], u32> {
        let len = self.u32()?;
        self.bytes(usize::try_from(len).map_err(|_| STATUS_BAD_LENGTH)?)
    }
}

/// The common 16-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub mode: u8,
    pub iterations: u32,
    pub dklen: u32,
    pub count: u32,
}

impl Header {
    /// The 16-byte header (used by tests and host-side tooling).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.mode;
        b[4..8].copy_from_slice(&self.iterations.to_le_bytes());
        b[8..12].copy_from_slice(&self.dklen.to_le_bytes());
        b[12..16].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    fn decode(r: &mut Reader<'_>) -> Result<Header, u32> {
        let head = r.bytes(4)?;
        let (mode, padding) = head.split_first().ok_or(STATUS_BAD_LENGTH)?;
        let h = Header {
            mode: *mode,
            iterations: r.u32()?,
            dklen: r.u32()?,
            count: r.u32()?,
        };
        let known = h.mode == MODE_HASH || h.mode == MODE_CRACK;
        if !known
            || padding.iter().any(|&b| b != 0)
            || h.iterations == 0
            || h.dklen == 0
            || h.count == 0
        {
            return Err(STATUS_BAD_PARAMS);
        }
        Ok(h)
    }
}

/// Mode 0: derive one key per (password, salt) record.
#[cfg_attr(feature = "simd", allow(unreachable_code))]
fn hash(h: &Header, mut r: Reader<'_>) -> Result<Vec<u8>, u32> {
    // Validate every record (and the exact input length) before doing any work.
    let records = r.rest;
    for _ in 0..h.count {
        r.prefixed()?;
        r.prefixed()?;
    }
    if !r.rest.is_empty() {
        return Err(STATUS_BAD_LENGTH);
    }
    let dklen = h.dklen as usize;
    let total = u64::from(h.count) * u64::from(h.dklen);
    if total > u64::from(u32::MAX) {
        return Err(STATUS_OUT_OF_MEMORY);
    }
    let mut out = zeroed(usize::try_from(total).map_err(|_| STATUS_OUT_OF_MEMORY)?)?;
    #[cfg(feature = "simd")]
    {
        multi::hash_into(h.iterations, dklen, records, h.count, &mut out)?;
        return Ok(out);
    }
    let mut r = Reader { rest: records };
    for dk in out.chunks_exact_mut(dklen) {
        let password = r.prefixed()?;
        let salt = r.prefixed()?;
        derive(password, salt, h.iterations, dk)?;
    }
    Ok(out)
}

/// Mode 1: the index of the first candidate whose key equals the target, and how many
/// candidates were hashed.
#[cfg_attr(
    feature = "simd",
    allow(unreachable_code, unused_variables, unused_mut)
)]
fn crack(h: &Header, mut r: Reader<'_>) -> Result<(u32, u32), u32> {
    let salt = r.prefixed()?;
    let target = r.bytes(h.dklen as usize)?;
    let candidates = r.rest;
    for _ in 0..h.count {
        r.prefixed()?;
    }
    if !r.rest.is_empty() {
        return Err(STATUS_BAD_LENGTH);
    }
    // A PBKDF2 key is a prefix of any longer key from the same inputs (block i depends only on
    // i), so each candidate is first checked on its first block alone; only a candidate whose
    // first block matches pays for the remaining blocks.
    let (first, _) = target
        .split_at_checked(target.len().min(BLOCK))
        .ok_or(STATUS_BAD_PARAMS)?;
    let mut block = [0u8; BLOCK];
    let block = block.get_mut(..first.len()).ok_or(STATUS_BAD_PARAMS)?;
    let mut full = if target.len() > BLOCK {
        zeroed(target.len())?
    } else {
        Vec::new()
    };
    #[cfg(feature = "simd")]
    {
        return Ok(
            match multi::crack(h.iterations, salt, target, candidates, h.count, &mut full)? {
                Some(index) => (index, index + 1),
                None => (NOT_FOUND, h.count),
            },
        );
    }
    let mut r = Reader { rest: candidates };
    for index in 0..h.count {
        let candidate = r.prefixed()?;
        derive(candidate, salt, h.iterations, block)?;
        if block != first {
            continue;
        }
        if !full.is_empty() {
            derive(candidate, salt, h.iterations, &mut full)?;
            if full.as_slice() != target {
                continue;
            }
        }
        return Ok((index, index + 1));
    }
    Ok((NOT_FOUND, h.count))
}

/// Run one task: decode `input`, hash, return the output bytes or a status code.
pub fn run(input: &[u8]) -> Result<Vec<u8>, u32> {
    let mut r = Reader { rest: input };
    let h = Header::decode(&mut r)?;
    if h.mode == MODE_HASH {
        return hash(&h, r);
    }
    let (index, hashed) = crack(&h, r)?;
    let mut out = zeroed(8)?;
    for (dst, src) in out
        .iter_mut()
        .zip(index.to_le_bytes().into_iter().chain(hashed.to_le_bytes()))
    {
        *dst = src;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn prefixed(v: &mut Vec<u8>, b: &[u8]) {
        v.extend_from_slice(&(b.len() as u32).to_le_bytes());
        v.extend_from_slice(b);
    }

    fn hash_input(iterations: u32, dklen: u32, rows: &[(&[u8], &[u8])]) -> Vec<u8> {
        let h = Header {
            mode: MODE_HASH,
            iterations,
            dklen,
            count: rows.len() as u32,
        };
        let mut v = h.encode().to_vec();
        for (p, s) in rows {
            prefixed(&mut v, p);
            prefixed(&mut v, s);
        }
        v
    }

    fn crack_input(iterations: u32, salt: &[u8], target: &[u8], candidates: &[&[u8]]) -> Vec<u8> {
        let h = Header {
            mode: MODE_CRACK,
            iterations,
            dklen: target.len() as u32,
            count: candidates.len() as u32,
        };
        let mut v = h.encode().to_vec();
        prefixed(&mut v, salt);
        v.extend_from_slice(target);
        for c in candidates {
            prefixed(&mut v, c);
        }
        v
    }

    fn crack_out(out: &[u8]) -> (u32, u32) {
        let w = |i: usize| u32::from_le_bytes(out[i..i + 4].try_into().unwrap());
        assert_eq!(out.len(), 8);
        (w(0), w(4))
    }

    // RFC 7914, section 11 (PBKDF2-HMAC-SHA256 test vectors).
    const RFC7914_1: &str =
        "55 ac 04 6e 56 e3 08 9f ec 16 91 c2 25 44 b6 05 f9 41 85 21 6d de 04 65
        e6 8b 9d 57 c2 0d ac bc 49 ca 9c cc f1 79 b6 45 99 16 64 b3 9d 77 ef 31 7c 71 b8 45 b1 e3
        0b d5 09 11 20 41 d3 a1 97 83";
    const RFC7914_2: &str =
        "4d dc d8 f6 0b 98 be 21 83 0c ee 5e f2 27 01 f9 64 1a 44 18 d0 4c 04 14
        ae ff 08 87 6b 34 ab 56 a1 d4 25 a1 22 58 33 54 9a db 84 1b 51 c9 b3 17 6a 27 2b de bb a1
        d0 78 47 8f 62 b3 97 f3 3c 8d";

    #[test]
    fn rfc7914_vectors() {
        let mut dk = [0u8; 64];
        derive(b"passwd", b"salt", 1, &mut dk).unwrap();
        assert_eq!(dk.to_vec(), unhex(RFC7914_1));
        derive(b"Password", b"NaCl", 80000, &mut dk).unwrap();
        assert_eq!(dk.to_vec(), unhex(RFC7914_2));
    }

    #[test]
    fn more_known_vectors() {
        // Widely published PBKDF2-HMAC-SHA256 vectors (checked against Python's hashlib).
        let cases: &[(&[u8], &[u8], u32, &str)] = &[
            (
                b"password",
                b"salt",
                1,
                "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b",
            ),
            (
                b"password",
                b"salt",
                2,
                "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43",
            ),
            (
                b"password",
                b"salt",
                4096,
                "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a",
            ),
            (
                b"passwordPASSWORDpassword",
                b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
                4096,
                "348c89dbcbd32b2f32d814b8116e84cf2b17347ebc1800181c4e2a1fb8dd53e1c635518c7dac47e9",
            ),
            (
                b"pass\0word",
                b"sa\0lt",
                4096,
                "89b69d0516f829893c696226650a8687",
            ),
            (
                b"",
                b"salt",
                1000,
                "94fb56af3ea22e5d3ed1b054085b136ca301b75d8b406c802c489479f27387c6",
            ),
            (
                "pässwörd✓".as_bytes(),
                b"",
                1000,
                "f1a62dd94eeaf5a0b6a6c4509f827724d2c6cba2a83f73c73c09db758c8979b5",
            ),
        ];
        for (p, s, c, want) in cases {
            let want = unhex(want);
            let mut dk = vec![0u8; want.len()];
            derive(p, s, *c, &mut dk).unwrap();
            assert_eq!(dk, want, "{p:?} {s:?} {c}");
        }
    }

    #[test]
    fn hash_mode_outputs_keys_in_order() {
        let rows: &[(&[u8], &[u8])] = &[(b"passwd", b"salt"), (b"password", b"salt"), (b"", b"")];
        let out = run(&hash_input(1, 64, rows)).unwrap();
        assert_eq!(out.len(), 3 * 64);
        assert_eq!(out[..64].to_vec(), unhex(RFC7914_1));
        let mut dk = [0u8; 64];
        derive(b"password", b"salt", 1, &mut dk).unwrap();
        assert_eq!(&out[64..128], &dk);
        derive(b"", b"", 1, &mut dk).unwrap();
        assert_eq!(&out[128..], &dk);
        // dklen 32 keys are prefixes of the 64-byte ones
        let short = run(&hash_input(1, 32, rows)).unwrap();
        assert_eq!(&short[..32], &out[..32]);
        assert_eq!(&short[32..64], &out[64..96]);
    }

    #[test]
    fn crack_mode_hit_and_miss() {
        let salt = b"NaCl";
        for dklen in [1usize, 16, 32, 33, 64, 100] {
            let mut target = vec![0u8; dklen];
            derive(b"hunter2", salt, 3, &mut target).unwrap();
            let words: &[&[u8]] = &[b"a", b"", b"hunter", b"hunter2", b"hunter2", b"x"];
            let out = run(&crack_input(3, salt, &target, words)).unwrap();
            assert_eq!(crack_out(&out), (3, 4), "dklen {dklen}");
            let out = run(&crack_input(3, salt, &target, &words[..3])).unwrap();
            assert_eq!(crack_out(&out), (NOT_FOUND, 3), "dklen {dklen}");
            let out = run(&crack_input(3, salt, &target, &words[3..4])).unwrap();
            assert_eq!(crack_out(&out), (0, 1), "dklen {dklen}");
        }
    }

    #[test]
    fn crack_needs_the_whole_key_to_match() {
        // Same first block, different tail: not a hit.
        let mut target = vec![0u8; 48];
        derive(b"pw", b"s", 2, &mut target).unwrap();
        target[40] ^= 1;
        let out = run(&crack_input(2, b"s", &target, &[b"pw"])).unwrap();
        assert_eq!(crack_out(&out), (NOT_FOUND, 1));
        target[40] ^= 1;
        let out = run(&crack_input(2, b"s", &target, &[b"pw"])).unwrap();
        assert_eq!(crack_out(&out), (0, 1));
    }

    #[test]
    fn bad_length() {
        let good = hash_input(1, 32, &[(b"pw", b"salt"), (b"x", b"")]);
        assert!(run(&good).is_ok());
        assert_eq!(run(&[]), Err(STATUS_BAD_LENGTH));
        for cut in [1, 15, 16, 19, good.len() - 1] {
            assert_eq!(run(&good[..cut]), Err(STATUS_BAD_LENGTH), "cut {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(run(&long), Err(STATUS_BAD_LENGTH));
        // a length prefix that runs past the end
        let mut bad = good.clone();
        bad[16] = 200;
        assert_eq!(run(&bad), Err(STATUS_BAD_LENGTH));

        let good = crack_input(1, b"salt", &[7u8; 32], &[b"a", b"bb"]);
        assert!(run(&good).is_ok());
        for cut in [16, 19, 20, 23, 24, 55, 56, good.len() - 1] {
            assert_eq!(run(&good[..cut]), Err(STATUS_BAD_LENGTH), "cut {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(run(&long), Err(STATUS_BAD_LENGTH));
    }

    #[test]
    fn bad_params() {
        let good = hash_input(1, 32, &[(b"pw", b"salt")]);
        assert!(run(&good).is_ok());
        let set = |off: usize, val: u8| {
            let mut v = good.clone();
            v[off] = val;
            v
        };
        let zero_u32 = |off: usize| {
            let mut v = good.clone();
            v[off..off + 4].copy_from_slice(&[0; 4]);
            v
        };
        for data in [
            set(0, 2),
            set(0, 255),
            set(1, 1),
            set(3, 1),
            zero_u32(4),
            zero_u32(8),
            zero_u32(12),
        ] {
            assert_eq!(run(&data), Err(STATUS_BAD_PARAMS), "{:?}", &data[..16]);
        }
        assert_eq!(
            run(&crack_input(0, b"s", &[0; 32], &[b"a"])),
            Err(STATUS_BAD_PARAMS)
        );
        assert_eq!(
            run(&crack_input(1, b"s", &[], &[b"a"])),
            Err(STATUS_BAD_PARAMS)
        );
        assert_eq!(
            run(&crack_input(1, b"s", &[0; 32], &[])),
            Err(STATUS_BAD_PARAMS)
        );
    }

    #[test]
    fn huge_output_is_out_of_memory() {
        // 2 records x 4 GiB - 1 bytes of key each: more than 4 GiB of output.
        let mut data = hash_input(1, u32::MAX, &[(b"a", b"b"), (b"c", b"d")]);
        assert_eq!(run(&data), Err(STATUS_OUT_OF_MEMORY));
        data[8..12].copy_from_slice(&(1u32 << 31).to_le_bytes());
        assert_eq!(run(&data), Err(STATUS_OUT_OF_MEMORY));
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
        pd_abi::run(ptr, len, |input| super::run(input).map(|out| &*out.leak()))
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
