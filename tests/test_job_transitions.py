"""A job's state machine: the table of allowed moves, the one compare-and-set that makes
them (`JobStore.transition`, against the real Redis), and the scheduler's cancel racing
the finalizer."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from processdistro.scheduler.service import Scheduler
from processdistro.shared import keys
from processdistro.shared.jobs import LIVE, TERMINAL, TRANSITIONS, JobRecord, JobState, allowed, sources
from processdistro.shared.messages import Cancel, CancelJob, parse_control
from processdistro.shared.modules import ModuleRegistry
from processdistro.shared.settings import Settings
from processdistro.shared.store.commands import send_command
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import JobStore, load_job, store_blocks

Q, R, F, D, X, C = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.FINALIZING,
    JobState.DONE,
    JobState.FAILED,
    JobState.CANCELLED,
)

ALLOWED = [
    (Q, R),
    (R, F),
    (F, D),
    (F, X),
    (Q, C),
    (R, C),
    (F, C),
    (Q, X),
    (R, X),
    (X, F),  # `processdistro retry` of a failed finalize (JobStore.retry_finalize checks the mark)
]
REFUSED = [
    (D, C),  # a finished job stays finished
    (D, X),
    (D, R),
    (C, R),
    (C, D),
    (X, D),
    (X, C),
    (R, Q),
    (Q, F),  # nothing merged yet
    (Q, D),
    (R, D),  # done only through finalizing
    (F, R),
    (Q, Q),
    (D, D),
]


def _ids(moves: list[tuple[JobState, JobState]]) -> list[str]:
    return [f"{a.value}->{b.value}" for a, b in moves]


# ------------------------------------------------------------------ the table


def test_the_table_is_exactly_the_allowed_moves() -> None:
    assert set(TRANSITIONS) == set(ALLOWED)
    assert frozenset({Q, R}) == LIVE
    assert frozenset({D, X, C}) == TERMINAL


@pytest.mark.parametrize("move", ALLOWED, ids=_ids(ALLOWED))
def test_allowed_move(move: tuple[JobState, JobState]) -> None:
    frm, to = move
    assert allowed(frm, to)
    assert frm in sources(to)
    # no move leaves a terminal state but the retry of a failed finalize
    assert not frm.terminal or (frm, to) == (X, F)


@pytest.mark.parametrize("move", REFUSED, ids=_ids(REFUSED))
def test_refused_move(move: tuple[JobState, JobState]) -> None:
    frm, to = move
    assert not allowed(frm, to)
    assert frm not in sources(to)


@pytest.mark.parametrize(
    ("to", "expected"),
    [(R, {Q}), (F, {R, X}), (D, {F}), (C, {Q, R, F}), (X, {Q, R, F}), (Q, set())],
    ids=lambda v: v.value if isinstance(v, JobState) else "",
)
def test_sources(to: JobState, expected: set[JobState]) -> None:
    assert sources(to) == expected


# ------------------------------------------------------------------ JobStore.transition


def make_job(r: Client, job_id: str, state: JobState) -> JobStore:
    """A job record in `state`, reached through the real moves from `queued`."""
    jobs = JobStore(r)
    now = time.time()
    record: dict[str, str | float | int] = {
        "id": job_id,
        "kind": "mandelbrot",
        "state": Q.value,
        "params": "{}",
        "total": 4,
        "done": 0,
        "next_index": 0,
        "created": now,
    }
    assert jobs.create(job_id, record, priority=0, created=now)
    path = {Q: [], R: [R], F: [R, F], D: [R, F, D], C: [C], X: [X]}[state]
    at = Q
    for to in path:
        assert jobs.transition(job_id, at, to)
        at = to
    return jobs


def active(r: Client) -> set[str]:
    return {j.decode() for j in r.zrange(keys.ACTIVE_JOBS, 0, -1)}


def test_create_once(r: Client) -> None:
    jobs = make_job(r, "j", Q)
    assert not jobs.create("j", {"id": "j", "state": R.value}, priority=0, created=0.0)  # a replay
    assert load_job(r, "j").state is Q  # type: ignore[union-attr]
    assert [j.id for j in jobs.active()] == ["j"]


@pytest.mark.parametrize("move", ALLOWED, ids=_ids(ALLOWED))
def test_transition_makes_an_allowed_move(r: Client, move: tuple[JobState, JobState]) -> None:
    frm, to = move
    jobs = make_job(r, "j", frm)
    assert jobs.transition("j", frm, to, error="why", finished=12.5)
    job = load_job(r, "j")
    assert job is not None and job.state is to and job.error == "why" and job.finished == 12.5
    assert ("j" in active(r)) is (not to.terminal)  # a terminal state leaves ACTIVE_JOBS
    assert job.finalized == (1 if to is D else 0)  # done counts finalized


@pytest.mark.parametrize("move", REFUSED, ids=_ids(REFUSED))
def test_transition_refuses_a_move_not_in_the_table(r: Client, move: tuple[JobState, JobState]) -> None:
    frm, to = move
    jobs = make_job(r, "j", frm)
    with pytest.raises(ValueError, match=f"from {frm.value} to {to.value}"):
        jobs.transition("j", frm, to)
    assert load_job(r, "j").state is frm  # type: ignore[union-attr]


def test_transition_fails_when_the_state_changed(r: Client) -> None:
    jobs = make_job(r, "j", R)
    assert not jobs.transition("j", Q, C, error="late")  # loaded as queued; it is running now
    job = load_job(r, "j")
    assert job is not None and job.state is R and job.error == "" and "j" in active(r)
    assert jobs.transition("j", [Q, R], C)  # any one of several states
    assert not jobs.transition("missing", Q, R)


def test_done_is_counted_once(r: Client) -> None:
    jobs = make_job(r, "j", F)
    assert jobs.transition("j", F, D)
    assert not jobs.transition("j", F, D)  # a second finalizer
    job = load_job(r, "j")
    assert job is not None and job.state is D and job.finalized == 1 and "j" not in active(r)


# ------------------------------------------------------------------ the scheduler's cancel


class MovesAfterFirstRead(Client):
    """A client on which another process moves the job (`frm -> to`, the real transition)
    right after the scheduler's first read of its record: between cancel's load and its write."""

    job_id = ""
    move: tuple[JobState, JobState] | None = None

    def hgetall(self, name: Any) -> Any:
        h = super().hgetall(name)
        if self.move is not None and name == keys.job(self.job_id):
            frm, to = self.move
            self.move = None
            assert JobStore(self).transition(self.job_id, frm, to, finished=time.time())
        return h


@pytest.fixture
def scheduler(r: Client, redis_url: str) -> Scheduler:
    client = MovesAfterFirstRead.from_url(redis_url)
    return Scheduler(client=client, settings=Settings(redis_url=redis_url), modules=ModuleRegistry())


def control_messages(pubsub: Any) -> list[bytes]:
    out = []
    while (m := pubsub.get_message(timeout=0.2)) is not None:
        if m["type"] == "message":
            out.append(m["data"])
    return out


@pytest.mark.parametrize("state", [C, X], ids=["cancel", "fail"])
def test_cancel_racing_the_finalizer_leaves_the_job_done(r: Client, scheduler: Scheduler, state: JobState) -> None:
    """The cancel loads the job as `finalizing`; the finalizer writes `done` before the
    cancel writes: the job stays `done`, finalized once, and no gateway is told to stop it."""
    make_job(r, "j", F)
    client = scheduler.r
    assert isinstance(client, MovesAfterFirstRead)
    client.job_id, client.move = "j", (F, D)
    pubsub = r.pubsub()
    pubsub.subscribe(keys.CONTROL)
    control_messages(pubsub)
    scheduler.cancel("j", "cancelled by user", state=state)
    job = load_job(r, "j")
    assert job is not None
    assert (job.state, job.error, job.finalized) == (D, "", 1)
    assert "j" not in active(r)
    assert control_messages(pubsub) == []
    pubsub.close()


def test_cancel_of_a_finalizing_job_cancels_it(r: Client, scheduler: Scheduler) -> None:
    make_job(r, "j", F)
    store_blocks(r, "j", {"ab": b"block"})
    pubsub = r.pubsub()
    pubsub.subscribe(keys.CONTROL)
    control_messages(pubsub)
    scheduler.cancel("j", "cancelled by user")
    job = load_job(r, "j")
    assert job is not None and (job.state, job.error, job.finalized) == (C, "cancelled by user", 0)
    assert "j" not in active(r) and not r.exists(keys.block("j", "ab"))
    assert [parse_control(m) for m in control_messages(pubsub)] == [CancelJob(job_id="j")]
    # the finalizer that comes later may not write `done` over it
    assert not JobStore(r).transition("j", F, D)
    pubsub.close()


def test_cancel_follows_a_job_that_moved_on(r: Client, scheduler: Scheduler) -> None:
    """Loaded as `running`, moved to `finalizing` by the aggregator before the write: the
    cancel still applies (finalizing -> cancelled is allowed)."""
    make_job(r, "j", R)
    client = scheduler.r
    assert isinstance(client, MovesAfterFirstRead)
    client.job_id, client.move = "j", (R, F)
    scheduler.cancel("j", "cancelled by user")
    assert load_job(r, "j").state is C  # type: ignore[union-attr]


def test_a_bad_command_is_refused_and_the_others_applied(
    r: Client, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    make_job(r, "a", R)
    make_job(r, "b", Q)
    r.xgroup_create(keys.COMMANDS, keys.SCHEDULER_GROUP, id="0", mkstream=True)
    send_command(r, Cancel(job_id="a"))
    bad = r.xadd(keys.COMMANDS, {"command": b'{"type": "launch", "job_id": "b"}'}).decode()
    unknown = r.xadd(
        keys.COMMANDS, {"command": b'{"type": "submit", "job_id": "c", "kind": "nope", "params": {}, "created": 1}'}
    ).decode()
    send_command(r, Cancel(job_id="b", reason="changed my mind"))
    with caplog.at_level(logging.ERROR):
        assert scheduler.handle_commands(block_ms=None) == 4
    assert load_job(r, "a").state is C  # type: ignore[union-attr]
    b = load_job(r, "b")
    assert b is not None and (b.state, b.error) == (C, "changed my mind")
    assert load_job(r, "c") is None
    refused = [m for m in caplog.messages if "refused" in m]
    assert len(refused) == 2 and bad in refused[0] and unknown in refused[1] and "nope" in refused[1]
    assert r.xlen(keys.COMMANDS) == 0  # every command acked and deleted


@pytest.mark.parametrize(
    ("state", "shown"),
    [("running", "subtask 3 failed on node n1: boom; waiting for a second node to confirm"), ("done", "")],
    ids=["live-job-says-why-it-waits", "finished-job-drops-the-note"],
)
def test_a_jobs_note_is_public_while_it_is_live(state: str, shown: str) -> None:
    """Issue 9.1: a lone node's failures are reported, not hidden: the job's `note` (written
    by the gateway) reaches `jobs --json` while the job is live."""
    note = "subtask 3 failed on node n1: boom; waiting for a second node to confirm"
    record = JobRecord.from_hash(
        {b"id": b"j", b"kind": b"mandelbrot", b"state": state.encode(), b"note": note.encode()}
    )
    assert record.note == note
    assert record.to_public()["note"] == shown
