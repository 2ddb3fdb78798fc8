"""Results several to a frame (`results`), against the real gateway and aggregator: each item
is taken on its own (a bad one refused, the others kept), and a job of trivial subtasks runs
with its tasks several parts to a frame and its results several to a frame."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Controller
from executors import mandelbrot_tile
from nodes import Node, run_async
from processdistro.gateway.frames import Refusal, Reports, parse_frame
from processdistro.shared import keys
from processdistro.shared.protocol import MAX_ELAPSED_MS, MAX_RESULTS_PER_FRAME, PROTOCOL_VERSION
from processdistro.shared.store.connection import Client
from websockets.sync.client import ClientConnection, connect

SMALL = ["--width", "64", "--height", "64", "--tile", "16", "--max-iter", "50", "--replicate", "0"]


@pytest.fixture
def controller_env() -> dict[str, str]:
    """Trivial subtasks of other kinds than hash and crack bundled as parts (off by default)."""
    return {"PD_SMALL_TASK_MS": "50"}


def item(task_id: str = "1-0", **extra: object) -> dict[str, object]:
    return {"type": "result", "task_id": task_id, "output_b64": "AQ==", "elapsed_ms": 1.0, **extra}


@pytest.mark.parametrize(
    ("frame", "kept", "refused"),
    [
        ({"type": "results", "items": [item(f"1-{k}") for k in range(MAX_RESULTS_PER_FRAME)]}, 64, None),
        ({"type": "results", "items": [item(), {"type": "task_failed", "task_id": "2-0", "message": "x"}]}, 2, None),
        ({"type": "results", "items": [item(), item(elapsed_ms=MAX_ELAPSED_MS * 2), item(task_id="x")]}, 1, 2),
        ({"type": "results", "items": [item(), item(extra=1), {"type": "results", "items": [item()]}]}, 1, 2),
        ({"type": "results", "items": [item(f"1-{k}") for k in range(MAX_RESULTS_PER_FRAME + 1)]}, None, "invalid"),
        ({"type": "results", "items": []}, None, "invalid"),
        ({"type": "results", "items": {"0": item()}}, None, "invalid"),
        ({"type": "results", "items": [item()], "free": 3}, None, "invalid"),
    ],
    ids=[
        "the-most-items",
        "result-and-failure",
        "out-of-bounds-and-bad-id-items-refused-alone",
        "extra-field-and-nested-frame-refused-alone",
        "too-many-items",
        "no-items",
        "items-not-a-list",
        "extra-field-on-the-frame",
    ],
)
def test_a_results_frame_is_parsed_item_by_item(frame: dict[str, object], kept: int | None, refused: object) -> None:
    got = parse_frame(json.dumps(frame), 1 << 20)
    if kept is None:
        assert isinstance(got, Refusal) and got.code.value == refused
    else:
        assert isinstance(got, Reports) and len(got.items) == kept and len(got.refused) == (refused or 0)


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"results","items":[{"type":"result","task_id":"1-0","output_b64":"AQ==","elapsed_ms":NaN}]}',
        '{"type":"results","items":' + "[" * 100 + "]" * 100 + "}",
    ],
    ids=["nan-in-an-item", "too-deep"],
)
def test_a_results_frame_is_parsed_strictly(text: str) -> None:
    """Non-finite numbers and deep nesting refuse the whole frame before anything is parsed."""
    got = parse_frame(text, 1 << 20)
    assert isinstance(got, Refusal) and got.code.value == "malformed"


def frames_until(ws: ClientConnection, done: Any, timeout: float) -> list[dict[str, Any]]:
    """Frames the gateway sends (heartbeating meanwhile) until `done(frames)`."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not done(frames):
        assert time.monotonic() < deadline, f"timed out; frames so far: {frames}"
        try:
            frames.append(json.loads(ws.recv(timeout=0.25)))
        except TimeoutError:
            ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
    return frames


def test_each_item_of_a_results_frame_is_taken_on_its_own(controller: Controller, tmp_path: Path, r: Client) -> None:
    proc = controller.submit_mandelbrot(tmp_path, *SMALL)
    try:
        report = {"join_code": controller.join_code, "device_id": "results-test", "cores": 1, "kind": "native"}
        accepted = httpx.post(f"{controller.url}/node-report", json=report).raise_for_status().json()
        url = controller.url.replace("http", "ws", 1) + f"/ws?token={accepted['token']}"
        with connect(url, max_size=None) as ws:
            ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "running": []}))
            ws.send(json.dumps({"type": "ready", "free": 2}))
            frames = frames_until(ws, lambda fs: sum(f["type"] == "task" for f in fs) >= 2, 30)
            welcome = next(f for f in frames if f["type"] == "welcome")
            assert welcome["results_per_frame"] == 32
            tasks = [f for f in frames if f["type"] == "task"]
            assert all(not t["more"] for t in tasks), "a node never measured gets one part per task"
            (a, b) = tasks[:2]
            job_id = a["job_id"]
            output = base64.b64encode(mandelbrot_tile(base64.b64decode(a["input_b64"]))).decode()
            good = {"type": "result", "task_id": a["task_id"], "output_b64": output, "elapsed_ms": 1.0}
            items = [
                {"type": "result", "task_id": b["task_id"], "output_b64": "not base64!", "elapsed_ms": 1.0},
                good,
                {"type": "result", "task_id": "1-1", "output_b64": "AA==", "elapsed_ms": 1.0},  # not held
                good,  # named twice
                {"type": "leave"},  # not a report
            ]
            ws.send(json.dumps({"type": "results", "items": items}))
            errors = frames_until(ws, lambda fs: sum(f["type"] == "error" for f in fs) >= 4, 15)
            refused = sorted((e["code"], e["message"]) for e in errors if e["type"] == "error")
            assert [c for c, _m in refused] == ["invalid", "invalid", "unknown_task", "unknown_task"], refused
            assert any("items[0]" in m for _c, m in refused) and any("items[4]" in m for _c, m in refused)
            # the good item was handed over and merged; the node still holds the other task
            deadline = time.monotonic() + 20
            while int(r.hget(keys.job(job_id), "done") or 0) < 1:
                assert time.monotonic() < deadline, controller.logs()
                time.sleep(0.05)
            assert int(r.hget(keys.job(job_id), "done") or 0) == 1
            assert r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"] == 1
            # a task_failed in a results frame is taken like a task_failed frame: the task is requeued
            fail = {"type": "task_failed", "task_id": b["task_id"], "message": "RuntimeError: boom"}
            ws.send(json.dumps({"type": "results", "items": [fail]}))
            deadline = time.monotonic() + 10
            while r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"]:
                assert time.monotonic() < deadline, "the failed task was not requeued"
                time.sleep(0.05)
            ws.send(json.dumps({"type": "results", "items": []}))
            empty = frames_until(ws, lambda fs: any(f["type"] == "error" for f in fs), 10)
            assert [f["code"] for f in empty if f["type"] == "error"] == ["invalid"]
    finally:
        proc.kill()
        proc.wait(30)


def test_trivial_subtasks_travel_several_to_a_frame_each_way(controller: Controller, tmp_path: Path, r: Client) -> None:
    """A job of 500 trivial tiles on one Python node: tasks of several parts, results several
    to a frame, and the image exactly right."""
    proc = controller.submit_mandelbrot(tmp_path, "--width", "100", "--height", "80", "--tile", "4", "--max-iter", "1")
    node = Node(controller.url, controller.join_code)

    async def work() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop=stop))
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await task

    run_async(work())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    assert (np.load(tmp_path / "m.npy") == 1).all()
    stats = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
    assert stats.get("parts_bundled", 0) > 250, stats
    assert stats.get("results_batched", 0) > 250, stats
    assert stats.get("tasks_completed") == 500, stats
