"""The tail of the work: carries out what `shared/core/tail.py` decides.

Near the end of the work (nothing undelivered in the stream) idle slots get work that would
otherwise wait on a slower node: a `Steal` is published to the holder's gateway (which
gives the unstarted tasks back), a `Backup` becomes a copy of the task entry marked
`backup_of=<holder>` (the marker key makes it once per entry).
"""

from __future__ import annotations

import logging

from ..shared.core import tail
from ..shared.messages import Steal
from ..shared.settings import Settings
from ..shared.store.commands import publish_control
from ..shared.store.connection import Client
from ..shared.store.nodes import latencies_ms, live_nodes
from ..shared.store.tasks import TaskStream
from .feeding import Feeder, adaptive_kinds

log = logging.getLogger(__name__)


class Tail:
    def __init__(self, *, client: Client, tasks: TaskStream, feeder: Feeder, settings: Settings) -> None:
        self.r = client
        self.tasks = tasks
        self.feeder = feeder
        self.settings = settings

    def run(self) -> tuple[int, int]:
        """Steal and back up as `core.tail.plan` says. Returns (tasks stolen, backups made)."""
        if self.feeder.open_backlog() > 0:
            return 0, 0
        s = self.settings
        settings = tail.TailSettings(s.prefetch, s.stealing, s.backups, s.target_task_s, adaptive_kinds())
        nodes = live_nodes(self.r, s.node_timeout_s)
        held = self.tasks.held()
        if not tail.any_room(nodes.values(), held, s.prefetch):
            return 0, 0  # nothing to read further
        over = [n.consumer for n in nodes.values() if held.get(n.consumer, 0) > n.slots] if s.stealing else []
        newest = self.tasks.newest_kinds(over)
        candidates: list[tail.Pending] = []
        backed_up: set[str] = set()
        latencies: list[float] = []
        if s.backups:
            candidates = self.tasks.with_kinds(tail.backup_candidates(self.tasks.pending(), nodes))
            backed_up = self.tasks.backed_up([p.entry_id for p in candidates])
            latencies = latencies_ms(self.r)
        steals = made = 0
        for step in tail.plan(list(nodes.values()), held, newest, candidates, backed_up, latencies, settings):
            match step:
                case tail.Steal(consumer, count):
                    publish_control(self.r, Steal(consumer=consumer, count=count))
                    steals += count
                case tail.Backup(entry_id, backup_of):
                    made += self.tasks.add_backup(entry_id, backup_of)
        if steals:
            log.info("stealing: %d queued tasks asked back from slower nodes", steals)
        if made:
            self.tasks.count("tasks_backup", made)
            log.info("backups: %d straggler copies for idle nodes", made)
        return steals, made
