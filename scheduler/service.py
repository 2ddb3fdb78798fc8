"""The scheduler: turns commands into jobs, feeds the task stream, balances the tail, reaps.

Loop (without waiting while it feeds; `core.feed.command_wait_ms`):
1. apply the `submit`/`cancel`/`fail` commands of `keys.COMMANDS` (consumer group, so a
   restarted scheduler resumes where the last one stopped; a command is acked once applied,
   or once refused: one bad command never holds up the others);
2. feed (`feeding.Feeder`): keep the undelivered backlog near its target;
3. when nothing was fed, balance the tail (`tail.Tail`): stealing and backups;
4. reap (`reaper.Reaper`): requeue what dead node connections hold.

One job's problem never stops the loop: a plugin that raises while its job is fed (a
wordlist moved after submit) fails that job (`shared/service.job_error` is its reason), and
a command that cannot be applied is refused and logged; anything else is logged and backed
off by `run_forever`.

Every change of a job's state the scheduler makes goes through `JobStore.transition`, a
compare-and-set from the state it loaded: a cancel that meets a job the finalizer has just
moved to `done` leaves it `done`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..shared.core import feed
from ..shared.exceptions import ParamsError, ProcessDistroError
from ..shared.jobs import JobState, allowed
from ..shared.messages import Cancel, CancelJob, Fail, Submit
from ..shared.modules import ModuleRegistry
from ..shared.service import StopFlag, captured_signals, describe_error, instance_name, run_forever
from ..shared.settings import Settings
from ..shared.store.commands import CommandStream, Received, publish_control
from ..shared.store.connection import UNAVAILABLE, Client
from ..shared.store.jobs import JobStore, drop_blocks, event
from ..shared.store.liveness import beat
from ..shared.store.modules import stored as module_stored
from ..shared.store.streams import ensure_groups
from ..shared.store.tasks import TaskStream
from ..shared.tasks import TaskPlugin, get_plugin
from .feeding import Feeder
from .reaper import Reaper
from .tail import Tail

log = logging.getLogger(__name__)

COMMAND_CLAIM_IDLE_MS = 3_000
COMMAND_CLAIM_EVERY_S = 2.0


class Scheduler:
    def __init__(self, *, client: Client, settings: Settings, modules: ModuleRegistry) -> None:
        self.r = client
        self.settings = settings
        self.modules = modules
        self.name = instance_name()
        self.jobs = JobStore(client)
        self.tasks = TaskStream(client)
        self.commands = CommandStream(client, self.name)
        self.feeder = Feeder(client=client, jobs=self.jobs, tasks=self.tasks, settings=settings, fail=self.fail)
        self.tail = Tail(client=client, tasks=self.tasks, feeder=self.feeder, settings=settings)
        self.reaper = Reaper(client=client, jobs=self.jobs, tasks=self.tasks, settings=settings)
        self._last_beat = 0.0
        self._last_reap = 0.0
        self._last_claim = 0.0
        self._fed = 0

    # ------------------------------------------------------------------ commands

    def handle_commands(self, block_ms: int | None = 50) -> int:
        """Apply pending commands; wait up to `block_ms` for one (None: do not wait)."""
        received = self.commands.read(block_ms=block_ms)
        if time.monotonic() - self._last_claim > COMMAND_CLAIM_EVERY_S:
            # commands a killed scheduler had read but not applied (applying is idempotent)
            received += self.commands.claim_stale(COMMAND_CLAIM_IDLE_MS)
            self._last_claim = time.monotonic()
        for entry in received:
            self.apply(entry)
            self.commands.ack(entry.entry_id)
        return len(received)

    def apply(self, entry: Received) -> None:
        """Apply one command; a command that cannot be applied is logged with its id."""
        try:
            match entry.command:
                case Submit() as submit:
                    self.submit(submit)
                case Cancel(job_id=job_id, reason=reason):
                    self.cancel(job_id, reason)
                case Fail(job_id=job_id, reason=reason):
                    self.cancel(job_id, reason, state=JobState.FAILED)
                case None:
                    log.error("command %s refused: %s", entry.entry_id, entry.problem)
        except (ProcessDistroError, ValueError) as exc:  # an unknown kind, bad params, a missing module
            log.error("command %s refused: %s", entry.entry_id, exc)
        except UNAVAILABLE:
            raise  # not the command's fault: it stays pending and is applied after the outage
        except Exception as exc:  # a plugin that raised on it: refused, so it is not retried for ever
            log.exception("command %s refused: %s", entry.entry_id, describe_error(exc))

    def submit(self, cmd: Submit) -> None:
        plugin = get_plugin(cmd.kind)
        try:
            params = plugin.parse_params(cmd.params)
            total = plugin.count(params)
            module = self._module(plugin, params)
        except UNAVAILABLE:
            raise
        except Exception:
            if self.jobs.load(cmd.job_id) is None:  # refused: let go of what its submit stored
                drop_blocks(self.r, cmd.job_id)
            raise
        record: dict[str, str | float | int] = {
            "id": cmd.job_id,
            "kind": plugin.kind,
            "state": JobState.QUEUED.value,
            "params": params.model_dump_json(),
            "total": total,
            "done": 0,
            "next_index": 0,
            "created": cmd.created,
            "priority": cmd.priority,
            "replicate": plugin.replication(params, cmd.replicate, self.settings.replicate),
            "module": module,
        }
        if not self.jobs.create(cmd.job_id, record, priority=cmd.priority, created=cmd.created):
            return  # a replayed command
        event(self.r, "job", job_id=cmd.job_id, state="queued", total=total)
        log.info("job %s: %s queued, %d subtasks", cmd.job_id, plugin.kind, total)

    def _module(self, plugin: TaskPlugin[Any], params: Any) -> str:
        """The sha256 of the module the job's subtasks run: its own (uploaded, and still
        stored), else the registry's by name."""
        sha = plugin.module_sha(params)
        if sha is None:
            return self.modules.get(plugin.module).sha256
        if not module_stored(self.r, sha):
            raise ParamsError(f"module {sha} is not stored: submit it again")
        return sha

    def cancel(self, job_id: str, reason: str, *, state: JobState = JobState.CANCELLED) -> bool:
        """End a job early (`cancelled` by the user, or `failed`): a compare-and-set from
        the state it is in, tried again while that state moves on (at most once per state).
        A job that reached a terminal state first (`done`) keeps it. Its queued and running
        tasks are dropped by the gateways. True if this call ended it."""
        for _ in JobState:  # states only move forward: a few tries at most
            job = self.jobs.load(job_id)
            if job is None or job.state.terminal:
                return False
            if not allowed(job.state, state):
                log.info("job %s: not %s from %s", job_id, state.value, job.state.value)
                return False
            if self.jobs.transition(job_id, job.state, state, error=reason, finished=time.time()):
                break
        else:
            return False
        drop_blocks(self.r, job_id)
        event(self.r, "job", job_id=job_id, state=state.value, error=reason)
        log.info("job %s: %s %s", job_id, state.value, reason)
        # gateways drop the job's tasks when they meet them and tell nodes to stop
        publish_control(self.r, CancelJob(job_id=job_id))
        return True

    def fail(self, job_id: str, reason: str) -> bool:
        """Fail a job whose plugin raised (the feeder's split): `failed`, with the reason."""
        log.error("job %s: %s", job_id, reason)
        return self.cancel(job_id, reason, state=JobState.FAILED)

    # ------------------------------------------------------------------ loop

    def step(self) -> None:
        now = time.monotonic()
        if now - self._last_beat > 2:
            beat(self.r, "scheduler", self.name)
            self._last_beat = now
        # wait on the command stream only when nothing was fed, and while work is left to
        # feed no longer than the backlog lasts (`core.feed.command_wait_ms`)
        f = self.feeder
        self.handle_commands(
            block_ms=feed.command_wait_ms(fed=self._fed, unfed=f.unfed, backlog=f.backlog, drain_per_s=f.drain_per_s)
        )
        self._fed = self.feeder.feed()
        if not self._fed:
            self.tail.run()
        if now - self._last_reap > 0.5:
            self.reaper.reap()
            self._last_reap = now


def run(settings: Settings) -> None:
    from ..shared.store.connection import sync_client

    client = sync_client(settings.resolved_redis_url())
    ensure_groups(client)
    sched = Scheduler(client=client, settings=settings, modules=ModuleRegistry(static_dir=settings.static_path))
    flag = StopFlag()
    log.info("scheduler %s started", sched.name)
    with captured_signals(flag):
        run_forever("scheduler", flag, sched.step)
    log.info("scheduler %s stopped", sched.name)
