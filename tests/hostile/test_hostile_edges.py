"""Issue 9.10 (edges): slow and numerous connections, forwarded headers, and what Redis
keeps of jobs and nodes that are gone. Real gateway processes (`Controller`), real Redis."""

from __future__ import annotations

import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets.sync.client as ws_client
from conftest import Controller
from processdistro.shared import keys
from processdistro.shared.redis_server import free_port
from processdistro.shared.store.connection import Client
from websockets.exceptions import InvalidStatus

HEADER_TIMEOUT_S = 5.0
CAP = 6


@pytest.fixture
def controller_env() -> dict[str, str]:
    return {
        "PD_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "PD_MAX_CONNECTIONS_PER_ADDRESS": str(CAP),
    }


def closed_by_peer(sock: socket.socket, wait_s: float) -> bool:
    """True once the server has closed `sock` (EOF or reset), waiting up to `wait_s`."""
    readable, _, _ = select.select([sock], [], [], wait_s)
    if not readable:
        return False
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


@pytest.mark.timeout(120)
def test_slow_request_heads_are_cut_off(controller: Controller) -> None:
    """Issue 9.10: a client that opens a connection and sends its headers a byte at a time
    (or nothing at all) held it open for ever. Fix: the gateway closes a connection whose
    request head is not complete within PD_HEADER_TIMEOUT_S (gateway/edge.py)."""
    slow, silent = connect(controller.port), connect(controller.port)
    opened = time.monotonic()
    slow.sendall(b"GET /agent HTTP/1.1\r\nHost: x\r\n")
    closed: dict[str, float] = {}
    while len(closed) < 2:
        elapsed = time.monotonic() - opened
        assert elapsed < HEADER_TIMEOUT_S + 15, f"still open after {elapsed:.1f}s: {closed}"
        if "slow" not in closed:
            try:
                slow.sendall(b"X")  # one more byte of a header that never ends
            except (BrokenPipeError, ConnectionResetError):
                closed["slow"] = elapsed
            if closed_by_peer(slow, 0.25):
                closed["slow"] = elapsed
        if "silent" not in closed and closed_by_peer(silent, 0.25):
            closed["silent"] = time.monotonic() - opened
    for name, when in closed.items():
        assert HEADER_TIMEOUT_S - 0.5 <= when <= HEADER_TIMEOUT_S + 15, (name, when)
    slow.close()
    silent.close()
    # a whole request head in time is served as before, keep-alive included
    with httpx.Client(base_url=controller.url) as http:
        assert http.get("/agent").status_code == 200
        assert http.get("/healthz").status_code == 200


@pytest.mark.timeout(120)
def test_connections_over_the_per_address_cap_are_refused(controller: Controller) -> None:
    """Issue 9.10: one address could open any number of connections. Fix: at most
    PD_MAX_CONNECTIONS_PER_ADDRESS open connections per client address; one more (HTTP or
    WebSocket) is answered 429, while other addresses are served and the address is served
    again once its connections close."""
    held = [connect(controller.port) for _ in range(CAP)]
    started = time.monotonic()
    try:
        refused = httpx.get(f"{controller.url}/agent")
        assert refused.status_code == 429, refused.text
        assert "too many connections" in refused.json()["error"]
        with pytest.raises(InvalidStatus) as ws_refused:
            ws_client.connect(f"ws://127.0.0.1:{controller.port}/ws?token=x", open_timeout=10).close()
        assert ws_refused.value.response.status_code == 429
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with other:
            assert other.get(f"{controller.url}/agent").status_code == 200
        # all of it while the held connections were still open (else the test proved nothing)
        assert time.monotonic() - started < HEADER_TIMEOUT_S - 0.5, "too slow: held connections timed out"
        assert not any(closed_by_peer(s, 0) for s in held)
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while (status := httpx.get(f"{controller.url}/agent").status_code) != 200:
        assert status == 429 and time.monotonic() < deadline, status
        time.sleep(0.1)


def report(base_url: str, join_code: str, headers: dict[str, str]) -> str:
    """A node report (with `headers`); returns the node id it was given."""
    resp = httpx.post(
        f"{base_url}/node-report",
        headers=headers,
        json={
            "join_code": join_code,
            "device_id": secrets.token_urlsafe(24),
            "cores": 2,
            "kind": "native",
            "benchmark_score": 1e6,
        },
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["node_id"])


@pytest.fixture
def proxied_gateway(controller: Controller) -> Iterator[str]:
    """A second gateway on the same Redis that trusts loopback as its reverse proxy."""
    port = free_port()
    env = {**controller.env, "PD_PORT": str(port), "PD_TRUSTED_PROXIES": "127.0.0.1"}
    log = open(controller.home / "gateway-proxied.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "processdistro", "gateway"], env=env, stdout=log, stderr=log)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, controller.logs()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_forwarded_for_is_believed_only_from_configured_proxies(
    controller: Controller, proxied_gateway: str, r: Client
) -> None:
    """Issue 9.10: X-Forwarded-For from loopback was believed by default (uvicorn's default),
    so any local process could pose as any address and dodge per-address limits. Fix: it is
    believed only from PD_TRUSTED_PROXIES (default none, not even loopback)."""
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    direct = report(controller.url, controller.join_code, spoof)
    assert r.hget(keys.node(direct), "address") == b"127.0.0.1"
    proxied = report(proxied_gateway, controller.join_code, spoof)
    assert r.hget(keys.node(proxied), "address") == b"203.0.113.9"
