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
    with pytest.raises(ParamsError, match="is a directory"):
        plugin.prepare({"target": "ab", "salt": "s", "wordlist": str(tmp_path)})


def prefixes(task: bytes, iterations: int, salt: bytes, dklen: int) -> bytes:
    """What an honest node returns: password_hash mode 0 over the task's records."""
    from processdistro.shared.tasks.crack import decode_candidates

    return b"".join(hashlib.pbkdf2_hmac("sha256", c, salt, iterations, dklen) for c in decode_candidates(task))


@pytest.mark.parametrize("dklen", [32, 8, 3], ids=["dklen-32", "dklen-8", "dklen-3"])
def test_hit_is_rehashed_on_the_controller(tmp_path: Path, dklen: int) -> None:
    """A node returns key prefixes, never sees the target; the controller finds the hit in
    them and re-hashes it in full; a false match or a made-up prefix is rejected."""
    plugin = get_plugin("crack")
    (tmp_path / "w.txt").write_text("alpha\nbeta\ngamma\n")
    target = hashlib.pbkdf2_hmac("sha256", b"beta", b"s", 3, dklen)
    raw = {"target": target.hex(), "salt": "s", "iterations": 3, "wordlist": str(tmp_path / "w.txt"), "chunk": 64}
    params = plugin.parse_params(plugin.prepare(raw).params)
    task = next(plugin.split(params)).input
    assert target not in task and target[: min(dklen, 8)] not in task  # nothing of the target travels
    d = min(dklen, 8)
    honest = prefixes(task, 3, b"s", d)
    assert len(honest) == 3 * d
    rng = random.Random(0)
    assert plugin.verify(params, 0, task, honest, rng).value == "accept"
    false_hit = target[:d] + honest[d:]  # "alpha" claimed to match the target
    assert plugin.verify(params, 0, task, false_hit, rng).value == "reject"
    hidden = honest[:d] + bytes(d) + honest[2 * d :]  # the hit's prefix made up
    assert plugin.verify(params, 0, task, hidden, random.Random(1)).value == "reject"
    assert plugin.verify(params, 0, task, honest[:-1], rng).value == "reject"  # wrong length
    found = tmp_path / "job"
    from processdistro.shared.tasks import JobFiles

    files = JobFiles("j", found)
    assert plugin.finished_early(files, params, 0, honest)
    plugin.merge(files, params, 0, honest)
    record = json.loads((found / "chunk-000000000.json").read_text())
    assert record == {"chunk": 0, "hashed": 2, "password": "beta", "line_in_chunk": 1}


def test_made_up_prefixes_are_caught(tmp_path: Path) -> None:
    """Every result has real candidates recomputed, chosen by the controller after it
    arrives: a node that makes them up never passes."""
    plugin = get_plugin("crack")
    (tmp_path / "w.txt").write_text("".join(f"word{i}\n" for i in range(400)))
    target = hashlib.pbkdf2_hmac("sha256", b"absent", b"s", 2, 32).hex()
    raw = {"target": target, "salt": "s", "iterations": 2, "wordlist": str(tmp_path / "w.txt"), "chunk": 64}
    params = plugin.parse_params(plugin.prepare(raw).params)
    tasks = [sub.input for sub in plugin.split(params)]
    assert len(tasks) == params.chunks  # no extra, recognisable check tasks
    rng = random.Random(7)
    for index, task in enumerate(tasks):
        honest = prefixes(task, 2, b"s", 8)
        assert plugin.verify(params, index, task, honest, rng).value == "accept"
        made_up = bytes(len(honest))
        assert plugin.verify(params, index, task, made_up, rng).value == "reject"
        assert not plugin.finished_early(None, params, index, honest)  # type: ignore[arg-type]
