"""The command stream (CLI, gateways, aggregators -> scheduler) and the control channel
(scheduler, aggregators, gateways -> every gateway), as typed `shared.messages` values.

`send_command` and `publish_control` are how any process writes them; `CommandStream` is
the scheduler's side: commands are read through the consumer group `keys.SCHEDULER_GROUP`,
so a restarted scheduler resumes where the last one stopped, and acked (and deleted) only
once applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from .. import keys
from ..messages import Ban, Cancel, CancelJob, DropCopies, Fail, MessageError, Steal, Submit, parse_command

CLAIM_COUNT = 32


def send_command(client: redis.Redis, command: Submit | Cancel | Fail) -> None:
    """Queue a command for the scheduler. Unset optional fields are left out (`replicate`
    None: the scheduler's default)."""
    client.xadd(keys.COMMANDS, {"command": command.model_dump_json(exclude_none=True)})


def publish_control(client: redis.Redis, message: CancelJob | Ban | Steal | DropCopies) -> None:
    """Tell every gateway (pub/sub: a gateway that is not listening misses it)."""
    client.publish(keys.CONTROL, message.encode())


@dataclass(frozen=True)
class Received:
    """One entry of the command stream: its command, or why it is not one."""

    entry_id: str
    command: Submit | Cancel | Fail | None
    problem: str = ""


def _received(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Received:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    raw = fields.get(b"command")
    if raw is None:
        return Received(eid, None, "expected a 'command' field, got none")
    try:
        return Received(eid, parse_command(raw))
    except MessageError as exc:
        return Received(eid, None, str(exc))


class CommandStream:
    """The scheduler's reads of `keys.COMMANDS` as consumer `consumer`."""

    def __init__(self, client: redis.Redis, consumer: str) -> None:
        self.r = client
        self.consumer = consumer

    def read(self, *, block_ms: int | None, count: int = 32) -> list[Received]:
        """New commands; wait up to `block_ms` for one (None: do not wait; note that Redis
        reads BLOCK 0 as "wait forever")."""
        resp = self.r.xreadgroup(keys.SCHEDULER_GROUP, self.consumer, {keys.COMMANDS: ">"}, count=count, block=block_ms)
        return [_received(eid, f) for _stream, entries in resp or [] for eid, f in entries]

    def claim_stale(self, idle_ms: int) -> list[Received]:
        """Commands another (killed) scheduler read but did not apply for `idle_ms`."""
        reply = self.r.xautoclaim(keys.COMMANDS, keys.SCHEDULER_GROUP, self.consumer, idle_ms, "0-0", count=CLAIM_COUNT)
        return [_received(eid, f) for eid, f in reply[1] if f]

    def ack(self, entry_id: str) -> None:
        """Done with a command (applied, or refused): it leaves the stream."""
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(keys.COMMANDS, keys.SCHEDULER_GROUP, entry_id)
        pipe.xdel(keys.COMMANDS, entry_id)
        pipe.execute()
