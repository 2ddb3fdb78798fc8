"""The tail decisions (shared/core/tail.py): what to steal and what to back up, from plain
inputs. No Redis, no processes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from processdistro.shared import keys
from processdistro.shared.capacity import NodeView
from processdistro.shared.core.tail import (
    BACKUP_MIN_MS,
    STEAL_MIN_MS,
    Backup,
    Instruction,
    Pending,
    Steal,
    TailSettings,
    any_room,
    backup_candidates,
    plan,
    running,
    typical_ms,
)

M = "mandelbrot"  # a kind of whole tasks
H = "hash"  # an adaptive kind: a task is many parts


def node(node_id: str, slots: int, held: int, ms: float | None = None, *, kind: str = M) -> tuple[NodeView, int]:
    """A live node with `slots`, holding `held` tasks, taking `ms` per task of `kind`."""
    return NodeView(node_id, f"{node_id}~1", slots, ewma_ms={kind: ms} if ms else {}), held


def silent(node_id: str, slots: int, ms: float | None = None, *, kind: str = M) -> tuple[NodeView, int]:
    """A live node, connected but never having said `ready`: it holds nothing and takes nothing."""
    view, _ = node(node_id, slots, 0, ms, kind=kind)
    view.ready = False
    return view, 0


def settings(**kw: object) -> TailSettings:
    values: dict[str, object] = {
        "prefetch": 1,
        "stealing": True,
        "backups": True,
        "target_task_s": 4.0,
        "adaptive": frozenset({H}),
    }
    values.update(kw)
    return TailSettings(**values)  # type: ignore[arg-type]


def decide(
    specs: list[tuple[NodeView, int]],
    *,
    kind: str = M,
    pending: list[Pending] | None = None,
    backed_up: frozenset[str] = frozenset(),
    latencies: list[float] | None = None,
    extra_held: dict[str, int] | None = None,
    **kw: object,
) -> list[Instruction]:
    nodes = [n for n, _ in specs]
    held = {n.consumer: h for n, h in specs if h} | (extra_held or {})
    newest = {n.consumer: kind for n, h in specs if h}
    candidates = backup_candidates(pending or [], {n.node_id: n for n in nodes})
    return plan(nodes, held, newest, candidates, backed_up, latencies or [], settings(**kw))


# ------------------------------------------------------------------ stealing


@dataclass
class StealCase:
    id: str
    nodes: list[tuple[NodeView, int]]
    expected: list[Instruction]
    kind: str = M
    kw: dict[str, object] = field(default_factory=dict)


STEALS = [
    StealCase(
        "idle node much slower: keeps its tasks",
        [node("slow", 1, 0, 3000), node("fast", 1, 3, 1000)],
        [],
    ),
    StealCase(
        "idle node a little slower: steals",
        [node("idle", 1, 0, 1400), node("holder", 1, 3, 1000)],
        [Steal("holder~1", 1)],
    ),
    StealCase(
        "idle node faster: steals as many as it has free slots",
        [node("idle", 2, 0, 500), node("holder", 1, 4, 1000)],
        [Steal("holder~1", 2)],
    ),
    StealCase(
        "never more than the holder has queued",
        [node("idle", 8, 0, 500), node("holder", 1, 3, 1000)],
        [Steal("holder~1", 2)],
    ),
    StealCase(
        "busy node with prefetch room twice as fast: steals",
        [node("busy", 1, 1, 500), node("holder", 1, 3, 1000)],
        [Steal("holder~1", 1)],
    ),
    StealCase(
        "busy node with prefetch room only a bit faster: keeps",
        [node("busy", 1, 1, 600), node("holder", 1, 3, 1000)],
        [],
    ),
    StealCase(
        "busy nodes of like speed never ping-pong",
        [node("a", 2, 2, 1000), node("b", 2, 4, 1000)],
        [],
    ),
    StealCase(
        "busy node without prefetch room: nothing",
        [node("full", 1, 2, 100), node("holder", 1, 3, 1000)],
        [],
    ),
    StealCase(
        "an idle node of unknown speed never counts as faster",
        [node("new", 4, 0), node("holder", 1, 3, 1000)],
        [],
    ),
    StealCase(
        "stealing off",
        [node("idle", 1, 0, 500), node("holder", 1, 3, 1000)],
        [],
        kw={"stealing": False},
    ),
    StealCase(
        "the fullest holder first; the idle slot goes once",
        [node("idle", 1, 0, 500), node("h1", 1, 2, 1000), node("h2", 1, 4, 1000)],
        [Steal("h2~1", 1)],
    ),
    StealCase(
        "adaptive: the taker gets its share by speed (3x faster: three quarters of the parts)",
        [node("idle", 1, 0, 100, kind=H), node("holder", 1, 9, 300, kind=H)],
        [Steal("holder~1", 6)],
        kind=H,
    ),
    StealCase(
        "adaptive: a like-speed taker gets half, and at least one",
        [node("idle", 1, 0, 300, kind=H), node("holder", 1, 2, 300, kind=H)],
        [Steal("holder~1", 1)],
        kind=H,
    ),
    StealCase(
        "adaptive: one idle slot serves one holder",
        [node("idle", 1, 0, 100, kind=H), node("h1", 1, 5, 300, kind=H), node("h2", 1, 9, 300, kind=H)],
        [Steal("h2~1", 6)],
        kind=H,
    ),
    StealCase(
        "a connected node that never said ready is no idle taker",
        [silent("mute", 4, 500), node("holder", 1, 3, 1000)],
        [],
    ),
    StealCase(
        "beside a silent node, a ready idle one still takes its share",
        [silent("mute", 4, 500), node("idle", 1, 0, 500), node("holder", 1, 3, 1000)],
        [Steal("holder~1", 1)],
    ),
    StealCase(
        "a silent node is no busy taker either",
        [silent("mute", 1, 100), node("holder", 1, 3, 1000)],
        [],
    ),
    StealCase(
        "bundled trivial parts (62 queued at 1 ms) are done before a steal would land",
        [node("idle", 2, 0, 1), node("holder", 2, 64, 1)],
        [],
    ),
    StealCase(
        "queued parts worth STEAL_MIN_MS are still stolen",
        [node("idle", 2, 0, 10), node("holder", 2, 2 + int(STEAL_MIN_MS / 10), 10)],
        [Steal("holder~1", 2)],
    ),
    StealCase(
        "just under STEAL_MIN_MS of queued work stays",
        [node("idle", 2, 0, 10), node("holder", 2, 1 + int(STEAL_MIN_MS / 10), 10)],
        [],
    ),
]


@pytest.mark.parametrize("case", STEALS, ids=[c.id for c in STEALS])
def test_stealing(case: StealCase) -> None:
    assert decide(case.nodes, kind=case.kind, backups=False, **case.kw) == case.expected


def test_no_steal_of_an_unknown_kind() -> None:
    specs = [node("idle", 1, 0, 500), node("holder", 1, 3, 1000)]
    assert decide(specs, kind="", backups=False) == []


def test_nothing_without_room_or_without_held_tasks() -> None:
    full = [node("a", 1, 2, 500), node("b", 1, 2, 1000)]
    assert not any_room([n for n, _ in full], {n.consumer: h for n, h in full}, 1)
    assert decide(full) == []
    empty = [node("a", 1, 0, 500)]
    assert not any_room([n for n, _ in empty], {}, 1)
    assert decide(empty) == []
    mute = [silent("mute", 4, 500), node("b", 1, 2, 1000)]
    assert not any_room([n for n, _ in mute], {n.consumer: h for n, h in mute if h}, 1)


# ------------------------------------------------------------------ backups


def out(consumer: str, ms: int, entry: str = "", kind: str = M) -> Pending:
    return Pending(entry or f"{consumer}-{ms}", consumer, ms, kind)


@dataclass
class BackupCase:
    id: str
    nodes: list[tuple[NodeView, int]]
    pending: list[Pending]
    expected: list[Instruction]
    backed_up: frozenset[str] = frozenset()
    latencies: list[float] = field(default_factory=list)
    extra_held: dict[str, int] = field(default_factory=dict)  # consumers of no live node
    kw: dict[str, object] = field(default_factory=dict)


BACKUPS = [
    BackupCase(
        "slower holder: a copy for the idle node",
        [node("idle", 1, 0, 500), node("slow", 1, 1, 1000)],
        [out("slow~1", 300)],
        [Backup("slow~1-300", "slow")],
    ),
    BackupCase(
        "not out long enough yet",
        [node("idle", 1, 0, 500), node("slow", 1, 1, 1000)],
        [out("slow~1", BACKUP_MIN_MS - 1)],
        [],
    ),
    BackupCase(
        "holder not clearly slower, not stuck",
        [node("idle", 1, 0, 800), node("holder", 1, 1, 1000)],
        [out("holder~1", 2000)],
        [],
    ),
    BackupCase(
        "stuck: out longer than three typical task times",
        [node("idle", 1, 0, 1000), node("holder", 1, 1, 1000)],
        [out("holder~1", 3100)],
        [Backup("holder~1-3100", "holder")],
        latencies=[900, 1000, 5000],
    ),
    BackupCase(
        "not yet stuck at three typical task times",
        [node("idle", 1, 0, 1000), node("holder", 1, 1, 1000)],
        [out("holder~1", 2900)],
        [],
        latencies=[900, 1000, 5000],
    ),
    BackupCase(
        "stuck needs at least 1.5 s however short tasks usually are",
        [node("idle", 1, 0, 1000), node("holder", 2, 2, 1000)],
        [out("holder~1", 1400), out("holder~1", 1600)],
        [Backup("holder~1-1600", "holder")],
        latencies=[10, 10, 10],
    ),
    BackupCase(
        "adaptive: a later part may wait for a whole task's time",
        [node("idle", 1, 0, 1000, kind=H), node("holder", 1, 1, 1000, kind=H)],
        [out("holder~1", 5000, kind=H)],
        [],
        latencies=[1000],
    ),
    BackupCase(
        "adaptive: stuck past one and a half target task times",
        [node("idle", 1, 0, 1000, kind=H), node("holder", 1, 1, 1000, kind=H)],
        [out("holder~1", 6100, kind=H)],
        [Backup("holder~1-6100", "holder")],
        latencies=[1000],
    ),
    BackupCase(
        "already backed up",
        [node("idle", 1, 0, 500), node("slow", 1, 1, 1000)],
        [out("slow~1", 300, "e1")],
        [],
        backed_up=frozenset({"e1"}),
    ),
    BackupCase(
        "the entry is gone (kind unknown)",
        [node("idle", 1, 0, 500), node("slow", 1, 1, 1000)],
        [out("slow~1", 9000, kind="")],
        [],
    ),
    BackupCase(
        "parked copies are not running",
        [node("idle", 1, 0, 500), node("slow", 1, 0, 1000)],
        [out(keys.PARKED_CONSUMER, 9000)],
        [],
    ),
    BackupCase(
        "only a node's first entries run (one slot: its second waits)",
        [node("idle", 1, 0, 500), node("slow", 1, 2, 1000)],
        [out("slow~1", 300), out("slow~1", 9000)],
        [Backup("slow~1-300", "slow")],
        kw={"stealing": False},
    ),
    BackupCase(
        "longest out first",
        [node("idle", 1, 0, 500), node("a", 1, 1, 1000), node("b", 1, 1, 1000)],
        [out("a~1", 400), out("b~1", 800)],
        [Backup("b~1-800", "b"), Backup("a~1-400", "a")],
    ),
    BackupCase(
        "no more copies than free room (the idle node's slot and prefetch)",
        [node("idle", 1, 0, 500), node("a", 1, 2, 1000), node("b", 1, 2, 1000), node("c", 1, 2, 1000)],
        [out("a~1", 400), out("b~1", 800), out("c~1", 600), out("a~1", 300), out("b~1", 300), out("c~1", 300)],
        [Backup("b~1-800", "b"), Backup("c~1-600", "c")],
        kw={"stealing": False},
    ),
    BackupCase(
        "a task of an unknown node runs on one slot; it is backed up once stuck",
        [node("idle", 1, 0, 500)],
        [out("gone~1", 3500), out("gone~1", 3200)],
        [Backup("gone~1-3500", "gone")],
        extra_held={"gone~1": 2},
    ),
    BackupCase(
        "backups off",
        [node("idle", 1, 0, 500), node("slow", 1, 1, 1000)],
        [out("slow~1", 300)],
        [],
        kw={"backups": False},
    ),
]

BACKUPS += [
    BackupCase(
        "no copy for a connected node that never said ready",
        [silent("mute", 4, 500), node("slow", 1, 2, 1000)],
        [out("slow~1", 3000), out("slow~1", 100, "queued")],
        [],
    ),
    BackupCase(
        "a silent node gives no room to a stuck task either",
        [silent("mute", 4, 500)],
        [out("gone~1", 3500)],
        [],
        extra_held={"gone~1": 1},
    ),
]


@pytest.mark.parametrize("case", BACKUPS, ids=[c.id for c in BACKUPS])
def test_backups(case: BackupCase) -> None:
    got = decide(
        case.nodes,
        pending=case.pending,
        backed_up=case.backed_up,
        latencies=case.latencies,
        extra_held=case.extra_held,
        **case.kw,
    )
    assert got == case.expected


def test_steals_come_first_and_take_backup_room() -> None:
    """The idle node takes a stolen task; the room left (its prefetch) gets one backup."""
    specs = [node("idle", 1, 0, 400), node("slow", 1, 3, 1000)]
    got = decide(specs, pending=[out("slow~1", 500)])
    assert got == [Steal("slow~1", 1), Backup("slow~1-500", "slow")]


def test_running_keeps_stream_order_per_consumer() -> None:
    nodes = {"a": NodeView("a", "a~1", 2)}
    pending = [out("a~1", 10, "1"), out("b~1", 10, "2"), out("a~1", 10, "3"), out("a~1", 10, "4")]
    assert [p.entry_id for p in running(pending, nodes)] == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("latencies", "expected"),
    [([], 1000.0), ([5.0], 5.0), ([3.0, 1.0, 2.0], 2.0), ([4.0, 1.0, 3.0, 2.0], 3.0)],
    ids=["none: one second", "one", "odd: median", "even: upper median"],
)
def test_typical_task_time(latencies: list[float], expected: float) -> None:
    assert typical_ms(latencies) == expected


# ------------------------------------------------------------------ poisoned speeds (issue 9.2)

INF, NAN = float("inf"), float("nan")


def scored(node_id: str, slots: int, held: int, ms: float | None, score: float | None) -> tuple[NodeView, int]:
    """A node of kind H with a benchmark `score` and, if `ms`, an observed time."""
    ewma = {H: ms} if ms is not None else {}
    return NodeView(node_id, f"{node_id}~1", slots, score=score, ewma_ms=ewma), held


POISONED = [
    StealCase(
        "holder's average is Infinity, the idle node's estimate from it too: inf/inf never reaches round",
        [scored("idle", 1, 0, None, 1e6), scored("holder", 1, 9, INF, 1e6)],
        [],  # an unknown time never counts: nothing moves
        kind=H,
    ),
    StealCase(
        "holder's average is NaN",
        [scored("idle", 1, 0, 100, 1e6), scored("holder", 1, 9, NAN, 1e6)],
        [],
        kind=H,
    ),
    StealCase(
        "idle node's average is Infinity: unknown, never faster",
        [scored("idle", 1, 0, INF, 1e6), scored("holder", 1, 9, 300, 1e6)],
        [],
        kind=H,
    ),
    StealCase(
        "idle node's average is negative: unknown",
        [scored("idle", 1, 0, -5, 1e6), scored("holder", 1, 9, 300, 1e6)],
        [],
        kind=H,
    ),
    StealCase(
        "idle node's score is Infinity, its estimate would be 0 ms: unknown",
        [scored("idle", 1, 0, None, INF), scored("holder", 1, 9, 300, 1e6)],
        [],
        kind=H,
    ),
    StealCase(
        "holder's score is NaN: the idle node's estimate is unknown",
        [scored("idle", 1, 0, None, 1e6), scored("holder", 1, 9, 300, NAN)],
        [],
        kind=H,
    ),
    StealCase(
        "huge finite averages are capped: their sum does not overflow, like speeds share half",
        [scored("idle", 1, 0, 1e308, 1e6), scored("holder", 1, 9, 1e308, 1e6)],
        [Steal("holder~1", 4)],
        kind=H,
    ),
    StealCase(
        "a tiny score does not make an infinite estimate",
        [scored("idle", 1, 0, None, 1e-300), scored("holder", 1, 9, 300, 1e12)],
        [],
        kind=H,
    ),
    StealCase(
        "whole tasks: Infinity on both sides moves nothing",
        [node("idle", 1, 0, INF), node("holder", 1, 3, INF)],
        [],
    ),
]


@pytest.mark.parametrize("case", POISONED, ids=[c.id for c in POISONED])
def test_poisoned_speeds_never_crash_the_tail(case: StealCase) -> None:
    """Issue 9.2: a node's time of Infinity (or NaN) made `plan` compute inf/inf and
    round(nan), which raised and crash-looped the scheduler. Times are read as unknown when
    they are not finite, capped when huge, and the share is always in [0, 1]."""
    assert decide(case.nodes, kind=case.kind, backups=False, **case.kw) == case.expected


def test_poisoned_latencies_and_speeds_with_backups() -> None:
    """Issue 9.2: Infinity and NaN among the recent latencies (as Redis held them) and in a
    holder's speed: the backups still follow the finite figures."""
    specs = [scored("idle", 1, 0, 100, 1e6), scored("slow", 1, 1, INF, 1e6)]
    latencies = [INF, NAN, -1.0, 100.0, 100.0, 100.0]
    got = decide(specs, kind=H, pending=[out("slow~1", 2000, kind=H)], latencies=latencies, stealing=False)
    assert got == []  # stuck means 1.5 target tasks here (6 s); 2 s is not, and its speed is unknown
    got = decide(specs, kind=H, pending=[out("slow~1", 7000, kind=H)], latencies=latencies, stealing=False)
    assert got == [Backup("slow~1-7000", "slow")]


@pytest.mark.parametrize(
    ("latencies", "expected"),
    [([INF, NAN], 1000.0), ([INF, 5.0, NAN], 5.0), ([-3.0, 1.0, 2.0, 1e300], 2.0)],
    ids=["only non-finite: unknown", "non-finite left out", "negative out, huge capped"],
)
def test_typical_task_time_ignores_poison(latencies: list[float], expected: float) -> None:
    """Issue 9.2: the median of recent times never is Infinity or NaN."""
    assert typical_ms(latencies) == expected
