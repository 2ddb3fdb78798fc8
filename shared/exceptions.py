"""Errors of ProcessDistro.

ProcessDistroError
├── ConfigError        settings that cannot work (no Redis reachable, bad paths)
├── ParamsError        a job's parameters are refused at submit time
├── JobNotFound        no job with that id
└── ProtocolError      a peer sent something that breaks the protocol
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
