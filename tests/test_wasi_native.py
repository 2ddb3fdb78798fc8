"""WASI command modules on the native worker, through the path a worker runs them:
`run_part` -> `WasmExecutor` (modules by sha256 from its `ModuleStore`) -> `ExecutorPool`
processes -> wasmtime, with the C programs of examples/ and tests/wasi/probe.c."""

from __future__ import annotations

import base64
import hashlib
import random
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nodes import run_async
from processdistro.shared.wasi import (
    CLOCK_STEP_NS,
    TRAPPED,
    Clock,
    ResultEnvelope,
    RunEnvelope,
    RunResult,
    SplitMix64,
    run_seed,
)
from processdistro.worker.executor import WasmExecutor, run_part
from processdistro.worker.fetch import BlockCache, ModuleStore
from processdistro.worker.runtime import MIB, Limits
from processdistro.worker.state import PartDone, PartFailed, Start

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SEED = 0x5EED_0F_D1CE_2026


@dataclass(frozen=True)
class Program:
    sha256: str
    path: Path


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Program]]:
    """The examples (built by `make examples`, which `make test` runs first; built here too
    so this file runs alone) and the probe, as a worker's module directory holds them."""
    subprocess.run(["make", "--quiet", "-C", str(EXAMPLES)], check=True)
    out = tmp_path_factory.mktemp("wasi-programs")
    probe = out / "probe.wasm"
    subprocess.run(
        ["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", str(probe), str(ROOT / "tests/wasi/probe.c")],
        check=True,
    )
    modules = out / "modules"
    modules.mkdir()
    found: dict[str, Program] = {}
    for name, wasm in [
        ("wordfreq", EXAMPLES / "wordfreq/wordfreq.wasm"),
        ("dice", EXAMPLES / "dice/dice.wasm"),
        ("probe", probe),
        ("mandelbrot", ROOT / "static/wasm/mandelbrot.wasm"),
    ]:
        sha = hashlib.sha256(wasm.read_bytes()).hexdigest()
        shutil.copyfile(wasm, modules / f"{sha}.wasm")
        found[name] = Program(sha, modules / f"{sha}.wasm")
    yield found


class Node:
    """The executing half of a worker: its module store, block cache and `WasmExecutor`."""

    def __init__(self, executor: WasmExecutor, blocks: BlockCache) -> None:
        self.executor = executor
        self.blocks = blocks
        self.parts = 0

    async def part(self, program: Program, data: bytes) -> PartDone | PartFailed:
        self.parts += 1
        start = Start(
            task_id=f"1-{self.parts}",
            job_id="1",
            kind="wasi",
            module_sha256=program.sha256,
            module_url=f"/modules/{program.sha256}.wasm",  # never fetched: the store holds it
            input_b64=base64.b64encode(data).decode(),
            blocks=(),
        )
        return await run_part(start, blocks=self.blocks, executor=self.executor, throttle=1.0)

    async def runs(self, program: Program, envelope: RunEnvelope) -> tuple[RunResult, ...]:
        outcome = await self.part(program, envelope.encode())
        assert isinstance(outcome, PartDone), outcome
        return ResultEnvelope.decode(outcome.output).runs

    async def run(self, program: Program, *argv: str, stdin: bytes = b"") -> RunResult:
        (run,) = await self.runs(program, RunEnvelope(argv, (), (stdin,), SEED))
        return run


@asynccontextmanager
async def node(programs: dict[str, Program], limits: Limits | None = None) -> AsyncIterator[Node]:
    directory = next(iter(programs.values())).path.parent
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9") as http:
        executor = WasmExecutor(
            limits=limits or Limits(deadline_s=20),
            modules=ModuleStore(directory=directory, base_url="http://127.0.0.1:9", http=http),
        )
        executor.resize(1)
        try:
            yield Node(executor, BlockCache(base_url="http://127.0.0.1:9", http=http, token=lambda: ""))
        finally:
            executor.begin_close()
            await executor.close()


def texts(n: int) -> list[bytes]:
    """`n` varied texts: mixed case, apostrophes, punctuation, digits, bytes >= 128, blank
    lines, a missing final newline, one empty file."""
    rng = random.Random(2026)
    words = ["the", "The", "dog's", "cat", "CAT", "x1", "42", "naïve", "über", "a", "don't", "---", "it's"]
    out = [b""]
    for i in range(1, n):
        lines = []
        for _ in range(rng.randrange(1, 60)):
            line = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 14)))
            lines.append(line + rng.choice(["", ".", ",", "!", "\t", "  "]))
        text = "\n".join(lines) + ("\n" if i % 3 else "")
        out.append(text.encode())
    return out


def test_wordfreq_matches_its_native_build_byte_for_byte(programs: dict[str, Program]) -> None:
    inputs = texts(20)
    native = [
        subprocess.run([str(EXAMPLES / "wordfreq/wordfreq"), "7"], input=t, capture_output=True, check=True).stdout
        for t in inputs
    ]

    async def scenario() -> tuple[RunResult, ...]:
        async with node(programs) as n:
            return await n.runs(programs["wordfreq"], RunEnvelope(("wordfreq", "7"), (), tuple(inputs), SEED))

    runs = run_async(scenario())
    assert [r.exit_code for r in runs] == [0] * len(inputs)
    assert [r.stdout for r in runs] == native
    assert all(r.stderr == b"" for r in runs)
    assert runs[0].stdout.startswith(b"lines 0 words 0 bytes 0 ")


def expected_dice(seed: int, run: int) -> bytes:
    """What dice prints in run `run` of a deterministic envelope seeded `seed`, from
    shared/wasi.py alone: two random_get calls, then three clock reads."""
    rng, clock = SplitMix64(run_seed(seed, run)), Clock()
    entropy, dice = rng.fill(16), rng.fill(8)
    real, mono, now = clock.now_ns(), clock.now_ns(), clock.now_ns()
    return (
        f"entropy {entropy.hex()}\n"
        f"dice {' '.join(str(b % 6 + 1) for b in dice)}\n"
        f"realtime {real // 10**9}.{real % 10**9:09d}\n"
        f"monotonic {mono // 10**9}.{mono % 10**9:09d}\n"
        f"time {now // 10**9}\n"
        f"resolution {CLOCK_STEP_NS}\n"
    ).encode()


def test_dice_is_reproducible_and_follows_shared_wasi(programs: dict[str, Program]) -> None:
    envelope = RunEnvelope(("dice",), (), (b"", b"", b""), SEED)

    async def scenario() -> tuple[bytes, bytes]:
        async with node(programs) as n:
            first, second = (
                await n.part(programs["dice"], envelope.encode()),
                await n.part(programs["dice"], envelope.encode()),
            )
            assert isinstance(first, PartDone) and isinstance(second, PartDone)
            return first.output, second.output

    first, second = run_async(scenario())
    assert first == second
    runs = ResultEnvelope.decode(first).runs
    assert [r.stdout for r in runs] == [expected_dice(SEED, i) for i in range(3)]
    assert [r.exit_code for r in runs] == [0, 0, 0]


def test_without_the_deterministic_flag_randomness_and_clocks_are_real(programs: dict[str, Program]) -> None:
    async def scenario() -> tuple[RunResult, ...]:
        async with node(programs) as n:
            return await n.runs(programs["dice"], RunEnvelope(("dice",), (), (b"", b""), SEED, deterministic=False))

    before = time.time()
    runs = run_async(scenario())
    assert [r.exit_code for r in runs] == [0, 0]
    lines = [dict(line.split(" ", 1) for line in r.stdout.decode().splitlines()) for r in runs]
    assert lines[0]["entropy"] != lines[1]["entropy"]
    assert abs(int(lines[0]["time"]) - before) < 60
    assert runs[0].stdout != expected_dice(SEED, 0)


def test_several_stdins_give_one_result_each_in_order(programs: dict[str, Program]) -> None:
    stdins = (b"one", b"", b"three\n", bytes(range(256)) * 300)

    async def scenario() -> tuple[RunResult, ...]:
        async with node(programs) as n:
            return await n.runs(programs["probe"], RunEnvelope(("probe", "echo"), ("A=1", "LANG=C"), stdins, SEED))

    runs = run_async(scenario())
    assert [r.stdout for r in runs] == list(stdins)
    # argv and env are the envelope's, and nothing of the worker's environment is inherited
    assert {r.stderr for r in runs} == {b"argv[0]=probe\nargv[1]=echo\nenv A=1\nenv LANG=C\n"}


def test_exit_codes_trap_and_no_file_system(programs: dict[str, Program]) -> None:
    async def scenario() -> list[RunResult]:
        async with node(programs) as n:
            probe = programs["probe"]
            return [
                await n.run(probe, "probe", "exit", "3"),
                await n.run(probe, "probe", "exit", "200"),  # wasmtime's own proc_exit refuses >= 126
                await n.run(probe, "probe", "print"),
                await n.run(probe, "probe", "trap"),
                await n.run(probe, "probe", "open", "/etc/passwd"),
                await n.run(probe, "probe", "open", "notes.txt"),
            ]

    exited, high, printed, trapped, absolute, relative = run_async(scenario())
    assert exited == RunResult(3, b"", b"")
    assert high == RunResult(200, b"", b"")
    assert printed == RunResult(0, b"hello\n", b"")
    assert trapped.exit_code == TRAPPED
    assert trapped.stderr == b"about to trap\ntrap: unreachable"
    for run, path in [(absolute, "/etc/passwd"), (relative, "notes.txt")]:
        assert run.exit_code == 1, run
        assert run.stdout == b""
        assert run.stderr.startswith(f"cannot open {path}: ".encode())


def test_a_never_ending_program_is_stopped_at_the_deadline(programs: dict[str, Program]) -> None:
    async def scenario() -> None:
        async with node(programs, Limits(deadline_s=0.5)) as n:
            probe = programs["probe"]
            started = time.monotonic()
            outcome = await n.part(probe, RunEnvelope(("probe", "loop"), (), (b"",), SEED).encode())
            assert time.monotonic() - started < 3
            assert isinstance(outcome, PartFailed)
            assert outcome.message.startswith("DeadlineExceeded: task ran past its 0.5s deadline"), outcome.message
            # the deadline covers the whole subtask, not each run
            started = time.monotonic()
            outcome = await n.part(probe, RunEnvelope(("probe", "loop"), (), (b"",) * 5, SEED).encode())
            assert time.monotonic() - started < 3
            assert isinstance(outcome, PartFailed) and "DeadlineExceeded" in outcome.message
            # the replacement process runs both kinds of module
            assert await n.run(probe, "probe", "print") == RunResult(0, b"hello\n", b"")
            pd_abi = await n.part(programs["mandelbrot"], b"\0" * 64)
            assert isinstance(pd_abi, PartFailed) and "ModuleStatus" in pd_abi.message, pd_abi

    run_async(scenario())


def test_memory_cap_applies_to_wasi_runs(programs: dict[str, Program]) -> None:
    async def scenario() -> None:
        async with node(programs, Limits(deadline_s=20, memory_bytes=32 * MIB)) as n:
            outcome = await n.part(programs["probe"], RunEnvelope(("probe", "grow"), (), (b"",), SEED).encode())
            assert isinstance(outcome, PartFailed), outcome
            assert outcome.message.startswith("MemoryCapReached: "), outcome.message
            assert "the memory cap is 32 MiB" in outcome.message

    run_async(scenario())


def test_input_that_is_not_a_run_envelope_fails_the_part(programs: dict[str, Program]) -> None:
    async def scenario() -> PartDone | PartFailed:
        async with node(programs) as n:
            return await n.part(programs["probe"], b"PDWOUT1\0\0\0\0\0")

    outcome = run_async(scenario())
    assert isinstance(outcome, PartFailed)
    assert "is not a run envelope" in outcome.message and "PDWASI1" in outcome.message
