"""The registry against a real Redis, and the routing policy as a pure function."""

import asyncio

import pytest
import redis.asyncio as redis

from splitwise.cluster.registry import Heartbeat, WorkerInfo, WorkerRegistry
from splitwise.cluster.routing import NoWorkerAvailable, join_shortest_queue, route


def worker(worker_id: str, role: str, pending: int = 0, capacity: int = 10_000, model: str = "m") -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"{worker_id}:1", model, "fp", pending_tokens=pending,
                      kv_capacity_tokens=capacity)


@pytest.fixture
async def registry(redis_url):
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    yield WorkerRegistry(client, ttl_s=1.0)
    await client.flushdb()
    await client.aclose()


async def test_worker_joins_heartbeats_and_disappears_when_it_stops(registry):
    info = worker("p0", "prompt")
    load = {"pending": 0}
    heartbeat = Heartbeat(registry, lambda: WorkerInfo(**{**info.__dict__, "pending_tokens": load["pending"]}),
                          interval_s=0.1)
    await heartbeat.start()
    assert [w.worker_id for w in await registry.workers()] == ["p0"]
    load["pending"] = 42
    await asyncio.sleep(1.5)  # longer than the TTL: only heartbeats keep it
    (seen,) = await registry.workers("prompt")
    assert seen.pending_tokens == 42 and seen.heartbeat_at > 0
    await heartbeat.stop(deregister=False)
    await asyncio.sleep(1.3)
    assert await registry.workers() == []


async def test_deregistered_worker_leaves_at_once(registry):
    await registry.announce(worker("t0", "token"))
    await registry.remove("t0")
    assert await registry.workers() == []


def test_join_shortest_queue_counts_reported_and_in_flight_tokens():
    a, b = worker("a", "prompt", pending=100), worker("b", "prompt", pending=50)
    assert join_shortest_queue([a, b], {}) is b
    assert join_shortest_queue([a, b], {"b": 60}) is a


def test_route_picks_one_worker_of_each_role_for_the_model():
    workers = [worker("p", "prompt"), worker("t-small", "token", capacity=10), worker("t", "token", pending=9),
               worker("x", "token", model="other")]
    chosen = route(workers, "m", needed_kv_tokens=100, in_flight_tokens={})
    assert (chosen.prompt_worker.worker_id, chosen.token_worker.worker_id) == ("p", "t")


def test_route_without_a_fitting_token_worker_says_why():
    with pytest.raises(NoWorkerAvailable, match="can hold 100 tokens"):
        route([worker("p", "prompt"), worker("t", "token", capacity=10)], "m", 100, {})
    with pytest.raises(NoWorkerAvailable, match="no prompt worker"):
        route([worker("t", "token")], "m", 1, {})
