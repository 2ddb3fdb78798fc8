"""Benchmarks: `python -m bench [--quick] [--only NAME]` (`make bench`).

A benchmark is a module `bench/<name>.py` (a name not starting with `_`) exposing

    def run(*, quick: bool, console: rich.console.Console) -> Report

`python -m bench` finds every such module, runs it, prints its tables and writes its
`Report` to `bench/results/<name>.json` (`<name>.quick.json` with `--quick`).

The machine is shared and noisy, so a benchmark reports **ratios** against a baseline it
measures in the same run, never bare seconds compared across runs.
"""

from __future__ import annotations

import datetime
import importlib
import os
import pkgutil
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class Report:
    """What one benchmark found: tables for people, `data` for machines."""

    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self, *, quick: bool, command: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "quick": quick,
            "command": command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "tables": [asdict(t) for t in self.tables],
            "notes": self.notes,
            "data": self.data,
        }


def discover() -> dict[str, ModuleType]:
    """Every benchmark module under bench/, by name."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
        if info.name.startswith("_") or info.ispkg:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if callable(getattr(module, "run", None)):
            found[info.name] = module
    return dict(sorted(found.items()))


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
