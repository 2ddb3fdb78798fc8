"""The native worker (`processdistro worker`): real processes, real Redis, real wasmtime."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import wasmtime
from conftest import Controller
from mandel_ref import reference_counts
from nodes import run_async
from processdistro import client
from processdistro.shared import keys
from processdistro.shared.jobs import JobState
from processdistro.shared.redis_server import free_port
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import load_job
from processdistro.worker.device import claim_identity
from processdistro.worker.exceptions import DeadlineExceeded, MemoryCapReached, ModuleStatus
from processdistro.worker.join import parse_join_url
from processdistro.worker.pool import ExecutorPool
from processdistro.worker.runtime import MIB, Limits
from test_matmul import wait_job
from test_up import alive, children_of

ROOT = Path(__file__).resolve().parent.parent
MANDELBROT = ROOT / "static" / "wasm" / "mandelbrot.wasm"
MANDEL_SHA = hashlib.sha256(MANDELBROT.read_bytes()).hexdigest()

# ABI-shaped test modules: pd_run loops forever / grows memory until refused (then status 3).
ABI_TAIL = """
 (func (export "pd_alloc") (param i32) (result i32) i32.const 8)
 (func (export "pd_output_ptr") (result i32) i32.const 0)
 (func (export "pd_output_len") (result i32) i32.const 0))"""
LOOP_WAT = (
    """(module (memory (export "memory") 1)
 (func (export "pd_run") (param i32 i32) (result i32) (loop $l (br $l)) i32.const 0)"""
    + ABI_TAIL
)
GROW_WAT = (
    """(module (memory (export "memory") 1)
 (func (export "pd_run") (param i32 i32) (result i32)
   (block $refused (loop $l
     (br_if $refused (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
     (br $l)))
   i32.const 3)"""
    + ABI_TAIL
)


# ---------------------------------------------------------------------------- helpers


class Worker:
    """`python -m processdistro worker URL` as a child process, its output in a log file."""

    def __init__(self, ctl: Controller, home: Path, *args: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "worker.log"
        env = {**ctl.env, "PD_HOME": str(home)}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "processdistro", "worker", ctl.join_url, *args],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_connected(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "connected (" not in self.text():
            assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}\n{self.text()}"
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.05)

    def wait_children(self, n: int, timeout: float = 20) -> set[int]:
        deadline = time.monotonic() + timeout
        while len(kids := children_of(self.proc.pid)) < n:
            assert time.monotonic() < deadline, f"expected {n} executor processes\n{self.text()}"
            time.sleep(0.05)
        return kids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


def submit(ctl: Controller, tmp: Path, *params: str) -> subprocess.Popen[str]:
    return ctl.submit_mandelbrot(tmp, *params, "--timeout", "240")


def wait_progress(r: Client, at_least: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = r.zrange(keys.JOBS, 0, 0)
        if ids and int(r.hget(keys.job(ids[0].decode()), "done") or 0) >= at_least:
            return str(ids[0].decode())
        time.sleep(0.01)
    raise AssertionError("the job made no progress")


def all_dead(pids: set[int], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wat_module(tmp: Path, name: str, wat: str) -> tuple[str, Path]:
    data = wasmtime.wat2wasm(wat)
    path = tmp / f"{name}.wasm"
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), path


def tile_input(size: int = 64, max_iter: int = 300) -> bytes:
    return struct.pack("<4d8I", -2.0, 1.0, -1.5, 1.5, size, size, 0, 0, size, size, max_iter, 0)


def tile_reference(size: int = 64, max_iter: int = 300) -> bytes:
    return reference_counts(size, size, -2.0, 1.0, -1.5, 1.5, max_iter).astype("<u4").tobytes()


# ---------------------------------------------------------------------------- through the cluster


@pytest.mark.slow
def test_worker_completes_a_job_exactly(
    controller: Controller, tmp_path: Path, r: Client, workers: list[Worker]
) -> None:
    w = Worker(controller, tmp_path / "w1", "--cores", "2")
    workers.append(w)
    w.wait_connected()
    proc = submit(controller, tmp_path, "--width", "512", "--height", "384", "--tile", "64", "--max-iter", "300")
    assert proc.wait(240) == 0, (tmp_path / "submit.log").read_text() + w.text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), reference_counts(512, 384, -2.0, 1.0, -1.5, 1.5, 300))

    node_ids = [k.decode().rsplit(":", 1)[1] for k in r.scan_iter(match=keys.node("*"))]
    node = {k.decode(): v.decode() for k, v in r.hgetall(keys.node(node_ids[0])).items()}
    assert len(node_ids) == 1 and node["kind"] == "native" and node["cores"] == "2"
    assert node["browser"].startswith("wasmtime ") and node["os"], node
    assert float(node["score"]) > 1e6, "benchmark score missing or implausible"
    device_id = (tmp_path / "w1" / "worker-default.id").read_text().strip()
    assert node_ids == [device_id]
    # The module it benchmarked and was sent: the SIMD128 build (wasmtime validates SIMD128).
    simd = MANDELBROT.with_name("mandelbrot_simd.wasm").read_bytes()
    assert (tmp_path / "w1" / "modules" / f"{hashlib.sha256(simd).hexdigest()}.wasm").read_bytes() == simd

    # a restart keeps the identity
    w.proc.send_signal(signal.SIGINT)
    assert w.proc.wait(10) == 0, w.text()
    again = Worker(controller, tmp_path / "w1", "--cores", "1")
    workers.append(again)
    again.wait_connected()
    assert [k.decode().rsplit(":", 1)[1] for k in r.scan_iter(match=keys.node("*"))] == [device_id]


@pytest.mark.slow
def test_worker_runs_matmul_with_shared_blocks(
    controller: Controller, tmp_path: Path, r: Client, workers: list[Worker]
) -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((300, 200)), rng.standard_normal((200, 250))
    np.save(tmp_path / "A.npy", a)
    np.save(tmp_path / "B.npy", b)
    w = Worker(controller, tmp_path / "w", "--cores", "2")
    workers.append(w)
    w.wait_connected()
    job_id = client.submit(r, "matmul", {"a": str(tmp_path / "A.npy"), "b": str(tmp_path / "B.npy"), "tile": 64})
    deadline = time.monotonic() + 120
    while (job := load_job(r, job_id)) is None or not job.state.terminal:
        assert time.monotonic() < deadline, w.text() + controller.logs()
        time.sleep(0.1)
    assert job.state is JobState.DONE, job.error + w.text()
    expected = a @ b
    assert np.max(np.abs(np.load(job.outputs["c"]) - expected)) <= 1e-10 * np.max(np.abs(expected))


def test_worker_runs_hash_tasks_in_parts(
    controller: Controller, tmp_path: Path, r: Client, workers: list[Worker]
) -> None:
    """Once timed, the worker gets tasks of several parts (adaptive size) and runs them exactly."""
    from test_hash import write_rows

    rows = write_rows(tmp_path / "rows.csv", 300, with_ids=True)
    w = Worker(controller, tmp_path / "w", "--cores", "2")
    workers.append(w)
    w.wait_connected()
    bundled = int(r.hget(keys.STATS, "parts_bundled") or 0)
    job_id = client.submit(r, "hash", {"input": str(tmp_path / "rows.csv"), "iterations": 200, "batch": 3})
    job = wait_job(r, job_id, timeout=120)
    assert job.state is JobState.DONE, job.error + w.text() + controller.logs()
    assert int(r.hget(keys.STATS, "parts_bundled") or 0) > bundled, "no task of several parts was sent"
    with open(job.outputs["csv"], encoding="utf-8", newline="") as fh:
        out = list(csv.DictReader(fh))
    for want, got in zip(rows, out, strict=True):
        dk = hashlib.pbkdf2_hmac("sha256", want["password"].encode(), want["salt"].encode(), 200, 32)
        assert (got["id"], got["dk_hex"]) == (want["id"], dk.hex())


@pytest.mark.slow
def test_sigkilled_worker_tasks_go_to_another(
    controller: Controller, tmp_path: Path, r: Client, workers: list[Worker]
) -> None:
    # 1024 subtasks: enough that the kill lands mid-job
    size, tile, max_iter = 512, 16, 1000
    victim = Worker(controller, tmp_path / "victim", "--cores", "2")
    workers.append(victim)
    victim.wait_connected()
    executors = victim.wait_children(2)
    proc = submit(
        controller,
        tmp_path,
        "--width",
        str(size),
        "--height",
        str(size),
        "--tile",
        str(tile),
        "--max-iter",
        str(max_iter),
    )
    job_id = wait_progress(r, 40)
    victim.proc.kill()
    victim.proc.wait()
    done_at_kill = int(r.hget(keys.job(job_id), "done") or 0)
    assert done_at_kill < (size // tile) ** 2, "the job finished before the kill"
    assert all_dead(executors), "executor processes outlived their SIGKILLed worker"

    rescuer = Worker(controller, tmp_path / "rescuer", "--cores", "2", "--name", "rescuer")
    workers.append(rescuer)
    assert proc.wait(240) == 0, (tmp_path / "submit.log").read_text() + rescuer.text() + controller.logs()
    np.testing.assert_array_equal(
        np.load(tmp_path / "m.npy"), reference_counts(size, size, -2.0, 1.0, -1.5, 1.5, max_iter)
    )
    assert int(r.hget(keys.STATS, "tasks_requeued") or 0) >= 1, "the killed worker's tasks were not requeued"
    assert r.scard(keys.job_done(job_id)) == (size // tile) ** 2


def test_sigint_stops_cleanly(controller: Controller, tmp_path: Path, workers: list[Worker]) -> None:
    w = Worker(controller, tmp_path / "w", "--cores", "2")
    workers.append(w)
    w.wait_connected()
    kids = w.wait_children(2)
    started = time.monotonic()
    w.proc.send_signal(signal.SIGINT)
    assert w.proc.wait(5) == 0, w.text()
    assert time.monotonic() - started < 5
    assert all_dead(kids, timeout=0.5), "leftover executor processes"
    assert "stopped (" in w.text()


def test_wrong_join_code_exits_with_a_clear_message(controller: Controller, tmp_path: Path) -> None:
    env = {**controller.env, "PD_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "processdistro", "worker", f"{controller.url}/agent?code=nope-nope", "--cores", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "join code refused" in out.stdout + out.stderr


@pytest.mark.slow
def test_worker_reconnects_and_reports_again_after_a_gateway_restart(
    controller: Controller, tmp_path: Path, r: Client, workers: list[Worker]
) -> None:
    w = Worker(controller, tmp_path / "w", "--cores", "2")
    workers.append(w)
    w.wait_connected()
    proc = submit(controller, tmp_path, "--width", "512", "--height", "512", "--tile", "16", "--max-iter", "1000")
    wait_progress(r, 40)
    controller.kill("gateway")
    r.delete(keys.TOKEN_SECRET)  # the new gateway signs with a new secret: the old token is refused (4001)
    controller.start("gateway")
    assert proc.wait(240) == 0, (tmp_path / "submit.log").read_text() + w.text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), reference_counts(512, 512, -2.0, 1.0, -1.5, 1.5, 1000))
    text = w.text()
    assert "4001" in text and text.count("registered,") == 2, text
    assert len(list(r.scan_iter(match=keys.node("*")))) == 1, "the worker changed identity"


def test_banned_worker_exits_with_a_clear_message(
    controller: Controller, tmp_path: Path, r: Client, workers: list[Worker]
) -> None:
    w = Worker(controller, tmp_path / "w", "--cores", "1")
    workers.append(w)
    w.wait_connected()
    kids = children_of(w.proc.pid)
    device_id = (tmp_path / "w" / "worker-default.id").read_text().strip()
    r.hset(keys.node(device_id), "banned", "1")
    controller.kill("gateway")  # the ban takes effect at the next connect
    controller.start("gateway")
    assert w.proc.wait(30) == 2, w.text()
    assert "banned" in w.text()
    assert all_dead(kids)


def test_a_copied_device_id_is_a_new_node_and_displaces_nobody(
    controller: Controller, tmp_path: Path, workers: list[Worker]
) -> None:
    """Issue 9.4 changed this (the first worker used to be closed with 4002 and exit): an id
    copied without its secret gets a new identity; both workers keep running."""
    first = Worker(controller, tmp_path / "a", "--cores", "1")
    workers.append(first)
    first.wait_connected()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "worker-default.id").write_text((tmp_path / "a" / "worker-default.id").read_text())
    second = Worker(controller, tmp_path / "b", "--cores", "1")
    workers.append(second)
    second.wait_connected()
    time.sleep(2)
    assert first.proc.poll() is None and second.proc.poll() is None, first.text() + second.text()
    ids = [(tmp_path / d / "worker-default.id").read_text().strip() for d in ("a", "b")]
    assert ids[0] != ids[1], "the copy kept the first worker's id"
    assert "replaced" not in first.text()
    assert (tmp_path / "b" / "worker-default.secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_up_starts_local_workers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PD_REDIS_URL"}
    env.update({"PD_HOME": str(tmp_path / "home"), "PD_PORT": str(free_port()), "PD_HOST": "127.0.0.1"})
    with open(tmp_path / "up.log", "w") as fh:
        up = subprocess.Popen(
            [sys.executable, "-m", "processdistro", "up", "--workers", "2"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        logs = tmp_path / "home" / "logs"
        while not all(
            (logs / f"worker-{i}.log").exists() and "connected (" in (logs / f"worker-{i}.log").read_text()
            for i in (1, 2)
        ):
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.1)
        nodes = subprocess.run(
            [sys.executable, "-m", "processdistro", "nodes", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert nodes.stdout.count('"native"') == 2, nodes.stdout
        kids = children_of(up.pid)
        grandkids = set().union(*(children_of(k) for k in kids))
        up.send_signal(signal.SIGINT)
        assert up.wait(15) == 0
        assert all_dead(kids | grandkids), "orphaned processes"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


# ---------------------------------------------------------------------------- the executor itself


def test_deadline_stops_a_looping_module_and_the_executor_carries_on(tmp_path: Path) -> None:
    loop_sha, loop_path = wat_module(tmp_path, "loop", LOOP_WAT)

    async def scenario() -> None:
        pool = ExecutorPool(size=1, limits=Limits(deadline_s=0.5))
        try:
            out, _ = await pool.run("1-0", MANDEL_SHA, MANDELBROT, tile_input())
            assert out == tile_reference()
            before = pool.pids()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="0.5s deadline"):
                await pool.run("1-1", loop_sha, loop_path, b"")
            assert time.monotonic() - started < 3
            assert pool.pids() != before, "the overrun process was not replaced"
            out, _ = await pool.run("1-2", MANDEL_SHA, MANDELBROT, tile_input())
            assert out == tile_reference()
        finally:
            await pool.close()

    run_async(scenario())


def test_memory_cap_stops_unbounded_growth(tmp_path: Path) -> None:
    grow_sha, grow_path = wat_module(tmp_path, "grow", GROW_WAT)

    async def scenario() -> None:
        pool = ExecutorPool(size=1, limits=Limits(deadline_s=30, memory_bytes=32 * MIB))
        try:
            with pytest.raises(MemoryCapReached, match=r"memory at (\d+) MiB; the memory cap is 32 MiB") as info:
                await pool.run("1-0", grow_sha, grow_path, b"")
            assert int(str(info.value).split("memory at ")[1].split()[0]) <= 32
            out, _ = await pool.run("1-1", MANDEL_SHA, MANDELBROT, tile_input())
            assert out == tile_reference()
        finally:
            await pool.close()

    run_async(scenario())


def test_cancel_kills_the_run_and_replaces_the_process(tmp_path: Path) -> None:
    loop_sha, loop_path = wat_module(tmp_path, "loop", LOOP_WAT)

    async def scenario() -> None:
        pool = ExecutorPool(size=1, limits=Limits(deadline_s=60))
        try:
            before = set(pool.pids())
            task = asyncio.create_task(pool.run("1-0", loop_sha, loop_path, b""))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert set(pool.pids()).isdisjoint(before)
            assert all_dead(before)
            with pytest.raises(ModuleStatus, match="status 2"):  # max_iter fine, reserved field not 0
                await pool.run("1-1", MANDEL_SHA, MANDELBROT, tile_input()[:60] + b"\x01\x00\x00\x00")
            out, _ = await pool.run("1-2", MANDEL_SHA, MANDELBROT, tile_input())
            assert out == tile_reference()
        finally:
            await pool.close()

    run_async(scenario())


def test_identity_is_kept_per_name_and_never_shared(tmp_path: Path) -> None:
    first = claim_identity(tmp_path, None)
    second = claim_identity(tmp_path, None)
    assert (first.name, second.name) == ("default", "default-2")
    assert first.device_id != second.device_id
    first_id = first.device_id
    first.release()
    again = claim_identity(tmp_path, None)
    assert (again.name, again.device_id) == ("default", first_id)
    with pytest.raises(Exception, match="already running"):
        claim_identity(tmp_path, "default-2")
    for ident in (second, again):
        ident.release()


def test_parse_join_url() -> None:
    assert parse_join_url("http://10.0.0.2:30000/agent?code=abc23") == ("http://10.0.0.2:30000", "abc23")
    with pytest.raises(Exception, match="no join code"):
        parse_join_url("http://10.0.0.2:30000/agent")
