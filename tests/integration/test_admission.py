"""Admission: a full cluster refuses at once with RESOURCE_EXHAUSTED and a retry hint, instead of queueing."""

import asyncio

import grpc
import pytest

from splitwise.client import SplitwiseClient
from tests.integration.cluster import assert_no_kv_held, local_cluster


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    async with local_cluster(redis_url, "tiny-llama", cache_dir, scheduler_overrides={"max_requests_in_flight": 1}) as c:
        yield c


async def test_a_request_beyond_the_limit_is_refused_with_a_retry_hint_and_the_next_one_served(cluster):
    async with SplitwiseClient(cluster.address) as client:
        first = client.stream(token_ids=list(range(30, 60)), max_tokens=400, ignore_eos=True, timeout=60)
        await anext(first)  # the first request is in flight
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.generate(token_ids=[5, 6, 7], max_tokens=2, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cluster is full" in refused.value.details()
        assert dict(refused.value.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
        rest = [chunk async for chunk in first]
        assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 400
        out = await asyncio.wait_for(client.generate(token_ids=[5, 6, 7], max_tokens=2, timeout=30), 30)
        assert out.completion_tokens == 2
    await assert_no_kv_held(cluster)
