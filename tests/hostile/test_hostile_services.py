"""Issue 9.6: one job's problem never crash-loops a service.

Real processes throughout: the controller's services, a native worker (wasmtime), the CLI.
A crack wordlist that vanishes (or becomes a directory) after submit, and a plugin whose
merge raises, each fail their own job with a clear reason; a Mandelbrot job running beside
them completes exactly, and the scheduler and aggregator keep their PIDs, start once and
log no loop error."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Controller
from mandel_ref import reference_counts
from processdistro import client
from processdistro.shared.jobs import JobRecord, JobState
from processdistro.shared.service import StopFlag, describe_error, job_error, run_forever
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import load_job
from processdistro.shared.tasks.base import atomic_write
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture

MANDEL = {"width": 96, "height": 80, "max_iter": 200, "tile": 16}  # 30 tiles

# a kind of the task repo whose own merge breaks on one tile: user code on the controller
BROKEN_MERGE = '''
from processdistro.shared.tasks.mandelbrot import MandelbrotPlugin


class Tiles(MandelbrotPlugin):
    """tiles whose store breaks on tile 3"""

    def merge(self, files, params, index, output):
        if index == 3:
            raise RuntimeError("the tile store is broken")
        super().merge(files, params, index, output)
'''


@pytest.fixture
def controller_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    repo = tmp_path_factory.mktemp("repo")
    (repo / "tiles").mkdir()
    (repo / "tiles" / "kind.toml").write_text('description = "tiles whose store breaks"\n')
    (repo / "tiles" / "plugin.py").write_text(BROKEN_MERGE)
    return {"PD_TASK_REPO": str(repo)}


def wait_for(r: Client, job_id: str, pred: object, timeout: float, ctl: Controller) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = load_job(r, job_id)
        if job is not None and pred(job):  # type: ignore[operator]
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: condition not met in {timeout}s\n{ctl.logs()}")


def terminal(r: Client, job_id: str, ctl: Controller, timeout: float = 180) -> JobRecord:
    return wait_for(r, job_id, lambda j: j.state.terminal, timeout, ctl)


def submit_mandelbrot(r: Client) -> str:
    return client.submit(r, "mandelbrot", dict(MANDEL))


def assert_exact_mandelbrot(job: JobRecord, ctl: Controller) -> None:
    assert job.state is JobState.DONE, job.error + ctl.logs()
    expected = reference_counts(MANDEL["width"], MANDEL["height"], -2.0, 1.0, -1.5, 1.5, MANDEL["max_iter"])
    assert np.array_equal(np.load(job.outputs["raw"]), expected)


def assert_services_never_restarted(ctl: Controller, pids: dict[str, int]) -> None:
    """Same processes, alive; each started once; no error escaped to the loop."""
    for name in ("scheduler", "aggregator"):
        proc = ctl.procs[name]
        assert proc.poll() is None and proc.pid == pids[name], f"{name} exited\n{ctl.logs()}"
        log = (ctl.home / f"{name}.log").read_text()
        assert len(re.findall(rf"{name} \S+ started", log)) == 1, log[-3000:]
        assert "unexpected error in its loop" not in log, log[-3000:]
        assert "redis unavailable" not in log, log[-3000:]


def write_wordlist(path: Path, n: int, secret: str | None = None) -> None:
    rnd = random.Random(11)
    words = [f"w{i}-{rnd.randrange(10**6)}" for i in range(n)]
    if secret is not None:
        words[-3] = secret
    path.write_text("\n".join(words) + "\n")


def crack_params(wordlist: Path, secret: str, *, iterations: int, chunk: int) -> dict[str, object]:
    target = hashlib.pbkdf2_hmac("sha256", secret.encode(), b"salt", iterations, 32).hex()
    return {"target": target, "salt": "salt", "iterations": iterations, "wordlist": str(wordlist), "chunk": chunk}


def vanish(path: Path, how: str) -> None:
    path.unlink()
    if how == "directory":
        path.mkdir()


@pytest.mark.parametrize("how", ["removed", "directory"])
def test_wordlist_gone_while_feeding_fails_only_its_job(
    how: str,
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    """Issue 9.6: a crack wordlist removed (or replaced by a directory) after submit made
    the scheduler's split raise on every loop: the scheduler crash-looped and no job was fed.
    Fix: the feeder fails that job with the reason and feeds the others."""
    pids = {name: controller.procs[name].pid for name in ("scheduler", "aggregator")}
    words = tmp_path / "words.txt"
    write_wordlist(words, 20_000)  # about 4,000 chunks: far more than one feed, with no node yet
    crack = client.submit(r, "crack", crack_params(words, "absent", iterations=50, chunk=40))
    job = wait_for(r, crack, lambda j: j.state is JobState.RUNNING and j.next_index > 0, 30, controller)
    assert job.next_index < job.total, "the whole wordlist was fed at once: the test needs a lazy feed"
    vanish(words, how)
    mandel = submit_mandelbrot(r)
    workers.append(Worker(controller, tmp_path / "w1", "--cores", "2"))

    failed = terminal(r, crack, controller)
    assert failed.state is JobState.FAILED, controller.logs()
    clear = "is gone (moved or deleted after the job was submitted)" if how == "removed" else "is a directory"
    assert f"{words} {clear}" in failed.error, failed.error
    assert failed.error.startswith("splitting subtask "), failed.error
    assert_exact_mandelbrot(terminal(r, mandel, controller), controller)
    assert_services_never_restarted(controller, pids)


def test_wordlist_gone_before_a_hit_is_merged_fails_only_its_job(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    """Issue 9.6: the aggregator reads the wordlist to name a hit; a wordlist removed after
    the job was fed made that merge raise, and the aggregator crash-looped on the result
    for ever. Fix: the job fails with the reason (naming the merge), the result is dropped,
    the other jobs carry on."""
    pids = {name: controller.procs[name].pid for name in ("scheduler", "aggregator")}
    words = tmp_path / "words.txt"
    write_wordlist(words, 300, secret="hunter2")
    crack = client.submit(r, "crack", crack_params(words, "hunter2", iterations=50, chunk=400))
    job = wait_for(r, crack, lambda j: j.state is JobState.RUNNING and j.next_index == j.total, 30, controller)
    vanish(words, "removed")  # every subtask is queued; no node has run one yet
    mandel = submit_mandelbrot(r)
    workers.append(Worker(controller, tmp_path / "w1", "--cores", "2"))

    failed = terminal(r, crack, controller)
    assert failed.state is JobState.FAILED, controller.logs()
    assert re.match(r"subtask \d+ \(merge\) failed: file \S+ is gone", failed.error), failed.error
    assert str(words) in failed.error
    assert job.total > 1
    assert_exact_mandelbrot(terminal(r, mandel, controller), controller)
    assert_services_never_restarted(controller, pids)


def test_plugin_raising_in_merge_fails_only_its_job(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    """Issue 9.6: a plugin whose merge raises (here a task-repo kind's own code) crash-looped
    the aggregator, which took every job down with it. Fix: that job fails with the error
    as its reason, shown by `processdistro jobs`; the job beside it completes exactly."""
    pids = {name: controller.procs[name].pid for name in ("scheduler", "aggregator")}
    workers.append(Worker(controller, tmp_path / "w1", "--cores", "2"))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in MANDEL.items()]
    out = controller.cli("submit", "tiles", *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = re.search(r"submitted job (\S+)", out.stdout)
    assert broken is not None, out.stdout
    mandel = submit_mandelbrot(r)

    failed = terminal(r, broken.group(1), controller)
    assert failed.state is JobState.FAILED, controller.logs()
    assert failed.error == "subtask 3 (merge) failed: RuntimeError: the tile store is broken", failed.error
    assert_exact_mandelbrot(terminal(r, mandel, controller), controller)
    listing = controller.cli("jobs", "--json")
    assert listing.returncode == 0, listing.stderr
    shown = {j["id"]: j for j in json.loads(listing.stdout)}
    assert shown[broken.group(1)]["state"] == "failed"
    assert shown[broken.group(1)]["error"] == failed.error
    assert_services_never_restarted(controller, pids)


# ------------------------------------------------------------------ the pieces, in milliseconds


class _Plugin:
    def split(self) -> None:
        open("/nonexistent/words.txt", "rb")  # noqa: SIM115 - it raises

    def merge(self) -> None:
        np.split(np.arange(3), 2)  # numpy's own `split` is not the plugin's step


def _raised(f: object) -> BaseException:
    try:
        f()  # type: ignore[operator]
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


@pytest.mark.parametrize(
    ("exc", "doing", "reason"),
    [
        pytest.param(
            _raised(_Plugin().split),
            "splitting subtask 7",
            "splitting subtask 7 failed: file /nonexistent/words.txt is gone (moved or deleted after the job"
            " was submitted)",
            id="file-gone",
        ),
        pytest.param(
            IsADirectoryError(errno.EISDIR, "Is a directory", "/w"),
            "subtask 2",
            "subtask 2 failed: /w is a directory, not a file",
            id="directory",
        ),
        pytest.param(
            OSError(errno.ENOSPC, "No space left on device", "/d/counts.npy"),
            "finalize",
            "finalize failed: disk full: no space left writing /d/counts.npy (No space left on device)",
            id="disk-full",
        ),
        pytest.param(
            _raised(_Plugin().merge),
            "subtask 3",
            "subtask 3 (merge) failed: ValueError: array split does not result in an equal division",
            id="plugin-step-named",
        ),
    ],
)
def test_a_jobs_failure_reason_says_what_and_where(exc: BaseException, doing: str, reason: str) -> None:
    """Issue 9.6: the reason a job fails with names the step and the cause in words."""
    assert job_error(exc, doing) == reason
    assert describe_error(RuntimeError("boom")) == "RuntimeError: boom"


def test_run_forever_survives_an_unexpected_error_and_backs_off() -> None:
    """Issue 9.6: `run_forever` caught only Redis outages, so any other error ended the
    service (and its supervisor restarted it into the same error, for ever). Now it logs,
    backs off (capped), and carries on."""
    flag, calls = StopFlag(), []

    def step() -> None:
        calls.append(time.monotonic())
        if len(calls) >= 4:
            flag.stopping = True
            return
        raise KeyError("a bug")

    run_forever("test", flag, step)
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert len(calls) == 4 and gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4  # doubling backoff


def test_atomic_write_leaves_nothing_when_the_write_fails(tmp_path: Path) -> None:
    """Issue 9.7: a failed output write (a full disk) must leave neither a partial file nor
    its temporary, and never replace an earlier complete file."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"complete")

    def broken(fh: object) -> None:
        fh.write(b"half")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, broken, durable=True)
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
