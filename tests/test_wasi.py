"""shared/wasi.py: the envelopes and the determinism every node must reproduce, held to the
numbers in tests/wasi_vectors.json (the browser side is held to the same file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from processdistro.shared.wasi import (
    CLOCK_START_NS,
    CLOCK_STEP_NS,
    Clock,
    EnvelopeError,
    ResultEnvelope,
    RunEnvelope,
    RunResult,
    SplitMix64,
    run_seed,
)

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "wasi_vectors.json").read_text())


@pytest.mark.parametrize("case", VECTORS["splitmix64"], ids=lambda c: f"seed-{c['seed']}")
def test_splitmix64(case: dict[str, Any]) -> None:
    g = SplitMix64(int(case["seed"]))
    assert [str(g.next()) for _ in case["first"]] == case["first"]


@pytest.mark.parametrize("case", VECTORS["run_seed"], ids=lambda c: f"run-{c['run']}")
def test_run_seed(case: dict[str, Any]) -> None:
    assert str(run_seed(int(case["seed"]), case["run"])) == case["value"]


def test_random_get_starts_a_fresh_step_per_call() -> None:
    (case,) = VECTORS["random_get"]
    g = SplitMix64(int(case["seed"]))
    assert [g.fill(n).hex() for n in case["calls"]] == case["hex"]


def test_clock_advances_one_step_per_read() -> None:
    c = Clock()
    assert [c.now_ns() for _ in range(3)] == [CLOCK_START_NS + i * CLOCK_STEP_NS for i in range(3)]
    assert [str(CLOCK_START_NS + i * CLOCK_STEP_NS) for i in range(3)] == VECTORS["clock"]["first_three"]


def test_envelopes_match_the_vectors_and_round_trip() -> None:
    run = VECTORS["run_envelope"]
    env = RunEnvelope(
        tuple(run["argv"]), tuple(run["env"]), tuple(bytes.fromhex(s) for s in run["stdins_hex"]), int(run["seed"])
    )
    assert env.encode().hex() == run["hex"]
    assert RunEnvelope.decode(bytes.fromhex(run["hex"])) == env
    res = VECTORS["result_envelope"]
    out = ResultEnvelope(
        tuple(
            RunResult(r["exit_code"], bytes.fromhex(r["stdout_hex"]), bytes.fromhex(r["stderr_hex"]))
            for r in res["runs"]
        )
    )
    assert out.encode().hex() == res["hex"]
    assert ResultEnvelope.decode(bytes.fromhex(res["hex"])) == out


@pytest.mark.parametrize(
    "data",
    [b"", b"PDWASI1", b"PDWOUT1\0\x01\x00\x00\x00", bytes.fromhex(VECTORS["run_envelope"]["hex"]) + b"x"],
    ids=["empty", "short-magic", "wrong-magic", "trailing-bytes"],
)
def test_a_broken_run_envelope_is_refused(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        RunEnvelope.decode(data)


def test_stderr_keeps_its_tail() -> None:
    long = bytes(range(256)) * 1024
    (run,) = ResultEnvelope.decode(ResultEnvelope((RunResult(1, b"", long),)).encode()).runs
    assert run.stderr == long[-64 * 1024 :]


@pytest.mark.parametrize("seed", [0, 42, 2**64 - 1])
def test_neighbouring_runs_do_not_share_a_stream(seed: int) -> None:
    """Run i+1's stream is not run i's shifted by a step (it was, for seeds whose XOR with
    i * GOLDEN carried nothing)."""
    streams = []
    for run in range(4):
        g = SplitMix64(run_seed(seed, run))
        streams.append([g.next() for _ in range(8)])
    for a, b in zip(streams, streams[1:], strict=False):
        assert not set(a) & set(b)
