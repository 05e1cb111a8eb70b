"""Fixtures of the integration tests that write into Redis themselves."""

import pytest
import redis.asyncio as redis


@pytest.fixture
async def store(isolated_redis_url):
    """A client of the module's own Redis database (the module defines isolated_redis_url)."""
    client = redis.Redis.from_url(isolated_redis_url)
    yield client
    await client.aclose()
