"""Node capacity: how many tasks a node runs at once, and how long a task takes it.

The resource optimizer is deliberately simple and explainable:

- **Slots** come from what the device reports when it joins: its cores, less one on a
  browser with four or more (the page, the socket and the phone's own UI need a core), no
  more than its memory holds at `SLOT_MEMORY_GB` per running module, and no more than
  `max_concurrency`.
- **Speed** starts from the join benchmark (Mandelbrot iterations per second per core) and
  is refined by what the node actually does: the gateway keeps an exponentially weighted
  average of task time per node and task kind (`ewma_ms:<kind>` in the node's hash). Where a
  node has not run a kind yet, its time is estimated from a peer that has, scaled by the
  ratio of their benchmark scores. Both measure the build the node is actually sent: a node
  with SIMD128 benchmarks `mandelbrot_simd` and runs every kernel's `_simd` variant
  (dispatch.pick_module), about 3x faster for Mandelbrot and PBKDF2, so its observed times
  and chunk sizes are those of the faster code.

- **Chunk size** for the adaptive kinds (hash, crack): a task is as many parts as fit
  `target_task_s` at the node's observed part time (`parts_per_task`).

The scheduler uses these speeds to decide whether moving work to an idle node pays off.

Every figure here comes, in the end, from what nodes report, and Redis may still hold a
non-finite one written before reports were validated (issue 9.2). So figures are read
through `finite` (non-finite, negative or unreadable: unknown; huge: capped at `MAX_TASK_MS`
or `MAX_SCORE`), and what is derived from them is clamped the same way, so no average,
ratio or chunk size here is ever infinite or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .core.replication import said_ready
from .protocol import MAX_ELAPSED_MS, MAX_PARTS, MAX_SCORE
from .queue import consumer_name

SLOT_MEMORY_GB = 0.25  # a module instance's memory cap and its worker's overhead, roughly
EWMA_PREFIX = b"ewma_ms:"
MAX_TASK_MS = MAX_ELAPSED_MS  # a task time, observed or estimated, at most


def finite(raw: bytes | str | float | int | None, cap: float) -> float | None:
    """A stored or reported figure as a float in [0, `cap`]: None when it is missing,
    unreadable, negative or not finite (`inf`, `nan`); capped at `cap` when larger."""
    if raw is None or raw == b"" or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, cap)


def parts_per_task(part_ms: float | None, target_task_s: float) -> int:
    """Adaptive chunk size: how many parts (consecutive subtasks of a hash or crack job) make
    one task of about `target_task_s` on a node whose parts take `part_ms` (one until the
    node has been measured)."""
    part_ms = finite(part_ms, MAX_TASK_MS)
    if not part_ms:
        return 1
    return max(1, min(MAX_PARTS, int(target_task_s * 1000 / part_ms)))


def plan_slots(*, cores: int, memory_gb: float | None, kind: str, max_concurrency: int) -> int:
    slots = cores - 1 if kind == "browser" and cores >= 4 else cores
    if memory_gb:  # browsers report deviceMemory rounded down (and capped at 8)
        slots = min(slots, max(1, math.floor(memory_gb / SLOT_MEMORY_GB)))
    return max(1, min(slots, max_concurrency))


@dataclass
class NodeView:
    """What the scheduler reads of a live node: its connection's consumer, slots and speed."""

    node_id: str
    consumer: str
    slots: int
    score: float | None = None  # benchmark, iterations/s per core
    ewma_ms: dict[str, float] = field(default_factory=dict)  # observed task time per kind
    held: int = 0  # tasks it holds now (pending entries of its consumer)
    ready: bool = True  # its connection has asked for work (`core.replication.said_ready`)

    @classmethod
    def of(cls, node_id: str, h: dict[bytes, bytes]) -> NodeView:
        ewma = {
            k[len(EWMA_PREFIX) :].decode(): ms
            for k, v in h.items()
            if k.startswith(EWMA_PREFIX) and (ms := finite(v, MAX_TASK_MS)) is not None
        }
        score = finite(h.get(b"score"), MAX_SCORE)
        consumer = consumer_name(node_id, h.get(b"connection", b"").decode())
        ready = said_ready(h.get(b"ready"), h.get(b"connection"))
        return cls(node_id, consumer, int(h.get(b"slots", 1)), score or None, ewma, ready=ready)

    def task_ms(self, kind: str, peers: Iterable[NodeView]) -> float | None:
        """Expected time of one task of `kind` here: observed, or estimated from a peer that
        ran the kind (scaled by benchmark scores); None when nothing is known. Always finite,
        in [0, `MAX_TASK_MS`], whatever the views hold."""
        if kind in self.ewma_ms:
            return finite(self.ewma_ms[kind], MAX_TASK_MS)
        mine = finite(self.score, MAX_SCORE)
        if not mine:
            return None
        estimates = [
            t
            for p in peers
            if kind in p.ewma_ms
            and (ms := finite(p.ewma_ms[kind], MAX_TASK_MS)) is not None
            and (theirs := finite(p.score, MAX_SCORE))
            # ms / mine first: it cannot overflow (a product of two big figures could)
            and (t := finite(ms / mine * theirs, MAX_TASK_MS)) is not None
        ]
        return min(estimates) if estimates else None


def worth_moving(holder: NodeView, idle: list[NodeView], kind: str, factor: float, peers: list[NodeView]) -> bool:
    """Would some idle node run a task of `kind` in at most `factor` x the holder's
    expected time? Unknown speeds never count as faster."""
    mine = holder.task_ms(kind, peers)
    if mine is None:
        return False
    theirs = [t for n in idle if n.node_id != holder.node_id and (t := n.task_ms(kind, peers)) is not None]
    return bool(theirs) and min(theirs) <= factor * mine
