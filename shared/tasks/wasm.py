"""`wasm`: the user's own WebAssembly program, run over many inputs, outputs checked by
replication.

`processdistro submit wasm MODULE.wasm [--arg A]... [--env K=V]... INPUTS -o OUTDIR`, where
INPUTS is `--inputs PATH...` (files; directories walked recursively, one run per file, its
relative path kept), `--lines FILE` (one run per line: the line and a newline on stdin) or
`--count N` (N runs, empty stdin, `PD_INDEX=<i>` in the environment).

The CLI (`prepare`) inspects the module (`shared.wasm_module`: refused before anything is
stored), uploads it (`Prepared.modules`, stored once by content) and stores the inputs as job
blocks, so the scheduler splits lazily without the user's files. Many small inputs share a
subtask: consecutive inputs, up to `GROUP_RUNS` or `GROUP_BYTES`, are one block holding the
runs section of a run envelope (`shared/wasi.py`); the subtask's inline bytes are the head
(argv, env, seed), so inline + block is the envelope a node runs. `--count` runs differ in
their environment, which an envelope holds once, so each is a subtask of its own. A pd-ABI
module (docs/wasm-abi.md) gets one input per subtask, its bytes as they are; with
`WasmParams.batch` (what `pd.map` asks for) up to `BATCH_RUNS` of them per subtask instead, as
one batch input (`shared/pd_batch.py`) that a node runs in one call into the module when it
exports `pd_run_batch`. How a node's result reads as one result per input, and what a packed
job writes: `wasm_outputs.py`.

Results go where the user asked, as each subtask merges: `OUTDIR/out/<relative path>` (for
`--lines`/`--count`: `OUTDIR/out/<index>`) with stdout, `OUTDIR/err/<same>` with stderr when
there is any; finalize writes `OUTDIR/manifest.jsonl`, one line per input in input order. So
`pd.map` writes one file per subtask instead (`WasmParams.packed`: `OUTDIR/packed/<subtask>`,
the result envelope as the node returned it, which the API splits). OUTDIR must be where
the aggregators run (with compose: on the shared data volume), as
crack's wordlist must be where the scheduler runs. A run that exits non-zero or traps fails
the job, naming it, unless `--keep-going`: then the manifest records it and `submit --wait`
exits non-zero.

Deterministic by default (seeded randomness, a stepped clock: any two nodes give the same
bytes), so a share of the subtasks (`DEFAULT_REPLICATE`, more than the built-in kinds: a
user's program has no cheap check) runs on two nodes and is compared. `--nondeterministic`
turns that off. `--timeout` and `--memory` become every task's limits (`TaskPlugin.limits`):
the node stops a run past its deadline or over its memory cap and reports it failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import secrets
import sys
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..exceptions import ParamsError
from ..protocol import MAX_DEADLINE_S, MAX_MEMORY_MB
from ..wasi import RunEnvelope, RunResult
from ..wasm_module import ModuleKind, inspect
from .base import Checked, JobFiles, Origin, Prepared, Subtask, TaskLimits, TaskPlugin, Verdict
from .wasm_inputs import (
    BATCH_RUNS,
    GROUP_RUNS,
    BlockSink,
    cut_groups,
    python_item,
    read_input,
    read_lines,
    read_module,
    runs_section,
    safe_relative,
    walk_inputs,
)
from .wasm_outputs import (
    PACKED,
    OutputError,
    exit_text,
    manifest_lines,
    manifest_rows,
    node_results,
    packed_bytes,
    packed_path,
    write,
)

DEFAULT_REPLICATE = 0.1
STDERR_IN_ERROR = 400  # characters of stderr a failed job's message ends with
FAILED_NAMED = 20  # failed inputs `summary` names
MANIFEST = "manifest.jsonl"


class Source(StrEnum):
    """Where the inputs came from, which decides their names."""

    INPUTS = "inputs"  # files: named by relative path
    LINES = "lines"  # lines of a file: out/<index>, the manifest shows the line
    COUNT = "count"  # no input: out/<index>, PD_INDEX in the environment
    ITEMS = "items"  # byte strings from Python: out/<index>


class WasmParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    module: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the uploaded module")
    module_kind: ModuleKind
    program: str = Field(default="main.wasm", min_length=1, description="argv[0]")
    args: list[str] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list, description="KEY=VALUE")
    source: Source
    inputs: int = Field(ge=1, description="how many runs")
    # per subtask: [first input, inputs, stdins block, names block ("" if none)]; none for count
    groups: list[tuple[int, int, str, str]] = Field(default_factory=list)
    outdir: str
    keep_going: bool = False
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S)
    memory_mb: int | None = Field(default=None, ge=1, le=MAX_MEMORY_MB)
    deterministic: bool = True
    seed: int = Field(default=0, ge=0, lt=2**64)
    #: outputs one file per subtask (`packed/<subtask>`, its result envelope) instead of
    #: out/<input> and err/<input> per input: what `pd.map` reads (`packed_path`)
    packed: bool = False
    #: a pd-ABI module's inputs go up to BATCH_RUNS to a subtask, as one batch input
    #: (shared/pd_batch.py), instead of one per subtask: what `pd.map` asks for
    batch: bool = False

    @field_validator("env")
    @classmethod
    def _env(cls, v: list[str]) -> list[str]:
        for item in v:
            if "=" not in item or item.startswith("="):
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
        return v

    @field_validator("outdir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError(f"expected an absolute path, got {v!r}")
        return v

    @model_validator(mode="after")
    def _groups(self) -> WasmParams:
        if self.batch and self.module_kind is not ModuleKind.PD_ABI:
            raise ValueError("only a pd-ABI module's inputs are batched")
        if self.source is Source.COUNT:
            if self.groups:
                raise ValueError("a --count job has no input groups")
            return self
        expected = 0
        for first, n, _stdins, _names in self.groups:
            if first != expected or n < 1:
                raise ValueError(f"input groups must follow each other from 0, got one at {first} of {n}")
            expected += n
        if expected != self.inputs:
            raise ValueError(f"the groups hold {expected} inputs, not {self.inputs}")
        return self


def subtask_seed(seed: int, index: int) -> int:
    """The run envelope seed of subtask `index` of a job seeded `seed`: stable, so every copy
    of a subtask (replicas, retries) draws the same numbers."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")


def envelope_head(params: WasmParams, index: int, extra_env: tuple[str, ...] = ()) -> bytes:
    """A subtask's run envelope up to its runs: magic, flags, seed, argv, env."""
    argv = (params.program, *params.args)
    env = (*params.env, *extra_env)
    head = RunEnvelope(argv, env, (), subtask_seed(params.seed, index), params.deterministic).encode()
    return head[:-4]  # without the runs count of an envelope of no runs


class WasmPlugin(TaskPlugin[WasmParams]):
    """run your own WebAssembly program (WASI command or pd-ABI) over many inputs"""

    kind = "wasm"
    module = ""  # none from the registry: each job brings its own (`module_sha`)
    params_model = WasmParams
    main_output = "manifest"
    # Subtasks of consecutive small inputs are parts: a gateway gives each node as many per
    # task as fit PD_TARGET_TASK_S at its measured speed, as for hash and crack, so a fast
    # node is not held back by one task frame per subtask.
    adaptive = True
    _last: tuple[bytes, tuple[str, int], tuple[RunResult, ...]] | None = None

    # ------------------------------------------------------------ the command line

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("module", type=Path, metavar="MODULE.wasm", help="a WASI command or a pd-ABI module")
        parser.add_argument(
            "--arg", action="append", default=[], metavar="A", help="one argument for the program (--arg=-x for flags)"
        )
        parser.add_argument("--env", action="append", default=[], metavar="K=V", help="one environment variable")
        inputs = parser.add_mutually_exclusive_group(required=True)
        inputs.add_argument("--inputs", nargs="+", type=Path, metavar="PATH", help="files or directories: a run each")
        inputs.add_argument("--lines", type=Path, metavar="FILE", help="a run per line, the line on stdin")
        inputs.add_argument("--count", type=int, metavar="N", help="N runs, empty stdin, PD_INDEX set")
        parser.add_argument(
            "-o",
            "--output",
            dest="outdir",
            type=Path,
            required=True,
            metavar="OUTDIR",
            help="where out/, err/ and manifest.jsonl are written, as subtasks merge (by the aggregators)",
        )
        parser.add_argument("--keep-going", action="store_true", help="a failing input does not fail the job")
        parser.add_argument(
            "--timeout", dest="run_timeout", type=float, metavar="S", help="seconds a subtask may run on a node"
        )
        parser.add_argument("--memory", type=int, metavar="MB", help="memory limit of the program")
        parser.add_argument(
            "--nondeterministic",
            action="store_true",
            help="real randomness and clocks (turns replication off; default --replicate for wasm: 0.1)",
        )
        parser.add_argument("--seed", type=int, help="the job's seed, to draw the same numbers again (none: random)")

    def params_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        if args.nondeterministic:
            print(
                "warning: --nondeterministic: outputs cannot be compared, so no subtask is replicated;"
                " results are checked by no second node",
                file=sys.stderr,
            )
        raw: dict[str, Any] = {
            "module": str(args.module),
            "args": list(args.arg),
            "env": list(args.env),
            "outdir": str(args.outdir),
            "keep_going": args.keep_going,
            "timeout_s": args.run_timeout,
            "memory_mb": args.memory,
            "deterministic": not args.nondeterministic,
            "seed": args.seed,
        }
        if args.inputs is not None:
            raw["inputs"] = [str(p) for p in args.inputs]
        elif args.lines is not None:
            raw["lines"] = str(args.lines)
        else:
            raw["count"] = args.count
        return raw

    def summary(self, outputs: dict[str, str]) -> list[str]:
        rows = manifest_rows(outputs)
        failed = [r for r in rows if r["exit_code"] != 0]
        lines = [f"{len(rows)} inputs, {len(failed)} failed; outputs in {outputs.get('out', '?')}"]
        for r in failed[:FAILED_NAMED]:
            lines.append(f"failed: {r['input']} (index {r['index']}): {exit_text(r['exit_code'])}")
        if len(failed) > FAILED_NAMED:
            lines.append(f"... and {len(failed) - FAILED_NAMED} more (see {outputs['manifest']})")
        return lines

    def exit_code(self, outputs: dict[str, str]) -> int:
        return 1 if any(r["exit_code"] != 0 for r in manifest_rows(outputs)) else 0

    # ------------------------------------------------------------ submit

    def prepare(self, raw: dict[str, Any], store_block: BlockSink | None = None) -> Prepared:
        """Inspect the module and cut the inputs into subtasks and blocks. `raw["module"]` is
        a path, or the module's bytes (`raw["program"]` names it, default main.wasm);
        `raw["items"]` (Python API) any iterable of bytes, read once, lazily. With
        `store_block`, each block goes there as it is cut and `Prepared.blocks` is empty."""
        if isinstance(raw["module"], bytes | bytearray | memoryview):
            program = str(raw.get("program") or "main.wasm")
            data = bytes(raw["module"])
        else:
            module_path = Path(os.path.expanduser(str(raw["module"])))
            program, data = module_path.name, read_module(module_path)
        info = inspect(data, name=program)
        wasi = info.kind is ModuleKind.WASI_COMMAND
        batch = bool(raw.get("batch")) and not wasi  # a WASI command's inputs share an envelope already
        if not wasi and (raw.get("args") or raw.get("env") or raw.get("count") is not None):
            raise ParamsError(f"{program} is a pd-ABI module: it takes no --arg, --env or --count")
        outdir = Path(os.path.expanduser(str(raw["outdir"]))).resolve()
        for sub in ("out", PACKED):
            if (outdir / sub).exists() and any((outdir / sub).iterdir()):
                raise ParamsError(f"{outdir}/{sub} holds an earlier job's outputs: choose another -o or remove them")
        blocks: dict[str, bytes] = {}
        groups: list[tuple[int, int, str, str]] = []
        if raw.get("count") is not None:
            source, total = Source.COUNT, int(raw["count"])
            if total < 1:
                raise ParamsError(f"--count must be at least 1, got {total}")
        else:
            if raw.get("inputs") is not None:
                source = Source.INPUTS
                items: Iterable[tuple[str, bytes]] = (
                    (name, read_input(path)) for name, path in walk_inputs(Path(p) for p in raw["inputs"])
                )
            elif raw.get("lines") is not None:
                source, items = Source.LINES, read_lines(Path(os.path.expanduser(str(raw["lines"]))))
            else:
                source, items = (
                    Source.ITEMS,
                    ((str(i), python_item(i, b)) for i, b in enumerate(raw.get("items") or ())),
                )
            named = source in (Source.INPUTS, Source.LINES)
            total = cut_groups(items, wasi, batch, named, store_block or blocks.__setitem__, groups)
            if total == 0:
                raise ParamsError("no inputs: the files, directories or lines given hold none")
        seed = raw.get("seed")
        params = {
            "module": info.sha256,
            "module_kind": info.kind.value,
            "program": program,
            "args": list(raw.get("args") or []),
            "env": list(raw.get("env") or []),
            "source": source.value,
            "inputs": total,
            "groups": groups,
            "outdir": str(outdir),
            "keep_going": bool(raw.get("keep_going")),
            "timeout_s": raw.get("timeout_s"),
            "memory_mb": raw.get("memory_mb"),
            "deterministic": bool(raw.get("deterministic", True)),
            "seed": secrets.randbits(63) if seed is None else int(seed),
            "packed": bool(raw.get("packed")),
            "batch": batch,
        }
        self.parse_params(params)  # a bad --env or --timeout is refused here, with nothing stored
        return Prepared(params=params, blocks=blocks, modules=[data])

    # ------------------------------------------------------------ the controller

    def limits(self, params: WasmParams) -> TaskLimits:
        """`--timeout` and `--memory` travel with every task to the node, which enforces them."""
        return TaskLimits(deadline_s=params.timeout_s, memory_mb=params.memory_mb)

    def module_sha(self, params: WasmParams) -> str | None:
        return params.module

    def replication(self, params: WasmParams, requested: float | None, default: float) -> float:
        if not params.deterministic:
            return 0.0  # two honest runs differ: comparing them proves nothing
        return max(default, DEFAULT_REPLICATE) if requested is None else requested

    def count(self, params: WasmParams) -> int:
        return params.inputs if params.source is Source.COUNT else len(params.groups)

    def split(self, params: WasmParams, start: int = 0) -> Iterator[Subtask]:
        if params.source is Source.COUNT:
            for i in range(start, params.inputs):
                yield Subtask(envelope_head(params, i, (f"PD_INDEX={i}",)) + runs_section((b"",)))
            return
        wasi = params.module_kind is ModuleKind.WASI_COMMAND
        for index in range(start, len(params.groups)):
            stdins = params.groups[index][2]
            yield Subtask(envelope_head(params, index) if wasi else b"", (stdins,))

    def _runs(self, params: WasmParams, index: int) -> tuple[int, int]:
        """(first input, inputs) of subtask `index`."""
        if params.source is Source.COUNT:
            return index, 1
        first, n, _stdins, _names = params.groups[index]
        return first, n

    def _results(self, params: WasmParams, index: int, output: bytes) -> tuple[RunResult, ...]:
        # verify, confirm, failure and merge each read the same result of a subtask in turn:
        # the last one read is kept (by identity: the same bytes object of the same subtask)
        last = self._last
        if last is not None and last[0] is output and last[1] == (params.module, index):
            return last[2]
        wasi = params.module_kind is ModuleKind.WASI_COMMAND
        runs = node_results(wasi=wasi, batch=params.batch, output=output, inputs=self._runs(params, index)[1])
        self._last = (output, (params.module, index), runs)
        return runs

    def verify(self, params: WasmParams, index: int, task_input: bytes, output: bytes, rng: random.Random) -> Verdict:
        # a user's program has no cheap check beyond the shape of its result: replication
        # compares whole results instead
        try:
            self._results(params, index, output)
        except OutputError:
            return Verdict.REJECT
        return Verdict.ACCEPT

    def _labels(self, files: JobFiles, params: WasmParams, index: int) -> list[tuple[str, str]]:
        """(manifest input, path under out/) of each input of subtask `index`."""
        first, n = self._runs(params, index)
        indexes = [str(first + k) for k in range(n)]
        if params.source is Source.COUNT:
            return [(f"PD_INDEX={i}", i) for i in indexes]
        names_block = params.groups[index][3]
        names: list[str] = json.loads(files.read_block(names_block)) if names_block else indexes
        if params.source is Source.INPUTS:
            # a name from a hand-made submit that would leave out/ is written by index
            return [(name, name if safe_relative(name) else i) for name, i in zip(names, indexes, strict=True)]
        return list(zip(names, indexes, strict=True))

    def merge(self, files: JobFiles, params: WasmParams, index: int, output: bytes) -> None:
        self.merge_result(files, params, index, output, Origin("", 0.0, Checked.SINGLE))

    def merge_result(self, files: JobFiles, params: WasmParams, index: int, output: bytes, origin: Origin) -> None:
        runs = self._results(params, index, output)
        first, _n = self._runs(params, index)
        outdir = Path(params.outdir)
        if params.packed:  # one file for the subtask, whatever its inputs: the result as it came
            wasi = params.module_kind is ModuleKind.WASI_COMMAND
            write(
                packed_path(params.outdir, index), packed_bytes(wasi=wasi, batch=params.batch, output=output, runs=runs)
            )
        labels = self._labels(files, params, index)
        if not params.packed:
            for (_label, rel), run in zip(labels, runs, strict=True):
                write(outdir / "out" / rel, run.stdout)
                err = outdir / "err" / rel
                if run.stderr:
                    write(err, run.stderr)
                else:
                    err.unlink(missing_ok=True)  # a result merged again (after a ban) may have none
        common: dict[str, Any] = {
            "node": origin.node,
            "elapsed_ms": round(origin.elapsed_ms, 1),  # of the whole subtask
            "verified": origin.checked.value,
            "subtask": index,
        }
        if len(origin.agreeing) > 1:
            common["nodes"] = list(origin.agreeing)
        lines = manifest_lines(first, [label for label, _rel in labels], runs, common)
        write(files.path(f"runs/{index:09d}.jsonl"), lines.encode())

    def confirm(self, params: WasmParams, index: int, output: bytes) -> bool:
        # a failed run counts once a second node agrees; without determinism, no two agree
        return params.deterministic and any(run.exit_code != 0 for run in self._results(params, index, output))

    def failure(self, files: JobFiles, params: WasmParams, index: int, output: bytes) -> str | None:
        if params.keep_going:
            return None
        runs = self._results(params, index, output)
        for (label, _rel), run in zip(self._labels(files, params, index), runs, strict=True):
            if run.exit_code != 0:
                tail = run.stderr.decode("utf-8", errors="replace")[-STDERR_IN_ERROR:].strip()
                return f"input {label!r} {exit_text(run.exit_code)}; stderr ends: {tail or '(empty)'}"
        return None

    def finalize(self, files: JobFiles, params: WasmParams) -> dict[str, str]:
        outdir = Path(params.outdir)
        lines = [files.path(f"runs/{index:09d}.jsonl").read_bytes() for index in range(self.count(params))]
        # rewritten whole each time, from the per-subtask records (the manifest's own lines),
        # which are never removed: a second finalize writes the same bytes (a manifest left in
        # the user's outdir by another job is not kept)
        manifest = outdir / MANIFEST
        write(manifest, b"".join(lines), durable=True)
        return {"manifest": str(manifest), "out": str(outdir / (PACKED if params.packed else "out"))}


__all__ = [
    "BATCH_RUNS",
    "DEFAULT_REPLICATE",
    "GROUP_RUNS",
    "BlockSink",
    "WasmParams",
    "WasmPlugin",
    "envelope_head",
    "runs_section",
    "subtask_seed",
]
