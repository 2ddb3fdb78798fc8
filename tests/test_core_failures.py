"""Issue 9.1: failures are evidence about the node, not the task (`shared/core/failures.py`)."""

from __future__ import annotations

import pytest
from processdistro.shared.core.failures import (
    FAIL_QUORUM,
    FailureOutcome,
    Standing,
    Tally,
    judge_drops,
    judge_failure,
    standing,
)
from processdistro.shared.core.replication import PARKED_WAIT_S, ParkedFate, parked_fate


@pytest.mark.parametrize(
    ("failed_on", "live", "outcome"),
    [
        ({"a": "boom"}, {"a", "b"}, FailureOutcome.RETRY),
        ({"a": "boom"}, {"a"}, FailureOutcome.WAIT),
        ({"a": "boom"}, set(), FailureOutcome.WAIT),
        ({"a": "boom", "b": "boom"}, {"a", "b", "c"}, FailureOutcome.FAIL_JOB),
        ({"a": "boom", "b": "other"}, {"a", "b"}, FailureOutcome.FAIL_JOB),
        ({"b": "x"}, {"a", "b"}, FailureOutcome.RETRY),
    ],
    ids=[
        "one-node-another-live",
        "lone-node",
        "nobody-live",
        "two-distinct-nodes",
        "two-nodes-different-messages",
        "another-node-may-try",
    ],
)
def test_judge_failure(failed_on: dict[str, str], live: set[str], outcome: FailureOutcome) -> None:
    node = next(iter(failed_on))
    assert judge_failure(index=12, node=node, failed_on=failed_on, live=live).outcome is outcome


def test_quorum_is_two_distinct_nodes() -> None:
    assert FAIL_QUORUM == 2


def test_lone_failure_says_why_the_job_waits() -> None:
    decision = judge_failure(index=12, node="n1", failed_on={"n1": "ModuleTrapped: unreachable"}, live={"n1"})
    assert decision.text == (
        "subtask 12 failed on node n1: ModuleTrapped: unreachable; waiting for a second node to confirm"
    )


def test_failed_job_names_every_node_and_message() -> None:
    decision = judge_failure(index=3, node="b", failed_on={"a": "boom", "b": "bang"}, live={"a", "b"})
    assert decision.text == "subtask 3 failed on 2 distinct nodes (a: boom; b: bang)"


def test_long_messages_are_cut() -> None:
    decision = judge_failure(index=0, node="a", failed_on={"a": "x" * 10_000}, live=set())
    assert len(decision.text) < 400


@pytest.mark.parametrize(
    ("drops", "fails"),
    [
        ({}, False),
        ({"a": 1}, False),
        ({"a": 9}, False),
        ({"a": 1, "b": 1}, False),
        ({"a": 2, "b": 1}, False),
        ({"a": 2, "b": 2}, True),
        ({"a": 1, "b": 1, "c": 1}, True),
    ],
    ids=[
        "none",
        "one-drop",
        "one-node-often",
        "two-nodes-once",
        "two-nodes-three-drops",
        "two-nodes-four-drops",
        "three-nodes",
    ],
)
def test_judge_drops(drops: dict[str, int], fails: bool) -> None:
    reason = judge_drops(index=7, drops=drops)
    assert (reason is not None) is fails
    if reason:
        assert reason.startswith("subtask 7: the connection dropped") and "distinct nodes" in reason


@pytest.mark.parametrize(
    ("total", "on_job", "peers", "benches", "expected"),
    [
        (Tally(1, 0), Tally(1, 0), Tally(0, 10), 0, Standing.FINE),
        (Tally(2, 0), Tally(2, 0), Tally(0, 10), 0, Standing.FINE),
        (Tally(3, 0), Tally(3, 0), Tally(0, 10), 0, Standing.BENCH),
        (Tally(3, 0), Tally(3, 0), Tally(0, 10), 1, Standing.BAN),
        (Tally(3, 0), Tally(3, 0), Tally(0, 1), 0, Standing.FINE),
        (Tally(3, 3), Tally(3, 3), Tally(2, 2), 1, Standing.FINE),
        (Tally(4, 100), Tally(4, 100), Tally(0, 100), 1, Standing.FINE),
        (Tally(5, 0), Tally(5, 0), Tally(0, 0), 0, Standing.BENCH),
        (Tally(5, 0), Tally(5, 0), Tally(0, 0), 3, Standing.BENCH),
        (Tally(5, 0), Tally(5, 0), Tally(5, 0), 3, Standing.FINE),
        (Tally(40, 0), Tally(40, 0), Tally(1, 0), 0, Standing.FINE),
        (Tally(5, 20), Tally(1, 0), Tally(0, 0), 0, Standing.FINE),
        (Tally(4, 0), Tally(4, 0), Tally(0, 0), 0, Standing.FINE),
    ],
    ids=[
        "first-failure",
        "two-failures",
        "three-failures-peers-succeed",
        "goes-on-after-a-bench",
        "peers-have-too-few-samples",
        "fails-as-much-as-peers",
        "rare-failures-among-many-results",
        "alone-enough-samples",
        "alone-never-banned",
        "everyone-fails-a-bad-job",
        "a-peer-failed-too",
        "mostly-succeeds-overall",
        "alone-too-few-samples",
    ],
)
def test_standing(total: Tally, on_job: Tally, peers: Tally, benches: int, expected: Standing) -> None:
    assert standing(total=total, on_job=on_job, peers=peers, benches=benches) is expected


# ---------------------------------------------------------------- issue 9.5: parked copies


@pytest.mark.parametrize(
    ("live", "returned", "votes", "replicated", "waited_s", "fate"),
    [
        ({"a", "b", "z"}, {"a", "b"}, 2, True, 1.0, ParkedFate.KEEP),
        ({"a", "b", "z"}, {"a", "b"}, 2, True, PARKED_WAIT_S, ParkedFate.RESOLVE),
        ({"a", "z"}, {"a"}, 1, True, PARKED_WAIT_S, ParkedFate.DECIDE),
        ({"a", "b"}, {"a", "b"}, 2, True, 0.0, ParkedFate.RESOLVE),
        ({"a"}, set(), 0, False, 10 * PARKED_WAIT_S, ParkedFate.KEEP),
    ],
    ids=[
        "a-third-node-may-still-take-it",
        "a-third-node-never-took-the-dispute",
        "a-confirmer-never-took-it",
        "two-connected-nodes-disagree",
        "a-failed-task-waits-for-a-second-node",
    ],
)
def test_parked_copies_do_not_wait_for_ever(
    live: set[str], returned: set[str], votes: int, replicated: bool, waited_s: float, fate: ParkedFate
) -> None:
    got = parked_fate(
        job_live=True,
        merged=False,
        live=live,
        returned=returned,
        votes=votes,
        replicated=replicated,
        waited_s=waited_s,
    )
    assert got is fate
