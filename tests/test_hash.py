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
    task = sub.input + records  # what the aggregator's verify gets: inline bytes, then blocks
    from processdistro.shared.tasks.hashing import decode_records

    pairs = decode_records(records, 11)
    honest = b"".join(hashlib.pbkdf2_hmac("sha256", p, s, 10, 32) for p, s in pairs)
    rng = random.Random(0)
    assert plugin.verify(params, 0, task, honest, rng).value == "accept"
    lazy = bytes(len(honest))
    assert plugin.verify(params, 0, task, lazy, rng).value == "reject"
    wrong_iterations = b"".join(hashlib.pbkdf2_hmac("sha256", p, s, 9, 32) for p, s in pairs)
    assert plugin.verify(params, 0, task, wrong_iterations, rng).value == "reject"


def test_real_rows_are_spot_checked(tmp_path: Path) -> None:
    """A node that computes the planted row (even knowing which it is) and makes up the real
    rows is caught by the real rows the controller recomputes."""
    write_rows(tmp_path / "rows.csv", 40, with_ids=False)
    plugin = get_plugin("hash")
    prepared = plugin.prepare({"input": str(tmp_path / "rows.csv"), "iterations": 10, "batch": 10})
    params = plugin.parse_params(prepared.params)
    from processdistro.shared.tasks.hashing import decode_records

    rng = random.Random(3)
    for index, sub in enumerate(plugin.split(params)):
        records = prepared.blocks[sub.blocks[0]]
        pos = params.batches[index][4]
        pairs = decode_records(records, 11)
        keys_ = [hashlib.pbkdf2_hmac("sha256", p, s, 10, 32) for p, s in pairs]
        only_planted = b"".join(k if i == pos else bytes(32) for i, k in enumerate(keys_))
        assert plugin.verify(params, index, sub.input + records, only_planted, rng).value == "reject"
        assert plugin.verify(params, index, sub.input + records, b"".join(keys_), rng).value == "accept"


def test_planted_row_looks_like_the_batch(tmp_path: Path) -> None:
    """The planted row's password and salt have a real row's lengths and the batch's own
    characters: none of the old tells (16 URL-safe characters, binary salt)."""
    write_rows(tmp_path / "rows.csv", 200, with_ids=False)
    plugin = get_plugin("hash")
    prepared = plugin.prepare({"input": str(tmp_path / "rows.csv"), "iterations": 1, "batch": 20})
    params = plugin.parse_params(prepared.params)
    from processdistro.shared.tasks.hashing import decode_records

    for index, sub in enumerate(plugin.split(params)):
        pairs = decode_records(prepared.blocks[sub.blocks[0]], 21)
        pos = params.batches[index][4]
        planted, real = pairs[pos], pairs[:pos] + pairs[pos + 1 :]
        password, salt = planted[0].decode(), planted[1].decode()  # UTF-8 text, as real rows are
        assert (len(password), len(salt)) in {(len(p.decode()), len(s.decode())) for p, s in real}
        assert set(password) <= set("".join(p.decode() for p, _ in real))
        assert set(salt) <= set("".join(s.decode() for _, s in real))


@pytest.mark.parametrize(
    ("items", "cost", "expected"),
    [
        pytest.param(100, 1_000, 4, id="cheap: the most"),
        pytest.param(3, 1_000, 3, id="cheap, few items: all"),
        pytest.param(100, 100_000, 2, id="default iterations: what the budget pays"),
        pytest.param(100, 200_000, 1, id="exactly the budget: one"),
        pytest.param(100, 0, 4, id="free"),
    ],
)
def test_spot_checks_stay_within_the_budget(items: int, cost: int, expected: int) -> None:
    from processdistro.shared.tasks.hashing import CHECK_HMACS, spot_positions

    assert CHECK_HMACS == 200_000
    picked = spot_positions(items, cost, random.Random(1))
    assert len(picked) == expected == len(set(picked)) and all(0 <= p < items for p in picked)
    assert len(picked) * cost <= CHECK_HMACS


def test_spot_checks_beyond_the_budget_are_sampled() -> None:
    """One row costing 10x the budget is recomputed in about 1 result of 10: the expected
    cost per result stays at the budget."""
    from processdistro.shared.tasks.hashing import CHECK_HMACS, spot_positions

    rng = random.Random(5)
    picks = [len(spot_positions(50, 10 * CHECK_HMACS, rng)) for _ in range(4000)]
    assert set(picks) <= {0, 1}
    assert 0.08 < sum(picks) / len(picks) < 0.12


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
