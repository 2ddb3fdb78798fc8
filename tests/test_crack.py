"""Crack: a password at 70 % of a 100,000-word list is found, verified, and the job ends
with nothing left queued or running."""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
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
from processdistro.shared.tasks.crack import chunk_lines
from test_e2e_browser import close_all, join
from test_matmul import wait_job

ITERATIONS = 1000


def wordlist(path: Path, n: int, secret: str, at: int) -> None:
    rnd = random.Random(3)
    words = [f"{rnd.choice(['sun', 'moon', 'star', 'żółw', 'кот'])}{i}{rnd.randrange(10**6)}" for i in range(n)]
    words[at] = secret
    path.write_text("\n".join(words) + "\n", encoding="utf-8")


@pytest.mark.browser
def test_found_at_seventy_percent(controller: Controller, browser: Any, tmp_path: Path, r: Client) -> None:
    secret = "correct-horse-ünïcode"
    wordlist(tmp_path / "words.txt", 100_000, secret, 70_000)
    target = hashlib.pbkdf2_hmac("sha256", secret.encode(), b"pepper", ITERATIONS, 32).hex()
    pages = [join(browser, controller), join(browser, controller)]
    try:
        started = time.monotonic()
        job_id = client.submit(
            r,
            "crack",
            {
                "target": target,
                "salt": "pepper",
                "iterations": ITERATIONS,
                "wordlist": str(tmp_path / "words.txt"),
                "chunk": 8192,
            },
        )
        job = wait_job(r, job_id, timeout=240)
        elapsed = time.monotonic() - started
        assert job.state is JobState.DONE, job.error + controller.logs()
        summary = json.loads(Path(job.outputs["json"]).read_text())
        assert summary["found"] is True and summary["password"] == secret
        # nothing of the job is left queued or running
        time.sleep(1.5)
        leftovers = [f for _, f in r.xrange(keys.TASKS) if f[b"job"].decode() == job_id]
        assert not leftovers, f"{len(leftovers)} tasks of the finished job still queued"
        assert r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"] == 0
        print(
            f"\ncrack: found at chunk {summary['chunk']} of {summary['chunks_total']}, "
            f"{summary['candidates_hashed']} candidates hashed, "
            f"{summary['hashed_after_hit']} after the hit, {elapsed:.1f}s"
        )
    finally:
        close_all(pages)


def test_chunks_cover_every_line_once(tmp_path: Path) -> None:
    words = [f"w{i}" * (i % 7 + 1) for i in range(500)]
    data = ("\n".join(words) + "\n").encode()
    for chunk in (16, 37, 100, 4096):
        seen: list[bytes] = []
        fh = io.BytesIO(data)
        for i in range(-(-len(data) // chunk)):
            seen += chunk_lines(fh, i, chunk, len(data))
        assert seen == [w.encode() for w in words], chunk


def test_refused_at_submit(tmp_path: Path) -> None:
    plugin = get_plugin("crack")
    (tmp_path / "w.txt").write_text("a\nb\n")
    with pytest.raises(ParamsError, match="target must be hex"):
        plugin.prepare({"target": "xyz", "salt": "s", "wordlist": str(tmp_path / "w.txt")})
    with pytest.raises(ParamsError, match="cannot read wordlist"):
        plugin.prepare({"target": "ab", "salt": "s", "wordlist": str(tmp_path / "missing.txt")})
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ParamsError, match="empty"):
        plugin.prepare({"target": "ab", "salt": "s", "wordlist": str(tmp_path / "empty.txt")})


def test_hit_is_rehashed_on_the_controller(tmp_path: Path) -> None:
    import random as rnd
    import struct

    plugin = get_plugin("crack")
    (tmp_path / "w.txt").write_text("alpha\nbeta\ngamma\n")
    target = hashlib.pbkdf2_hmac("sha256", b"beta", b"s", 3, 32).hex()
    params = plugin.parse_params(
        plugin.prepare(
            {"target": target, "salt": "s", "iterations": 3, "wordlist": str(tmp_path / "w.txt"), "chunk": 64}
        ).params
    )
    task = next(plugin.split(params)).input
    assert plugin.verify(params, 0, task, struct.pack("<II", 1, 2), rnd.Random()).value == "accept"
    assert plugin.verify(params, 0, task, struct.pack("<II", 2, 3), rnd.Random()).value == "reject"  # a false hit
    assert (
        plugin.verify(params, 0, task, struct.pack("<II", 0xFFFFFFFF, 1), rnd.Random()).value == "reject"
    )  # skipped work


def test_ringers_catch_a_node_that_skips_work(tmp_path: Path) -> None:
    import random as rnd
    import struct

    plugin = get_plugin("crack")
    (tmp_path / "w.txt").write_text("".join(f"word{i}\n" for i in range(400)))
    target = hashlib.pbkdf2_hmac("sha256", b"absent", b"s", 2, 32).hex()
    raw = {"target": target, "salt": "s", "iterations": 2, "wordlist": str(tmp_path / "w.txt"), "chunk": 64}
    params = plugin.parse_params(plugin.prepare(raw).params)
    tasks = list(plugin.split(params))
    assert len(tasks) == params.chunks + params.ringers and params.ringers >= 2
    for index in range(params.chunks, len(tasks)):
        task = tasks[index].input
        lazy = struct.pack("<II", 0xFFFFFFFF, len(tasks[index].input))  # "searched it all, nothing"
        assert plugin.verify(params, index, task, lazy, rnd.Random()).value == "reject"
        from processdistro.shared.tasks.crack import decode_candidates, ringer_answer

        position, key = ringer_answer(params, index, decode_candidates(params, task))
        honest = struct.pack("<II", position, position + 1)
        assert plugin.verify(params, index, task, honest, rnd.Random()).value == "accept"
        assert not plugin.finished_early(None, params, index, honest)  # type: ignore[arg-type]
