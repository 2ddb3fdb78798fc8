"""Failures are evidence about the node, not the task: what a `task_failed` or a dropped
connection means, with no I/O.

- `judge_failure`: a node reported a subtask failing. The job fails only once
  `FAIL_QUORUM` distinct nodes have; while no other live node could try it, the job says so
  ("waiting for a second node to confirm") instead of failing.
- `judge_drops`: connections dropped while holding a subtask. A drop spends no attempt;
  only a subtask that took down several distinct nodes (a module that kills its node) fails
  its job.
- `standing`: does a node's failure rate stand out, against the other nodes on the same
  job or in absolute terms once it has enough samples? It is benched (no new tasks for a
  while), and banned if it goes on next to nodes that do the same work.

Why two nodes for a failure: one node can be hostile or broken (a phone out of memory, a
browser without a feature), so its word alone never fails a job; two distinct nodes failing
the same subtask is what a genuinely bad input looks like, the same bar as the wasm kind's
confirmation of a program that exits non-zero (`TaskPlugin.confirm`). More would make a
two-node cluster unable ever to fail a bad job.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import StrEnum

FAIL_QUORUM = 2  # distinct nodes that must report a subtask failing before its job fails
DROP_NODES = 3  # distinct nodes that dropped while holding one subtask: it fails its job
DROP_NODES_REPEATED = 2  # ... or this many, with DROP_TOTAL drops between them (two-node clusters)
DROP_TOTAL = 4
MESSAGE_SHOWN = 200  # characters of a node's failure message in a job's note or error

# standing: absolute (its tally over every job), once it has enough samples, for a node
# alone on a job (no peer to compare it with)
ABSOLUTE_MIN_FAILED = 5
ABSOLUTE_RATE = 0.5
# standing: against the other nodes on the same job
RELATIVE_MIN_FAILED = 3
RELATIVE_MIN_PEER_SAMPLES = 2
RELATIVE_MARGIN = 0.5  # the node's failure share exceeds its peers' by this much


class FailureOutcome(StrEnum):
    RETRY = "retry"  # another live node may try it: queue it again, never for this node
    WAIT = "wait"  # no other live node may try it: queue it again, and say the job waits for one
    FAIL_JOB = "fail_job"  # FAIL_QUORUM distinct nodes failed it: a bad input; the job fails


@dataclass(frozen=True)
class FailureDecision:
    outcome: FailureOutcome
    #: FAIL_JOB: the job's error; WAIT: the job's note (why it does not progress)
    text: str = ""


def _shown(message: str) -> str:
    return message.strip()[:MESSAGE_SHOWN] or "(no message)"


def judge_failure(*, index: int, node: str, failed_on: Mapping[str, str], live: Set[str]) -> FailureDecision:
    """Node `node` reported subtask `index` failing. `failed_on` is node -> its message for
    every node that did (this one included), `live` the live node ids."""
    if len(failed_on) >= FAIL_QUORUM:
        nodes = "; ".join(f"{n}: {_shown(m)}" for n, m in sorted(failed_on.items()))
        return FailureDecision(
            FailureOutcome.FAIL_JOB, f"subtask {index} failed on {len(failed_on)} distinct nodes ({nodes})"
        )
    if set(live) - set(failed_on):
        return FailureDecision(FailureOutcome.RETRY)
    message = _shown(failed_on.get(node, ""))
    note = f"subtask {index} failed on node {node}: {message}; waiting for a second node to confirm"
    return FailureDecision(FailureOutcome.WAIT, note)


def judge_drops(*, index: int, drops: Mapping[str, int]) -> str | None:
    """Connections dropped while holding subtask `index` (`drops`: node -> how often). The
    job's error once the subtask has taken down enough distinct nodes, else None: a drop
    alone is a flaky phone and spends nothing."""
    total = sum(drops.values())
    if len(drops) >= DROP_NODES or (len(drops) >= DROP_NODES_REPEATED and total >= DROP_TOTAL):
        nodes = ", ".join(sorted(drops))
        return (
            f"subtask {index}: the connection dropped {total} times while running it, on {len(drops)} "
            f"distinct nodes ({nodes}); the task seems to bring its node down"
        )
    return None


# ---------------------------------------------------------------- standing of a node


@dataclass(frozen=True)
class Tally:
    """Tasks a node (or a set of nodes) failed and returned a result for."""

    failed: int = 0
    ok: int = 0

    @property
    def samples(self) -> int:
        return self.failed + self.ok

    @property
    def rate(self) -> float:
        return self.failed / self.samples if self.samples else 0.0


class Standing(StrEnum):
    FINE = "fine"
    BENCH = "bench"  # no new tasks for a while
    BAN = "ban"  # it went on failing after its bench, where its peers did not


def stands_out_absolute(total: Tally, peers: Tally) -> bool:
    """Alone on the job (no other node has returned or failed any of its tasks), and
    failing most of what it is given. With peers, only the comparison counts: nodes
    failing alike are looking at a bad job, which fails once two of them agree."""
    return peers.samples == 0 and total.failed >= ABSOLUTE_MIN_FAILED and total.rate >= ABSOLUTE_RATE


def stands_out_relative(on_job: Tally, peers: Tally) -> bool:
    """Against the other nodes on the same job: they did the same work and fared better."""
    return (
        on_job.failed >= RELATIVE_MIN_FAILED
        and peers.samples >= RELATIVE_MIN_PEER_SAMPLES
        and on_job.rate - peers.rate >= RELATIVE_MARGIN
    )


def standing(*, total: Tally, on_job: Tally, peers: Tally, benches: int) -> Standing:
    """A node just failed a task: `total` is its tally over every job, `on_job` on this job,
    `peers` the other nodes' on this job, `benches` how often it was benched before.

    A node alone may simply have been given a bad job: that only benches it (the job says
    it waits for a second node). A node failing as much as its peers is not benched at
    all. A ban needs the comparison: peers doing the same job succeed, and it went on
    failing after a bench."""
    relative = stands_out_relative(on_job, peers)
    if relative and benches >= 1:
        return Standing.BAN
    if relative or stands_out_absolute(total, peers):
        return Standing.BENCH
    return Standing.FINE
