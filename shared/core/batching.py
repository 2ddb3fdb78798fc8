"""The aggregator's batches: which results of a batch take the batch path, and how many
results to read at once.

The aggregator reads results many at a time (`keys.RESULTS`, XREADGROUP COUNT), learns in
one round trip what it needs about them (their jobs, banned nodes, indices merged
already), and sends each down a route. Plain results (the common case: a job running, an
index not merged yet, not replicated) are verified, claimed, merged and committed
together, a few calls for the whole batch; everything else (votes, decisions, the
controller's own computations, bans) is handled one result at a time, as before.
"""

from __future__ import annotations

from enum import StrEnum

#: results read (and claimed, merged and committed) at once, at most
READ_MAX = 256
#: ... and at least, when few are waiting: small batches keep latency low when idle
READ_MIN = 16
#: after a small read, let results gather this long before the next: a batch's fixed cost
#: (a read, a look, a claim and a commit call, and the msync of the maps it wrote: a
#: Mandelbrot tile dirties one page per row, which the tiles of its band share) is then
#: shared by more results. 25 ms against 5: aggregator CPU per 2048² job 0.36 -> 0.30 s in
#: `make compare` (50 ms: no better)
GATHER_MS = 25


class Route(StrEnum):
    """Where one result of a batch goes."""

    BAN = "ban"  # a gateway's ban entry: handled alone
    DROP = "drop"  # its job is gone or over
    BANNED = "banned"  # its node is banned: the subtask is redone elsewhere
    DUPLICATE = "duplicate"  # its index is merged already
    ALONE = "alone"  # replicated, a decide or a resolve: handled alone (votes, decisions)
    BATCH = "batch"  # verified, claimed, merged and committed with the batch


def route(*, ban: bool, running: bool, banned: bool, done: bool, special: bool) -> Route:
    """The route of one result, in the order the checks must run: a ban entry first (it
    names a node, not a result), then the job (gone or over: nothing else matters), the
    node (banned: its results are not trusted even if they pass), the index (merged
    already), and last what the result is (replicated, decide, resolve: `special`)."""
    if ban:
        return Route.BAN
    if not running:
        return Route.DROP
    if banned:
        return Route.BANNED
    if done:
        return Route.DUPLICATE
    if special:
        return Route.ALONE
    return Route.BATCH


def read_count(last_read: int, *, low: int = READ_MIN, high: int = READ_MAX) -> int:
    """How many results to ask for next: twice what the last read brought (the stream is
    filling up: take more per round trip), within [low, high]."""
    return max(low, min(high, 2 * last_read))


def gather_ms(last_read: int, *, low: int = READ_MIN) -> int:
    """How long to pause before the next read: not at all after an empty read (the next
    one blocks until a result comes) or a full one (results are waiting), `GATHER_MS`
    after a small one (results trickle in: a few milliseconds more make a batch of them)."""
    return GATHER_MS if 0 < last_read < low else 0
