"""Issue 9.7: finalize is idempotent, and a full disk fails a job without losing its work.

Real processes: the controller's services, a native worker (wasmtime), the CLI. Every job's
data directory is a small tmpfs of its own (mounted here: the tests run as root), so a
test can fill the disk for real."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import wasmtime
from conftest import Controller
from mandel_ref import reference_counts
from processdistro import client
from processdistro.aggregator.finalize import finalize
from processdistro.shared import keys
from processdistro.shared.jobs import JobRecord, JobState
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import load_job
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture

DISK = 8 * 1024 * 1024
MANDEL = {"width": 96, "height": 80, "max_iter": 200, "tile": 16}

# a WASI command that writes "hello\n" to stdout
HELLO_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""


@pytest.fixture
def data_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of `DISK` bytes as the controller's data directory (PD_DATA_DIR)."""
    mnt = tmp_path / "data"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def controller_env(data_disk: Path) -> dict[str, str]:
    return {"PD_DATA_DIR": str(data_disk)}


def wait_for(
    r: Client, job_id: str, pred: Callable[[JobRecord], bool], ctl: Controller, timeout: float = 180
) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = load_job(r, job_id)
        if job is not None and pred(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: condition not met in {timeout}s\n{ctl.logs()}")


def files_of(outputs: dict[str, str]) -> dict[str, bytes]:
    """Every output file's bytes, by path (a directory output: each file under it)."""
    found: dict[str, bytes] = {}
    for path in map(Path, outputs.values()):
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                found[str(f)] = f.read_bytes()
    return found


def lose_the_done_write(r: Client, job: JobRecord) -> None:
    """What Redis holds if it lost its last second of writes: the job still finalizing, as
    the finalizer left it right before its `done` (its clean-up, on disk, stays done)."""
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.job(job.id), mapping={"state": JobState.FINALIZING.value, "finalized": 0, "finished": ""})
    pipe.hdel(keys.job(job.id), "outputs")
    pipe.zadd(keys.ACTIVE_JOBS, {job.id: -job.priority * 1e10 + job.created})
    pipe.execute()


def submit_kind(kind: str, r: Client, tmp: Path) -> str:
    if kind == "mandelbrot":
        return client.submit(r, "mandelbrot", dict(MANDEL))
    if kind == "matmul":
        rng = np.random.default_rng(5)
        np.save(tmp / "a.npy", rng.standard_normal((30, 20)))
        np.save(tmp / "b.npy", rng.standard_normal((20, 25)))
        return client.submit(r, "matmul", {"a": str(tmp / "a.npy"), "b": str(tmp / "b.npy"), "tile": 8})
    if kind == "hash":
        with open(tmp / "in.csv", "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["id", "password", "salt"])
            out.writerows([f"u{i}", f"pw{i}", f"s{i % 7}"] for i in range(40))
        return client.submit(r, "hash", {"input": str(tmp / "in.csv"), "iterations": 100, "dklen": 16, "batch": 8})
    if kind == "crack":
        words = [f"w{i}" for i in range(300)]
        words[250] = "hunter2"
        (tmp / "words.txt").write_text("\n".join(words) + "\n")
        target = hashlib.pbkdf2_hmac("sha256", b"hunter2", b"s", 50, 32).hex()
        params = {"target": target, "salt": "s", "iterations": 50, "wordlist": str(tmp / "words.txt"), "chunk": 200}
        return client.submit(r, "crack", params)
    assert kind == "wasm"
    module = bytes(wasmtime.wat2wasm(HELLO_WAT))
    return client.submit(r, "wasm", {"module": module, "program": "hello.wasm", "count": 6, "outdir": str(tmp / "w")})


@pytest.mark.parametrize("kind", ["mandelbrot", "matmul", "hash", "crack", "wasm"])
def test_finalize_twice_gives_the_same_files(
    kind: str,
    tmp_path: Path,
    r: Client,
    controller: Controller,
    data_disk: Path,
    workers: list[Worker],  # noqa: F811
) -> None:
    """Issue 9.7: a finalize run again (a crash between its clean-up and the `done` write,
    or Redis losing its last second of writes) rebuilt the outputs from the merged work its
    clean-up had removed: Mandelbrot a zeroed canvas, crack "not found", hash keys of zeros.
    Fix: the merged work is removed only after `done` is recorded, and a finalize keeps the
    outputs already written: the same files, byte for byte, however often it runs."""
    workers.append(Worker(controller, tmp_path / "w1", "--cores", "2"))
    job_id = submit_kind(kind, r, tmp_path)
    job = wait_for(r, job_id, lambda j: j.state.terminal, controller)
    assert job.state is JobState.DONE, job.error + controller.logs()
    first = files_of(job.outputs)
    assert first and all(first.values()), first.keys()

    # the rq function again, on the job it finished: nothing to do
    assert finalize(r, job_id, data_disk) == "skipped (done)"
    # Redis forgot the `done`: the aggregators' sweep finds it finalizing and runs it again
    lose_the_done_write(r, job)
    again = wait_for(r, job_id, lambda j: j.state is not JobState.FINALIZING, controller, timeout=60)
    assert again.state is JobState.DONE and again.finalized == 1, again.error + controller.logs()
    assert again.outputs == job.outputs
    assert files_of(again.outputs) == first
    # and once more in this process, straight after a crash that lost the `done` again
    lose_the_done_write(r, again)
    assert finalize(r, job_id, data_disk) == "done"
    assert files_of(job.outputs) == first
    if kind == "mandelbrot":  # a crash between its two outputs: the image is made again, the same
        Path(job.outputs["image"]).unlink()
        lose_the_done_write(r, again)
        assert finalize(r, job_id, data_disk) == "done"
        assert files_of(job.outputs) == first
    if kind == "crack":  # with neither its output nor its merged work: a clear failure, never "not found"
        Path(job.outputs["json"]).unlink()
        lose_the_done_write(r, again)
        assert finalize(r, job_id, data_disk) == "failed"
        failed = load_job(r, job_id)
        assert failed is not None and failed.state is JobState.FAILED
        assert "finalize failed: MergedWorkGone: no merged chunk record" in failed.error


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves about `leave` bytes free on `disk`."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(ballast, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(0, free - leave))
    return ballast


@pytest.mark.parametrize("where", ["finalize", "merge"])
def test_disk_full_fails_the_job_keeps_the_work_and_retry_finishes(
    where: str,
    tmp_path: Path,
    r: Client,
    controller: Controller,
    data_disk: Path,
    workers: list[Worker],  # noqa: F811
) -> None:
    """Issue 9.7: a full disk in finalize dropped the merged work with the failure (and in
    merge crash-looped the aggregator). Fix: the job fails with "disk full" as its reason,
    the aggregator carries on; a finalize keeps the merged work and its blocks, and
    `processdistro retry JOB`, once space is freed, finishes it with the exact output."""
    pids = {name: controller.procs[name].pid for name in ("scheduler", "aggregator")}
    params = {"width": 400, "height": 300, "max_iter": 100, "tile": 50}
    canvas = params["width"] * params["height"] * 4  # the merged counts; the raw output is as big
    # room for the merged canvas but not for the raw output too; or not even for the canvas
    ballast = fill(data_disk, canvas + 200_000 if where == "finalize" else canvas // 2)
    job_id = client.submit(r, "mandelbrot", params)
    workers.append(Worker(controller, tmp_path / "w1", "--cores", "2"))
    failed = wait_for(r, job_id, lambda j: j.state.terminal, controller)
    assert failed.state is JobState.FAILED, controller.logs()
    assert "disk full: no space left" in failed.error, failed.error
    assert failed.error.startswith("finalize failed" if where == "finalize" else "subtask "), failed.error
    for name, pid in pids.items():
        assert controller.procs[name].poll() is None and controller.procs[name].pid == pid, controller.logs()
    expected = reference_counts(params["width"], params["height"], -2.0, 1.0, -1.5, 1.5, params["max_iter"])
    partial = data_disk / "jobs" / job_id / "counts.partial.npy"
    if where == "merge":
        assert not partial.exists()  # never created: nothing half-written left behind
        assert controller.cli("retry", job_id).returncode == 1  # only a failed finalize is retried
        ballast.unlink()
        again = client.submit(r, "mandelbrot", params)  # the aggregator is fine once there is room
        done = wait_for(r, again, lambda j: j.state.terminal, controller)
        assert done.state is JobState.DONE and np.array_equal(np.load(done.outputs["raw"]), expected), done.error
        return
    assert "processdistro retry" in failed.error, failed.error
    assert np.array_equal(np.load(partial), expected)  # the merged work is all there
    assert not list((data_disk / "jobs" / job_id).glob(".*tmp"))  # no half-written temporary
    ballast.unlink()
    retried = controller.cli("retry", job_id)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    done = wait_for(r, job_id, lambda j: j.state.terminal, controller, timeout=60)
    assert done.state is JobState.DONE and done.finalized == 1 and done.error == "", done.error + controller.logs()
    assert np.array_equal(np.load(done.outputs["raw"]), expected)
    assert Path(done.outputs["image"]).stat().st_size > 0
    assert not partial.exists()  # cleaned up once done
    assert controller.cli("retry", job_id).returncode == 1  # a done job is not retried
    shown = {j["id"]: j for j in json.loads(controller.cli("jobs", "--json").stdout)}
    assert shown[job_id]["state"] == "done" and shown[job_id]["error"] == ""
