"""Heavy libraries imported on first use, not at import time (issue 11, goal 5).

numpy, wasmtime and Pillow cost a service or a CLI command a good part of its start, yet
most processes that import the task plugins use them only once a job arrives (the gateway
only for a preview, `processdistro jobs` never). A module that wants one of them lazily
writes

    if TYPE_CHECKING:
        import numpy as np
    else:
        np = lazy("numpy")

so the type checker sees the module itself, and the first attribute read (`np.uint32`)
imports it. Importing is thread-safe (the import system's per-module lock) and each
attribute read is kept on the stand-in, so later reads cost what a module's do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class LazyModule:
    """Stands for the module `name` until one of its attributes is read."""

    def __init__(self, name: str) -> None:
        self._lazy_name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._lazy_name), attr)
        setattr(self, attr, value)  # found as a plain attribute from now on
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._lazy_name!r}>"


def lazy(name: str) -> Any:
    """A stand-in for module `name` that imports it on the first attribute read."""
    return LazyModule(name)


def lazy_function(module: str, name: str) -> Callable[..., Any]:
    """`module.name` (a function), imported on the first call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call
