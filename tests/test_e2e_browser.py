"""End to end: real Chromium pages join through the join link, a Mandelbrot job submitted
with the CLI completes, and its raw counts equal an independent NumPy computation."""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Controller
from mandel_ref import reference_counts
from PIL import Image
from processdistro.shared import keys
from processdistro.shared.store.connection import Client

pytestmark = [pytest.mark.browser, pytest.mark.slow]

W = H = 1024
MAX_ITER = 500


@functools.cache
def expected() -> np.ndarray:
    return reference_counts(W, H, -2.0, 1.0, -1.5, 1.5, MAX_ITER)


def join(browser: Any, ctl: Controller) -> Any:
    """A fresh browser context per page: its own localStorage, so its own device id."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(ctl.join_url)
    page.click("#join")
    page.wait_for_function("document.getElementById('state').textContent.trim() === 'connected'", timeout=20_000)
    return page


def start_job(ctl: Controller, out: Path, tile: int) -> subprocess.Popen[str]:
    with open(out / "submit.log", "w") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "processdistro",
                "submit",
                "mandelbrot",
                "--width",
                str(W),
                "--height",
                str(H),
                "--max-iter",
                str(MAX_ITER),
                "--tile",
                str(tile),
                "-o",
                str(out / "m.png"),
                "--raw",
                str(out / "counts.npy"),
                "--wait",
                "--timeout",
                "240",
            ],
            env=ctl.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def check_outputs(ctl: Controller, proc: subprocess.Popen[str], out: Path) -> None:
    proc.wait(timeout=260)
    assert proc.returncode == 0, (out / "submit.log").read_text() + ctl.logs()
    counts = np.load(out / "counts.npy")
    assert counts.dtype == np.uint32 and counts.shape == (H, W)
    np.testing.assert_array_equal(counts, expected())
    with Image.open(out / "m.png") as img:
        img.load()
        assert img.size == (W, H) and img.mode == "RGB"
        # the set itself (centre-left of the default view) is black
        assert img.getpixel((W // 2 - 100, H // 2)) == (0, 0, 0)


def close_all(pages: list[Any]) -> None:
    for p in pages:
        if not p.is_closed():
            p.context.close()


def test_two_pages_render_mandelbrot(controller: Controller, browser: Any, tmp_path: Path, r: Client) -> None:
    expected()  # compute the reference before the clock matters
    pages = [join(browser, controller), join(browser, controller)]
    try:
        proc = start_job(controller, tmp_path, tile=128)
        check_outputs(controller, proc, tmp_path)
        done = [int(p.locator("#tasks-done").text_content() or 0) for p in pages]
        assert sum(done) >= 64 and all(d > 0 for d in done), f"both pages should compute: {done}"
    finally:
        close_all(pages)


def test_page_closed_mid_job(controller: Controller, browser: Any, tmp_path: Path, r: Client) -> None:
    expected()
    pages = [join(browser, controller), join(browser, controller)]
    try:
        proc = start_job(controller, tmp_path, tile=32)  # 1024 tiles: plenty left when we close
        deadline = time.monotonic() + 120
        job_id = None
        while time.monotonic() < deadline:
            ids = r.zrange(keys.JOBS, 0, 0)
            if ids:
                job_id = ids[0].decode()
                if int(r.hget(keys.job(job_id), "done") or 0) >= 200:
                    break
            time.sleep(0.05)
        assert job_id is not None
        done_before = int(r.hget(keys.job(job_id), "done") or 0)
        assert done_before < 1024, "job finished before a page could be closed"
        closed_page_done = int(pages[0].locator("#tasks-done").text_content() or 0)
        pages[0].context.close()
        check_outputs(controller, proc, tmp_path)
        assert r.hget(keys.job(job_id), "finalized") == b"1"
        assert closed_page_done > 0, "the closed page never computed"
    finally:
        close_all(pages)
