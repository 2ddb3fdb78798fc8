"""A gateway's heartbeat touches, coalesced (`shared/store/touches.py`), against the real test
Redis: written once per flush, a released connection never written back, the first touch of
a connection written at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from processdistro.shared import keys
from processdistro.shared.store.connection import Client, async_client
from processdistro.shared.store.gateway import GatewayStore
from processdistro.shared.store.touches import TouchBatcher


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` on a loop of its own, in a thread: the browser tests' playwright keeps a
    loop running in the main thread for the whole session."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="touches-test")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def test_touches_wait_for_the_flush_and_are_written_once(r: Client, redis_url: str) -> None:
    async def body() -> None:
        client = async_client(redis_url)
        batcher = TouchBatcher(client, every_s=3600)  # no timed flush: this test flushes
        try:
            await client.zadd(keys.NODES, {"c1": 1.0, "c2": 1.0})  # the connections' first touches
            batcher.touch("n1", "c1", "conn1", running=1, done=2)
            batcher.touch("n1", "c1", "conn1")  # the watchdog's: keeps the heartbeat's figures
            batcher.touch("n2", "c2", "conn2", running=0, done=5)
            assert r.hget(keys.node("n1"), "last_seen") is None  # nothing written before the flush
            await batcher.flush()
            n1 = {k.decode(): v.decode() for k, v in r.hgetall(keys.node("n1")).items()}
            assert n1["running"] == "1" and n1["done"] == "2" and n1["connection"] == "conn1"
            assert r.hget(keys.node("n2"), "done") == b"5"
            assert all(score > 1.0 for _m, score in r.zrange(keys.NODES, 0, -1, withscores=True))
            assert r.ttl(keys.node("n1")) > 0  # the record's TTL is set at its first flush
            r.expire(keys.node("n1"), 100)
            batcher.touch("n1", "c1", "conn1", running=0, done=3)
            await batcher.flush()
            assert r.hget(keys.node("n1"), "done") == b"3"
            assert 0 < r.ttl(keys.node("n1")) <= 100  # and not again for TTL_EVERY_S: HSET keeps it
        finally:
            await batcher.aclose()
            await client.aclose()

    _run(body())


def test_a_released_connection_is_not_written_back(r: Client, redis_url: str) -> None:
    async def body() -> None:
        client = async_client(redis_url)
        batcher = TouchBatcher(client, every_s=3600)
        try:
            batcher.touch("n1", "gone", "conn1", running=0, done=0)
            batcher.forget("gone")  # released before the flush: its touch is dropped
            batcher.touch("n2", "zremmed", "conn2", running=0, done=0)  # released, touch still pending
            await batcher.flush()
            assert r.zscore(keys.NODES, "gone") is None
            assert r.hget(keys.node("n1"), "last_seen") is None
            assert r.zscore(keys.NODES, "zremmed") is None  # ZADD XX: never added back
        finally:
            await batcher.aclose()
            await client.aclose()

    _run(body())


def test_the_gateway_store_writes_a_first_touch_at_once_and_flushes_heartbeats(r: Client, redis_url: str) -> None:
    async def body() -> None:
        store = GatewayStore.connect(redis_url)
        try:
            await store.touch("n1", "c1", "conn1", state="connected", voter="v1")
            assert r.zscore(keys.NODES, "c1") is not None  # written through: the reaper sees it now
            assert r.hget(keys.node("n1"), "state") == b"connected"
            await store.touch("n1", "c1", "conn1", running=2, done=7)
            assert r.hget(keys.node("n1"), "done") is None
            deadline = asyncio.get_running_loop().time() + 10
            while r.hget(keys.node("n1"), "done") != b"7":  # the timed flush, within a second or so
                assert asyncio.get_running_loop().time() < deadline, "the heartbeat's touch was never written"
                await asyncio.sleep(0.05)
            await store.touch("n1", "c1", "conn1", running=0, done=8)
        finally:
            await store.aclose()  # writes what is pending
        assert r.hget(keys.node("n1"), "done") == b"8"

    _run(body())
