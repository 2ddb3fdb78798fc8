"""Joining a gateway: the worker's configuration, the join link, the benchmark, the node
report and its answer, and the backoff between attempts. The socket is `node.py`'s."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import random
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import ValidationError

from ..shared.exceptions import ConfigError
from ..shared.protocol import PROTOCOL_VERSION, NodeAccepted, NodeReport, Welcome
from ..tls import client_context
from .device import describe
from .exceptions import Banned, JoinRefused, TaskError
from .fetch import MAX_JSON_BYTES, ModuleStore, read_capped
from .pool import measure_speed
from .runtime import Limits

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 10.0
# What a controller may ask of this worker, whatever it says (issue 9.9): slots never above
# the worker's own cores; a bounded prefetch (Settings.prefetch allows up to 16); heartbeats
# neither a busy loop nor so rare that the node looks dead.
MAX_PREFETCH = 16
HEARTBEAT_BOUNDS_S = (0.1, 60.0)

M = TypeVar("M")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, decided by `main` (flags and `Settings`)."""

    join_url: str
    cores: int
    home: Path
    name: str | None = None
    limits: Limits = field(default_factory=Limits)
    run_benchmark: bool = True
    #: reported as the benchmark score when `run_benchmark` is off (a node of known speed)
    score: float | None = None
    throttle: float = 1.0  # >= 1: after each task sleep (throttle - 1) x its run time (a slower device)

    @functools.cached_property
    def tls(self) -> ssl.SSLContext | None:
        """TLS for every connection to the controller (`join_context` of the join link)."""
        return join_context(self.join_url)


def parse_join_url(url: str) -> tuple[str, str]:
    """`http://host:port/agent?code=CODE` -> (`http://host:port`, `CODE`) (an https link may
    carry `&fp=`: `join_context`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"expected a join link like http://HOST:PORT/agent?code=CODE, got {url!r}")
    code = parse_qs(parts.query).get("code", [""])[0]
    if not code:
        raise ConfigError(f"the join link {url!r} has no join code (?code=...): copy the link the controller printed")
    return f"{parts.scheme}://{parts.netloc}", code


def join_context(url: str) -> ssl.SSLContext | None:
    """The TLS context of an https join link: pinned to its certificate fingerprint
    (`&fp=<sha256 hex>`, which `up --https` puts in the link) when it has one, the system's
    CAs otherwise; None for http. See `processdistro.tls`: a certificate that fails the pin
    fails the handshake with `FingerprintMismatch`, which stops the worker (no retry helps)."""
    fp = parse_qs(urlsplit(url).query).get("fp", [""])[0]
    try:
        return client_context(url, fp or None)
    except ValueError as exc:
        raise ConfigError(f"the join link's fp= is not a certificate fingerprint: {exc}") from None


def backoff_s(attempt: int) -> float:
    """Capped exponential backoff with "equal jitter" (as agent.js): never below half."""
    base: float = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(attempt, 16))
    return base / 2 + random.random() * (base / 2)


def node_report(config: WorkerConfig, *, join_code: str, device_id: str, score: float | None) -> NodeReport:
    """The `POST /node-report` body describing this machine."""
    info = describe()
    return NodeReport(
        join_code=join_code,
        device_id=device_id,
        cores=config.cores,
        memory_gb=info.memory_gb,
        browser=info.runtime,
        os=info.os,
        benchmark_score=score,
        simd=info.simd,
        kind="native",
    )


def within_means(message: M, cores: int, *, who: str = "") -> M:
    """A `NodeAccepted` or `Welcome` with what the controller asks bounded by this worker's
    means: `slots` at most `cores` (and at least 1), `prefetch` at most `MAX_PREFETCH`, the
    heartbeat interval finite and within `HEARTBEAT_BOUNDS_S`. Any other message as it is."""
    if not isinstance(message, NodeAccepted | Welcome):
        return message
    low, high = HEARTBEAT_BOUNDS_S
    interval = message.heartbeat_interval_s
    bounded = {
        "slots": min(max(1, message.slots), max(1, cores)),
        "prefetch": min(max(0, message.prefetch), MAX_PREFETCH),
        "heartbeat_interval_s": min(max(interval, low), high) if math.isfinite(interval) else 2.0,
    }
    asked = {k: getattr(message, k) for k in bounded}
    if asked != bounded:
        log.warning("node %s: the controller asked for %s; this worker (%d cores) uses %s", who, asked, cores, bounded)
    return message.model_copy(update=bounded)  # type: ignore[return-value]


def accepted(resp: httpx.Response) -> NodeAccepted:
    """The gateway's 200 answer to a node report, checked (`JoinRefused` if unusable)."""
    try:
        answer = NodeAccepted.model_validate_json(resp.content)
    except ValidationError as exc:
        raise JoinRefused(f"the gateway's answer to the node report is not a NodeAccepted: {exc}") from None
    if answer.protocol != PROTOCOL_VERSION:
        raise JoinRefused(
            f"the gateway speaks protocol {answer.protocol}, this worker {PROTOCOL_VERSION}: upgrade processdistro"
        )
    return answer


def refusal(resp: httpx.Response, node_id: str) -> Exception:
    """The error to stop with for a node report refused for good (4xx other than 429)."""
    try:
        body = resp.json()
        error = str(body.get("error", "")) if isinstance(body, dict) else ""
        problems = body.get("problems") if isinstance(body, dict) else None
    except ValueError:
        error, problems = resp.text[:200], None
    detail = error + (f" ({'; '.join(map(str, problems))})" if problems else "")
    if resp.status_code == 403 and "banned" in error:
        return Banned(f"node {node_id}: {error}")
    if resp.status_code == 403:
        return JoinRefused(f"join code refused: {detail or 'HTTP 403'}")
    return JoinRefused(f"node report refused (HTTP {resp.status_code}): {detail}")


async def measure(
    http: httpx.AsyncClient, base_url: str, modules: ModuleStore, limits: Limits, who: str
) -> float | None:
    """The benchmark score (Mandelbrot iterations per second on one core) with the gateway's
    mandelbrot module, which this also puts in the module cache; None if it cannot run. Where
    SIMD128 validates it is `mandelbrot_simd`, the build this node is sent for Mandelbrot jobs
    (dispatch.pick_module), so the score is the speed the node will have."""
    try:
        status, body = await read_capped(
            http, f"{base_url}/api/modules", limit=MAX_JSON_BYTES, what="the gateway's module list"
        )
        if status != 200:
            raise ValueError(f"HTTP {status} from {base_url}/api/modules")
        listed = json.loads(body)
        entry = (describe().simd and listed.get("mandelbrot_simd")) or listed.get("mandelbrot")
        if not entry:
            log.info("node %s: no mandelbrot module on the gateway; joining without a score", who)
            return None
        sha, url = str(entry["sha256"]), str(entry["url"])
        path = await modules.get(sha, url)
        score = await asyncio.to_thread(_benchmark_blocking, limits, sha, path)
    except (httpx.HTTPError, OSError, ValueError, KeyError, AttributeError, TaskError) as exc:
        log.warning("node %s: benchmark failed (%s); joining without a score", who, exc)
        return None
    log.info("node %s: benchmark %.1f M iterations/s per core", who, score / 1e6)
    return score


def _benchmark_blocking(limits: Limits, sha: str, path: Path) -> float:
    # in an executor process, on the engine tasks run on (no in-WASM deadline checks): the
    # score is the speed the node's executors have
    return measure_speed(sha, path, limits)
