"""Issue 9.3 (and the Mandelbrot part of 9.10, the wordlist part of 9.6): checks a node
cannot tell from work, at a bounded cost to the controller.

Before: a hash batch's check row was recognisable (16 URL-safe characters, a random binary
salt), a crack check task carried a target other than the job's and came last, and a crack
"no hit" was checked only by its count; a Mandelbrot spot check iterated up to `max_iter`
(10**8: a minute of Python per check). A node that computed only what looked like a check
passed, and could report "not found" while the password was in its share.

Now: the aggregator recomputes random *real* rows and candidates (`hashing.spot_positions`,
within `hashing.CHECK_HMACS` of PBKDF2 per result); a hash batch's planted row is drawn
from the batch's own lengths and characters; crack nodes get the kernel's hash mode without
the target and return key prefixes, so a "no hit" is the controller's own conclusion; a
Mandelbrot tile's checks spend at most `mandelbrot.CHECK_ITERATIONS`.

Real controller processes, real Redis, real `WorkerNode`s (tests/nodes.py): a lazy one
whose executor computes only what it guesses are checks (by the old tells) and makes up
the rest, next to an honest one."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import Controller
from executors import PythonExecutor
from nodes import Node, run_async
from processdistro import client
from processdistro.shared import keys
from processdistro.shared.exceptions import ParamsError
from processdistro.shared.jobs import JobState
from processdistro.shared.protocol import CloseCode
from processdistro.shared.store.connection import Client
from processdistro.shared.tasks import Verdict, get_plugin
from processdistro.shared.tasks.mandelbrot import (
    CHECK_ITERATIONS,
    MandelbrotParams,
    escape_count,
    spot_check,
)
from processdistro.worker.state import Start
from test_matmul import wait_job

HEADER = struct.Struct("<B3xIII")  # password_hash: mode, padding, iterations, dklen, count
NO_HIT = 0xFFFFFFFF
URLSAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def strings(data: bytes, pos: int, count: int) -> tuple[list[bytes], int]:
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out, pos


def made_up(record: bytes, dklen: int) -> bytes:
    return (hashlib.sha256(record).digest() * (dklen // 32 + 1))[:dklen]


def looks_like_a_check(password: bytes, salt: bytes) -> bool:
    """The old tells of a planted hash row: 16 URL-safe characters, a salt that is not text."""
    try:
        salt.decode()
    except UnicodeDecodeError:
        return True
    return len(password) == 16 and set(password.decode(errors="replace")) <= URLSAFE


class GuessingExecutor(PythonExecutor):
    """A lazy node: computes only the items it guesses are checks, makes up the rest, and
    notes whether `secret` was among what it was given."""

    def __init__(self, secret: bytes) -> None:
        super().__init__()
        self.secret = secret
        self.saw_secret = False
        self.targets: dict[str, bytes] = {}  # the first crack target seen per job: the job's own

    async def run(self, part: Start, data: bytes) -> tuple[bytes, float]:
        self.started += 1
        await asyncio.sleep(0.01)
        return self.answer(part.job_id, data), 10.0

    def answer(self, job_id: str, data: bytes) -> bytes:
        mode, iterations, dklen, count = HEADER.unpack_from(data)
        if mode == 1:  # a crack task with the target inside (before issue 9)
            (salt_len,) = struct.unpack_from("<I", data, HEADER.size)
            salt = data[HEADER.size + 4 : HEADER.size + 4 + salt_len]
            at = HEADER.size + 4 + salt_len
            target = data[at : at + dklen]
            candidates, _ = strings(data, at + dklen, count)
            self.saw_secret |= self.secret in candidates
            if target != self.targets.setdefault(job_id, target):  # another target: a check
                for i, c in enumerate(candidates):
                    if hashlib.pbkdf2_hmac("sha256", c, salt, iterations, dklen) == target:
                        return struct.pack("<II", i, i + 1)
            return struct.pack("<II", NO_HIT, count)  # "searched it all: nothing"
        out = b""
        pos = HEADER.size
        for _ in range(count):
            (password, salt), pos = strings(data, pos, 2)
            self.saw_secret |= password == self.secret
            if looks_like_a_check(password, salt):
                out += hashlib.pbkdf2_hmac("sha256", password, salt, iterations, dklen)
            else:
                out += made_up(password + b"\0" + salt, dklen)
        return out


def lazy_node(controller: Controller, secret: bytes) -> tuple[Node, GuessingExecutor]:
    node = Node(controller.url, controller.join_code, cores=2)
    executor = GuessingExecutor(secret)
    node.executor = executor
    return node, executor


def run_lazy_then_honest(r: Client, job_id: str, lazy: Node, honest: Node, timeout: float = 90) -> None:
    """The lazy node starts alone (so the first chunks are its share); the honest one joins
    once the lazy one has answered three parts, and both run until the job is over."""

    async def scenario() -> None:
        stop = asyncio.Event()
        lazy_run = asyncio.create_task(lazy.run(stop=stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while lazy.executor.started < 3 and not lazy_run.done() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        honest_run = asyncio.create_task(honest.run(stop=stop))
        while r.hget(keys.job(job_id), "state") not in (b"done", b"failed", b"cancelled") and loop.time() < deadline:
            await asyncio.sleep(0.05)
        # the lazy node's last results may still be on their way to a ban
        while lazy.closed_with is None and not lazy_run.done() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(lazy_run, honest_run)

    run_async(scenario())


def write_rows(path: Path, n: int) -> list[tuple[str, str]]:
    rnd = random.Random(11)
    rows = [
        (f"{rnd.choice(['hunter', 'letmein', 'qwerty', 'dragon'])}{i}", f"salt{rnd.randrange(10**6)}") for i in range(n)
    ]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["password", "salt"])
        w.writerows(rows)
    return rows


def test_lazy_hash_node_never_gets_a_key_into_the_output(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.3: a node that computes only the rows it takes for checks (the old tells) and
    makes up every other key. The fix: real rows recomputed at random by the controller, and
    a planted row with no tell. Every one of its results is rejected, it is banned, and the
    output is exact."""
    rows = write_rows(tmp_path / "rows.csv", 120)
    job_id = client.submit(r, "hash", {"input": str(tmp_path / "rows.csv"), "iterations": 50, "batch": 10}, replicate=0)
    lazy, guesser = lazy_node(controller, secret=rows[0][0].encode())
    honest = Node(controller.url, controller.join_code)
    run_lazy_then_honest(r, job_id, lazy, honest)
    job = wait_job(r, job_id, timeout=30)
    assert job.state is JobState.DONE, job.error + controller.logs()
    with open(job.outputs["csv"], encoding="utf-8", newline="") as fh:
        out = list(csv.DictReader(fh))
    assert len(out) == len(rows)
    for i, ((password, salt), got) in enumerate(zip(rows, out, strict=True)):
        dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 50, 32)
        assert (got["row"], got["salt"], got["dk_hex"]) == (str(i), salt, dk.hex())
    assert guesser.saw_secret and guesser.started >= 3  # the first batch was in its share
    assert lazy.closed_with == CloseCode.BANNED, controller.logs()
    assert int(r.hget(keys.node(lazy.device_id), "completed") or 0) == 0  # nothing of it merged


def test_lazy_crack_node_cannot_hide_the_hit(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.3: a crack node that searches only what it takes for check tasks (another
    target) and says "no hit" for the rest, with the password in its share (chunk 0). The
    fix: nodes get the hash mode without the target and return key prefixes; the controller
    finds the hit itself and recomputes random candidates of every result. The lazy node is
    caught and banned, and the password is found."""
    rnd = random.Random(2)
    words = [f"{rnd.choice(['sun', 'moon', 'star'])}{i}{rnd.randrange(1000)}" for i in range(300)]
    secret = "opensesame"
    words[3] = secret
    (tmp_path / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    target = hashlib.pbkdf2_hmac("sha256", secret.encode(), b"pepper", 50, 32).hex()
    params = {
        "target": target,
        "salt": "pepper",
        "iterations": 50,
        "wordlist": str(tmp_path / "words.txt"),
        "chunk": 96,
    }
    job_id = client.submit(r, "crack", params, replicate=0)
    lazy, guesser = lazy_node(controller, secret=secret.encode())
    honest = Node(controller.url, controller.join_code)
    run_lazy_then_honest(r, job_id, lazy, honest)
    job = wait_job(r, job_id, timeout=30)
    assert job.state is JobState.DONE, job.error + controller.logs()
    summary = json.loads(Path(job.outputs["json"]).read_text())
    assert guesser.saw_secret  # the password was in the lazy node's share
    assert (summary["found"], summary["password"], summary["chunk"]) == (True, secret, 0), summary
    assert lazy.closed_with == CloseCode.BANNED, controller.logs()
    assert int(r.hget(keys.node(lazy.device_id), "completed") or 0) == 0


def test_directory_as_wordlist_is_refused(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Issue 9.6: a wordlist that is a directory restarted the scheduler for ever. The fix:
    it is refused at submit with a clear message, and nothing is queued."""
    (tmp_path / "words").mkdir()
    params = {"target": "ab" * 32, "salt": "s", "wordlist": str(tmp_path / "words")}
    with pytest.raises(ParamsError, match=r"is a directory: expected a file with one candidate per line"):
        client.submit(r, "crack", params)
    assert r.zcard(keys.JOBS) == 0 and r.xlen(keys.TASKS) == 0
    with pytest.raises(ParamsError, match="is not a file"):
        client.submit(r, "hash", {"input": str(tmp_path / "words")})
    assert r.zcard(keys.JOBS) == 0 and r.xlen(keys.TASKS) == 0


# ------------------------------------------------------------------ Mandelbrot: the cost bound


def in_cardioid(cx: float, cy: float) -> bool:
    """Inside the main cardioid: never escapes (so its count is max_iter, whatever that is)."""
    q = (cx - 0.25) ** 2 + cy**2
    return q * (q + (cx - 0.25)) <= 0.25 * cy**2


def honest_tile(p: MandelbrotParams) -> np.ndarray:
    """The exact counts of a whole (one-tile) image whose pixels either escape within 10**4
    iterations or lie in the main cardioid (so no pixel needs `max_iter` iterations here)."""
    counts = np.zeros((p.height, p.width), dtype=np.uint32)
    for j in range(p.height):
        for i in range(p.width):
            cx = p.xmin + (i + 0.5) * (p.xmax - p.xmin) / p.width
            cy = p.ymax - (j + 0.5) * (p.ymax - p.ymin) / p.height
            if in_cardioid(cx, cy):
                counts[j, i] = p.max_iter
            else:
                n = escape_count(p, i, j, limit=10_000)
                assert n < 10_000, (i, j)  # the view is chosen so
                counts[j, i] = n
    return counts


HUGE = 100_000_000  # the largest max_iter a job may ask for


@pytest.mark.parametrize(
    ("view", "claim", "verdict"),
    [
        pytest.param((0.5, 2.0, -1.0, 1.0), "honest", Verdict.ACCEPT, id="escapes-fast-honest"),
        pytest.param((-0.2, 0.1, -0.1, 0.1), "honest", Verdict.ACCEPT, id="in-the-set-honest"),
        pytest.param((-0.2, 1.0, -0.3, 0.3), "honest", Verdict.ACCEPT, id="mixed-honest"),
        pytest.param((0.5, 2.0, -1.0, 1.0), "all-max", Verdict.REJECT, id="escapes-fast-claimed-in-set"),
        pytest.param((-0.2, 1.0, -0.3, 0.3), "zeros", Verdict.REJECT, id="mixed-claimed-zero"),
        pytest.param((-0.2, 0.1, -0.1, 0.1), "zeros", Verdict.REJECT, id="in-the-set-claimed-zero"),
    ],
)
def test_mandelbrot_spot_check_cost_is_bounded(
    view: tuple[float, float, float, float], claim: str, verdict: Verdict
) -> None:
    """Issue 9.10: with max_iter = 10**8 a check of a pixel in the set used to iterate 10**8
    times (about a minute of Python; four per tile). The fix: each tile's checks spend at
    most CHECK_ITERATIONS, a cheap pixel is checked exactly, an expensive one up to its share;
    a made-up tile is still caught."""
    p = MandelbrotParams(
        width=16, height=16, xmin=view[0], xmax=view[1], ymin=view[2], ymax=view[3], max_iter=HUGE, tile=16
    )
    truth = honest_tile(p)
    tile = {"honest": truth, "all-max": np.full_like(truth, HUGE), "zeros": np.zeros_like(truth)}[claim]
    for seed in range(20):
        got, spent = spot_check(p, 0, 0, tile, random.Random(seed))
        assert spent <= CHECK_ITERATIONS
        assert got is verdict, seed


def test_mandelbrot_verify_of_a_huge_max_iter_tile() -> None:
    """The plugin's verify goes through the bounded check: a 16x16 tile entirely in the set
    at max_iter 10**8 is verified with at most CHECK_ITERATIONS iterations."""
    plugin = get_plugin("mandelbrot")
    p = plugin.parse_params(
        {"width": 16, "height": 16, "xmin": -0.2, "xmax": 0.1, "ymin": -0.1, "ymax": 0.1, "max_iter": HUGE, "tile": 16}
    )
    tile = honest_tile(p)  # type: ignore[arg-type]
    output = tile.astype("<u4").tobytes()
    assert plugin.verify(p, 0, b"", output, random.Random(0)) is Verdict.ACCEPT
    lie = tile.copy()
    lie[:, :] = 7  # claims every pixel escapes at 7
    assert plugin.verify(p, 0, b"", lie.astype("<u4").tobytes(), random.Random(0)) is Verdict.REJECT
