"""The browser agent's pure JavaScript, tested in Node's built-in runner (`node --test`).

- tests/js/node_cases.test.mjs: static/js/node_state.js against every case of the shared node
  table tests/node_cases.json (the one the Python NodeState is held to as well).
- tests/js/pool.test.mjs: static/js/pool.js driven through fake worker endpoints.
- tests/js/session.test.mjs: static/js/session.js (with the real NodeState, runner, pool and
  block cache) against a scripted WebSocket, fetch and worker endpoints.

Node >= 18 must be on PATH (CI installs nodejs when it is missing).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.mjs"))
MIN_NODE = 18


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not on PATH: install Node.js >= 18 (apt-get install nodejs) to run tests/js/")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    if match is None or int(match.group(1)) < MIN_NODE:
        pytest.fail(f"expected Node.js >= {MIN_NODE} for `node --test`, got {version!r} at {found}")
    return found


def test_js_tests_exist() -> None:
    assert {p.name for p in JS_TESTS} >= {"node_cases.test.mjs", "pool.test.mjs", "session.test.mjs"}


@pytest.mark.parametrize("path", JS_TESTS, ids=[p.name.removesuffix(".test.mjs") for p in JS_TESTS])
def test_js(path: Path) -> None:
    proc = subprocess.run(
        [node(), "--test", "--test-reporter=spec", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"node --test {path.relative_to(ROOT)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert re.search(r"\bpass [1-9]", proc.stdout), f"no test passed:\n{proc.stdout}"
