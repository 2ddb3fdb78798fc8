"""The committed PBKDF2-HMAC-SHA256 WASM kernels (static/wasm/password_hash.wasm and its SIMD128
build password_hash_simd.wasm, multi-buffer SHA-256 over four chains) run in wasmtime.

Checks the ABI in docs/wasm-abi.md: no imports, the exports, both input layouts (mode 0 "hash"
and mode 1 "crack"), status codes and bounded memory, against Python's hashlib.pbkdf2_hmac:
non-ASCII and empty passwords, empty salts, key lengths around the 32-byte block size, crack
hits and misses. Every test runs on both builds; the SIMD build is also checked on every shape
of a group of four (record counts 1..9, keys of several blocks) and on "first hit in list
order" wherever the hit falls in a group.
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pytest
from wasm_kernel import Loaded, WasmKernel, assert_abi, load

WASM_DIR = Path(__file__).resolve().parents[1] / "static" / "wasm"
VARIANTS = ("password_hash", "password_hash_simd")
PAGE = 65536
OK, BAD_LENGTH, BAD_PARAMS, OUT_OF_MEMORY = 0, 1, 2, 3
NOT_FOUND = 0xFFFF_FFFF


def pbkdf2(password: bytes, salt: bytes, iterations: int, dklen: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations, dklen)


def prefixed(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def header(mode: int, iterations: int, dklen: int, count: int) -> bytes:
    return struct.pack("<B3xIII", mode, iterations, dklen, count)


def hash_input(iterations: int, dklen: int, rows: list[tuple[bytes, bytes]]) -> bytes:
    """Mode 0: header, then per row u32 password_len, password, u32 salt_len, salt."""
    body = b"".join(prefixed(p) + prefixed(s) for p, s in rows)
    return header(0, iterations, dklen, len(rows)) + body


def crack_input(iterations: int, salt: bytes, target: bytes, candidates: list[bytes]) -> bytes:
    """Mode 1: header, u32 salt_len, salt, target dk (dklen bytes), then u32 len + candidate each."""
    return (
        header(1, iterations, len(target), len(candidates))
        + prefixed(salt)
        + target
        + b"".join(prefixed(c) for c in candidates)
    )


class Kernel(WasmKernel):
    """The shared harness plus this kernel's encoders."""

    def hash(self, iterations: int, dklen: int, rows: list[tuple[bytes, bytes]]) -> list[bytes]:
        status, out = self.run(hash_input(iterations, dklen, rows))
        assert status == OK
        assert len(out) == dklen * len(rows)
        return [out[i * dklen : (i + 1) * dklen] for i in range(len(rows))]

    def crack(self, iterations: int, salt: bytes, target: bytes, candidates: list[bytes]) -> tuple[int, int]:
        status, out = self.run(crack_input(iterations, salt, target, candidates))
        assert status == OK and len(out) == 8
        index, hashed = struct.unpack("<II", out)
        return index, hashed


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request: pytest.FixtureRequest) -> Loaded:
    return load(WASM_DIR / f"{request.param}.wasm")


@pytest.fixture
def kernel(loaded: Loaded) -> Kernel:
    return Kernel(loaded)


def test_module_has_no_imports_and_exports_the_abi(loaded: Loaded) -> None:
    assert_abi(loaded.module)


@pytest.mark.parametrize("name", VARIANTS)
def test_no_panic_path_reaches_the_module(name: str) -> None:
    # A reachable panic would leave its source location (".../lib.rs") in the data section.
    assert b".rs" not in (WASM_DIR / f"{name}.wasm").read_bytes()


def test_rfc7914_vectors(kernel: Kernel) -> None:
    # RFC 7914 section 11, PBKDF2-HMAC-SHA256.
    want1 = bytes.fromhex(
        "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
    )
    want2 = bytes.fromhex(
        "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56"
        "a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d"
    )
    assert kernel.hash(1, 64, [(b"passwd", b"salt")]) == [want1]
    assert kernel.hash(80000, 64, [(b"Password", b"NaCl")]) == [want2]
    assert want1 == pbkdf2(b"passwd", b"salt", 1, 64)


@pytest.mark.parametrize("dklen", [1, 20, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("iterations", [1, 2, 1000])
def test_hash_mode_matches_hashlib(kernel: Kernel, iterations: int, dklen: int) -> None:
    rows = [
        ("pässwörd".encode(), b"salt"),
        ("пароль🔑".encode(), "sél".encode()),
        ("密码".encode(), b""),  # empty salt
        (b"", b"salt"),  # empty password
        (b"", b""),
        (b"x" * 64, b"s" * 16),  # a password exactly one SHA-256 block long
        (b"y" * 65, bytes(range(256))),  # longer than a block: HMAC hashes the key first
        (b"nul\0inside", b"\0\0"),
    ]
    got = kernel.hash(iterations, dklen, rows)
    assert got == [pbkdf2(p, s, iterations, dklen) for p, s in rows]


def test_hash_mode_many_rows_in_order(kernel: Kernel) -> None:
    rows = [(f"user{i}:{'é' * (i % 5)}".encode(), f"salt{i % 7}".encode() * (i % 3)) for i in range(150)]
    got = kernel.hash(3, 32, rows)
    assert got == [pbkdf2(p, s, 3, 32) for p, s in rows]


@pytest.mark.parametrize("dklen", [16, 32, 48, 64])
def test_crack_hit_and_miss(kernel: Kernel, dklen: int) -> None:
    salt, iterations = "sølt".encode(), 50
    target = pbkdf2("hünter2".encode(), salt, iterations, dklen)
    words = [b"password", b"", b"hunter2", "hünter2".encode(), "hünter2".encode(), b"x"]
    assert kernel.crack(iterations, salt, target, words) == (3, 4)  # the first of two hits
    assert kernel.crack(iterations, salt, target, words[:3]) == (NOT_FOUND, 3)
    assert kernel.crack(iterations, salt, target, words[3:4]) == (0, 1)
    assert kernel.crack(iterations, salt, target, words[:4]) == (3, 4)  # hit on the last one
    # a different salt or iteration count misses
    assert kernel.crack(iterations, b"salt", target, words) == (NOT_FOUND, len(words))
    assert kernel.crack(iterations + 1, salt, target, words) == (NOT_FOUND, len(words))


def test_crack_with_empty_salt_and_password(kernel: Kernel) -> None:
    target = pbkdf2(b"", b"", 10, 32)
    assert kernel.crack(10, b"", target, [b"a", b"b", b""]) == (2, 3)


def test_crack_compares_the_whole_key(kernel: Kernel) -> None:
    # The first 32-byte block matches, the second does not: not a hit.
    target = bytearray(pbkdf2(b"pw", b"s", 5, 64))
    target[63] ^= 0x80
    assert kernel.crack(5, b"s", bytes(target), [b"pw"]) == (NOT_FOUND, 1)
    target[63] ^= 0x80
    assert kernel.crack(5, b"s", bytes(target), [b"nope", b"pw"]) == (1, 2)


def test_bad_input_status_codes(kernel: Kernel) -> None:
    good = hash_input(1, 32, [(b"pw", b"salt"), (b"x", b"")])
    assert kernel.run(good)[0] == OK
    for data in (b"", good[:1], good[:15], good[:16], good[:19], good[:-1], good + b"\0"):
        assert kernel.run(data)[0] == BAD_LENGTH, len(data)
    too_long_prefix = good[:16] + struct.pack("<I", 1000) + good[20:]
    assert kernel.run(too_long_prefix)[0] == BAD_LENGTH
    good_crack = crack_input(1, b"salt", b"\x07" * 32, [b"a", b"bb"])
    assert kernel.run(good_crack)[0] == OK
    for cut in (16, 19, 20, 23, 24, 55, 56, len(good_crack) - 1):
        assert kernel.run(good_crack[:cut])[0] == BAD_LENGTH, cut
    assert kernel.run(good_crack + b"\0")[0] == BAD_LENGTH
    assert kernel.run_at(kernel.memory_bytes() - 8, 64)[0] == BAD_LENGTH  # not inside memory

    body = good[16:]
    bad = [
        header(2, 1, 32, 2) + body,  # unknown mode
        header(255, 1, 32, 2) + body,
        b"\0\1\0\0" + good[4:],  # padding must be zero
        b"\0\0\0\1" + good[4:],
        header(0, 0, 32, 2) + body,  # iterations = 0
        header(0, 1, 0, 2) + body,  # dklen = 0
        header(0, 1, 32, 0) + body,  # count = 0
        header(1, 1, 32, 0) + good_crack[16:],
    ]
    for data in bad:
        assert kernel.run(data)[0] == BAD_PARAMS, data[:16].hex()
    assert kernel.hash(1, 32, [(b"pw", b"salt")]) == [pbkdf2(b"pw", b"salt", 1, 32)]  # still fine


def test_out_of_memory_status(loaded: Loaded) -> None:
    k = Kernel(loaded)
    # two keys of 4 GiB - 1 bytes each: the output cannot exist in 32-bit memory
    assert k.run(hash_input(1, 0xFFFF_FFFF, [(b"a", b"b"), (b"c", b"d")]))[0] == OUT_OF_MEMORY
    # memory.grow refused by the host's limit: 4096 keys of 1 KiB need 4 MiB
    initial = Kernel(loaded).memory_bytes()
    k = Kernel(loaded, memory_limit=initial + 4 * PAGE)
    assert k.run(hash_input(1, 1024, [(b"p", b"")] * 4096))[0] == OUT_OF_MEMORY
    assert k.memory_bytes() <= initial + 4 * PAGE
    assert k.hash(2, 32, [(b"p", b"s")]) == [pbkdf2(b"p", b"s", 2, 32)]


def test_memory_stays_bounded_over_many_runs(kernel: Kernel) -> None:
    sizes: list[int] = []
    for r in range(100):
        rows = [(f"p{r}-{i}".encode(), b"salt") for i in range(20 + r % 9)]
        assert kernel.hash(1, 32 + r % 40, rows) == [pbkdf2(p, s, 1, 32 + r % 40) for p, s in rows]
        words = [f"w{i}".encode() for i in range(30)]
        target = pbkdf2(words[r % 30], b"s", 1, 32)
        assert kernel.crack(1, b"s", target, words) == (r % 30, r % 30 + 1)
        sizes.append(kernel.memory_bytes())
    assert max(sizes) <= sizes[0] + PAGE
    assert len(set(sizes[1:])) == 1


@pytest.mark.parametrize("dklen", [1, 32, 33, 64, 100])
def test_hash_mode_every_group_shape(kernel: Kernel, dklen: int) -> None:
    """1..9 records (full and partial groups of four chains; a key of several blocks is
    several chains), passwords and salts from empty to longer than a SHA-256 block."""
    rng = random.Random(dklen)
    for count in range(1, 10):
        rows = [(rng.randbytes(rng.randrange(0, 90)), rng.randbytes(rng.randrange(0, 80))) for _ in range(count)]
        iterations = rng.randrange(1, 6)
        assert kernel.hash(iterations, dklen, rows) == [pbkdf2(p, s, iterations, dklen) for p, s in rows]


@pytest.mark.parametrize("dklen", [16, 32, 48])
def test_crack_first_hit_in_list_order(kernel: Kernel, dklen: int) -> None:
    """The hit at every position of 1..9 candidates, with a later duplicate of it in the same
    or the next group: the first one is reported, and `hashed` is its index + 1."""
    target = pbkdf2(b"secret", b"job-salt", 3, dklen)
    for count in range(1, 10):
        words = [f"w{k}".encode() for k in range(count)]
        assert kernel.crack(3, b"job-salt", target, words) == (NOT_FOUND, count)
        for hit in range(count):
            cands = list(words)
            cands[hit] = b"secret"
            if hit + 1 < count:
                cands[-1] = b"secret"
            assert kernel.crack(3, b"job-salt", target, cands) == (hit, hit + 1), (count, hit)
