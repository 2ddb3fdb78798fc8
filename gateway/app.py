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
    GET  /dashboard        live view for the operator (gateway/dashboard.py: its feed, its actions)
    GET  /healthz          200 when Redis answers
    GET  /jobs/<id>/outputs/<name>  a finished job's output (operator token; gateway/outputs.py)

It keeps no state but live sockets: any number of gateways can share one Redis. This module
holds the routes only; `hub.Hub` is the shared object (sessions, control channel), every
Redis call goes through `shared/store/gateway.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from ..shared.modules import Module
from ..shared.protocol import CloseCode, NodeReport
from ..shared.settings import Settings
from ..shared.store.gateway import GatewayStore
from ..shared.validation import problems
from .auth import TokenStatus, origin_allowed
from .dashboard import DashboardFeed, dashboard_routes
from .edge import uvicorn_options
from .hub import Hub
from .outputs import output_routes

log = logging.getLogger(__name__)

mimetypes.add_type("application/wasm", ".wasm")
MAX_REPORT_BYTES = 64 * 1024
REPORT_BODY_TIMEOUT_S = 10.0  # a node report's body, however slowly it is sent (issue 9.10)


class _RevalidatedStatic(StaticFiles):
    """Static files that browsers revalidate (ETag) on every load: a fresh agent.js reaches
    phones that keep the page open for days. Modules, keyed by hash, are cached forever."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _client_ip(request: Request | WebSocket) -> str:
    return request.client.host if request.client else "unknown"


def create_app(settings: Settings, *, store: GatewayStore | None = None) -> Starlette:
    """The gateway's starlette app; `store` defaults to a client of `settings`' Redis."""
    store = store or GatewayStore.connect(settings.resolved_redis_url())
    static_dir = settings.static_path
    gw = Hub(settings=settings, store=store, static_dir=static_dir)
    feed = DashboardFeed(store.r, node_timeout_s=settings.node_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        control = asyncio.create_task(gw.listen_control())
        feed.close_on_signals()
        log.info("gateway ready: %d modules, join code set", len(gw.modules.by_name))
        try:
            yield
        finally:
            await feed.aclose()
            control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control
            await gw.stop()

    async def agent(request: Request) -> Response:
        return FileResponse(static_dir / "agent.html", headers={"Cache-Control": "no-cache"})

    async def module(request: Request) -> Response:
        # the registry's own modules, else one a job uploaded (in Redis: every gateway has it)
        sha = request.path_params["sha"]
        mod = gw.modules.by_sha.get(sha)
        if mod is None and _is_sha256(sha) and await store.module_stored(sha):
            mod = Module.uploaded(sha)
        if mod is None:
            return JSONResponse({"error": "no such module"}, status_code=404)
        etag = f'"{mod.sha256}"'
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = mod.data if mod.path is not None else await store.module(sha)
        if data is None:  # its last job ended a moment ago
            return JSONResponse({"error": "no such module"}, status_code=404)
        return Response(data, media_type="application/wasm", headers=headers)

    async def block(request: Request) -> Response:
        check = gw.signer.check(request.query_params.get("token"))
        if check.status is not TokenStatus.VALID:
            return JSONResponse({"error": f"session token {check.status.value}"}, status_code=401)
        sha = request.path_params["sha"]
        if not _is_sha256(sha):
            return JSONResponse({"error": "expected a lowercase hex sha256"}, status_code=400)
        data = await store.block(request.path_params["job"], sha)
        if data is None:
            return JSONResponse({"error": "no such block (its job may be over)"}, status_code=404)
        # content-addressed, so a cached copy never goes stale; private: it is job data
        return Response(
            data, media_type="application/octet-stream", headers={"Cache-Control": "private, max-age=86400, immutable"}
        )

    async def modules(request: Request) -> Response:
        return JSONResponse({m.name: {"sha256": m.sha256, "url": m.url} for m in gw.modules.by_name.values()})

    async def node_report(request: Request) -> Response:
        if not await store.within_rate("report", _client_ip(request), settings.report_rate_per_min):
            return JSONResponse({"error": "too many node reports; wait a minute"}, status_code=429)
        body = b""
        try:
            async with asyncio.timeout(REPORT_BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > MAX_REPORT_BYTES:
                        return JSONResponse({"error": f"report larger than {MAX_REPORT_BYTES} bytes"}, status_code=413)
        except TimeoutError:
            return JSONResponse({"error": f"report not received within {REPORT_BODY_TIMEOUT_S:g}s"}, status_code=408)
        try:
            report = NodeReport.model_validate_json(body)
        except ValidationError as exc:
            return JSONResponse({"error": "invalid node report", "problems": problems(exc)}, status_code=422)
        # join code, bans and identity (a known id without its secret gets a new one): `Hub.admit`
        status, answer = await gw.admit(report, _client_ip(request))
        return JSONResponse(answer, status_code=status)

    async def ws_endpoint(ws: WebSocket) -> None:
        async def refuse(code: int, reason: str, label: str) -> None:
            gw.metrics.connections_refused.labels(label).inc()
            log.info("ws from %s refused: %s", _client_ip(ws), reason)
            # accept, then close: a browser sees the close code and reason, not a bare failure
            await ws.accept()
            await ws.close(code, reason)

        if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), settings.allowed_origins):
            return await refuse(CloseCode.POLICY, f"origin {ws.headers.get('origin')} not allowed", "origin")
        if not await store.within_rate("connect", _client_ip(ws), settings.connect_rate_per_min):
            return await refuse(CloseCode.RATE_LIMITED, "too many connections; wait a minute", "rate")
        check = gw.signer.check(ws.query_params.get("token"))
        if check.status is not TokenStatus.VALID:
            return await refuse(
                CloseCode.BAD_TOKEN, f"session token {check.status.value}", f"token_{check.status.value}"
            )
        node = await store.node(check.node_id)
        if node.get(b"banned", b"0") != b"0":
            return await refuse(CloseCode.BANNED, "node banned", "banned")
        await ws.accept()
        await gw.serve(gw.new_session(ws, check.node_id, int(node.get(b"slots", b"1"))))

    async def metrics(request: Request) -> Response:
        body = await gw.metrics.render(store, settings.node_timeout_s)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def metrics_json(request: Request) -> Response:
        return JSONResponse(await gw.metrics.snapshot(store, settings.node_timeout_s))

    async def healthz(request: Request) -> Response:
        try:
            await asyncio.wait_for(store.ping(), timeout=2)
        except Exception as exc:
            return JSONResponse({"status": "unhealthy", "redis": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "sessions": len(gw.sessions)})

    async def root(request: Request) -> Response:
        return RedirectResponse("/dashboard")

    app = Starlette(
        routes=[
            Route("/", root),
            Route("/agent", agent),
            *dashboard_routes(settings=settings, store=store, feed=feed, static_dir=static_dir),
            Route("/modules/{sha:str}.wasm", module),
            Route("/api/modules", modules),
            Route("/blocks/{job:str}/{sha:str}", block),
            Route("/node-report", node_report, methods=["POST"]),
            WebSocketRoute("/ws", ws_endpoint),
            Route("/metrics", metrics),
            Route("/metrics.json", metrics_json),
            Route("/healthz", healthz),
            *output_routes(settings, store),
            Mount("/static", app=_RevalidatedStatic(directory=static_dir), name="static"),
        ],
        middleware=[
            # the controller's own origin only: no Access-Control headers for anyone else
            Middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gw
    app.state.dashboard = feed
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
        **uvicorn_options(settings),  # header timeout, per-address cap, forwarded headers (gateway/edge.py)
    )
