//! ProcessDistro example: a pd-ABI module in Rust that returns the ROT13 of its input.
//!
//! The pd-ABI (docs/wasm-abi.md) is the smallest contract a node runs: the module imports
//! nothing and exports `memory`, `pd_alloc`, `pd_run`, `pd_output_ptr` and `pd_output_len`;
//! the host writes one input's bytes into memory, calls `pd_run`, and reads the output bytes
//! back. Here the input is any bytes and the output has the same length: every ASCII letter is
//! rotated by 13 places within its case (`a`..`z`, `A`..`Z`), every other byte (digits,
//! punctuation, UTF-8 continuation bytes, ...) is copied unchanged. Applying it twice gives
//! the input back. (Python: `data.translate(bytes.maketrans(...))`, see
//! tests/test_examples_rust.py.)
//!
//! The task logic is the plain functions [`rot13_byte`] and [`rot13`], unit-tested natively
//! with `cargo test`. On `wasm32` the crate is `no_std` + `alloc`; the allocator, panic handler
//! and the bodies of the four exports come from the `pd_abi` crate in wasm_tasks/, and the
//! exports themselves are the small block at the bottom of this file. It also exports the
//! optional `pd_run_batch` (many inputs in one call), which `pd.map` uses.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec::Vec;

/// ROT13 of one byte: ASCII letters rotate by 13 within their case, anything else is kept.
pub fn rot13_byte(b: u8) -> u8 {
    match b {
        b'a'..=b'z' => b'a' + (b - b'a' + 13) % 26,
        b'A'..=b'Z' => b'A' + (b - b'A' + 13) % 26,
        other => other,
    }
}

/// ROT13 of every byte of `input`, into a new buffer of the same length.
pub fn rot13(input: &[u8]) -> Vec<u8> {
    input.iter().map(|&b| rot13_byte(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_rotate_within_their_case() {
        assert_eq!(rot13(b"Hello, World!"), b"Uryyb, Jbeyq!".to_vec());
        assert_eq!(rot13(b"abcdefghijklmnopqrstuvwxyz"), b"nopqrstuvwxyzabcdefghijklm".to_vec());
        assert_eq!(rot13(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), b"NOPQRSTUVWXYZABCDEFGHIJKLM".to_vec());
    }

    #[test]
    fn other_bytes_are_kept() {
        let others: Vec<u8> = (0..=255u8).filter(|b| !b.is_ascii_alphabetic()).collect();
        assert_eq!(rot13(&others), others);
        assert_eq!(rot13("héllo ✓".as_bytes()), "uéyyb ✓".as_bytes().to_vec());
    }

    #[test]
    fn twice_is_the_identity_on_every_byte() {
        for b in 0..=255u8 {
            assert_eq!(rot13_byte(rot13_byte(b)), b, "byte {b}");
        }
    }

    #[test]
    fn empty_input_gives_empty_output() {
        assert_eq!(rot13(b""), Vec::<u8>::new());
    }
}

// ---------------------------------------------------------------------------------------------
// wasm32 only: the exported pd-ABI (allocator, panic handler and plumbing live in `pd_abi`).
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "wasm32")]
mod abi {
    /// Reserve `len` bytes for the next input and return their address (0 on failure).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_alloc(len: u32) -> u32 {
        pd_abi::alloc(len)
    }

    /// Run ROT13 on the `len` bytes at `ptr`; returns a status code (0 = ok; every input is
    /// valid, so the only failures are pd_abi's: 1 = range outside memory, 3 = out of memory).
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_run(ptr: u32, len: u32) -> u32 {
        // The output lives in pd_abi's arena until the next pd_alloc / pd_run.
        pd_abi::run(ptr, len, |input| {
            let out: &'static [u8] = super::rot13(input).leak();
            Ok(out)
        })
    }

    /// Run ROT13 on every input of a batch (docs/wasm-abi.md, "Batches"): one call for many
    /// small inputs, each output exactly `pd_run`'s.
    #[unsafe(no_mangle)]
    pub extern "C" fn pd_run_batch(ptr: u32, len: u32) -> u32 {
        pd_abi::run_batch(ptr, len, |input| {
            let out: &'static [u8] = super::rot13(input).leak();
            Ok(out)
        })
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
