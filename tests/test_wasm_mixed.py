"""`submit wasm` on a real Chromium tab and a real `processdistro worker` (issue 14's checks
that need both kinds of node): examples/wordfreq over 200 files on both at once, equal to its
native build; examples/dice (randomness, clocks) replicated on every input across the two
with no dispute; a never-ending program stopped at `--timeout` on a browser alone and on a
native worker alone; failing inputs named with their exit codes on a browser, the rest exact.
And what a program sees must not depend on the kind of node: its stdio (file type, seeking,
isatty) and its memory cap (growth refused, not the subtask failed) alike on both."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Controller
from processdistro.shared import keys
from processdistro.shared.store.connection import Client
from test_e2e_browser import close_all, join
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

LOOP_C = "int main(void) { for (;;); }\n"
FAILS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static char buf[4 << 20];
int main(void) {
  size_t n = fread(buf, 1, sizeof buf, stdin);
  if (n >= 4 && memcmp(buf, "trap", 4) == 0) { fputs("about to trap", stderr); __builtin_trap(); }
  if (n >= 3 && memcmp(buf, "div", 3) == 0) { volatile int zero = 0; printf("%d", (int)n / zero); }
  if (n >= 4 && memcmp(buf, "fail", 4) == 0) { fprintf(stderr, "refusing %.*s", (int)n, buf); return 3 + (int)n % 5; }
  for (size_t i = 0; i < n; i++) buf[i] ^= 0x20;
  fwrite(buf, 1, n, stdout);
  return 0;
}
"""


def build_examples() -> None:
    subprocess.run(["make", "-s", "-C", str(EXAMPLES)], check=True)


def compile_c(tmp: Path, name: str, source: str) -> Path:
    src, wasm = tmp / f"{name}.c", tmp / f"{name}.wasm"
    src.write_text(source)
    subprocess.run(["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", str(wasm), str(src)], check=True)
    return wasm


def submit(ctl: Controller, *args: str, wait_s: int = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processdistro", "submit", "wasm", *args, "--wait", "-q"]
        + ["--wait-timeout", str(wait_s)],
        env=ctl.env,
        capture_output=True,
        text=True,
        timeout=wait_s + 60,
    )


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def stats(r: Client) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}


def node_ids(r: Client) -> set[str]:
    """The ids of the nodes the gateway knows (`node:<id>` hashes, not their sub-keys)."""
    prefix = keys.node("")
    return {k.decode()[len(prefix) :] for k in r.scan_iter(match=keys.node("*")) if b":" not in k[len(prefix) :]}


def wait_nodes(r: Client, n: int, timeout: float = 30) -> set[str]:
    deadline = time.monotonic() + timeout
    while len(ids := node_ids(r)) < n:
        assert time.monotonic() < deadline, f"expected {n} nodes, have {ids}"
        time.sleep(0.1)
    return ids


def native(ctl: Controller, tmp: Path, started: list[Worker], home: str = "worker-home") -> Worker:
    w = Worker(ctl, tmp / home, "--cores", "1")
    started.append(w)
    w.wait_connected()
    return w


@pytest.fixture
def tab(controller: Controller, browser: Any) -> Iterator[Any]:
    page = join(browser, controller)
    yield page
    close_all([page])


# ---------------------------------------------------------------------------- both nodes at once


def test_wordfreq_over_200_files_on_a_browser_and_a_native_worker(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    tab: Any,
    workers: list[Worker],  # noqa: F811
) -> None:
    build_examples()
    native(controller, tmp_path, workers)
    both = wait_nodes(r, 2)
    inputs = tmp_path / "in"
    for i in range(200):
        (inputs / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        words = " ".join(f"w{(i * 7 + k * 13) % 37}" for k in range(40 + i % 50))
        (inputs / f"d{i % 7}" / f"{i:03d}.txt").write_text(f"The quick brown fox {i}\n{words}\n" * (1 + i % 9))
    out = tmp_path / "out"
    done = submit(
        controller, str(EXAMPLES / "wordfreq" / "wordfreq.wasm"), "--inputs", str(inputs), "-o", str(out),
        "--replicate", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + controller.logs()
    for path in sorted(inputs.rglob("*.txt")):
        rel = path.relative_to(inputs).as_posix()
        expected = subprocess.run([EXAMPLES / "wordfreq" / "wordfreq"], input=path.read_bytes(), capture_output=True)
        assert expected.returncode == 0 and expected.stdout, rel
        assert (out / "out" / rel).read_bytes() == expected.stdout, rel
    rows = manifest(out)
    assert [m["input"] for m in rows] == sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.txt"))
    assert {m["exit_code"] for m in rows} == {0}
    assert {m["node"] for m in rows} == both, f"both nodes should run inputs: {both}"
    assert r.keys(keys.module_blob("*")) == []


def test_dice_replicated_on_every_input_across_a_browser_and_a_native_worker(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    tab: Any,
    workers: list[Worker],  # noqa: F811
) -> None:
    build_examples()
    native(controller, tmp_path, workers)
    both = wait_nodes(r, 2)
    out = tmp_path / "dice"
    done = submit(controller, str(EXAMPLES / "dice" / "dice.wasm"), "--count", "12", "-o", str(out), "--replicate", "1")
    assert done.returncode == 0, done.stdout + done.stderr + controller.logs()
    rows = manifest(out)
    assert [m["input"] for m in rows] == [f"PD_INDEX={i}" for i in range(12)]
    assert {m["verified"] for m in rows} == {"replicated"}
    assert all(set(m["nodes"]) == both for m in rows), rows
    assert stats(r).get("replicas_disputed", 0) == 0, stats(r)
    rolls = {(out / "out" / str(i)).read_text() for i in range(12)}
    assert len(rolls) == 12 and all("dice " in x and "realtime " in x for x in rolls)  # seeded per run


# What a program learns of its stdin, stdout and stderr (file type, rights, size, whether it may
# seek, whether a terminal): wasmtime's answers for its in-memory stdio, which a browser must
# give too, or a program that asks (isatty, fstat, lseek: Rust's is_terminal, a sized read of
# stdin, a second pass over it) prints different bytes on the two kinds of node.
STDIO_C = r"""
#include <stdio.h>
#include <unistd.h>
#include <wasi/api.h>
int main(void) {
  char buf[64]; size_t n = fread(buf, 1, sizeof buf, stdin);
  printf("read %zu\n", n);
  for (int fd = 0; fd < 4; fd++) {
    __wasi_fdstat_t s = {0}; __wasi_filestat_t f = {0}; __wasi_filesize_t at = 0;
    int e1 = __wasi_fd_fdstat_get(fd, &s), e2 = __wasi_fd_filestat_get(fd, &f);
    int e3 = __wasi_fd_seek(fd, 0, __WASI_WHENCE_SET, &at), e4 = __wasi_fd_tell(fd, &at);
    printf("fd %d: fdstat %d type %d rights %llx %llx; filestat %d type %d size %llu; seek %d tell %d;"
           " advise %d sync %d; tty %d\n", fd, e1, s.fs_filetype, (unsigned long long)s.fs_rights_base,
           (unsigned long long)s.fs_rights_inheriting, e2, f.filetype, (unsigned long long)f.size, e3, e4,
           __wasi_fd_advise(fd, 0, 1, 0), __wasi_fd_sync(fd), isatty(fd));
  }
  printf("again %zu\n", fread(buf, 1, sizeof buf, stdin));
  return 0;
}
"""
STDIO_FDS = (
    "fd 0: fdstat 0 type 0 rights 2 2; filestat 0 type 0 size 0; seek 70 tell 70; advise 8 sync 8; tty 0\n"
    "fd 1: fdstat 0 type 0 rights 40 40; filestat 0 type 0 size 0; seek 70 tell 70; advise 8 sync 8; tty 0\n"
    "fd 2: fdstat 0 type 0 rights 40 40; filestat 0 type 0 size 0; seek 70 tell 70; advise 8 sync 8; tty 0\n"
    "fd 3: fdstat 8 type 0 rights 0 0; filestat 8 type 0 size 0; seek 8 tell 8; advise 8 sync 8; tty 0\n"
)


def test_stdio_looks_the_same_to_a_program_on_a_browser_and_a_native_worker(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    tab: Any,
    workers: list[Worker],  # noqa: F811
) -> None:
    native(controller, tmp_path, workers)
    both = wait_nodes(r, 2)
    wasm = compile_c(tmp_path, "stdio", STDIO_C)
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"line {i}\n" for i in range(6)))
    out = tmp_path / "o"
    done = submit(
        controller, str(wasm), "--lines", str(lines), "-o", str(out), "--replicate", "1", wait_s=120
    )  # a dispute waits for a third node
    assert done.returncode == 0, done.stdout + done.stderr + controller.logs()
    assert stats(r).get("replicas_disputed", 0) == 0, stats(r)
    rows = manifest(out)
    assert {m["verified"] for m in rows} == {"replicated"} and all(set(m["nodes"]) == both for m in rows), rows
    for i in range(6):
        assert (out / "out" / str(i)).read_text() == f"read {len(f'line {i}') + 1}\n{STDIO_FDS}again 0\n"


# ---------------------------------------------------------------------------- deadlines, failures


def check_stopped_at_deadline(ctl: Controller, tmp: Path, name: str) -> None:
    loop = compile_c(tmp, "loop", LOOP_C)
    inputs = tmp / "one"
    inputs.mkdir(exist_ok=True)
    (inputs / "x.txt").write_text("x")
    started = time.monotonic()
    done = submit(ctl, str(loop), "--inputs", str(inputs), "-o", str(tmp / f"o-{name}"), "--timeout", "2", wait_s=180)
    took = time.monotonic() - started
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0, said + ctl.logs()
    assert "ran past its 2s deadline" in said, said + ctl.logs()  # the same words on both kinds of node
    assert took < 120, f"the job took {took:.0f}s to fail: {said}"


def test_a_never_ending_program_is_stopped_at_timeout_on_a_browser(
    tmp_path: Path, r: Client, controller: Controller, browser: Any
) -> None:
    """Two tabs: a lone node's failure only makes the job wait (issue 9.1: failures are
    evidence about the node); two distinct nodes failing the subtask fail the job."""
    pages = [join(browser, controller) for _ in range(2)]
    try:
        wait_nodes(r, 2)
        check_stopped_at_deadline(controller, tmp_path, "browser")
    finally:
        close_all(pages)


def test_a_never_ending_program_is_stopped_at_timeout_on_a_native_worker(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    """Two native workers, for the same reason as the browser case."""
    for i in range(2):
        native(controller, tmp_path, workers, f"worker-home-{i}")
    wait_nodes(r, 2)
    check_stopped_at_deadline(controller, tmp_path, "native")


FAILING = {4: b"fail", 17: b"fail!!!!!!", 23: b"trap", 41: b"div"}  # input index -> its bytes
BIG = 55  # a 1.5 MiB input: a subtask of its own (GROUP_BYTES), stdin read in many chunks


def failing_inputs(inputs: Path) -> None:
    inputs.mkdir()
    for i in range(70):
        data = FAILING.get(i, f"ok {i} ".encode() * (i + 1))
        if i == BIG:
            data = bytes(range(32, 127)) * (1536 * 1024 // 95)
        (inputs / f"{i:02d}.txt").write_bytes(data)


@pytest.mark.parametrize("with_native", [False, True], ids=["browser alone", "browser and native, replicated"])
def test_failing_inputs_are_named_with_their_exit_codes_and_the_rest_exact(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    tab: Any,
    workers: list[Worker],  # noqa: F811
    with_native: bool,
) -> None:
    if with_native:
        native(controller, tmp_path, workers)
    nodes = wait_nodes(r, 2 if with_native else 1)
    wasm = compile_c(tmp_path, "fails", FAILS_C)
    inputs = tmp_path / "in"
    failing_inputs(inputs)
    out = tmp_path / "o"
    replicate = "1" if with_native else "0"
    done = submit(
        controller, str(wasm), "--inputs", str(inputs), "-o", str(out), "--replicate", replicate, "--keep-going"
    )
    said = " ".join(done.stdout.split())
    assert done.returncode == 1, done.stdout + done.stderr + controller.logs()
    assert "70 inputs, 4 failed" in said, said
    # "fail" + "!"s exits with 3 + its length % 5; __builtin_trap and a division by zero trap
    for named in ("04.txt (index 4): exited with code 7", "17.txt (index 17): exited with code 3",
                  "23.txt (index 23): trapped", "41.txt (index 41): trapped"):  # fmt: skip
        assert f"failed: {named}" in said, said
    rows = manifest(out)
    assert [m["input"] for m in rows] == [f"{i:02d}.txt" for i in range(70)]
    assert [(m["index"], m["exit_code"]) for m in rows if m["exit_code"]] == [(4, 7), (17, 3), (23, -1), (41, -1)]
    assert (out / "err" / "04.txt").read_bytes() == b"refusing fail"
    assert (out / "err" / "23.txt").read_bytes() == b"about to trap\ntrap: unreachable"
    assert (out / "err" / "41.txt").read_bytes() == b"trap: divide by zero"
    for path in sorted(inputs.iterdir()):
        if int(path.stem) not in FAILING:
            expected = bytes(b ^ 0x20 for b in path.read_bytes())
            assert (out / "out" / path.name).read_bytes() == expected, path.name
            assert not (out / "err" / path.name).exists(), path.name
    if with_native:
        assert {m["verified"] for m in rows} == {"replicated"}
        assert all(set(m["nodes"]) == nodes for m in rows), rows
        assert stats(r).get("replicas_disputed", 0) == 0, stats(r)
    else:
        assert {m["node"] for m in rows} == nodes
    done = submit(controller, str(wasm), "--inputs", str(inputs), "-o", str(tmp_path / "o2"), "--replicate", replicate)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "input '04.txt' exited with code 7; stderr ends: refusing fail" in " ".join(done.stderr.split())


# The memory cap: a native node's wasmtime refuses `memory.grow` past it, so malloc returns NULL
# and the program goes on; a browser must refuse it the same way, not fail the whole subtask.
MALLOC_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
  char line[32] = {0}; fread(line, 1, sizeof line - 1, stdin);
  long n = atol(line); char *p = malloc(n);
  if (!p) { fprintf(stderr, "no memory for %ld bytes", n); return 2; }
  memset(p, 1, n); volatile char *q = p;
  printf("%ld bytes: %d\n", n, q[0] + q[n - 1]);
  return 0;
}
"""


@pytest.mark.parametrize("on", ["browser", "native"])
def test_the_memory_cap_refuses_growth_alike_on_a_browser_and_a_native_worker(
    tmp_path: Path,
    r: Client,
    controller: Controller,
    browser: Any,
    workers: list[Worker],  # noqa: F811
    on: str,
) -> None:
    pages = [join(browser, controller)] if on == "browser" else []
    try:
        if on == "native":
            native(controller, tmp_path, workers)
        wait_nodes(r, 1)
        wasm = compile_c(tmp_path, "malloc", MALLOC_C)
        lines = tmp_path / "sizes.txt"
        lines.write_text("100000000\n1000000\n")
        out = tmp_path / "o"
        done = submit(controller, str(wasm), "--lines", str(lines), "-o", str(out), "--memory", "32", "--keep-going")
        said = " ".join(done.stdout.split())
        assert done.returncode == 1, done.stdout + done.stderr + controller.logs()
        assert "2 inputs, 1 failed" in said and "failed: 100000000 (index 0): exited with code 2" in said, said
        assert (out / "err" / "0").read_text() == "no memory for 100000000 bytes"
        assert (out / "out" / "1").read_text() == "1000000 bytes: 2\n"
    finally:
        close_all(pages)
