"""The gateway's control channel: one bad message never costs the ones after it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Controller
from processdistro.shared import keys
from processdistro.shared.jobs import LIVE, JobState
from processdistro.shared.messages import CancelJob
from processdistro.shared.protocol import PROTOCOL_VERSION
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import JobStore
from websockets.sync.client import ClientConnection, connect

SMALL = ["--width", "300", "--height", "200", "--tile", "32", "--max-iter", "200", "--replicate", "0"]


class FrameNode:
    """A node that joins, asks for work and records every frame it is sent; it runs nothing."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    def receive_until(self, done: Any, timeout: float) -> bool:
        """Take frames (heartbeating meanwhile) until `done(frames)` or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done(self.frames):
            if time.monotonic() > deadline:
                return False
            try:
                self.frames.append(json.loads(self.ws.recv(timeout=0.25)))
            except TimeoutError:
                self.ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
        return True

    def task_ids(self, job_id: str) -> set[str]:
        ids: set[str] = set()
        for f in self.frames:
            if f["type"] == "task" and f["job_id"] == job_id:
                ids |= {f["task_id"], *(p["task_id"] for p in f["more"])}
        return ids

    def cancelled(self) -> set[str]:
        return {t for f in self.frames if f["type"] == "cancel" for t in f["task_ids"]}


@contextmanager
def frame_node(ctl: Controller) -> Iterator[FrameNode]:
    report = {"join_code": ctl.join_code, "device_id": "control-test", "cores": 2, "kind": "native"}
    accepted = httpx.post(f"{ctl.url}/node-report", json=report).raise_for_status().json()
    url = ctl.url.replace("http", "ws", 1) + f"/ws?token={accepted['token']}"
    with connect(url, max_size=None) as ws:
        ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "running": []}))
        capacity = accepted["slots"] + accepted["prefetch"]
        ws.send(json.dumps({"type": "ready", "free": capacity}))
        node = FrameNode(ws)
        # all it asked for: nothing more is sent while the test acts
        assert node.receive_until(lambda fs: sum(f["type"] == "task" for f in fs) >= capacity, 30), ctl.logs()
        yield node


@pytest.mark.parametrize(
    "bad",
    [b'{"type":"steal"}', b"not json", b'{"type":"reboot"}', b'{"type":"drop_copies","job_id":"j","index":-1}'],
    ids=["missing-fields", "not-json", "unknown-type", "invalid-field"],
)
def test_a_bad_control_message_does_not_lose_the_next(
    controller: Controller, tmp_path: Path, r: Client, bad: bytes
) -> None:
    """A malformed control message right before a `cancel_job`: the cancel still reaches
    the node (its tasks of the job are cancelled) and their entries leave the stream."""
    proc = controller.submit_mandelbrot(tmp_path, *SMALL)
    try:
        with frame_node(controller) as node:
            job_id = r.zrange(keys.JOBS, 0, -1)[0].decode()
            held = node.task_ids(job_id)
            assert held and r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"] == len(held)
            # the scheduler's cancel, with a bad message published just before its cancel_job
            assert JobStore(r).transition(job_id, LIVE, JobState.CANCELLED)
            pipe = r.pipeline(transaction=True)
            pipe.publish(keys.CONTROL, bad)
            pipe.publish(keys.CONTROL, CancelJob(job_id=job_id).encode())
            pipe.execute()
            got = node.receive_until(lambda fs: held <= node.cancelled(), 5)
            assert got, f"cancel_job after {bad!r} was lost: held {sorted(held)}, frames {node.frames}"
            assert r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"] == 0
    finally:
        proc.wait(30)
    assert proc.returncode == 1 and "cancelled" in (tmp_path / "submit.log").read_text()


def test_control_survives_a_lost_connection(controller: Controller, tmp_path: Path, r: Client) -> None:
    """The gateway's subscription is cut: it subscribes again and hears the next cancel."""
    proc = controller.submit_mandelbrot(tmp_path, *SMALL)
    try:
        with frame_node(controller) as node:
            job_id = r.zrange(keys.JOBS, 0, -1)[0].decode()
            held = node.task_ids(job_id)
            assert r.client_kill_filter(_type="pubsub") >= 1
            deadline = time.monotonic() + 10
            while dict(r.pubsub_numsub(keys.CONTROL)).get(keys.CONTROL.encode(), 0) < 1:
                assert time.monotonic() < deadline, "the gateway did not subscribe again"
                time.sleep(0.05)
            assert JobStore(r).transition(job_id, LIVE, JobState.CANCELLED)
            r.publish(keys.CONTROL, CancelJob(job_id=job_id).encode())
            assert node.receive_until(lambda fs: held <= node.cancelled(), 5), node.frames
    finally:
        proc.wait(30)
    assert proc.returncode == 1
