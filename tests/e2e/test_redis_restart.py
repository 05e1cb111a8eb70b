"""Redis dies (SIGKILL) mid-stream and comes back empty on the same port: the stream in flight loses no token,
the scheduler routes by the workers it knew meanwhile and until they have registered again by their heartbeats,
and new requests are served throughout."""

import asyncio
import time

import pytest
import redis.asyncio as redis

from splitwise.client import SplitwiseClient
from splitwise.cluster.registry import KEY_PREFIX
from tests.e2e.launched_cluster import launched_cluster

pytestmark = pytest.mark.e2e

HEARTBEAT_S = 0.5  # Redis is empty for up to this long after it restarts (the scheduler reads it every 0.25 s)
PROMPT = [5, 6, 7, 8, 9]
MAX_TOKENS = 8
LONG_PROMPT = list(range(30, 60))
LONG_MAX_TOKENS = 960  # long enough that Redis dies and comes back while it streams (the context is 1024)
WORKERS = {"prompt_worker-0", "token_worker-0"}


@pytest.fixture
def cluster(tmp_path, cache_dir):
    with launched_cluster(tmp_path, cache_dir, env={"SPLITWISE_HEARTBEAT_S": str(HEARTBEAT_S)}) as cluster:
        yield cluster


async def poll(check, what: str, timeout_s: float = 15.0):
    """Awaits check() every 50 ms until it is true; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(0.05)


async def test_redis_restart_mid_stream_loses_no_token_and_the_workers_register_again(cluster):
    redis_url = f"redis://:{cluster.credentials.redis_password}@{cluster.o.host}:{cluster.o.redis_port}/0"
    async with SplitwiseClient(cluster.address) as client, redis.Redis.from_url(redis_url) as store:
        async def generate() -> list[int]:
            out = await client.generate(token_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=30)
            return out.token_ids

        expected = await generate()

        async def listed() -> dict[str, float]:
            """Each worker the scheduler lists, with the unix time of the heartbeat it last saw."""
            status = await client.cluster_status()
            return {w.worker_id: time.time() - w.heartbeat_age_s for w in status.workers}

        tokens: list[int] = []
        finish: list[str] = []
        decoding = asyncio.Event()

        async def long_stream():
            async for chunk in client.stream(token_ids=LONG_PROMPT, max_tokens=LONG_MAX_TOKENS, ignore_eos=True,
                                             timeout=120):
                tokens.extend(chunk.token_ids)
                finish.append(chunk.finish_reason)
                if len(tokens) >= 5:
                    decoding.set()

        stream = asyncio.create_task(long_stream())
        await asyncio.wait_for(decoding.wait(), 30)
        cluster.kill_redis()
        killed_at = len(tokens)

        async def heartbeats_missed():  # the scheduler's view of the workers ages: heartbeats no longer land
            seen = await listed()
            assert set(seen) == WORKERS, "the scheduler lost workers while Redis is down"
            return time.time() - max(seen.values()) > 2 * HEARTBEAT_S

        await poll(heartbeats_missed, "the scheduler keeps listing the workers while Redis is down")
        assert await generate() == expected  # routed by that view
        assert len(tokens) > killed_at and not stream.done(), "the stream must still run when Redis comes back"
        await asyncio.to_thread(cluster.start_redis)
        restarted = time.time()

        async def registered_again():
            """Until the workers are in the new Redis and the scheduler has seen it, it serves all along."""
            seen = await listed()
            assert set(seen) == WORKERS, "the scheduler lost workers while they registered again"
            assert await generate() == expected
            in_redis = {key.decode().removeprefix(KEY_PREFIX) async for key in store.scan_iter(KEY_PREFIX + "*")}
            return in_redis == WORKERS and min(seen.values()) > restarted

        await poll(registered_again, "the workers' heartbeats register them in the new Redis")
        await asyncio.wait_for(stream, 60)
        assert len(tokens) == LONG_MAX_TOKENS and finish[-1] == "length"  # every token, despite the outage
