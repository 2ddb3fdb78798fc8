"""A token bucket, as a pure decision: may one more event through now?

Used for the agents' log frames (`gateway/agent_log.py`): a node may send a burst of
`burst` events, then one every `1 / rate` seconds; what is over that is dropped and counted,
and the count is reported with the next event let through ("N events from node X dropped"),
so the operator's log says that something was cut without printing each line.

The bucket is a plain value (tokens, when it was last filled, drops not yet reported); the
caller keeps it between calls and passes the clock in (`now`, any monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class Admit(StrEnum):
    PASS = "pass"  # let it through (and report `dropped` events cut before it, if any)
    DROP = "drop"  # over the rate: count it, say nothing now


@dataclass(frozen=True)
class Bucket:
    tokens: float  #: events that may pass now (at most `burst`)
    stamp: float  #: `now` when `tokens` was computed
    dropped: int = 0  #: events dropped since the last one that passed


@dataclass(frozen=True)
class Decision:
    admit: Admit
    bucket: Bucket  #: the bucket to keep for the next event
    dropped: int = 0  #: on PASS: events dropped before this one (0: nothing to report)


def full(now: float, burst: float) -> Bucket:
    """A node's first bucket: the whole burst available."""
    return Bucket(tokens=burst, stamp=now)


def refill(bucket: Bucket, *, now: float, rate: float, burst: float) -> Bucket:
    """`bucket` as it stands at `now`: `rate` tokens per second added since its stamp, at most
    `burst`. A clock that went backwards adds nothing (and does not move the stamp back)."""
    elapsed = max(0.0, now - bucket.stamp)
    return replace(bucket, tokens=min(burst, bucket.tokens + elapsed * rate), stamp=max(now, bucket.stamp))


def take(bucket: Bucket | None, *, now: float, rate: float, burst: float) -> Decision:
    """One event at `now`: PASS (one token spent, the drops before it handed over for the
    summary line and reset) or DROP (counted in the bucket)."""
    current = refill(bucket if bucket is not None else full(now, burst), now=now, rate=rate, burst=burst)
    if current.tokens >= 1.0:
        return Decision(Admit.PASS, replace(current, tokens=current.tokens - 1.0, dropped=0), current.dropped)
    return Decision(Admit.DROP, replace(current, dropped=current.dropped + 1))


def idle(bucket: Bucket, *, now: float, rate: float, burst: float) -> bool:
    """True when keeping `bucket` changes nothing: it would be full again at `now` and holds
    no unreported drops (the caller may forget it)."""
    return bucket.dropped == 0 and refill(bucket, now=now, rate=rate, burst=burst).tokens >= burst
