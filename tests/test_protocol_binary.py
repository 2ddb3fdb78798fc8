"""Binary `results` frames (`protocol.binary_frame` on the node, `gateway.frames.parse_binary`
at the gateway): what a node sends is read back item for item with its output bytes; a frame
whose sizes do not fill it exactly, or whose header is not the strict JSON a text frame must
be, is refused whole; a bad item is refused on its own and the others are kept."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
from pathlib import Path

import pytest
from processdistro.gateway.frames import Refusal, Reports, parse_binary, parse_frame
from processdistro.shared.protocol import (
    ErrorCode,
    Results,
    TaskFailed,
    TaskResult,
    b64_bytes,
)
from test_js_units import node

ROOT = Path(__file__).resolve().parent.parent

CAP = 1 << 20


def result(task_id: str, output: bytes, elapsed_ms: float = 2.5) -> TaskResult:
    return TaskResult(task_id=task_id, output_b64=base64.b64encode(output).decode(), elapsed_ms=elapsed_ms)


def frame(items: list[dict[str, object]], payload: bytes, head: bytes | None = None) -> bytes:
    text = head if head is not None else json.dumps({"type": "results", "items": items}).encode()
    return struct.pack("<I", len(text)) + text + payload


def test_a_nodes_reports_come_back_with_their_bytes() -> None:
    out1, out2 = bytes(range(256)) * 40, b""
    failed = TaskFailed(task_id="5-0", message="RuntimeError: boom \u2603")
    message = Results(items=[result("1-0", out1), failed, result("2-0", out2, 0.0)])
    data = message.binary_frame()
    assert data is not None and len(data) < len(message.model_dump_json())
    got = parse_frame(None, CAP, data)
    assert isinstance(got, Reports) and got.refused == []
    first, again_failed, second = got.items
    assert isinstance(first, TaskResult) and isinstance(second, TaskResult)
    assert (first.task_id, b64_bytes(first.output_b64), first.elapsed_ms) == ("1-0", out1, 2.5)
    assert (second.task_id, b64_bytes(second.output_b64)) == ("2-0", b"")
    assert again_failed == failed
    single = result("3-0", b"xyz").binary_frame()
    assert single is not None
    alone = parse_binary(single, CAP)
    assert isinstance(alone, Reports) and [b64_bytes(r.output_b64) for r in alone.items] == [b"xyz"]  # type: ignore[union-attr]


def test_messages_without_a_result_stay_text() -> None:
    assert Results(items=[TaskFailed(task_id="1-0", message="x")]).binary_frame() is None
    assert TaskFailed(task_id="1-0", message="x").binary_frame() is None


GOOD = {"type": "result", "task_id": "1-0", "elapsed_ms": 1.0, "size": 3}


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        pytest.param(b"\x00\x01", ErrorCode.MALFORMED, "binary results frame", id="shorter-than-the-length"),
        pytest.param(struct.pack("<I", 999) + b"{}", ErrorCode.MALFORMED, "header of 999 bytes", id="header-past-end"),
        pytest.param(frame([], b"", head=b"{not json"), ErrorCode.MALFORMED, "JSON header", id="header-not-json"),
        pytest.param(frame([], b"", head=b"\xff\xfe"), ErrorCode.MALFORMED, "JSON header", id="header-not-utf8"),
        pytest.param(
            frame([], b"", head=b'{"type":"results","items":[1e999]}'), ErrorCode.MALFORMED, "finite", id="inf"
        ),
        pytest.param(frame([], b"", head=b"[" * 5000), ErrorCode.MALFORMED, "nested", id="deep-nesting"),
        pytest.param(frame([], b"", head=b'{"type":"hello"}'), ErrorCode.MALFORMED, "header", id="not-results"),
        pytest.param(frame([], b""), ErrorCode.INVALID, "1 to 64 reports, got 0", id="no-items"),
        pytest.param(frame([GOOD] * 65, b"abc" * 65), ErrorCode.INVALID, "got 65 items", id="too-many-items"),
        pytest.param(frame([GOOD], b"ab"), ErrorCode.MALFORMED, "expected 3 bytes of outputs", id="payload-short"),
        pytest.param(frame([GOOD], b"abcd"), ErrorCode.MALFORMED, "expected 3 bytes of outputs", id="payload-long"),
        pytest.param(frame([{**GOOD, "size": -1}], b""), ErrorCode.INVALID, "items[0]", id="negative-size"),
        pytest.param(frame([{**GOOD, "size": 1.5}], b"a"), ErrorCode.INVALID, "'size'", id="float-size"),
        pytest.param(frame([{**GOOD, "size": True}], b"a"), ErrorCode.INVALID, "'size'", id="bool-size"),
        pytest.param(frame([{**GOOD, "size": None}], b""), ErrorCode.INVALID, "'size'", id="no-size"),
        pytest.param(frame([{**GOOD, "size": 10**19}], b""), ErrorCode.MALFORMED, "bytes of outputs", id="huge-size"),
    ],
)
def test_a_frame_that_cannot_be_read_whole_is_refused(data: bytes, code: ErrorCode, words: str) -> None:
    got = parse_frame(None, CAP, data)
    assert isinstance(got, Refusal), got
    assert got.code is code and words in got.message, got.message
    assert not got.close


def test_an_oversized_frame_closes_the_socket() -> None:
    got = parse_binary(frame([{**GOOD, "size": 5000}], b"a" * 5000), 4096)
    assert isinstance(got, Refusal) and got.code is ErrorCode.TOO_LARGE and got.close


def test_a_bad_item_is_refused_alone() -> None:
    items: list[dict[str, object]] = [
        {**GOOD, "elapsed_ms": -1.0},  # refused: its bytes are skipped, the next item keeps its own
        {**GOOD, "task_id": "2-0"},
        {"type": "result", "task_id": "3-0", "elapsed_ms": 1.0, "size": 2, "output_b64": "AAAA"},  # extra field
        {"type": "task_failed", "task_id": "4-0", "message": "x"},
        {"type": "leave"},
    ]
    got = parse_binary(frame(items, b"aaa" + b"bbb" + b"cc"), CAP)
    assert isinstance(got, Reports)
    assert [(r.task_id, b64_bytes(r.output_b64)) for r in got.items if isinstance(r, TaskResult)] == [("2-0", b"bbb")]
    assert [r.task_id for r in got.items if isinstance(r, TaskFailed)] == ["4-0"]
    assert [m.message.split(" ", 2)[1].rstrip(":") for m in got.refused] == ["items[0]", "items[2]", "items[4]"]
    assert all(m.code is ErrorCode.INVALID for m in got.refused)


def test_the_browser_agent_builds_the_same_frames() -> None:
    """static/js/protocol.js `binaryFrame` (run in Node) against the gateway's parser."""
    outputs = [bytes(range(256)) * 300, b"", bytes([7]) * 5]
    frames = [
        {"type": "result", "task_id": "1-0", "output_b64": base64.b64encode(outputs[0]).decode(), "elapsed_ms": 3},
        {
            "type": "results",
            "items": [
                {"type": "result", "task_id": "2-0", "output_b64": "", "elapsed_ms": 0.5},
                {"type": "task_failed", "task_id": "3-0", "message": "RuntimeError: ünïcode"},
                {
                    "type": "result",
                    "task_id": "4-0",
                    "output_b64": base64.b64encode(outputs[2]).decode(),
                    "elapsed_ms": 1,
                },
            ],
        },
        {"type": "results", "items": [{"type": "task_failed", "task_id": "5-0", "message": "x"}]},
        {"type": "heartbeat", "running": 0, "done": 0},
    ]
    script = f"""
      import {{ binaryFrame }} from "./static/js/protocol.js";
      const frames = {json.dumps(frames)};
      const b64 = (b) => (b === null ? null : Buffer.from(b).toString("base64"));
      const out = frames.map((f) => b64(binaryFrame(f)));
      console.log(JSON.stringify(out));
    """
    proc = subprocess.run(
        [node(), "--input-type=module", "-e", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    single, several, failed_only, heartbeat = json.loads(proc.stdout)
    assert failed_only is None and heartbeat is None, "frames without a result go as text"
    one = parse_binary(base64.b64decode(single), CAP)
    assert isinstance(one, Reports) and one.refused == []
    assert [(r.task_id, b64_bytes(r.output_b64), r.elapsed_ms) for r in one.items] == [("1-0", outputs[0], 3.0)]  # type: ignore[union-attr]
    many = parse_binary(base64.b64decode(several), CAP)
    assert isinstance(many, Reports) and many.refused == []
    assert [r.task_id for r in many.items] == ["2-0", "3-0", "4-0"]
    results = [b64_bytes(r.output_b64) for r in many.items if isinstance(r, TaskResult)]
    assert results == [b"", outputs[2]]
    assert [r.message for r in many.items if isinstance(r, TaskFailed)] == ["RuntimeError: ünïcode"]
