"""The gateway's shared object: its live sessions, token signer, modules, metrics and store,
and the control channel that tells sessions what the rest of the controller decided.

Control messages (`shared.messages.Control` on `keys.CONTROL`): `cancel_job` (stop the job's
tasks on our nodes), `ban` (close the node's socket), `steal` (a connection gives back its
unstarted tasks), `drop_copies` (the other copies of a task whose first result is in).

Invariant: one message is one unit of failure. A message that does not parse, or whose
handling fails, is logged and the next one is handled; only a lost connection subscribes
again (messages published meanwhile are gone: pub/sub keeps nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from starlette.websockets import WebSocket

from ..shared.messages import Ban, CancelJob, DropCopies, MessageError, Steal, parse_control
from ..shared.modules import ModuleRegistry
from ..shared.protocol import CloseCode
from ..shared.queue import node_of_consumer
from ..shared.settings import Settings
from ..shared.store.gateway import ChannelLost, GatewayStore
from .auth import TokenSigner, new_join_code, new_secret
from .metrics import GatewayMetrics
from .session import NodeSession

log = logging.getLogger(__name__)

RESUBSCRIBE_S = 1.0  # pause before subscribing again after the control channel was lost


class Hub:
    """What one gateway process shares between its routes and its sessions."""

    def __init__(self, *, settings: Settings, store: GatewayStore, static_dir: Path) -> None:
        self.settings = settings
        self.store = store
        self.static_dir = static_dir
        self.modules = ModuleRegistry(static_dir=static_dir)
        self.metrics = GatewayMetrics()
        #: node id -> its live session (at most one: a newer connection replaces the older)
        self.sessions: dict[str, NodeSession] = {}
        self.signer: TokenSigner  # set by `start`: the secret lives in Redis
        self.join_code = ""

    async def start(self) -> None:
        await self.store.start()
        secret = await self.store.ensure_secret(new_secret())
        self.signer = TokenSigner(secret=secret, ttl_s=self.settings.token_ttl_s)
        self.join_code = await self.store.ensure_join_code(new_join_code())

    async def stop(self) -> None:
        """Close every session (their tasks are requeued) and the store."""
        for s in list(self.sessions.values()):
            await s.close(CloseCode.GOING_AWAY, "gateway shutting down")
        await self.store.aclose()

    # ------------------------------------------------------------------ sessions

    def new_session(self, ws: WebSocket, node_id: str, slots: int) -> NodeSession:
        return NodeSession(
            ws,
            node_id,
            slots,
            store=self.store,
            settings=self.settings,
            modules=self.modules,
            metrics=self.metrics,
            signer=self.signer,
        )

    async def serve(self, session: NodeSession) -> None:
        """Run a session as its node's only one (an older connection is closed)."""
        previous = self.sessions.get(session.node_id)
        if previous is not None:
            await previous.close(CloseCode.REPLACED, "replaced by a newer connection")
        self.sessions[session.node_id] = session
        try:
            await session.run()
        finally:
            if self.sessions.get(session.node_id) is session:
                del self.sessions[session.node_id]

    # ------------------------------------------------------------------ control

    async def listen_control(self) -> None:
        """Handle control messages until cancelled, subscribing again if the channel is lost."""
        while True:
            messages = self.store.control_messages()
            try:
                async with contextlib.aclosing(messages):
                    async for data in messages:
                        await self.on_control(data)
            except ChannelLost as exc:
                log.warning("control channel lost (%s); resubscribing in %.0fs", exc, RESUBSCRIBE_S)
                await asyncio.sleep(RESUBSCRIBE_S)

    async def on_control(self, data: bytes) -> None:
        """Handle one control message; a bad one, or a failing handler, is logged and dropped."""
        try:
            match parse_control(data):
                case CancelJob(job_id=job_id):
                    self.store.forget_job(job_id)
                    for s in list(self.sessions.values()):
                        await s.cancel_job(job_id)
                case Ban(node_id=node_id):
                    if (session := self.sessions.get(node_id)) is not None:
                        await session.close(CloseCode.BANNED, "banned: too many wrong results")
                case Steal(consumer=consumer, count=count):
                    session = self.sessions.get(node_of_consumer(consumer))
                    if session is not None and session.consumer == consumer:
                        await session.give_back(count)
                case DropCopies(job_id=job_id, index=index, winner=winner):
                    for s in list(self.sessions.values()):
                        await s.drop_copies(job_id, index, winner)
        except MessageError as exc:
            log.warning("control: ignored %r: %s", data[:200], exc)
        except Exception:
            log.exception("control: handling %r failed", data[:200])
