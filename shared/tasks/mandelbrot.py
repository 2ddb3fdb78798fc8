"""Mandelbrot: the image is cut into square tiles, one subtask each.

Semantics are fixed to the bit: float64, no fused multiply-add, row 0 at the top
(docs/wasm-abi.md, `mandelbrot`). The module's input layout is spelled once for Python, here:
`INPUT`, `TileInput`, `tile_input`; Python code that builds or reads a tile input (tests,
benchmarks) uses them.
"""

from __future__ import annotations

import argparse
import math
import random
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..lazy import lazy, lazy_function
from ..modules import DEFAULT_STATIC_DIR
from .base import JobFiles, Subtask, TaskPlugin, Verdict, keep_or_write, merged, shared_memmap
from .png import write_png

if TYPE_CHECKING:
    import numpy as np
    import wasmtime
    from numpy.lib.format import open_memmap
else:
    np = lazy("numpy")
    wasmtime = lazy("wasmtime")
    open_memmap = lazy_function("numpy.lib.format", "open_memmap")

# The module's 64-byte input, little-endian: xmin xmax ymin ymax (f64), then the image's W H,
# the tile's x0 y0 tile_w tile_h, max_iter and a reserved 0 (u32).
INPUT = struct.Struct("<4d8I")
DEFAULT_VIEW = (-2.0, 1.0, -1.5, 1.5)  # xmin, xmax, ymin, ymax
SAMPLES_PER_TILE = 4
#: Iterations the controller spends on the spot checks of one tile, at most, whatever
#: `max_iter` is (`spot_check`): well under a millisecond in the kernel (about 40 ms in Python).
CHECK_ITERATIONS = 100_000
#: The module the controller recomputes sample pixels with (any build gives the same counts).
CHECK_MODULE = DEFAULT_STATIC_DIR / "wasm" / "mandelbrot.wasm"
PNG_LEVEL = 1  # zlib level of the image (finalize)
# Help text for the `submit mandelbrot` flags that have one; the rest show just their default.
_HELP = {"tile": "tile edge in pixels (one subtask per tile)"}


class TileInput(NamedTuple):
    """One tile's input, field by field in `INPUT`'s order."""

    xmin: float
    xmax: float
    ymin: float
    ymax: float
    width: int
    height: int
    x0: int
    y0: int
    tile_w: int
    tile_h: int
    max_iter: int
    reserved: int = 0

    def pack(self) -> bytes:
        return INPUT.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> TileInput:
        """Read an input of exactly `INPUT.size` bytes (struct.error otherwise)."""
        return cls(*INPUT.unpack(data))


def tile_input(
    width: int,
    height: int,
    x0: int,
    y0: int,
    tile_w: int,
    tile_h: int,
    max_iter: int,
    view: tuple[float, float, float, float] = DEFAULT_VIEW,
    reserved: int = 0,
) -> bytes:
    """The module's input for the tile at (x0, y0), tile_w x tile_h, of a width x height
    image of `view` (xmin, xmax, ymin, ymax)."""
    return TileInput(*view, width, height, x0, y0, tile_w, tile_h, max_iter, reserved).pack()


class MandelbrotParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(default=1024, ge=1, le=65536)
    height: int = Field(default=1024, ge=1, le=65536)
    xmin: float = DEFAULT_VIEW[0]
    xmax: float = DEFAULT_VIEW[1]
    ymin: float = DEFAULT_VIEW[2]
    ymax: float = DEFAULT_VIEW[3]
    max_iter: int = Field(default=500, ge=1, le=100_000_000)
    tile: int = Field(default=128, ge=4, le=4096, description="tile edge in pixels")

    @model_validator(mode="after")
    def _bounds(self) -> MandelbrotParams:
        for name in ("xmin", "xmax", "ymin", "ymax"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if not self.xmin < self.xmax:
            raise ValueError(f"expected xmin < xmax, got {self.xmin} >= {self.xmax}")
        if not self.ymin < self.ymax:
            raise ValueError(f"expected ymin < ymax, got {self.ymin} >= {self.ymax}")
        return self

    @property
    def view(self) -> tuple[float, float, float, float]:
        return self.xmin, self.xmax, self.ymin, self.ymax

    @property
    def tiles_x(self) -> int:
        return -(-self.width // self.tile)

    @property
    def tiles_y(self) -> int:
        return -(-self.height // self.tile)

    def tile_rect(self, index: int) -> tuple[int, int, int, int]:
        """(x0, y0, w, h) of tile `index`, tiles numbered row by row from the top left."""
        ty, tx = divmod(index, self.tiles_x)
        x0, y0 = tx * self.tile, ty * self.tile
        return x0, y0, min(self.tile, self.width - x0), min(self.tile, self.height - y0)


def escape_count(p: MandelbrotParams, i: int, j: int, limit: int | None = None) -> int:
    """One pixel, exactly as docs/wasm-abi.md writes it (the controller's spot check),
    iterating at most `limit` times (and `max_iter`)."""
    cap = p.max_iter if limit is None else min(p.max_iter, limit)
    dx = (p.xmax - p.xmin) / p.width
    dy = (p.ymax - p.ymin) / p.height
    cx = p.xmin + (i + 0.5) * dx
    cy = p.ymax - (j + 0.5) * dy
    n, x, y = 0, 0.0, 0.0
    while n < cap and x * x + y * y <= 4.0:
        x, y = (x * x - y * y) + cx, (2.0 * x) * y + cy
        n += 1
    return n


#: (params, column, row, limit) -> the pixel's count, iterating at most `limit` times
Escape = Callable[[MandelbrotParams, int, int, int], int]


class _Kernel:
    """The Mandelbrot module in this process, one pixel per call: the pixel `(i, j)` as a 1x1
    tile of the same image with `max_iter = limit` is exactly `escape_count(p, i, j, limit)`
    (the loop stops at `min(max_iter, limit)` either way, and `cx`, `cy` do not depend on the
    cap). Our own module on calls of at most `CHECK_ITERATIONS` iterations: bounded, so the
    engine is wasmtime's default (no deadline checks), and it runs the pixel ~100x faster than
    Python. One instance per thread (a store is not thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.engine = wasmtime.Engine()
        self.module = wasmtime.Module(self.engine, path.read_bytes())
        self._local = threading.local()

    def _instance(self) -> tuple[wasmtime.Store, wasmtime.Memory, wasmtime.Func, wasmtime.Func, int]:
        found: tuple[wasmtime.Store, wasmtime.Memory, wasmtime.Func, wasmtime.Func, int] | None
        found = getattr(self._local, "inst", None)
        if found is None:
            store = wasmtime.Store(self.engine)
            exports = wasmtime.Instance(store, self.module, []).exports(store)
            memory, alloc, run, output_ptr = (exports[n] for n in ("memory", "pd_alloc", "pd_run", "pd_output_ptr"))
            assert isinstance(memory, wasmtime.Memory)
            assert isinstance(alloc, wasmtime.Func) and isinstance(run, wasmtime.Func)
            assert isinstance(output_ptr, wasmtime.Func)
            # one input buffer for every call: `pd_run` keeps the input (docs/wasm-abi.md),
            # and only a new `pd_alloc` would free it
            ptr = alloc(store, INPUT.size)
            assert isinstance(ptr, int) and ptr != 0
            found = self._local.inst = (store, memory, run, output_ptr, ptr)
        return found

    def __call__(self, p: MandelbrotParams, i: int, j: int, limit: int) -> int:
        store, memory, run, output_ptr, ptr = self._instance()
        memory.write(store, tile_input(p.width, p.height, i, j, 1, 1, min(p.max_iter, limit), p.view), ptr)
        status = run(store, ptr, INPUT.size)
        if status != 0:
            raise RuntimeError(f"the Mandelbrot module returned status {status} for pixel ({i}, {j})")
        out = output_ptr(store)
        assert isinstance(out, int)
        count: int = struct.unpack("<I", memory.read(store, out, out + 4))[0]
        return count


_KERNEL: _Kernel | None = None
#: pixels capped at more iterations than this are computed by the module (`kernel_escape`)
KERNEL_FROM = 300
_KERNEL_LOCK = threading.Lock()


def kernel_escape(p: MandelbrotParams, i: int, j: int, limit: int) -> int:
    """`escape_count(p, i, j, limit)`, by the Mandelbrot module in this process when the pixel
    may take more than `KERNEL_FROM` iterations (a call costs about as much as that many
    iterations of Python), else by the Python loop; the same count either way."""
    global _KERNEL
    if min(p.max_iter, limit) <= KERNEL_FROM:
        return escape_count(p, i, j, limit)
    if _KERNEL is None:
        with _KERNEL_LOCK:
            if _KERNEL is None and CHECK_MODULE.exists():
                _KERNEL = _Kernel(CHECK_MODULE)
    if _KERNEL is None:
        return escape_count(p, i, j, limit)
    return _KERNEL(p, i, j, limit)


def spot_check(
    p: MandelbrotParams,
    x0: int,
    y0: int,
    tile: np.ndarray,
    rng: random.Random,
    budget: int = CHECK_ITERATIONS,
    escape: Escape = kernel_escape,
) -> tuple[Verdict, int]:
    """Recompute `SAMPLES_PER_TILE` pixels of a tile, chosen uniformly by `rng`, spending at
    most `budget` iterations in all; returns the verdict and the iterations spent.

    Each pixel gets an equal share of the budget. A pixel whose claimed count fits its share
    (a cheap pixel: the common case, and every pixel when `max_iter` is modest) is checked
    exactly, in `claimed + 1` iterations at most; an expensive one is checked up to its share
    (it must not escape before). Pixels are not picked by their claimed cost: the claims are
    the node's, and a liar could steer such a choice away from its inventions.

    `escape` computes a pixel: the module in this process (`kernel_escape`) or the reference
    loop (`escape_count`); the same pixels, the same counts, the same verdict either way."""
    h, w = tile.shape
    samples = min(SAMPLES_PER_TILE, w * h)
    share = max(1, budget // samples)
    spent = 0
    for _ in range(samples):
        r, c = rng.randrange(h), rng.randrange(w)
        claimed = int(tile[r, c])
        # an exact check of a count below max_iter runs one step past it (it must escape there)
        need = claimed + 1 if claimed < p.max_iter else claimed
        cap = min(need, share)
        n = escape(p, x0 + c, y0 + r, cap)
        spent += n
        if n != (claimed if cap == need else cap):
            return Verdict.REJECT, spent
    return Verdict.ACCEPT, spent


def _palette(values: np.ndarray, max_iter: int) -> np.ndarray:
    """The colour of each count in `values` (1-D), the formula of the image: (len, 3) uint8."""
    t = np.log1p(values.astype(np.float64)) / math.log1p(max_iter)
    u = 1.0 - t
    rgb = np.stack([9.0 * u * t**3, 15.0 * u**2 * t**2, 8.5 * u**3 * t], axis=-1) * 255.0
    out = np.clip(rgb, 0, 255).astype(np.uint8)
    out[values >= max_iter] = 0
    return out


def colour_table(counts: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """`(table, index)`: the colour of pixel `(j, i)` is `table[min(index[j, i], len(table) - 1)]`.

    A pixel's colour depends on its count alone, so the formula runs once per distinct count:
    over a table of `max_iter + 1` colours indexed by the counts themselves (a count past
    `max_iter` is black like `max_iter`), or, when the image has fewer pixels than that, over
    the counts present (`np.unique`)."""
    if max_iter + 1 <= counts.size:
        return _palette(np.arange(max_iter + 1, dtype=np.uint32), max_iter), counts
    present, inverse = np.unique(np.minimum(counts.reshape(-1), max_iter), return_inverse=True)
    return _palette(present, max_iter), inverse.reshape(counts.shape)


def colourize(counts: np.ndarray, max_iter: int) -> np.ndarray:
    """RGB image of the counts; points that reach `max_iter` are black: a lookup in
    `colour_table` (the same bytes as the formula per pixel, ten times faster)."""
    table, index = colour_table(counts, max_iter)
    image: np.ndarray = np.take(table, index.reshape(-1), axis=0, mode="clip").reshape(*counts.shape, 3)
    return image


def write_image(fh: BinaryIO, counts: np.ndarray, max_iter: int) -> None:
    """The PNG of `colourize(counts, max_iter)` (`png.write_png`: no row filters, bands
    compressed on two threads, zlib level `PNG_LEVEL`); each band is coloured as its turn
    comes, so the whole RGB image is never held at once."""
    table, index = colour_table(counts, max_iter)
    height, width = counts.shape

    def rows(start: int, stop: int) -> np.ndarray:
        rgb: np.ndarray = np.take(table, index[start:stop].reshape(-1), axis=0, mode="clip")
        return rgb.reshape(stop - start, 3 * width)

    write_png(fh, width, height, rows, level=PNG_LEVEL)


_PARAMS = ("width", "height", "xmin", "xmax", "ymin", "ymax", "max_iter", "tile")


class MandelbrotPlugin(TaskPlugin[MandelbrotParams]):
    kind = "mandelbrot"
    module = "mandelbrot"
    params_model = MandelbrotParams
    main_output = "image"

    PARTIAL = "counts.partial.npy"
    RAW = "counts.npy"
    IMAGE = "mandelbrot.png"

    def describe(self) -> str:
        return "render the Mandelbrot set"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        # one flag per parameter, with the model's own defaults (--max-iter for max_iter)
        for name in _PARAMS:
            field = MandelbrotParams.model_fields[name]
            number = int if field.annotation is int else float
            flag = "--" + name.replace("_", "-")
            parser.add_argument(flag, type=number, default=field.default, help=_HELP.get(name))
        parser.add_argument("-o", "--output", type=Path, help="PNG to write when done (with --wait)")
        parser.add_argument("--raw", type=Path, help="raw uint32 counts .npy to write when done (with --wait)")

    def params_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {name: getattr(args, name) for name in _PARAMS}

    def outputs_from_args(self, args: argparse.Namespace) -> dict[str, Path | None]:
        return {"image": args.output, "raw": args.raw}

    def count(self, params: MandelbrotParams) -> int:
        return params.tiles_x * params.tiles_y

    def encode(self, params: MandelbrotParams, index: int) -> bytes:
        x0, y0, w, h = params.tile_rect(index)
        return tile_input(params.width, params.height, x0, y0, w, h, params.max_iter, params.view)

    def split(self, params: MandelbrotParams, start: int = 0) -> Iterator[Subtask]:
        for index in range(start, self.count(params)):
            yield Subtask(self.encode(params, index))

    def verify(
        self, params: MandelbrotParams, index: int, task_input: bytes, output: bytes, rng: random.Random
    ) -> Verdict:
        x0, y0, w, h = params.tile_rect(index)
        if len(output) != w * h * 4:
            return Verdict.REJECT
        tile = np.frombuffer(output, dtype="<u4").reshape(h, w)
        if int(tile.max(initial=0)) > params.max_iter:
            return Verdict.REJECT
        return spot_check(params, x0, y0, tile, rng)[0]

    def _canvas(self, files: JobFiles, params: MandelbrotParams) -> np.memmap:
        return shared_memmap(files.path(self.PARTIAL), (params.height, params.width), np.uint32)

    def merge(self, files: JobFiles, params: MandelbrotParams, index: int, output: bytes) -> None:
        x0, y0, w, h = params.tile_rect(index)
        canvas = files.memmap(self.PARTIAL, (params.height, params.width), np.uint32)
        canvas[y0 : y0 + h, x0 : x0 + w] = np.frombuffer(output, dtype="<u4").reshape(h, w)
        files.written(canvas)

    def finalize(self, files: JobFiles, params: MandelbrotParams) -> dict[str, str]:
        raw, image = files.path(self.RAW), files.path(self.IMAGE)
        if not (raw.exists() and image.exists()):
            counts = self._counts(files)
            # the .npy (a copy and an fsync) goes on beside the image's colouring and compression
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="npy") as pool:
                saved = pool.submit(keep_or_write, raw, lambda p: np.save(p, counts))
                keep_or_write(image, lambda p: write_image(p, counts, params.max_iter))
                saved.result()
        return {"raw": str(raw), "image": str(image)}

    def _counts(self, files: JobFiles) -> np.ndarray:
        """The merged counts: the canvas, or (cleaned up after a finalize) the raw output;
        never a fresh canvas, which would be all zeros."""
        partial = files.path(self.PARTIAL)
        if partial.exists():
            return np.array(open_memmap(partial, mode="r"))
        counts: np.ndarray = np.load(merged(files.path(self.RAW)))
        return counts

    def clean_up(self, files: JobFiles, params: MandelbrotParams) -> None:
        files.path(self.PARTIAL).unlink(missing_ok=True)
