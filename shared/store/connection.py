"""Redis clients with capped exponential backoff on connection errors."""

from __future__ import annotations

import logging
from typing import TypeAlias

import redis
import redis.asyncio as aredis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from ..exceptions import ConfigError

log = logging.getLogger(__name__)

_RETRY_ERRORS = [redis.ConnectionError, redis.TimeoutError]
# What a caller outside the store catches to ride out a Redis outage.
UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(cap=5.0, base=0.1), retries=8)


def _require(url: str | None) -> str:
    if not url:
        raise ConfigError("no Redis configured: set PD_REDIS_URL or start the controller with `processdistro up`")
    return url


def sync_client(url: str | None) -> redis.Redis:
    return redis.Redis.from_url(_require(url), retry=_retry(), retry_on_error=_RETRY_ERRORS, health_check_interval=30)


def async_client(url: str | None, *, max_connections: int = 512) -> aredis.Redis:
    # a blocking pool: past `max_connections` commands in flight, the next waits for a free
    # connection instead of raising MaxConnectionsError (2,000 nodes closing at once each
    # release their tasks: bench/simnodes.py saw every cleanup past the 512th fail)
    pool = aredis.BlockingConnectionPool.from_url(
        _require(url),
        retry=_retry(),
        retry_on_error=_RETRY_ERRORS,
        health_check_interval=30,
        max_connections=max_connections,
        timeout=None,
    )
    return aredis.Redis.from_pool(pool)


# What the rest of the code (and the tests) call a client: they name the type through the
# store and never import redis themselves.
Client: TypeAlias = redis.Redis
AsyncClient: TypeAlias = aredis.Redis


def plain_client(url: str) -> Client:
    """A client without retries, for tests and tools that want a failure to show at once."""
    client: Client = redis.Redis.from_url(url)
    return client
