"""The gateway's dispatch decisions as tables: no Redis, no processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from processdistro.shared.capacity import MAX_TASK_MS
from processdistro.shared.core import dispatch
from processdistro.shared.core.dispatch import Held, Replica, Verdict
from processdistro.shared.modules import Module
from processdistro.shared.protocol import MAX_PARTS
from processdistro.shared.queue import TaskFields


def task(
    job: str = "j",
    index: int = 0,
    *,
    backup_of: str = "",
    replicated: bool = False,
    module: str = "m",
    attempt: int = 0,
) -> TaskFields:
    return TaskFields(
        job=job,
        index=index,
        kind="hash",
        module=module,
        input=b"",
        attempt=attempt,
        backup_of=backup_of,
        replicated=replicated,
    )


def holding(*entries: tuple[str, int, TaskFields]) -> dict[str, Held]:
    """Held entries (task id, group, fields) in the order sent."""
    return {tid: Held(fields, 0.0, group) for tid, group, fields in entries}


# ---------------------------------------------------------------- usable here


@pytest.mark.parametrize(
    ("fields", "job_over", "index_done", "verdict"),
    [
        (task(), False, False, Verdict.SEND),
        (task(), True, False, Verdict.DROP),
        (task(backup_of="other"), False, False, Verdict.SEND),
        (task(backup_of="other"), False, True, Verdict.DROP),
        (task(backup_of="me"), False, False, Verdict.PARK),
        (task(backup_of="other"), True, False, Verdict.DROP),
        (task(replicated=True), False, False, Verdict.REPLICA),
        (task(replicated=True), False, True, Verdict.DROP),
        (task(replicated=True), True, False, Verdict.DROP),
    ],
    ids=[
        "plain",
        "job-over",
        "backup-for-another-node",
        "backup-whose-original-is-in",
        "backup-for-its-own-straggler",
        "backup-job-over",
        "replica-asks-the-rule",
        "replica-already-merged",
        "replica-job-over",
    ],
)
def test_screen(fields: TaskFields, job_over: bool, index_done: bool, verdict: Verdict) -> None:
    assert dispatch.screen(fields, node_id="me", job_over=job_over, index_done=index_done) is verdict


@pytest.mark.parametrize(
    ("fields", "needed"),
    [
        (task(), False),
        (task(backup_of="me"), False),
        (task(backup_of="other"), True),
        (task(replicated=True), True),
    ],
    ids=["plain", "own-backup", "backup", "replica"],
)
def test_index_done_read_only_where_it_counts(fields: TaskFields, needed: bool) -> None:
    assert dispatch.needs_index_done(fields, "me") is needed


@pytest.mark.parametrize(
    ("holds", "returned", "votes", "live", "outcome"),
    [
        (False, set(), 0, {"me", "b"}, Replica.RUN),
        (False, {"b"}, 1, {"me", "b"}, Replica.RUN),
        (True, set(), 0, {"me", "b"}, Replica.PARK),
        (False, {"me"}, 1, {"me", "b"}, Replica.PARK),
        (False, {"me", "b"}, 2, {"me", "b"}, Replica.PARK),
        (False, {"me", "b"}, 1, {"me", "b"}, Replica.DECIDE),
        (False, {"me"}, 1, {"me"}, Replica.DECIDE),
        (True, set(), 0, {"me"}, Replica.DECIDE),
        (False, {"me", "b"}, 1, {"me", "b", "c"}, Replica.PARK),
        (False, {"me"}, 0, {"me"}, Replica.DECIDE),
    ],
    ids=[
        "nobody-returned",
        "the-other-node-returned",
        "holds-the-other-copy-another-node-live",
        "returned-it-another-node-live",
        "a-tie-waits-for-a-third-node",
        "one-vote-and-the-other-returned-node-was-rejected",
        "alone-with-its-own-vote",
        "holds-it-and-alone",
        "a-third-live-node-may-confirm",
        "its-result-rejected-and-alone",
    ],
)
def test_replica_rule(holds: bool, returned: set[str], votes: int, live: set[str], outcome: Replica) -> None:
    assert dispatch.replica_rule(node_id="me", holds=holds, returned=returned, votes=votes, live=live) is outcome


def test_holds_a_copy_of_the_subtask() -> None:
    held = holding(("1-0", 0, task("j", 3)), ("1-1", 1, task("k", 4)))
    assert dispatch.holds(held, "j", 3)
    assert not dispatch.holds(held, "j", 4)
    assert not dispatch.holds(held, "k", 3)


# ---------------------------------------------------------------- what to send

MODULES = {
    name: Module(name, f"sha-{name}", Path(f"{name}.wasm"), b"")
    for name in ("matrix_mul", "matrix_mul_simd", "mandelbrot")
}
BY_SHA = {m.sha256: m for m in MODULES.values()}


@pytest.mark.parametrize(
    ("sha", "simd", "chosen"),
    [
        ("sha-matrix_mul", False, "matrix_mul"),
        ("sha-matrix_mul", True, "matrix_mul_simd"),
        ("sha-mandelbrot", True, "mandelbrot"),
        ("sha-mandelbrot", False, "mandelbrot"),
        ("sha-unknown", True, None),
    ],
    ids=["plain", "simd-build", "no-simd-build", "no-simd-node", "unknown-module"],
)
def test_pick_module(sha: str, simd: bool, chosen: str | None) -> None:
    module = dispatch.pick_module(BY_SHA, MODULES, sha, simd=simd)
    assert (module.name if module else None) == chosen


@pytest.mark.parametrize(
    ("fields", "adaptive", "multipart", "part_ms", "parts"),
    [
        (task(), True, True, 100.0, 20),
        (task(), True, True, None, 1),
        (task(), True, True, 1.0, MAX_PARTS),
        (task(), True, True, 5000.0, 1),
        (task(), False, True, 100.0, 1),
        (task(), True, False, 100.0, 1),
        (task(backup_of="x"), True, True, 100.0, 1),
        (task(replicated=True), True, True, 100.0, 1),
    ],
    ids=[
        "fits-the-target",
        "not-measured-yet",
        "capped",
        "slow-node-one-part",
        "not-an-adaptive-kind",
        "old-agent",
        "backup-copy",
        "replicated-copy",
    ],
)
def test_parts_wanted(fields: TaskFields, adaptive: bool, multipart: bool, part_ms: float | None, parts: int) -> None:
    assert (
        dispatch.parts_wanted(fields, adaptive=adaptive, multipart=multipart, part_ms=part_ms, target_task_s=2.0)
        == parts
    )


@pytest.mark.parametrize(
    ("extra", "bundled"),
    [
        (task("j", 1), True),
        (task("k", 1), False),
        (task("j", 1, module="other"), False),
        (task("j", 1, backup_of="x"), False),
        (task("j", 1, replicated=True), False),
        (task("j", 1, attempt=1), False),
    ],
    ids=["same-job", "other-job", "other-module", "backup", "replicated", "retried"],
)
def test_bundles_with(extra: TaskFields, bundled: bool) -> None:
    assert dispatch.bundles_with(task("j", 0), extra) is bundled


@pytest.mark.parametrize(
    ("free", "assigned", "want"),
    [(3, 0, 3), (5, 0, 3), (3, 2, 1), (3, 3, 0), (3, 5, 0), (0, 0, 0), (-1, 0, 0)],
    ids=["all-free", "capped-by-capacity", "some-held", "full", "over-full", "nothing-free", "negative"],
)
def test_want_after_ready(free: int, assigned: int, want: int) -> None:
    assert dispatch.want_after_ready(free=free, slots=2, prefetch=1, assigned=assigned) == want


def test_assignments_count_a_task_of_parts_once() -> None:
    held = holding(("1-0", 0, task(index=0)), ("1-1", 0, task(index=1)), ("1-2", 1, task(index=2)))
    assert dispatch.assignments(held) == 2
    assert dispatch.assignments({}) == 0


# ---------------------------------------------------------------- results and failures


@pytest.mark.parametrize(
    ("previous", "sample", "average"),
    [(None, 100.0, 100.0), (100.0, 200.0, 130.0), (100.0, 100.0, 100.0), (200.0, 0.0, 140.0)],
    ids=["first-sample", "slower", "steady", "faster"],
)
def test_ewma(previous: float | None, sample: float, average: float) -> None:
    assert dispatch.ewma(previous, sample) == pytest.approx(average)


@pytest.mark.parametrize(
    ("reported", "elapsed_s", "sample"),
    [(12.5, 3.0, 12.5), (0.0, 0.25, 250.0), (-1.0, 0.5, 500.0)],
    ids=["node-reported", "round-trip", "nonsense-report"],
)
def test_sample_ms(reported: float, elapsed_s: float, sample: float) -> None:
    assert dispatch.sample_ms(reported, elapsed_s) == pytest.approx(sample)


@pytest.mark.parametrize(
    ("fields", "backed_up", "drops"),
    [(task(), False, False), (task(), True, True), (task(backup_of="x"), False, True)],
    ids=["plain", "original-with-a-backup", "the-backup"],
)
def test_drops_copies(fields: TaskFields, backed_up: bool, drops: bool) -> None:
    assert dispatch.drops_copies(fields, backed_up=backed_up) is drops


# ---------------------------------------------------------------- taking tasks back

# slots 2: tasks (groups) 0 and 1 are running their first unreported part
THREE_TASKS = holding(
    ("a0", 0, task(index=0)),
    ("a1", 0, task(index=1)),
    ("b0", 1, task(index=2)),
    ("c0", 2, task(index=3)),
    ("c1", 2, task(index=4)),
)


@pytest.mark.parametrize(
    ("held", "count", "ids"),
    [
        (THREE_TASKS, 10, ["a1", "c0", "c1"]),
        (THREE_TASKS, 2, ["c0", "c1"]),
        (THREE_TASKS, 1, ["c1"]),
        (THREE_TASKS, 0, []),
        (holding(("a0", 0, task()), ("b0", 1, task(index=1))), 5, []),
        (holding(("a0", 0, task()), ("b0", 1, task(index=1)), ("c0", 2, task(index=2, replicated=True))), 5, []),
        (
            holding(("a0", 0, task()), ("b0", 1, task(index=1)), ("c0", 2, task(index=2)), ("d0", 3, task(index=3))),
            1,
            ["d0"],
        ),
    ],
    ids=[
        "all-waiting-parts",
        "latest-first",
        "one",
        "none-asked",
        "all-running",
        "a-replicated-copy-stays",
        "whole-later-tasks",
    ],
)
def test_to_give_back(held: dict[str, Held], count: int, ids: list[str]) -> None:
    assert dispatch.to_give_back(held, slots=2, count=count) == ids


def test_copies_to_drop_keep_the_winner_and_other_subtasks() -> None:
    held = holding(("w", 0, task("j", 1)), ("x", 1, task("j", 1)), ("y", 2, task("j", 2)), ("z", 3, task("k", 1)))
    assert dispatch.copies_to_drop(held, job_id="j", index=1, winner="w") == ["x"]
    assert dispatch.copies_to_drop(held, job_id="j", index=1, winner="other") == ["w", "x"]


def test_of_job() -> None:
    held = holding(("a", 0, task("j", 0)), ("b", 1, task("k", 0)), ("c", 1, task("j", 1)))
    assert dispatch.of_job(held, "j") == ["a", "c"]
    assert dispatch.of_job(held, "none") == []


def test_unknown_running() -> None:
    held = holding(("a", 0, task()))
    assert dispatch.unknown_running(held, ["a", "b", "c"]) == ["b", "c"]
    assert dispatch.unknown_running(held, []) == []


def test_remember_keeps_the_most_recent() -> None:
    given_back: dict[str, None] = {}
    for tid in ("a", "b", "c", "d"):
        dispatch.remember(given_back, tid, keep=3)
    assert list(given_back) == ["b", "c", "d"]


# ---------------------------------------------------------------- poisoned figures (issue 9.2)

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("previous", "sample", "average"),
    [
        (INF, 100.0, 100.0),
        (NAN, 100.0, 100.0),
        (-50.0, 100.0, 100.0),
        (100.0, INF, 100.0),
        (100.0, NAN, 100.0),
        (None, 1e300, MAX_TASK_MS),
        (1e300, 1e300, MAX_TASK_MS),
    ],
    ids=[
        "stored Infinity forgotten",
        "stored NaN forgotten",
        "stored negative forgotten",
        "Infinity sample ignored",
        "NaN sample ignored",
        "huge sample capped",
        "huge average capped",
    ],
)
def test_ewma_never_poisoned(previous: float | None, sample: float, average: float) -> None:
    """Issue 9.2: one `elapsed_ms` of Infinity made a node's average Infinity for ever (and
    every estimate scaled from it). The average stays finite and bounded."""
    got = dispatch.ewma(previous, sample)
    assert math.isfinite(got) and got == pytest.approx(average)


@pytest.mark.parametrize(
    ("reported", "elapsed_s", "sample"),
    [(INF, 0.5, 500.0), (NAN, 0.5, 500.0), (1e300, 0.5, MAX_TASK_MS), (0.0, 1e9, MAX_TASK_MS)],
    ids=["Infinity: the round trip", "NaN: the round trip", "huge: capped", "very long round trip: capped"],
)
def test_sample_ms_is_finite(reported: float, elapsed_s: float, sample: float) -> None:
    """Issue 9.2: the time a node reports is used only when it is a finite time."""
    assert dispatch.sample_ms(reported, elapsed_s) == pytest.approx(sample)


@pytest.mark.parametrize("part_ms", [INF, NAN, -1.0, 1e-300], ids=["Infinity", "NaN", "negative", "tiny"])
def test_parts_wanted_with_a_poisoned_part_time(part_ms: float) -> None:
    """Issue 9.2: `int(target / nan)` raised in the gateway's dispatch; a part time that is
    not a finite positive time means "not measured" (one part), a tiny one the most parts."""
    got = dispatch.parts_wanted(task(), adaptive=True, multipart=True, part_ms=part_ms, target_task_s=4.0)
    assert got == (MAX_PARTS if part_ms == 1e-300 else 1)


@pytest.mark.parametrize(
    ("fields", "peak_ms", "small_task_s", "parts"),
    [
        (task(), 0.1, 0.05, MAX_PARTS),
        (task(), 5.0, 0.05, 10),
        (task(), 80.0, 0.05, 1),
        (task(), None, 0.05, 1),
        (task(), 0.1, 0.0, 1),
        (task(backup_of="x"), 0.1, 0.05, 1),
        (task(replicated=True), 0.1, 0.05, 1),
    ],
    ids=["trivial-capped", "fits-the-small-target", "costly-one-part", "not-measured-yet", "off", "backup", "replica"],
)
def test_parts_wanted_for_other_kinds(
    fields: TaskFields, peak_ms: float | None, small_task_s: float, parts: int
) -> None:
    """Kinds other than hash and crack are bundled by the node's slowest recent part time."""
    got = dispatch.parts_wanted(
        fields,
        adaptive=False,
        multipart=True,
        part_ms=0.1,
        target_task_s=4.0,
        peak_ms=peak_ms,
        small_task_s=small_task_s,
    )
    assert got == parts


@pytest.mark.parametrize(
    ("previous", "sample", "peak"),
    [(None, 3.0, 3.0), (10.0, 3.0, 9.0), (10.0, 20.0, 20.0), (float("nan"), 3.0, 3.0), (10.0, float("inf"), 9.0)],
    ids=["first", "decays", "new-peak", "poisoned-previous", "non-finite-sample-ignored"],
)
def test_peak(previous: float | None, sample: float, peak: float) -> None:
    assert dispatch.peak(previous, sample) == pytest.approx(peak)
