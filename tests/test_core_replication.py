"""Replication decisions, table-tested without Redis or processes: which subtasks are
replicated, what a vote leads to, `decide`, and when a node is banned."""

from __future__ import annotations

import pytest
from processdistro.shared.core.replication import (
    CONTROLLER,
    MAX_VOTES,
    UNKNOWN_NODE,
    Ballot,
    DecideOutcome,
    ParkedFate,
    Penalty,
    VoteDecision,
    VoteOutcome,
    confirmers,
    decide,
    judge_vote,
    outvoted_by,
    parked_fate,
    penalty,
    said_ready,
    sampled,
)

# ---------------------------------------------------------------- sampled


def test_sampled_is_stable() -> None:
    first = [sampled("job-a", i, 1000, 0.3) for i in range(1000)]
    again = [sampled("job-a", i, 1000, 0.3) for i in range(1000)]
    assert first == again


def test_sampled_depends_on_the_job() -> None:
    a = [sampled("job-a", i, 1000, 0.5) for i in range(900)]
    b = [sampled("job-b", i, 1000, 0.5) for i in range(900)]
    assert a != b


@pytest.mark.parametrize("share", [0.1, 0.5, 0.99], ids=lambda s: f"share={s}")
def test_sampled_never_in_the_last_tenth_below_share_one(share: float) -> None:
    assert not any(sampled("job-a", i, 1000, share) for i in range(900, 1000))


@pytest.mark.parametrize("share", [0.1, 0.5, 0.99], ids=lambda s: f"share={s}")
def test_sampled_takes_about_its_share_before_the_tail(share: float) -> None:
    hits = sum(sampled("job-a", i, 10_000, share) for i in range(9000))
    assert abs(hits / 9000 - share) < 0.03


@pytest.mark.parametrize("share", [0.0, -0.5], ids=["zero", "negative"])
def test_sampled_share_zero_never(share: float) -> None:
    assert not any(sampled("job-a", i, 100, share) for i in range(100))


def test_sampled_share_one_always_including_the_tail() -> None:
    assert all(sampled("job-a", i, 100, 1.0) for i in range(100))


# ---------------------------------------------------------------- votes

A, B, C = "a" * 64, "b" * 64, "c" * 64  # digests

VOTE_CASES = [
    # (id, ballot, digest, votes, live, decided, expected)
    (
        "two agree: merge, nobody outvoted",
        Ballot(fresh=True, count=2, same=2),
        A,
        {"n1": A, "n2": A},
        {"n1", "n2", "n3"},
        False,
        VoteDecision(VoteOutcome.MERGE),
    ),
    (
        "two agree after a mismatch: merge, the odd one out is rejected",
        Ballot(fresh=True, count=3, same=2),
        A,
        {"n1": A, "liar": B, "n3": A},
        {"n1", "liar", "n3"},
        False,
        VoteDecision(VoteOutcome.MERGE, dissenters=("liar",)),
    ),
    (
        "agreement beats the vote cap",
        Ballot(fresh=True, count=MAX_VOTES, same=2),
        A,
        {"n1": A, "x": B, "y": C, "z": "d" * 64, "n5": A},
        set(),
        False,
        VoteDecision(VoteOutcome.MERGE, dissenters=("x", "y", "z")),
    ),
    (
        "agreement even when decided",
        Ballot(fresh=True, count=2, same=2),
        A,
        {"n1": A, "n2": A},
        set(),
        True,
        VoteDecision(VoteOutcome.MERGE),
    ),
    (
        "first result, another live node could confirm: wait",
        Ballot(fresh=True, count=1, same=1),
        A,
        {"n1": A},
        {"n1", "n2"},
        False,
        VoteDecision(VoteOutcome.AWAIT),
    ),
    (
        "first result, only its own node is live: accept unconfirmed",
        Ballot(fresh=True, count=1, same=1),
        A,
        {"n1": A},
        {"n1"},
        False,
        VoteDecision(VoteOutcome.ACCEPT_UNCONFIRMED),
    ),
    (
        "first result, no node live at all: accept unconfirmed",
        Ballot(fresh=True, count=1, same=1),
        A,
        {"n1": A},
        set(),
        False,
        VoteDecision(VoteOutcome.ACCEPT_UNCONFIRMED),
    ),
    (
        "first result, a gateway decided already: accept unconfirmed",
        Ballot(fresh=True, count=1, same=1),
        A,
        {"n1": A},
        {"n1", "n2"},
        True,
        VoteDecision(VoteOutcome.ACCEPT_UNCONFIRMED),
    ),
    (
        "the same node again, others live: one more copy, and wait",
        Ballot(fresh=False, count=1, same=1),
        A,
        {"n1": A},
        {"n1", "n2"},
        False,
        VoteDecision(VoteOutcome.AWAIT, resend=True),
    ),
    (
        "the same node again, alone: one more copy, and accept unconfirmed",
        Ballot(fresh=False, count=1, same=1),
        A,
        {"n1": A},
        {"n1"},
        False,
        VoteDecision(VoteOutcome.ACCEPT_UNCONFIRMED, resend=True),
    ),
    (
        "two differ: ask one more node",
        Ballot(fresh=True, count=2, same=1),
        A,
        {"n1": B, "n2": A},
        {"n1", "n2", "n3"},
        False,
        VoteDecision(VoteOutcome.QUORUM),
    ),
    (
        "two differ and nobody else is live: still a quorum copy",
        Ballot(fresh=True, count=2, same=1),
        A,
        {"n1": B, "n2": A},
        set(),
        True,
        VoteDecision(VoteOutcome.QUORUM),
    ),
    (
        "one short of the cap, all distinct: ask one more node",
        Ballot(fresh=True, count=MAX_VOTES - 1, same=1),
        A,
        {"n1": A, "n2": B, "n3": C, "n4": "d" * 64},
        {"n5"},
        False,
        VoteDecision(VoteOutcome.QUORUM),
    ),
    (
        "the cap of distinct results: fail the job",
        Ballot(fresh=True, count=MAX_VOTES, same=1),
        A,
        {"n1": A, "n2": B, "n3": C, "n4": "d" * 64, "n5": "e" * 64},
        {"n6"},
        False,
        VoteDecision(
            VoteOutcome.FAIL_JOB,
            reason=f"subtask 7: {MAX_VOTES} nodes returned {MAX_VOTES} different results; no two agree",
        ),
    ),
]


@pytest.mark.parametrize(
    ("ballot", "digest", "votes", "live", "decided", "expected"),
    [case[1:] for case in VOTE_CASES],
    ids=[case[0] for case in VOTE_CASES],
)
def test_judge_vote(
    ballot: Ballot,
    digest: str,
    votes: dict[str, str],
    live: set[str],
    decided: bool,
    expected: VoteDecision,
) -> None:
    assert judge_vote(ballot, index=7, digest=digest, votes=votes, live=live, decided=decided) == expected


def test_judge_vote_honours_a_lower_cap() -> None:
    decision = judge_vote(
        Ballot(fresh=True, count=3, same=1),
        index=2,
        digest=A,
        votes={"x": A, "y": B, "z": C},
        live=set(),
        decided=False,
        max_votes=3,
    )
    assert decision.outcome is VoteOutcome.FAIL_JOB
    assert decision.reason == "subtask 2: 3 nodes returned 3 different results; no two agree"


@pytest.mark.parametrize(
    ("count", "first"), [(1, True), (2, False), (MAX_VOTES, False)], ids=["one vote", "two votes", "the cap"]
)
def test_only_the_only_vote_is_first(count: int, first: bool) -> None:
    assert Ballot(fresh=True, count=count, same=1).first is first


@pytest.mark.parametrize(
    ("live", "voters", "expected"),
    [
        ({"n1", "n2"}, {"n1"}, {"n2"}),
        ({"n1"}, {"n1"}, set()),
        (set(), {"n1"}, set()),
        ({"n1", "n2", "n3"}, {"n1", "gone"}, {"n2", "n3"}),
    ],
    ids=["one other", "only the voter", "nobody live", "a voter that left"],
)
def test_confirmers_are_live_nodes_that_have_not_voted(live: set[str], voters: set[str], expected: set[str]) -> None:
    assert confirmers(live, voters) == expected


# ---------------------------------------------------------------- decide and bans


@pytest.mark.parametrize(
    ("first_vote_in", "expected"),
    [(True, DecideOutcome.ACCEPT_FIRST), (False, DecideOutcome.REMEMBER)],
    ids=["result in: accept it", "result not in yet: remember"],
)
def test_decide(first_vote_in: bool, expected: DecideOutcome) -> None:
    assert decide(first_vote_in) is expected


@pytest.mark.parametrize(
    ("node", "rejected", "ban_after", "expected"),
    [
        ("n1", 1, 3, Penalty.COUNTED),
        ("n1", 2, 3, Penalty.COUNTED),
        ("n1", 3, 3, Penalty.BAN),
        ("n1", 4, 3, Penalty.BAN),  # a ban racing another: the store bans once
        ("n1", 1, 1, Penalty.BAN),
        (UNKNOWN_NODE, 10, 3, Penalty.COUNTED),
    ],
    ids=["first", "one short", "at the limit", "past the limit", "limit one", "unnamed node"],
)
def test_penalty(node: str, rejected: int, ban_after: int, expected: Penalty) -> None:
    assert penalty(node, rejected, ban_after) is expected


# ---------------------------------------------------------------- parked copies


@pytest.mark.parametrize(
    ("job_live", "merged", "live", "returned", "votes", "fate"),
    [
        (False, False, {"a", "b"}, set(), 0, ParkedFate.DROP),
        (True, True, {"a", "b"}, {"a"}, 1, ParkedFate.DROP),
        (True, False, {"a", "b"}, {"a"}, 1, ParkedFate.KEEP),
        (True, False, {"a", "b"}, {"a"}, 2, ParkedFate.KEEP),
        (True, False, {"a"}, {"a"}, 1, ParkedFate.RELEASE),
        (True, False, set(), {"a"}, 0, ParkedFate.RELEASE),
        (True, False, {"a", "b"}, {"a", "b"}, 2, ParkedFate.RESOLVE),
        (True, False, {"b"}, {"a", "b"}, 3, ParkedFate.RESOLVE),
    ],
    ids=[
        "job-over",
        "index-merged",
        "another-node-may-run-it",
        "a-tie-another-node-may-break",
        "one-result-nobody-else",
        "no-node-at-all",
        "a-tie-and-everyone-has-voted",
        "a-tie-and-the-others-gone",
    ],
)
def test_parked_fate(
    job_live: bool, merged: bool, live: set[str], returned: set[str], votes: int, fate: ParkedFate
) -> None:
    assert parked_fate(job_live=job_live, merged=merged, live=live, returned=returned, votes=votes) is fate


def test_the_controller_outvotes_whoever_differs_from_its_own_result() -> None:
    assert outvoted_by("t", {"a": "t", "b": "x", "c": "y"}) == ["b", "c"]
    assert outvoted_by("t", {"a": "t"}) == []


def test_the_controller_is_never_banned() -> None:
    assert penalty(CONTROLLER, 99, 3) is Penalty.COUNTED


@pytest.mark.parametrize(
    ("ready", "connection", "expected"),
    [
        (b"c1", b"c1", True),  # its current connection asked for work
        (None, b"c1", False),  # connected, never asked (a monitor, a stuck agent, bench/simnodes.py)
        (b"c0", b"c1", False),  # asked on an earlier connection; this one has not yet
        (b"", b"", False),  # nothing recorded
        ("c1", "c1", True),  # read as text
    ],
    ids=["ready", "never said ready", "an old connection's ready", "empty", "text"],
)
def test_only_nodes_that_said_ready_take_work_and_vote(
    ready: bytes | str | None, connection: bytes | str | None, expected: bool
) -> None:
    assert said_ready(ready, connection) is expected
