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

At exit the interpreter clears modules in the reverse order of their import: a module
imported on first use would be cleared before the module using it, whose globals may still
hold its objects (a cached wasmtime engine, whose finaliser calls into wasmtime). So at
exit the users are moved after what they imported lazily (`_clear_users_first`), the order
an import at the top would have given.
"""

from __future__ import annotations

import atexit
import importlib
import sys
import threading
from collections.abc import Callable
from typing import Any

_USERS: set[str] = set()  # modules with a lazy import that has been imported
_USERS_LOCK = threading.Lock()


class LazyModule:
    """Stands for the module `name` until one of its attributes is read."""

    def __init__(self, name: str, user: str) -> None:
        self._lazy_name = name
        self._lazy_user = user

    def __getattr__(self, attr: str) -> Any:
        value = getattr(_load(self._lazy_name, self._lazy_user), attr)
        setattr(self, attr, value)  # found as a plain attribute from now on
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._lazy_name!r}>"


def lazy(name: str) -> Any:
    """A stand-in for module `name` that imports it on the first attribute read."""
    return LazyModule(name, _caller())


def lazy_function(module: str, name: str) -> Callable[..., Any]:
    """`module.name` (a function), imported on the first call."""
    user = _caller()

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_load(module, user), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _caller() -> str:
    """The name of the module calling `lazy` (two frames up)."""
    return str(sys._getframe(2).f_globals.get("__name__", ""))


def _load(name: str, user: str) -> Any:
    module = importlib.import_module(name)
    if user not in _USERS:
        with _USERS_LOCK:
            if not _USERS:
                atexit.register(_clear_users_first)
            _USERS.add(user)
    return module


def _clear_users_first() -> None:
    """Move the modules that imported something lazily to the end of `sys.modules`: the
    interpreter clears them, and frees what their globals hold, before what they imported."""
    for name in sorted(_USERS):
        module = sys.modules.pop(name, None)
        if module is not None:
            sys.modules[name] = module
