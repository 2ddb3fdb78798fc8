"""`submit wasm`: a user's module is refused before anything is stored, or uploaded once by
content with its inputs as job blocks; the scheduler queues run envelopes that decode to
the right argv, env and stdins; the aggregator writes out/, err/ and manifest.jsonl from
result envelopes (built here with `shared/wasi.py`, as a node would return them); the
module leaves Redis with its last job; every gateway serves it.

No node runs here: the nodes' side (running a WASI command) is tested with the worker. The
services run in this process, against the session's real Redis."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import wasmtime
from conftest import Controller
from processdistro import client
from processdistro.aggregator.service import Aggregator
from processdistro.main import main
from processdistro.scheduler.service import Scheduler
from processdistro.shared import keys
from processdistro.shared.exceptions import ParamsError
from processdistro.shared.jobs import JobState
from processdistro.shared.messages import Submit, parse_command
from processdistro.shared.modules import ModuleRegistry
from processdistro.shared.queue import TaskFields
from processdistro.shared.service import StopFlag
from processdistro.shared.settings import Settings
from processdistro.shared.store import modules as stored_modules
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import load_job
from processdistro.shared.store.streams import ensure_groups, full_input
from processdistro.shared.tasks import PLUGINS
from processdistro.shared.tasks.wasm import GROUP_RUNS, WasmParams, WasmPlugin, subtask_seed
from processdistro.shared.wasi import TRAPPED, ResultEnvelope, RunEnvelope, RunResult
from processdistro.shared.wasm_module import MAX_MODULE_BYTES

WASI_COMMAND = """(module
  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")))"""
FOREIGN_IMPORT = """(module
  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
  (import "env" "now" (func (result f64)))
  (memory (export "memory") 1)
  (func (export "_start")))"""
PLUGIN = PLUGINS["wasm"]
assert isinstance(PLUGIN, WasmPlugin)


def module_file(tmp_path: Path, wat: str = WASI_COMMAND, name: str = "prog.wasm") -> Path:
    path = tmp_path / name
    path.write_bytes(wasmtime.wat2wasm(wat))
    return path


@pytest.fixture
def sched(r: Client, redis_url: str) -> Scheduler:
    ensure_groups(r)
    return Scheduler(client=r, settings=Settings(redis_url=redis_url), modules=ModuleRegistry())


def submit(r: Client, sched: Scheduler, raw: dict[str, Any], replicate: float | None = 0.0) -> str:
    """Submit as the CLI does, then let the scheduler take the command and feed the tasks."""
    job_id = client.submit(r, "wasm", raw, replicate=replicate)
    sched.handle_commands(block_ms=None)
    while sched.feeder.feed():
        pass
    return job_id


def queued(r: Client) -> list[TaskFields]:
    return [TaskFields.from_redis(f) for _id, f in r.xrange(keys.TASKS)]


# ------------------------------------------------------------------ refused at submit time


def _not_wasm(tmp_path: Path) -> Path:
    path = tmp_path / "prog.wasm"
    path.write_text("#!/bin/sh\necho this is a shell script\n")
    return path


def _too_large(tmp_path: Path) -> Path:
    path = module_file(tmp_path)
    with open(path, "r+b") as fh:  # sparse: the size is checked before the bytes are read
        fh.truncate(MAX_MODULE_BYTES + 1)
    return path


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(_not_wasm, "prog.wasm is not WebAssembly", id="not-wasm"),
        pytest.param(
            _too_large,
            f"prog.wasm is 64.0 MiB ({MAX_MODULE_BYTES + 1} bytes), larger than the 64.0 MiB ({MAX_MODULE_BYTES}"
            " bytes) a module may be",
            id="too-large",
        ),
        pytest.param(
            lambda p: module_file(p, FOREIGN_IMPORT),
            "prog.wasm imports env.now: a module may import only from wasi_snapshot_preview1",
            id="foreign-import",
        ),
    ],
)
def test_a_bad_module_is_refused_and_nothing_is_stored(
    make: Callable[[Path], Path],
    says: str,
    tmp_path: Path,
    r: Client,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("a")
    module = make(tmp_path)
    argv = ["--redis-url", redis_url, "submit", "wasm", str(module), "--inputs", str(inputs), "-o", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert says in " ".join(capsys.readouterr().err.split())
    assert r.keys("*") == []  # no command, no block, no module


def test_bad_parameters_are_refused_before_anything_is_stored(tmp_path: Path, r: Client) -> None:
    module = module_file(tmp_path)
    with pytest.raises(ParamsError, match="bad wasm parameters: env: Value error, expected KEY=VALUE, got 'NOEQUALS'"):
        client.submit(r, "wasm", {"module": str(module), "count": 2, "env": ["NOEQUALS"], "outdir": str(tmp_path)})
    with pytest.raises(ParamsError, match="is neither a file nor a directory"):
        client.submit(r, "wasm", {"module": str(module), "inputs": [str(tmp_path / "nope")], "outdir": str(tmp_path)})
    with pytest.raises(ParamsError, match="no inputs"):
        (tmp_path / "empty").mkdir()
        client.submit(r, "wasm", {"module": str(module), "inputs": [str(tmp_path / "empty")], "outdir": str(tmp_path)})
    assert r.keys("*") == []


# ------------------------------------------------------------------ what is queued


def test_a_directory_of_inputs_queues_envelopes_of_grouped_inputs(tmp_path: Path, r: Client, sched: Scheduler) -> None:
    module = module_file(tmp_path)
    root = tmp_path / "in"
    files: dict[str, bytes] = {f"a/{i:03d}.txt": f"file {i}\n".encode() * 10 for i in range(100)}
    files["b/big.bin"] = os.urandom(3 * 512 * 1024)  # 1.5 MiB: a subtask of its own
    files |= {f"c/deep/{i}": b"" for i in range(3)}  # empty inputs are inputs too
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    raw = {"module": str(module), "inputs": [str(root)], "outdir": str(tmp_path / "out")}
    job_id = submit(r, sched, raw | {"args": ["-x", "y"], "env": ["A=1", "B=two=2"]}, replicate=None)

    job = load_job(r, job_id)
    assert job is not None and job.state is JobState.RUNNING
    params = WasmParams.model_validate(job.params)
    assert job.module == params.module == hashlib.sha256(module.read_bytes()).hexdigest()
    assert stored_modules.load(r, job.module) == module.read_bytes()
    assert stored_modules.users(r, job.module) == {job_id}
    assert job.replicate == 0.1  # a wasm job's default share, above PD_REPLICATE's 0.05
    # 100 small files: 64 + 36; the large one alone; then the three empty ones
    assert job.total == 4
    tasks = sorted({t.index: t for t in queued(r)}.values(), key=lambda t: t.index)
    envelopes = [RunEnvelope.decode(full_input(r, t)) for t in tasks]
    assert [len(e.stdins) for e in envelopes] == [GROUP_RUNS, 36, 1, 3]
    names = sorted(files)
    assert [s for e in envelopes for s in e.stdins] == [files[n] for n in names]
    for i, (task, env) in enumerate(zip(tasks, envelopes, strict=True)):
        assert (task.index, task.module, task.kind) == (i, job.module, "wasm")
        assert env.argv == ("prog.wasm", "-x", "y")
        assert env.env == ("A=1", "B=two=2")
        assert env.deterministic
        assert env.seed == subtask_seed(params.seed, i)
    assert len({e.seed for e in envelopes}) == 4
    # the scheduler needs no file of the user's: the stdins are job blocks
    assert all(t.blocks and r.exists(keys.block(job_id, t.blocks[0])) for t in tasks)


def test_count_and_lines(tmp_path: Path, r: Client, sched: Scheduler) -> None:
    module = module_file(tmp_path)
    job_id = submit(r, sched, {"module": str(module), "count": 3, "env": ["K=V"], "outdir": str(tmp_path / "o1")})
    envelopes = [RunEnvelope.decode(full_input(r, t)) for t in queued(r) if t.job == job_id]
    assert [(e.env, e.stdins) for e in envelopes] == [(("K=V", f"PD_INDEX={i}"), (b"",)) for i in range(3)]

    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"alpha\r\nbeta\n\ngamma")  # a last line without its newline still counts
    job_id = submit(r, sched, {"module": str(module), "lines": str(lines), "outdir": str(tmp_path / "o2")})
    [envelope] = [RunEnvelope.decode(full_input(r, t)) for t in queued(r) if t.job == job_id]
    assert envelope.stdins == (b"alpha\n", b"beta\n", b"\n", b"gamma\n")


def test_nondeterministic_turns_replication_off(
    tmp_path: Path, r: Client, redis_url: str, sched: Scheduler, capsys: pytest.CaptureFixture[str]
) -> None:
    module = module_file(tmp_path)
    argv = ["--redis-url", redis_url, "submit", "wasm", str(module), "--count", "2", "-o", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--nondeterministic", "--replicate", "0.5", "--timeout", "7.5", "--memory", "64"])
    assert exit_.value.code == 0
    assert "--nondeterministic: outputs cannot be compared" in capsys.readouterr().err
    [(_id, fields)] = r.xrange(keys.COMMANDS)
    command = parse_command(fields[b"command"])
    assert isinstance(command, Submit)
    assert (command.params["timeout_s"], command.params["memory_mb"]) == (7.5, 64)
    sched.handle_commands(block_ms=None)
    job = load_job(r, command.job_id)
    assert job is not None and job.replicate == 0.0
    sched.feeder.feed()
    assert [RunEnvelope.decode(full_input(r, t)).deterministic for t in queued(r)] == [False, False]


def test_a_submit_whose_module_is_gone_is_refused_by_the_scheduler(tmp_path: Path, r: Client, sched: Scheduler) -> None:
    module = module_file(tmp_path)
    job_id = client.submit(r, "wasm", {"module": str(module), "count": 1, "outdir": str(tmp_path / "o")})
    r.delete(keys.module_blob(hashlib.sha256(module.read_bytes()).hexdigest()))
    sched.handle_commands(block_ms=None)
    assert load_job(r, job_id) is None
    assert r.xlen(keys.TASKS) == 0
    assert not r.exists(keys.job_modules(job_id))  # what its submit stored is let go of


# ------------------------------------------------------------------ results: out/, err/, manifest


def program(stdin: bytes) -> RunResult:
    """What the user's program "did": stdout in capitals; FAIL exits 3; TRAP traps."""
    if b"TRAP" in stdin:
        return RunResult(TRAPPED, b"partial", b"wasm trap: unreachable executed")
    if b"FAIL" in stdin:
        return RunResult(3, b"", b"lots of context\n" * 40 + b"cannot handle " + stdin.strip())
    err = b"note: short input\n" if len(stdin) < 4 else b""
    return RunResult(0, stdin.upper(), err)


def run_as_node(
    r: Client, node: str = "node-a", reverse: bool = True, prog: Callable[[bytes], RunResult] = program
) -> int:
    """Take every queued task as a node would and hand its result envelope over, last first
    (so merge order is not input order)."""
    entries = r.xreadgroup(keys.NODES_GROUP, f"{node}~c1", {keys.TASKS: ">"}, count=1000) or []
    tasks = [(eid, TaskFields.from_redis(f)) for _s, es in entries for eid, f in es]
    for eid, task in reversed(tasks) if reverse else tasks:
        envelope = RunEnvelope.decode(full_input(r, task))
        output = ResultEnvelope(tuple(prog(s) for s in envelope.stdins)).encode()
        r.xadd(keys.RESULTS, {**task.to_redis(), "node": node, "output": output, "elapsed_ms": 12.5})
        r.xack(keys.TASKS, keys.NODES_GROUP, eid)
        r.xdel(keys.TASKS, eid)
    return len(tasks)


def live(r: Client, *nodes: str) -> None:
    """Nodes connected (connection c1) that have said `ready`, as a gateway records them:
    only such nodes take work and count as voters (`core.replication.said_ready`)."""
    r.zadd(keys.NODES, {f"{n}~c1": time.time() + 3600 for n in nodes})
    for n in nodes:
        r.hset(keys.node(n), mapping={"connection": "c1", "ready": "c1"})


def settle(r: Client, sched: Scheduler, agg: Aggregator, job_id: str) -> JobState:
    flag = StopFlag()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        agg.step(flag)
        sched.handle_commands(block_ms=None)
        job = load_job(r, job_id)
        assert job is not None
        if job.state.terminal:
            return job.state
    raise AssertionError(f"job {job_id} did not end")


@pytest.fixture
def agg(r: Client, tmp_path: Path) -> Iterator[Aggregator]:
    yield Aggregator(client=r, data_dir=tmp_path / "data")


def make_inputs(root: Path, texts: dict[str, str]) -> None:
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


INPUTS = {"x/1.txt": "one\n", "x/2.txt": "FAIL two\n", "y.txt": "hi", "z/deep/3.txt": "TRAP three\n"}


def test_outputs_errors_and_a_manifest_in_input_order(
    tmp_path: Path, r: Client, sched: Scheduler, agg: Aggregator
) -> None:
    module = module_file(tmp_path)
    make_inputs(tmp_path / "in", INPUTS)
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "w.txt").write_text("last")
    out = tmp_path / "results"
    raw = {"module": str(module), "inputs": [str(tmp_path / "in"), str(tmp_path / "more" / "w.txt")]}
    job_id = submit(r, sched, raw | {"outdir": str(out), "keep_going": True})
    live(r, "node-a", "node-b")
    assert run_as_node(r) == 1  # five small inputs share one subtask
    agg.step(StopFlag())
    # some of its runs failed: that counts once a second node agrees
    [copy] = queued(r)
    assert copy.replicated and r.smembers(keys.job_returned(job_id, 0)) == {b"node-a"}
    assert run_as_node(r, "node-b") == 1
    assert settle(r, sched, agg, job_id) is JobState.DONE

    order = ["x/1.txt", "x/2.txt", "y.txt", "z/deep/3.txt", "w.txt"]
    texts = INPUTS | {"w.txt": "last"}
    for rel in order:
        assert (out / "out" / rel).read_bytes() == program(texts[rel].encode()).stdout
        stderr = program(texts[rel].encode()).stderr
        assert (out / "err" / rel).read_bytes() == stderr if stderr else not (out / "err" / rel).exists()
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["input"], m["index"], m["exit_code"]) for m in manifest] == [
        ("x/1.txt", 0, 0),
        ("x/2.txt", 1, 3),
        ("y.txt", 2, 0),
        ("z/deep/3.txt", 3, TRAPPED),
        ("w.txt", 4, 0),
    ]
    for m, rel in zip(manifest, order, strict=True):
        stdout = program(texts[rel].encode()).stdout
        assert (m["bytes"], m["sha256"]) == (len(stdout), hashlib.sha256(stdout).hexdigest())
        assert (m["node"], m["elapsed_ms"], m["verified"]) == ("node-b", 12.5, "replicated")
        assert m["nodes"] == ["node-a", "node-b"]
    job = load_job(r, job_id)
    assert job is not None
    assert job.outputs == {"manifest": str(out / "manifest.jsonl"), "out": str(out / "out")}
    summary = PLUGIN.summary(job.outputs)
    assert summary[0] == f"5 inputs, 2 failed; outputs in {out / 'out'}"
    assert summary[1:] == ["failed: x/2.txt (index 1): exited with code 3", "failed: z/deep/3.txt (index 3): trapped"]
    assert PLUGIN.exit_code(job.outputs) == 1
    # the job is over: its module and blocks are gone
    assert r.keys(keys.module_blob("*")) == [] and r.keys(keys.block(job_id, "*")) == []


def test_many_subtasks_merge_out_of_order(tmp_path: Path, r: Client, sched: Scheduler, agg: Aggregator) -> None:
    module = module_file(tmp_path)
    texts = {f"f{i:03d}": f"input {i}" for i in range(150)}
    make_inputs(tmp_path / "in", texts)
    out = tmp_path / "o"
    job_id = submit(r, sched, {"module": str(module), "inputs": [str(tmp_path / "in")], "outdir": str(out)})
    assert run_as_node(r) == 3
    assert settle(r, sched, agg, job_id) is JobState.DONE
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["input"] for m in manifest] == sorted(texts)
    assert [m["index"] for m in manifest] == list(range(150))
    assert [m["subtask"] for m in manifest] == [0] * 64 + [1] * 64 + [2] * 22
    assert {(m["node"], m["verified"]) for m in manifest} == {("node-a", "single node")}
    assert all((out / "out" / k).read_text() == v.upper() for k, v in texts.items())
    job = load_job(r, job_id)
    assert job is not None and PLUGIN.exit_code(job.outputs) == 0


def test_without_keep_going_a_failing_input_fails_the_job(
    tmp_path: Path, r: Client, sched: Scheduler, agg: Aggregator
) -> None:
    module = module_file(tmp_path)
    make_inputs(tmp_path / "in", INPUTS)
    out = tmp_path / "results"
    job_id = submit(r, sched, {"module": str(module), "inputs": [str(tmp_path / "in")], "outdir": str(out)})
    run_as_node(r)
    assert settle(r, sched, agg, job_id) is JobState.FAILED
    job = load_job(r, job_id)
    assert job is not None
    assert job.error == (
        "input 'x/2.txt' exited with code 3; stderr ends: "
        + ("lots of context\n" * 40 + "cannot handle FAIL two")[-400:].strip()
    )
    assert not (out / "manifest.jsonl").exists()
    assert (out / "err" / "x" / "2.txt").exists()  # what it wrote is there to look at
    assert r.keys(keys.module_blob("*")) == []
    # no other node was live to confirm the failure: it counted unconfirmed
    assert r.hget(keys.STATS, "replicas_unconfirmed") == b"1"


def test_a_failure_other_nodes_do_not_confirm_does_not_count(
    tmp_path: Path, r: Client, sched: Scheduler, agg: Aggregator
) -> None:
    """A broken node fails every run; two others succeed: their result is merged, the job
    completes though --keep-going is off, and the broken node's result counts against it."""
    module = module_file(tmp_path)
    make_inputs(tmp_path / "in", {"a": "one", "b": "two"})
    out = tmp_path / "o"
    job_id = submit(r, sched, {"module": str(module), "inputs": [str(tmp_path / "in")], "outdir": str(out)})
    live(r, "broken", "node-b", "node-c")
    run_as_node(r, "broken", prog=lambda stdin: RunResult(TRAPPED, b"", b"wasm trap: out of bounds memory access"))
    agg.step(StopFlag())
    run_as_node(r, "node-b")
    agg.step(StopFlag())  # the results differ: one more node breaks the tie
    run_as_node(r, "node-c")
    assert settle(r, sched, agg, job_id) is JobState.DONE
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["input"], m["exit_code"], m["verified"]) for m in manifest] == [
        ("a", 0, "replicated"),
        ("b", 0, "replicated"),
    ]
    assert manifest[0]["nodes"] == ["node-b", "node-c"]
    assert (out / "out" / "b").read_text() == "TWO"
    assert r.hget(keys.node("broken"), "rejected") == b"1"


def test_lines_are_written_by_index_and_named_by_line(
    tmp_path: Path, r: Client, sched: Scheduler, agg: Aggregator
) -> None:
    """--lines: out/<index>, and the manifest names each input by its line."""
    module = module_file(tmp_path)
    lines = tmp_path / "l.txt"
    lines.write_text("ok\nTRAP here\nfine\n")
    out = tmp_path / "o"
    job_id = submit(r, sched, {"module": str(module), "lines": str(lines), "outdir": str(out), "keep_going": True})
    run_as_node(r)
    assert settle(r, sched, agg, job_id) is JobState.DONE
    assert sorted(p.name for p in (out / "out").iterdir()) == ["0", "1", "2"]
    assert (out / "out" / "2").read_bytes() == b"FINE\n"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["input"], m["exit_code"]) for m in manifest] == [("ok", 0), ("TRAP here", TRAPPED), ("fine", 0)]


# ------------------------------------------------------------------ the module's life


def test_the_module_is_kept_while_a_job_needs_it(tmp_path: Path, r: Client, sched: Scheduler) -> None:
    module = module_file(tmp_path)
    sha = hashlib.sha256(module.read_bytes()).hexdigest()
    first = submit(r, sched, {"module": str(module), "count": 1, "outdir": str(tmp_path / "a")})
    second = submit(r, sched, {"module": str(module), "count": 1, "outdir": str(tmp_path / "b")})
    assert stored_modules.users(r, sha) == {first, second}
    assert sched.cancel(first, "by user")
    assert stored_modules.load(r, sha) == module.read_bytes()  # the second job still runs it
    assert sched.cancel(second, "by user", state=JobState.FAILED)
    assert stored_modules.load(r, sha) is None
    assert r.keys("pd:module:*") == [] and r.keys("pd:job:*:modules") == []
    # a module used again later is stored again
    third = submit(r, sched, {"module": str(module), "count": 1, "outdir": str(tmp_path / "c")})
    assert stored_modules.users(r, sha) == {third} and stored_modules.stored(r, sha)


def test_a_gateway_serves_an_uploaded_module_and_so_does_its_successor(
    tmp_path: Path, r: Client, controller: Controller
) -> None:
    data = module_file(tmp_path).read_bytes()
    sha = stored_modules.acquire(r, "job-1", data)
    builtin = next(iter(ModuleRegistry().by_sha.values()))
    url = f"{controller.url}/modules/{sha}.wasm"
    got = httpx.get(url)
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "application/wasm"
    own = httpx.get(f"{controller.url}/modules/{builtin.sha256}.wasm")
    for header in ("cache-control", "etag"):  # the same headers as the registry's modules
        assert got.headers[header].replace(sha, "X") == own.headers[header].replace(builtin.sha256, "X")
    assert httpx.get(url, headers={"if-none-match": f'"{sha}"'}).status_code == 304
    # the bytes are in Redis, not in the gateway: a new gateway process serves them too
    controller.kill("gateway")
    controller.start("gateway")
    controller.wait_ready()
    assert httpx.get(url).content == data
    stored_modules.release(r, "job-1")
    assert httpx.get(url).status_code == 404
    assert httpx.get(f"{controller.url}/modules/{'0' * 64}.wasm").status_code == 404


# ------------------------------------------------------------------ a real program, real services

UPPER_C = r"""
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
  char buf[4096];
  size_t n = fread(buf, 1, sizeof buf, stdin);
  if (n >= 4 && memcmp(buf, "fail", 4) == 0) {
    fprintf(stderr, "cannot handle %.*s", (int)n, buf);
    return 3;
  }
  const char *greeting = getenv("GREETING");
  printf("%s:%s:", argc > 1 ? argv[1] : "-", greeting ? greeting : "-");
  for (size_t i = 0; i < n; i++) putchar(toupper((unsigned char)buf[i]));
  return 0;
}
"""


def build_c(tmp_path: Path, source: str) -> tuple[Path, Path]:
    """The program built to WASI and natively (`make examples` builds its own likewise)."""
    src = tmp_path / "prog.c"
    src.write_text(source)
    wasm, native = tmp_path / "prog.wasm", tmp_path / "prog"
    subprocess.run(["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", wasm, src], check=True)
    subprocess.run(["clang", "-O2", "-o", native, src], check=True)
    return wasm, native


def wasi_run(module: wasmtime.Module, envelope: RunEnvelope, stdin: bytes, scratch: Path) -> RunResult:
    """One run of a run envelope in wasmtime's own WASI (not deterministic: this program
    reads no clock and no randomness). A stand-in for a node until the worker runs WASI."""
    linker = wasmtime.Linker(ENGINE)
    linker.define_wasi()
    store = wasmtime.Store(ENGINE)
    config = wasmtime.WasiConfig()
    config.argv = list(envelope.argv)
    config.env = [tuple(e.split("=", 1)) for e in envelope.env]
    (scratch / "in").write_bytes(stdin)
    config.stdin_file = str(scratch / "in")
    config.stdout_file = str(scratch / "out")
    config.stderr_file = str(scratch / "err")
    store.set_wasi(config)
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    assert isinstance(start, wasmtime.Func)
    try:
        start(store)
        code = 0
    except wasmtime.ExitTrap as exc:
        code = exc.code
    return RunResult(code, (scratch / "out").read_bytes(), (scratch / "err").read_bytes())


ENGINE = wasmtime.Engine()


def stand_in_node(r: Client, module: wasmtime.Module, scratch: Path, until: subprocess.Popen[str]) -> int:
    """Run what the scheduler queues with wasmtime until the submit command exits."""
    ran = 0
    while until.poll() is None:
        entries = r.xreadgroup(keys.NODES_GROUP, "stand-in~c1", {keys.TASKS: ">"}, count=100, block=200) or []
        for _s, es in entries:
            for eid, f in es:
                task = TaskFields.from_redis(f)
                envelope = RunEnvelope.decode(full_input(r, task))
                runs = tuple(wasi_run(module, envelope, stdin, scratch) for stdin in envelope.stdins)
                output = ResultEnvelope(runs).encode()
                r.xadd(keys.RESULTS, {**task.to_redis(), "node": "stand-in", "output": output, "elapsed_ms": 3})
                r.xack(keys.TASKS, keys.NODES_GROUP, eid)
                r.xdel(keys.TASKS, eid)
                ran += 1
    return ran


def test_submit_wait_runs_a_c_program_and_reports_failures(tmp_path: Path, r: Client, controller: Controller) -> None:
    wasm, native = build_c(tmp_path, UPPER_C)
    module = wasmtime.Module(ENGINE, wasm.read_bytes())
    texts = {f"docs/{i:03d}.txt": f"document {i}\n" for i in range(80)} | {"docs/sub/bad.txt": "failing input\n"}
    make_inputs(tmp_path / "in", texts)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "results"
    base = ["submit", "wasm", str(wasm), "--inputs", str(tmp_path / "in" / "docs"), "--arg", "first"]
    # no replication: this stand-in is no gateway, which would keep a copy from the node
    # that ran the first (a failed run is confirmed by another node only while one is live)
    base += ["--env", "GREETING=hello", "--replicate", "0", "--wait", "-q", "--wait-timeout", "120"]

    def submit_waiting(*extra: str) -> tuple[int, str]:
        cli = subprocess.Popen(
            [sys.executable, "-m", "processdistro", *base, *extra],
            env=controller.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert stand_in_node(r, module, scratch, cli) == 2  # 81 inputs: 64 + 17
        said, _ = cli.communicate()
        return cli.returncode, " ".join(said.split())

    code, said = submit_waiting("-o", str(out), "--keep-going")
    assert code == 1, said
    assert "81 inputs, 1 failed" in said and "failed: sub/bad.txt (index 80): exited with code 3" in said
    for rel, text in texts.items():
        name = rel.removeprefix("docs/")
        native_run = subprocess.run(
            [native, "first"], input=text.encode(), capture_output=True, env={"GREETING": "hello"}
        )
        assert (out / "out" / name).read_bytes() == native_run.stdout, name
        assert (out / "err" / name).exists() == bool(native_run.stderr)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["input"] for m in manifest] == sorted(rel.removeprefix("docs/") for rel in texts)
    assert {m["node"] for m in manifest} == {"stand-in"}

    # without --keep-going the job fails, naming the input, its exit code and its stderr
    code, said = submit_waiting("-o", str(tmp_path / "again"))
    assert code == 1, said
    assert "failed: input 'sub/bad.txt' exited with code 3; stderr ends: cannot handle failing input" in said
    assert r.keys(keys.module_blob("*")) == []


# ------------------------------------------------------------------ a pd-ABI module

PD_ABI = """(module
  (memory (export "memory") 1)
  (func (export "pd_alloc") (param i32) (result i32) i32.const 8)
  (func (export "pd_run") (param i32 i32) (result i32) i32.const 0)
  (func (export "pd_output_ptr") (result i32) i32.const 0)
  (func (export "pd_output_len") (result i32) i32.const 0))"""


def test_a_pd_abi_module_gets_one_input_per_subtask_as_it_is(
    tmp_path: Path, r: Client, sched: Scheduler, agg: Aggregator
) -> None:
    module = module_file(tmp_path, PD_ABI, "kernel.wasm")
    make_inputs(tmp_path / "in", {"a.bin": "first", "b.bin": "second", "c/d.bin": "third"})
    with pytest.raises(ParamsError, match="kernel.wasm is a pd-ABI module: it takes no --arg, --env or --count"):
        client.submit(r, "wasm", {"module": str(module), "count": 2, "outdir": str(tmp_path / "x")})
    out = tmp_path / "o"
    job_id = submit(r, sched, {"module": str(module), "inputs": [str(tmp_path / "in")], "outdir": str(out)})
    tasks = sorted(queued(r), key=lambda t: t.index)
    assert [(t.input, full_input(r, t)) for t in tasks] == [(b"", b"first"), (b"", b"second"), (b"", b"third")]
    for entry_id, f in r.xreadgroup(keys.NODES_GROUP, "node-a~c1", {keys.TASKS: ">"}, count=10)[0][1]:
        task = TaskFields.from_redis(f)
        output = full_input(r, task)[::-1]  # what this "kernel" computes
        r.xadd(keys.RESULTS, {**task.to_redis(), "node": "node-a", "output": output, "elapsed_ms": 1})
        r.xack(keys.TASKS, keys.NODES_GROUP, entry_id)
    assert settle(r, sched, agg, job_id) is JobState.DONE
    assert [(out / "out" / n).read_text() for n in ("a.bin", "b.bin", "c/d.bin")] == ["tsrif", "dnoces", "driht"]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["input"], m["exit_code"], m["bytes"]) for m in manifest] == [
        ("a.bin", 0, 5),
        ("b.bin", 0, 6),
        ("c/d.bin", 0, 5),
    ]
    assert not (out / "err").exists()
