"""ProcessDistro: turn the devices on your LAN into extra CPU.

The Python API (`api.py`): `processdistro.connect()` to the running controller, then `map`
a WebAssembly program over inputs or `submit` any kind of job. It is imported on first use
(PEP 562), so the services and the worker's executor processes, which import subpackages of
`processdistro`, do not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Connection, Job, JobFailed, MapJob, Progress, connect

__all__ = ["Connection", "Job", "JobFailed", "MapJob", "Progress", "connect"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
