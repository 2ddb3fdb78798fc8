"""bench/compare.py's before/after rows for the changes beside the engine, on one job's own
tiles (no benchmark of its own: `python -m bench` skips modules without `run`).

- verify: `MandelbrotPlugin.verify`'s spot checks of every tile of the job, the same seeded
  sample pixels, computed by the pure-Python loop (`escape_count`, before) and by
  `kernel_escape` (after: the module in-process for expensive pixels); CPU seconds, and the
  verdicts and iterations spent checked equal.
- finalize: `.npy` + colouring + PNG of the job's counts, as it was (the per-pixel formula,
  zlib level 6), as the merge left it (a colour table, Pillow's PNG at zlib level 1, then the
  `.npy`) and `MandelbrotPlugin.finalize` now (bands of rows without filters compressed on
  two threads, the `.npy` beside them); the images decoded and compared.
- result frame: one 64 KiB tile's trip through the node's and the gateway's Python, CPU: as
  a JSON text frame (base64 made and written by the node, parsed and checked by the
  gateway's `parse_frame`, both with today's code) and as a binary frame (`binary_frame`,
  `parse_binary`); the bytes the gateway ends up with checked equal. (Before this branch a
  text result was also checked by the node, decoded twice by the gateway with a slower
  check, and deflated and inflated by permessage-deflate: not counted here.)
- join score: the worker's benchmark in the worker's main process on an epoch-interrupted
  engine (before) and `pool.measure_speed` in an executor process (after).
Interleaved, medians of three.
"""

from __future__ import annotations

import base64
import random
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from processdistro.gateway.frames import Reports, parse_frame
from processdistro.shared.core.dispatch import pick_module
from processdistro.shared.modules import ModuleRegistry
from processdistro.shared.protocol import Base64Text, Results, TaskResult, b64_bytes
from processdistro.shared.tasks.base import JobFiles, Verdict, atomic_write
from processdistro.shared.tasks.mandelbrot import (
    Escape,
    MandelbrotParams,
    MandelbrotPlugin,
    _palette,
    colourize,
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


def _finalize_merged(p: MandelbrotParams, counts: np.ndarray, out: Path) -> float:
    # finalize as the merge left it: the .npy, the colour table, then Pillow at zlib level 1,
    # each written durably (fsync) as finalize writes them
    t0 = time.perf_counter()
    atomic_write(out / "counts.npy", lambda f: np.save(f, counts), durable=True)
    image = Image.fromarray(colourize(counts, p.max_iter), "RGB")
    atomic_write(out / "mandelbrot.png", lambda f: image.save(f, format="PNG", compress_level=1), durable=True)
    return time.perf_counter() - t0


def _frames(tiles: list[bytes]) -> tuple[float, float]:
    """CPU per tile of a result's trip as a text frame and as a binary frame (node + gateway)."""
    got: dict[str, list[bytes]] = {"text": [], "binary": []}
    t0 = time.process_time()
    for k, tile in enumerate(tiles):
        out = Base64Text(base64.b64encode(tile).decode(), tile)
        text = Results(items=[TaskResult(task_id=f"{k + 1}-0", output_b64=out, elapsed_ms=1.0)]).model_dump_json()
        frame = parse_frame(text, 1 << 24)
        assert isinstance(frame, Reports)
        got["text"].append(b64_bytes(frame.items[0].output_b64))  # type: ignore[union-attr]
    t1 = time.process_time()
    for k, tile in enumerate(tiles):
        out = Base64Text(base64.b64encode(tile).decode(), tile)
        data = Results(items=[TaskResult(task_id=f"{k + 1}-0", output_b64=out, elapsed_ms=1.0)]).binary_frame()
        assert data is not None
        frame = parse_frame(None, 1 << 24, data)
        assert isinstance(frame, Reports)
        got["binary"].append(b64_bytes(frame.items[0].output_b64))  # type: ignore[union-attr]
    t2 = time.process_time()
    if got["text"] != tiles or got["binary"] != tiles:
        raise RuntimeError("a result frame did not carry the tile's bytes")
    return (t1 - t0) / len(tiles), (t2 - t1) / len(tiles)


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

    mid_dir = work / "finalize-merged"
    both(
        "finalize",
        lambda: _finalize_before(p, counts, fresh(old_dir)),
        lambda: _finalize_after(p, counts, fresh(new_dir)),
    )
    for _ in range(REPS):
        before.setdefault("finalize-merged", []).append(_finalize_merged(p, counts, fresh(mid_dir)))
    new_png = np.asarray(Image.open(new_dir / "mandelbrot.png"))
    for d in (old_dir, mid_dir):
        if not np.array_equal(np.asarray(Image.open(d / "mandelbrot.png")), new_png):
            raise RuntimeError(f"finalize wrote a different image than {d.name}")
    if not np.array_equal(np.load(new_dir / "counts.npy"), counts):
        raise RuntimeError("finalize wrote different counts")
    tiles = [
        np.ascontiguousarray(counts[y0 : y0 + h, x0 : x0 + w]).tobytes()
        for x0, y0, w, h in (p.tile_rect(i) for i in range(PLUGIN.count(p)))
    ]
    for _ in range(REPS):
        text_s, binary_s = _frames(tiles)
        before.setdefault("frame", []).append(text_s)
        after.setdefault("frame", []).append(binary_s)
    reg = ModuleRegistry()
    base = reg.get("mandelbrot")
    module = pick_module(reg.by_sha, reg.by_name, base.sha256, simd=describe().simd) or base
    assert module.path is not None
    path = module.path
    both("join", lambda: _join_before(module.sha256, path), lambda: measure_speed(module.sha256, path, Limits()))
    count = PLUGIN.count(p)
    rows.append([
        f"verify: spot checks of the {count} tiles (CPU)",
        f"{_median(before['verify']) * 1000:.0f} ms", f"{_median(after['verify']) * 1000:.0f} ms",
        f"{_median(before['verify']) / _median(after['verify']):.1f}×",
    ])  # fmt: skip
    rows.append([
        f"finalize: .npy + colouring + PNG of {p.width}×{p.height}",
        f"{_median(before['finalize']):.2f} s", f"{_median(after['finalize']):.2f} s",
        f"{_median(before['finalize']) / _median(after['finalize']):.1f}×",
    ])  # fmt: skip
    rows.append([
        "finalize, as the merge left it (colour table, Pillow PNG level 1) → now",
        f"{_median(before['finalize-merged']):.2f} s", f"{_median(after['finalize']):.2f} s",
        f"{_median(before['finalize-merged']) / _median(after['finalize']):.1f}×",
    ])  # fmt: skip
    rows.append([
        "result frame of a 64 KiB tile, node + gateway Python (CPU): JSON text → binary",
        f"{_median(before['frame']) * 1e3:.2f} ms", f"{_median(after['frame']) * 1e3:.2f} ms",
        f"{_median(before['frame']) / _median(after['frame']):.1f}×",
    ])  # fmt: skip
    rows.append([
        f"join benchmark score ({module.name}, one core)",
        f"{_median(before['join']) / 1e6:.0f} M it/s", f"{_median(after['join']) / 1e6:.0f} M it/s",
        f"{_median(after['join']) / _median(before['join']):.2f}×",
    ])  # fmt: skip
    return rows
