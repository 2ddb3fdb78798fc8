"""Matmul end to end: odd shapes, browser pages compute, the result equals NumPy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Controller
from processdistro import client
from processdistro.shared import keys
from processdistro.shared.exceptions import ParamsError
from processdistro.shared.jobs import JobState
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import load_job
from processdistro.shared.tasks import get_plugin
from test_e2e_browser import close_all, join


def wait_job(r: Client, job_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = load_job(r, job_id)
        if job is not None and job.state.terminal:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.browser
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_odd_shapes_in_browsers(controller: Controller, browser: Any, tmp_path: Path, r: Client, dtype: Any) -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((700, 300)).astype(dtype)
    b = rng.standard_normal((300, 500)).astype(dtype)
    np.save(tmp_path / "A.npy", a)
    np.save(tmp_path / "B.npy", b)
    pages = [join(browser, controller), join(browser, controller)]
    try:
        job_id = client.submit(r, "matmul", {"a": str(tmp_path / "A.npy"), "b": str(tmp_path / "B.npy"), "tile": 128})
        job = wait_job(r, job_id)
        assert job.state is JobState.DONE, job.error + controller.logs()
        c = np.load(job.outputs["c"])
        assert c.dtype == dtype and c.shape == (700, 500)
        expected = a.astype(np.float64) @ b.astype(np.float64)
        tol = 1e-10 if dtype == np.float64 else 1e-5
        assert np.max(np.abs(c - expected)) <= tol * np.max(np.abs(expected))
        assert not r.keys(keys.job_blocks(job_id)), "blocks of a finished job must be freed"
    finally:
        close_all(pages)


def test_refused_at_submit(tmp_path: Path) -> None:
    np.save(tmp_path / "A.npy", np.ones((3, 4)))
    np.save(tmp_path / "B.npy", np.ones((5, 2)))
    np.save(tmp_path / "V.npy", np.ones(5))
    plugin = get_plugin("matmul")
    with pytest.raises(ParamsError, match=r"shapes do not multiply: A is 3x4 and B is 5x2"):
        plugin.prepare({"a": str(tmp_path / "A.npy"), "b": str(tmp_path / "B.npy")})
    with pytest.raises(ParamsError, match="2-D"):
        plugin.prepare({"a": str(tmp_path / "V.npy"), "b": str(tmp_path / "B.npy")})
    with pytest.raises(ParamsError, match="cannot read A"):
        plugin.prepare({"a": str(tmp_path / "missing.npy"), "b": str(tmp_path / "B.npy")})


def test_freivalds_catches_a_wrong_tile() -> None:
    import random

    plugin = get_plugin("matmul")
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 3))
    params = plugin.parse_params(
        {"m": 5, "k": 7, "n": 3, "dtype": "float64", "tile": 8, "a_blocks": ["x"], "b_blocks": ["y"]}
    )
    task_input = next(plugin.split(params)).input + a.tobytes() + b.tobytes()
    good = (a @ b).tobytes()
    assert plugin.verify(params, 0, task_input, good, random.Random(0)).value == "accept"
    bad = a @ b
    bad[2, 1] += 1e-6
    assert plugin.verify(params, 0, task_input, bad.tobytes(), random.Random(0)).value == "reject"
    assert plugin.verify(params, 0, task_input, good[:-8], random.Random(0)).value == "reject"


def test_simd_nodes_get_the_simd_build(controller: Controller, tmp_path: Path, r: Client) -> None:
    import asyncio

    import httpx
    from nodes import Node, run_async

    np.save(tmp_path / "A.npy", np.ones((4, 3)))
    np.save(tmp_path / "B.npy", np.ones((3, 2)))
    modules = httpx.get(f"{controller.url}/api/modules").json()
    seen: dict[str, str] = {}

    async def grab(simd: bool) -> None:
        import json as _json

        import websockets

        node = Node(controller.url, controller.join_code)
        resp = httpx.post(
            f"{controller.url}/node-report",
            json={"join_code": controller.join_code, "device_id": node.device_id, "cores": 1, "simd": simd},
        )
        token = resp.json()["token"]
        async with websockets.connect(controller.url.replace("http", "ws") + f"/ws?token={token}") as ws:
            await ws.send(_json.dumps({"type": "ready", "free": 1}))
            while True:
                msg = _json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] == "task":
                    seen["simd" if simd else "scalar"] = msg["module_sha256"]
                    return

    for simd in (True, False):
        client.submit(r, "matmul", {"a": str(tmp_path / "A.npy"), "b": str(tmp_path / "B.npy")})
        run_async(grab(simd))
    assert seen == {"simd": modules["matrix_mul_simd"]["sha256"], "scalar": modules["matrix_mul"]["sha256"]}
