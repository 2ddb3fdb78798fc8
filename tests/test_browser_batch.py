"""Batches of pd-ABI inputs (shared/pd_batch.py) in the browser agent's Web Worker
(static/js/wasm_worker.js), in real Chromium: the same output bytes as the native worker's
ModuleRunner in wasmtime, through `pd_run_batch` (examples/rust_rot13) and through one
`pd_run` per input (a module without it, or whose `pd_run_batch` traps); per-input statuses,
a trapping input named, an input out of memory failing the task as a lone input does."""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from playwright.sync_api import Browser, Page
from processdistro.shared.pd_batch import decode_results, encode_batch
from processdistro.worker.runtime import MIB, Limits, ModuleRunner
from test_agent_protocol import WORKER_CALLS, blank_page, run_call, serve_modules
from test_examples_rust import build, rot13
from test_wasm_batch import ECHO_WAT, TRAPPING_BATCH, echo

MODULES = {
    "echo": ECHO_WAT.replace("BATCH", ""),
    "echo_trapping_batch": ECHO_WAT.replace("BATCH", TRAPPING_BATCH),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch")
    shutil.copy(build(), out / "rot13.wasm")
    for name, wat in MODULES.items():
        (out / f"{name}.wasm").write_bytes(wasmtime.wat2wasm(wat))
    return out


@pytest.fixture(scope="module")
def server(built: Path) -> Iterator[str]:
    with serve_modules(built) as url:
        yield url


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    with blank_page(browser, server) as p:
        yield p


def in_wasmtime(built: Path, name: str, data: bytes) -> bytes:
    path = built / f"{name}.wasm"
    runner = ModuleRunner(limits=Limits(deadline_s=30, memory_bytes=64 * MIB), interruptible=False)
    try:
        return runner.run(hashlib.sha256(path.read_bytes()).hexdigest(), path, data)
    finally:
        runner.close()


@pytest.mark.browser
def test_a_batch_gives_the_native_nodes_bytes(page: Page, built: Path) -> None:
    rng = random.Random(8)
    items = [rng.randbytes(rng.randrange(0, 200)) for _ in range(300)] + [b"", b"Hello, World!"]
    batch = encode_batch(items)
    echoed = encode_batch([b"one", b"bad", b"", b"seven"])
    replies = page.evaluate(
        WORKER_CALLS,
        [
            run_call(built, "rot13", batch),
            run_call(built, "rot13", b"Hello"),  # a lone input after a batch, on the same instance
            run_call(built, "echo", echoed),
            run_call(built, "echo_trapping_batch", echoed),
        ],
    )
    assert all(r["ok"] for r in replies), replies
    rot, lone, plain, fallback = (bytes(r["output"]) for r in replies)
    assert rot == in_wasmtime(built, "rot13", batch)
    assert decode_results(rot, len(items)) == [(0, rot13(item)) for item in items]
    assert lone == b"Uryyb"
    expected = [echo({b"b": 2}, item) for item in (b"one", b"bad", b"", b"seven")]
    assert plain == fallback == in_wasmtime(built, "echo", echoed)
    assert decode_results(plain, 4) == expected


@pytest.mark.browser
def test_a_trapping_input_is_named_and_one_out_of_memory_fails_the_task(page: Page, built: Path) -> None:
    trap = encode_batch([b"ok", b"bad", b"trap"])
    memory = encode_batch([b"ok", b"more memory"])
    replies = page.evaluate(
        WORKER_CALLS,
        [
            run_call(built, "echo_trapping_batch", trap),
            run_call(built, "echo", trap),
            run_call(built, "echo", memory),
            run_call(built, "echo", encode_batch([b"fine"])),  # the worker goes on
        ],
    )
    trapped, trapped_plain, out_of_memory, fine = replies
    for reply in (trapped, trapped_plain):
        assert not reply["ok"] and reply["error"]["message"].startswith("input 2 of 3: "), reply
    assert not out_of_memory["ok"] and out_of_memory["error"]["status"] == 3, out_of_memory
    assert out_of_memory["error"]["message"].startswith("input 1 of 2: ")
    assert fine["ok"] and decode_results(bytes(fine["output"]), 1) == [(0, b"fine")]
