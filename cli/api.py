"""The Python API: `processdistro.connect()`, then `map` a WebAssembly program over inputs or
`submit` any kind, as the CLI does.

    import processdistro
    with processdistro.connect() as pd:           # the running `up`, or PD_REDIS_URL
        job = pd.map("prog.wasm", inputs, args=["-d"], replicate=0.05, timeout=60)
        for index, output in job.as_completed(): ...
        outputs = job.results(timeout=600)        # list[bytes] in input order
        pd.submit("mandelbrot", width=2048).wait()

`map` is `submit wasm` with inputs from Python (`raw["items"]` of the wasm plugin): they are
read once, lazily, and cut into subtasks of many small inputs whose blocks go to Redis in
bounded chunks (`store.client.BlockWriter`) as they are made, so a generator of a million
inputs is never held in memory. The submit command is sent once every input is stored.

Outputs are where the aggregators write them: `OUTDIR/packed/<subtask>` (the result
envelope of each subtask: stdout, stderr and exit code of each of its inputs; with
`files=True`, `OUTDIR/out/<index>` per input instead) and `OUTDIR/manifest.jsonl`, OUTDIR
by default `<data dir>/map/<job id>` of the settings this process reads (for `up` on this
machine, the same directory the aggregator writes). The
API reads them from there, so it must run where the aggregators' files are (as `submit
--wait` must to copy outputs); with compose, pass an `outdir` on the shared data volume.
Progress and failures come from Redis: the job record and its set of merged subtasks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .client import NEVER_APPEARED_S, POLL_S
from .client import submit as submit_job
from .shared.exceptions import ConfigError, JobNotFound, ParamsError, ProcessDistroError
from .shared.jobs import JobRecord, JobState, new_job_id
from .shared.messages import Submit
from .shared.settings import Settings
from .shared.store import client as store
from .shared.store.connection import UNAVAILABLE
from .shared.tasks import get_plugin, load_task_repo
from .shared.tasks.wasm import Source, WasmParams, WasmPlugin
from .shared.tasks.wasm_outputs import OutputError, packed_path, read_packed

log = logging.getLogger(__name__)

_FIELDS = ("state", "done", "total", "error")
# how often `as_completed` looks for merged subtasks: a map of small items is over in about a
# second, so the CLI's POLL_S (0.2 s) would be a large share of it; a look is two small reads
MAP_POLL_S = 0.03


class JobFailed(ProcessDistroError):
    """A job ended without its results: failed (`error` says why, e.g. which input exited
    with which code) or cancelled."""

    def __init__(self, job_id: str, state: JobState, error: str) -> None:
        what = "was cancelled" if state is JobState.CANCELLED else "failed"
        super().__init__(f"job {job_id} {what}: {error or 'no reason given'}")
        self.job_id = job_id
        self.state = state
        self.error = error


@dataclass(frozen=True)
class Progress:
    """Where a job is: its state and how many of its subtasks are merged (a `map` subtask
    holds many inputs)."""

    state: JobState
    done: int
    total: int
    error: str = ""


class Job:
    """A submitted job: poll it (`progress`), `wait` for it, `cancel` it."""

    def __init__(self, client: store.Redis, job_id: str, kind: str) -> None:
        self._r = client
        self.id = job_id
        self.kind = kind
        self._submitted = time.monotonic()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} ({self.kind})>"

    def _poll(self) -> Progress | None:
        fields = store.job_fields(self._r, self.id, *_FIELDS)
        if fields is None:
            if time.monotonic() - self._submitted > NEVER_APPEARED_S:
                raise ProcessDistroError(f"job {self.id} never appeared: is the scheduler running?")
            return None
        return Progress(JobState(fields["state"]), int(fields["done"] or 0), int(fields["total"] or 0), fields["error"])

    @property
    def progress(self) -> Progress:
        """The job's state and merged subtasks now (`queued`, 0 of 0 until the scheduler has
        read the submit command)."""
        return self._poll() or Progress(JobState.QUEUED, 0, 0)

    def cancel(self) -> None:
        """Ask the scheduler to cancel the job (its queued and running subtasks are dropped).
        Right after a submit, it first waits for the scheduler to have created the job."""
        while self._poll() is None:
            time.sleep(POLL_S)
        store.cancel(self._r, self.id)

    def wait(self, timeout: float | None = None) -> JobRecord:
        """Wait until the job is over and return its record (`outputs`: role -> path on the
        controller). JobFailed if it failed or was cancelled, TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = self._poll()
            if now is not None and now.state.terminal:
                if now.state is not JobState.DONE:
                    raise JobFailed(self.id, now.state, now.error)
                record = store.load_job(self._r, self.id)
                assert record is not None  # terminal jobs keep their record
                return record
            _sleep_or_timeout(deadline, f"job {self.id} is not over after {timeout} s")


class MapJob(Job):
    """`pd.map`'s job: outputs by input index, as they merge (`as_completed`) or all at once
    in input order (`results`)."""

    def __init__(
        self,
        client: store.Redis,
        job_id: str,
        *,
        inputs: int,
        groups: list[tuple[int, int]],
        outdir: Path,
        packed: bool = False,
        batch: bool = False,
    ):
        super().__init__(client, job_id, "wasm")
        self.inputs = inputs  #: how many inputs the job has
        #: where the aggregators write packed/<subtask> (or out/<index>) and manifest.jsonl
        self.outdir = outdir
        self.packed = packed  #: one file per subtask, its result envelope (`map(files=False)`)
        self.batch = batch  #: a pd-ABI module's inputs, many per subtask (packed: its batch output)
        self._groups = groups  # subtask -> (first input, inputs)

    @classmethod
    def of(cls, client: store.Redis, job_id: str, params: WasmParams) -> MapJob:
        """The job of a `map` submitted with these (parsed) parameters."""
        return cls(
            client,
            job_id,
            inputs=params.inputs,
            groups=[(first, n) for first, n, _blocks, _names in params.groups],
            outdir=Path(params.outdir),
            packed=params.packed,
            batch=params.batch,
        )

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ProcessDistroError(
                f"output {path} of job {self.id} is merged but not on this machine: the aggregator"
                " writes elsewhere; pass `outdir=` on a directory both can reach"
            ) from None

    def _outputs(self, subtask: int) -> Iterator[tuple[int, bytes]]:
        """(input index, stdout) of every input of a merged subtask."""
        first, n = self._groups[subtask]
        if not self.packed:
            for index in range(first, first + n):
                yield index, self._read(self.outdir / "out" / str(index))
            return
        try:
            outs = read_packed(self._read(packed_path(self.outdir, subtask)), batch=self.batch, inputs=n)
        except OutputError as exc:  # the aggregator checked this before merging
            raise ProcessDistroError(f"job {self.id}: subtask {subtask}: {exc}") from None
        yield from enumerate(outs, first)

    def as_completed(self, timeout: float | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield `(input index, stdout)` of every input once, as the subtasks holding them
        are merged (in no particular order). JobFailed if the job fails or is cancelled
        (after the outputs merged before that), TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: set[int] = set()
        while True:
            now = self._poll()  # before the done set: a job seen done has its whole set
            if now is not None:
                fresh = sorted(store.done_indexes(self._r, self.id) - seen) if now.done > len(seen) else []
                for subtask in fresh:
                    seen.add(subtask)
                    yield from self._outputs(subtask)
                if now.state.terminal:
                    if now.state is not JobState.DONE:
                        raise JobFailed(self.id, now.state, now.error)
                    if len(seen) == len(self._groups):
                        return
                    if not fresh:  # read after `done`: the set was complete
                        raise ProcessDistroError(f"job {self.id} is done but merged {len(seen)} subtasks")
                if fresh:
                    continue  # the consumer took a while: look again at once
            _sleep_or_timeout(
                deadline, f"job {self.id}: {len(seen)} of {len(self._groups)} subtasks after {timeout} s", MAP_POLL_S
            )

    def results(self, timeout: float | None = 600) -> list[bytes]:
        """Every input's stdout, in input order, once all are merged. JobFailed if the job
        fails (its error names the input, its exit code and the end of its stderr) or is
        cancelled; TimeoutError after `timeout` s (None: wait for ever)."""
        outputs: list[bytes | None] = [None] * self.inputs
        for index, output in self.as_completed(timeout=timeout):
            outputs[index] = output
        return [b"" if o is None else o for o in outputs]

    def manifest(self) -> list[dict[str, Any]]:
        """The finished job's `manifest.jsonl`: one record per input (exit code, node,
        sha256, how it was verified), in input order."""
        record = self.wait(timeout=0)
        path = Path(record.outputs["manifest"])
        return [json.loads(line) for line in path.read_text().splitlines() if line]


class Connection:
    """A connection to a running controller (`connect`). Use it as a context manager, or
    `close` it."""

    def __init__(self, client: store.Redis, settings: Settings) -> None:
        self._r = client
        self.settings = settings

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._r.close()

    def job(self, job_id: str) -> Job:
        """A job submitted earlier, by id (JobNotFound if there is none): a MapJob for one
        `map` submitted, so its outputs can be read again from another process."""
        record = store.load_job(self._r, job_id)
        if record is None:
            raise JobNotFound(job_id)
        if record.kind == WasmPlugin.kind and record.params.get("source") == Source.ITEMS.value:
            return MapJob.of(self._r, job_id, WasmPlugin().parse_params(record.params))
        return Job(self._r, job_id, record.kind)

    def submit(self, kind: str, *, priority: int = 0, replicate: float | None = None, **params: Any) -> Job:
        """Submit a job of any kind with the parameters its `submit <kind>` takes, named as
        the plugin's params (e.g. `submit("mandelbrot", width=2048, max_iter=500)`), checked
        here as the CLI checks them (ParamsError, nothing queued)."""
        _check_share(replicate)
        job_id = submit_job(self._r, get_plugin(kind).kind, params, priority=priority, replicate=replicate)
        return Job(self._r, job_id, kind)

    def map(
        self,
        module: str | Path | bytes | bytearray,
        inputs: Iterable[bytes | str],
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        replicate: float | None = None,
        timeout: float | None = None,
        memory: int | None = None,
        nondeterministic: bool = False,
        *,
        outdir: str | Path | None = None,
        priority: int = 0,
        seed: int | None = None,
        files: bool = False,
        batch: bool = True,
    ) -> MapJob:
        """Run `module` (a WASI command or pd-ABI module: a path or its bytes) once per input
        (bytes, or text as UTF-8: its stdin), `args` its argv after the program name, `env`
        its environment. `timeout` (s per subtask) and `memory` (MiB) are every node's limits;
        `replicate` the share of subtasks run on two nodes and compared (default 0.1);
        `nondeterministic` gives the program real randomness and clocks (and turns
        replication off). Inputs are streamed into Redis; returns once the job is submitted.
        A bad module or parameter raises ParamsError with nothing queued. Outputs are written
        one file per subtask (`OUTDIR/packed/<subtask>`, read back by the job); `files=True`
        writes `OUTDIR/out/<index>` and `err/<index>` per input instead, as `submit wasm`
        does (a file per input costs the aggregator more than a small program's run).

        A WASI command's inputs go up to 64 to a subtask (one fresh instance each); a pd-ABI
        module's up to 2,048 (`BATCH_RUNS`), as one batch a node runs in one call into the
        module when it exports `pd_run_batch` (docs/wasm-abi.md), else one `pd_run` each. A
        pd-ABI input whose `pd_run` returns a status other than 0 fails the job naming it,
        as a WASI program's non-zero exit does. `batch=False`: one pd-ABI input per subtask,
        as `submit wasm` sends them (the layout before batches)."""
        _check_share(replicate)
        job_id = new_job_id()
        target = Path(outdir) if outdir is not None else self.settings.data_path / "map" / job_id
        raw: dict[str, Any] = {
            "module": module if isinstance(module, bytes | bytearray) else str(module),
            "items": inputs,
            "args": list(args),
            "env": [f"{k}={v}" for k, v in (env or {}).items()],
            "outdir": str(target),
            "timeout_s": timeout,
            "memory_mb": memory,
            "deterministic": not nondeterministic,
            "seed": seed,
            "packed": not files,
            "batch": batch,
        }
        if nondeterministic:
            log.warning("job %s: nondeterministic: outputs cannot be compared, so no subtask is replicated", job_id)
        plugin = get_plugin("wasm")
        assert isinstance(plugin, WasmPlugin)
        writer = store.BlockWriter(self._r, job_id)
        try:
            prepared = plugin.prepare(raw, writer)
            parsed = plugin.parse_params(prepared.params)
            writer.flush()
            command = Submit(
                job_id=job_id,
                kind=plugin.kind,
                params=json.loads(parsed.model_dump_json()),
                priority=priority,
                replicate=replicate,
                created=time.time(),
            )
            store.submit(self._r, command, {}, prepared.modules)
        except BaseException:
            writer.discard()  # nothing queued: the blocks stored so far go too
            raise
        return MapJob.of(self._r, job_id, parsed)


def connect(url: str | None = None, *, home: str | Path | None = None) -> Connection:
    """Connect to a running controller: `url` (a Redis URL), else `PD_REDIS_URL`, else the
    one the running `processdistro up` wrote to `$PD_HOME/controller.json` (`home` instead
    of `$PD_HOME`). ConfigError if none is found or it does not answer.

    The settings are read here, from the environment, as `processdistro`'s `main` reads them:
    a Python program that imports the package is an entry point like the CLI, the edge where
    settings may be read, and it should find the controller exactly as `processdistro
    submit` run from the same shell would. Nothing below this reads the environment.
    """
    settings = Settings() if home is None else Settings(home=Path(home))
    load_task_repo(settings.task_repo)  # `pd.submit("<repo kind>")`, as the CLI knows them
    resolved = url or settings.resolved_redis_url()
    if not resolved:
        raise ConfigError(
            f"no controller found: start `processdistro up` (it writes {settings.controller_file}), "
            "set PD_REDIS_URL, or pass connect(url=...)"
        )
    client = store.connect(resolved, retry=False)
    try:
        client.ping()
    except UNAVAILABLE as exc:
        client.close()
        raise ConfigError(f"cannot reach Redis at {resolved}: {exc}") from None
    client.close()
    return Connection(store.connect(resolved), settings)


def _check_share(replicate: float | None) -> None:
    if replicate is not None and not 0 <= replicate <= 1:
        raise ParamsError(f"expected replicate from 0 to 1, got {replicate}")


def _sleep_or_timeout(deadline: float | None, message: str, poll_s: float = POLL_S) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(message)
    time.sleep(poll_s)


__all__ = ["Connection", "Job", "JobFailed", "MapJob", "Progress", "connect"]
