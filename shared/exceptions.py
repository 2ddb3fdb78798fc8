"""Errors of ProcessDistro.

ProcessDistroError
├── ConfigError        settings that cannot work (no Redis reachable, bad paths)
├── ParamsError        a job's parameters are refused at submit time
├── JobNotFound        no job with that id
├── MessageError       a command or control message we do not know (`shared/messages.py`)
└── WorkerStopped, TaskError   the native worker's own (`worker/exceptions.py`)

A node that breaks the protocol gets an error frame or a close code from its gateway
(`gateway/session.py`); no exception class stands for it.
"""

from __future__ import annotations


class ProcessDistroError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ProcessDistroError):
    pass


class ParamsError(ProcessDistroError):
    pass


class JobNotFound(ProcessDistroError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id
