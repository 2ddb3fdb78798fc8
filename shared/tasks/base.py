"""The task plugin interface: everything task-specific lives in a plugin on the controller.

A node only ever sees `(module sha256, input bytes) -> output bytes`. The scheduler calls
`count` and `split` (and `module_sha` and `replication` once per job); the aggregator calls
`verify`, `confirm`, `merge_result` (which is `merge` unless a plugin records where results
came from), `failure` and `finalize`. The CLI builds
`processdistro submit <kind>` from the plugin (`describe`, `add_arguments`), turns the parsed
flags into raw params (`params_from_args`), and calls `prepare` and `parse_params` so bad
parameters are refused at submit time; once the job is done it copies the outputs the user
asked for (`outputs_from_args`) and prints `summary`. A new kind is a new plugin registered
in `tasks/__init__.py` (`register`); the CLI needs no edit.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from .. import validation
from ..exceptions import ParamsError
from ..jobs import JobRecord
from ..lazy import lazy, lazy_function
from ..protocol import MAX_DEADLINE_S, MAX_MEMORY_MB
from ..queue import TaskFields

if TYPE_CHECKING:
    import numpy as np
    from numpy.lib.format import open_memmap
else:
    np = lazy("numpy")
    open_memmap = lazy_function("numpy.lib.format", "open_memmap")

P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class Subtask:
    """One subtask's input: inline bytes, then shared blocks (by sha256) appended in order."""

    input: bytes
    blocks: tuple[str, ...] = ()


@dataclass
class Prepared:
    """What `prepare` hands to the submit command: JSON-able params and the blocks to store,
    and the modules the job brings (stored once by content: `store.modules`)."""

    params: dict[str, Any]
    blocks: dict[str, bytes]
    modules: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class TaskLimits:
    """What one subtask of a job may use on a node: wall-clock seconds (`deadline_s`) and
    linear memory in MiB (`memory_mb`). None leaves the node's own limit; a node applies
    the lower of the two. A part past either fails like any failed part (and is retried)."""

    deadline_s: float | None = None
    memory_mb: int | None = None

    def __post_init__(self) -> None:
        # the bounds of the task frame (shared/protocol.py): a plugin's params model should
        # refuse anything else at submit time; this catches a plugin that did not
        if self.deadline_s is not None and not 0 < self.deadline_s <= MAX_DEADLINE_S:
            raise ValueError(f"expected a deadline in (0, {MAX_DEADLINE_S:g}] seconds, got {self.deadline_s!r}")
        if self.memory_mb is not None and not 1 <= self.memory_mb <= MAX_MEMORY_MB:
            raise ValueError(f"expected a memory cap in [1, {MAX_MEMORY_MB}] MiB, got {self.memory_mb!r}")


class Verdict(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"


class Checked(StrEnum):
    """How a merged result was checked, beyond the plugin's own `verify`."""

    REPLICATED = "replicated"  # two distinct nodes returned the same bytes
    UNCONFIRMED = "unconfirmed"  # replicated, but no other node could confirm it
    SINGLE = "single node"  # not replicated
    CONTROLLER = "controller"  # disputed with no node left to ask: the controller computed it


@dataclass(frozen=True)
class Origin:
    """Where a merged result came from, for plugins that record it (`merge_result`)."""

    node: str
    elapsed_ms: float
    checked: Checked
    #: the nodes whose results agreed (replicated), this one included
    agreeing: tuple[str, ...] = ()


def _no_blocks(sha: str) -> bytes:
    raise KeyError(f"block {sha} is not readable here")


class OpenFiles:
    """Memory maps of merged work an aggregator keeps open across results (`JobFiles.memmap`)
    and flushes at its commit points, not once per result: opening a map and msync per tile
    cost more than the tile's merge. Writes through a shared map are in the page cache at
    once, so another aggregator or a finalize reading the file sees them before any flush;
    the flush only makes them durable before the commit that says they are merged. At most
    `max_jobs` jobs' maps stay open (least recently used go first)."""

    def __init__(self, max_jobs: int = 16) -> None:
        self.max_jobs = max_jobs
        self._maps: OrderedDict[str, dict[Path, np.memmap]] = OrderedDict()
        self._used: dict[str, float] = {}
        self._dirty: set[str] = set()

    def memmap(self, job_id: str, path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
        maps = self._maps.get(job_id)
        if maps is None:
            maps = self._maps[job_id] = {}
            while len(self._maps) > self.max_jobs:
                self.close(next(iter(self._maps)))
        self._maps.move_to_end(job_id)
        self._used[job_id] = time.monotonic()
        m = maps.get(path)
        if m is None:
            m = maps[path] = shared_memmap(path, shape, dtype)
        self._dirty.add(job_id)
        return m

    def jobs(self) -> list[str]:
        return list(self._maps)

    def flush(self, job_id: str) -> None:
        """Make what was written into the job's maps durable (msync): before its commit."""
        if job_id in self._dirty:
            for m in self._maps.get(job_id, {}).values():
                m.flush()
            self._dirty.discard(job_id)

    def close(self, job_id: str) -> None:
        """Flush and let go of a job's maps (it finalizes, it is over, or it was idle)."""
        try:
            self.flush(job_id)
        finally:
            self._maps.pop(job_id, None)
            self._used.pop(job_id, None)
            self._dirty.discard(job_id)

    def idle(self, now: float, idle_s: float) -> list[str]:
        """Jobs whose maps were not used for `idle_s` (the caller closes them)."""
        return [j for j, t in self._used.items() if now - t > idle_s]


@dataclass(frozen=True)
class JobFiles:
    """Where one job's intermediate and final files live (under the data directory), and
    how to read the job's shared blocks (for merges and finalizers that need them).
    `open_files`: an aggregator's maps kept open across results (None: open, write and
    flush per merge)."""

    job_id: str
    directory: Path
    read_block: Callable[[str], bytes] = _no_blocks
    open_files: OpenFiles | None = None

    @classmethod
    def under(
        cls,
        data_dir: Path,
        job_id: str,
        read_block: Callable[[str], bytes] = _no_blocks,
        open_files: OpenFiles | None = None,
    ) -> JobFiles:
        return cls(job_id, data_dir / "jobs" / job_id, read_block, open_files)

    def path(self, name: str) -> Path:
        return self.directory / name

    def memmap(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.memmap:
        """The merged-work array file `name` (`shared_memmap`), kept open when an aggregator
        keeps files open. A merge writes into it and then calls `written`."""
        if self.open_files is None:
            return shared_memmap(self.path(name), shape, dtype)
        return self.open_files.memmap(self.job_id, self.path(name), shape, dtype)

    def written(self, m: np.memmap) -> None:
        """After a merge wrote into `m`: flushed now, or, kept open, at the commit point."""
        if self.open_files is None:
            m.flush()


class TaskPlugin(ABC, Generic[P]):
    kind: ClassVar[str]
    module: ClassVar[str]  # name of the WASM module in the module registry
    params_model: ClassVar[type[BaseModel]]
    # Subtasks are small, uniform slices of a range (hash batches, wordlist chunks): the
    # gateway hands a node as many consecutive ones per task as fit its target task time.
    adaptive: ClassVar[bool] = False
    # The output role `processdistro result JOB -o FILE` copies when no --role is given
    # (None: the first one `finalize` returned).
    main_output: ClassVar[str | None] = None

    def parse_params(self, raw: dict[str, Any]) -> P:
        try:
            return self.params_model.model_validate(raw)  # type: ignore[return-value]
        except ValidationError as exc:
            problems = validation.describe(exc, limit=len(exc.errors()), root="params")
            raise ParamsError(f"bad {self.kind} parameters: {problems}") from None

    # ------------------------------------------------------------ the command line (CLI only)

    def describe(self) -> str:
        """One line for `processdistro submit --help` (and atop `submit <kind> --help`)."""
        doc = (type(self).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else f"a {self.kind} job"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this kind's flags to `processdistro submit <kind>`: its parameters and where
        to copy its outputs (`-o`). The CLI adds the flags every kind shares (`--priority`,
        `--replicate`, `--wait`, `--timeout`, `-q`), so a plugin must not use those."""

    def params_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        """The raw parameters (what `prepare` takes) from the flags `add_arguments` added."""
        return {}

    def outputs_from_args(self, args: argparse.Namespace) -> dict[str, Path | None]:
        """Where the user wants each output role copied once the job is done (None: nowhere)."""
        return {}

    def summary(self, outputs: dict[str, str]) -> list[str]:
        """Plain lines the CLI prints when the job is done, after where its outputs went;
        `outputs` are the paths `finalize` returned, by role."""
        return []

    def prepare(self, raw: dict[str, Any]) -> Prepared:
        """Runs in the CLI, where the user's files are: read them, check them, and turn them
        into params and shared blocks. Raise ParamsError with a clear message on bad input."""
        return Prepared(params=raw, blocks={})

    @abstractmethod
    def count(self, params: P) -> int:
        """How many subtasks the job splits into."""

    @abstractmethod
    def split(self, params: P, start: int = 0) -> Iterator[Subtask]:
        """Subtask inputs from index `start` on, lazily."""

    @abstractmethod
    def verify(self, params: P, index: int, task_input: bytes, output: bytes, rng: random.Random) -> Verdict:
        """A cheap check that `output` is a correct result for subtask `index`, whose whole
        input (inline bytes and blocks) was `task_input`."""

    @abstractmethod
    def merge(self, files: JobFiles, params: P, index: int, output: bytes) -> None:
        """Write one verified result into the job's files. Idempotent."""

    def merge_result(self, files: JobFiles, params: P, index: int, output: bytes, origin: Origin) -> None:
        """What the aggregator calls: `merge`, for a plugin that also records who computed
        the result and how it was checked (`origin`). Idempotent."""
        self.merge(files, params, index, output)

    def confirm(self, params: P, index: int, output: bytes) -> bool:
        """Must this checked result be confirmed by a second node before it counts, though
        its subtask was not sampled for replication (a user's program that failed: one
        broken node must not fail a job)? Then it is the first vote and a copy goes to
        another node; with no other node live, it counts unconfirmed."""
        return False

    def failure(self, files: JobFiles, params: P, index: int, output: bytes) -> str | None:
        """After a merge: does this result fail the job (a user's program that exited
        non-zero, without --keep-going)? The reason, naming the input, or None."""
        return None

    def module_sha(self, params: P) -> str | None:
        """The sha256 of the module this job's subtasks run when the job brought its own
        (uploaded with `Prepared.modules`); None: the registry's `module`, by name."""
        return None

    def replication(self, params: P, requested: float | None, default: float) -> float:
        """The share of this job's subtasks computed on two nodes: what the user asked for
        (`--replicate`), else `default` (PD_REPLICATE)."""
        return default if requested is None else requested

    def exit_code(self, outputs: dict[str, str]) -> int:
        """`submit --wait`'s exit status for a job that is done (non-zero: some of its
        inputs failed, which `summary` names)."""
        return 0

    def finished_early(self, files: JobFiles, params: P, index: int, output: bytes) -> bool:
        """After a merge: is the job's answer known already (a search that found its
        target)? Then the job finalizes now and its remaining work is cancelled."""
        return False

    @abstractmethod
    def finalize(self, files: JobFiles, params: P) -> dict[str, str]:
        """Write the output files; return them by role (e.g. {"image": path}).

        Idempotent: it may run again after a crash, or after Redis forgot the `done` it
        recorded, also after `clean_up` ran. So write each output to a temporary name and
        rename it (`atomic_write`), keep an output that is there already (`keep_or_write`),
        never remove merged work here (that is `clean_up`, once the job is `done`), and
        never rebuild merged work that is gone as if nothing had been merged (`merged`)."""

    def clean_up(self, files: JobFiles, params: P) -> None:
        """Remove the merged work `finalize` no longer needs. Called once the job is
        recorded `done`, never before; a `finalize` after it finds the outputs in place."""

    def limits(self, params: P) -> TaskLimits:
        """Per-subtask limits for this job (e.g. from its `--timeout`/`--memory`), carried to
        every node with its tasks. The default sets none: the nodes' own defaults apply."""
        return TaskLimits()

    def entries(self, job: JobRecord, params: P, start: int, count: int) -> Iterator[TaskFields]:
        """The task entries of subtasks `start`, `start + 1`, ... (at most `count`): what the
        scheduler feeds, and what an aggregator queues again for a subtask it takes back."""
        limits = self.limits(params)  # every subtask of a job runs under the same limits
        for offset, sub in enumerate(self.split(params, start)):
            if offset >= count:
                return
            yield TaskFields(
                job.id,
                start + offset,
                job.kind,
                job.module,
                sub.input,
                blocks=sub.blocks,
                deadline_s=limits.deadline_s,
                memory_mb=limits.memory_mb,
            )


def shared_memmap(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    """Open (creating it first if needed) an .npy file that several aggregators write into.

    Creating races are settled by building the file aside and hard-linking it into place,
    which fails for all but the first (a rename would clobber results already written).
    The file's blocks are allocated when it is made: a full disk is an OSError then, never
    a SIGBUS on a later write into the map (which would kill the aggregator)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}")
        try:
            open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
            with open(tmp, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return open_memmap(path, mode="r+")


class MergedWorkGone(Exception):
    """A finalize found neither a job's merged work nor the output made from it."""


def merged(path: Path) -> Path:
    """`path` of merged work that must be there (a finalize must not start from nothing)."""
    if not path.exists():
        raise MergedWorkGone(f"the merged work {path} is gone, and no output was written from it")
    return path


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, durable: bool = False) -> None:
    """Write a file so that readers see either nothing or all of it; `durable`: even after
    the machine crashes (the data reaches the disk before the rename: for final outputs,
    not for the many small files of merges). A failed write (a full disk) leaves nothing
    behind: neither a partial file nor its temporary."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        full = exc.errno is None and _disk_full(tmp.parent)  # numpy says only "N requested and M written"
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _disk_full(directory: Path) -> bool:
    """Is (next to) no space left where a short write just stopped?"""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def keep_or_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """An output of a finalize: kept if a finalize before wrote it (outputs are written
    whole, from merged work that no longer changes), else written (`atomic_write`)."""
    if not path.exists():
        atomic_write(path, write, durable=True)
    return path
