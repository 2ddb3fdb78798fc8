"""The task repo (PD_TASK_REPO): kinds from `DIR/<kind>/kind.toml` (and plugin.py) load,
broken ones are reported by name without stopping the others, `processdistro kinds` lists
them, and a repo kind runs by name end to end on real services and a real native worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from conftest import Controller
from processdistro.shared.exceptions import ParamsError
from processdistro.shared.redis_server import free_port
from processdistro.shared.tasks import BUILTIN, PLUGINS, WasmKind, load_task_repo, task_repo
from processdistro.shared.tasks.repo import scan
from processdistro.shared.tasks.wasm import WasmParams
from processdistro.shared.wasm_module import ModuleKind
from test_worker import Worker, workers  # noqa: F401 - `workers` is a fixture

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# the smallest WASI command: exports _start, imports only from wasi_snapshot_preview1
WASI_WAT = """(module
  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")))"""
ENV_WAT = """(module (import "env" "f" (func)) (func (export "_start")))"""

GOOD_TOML = 'description = "a good kind"\nmodule = "prog.wasm"\n'

PLUGIN_WASM_KIND = """
from processdistro.shared.tasks import WasmKind


class Shout(WasmKind):
    def describe(self) -> str:
        return "SHOUTED: " + self.spec.description
"""

PLUGIN_OWN_KIND = '''
from processdistro.shared.tasks.mandelbrot import MandelbrotPlugin


class Tiles(MandelbrotPlugin):
    """tiles of my own"""
'''


def wasm(wat: str = WASI_WAT) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def make_kind(repo: Path, name: str, files: dict[str, str | bytes]) -> Path:
    directory = repo / name
    directory.mkdir(parents=True)
    for file, content in files.items():
        path = directory / file
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return directory


def good_repo(repo: Path) -> None:
    make_kind(repo, "good", {"kind.toml": GOOD_TOML, "prog.wasm": wasm()})


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize(
    ("name", "files", "error"),
    [
        pytest.param("no-toml", {"prog.wasm": wasm()}, "no kind.toml", id="no-kind-toml"),
        pytest.param("bad-toml", {"kind.toml": "description = \n"}, "kind.toml is not valid TOML", id="bad-toml"),
        pytest.param(
            "typo", {"kind.toml": 'descripton = "x"\nmodule = "m.wasm"\n'}, "description: Field required", id="typo-key"
        ),
        pytest.param(
            "bad-value",
            {"kind.toml": GOOD_TOML + "timeout_s = -1\n", "prog.wasm": wasm()},
            "timeout_s: Input should be greater than 0",
            id="bad-timeout",
        ),
        pytest.param("no-module", {"kind.toml": 'description = "x"\n'}, "names no module", id="no-module-named"),
        pytest.param("missing", {"kind.toml": GOOD_TOML}, "prog.wasm is not there", id="missing-module"),
        pytest.param(
            "not-wasm",
            {"kind.toml": GOOD_TOML, "prog.wasm": b"#!/bin/sh\necho hi\n"},
            "prog.wasm is not WebAssembly",
            id="not-wasm",
        ),
        pytest.param(
            "imports-env",
            {"kind.toml": GOOD_TOML, "prog.wasm": wasm(ENV_WAT)},
            "prog.wasm imports env.f",
            id="refused-module",
        ),
        pytest.param(
            "raises",
            {"kind.toml": GOOD_TOML, "prog.wasm": wasm(), "plugin.py": "raise RuntimeError('boom')\n"},
            "plugin.py raised on import: RuntimeError: boom",
            id="plugin-raises",
        ),
        pytest.param(
            "syntax",
            {"kind.toml": GOOD_TOML, "prog.wasm": wasm(), "plugin.py": "def (:\n"},
            "plugin.py raised on import: SyntaxError",
            id="plugin-syntax-error",
        ),
        pytest.param(
            "empty-plugin",
            {"kind.toml": GOOD_TOML, "prog.wasm": wasm(), "plugin.py": "X = 1\n"},
            "defines no concrete TaskPlugin subclasses",
            id="plugin-without-class",
        ),
        pytest.param(
            "wasm", {"kind.toml": GOOD_TOML, "prog.wasm": wasm()}, "the name of a built-in kind", id="clash-built-in"
        ),
        pytest.param("Bad Name", {"kind.toml": GOOD_TOML, "prog.wasm": wasm()}, "lowercase", id="bad-name"),
    ],
)
def test_a_broken_kind_is_reported_by_name_and_the_others_load(
    tmp_path: Path, name: str, files: dict[str, str | bytes], error: str
) -> None:
    good_repo(tmp_path)
    make_kind(tmp_path, name, files)
    make_kind(tmp_path, "zz-last", {"kind.toml": GOOD_TOML, "prog.wasm": wasm()})
    report = scan(tmp_path, taken=BUILTIN)
    assert sorted(report.plugins) == ["good", "zz-last"]
    assert [(b.name, b.directory) for b in report.broken] == [(name, tmp_path / name)]
    assert error in report.broken[0].error, report.broken[0].error
    assert report.error is None


def test_kinds_from_toml_and_from_plugin_py(tmp_path: Path) -> None:
    good_repo(tmp_path)
    make_kind(tmp_path, "shout", {"kind.toml": GOOD_TOML, "prog.wasm": wasm(), "plugin.py": PLUGIN_WASM_KIND})
    make_kind(tmp_path, "tiles", {"kind.toml": 'description = "tiles"\n', "plugin.py": PLUGIN_OWN_KIND})
    (tmp_path / "README.md").write_text("files beside the kinds are not kinds\n")
    (tmp_path / ".hidden").mkdir()
    report = scan(tmp_path, taken=BUILTIN)
    assert report.broken == []
    assert sorted(report.plugins) == ["good", "shout", "tiles"]
    good, shout, tiles = (report.plugins[k] for k in ("good", "shout", "tiles"))
    assert isinstance(good, WasmKind) and good.kind == "good" and good.describe() == "a good kind"
    assert isinstance(shout, WasmKind) and shout.kind == "shout" and shout.describe() == "SHOUTED: a good kind"
    assert not isinstance(tiles, WasmKind) and tiles.kind == "tiles" and tiles.describe() == "tiles"
    assert type(good).kind == "good"  # the class, not only the instance: one class per kind


def test_a_missing_repo_is_an_error_not_a_crash(tmp_path: Path) -> None:
    report = scan(tmp_path / "nowhere", taken=BUILTIN)
    assert report.plugins == {} and report.broken == []
    assert report.error == f"task repo {tmp_path / 'nowhere'} is not a directory"


@pytest.fixture
def restore_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    load_task_repo(tmp_path_factory.mktemp("empty-repo"))  # unregisters what a test loaded


def test_load_task_repo_registers_once_and_replaces(tmp_path: Path, restore_repo: None) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    good_repo(first)
    make_kind(first, "wasm", {"kind.toml": GOOD_TOML, "prog.wasm": wasm()})
    make_kind(second, "other", {"kind.toml": GOOD_TOML, "prog.wasm": wasm()})
    report = load_task_repo(first)
    assert PLUGINS["good"] is report.plugins["good"]
    assert PLUGINS["wasm"] is not report.plugins.get("wasm")  # the built-in stays
    assert [b.name for b in report.broken] == ["wasm"]
    assert load_task_repo(first) is report and load_task_repo(None) is report and task_repo() is report
    load_task_repo(second)
    assert "good" not in PLUGINS and "other" in PLUGINS
    assert set(PLUGINS) >= BUILTIN


# ------------------------------------------------------------------ kind.toml's defaults


@pytest.fixture
def defaults_kind(tmp_path: Path) -> WasmKind:
    toml = (
        GOOD_TOML
        + 'args = ["-n", "3"]\ntimeout_s = 30\nmemory_mb = 64\nreplicate = 0.5\n'
        + '[env]\nLANG = "C"\nMODE = "fast"\n'
    )
    make_kind(tmp_path / "repo", "defaults", {"kind.toml": toml, "prog.wasm": wasm()})
    plugin = scan(tmp_path / "repo").plugins["defaults"]
    assert isinstance(plugin, WasmKind)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a\n")
    return plugin


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(
            {}, {"args": ["-n", "3"], "env": ["LANG=C", "MODE=fast"], "timeout_s": 30, "memory_mb": 64}, id="defaults"
        ),
        pytest.param(
            {"args": ["-v"], "env": ["MODE=slow", "X=1"], "timeout_s": 5.0, "memory_mb": 16},
            {"args": ["-v"], "env": ["LANG=C", "MODE=slow", "X=1"], "timeout_s": 5.0, "memory_mb": 16},
            id="overridden",
        ),
        pytest.param({"args": []}, {"args": [], "timeout_s": 30}, id="no-args-from-python"),
    ],
)
def test_kind_toml_values_are_defaults(
    tmp_path: Path, defaults_kind: WasmKind, given: dict[str, object], expected: dict[str, object]
) -> None:
    raw = {"inputs": [str(tmp_path / "in")], "outdir": str(tmp_path / "out"), **given}
    params = defaults_kind.prepare(raw).params
    assert {k: params[k] for k in expected} == expected
    assert params["program"] == "prog.wasm" and params["module_kind"] == ModuleKind.WASI_COMMAND.value


def test_a_kind_runs_its_own_module_and_replicates_as_kind_toml_says(tmp_path: Path, defaults_kind: WasmKind) -> None:
    raw = {"inputs": [str(tmp_path / "in")], "outdir": str(tmp_path / "out")}
    other = tmp_path / "other.wasm"
    other.write_bytes(wasm())
    with pytest.raises(ParamsError, match="kind 'defaults' runs its own module"):
        defaults_kind.prepare({**raw, "module": str(other)})
    params = WasmParams.model_validate(defaults_kind.prepare(raw).params)
    assert defaults_kind.replication(params, None, 0.05) == 0.5
    assert defaults_kind.replication(params, 0.0, 0.05) == 0.0


# ------------------------------------------------------------------ the CLI


def cli(*args: str, repo: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PD_TASK_REPO"}
    if repo is not None:
        env["PD_TASK_REPO"] = str(repo)
    return subprocess.run(
        [sys.executable, "-m", "processdistro", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_kinds_lists_built_in_and_repo_kinds_and_the_broken_ones(tmp_path: Path) -> None:
    good_repo(tmp_path)
    make_kind(tmp_path, "bad-toml", {"kind.toml": "description = \n"})
    shown = cli("kinds", "--json", repo=tmp_path)
    assert shown.returncode == 1, shown.stderr  # a broken kind: non-zero, for a repo's CI
    listing = json.loads(shown.stdout)
    sources = {k["kind"]: k["source"] for k in listing["kinds"]}
    assert sources == {**{k: "built-in" for k in BUILTIN}, "good": str(tmp_path / "good")}
    assert {k["kind"]: k["description"] for k in listing["kinds"]}["good"] == "a good kind"
    assert [(b["kind"], b["error"][:27]) for b in listing["broken"]] == [("bad-toml", "kind.toml is not valid TOML")]

    table = cli("kinds", repo=tmp_path)
    assert table.returncode == 1
    for word in (*BUILTIN, "good", "a good kind", "bad-toml", "not valid TOML"):
        assert word in table.stdout, table.stdout

    plain = cli("kinds", repo=None)
    assert plain.returncode == 0, plain.stderr
    assert all(k in plain.stdout for k in BUILTIN) and "good" not in plain.stdout
    assert "PD_TASK_REPO" in plain.stdout


def test_submit_has_the_repo_kind_and_warns_of_broken_ones(tmp_path: Path) -> None:
    good_repo(tmp_path)
    make_kind(tmp_path, "missing", {"kind.toml": GOOD_TOML})
    helped = cli("submit", "good", "--help", repo=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "a good kind" in helped.stdout and "--inputs" in helped.stdout and "MODULE" not in helped.stdout
    assert "kind 'missing' not loaded" in helped.stderr and "prog.wasm is not there" in helped.stderr
    refused = cli("submit", "missing", "--inputs", ".", "-o", str(tmp_path / "o"), repo=tmp_path)
    assert refused.returncode == 2
    assert "kind 'missing' not loaded" in refused.stderr and "invalid choice: 'missing'" in refused.stderr


def test_up_task_repo_gives_every_service_the_repo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    good_repo(repo)
    make_kind(repo, "missing", {"kind.toml": GOOD_TOML})
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("PD_REDIS_URL", "PD_TASK_REPO")}
    env.update({"PD_HOME": str(home), "PD_PORT": str(free_port()), "PD_HOST": "127.0.0.1"})
    log = tmp_path / "up.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "processdistro", "up", "--task-repo", str(repo)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Join link" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = " ".join(log.read_text().split())
        assert f"Task repo {repo}: good" in text
        assert "kind 'missing' not loaded" in text
        for service in ("gateway", "scheduler", "aggregator"):
            path = home / "logs" / f"{service}.log"
            while f"task repo {repo}: kinds good" not in path.read_text():
                assert time.monotonic() < deadline, path.read_text()
                time.sleep(0.1)
            assert "kind 'missing' not loaded: module" in path.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ end to end


@pytest.fixture
def controller_env() -> dict[str, str]:
    """The services start with the example task repo; its module must be built first."""
    subprocess.run(["make", "-s", "-C", str(EXAMPLES)], check=True)
    return {"PD_TASK_REPO": str(EXAMPLES / "tasks")}


def test_a_repo_kind_runs_by_name_on_a_native_worker(
    tmp_path: Path,
    controller: Controller,
    workers: list[Worker],  # noqa: F811
) -> None:
    assert "wordfreq" in controller.cli("kinds").stdout
    workers.append(Worker(controller, tmp_path / "w", "--cores", "1"))
    workers[0].wait_connected()
    inputs = tmp_path / "in"
    for i in range(30):
        (inputs / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (inputs / f"d{i % 3}" / f"{i:02d}.txt").write_text(f"to be or not to be {i} that is {i % 4}\n" * (1 + i % 3))
    out = tmp_path / "out"
    done = controller.cli(
        "submit", "wordfreq", "--inputs", str(inputs), "-o", str(out), "--wait", "-q", "--wait-timeout", "240"
    )
    assert done.returncode == 0, done.stdout + done.stderr + controller.logs()
    assert "30 inputs, 0 failed" in done.stdout
    native = EXAMPLES / "wordfreq" / "wordfreq"
    for path in sorted(inputs.rglob("*.txt")):
        rel = path.relative_to(inputs).as_posix()
        expected = subprocess.run([native, "5"], input=path.read_bytes(), capture_output=True, check=True).stdout
        assert (out / "out" / rel).read_bytes() == expected, rel
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["input"] for m in manifest] == sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*.txt"))
    assert all(m["exit_code"] == 0 and m["node"] for m in manifest)
    jobs = json.loads(controller.cli("jobs", "--json").stdout)
    assert [(j["kind"], j["state"]) for j in jobs] == [("wordfreq", "done")]
