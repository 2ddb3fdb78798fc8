"""The controller's cheaper Mandelbrot paths give exactly what the reference code gives:

- `kernel_escape` (the module in-process for expensive pixels) == `escape_count` (the Python
  loop of docs/wasm-abi.md), pixel by pixel and cap by cap, and `spot_check` reaches the same
  verdicts with the same iterations spent through either, tile by tile over an image;
- `colourize` (a lookup table) == the colour formula applied per pixel.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from mandel_checks import check_every_tile
from processdistro.shared.tasks.base import Verdict
from processdistro.shared.tasks.mandelbrot import (
    CHECK_MODULE,
    KERNEL_FROM,
    MandelbrotParams,
    _Kernel,
    colourize,
    escape_count,
    kernel_escape,
)

DEFAULT = MandelbrotParams(width=2048, height=2048, max_iter=2000, tile=128)
ZOOM = MandelbrotParams(width=300, height=200, xmin=-0.75, xmax=-0.74, ymin=0.1, ymax=0.11, max_iter=50_000, tile=50)


@pytest.mark.parametrize(
    ("p", "i", "j", "limit"),
    [
        pytest.param(DEFAULT, 0, 0, 2000, id="corner-escapes-at-once"),
        pytest.param(DEFAULT, 1300, 1024, 2000, id="in-the-set-full-cap"),
        pytest.param(DEFAULT, 1300, 1024, KERNEL_FROM, id="in-the-set-python-side-of-the-threshold"),
        pytest.param(DEFAULT, 1300, 1024, KERNEL_FROM + 1, id="in-the-set-kernel-side-of-the-threshold"),
        pytest.param(DEFAULT, 1300, 1024, 1, id="cap-1"),
        pytest.param(DEFAULT, 1300, 1024, 10**9, id="cap-above-max-iter"),
        pytest.param(ZOOM, 150, 100, 25_000, id="zoomed-boundary"),
        pytest.param(ZOOM, 17, 3, 50_000, id="zoomed-max"),
    ],
)
def test_the_kernel_counts_a_pixel_as_the_reference_does(p: MandelbrotParams, i: int, j: int, limit: int) -> None:
    expected = escape_count(p, i, j, limit=limit)
    assert kernel_escape(p, i, j, limit) == expected
    assert _Kernel(CHECK_MODULE)(p, i, j, limit) == expected  # the module alone, whatever the cap


def test_the_kernel_agrees_on_random_pixels_and_caps() -> None:
    rng = random.Random(11)
    kernel = _Kernel(CHECK_MODULE)
    for p in (DEFAULT, ZOOM):
        for _ in range(300):
            i, j, cap = rng.randrange(p.width), rng.randrange(p.height), rng.choice([1, 2, 7, 300, 301, 2000, 25_000])
            assert kernel(p, i, j, cap) == escape_count(p, i, j, limit=cap), (p, i, j, cap)


@pytest.mark.parametrize("claim", ["honest", "off-by-one", "all-max", "zeros"])
def test_spot_checks_agree_through_either_pixel_routine(claim: str) -> None:
    # four tiles of 32 x 32: the checks find each tile's pixels from its corner
    p = MandelbrotParams(width=64, height=64, xmin=-0.8, xmax=0.4, ymin=-0.6, ymax=0.6, max_iter=3000, tile=32)
    truth = np.array([[escape_count(p, i, j) for i in range(64)] for j in range(64)], dtype=np.uint32)
    counts = {
        "honest": truth,
        "off-by-one": truth + 1,
        "all-max": np.full_like(truth, p.max_iter),
        "zeros": np.zeros_like(truth),
    }[claim]
    for seed in range(30):
        slow = check_every_tile(p, counts, random.Random(seed), escape=escape_count)
        fast = check_every_tile(p, counts, random.Random(seed))
        assert len(fast) == 4 and fast == slow, seed
        if claim == "honest":
            assert all(verdict is Verdict.ACCEPT for verdict, _ in fast), fast


def _formula(counts: np.ndarray, max_iter: int) -> np.ndarray:
    # the colouring per pixel, as docs/wasm-abi.md's PNG was always made
    t = np.log1p(counts.astype(np.float64)) / math.log1p(max_iter)
    u = 1.0 - t
    rgb = np.stack([9.0 * u * t**3, 15.0 * u**2 * t**2, 8.5 * u**3 * t], axis=-1) * 255.0
    out = np.clip(rgb, 0, 255).astype(np.uint8)
    out[counts >= max_iter] = 0
    return out


@pytest.mark.parametrize(
    ("max_iter", "shape"),
    [
        pytest.param(1, (5, 7), id="max-iter-1"),
        pytest.param(500, (64, 48), id="table-of-every-count"),
        pytest.param(2000, (30, 20), id="image-smaller-than-the-table"),
        pytest.param(100_000_000, (33, 65), id="huge-max-iter"),
    ],
)
def test_colourize_is_the_per_pixel_formula(max_iter: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(max_iter)
    counts = rng.integers(0, max_iter + 1, size=shape).astype(np.uint32)
    counts.flat[0] = max_iter  # black
    counts.flat[-1] = 0
    got = colourize(counts, max_iter)
    assert got.dtype == np.uint8 and got.shape == (*shape, 3)
    assert np.array_equal(got, _formula(counts, max_iter))
