"""examples/rust_rot13, a pd-ABI module written in Rust (docs/wasm-abi.md): built by
`make rust-example` (which installs the wasm32 Rust toolchain when missing, and rebuilds only
when a source changed), its native `cargo test`, recognised as pd-ABI, run through the worker's
own runner, and submitted end to end (`processdistro submit wasm ... --inputs`) to a real native
worker - every output equal to ROT13 computed in Python."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import subprocess
import sys
from pathlib import Path

from conftest import Controller
from processdistro.shared.wasm_module import ModuleKind, inspect
from processdistro.worker.runtime import MIB, Limits, ModuleRunner
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "rust_rot13"
WASM = EXAMPLE / "rust_rot13.wasm"

ROT13 = bytes.maketrans(
    string.ascii_lowercase.encode() + string.ascii_uppercase.encode(),
    (string.ascii_lowercase[13:] + string.ascii_lowercase[:13]).encode()
    + (string.ascii_uppercase[13:] + string.ascii_uppercase[:13]).encode(),
)


def rot13(data: bytes) -> bytes:
    """The module's specification, in Python."""
    return data.translate(ROT13)


def build() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT), "rust-example"], check=True)
    assert WASM.is_file()
    return WASM


INPUTS = {
    "hello": b"Hello, World!",
    "alphabet": string.ascii_letters.encode() + string.digits.encode(),
    "every byte": bytes(range(256)),
    "utf-8": "Grüße, Zürich ✓ — Why did the chicken cross the road?".encode(),
    "empty": b"",
    "large": random.Random(14).randbytes(3 * MIB),
}


def test_python_reference_is_rot13() -> None:
    assert rot13(b"Hello, World! xyz ABC 123") == b"Uryyb, Jbeyq! klm NOP 123"
    assert all(rot13(rot13(d)) == d for d in INPUTS.values())


def test_make_builds_a_pd_abi_module_and_skips_an_up_to_date_one() -> None:
    wasm = build()
    info = inspect(wasm.read_bytes(), name=wasm.name)
    assert info.kind is ModuleKind.PD_ABI
    assert info.sha256 == hashlib.sha256(wasm.read_bytes()).hexdigest()
    before = wasm.stat().st_mtime_ns
    again = subprocess.run(["make", "-C", str(ROOT / "examples"), "rust"], check=True, capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout, again.stdout
    assert wasm.stat().st_mtime_ns == before


def test_native_cargo_test_passes(tmp_path: Path) -> None:
    cargo = shutil.which("cargo") or "/usr/bin/cargo"
    done = subprocess.run(
        [cargo, "test", "--quiet"],
        cwd=EXAMPLE,
        env={**os.environ, "CARGO_TARGET_DIR": str(tmp_path / "target")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout, done.stdout


def test_the_workers_runner_gives_rot13_of_each_input() -> None:
    wasm = build()
    sha = hashlib.sha256(wasm.read_bytes()).hexdigest()
    runner = ModuleRunner(limits=Limits(deadline_s=60, memory_bytes=64 * MIB))
    try:
        # one instance serves every run, in both orders (pd_alloc frees the previous run)
        for name, data in [*INPUTS.items(), *reversed(INPUTS.items())]:
            assert runner.run(sha, wasm, data) == rot13(data), name
    finally:
        runner.close()


def test_submit_wasm_end_to_end_on_a_native_worker(
    tmp_path: Path,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    wasm = build()
    workers.append(Worker(controller, tmp_path / "w0", "--cores", "1"))
    workers[0].wait_connected()
    inputs = tmp_path / "in"
    files: dict[str, bytes] = {}
    for i in range(30):
        files[f"d{i % 3}/{i:02d}.txt"] = f"The quick brown fox {i} jumps over the lazy dog.\n".encode() * (1 + i)
    files["bytes.bin"] = bytes(range(256))
    files["utf8.txt"] = INPUTS["utf-8"]
    for rel, data in files.items():
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        (inputs / rel).write_bytes(data)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "processdistro", "submit", "wasm", str(wasm), "--inputs", str(inputs), "-o", str(out)]
        + ["--wait", "-q", "--wait-timeout", "240"],
        env=controller.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr + controller.logs()
    for rel, data in files.items():
        assert (out / "out" / rel).read_bytes() == rot13(data), rel
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(m["input"] for m in manifest) == sorted(files)
