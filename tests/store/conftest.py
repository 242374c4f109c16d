"""A real Redis server per test module (Debian's redis-server), emptied before each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from vllm_guard.limits.redis_store import RedisQuotaStore
from vllm_guard.testing.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None:  # a test stopped it
        redis_server.start()
    redis_server.resume()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[list[RedisQuotaStore]]:
    """Three replicas' stores on one Redis."""
    made = [RedisQuotaStore(redis_url, timeout_s=0.2, lease_s=30) for _ in range(3)]
    yield made
    for store in made:
        await store.close()
