"""The session's Redis is the one the run's header names (tests/conftest.py
`redis_provider`): a testcontainers Redis when a Docker engine answers and has a Redis
image, else the embedded server. CI runs this file both ways (.ci/run)."""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

from conftest import redis_provider
from processdistro.shared.store.connection import Client


def test_the_session_redis_is_the_one_reported(redis_url: str, r: Client) -> None:
    kind, detail = redis_provider()
    port = urlsplit(redis_url).port
    info = r.info("server")
    major, minor = (int(x) for x in str(info["redis_version"]).split(".")[:2])
    assert (major, minor) >= (6, 2), "XAUTOCLAIM needs Redis >= 6.2"
    published = subprocess.run(
        ["docker", "ps", "--filter", f"ancestor={detail}", "--format", "{{.Ports}}"],
        capture_output=True,
        text=True,
    ).stdout
    if kind == "container":
        assert f":{port}->6379/tcp" in published, (redis_url, published)
    else:
        assert f":{port}->" not in published
        assert int(info["process_id"]) > 1  # a process of this machine, not a container's init


def test_xautoclaim_works(r: Client) -> None:
    r.xgroup_create("s", "g", id="0", mkstream=True)
    r.xadd("s", {"a": "1"})
    r.xreadgroup("g", "c1", {"s": ">"})
    claimed = r.xautoclaim("s", "g", "c2", min_idle_time=0)
    assert len(claimed[1]) == 1
