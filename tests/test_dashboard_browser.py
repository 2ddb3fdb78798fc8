"""The operator's dashboard in real Chromium (issue 10's acceptance): while a Mandelbrot job
runs on a browser tab and a native worker, /dashboard shows both nodes, the job with its
progress, the throughput chart and the image preview filling in, and it updates without
reloading; without the token it is status only (no cancel, no join link, no preview, a
cancel request refused), with it the cancel button cancels the job. Node and job text that
is markup is shown as text.

With PD_SCREENSHOTS=1 the desktop (1280 wide) and phone (390 wide) screenshots are written
to docs/img/dashboard-desktop.png and docs/img/dashboard-phone.png (`make screenshots`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from conftest import Controller
from processdistro.shared import keys
from processdistro.shared.messages import Fail
from processdistro.shared.store.commands import send_command
from processdistro.shared.store.connection import Client
from test_e2e_browser import close_all, join
from test_wasm_mixed import native, wait_nodes
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TOKEN = "op-" + "d" * 40
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


@pytest.fixture
def controller_env() -> dict[str, str]:
    return {"PD_OPERATOR_TOKEN": TOKEN}


@pytest.fixture
def pages() -> Iterator[list[Any]]:
    opened: list[Any] = []
    yield opened
    close_all(opened)


def open_dashboard(browser: Any, ctl: Controller, opened: list[Any], *, token: bool, width: int = 1280) -> Any:
    phone = width < 700
    context = browser.new_context(
        viewport={"width": width, "height": 844 if phone else 900}, is_mobile=phone, has_touch=phone
    )
    page = context.new_page()
    opened.append(page)
    page.goto(f"{ctl.url}/dashboard" + (f"#token={TOKEN}" if token else ""))
    page.wait_for_function("document.getElementById('feed-state').dataset.state === 'live'", timeout=20_000)
    return page


def job_progress(page: Any, job_id: str) -> tuple[str, float]:
    """(state, percent) of the job's row as the page shows it."""
    row = page.locator(f'#jobs-body tr[data-id="{job_id}"]')
    state = row.locator(".state").text_content() or ""
    percent = float(row.locator(".bar").get_attribute("aria-valuenow") or 0)
    return state, percent


def wait_until(what: str, check: Any, timeout: float, ctl: Controller) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} within {timeout}s\n{ctl.logs()}"
        time.sleep(0.2)
    return value


def screenshot(page: Any, tmp: Path, name: str) -> None:
    path = tmp / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("PD_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMG / name)


def test_dashboard_follows_a_job_on_a_tab_and_a_native_worker(
    controller: Controller,
    browser: Any,
    tmp_path: Path,
    r: Client,
    pages: list[Any],
    workers: list[Worker],  # noqa: F811
) -> None:
    tab = join(browser, controller)
    pages.append(tab)
    native(controller, tmp_path, workers)
    both = wait_nodes(r, 2)
    # long enough to watch (and to cancel) on a fast machine: 4096 tiles, many deep in the set
    proc = controller.submit_mandelbrot(
        tmp_path, "--width", "2048", "--height", "2048", "--tile", "32", "--max-iter", "100000", "--timeout", "900"
    )
    try:
        job_id = wait_until("the job is listed", lambda: r.zrange(keys.JOBS, 0, 0), 30, controller)[0].decode()
        page = open_dashboard(browser, controller, pages, token=True)

        # both nodes, one of each kind, in the node table
        page.wait_for_function("document.querySelectorAll('#nodes-body tr').length === 2", timeout=20_000)
        shown = {tr.get_attribute("data-id") for tr in page.locator("#nodes-body tr").all()}
        assert shown == both
        kinds = sorted(page.locator("#nodes-body tr td:nth-child(2)").all_text_contents())
        assert kinds == ["browser", "native"]

        # the job, with progress that moves while the page stays as it is
        wait_until("the job runs with progress", lambda: job_progress(page, job_id)[1] > 0, 120, controller)
        page.evaluate("window.__sameDocument = true")
        state, first = job_progress(page, job_id)
        assert state == "running"
        wait_until("the progress moves", lambda: job_progress(page, job_id)[1] > first, 120, controller)
        assert page.evaluate("window.__sameDocument === true"), "updated without a reload"
        assert (page.locator("#totals [data-total=nodes_live] .value").text_content() or "") == "2"
        busy = page.locator("#nodes-body .state").all_text_contents()
        assert set(busy) <= {"busy", "idle", "joined"}, busy

        # the chart draws the throughput; the preview fills in as tiles are merged
        page.wait_for_function(
            "Number(document.getElementById('chart').dataset.points) >= 3"
            " && document.querySelector('#chart polyline.line') !== null",
            timeout=30_000,
        )
        page.wait_for_function(
            f"(() => {{ const p = document.getElementById('preview');"
            f" return p.dataset.job === '{job_id}' && p.complete && p.naturalWidth === 512; }})()",
            timeout=30_000,
        )
        shown_done = int(page.locator("#preview").get_attribute("data-done") or 0)
        page.wait_for_function(
            f"Number(document.getElementById('preview').dataset.done) > {shown_done}", timeout=60_000
        )
        assert page.locator("#join-link").text_content() == controller.join_url
        assert page.locator("#join-qr").evaluate("img => img.complete && img.naturalWidth > 0")

        # the screenshots, with the image part filled in
        wait_until("a quarter of the job done", lambda: job_progress(page, job_id)[1] >= 25, 180, controller)
        page.wait_for_timeout(1500)  # the next preview and chart point
        screenshot(page, tmp_path, "dashboard-desktop.png")
        phone = open_dashboard(browser, controller, pages, token=True, width=390)
        phone.wait_for_function("document.getElementById('preview').naturalWidth > 0", timeout=30_000)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scrolling on a phone"
        screenshot(phone, tmp_path, "dashboard-phone.png")

        # without the token: status only, and a cancel request is refused
        guest = open_dashboard(browser, controller, pages, token=False)
        guest.wait_for_selector(f'#jobs-body tr[data-id="{job_id}"]', timeout=20_000)
        assert guest.locator("#nodes-body tr").count() == 2
        assert guest.locator("button.cancel").count() == 0
        assert not guest.locator("#join-panel").is_visible() and not guest.locator("#preview-panel").is_visible()
        status = guest.evaluate(f"fetch('/jobs/{job_id}/cancel', {{method: 'POST'}}).then(r => r.status)")
        assert status == 401
        assert r.hget(keys.job(job_id), "state") == b"running"

        # with it: the cancel button cancels the job, and the page says so
        page.on("dialog", lambda dialog: dialog.accept())
        page.locator(f'#jobs-body tr[data-id="{job_id}"] button.cancel').click()
        wait_until("the job is cancelled", lambda: r.hget(keys.job(job_id), "state") == b"cancelled", 30, controller)
        wait_until("the page shows it", lambda: job_progress(page, job_id)[0] == "cancelled", 20, controller)
        assert page.locator(f'#jobs-body tr[data-id="{job_id}"] button.cancel').count() == 0
        events = page.locator("#events").text_content() or ""
        assert f"job {job_id} cancelled" in events
        proc.wait(timeout=60)
        assert proc.returncode != 0, "submit --wait reports the cancelled job"

        # a finished job offers its outputs to the operator (`GET /jobs/<id>/outputs/<name>`)
        small = controller.cli("submit", "mandelbrot", "--width", "64", "--height", "64", "--wait", "-q")
        assert small.returncode == 0, small.stdout + small.stderr
        done_id = r.zrange(keys.JOBS, -1, -1)[0].decode()
        links = page.locator(f'#jobs-body tr[data-id="{done_id}"] a.download')
        wait_until("download links", lambda: links.count() == 2, 20, controller)
        hrefs = sorted(links.evaluate_all("links => links.map(a => a.getAttribute('href'))"))
        assert hrefs == [f"/jobs/{done_id}/outputs/{name}?token={TOKEN}" for name in ("image", "raw")]
        wait_until("the guest sees it done", lambda: job_progress(guest, done_id)[0] == "done", 20, controller)
        assert guest.locator(f'#jobs-body tr[data-id="{done_id}"] a.download').count() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


MARKUP_BROWSER = '<img src=x onerror="window.__pwned = 1">Chromium'
MARKUP_OS = "<script>window.__pwned = 2</script></td></tr><tr><td>forged"
MARKUP_REASON = '<b onmouseover="window.__pwned = 3">boom</b>'


def test_node_and_job_text_is_shown_as_text(controller: Controller, browser: Any, r: Client, pages: list[Any]) -> None:
    """A node whose browser and OS strings are markup, and a job failed with a markup reason:
    the dashboard shows them literally, builds no element from them, runs none of it."""
    report = {
        "join_code": controller.join_code,
        "device_id": "hostile-" + "m" * 20,
        "cores": 2,
        "kind": "browser",
        "browser": MARKUP_BROWSER,
        "os": MARKUP_OS,
    }
    accepted = httpx.post(f"{controller.url}/node-report", json=report, timeout=10)
    assert accepted.status_code == 200, accepted.text
    node_id = accepted.json()["node_id"]
    url = controller.url.replace("http", "ws", 1) + f"/ws?token={accepted.json()['token']}"
    stop = threading.Event()

    async def stay_connected() -> None:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "hello", "protocol": 2, "running": []}))
            while not stop.is_set():
                await ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
                await asyncio.sleep(0.3)

    connection = threading.Thread(target=lambda: asyncio.run(stay_connected()), daemon=True)
    connection.start()
    try:
        out = controller.cli("submit", "mandelbrot", "--width", "64", "--height", "64")
        assert out.returncode == 0, out.stderr
        job_id = wait_until("the job is listed", lambda: r.zrange(keys.JOBS, 0, 0), 30, controller)[0].decode()
        send_command(r, Fail(job_id=job_id, reason=MARKUP_REASON))
        wait_until("the job failed", lambda: r.hget(keys.job(job_id), "state") == b"failed", 30, controller)

        page = open_dashboard(browser, controller, pages, token=True)
        page.wait_for_selector(f'#nodes-body tr[data-id="{node_id}"]', timeout=20_000)
        page.wait_for_function(
            f"document.getElementById('events').textContent.includes('job {job_id} failed')", timeout=20_000
        )
        row = page.locator(f'#nodes-body tr[data-id="{node_id}"]')
        assert row.locator("td.agent").first.text_content() == f"{MARKUP_BROWSER} / {MARKUP_OS}"
        assert MARKUP_REASON in (page.locator("#events").text_content() or "")
        job_state = page.locator(f'#jobs-body tr[data-id="{job_id}"] td[data-label="state"]')
        assert job_state.get_attribute("title") == MARKUP_REASON
        built = page.evaluate(
            "document.querySelectorAll('main img:not(#preview):not(#join-qr), main script, main b').length"
        )
        assert built == 0, "no element made from node or job text"
        assert page.locator("#nodes-body tr").count() == 1, "no row forged"
        page.wait_for_timeout(1500)  # a frame or two more, for anything delayed
        assert page.evaluate("window.__pwned === undefined")
    finally:
        stop.set()
        connection.join(10)
