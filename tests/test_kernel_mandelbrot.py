"""The committed Mandelbrot WASM kernels (static/wasm/mandelbrot.wasm and its SIMD128 build
mandelbrot_simd.wasm, four pixels in lockstep in two f64x2 registers) run in wasmtime.

Checks the ABI in docs/wasm-abi.md: no imports, the exports, the host call sequence, status
codes, bounded memory across many runs on one instance, and exact equality with an
independent NumPy reference of the output semantics (tests/mandel_ref.py). Every test runs
on both builds, and the two must agree bit for bit on tiles of every width (full and short
lockstep groups).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mandel_ref import reference_counts
from processdistro.shared.tasks.mandelbrot import DEFAULT_VIEW, INPUT, TileInput, tile_input
from wasm_kernel import Loaded, WasmKernel, assert_abi, load

WASM_DIR = Path(__file__).resolve().parents[1] / "static" / "wasm"
VARIANTS = ("mandelbrot", "mandelbrot_simd")
DEFAULT_BOUNDS = DEFAULT_VIEW
PAGE = 65536

OK, BAD_LENGTH, BAD_PARAMS, OUT_OF_MEMORY = 0, 1, 2, 3


def encode(
    width: int,
    height: int,
    x0: int,
    y0: int,
    tile_w: int,
    tile_h: int,
    max_iter: int = 500,
    bounds: tuple[float, float, float, float] = DEFAULT_BOUNDS,
    reserved: int = 0,
) -> bytes:
    """The 64-byte input (`mandelbrot.INPUT`), with this file's defaults."""
    return tile_input(width, height, x0, y0, tile_w, tile_h, max_iter, bounds, reserved)


class Kernel(WasmKernel):
    """The shared harness plus this kernel's encoders."""

    def tile(self, *args: object, **kw: object) -> np.ndarray:
        data = encode(*args, **kw)  # type: ignore[arg-type]
        fields = TileInput.unpack(data)
        tile_w, tile_h = fields.tile_w, fields.tile_h
        status, out = self.run(data)
        assert status == OK
        assert len(out) == 4 * tile_w * tile_h
        return np.frombuffer(out, dtype="<u4").astype(np.uint32).reshape(tile_h, tile_w)


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request: pytest.FixtureRequest) -> Loaded:
    return load(WASM_DIR / f"{request.param}.wasm")


@pytest.fixture
def kernel(loaded: Loaded) -> Kernel:
    return Kernel(loaded)


def test_module_has_no_imports_and_exports_the_abi(loaded: Loaded) -> None:
    assert_abi(loaded.module)


@pytest.mark.parametrize(
    ("width", "height", "tile_w", "tile_h", "max_iter", "bounds"),
    [
        # non-square image, tiles that leave narrower tiles on the right and bottom edges
        (96, 64, 40, 24, 500, DEFAULT_BOUNDS),
        (53, 71, 17, 30, 500, DEFAULT_BOUNDS),
        # whole image as one tile
        (120, 90, 120, 90, 500, DEFAULT_BOUNDS),
        # a zoomed region on the boundary (long orbits), deeper cap
        (48, 40, 16, 16, 1000, (-0.7530, -0.7460, 0.0980, 0.1040)),
        # reversed / asymmetric bounds are just arithmetic
        (30, 20, 7, 6, 64, (0.5, -1.5, -1.25, 0.75)),
    ],
)
def test_tiles_match_numpy_reference(
    kernel: Kernel,
    width: int,
    height: int,
    tile_w: int,
    tile_h: int,
    max_iter: int,
    bounds: tuple[float, float, float, float],
) -> None:
    want = reference_counts(width, height, *bounds, max_iter)
    assert want.dtype == np.uint32 and want.shape == (height, width)
    got = np.zeros_like(want)
    for y0 in range(0, height, tile_h):
        for x0 in range(0, width, tile_w):
            tw, th = min(tile_w, width - x0), min(tile_h, height - y0)
            tile = kernel.tile(width, height, x0, y0, tw, th, max_iter, bounds)
            assert tile.dtype == np.uint32
            np.testing.assert_array_equal(tile, want[y0 : y0 + th, x0 : x0 + tw])
            got[y0 : y0 + th, x0 : x0 + tw] = tile
    np.testing.assert_array_equal(got, want)
    assert int(want.max()) <= max_iter


def test_edge_tiles_and_single_pixels(kernel: Kernel) -> None:
    width, height = 101, 67
    want = reference_counts(width, height, *DEFAULT_BOUNDS, 500)
    # bottom-right corner pixel, last column, last row
    np.testing.assert_array_equal(kernel.tile(width, height, 100, 66, 1, 1), want[66:, 100:])
    np.testing.assert_array_equal(kernel.tile(width, height, 100, 0, 1, 67), want[:, 100:])
    np.testing.assert_array_equal(kernel.tile(width, height, 0, 66, 101, 1), want[66:, :])
    assert want[0, 0] == 1  # the corner escapes after one step
    assert want[height // 2, width // 3] == 500  # inside the main cardioid: capped


def test_bad_input_status_codes(kernel: Kernel) -> None:
    assert INPUT.size == 64  # docs/wasm-abi.md: exactly 64 bytes
    good = encode(16, 8, 0, 0, 16, 8)
    assert kernel.run(good)[0] == OK
    for data in (b"", good[: INPUT.size - 1], good + b"\0", good * 2):
        assert kernel.run(data)[0] == BAD_LENGTH, len(data)
    # an input range outside linear memory is refused, not read
    size = kernel.memory_bytes()
    assert kernel.run_at(size - 32, INPUT.size)[0] == BAD_LENGTH
    assert kernel.run_at(0xFFFF_FFC0, INPUT.size)[0] == BAD_LENGTH

    nan, inf = math.nan, math.inf
    bad = [
        encode(0, 8, 0, 0, 1, 1),  # W = 0
        encode(16, 0, 0, 0, 1, 1),  # H = 0
        encode(16, 8, 0, 0, 0, 8),  # tile_w = 0
        encode(16, 8, 0, 0, 16, 0),  # tile_h = 0
        encode(16, 8, 1, 0, 16, 8),  # runs past the right edge
        encode(16, 8, 0, 8, 1, 1),  # starts below the bottom row
        encode(16, 8, 0xFFFF_FFFF, 0, 1, 1),  # no wrap-around
        encode(16, 8, 0, 0, 16, 8, reserved=1),
        encode(16, 8, 0, 0, 16, 8, bounds=(nan, 1.0, -1.5, 1.5)),
        encode(16, 8, 0, 0, 16, 8, bounds=(-2.0, inf, -1.5, 1.5)),
        encode(16, 8, 0, 0, 16, 8, bounds=(-2.0, 1.0, -inf, 1.5)),
        encode(16, 8, 0, 0, 16, 8, bounds=(-2.0, 1.0, -1.5, nan)),
        encode(16, 8, 0, 0, 16, 8, bounds=(-1e308, 1e308, -1.5, 1.5)),  # dx overflows
    ]
    for data in bad:
        assert kernel.run(data)[0] == BAD_PARAMS, TileInput.unpack(data)
    # the instance is still fine afterwards
    np.testing.assert_array_equal(kernel.tile(16, 8, 0, 0, 16, 8), reference_counts(16, 8, *DEFAULT_BOUNDS, 500))


def test_out_of_memory_status(loaded: Loaded) -> None:
    # A tile whose byte size does not fit the 32-bit address space.
    k = Kernel(loaded)
    assert k.run(encode(65535, 65535, 0, 0, 65535, 65535, 1))[0] == OUT_OF_MEMORY
    # memory.grow refused by the host's limit: 1024x1024 needs 4 MiB of output.
    initial = Kernel(loaded).memory_bytes()
    k = Kernel(loaded, memory_limit=initial + 4 * PAGE)
    assert k.run(encode(1024, 1024, 0, 0, 1024, 1024, 1))[0] == OUT_OF_MEMORY
    assert k.memory_bytes() <= initial + 4 * PAGE
    # and the instance keeps working within its limit
    np.testing.assert_array_equal(k.tile(64, 48, 0, 0, 64, 48, 50), reference_counts(64, 48, *DEFAULT_BOUNDS, 50))


def test_memory_stays_bounded_over_many_runs(kernel: Kernel) -> None:
    width = height = 256
    want = reference_counts(width, height, *DEFAULT_BOUNDS, 100)
    initial = kernel.memory_bytes()
    tiles = [(x0, y0) for y0 in range(0, height, 32) for x0 in range(0, width, 32)]
    sizes: list[int] = []
    for k in range(200):
        x0, y0 = tiles[k % len(tiles)]
        tw, th = (32, 32) if k % 3 else (32 - k % 7, 32 - k % 5)  # vary the output size
        tile = kernel.tile(width, height, x0, y0, tw, th, 100)
        np.testing.assert_array_equal(tile, want[y0 : y0 + th, x0 : x0 + tw])
        sizes.append(kernel.memory_bytes())
    # A 32x32 tile is 4 KiB of output: memory may grow by at most a page once, then never.
    assert max(sizes) <= initial + PAGE
    assert len(set(sizes[1:])) == 1

    # Re-running the same input without a new pd_alloc does not grow memory either.
    ptr = kernel.alloc(INPUT.size)
    kernel.memory.write(kernel.store, encode(width, height, 0, 0, 32, 32, 100), ptr)
    for _ in range(50):
        status, out = kernel.run_at(ptr, INPUT.size)
        assert status == OK
        np.testing.assert_array_equal(np.frombuffer(out, dtype="<u4").reshape(32, 32), want[:32, :32])
    assert kernel.memory_bytes() == sizes[-1]


@pytest.mark.parametrize(
    "bounds",
    [DEFAULT_BOUNDS, (-0.7530, -0.7460, 0.0980, 0.1040), (-1.5e-3, 1e-3, -2e-3, 0.5e-3), (0.5, -1.5, -1.25, 0.75)],
    ids=["default", "boundary-zoom", "deep-zoom", "reversed"],
)
def test_simd_and_scalar_builds_agree_bit_for_bit(bounds: tuple[float, float, float, float]) -> None:
    """Tile widths 1..9 cover full and short groups of four lanes; neighbouring lanes escape at
    very different steps near the boundary; the NumPy reference checks one of them too."""
    scalar, simd = (Kernel(load(WASM_DIR / f"{name}.wasm")) for name in VARIANTS)
    for tile_w in range(1, 10):
        for x0, y0, tile_h, max_iter in [(0, 0, 3, 0), (5, 7, 4, 1), (11, 20, 5, 300), (64 - tile_w, 61, 3, 2000)]:
            args = (64, 64, x0, y0, tile_w, tile_h, max_iter, bounds)
            a, b = scalar.tile(*args), simd.tile(*args)
            assert np.array_equal(a, b), (tile_w, x0, y0, max_iter)
    want = reference_counts(64, 64, *bounds, 700)
    np.testing.assert_array_equal(simd.tile(64, 64, 0, 0, 64, 64, 700, bounds), want)
