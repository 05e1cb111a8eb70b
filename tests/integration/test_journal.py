"""The request journal in Redis: each request's scheduler, assigned workers, tokens emitted and outcome, and
the cluster-wide count of open requests that ClusterStatus reports."""

import asyncio

import grpc
import pytest
import redis.asyncio as redis

from splitwise.client import SplitwiseClient
from splitwise.cluster.journal import KEY_PREFIX
from tests.integration.cluster import local_cluster, wait_for_workers


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    isolated = redis_url.rsplit("/", 1)[0] + "/10"
    async with local_cluster(isolated, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c, redis.Redis.from_url(isolated)


async def entry(client: redis.Redis, rid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await client.hgetall(KEY_PREFIX + rid)).items()}


async def test_a_request_is_journaled_with_its_workers_tokens_and_outcome(cluster):
    c, client = cluster
    async with SplitwiseClient(c.address) as sw:
        tokens, rid = 0, None
        async for chunk in sw.stream(token_ids=list(range(40, 80)), max_tokens=120, ignore_eos=True, timeout=60):
            tokens += len(chunk.token_ids)
            rid = chunk.request_id
            if tokens == 40:  # mid-stream: open, assigned, progress written at least every 16 tokens
                for _ in range(50):  # (the journal writes within FLUSH_S)
                    live = await entry(client, rid)
                    if int(live.get("tokens_emitted", 0)) >= 32:
                        break
                    await asyncio.sleep(0.02)
                assert (await sw.cluster_status()).cluster_requests_in_flight == 1
                assert live["state"] == "split" and int(live["tokens_emitted"]) >= 32, live
        for _ in range(50):
            done = await entry(client, rid)
            if done.get("state") == "done":
                break
            await asyncio.sleep(0.02)
        assert done["state"] == "done" and done["outcome"] == "length" and done["tokens_emitted"] == "120"
        assert done["prompt_worker"] == c.prompt_worker.heartbeat.describe().worker_id
        assert done["token_worker"] == c.token_worker.heartbeat.describe().worker_id
        assert done["scheduler"].startswith("scheduler-") and done["prompt_tokens"] == "40"
        assert 0 < await client.ttl(KEY_PREFIX + rid) <= 300  # a finished entry stays a while, then goes
        assert (await sw.cluster_status()).cluster_requests_in_flight == 0


async def test_a_request_refused_at_admission_writes_no_journal_entry(cluster):
    """A request refused before admission (here: max_tokens past any context) costs Redis nothing: a hostile
    client cannot fill the journal with refused requests. The journal writes in order in the background, so a
    request admitted after it and journaled to its end shows that every earlier write has landed."""
    c, client = cluster
    async with SplitwiseClient(c.address) as sw:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sw.generate(token_ids=[1, 2], max_tokens=1 << 30, request_id="too-long", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await sw.generate(token_ids=[1, 2], max_tokens=2, ignore_eos=True, request_id="after-it", timeout=30)
    for _ in range(100):
        if (await entry(client, "after-it")).get("state") == "done":
            break
        await asyncio.sleep(0.02)
    assert (await entry(client, "after-it"))["state"] == "done"
    assert await entry(client, "too-long") == {}
    assert await client.keys(KEY_PREFIX + "too-long*") == []
