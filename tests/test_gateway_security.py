"""Hostile and broken clients are refused clearly, and a job running meanwhile is untouched."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from conftest import Controller
from nodes import Node, run_async
from processdistro.gateway.auth import TokenSigner, TokenStatus
from processdistro.shared import keys
from processdistro.shared.protocol import CloseCode
from processdistro.shared.store.connection import Client
from test_pipeline import expected_small, run_nodes_until, submit
from websockets.exceptions import ConnectionClosed


def ws_url(ctl: Controller, token: str | None) -> str:
    base = ctl.url.replace("http", "ws", 1) + "/ws"
    return base if token is None else f"{base}?token={token}"


async def close_code(url: str, **kwargs: object) -> tuple[int, str]:
    async with websockets.connect(url, **kwargs) as ws:  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code is not None
        return ws.close_code, ws.close_reason or ""


async def recv_type(ws: websockets.ClientConnection, wanted: str) -> dict[str, object]:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if msg["type"] == wanted:
            return msg


def token_for(ctl: Controller, r: Client, node: Node, ttl: float) -> str:
    node.join()
    signer = TokenSigner(secret=r.get(keys.TOKEN_SECRET) or b"", ttl_s=ttl)
    return signer.issue(node.device_id)[0]


def test_hostile_clients_refused_while_a_job_runs(controller: Controller, tmp_path: Path, r: Client) -> None:
    proc = submit(controller, tmp_path)
    honest = Node(controller.url, controller.join_code)
    intruder = Node(controller.url, controller.join_code)
    good = intruder.join()["token"]
    expired = token_for(controller, r, intruder, ttl=-10)
    seen: dict[str, object] = {}

    async def attacks() -> None:
        await asyncio.sleep(0.3)  # the honest node is working by now
        seen["origin"] = await close_code(ws_url(controller, good), origin="http://evil.example")
        seen["no_token"] = await close_code(ws_url(controller, None))
        seen["bad_token"] = await close_code(ws_url(controller, good[:-4] + "AAAA"))
        seen["expired"] = await close_code(ws_url(controller, expired))
        async with websockets.connect(ws_url(controller, good), max_size=None) as ws:
            await recv_type(ws, "welcome")
            await ws.send("{not json")
            seen["malformed"] = await recv_type(ws, "error")
            await ws.send(json.dumps({"type": "ready", "free": -3}))
            seen["invalid"] = await recv_type(ws, "error")
            await ws.send(json.dumps({"type": "result", "task_id": "1-1", "output_b64": "AAAA", "elapsed_ms": 1}))
            seen["unknown_task"] = await recv_type(ws, "error")
            await ws.send(b"\x00\x01")
            seen["binary"] = await recv_type(ws, "error")
            await ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))  # still alive
            await ws.send("x" * (5 * 1024 * 1024))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), 5)
            seen["oversized"] = (ws.close_code, ws.close_reason)

    async def scenario() -> None:
        await asyncio.gather(run_nodes_until(proc, honest), attacks())

    run_async(scenario())
    assert seen["origin"][0] == CloseCode.POLICY and "origin" in seen["origin"][1]  # type: ignore[index]
    assert seen["no_token"] == (CloseCode.BAD_TOKEN, "session token missing")
    assert seen["bad_token"] == (CloseCode.BAD_TOKEN, "session token forged")
    assert seen["expired"] == (CloseCode.BAD_TOKEN, "session token expired")
    assert seen["malformed"]["code"] == "malformed"  # type: ignore[index]
    assert "expected JSON" in seen["malformed"]["message"]  # type: ignore[index]
    assert seen["invalid"]["code"] == "invalid" and "free" in seen["invalid"]["message"]  # type: ignore[index]
    assert seen["unknown_task"]["code"] == "unknown_task"  # type: ignore[index]
    assert seen["binary"]["code"] == "malformed"  # type: ignore[index]
    assert seen["oversized"][0] == CloseCode.TOO_BIG  # type: ignore[index]
    assert proc.returncode == 0, controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())


def test_node_report_refusals(controller: Controller) -> None:
    base = {"device_id": "abcdefgh12345678", "cores": 2}
    wrong = httpx.post(f"{controller.url}/node-report", json={**base, "join_code": "wrongcode"})
    assert wrong.status_code == 403 and "join code" in wrong.json()["error"]
    invalid = httpx.post(f"{controller.url}/node-report", json={**base, "join_code": controller.join_code, "cores": 0})
    assert invalid.status_code == 422 and any("cores" in p for p in invalid.json()["problems"])
    garbage = httpx.post(
        f"{controller.url}/node-report", content=b"\xff\xfe", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 422
    huge = httpx.post(f"{controller.url}/node-report", content=b"{" + b" " * 100_000 + b"}")
    assert huge.status_code == 413
    ok = httpx.post(f"{controller.url}/node-report", json={**base, "join_code": controller.join_code})
    assert ok.status_code == 200 and ok.json()["slots"] == 2


def test_cors_only_for_own_origin(controller: Controller) -> None:
    resp = httpx.get(f"{controller.url}/metrics.json", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in resp.headers


def test_metrics_endpoints(controller: Controller, tmp_path: Path) -> None:
    proc = submit(controller, tmp_path)
    run_async(run_nodes_until(proc, Node(controller.url, controller.join_code)))
    assert proc.returncode == 0
    figures = httpx.get(f"{controller.url}/metrics.json").json()
    for name in ("nodes_connected", "avg_score", "tasks_queued", "tasks_running", "tasks_completed", "avg_latency_ms"):
        assert name in figures
    assert figures["tasks_completed"] == 70  # 10 x 7 tiles of 32 px
    text = httpx.get(f"{controller.url}/metrics").text
    assert 'processdistro_tasks_completed_total{scope="cluster"} 70.0' in text
    assert "processdistro_task_latency_seconds_count 70.0" in text


def test_wasm_served_by_hash(controller: Controller) -> None:
    mods = httpx.get(f"{controller.url}/api/modules").json()
    sha = mods["mandelbrot"]["sha256"]
    resp = httpx.get(f"{controller.url}{mods['mandelbrot']['url']}")
    assert resp.headers["content-type"] == "application/wasm"
    assert "immutable" in resp.headers["cache-control"] and resp.headers["etag"] == f'"{sha}"'
    import hashlib

    assert hashlib.sha256(resp.content).hexdigest() == sha
    assert (
        httpx.get(f"{controller.url}{mods['mandelbrot']['url']}", headers={"If-None-Match": f'"{sha}"'}).status_code
        == 304
    )
    _ = time


@pytest.mark.parametrize(
    ("signed_with", "current", "previous", "want"),
    [
        (b"A" * 32, b"A" * 32, None, TokenStatus.VALID),
        (b"A" * 32, b"B" * 32, b"A" * 32, TokenStatus.VALID),  # rotated: the previous secret's grace
        (b"A" * 32, b"B" * 32, None, TokenStatus.FORGED),  # the grace is over
        (b"C" * 32, b"B" * 32, b"A" * 32, TokenStatus.FORGED),
    ],
    ids=["current", "previous-in-grace", "previous-expired", "unknown-secret"],
)
def test_token_secret_rotation(signed_with: bytes, current: bytes, previous: bytes | None, want: TokenStatus) -> None:
    """Issue 9.10: tokens of the previous secret stay valid while it is kept (`rotate-code
    --token-secret`); new tokens use the new one."""
    token, _ = TokenSigner(secret=signed_with, ttl_s=60).issue("node-0001")
    signer = TokenSigner(secret=b"X" * 32, ttl_s=60)
    signer.update(current, previous)
    assert signer.check(token).status is want
    fresh, _ = signer.issue("node-0002")
    assert TokenSigner(secret=current, ttl_s=60).check(fresh).status is TokenStatus.VALID
