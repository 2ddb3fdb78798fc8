"""What runs a part: the `Executor` interface `WorkerNode` is given, `WasmExecutor`, the
real one (modules fetched by hash into `ModuleStore`, run in `ExecutorPool` processes), and
`run_part`, one part from its input to its outcome event.

Tests inject an executor of their own (`tests/executors.py`: the same bytes computed with
NumPy and hashlib, a liar, a slow device) and keep everything else of the real node."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Protocol

import httpx

from .exceptions import TaskError
from .fetch import BlockCache, ModuleStore
from .pool import ExecutorPool
from .runtime import Limits
from .state import PartDone, PartFailed, Start


class Executor(Protocol):
    """Runs up to `slots` parts at once. `run` raises a `TaskError` for a part that failed;
    cancelling the awaiting task stops the part."""

    def resize(self, slots: int) -> None:
        """The gateway gave this node `slots` slots (called on every join and welcome)."""

    async def run(self, part: Start, data: bytes) -> tuple[bytes, float]:
        """`(output, elapsed_ms)` of one part whose input is `data`."""
        ...

    def begin_close(self) -> None:
        """Start nothing more (the worker is stopping; runs are cancelled next)."""

    async def close(self) -> None:
        """Release everything (processes, threads)."""


class WasmExecutor:
    """The worker's own executor: the part's module (by sha256) in wasmtime, one process per slot,
    under the worker's limits lowered to the part's own (`Start.deadline_s`, `.memory_mb`)."""

    def __init__(self, *, limits: Limits, modules: ModuleStore) -> None:
        self.limits = limits
        self.modules = modules
        self.pool: ExecutorPool | None = None

    def resize(self, slots: int) -> None:
        if self.pool is None:
            self.pool = ExecutorPool(size=slots, limits=self.limits)
        elif self.pool.size != slots:
            self.pool.resize(slots)

    async def run(self, part: Start, data: bytes) -> tuple[bytes, float]:
        assert self.pool is not None, "resize() before run()"
        path = await self.modules.get(part.module_sha256, part.module_url)
        limits = self.limits.within(part.deadline_s, part.memory_mb)  # the task's, where lower
        return await self.pool.run(part.task_id, part.module_sha256, path, data, limits=limits)

    def begin_close(self) -> None:
        if self.pool is not None:
            self.pool.begin_close()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


async def run_part(part: Start, *, blocks: BlockCache, executor: Executor, throttle: float) -> PartDone | PartFailed:
    """One part from input to outcome: assemble its input (inline bytes, then shared blocks),
    run it, and (`throttle` > 1) take that many times as long, like a slower device."""
    try:
        data = await blocks.assemble(part.job_id, base64.b64decode(part.input_b64, validate=True), list(part.blocks))
        output, elapsed_ms = await executor.run(part, data)
        if throttle > 1:
            await asyncio.sleep((throttle - 1) * elapsed_ms / 1000)
            elapsed_ms *= throttle
        return PartDone(part.task_id, output, elapsed_ms)
    except (TaskError, OSError, httpx.HTTPError, binascii.Error) as exc:
        if isinstance(exc, TaskError):
            text = f"{type(exc).__name__}: {exc}"
        else:
            text = f"could not assemble the task's input: {type(exc).__name__}: {exc}"
        return PartFailed(part.task_id, text[:2000])
