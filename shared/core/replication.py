"""Replication decisions: which subtasks run on two distinct nodes, and what the aggregator
does with each result of one.

- `sampled`: is a subtask replicated (the scheduler queues two copies)?
- `judge_vote`: a checked result's vote is in (VOTE_LUA); merge it, wait for a
  confirmation, ask one more node, accept it unconfirmed, or fail the job.
- `decide`: a gateway found no other node to confirm; accept the one result, or remember
  the decision until that result comes.
- `penalty`: a node's result was rejected; is that the one that bans it?

No I/O: the aggregator reads what these need through `store.results.ResultStream` and
carries out what they return.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import StrEnum

REPLICA_FREE_TAIL = 0.1  # the share of a job's last subtasks never replicated (unless --replicate 1)
MAX_VOTES = 5  # distinct results for one replicated subtask before its job fails
UNKNOWN_NODE = "?"  # a result entry that names no node: counted, never banned
CONTROLLER = "controller"  # the controller itself, when it computes a disputed subtask


def sampled(job_id: str, index: int, total: int, share: float) -> bool:
    """Is subtask `index` one of the job's replicated share? Stable across restarts. Below
    a share of 1 the last tenth of a job is left out: a confirmation that only a slow node
    can give would hold up the job's end."""
    if share <= 0 or (share < 1 and index >= total * (1 - REPLICA_FREE_TAIL)):
        return False
    digest = hashlib.sha256(f"{job_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


# ---------------------------------------------------------------- votes


@dataclass(frozen=True)
class Ballot:
    """What VOTE_LUA answered for one node's vote on a replicated subtask."""

    #: the node had not voted on this subtask before
    fresh: bool
    #: votes recorded, this one included (one per node)
    count: int
    #: votes equal to this one, this one included
    same: int

    @property
    def first(self) -> bool:
        """The only result so far. The store remembers it (`keys.job_first_vote`) before
        it reads anything else, so a `decide` arriving meanwhile finds it."""
        return self.count == 1


class VoteOutcome(StrEnum):
    MERGE = "merge"  # two nodes agree: merge this result; reject the dissenters
    AWAIT = "await"  # the first result: drop the entry, wait for another node's
    ACCEPT_UNCONFIRMED = "accept_unconfirmed"  # the first result and nobody to confirm it: merge
    QUORUM = "quorum"  # results differ: requeue a copy, one more node breaks the tie
    FAIL_JOB = "fail_job"  # MAX_VOTES distinct results, no two agree: the job fails


@dataclass(frozen=True)
class VoteDecision:
    outcome: VoteOutcome
    #: MERGE: the nodes whose vote differs from the agreed one, each counted as rejected
    dissenters: tuple[str, ...] = ()
    #: the same node voted again (its own copy came back to it): queue one more copy, so
    #: that another node can confirm
    resend: bool = False
    #: FAIL_JOB: why, for the job's error
    reason: str = ""


def said_ready(ready: bytes | str | None, connection: bytes | str | None) -> bool:
    """Does a live node take work, and so count as a voter (who could confirm a replicated
    subtask) and as a taker for stealing and backups? Only once its current connection has
    said `ready`, or resumed running tasks in its `hello` after a reconnect (the gateway
    records that connection as `ready` in the node's record): a node that is connected but
    never asks for work (a monitor, a stuck agent, the simulated nodes of bench/simnodes.py)
    would otherwise be waited for, `PARKED_WAIT_S` per replicated copy, and be given stolen
    work and backups it never takes. A reconnect must say it again."""
    return bool(ready) and ready == connection


def confirmers(live: Set[str], voters: Set[str]) -> set[str]:
    """Live nodes that have not returned a result for the subtask: who could confirm."""
    return set(live) - set(voters)


def judge_vote(
    ballot: Ballot,
    *,
    index: int,
    digest: str,
    votes: Mapping[str, str],
    live: Set[str],
    decided: bool,
    max_votes: int = MAX_VOTES,
) -> VoteDecision:
    """What to do with a checked result of replicated subtask `index` whose vote (sha256
    `digest`) is in. `votes` is node -> digest as read after the vote (this one included),
    `live` the live node ids, `decided` whether a gateway already decided to accept the
    one result (`keys.job_decided`)."""
    if ballot.same >= 2:
        dissenters = tuple(node for node, d in votes.items() if d != digest)
        return VoteDecision(VoteOutcome.MERGE, dissenters=dissenters)
    if ballot.first:
        resend = not ballot.fresh
        if decided or not confirmers(live, set(votes)):
            # nobody else to ask: the cheap check passed, and that is what we have
            return VoteDecision(VoteOutcome.ACCEPT_UNCONFIRMED, resend=resend)
        return VoteDecision(VoteOutcome.AWAIT, resend=resend)
    if ballot.count >= max_votes:
        reason = f"subtask {index}: {ballot.count} nodes returned {ballot.count} different results; no two agree"
        return VoteDecision(VoteOutcome.FAIL_JOB, reason=reason)
    return VoteDecision(VoteOutcome.QUORUM)


# ---------------------------------------------------------------- decide


class DecideOutcome(StrEnum):
    ACCEPT_FIRST = "accept_first"  # the one checked result is in: merge it, unconfirmed
    REMEMBER = "remember"  # not in yet: mark the subtask decided; the result decides when it comes


def decide(first_vote_in: bool) -> DecideOutcome:
    """A gateway found no other node for a replicated subtask's copy. Accept the one result
    in, if there is one; if not, it decides when it comes (its node may still be live and
    so count as a confirmer then)."""
    return DecideOutcome.ACCEPT_FIRST if first_vote_in else DecideOutcome.REMEMBER


# ---------------------------------------------------------------- reputation


class Penalty(StrEnum):
    COUNTED = "counted"  # one more rejected result on the node's record
    BAN = "ban"  # the node is banned; what it merged into running jobs is redone


def penalty(node: str, rejected: int, ban_after: int) -> Penalty:
    """A node's result was rejected (failed a check, or outvoted); `rejected` is its count
    with this one. A node rejected `ban_after` times is banned; an unnamed one never is."""
    if rejected >= ban_after and node not in (UNKNOWN_NODE, CONTROLLER):
        return Penalty.BAN
    return Penalty.COUNTED


class ParkedFate(StrEnum):
    """What the reaper does with a parked copy of a replicated subtask."""

    DROP = "drop"  # its job is over or its index merged: nobody needs it
    KEEP = "keep"  # a live node that has not run it may still take it
    RELEASE = "release"  # no live node may run it and at most one result is in: back to the
    # stream, where a node that cannot run it tells the aggregator to accept that result
    RESOLVE = "resolve"  # no live node may run it and the results disagree: the controller
    # computes the subtask itself, so a dispute never waits for a node that may never come
    DECIDE = "decide"  # it waited PARKED_WAIT_S for a live node that never took it, and at
    # most one result is in: the aggregator accepts that result (or the next) unconfirmed


PARKED_WAIT_S = 20.0  # a replicated copy parked this long for live nodes that do not take it


def parked_fate(
    *,
    job_live: bool,
    merged: bool,
    live: Set[str],
    returned: Set[str],
    votes: int,
    replicated: bool = True,
    waited_s: float = 0.0,
) -> ParkedFate:
    """The fate of a parked copy, from what Redis says about its subtask; `waited_s` is how
    long it has been parked. A replicated copy does not wait for ever for a live node that
    never takes it (busy for good, or hostile: connected and never asking for work): after
    `PARKED_WAIT_S` a dispute goes to the controller and a lone result is accepted. Other
    copies (a backup, a task that failed on the only node) wait for their node."""
    if not job_live or merged:
        return ParkedFate.DROP
    if live - returned and not (replicated and waited_s >= PARKED_WAIT_S):
        return ParkedFate.KEEP
    if live - returned:
        return ParkedFate.DECIDE if votes < 2 else ParkedFate.RESOLVE
    return ParkedFate.RELEASE if votes < 2 else ParkedFate.RESOLVE


def outvoted_by(truth: str, votes: Mapping[str, str]) -> list[str]:
    """The nodes whose vote (the sha256 of their result) differs from the controller's own."""
    return sorted(node for node, digest in votes.items() if digest != truth)
