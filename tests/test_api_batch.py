"""`pd.map` of a pd-ABI module against real services and two real native workers: the inputs
go many to a subtask as one batch (shared/pd_batch.py), which a node runs in one call when the
module exports `pd_run_batch` (examples/rust_rot13) and one `pd_run` per input when it does
not; every output equal to the module's specification computed in Python, replication
comparing whole batches, and an input whose status is not 0 named by JobFailed."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pytest
import wasmtime
from conftest import Controller
from processdistro import JobFailed, MapJob, connect
from processdistro.shared.jobs import JobState
from processdistro.shared.store.connection import Client
from processdistro.shared.tasks.wasm import BATCH_RUNS
from test_api import two_workers
from test_examples_rust import build, rot13
from test_wasm_batch import ECHO_WAT
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture


def test_map_of_a_pd_abi_module_runs_its_inputs_in_batches(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    wasm = build()
    two_workers(controller, tmp_path, workers)
    rng = random.Random(11)
    n = 2 * BATCH_RUNS + 700
    inputs = [rng.randbytes(rng.randrange(0, 120)) for _ in range(n)]
    with connect(controller.redis_url, home=controller.home) as pd:
        job = pd.map(wasm, iter(inputs), replicate=0.5, timeout=60)  # half the batches run twice
        results = job.results(timeout=240)
        progress = job.progress
        again = pd.job(job.id)
        assert isinstance(again, MapJob) and again.batch and again.results(timeout=30) == results
        before = pd.map(wasm, inputs[:40], replicate=0, batch=False)  # one input per subtask
        assert before.results(timeout=120) == [rot13(x) for x in inputs[:40]]
        assert before.progress.total == 40
    bad = [i for i in range(n) if results[i] != rot13(inputs[i])]
    assert not bad, f"{len(bad)} wrong outputs, first {bad[0]}"
    assert progress.state is JobState.DONE and progress.total == progress.done == math.ceil(n / BATCH_RUNS)
    assert len(list((job.outdir / "packed").iterdir())) == progress.total
    manifest = job.manifest()
    assert [m["index"] for m in manifest] == list(range(n))
    assert all(m["exit_code"] == 0 for m in manifest)
    for i in range(0, n, 331):
        assert manifest[i]["sha256"] == hashlib.sha256(rot13(inputs[i])).hexdigest()
        assert manifest[i]["bytes"] == len(inputs[i])


def test_an_input_with_a_bad_status_fails_the_map_naming_it(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    module = wasmtime.wat2wasm(ECHO_WAT.replace("BATCH", ""))  # no pd_run_batch: one pd_run each
    two_workers(controller, tmp_path, workers)
    fine = [b"input %d" % i for i in range(3000)]
    with connect(controller.redis_url, home=controller.home) as pd:
        assert pd.map(module, fine, replicate=0).results(timeout=180) == fine  # it echoes
        inputs = list(fine)
        inputs[2500] = b"bad one"
        with pytest.raises(JobFailed) as failed:
            pd.map(module, inputs, replicate=0).results(timeout=180)
    assert failed.value.state is JobState.FAILED
    assert "input '2500' exited with code 2; stderr ends: pd_run returned status 2 (bad parameters)" in str(
        failed.value
    )
