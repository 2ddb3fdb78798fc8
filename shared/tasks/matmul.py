"""Matrix multiplication: C = A @ B, one subtask per (row block of A, column block of B).

The CLI (`prepare`) reads A.npy and B.npy, checks the shapes multiply, and stores each row
block of A and each column block of B once in Redis as a shared block; a subtask is a
16-byte header plus two block references, so a node fetches each block it needs once and
caches it. float64, or float32 when both inputs are float32. Every tile is checked with
Freivalds' test (two random vectors) before it is merged into C.npy in place.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..exceptions import ParamsError
from ..lazy import lazy
from .base import JobFiles, Prepared, Subtask, TaskPlugin, Verdict, merged

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy("numpy")

HEADER = struct.Struct("<4I")  # dtype code, m, k, n
DTYPES: dict[str, tuple[int, str]] = {"float64": (0, "<f8"), "float32": (1, "<f4")}
FREIVALDS_ROUNDS = 2


class MatmulParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    m: int = Field(ge=1)
    k: int = Field(ge=1)
    n: int = Field(ge=1)
    dtype: Literal["float64", "float32"]
    tile: int = Field(default=256, ge=1, le=8192)
    a_blocks: list[str]
    b_blocks: list[str]
    source: str = ""

    @model_validator(mode="after")
    def _blocks(self) -> MatmulParams:
        if len(self.a_blocks) != -(-self.m // self.tile) or len(self.b_blocks) != -(-self.n // self.tile):
            raise ValueError("block lists do not match the shapes and tile")
        return self

    @property
    def tiles_n(self) -> int:
        return len(self.b_blocks)

    def tile_rect(self, index: int) -> tuple[int, int, int, int]:
        """(row0, col0, rows, cols) of output tile `index`."""
        ti, tj = divmod(index, self.tiles_n)
        r0, c0 = ti * self.tile, tj * self.tile
        return r0, c0, min(self.tile, self.m - r0), min(self.tile, self.n - c0)


def _load(path: str, name: str) -> np.ndarray:
    try:
        arr = np.load(os.path.expanduser(path), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ParamsError(f"cannot read {name} from {path}: {exc}") from None
    if arr.ndim != 2:
        raise ParamsError(f"{name} must be a 2-D matrix, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ParamsError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if 0 in arr.shape:
        raise ParamsError(f"{name} is empty (shape {arr.shape})")
    result: np.ndarray = arr
    return result


class MatmulPlugin(TaskPlugin[MatmulParams]):
    kind = "matmul"
    module = "matrix_mul"
    params_model = MatmulParams

    PARTIAL = "C.partial.npy"
    RESULT = "C.npy"

    def describe(self) -> str:
        return "multiply two matrices (.npy)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--a", type=Path, required=True, help="left matrix A (.npy, 2-D)")
        parser.add_argument("--b", type=Path, required=True, help="right matrix B (.npy, 2-D)")
        parser.add_argument("--tile", type=int, default=256, help="rows of A / columns of B per subtask")
        parser.add_argument("-o", "--output", type=Path, help="C = A @ B as .npy (with --wait)")

    def params_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"a": str(args.a), "b": str(args.b), "tile": args.tile}

    def outputs_from_args(self, args: argparse.Namespace) -> dict[str, Path | None]:
        return {"c": args.output}

    def prepare(self, raw: dict[str, Any]) -> Prepared:
        a, b = _load(raw["a"], "A"), _load(raw["b"], "B")
        (m, k), (k2, n) = a.shape, b.shape
        if k != k2:
            raise ParamsError(
                f"shapes do not multiply: A is {m}x{k} and B is {k2}x{n}; A's columns ({k}) must equal B's rows ({k2})"
            )
        dtype = "float32" if a.dtype == np.float32 and b.dtype == np.float32 else "float64"
        tile = 256 if raw.get("tile") is None else int(raw["tile"])
        if tile < 1:
            raise ParamsError(f"tile must be at least 1, got {tile}")
        le = DTYPES[dtype][1]
        blocks: dict[str, bytes] = {}

        def add(block: np.ndarray) -> str:
            data = np.ascontiguousarray(block, dtype=le).tobytes()
            sha = hashlib.sha256(data).hexdigest()
            blocks[sha] = data
            return sha

        a_blocks = [add(a[r : r + tile]) for r in range(0, m, tile)]
        b_blocks = [add(b[:, c : c + tile]) for c in range(0, n, tile)]
        params = {"m": m, "k": k, "n": n, "dtype": dtype, "tile": tile, "a_blocks": a_blocks, "b_blocks": b_blocks}
        params["source"] = f"{raw['a']} @ {raw['b']}"
        return Prepared(params=params, blocks=blocks)

    def count(self, params: MatmulParams) -> int:
        return len(params.a_blocks) * len(params.b_blocks)

    def split(self, params: MatmulParams, start: int = 0) -> Iterator[Subtask]:
        code = DTYPES[params.dtype][0]
        for index in range(start, self.count(params)):
            ti, tj = divmod(index, params.tiles_n)
            _, _, rows, cols = params.tile_rect(index)
            yield Subtask(HEADER.pack(code, rows, params.k, cols), (params.a_blocks[ti], params.b_blocks[tj]))

    def verify(self, params: MatmulParams, index: int, task_input: bytes, output: bytes, rng: random.Random) -> Verdict:
        _, _, rows, cols = params.tile_rect(index)
        le = DTYPES[params.dtype][1]
        size = np.dtype(le).itemsize
        if len(output) != rows * cols * size:
            return Verdict.REJECT
        a = np.frombuffer(task_input, dtype=le, count=rows * params.k, offset=HEADER.size).reshape(rows, params.k)
        b = np.frombuffer(task_input, dtype=le, offset=HEADER.size + a.nbytes).reshape(params.k, cols)
        c = np.frombuffer(output, dtype=le).reshape(rows, cols)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            # Freivalds cannot bound errors through inf/nan: recompute the tile
            expected = a @ b
            ok = np.array_equal(np.isnan(expected), np.isnan(c)) and np.allclose(c, expected, equal_nan=True)
            return Verdict.ACCEPT if ok else Verdict.REJECT
        if not np.isfinite(c).all():
            return Verdict.REJECT
        eps = float(np.finfo(le).eps)
        gen = np.random.default_rng(rng.getrandbits(64))
        a64, b64, c64 = a.astype(np.float64), b.astype(np.float64), c.astype(np.float64)
        for _ in range(FREIVALDS_ROUNDS):
            x = gen.uniform(0.5, 1.5, cols) * gen.choice((-1.0, 1.0), cols)
            diff = np.abs(c64 @ x - a64 @ (b64 @ x))
            # forward error bound of a length-k dot product, with slack: (k + 2) * eps * sum|a||b||x|
            bound = (params.k + 2) * 4 * eps * (np.abs(a64) @ (np.abs(b64) @ np.abs(x))) + 1e-300
            if (diff > bound).any():
                return Verdict.REJECT
        return Verdict.ACCEPT

    def merge(self, files: JobFiles, params: MatmulParams, index: int, output: bytes) -> None:
        r0, c0, rows, cols = params.tile_rect(index)
        le = DTYPES[params.dtype][1]
        out = files.memmap(self.PARTIAL, (params.m, params.n), np.dtype(le))
        out[r0 : r0 + rows, c0 : c0 + cols] = np.frombuffer(output, dtype=le).reshape(rows, cols)
        files.written(out)

    def finalize(self, files: JobFiles, params: MatmulParams) -> dict[str, str]:
        # C was written in place, tile by tile: finishing it is a rename, not a copy
        result: Path = files.path(self.RESULT)
        partial = files.path(self.PARTIAL)
        if partial.exists() or not result.exists():  # a re-run after a crash finds it renamed
            os.replace(merged(partial), result)
        return {"c": str(result)}
