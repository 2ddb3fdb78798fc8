"""The node behaviour table (`tests/node_cases.json`) run against `worker/state.py`.

The browser agent's `static/js/node_state.js` runs the same file: one table, two nodes.
Each step feeds one event; the instructions returned must be exactly the expected list, in
order (a `send` is compared on the keys the table gives only; a `start` names the part and,
when the task has them, its limits)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from processdistro.shared.protocol import Hello, Results, TaskResult, server_message_adapter
from processdistro.worker.state import (
    Connected,
    Disconnected,
    Event,
    Flush,
    Hold,
    Instruction,
    NodeState,
    PartDone,
    PartFailed,
    Received,
    Send,
    Start,
    Stop,
    Tick,
    Undelivered,
)

CASES = json.loads((Path(__file__).parent / "node_cases.json").read_text())["cases"]


def event_of(raw: dict[str, Any]) -> Event:
    if raw.get("connected"):
        return Connected()
    if "recv" in raw:
        return Received(server_message_adapter.validate_python(raw["recv"]))
    if "done" in raw:
        return PartDone(raw["done"], base64.b64decode(raw["output_b64"], validate=True), float(raw["elapsed_ms"]))
    if "failed" in raw:
        return PartFailed(raw["failed"], raw["message"])
    if raw.get("tick"):
        return Tick()
    if raw.get("flush"):
        return Flush()
    if raw.get("disconnected"):
        return Disconnected()
    raise ValueError(f"expected a node event in the table, got {raw!r}")


def as_json(instruction: Instruction) -> dict[str, Any]:
    if isinstance(instruction, Send):
        return {"send": instruction.message.model_dump(mode="json")}
    if isinstance(instruction, Start):
        limits = {"deadline_s": instruction.deadline_s, "memory_mb": instruction.memory_mb}
        return {"start": instruction.task_id, **{k: v for k, v in limits.items() if v is not None}}
    if isinstance(instruction, Stop):
        return {"stop": instruction.task_id}
    if isinstance(instruction, Hold):
        return {"hold": instruction.ms}
    raise TypeError(f"expected an instruction, got {instruction!r}")


def matches(got: dict[str, Any], want: dict[str, Any]) -> bool:
    if set(got) != set(want):
        return False
    if "send" in want:
        return all(k in got["send"] and got["send"][k] == v for k, v in want["send"].items())
    return got == want


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_node_case(case: dict[str, Any]) -> None:
    state = NodeState()
    for number, step in enumerate(case["steps"], 1):
        got = [as_json(i) for i in state.handle(event_of(step["event"]))]
        want = step["expect"]
        ok = len(got) == len(want) and all(matches(g, w) for g, w in zip(got, want, strict=True))
        assert ok, (
            f"step {number} {json.dumps(step['event'])}:\n expected {json.dumps(want)}\n got      {json.dumps(got)}"
        )


def test_case_names_are_unique() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))


def test_a_report_the_socket_lost_waits_in_the_outbox() -> None:
    """Python's I/O layer only (`Undelivered`): the socket closed under a `result` it was
    writing; the report is listed in the next hello and sent after the next welcome."""
    state = NodeState()
    state.handle(Connected())
    state.handle(Received(server_message_adapter.validate_python(CASES[0]["steps"][1]["event"]["recv"])))
    lost = TaskResult(task_id="1-0", output_b64="AQ==", elapsed_ms=5)
    assert state.handle(Undelivered(lost)) == []
    state.handle(Disconnected())
    assert [as_json(i) for i in state.handle(Connected())] == [{"send": Hello(running=["1-0"]).model_dump(mode="json")}]
    welcome = state.handle(Received(server_message_adapter.validate_python(CASES[0]["steps"][1]["event"]["recv"])))
    assert welcome[0] == Send(lost) and [as_json(i) for i in welcome[1:]] == [{"send": {"type": "ready", "free": 3}}]


def test_a_results_frame_the_socket_lost_waits_in_the_outbox() -> None:
    """Python's I/O layer only: a `results` frame lost with the socket goes back item by item
    and is sent again, packed, after the next welcome."""
    welcome = {**CASES[0]["steps"][1]["event"]["recv"], "results_per_frame": 4}
    state = NodeState()
    state.handle(Connected())
    state.handle(Received(server_message_adapter.validate_python(welcome)))
    lost = [TaskResult(task_id=f"1-{k}", output_b64="AQ==", elapsed_ms=5) for k in range(3)]
    assert state.handle(Undelivered(Results(items=lost))) == []
    state.handle(Disconnected())
    assert [as_json(i) for i in state.handle(Connected())] == [
        {"send": Hello(running=["1-0", "1-1", "1-2"]).model_dump(mode="json")}
    ]
    again = state.handle(Received(server_message_adapter.validate_python(welcome)))
    assert again[0] == Send(Results(items=lost))
