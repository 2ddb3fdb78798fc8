"""Task plugins by kind."""

from __future__ import annotations

from typing import Any

from ..exceptions import ParamsError
from .base import JobFiles, TaskPlugin, Verdict
from .mandelbrot import MandelbrotPlugin

PLUGINS: dict[str, TaskPlugin[Any]] = {p.kind: p for p in (MandelbrotPlugin(),)}


def get_plugin(kind: str) -> TaskPlugin[Any]:
    try:
        return PLUGINS[kind]
    except KeyError:
        raise ParamsError(f"unknown task kind {kind!r}; known: {', '.join(sorted(PLUGINS))}") from None


__all__ = ["PLUGINS", "JobFiles", "TaskPlugin", "Verdict", "get_plugin"]
