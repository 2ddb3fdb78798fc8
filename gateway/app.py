"""The gateway: the only process that speaks HTTP and WebSocket to nodes.

Routes
    GET  /                 -> redirect to /dashboard
    GET  /agent            the join page (static/agent.html)
    GET  /static/...       static files (no-cache + ETag)
    GET  /modules/<sha>.wasm  WASM modules by content hash (immutable)
    GET  /api/modules      {name: {sha256, url}}
    GET  /blocks/<job>/<sha>  a shared task input block (session token required)
    POST /node-report      NodeReport -> NodeAccepted (join code -> session token)
    WS   /ws?token=...     a node's session (gateway/session.py)
    GET  /metrics          Prometheus text format
    GET  /metrics.json     the seed's figures as JSON
    GET  /dashboard        live view for the operator
    GET  /healthz          200 when Redis answers

It keeps no state but live sockets: any number of gateways can share one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import mimetypes
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aredis
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from ..shared import keys
from ..shared.capacity import plan_slots
from ..shared.jobs import JobState
from ..shared.modules import ModuleRegistry
from ..shared.protocol import CloseCode, NodeAccepted, NodeReport
from ..shared.queue import node_of_consumer
from ..shared.settings import Settings
from ..shared.store.scripts import HANDOVER_LUA, REQUEUE_LUA
from ..shared.store.streams import ensure_groups_async
from .auth import TokenSigner, TokenStatus, ensure_join_code, ensure_secret, origin_allowed, within_rate
from .metrics import GatewayMetrics
from .session import NodeSession

log = logging.getLogger(__name__)

mimetypes.add_type("application/wasm", ".wasm")
MAX_REPORT_BYTES = 64 * 1024
LIVE = {JobState.QUEUED.value.encode(), JobState.RUNNING.value.encode()}


class Gateway:
    """Shared state of one gateway process (Redis client, signer, live sessions)."""

    def __init__(self, *, settings: Settings, r: aredis.Redis, static_dir: Path) -> None:
        self.settings = settings
        self.r = r
        self.static_dir = static_dir
        self.modules = ModuleRegistry(static_dir=static_dir)
        self.metrics = GatewayMetrics()
        self.requeue = r.register_script(REQUEUE_LUA)
        self.handover = r.register_script(HANDOVER_LUA)
        self.sessions: dict[str, NodeSession] = {}
        self.signer: TokenSigner
        self.join_code = ""
        self._job_state: dict[str, tuple[float, bool]] = {}

    async def start(self) -> None:
        await ensure_groups_async(self.r)
        self.signer = TokenSigner(secret=await ensure_secret(self.r), ttl_s=self.settings.token_ttl_s)
        self.join_code = await ensure_join_code(self.r)

    async def job_is_over(self, job_id: str) -> bool:
        now = time.monotonic()
        cached = self._job_state.get(job_id)
        if cached and now - cached[0] < 1.0:
            return cached[1]
        state = await self.r.hget(keys.job(job_id), "state")
        over = state not in LIVE  # finalizing too: a search that found its answer
        self._job_state[job_id] = (now, over)
        return over

    async def drop_task(self, task_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(keys.TASKS, keys.NODES_GROUP, task_id)
        pipe.xdel(keys.TASKS, task_id)
        await pipe.execute()

    async def listen_control(self) -> None:
        """Control messages: `cancel_job` (stop the job's tasks on our nodes), `ban`, `steal`
        (give back a connection's unstarted tasks), `drop_copies` (the other copies of a task
        whose first result is in)."""
        while True:
            try:
                pubsub = self.r.pubsub()
                await pubsub.subscribe(keys.CONTROL)
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    data = json.loads(msg["data"])
                    if data.get("type") == "ban":
                        session = self.sessions.get(data["node_id"])
                        if session is not None:
                            await session.close(CloseCode.BANNED, "banned: too many wrong results")
                    if data.get("type") == "cancel_job":
                        self._job_state.pop(data["job_id"], None)
                        for s in list(self.sessions.values()):
                            await s.cancel_job(data["job_id"])
                    if data.get("type") == "steal":
                        session = self.sessions.get(node_of_consumer(data["consumer"]))
                        if session is not None and session.consumer == data["consumer"]:
                            await session.give_back(int(data["count"]))
                    if data.get("type") == "drop_copies":
                        for s in list(self.sessions.values()):
                            await s.drop_copies(data["job_id"], int(data["index"]), data["winner"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("control channel lost (%s); resubscribing in 1s", exc)
                await asyncio.sleep(1)


class _RevalidatedStatic(StaticFiles):
    """Static files that browsers revalidate (ETag) on every load: a fresh agent.js reaches
    phones that keep the page open for days. Modules, keyed by hash, are cached forever."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _client_ip(request: Request | WebSocket) -> str:
    return request.client.host if request.client else "unknown"


def create_app(settings: Settings, *, redis_client: aredis.Redis | None = None) -> Starlette:
    from ..shared.store.connection import async_client

    r = redis_client or async_client(settings.resolved_redis_url())
    static_dir = settings.static_path
    gw = Gateway(settings=settings, r=r, static_dir=static_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        control = asyncio.create_task(gw.listen_control())
        log.info("gateway ready: %d modules, join code set", len(gw.modules.by_name))
        try:
            yield
        finally:
            control.cancel()
            for s in list(gw.sessions.values()):
                await s.close(CloseCode.GOING_AWAY, "gateway shutting down")
            with contextlib.suppress(asyncio.CancelledError):
                await control
            await r.aclose()

    async def agent(request: Request) -> Response:
        return FileResponse(static_dir / "agent.html", headers={"Cache-Control": "no-cache"})

    async def dashboard(request: Request) -> Response:
        return FileResponse(static_dir / "dashboard.html", headers={"Cache-Control": "no-cache"})

    async def module(request: Request) -> Response:
        mod = gw.modules.by_sha.get(request.path_params["sha"])
        if mod is None:
            return JSONResponse({"error": "no such module"}, status_code=404)
        etag = f'"{mod.sha256}"'
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(mod.data, media_type="application/wasm", headers=headers)

    async def block(request: Request) -> Response:
        check = gw.signer.check(request.query_params.get("token"))
        if check.status is not TokenStatus.VALID:
            return JSONResponse({"error": f"session token {check.status.value}"}, status_code=401)
        sha = request.path_params["sha"]
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            return JSONResponse({"error": "expected a lowercase hex sha256"}, status_code=400)
        data = await r.get(keys.block(request.path_params["job"], sha))
        if data is None:
            return JSONResponse({"error": "no such block (its job may be over)"}, status_code=404)
        # content-addressed, so a cached copy never goes stale; private: it is job data
        return Response(
            data, media_type="application/octet-stream", headers={"Cache-Control": "private, max-age=86400, immutable"}
        )

    async def modules(request: Request) -> Response:
        return JSONResponse({m.name: {"sha256": m.sha256, "url": m.url} for m in gw.modules.by_name.values()})

    async def node_report(request: Request) -> Response:
        if not await within_rate(r, "report", _client_ip(request), settings.report_rate_per_min):
            return JSONResponse({"error": "too many node reports; wait a minute"}, status_code=429)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_REPORT_BYTES:
                return JSONResponse({"error": f"report larger than {MAX_REPORT_BYTES} bytes"}, status_code=413)
        try:
            report = NodeReport.model_validate_json(body)
        except ValidationError as exc:
            problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:10]]
            return JSONResponse({"error": "invalid node report", "problems": problems}, status_code=422)
        if not hmac.compare_digest(report.join_code.encode(), gw.join_code.encode()):
            return JSONResponse(
                {"error": "wrong join code: open the join link the controller printed"}, status_code=403
            )
        node_id = report.device_id
        banned = await r.hget(keys.node(node_id), "banned")
        if banned and banned != b"0":
            return JSONResponse({"error": "this node is banned"}, status_code=403)
        slots = plan_slots(
            cores=report.cores, memory_gb=report.memory_gb, kind=report.kind, max_concurrency=settings.max_concurrency
        )
        await r.hset(
            keys.node(node_id),
            mapping={
                "id": node_id,
                "kind": report.kind,
                "cores": report.cores,
                "memory_gb": report.memory_gb if report.memory_gb is not None else "",
                "browser": report.browser or "",
                "os": report.os or "",
                "score": report.benchmark_score if report.benchmark_score is not None else "",
                "simd": int(report.simd),
                "slots": slots,
                "address": _client_ip(request),
                "joined": time.time(),
                "state": "joined",
            },
        )
        token, expires = gw.signer.issue(node_id)
        log.info(
            "node %s: joined (%s, %d cores, score %s)",
            node_id,
            report.browser or report.kind,
            report.cores,
            report.benchmark_score,
        )
        return JSONResponse(
            NodeAccepted(
                node_id=node_id,
                token=token,
                token_expires_at=expires,
                slots=slots,
                prefetch=settings.prefetch,
                heartbeat_interval_s=settings.heartbeat_interval_s,
            ).model_dump()
        )

    async def ws_endpoint(ws: WebSocket) -> None:
        async def refuse(code: int, reason: str, label: str) -> None:
            gw.metrics.connections_refused.labels(label).inc()
            log.info("ws from %s refused: %s", _client_ip(ws), reason)
            # accept, then close: a browser sees the close code and reason, not a bare failure
            await ws.accept()
            await ws.close(code, reason)

        if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), settings.allowed_origins):
            return await refuse(CloseCode.POLICY, f"origin {ws.headers.get('origin')} not allowed", "origin")
        if not await within_rate(r, "connect", _client_ip(ws), settings.connect_rate_per_min):
            return await refuse(CloseCode.RATE_LIMITED, "too many connections; wait a minute", "rate")
        check = gw.signer.check(ws.query_params.get("token"))
        if check.status is not TokenStatus.VALID:
            return await refuse(
                CloseCode.BAD_TOKEN, f"session token {check.status.value}", f"token_{check.status.value}"
            )
        node = await r.hgetall(keys.node(check.node_id))
        if node.get(b"banned", b"0") != b"0":
            return await refuse(CloseCode.BANNED, "node banned", "banned")
        await ws.accept()
        session = NodeSession(gw, ws, check.node_id, int(node.get(b"slots", b"1")))
        previous = gw.sessions.get(check.node_id)
        if previous is not None:
            await previous.close(CloseCode.REPLACED, "replaced by a newer connection")
        gw.sessions[check.node_id] = session
        try:
            await session.run()
        finally:
            if gw.sessions.get(check.node_id) is session:
                del gw.sessions[check.node_id]

    async def metrics(request: Request) -> Response:
        body = await gw.metrics.render(r, settings.node_timeout_s)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def metrics_json(request: Request) -> Response:
        return JSONResponse(await gw.metrics.snapshot(r, settings.node_timeout_s))

    async def healthz(request: Request) -> Response:
        try:
            await asyncio.wait_for(r.ping(), timeout=2)
        except Exception as exc:
            return JSONResponse({"status": "unhealthy", "redis": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "sessions": len(gw.sessions)})

    async def root(request: Request) -> Response:
        return RedirectResponse("/dashboard")

    app = Starlette(
        routes=[
            Route("/", root),
            Route("/agent", agent),
            Route("/dashboard", dashboard),
            Route("/modules/{sha:str}.wasm", module),
            Route("/api/modules", modules),
            Route("/blocks/{job:str}/{sha:str}", block),
            Route("/node-report", node_report, methods=["POST"]),
            WebSocketRoute("/ws", ws_endpoint),
            Route("/metrics", metrics),
            Route("/metrics.json", metrics_json),
            Route("/healthz", healthz),
            Mount("/static", app=_RevalidatedStatic(directory=static_dir), name="static"),
        ],
        middleware=[
            # the controller's own origin only: no Access-Control headers for anyone else
            Middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app


def run(settings: Settings) -> None:
    import uvicorn

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_max_size=settings.max_message_bytes,
        timeout_graceful_shutdown=5,
        log_config=None,
        access_log=False,  # one line per static file, and WebSocket URLs carry tokens
    )
