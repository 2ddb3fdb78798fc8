"""The token bucket behind the agents' log frames (`shared/core/ratelimit.py`)."""

from __future__ import annotations

import pytest
from processdistro.shared.core.ratelimit import Admit, Bucket, full, idle, take

RATE = 0.5  # tokens per second
BURST = 3.0


def run(times: list[float]) -> list[tuple[Admit, int]]:
    """Feed events at `times` through one bucket: what each one got (admit, drops reported)."""
    bucket: Bucket | None = None
    out = []
    for now in times:
        d = take(bucket, now=now, rate=RATE, burst=BURST)
        bucket = d.bucket
        out.append((d.admit, d.dropped))
    return out


P, D = Admit.PASS, Admit.DROP


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ([0.0], [(P, 0)]),
        ([0.0, 0.0, 0.0], [(P, 0)] * 3),
        ([0.0, 0.0, 0.0, 0.0, 0.0], [(P, 0), (P, 0), (P, 0), (D, 0), (D, 0)]),
        # two tokens back after 4 s: the first event after the drops reports them
        ([0.0, 0.0, 0.0, 0.1, 0.2, 4.2, 4.2], [(P, 0), (P, 0), (P, 0), (D, 0), (D, 0), (P, 2), (P, 0)]),
        # steady at the rate: every event passes
        ([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0], [(P, 0)] * 7),
        # a long silence refills only up to the burst
        ([0.0, 0.0, 0.0, 1000.0, 1000.0, 1000.0, 1000.0], [(P, 0)] * 6 + [(D, 0)]),
        # a clock that goes backwards adds no tokens
        ([10.0, 10.0, 10.0, 5.0, 9.0], [(P, 0), (P, 0), (P, 0), (D, 0), (D, 0)]),
        # half a token is not a token
        ([0.0, 0.0, 0.0, 1.0, 2.0], [(P, 0), (P, 0), (P, 0), (D, 0), (P, 1)]),
    ],
    ids=["one", "burst", "over-burst", "drops-reported-once", "at-rate", "refill-capped", "clock-back", "half-token"],
)
def test_take(times: list[float], expected: list[tuple[Admit, int]]) -> None:
    assert run(times) == expected


def test_a_flood_is_cut_to_the_rate() -> None:
    """1,000 events a second for a minute: the burst plus one per 1/RATE seconds pass, and
    every other event is counted in some summary or still held in the bucket."""
    bucket: Bucket | None = None
    passed = reported = 0
    for i in range(60_000):
        d = take(bucket, now=i / 1000, rate=RATE, burst=BURST)
        bucket = d.bucket
        passed += d.admit is Admit.PASS
        reported += d.dropped
    assert bucket is not None
    assert BURST + 60 * RATE - 1 <= passed <= BURST + 60 * RATE  # the last token may be a hair short
    assert passed + reported + bucket.dropped == 60_000


@pytest.mark.parametrize(
    ("bucket", "now", "forget"),
    [
        (full(0.0, BURST), 0.0, True),
        (Bucket(tokens=0.0, stamp=0.0), 1.0, False),
        (Bucket(tokens=0.0, stamp=0.0), BURST / RATE, True),
        (Bucket(tokens=BURST, stamp=0.0, dropped=2), 100.0, False),
    ],
    ids=["full", "refilling", "refilled", "unreported-drops"],
)
def test_idle(bucket: Bucket, now: float, forget: bool) -> None:
    assert idle(bucket, now=now, rate=RATE, burst=BURST) is forget
