"""Test-side convenience around the real `WorkerNode` with a `PythonExecutor`: a node made
in one line, run until an event is set, and what it saw afterwards."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from executors import PythonExecutor
from processdistro.shared.protocol import CloseCode, ServerMessage
from processdistro.worker.exceptions import Banned
from processdistro.worker.node import WorkerConfig, WorkerNode

T = TypeVar("T")


class Node:
    """One node joining `base_url` with `join_code`, under an identity of its own.

    `corrupt` and `delay` go to its `PythonExecutor`. After (or during) a run: `done` (parts
    completed), `received` (every frame from the gateway, as JSON objects), `reconnects`,
    and `closed_with` (4004 once banned)."""

    def __init__(
        self,
        base_url: str,
        join_code: str,
        *,
        cores: int = 2,
        corrupt: Callable[[bytes], bytes] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.base_url = base_url
        self.join_code = join_code
        self.cores = cores
        self.executor = PythonExecutor(corrupt=corrupt, delay=delay)
        self.home = Path(tempfile.mkdtemp(prefix="pd-node-"))
        weakref.finalize(self, shutil.rmtree, self.home, True)
        self.device_id = secrets.token_urlsafe(24)
        (self.home / "worker-default.id").write_text(self.device_id + "\n")
        self.received: list[dict[str, Any]] = []
        self.closed_with: int | None = None
        self.reconnects = 0
        self.worker: WorkerNode | None = None
        self._done_before = 0

    @property
    def done(self) -> int:
        return self._done_before + (self.worker.done if self.worker is not None else 0)

    def join(self) -> dict[str, Any]:
        """A node report of this identity (for tests that then speak the protocol by hand)."""
        resp = httpx.post(
            f"{self.base_url}/node-report",
            json={
                "join_code": self.join_code,
                "device_id": self.device_id,
                "cores": self.cores,
                "kind": "native",
                "benchmark_score": 1e6,
            },
        )
        resp.raise_for_status()
        return dict(resp.json())

    async def run(self, *, max_tasks: int | None = None, stop: asyncio.Event | None = None) -> None:
        """Work until `stop` is set, or (`max_tasks`) until that many parts are done: then it
        leaves in the middle of its next part. Returns early if banned."""
        if self.worker is not None:
            self._done_before += self.worker.done
        self.executor.answers = None if max_tasks is None else self.executor.started + max_tasks
        worker = WorkerNode(
            config=WorkerConfig(
                join_url=f"{self.base_url}/agent?code={self.join_code}",
                cores=self.cores,
                home=self.home,
                name="default",
                run_benchmark=False,
                score=1e6,
            ),
            executor=self.executor,
            on_frame=self._record,
        )
        self.worker = worker

        async def watch() -> None:
            while not (stop is not None and stop.is_set()) and not (
                max_tasks is not None and self.done - self._done_before >= max_tasks
            ):
                await asyncio.sleep(0.02)
            worker.stop()

        watcher = asyncio.create_task(watch())
        try:
            await worker.run(handle_signals=False)
        except Banned:
            self.closed_with = CloseCode.BANNED
        finally:
            watcher.cancel()
            self.reconnects += worker.reconnects

    async def run_reconnecting(self, stop: asyncio.Event) -> None:
        """Like a browser agent: when the gateway goes away, join again and carry on (the
        worker itself does: reconnects with backoff, re-reports when its token is refused)."""
        await self.run(stop=stop)

    def _record(self, message: ServerMessage) -> None:
        self.received.append(message.model_dump(mode="json"))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run in a thread of its own: Playwright's sync API keeps an event loop
    running in the main thread once a browser test has started."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    t = threading.Thread(target=target, name="node-loop")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
