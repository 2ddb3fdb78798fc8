"""The aggregator's batch decisions (shared/core/batching.py): where each result of a
batch goes, and how many results to read at once. No Redis, no processes."""

from __future__ import annotations

import pytest
from processdistro.shared.core.batching import GATHER_MS, READ_MAX, READ_MIN, Route, gather_ms, read_count, route

PLAIN = {"ban": False, "running": True, "banned": False, "done": False, "special": False}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, Route.BATCH),
        ({"special": True}, Route.ALONE),
        ({"done": True}, Route.DUPLICATE),
        ({"done": True, "special": True}, Route.DUPLICATE),  # merged already: no vote needed
        ({"banned": True}, Route.BANNED),
        ({"banned": True, "done": True}, Route.BANNED),  # a banned node's result is redone, never counted
        ({"running": False}, Route.DROP),
        ({"running": False, "banned": True, "done": True}, Route.DROP),  # the job is over: nothing else matters
        ({"ban": True, "running": False}, Route.BAN),  # a ban names a node: handled whatever its job
        ({"ban": True, "banned": True, "special": True}, Route.BAN),
    ],
    ids=[
        "plain: the batch",
        "replicated, decide or resolve: alone",
        "merged already",
        "merged already beats special",
        "banned node",
        "banned beats duplicate",
        "job over",
        "job over beats all",
        "ban entry",
        "ban entry beats all",
    ],
)
def test_route(changes: dict[str, bool], expected: Route) -> None:
    assert route(**(PLAIN | changes)) is expected


@pytest.mark.parametrize(
    ("last_read", "expected"),
    [
        (0, READ_MIN),  # idle: a small read
        (READ_MIN // 2, READ_MIN),
        (READ_MIN, 2 * READ_MIN),  # the last read was full: twice as many
        (100, 200),
        (READ_MAX // 2 + 1, READ_MAX),  # at most READ_MAX
        (READ_MAX, READ_MAX),
    ],
    ids=["idle", "few", "full small read", "growing", "capped", "at the cap"],
)
def test_read_count(last_read: int, expected: int) -> None:
    assert read_count(last_read) == expected


@pytest.mark.parametrize(
    ("last_read", "expected"),
    [
        (0, 0),  # the next read blocks until a result comes
        (1, GATHER_MS),  # results trickle in: gather a few
        (READ_MIN - 1, GATHER_MS),
        (READ_MIN, 0),  # results are waiting: read at once
        (READ_MAX, 0),
    ],
    ids=["empty", "one", "just under", "busy", "full"],
)
def test_gather_after_a_small_read(last_read: int, expected: int) -> None:
    assert gather_ms(last_read) == expected
