"""bench/compare.py's before/after rows for the changes beside the engine, on one job's own
tiles (no benchmark of its own: `python -m bench` skips modules without `run`).

- verify: `MandelbrotPlugin.verify`'s spot checks of every tile of the job, the same seeded
  sample pixels, computed by the pure-Python loop (`escape_count`, before) and by
  `kernel_escape` (after: the module in-process for expensive pixels); CPU seconds, and the
  verdicts and iterations spent checked equal.
- finalize: `.npy` + colouring + PNG of the job's counts, as it was (the per-pixel formula,
  zlib level 6) and `MandelbrotPlugin.finalize` now; the images decoded and compared.
- join score: the worker's benchmark in the worker's main process on an epoch-interrupted
  engine (before) and `pool.measure_speed` in an executor process (after).
Interleaved, medians of three.
"""

from __future__ import annotations

import random
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from processdistro.shared.core.dispatch import pick_module
from processdistro.shared.modules import ModuleRegistry
from processdistro.shared.tasks.base import JobFiles, Verdict
from processdistro.shared.tasks.mandelbrot import (
    Escape,
    MandelbrotParams,
    MandelbrotPlugin,
    _palette,
    escape_count,
    kernel_escape,
)
from processdistro.worker.device import benchmark, describe
from processdistro.worker.pool import measure_speed
from processdistro.worker.runtime import Limits, ModuleRunner

from .pipeline import _test_helpers

REPS = 3
PLUGIN = MandelbrotPlugin()


def _old_colourize(counts: np.ndarray, max_iter: int) -> np.ndarray:
    # the colouring as it was: the image's formula on every pixel (`_palette` over the whole
    # array), for the "before" figure; finalize now applies it once per distinct count
    return _palette(counts, max_iter)


def _checks(p: MandelbrotParams, counts: np.ndarray, escape: Escape) -> tuple[float, list[tuple[Verdict, int]]]:
    _test_helpers()  # puts tests/ on the path: the suite's loop over the tiles, not a copy
    from mandel_checks import check_every_tile

    rng = random.Random(20261130)
    t0 = time.process_time()
    found = check_every_tile(p, counts, rng, escape)
    return time.process_time() - t0, found


def _finalize_before(p: MandelbrotParams, counts: np.ndarray, out: Path) -> float:
    t0 = time.perf_counter()
    np.save(out / "counts.npy", counts)
    Image.fromarray(_old_colourize(counts, p.max_iter), "RGB").save(out / "mandelbrot.png", format="PNG")
    return time.perf_counter() - t0


def _finalize_after(p: MandelbrotParams, counts: np.ndarray, out: Path) -> float:
    files = JobFiles("bench", out)
    canvas = PLUGIN._canvas(files, p)  # the state finalize starts from: the merged canvas
    canvas[:] = counts
    canvas.flush()
    del canvas
    t0 = time.perf_counter()
    PLUGIN.finalize(files, p)
    return time.perf_counter() - t0


def _join_before(sha: str, path: Path) -> float:
    runner = ModuleRunner(limits=Limits())  # as join.py ran it: in-process, epoch interruption
    try:
        return benchmark(runner, sha, path)
    finally:
        runner.close()


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def before_after(p: MandelbrotParams, counts: np.ndarray, work: Path) -> list[list[Any]]:
    """Rows [change, before, after, ratio] for the table of bench/compare.py."""
    rows: list[list[Any]] = []
    before: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}

    def both(key: str, old: Callable[[], float], new: Callable[[], float]) -> None:
        for _ in range(REPS):
            before.setdefault(key, []).append(old())
            after.setdefault(key, []).append(new())

    verdicts: dict[str, list[tuple[Verdict, int]]] = {}

    def check(escape: Escape, key: str) -> Callable[[], float]:
        def go() -> float:
            spent, found = _checks(p, counts, escape)
            verdicts[key] = found
            return spent

        return go

    both("verify", check(escape_count, "before"), check(kernel_escape, "after"))
    if verdicts["before"] != verdicts["after"]:
        raise RuntimeError("the spot checks' verdicts or iterations differ before and after")
    old_dir, new_dir = work / "finalize-before", work / "finalize-after"

    def fresh(d: Path) -> Path:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    both(
        "finalize",
        lambda: _finalize_before(p, counts, fresh(old_dir)),
        lambda: _finalize_after(p, counts, fresh(new_dir)),
    )
    old_png = np.asarray(Image.open(old_dir / "mandelbrot.png"))
    new_png = np.asarray(Image.open(new_dir / "mandelbrot.png"))
    if not (np.array_equal(old_png, new_png) and np.array_equal(np.load(new_dir / "counts.npy"), counts)):
        raise RuntimeError("finalize wrote a different image or counts than before")
    reg = ModuleRegistry()
    base = reg.get("mandelbrot")
    module = pick_module(reg.by_sha, reg.by_name, base.sha256, simd=describe().simd) or base
    assert module.path is not None
    path = module.path
    both("join", lambda: _join_before(module.sha256, path), lambda: measure_speed(module.sha256, path, Limits()))
    tiles = PLUGIN.count(p)
    rows.append([
        f"verify: spot checks of the {tiles} tiles (CPU)",
        f"{_median(before['verify']) * 1000:.0f} ms", f"{_median(after['verify']) * 1000:.0f} ms",
        f"{_median(before['verify']) / _median(after['verify']):.1f}×",
    ])  # fmt: skip
    rows.append([
        f"finalize: .npy + colouring + PNG of {p.width}×{p.height}",
        f"{_median(before['finalize']):.2f} s", f"{_median(after['finalize']):.2f} s",
        f"{_median(before['finalize']) / _median(after['finalize']):.1f}×",
    ])  # fmt: skip
    rows.append([
        f"join benchmark score ({module.name}, one core)",
        f"{_median(before['join']) / 1e6:.0f} M it/s", f"{_median(after['join']) / 1e6:.0f} M it/s",
        f"{_median(after['join']) / _median(before['join']):.2f}×",
    ])  # fmt: skip
    return rows
