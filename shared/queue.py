"""Task entries: what one subtask copy carries through the task stream, and consumer names.

A task is one entry of `keys.TASKS` with the fields in `TaskFields`. Delivering it to a node
(XREADGROUP by that node's connection) makes it *pending* for that consumer, so the pending
entries list is the authoritative "who holds what". A task leaves the stream in exactly one
of three ways, each atomic: its result is handed to the results stream (gateway), it is
requeued as a fresh entry (node gone, failed, result rejected), or its job is over.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TaskFields:
    job: str
    index: int
    kind: str
    module: str  # sha256 of the WASM module
    input: bytes
    attempt: int = 0
    backup_of: str = ""  # a backup copy of a straggler held by this node: never give it back to that node
    blocks: tuple[str, ...] = ()  # sha256 of shared input blocks appended to `input`, in order
    replicated: bool = False  # computed on distinct nodes until two results agree (aggregator votes)
    # the job's per-subtask limits (`TaskPlugin.limits`), sent to the node with the task; None:
    # the node's own
    deadline_s: float | None = None
    memory_mb: int | None = None

    def to_redis(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "job": self.job,
            "index": self.index,
            "kind": self.kind,
            "module": self.module,
            "input": self.input,
            "attempt": self.attempt,
        }
        if self.backup_of:
            fields["backup_of"] = self.backup_of
        if self.blocks:
            fields["blocks"] = ",".join(self.blocks)
        if self.replicated:
            fields["replicated"] = 1
        if self.deadline_s is not None:
            fields["deadline_s"] = repr(float(self.deadline_s))
        if self.memory_mb is not None:
            fields["memory_mb"] = int(self.memory_mb)
        return fields

    @classmethod
    def from_redis(cls, fields: dict[bytes, bytes]) -> TaskFields:
        return cls(
            job=fields[b"job"].decode(),
            index=int(fields[b"index"]),
            kind=fields[b"kind"].decode(),
            module=fields[b"module"].decode(),
            input=fields[b"input"],
            attempt=int(fields.get(b"attempt", b"0")),
            backup_of=fields.get(b"backup_of", b"").decode(),
            blocks=tuple(b for b in fields.get(b"blocks", b"").decode().split(",") if b),
            replicated=fields.get(b"replicated") == b"1",
            deadline_s=float(fields[b"deadline_s"]) if b"deadline_s" in fields else None,
            memory_mb=int(fields[b"memory_mb"]) if b"memory_mb" in fields else None,
        )

    def retry(self) -> TaskFields:
        """A fresh copy to queue again after a failed or rejected attempt."""
        return dataclasses.replace(self, attempt=self.attempt + 1, backup_of="")


def consumer_name(node_id: str, connection: str) -> str:
    """One stream consumer per WebSocket connection, so an old connection's cleanup never
    touches what a newer connection of the same node holds."""
    return f"{node_id}~{connection}"


def node_of_consumer(consumer: str) -> str:
    return consumer.split("~", 1)[0]


def live_since(node_timeout_s: float) -> float:
    """The lowest `keys.NODES` score (last heartbeat) of a live connection."""
    return time.time() - node_timeout_s


def node_ids(connections: Iterable[bytes | str]) -> set[str]:
    """The node ids behind `keys.NODES` members (connection consumer names)."""
    return {node_of_consumer(c.decode() if isinstance(c, bytes) else c) for c in connections}
