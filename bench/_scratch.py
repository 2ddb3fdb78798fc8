"""A benchmark's own Redis: a fresh embedded server (no persistence) in a temporary directory,
for `bench/pipeline.py` and `bench/_aggregator_alone.py` (which runs as a script, with this
checkout's file and whichever Python `pipeline.py` gives it: only what every version of
`processdistro` has). Not a benchmark of its own (the leading underscore).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from processdistro.shared.redis_server import EmbeddedRedis
from processdistro.shared.store.connection import Client, plain_client


@dataclass(frozen=True)
class Scratch:
    work: Path  # the temporary directory (Redis's files in `redis/`), removed afterwards
    url: str
    r: Client
    redis_pid: int  # for its CPU time


@contextlib.contextmanager
def scratch_redis(prefix: str) -> Iterator[Scratch]:
    """A temporary directory named `prefix...` with a fresh Redis in it and a client of it;
    the client closed, the server stopped and the directory removed on leaving."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        server = EmbeddedRedis(directory=work / "redis", persist=False)
        url = server.start()
        r = plain_client(url)
        try:
            assert server.process is not None
            yield Scratch(work=work, url=url, r=r, redis_pid=server.process.pid)
        finally:
            r.close()
            server.stop()
