"""Mandelbrot: the image is cut into square tiles, one subtask each.

Semantics (design.md, "Exact output semantics") are fixed to the bit: float64, no fused
multiply-add, row 0 at the top. Input layout: docs/wasm-abi.md.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import JobFiles, Subtask, TaskPlugin, Verdict, atomic_write, shared_memmap

INPUT = struct.Struct("<4d8I")  # xmin xmax ymin ymax, W H x0 y0 tile_w tile_h max_iter 0
SAMPLES_PER_TILE = 4


class MandelbrotParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(default=1024, ge=1, le=65536)
    height: int = Field(default=1024, ge=1, le=65536)
    xmin: float = -2.0
    xmax: float = 1.0
    ymin: float = -1.5
    ymax: float = 1.5
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


def escape_count(p: MandelbrotParams, i: int, j: int) -> int:
    """One pixel, exactly as design.md writes it (the controller's spot check)."""
    dx = (p.xmax - p.xmin) / p.width
    dy = (p.ymax - p.ymin) / p.height
    cx = p.xmin + (i + 0.5) * dx
    cy = p.ymax - (j + 0.5) * dy
    n, x, y = 0, 0.0, 0.0
    while n < p.max_iter and x * x + y * y <= 4.0:
        x, y = (x * x - y * y) + cx, (2.0 * x) * y + cy
        n += 1
    return n


def colourize(counts: np.ndarray, max_iter: int) -> np.ndarray:
    """RGB image of the counts; points that reach `max_iter` are black."""
    t = np.log1p(counts.astype(np.float64)) / math.log1p(max_iter)
    u = 1.0 - t
    rgb = np.stack([9.0 * u * t**3, 15.0 * u**2 * t**2, 8.5 * u**3 * t], axis=-1) * 255.0
    out = np.clip(rgb, 0, 255).astype(np.uint8)
    out[counts >= max_iter] = 0
    return out


class MandelbrotPlugin(TaskPlugin[MandelbrotParams]):
    kind = "mandelbrot"
    module = "mandelbrot"
    params_model = MandelbrotParams

    PARTIAL = "counts.partial.npy"
    RAW = "counts.npy"
    IMAGE = "mandelbrot.png"

    def count(self, params: MandelbrotParams) -> int:
        return params.tiles_x * params.tiles_y

    def encode(self, params: MandelbrotParams, index: int) -> bytes:
        x0, y0, w, h = params.tile_rect(index)
        return INPUT.pack(
            params.xmin,
            params.xmax,
            params.ymin,
            params.ymax,
            params.width,
            params.height,
            x0,
            y0,
            w,
            h,
            params.max_iter,
            0,
        )

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
        for _ in range(min(SAMPLES_PER_TILE, w * h)):
            r, c = rng.randrange(h), rng.randrange(w)
            if int(tile[r, c]) != escape_count(params, x0 + c, y0 + r):
                return Verdict.REJECT
        return Verdict.ACCEPT

    def _canvas(self, files: JobFiles, params: MandelbrotParams) -> np.memmap:
        return shared_memmap(files.path(self.PARTIAL), (params.height, params.width), np.uint32)

    def merge(self, files: JobFiles, params: MandelbrotParams, index: int, output: bytes) -> None:
        x0, y0, w, h = params.tile_rect(index)
        canvas = self._canvas(files, params)
        canvas[y0 : y0 + h, x0 : x0 + w] = np.frombuffer(output, dtype="<u4").reshape(h, w)
        canvas.flush()
        del canvas

    def finalize(self, files: JobFiles, params: MandelbrotParams) -> dict[str, str]:
        counts = np.array(self._canvas(files, params))
        raw, image = files.path(self.RAW), files.path(self.IMAGE)
        atomic_write(raw, lambda p: np.save(p, counts))
        atomic_write(image, lambda p: Image.fromarray(colourize(counts, params.max_iter), "RGB").save(p, format="PNG"))
        files.path(self.PARTIAL).unlink(missing_ok=True)
        return {"raw": str(raw), "image": str(image)}
