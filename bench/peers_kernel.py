"""The task function of bench/compare.py: one Mandelbrot tile through the native worker's own
`ModuleRunner`, with the settings of its executor processes (`interruptible=False`: wasmtime's
default configuration, the deadline left to the process's owner).

Dask and Ray workers import this module by name (so its runner cache lives as long as the
worker process), and the serial baselines of compare.py call the same function in-process, so
all three systems and the baseline run the same kernel, the same engine, the same calls.
"""

from __future__ import annotations

from pathlib import Path

from processdistro.worker.runtime import Limits, ModuleRunner

_RUNNERS: dict[tuple[str, bool], ModuleRunner] = {}


def runner(module: str, *, interruptible: bool = False) -> ModuleRunner:
    """This process's runner for `module` (compiled once)."""
    key = (module, interruptible)
    found = _RUNNERS.get(key)
    if found is None:
        found = _RUNNERS[key] = ModuleRunner(limits=Limits(), interruptible=interruptible)
    return found


def run_tile(module: str, sha256: str, data: bytes) -> bytes:
    """The counts of one tile: `data` is the module's 64-byte input (shared/tasks/mandelbrot.py)."""
    return runner(module).run(sha256, Path(module), data)


def run_tiles(module: str, sha256: str, inputs: list[bytes], *, interruptible: bool = False) -> list[bytes]:
    """Every tile in order, in this process (the serial baseline)."""
    r = runner(module, interruptible=interruptible)
    path = Path(module)
    return [r.run(sha256, path, data) for data in inputs]
