"""The task and result streams: the few Redis operations that must be atomic.

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

import redis

from . import keys

# Requeue entries: ACK wins once, so two processes racing to requeue the same entry
# (a gateway on socket close, the scheduler's reaper) add only one copy.
# ARGV: group, bump ("1": the copy counts one more attempt; "0": a task given back unstarted), ids...
REQUEUE_LUA = """
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    local e = redis.call('XRANGE', KEYS[1], id, id)
    if #e > 0 then
      local f = e[1][2]
      for j = 1, #f, 2 do
        if f[j] == 'attempt' then f[j + 1] = tostring(tonumber(f[j + 1]) + tonumber(ARGV[2])) end
      end
      redis.call('XADD', KEYS[1], '*', unpack(f))
      n = n + 1
    end
    redis.call('XDEL', KEYS[1], id)
  end
end
return n
"""

# Hand a result over: add it to the results stream and drop the task entry, in one step.
# ARGV: group, task entry id, node id to add to set KEYS[3] ('' for none), that set's TTL
# in seconds, the result's fields. The set (`keys.job_returned`) names the nodes whose
# result for a replicated subtask is on its way: never marked unless the result is in.
HANDOVER_LUA = """
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('SADD', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return 1
"""

# Record a merged result: first valid result per index wins; the job moves to
# `finalizing` exactly once, when the last index is merged.
COMMIT_LUA = """
local added = redis.call('SADD', KEYS[2], ARGV[3])
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
if added == 0 then
  redis.call('HINCRBY', KEYS[4], 'tasks_duplicate', 1)
  return 'duplicate'
end
redis.call('HINCRBY', KEYS[4], 'tasks_completed', 1)
local done = redis.call('HINCRBY', KEYS[1], 'done', 1)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if total and done >= total and redis.call('HGET', KEYS[1], 'state') == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'finalizing')
  return 'finalize'
end
return 'merged'
"""


MAX_TASK_ATTEMPTS = 5  # a subtask that fails this often fails its job


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
        )

    def retry(self) -> TaskFields:
        """A fresh copy to queue again after a failed or rejected attempt."""
        return dataclasses.replace(self, attempt=self.attempt + 1, backup_of="")

    def full_input(self, client: Any) -> bytes:
        """The module's input: inline bytes followed by the blocks (read from Redis)."""
        if not self.blocks:
            return self.input
        parts = client.mget([keys.block(self.job, b) for b in self.blocks])
        if any(p is None for p in parts):
            raise KeyError(f"a block of job {self.job} task {self.index} is gone")
        return self.input + b"".join(parts)


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


def live_node_ids(r: redis.Redis, node_timeout_s: float) -> set[str]:
    """Nodes with a connection that has sent a frame within `node_timeout_s`."""
    return node_ids(r.zrangebyscore(keys.NODES, live_since(node_timeout_s), "+inf"))


# Every consumer group, with the stream it reads.
GROUPS = (
    (keys.COMMANDS, keys.SCHEDULER_GROUP),
    (keys.TASKS, keys.NODES_GROUP),
    (keys.RESULTS, keys.AGGREGATORS_GROUP),
)


def _exists_already(exc: Exception) -> bool:
    return "BUSYGROUP" in str(exc)


def ensure_groups(client: Any) -> None:
    """Create the consumer groups (idempotent), with a sync client."""
    import redis

    for stream, group in GROUPS:
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not _exists_already(exc):
                raise


async def ensure_groups_async(client: Any) -> None:
    """The same with an asyncio client (the gateway)."""
    import redis

    for stream, group in GROUPS:
        try:
            await client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not _exists_already(exc):
                raise
