"""The layout's rules, checked on the source tree (ARCHITECTURE.md, Boundaries)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_TREES = ("shared", "gateway", "scheduler", "aggregator", "worker", "cli", "tests", "bench")
# the store is the only code that calls Redis; redis_server.py starts a server and pings it
MAY_IMPORT_REDIS = ("shared/store/", "shared/redis_server.py")
# "no module over about 400 lines": the limit leaves a docstring's worth of slack
MAX_LINES = 420
SIZED = ("gateway/*.py", "scheduler/*.py", "aggregator/*.py", "worker/*.py", "cli/*.py", "static/js/*.js")


def python_files() -> list[Path]:
    return sorted(p for tree in PYTHON_TREES for p in (ROOT / tree).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_the_store_imports_redis() -> None:
    offenders = []
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(MAY_IMPORT_REDIS):
            continue
        if any(n == "redis" or n.startswith("redis.") for n in imported_modules(path)):
            offenders.append(rel)
    assert offenders == [], f"import redis outside shared/store/: {offenders}"


def test_core_does_no_io() -> None:
    """Decisions take values and return values: no Redis, sockets, processes or clocks."""
    forbidden = {"redis", "asyncio", "socket", "subprocess", "time", "httpx", "websockets", "starlette"}
    for path in sorted((ROOT / "shared" / "core").glob("*.py")):
        bad = {n for n in imported_modules(path) if n.split(".")[0] in forbidden}
        assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("pattern", SIZED)
def test_no_module_is_over_about_400_lines(pattern: str) -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in ROOT.glob(pattern)}
    assert sizes, f"nothing matches {pattern}"
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert big == {}, f"over {MAX_LINES} lines: {big}"


def test_the_protocol_test_node_is_gone() -> None:
    """One Python node: tests run worker/node.py's WorkerNode with an injected executor."""
    assert not (ROOT / "tests" / "pynode.py").exists()
