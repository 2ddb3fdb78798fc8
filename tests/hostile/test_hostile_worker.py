"""Issue 9.9: the native worker distrusts the controller it joined.

A hostile controller is played by a small fake gateway in the test process (starlette under
uvicorn): it is the attacker here, not our product. The worker is the real `WorkerNode` with
its real executor (wasmtime processes) and real downloads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from nodes import run_async
from processdistro.shared.protocol import NodeAccepted, TaskAssign, Welcome
from processdistro.shared.redis_server import free_port
from processdistro.worker.executor import WasmExecutor
from processdistro.worker.fetch import ForeignUrl, ModuleStore, on_origin
from processdistro.worker.join import MAX_PREFETCH, WorkerConfig, within_means
from processdistro.worker.node import WorkerNode
from processdistro.worker.runtime import MIB
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

HUGE_SHA = "ab" * 32
FOREIGN_SHA = "cd" * 32


@dataclass
class Hostile:
    """A controller that asks too much: 250,000 slots, a module on another origin, and a
    module that never ends."""

    foreign_url: str = ""
    modules: dict[str, bytes] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    streamed: int = 0  # bytes of the endless module sent so far
    hits: list[str] = field(default_factory=list)  # paths requested (the foreign server's)
    done: threading.Event = field(default_factory=threading.Event)

    def app(self) -> Starlette:
        async def node_report(request: Request) -> Response:
            report = json.loads(await request.body())
            answer = NodeAccepted(
                node_id=report["device_id"],
                token="t0ken",
                token_expires_at=time.time() + 600,
                slots=250_000,
                prefetch=1_000_000,
                heartbeat_interval_s=1e9,
            )
            return Response(answer.model_dump_json(), media_type="application/json")

        async def endless(request: Request) -> Response:
            async def body() -> AsyncIterator[bytes]:
                chunk = b"\0" * MIB
                for _ in range(1024):  # 1 GiB, unless the worker stops reading
                    if await request.is_disconnected():
                        return
                    self.streamed += len(chunk)
                    yield chunk

            return StreamingResponse(body(), media_type="application/wasm")

        async def module(request: Request) -> Response:
            self.hits.append(request.url.path)
            data = self.modules.get(request.path_params["sha"])
            return Response(data or b"", status_code=200 if data else 404, media_type="application/wasm")

        async def ws_endpoint(ws: WebSocket) -> None:
            await ws.accept()
            await ws.receive_text()  # hello
            welcome = Welcome(node_id="x" * 12, slots=250_000, prefetch=1_000_000, heartbeat_interval_s=0.5)
            await ws.send_text(welcome.model_dump_json())
            for task_id, sha, url in (
                ("1-0", FOREIGN_SHA, f"{self.foreign_url}/modules/{FOREIGN_SHA}.wasm"),
                ("2-0", HUGE_SHA, "/modules/endless.wasm"),
            ):
                task = TaskAssign(
                    task_id=task_id, job_id="j", kind="wasm", module_sha256=sha, module_url=url, input_b64=""
                )
                await ws.send_text(task.model_dump_json())
            while len(self.failures) < 2:
                frame = json.loads(await ws.receive_text())
                if frame["type"] == "task_failed":
                    self.failures[frame["task_id"]] = frame["message"]
            self.done.set()
            while True:  # until the worker leaves
                await ws.receive_text()

        return Starlette(
            routes=[
                Route("/node-report", node_report, methods=["POST"]),
                Route("/modules/endless.wasm", endless),
                Route("/modules/{sha}.wasm", module),
                WebSocketRoute("/ws", ws_endpoint),
            ]
        )


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start a starlette app on a free loopback port: returns its base URL."""
    import uvicorn

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Starlette) -> str:
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.mark.timeout(120)
def test_hostile_controller_cannot_overcommit_redirect_or_flood_the_worker(serve: Any, tmp_path: Path) -> None:
    """Issue 9.9: a controller sends slots=250000, a module URL on another origin and a module
    that never ends. Fix: the worker caps slots at its own --cores (2 executor processes, not
    250,000), refuses the foreign URL without fetching it (the task fails with a clear
    message), and stops the endless download at the 64 MiB module limit."""
    hostile, bystander = Hostile(), Hostile()
    hostile.foreign_url = serve(bystander.app())
    base = serve(hostile.app())
    config = WorkerConfig(
        join_url=f"{base}/agent?code=abcdefgh", cores=2, home=tmp_path, run_benchmark=False, score=1e6
    )

    async def scenario() -> WorkerNode:
        worker = WorkerNode(config=config)
        running = asyncio.create_task(worker.run(handle_signals=False))
        deadline = time.monotonic() + 60
        while not hostile.done.is_set():
            assert time.monotonic() < deadline, f"no failures reported: {hostile.failures}"
            assert not running.done(), running
            await asyncio.sleep(0.05)
        # what the controller's numbers turned into, while the worker still runs
        assert worker.state.slots == 2 and worker.state.prefetch == MAX_PREFETCH
        assert isinstance(worker.executor, WasmExecutor) and worker.executor.pool is not None
        assert worker.executor.pool.size == 2 and len(worker.executor.pool.pids()) == 2
        assert 0.1 <= worker.heartbeat_interval_s <= 60
        worker.stop()
        await asyncio.wait_for(running, 30)
        return worker

    run_async(scenario())
    foreign = hostile.failures["1-0"]
    assert "not on the controller's origin" in foreign, foreign
    assert bystander.hits == [], "the worker fetched from another origin"
    huge = hostile.failures["2-0"]
    assert "larger than the limit" in huge, huge
    # stopped at the limit, give or take what the sockets buffer: far below the 1 GiB offered
    assert 64 * MIB < hostile.streamed < 128 * MIB, hostile.streamed
    assert not list(tmp_path.glob("modules/*.wasm")), "a refused module reached the cache"


def _module(n: int, size: int = 1000) -> tuple[str, bytes]:
    data = n.to_bytes(4, "big") * (size // 4)
    return hashlib.sha256(data).hexdigest(), data


def test_module_cache_stays_within_its_bound(serve: Any, tmp_path: Path) -> None:
    """Issue 9.9: modules used to stay on disk for ever. Fix: the worker's module cache holds
    at most `max_count` modules and `max_bytes` bytes, least recently used out first, and a
    module evicted is fetched (and checked) again when it is needed."""
    server = Hostile()
    server.modules = dict(_module(n) for n in range(8))
    shas = list(server.modules)
    base = serve(server.app())
    directory = tmp_path / "modules"
    directory.mkdir()
    # left over from an earlier run: the bound holds them too
    stale = [directory / f"{'0' * 63}{i}.wasm" for i in range(5)]
    for i, path in enumerate(stale):
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1000.0 + i, 1000.0 + i))

    def on_disk() -> list[str]:
        return sorted(p.stem for p in directory.glob("*.wasm"))

    async def scenario() -> None:
        async with httpx.AsyncClient() as http:
            store = ModuleStore(directory=directory, base_url=base, http=http, max_count=3, max_bytes=2500)
            await store.get(shas[0], f"/modules/{shas[0]}.wasm")
            assert on_disk() == sorted([shas[0], stale[4].stem])  # 2 x 1000 bytes <= 2500
            await store.get(shas[1], f"/modules/{shas[1]}.wasm")
            assert on_disk() == sorted(shas[:2])
            time.sleep(0.01)
            await store.get(shas[0], f"/modules/{shas[0]}.wasm")  # used again: now the newest
            time.sleep(0.01)
            await store.get(shas[2], f"/modules/{shas[2]}.wasm")
            assert on_disk() == sorted([shas[0], shas[2]])  # shas[1] was the least recently used
            assert server.hits.count(f"/modules/{shas[0]}.wasm") == 1
            for sha in shas[3:]:
                await store.get(sha, f"/modules/{sha}.wasm")
                files = list(directory.glob("*.wasm"))
                assert len(files) <= 3 and sum(p.stat().st_size for p in files) <= 2500
            path = await store.get(shas[1], f"/modules/{shas[1]}.wasm")  # evicted: fetched again
            assert path.read_bytes() == server.modules[shas[1]]
            assert server.hits.count(f"/modules/{shas[1]}.wasm") == 2

    run_async(scenario())


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        pytest.param("/modules/a.wasm", True, id="relative"),
        pytest.param("modules/a.wasm", True, id="relative-no-slash"),
        pytest.param("http://ctl.example:30000/modules/a.wasm", True, id="absolute-same-origin"),
        pytest.param("HTTP://CTL.example:30000/m", True, id="absolute-same-origin-upper-case"),
        pytest.param("http://evil.example:30000/m", False, id="other-host"),
        pytest.param("http://ctl.example:30001/m", False, id="other-port"),
        pytest.param("http://ctl.example/m", False, id="default-port"),
        pytest.param("https://ctl.example:30000/m", False, id="other-scheme"),
        pytest.param("//evil.example/m", False, id="scheme-relative"),
        pytest.param("http://ctl.example:30000@evil.example/m", False, id="userinfo-trick"),
        pytest.param("file:///etc/passwd", False, id="file"),
        pytest.param("http://ctl.example:bad/m", False, id="bad-port"),
    ],
)
def test_module_urls_only_on_the_controllers_origin(url: str, allowed: bool) -> None:
    """Issue 9.9: an absolute module_url made the worker fetch any URL. Fix: URLs resolve
    against the join link and must keep its scheme, host and port."""
    base = "http://ctl.example:30000"
    if allowed:
        assert on_origin(base, url).startswith(base + "/") or on_origin(base, url).lower().startswith(base)
    else:
        with pytest.raises(ForeignUrl):
            on_origin(base, url)


@pytest.mark.parametrize(
    ("asked", "cores", "expected"),
    [
        pytest.param((250_000, 1_000_000, 1.0), 2, (2, MAX_PREFETCH, 1.0), id="hostile-slots-and-prefetch"),
        pytest.param((4, 1, 1.0), 8, (4, 1, 1.0), id="honest-below-cores"),
        pytest.param((8, 1, 1.0), 8, (8, 1, 1.0), id="honest-at-cores"),
        pytest.param((0, -3, 1.0), 4, (1, 0, 1.0), id="zero-slots"),
        pytest.param((2, 1, float("inf")), 2, (2, 1, 2.0), id="infinite-heartbeat"),
        pytest.param((2, 1, float("nan")), 2, (2, 1, 2.0), id="nan-heartbeat"),
        pytest.param((2, 1, 0.0), 2, (2, 1, 0.1), id="busy-heartbeat"),
        pytest.param((2, 1, 1e9), 2, (2, 1, 60.0), id="rare-heartbeat"),
    ],
)
def test_welcome_within_the_workers_means(
    asked: tuple[int, int, float], cores: int, expected: tuple[int, int, float]
) -> None:
    """Issue 9.9: `slots` in the welcome had no bound. Fix: slots at most the worker's cores,
    prefetch and the heartbeat interval bounded (both for the welcome and the join answer)."""
    slots, prefetch, interval = asked
    if not math.isfinite(interval):  # the parser refuses it first (issue 9.2: finite numbers only)
        with pytest.raises(ValidationError):
            Welcome(node_id="n" * 12, slots=slots, prefetch=prefetch, heartbeat_interval_s=interval)
    # and within_means holds even for a message that skipped validation
    welcome = Welcome.model_construct(node_id="n" * 12, slots=slots, prefetch=prefetch, heartbeat_interval_s=interval)
    got = within_means(welcome, cores)
    assert (got.slots, got.prefetch, got.heartbeat_interval_s) == expected
