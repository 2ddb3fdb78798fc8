"""Password hashing end to end, and the ringer rows that catch lazy or lying nodes."""

from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import Controller
from processdistro import client
from processdistro.shared import keys
from processdistro.shared.exceptions import ParamsError
from processdistro.shared.jobs import JobState
from processdistro.shared.store.connection import Client
from processdistro.shared.tasks import get_plugin
from test_e2e_browser import close_all, join
from test_matmul import wait_job

ITERATIONS = 5000


def write_rows(path: Path, n: int, with_ids: bool) -> list[dict[str, str]]:
    rnd = random.Random(5)
    rows = []
    for i in range(n):
        password = rnd.choice(["pässwörd", "пароль", "密码", "a,b", 'quote"d', ""]) + str(i)
        salt = "" if i % 7 == 0 else rnd.choice(["NaCl", "s,alt", "sél"]) + str(i)
        rows.append({"id": f"user-{i}", "password": password, "salt": salt})
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fields = ["id", "password", "salt"] if with_ids else ["password", "salt"]
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


@pytest.mark.browser
def test_thousand_rows_in_browsers(controller: Controller, browser: Any, tmp_path: Path, r: Client) -> None:
    rows = write_rows(tmp_path / "rows.csv", 1000, with_ids=True)
    pages = [join(browser, controller), join(browser, controller)]
    try:
        job_id = client.submit(r, "hash", {"input": str(tmp_path / "rows.csv"), "iterations": ITERATIONS, "batch": 60})
        job = wait_job(r, job_id, timeout=240)
        assert job.state is JobState.DONE, job.error + controller.logs()
    finally:
        close_all(pages)
    with open(job.outputs["csv"], encoding="utf-8", newline="") as fh:
        out = list(csv.DictReader(fh))
    assert len(out) == 1000
    for want, got in zip(rows, out, strict=True):
        dk = hashlib.pbkdf2_hmac("sha256", want["password"].encode(), want["salt"].encode(), ITERATIONS, 32)
        assert (got["id"], got["salt"], got["dk_hex"]) == (want["id"], want["salt"], dk.hex())


def test_ringer_catches_wrong_keys(tmp_path: Path) -> None:
    write_rows(tmp_path / "rows.csv", 10, with_ids=False)
    plugin = get_plugin("hash")
    prepared = plugin.prepare({"input": str(tmp_path / "rows.csv"), "iterations": 10, "batch": 10})
    params = plugin.parse_params(prepared.params)
    sub = next(plugin.split(params))
    records = prepared.blocks[sub.blocks[0]]
    from processdistro.shared.tasks.hashing import decode_records

    pairs = decode_records(records, 11)
    honest = b"".join(hashlib.pbkdf2_hmac("sha256", p, s, 10, 32) for p, s in pairs)
    rng = random.Random(0)
    assert plugin.verify(params, 0, b"", honest, rng).value == "accept"
    lazy = bytes(len(honest))
    assert plugin.verify(params, 0, b"", lazy, rng).value == "reject"
    wrong_iterations = b"".join(hashlib.pbkdf2_hmac("sha256", p, s, 9, 32) for p, s in pairs)
    assert plugin.verify(params, 0, b"", wrong_iterations, rng).value == "reject"


def test_refused_at_submit(tmp_path: Path) -> None:
    plugin = get_plugin("hash")
    (tmp_path / "bad.csv").write_text("user,pass\nx,y\n")
    with pytest.raises(ParamsError, match="expected a header with columns password and salt"):
        plugin.prepare({"input": str(tmp_path / "bad.csv")})
    (tmp_path / "empty.csv").write_text("password,salt\n")
    with pytest.raises(ParamsError, match="no rows"):
        plugin.prepare({"input": str(tmp_path / "empty.csv"), "iterations": 1})
    (tmp_path / "latin.csv").write_bytes(b"password,salt\n\xe9t\xe9,x\n")
    with pytest.raises(ParamsError, match="not UTF-8"):
        plugin.prepare({"input": str(tmp_path / "latin.csv"), "iterations": 1})
    with pytest.raises(ParamsError, match="iterations"):
        plugin.prepare({"input": str(tmp_path / "latin.csv"), "iterations": 0})


def test_lying_node_never_changes_the_output(controller: Controller, tmp_path: Path, r: Client) -> None:
    """A node that makes its keys up (as one that skips the work would) gets the hidden
    ringer row wrong: every batch it returns is rejected and redone by the honest node.
    (A liar that garbles one row and not the ringer is a matter for replication.)"""
    from nodes import Node, run_async
    from test_pipeline import run_nodes_until

    rows = write_rows(tmp_path / "rows.csv", 120, with_ids=False)
    job_id = client.submit(r, "hash", {"input": str(tmp_path / "rows.csv"), "iterations": 50, "batch": 10})
    liar = Node(
        controller.url, controller.join_code, corrupt=lambda out: hashlib.sha256(out).digest() * (len(out) // 32)
    )
    honest = Node(controller.url, controller.join_code)

    class Waiter:
        def poll(self) -> int | None:
            state = r.hget(keys.job(job_id), "state")
            return 0 if state in (b"done", b"failed", b"cancelled") else None

    run_async(run_nodes_until(Waiter(), liar, honest))  # type: ignore[arg-type]
    job = wait_job(r, job_id, timeout=30)
    assert job.state is JobState.DONE, job.error + controller.logs()
    with open(job.outputs["csv"], encoding="utf-8", newline="") as fh:
        out = list(csv.DictReader(fh))
    for i, (want, got) in enumerate(zip(rows, out, strict=True)):
        dk = hashlib.pbkdf2_hmac("sha256", want["password"].encode(), want["salt"].encode(), 50, 32)
        assert (got["row"], got["dk_hex"]) == (str(i), dk.hex())
    rejected = int(r.hget(keys.node(liar.device_id), "rejected") or 0)
    assert 1 <= rejected <= liar.done and int(r.hget(keys.node(liar.device_id), "completed") or 0) == 0


def test_parts_are_checkpoints(controller: Controller, tmp_path: Path, r: Client) -> None:
    """A node gets tasks of many parts once timed; it leaves after 12 part results, in the
    middle of a task: those 12 are kept, and only its unreported parts are computed again."""
    import asyncio

    from nodes import Node, run_async

    rows = write_rows(tmp_path / "rows.csv", 400, with_ids=False)
    params = {"input": str(tmp_path / "rows.csv"), "iterations": 50, "batch": 5}
    job_id = client.submit(r, "hash", params, replicate=0)  # no second copies to count
    first = Node(controller.url, controller.join_code, cores=1)
    later = Node(controller.url, controller.join_code, cores=1)
    duplicates_before = int(r.hget(keys.STATS, "tasks_duplicate") or 0)

    async def scenario() -> None:
        await first.run(max_tasks=12)  # returns mid-task: its socket closes
        stop = asyncio.Event()
        runner = asyncio.create_task(later.run(stop=stop))
        while r.hget(keys.job(job_id), "state") not in (b"done", b"failed", b"cancelled"):
            await asyncio.sleep(0.05)
        stop.set()
        await runner

    run_async(scenario())
    job = wait_job(r, job_id, timeout=30)
    assert job.state is JobState.DONE, job.error + controller.logs()
    parts = [1 + len(m["more"]) for m in first.received if m["type"] == "task"]
    assert max(parts) > 12, parts  # timed after its first part: a task of many parts
    assert first.done == 12 and first.done + later.done == job.total, (first.done, later.done, job.total)
    assert int(r.hget(keys.STATS, "tasks_duplicate") or 0) == duplicates_before
    with open(job.outputs["csv"], encoding="utf-8", newline="") as fh:
        out = list(csv.DictReader(fh))
    for want, got in zip(rows, out, strict=True):
        assert (
            got["dk_hex"]
            == hashlib.pbkdf2_hmac("sha256", want["password"].encode(), want["salt"].encode(), 50, 32).hex()
        )
