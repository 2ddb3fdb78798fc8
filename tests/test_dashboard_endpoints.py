"""The dashboard's gateway side (gateway/dashboard.py, gateway/preview.py): the live feed is
status for anyone, the operator's requests need the token, a cancel reaches the scheduler,
the preview fills in and survives missing or partial files; and the short texts the page
prints agree with `core.status` (one table, tests/dashboard_format_cases.json, which the
page's own formatter is held to in tests/js/dashboard_format.test.mjs)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Controller
from nodes import run_async
from numpy.lib.format import open_memmap
from PIL import Image
from processdistro.gateway.dashboard import qr_svg
from processdistro.gateway.preview import MAX_EDGE, PENDING, Previews, render, step_for
from processdistro.shared import keys
from processdistro.shared.core import status
from processdistro.shared.store.connection import Client

TOKEN = "op-" + "x" * 40
CASES = json.loads((Path(__file__).parent / "dashboard_format_cases.json").read_text())


@pytest.fixture
def controller_env() -> dict[str, str]:
    return {"PD_OPERATOR_TOKEN": TOKEN}


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ pure parts (tables)


@pytest.mark.parametrize(("value", "text"), CASES["score"], ids=[c[1] for c in CASES["score"]])
def test_format_score(value: float, text: str) -> None:
    assert status.format_score(value) == text


@pytest.mark.parametrize(("value", "text"), CASES["eta"], ids=[f"{c[0]}->{c[1]}" for c in CASES["eta"]])
def test_format_eta(value: float | None, text: str) -> None:
    assert status.format_eta(value) == text


@pytest.mark.parametrize(("value", "text"), CASES["rate"], ids=[f"{c[0]}->{c[1]}" for c in CASES["rate"]])
def test_format_rate(value: float, text: str) -> None:
    assert status.format_rate(value) == text


@pytest.mark.parametrize(
    ("width", "height", "step"),
    [(512, 512, 1), (100, 30, 1), (513, 10, 2), (1024, 1024, 2), (1000, 4000, 8), (65536, 1, 128)],
    ids=["exactly 512", "small", "one over", "1024 square", "tall", "a wide strip"],
)
def test_preview_stride_brings_the_longest_edge_to_512_or_less(width: int, height: int, step: int) -> None:
    assert step_for(width, height) == step
    assert -(-max(width, height) // step) <= MAX_EDGE


def test_render_paints_pending_pixels_grey_and_the_set_black() -> None:
    counts = np.zeros((64, 100), dtype=np.uint32)
    counts[:32] = 500  # the top half computed, inside the set
    counts[32:48] = 3  # escaped quickly
    img = Image.open(io.BytesIO(render(counts, max_iter=500)))
    assert img.size == (100, 64)
    assert img.getpixel((10, 10)) == (0, 0, 0)
    assert img.getpixel((10, 60)) == PENDING
    assert img.getpixel((10, 40)) not in ((0, 0, 0), PENDING)


def test_previews_survive_missing_partial_and_foreign_files(tmp_path: Path) -> None:
    previews = Previews(tmp_path)
    params = json.dumps({"width": 40, "height": 30, "max_iter": 50, "tile": 8})
    job_dir = tmp_path / "jobs" / "j1"
    assert previews.png("j1", params, 0) is None  # no directory at all
    job_dir.mkdir(parents=True)
    (job_dir / "counts.partial.npy").write_bytes(b"\x93NUMPY")  # being created: a truncated header
    assert previews.png("j1", params, 0) is None
    (job_dir / "counts.partial.npy").unlink()
    open_memmap(job_dir / "counts.partial.npy", mode="w+", dtype=np.uint32, shape=(10, 10)).flush()
    assert previews.png("j1", params, 0) is None  # not this job's shape
    assert previews.png("j1", "{not json", 0) is None
    assert previews.png("j1", json.dumps({"width": -1}), 0) is None
    (job_dir / "counts.partial.npy").unlink()
    canvas = open_memmap(job_dir / "counts.partial.npy", mode="w+", dtype=np.uint32, shape=(30, 40))
    canvas[:8, :8] = 50
    canvas.flush()
    first = previews.png("j1", params, 1)
    assert first is not None
    canvas[:8, 8:16] = 50
    canvas.flush()
    assert previews.png("j1", params, 1) == first, "cached per done count"
    second = previews.png("j1", params, 2)
    assert second is not None and second != first
    with Image.open(io.BytesIO(second)) as img:
        assert img.getpixel((12, 4)) == (0, 0, 0) and img.getpixel((30, 20)) == PENDING
    del canvas
    (job_dir / "counts.partial.npy").unlink()  # finalized: the raw output is read instead
    np.save(job_dir / "counts.npy", np.full((30, 40), 50, dtype=np.uint32))
    done = previews.png("j1", params, 3)
    assert done is not None
    with Image.open(io.BytesIO(done)) as img:
        assert img.getpixel((30, 20)) == (0, 0, 0)


def test_qr_svg_is_an_svg_of_one_path() -> None:
    svg = qr_svg("http://192.168.1.20:8000/agent?code=abc")
    assert svg.lstrip().startswith(b"<?xml") or svg.lstrip().startswith(b"<svg")
    assert b"<path" in svg


# ------------------------------------------------------------------ a real gateway


def sse_frames(url: str, n: int, *, headers: dict[str, str] | None = None, timeout: float = 30) -> list[dict[str, Any]]:
    """The first `n` frames of the live feed."""
    frames: list[dict[str, Any]] = []
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                frames.append(json.loads(line[len("data: ") :]))
                if len(frames) >= n:
                    break
    return frames


@pytest.fixture
def job(controller: Controller, r: Client, tmp_path: Path) -> Iterator[str]:
    """A Mandelbrot job with no nodes to run it: it stays unfinished until cancelled."""
    out = controller.cli("submit", "mandelbrot", "--width", "64", "--height", "64", "--tile", "16")
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 30
    while not (ids := r.zrange(keys.JOBS, 0, 0)):
        assert time.monotonic() < deadline, controller.logs()
        time.sleep(0.1)
    yield ids[0].decode()


def test_the_feed_is_status_for_anyone(controller: Controller, job: str) -> None:
    frames = sse_frames(f"{controller.url}/dashboard/events", 2)
    for frame in frames:
        assert set(frame) >= {"now", "nodes", "jobs", "events", "totals", "throughput"}
        assert [j["id"] for j in frame["jobs"]] == [job]
        assert frame["jobs"][0]["kind"] == "mandelbrot" and frame["jobs"][0]["image"] is True
    assert frames[1]["now"] - frames[0]["now"] == pytest.approx(1.0, abs=0.6), "about one frame a second"
    text = json.dumps(frames)
    assert controller.join_code not in text and TOKEN not in text, "the feed carries no secret"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/dashboard/join"), ("GET", "/dashboard/join.svg"), ("POST", "/jobs/{job}/cancel"),
     ("GET", "/jobs/{job}/preview.png")],
    ids=["join link", "join QR", "cancel", "preview"],
)  # fmt: skip
def test_operator_requests_are_refused_without_the_token(
    controller: Controller, r: Client, job: str, method: str, path: str
) -> None:
    url = controller.url + path.format(job=job)
    attempts = [({}, {}), (bearer("wrong"), {}), ({}, {"token": "wrong"}), ({"Authorization": "Bearer"}, {"token": ""})]
    for headers, params in attempts:
        resp = httpx.request(method, url, headers=headers, params=params, timeout=10)
        assert resp.status_code == 401, (headers, params, resp.text)
        assert "operator's token" in resp.json()["error"]
    assert r.hget(keys.job(job), "state") in (b"queued", b"running"), "a refused cancel changes nothing"


def test_join_link_and_qr_with_the_token(controller: Controller) -> None:
    resp = httpx.get(f"{controller.url}/dashboard/join", headers=bearer(), timeout=10)
    assert resp.status_code == 200
    assert resp.json()["url"] == f"{controller.url}/agent?code={controller.join_code}"
    qr = httpx.get(f"{controller.url}/dashboard/join.svg", params={"token": TOKEN}, timeout=10)
    assert qr.status_code == 200 and qr.headers["content-type"].startswith("image/svg+xml")
    assert b"<path" in qr.content


def test_cancel_with_the_token_cancels_the_job(controller: Controller, r: Client, job: str) -> None:
    assert httpx.post(f"{controller.url}/jobs/nope/cancel", headers=bearer(), timeout=10).status_code == 404
    resp = httpx.post(f"{controller.url}/jobs/{job}/cancel", headers=bearer(), timeout=10)
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 30
    while r.hget(keys.job(job), "state") != b"cancelled":
        assert time.monotonic() < deadline, controller.logs()
        time.sleep(0.1)
    again = httpx.post(f"{controller.url}/jobs/{job}/cancel", headers=bearer(), timeout=10)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]
    frame = sse_frames(f"{controller.url}/dashboard/events", 1)[0]
    assert frame["jobs"][0]["state"] == "cancelled"
    assert any(e["text"].startswith(f"job {job} cancelled") for e in frame["events"]), frame["events"]


def test_preview_of_a_job_with_no_canvas_yet_is_a_404_not_a_crash(controller: Controller, job: str) -> None:
    resp = httpx.get(f"{controller.url}/jobs/{job}/preview.png", headers=bearer(), timeout=10)
    assert resp.status_code == 404 and "no preview yet" in resp.json()["error"]
    other = httpx.get(f"{controller.url}/jobs/nope/preview.png", headers=bearer(), timeout=10)
    assert other.status_code == 404
    assert httpx.get(f"{controller.url}/healthz", timeout=10).status_code == 200


# ------------------------------------------------------------------ the feed itself


def test_one_reader_for_every_dashboard_and_none_while_nobody_looks(redis_url: str, r: Client) -> None:
    from processdistro.gateway.dashboard import DashboardFeed
    from processdistro.shared.store.connection import async_client

    async def scenario() -> None:
        client = async_client(redis_url)
        feed = DashboardFeed(client, node_timeout_s=10, every_s=0.05)
        try:
            seen: dict[str, list[float]] = {"a": [], "b": []}

            async def watch(name: str, n: int) -> None:
                async for text in feed.frames():
                    seen[name].append(json.loads(text)["now"])
                    if len(seen[name]) >= n:
                        break

            await asyncio.wait_for(asyncio.gather(watch("a", 4), watch("b", 4)), 10)
            assert feed.listeners == 0
            # the same frames (one read each), not a read per dashboard
            assert set(seen["a"]) & set(seen["b"]), seen
            await asyncio.sleep(0.2)
            assert feed._sampler is not None and feed._sampler.done(), "sampling stops with the last dashboard"

            later: list[str] = []

            async def follow() -> None:
                async for text in feed.frames():
                    later.append(text)

            task = asyncio.create_task(follow())
            await asyncio.sleep(0.3)
            assert later, "a new dashboard starts the sampling again"
            feed.close()
            await asyncio.wait_for(task, 2)  # close ends every stream
            assert [x async for x in feed.frames()] == [], "a closed feed streams nothing"
        finally:
            await feed.aclose()
            await client.aclose()

    run_async(scenario())


def test_an_open_feed_does_not_hold_a_stopping_gateway(controller: Controller) -> None:
    """uvicorn waits for open responses before it stops, and an event stream never ends by
    itself: SIGTERM must end the streams, not wait out the grace period and cancel them."""
    got_frame = threading.Event()

    def listen() -> None:
        url = f"{controller.url}/dashboard/events"
        with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", url, timeout=30) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    got_frame.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert got_frame.wait(20), controller.logs()
    gateway = controller.procs["gateway"]
    start = time.monotonic()
    gateway.send_signal(signal.SIGTERM)
    gateway.wait(timeout=10)
    took = time.monotonic() - start
    listener.join(5)
    assert not listener.is_alive(), "the stream ended"
    log = (controller.home / "gateway.log").read_text()
    assert took < 2.5, f"stopped in {took:.1f}s\n{log[-3000:]}"
    assert "timeout graceful shutdown exceeded" not in log and "Traceback" not in log, log[-3000:]
