"""Issue 9.8: text a node supplies (its `browser` and `os`, a task's failure message, which
becomes a job's error) went through rich markup: `processdistro nodes` and `jobs` died with
`MarkupError` on a stray `[/]`, `[bold red]x[/]` was rendered as style, and escape bytes
(`\\x1b[31m`, `\\x1b[2J`) reached the operator's terminal and the services' logs, where a
newline could also forge a log line.

The fix: every node-supplied cell of the CLI goes through `cli.console.literal` (a rich
`Text`, never markup, control characters written as escapes); the services log node text
through `shared.logs.safe_text`, and every log record's message is escaped as it is written
(`EscapeControl`), so it is one line with no escape sequence in it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from conftest import Controller
from nodes import Node, run_async
from processdistro.console import literal
from processdistro.shared import keys
from processdistro.shared.logs import EscapeControl, safe_text
from processdistro.shared.messages import Fail
from processdistro.shared.store.commands import send_command
from processdistro.shared.store.connection import Client
from rich.console import Console
from rich.table import Table
from test_hostile_numbers import heartbeats
from test_pipeline import submit

MARKUP = "[bold red]x[/]"
STRAY = "[/] [link=file:///etc/passwd]y"
ESCAPES = "\x1b[31mred\x1b[0m\x1b[2J"
FORGED = "oops\n2026-01-01 00:00:00 gateway INFO forged: job done"
BROWSER = f"{MARKUP} {STRAY}"
OS = ESCAPES
FAILURE = f"{MARKUP} {STRAY} {ESCAPES} {FORGED}"


# ------------------------------------------------------------------ pure parts (tables)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (MARKUP, MARKUP),
        ("[/]", "[/]"),
        (ESCAPES, "\\x1b[31mred\\x1b[0m\\x1b[2J"),
        ("a\nb\r\tc", "a\\nb\\r\\tc"),
        ("\x9b31m", "\\x9b31m"),
        ("abc\u202edcba", "abc\\u202edcba"),
        ("Firefox/128.0 (X11; Linux)", "Firefox/128.0 (X11; Linux)"),
        ("é 漢字 🙂", "é 漢字 🙂"),
    ],
    ids=["markup", "stray close", "ESC sequences", "newline tab", "C1 CSI", "bidi override", "plain", "unicode"],
)
def test_node_text_rendered_literally(text: str, shown: str) -> None:
    """Issue 9.8: a table cell of node text prints exactly as written, with control
    characters as escapes, on a colour terminal too (where markup would be styled)."""
    assert safe_text(text) == shown
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="truecolor", width=200)
    table = Table("browser/os", box=None, show_header=False)
    table.add_row(literal(text))
    console.print(table)
    printed = out.getvalue()
    assert shown in printed, printed
    node_bytes = printed.replace("\x1b[0m", "")  # rich's own reset at the end of a line is fine
    assert "\x1b[31m" not in node_bytes and "\x1b[2J" not in node_bytes and "\x1b[1;31m" not in printed


def test_log_record_with_node_text_is_one_escaped_line() -> None:
    """Issue 9.8: a log record quoting node text (even without `safe_text`) is written
    as one line, its control characters escaped; `safe_text` also bounds its length."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(EscapeControl())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test_hostile_markup")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("node %s: task failed: %s", "n1", FAILURE)
        log.warning("node %s: task failed: %s", "n1", safe_text("x" * 5000))
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "\x1b" not in lines[0] and "\\x1b[31m" in lines[0] and "oops\\n2026-01-01" in lines[0]
    assert MARKUP in lines[0]  # literal: logs are plain text
    assert len(lines[1]) < 300


# ------------------------------------------------------------------ against a running controller


def cli(ctl: Controller, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with a wide terminal, so no cell is wrapped or cut."""
    return subprocess.run(
        [sys.executable, "-m", "processdistro", *args],
        env={**ctl.env, "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_nodes_jobs_and_logs_show_node_text_literally(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.8: a node whose browser is `[bold red]x[/] [/] ...` and whose OS is escape
    bytes joins, takes a real task and fails it with markup, escapes and a forged log line;
    its job then fails with that message as its reason (as after too many failures).
    `processdistro nodes` and `jobs` print all of it literally (they died with MarkupError),
    `submit --wait` reports the reason literally, and no escape byte or forged line reaches
    a service's log."""
    proc = submit(controller, tmp_path)
    node = Node(controller.url, controller.join_code)
    report = {
        "join_code": controller.join_code,
        "device_id": node.device_id,
        "cores": 2,
        "kind": "native",
        "browser": BROWSER,
        "os": OS,
    }
    accepted = httpx.post(f"{controller.url}/node-report", json=report)
    assert accepted.status_code == 200, accepted.text
    token = accepted.json()["token"]
    url = controller.url.replace("http", "ws", 1) + f"/ws?token={token}"

    async def fail_a_task() -> dict[str, Any]:
        async with websockets.connect(url, max_size=None) as ws, heartbeats(ws):
            await ws.send(json.dumps({"type": "hello", "protocol": 2, "running": []}))
            await ws.send(json.dumps({"type": "ready", "free": 1}))
            while True:
                msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if msg["type"] == "task":
                    break
            await ws.send(json.dumps({"type": "task_failed", "task_id": msg["task_id"], "message": FAILURE}))
            await asyncio.sleep(1.0)  # logged and requeued by now
            return msg

    task = run_async(fail_a_task())
    job_id = task["job_id"]
    send_command(r, Fail(job_id=job_id, reason=f"subtask 0 failed; last error: {FAILURE}"))
    deadline = time.monotonic() + 30
    while r.hget(keys.job(job_id), "state") != b"failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.hget(keys.job(job_id), "state") == b"failed", controller.logs()
    proc.wait(60)

    nodes = cli(controller, "nodes")
    assert nodes.returncode == 0, nodes.stderr
    assert BROWSER in nodes.stdout and "\\x1b[31mred\\x1b[0m\\x1b[2J" in nodes.stdout, nodes.stdout
    assert "\x1b" not in nodes.stdout, nodes.stdout
    jobs = cli(controller, "jobs")
    assert jobs.returncode == 0, jobs.stderr
    assert "last error: [bold red]x[/] [/] [link=" in jobs.stdout and "\x1b" not in jobs.stdout, jobs.stdout
    as_json = cli(controller, "nodes", "--json")
    assert as_json.returncode == 0 and "\x1b" not in as_json.stdout, as_json.stderr
    assert any(n.get("browser") == BROWSER and n.get("os") == OS for n in json.loads(as_json.stdout))

    submitted = (tmp_path / "submit.log").read_text()
    assert proc.returncode == 1, submitted
    assert "MarkupError" not in submitted and "Traceback" not in submitted, submitted
    assert f"last error: {MARKUP} {STRAY} \\x1b[31mred" in submitted and "\x1b" not in submitted, submitted

    logs = {p.name: p.read_text() for p in controller.home.glob("*.log")}
    for name, text in logs.items():
        assert "\x1b" not in text, (name, text[-2000:])
        assert "\nforged" not in text and not any(line.startswith("2026-01-01") for line in text.splitlines()), name
    gateway = logs["gateway.log"]
    failed = [line for line in gateway.splitlines() if "failed:" in line and task["task_id"] in line]
    assert failed and "\\x1b[31mred" in failed[0] and "oops\\n2026-01-01" in failed[0], gateway[-3000:]
    assert "Traceback" not in "".join(logs.values()), controller.logs()
