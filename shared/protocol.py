"""Every message that crosses HTTP or the WebSocket, as pydantic models.

The browser agent (`static/protocol.js`) and the native worker speak exactly these shapes.
`processdistro schema` (and `make schema`) exports them as JSON Schema to `shared/schema/`,
which the browser code's tests validate against.

WebSocket frames are JSON text, each an object with a `type`. Binary payloads (task input,
task output) travel base64-encoded in `*_b64` fields. Every inbound frame is size-capped
before parsing (`Settings.max_message_bytes`) and validated here; a bad frame earns an
`ErrorMessage` with one of the `ErrorCode`s and nothing else is disturbed.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidatorFunctionWrapHandler, field_validator

from .logs import escape_control

PROTOCOL_VERSION = 2  # 2: tasks of several parts (TaskAssign.more)
MULTIPART_SINCE = 2

NodeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
TaskId = Annotated[str, Field(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$", description="task stream entry id")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
NodeSecret = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{32,128}$")]

# Bounds on every number a node sends (issue 9.2): a node is anyone who scanned the QR code,
# and one absurd figure must not poison an average, the scheduler's tail or the metrics.
MAX_SCORE = 1e12  # benchmark, Mandelbrot iterations per second per core (a fast core: ~1e9)
MAX_ELAPSED_MS = 7 * 86400 * 1000.0  # one part's reported run time: a week
MAX_COUNT = 10**12  # counters a node reports (tasks done)
MAX_PROTOCOL = 1000  # protocol versions a node may claim


class _Msg(BaseModel):
    # allow_inf_nan=False: `Infinity`, `NaN` and `1e999` are refused wherever a float is
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def binary_frame(self) -> bytes | None:
        """This message as a binary frame (`binary_frame`), or None: it goes as JSON text."""
        return None


class Base64Text(str):
    """Base64 text that was checked by decoding it, with the bytes it decodes to (`data`):
    whoever needs them (the gateway, for a result's output) does not decode it again."""

    data: bytes

    def __new__(cls, text: str, data: bytes) -> Base64Text:
        self = super().__new__(cls, text)
        self.data = data
        return self

    def __reduce__(self) -> tuple[type[Base64Text], tuple[str, bytes]]:
        return Base64Text, (str(self), self.data)  # copies and pickles keep the bytes


def _check_b64(value: str) -> str:
    # strict mode: only the alphabet, padding only at the end, no excess data (what the
    # `validate=True` of b64decode checked with a regular expression first, at twice the cost)
    try:
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"expected base64 text, got invalid data ({exc})") from None
    return Base64Text(value, data)


def _check_output_b64(value: object, handler: ValidatorFunctionWrapHandler) -> str:
    # a node's own result (`Base64Text` made from its output bytes) is not decoded again to
    # be checked; anything else (what a gateway parses) is checked in full
    if isinstance(value, Base64Text):
        return value
    return _check_b64(handler(value))


def b64_bytes(text: str) -> bytes:
    """The bytes of checked base64 text (a validated message's field): kept, or decoded."""
    return text.data if isinstance(text, Base64Text) else base64.b64decode(text, validate=True)


def unencoded(data: bytes) -> Base64Text:
    """A result's output that came as bytes (a binary `results` frame), never as base64 text:
    `b64_bytes` gives `data`; the text itself is left empty (nobody reads it)."""
    return Base64Text("", data)


def _check_plain(value: str | None) -> str | None:
    if value is not None and escape_control(value) != value:
        raise ValueError("expected one line of text without control characters")
    return value


# --------------------------------------------------------------------------- HTTP


class NodeReport(_Msg):
    """`POST /node-report`: the device's specs, sent after the user consents and presses Join."""

    join_code: str = Field(min_length=4, max_length=64)
    device_id: NodeId = Field(description="stable per device (kept in localStorage), so a node keeps its identity")
    node_secret: NodeSecret | None = Field(
        default=None,
        description="the secret the controller issued with this device id (NodeAccepted.node_secret); "
        "a known id without it gets a new identity",
    )
    cores: int = Field(ge=1, le=1024)
    memory_gb: float | None = Field(default=None, ge=0, le=65536)
    browser: str | None = Field(default=None, max_length=200)
    os: str | None = Field(default=None, max_length=200)
    benchmark_score: float | None = Field(
        default=None, ge=0, le=MAX_SCORE, description="Mandelbrot iterations per second per core"
    )
    simd: bool = False
    kind: Literal["browser", "native"] = "browser"
    gpu: str | None = Field(
        default=None,
        max_length=200,
        description="the GPU renderer WebGL names (UNMASKED_RENDERER_WEBGL where exposed, else RENDERER); "
        "absent without WebGL and on native workers",
    )

    _gpu = field_validator("gpu")(_check_plain)


class NodeAccepted(_Msg):
    """Reply to a `NodeReport`: who the node is and how to connect."""

    node_id: NodeId
    node_secret: NodeSecret | None = Field(
        default=None,
        description="set when the controller issued a new identity: keep node_id as the device id and "
        "this secret with it, and send both in every later report",
    )
    token: str
    token_expires_at: float
    slots: int = Field(ge=1, description="tasks the node may run at once (one Web Worker each)")
    prefetch: int = Field(ge=0, description="extra tasks it may hold queued beyond its slots")
    heartbeat_interval_s: float
    ws_path: str = "/ws"
    protocol: int = PROTOCOL_VERSION


# ------------------------------------------------------------------ WebSocket: node -> server


class Hello(_Msg):
    """First frame after connecting."""

    type: Literal["hello"] = "hello"
    protocol: int = Field(default=PROTOCOL_VERSION, ge=1, le=MAX_PROTOCOL)
    running: list[TaskId] = Field(
        default_factory=list, max_length=1024, description="tasks still running after a reconnect"
    )


class Ready(_Msg):
    """Pull: the node has room for `free` more tasks."""

    type: Literal["ready"] = "ready"
    free: int = Field(ge=0, le=1024)


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    running: int = Field(ge=0, le=1024)
    done: int = Field(ge=0, le=MAX_COUNT)


class TaskResult(_Msg):
    type: Literal["result"] = "result"
    task_id: TaskId
    output_b64: str
    elapsed_ms: float = Field(ge=0, le=MAX_ELAPSED_MS)

    _b64 = field_validator("output_b64", mode="wrap")(_check_output_b64)

    def binary_frame(self) -> bytes | None:
        return binary_frame([self])


class TaskFailed(_Msg):
    type: Literal["task_failed"] = "task_failed"
    task_id: TaskId
    message: str = Field(max_length=2000)


class Leave(_Msg):
    type: Literal["leave"] = "leave"


MAX_AGENT_LOG = 1000  # characters of an `AgentLog` message


class AgentLog(_Msg):
    """A notable event on the node (an error, a reconnect, a module that failed), for the
    controller's log. The gateway logs it with the node id, its text made safe, at most a
    few per node per minute (`gateway/agent_log.py`); the rest are counted as dropped."""

    type: Literal["log"] = "log"
    level: Literal["info", "warning", "error"] = "warning"
    event: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$", description="what happened, e.g. reconnect, error")
    message: str = Field(default="", max_length=MAX_AGENT_LOG)


MAX_RESULTS_PER_FRAME = 64  # reports in one `results` frame, at most

Report = Annotated[TaskResult | TaskFailed, Field(discriminator="type")]
report_adapter: TypeAdapter[Report] = TypeAdapter(Report)


class Results(_Msg):
    """Several reports (`result` and `task_failed` frames, whole) in one frame, in the order
    the parts finished. Only to a gateway whose `welcome` has `results_per_frame`, and at
    most that many. The gateway takes each item on its own: a bad item is refused with an
    `error` frame naming its place (`items[3]`), the others are kept."""

    type: Literal["results"] = "results"
    items: list[Report] = Field(min_length=1, max_length=MAX_RESULTS_PER_FRAME)

    def binary_frame(self) -> bytes | None:
        return binary_frame(self.items)


class BinaryResult(_Msg):
    """A result in the JSON header of a binary `results` frame: its output is the next `size`
    bytes after the header (see `binary_frame`)."""

    type: Literal["result"] = "result"
    task_id: TaskId
    elapsed_ms: float = Field(ge=0, le=MAX_ELAPSED_MS)
    size: int = Field(ge=0)


BinaryReport = Annotated[BinaryResult | TaskFailed, Field(discriminator="type")]
binary_report_adapter: TypeAdapter[BinaryReport] = TypeAdapter(BinaryReport)
#: a binary frame's first 4 bytes: the length of its JSON header (little-endian)
BINARY_HEAD = struct.Struct("<I")


def binary_frame(reports: Sequence[TaskResult | TaskFailed]) -> bytes | None:
    """The reports of a `result` or `results` frame as one binary frame, or None when none of
    them is a result (they go as JSON text). The frame: the header's length (`BINARY_HEAD`),
    the header (UTF-8 JSON `{"type": "results", "items": [...]}`, a result as `BinaryResult`,
    a `task_failed` whole), then the results' outputs back to back in the items' order. Only
    to a gateway whose `welcome` has `binary_results`; a result's output then travels as it
    is, with no base64 to encode, check and decode, and no JSON string to parse around it."""
    if not any(isinstance(r, TaskResult) for r in reports):
        return None
    head: list[dict[str, object]] = []
    outputs: list[bytes] = []
    for r in reports:
        if isinstance(r, TaskResult):
            data = b64_bytes(r.output_b64)
            head.append({"type": "result", "task_id": r.task_id, "elapsed_ms": r.elapsed_ms, "size": len(data)})
            outputs.append(data)
        else:
            head.append(r.model_dump(mode="json"))
    text = json.dumps({"type": "results", "items": head}, separators=(",", ":")).encode()
    return b"".join([BINARY_HEAD.pack(len(text)), text, *outputs])


NodeMessage = Annotated[
    Hello | Ready | Heartbeat | TaskResult | TaskFailed | Results | Leave | AgentLog, Field(discriminator="type")
]
node_message_adapter: TypeAdapter[NodeMessage] = TypeAdapter(NodeMessage)


# ------------------------------------------------------------------ WebSocket: server -> node


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    node_id: NodeId
    slots: int
    prefetch: int
    heartbeat_interval_s: float
    #: the largest frame this gateway takes: a node reports a result that would not fit as
    #: `task_failed` (`result_too_large`) instead of sending a frame that closes its socket
    max_message_bytes: int | None = Field(default=None, ge=1024)
    #: reports this gateway takes in one `results` frame; absent: send each report alone
    results_per_frame: int | None = Field(default=None, ge=2, le=MAX_RESULTS_PER_FRAME)
    #: this gateway takes results in binary frames (`binary_frame`); absent: JSON text only
    binary_results: bool | None = None


#: bytes a result frame adds around its base64 output (type, task id, elapsed time)
RESULT_FRAME_OVERHEAD = 200
#: characters a `task_failed` message may take in a frame, per character of text (JSON escapes
#: a control character as `\u0000`; a UTF-16 surrogate pair is two characters in JavaScript)
FAILURE_ESCAPE_FACTOR = 6


def report_chars(report: TaskResult | TaskFailed) -> int:
    """An upper bound on the characters a report takes inside a frame."""
    if isinstance(report, TaskResult):
        return len(report.output_b64) + RESULT_FRAME_OVERHEAD
    return FAILURE_ESCAPE_FACTOR * len(report.message) + RESULT_FRAME_OVERHEAD


def frame_chars(reports: list[TaskResult | TaskFailed]) -> int:
    """An upper bound on the characters of a `results` frame of `reports`."""
    return RESULT_FRAME_OVERHEAD + sum(report_chars(r) for r in reports)


def pack_reports(
    reports: list[TaskResult | TaskFailed], per_frame: int, max_chars: int
) -> list[TaskResult | TaskFailed | Results]:
    """`reports` in as few frames as a gateway takes, in order: at most `per_frame` to a
    `results` frame, each frame within `max_chars`; a frame of one report is the report
    itself (`static/js/protocol.js` `packReports` packs alike)."""
    frames: list[list[TaskResult | TaskFailed]] = []
    for report in reports:
        last = frames[-1] if frames else None
        if last and len(last) < per_frame and frame_chars([*last, report]) <= max_chars:
            last.append(report)
        else:
            frames.append([report])
    return [f[0] if len(f) == 1 else Results(items=f) for f in frames]


def result_too_large(output_b64_chars: int, max_message_bytes: int | None) -> str | None:
    """The failure message for a result that would not fit the gateway's frame limit, or None.
    `static/js/node_state.js` says the same words (tests/node_cases.json)."""
    if max_message_bytes is None or output_b64_chars + RESULT_FRAME_OVERHEAD <= max_message_bytes:
        return None
    return (
        f"ResultTooLarge: the result is {output_b64_chars} characters of base64; the controller takes "
        f"frames of at most {max_message_bytes} bytes (PD_MAX_MESSAGE_BYTES)"
    )


MAX_PARTS = 32  # parts in one task, the first included
MAX_DEADLINE_S = 86400.0  # a task's per-part deadline, at most (`TaskAssign.deadline_s`)
MAX_MEMORY_MB = 65536  # a task's memory cap, at most (`TaskAssign.memory_mb`)


class TaskPart(_Msg):
    """A further part of a task (`TaskAssign.more`): same job and module, its own input."""

    task_id: TaskId
    input_b64: str
    blocks: list[Sha256] = Field(default_factory=list, max_length=64)

    _b64 = field_validator("input_b64")(_check_b64)


class TaskAssign(_Msg):
    """Run module `module_sha256` (fetch it from `module_url`, cache by hash) on the input:
    the bytes of `input_b64` followed by the bytes of each block in `blocks`, in order.
    Blocks are shared inputs (a matrix block, a batch of rows) fetched once from
    `/blocks/<job_id>/<sha256>?token=<session token>` and cached by hash.

    A longer task has parts (`more`): the node runs them after the first, one after the
    other in the same slot, and sends each part's `result` as soon as it is done. Those
    results are the task's checkpoints: if the node goes away, only the parts it has not
    reported are handed out again. The whole task counts as one against `ready.free`.

    `deadline_s` and `memory_mb` are the job's limits for each part (all parts share them):
    wall-clock seconds from the part's start on the node, and MiB of the module's linear
    memory. A node applies them where they are lower than its own limits; a part that runs
    past its deadline is stopped and reported as `task_failed` with a message starting
    `DeadlineExceeded:`, one that needs more memory as `MemoryCapReached:` (or the module's
    own out-of-memory failure). Absent: the node's own limits."""

    type: Literal["task"] = "task"
    task_id: TaskId
    job_id: str
    kind: str
    module_sha256: Sha256
    module_url: str
    input_b64: str
    blocks: list[Sha256] = Field(default_factory=list, max_length=64)
    more: list[TaskPart] = Field(default_factory=list, max_length=MAX_PARTS - 1)
    deadline_s: float | None = Field(
        default=None, gt=0, le=MAX_DEADLINE_S, description="wall-clock seconds each part may run"
    )
    memory_mb: int | None = Field(
        default=None, ge=1, le=MAX_MEMORY_MB, description="MiB of linear memory each part may use"
    )


class CancelTasks(_Msg):
    type: Literal["cancel"] = "cancel"
    task_ids: list[TaskId]


class TokenRefresh(_Msg):
    """A fresh session token; the node uses it for its next reconnect."""

    type: Literal["token"] = "token"
    token: str
    token_expires_at: float


class ErrorCode(StrEnum):
    MALFORMED = "malformed"  # not JSON, or not an object with a known `type`
    INVALID = "invalid"  # known type, fields wrong
    TOO_LARGE = "too_large"
    UNKNOWN_TASK = "unknown_task"
    RATE_LIMITED = "rate_limited"


class ErrorMessage(_Msg):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


ServerMessage = Annotated[Welcome | TaskAssign | CancelTasks | TokenRefresh | ErrorMessage, Field(discriminator="type")]
server_message_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


class CloseCode:
    """WebSocket close codes the gateway uses (4000-4999 are application codes)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008  # foreign Origin
    TOO_BIG = 1009
    BAD_TOKEN = 4001  # missing, forged or expired session token
    REPLACED = 4002  # the same node (id and secret) connected again: the node reconnects after a backoff
    SILENT = 4003  # no heartbeat within the deadline
    BANNED = 4004
    RATE_LIMITED = 4005  # too many connects from this address: retry later


def export_schemas() -> dict[str, dict[str, object]]:
    """JSON Schemas of every message, keyed by file name."""
    return {
        "node_report.json": NodeReport.model_json_schema(),
        "node_accepted.json": NodeAccepted.model_json_schema(),
        "node_message.json": node_message_adapter.json_schema(),
        "server_message.json": server_message_adapter.json_schema(),
    }
