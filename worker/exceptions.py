"""Errors of the native worker.

ProcessDistroError (processdistro.shared.exceptions)
├── WorkerStopped        the gateway told this worker to stop for good; main exits non-zero
│   ├── JoinRefused      /node-report refused the join code or the report (HTTP 403/413/422)
│   ├── Banned           close code 4004: the controller banned this node
│   └── Replaced         close code 4002: the same identity connected from elsewhere
└── TaskError            one task failed on this node; it becomes a TaskFailed message
    ├── DeadlineExceeded the run passed the per-task deadline (epoch interrupt or the guard)
    ├── MemoryCapReached the module ran out of memory under the store's memory cap
    ├── ModuleTrapped    any other trap (unreachable, out-of-bounds access, ...)
    ├── ModuleStatus     pd_run returned a non-zero status
    ├── ModuleInvalid    bad bytes, wrong sha256, not our ABI, or not fetchable
    └── ExecutorCrashed  the executor process died without an answer

A `TaskError` crosses the process boundary as `(class name, message)`: `task_error` rebuilds it.
"""

from __future__ import annotations

from ..shared.exceptions import ProcessDistroError


class WorkerStopped(ProcessDistroError):
    pass


class JoinRefused(WorkerStopped):
    pass


class Banned(WorkerStopped):
    pass


class Replaced(WorkerStopped):
    pass


class TaskError(ProcessDistroError):
    pass


class DeadlineExceeded(TaskError):
    pass


class MemoryCapReached(TaskError):
    pass


class ModuleTrapped(TaskError):
    pass


class ModuleStatus(TaskError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ModuleInvalid(TaskError):
    pass


class ExecutorCrashed(TaskError):
    pass


_TASK_ERRORS: dict[str, type[TaskError]] = {
    cls.__name__: cls
    for cls in (DeadlineExceeded, MemoryCapReached, ModuleTrapped, ModuleStatus, ModuleInvalid, ExecutorCrashed)
}


def task_error(name: str, message: str) -> TaskError:
    """The `TaskError` an executor process reported as `(type(exc).__name__, str(exc))`."""
    return _TASK_ERRORS.get(name, TaskError)(message)
