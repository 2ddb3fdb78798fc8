"""Issue 9.2 (and 9.10's nesting depth): every number a node sends is finite and bounded.

`benchmark_score` and `elapsed_ms` took `Infinity` (`ge=0` lets it through, Python's JSON
parser accepts `Infinity`, `NaN` and `1e999`); the scheduler's tail then computed inf/inf,
`round(nan)` raised and it crash-looped, and `/metrics.json` returned 500. A frame of
100,000 `[` raised an uncaught RecursionError in the gateway's session.

The fix: `allow_inf_nan=False` and upper bounds on every model of `shared/protocol.py`;
frames parsed by `validation.strict_loads` (non-finite numbers refused, nesting depth checked
on the raw text before parsing); figures read from Redis through `capacity.finite` where
they are averaged or compared (speeds, the tail, metrics), so what Redis held from before
cannot poison anything either.

Real controller processes and Redis; raw WebSocket frames where a real node would never
send such numbers; real `WorkerNode`s (tests/nodes.py) for the honest work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from conftest import Controller
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.capacity import MAX_TASK_MS, NodeView, finite, parts_per_task
from processdistro.shared.protocol import MAX_SCORE
from processdistro.shared.store.connection import Client
from processdistro.shared.validation import UnsafeJSON, nesting_over, strict_loads
from test_pipeline import expected_small, run_nodes_until, submit
from websockets.exceptions import ConnectionClosed

POISON = ["Infinity", "-Infinity", "NaN", "1e999", "-1e999"]


def ws_url(ctl: Controller, token: str) -> str:
    return ctl.url.replace("http", "ws", 1) + f"/ws?token={token}"


async def recv_type(ws: websockets.ClientConnection, wanted: str, timeout: float = 10) -> dict[str, Any]:
    while True:
        msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg["type"] == wanted:
            return msg


@contextlib.asynccontextmanager
async def heartbeats(ws: websockets.ClientConnection) -> AsyncIterator[None]:
    """Heartbeats on a raw socket meanwhile, so the gateway never closes it as silent (a
    task can take longer than `node_timeout_s` to come on a loaded machine)."""

    async def beat() -> None:
        while True:
            await ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
            await asyncio.sleep(0.5)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task


def strict_json(text: str) -> Any:
    """JSON as the standard defines it: no Infinity or NaN anywhere."""

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in {text[:300]}")

    return json.loads(text, parse_constant=refuse)


def assert_all_finite(figures: dict[str, Any]) -> None:
    for name, value in figures.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), (name, value)


def services_unharmed(ctl: Controller, pids: dict[str, int]) -> None:
    """The same service processes still run, and none logged a traceback."""
    for name, proc in ctl.procs.items():
        assert proc.poll() is None and proc.pid == pids[name], (name, ctl.logs())
    for log in ctl.home.glob("*.log"):
        assert "Traceback" not in log.read_text(), (log.name, ctl.logs())


# ------------------------------------------------------------------ pure parts (tables)


@pytest.mark.parametrize("literal", POISON)
def test_strict_loads_refuses_non_finite_numbers(literal: str) -> None:
    """Issue 9.2: Python's `json.loads` turns these into inf/nan; a node's frame may not."""
    assert not math.isfinite(json.loads(f'{{"x": {literal}}}')["x"])  # what the gateway used to take
    with pytest.raises(UnsafeJSON, match="expected finite numbers"):
        strict_loads(f'{{"type": "result", "elapsed_ms": {literal}}}')


@pytest.mark.parametrize(
    ("text", "too_deep"),
    [
        ("[" * 100_000, True),
        ("[" * 33 + "]" * 33, True),
        ('{"a":' * 33 + "1" + "}" * 33, True),
        ("[" * 32 + "]" * 32, False),
        ('{"m": "' + "[" * 100_000 + '"}', False),
        ('{"m": "\\"' + "[" * 100 + '"}', False),
        ("[]" * 100_000, False),
        ("[" * 40 + '"abc', True),
        ('["' + "[" * 40, False),
        ("[" * 33 + '"]]]]"' + "]" * 33, True),
    ],
    ids=[
        "100k open",
        "33 deep",
        "33 objects deep",
        "32 deep",
        "brackets in a string",
        "escaped quote",
        "flat",
        "deep, then a string left open",
        "brackets in a string left open",
        "closing brackets in a string do not close",
    ],
)
def test_nesting_depth_checked_before_parsing(text: str, too_deep: bool) -> None:
    """Issue 9.10: the depth is read off the raw text (brackets in strings do not count),
    so the parser never recurses past 32."""
    assert nesting_over(text) is too_deep


def test_nesting_scan_is_linear_on_escaped_quotes() -> None:
    """Issue 9.10: the scan itself must not be the denial of service: a string left open
    full of escaped quotes made a naive string pattern retry from every quote (quadratic:
    about three minutes for these 200 kB). It takes milliseconds."""
    text = "[" * 40 + '"' + '\\"' * 100_000
    started = time.monotonic()
    assert nesting_over(text)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("raw", "cap", "value"),
    [
        (b"inf", MAX_TASK_MS, None),
        (b"nan", MAX_TASK_MS, None),
        (b"-inf", MAX_TASK_MS, None),
        (b"-3", MAX_TASK_MS, None),
        (b"Infinity", MAX_SCORE, None),
        (b"garbage", MAX_SCORE, None),
        (b"", MAX_SCORE, None),
        (b"1e300", MAX_SCORE, MAX_SCORE),
        (b"250.5", MAX_TASK_MS, 250.5),
        (float("inf"), MAX_TASK_MS, None),
    ],
    ids=["inf", "nan", "-inf", "negative", "Infinity", "garbage", "empty", "huge: capped", "plain", "float inf"],
)
def test_stored_figures_read_finite(raw: bytes | float, cap: float, value: float | None) -> None:
    """Issue 9.2: what Redis holds from before validation is read as unknown, or capped."""
    assert finite(raw, cap) == value


def test_node_view_of_a_poisoned_record() -> None:
    """Issue 9.2: a node record holding Infinity and NaN gives a view with unknown speeds,
    and no chunk size computed from it raises (`int(nan)` did)."""
    view = NodeView.of("n1", {b"score": b"inf", b"ewma_ms:hash": b"nan", b"ewma_ms:mandelbrot": b"inf", b"slots": b"2"})
    assert view.score is None and view.ewma_ms == {}
    assert view.task_ms("hash", [view]) is None
    assert parts_per_task(float("nan"), 4.0) == 1 and parts_per_task(float("inf"), 4.0) == 1


# ------------------------------------------------------------------ against a running controller


def test_non_finite_numbers_refused_with_a_clear_error(controller: Controller, r: Client) -> None:
    """Issue 9.2 and 9.10: `Infinity`, `-Infinity`, `NaN` and `1e999` in a node report (its
    benchmark score) are refused with 422 naming the field; on the socket, in a result's
    `elapsed_ms` or a heartbeat's count, with a `malformed` error frame; a frame of 100,000
    `[` gets a clear error (it raised RecursionError). The socket and the gateway carry on,
    and no service restarts."""
    pids = {name: p.pid for name, p in controller.procs.items()}
    node = Node(controller.url, controller.join_code)
    for literal in POISON:
        body = (
            f'{{"join_code": "{controller.join_code}", "device_id": "{node.device_id}", '
            f'"cores": 2, "kind": "native", "benchmark_score": {literal}}}'
        )
        resp = httpx.post(f"{controller.url}/node-report", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 422, (literal, resp.text)
        assert any("benchmark_score" in p and "finite" in p for p in resp.json()["problems"]), resp.text
    big = httpx.post(f"{controller.url}/node-report", json={**_report(controller, node), "benchmark_score": 1e15})
    assert big.status_code == 422 and any("benchmark_score" in p for p in big.json()["problems"])
    assert r.hget(keys.node(node.device_id), "score") is None  # nothing of those reports was kept
    token = node.join()["token"]
    seen: dict[str, Any] = {}

    async def frames() -> None:
        async with websockets.connect(ws_url(controller, token), max_size=None) as ws, heartbeats(ws):
            await recv_type(ws, "welcome")
            for literal in POISON:
                await ws.send(f'{{"type": "result", "task_id": "1-1", "output_b64": "", "elapsed_ms": {literal}}}')
                seen[f"result {literal}"] = await recv_type(ws, "error")
                await ws.send(f'{{"type": "heartbeat", "running": 0, "done": {literal}}}')
                seen[f"heartbeat {literal}"] = await recv_type(ws, "error")
            await ws.send('{"type": "result", "task_id": "1-1", "output_b64": "", "elapsed_ms": 1e300}')
            seen["huge"] = await recv_type(ws, "error")
            started = time.monotonic()
            await ws.send("[" * 100_000)
            seen["deep"] = await recv_type(ws, "error")
            seen["deep_s"] = time.monotonic() - started
            await ws.send('{"type": "ready", "free": ' + "[" * 50 + "]" * 50 + "}")
            seen["deep_field"] = await recv_type(ws, "error")
            # the same socket still answers: a well-formed frame gets its ordinary reply
            await ws.send(json.dumps({"type": "result", "task_id": "1-1", "output_b64": "AAAA", "elapsed_ms": 1}))
            seen["after"] = await recv_type(ws, "error")
            await ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
            await asyncio.sleep(0.5)
            seen["open"] = ws.close_code is None

    run_async(frames())
    for literal in POISON:
        for frame in ("result", "heartbeat"):
            error = seen[f"{frame} {literal}"]
            assert error["code"] == "malformed", (frame, literal, error)
            assert "expected finite numbers" in error["message"] and literal in error["message"], error
    assert seen["huge"]["code"] == "invalid" and "elapsed_ms" in seen["huge"]["message"], seen["huge"]
    assert seen["deep"]["code"] == "malformed" and "nested at most 32" in seen["deep"]["message"], seen["deep"]
    assert seen["deep_s"] < 5, seen["deep_s"]
    assert seen["deep_field"]["code"] == "malformed", seen["deep_field"]
    assert seen["after"]["code"] == "unknown_task", seen["after"]  # parsed and handled as ever
    assert seen["open"], "the gateway closed the socket"
    assert httpx.get(f"{controller.url}/healthz").status_code == 200
    services_unharmed(controller, pids)


def _report(ctl: Controller, node: Node) -> dict[str, Any]:
    return {"join_code": ctl.join_code, "device_id": node.device_id, "cores": 2, "kind": "native"}


def test_infinity_in_elapsed_ms_changes_nothing(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.2: a node that takes a real task and answers it with `elapsed_ms` of
    Infinity, 1e999 or NaN is refused each time: no result reaches the aggregator, no
    average or latency is written, the task stays held by it until its socket closes (then
    it is requeued at once), and an honest node completes the job exactly; `/metrics.json`
    stays valid JSON with finite figures and no service restarts."""
    pids = {name: p.pid for name, p in controller.procs.items()}
    proc = submit(controller, tmp_path)
    liar = Node(controller.url, controller.join_code)
    token = liar.join()["token"]
    seen: dict[str, Any] = {}

    async def lie() -> None:
        async with websockets.connect(ws_url(controller, token), max_size=None) as ws, heartbeats(ws):
            await recv_type(ws, "welcome")
            await ws.send(json.dumps({"type": "hello", "protocol": 2, "running": []}))
            await ws.send(json.dumps({"type": "ready", "free": 1}))
            task = await recv_type(ws, "task", timeout=30)
            seen["task"] = task
            for literal in ("Infinity", "1e999", "NaN"):
                await ws.send(
                    f'{{"type": "result", "task_id": "{task["task_id"]}", '
                    f'"output_b64": "{task["input_b64"]}", "elapsed_ms": {literal}}}'
                )
                seen[literal] = await recv_type(ws, "error")
            await asyncio.sleep(1.0)  # anything accepted would have reached Redis by now
            seen["results"] = r.xlen(keys.RESULTS)
            seen["record"] = {k.decode(): v.decode() for k, v in r.hgetall(keys.node(liar.device_id)).items()}
            seen["latency"] = [x.decode() for x in r.lrange(keys.LATENCY, 0, -1)]
            seen["metrics"] = strict_json(httpx.get(f"{controller.url}/metrics.json").text)

    run_async(lie())
    for literal in ("Infinity", "1e999", "NaN"):
        assert seen[literal]["code"] == "malformed" and "finite" in seen[literal]["message"], seen[literal]
    assert seen["results"] == 0, "a refused result reached the results stream"
    assert not any(k.startswith("ewma_ms:") for k in seen["record"]), seen["record"]
    assert seen["latency"] == [], seen["latency"]
    assert_all_finite(seen["metrics"])
    honest = Node(controller.url, controller.join_code)
    run_async(run_nodes_until(proc, honest))
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    for v in r.lrange(keys.LATENCY, 0, -1):
        assert math.isfinite(float(v))
    assert_all_finite(strict_json(httpx.get(f"{controller.url}/metrics.json").text))
    services_unharmed(controller, pids)


def test_metrics_json_finite_when_redis_holds_poison(controller: Controller, r: Client) -> None:
    """Issue 9.2: with Infinity and NaN already in Redis (a live node's score, recent
    latencies: written before reports were validated, or by hand), `/metrics.json` used
    to return 500 (JSON has no Infinity). It answers 200 with valid JSON of finite figures
    (the poison left out of the averages), and `/metrics` and `processdistro nodes` too."""
    pids = {name: p.pid for name, p in controller.procs.items()}
    node = Node(controller.url, controller.join_code)
    token = node.join()["token"]

    async def poisoned() -> dict[str, Any]:
        async with websockets.connect(ws_url(controller, token), max_size=None) as ws, heartbeats(ws):
            await recv_type(ws, "welcome")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # live once its gateway has touched it
                if any(m.decode().startswith(node.device_id) for m in r.zrange(keys.NODES, 0, -1)):
                    break
                await asyncio.sleep(0.1)
            r.hset(keys.node(node.device_id), mapping={"score": "inf", "ewma_ms:mandelbrot": "nan"})
            r.lpush(keys.LATENCY, "inf", "nan", "-inf", "1e999", "100", "300")
            out: dict[str, Any] = {}
            resp = httpx.get(f"{controller.url}/metrics.json")
            out["status"] = resp.status_code
            out["figures"] = strict_json(resp.text) if resp.status_code == 200 else resp.text
            prom = httpx.get(f"{controller.url}/metrics")
            out["prom"] = (prom.status_code, prom.text)
            out["nodes"] = controller.cli("nodes")
            return out

    seen = run_async(poisoned())
    assert seen["status"] == 200, seen["figures"]
    figures = seen["figures"]
    assert_all_finite(figures)
    assert figures["nodes_connected"] == 1
    assert figures["avg_score"] == 0.0  # the one live score was Infinity: left out
    assert figures["avg_latency_ms"] == 200.0  # the mean of the finite latencies
    assert seen["prom"][0] == 200 and 'processdistro_node_score_avg{scope="cluster"} 0.0' in seen["prom"][1]
    nodes = seen["nodes"]
    assert nodes.returncode == 0 and "Traceback" not in nodes.stderr, nodes.stderr
    services_unharmed(controller, pids)


def test_scheduler_tail_survives_poisoned_speeds(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.2: the scheduler's tail read a node's time of Infinity (its `elapsed_ms`
    was accepted), computed the takers' share as inf/inf and `round(nan)` raised: the
    scheduler crash-looped and the job never finished. Here Redis keeps holding Infinity as
    both nodes' hash time, score and recent latency all through a hash job, with a slow
    node holding more tasks than its slot while a fast one runs dry (the case that steals):
    the job completes, and the scheduler is the same process with no traceback."""
    from processdistro import client
    from test_hash import write_rows

    pids = {name: p.pid for name, p in controller.procs.items()}
    write_rows(tmp_path / "rows.csv", 400, with_ids=False)
    params = {"input": str(tmp_path / "rows.csv"), "iterations": 50, "batch": 5}
    job_id = client.submit(r, "hash", params, replicate=0)  # 80 parts
    slow = Node(controller.url, controller.join_code, cores=1, delay=0.3)
    fast = Node(controller.url, controller.join_code, cores=1)

    def state() -> bytes | None:
        return r.hget(keys.job(job_id), "state")  # type: ignore[no-any-return]

    def poison() -> None:
        for n in (slow, fast):
            r.hset(keys.node(n.device_id), mapping={"ewma_ms:hash": "inf", "score": "inf"})
        r.lpush(keys.LATENCY, "inf")

    def scheduler_alive() -> bool:
        return controller.procs["scheduler"].poll() is None

    async def scenario() -> None:
        stop = asyncio.Event()
        runs = [asyncio.create_task(slow.run(stop=stop))]
        try:
            deadline = time.monotonic() + 60
            while sum(m["type"] == "task" for m in slow.received) < 2:  # its slot and prefetch taken
                poison()
                assert time.monotonic() < deadline, controller.logs()
                await asyncio.sleep(0.05)
            runs.append(asyncio.create_task(fast.run(stop=stop)))
            deadline = time.monotonic() + 120
            while state() not in (b"done", b"failed", b"cancelled") and time.monotonic() < deadline:
                poison()  # the gateways write fresh times after each result: keep the poison in
                if not scheduler_alive():
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*runs)

    run_async(scenario())
    assert scheduler_alive(), controller.logs()
    assert state() == b"done", controller.logs()
    services_unharmed(controller, pids)
