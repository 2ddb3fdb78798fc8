"""The workloads through the CLI, on a mix of nodes: one browser page and one native worker."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Controller
from processdistro.shared import keys
from processdistro.shared.store.connection import Client
from test_e2e_browser import close_all, join
from test_worker import Worker, workers  # noqa: F401 - the fixture

pytestmark = pytest.mark.browser


@pytest.fixture
def mixed_nodes(controller: Controller, browser: Any, tmp_path: Path, workers: list[Worker]) -> Any:  # noqa: F811
    page = join(browser, controller)
    native = Worker(controller, tmp_path / "worker-home", "--cores", "1")
    workers.append(native)
    native.wait_connected()
    yield page, native
    close_all([page])


def test_matmul_odd_shapes(controller: Controller, mixed_nodes: Any, tmp_path: Path, r: Client) -> None:
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((700, 300)), rng.standard_normal((300, 500))
    np.save(tmp_path / "A.npy", a)
    np.save(tmp_path / "B.npy", b)
    out = tmp_path / "C.npy"
    result = controller.cli(
        "submit",
        "matmul",
        "--a",
        str(tmp_path / "A.npy"),
        "--b",
        str(tmp_path / "B.npy"),
        "--tile",
        "64",
        "-o",
        str(out),
        "--wait",
        "-q",
    )
    assert result.returncode == 0, result.stdout + result.stderr + controller.logs()
    c, expected = np.load(out), a @ b
    assert c.dtype == np.float64 and c.shape == (700, 500)
    assert np.max(np.abs(c - expected)) <= 1e-10 * np.max(np.abs(expected))
    by_node = {
        k.decode(): int(r.hget(k, "completed") or 0) for k in r.scan_iter(match=keys.node("*")) if b":" not in k[8:]
    }
    assert sum(1 for v in by_node.values() if v > 0) == 2, f"both nodes should compute: {by_node}"


def test_hash_and_crack(controller: Controller, mixed_nodes: Any, tmp_path: Path) -> None:
    rows = [("pässwörd", "NaCl"), ("", ""), ("a,b", "s,alt"), ("кот", "")] * 25
    with open(tmp_path / "rows.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["password", "salt"])
        w.writerows(rows)
    out = tmp_path / "out.csv"
    result = controller.cli(
        "submit", "hash", "--input", str(tmp_path / "rows.csv"), "--iterations", "5000", "-o", str(out), "--wait", "-q"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out, encoding="utf-8", newline="") as fh:
        got = list(csv.DictReader(fh))
    assert [g["dk_hex"] for g in got] == [
        hashlib.pbkdf2_hmac("sha256", p.encode(), s.encode(), 5000, 32).hex() for p, s in rows
    ]
    words = [f"word{i}" for i in range(3000)]
    words[2100] = "hunter2"
    (tmp_path / "words.txt").write_text("\n".join(words) + "\n")
    target = hashlib.pbkdf2_hmac("sha256", b"hunter2", b"NaCl", 500, 32).hex()
    result = controller.cli(
        "submit",
        "crack",
        "--target",
        target,
        "--salt",
        "NaCl",
        "--iterations",
        "500",
        "--wordlist",
        str(tmp_path / "words.txt"),
        "--wait",
        "-q",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "password found: hunter2" in result.stdout
    missing = hashlib.pbkdf2_hmac("sha256", b"not-there", b"NaCl", 500, 32).hex()
    result = controller.cli(
        "submit",
        "crack",
        "--target",
        missing,
        "--salt",
        "NaCl",
        "--iterations",
        "500",
        "--wordlist",
        str(tmp_path / "words.txt"),
        "--wait",
        "-q",
    )
    assert result.returncode == 0 and "not found" in result.stdout, result.stdout + result.stderr


def test_cli_refusals(controller: Controller, tmp_path: Path) -> None:
    np.save(tmp_path / "A.npy", np.ones((3, 4)))
    np.save(tmp_path / "B.npy", np.ones((5, 2)))
    result = controller.cli("submit", "matmul", "--a", str(tmp_path / "A.npy"), "--b", str(tmp_path / "B.npy"))
    assert result.returncode == 2 and "shapes do not multiply" in result.stderr
    (tmp_path / "bad.csv").write_text("user,pw\nx,y\n")
    result = controller.cli("submit", "hash", "--input", str(tmp_path / "bad.csv"))
    assert result.returncode == 2 and "password and salt" in result.stderr
    (tmp_path / "w.txt").write_text("a\n")
    result = controller.cli(
        "submit", "crack", "--target", "nothex", "--salt", "s", "--wordlist", str(tmp_path / "w.txt")
    )
    assert result.returncode == 2 and "target must be hex" in result.stderr
