"""What the CLI (`processdistro submit/cancel/jobs/nodes/result`, `up`) reads and writes in
Redis. The CLI holds a client from `connect` and passes it here; it never calls Redis itself.

Writes are commands to the scheduler (`keys.COMMANDS`) and a job's shared input blocks;
everything else is a read.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from .. import keys
from ..exceptions import JobNotFound
from ..jobs import JobRecord
from ..messages import Cancel, MessageError, Submit, parse_command
from .commands import send_command
from .connection import Client, sync_client
from .jobs import drop_blocks, load_job, store_blocks
from .modules import acquire as acquire_module
from .streams import live_node_ids

#: The sync client type, for callers that hold one but must not import redis.
Redis = Client  # the client type, for callers to name

__all__ = [
    "BlockWriter",
    "Redis",
    "cancel",
    "done_indexes",
    "job_fields",
    "connect",
    "join_code",
    "list_jobs",
    "list_nodes",
    "load_job",
    "send_command",
    "submit",
    "submitted",
]


def connect(url: str | None, *, retry: bool = True) -> redis.Redis:
    """A client for `url`; with `retry`, one that rides out a Redis restart (capped backoff).
    Without, one that fails at once, for a caller polling in its own loop (`up`)."""
    return redis.Redis.from_url(url) if url and not retry else sync_client(url)


def submit(client: redis.Redis, command: Submit, blocks: dict[str, bytes], modules: Iterable[bytes] = ()) -> None:
    """Store the job's uploaded modules (`store.modules`, once by content) and shared input
    blocks, then send its submit command: its tasks may refer to them as soon as the
    scheduler reads the command."""
    for data in modules:
        acquire_module(client, command.job_id, data)
    store_blocks(client, command.job_id, blocks)
    send_command(client, command)


def cancel(client: redis.Redis, job_id: str) -> None:
    """Ask the scheduler to cancel a job; JobNotFound if there is no such job."""
    if load_job(client, job_id) is None:
        raise JobNotFound(job_id)
    send_command(client, Cancel(job_id=job_id))


def list_jobs(client: redis.Redis, limit: int = 50) -> list[JobRecord]:
    """The `limit` newest jobs, newest first."""
    ids = client.zrevrange(keys.JOBS, 0, limit - 1)
    jobs = [load_job(client, i.decode()) for i in ids]
    return [j for j in jobs if j is not None]


#: How many of the newest command entries `submitted` looks through.
SUBMITTED_SCAN = 1000


def submitted(client: redis.Redis, limit: int = SUBMITTED_SCAN) -> list[Submit]:
    """Submit commands the scheduler has not applied yet, newest first: still in the command
    stream (it acks and deletes a command once applied) and with no job record. Read only;
    a caller that also lists jobs calls this first and `list_jobs` after, so a job the
    scheduler applies in between is listed (twice at most, never not at all)."""
    found = []
    for _eid, fields in client.xrevrange(keys.COMMANDS, count=limit):
        try:
            command = parse_command(fields.get(b"command", b""))
        except MessageError:
            continue
        if isinstance(command, Submit):
            found.append(command)
    if not found:
        return []
    pipe = client.pipeline(transaction=False)
    for command in found:
        pipe.exists(keys.job(command.job_id))
    return [c for c, exists in zip(found, pipe.execute(), strict=True) if not exists]


def list_nodes(client: redis.Redis, node_timeout_s: float) -> list[dict[str, str]]:
    """Every node's hash as text, with `live` ("yes"/"no"): live ones first, then by id."""
    live = live_node_ids(client, node_timeout_s)
    nodes = []
    for key in client.scan_iter(match=keys.node("*"), count=500):
        h = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        if not h.get("id"):
            continue
        h["live"] = "yes" if h["id"] in live else "no"
        nodes.append(h)
    return sorted(nodes, key=lambda n: (n["live"] != "yes", n["id"]))


def join_code(client: redis.Redis) -> str | None:
    """The gateways' join code, once the first gateway has written it."""
    code = client.get(keys.JOIN_CODE)
    return code.decode() if code else None


# ---------------------------------------------------------------------------- the Python API

BLOCK_CHUNK_BYTES = 4 * 1024 * 1024  # what a BlockWriter holds before it writes


class BlockWriter:
    """A job's shared input blocks written as they are made, in pipelines of about
    `chunk_bytes`, so a submit from a generator holds one chunk, never all its inputs. Call
    it with (sha256, bytes); `flush` before the submit command is sent; `discard` if the
    submit is given up (it deletes what was written)."""

    def __init__(self, client: redis.Redis, job_id: str, *, chunk_bytes: int = BLOCK_CHUNK_BYTES) -> None:
        self.client = client
        self.job_id = job_id
        self.chunk_bytes = chunk_bytes
        self.written = 0  #: blocks written so far
        self._pending: dict[str, bytes] = {}
        self._pending_bytes = 0

    def __call__(self, sha: str, data: bytes) -> None:
        if sha in self._pending:
            return
        self._pending[sha] = data
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        store_blocks(self.client, self.job_id, self._pending)
        self.written += len(self._pending)
        self._pending = {}
        self._pending_bytes = 0

    def discard(self) -> None:
        self._pending = {}
        self._pending_bytes = 0
        drop_blocks(self.client, self.job_id)


def job_fields(client: redis.Redis, job_id: str, *names: str) -> dict[str, str] | None:
    """Some fields of a job's record as text (a missing one as ""), None if there is no such
    job: what polling needs, without the params a large job carries."""
    pipe = client.pipeline(transaction=True)  # one moment: a record created in between is whole
    pipe.exists(keys.job(job_id))
    pipe.hmget(keys.job(job_id), list(names))
    exists, values = pipe.execute()
    if not exists:
        return None
    return {n: (v.decode() if v is not None else "") for n, v in zip(names, values, strict=True)}


def done_indexes(client: redis.Redis, job_id: str) -> set[int]:
    """The subtasks of a job merged and committed so far (their outputs are written)."""
    return {int(i) for i in client.smembers(keys.job_done(job_id))}
