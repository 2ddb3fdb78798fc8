"""Task plugins by kind."""

from __future__ import annotations

from typing import Any

from ..exceptions import ParamsError
from .base import JobFiles, Prepared, Subtask, TaskPlugin, Verdict
from .crack import CrackPlugin
from .hashing import HashPlugin
from .mandelbrot import MandelbrotPlugin
from .matmul import MatmulPlugin

PLUGINS: dict[str, TaskPlugin[Any]] = {
    p.kind: p for p in (MandelbrotPlugin(), MatmulPlugin(), HashPlugin(), CrackPlugin())
}


def get_plugin(kind: str) -> TaskPlugin[Any]:
    try:
        return PLUGINS[kind]
    except KeyError:
        raise ParamsError(f"unknown task kind {kind!r}; known: {', '.join(sorted(PLUGINS))}") from None


__all__ = ["PLUGINS", "JobFiles", "Prepared", "Subtask", "TaskPlugin", "Verdict", "get_plugin"]
