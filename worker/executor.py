"""What runs a part: the `Executor` interface `WorkerNode` is given, and `WasmExecutor`, the
real one (modules fetched by hash into `ModuleStore`, run in `ExecutorPool` processes).

Tests inject an executor of their own (`tests/executors.py`: the same bytes computed with
NumPy and hashlib, a liar, a slow device) and keep everything else of the real node."""

from __future__ import annotations

from typing import Protocol

from .fetch import ModuleStore
from .pool import ExecutorPool
from .runtime import Limits
from .state import Start


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
    """The worker's own executor: the part's module (by sha256) in wasmtime, one process per slot."""

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
        return await self.pool.run(part.task_id, part.module_sha256, path, data)

    def begin_close(self) -> None:
        if self.pool is not None:
            self.pool.begin_close()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
