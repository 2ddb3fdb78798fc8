"""Messages between the controller's own processes, as typed as the node protocol.

- `Command`: what goes to the scheduler over `keys.COMMANDS` (from the CLI, a gateway that
  must fail a job, an aggregator that saw too many distinct replica results).
- `Control`: what every gateway hears on the `keys.CONTROL` pub/sub channel.

Both are pydantic unions discriminated by `type`; `parse_command`/`parse_control` raise
`MessageError` with a readable reason, so a receiver handles one bad message and carries on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .exceptions import ProcessDistroError
from .validation import describe


class MessageError(ProcessDistroError):
    """A command or control message that is not one we know."""


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def encode(self) -> str:
        return self.model_dump_json()


# ---------------------------------------------------------------- commands (scheduler)


class Submit(_Msg):
    type: Literal["submit"] = "submit"
    job_id: str
    kind: str
    params: dict[str, Any]
    created: float
    priority: int = 0
    replicate: float | None = None  # None: the scheduler's default share


class Cancel(_Msg):
    type: Literal["cancel"] = "cancel"
    job_id: str
    reason: str = "cancelled by user"


class Fail(_Msg):
    type: Literal["fail"] = "fail"
    job_id: str
    reason: str


Command = Annotated[Submit | Cancel | Fail, Field(discriminator="type")]
_command_adapter: TypeAdapter[Submit | Cancel | Fail] = TypeAdapter(Command)


# ---------------------------------------------------------------- control (gateways)


class CancelJob(_Msg):
    """The job is over (cancelled, failed, or it knows its answer): stop its tasks."""

    type: Literal["cancel_job"] = "cancel_job"
    job_id: str


class Ban(_Msg):
    type: Literal["ban"] = "ban"
    node_id: str
    reason: str = Field(default="too many wrong results", max_length=200)  # for the node's close frame


class Steal(_Msg):
    """Give back up to `count` unstarted tasks of this connection (consumer name)."""

    type: Literal["steal"] = "steal"
    consumer: str
    count: int = Field(ge=0)


class DropCopies(_Msg):
    """The first result for (job, index) is in (task `winner`): cancel the other copies."""

    type: Literal["drop_copies"] = "drop_copies"
    job_id: str
    index: int = Field(ge=0)
    winner: str


Control = Annotated[CancelJob | Ban | Steal | DropCopies, Field(discriminator="type")]
_control_adapter: TypeAdapter[CancelJob | Ban | Steal | DropCopies] = TypeAdapter(Control)


def parse_command(data: bytes | str) -> Submit | Cancel | Fail:
    try:
        return _command_adapter.validate_json(data)
    except ValidationError as exc:
        raise MessageError(f"invalid command: {describe(exc)}") from None


def parse_control(data: bytes | str) -> CancelJob | Ban | Steal | DropCopies:
    try:
        return _control_adapter.validate_json(data)
    except ValidationError as exc:
        raise MessageError(f"invalid control message: {describe(exc)}") from None
