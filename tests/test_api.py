"""The Python API (`processdistro.connect`, `pd.map`, `pd.submit`) against real services and
real native workers: a tiny C program compiled to WASI at test time, mapped over 10,000
lines, every output equal to a Python computation of the same function (and to the
program's native build on a sample); a failing input named by JobFailed; a generator
streamed into Redis in bounded memory; cancel; any kind through `submit`."""

from __future__ import annotations

import json
import math
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Controller
from processdistro import JobFailed, MapJob, connect
from processdistro.shared import keys
from processdistro.shared.exceptions import ConfigError, JobNotFound, ParamsError
from processdistro.shared.jobs import JobState
from processdistro.shared.redis_server import free_port
from processdistro.shared.store.connection import Client
from processdistro.shared.tasks.wasm import GROUP_RUNS
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture

SHOUT_C = r"""
#include <ctype.h>
#include <stdio.h>
#include <string.h>
/* stdin upper-cased and reversed, then a space and its length; "fail..." exits 3 */
int main(void) {
  static char buf[65536];
  size_t n = fread(buf, 1, sizeof buf, stdin);
  if (n >= 4 && memcmp(buf, "fail", 4) == 0) { fprintf(stderr, "cannot take %.*s", (int)n, buf); return 3; }
  for (size_t i = 0; i < n; i++) buf[i] = (char)toupper((unsigned char)buf[i]);
  for (size_t i = 0; i < n / 2; i++) { char t = buf[i]; buf[i] = buf[n - 1 - i]; buf[n - 1 - i] = t; }
  fwrite(buf, 1, n, stdout);
  printf(" %zu\n", n);
  return 0;
}
"""


def shout(data: bytes) -> bytes:
    """What SHOUT_C prints for `data`."""
    return data.upper()[::-1] + b" %d\n" % len(data)


@pytest.fixture
def shout_wasm(tmp_path: Path) -> Path:
    src = tmp_path / "shout.c"
    src.write_text(SHOUT_C)
    wasm = tmp_path / "shout.wasm"
    subprocess.run(["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", wasm, src], check=True)
    return wasm


def two_workers(ctl: Controller, tmp: Path, started: list[Worker]) -> None:
    for i in range(2):
        started.append(Worker(ctl, tmp / f"w{i}", "--cores", "1"))
    for w in started:
        w.wait_connected()


def blocks_in_redis(r: Client) -> int:
    return sum(1 for _ in r.scan_iter(match=keys.block("*", "*"), count=1000))


def test_map_over_10000_inputs_returns_every_output_in_order(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
    shout_wasm: Path,
) -> None:
    two_workers(controller, tmp_path, workers)
    n = 10_000
    lines = [f"line {i}: the quick brown fox jumps over {i % 97} lazy dogs".encode() for i in range(n)]

    def inputs() -> Iterator[bytes]:
        yield from lines

    with connect(controller.redis_url, home=controller.home) as pd:
        job = pd.map(shout_wasm, inputs(), replicate=0.05, timeout=60)
        seen: dict[int, bytes] = {}
        for index, output in job.as_completed(timeout=240):
            assert index not in seen, f"index {index} yielded twice"
            seen[index] = output
        assert sorted(seen) == list(range(n)), controller.logs()
        results = job.results(timeout=60)
        progress = job.progress
        again = pd.job(job.id)  # as another process would find it
        assert isinstance(again, MapJob) and again.results(timeout=60) == results
    assert len(results) == n
    bad = [i for i in range(n) if results[i] != shout(lines[i])]
    assert not bad, f"{len(bad)} wrong outputs, first {bad[0]}: {results[bad[0]]!r}"
    assert all(seen[i] == results[i] for i in range(n))
    # many small inputs share a subtask, and its outputs one file
    assert progress.state is JobState.DONE and progress.total == progress.done == math.ceil(n / GROUP_RUNS)
    assert len(list((job.outdir / "packed").iterdir())) == progress.total
    assert not (job.outdir / "out").exists()
    # and the program's native build agrees on a sample
    native = tmp_path / "shout"
    subprocess.run(["clang", "-O2", "-o", native, tmp_path / "shout.c"], check=True)
    for i in range(0, n, 997):
        assert subprocess.run([native], input=lines[i], capture_output=True).stdout == results[i], i


def test_map_with_files_writes_a_file_per_input(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
    shout_wasm: Path,
) -> None:
    two_workers(controller, tmp_path, workers)
    inputs = [f"input {i}".encode() for i in range(500)]
    with connect(controller.redis_url, home=controller.home) as pd:
        job = pd.map(shout_wasm, inputs, replicate=0, files=True)
        results = job.results(timeout=180)
        assert results == [shout(x) for x in inputs]
        assert pd.job(job.id).results(timeout=10) == results  # found again: still the per-input files
    assert sorted(int(p.name) for p in (job.outdir / "out").iterdir()) == list(range(len(inputs)))
    assert (job.outdir / "out" / "7").read_bytes() == shout(inputs[7])
    assert not (job.outdir / "packed").exists()
    manifest = job.manifest()
    assert [m["index"] for m in manifest] == list(range(len(inputs))) and manifest[7]["exit_code"] == 0


def test_a_failing_input_raises_job_failed_naming_it_and_submit_takes_any_kind(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
    shout_wasm: Path,
) -> None:
    two_workers(controller, tmp_path, workers)
    inputs = [f"ok {i}" for i in range(300)]
    inputs[137] = "fail here"
    with connect(controller.redis_url, home=controller.home) as pd:
        job = pd.map(shout_wasm.read_bytes(), inputs, replicate=0)
        with pytest.raises(JobFailed) as failed:
            job.results(timeout=180)
        assert failed.value.state is JobState.FAILED
        assert "input '137' exited with code 3; stderr ends: cannot take fail here" in str(failed.value)

        image = pd.submit("mandelbrot", width=64, height=48, tile=16, max_iter=50).wait(timeout=120)
        assert image.kind == "mandelbrot" and Path(image.outputs["image"]).stat().st_size > 0
        last_command = r.xinfo_stream(keys.COMMANDS)["last-generated-id"]
        with pytest.raises(ParamsError, match="tile"):
            pd.submit("mandelbrot", width=64, tile=1)
        with pytest.raises(ParamsError, match="not WebAssembly"):
            pd.map(b"hello", ["x"])
        assert r.xinfo_stream(keys.COMMANDS)["last-generated-id"] == last_command  # refused: nothing sent
    assert blocks_in_redis(r) == 0  # nor stored


def test_a_generator_is_streamed_in_bounded_memory_and_a_job_can_be_cancelled(
    tmp_path: Path, r: Client, controller: Controller, shout_wasm: Path
) -> None:
    n, size = 20_000, 4096  # 80 MiB of inputs
    consumed = 0
    stored_before_the_end: list[int] = []

    def inputs() -> Iterator[bytes]:
        nonlocal consumed
        for i in range(n):
            if i == n - 1:  # streamed: the earlier inputs are in Redis before the last is read
                stored_before_the_end.append(blocks_in_redis(r))
            consumed += 1
            yield i.to_bytes(4, "little") * (size // 4)

    with connect(controller.redis_url, home=controller.home) as pd:
        tracemalloc.start()
        try:
            job = pd.map(shout_wasm, inputs())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert consumed == n and job.inputs == n
        assert stored_before_the_end[0] > 0
        assert peak < n * size / 4, f"peak {peak / 2**20:.1f} MiB for {n * size / 2**20:.0f} MiB of inputs"
        job.cancel()  # no node: nothing ran
        with pytest.raises(JobFailed) as cancelled:
            job.results(timeout=60)
        assert cancelled.value.state is JobState.CANCELLED
    assert blocks_in_redis(r) == 0  # a cancelled job's blocks are dropped


def test_connect_finds_the_running_up_or_says_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, r: Client, redis_url: str
) -> None:
    monkeypatch.delenv("PD_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="no controller found"):
        connect(home=tmp_path)
    (tmp_path / "controller.json").write_text(json.dumps({"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    with pytest.raises(ConfigError, match="cannot reach Redis"):  # an `up` that is gone
        connect(home=tmp_path)
    (tmp_path / "controller.json").write_text(json.dumps({"redis_url": redis_url}))  # as `up` writes it
    with connect(home=tmp_path) as pd, pytest.raises(JobNotFound):
        pd.job("no-such-job")
    monkeypatch.setenv("PD_REDIS_URL", redis_url)  # the environment, as for the CLI
    with connect(home=tmp_path / "elsewhere") as pd:
        assert pd.settings.redis_url == redis_url
