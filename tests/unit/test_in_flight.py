"""The load estimate: what a scheduler sent each worker since that worker's last heartbeat, never after it.

Once a heartbeat reports a request (in pending_tokens or kv_used_tokens), the scheduler must stop adding it: the
worker's heartbeat counts it now. The scheduler replicas' views run against a real Redis registry.
"""

import asyncio
import contextlib

import pytest
import redis.asyncio as redis

from services.scheduler.cluster_view import ClusterView
from splitwise.cluster.in_flight import REPORTED_AFTER_S, InFlightLedger
from splitwise.cluster.registry import WorkerInfo, WorkerRegistry

CLUSTER_KEY = b"the cluster key of these tests"


def beat(worker_id: str, at: float, pending: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id, "mixed", f"{worker_id}:1", "m", "fp", pending_tokens=pending,
                      kv_capacity_tokens=100_000, heartbeat_at=at)


def test_a_send_counts_until_a_heartbeat_written_after_it_is_read():
    ledger = InFlightLedger()
    send = ledger.add({"w0": 100, "w1": 300}, at=10.0)
    ledger.add({"w0": 50}, at=11.0)
    assert ledger.tokens == {"w0": 150, "w1": 300}
    ledger.reported([beat("w0", 9.9), beat("w1", 10.0)])  # written before the first send reached the workers
    assert ledger.tokens == {"w0": 150, "w1": 300}
    ledger.reported([beat("w0", 10.0 + REPORTED_AFTER_S), beat("w1", 9.0)])  # w0 reports the first send now
    assert ledger.tokens == {"w0": 50, "w1": 300}
    ledger.end(send)  # its request ends before w1's heartbeat reported it: no heartbeat will
    assert ledger.tokens == {"w0": 50}
    ledger.reported([beat("w0", 12.0)])
    assert ledger.tokens == {}


def test_a_request_that_ends_leaves_the_ledger_once_whatever_was_reported():
    ledger = InFlightLedger()
    with ledger.sent({"w0": 100}, at=1.0):
        ledger.reported([beat("w0", 2.0)])
        assert ledger.tokens == {}
    assert ledger.tokens == {}
    with pytest.raises(RuntimeError), ledger.sent({"w0": 7}, at=3.0):
        raise RuntimeError("the request failed")
    assert ledger.tokens == {}


@pytest.fixture
async def registry(redis_url):
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    yield WorkerRegistry(client, CLUSTER_KEY, ttl_s=5.0)
    await client.flushdb()
    await client.aclose()


async def announce(registry: WorkerRegistry, loads: dict[str, int]) -> None:
    await asyncio.sleep(REPORTED_AFTER_S + 0.01)  # the heartbeat is written after the sends before it
    for worker_id, pending in loads.items():
        await registry.announce(beat(worker_id, 0.0, pending))


async def test_jsq_does_not_count_a_request_the_heartbeat_reports_again(registry):
    """This scheduler sent w0 a 1,000-token request; w1 holds 1,500 tokens another replica sent. Both heartbeats
    report what each holds. w0 has the shorter queue: counting the request a second time picked w1."""
    view = ClusterView("m", registry, routing_policy="jsq")
    await announce(registry, {"w0": 0, "w1": 0})
    await view.refresh()
    with view.loaded({"w0": 1_000}):
        assert view.in_flight_tokens == {"w0": 1_000}
        await announce(registry, {"w0": 1_000, "w1": 1_500})
        await view.refresh()
        assert view.in_flight_tokens == {}
        assert view.route(100, 10, set()).prompt_worker.worker_id == "w0"


async def test_two_replicas_each_route_to_the_worker_with_the_least_load_reported(registry):
    """A's earlier requests hold w0 and B's hold w1, 5 of 1,000 tokens each, reported by the heartbeats. New
    requests then reach A alone: they go to w0 and w1 in turn. With its own requests counted twice, A saw w0 twice
    as loaded and sent every new request to w1, until w1 held twice what w0 did."""
    a = ClusterView("m", registry, routing_policy="jsq")
    b = ClusterView("m", registry, routing_policy="jsq")
    true = {"w0": 0, "w1": 0}
    await announce(registry, true)
    await a.refresh()
    await b.refresh()
    with contextlib.ExitStack() as held:  # the requests run to the end of the test
        for view, worker_id in [(a, "w0"), (b, "w1")] * 5:
            held.enter_context(view.loaded({worker_id: 1_000}))
            true[worker_id] += 1_000
        chosen = []
        for _ in range(10):
            await announce(registry, true)
            await a.refresh()
            await b.refresh()
            worker_id = a.route(1_000, 10, set()).prompt_worker.worker_id
            held.enter_context(a.loaded({worker_id: 1_000}))
            true[worker_id] += 1_000
            chosen.append(worker_id)
        assert chosen.count("w0") == chosen.count("w1") == 5
        assert true == {"w0": 10_000, "w1": 10_000}
