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
import hmac
import logging
import time
from pathlib import Path

from starlette.websockets import WebSocket

from ..shared.capacity import plan_slots
from ..shared.core import dispatch
from ..shared.logs import safe_text
from ..shared.messages import Ban, CancelJob, DropCopies, MessageError, Steal, parse_control
from ..shared.modules import ModuleRegistry
from ..shared.protocol import CloseCode, NodeAccepted, NodeReport
from ..shared.queue import node_of_consumer
from ..shared.settings import Settings
from ..shared.store.gateway import ChannelLost, GatewayStore
from .auth import Admission, TokenSigner, new_join_code, new_secret, resolve_identity, secret_digest
from .metrics import GatewayMetrics
from .session import NodeSession

log = logging.getLogger(__name__)

RESUBSCRIBE_S = 1.0  # pause before subscribing again after the control channel was lost
SECRETS_EVERY_S = 2.0  # how often the token secrets are read again (`rotate-code --token-secret`)


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
        self.join_code = ""  # as at start; a report reads the current one (`rotate-code`)
        self._secrets: asyncio.Task[None]

    async def start(self) -> None:
        await self.store.start()
        secret = await self.store.ensure_secret(new_secret())
        _current, previous = await self.store.token_secrets()
        self.signer = TokenSigner(secret=secret, ttl_s=self.settings.token_ttl_s, previous=previous)
        self.join_code = await self.store.ensure_join_code(new_join_code())
        self._secrets = asyncio.create_task(self._follow_secrets(), name="token-secrets")

    async def _follow_secrets(self) -> None:
        """Keep the signer on Redis's secrets: a rotation reaches every gateway within seconds."""
        while True:
            await asyncio.sleep(SECRETS_EVERY_S)
            try:
                current, previous = await self.store.token_secrets()
            except Exception as exc:  # Redis away: keep the secrets we have
                log.warning("token secrets: read failed (%s); keeping the current ones", exc)
                continue
            if current:
                self.signer.update(current, previous)

    def voter(self, node_id: str, address: str) -> str:
        """Who votes for this node on replicated subtasks (`core.dispatch.voter_key`)."""
        s = self.settings
        return dispatch.voter_key(node_id, address, by_address=s.voter_by_address, trusted=s.trusted_addresses)

    async def ban_address(self, node_id: str) -> None:
        """A banned node's address refuses new joins for `ban_address_s` (not a trusted one)."""
        s = self.settings
        address = (await self.store.node(node_id)).get(b"address", b"").decode()
        if dispatch.address_bannable(address, ban_address_s=s.ban_address_s, trusted=s.trusted_addresses):
            await self.store.ban_address(address, s.ban_address_s)
            log.warning("node %s: banned; joins from %s refused for %.0fs", node_id, address, s.ban_address_s)

    async def admit(self, report: NodeReport, address: str) -> tuple[int, dict[str, object]]:
        """`POST /node-report` after parsing: (HTTP status, JSON body). Checks the join code
        (read afresh: `rotate-code`; a joined node's secret admits it without), the address
        ban, the identity (`auth.resolve_identity`: a known id without its secret gets a fresh
        one), then the node's own ban."""
        code = await self.store.join_code()
        if not (code and hmac.compare_digest(report.join_code.encode(), code.encode())) and not (
            # a joined node proves itself with its secret: the code (maybe rotated since) admits new ones
            report.node_secret and await self.store.proves(report.device_id, secret_digest(report.node_secret))
        ):
            wrong: dict[str, object] = {"error": "wrong join code: open the join link the controller printed"}
            return 403, wrong
        s = self.settings
        banned: dict[str, object] = {"error": "this node is banned"}
        bannable = dispatch.address_bannable(address, ban_address_s=s.ban_address_s, trusted=s.trusted_addresses)
        if bannable and await self.store.address_banned(address):
            log.info("node report from %s refused: a node from that address was banned", address)
            return 403, banned
        if await self.store.banned(report.device_id):  # whatever it proves: nobody honest claims a banned id
            return 403, banned
        identity = await resolve_identity(self.store, report.device_id, report.node_secret)
        node_id = identity.node_id
        if identity.admission is Admission.NEW:
            log.warning(
                "node %s claimed by %s without its secret: a new identity %s", report.device_id, address, node_id
            )
        if await self.store.banned(node_id):
            return 403, banned
        slots = plan_slots(
            cores=report.cores, memory_gb=report.memory_gb, kind=report.kind, max_concurrency=s.max_concurrency
        )
        await self.store.save_node(
            node_id,
            {
                "id": node_id,
                "kind": report.kind,
                "cores": report.cores,
                "memory_gb": report.memory_gb if report.memory_gb is not None else "",
                "browser": report.browser or "",
                "os": report.os or "",
                "gpu": report.gpu or "",
                "score": report.benchmark_score if report.benchmark_score is not None else "",
                "simd": int(report.simd),
                "slots": slots,
                "address": address,
                "voter": self.voter(node_id, address),
                "joined": time.time(),
                "state": "joined",
            },
        )
        token, expires = self.signer.issue(node_id)
        log.info(
            "node %s: joined (%s, %d cores, score %s)",
            node_id,
            safe_text(report.browser or report.kind),
            report.cores,
            report.benchmark_score,
        )
        accepted = NodeAccepted(
            node_id=node_id,
            node_secret=identity.secret,
            token=token,
            token_expires_at=expires,
            slots=slots,
            prefetch=s.prefetch,
            heartbeat_interval_s=s.heartbeat_interval_s,
        )
        return 200, accepted.model_dump()

    async def stop(self) -> None:
        """Close every session (their tasks are requeued) and the store."""
        self._secrets.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._secrets
        for s in list(self.sessions.values()):
            await s.close(CloseCode.GOING_AWAY, "gateway shutting down")
        await self.store.aclose()

    # ------------------------------------------------------------------ sessions

    def new_session(self, ws: WebSocket, node_id: str, slots: int) -> NodeSession:
        address = ws.client.host if ws.client else "unknown"
        return NodeSession(
            ws,
            node_id,
            slots,
            voter=self.voter(node_id, address),
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
                case Ban(node_id=node_id, reason=reason):
                    if (session := self.sessions.get(node_id)) is not None:  # a close reason fits 123 bytes
                        await session.close(
                            CloseCode.BANNED, f"banned: {reason}".encode()[:120].decode(errors="ignore")
                        )
                    await self.ban_address(node_id)
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
