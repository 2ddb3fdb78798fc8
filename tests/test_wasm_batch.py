"""Batches of pd-ABI inputs (shared/pd_batch.py, docs/wasm-abi.md "Batches"): the layout, the
node's side in real wasmtime (the worker's own ModuleRunner: `pd_run_batch` when the module
exports it, one `pd_run` per input when it does not or when the batch traps, the same bytes
either way) and the controller's reading of a batch result (per-input outputs and errors)."""

from __future__ import annotations

import hashlib
import random
import string
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import wasmtime
from processdistro.shared.pd_batch import (
    MAGIC,
    BatchError,
    decode_results,
    encode_batch,
    encode_results,
    split_batch,
)
from processdistro.shared.tasks.base import Checked, JobFiles, Origin, Verdict
from processdistro.shared.tasks.wasm import BATCH_RUNS, WasmPlugin
from processdistro.shared.tasks.wasm_outputs import OutputError, node_results, read_packed
from processdistro.worker.exceptions import MemoryCapReached, ModuleInvalid, ModuleTrapped
from processdistro.worker.runtime import MIB, Limits, ModuleRunner
from test_examples_rust import build, rot13

ROOT = Path(__file__).resolve().parent.parent
MATRIX_MUL = ROOT / "static" / "wasm" / "matrix_mul.wasm"  # a kernel without pd_run_batch

# Echoes its input; an input starting with "b" is status 2, with "m" status 3, with "t" a trap.
# `pd_run_batch` traps always (so the host finds the input one at a time) when $batch_traps.
ECHO_WAT = """(module
  (memory (export "memory") 1)
  (global $len (mut i32) (i32.const 0))
  (func (export "pd_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "pd_run") (param $p i32) (param $n i32) (result i32)
    (global.set $len (i32.const 0))
    (if (i32.eqz (local.get $n)) (then (return (i32.const 0))))
    (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 116)) (then unreachable))
    (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 98)) (then (return (i32.const 2))))
    (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 109)) (then (return (i32.const 3))))
    (global.set $len (local.get $n))
    i32.const 0)
  (func (export "pd_output_ptr") (result i32) i32.const 1024)
  (func (export "pd_output_len") (result i32) global.get $len)
  BATCH)"""
TRAPPING_BATCH = '(func (export "pd_run_batch") (param i32 i32) (result i32) unreachable)'


def echo(status_of: dict[bytes, int], item: bytes) -> tuple[int, bytes]:
    status = status_of.get(item[:1], 0)
    return status, item if status == 0 else b""


def module(tmp_path: Path, wat: str, name: str) -> tuple[str, Path]:
    path = tmp_path / name
    path.write_bytes(wasmtime.wat2wasm(wat))
    return hashlib.sha256(path.read_bytes()).hexdigest(), path


@pytest.fixture
def runner() -> Iterator[ModuleRunner]:
    r = ModuleRunner(limits=Limits(deadline_s=30, memory_bytes=64 * MIB), interruptible=False)
    yield r
    r.close()


# ------------------------------------------------------------------ the layout


@pytest.mark.parametrize(
    "items",
    [[b"x"], [b""], [b"", b"", b""], [b"hello", b"", bytes(range(256))], [MAGIC, encode_batch([b"a"])]],
    ids=["one", "one empty", "three empty", "mixed", "batch-looking items"],
)
def test_a_batch_input_splits_back_into_its_items(items: list[bytes]) -> None:
    split = split_batch(encode_batch(items))
    assert split is not None and [bytes(v) for v in split] == items


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"mandelbrot input, 64 bytes, as it is" + bytes(28),
        MAGIC,  # no count
        MAGIC + struct.pack("<I", 1),  # a count, no item
        MAGIC + struct.pack("<II", 1, 5) + b"abcd",  # an item cut short
        encode_batch([b"abc"]) + b"!",  # bytes after the last item
        b"PDBAT1\xf8\xfe" + encode_batch([b"a"])[8:],  # another magic
    ],
    ids=["empty", "plain", "magic only", "no item", "short item", "trailing", "wrong magic"],
)
def test_anything_but_a_well_formed_batch_is_one_input(data: bytes) -> None:
    assert split_batch(data) is None


def test_the_browser_agent_is_held_to_the_same_bytes() -> None:
    """tests/js/pd_batch.test.mjs checks static/js/pd_batch.js against these strings."""
    js = (ROOT / "tests" / "js" / "pd_batch.test.mjs").read_text()
    batch = encode_batch([b"hi", b"", b"\x00\xff"]).hex()
    results = encode_results([(0, b"uv"), (2, b""), (0, b"")]).hex()
    assert f'BATCH_HEX = "{batch}"' in js and f'RESULTS_HEX = "{results}"' in js
    assert MAGIC.hex() == "504442415431f8ff" and '"504442415431f8ff"' in js


def test_the_magic_is_no_valid_input_of_a_built_in_kernel() -> None:
    (as_float,) = struct.unpack("<d", MAGIC)
    assert np.isnan(as_float)  # mandelbrot refuses a NaN bound
    assert struct.unpack("<I", MAGIC[:4])[0] not in (0, 1)  # matrix_mul dtype
    assert MAGIC[0] not in (0, 1)  # password_hash mode


@pytest.mark.parametrize(
    ("data", "expected", "error"),
    [
        (encode_results([(0, b"ab"), (2, b"")]), 3, "expected 3"),
        (b"\x01\x00", None, "at least 4 bytes"),
        (struct.pack("<III", 1, 2, 5) + b"ab", None, "ends inside a result"),
        (struct.pack("<III", 1, 2, 1) + b"x", None, "a failed result"),
        (encode_results([(0, b"ab")]) + b"z", None, "after the last result"),
        (struct.pack("<I", 10**9), None, "cannot hold"),
    ],
    ids=["count", "short", "cut", "failed with bytes", "trailing", "huge count"],
)
def test_a_malformed_batch_output_is_refused(data: bytes, expected: int | None, error: str) -> None:
    with pytest.raises(BatchError, match=error):
        decode_results(data, expected)


# ------------------------------------------------------------------ the node's side, in wasmtime


def test_rot13_batches_give_each_inputs_own_output(runner: ModuleRunner) -> None:
    wasm = build()
    sha = hashlib.sha256(wasm.read_bytes()).hexdigest()
    rng = random.Random(5)
    items = [rng.randbytes(rng.randrange(0, 300)) for _ in range(500)] + [b"", string.ascii_letters.encode()]
    out = runner.run(sha, wasm, encode_batch(items))
    assert runner._instances[sha].run_batch is not None  # the module exports it: one call
    assert decode_results(out, len(items)) == [(0, rot13(item)) for item in items]
    # one pd_run per input gives the same bytes (and the instance serves both)
    assert [runner.run(sha, wasm, item) for item in items] == [rot13(item) for item in items]
    # a large input after a batch, and a batch after that: nothing of one run leaks into the next
    big = rng.randbytes(2 * MIB)
    assert runner.run(sha, wasm, big) == rot13(big)
    assert runner.run(sha, wasm, encode_batch(items[:3])) == encode_results([(0, rot13(i)) for i in items[:3]])


def test_a_kernel_without_pd_run_batch_runs_each_input_alone(runner: ModuleRunner) -> None:
    sha = hashlib.sha256(MATRIX_MUL.read_bytes()).hexdigest()
    rng = np.random.default_rng(3)

    def matmul_input(m: int, k: int, n: int) -> bytes:
        a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
        return struct.pack("<4I", 0, m, k, n) + a.astype("<f8").tobytes() + b.astype("<f8").tobytes()

    items = [matmul_input(2, 3, 4), struct.pack("<4I", 7, 1, 1, 1) + bytes(16), matmul_input(5, 1, 2), b"short"]
    results = decode_results(runner.run(sha, MATRIX_MUL, encode_batch(items)), len(items))
    assert results == [
        (0, runner.run(sha, MATRIX_MUL, items[0])),
        (2, b""),  # dtype 7: bad parameters, that input's own status
        (0, runner.run(sha, MATRIX_MUL, items[2])),
        (1, b""),  # shorter than the header
    ]


@pytest.mark.parametrize("batch_export", ["", TRAPPING_BATCH], ids=["no pd_run_batch", "pd_run_batch traps"])
def test_statuses_traps_and_memory_of_batched_inputs(runner: ModuleRunner, tmp_path: Path, batch_export: str) -> None:
    sha, path = module(tmp_path, ECHO_WAT.replace("BATCH", batch_export), "echo.wasm")
    items = [b"one", b"bad", b"", b"seven"]
    expected = [echo({b"b": 2}, item) for item in items]
    assert decode_results(runner.run(sha, path, encode_batch(items)), len(items)) == expected
    with pytest.raises(ModuleTrapped, match=r"^input 2 of 3: module trapped"):
        runner.run(sha, path, encode_batch([b"ok", b"bad", b"trap"]))
    with pytest.raises(MemoryCapReached, match=r"^input 1 of 2: "):  # as a lone input: the subtask fails
        runner.run(sha, path, encode_batch([b"ok", b"more memory"]))
    # after all that, the module still answers a lone input and a batch
    assert runner.run(sha, path, b"alone") == b"alone"
    assert decode_results(runner.run(sha, path, encode_batch(items)), len(items)) == expected


# ------------------------------------------------------------------ the controller's side


def test_map_inputs_of_a_pd_abi_module_are_cut_into_batches(tmp_path: Path) -> None:
    blocks: dict[str, bytes] = {}
    items = [b"%d" % i for i in range(2 * BATCH_RUNS + 5)]
    raw = {"module": build().read_bytes(), "items": items, "outdir": str(tmp_path / "o"), "packed": True}
    plugin = WasmPlugin()
    batched = plugin.parse_params(plugin.prepare({**raw, "batch": True}, blocks.__setitem__).params)
    assert [(first, n) for first, n, _b, _names in batched.groups] == [
        (0, BATCH_RUNS),
        (BATCH_RUNS, BATCH_RUNS),
        (2 * BATCH_RUNS, 5),
    ]
    split = split_batch(blocks[batched.groups[1][2]])
    assert split is not None and [bytes(v) for v in split] == items[BATCH_RUNS : 2 * BATCH_RUNS]
    alone = plugin.parse_params(plugin.prepare({**raw, "outdir": str(tmp_path / "p")}, blocks.__setitem__).params)
    assert not alone.batch and len(alone.groups) == len(items)  # batch=False: one input per subtask


def test_a_batch_result_reads_as_one_result_per_input(tmp_path: Path) -> None:
    blocks: dict[str, bytes] = {}
    items = [b"fine", b"broken", b"also fine"]
    raw = {"module": build().read_bytes(), "items": items, "outdir": str(tmp_path / "o"), "packed": True}
    plugin = WasmPlugin()
    params = plugin.parse_params(plugin.prepare({**raw, "batch": True}, blocks.__setitem__).params)
    output = encode_results([(0, b"svar"), (2, b""), (0, b"nyfb svar")])
    files = JobFiles.under(tmp_path / "data", "job", blocks.__getitem__)
    rng = random.Random(1)
    assert plugin.verify(params, 0, b"", output, rng) is Verdict.ACCEPT
    assert plugin.verify(params, 0, b"", encode_results([(0, b"svar")]), rng) is Verdict.REJECT
    assert plugin.verify(params, 0, b"", output[:-1], rng) is Verdict.REJECT
    assert plugin.confirm(params, 0, output)  # a failed input counts once a second node agrees
    assert plugin.failure(files, params, 0, output) == (
        "input '1' exited with code 2; stderr ends: pd_run returned status 2 (bad parameters)"
    )
    plugin.merge_result(files, params, 0, output, Origin("node-a", 3.0, Checked.SINGLE))
    packed = (tmp_path / "o" / "packed" / "000000000").read_bytes()
    assert packed == output  # the batch output as the node returned it
    assert read_packed(packed, batch=True, inputs=3) == [b"svar", b"", b"nyfb svar"]
    with pytest.raises(OutputError):
        read_packed(packed, batch=True, inputs=2)
    manifest = plugin.finalize(files, params)["manifest"]
    rows = [line for line in Path(manifest).read_text().splitlines()]
    assert [r.split(", ")[2] for r in rows] == ['"exit_code": 0', '"exit_code": 2', '"exit_code": 0']
    runs = node_results(wasi=False, batch=True, output=output, inputs=3)
    assert [(r.exit_code, r.stdout) for r in runs] == [(0, b"svar"), (2, b""), (0, b"nyfb svar")]


# A hostile (or broken) module: its pd_run_batch says ok but its output is not the batch's.
LIAR_WAT = """(module
  (memory (export "memory") 1)
  (func (export "pd_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "pd_run") (param i32 i32) (result i32) i32.const 0)
  (func (export "pd_run_batch") (param i32 i32) (result i32) i32.const 0)
  (func (export "pd_output_ptr") (result i32) i32.const 0)
  (func (export "pd_output_len") (result i32) LEN))"""


@pytest.mark.parametrize(
    ("length", "error"),
    [("i32.const 4", "pd_run_batch output: a batch output of 0 results, expected 2"), ("i32.const -16", "outside")],
    ids=["too few results", "outside memory"],
)
def test_a_module_lying_in_its_batch_output_fails_the_task(
    runner: ModuleRunner, tmp_path: Path, length: str, error: str
) -> None:
    sha, path = module(tmp_path, LIAR_WAT.replace("LEN", length), "liar.wasm")
    with pytest.raises(ModuleInvalid, match=error):
        runner.run(sha, path, encode_batch([b"a", b"b"]))
