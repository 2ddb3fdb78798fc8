"""WASI command modules in the browser agent's Web Worker (static/js/wasm_worker.js), in real
Chromium, against the programs' native builds, wasmtime, and shared/wasi.py.

The C programs in tests/wasi_src/ are compiled here, at test time, with clang for wasm32-wasi
(scripts/ensure_wasi_toolchain.sh installs it on a fresh machine) and with cc for the host:

- count.c (word count and checksum, argv, env): the same bytes as its native build and as
  wasmtime, over several stdins of one envelope (so each run starts afresh), with non-ASCII
  argv (the vendored shim's args_sizes_get counts UTF-16 units; the worker's counts bytes);
- entropy.c (getentropy, clock_gettime, time, clock_getres): in a deterministic envelope it
  prints exactly what shared/wasi.py's SplitMix64 and Clock predict for each run, which is
  what makes a browser and a native node agree; not deterministic, it reads the real clock;
- exits.c: exit codes from proc_exit, traps (TRAPPED with `trap: ...` ending stderr),
  call stack exhaustion, and a module that never ends stopped by terminating its worker.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from playwright.sync_api import Browser, Page
from processdistro.shared.wasi import (
    CLOCK_START_NS,
    CLOCK_STEP_NS,
    TRAPPED,
    Clock,
    ResultEnvelope,
    RunEnvelope,
    RunResult,
    SplitMix64,
    run_seed,
)
from test_agent_protocol import ABI_SHA, ABI_WASM, WORKER_CALLS, blank_page, run_call, serve_modules

SRC = Path(__file__).resolve().parent / "wasi_src"
PROGRAMS = ("count", "entropy", "exits")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not on PATH: run scripts/ensure_wasi_toolchain.sh (clang, lld, wasi-libc)")
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each program as `<name>.wasm` (WASI) and `<name>` (native), in one directory."""
    out = tmp_path_factory.mktemp("wasi")
    clang, cc = _tool("clang"), _tool("cc")
    for name in PROGRAMS:
        src = str(SRC / f"{name}.c")
        wasm = [clang, "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", str(out / f"{name}.wasm"), src]
        for cmd in (wasm, [cc, "-O2", "-o", str(out / name), src]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    (out / "abi.wasm").write_bytes(ABI_WASM)
    return out


@pytest.fixture(scope="module")
def server(built: Path) -> Iterator[str]:
    with serve_modules(built) as url:
        yield url


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    with blank_page(browser, server) as p:
        yield p


def in_browser(page: Page, built: Path, name: str, envelope: RunEnvelope) -> tuple[RunResult, ...]:
    (reply,) = page.evaluate(WORKER_CALLS, [run_call(built, name, envelope.encode())])
    assert reply["ok"], reply
    return ResultEnvelope.decode(bytes(reply["output"])).runs


def native(built: Path, name: str, envelope: RunEnvelope, stdin: bytes) -> RunResult:
    env = dict(e.split("=", 1) for e in envelope.env)
    proc = subprocess.run([str(built / name), *envelope.argv[1:]], input=stdin, env=env, capture_output=True)
    return RunResult(proc.returncode, proc.stdout, proc.stderr)


def in_wasmtime(built: Path, name: str, envelope: RunEnvelope, stdin: bytes) -> RunResult:
    """wasmtime's own WASI (not deterministic): for programs that read no randomness or clock."""
    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, str(built / f"{name}.wasm"))
    with tempfile.TemporaryDirectory() as tmp:
        files = {k: Path(tmp) / k for k in ("in", "out", "err")}
        files["in"].write_bytes(stdin)
        config = wasmtime.WasiConfig()
        config.argv = list(envelope.argv)
        config.env = [tuple(e.split("=", 1)) for e in envelope.env]
        config.stdin_file, config.stdout_file, config.stderr_file = (str(files[k]) for k in ("in", "out", "err"))
        store = wasmtime.Store(engine)
        store.set_wasi(config)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        start = linker.instantiate(store, module).exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        try:
            start(store)
            code = 0
        except wasmtime.ExitTrap as exc:
            code = exc.code
        return RunResult(code, files["out"].read_bytes(), files["err"].read_bytes())


# Bytes 0..255 and a long text: stdin is binary, and larger than any one read.
TEXT = b"the quick brown fox\njumps over\tthe lazy dog\r\n" * 400
STDINS = (b"", b"one line without newline", bytes(range(256)) * 8, TEXT)


@pytest.mark.browser
def test_count_matches_native_and_wasmtime(page: Page, built: Path) -> None:
    envelope = RunEnvelope(
        argv=("count", "日本語" * 20, "héllo wörld", "--flag"), env=("PD_GREETING=grüß dich",), stdins=STDINS, seed=7
    )
    logged: list[str] = []
    page.on("console", lambda msg: logged.append(msg.text))
    runs = in_browser(page, built, "count", envelope)
    assert not [text for text in logged if "wasi:" in text], "the shim's debug log is on"
    assert len(runs) == len(STDINS)
    for stdin, run in zip(STDINS, runs, strict=True):
        assert run == native(built, "count", envelope, stdin)
        assert run == in_wasmtime(built, "count", envelope, stdin)
        assert f"counted {len(stdin)} bytes\n".encode() == run.stderr
    assert f"arg 1: {'日本語' * 20}\narg 2: héllo wörld\narg 3: --flag\n".encode() in runs[0].stdout
    assert b"greeting: gr\xc3\xbc\xc3\x9f dich\n" in runs[0].stdout


def predicted_entropy(seed: int, run: int) -> bytes:
    """What entropy.c prints in run `run` of a deterministic envelope seeded `seed`."""
    rng, clock = SplitMix64(run_seed(seed, run)), Clock()
    lines = [f"random{n} {rng.fill(n).hex()}" for n in (3, 8, 13)]
    for name in ("realtime", "monotonic"):
        ns = clock.now_ns()
        lines.append(f"{name} {ns // 10**9}.{ns % 10**9:09d}")
    lines.append(f"time {clock.now_ns() // 10**9}")
    lines.append(f"resolution {CLOCK_STEP_NS // 10**9}.{CLOCK_STEP_NS % 10**9:09d}")
    return "".join(line + "\n" for line in lines).encode()


@pytest.mark.browser
@pytest.mark.parametrize("seed", [0, 42, (1 << 64) - 1], ids=["seed-0", "seed-42", "seed-max"])
def test_randomness_and_clock_are_what_shared_wasi_predicts(page: Page, built: Path, seed: int) -> None:
    envelope = RunEnvelope(argv=("entropy",), env=(), stdins=(b"", b"", b""), seed=seed)
    runs = in_browser(page, built, "entropy", envelope)
    assert [r.stdout.decode() for r in runs] == [predicted_entropy(seed, i).decode() for i in range(3)]
    assert all(r.exit_code == 0 and r.stderr == b"" for r in runs)
    assert len({r.stdout for r in runs}) == 3, "each run draws from its own seed"
    again = in_browser(page, built, "entropy", envelope)
    assert again == runs


@pytest.mark.browser
def test_a_nondeterministic_run_reads_the_real_clock(page: Page, built: Path) -> None:
    envelope = RunEnvelope(argv=("entropy",), env=(), stdins=(b"",), seed=42, deterministic=False)
    before = time.time()
    (run,) = in_browser(page, built, "entropy", envelope)
    fields = dict(line.split(" ", 1) for line in run.stdout.decode().splitlines())
    assert before - 5 <= float(fields["realtime"]) <= time.time() + 5
    assert abs(int(fields["time"]) - before) < 60
    assert run.stdout != predicted_entropy(42, 0)
    assert int(fields["realtime"].split(".")[0]) != CLOCK_START_NS // 10**9


@pytest.mark.browser
def test_exit_codes_and_traps(page: Page, built: Path) -> None:
    stdins = (b"exit 3\n", b"trap\n", b"hello\n", b"exit 0\n", b"recurse\n", b"exit 255\n", b"exit 125\n")
    envelope = RunEnvelope(argv=("exits",), env=(), stdins=stdins)
    runs = in_browser(page, built, "exits", envelope)
    assert [r.exit_code for r in runs] == [3, TRAPPED, 0, 0, TRAPPED, 255, 125]
    exit3, trap, hello, exit0, recurse, exit255, exit125 = runs
    assert exit3 == RunResult(3, b"exiting 3\n", b"bye 3\n")
    assert trap == RunResult(TRAPPED, b"", b"about to trap\ntrap: unreachable")
    assert hello == RunResult(0, b"echo hello\n", b"")
    assert recurse == RunResult(TRAPPED, b"", b"trap: call stack exhausted")
    assert exit255.stdout == b"exiting 255\n"
    # The same as the native build and wasmtime where the three can agree: exit codes below
    # 126 (wasmtime refuses `proc_exit` of 126 and above; a native trap is a signal).
    for stdin, run in [(b"exit 3\n", exit3), (b"hello\n", hello), (b"exit 0\n", exit0), (b"exit 125\n", exit125)]:
        assert run == native(built, "exits", envelope, stdin) == in_wasmtime(built, "exits", envelope, stdin)


@pytest.mark.browser
def test_wasi_and_abi_modules_share_a_worker(page: Page, built: Path) -> None:
    envelope = RunEnvelope(argv=("exits",), env=(), stdins=(b"abc",))
    abi = {"op": "run", "sha256": ABI_SHA, "url": "/test-modules/abi.wasm"}
    replies = page.evaluate(
        WORKER_CALLS,
        [
            {**abi, "input": [1, 2, 3]},
            run_call(built, "exits", envelope.encode()),
            run_call(built, "exits", b"not an envelope"),
            {**abi, "input": [4, 5]},
        ],
    )
    first, wasi, broken, second = replies
    assert first["ok"] and first["output"] == [3, 2, 1]
    assert wasi["ok"] and ResultEnvelope.decode(bytes(wasi["output"])).runs == (RunResult(0, b"echo abc\n"),)
    assert wasi["elapsedMs"] >= 0
    assert not broken["ok"] and broken["error"]["name"] == "EnvelopeError"
    assert "PDWASI1" in broken["error"]["message"]
    assert second["ok"] and second["output"] == [5, 4]


SPIN_THEN_TERMINATE = """async ([call, waitMs]) => {
  const w = new Worker("/static/js/wasm_worker.js", {type: "module"});
  const input = new Uint8Array(call.input).buffer;
  let reply = null;
  w.onmessage = (e) => { reply = e.data; };
  w.postMessage({...call, input, id: 1}, [input]);
  await new Promise((resolve) => setTimeout(resolve, waitMs));
  const before = reply;
  w.terminate();
  return {before};
}"""


@pytest.mark.browser
def test_a_module_that_never_ends_is_stopped_by_terminating_its_worker(page: Page, built: Path) -> None:
    envelope = RunEnvelope(argv=("exits",), env=(), stdins=(b"spin\n",))
    started = time.monotonic()
    got = page.evaluate(SPIN_THEN_TERMINATE, [run_call(built, "exits", envelope.encode()), 1500])
    assert got["before"] is None, "a spinning module gave a reply"
    assert time.monotonic() - started < 30
    # The page is still responsive: the spinning worker was ended, not the page.
    assert page.evaluate("1 + 1") == 2
