"""The outputs of a `wasm` job: a node's result bytes read as one result per input, and the
packed files (`OUTDIR/packed/<subtask>`) `pd.map` reads back, as `wasm_inputs.py` is for the
inputs.

A node's result for a subtask is, by the module's kind and the job's layout:

- a WASI command: a result envelope (`shared/wasi.py`), one run per input;
- a pd-ABI module, one input per subtask: the module's output bytes as they are (a failed
  run never returns a result: the node reports the subtask failed);
- a pd-ABI module, a batch of inputs per subtask (`WasmParams.batch`, what `pd.map` sends):
  a batch output (`shared/pd_batch.py`), each input's `pd_run` status and output. A status
  other than 0 is that input's exit code, as a WASI program's: it fails the job naming the
  input (once a second node agrees, `TaskPlugin.confirm`) unless `--keep-going`.

A packed file is the node's result envelope for a WASI command, the batch output as the node
returned it for a batch, and a one-run result envelope for a lone pd-ABI input.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..pd_batch import BatchError, decode_results
from ..wasi import TRAPPED, ResultEnvelope, RunResult
from .base import atomic_write

PACKED = "packed"  # a packed job's outputs: OUTDIR/packed/<subtask>, one file each
STATUS_MEANING = {1: "input length wrong", 2: "bad parameters", 3: "out of memory"}


class OutputError(ValueError):
    """A node's result that does not hold what its subtask asks for."""


def node_results(*, wasi: bool, batch: bool, output: bytes, inputs: int) -> tuple[RunResult, ...]:
    """One RunResult per input of a subtask of `inputs` inputs, from a node's `output`;
    OutputError if it is malformed or holds another number of results."""
    try:
        if wasi:
            runs = ResultEnvelope.decode(output).runs
        elif batch:
            runs = tuple(RunResult(status, out, _status_text(status)) for status, out in decode_results(output))
        else:
            runs = (RunResult(0, output),)  # a failed pd-ABI run never returns a result
    except (BatchError, ValueError) as exc:  # EnvelopeError is a ValueError
        raise OutputError(str(exc)) from None
    if len(runs) != inputs:
        raise OutputError(f"{len(runs)} results for {inputs} inputs")
    return runs


def packed_bytes(*, wasi: bool, batch: bool, output: bytes, runs: tuple[RunResult, ...]) -> bytes:
    """What a packed job writes for a subtask: the node's result as it came where it can be
    read back as it is (a result envelope, a batch output), else a result envelope."""
    return output if wasi or batch else ResultEnvelope(runs).encode()


def read_packed(data: bytes, *, batch: bool, inputs: int) -> list[bytes]:
    """The output (stdout) of each input of a packed file; OutputError if it does not hold
    `inputs` of them."""
    try:
        if batch:
            outs = [out for _status, out in decode_results(data, inputs)]
        else:
            outs = [run.stdout for run in ResultEnvelope.decode(data).runs]
    except (BatchError, ValueError) as exc:
        raise OutputError(str(exc)) from None
    if len(outs) != inputs:
        raise OutputError(f"{len(outs)} outputs, not {inputs}")
    return outs


def manifest_lines(first: int, labels: list[str], runs: tuple[RunResult, ...], common: dict[str, Any]) -> str:
    """The manifest's lines for a subtask's inputs (`first` the index of the first): per input,
    the JSON object `{"input", "index", "exit_code", "bytes", "sha256", **common}` as
    `json.dumps` writes it, built from pieces (the common part encoded once per subtask: a
    batch holds thousands of inputs)."""
    tail = json.dumps(common)[1:]  # '"node": ..., ...}'
    sha256, dumps = hashlib.sha256, json.dumps
    return "".join(
        f'{{"input": {dumps(label)}, "index": {first + k}, "exit_code": {run.exit_code}, '
        f'"bytes": {len(run.stdout)}, "sha256": "{sha256(run.stdout).hexdigest()}", {tail}\n'
        for k, (label, run) in enumerate(zip(labels, runs, strict=True))
    )


def packed_path(outdir: str | Path, index: int) -> Path:
    """Where a packed job's subtask `index` is written."""
    return Path(outdir) / PACKED / f"{index:09d}"


def write(path: Path, data: bytes, *, durable: bool = False) -> None:
    """`data` at `path` (its directory made), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data), durable=durable)


def exit_text(code: int) -> str:
    """How a failed input's exit code reads in a job's summary and error."""
    return "trapped" if code == TRAPPED else f"exited with code {code}"


def manifest_rows(outputs: dict[str, str]) -> list[dict[str, Any]]:
    """The records of a finished job's manifest (`outputs["manifest"]`), in input order."""
    path = Path(outputs["manifest"])
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _status_text(status: int) -> bytes:
    if status == 0:
        return b""
    return f"pd_run returned status {status} ({STATUS_MEANING.get(status, 'task-specific failure')})".encode()


__all__ = [
    "PACKED",
    "OutputError",
    "exit_text",
    "manifest_lines",
    "manifest_rows",
    "node_results",
    "packed_bytes",
    "packed_path",
    "read_packed",
    "write",
]
