"""A node written in Python for protocol tests: it joins like a browser does (node report,
token, WebSocket) and computes Mandelbrot tiles with NumPy, or lies on purpose."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import numpy as np
import websockets
from processdistro.shared.protocol import PROTOCOL_VERSION
from processdistro.shared.tasks.mandelbrot import INPUT

T = TypeVar("T")


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
    """password_hash mode 0 (docs/wasm-abi.md) with hashlib."""
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


class PyNode:
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
        self.corrupt = corrupt
        self.delay = delay  # seconds per task on top of the compute: a slow device
        self.device_id = secrets.token_urlsafe(16)
        self.done = 0
        self.received: list[dict[str, Any]] = []
        self.reconnects = 0
        self.closed_with: int | None = None

    def join(self) -> dict[str, Any]:
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

    async def run_reconnecting(self, stop: asyncio.Event) -> None:
        """Like a browser agent: when the gateway goes away, join again and carry on."""
        while not stop.is_set():
            try:
                await self.run(stop=stop)
            except (OSError, httpx.HTTPError, websockets.ConnectionClosed, TimeoutError):
                self.reconnects += 1
                await asyncio.sleep(0.3)

    async def run(self, *, max_tasks: int | None = None, stop: asyncio.Event | None = None) -> None:
        try:
            await self._session(max_tasks=max_tasks, stop=stop)
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code != 4004:
                raise
            self.closed_with = exc.rcvd.code  # banned: stop, as the agent does

    async def _session(self, *, max_tasks: int | None, stop: asyncio.Event | None) -> None:
        accepted = self.join()
        ws_url = self.base_url.replace("http", "ws", 1) + f"/ws?token={accepted['token']}"
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "running": []}))
            capacity = accepted["slots"] + accepted["prefetch"]
            await ws.send(json.dumps({"type": "ready", "free": capacity}))
            # tasks received, each a list of parts not yet run; one part runs at a time
            queue: deque[list[dict[str, Any]]] = deque()
            inbox: asyncio.Queue[str | bytes | websockets.ConnectionClosed] = asyncio.Queue()

            async def read() -> None:
                try:
                    while True:
                        inbox.put_nowait(await ws.recv())
                except websockets.ConnectionClosed as exc:
                    inbox.put_nowait(exc)

            reader = asyncio.create_task(read())
            try:
                while max_tasks is None or self.done < max_tasks:
                    if stop is not None and stop.is_set():
                        return
                    if inbox.empty() and not queue:
                        try:
                            inbox.put_nowait(await asyncio.wait_for(inbox.get(), timeout=0.5))
                        except TimeoutError:
                            await ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": self.done}))
                            continue
                    while not inbox.empty():  # take in what has arrived
                        item = inbox.get_nowait()
                        if isinstance(item, websockets.ConnectionClosed):
                            raise item
                        queue = await self._take_in(ws, json.loads(item), queue, capacity)
                    if queue:
                        await self._run_part(ws, queue, accepted["token"], capacity)
            finally:
                reader.cancel()

    async def _take_in(
        self, ws: Any, msg: dict[str, Any], queue: deque[list[dict[str, Any]]], capacity: int
    ) -> deque[list[dict[str, Any]]]:
        self.received.append(msg)
        if msg["type"] == "task":
            common = {"job_id": msg["job_id"], "kind": msg["kind"]}
            first = {"task_id": msg["task_id"], "input_b64": msg["input_b64"], "blocks": msg["blocks"]}
            queue.append([{**common, **part} for part in (first, *msg.get("more", []))])
        elif msg["type"] == "cancel":
            dropped = set(msg["task_ids"])
            before = len(queue)
            queue = deque(kept for t in queue if (kept := [p for p in t if p["task_id"] not in dropped]))
            if len(queue) < before:
                await ws.send(json.dumps({"type": "ready", "free": capacity - len(queue)}))
        return queue

    async def _run_part(self, ws: Any, queue: deque[list[dict[str, Any]]], token: str, capacity: int) -> None:
        part = queue[0].pop(0)
        started = time.monotonic()
        try:
            out = self._compute(part, token)
        except httpx.HTTPStatusError as exc:  # e.g. the job ended and its blocks are gone
            failed = {"type": "task_failed", "task_id": part["task_id"], "message": f"input: {exc}"[:2000]}
            await ws.send(json.dumps(failed))
            await self._part_done(ws, queue, capacity)
            return
        while time.monotonic() - started < self.delay:  # a slow device, heartbeating as it works
            await asyncio.sleep(min(0.5, self.delay))
            await ws.send(json.dumps({"type": "heartbeat", "running": 1, "done": self.done}))
        elapsed_ms = (time.monotonic() - started) * 1000
        await ws.send(
            json.dumps(
                {
                    "type": "result",
                    "task_id": part["task_id"],
                    "output_b64": base64.b64encode(out).decode(),
                    "elapsed_ms": elapsed_ms,
                }
            )
        )
        self.done += 1
        await self._part_done(ws, queue, capacity)

    @staticmethod
    async def _part_done(ws: Any, queue: deque[list[dict[str, Any]]], capacity: int) -> None:
        if not queue[0]:  # the task's last part: a slot is free
            queue.popleft()
            await ws.send(json.dumps({"type": "ready", "free": capacity - len(queue)}))

    def _compute(self, msg: dict[str, Any], token: str) -> bytes:
        payload = base64.b64decode(msg["input_b64"])
        for sha in msg.get("blocks", []):
            resp = httpx.get(f"{self.base_url}/blocks/{msg['job_id']}/{sha}", params={"token": token})
            resp.raise_for_status()
            payload += resp.content
        compute = hash_batch if msg["kind"] == "hash" else mandelbrot_tile
        out = compute(payload)
        return self.corrupt(out) if self.corrupt is not None else out


def flip_first_pixel(out: bytes) -> bytes:
    (v,) = struct.unpack_from("<I", out)
    return struct.pack("<I", v ^ 1) + out[4:]


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

    t = threading.Thread(target=target, name="pynode-loop")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
