"""The operator's dashboard: its page, its live feed, and the few things the operator does
from it.

Routes
    GET  /dashboard                  the page (static/dashboard.html, ES modules in static/js/)
    GET  /dashboard/events           the live feed: server-sent events, one `ClusterStatus`
                                     frame (JSON) about once a second; status only, for anyone
    GET  /dashboard/join             {"url": the join link}               (operator's token)
    GET  /dashboard/join.svg         the join link as a QR code (SVG)     (operator's token)
    POST /jobs/{id}/cancel           ask the scheduler to cancel a job   (operator's token)
    GET  /jobs/{id}/preview.png      an image job's canvas so far         (operator's token)

Why server-sent events and not a WebSocket: the feed only flows one way; `EventSource`
reconnects by itself after a gateway restart; it is plain HTTP, so it needs no origin
checks beside the node socket's and passes any proxy that passes the page. The operator's
actions are ordinary requests with the token in a header.

Invariant: one `StatusReader` per gateway process (`DashboardFeed`): it holds the rate
samples, so every dashboard sees the same rates, and Redis is read once a second whatever the
number of dashboards, and not at all when none is open. The feed carries nothing secret: the
join link, the preview (a job's output) and the actions each need the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import qrcode
import qrcode.image.svg
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..shared.core.status import IMAGE_KINDS
from ..shared.jobs import TERMINAL
from ..shared.messages import Cancel
from ..shared.settings import Settings, read_controller_info
from ..shared.store.gateway import GatewayStore
from ..shared.store.status import StatusReader, ajob
from .operator import NEED_TOKEN, is_operator
from .preview import Previews

log = logging.getLogger(__name__)

#: Seconds between two frames.
FRAME_EVERY_S = 1.0
#: Frames a slow dashboard may fall behind before it skips to the newest.
BACKLOG = 2
#: What an EventSource waits before it reconnects (ms).
RETRY_MS = 2000


class DashboardFeed:
    """Frames of the operator's view, sampled while at least one dashboard listens and
    handed to every one of them (`frames`)."""

    def __init__(self, client: Any, *, node_timeout_s: float, every_s: float = FRAME_EVERY_S) -> None:
        self.client = client
        self.every_s = every_s
        self.reader = StatusReader(node_timeout_s)
        self._subscribers: set[asyncio.Queue[str | None]] = set()
        self._sampler: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False

    @property
    def listeners(self) -> int:
        return len(self._subscribers)

    async def frames(self) -> AsyncIterator[str]:
        """Each frame as JSON text, from now until the feed closes."""
        if self._closed:
            return
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=BACKLOG)
        self._subscribers.add(queue)
        if self._sampler is None or self._sampler.done():
            self._sampler = asyncio.create_task(self._sample(), name="dashboard-feed")
        try:
            while (frame := await queue.get()) is not None:
                yield frame
        finally:
            self._subscribers.discard(queue)

    async def frame(self) -> str:
        """One frame now, as JSON text."""
        status = await self.reader.aread(self.client)
        return json.dumps(status.to_json(), separators=(",", ":"), allow_nan=False)

    async def _sample(self) -> None:
        while self._subscribers and not self._closed:
            try:
                data = await self.frame()
                if self._failing:
                    log.info("dashboard feed: reading Redis again")
                self._failing = False
            except Exception as exc:  # Redis away (most likely): say so to the dashboards, keep trying
                if not self._failing:
                    log.warning("dashboard feed: reading the status failed (%s); retrying", exc)
                self._failing = True
                data = json.dumps({"error": f"status unavailable: {type(exc).__name__} (is Redis up?)"})
            for queue in list(self._subscribers):
                self._offer(queue, data)
            await asyncio.sleep(self.every_s)

    @staticmethod
    def _offer(queue: asyncio.Queue[str | None], item: str | None) -> None:
        # a dashboard that does not keep up gets the newest frame, not a growing backlog
        while queue.full():
            queue.get_nowait()
        queue.put_nowait(item)

    def close(self) -> None:
        """End every stream (the gateway is stopping: an open stream would hold it up)."""
        self._closed = True
        for queue in list(self._subscribers):
            self._offer(queue, None)

    async def aclose(self) -> None:
        self.close()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    def close_on_signals(self) -> None:
        """Close the feed as soon as SIGINT or SIGTERM arrives, then let the handler that was
        installed (uvicorn's) run. uvicorn waits for open responses before it shuts the app
        down, and an event stream never ends by itself; without this every open dashboard
        would hold a stopping gateway up for its whole grace period."""
        if threading.current_thread() is not threading.main_thread():
            return  # an app under test, not served by uvicorn: nothing to chain to
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue
            signal.signal(sig, _chained(lambda: loop.call_soon_threadsafe(self.close), previous))


def _chained(first: Callable[[], object], then: Callable[[int, FrameType | None], Any]) -> Any:
    def handler(sig: int, frame: FrameType | None) -> None:
        first()
        then(sig, frame)

    return handler


def join_base(settings: Settings, request: Request) -> str:
    """Where devices reach this controller: `PD_PUBLIC_URL`, else what `up` printed (its
    controller.json), else the address this request came in on."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    printed = read_controller_info(settings).get("gateway_url")
    if isinstance(printed, str) and printed:
        return printed.rstrip("/")
    return str(request.base_url).rstrip("/")


def qr_svg(text: str) -> bytes:
    """`text` as a QR code, an SVG of one path (scales crisply on any screen)."""
    img = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathImage, border=2)
    out = io.BytesIO()
    img.save(out)
    return out.getvalue()


def refused() -> JSONResponse:
    return JSONResponse({"error": NEED_TOKEN}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def dashboard_routes(
    *, settings: Settings, store: GatewayStore, feed: DashboardFeed, static_dir: Path
) -> list[BaseRoute]:
    """The dashboard's routes, for `gateway.app`."""
    previews = Previews(settings.data_path)
    token = settings.operator_token

    async def page(request: Request) -> Response:
        return FileResponse(static_dir / "dashboard.html", headers={"Cache-Control": "no-cache"})

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            yield f"retry: {RETRY_MS}\n\n"
            async for frame in feed.frames():
                yield f"data: {frame}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # no proxy buffering
        )

    async def join(request: Request) -> Response:
        if not is_operator(request, token):
            return refused()
        code = await store.join_code()
        return JSONResponse({"url": f"{join_base(settings, request)}/agent?code={code}"})

    async def join_qr(request: Request) -> Response:
        if not is_operator(request, token):
            return refused()
        code = await store.join_code()
        svg = qr_svg(f"{join_base(settings, request)}/agent?code={code}")
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    async def cancel(request: Request) -> Response:
        if not is_operator(request, token):
            return refused()
        job_id = request.path_params["job"]
        job = await ajob(store.r, job_id)
        if not job:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        if job.get("state") in TERMINAL:
            return JSONResponse({"error": f"job {job_id} is already {job['state']}"}, status_code=409)
        await store.send_command(Cancel(job_id=job_id, reason="cancelled by the operator (dashboard)"))
        log.info("job %s: cancel requested from the dashboard", job_id)
        return JSONResponse({"job_id": job_id, "cancelling": True}, status_code=202)

    async def preview(request: Request) -> Response:
        if not is_operator(request, token):
            return refused()
        job_id = request.path_params["job"]
        job = await ajob(store.r, job_id)
        if job.get("kind") not in IMAGE_KINDS:
            return JSONResponse({"error": f"no image job {job_id}"}, status_code=404)
        done = int(job.get("done") or 0)
        # numpy and PNG work off the event loop: the sockets keep flowing meanwhile
        png = await asyncio.to_thread(previews.png, job_id, job.get("params", ""), done)
        if png is None:
            return JSONResponse({"error": "no preview yet (or the data directory is elsewhere)"}, status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-cache"})

    return [
        Route("/dashboard", page),
        Route("/dashboard/events", events),
        Route("/dashboard/join", join),
        Route("/dashboard/join.svg", join_qr),
        Route("/jobs/{job:str}/cancel", cancel, methods=["POST"]),
        Route("/jobs/{job:str}/preview.png", preview),
    ]
