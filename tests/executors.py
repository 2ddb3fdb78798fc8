"""Executors for tests: `WorkerNode` with everything real but the WebAssembly run, which
is replaced by the same bytes computed in Python (NumPy Mandelbrot tiles, hashlib PBKDF2),
optionally wrong (a liar), late (a slow device) or never (a node that stops answering)."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import Callable

import numpy as np
from processdistro.shared.tasks.mandelbrot import INPUT
from processdistro.worker.exceptions import ModuleStatus
from processdistro.worker.state import Start


def tile_counts(payload: bytes) -> np.ndarray:
    """Exact design.md semantics, vectorized over one tile."""
    xmin, xmax, ymin, ymax, w_img, h_img, x0, y0, w, h, max_iter, _ = INPUT.unpack(payload)
    dx = (xmax - xmin) / w_img
    dy = (ymax - ymin) / h_img
    i = np.arange(x0, x0 + w, dtype=np.float64)
    j = np.arange(y0, y0 + h, dtype=np.float64)
    cx = np.broadcast_to(xmin + (i + 0.5) * dx, (h, w))
    cy = np.broadcast_to((ymax - (j + 0.5) * dy)[:, None], (h, w))
    x = np.zeros((h, w))
    y = np.zeros((h, w))
    n = np.zeros((h, w), dtype=np.uint32)
    active = np.ones((h, w), dtype=bool)
    for _ in range(max_iter):
        active &= x * x + y * y <= 4.0
        if not active.any():
            break
        xn = (x * x - y * y) + cx
        yn = (2.0 * x) * y + cy
        x = np.where(active, xn, x)
        y = np.where(active, yn, y)
        n += active
    return n


def mandelbrot_tile(payload: bytes) -> bytes:
    return bytes(tile_counts(payload).astype("<u4").tobytes())


def hash_batch(payload: bytes) -> bytes:
    """password_hash mode 0 (docs/wasm-abi.md) with hashlib: what both the hash and the
    crack kinds send (a crack subtask is its candidates with the job's salt, and a short
    dklen: the node never sees the target)."""
    _mode, iterations, dklen, count = struct.unpack_from("<B3xIII", payload)
    pos, out = 16, b""
    for _ in range(count):
        fields = []
        for _ in range(2):
            (n,) = struct.unpack_from("<I", payload, pos)
            fields.append(payload[pos + 4 : pos + 4 + n])
            pos += 4 + n
        out += hashlib.pbkdf2_hmac("sha256", fields[0], fields[1], iterations, dklen)
    return out


def flip_first_pixel(out: bytes) -> bytes:
    (v,) = struct.unpack_from("<I", out)
    return struct.pack("<I", v ^ 1) + out[4:]


COMPUTE: dict[str, Callable[[bytes], bytes]] = {"mandelbrot": mandelbrot_tile, "hash": hash_batch, "crack": hash_batch}


class PythonExecutor:
    """A `worker.executor.Executor` computing parts in Python (in threads, so parts of
    several slots overlap as the real processes do).

    `corrupt` rewrites every output (a liar); `delay` is the least time a part takes, in
    seconds (a slow device); after `answers` parts it never answers again (a node that
    hangs). Kinds other than those in `COMPUTE` fail, as a module would that cannot run."""

    def __init__(
        self,
        *,
        corrupt: Callable[[bytes], bytes] | None = None,
        delay: float = 0.0,
        answers: int | None = None,
    ) -> None:
        self.corrupt = corrupt
        self.delay = delay
        self.answers = answers
        self.started = 0  # parts taken on and not stopped (those that will never answer excluded)

    def resize(self, slots: int) -> None:
        pass  # threads are made as needed

    async def run(self, part: Start, data: bytes) -> tuple[bytes, float]:
        if self.answers is not None and self.started >= self.answers:
            await asyncio.Event().wait()  # never answers: held until cancelled
        self.started += 1
        began = time.monotonic()
        try:
            compute = COMPUTE.get(part.kind)
            if compute is None:
                raise ModuleStatus(f"the test executor cannot run kind {part.kind!r}")
            out = await asyncio.to_thread(compute, data)
            if self.corrupt is not None:
                out = self.corrupt(out)
            await asyncio.sleep(self.delay - (time.monotonic() - began))
        except asyncio.CancelledError:
            self.started -= 1  # stopped: it answers nothing
            raise
        return out, (time.monotonic() - began) * 1000

    def begin_close(self) -> None:
        pass

    async def close(self) -> None:
        pass
