"""The task plugin interface: everything task-specific lives in a plugin on the controller.

A node only ever sees `(module sha256, input bytes) -> output bytes`. The scheduler calls
`count` and `split`; the aggregator calls `verify`, `merge` and `finalize`; the CLI calls
`params` (through `parse_params`) so bad parameters are refused at submit time.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from ..exceptions import ParamsError

P = TypeVar("P", bound=BaseModel)


class Verdict(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"


@dataclass(frozen=True)
class JobFiles:
    """Where one job's intermediate and final files live (under the data directory)."""

    job_id: str
    directory: Path

    @classmethod
    def under(cls, data_dir: Path, job_id: str) -> JobFiles:
        return cls(job_id, data_dir / "jobs" / job_id)

    def path(self, name: str) -> Path:
        return self.directory / name


class TaskPlugin(ABC, Generic[P]):
    kind: ClassVar[str]
    module: ClassVar[str]  # name of the WASM module in the module registry
    params_model: ClassVar[type[BaseModel]]

    def parse_params(self, raw: dict[str, Any]) -> P:
        try:
            return self.params_model.model_validate(raw)  # type: ignore[return-value]
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors())
            raise ParamsError(f"bad {self.kind} parameters: {problems}") from None

    @abstractmethod
    def count(self, params: P) -> int:
        """How many subtasks the job splits into."""

    @abstractmethod
    def split(self, params: P, start: int = 0) -> Iterator[bytes]:
        """Subtask inputs from index `start` on, lazily."""

    @abstractmethod
    def verify(self, params: P, index: int, output: bytes, rng: random.Random) -> Verdict:
        """A cheap check that `output` is a correct result for subtask `index`."""

    @abstractmethod
    def merge(self, files: JobFiles, params: P, index: int, output: bytes) -> None:
        """Write one verified result into the job's files. Idempotent."""

    @abstractmethod
    def finalize(self, files: JobFiles, params: P) -> dict[str, str]:
        """Write the output files; return them by role (e.g. {"image": path})."""
