"""Issue 10.6: the node report's GPU renderer, and the agents' notable events in the
controller's log (rate-limited per node, text made safe), against a real gateway and a real
Chromium agent."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from conftest import Controller
from nodes import Node, run_async
from processdistro.gateway.agent_log import BURST, RATE
from processdistro.shared import keys
from processdistro.shared.protocol import NodeReport, node_message_adapter
from processdistro.shared.store.connection import Client
from pydantic import ValidationError
from test_js_units import node as node_binary

ROOT = Path(__file__).resolve().parent.parent


def ws_url(ctl: Controller, token: str) -> str:
    return ctl.url.replace("http", "ws", 1) + f"/ws?token={token}"


def node_logs(r: Client) -> list[dict[str, Any]]:
    return [e for _id, fields in r.xrange(keys.EVENTS) if (e := json.loads(fields[b"event"]))["type"] == "node_log"]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ the protocol


@pytest.mark.parametrize(
    ("gpu", "ok"),
    [
        ("ANGLE (Intel, Mesa Intel(R) UHD Graphics 620 (KBL GT2), OpenGL 4.6)", True),
        ("Apple GPU", True),
        (None, True),
        ("G" * 200, True),
        ("G" * 201, False),
        ("Evil\x1b[31mGPU", False),
        ("two\nlines", False),
        ("bidi\u202eoverride", False),
    ],
    ids=["angle", "apple", "absent", "at-cap", "over-cap", "escape", "newline", "bidi"],
)
def test_gpu_field_is_bounded_plain_text(gpu: str | None, ok: bool) -> None:
    report = {"join_code": "ABCD", "device_id": "a" * 32, "cores": 2, "gpu": gpu}
    if ok:
        assert NodeReport.model_validate(report).gpu == gpu
    else:
        with pytest.raises(ValidationError, match="gpu"):
            NodeReport.model_validate(report)


def test_js_frames_validate_against_the_protocol() -> None:
    """Whatever the agent feeds `logFrame` and `cleanGpu` (hostile page text included), the
    frames and reports it builds are valid for shared/protocol.py."""
    script = """
      import { logFrame } from "./static/js/agent_log.js";
      import { cleanGpu } from "./static/js/device.js";
      const texts = ["plain", "\\u001b[2J\\nFAKE 12:00 gateway INFO", "x".repeat(5000), "", null, 42, "\\u202e\\u0000"];
      const frames = [];
      for (const t of texts) for (const level of ["error", "info", "nonsense", undefined])
        for (const event of ["reconnect", "Module Failed", "9", "", "ünïcode", "a".repeat(99)])
          frames.push(logFrame(level, event, t));
      const gpus = texts.map(cleanGpu);
      console.log(JSON.stringify({ frames, gpus }));
    """
    proc = subprocess.run(
        [node_binary(), "--input-type=module", "-e", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["frames"]) == 7 * 4 * 6
    for frame in out["frames"]:
        node_message_adapter.validate_python(frame)
    for gpu in out["gpus"]:
        NodeReport.model_validate({"join_code": "ABCD", "device_id": "a" * 32, "cores": 1, "gpu": gpu})
    assert out["gpus"][1] == "[2J FAKE 12:00 gateway INFO"


# ------------------------------------------------------------------ a real gateway


def test_gpu_kept_in_the_node_hash(controller: Controller, r: Client) -> None:
    node = Node(controller.url, controller.join_code)
    report = {"join_code": controller.join_code, "device_id": node.device_id, "cores": 2, "kind": "browser"}
    bad = httpx.post(f"{controller.url}/node-report", json={**report, "gpu": "x\x1b]0;owned\x07"})
    assert bad.status_code == 422 and any("gpu" in p for p in bad.json()["problems"]), bad.text
    ok = httpx.post(f"{controller.url}/node-report", json={**report, "gpu": "Mali-G78 MC24"})
    assert ok.status_code == 200, ok.text
    node_id = ok.json()["node_id"]
    assert r.hget(keys.node(node_id), "gpu") == b"Mali-G78 MC24"
    native = Node(controller.url, controller.join_code).join()  # the native worker's report: no gpu
    assert r.hget(keys.node(native["node_id"]), "gpu") == b""


def test_agent_events_logged_safely_and_rate_limited(controller: Controller, r: Client) -> None:
    """A flood of `log` frames with escape sequences and forged log lines: the first BURST
    reach the gateway's log (escaped, one line each, with the node id) and the events stream;
    the rest are dropped, and the next one that passes says how many. An invalid `log` frame
    gets an error frame and the socket carries on."""
    node = Node(controller.url, controller.join_code)
    accepted = node.join()
    node_id, token = accepted["node_id"], accepted["token"]
    flood = 3 * BURST
    hostile = "boom\x1b[2J\n2026-01-01 gateway INFO fake: line"
    seen: dict[str, Any] = {}

    async def frames() -> None:
        async with websockets.connect(ws_url(controller, token)) as ws:
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "welcome":
                pass
            for i in range(flood):
                await ws.send(
                    json.dumps({"type": "log", "level": "error", "event": "uncaught", "message": f"{i} {hostile}"})
                )
            await ws.send(json.dumps({"type": "log", "level": "error", "event": "Not An Event", "message": "x"}))
            seen["error"] = json.loads(await asyncio.wait_for(ws.recv(), 10))
            # one token back after 1 / RATE seconds: the next one passes and reports the drops
            for _ in range(int((1 / RATE + 1.0) / 0.5)):
                await ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
                await asyncio.sleep(0.5)
            await ws.send(json.dumps({"type": "log", "level": "warning", "event": "reconnect", "message": "back"}))
            await ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
            await asyncio.sleep(0.5)

    run_async(frames())
    assert seen["error"]["type"] == "error" and seen["error"]["code"] == "invalid", seen["error"]
    log_path = controller.home / "gateway.log"
    wait_for(lambda: "agent reconnect: back" in log_path.read_text(), 20, "the event after the pause")
    text = log_path.read_text()
    lines = [line for line in text.splitlines() if f"node {node_id}: agent uncaught:" in line]
    assert len(lines) == BURST, text[-3000:]
    assert all("\x1b" not in line and "boom\\x1b[2J\\n2026-01-01 gateway INFO fake" in line for line in lines)
    assert " WARNING " in lines[0]  # a node's error is a warning for the controller
    assert "\x1b" not in text and not re.search(r"^2026-01-01 gateway INFO fake", text, re.M)
    assert f"node {node_id}: {flood - BURST} events from node {node_id} dropped" in text
    assert text.count(f"node {node_id}: agent events over 12 a minute: dropping them") == 1
    events = node_logs(r)
    assert [e["event"] for e in events] == ["uncaught"] * BURST + ["dropped", "reconnect"]
    assert all(e["node"] == node_id for e in events)
    assert events[0]["message"].startswith("0 boom\\x1b[2J\\n")
    assert events[-2]["message"] == f"{flood - BURST} events from node {node_id} dropped"
    assert controller.procs["gateway"].poll() is None


# ------------------------------------------------------------------ a real browser


@pytest.mark.browser
def test_chromium_agent_reports_gpu_and_uncaught_errors(controller: Controller, r: Client, browser: Any) -> None:
    """A Chromium agent's report carries the WebGL renderer (headless Chromium renders
    WebGL with SwiftShader); an uncaught error on the page, and a reconnect (told once the
    agent is back), reach the gateway's log."""
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(controller.join_url)
        page.click("#join")
        page.wait_for_function("document.getElementById('state').textContent.trim() === 'connected'", timeout=30_000)
        node_id = page.evaluate("window.pdAgent.nodeId")
        gpu = r.hget(keys.node(node_id), "gpu")
        assert gpu is not None and b"SwiftShader" in gpu, gpu
        assert gpu.decode() == page.evaluate("window.pdAgent.device.gpu")
        page.evaluate("setTimeout(() => { throw new Error('boom \\u001b[31m red'); }, 0)")
        log_path = controller.home / "gateway.log"
        wait_for(lambda: f"node {node_id}: agent uncaught:" in log_path.read_text(), 20, "the agent's error")
        line = next(x for x in log_path.read_text().splitlines() if f"node {node_id}: agent uncaught:" in x)
        assert "boom \\x1b[31m red" in line and "\x1b" not in line, line
        # a dropped socket: the agent reconnects, then tells why it was away
        page.evaluate("window.pdAgent.ws.close(4003, 'test drop')")
        wait_for(lambda: f"node {node_id}: agent reconnect:" in log_path.read_text(), 30, "the reconnect")
        line = next(x for x in log_path.read_text().splitlines() if f"node {node_id}: agent reconnect:" in x)
        assert re.search(r"reconnected after [0-9.]+ s \(1 in all\): connection closed \(4003 test drop\)", line), line
    finally:
        context.close()
