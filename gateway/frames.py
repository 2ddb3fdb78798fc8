"""WebSocket frames: one inbound frame -> a typed node message, or why it is refused
(refusals say "expected X, got Y", so a node's author can see what was wrong); the task
frame a node is sent.

A `results` frame is taken item by item (`Reports`): a bad item is refused on its own, and
the others are kept. Results also come in binary frames (`parse_binary`, to a node whose
welcome said `binary_results`): a JSON header, then the outputs as bytes.

A frame is parsed with `validation.strict_loads`: no `Infinity`/`NaN`/`1e999` (Python's
`json` takes them), and nesting depth is checked on the raw text before parsing, so a frame
of 100,000 `[` is refused like any other malformed frame instead of raising RecursionError.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from pydantic import ValidationError

from ..shared.modules import Module
from ..shared.protocol import (
    BINARY_HEAD,
    MAX_RESULTS_PER_FRAME,
    AgentLog,
    BinaryResult,
    ErrorCode,
    Heartbeat,
    Hello,
    Leave,
    Ready,
    Results,
    TaskAssign,
    TaskFailed,
    TaskPart,
    TaskResult,
    Welcome,
    binary_report_adapter,
    node_message_adapter,
    report_adapter,
    unencoded,
)
from ..shared.queue import TaskFields
from ..shared.settings import Settings
from ..shared.validation import UnsafeJSON, describe, strict_loads

NodeFrame = Hello | Ready | Heartbeat | TaskResult | TaskFailed | Leave | AgentLog


@dataclass(frozen=True)
class Refusal:
    code: ErrorCode
    message: str
    close: bool = False  # the frame is over the size cap: the socket is closed too


@dataclass(frozen=True)
class Reports:
    """A `results` frame: its valid items in order, and a refusal for each bad one."""

    items: list[TaskResult | TaskFailed]
    refused: list[Refusal]


def parse_frame(text: str | None, cap: int, data: bytes | None = None) -> NodeFrame | Reports | Refusal:
    """Validate one frame against the node protocol: a text frame (`text`), or a binary one
    (`data`: a binary `results` frame, `parse_binary`)."""
    if text is None:
        if data is not None:
            return parse_binary(data, cap)
        return Refusal(ErrorCode.MALFORMED, "expected a JSON text frame, got a binary frame")
    if len(text) > cap:
        return Refusal(ErrorCode.TOO_LARGE, f"frame of {len(text)} bytes exceeds the {cap}-byte cap", close=True)
    try:
        raw = strict_loads(text)
    except UnsafeJSON as exc:
        return Refusal(ErrorCode.MALFORMED, str(exc))  # "expected finite numbers, got Infinity", ...
    except (ValueError, RecursionError) as exc:  # RecursionError: belt and braces, depth is checked first
        return Refusal(ErrorCode.MALFORMED, f"expected JSON, got a parse error: {exc}")
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        return Refusal(ErrorCode.MALFORMED, "expected an object with a string 'type'")
    if raw["type"] == "results":
        return parse_results(raw)
    try:
        message = node_message_adapter.validate_python(raw)
    except ValidationError as exc:
        return Refusal(ErrorCode.INVALID, f"invalid {raw['type']!r} message: {describe(exc, root='message')}")
    return Reports(list(message.items), []) if isinstance(message, Results) else message


def parse_results(raw: dict[str, object], most: int = MAX_RESULTS_PER_FRAME) -> Reports | Refusal:
    """The items of a `results` frame, each validated on its own (`protocol.Results`)."""
    items = raw.get("items")
    if set(raw) != {"type", "items"} or not isinstance(items, list) or not 1 <= len(items) <= most:
        got = f"{len(items)} items" if isinstance(items, list) else f"fields {sorted(raw)}"
        return Refusal(
            ErrorCode.INVALID, f"invalid 'results' message: expected 'items', 1 to {most} reports, got {got}"
        )
    good: list[TaskResult | TaskFailed] = []
    refused: list[Refusal] = []
    for k, item in enumerate(items):
        try:
            good.append(report_adapter.validate_python(item))
        except ValidationError as exc:
            task = item.get("task_id") if isinstance(item, dict) else None
            named = f" (task {str(task)[:40]!r})" if task is not None else ""
            refused.append(Refusal(ErrorCode.INVALID, f"invalid items[{k}]{named}: {describe(exc, root='item')}"))
    return Reports(good, refused)


def parse_binary(data: bytes, cap: int, most: int = MAX_RESULTS_PER_FRAME) -> Reports | Refusal:
    """The reports of a binary `results` frame (`protocol.binary_frame`). The header is checked
    as strictly as a text frame; the outputs must fill the rest of the frame exactly (the
    results' `size`s add up to it), else the whole frame is refused: nothing in it could be
    placed. Then each item is validated on its own, as in a text `results` frame."""
    if len(data) > cap:
        return Refusal(ErrorCode.TOO_LARGE, f"frame of {len(data)} bytes exceeds the {cap}-byte cap", close=True)
    if len(data) < BINARY_HEAD.size:
        return Refusal(ErrorCode.MALFORMED, f"expected a binary results frame, got {len(data)} bytes")
    (head_len,) = BINARY_HEAD.unpack_from(data)
    start = BINARY_HEAD.size + head_len
    if start > len(data):
        return Refusal(
            ErrorCode.MALFORMED, f"expected a header of {head_len} bytes, got {len(data) - BINARY_HEAD.size}"
        )
    try:
        raw = strict_loads(data[BINARY_HEAD.size : start].decode("utf-8"))
    except UnsafeJSON as exc:
        return Refusal(ErrorCode.MALFORMED, str(exc))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return Refusal(ErrorCode.MALFORMED, f"expected a JSON header, got a parse error: {exc}")
    items = raw.get("items") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or raw.get("type") != "results" or set(raw) != {"type", "items"}:
        return Refusal(ErrorCode.MALFORMED, "expected a header {'type': 'results', 'items': [...]}")
    if not isinstance(items, list) or not 1 <= len(items) <= most:
        got = f"{len(items)} items" if isinstance(items, list) else type(items).__name__
        return Refusal(ErrorCode.INVALID, f"invalid binary 'results' header: expected 1 to {most} reports, got {got}")
    sizes: list[int | None] = []
    for k, item in enumerate(items):
        size = item.get("size") if isinstance(item, dict) and item.get("type") == "result" else None
        if isinstance(item, dict) and item.get("type") == "result" and (type(size) is not int or size < 0):
            return Refusal(ErrorCode.INVALID, f"invalid items[{k}]: expected a 'size' of 0 or more bytes")
        sizes.append(size)
    wanted = sum(n for n in sizes if n is not None)
    if wanted != len(data) - start:
        return Refusal(
            ErrorCode.MALFORMED, f"expected {wanted} bytes of outputs after the header, got {len(data) - start}"
        )
    good: list[TaskResult | TaskFailed] = []
    refused: list[Refusal] = []
    at = start
    for k, (item, size) in enumerate(zip(items, sizes, strict=True)):
        output = b""
        if size is not None:
            output, at = data[at : at + size], at + size
        try:
            report = binary_report_adapter.validate_python(item)
        except ValidationError as exc:
            task = item.get("task_id") if isinstance(item, dict) else None
            named = f" (task {str(task)[:40]!r})" if task is not None else ""
            refused.append(Refusal(ErrorCode.INVALID, f"invalid items[{k}]{named}: {describe(exc, root='item')}"))
            continue
        if isinstance(report, BinaryResult):
            good.append(
                TaskResult.model_construct(
                    task_id=report.task_id, output_b64=unencoded(output), elapsed_ms=report.elapsed_ms
                )
            )
        else:
            good.append(report)
    return Reports(good, refused)


def welcome(node_id: str, slots: int, settings: Settings) -> Welcome:
    """The first frame on a socket: the node's id and capacity, and the largest frame this
    gateway takes (a result over it is reported as `task_failed` by the node)."""
    return Welcome(
        node_id=node_id,
        slots=slots,
        prefetch=settings.prefetch,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        max_message_bytes=settings.max_message_bytes,
        results_per_frame=settings.results_per_frame if settings.results_per_frame > 1 else None,
        binary_results=True,
    )


def task_frame(parts: list[tuple[str, TaskFields]], module: Module) -> TaskAssign:
    """One task of one or more parts (task entry id, fields), run with `module`. Its limits
    are the first part's: every part of a task belongs to one job."""
    (first_id, first), rest = parts[0], parts[1:]
    return TaskAssign(
        task_id=first_id,
        job_id=first.job,
        kind=first.kind,
        module_sha256=module.sha256,
        module_url=module.url,
        input_b64=base64.b64encode(first.input).decode(),
        blocks=list(first.blocks),
        more=[
            TaskPart(task_id=tid, input_b64=base64.b64encode(f.input).decode(), blocks=list(f.blocks))
            for tid, f in rest
        ],
        deadline_s=first.deadline_s,
        memory_mb=first.memory_mb,
    )
