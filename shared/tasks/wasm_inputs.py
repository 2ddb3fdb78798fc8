"""The user's side of a `wasm` job, read where `submit` runs: the module file and the
inputs (files and directories, lines of a file, items from Python), with the refusals a user
should see before anything is queued."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from ..exceptions import ParamsError
from ..wasm_module import WASM_MAGIC, check_size, inspect

MAX_INPUT_BYTES = 256 * 1024 * 1024


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
