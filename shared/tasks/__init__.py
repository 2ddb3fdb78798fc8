"""Task plugins by kind.

`PLUGINS` is the one registry: the scheduler, gateways and aggregators look a job's kind up
in it, and the CLI builds one `submit <kind>` subcommand per entry. A new kind is a module
with a `TaskPlugin` subclass, added to the tuple below (or `register`ed at import time by
code that runs before the CLI builds its parser, such as a test).
"""

from __future__ import annotations

from typing import Any

from ..exceptions import ParamsError
from .base import Checked, JobFiles, Origin, Prepared, Subtask, TaskPlugin, Verdict
from .crack import CrackPlugin
from .hashing import HashPlugin
from .mandelbrot import MandelbrotPlugin
from .matmul import MatmulPlugin
from .wasm import WasmPlugin

PLUGINS: dict[str, TaskPlugin[Any]] = {
    p.kind: p for p in (MandelbrotPlugin(), MatmulPlugin(), HashPlugin(), CrackPlugin(), WasmPlugin())
}


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
