"""The user's side of a `wasm` job, read where `submit` runs: the module file and the
inputs (files and directories, lines of a file, items from Python), with the refusals a user
should see before anything is queued; and the inputs cut into subtasks and their blocks
(`cut_groups`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from ..exceptions import ParamsError
from ..pd_batch import encode_batch
from ..wasi import RunEnvelope
from ..wasm_module import WASM_MAGIC, check_size, inspect

MAX_INPUT_BYTES = 256 * 1024 * 1024
GROUP_RUNS = 64  # inputs per subtask at most
GROUP_BYTES = 1024 * 1024  # stdin bytes per subtask at most (a larger input is a subtask alone)
# A batch of pd-ABI inputs (`WasmParams.batch`): a node runs it in one call, so a subtask may
# hold many more than a WASI group (whose every input is a fresh instance); a gateway still
# gives a fast node several subtasks per task (`adaptive`).
BATCH_RUNS = 2048
BATCH_BYTES = 256 * 1024
_EMPTY_HEAD = len(RunEnvelope((), (), ()).encode()) - 4  # an envelope's bytes before its runs count

#: Where `prepare` puts each block as it is cut: (sha256, bytes). The Python API passes one
#: that writes them to Redis in bounded chunks, so a generator of a million inputs is never
#: held in memory at once; without one, `prepare` collects them in `Prepared.blocks`.
BlockSink = Callable[[str, bytes], None]


def safe_relative(name: str) -> bool:
    """May `name` be a path under out/ (relative, no `..`, no backslash)?"""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def walk_inputs(paths: Iterable[Path]) -> Iterator[tuple[str, Path]]:
    """(relative name, file) of every input: a file as its own name, a directory's files by
    their path inside it (sorted, recursively). Refuses a missing path and a name twice."""
    seen: dict[str, Path] = {}
    for given in paths:
        root = Path(os.path.expanduser(str(given)))
        if root.is_dir():
            found = sorted(
                (Path(d) / f).relative_to(root).as_posix() for d, _dirs, files in os.walk(root) for f in files
            )
            pairs = [(name, root / name) for name in found]
        elif root.is_file():
            pairs = [(root.name, root)]
        else:
            raise ParamsError(f"input {given} is neither a file nor a directory")
        for name, path in pairs:
            if name in seen:
                raise ParamsError(f"two inputs would both write out/{name}: {seen[name]} and {path}")
            seen[name] = path
            yield name, path


def read_input(path: Path) -> bytes:
    """One input file, refused above `MAX_INPUT_BYTES`."""
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise ParamsError(f"input {path} is {size} bytes, more than the {MAX_INPUT_BYTES} an input may be")
        return path.read_bytes()
    except OSError as exc:
        raise ParamsError(f"cannot read input {path}: {exc}") from None


def read_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """(the line as text, stdin) of each line: the line and a newline, as `echo` gives it."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                line = raw.rstrip(b"\n").rstrip(b"\r")
                yield line.decode("utf-8", errors="replace")[:200], line + b"\n"
    except OSError as exc:
        raise ParamsError(f"cannot read {path}: {exc}") from None


def read_module(path: Path) -> bytes:
    """The module's bytes, its size checked before it is read whole."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(WASM_MAGIC))
            if head != WASM_MAGIC:
                inspect(head, name=path.name)  # refuses: not WebAssembly
            check_size(os.fstat(fh.fileno()).st_size, name=path.name)
            return head + fh.read()
    except OSError as exc:
        raise ParamsError(f"cannot read module {path}: {exc}") from None


def python_item(index: int, item: object) -> bytes:
    """One input from Python: bytes as they are, text as UTF-8."""
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    raise ParamsError(f"input {index} is a {type(item).__name__}: expected bytes or str")


def runs_section(stdins: tuple[bytes, ...]) -> bytes:
    """The end of a run envelope: the runs count and one stdin per run."""
    return RunEnvelope((), (), stdins).encode()[_EMPTY_HEAD:]


def cut_groups(
    items: Iterable[tuple[str, bytes]],
    wasi: bool,
    batch: bool,
    named: bool,
    store_block: BlockSink,
    groups: list[tuple[int, int, str, str]],
) -> int:
    """Cut the inputs into subtasks (consecutive ones, up to GROUP_RUNS and GROUP_BYTES;
    BATCH_RUNS and BATCH_BYTES for a batch; one each for another pd-ABI module) and their
    blocks (the inputs; with `named`, their names too), each handed to `store_block` as it is
    cut (only one subtask's inputs are held); appends `(first input, inputs, inputs block,
    names block or "")` to `groups` and returns how many inputs there were."""
    names: list[str] = []
    stdins: list[bytes] = []
    total = 0

    def add(data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        store_block(sha, data)
        return sha

    def flush() -> None:
        body = add(runs_section(tuple(stdins)) if wasi else encode_batch(stdins) if batch else stdins[0])
        groups.append((total - len(stdins), len(stdins), body, add(json.dumps(names).encode()) if named else ""))
        names.clear()
        stdins.clear()

    size = 0
    most, most_bytes = (BATCH_RUNS, BATCH_BYTES) if batch else (GROUP_RUNS if wasi else 1, GROUP_BYTES)
    for name, data in items:
        if stdins and (len(stdins) == most or size + len(data) > most_bytes):
            flush()
            size = 0
        names.append(name)
        stdins.append(data)
        size += len(data)
        total += 1
    if stdins:
        flush()
    return total
