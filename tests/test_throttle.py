"""`processdistro worker --throttle F`: the worker really behaves like a device F x slower."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Controller
from processdistro.shared import keys
from processdistro.shared.store.connection import Client
from test_worker import Worker, submit, workers  # noqa: F401 - `workers` is a fixture


def test_throttled_worker_takes_a_smaller_share_of_a_shared_job(
    controller: Controller,
    tmp_path: Path,
    r: Client,
    workers: list[Worker],  # noqa: F811
) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "processdistro", "worker", controller.join_url, "--throttle", "0.5"],
        env={**controller.env, "PD_HOME": str(tmp_path / "refused")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "--throttle" in refused.stdout + refused.stderr

    fast = Worker(controller, tmp_path / "fast", "--cores", "1")
    slow = Worker(controller, tmp_path / "slow", "--cores", "1", "--throttle", "3")
    workers += [fast, slow]
    fast.wait_connected()
    slow.wait_connected()
    # 32 tiles inside the set: every tile costs the same (64*64*5000 iterations, ~0.1 s)
    view = ("--xmin", "-0.3", "--xmax", "-0.1", "--ymin", "-0.1", "--ymax", "0.1")
    proc = submit(
        controller, tmp_path, "--width", "512", "--height", "256", "--tile", "64", "--max-iter", "5000", *view
    )
    assert proc.wait(240) == 0, (tmp_path / "submit.log").read_text() + controller.logs()

    def completed(w: Worker) -> int:
        node_id = (w.log.parent / "worker-default.id").read_text().strip()
        return int(r.hget(keys.node(node_id), "completed") or 0)

    n_fast, n_slow = completed(fast), completed(slow)
    assert n_fast + n_slow == 32
    # unthrottled they would split about evenly; at 3x slower the slow one gets about a quarter
    assert n_fast >= 2 * n_slow, f"fast {n_fast}, throttled {n_slow}\n{slow.text()}"
