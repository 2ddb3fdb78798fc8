"""The CLI's tables and messages (issue 10.6): `nodes` fits 80 columns (`--wide` shows
everything), `jobs` lists a job as soon as it is submitted, `submit` says what share of the
job is replicated."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import Controller
from nodes import Node
from processdistro.client import replication_note
from processdistro.shared import keys
from processdistro.shared.store.client import list_nodes
from processdistro.shared.store.connection import Client
from processdistro.show import short_ids
from rich.cells import cell_len
from test_top import nodes_running, wait_for

SMALL = ["--width", "64", "--height", "64", "--tile", "32", "--max-iter", "50"]


def cli(ctl: Controller, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processdistro", *args],
        env={**ctl.env, "COLUMNS": str(columns)},
        capture_output=True,
        text=True,
        timeout=120,
    )


# ------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(
    ("ids", "shown"),
    [
        (["7n3MxQ2aBcDeFgHiJkLmNoPq", "Zz9yXw8vUt7sRq6pOn5mLk4j"], ["7n3MxQ2a", "Zz9yXw8v"]),
        (["abcdefgh1xyz", "abcdefgh2xyz"], ["abcdefgh1", "abcdefgh2"]),
        (["abcdefghij", "abcdefghik", "b"], ["abcdefghij", "abcdefghik", "b"]),
        (["short"], ["short"]),
        ([], []),
    ],
    ids=["distinct at 8", "one more char", "to the end", "short id whole", "none"],
)
def test_short_ids(ids: list[str], shown: list[str]) -> None:
    assert [short_ids(ids)[i] for i in ids] == shown


@pytest.mark.parametrize(
    ("share", "note"),
    [
        (0.05, "5 % of subtasks are computed twice on distinct nodes to check results (--replicate 0 to turn off)"),
        (0.1, "10 % of subtasks are computed twice on distinct nodes to check results (--replicate 0 to turn off)"),
        (0.125, "12.5 % of subtasks are computed twice"),
        (1.0, "every subtask is computed twice on distinct nodes"),
        (0.0, ""),
    ],
    ids=["default 5 %", "wasm's 10 %", "12.5 %", "all", "off"],
)
def test_replication_note(share: float, note: str) -> None:
    said = replication_note(share)
    assert said.startswith(note) if note else said == ""


# ------------------------------------------------------------------ against a controller


def test_jobs_lists_a_job_the_scheduler_has_not_read(controller: Controller, r: Client) -> None:
    """With the scheduler stopped, a submitted job is listed as `submitted` (it was not
    listed at all before the scheduler read its command); once the scheduler runs, the same
    job is listed once, in the scheduler's state. `submit` says the replicated share."""
    controller.kill("scheduler")
    sent = cli(controller, "submit", "mandelbrot", *SMALL)
    assert sent.returncode == 0, sent.stderr
    assert "5 % of subtasks are computed twice on distinct nodes to check results" in sent.stdout, sent.stdout
    assert "(--replicate 0 to turn off)" in sent.stdout, sent.stdout
    job_id = sent.stdout.split("submitted job ", 1)[1].split()[0]
    off = cli(controller, "submit", "mandelbrot", *SMALL, "--replicate", "0")
    assert off.returncode == 0 and "computed twice" not in off.stdout, off.stdout
    assert r.zcard(keys.JOBS) == 0  # no record yet: only the commands

    listed = cli(controller, "jobs")
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if job_id in line]
    assert len(rows) == 1 and "submitted" in rows[0] and "mandelbrot" in rows[0], listed.stdout
    assert max(cell_len(line) for line in listed.stdout.splitlines()) <= 80, listed.stdout  # ids whole
    as_json = json.loads(cli(controller, "jobs", "--json").stdout)
    assert [j["state"] for j in as_json] == ["submitted", "submitted"], as_json
    assert {j["id"] for j in as_json} >= {job_id} and all(j["kind"] == "mandelbrot" for j in as_json)

    controller.start("scheduler")
    wait_for(lambda: r.zcard(keys.JOBS) == 2, 60, controller.logs)
    deadline = time.monotonic() + 30
    while True:  # the command is acked (and gone) just after the record is written
        as_json = json.loads(cli(controller, "jobs", "--json").stdout)
        if all(j["state"] != "submitted" for j in as_json) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(j["state"] in ("queued", "running") for j in as_json), as_json
    assert len(as_json) == 2 and job_id in {j["id"] for j in as_json}, as_json


def test_nodes_fits_80_columns_and_wide_shows_everything(controller: Controller, r: Client) -> None:
    nodes = [Node(controller.url, controller.join_code, cores=1) for _ in range(2)]
    with nodes_running(*nodes):
        wait_for(lambda: sum(n["live"] == "yes" for n in list_nodes(r, 30.0)) == 2, 60, controller.logs)
        ids = [n["id"] for n in list_nodes(r, 30.0)]
        agent = {n["id"]: f"{n['browser']} {n['os']}" for n in list_nodes(r, 30.0)}
        narrow = cli(controller, "nodes")
        wide = cli(controller, "nodes", "--wide")
    assert narrow.returncode == 0 and wide.returncode == 0, narrow.stderr + wide.stderr
    lines = narrow.stdout.splitlines()
    assert max(cell_len(line) for line in lines) <= 80, narrow.stdout
    head = next(line for line in lines if line.strip())
    assert head.split() == ["node", "kind", "state", "slots", "done", "rej", "score", "browser", "/", "os"]
    for i in ids:
        row = [line for line in lines if line.strip().startswith(i[:8])]
        assert len(row) == 1 and i not in row[0], narrow.stdout
        cells = row[0].split()
        assert cells[1] == "native" and cells[2] in ("joined", "idle", "busy"), row
        assert "Mit/s" in row[0] or "kit/s" in row[0], row  # the score, formatted
    for i in ids:  # whole ids and texts, whatever the terminal's width
        assert i in wide.stdout and agent[i] in wide.stdout, wide.stdout
    assert "address" in wide.stdout and "avg task ms" in wide.stdout and "127.0.0.1" in wide.stdout, wide.stdout
