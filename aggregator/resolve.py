"""The controller computes a disputed subtask itself.

A replicated subtask whose results disagree needs another node; when no live node may run
it (every one has returned a result for it: two nodes that disagree, both still connected),
or when the live nodes that may have left it parked for `PARKED_WAIT_S` (connected but never
asking for work), the scheduler's reaper hands the copy to the
aggregators as a `resolve` entry (`core.replication.parked_fate`), and the aggregator runs
the module here, in wasmtime, with the worker's own runner: modules are deterministic, so the
controller's bytes are the subtask's true result. Unlike a worker's executor process (which
its pool kills at the deadline, so its engine has no in-WASM checks), the aggregator must
live on past a runaway module: its runner keeps epoch interruption (`interruptible=True`), and
the module's deadline stops the run in-process. A dispute thus
always ends, by another node or by the controller, never by waiting for one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..shared.modules import ModuleRegistry
from ..shared.store import modules as uploaded
from ..shared.store.connection import Client
from ..shared.tasks.base import TaskLimits
from ..worker.runtime import Limits, ModuleRunner

log = logging.getLogger(__name__)


class Resolver:
    """Runs modules on the controller: built-in ones from the registry, uploaded ones from
    Redis (cached on disk under `cache_dir` by sha256)."""

    def __init__(self, *, client: Client, cache_dir: Path, registry: ModuleRegistry | None = None) -> None:
        self.r = client
        self.cache_dir = cache_dir
        self.registry = registry or ModuleRegistry()
        self._runner: ModuleRunner | None = None

    def module_path(self, sha: str) -> Path:
        module = self.registry.by_sha.get(sha)
        if module is not None and module.path is not None:
            return module.path
        path = self.cache_dir / f"{sha}.wasm"
        if not path.exists():
            data = uploaded.load(self.r, sha)
            if data is None:
                raise LookupError(f"module {sha} is neither built in nor stored")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        return path

    def run(self, sha: str, data: bytes, limits: TaskLimits) -> tuple[bytes, float]:
        """The module's output on `data`, and the milliseconds it took. Raises the runner's
        `TaskError` when the module fails (a trap of a pd-ABI module, a deadline, the cap)."""
        if self._runner is None:
            self._runner = ModuleRunner(limits=Limits(), interruptible=True)  # bounded in-process
        started = time.monotonic()
        output = self._runner.run(
            sha, self.module_path(sha), data, Limits().within(limits.deadline_s, limits.memory_mb)
        )
        return output, (time.monotonic() - started) * 1000

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
