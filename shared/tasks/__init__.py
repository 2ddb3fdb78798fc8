"""Task plugins by kind.

`PLUGINS` is the one registry: the scheduler, gateways and aggregators look a job's kind up
in it, and the CLI builds one `submit <kind>` subcommand per entry. A new kind is a module
with a `TaskPlugin` subclass, added to the tuple below (or `register`ed at import time by
code that runs before the CLI builds its parser, such as a test). A task repo's kinds
(`PD_TASK_REPO`: `repo.py`) join it through `load_task_repo`, which every process that
handles jobs calls once, before it reads `PLUGINS` (`processdistro.main` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..exceptions import ParamsError
from .base import Checked, JobFiles, Origin, Prepared, Subtask, TaskPlugin, Verdict
from .crack import CrackPlugin
from .hashing import HashPlugin
from .mandelbrot import MandelbrotPlugin
from .matmul import MatmulPlugin
from .repo import Broken, RepoReport, WasmKind, scan
from .wasm import WasmPlugin

PLUGINS: dict[str, TaskPlugin[Any]] = {
    p.kind: p for p in (MandelbrotPlugin(), MatmulPlugin(), HashPlugin(), CrackPlugin(), WasmPlugin())
}

BUILTIN: frozenset[str] = frozenset(PLUGINS)
_REPO = RepoReport()


def load_task_repo(path: Path | None) -> RepoReport:
    """Register the kinds of the task repo at `path` (Settings.task_repo; None: no repo) and
    return what was found, broken kinds included. Once per path: calling it again returns
    the first report; another path replaces the first one's kinds."""
    global _REPO
    if path is None or path == _REPO.path:
        return _REPO
    for kind in _REPO.plugins:
        unregister(kind)
    _REPO = scan(path, taken=frozenset(PLUGINS))
    for plugin in _REPO.plugins.values():
        PLUGINS[plugin.kind] = plugin
    return _REPO


def task_repo() -> RepoReport:
    """What `load_task_repo` loaded (an empty report if nothing was)."""
    return _REPO


def register(plugin: TaskPlugin[Any]) -> None:
    """Add a plugin under its kind; refuses a kind that is taken. Every process that handles
    the kind (CLI, scheduler, gateways, aggregators) must register it."""
    if plugin.kind in PLUGINS:
        raise ValueError(f"task kind {plugin.kind!r} is registered already")
    PLUGINS[plugin.kind] = plugin


def unregister(kind: str) -> None:
    """Remove a kind (tests that registered one)."""
    PLUGINS.pop(kind, None)


_PARSED: dict[str, tuple[TaskPlugin[Any], Any]] = {}
_PARSED_MAX = 256


def plugin_and_params(job_id: str, kind: str, raw: dict[str, Any]) -> tuple[TaskPlugin[Any], Any]:
    """A job's plugin and validated params. A job's params never change after submit, so
    they are validated once per process, not on every result (some hold long block lists)."""
    cached = _PARSED.get(job_id)
    if cached is None:
        plugin = get_plugin(kind)
        cached = (plugin, plugin.parse_params(raw))
        if len(_PARSED) >= _PARSED_MAX:
            del _PARSED[next(iter(_PARSED))]  # the oldest job first
        _PARSED[job_id] = cached
    return cached


def get_plugin(kind: str) -> TaskPlugin[Any]:
    try:
        return PLUGINS[kind]
    except KeyError:
        raise ParamsError(f"unknown task kind {kind!r}; known: {', '.join(sorted(PLUGINS))}") from None


__all__ = [
    "BUILTIN",
    "Broken",
    "RepoReport",
    "WasmKind",
    "load_task_repo",
    "task_repo",
    "plugin_and_params",
    "PLUGINS",
    "Checked",
    "Origin",
    "JobFiles",
    "Prepared",
    "Subtask",
    "TaskPlugin",
    "Verdict",
    "get_plugin",
    "register",
    "unregister",
]
