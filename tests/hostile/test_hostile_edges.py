"""Issue 9.10 (edges): slow and numerous connections, forwarded headers, and what Redis
keeps of jobs and nodes that are gone. Real gateway processes (`Controller`), real Redis."""

from __future__ import annotations

import inspect
import json
import secrets
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websockets.sync.client as ws_client
from conftest import Controller
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.jobs import JobState
from processdistro.shared.redis_server import free_port
from processdistro.shared.store import modules
from processdistro.shared.store.connection import Client
from processdistro.shared.store.expiry import JOB_KEEP_S, NODE_KEEP_S, RETURNED_TTL_S
from processdistro.shared.store.failures import FAILURES_TTL_S
from processdistro.shared.store.jobs import JobStore, drop_blocks, load_job, store_blocks
from processdistro.shared.store.results import VOTES_TTL_S, ResultStream
from test_matmul import wait_job
from test_pipeline import SMALL, run_nodes_until
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
    # a node's WebSocket session, upgraded from HTTP on the same kind of connection
    accepted = report_answer(controller.url, controller.join_code, {})
    ws_url = f"ws://127.0.0.1:{controller.port}/ws?token={accepted['token']}"
    with ws_client.connect(ws_url, open_timeout=10) as session:
        session.send(json.dumps({"type": "hello"}))
        assert json.loads(session.recv(10))["type"] == "welcome"
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
            session.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
        for name, when in closed.items():
            assert HEADER_TIMEOUT_S - 0.5 <= when <= HEADER_TIMEOUT_S + 15, (name, when)
        slow.close()
        silent.close()
        # the session outlived the header timeout: a head timer never cuts an upgraded connection
        session.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
        session.send(json.dumps({"type": "ready", "free": 0}))
        with pytest.raises(TimeoutError):
            session.recv(1)  # nothing to say, and above all no close
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
        ws_url = f"ws://127.0.0.1:{controller.port}/ws?token=x"
        with pytest.raises(InvalidStatus) as ws_refused, ws_client.connect(ws_url, open_timeout=10):
            pass
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
    return str(report_answer(base_url, join_code, headers)["node_id"])


def report_answer(base_url: str, join_code: str, headers: dict[str, str]) -> dict[str, object]:
    """The gateway's answer to a node report (with `headers`) of a fresh device."""
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
    return dict(resp.json())


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


# ---------------------------------------------------------------------------- expiry


def _key_functions(first_param: str) -> list[str]:
    return sorted(
        name
        for name, fn in vars(keys).items()
        if inspect.isfunction(fn) and list(inspect.signature(fn).parameters)[:1] == [first_param]
    )


@pytest.mark.parametrize("name", _key_functions("job_id"))
def test_every_per_job_key_kind_has_an_end(name: str) -> None:
    """Issue 9.10: per-job keys (`pd:job:*:done`...) never expired. Fix: every per-job key
    kind of keys.py is listed in `keys.JOB_KEY_ENDS` with how it goes once its job is over; a
    new kind must be listed (and `test_per_job_keys_end_with_their_job` then checks it)."""
    assert keys.JOB_KEY_ENDS.get(name) in ("expire", "delete", "ttl"), name


@pytest.mark.parametrize("name", _key_functions("node_id"))
def test_every_per_node_key_kind_has_an_end(name: str) -> None:
    """Issue 9.10: per-node hashes (one per reported device id) never expired. Fix: every
    per-node key kind is listed in `keys.NODE_KEY_ENDS` and carries a TTL."""
    assert keys.NODE_KEY_ENDS.get(name) == "ttl", name


def _hash_with_ttl(r: Client, key: str, field: str, value: str | int) -> None:
    r.hset(key, field, value)
    r.expire(key, FAILURES_TTL_S)


def test_per_job_keys_end_with_their_job(r: Client) -> None:
    """Issue 9.10: every per-job key kind, written the way the product writes it, then the
    job ends (`drop_blocks`, which every terminal path calls): "delete" kinds are gone, the
    others have a TTL, and nothing under the job's prefix is kept for ever."""
    job, sha = "jobx", "ab" * 32
    results = ResultStream(r, consumer="t", node_timeout_s=4.0)
    writers: dict[str, Callable[[], object]] = {
        "job": lambda: JobStore(r).create(job, {"state": "done", "total": 1}, priority=0, created=time.time()),
        "job_done": lambda: r.sadd(keys.job_done(job), 0),
        "block": lambda: store_blocks(r, job, {sha: b"data"}),
        "job_blocks": lambda: store_blocks(r, job, {sha: b"data"}),
        "job_claims": lambda: results.claim(job, 0, b"1-0"),
        "job_modules": lambda: modules.acquire(r, job, b"\0asm\1\0\0\0"),
        "job_votes": lambda: results.vote(job, 0, "node-a", b"out"),
        "job_first_vote": lambda: results.vote(job, 1, "node-a", b"out"),
        "job_vote_nodes": lambda: results.vote(job, 0, "node-a", b"out", voter="@10.0.0.9"),
        # as FailureStore.record_failure / record_drops and Handovers.hand_over write them
        "job_failures": lambda: _hash_with_ttl(r, keys.job_failures(job, 0), "node-a", "boom"),
        "job_drops": lambda: _hash_with_ttl(r, keys.job_drops(job, 0), "node-a", 1),
        "job_tally": lambda: _hash_with_ttl(r, keys.job_tally(job), "node-a:failed", 1),
        "job_returned": lambda: results.mark_returned(job, 0, "node-a"),
        "job_decided": lambda: results.mark_decided(job, 0),
        "job_stats": lambda: results.reject("node-a", job),
    }
    assert set(writers) == set(keys.JOB_KEY_ENDS), "a per-job key kind this test does not write"
    for write in writers.values():
        write()
    made = {k.decode() for k in r.scan_iter(match=f"{keys.job(job)}*")}
    assert len(made) >= len(writers), made
    drop_blocks(r, job)
    left = {k.decode(): r.ttl(k) for k in r.scan_iter(match=f"{keys.job(job)}*")}
    for name, end in keys.JOB_KEY_ENDS.items():
        fn = getattr(keys, name)
        key = (
            fn(job, sha)
            if name == "block"
            else fn(job, 1 if name == "job_first_vote" else 0)
            if end == "ttl" and len(inspect.signature(fn).parameters) == 2
            else fn(job)
        )
        if end == "delete":
            assert key not in left, name
        else:
            assert 0 < left[key] <= max(JOB_KEEP_S, VOTES_TTL_S), (name, left.get(key))
    assert all(ttl > 0 for ttl in left.values()), left


def _ttls(r: Client, pattern: str) -> dict[str, int]:
    return {k.decode(): int(r.ttl(k)) for k in r.scan_iter(match=pattern)}


@pytest.mark.timeout(300)
def test_job_and_node_keys_expire_once_they_are_gone(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.10: `pd:job:*:done` and the node hashes (one per report) stayed in Redis for
    ever. Fix: once a job is done or cancelled, each of its keys is deleted or has a TTL;
    a node's keys carry a TTL from its last sign of life, so they go after it left (and a
    node that only reported and never connected leaves nothing for ever either)."""
    proc = controller.submit_mandelbrot(tmp_path, *SMALL, "--replicate", "1")
    nodes = [Node(controller.url, controller.join_code, cores=1) for _ in range(2)]
    run_async(run_nodes_until(proc, *nodes, timeout=180))
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    done_id = r.zrange(keys.JOBS, 0, 0)[0].decode()
    # a second job, cancelled before any node takes it
    submitted = controller.cli("submit", "mandelbrot", *SMALL)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    cancelled_id = next(j.decode() for j in r.zrange(keys.JOBS, 0, -1) if j.decode() != done_id)
    cancel = controller.cli("cancel", cancelled_id)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert wait_job(r, cancelled_id).state is JobState.CANCELLED
    assert load_job(r, done_id).state is JobState.DONE  # type: ignore[union-attr]
    longest = max(JOB_KEEP_S, VOTES_TTL_S, RETURNED_TTL_S)
    for job_id in (done_id, cancelled_id):
        deadline = time.monotonic() + 30
        while (kept := _ttls(r, f"{keys.job(job_id)}*")) and any(t <= 0 for t in kept.values()):
            assert time.monotonic() < deadline, f"job {job_id} keeps keys for ever: {kept}"
            time.sleep(0.2)
        assert keys.job(job_id) in kept and all(0 < t <= longest for t in kept.values()), kept
    assert keys.job_done(done_id) in _ttls(r, f"{keys.job(done_id)}*")
    # the nodes left: their record and their merged list go after NODE_KEEP_S
    for node in nodes:
        assert node.worker is not None
        node_id = node.worker.node_id
        kept = _ttls(r, keys.node(node_id)) | _ttls(r, keys.node_merged(node_id))
        assert keys.node(node_id) in kept and all(0 < t <= NODE_KEEP_S for t in kept.values()), kept
    assert any(r.exists(keys.node_merged(n.worker.node_id)) for n in nodes if n.worker is not None)
    # a report alone (no connection ever)
    lone = report(controller.url, controller.join_code, {})
    assert 0 < r.ttl(keys.node(lone)) <= NODE_KEEP_S


def test_expired_job_ids_leave_the_job_list(r: Client) -> None:
    """Issue 9.10: `keys.JOBS` (the job list) would keep ids whose record has expired. Fix:
    each job's end drops the oldest ids whose record is gone."""
    JobStore(r).create("old", {"state": "done"}, priority=0, created=1.0)
    JobStore(r).create("new", {"state": "running"}, priority=0, created=2.0)
    r.delete(keys.job("old"))  # as its TTL would
    drop_blocks(r, "another")
    assert [j.decode() for j in r.zrange(keys.JOBS, 0, -1)] == ["new"]
