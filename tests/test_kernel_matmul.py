"""The committed matrix-multiplication WASM kernels (static/wasm/matrix_mul.wasm and its SIMD128
build matrix_mul_simd.wasm) run in wasmtime.

Checks the ABI in docs/wasm-abi.md: no imports, the exports, the input layout (16-byte header
``dtype, m, k, n`` then A and B row-major), status codes, bounded memory across many runs, and
results against NumPy (float64 within 1e-10 relative, float32 within float32 rounding). Both
builds must give the same bytes: they perform the same additions in the same order.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import wasmtime
from wasm_kernel import Loaded, WasmKernel, assert_abi, load

WASM_DIR = Path(__file__).resolve().parents[1] / "static" / "wasm"
VARIANTS = ("matrix_mul", "matrix_mul_simd")
PAGE = 65536
OK, BAD_LENGTH, BAD_PARAMS, OUT_OF_MEMORY = 0, 1, 2, 3
DTYPES = {np.dtype(np.float64): 0, np.dtype(np.float32): 1}


def header(dtype: int, m: int, k: int, n: int) -> bytes:
    return struct.pack("<4I", dtype, m, k, n)


def encode(a: np.ndarray, b: np.ndarray) -> bytes:
    """The task input for C = a @ b (a: m x k, b: k x n, same float dtype)."""
    assert a.dtype == b.dtype and a.ndim == b.ndim == 2 and a.shape[1] == b.shape[0]
    le = a.dtype.newbyteorder("<")
    return (
        header(DTYPES[a.dtype], a.shape[0], a.shape[1], b.shape[1])
        + np.ascontiguousarray(a, dtype=le).tobytes()
        + np.ascontiguousarray(b, dtype=le).tobytes()
    )


class Kernel(WasmKernel):
    """The shared harness plus this kernel's encoders."""

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        status, out = self.run(encode(a, b))
        assert status == OK
        assert len(out) == a.shape[0] * b.shape[1] * a.dtype.itemsize
        return np.frombuffer(out, dtype=a.dtype.newbyteorder("<")).astype(a.dtype).reshape(a.shape[0], b.shape[1])


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    return wasmtime.Engine()


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request: pytest.FixtureRequest, engine: wasmtime.Engine) -> Loaded:
    return load(WASM_DIR / f"{request.param}.wasm", engine)


@pytest.fixture
def kernel(loaded: Loaded) -> Kernel:
    return Kernel(loaded)


def rand(rng: np.random.Generator, shape: tuple[int, int], dtype: type = np.float64) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def exact_k_order(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The documented arithmetic: c = 0; for p in 0..k: c = c + a[:, p] * b[p, :] (no FMA)."""
    c = np.zeros((a.shape[0], b.shape[1]), dtype=a.dtype)
    for p in range(a.shape[1]):
        c = c + np.multiply.outer(a[:, p], b[p, :])
    return c


def test_module_has_no_imports_and_exports_the_abi(loaded: Loaded) -> None:
    assert_abi(loaded.module)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_panic_path_reaches_the_module(variant: str) -> None:
    # A reachable panic would leave its source location (".../lib.rs") in the data section.
    assert b".rs" not in (WASM_DIR / f"{variant}.wasm").read_bytes()


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 1, 1), (3, 5, 2), (7, 1, 9), (1, 300, 1), (13, 17, 11), (5, 129, 257), (2, 131, 515), (40, 64, 33)],
)
def test_float64_matches_numpy(kernel: Kernel, m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m * 10007 + k * 101 + n)
    a, b = rand(rng, (m, k)), rand(rng, (k, n))
    got = kernel.matmul(a, b)
    assert got.dtype == np.float64 and got.shape == (m, n)
    np.testing.assert_allclose(got, a @ b, rtol=1e-10, atol=1e-12 * k)
    # and bit for bit the documented k-order accumulation
    np.testing.assert_array_equal(got, exact_k_order(a, b))


@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (4, 7, 5), (9, 130, 17), (3, 64, 260)])
def test_float32_matches_numpy(kernel: Kernel, m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(7 + m + k + n)
    a, b = rand(rng, (m, k), np.float32), rand(rng, (k, n), np.float32)
    got = kernel.matmul(a, b)
    assert got.dtype == np.float32 and got.shape == (m, n)
    want = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * k * float(np.finfo(np.float32).eps))
    np.testing.assert_array_equal(got, exact_k_order(a, b))


def test_tiles_assemble_the_product(kernel: Kernel) -> None:
    rng = np.random.default_rng(42)
    m, k, n = 70, 45, 53
    a, b = rand(rng, (m, k)), rand(rng, (k, n))
    c = np.full((m, n), np.nan)
    for i0 in range(0, m, 32):
        for j0 in range(0, n, 20):
            c[i0 : i0 + 32, j0 : j0 + 20] = kernel.matmul(a[i0 : i0 + 32], b[:, j0 : j0 + 20])
    np.testing.assert_allclose(c, a @ b, rtol=1e-10, atol=1e-12 * k)


def test_known_small_product_and_special_values(kernel: Kernel) -> None:
    a = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = np.array([[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]])
    np.testing.assert_array_equal(kernel.matmul(a, b), [[58.0, 64.0], [139.0, 154.0]])
    np.testing.assert_array_equal(kernel.matmul(a.astype(np.float32), b.astype(np.float32)), [[58, 64], [139, 154]])
    # IEEE semantics pass through: inf * 0 = nan, inf + finite = inf
    a = np.array([[np.inf, 0.0], [1.0, 2.0]])
    b = np.array([[0.0, 1.0], [1.0, 1.0]])
    got = kernel.matmul(a, b)
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf
    np.testing.assert_array_equal(got[1], [2.0, 3.0])


def test_simd_and_scalar_builds_agree_bit_for_bit(engine: wasmtime.Engine) -> None:
    kernels = [Kernel(load(WASM_DIR / f"{v}.wasm", engine)) for v in VARIANTS]
    rng = np.random.default_rng(3)
    for dtype in (np.float64, np.float32):
        for m, k, n in [(17, 33, 29), (8, 256, 300), (1, 5, 3)]:
            data = encode(rand(rng, (m, k), dtype), rand(rng, (k, n), dtype))
            outs = [kern.run(data) for kern in kernels]
            assert outs[0][0] == OK
            assert outs[0] == outs[1], (dtype, m, k, n)


def test_input_anywhere_in_memory(kernel: Kernel) -> None:
    rng = np.random.default_rng(5)
    a, b = rand(rng, (6, 7)), rand(rng, (7, 5))
    data = encode(a, b)
    want = kernel.matmul(a, b)
    # inside the pd_alloc buffer but misaligned for float64 (decoded, not borrowed)
    ptr = kernel.call("pd_alloc", len(data) + 12)
    kernel.memory.write(kernel.store, data, ptr + 4)
    status, out = kernel.run_at(ptr + 4, len(data))
    assert status == OK
    np.testing.assert_array_equal(np.frombuffer(out, "<f8").reshape(6, 5), want)
    # outside the pd_alloc buffer (near the end of memory): copied into the arena first
    at = kernel.memory_bytes() - len(data) - 64
    kernel.memory.write(kernel.store, data, at)
    status, out = kernel.run_at(at, len(data))
    assert status == OK
    np.testing.assert_array_equal(np.frombuffer(out, "<f8").reshape(6, 5), want)


def test_bad_input_status_codes(kernel: Kernel) -> None:
    a, b = np.ones((2, 3)), np.ones((3, 4))
    good = encode(a, b)
    assert kernel.run(good)[0] == OK
    for data in (b"", good[:15], good[:16], good[:-1], good + b"\0", good * 2):
        assert kernel.run(data)[0] == BAD_LENGTH, len(data)
    assert kernel.run(header(1, 2, 3, 4) + good[16:])[0] == BAD_LENGTH  # float64 body sent as float32
    size = kernel.memory_bytes()
    assert kernel.run_at(size - 8, 64)[0] == BAD_LENGTH  # the range is not inside memory
    assert kernel.run_at(0xFFFF_FFC0, 64)[0] == BAD_LENGTH

    pad = b"\0" * 64
    bad = [
        header(2, 1, 1, 1),  # unknown dtype
        header(0xFFFF_FFFF, 1, 1, 1),
        header(0, 0, 1, 1),  # zero dims
        header(0, 1, 0, 1),
        header(0, 1, 1, 0),
        header(0, 65536, 65536, 1),  # A alone would be 32 GiB
        header(1, 1, 0xFFFF_FFFF, 0xFFFF_FFFF),  # B's byte size overflows
        header(0, 1 << 29, 1, 1),  # the input would exceed 4 GiB
    ]
    for data in bad:
        assert kernel.run(data + pad)[0] == BAD_PARAMS, struct.unpack("<4I", data)
    np.testing.assert_array_equal(kernel.matmul(a, b), a @ b)  # the instance still works


def test_out_of_memory_status(loaded: Loaded) -> None:
    # A 1 MiB input whose float64 output (65536 x 65536) would be 32 GiB.
    k = Kernel(loaded)
    data = header(0, 65536, 1, 65536) + b"\0" * (8 * 2 * 65536)
    assert k.run(data)[0] == OUT_OF_MEMORY
    # memory.grow refused by the host's limit: a 1024 x 1024 float64 output needs 8 MiB.
    initial = Kernel(loaded).memory_bytes()
    k = Kernel(loaded, memory_limit=initial + 8 * PAGE)
    a, b = np.ones((1024, 1)), np.ones((1, 1024))
    assert k.run(encode(a, b))[0] == OUT_OF_MEMORY
    assert k.memory_bytes() <= initial + 8 * PAGE
    # and the instance keeps working within its limit
    a, b = np.arange(6.0).reshape(2, 3), np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(k.matmul(a, b), a @ b)


def test_memory_stays_bounded_over_many_runs(kernel: Kernel) -> None:
    rng = np.random.default_rng(11)
    a, b = rand(rng, (64, 48)), rand(rng, (48, 64))
    want = a @ b
    sizes: list[int] = []
    for r in range(120):
        m, n = 64 - r % 7, 64 - r % 5  # vary the input and output sizes
        got = kernel.matmul(a[:m], b[:, :n])
        np.testing.assert_allclose(got, want[:m, :n], rtol=1e-10, atol=1e-12)
        sizes.append(kernel.memory_bytes())
    # 24 KiB of input and 32 KiB of output per run: a few pages once, then never more.
    assert max(sizes) <= sizes[0] + 2 * PAGE
    assert len(set(sizes[1:])) == 1

    # Re-running the same input without a new pd_alloc does not grow memory either.
    data = encode(a, b)
    ptr = kernel.call("pd_alloc", len(data))
    kernel.memory.write(kernel.store, data, ptr)
    for _ in range(30):
        status, out = kernel.run_at(ptr, len(data))
        assert status == OK
        np.testing.assert_allclose(np.frombuffer(out, "<f8").reshape(64, 64), want, rtol=1e-10, atol=1e-12)
    assert kernel.memory_bytes() == sizes[-1]
