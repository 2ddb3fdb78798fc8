"""`submit wasm` end to end on real native workers: examples/wordfreq over 200 files, every
output equal to its native build; dice (randomness) replicated on every input across two
workers with no dispute; a failing input confirmed by the second worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Controller
from processdistro.shared import keys
from processdistro.shared.store.connection import Client
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture

ROOT = Path(__file__).resolve().parent.parent


def build_examples() -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)


def submit(ctl: Controller, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processdistro", "submit", "wasm", *args, "--wait", "-q", "--wait-timeout", "240"],
        env=ctl.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wordfreq_over_200_files_on_two_workers(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    build_examples()
    for i in range(2):
        w = Worker(controller, tmp_path / f"w{i}", "--cores", "1")
        workers.append(w)
    for w in workers:
        w.wait_connected()
    inputs = tmp_path / "in"
    for i in range(200):
        (inputs / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (inputs / f"d{i % 7}" / f"{i:03d}.txt").write_text(
            f"the quick brown fox {i} jumps over the lazy dog {i % 13}\n" * (1 + i % 5)
        )
    out = tmp_path / "out"
    wasm = ROOT / "examples" / "wordfreq" / "wordfreq.wasm"
    done = submit(controller, str(wasm), "--inputs", str(inputs), "-o", str(out), "--replicate", "1")
    assert done.returncode == 0, done.stdout + done.stderr + controller.logs()
    native = ROOT / "examples" / "wordfreq" / "wordfreq"
    for path in sorted(inputs.rglob("*.txt")):
        rel = path.relative_to(inputs).as_posix()
        expected = subprocess.run([native], input=path.read_bytes(), capture_output=True).stdout
        assert (out / "out" / rel).read_bytes() == expected, rel
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 200
    assert {m["verified"] for m in manifest} == {"replicated"}
    assert all(len(m["nodes"]) == 2 for m in manifest)
    stats = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
    assert stats.get("replicas_disputed", 0) == 0, stats
    assert r.keys(keys.module_blob("*")) == []


def test_dice_replicated_everywhere_agrees_and_a_failure_is_confirmed(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    build_examples()
    for i in range(2):
        workers.append(Worker(controller, tmp_path / f"w{i}", "--cores", "1"))
    for w in workers:
        w.wait_connected()
    out = tmp_path / "dice"
    wasm = ROOT / "examples" / "dice" / "dice.wasm"
    done = submit(controller, str(wasm), "--count", "20", "-o", str(out), "--replicate", "1")
    assert done.returncode == 0, done.stdout + done.stderr + controller.logs()
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["input"] for m in manifest] == [f"PD_INDEX={i}" for i in range(20)]
    assert {m["verified"] for m in manifest} == {"replicated"}
    stats = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
    assert stats.get("replicas_disputed", 0) == 0, stats


FAILS_C = r"""
#include <stdio.h>
#include <string.h>
int main(void) {
  char buf[256]; size_t n = fread(buf, 1, sizeof buf, stdin);
  if (n >= 4 && memcmp(buf, "fail", 4) == 0) { fprintf(stderr, "refusing %.*s", (int)n, buf); return 7; }
  fwrite(buf, 1, n, stdout);
  return 0;
}
"""


def test_a_failure_is_confirmed_by_the_other_worker(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    src = tmp_path / "f.c"
    src.write_text(FAILS_C)
    wasm = tmp_path / "f.wasm"
    subprocess.run(["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", wasm, src], check=True)
    for i in range(2):
        workers.append(Worker(controller, tmp_path / f"w{i}", "--cores", "1"))
    for w in workers:
        w.wait_connected()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(10):
        (inputs / f"{i}.txt").write_text("fail now" if i == 4 else f"ok {i}")
    out = tmp_path / "o"
    done = submit(controller, str(wasm), "--inputs", str(inputs), "-o", str(out), "--replicate", "0", "--keep-going")
    assert done.returncode == 1, done.stdout + done.stderr
    said = " ".join(done.stdout.split())
    assert "10 inputs, 1 failed" in said and "failed: 4.txt (index 4): exited with code 7" in said
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert {m["verified"] for m in manifest} == {"replicated"}  # one subtask: its failure confirmed
    assert len(manifest[4]["nodes"]) == 2
    assert (out / "err" / "4.txt").read_text() == "refusing fail now"
    done = submit(controller, str(wasm), "--inputs", str(inputs), "-o", str(tmp_path / "o2"), "--replicate", "0")
    assert done.returncode == 1
    assert "input '4.txt' exited with code 7; stderr ends: refusing fail now" in " ".join(done.stderr.split())
