"""What a node may be given: the gateway's dispatch decisions, with no I/O.

A gateway session reads what it needs through `shared/store/gateway.py`, asks these
functions, and carries the answer out (send, drop, park, decide, requeue). Everything here
takes plain values; what one connection holds is a mapping task entry id -> `Held`, in the
order the entries were sent.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from enum import StrEnum

from ..capacity import MAX_TASK_MS, finite, parts_per_task
from ..modules import Module
from ..queue import TaskFields

EWMA_ALPHA = 0.3  # weight of the newest task time in a node's average
GIVEN_BACK_KEPT = 4096  # task ids taken back from a node that it may still answer


@dataclass(slots=True)
class Held:
    """A task entry a connection holds: sent at `sent` (monotonic) as part of assignment `group`."""

    fields: TaskFields
    sent: float
    group: int


class Verdict(StrEnum):
    """What to do with a task entry read for a node."""

    SEND = "send"  # give it to the node
    DROP = "drop"  # remove it from the stream: its job is over, or it is not needed any more
    PARK = "park"  # a backup copy read by its own straggler's node: parked for another node
    REPLICA = "replica"  # a replicated copy: the replica rule decides


class Replica(StrEnum):
    """The replica rule's outcome for a copy of a replicated subtask."""

    RUN = "run"  # this node may run it
    PARK = "park"  # another live node may: keep it parked for that node
    DECIDE = "decide"  # nobody else could confirm: tell the aggregator to accept the one result


# ---------------------------------------------------------------- who votes

ADDRESS_VOTER = "@"  # a voter key naming an address (node ids never contain "@")


def voter_key(node_id: str, address: str, *, by_address: bool, trusted: Collection[str]) -> str:
    """Who a node is for the replica rule and the votes: its network address
    (`"@" + address`), so that the identities one machine makes up count once and cannot
    agree with each other, or the node itself where an address does not tell machines apart
    (the setting off, the address unknown, or a trusted one such as loopback, where
    `up --workers` runs the operator's own workers)."""
    if by_address and address and address != "unknown" and address not in trusted:
        return ADDRESS_VOTER + address
    return node_id


def address_bannable(address: str, *, ban_address_s: float, trusted: Collection[str]) -> bool:
    """Does a ban of a node from `address` also refuse new joins from that address (a banned
    node that comes back under a fresh device id)? Not for trusted or unknown addresses."""
    return ban_address_s > 0 and bool(address) and address != "unknown" and address not in trusted


# ---------------------------------------------------------------- is a task usable here


def needs_index_done(fields: TaskFields, node_id: str) -> bool:
    """Does `screen` need to know whether the task's index is merged already?"""
    return fields.replicated or bool(fields.backup_of and fields.backup_of != node_id)


def screen(fields: TaskFields, *, node_id: str, job_over: bool, index_done: bool) -> Verdict:
    """Drop what must not run here: its job is over (finalizing too: a search that found
    its answer), a backup copy whose original is in, a replicated subtask already merged.
    A backup copy read for the very node it backs up is parked for another node: dropped,
    it was lost (its marker stops a second backup), and the job waited for the straggler.
    `index_done` (is the index merged?) is only read where `needs_index_done` says so."""
    if job_over:
        return Verdict.DROP
    if fields.backup_of == node_id:
        return Verdict.PARK
    if fields.backup_of and index_done:
        return Verdict.DROP
    if fields.replicated:
        return Verdict.DROP if index_done else Verdict.REPLICA
    return Verdict.SEND


def holds(held: Mapping[str, Held], job_id: str, index: int) -> bool:
    """Does the connection hold a copy of subtask (job, index)?"""
    return any(h.fields.job == job_id and h.fields.index == index for h in held.values())


def may_take_replica(*, holds: bool, returned_here: bool) -> bool:
    """A copy of a replicated subtask goes only to a node that neither holds a copy nor
    returned one (`keys.job_returned`, written as the result leaves the gateway)."""
    return not holds and not returned_here


def replica_fallback(*, node_id: str, returned: Iterable[str], votes: int, live: Iterable[str]) -> Replica:
    """A copy this node may not run: park it while another live node could, or while two
    votes tie (the quorum copy needs a third node); with at most one vote and nobody else,
    accept that result (`decide`). A rejected result leaves its node returned, not a voter."""
    others = set(live) - set(returned) - {node_id}
    if others or votes >= 2:
        return Replica.PARK
    return Replica.DECIDE


def replica_rule(*, node_id: str, holds: bool, returned: Iterable[str], votes: int, live: Iterable[str]) -> Replica:
    """The whole rule for a copy of a replicated subtask read for `node_id`."""
    returned = set(returned)
    if may_take_replica(holds=holds, returned_here=node_id in returned):
        return Replica.RUN
    return replica_fallback(node_id=node_id, returned=returned, votes=votes, live=live)


# ---------------------------------------------------------------- what to send


def pick_module(by_sha: Mapping[str, Module], by_name: Mapping[str, Module], sha: str, *, simd: bool) -> Module | None:
    """The module a task runs; a node with SIMD128 gets the SIMD build where there is one
    (same bytes out). None: a module this gateway does not know."""
    module = by_sha.get(sha)
    if module is not None and simd:
        module = by_name.get(f"{module.name}_simd", module)
    return module


def parts_wanted(
    fields: TaskFields,
    *,
    adaptive: bool,
    multipart: bool,
    part_ms: float | None,
    target_task_s: float,
    peak_ms: float | None = None,
    small_task_s: float = 0.0,
) -> int:
    """How many parts one task of `fields` should have on this node (one that speaks
    protocol 2): as many as fit `target_task_s` for an adaptive kind; for any other kind
    (whose parts may differ a lot in cost, like Mandelbrot tiles) as many as fit
    `small_task_s` at the node's slowest recent part time (`peak_ms`), so trivial subtasks
    travel many to a frame while a task stays short whatever lands in it. One for a backup
    or replicated copy (each is one particular subtask)."""
    if not multipart or fields.backup_of or fields.replicated:
        return 1
    if adaptive:
        return parts_per_task(part_ms, target_task_s)
    return parts_per_task(peak_ms, small_task_s) if small_task_s > 0 else 1


PEAK_DECAY = 0.9  # how fast a node's slowest recent part time forgets an old slow part


def peak(previous: float | None, sample: float, decay: float = PEAK_DECAY) -> float:
    """A node's slowest recent part time: the new sample, or the previous peak decayed."""
    new = finite(sample, MAX_TASK_MS) or 0.0
    old = finite(previous, MAX_TASK_MS)
    return new if old is None else max(new, decay * old)


def bundles_with(first: TaskFields, extra: TaskFields) -> bool:
    """May entry `extra`, read after `first`, be a further part of the same task? Not a
    retried copy (`attempt` > 0): it goes through the failure screen on its own."""
    return (
        extra.job == first.job
        and extra.module == first.module
        and not (extra.backup_of or extra.replicated or extra.attempt)
    )


def assignments(held: Mapping[str, Held]) -> int:
    """Tasks a connection holds, a task of several parts counting once (as in `ready.free`)."""
    return len({h.group for h in held.values()})


def want_after_ready(*, free: int, slots: int, prefetch: int, assigned: int) -> int:
    """How many tasks to send after a `ready` frame: what the node says is free, never more
    than its slots and prefetch leave beside what it holds."""
    return max(0, min(free, slots + prefetch - assigned))


# ---------------------------------------------------------------- results and failures


def ewma(previous: float | None, sample: float, alpha: float = EWMA_ALPHA) -> float:
    """A node's observed task time per kind: an exponentially weighted average, in
    [0, `MAX_TASK_MS`]. A previous average that is not a finite time (one stored before
    reports were validated) is forgotten, so it cannot poison every later one."""
    new = finite(sample, MAX_TASK_MS)
    old = finite(previous, MAX_TASK_MS)
    if new is None:
        return old if old is not None else 0.0
    return new if old is None else alpha * new + (1 - alpha) * old


def sample_ms(reported_ms: float, elapsed_s: float) -> float:
    """A part's own run time as the node reports it, else the round trip; in [0, `MAX_TASK_MS`]."""
    reported = finite(reported_ms, MAX_TASK_MS)
    if reported:
        return reported
    return finite(elapsed_s * 1000, MAX_TASK_MS) or 0.0


def drops_copies(fields: TaskFields, *, backed_up: bool) -> bool:
    """A result of a task with a backup copy (or of the backup itself): the others stop."""
    return bool(fields.backup_of) or backed_up


# ---------------------------------------------------------------- taking tasks back


def to_give_back(held: Mapping[str, Held], *, slots: int, count: int) -> list[str]:
    """Up to `count` held entries the node has not started, latest first taken: it runs its
    tasks in the order sent, `slots` at a time, and a task's parts one after the other, so
    all but the first unreported part of its first `slots` tasks and everything of later
    tasks is still waiting. A replicated copy is never taken: it may be meant for this very
    node (the others ran the first one)."""
    groups: dict[int, list[str]] = {}
    for tid, h in held.items():
        groups.setdefault(h.group, []).append(tid)
    waiting: list[str] = []
    for n, group in enumerate(sorted(groups)):
        ids = groups[group]
        waiting += ids if n >= slots else ids[1:]
    waiting = [tid for tid in waiting if not held[tid].fields.replicated]
    return waiting[-count:] if count > 0 else []


def copies_to_drop(held: Mapping[str, Held], *, job_id: str, index: int, winner: str) -> list[str]:
    """Held copies of (job, index) other than `winner`, whose result came first."""
    return [tid for tid, h in held.items() if h.fields.job == job_id and h.fields.index == index and tid != winner]


def of_job(held: Mapping[str, Held], job_id: str) -> list[str]:
    """Held entries of a job that is over."""
    return [tid for tid, h in held.items() if h.fields.job == job_id]


def unknown_running(held: Mapping[str, Held], running: Iterable[str]) -> list[str]:
    """Tasks a reconnecting node says it runs that this connection does not hold: requeued
    when the old connection closed, so their results would be duplicates."""
    return [t for t in running if t not in held]


def remember(given_back: MutableMapping[str, None], task_id: str, keep: int = GIVEN_BACK_KEPT) -> None:
    """Note a task taken back from the node (its late answer is ignored, not refused),
    keeping the `keep` most recent."""
    given_back[task_id] = None
    while len(given_back) > keep:
        del given_back[next(iter(given_back))]
