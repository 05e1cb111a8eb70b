"""The registry against a real Redis, and the routing policy as a pure function."""

import asyncio
import json
import os
import signal
import time
from dataclasses import asdict

import pytest
import redis.asyncio as redis

from splitwise.cluster.redis_server import start_redis
from splitwise.cluster.registry import (KEY_PREFIX, MAX_CLOCK_SKEW_S, REDIS_TIMEOUT_S, Heartbeat, WorkerInfo,
                                        WorkerRegistry, connect, signed_entry)
from splitwise.cluster.routing import NoWorkerAvailable, join_shortest_queue, route
from tests.conftest import free_port

CLUSTER_KEY = b"the cluster key of these tests"


def worker(worker_id: str, role: str, pending: int = 0, capacity: int = 10_000, model: str = "m") -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"{worker_id}:1", model, "fp", pending_tokens=pending,
                      kv_capacity_tokens=capacity)


@pytest.fixture
async def registry(redis_url):
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    yield WorkerRegistry(client, CLUSTER_KEY, ttl_s=1.0)
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


def signed(fields: dict, expires_in_s: float = 10.0, key: bytes = CLUSTER_KEY) -> bytes:
    return signed_entry(key, fields, time.time() + expires_in_s)


async def test_an_entry_that_is_not_a_worker_hides_no_other_and_unknown_fields_are_ignored(registry):
    await registry.announce(worker("p0", "prompt"))
    await registry.client.set(KEY_PREFIX + "junk", b"not json")
    await registry.client.set(KEY_PREFIX + "t1", signed({**asdict(worker("t1", "token")), "from_the_future": 1}))
    assert [w.worker_id for w in await registry.workers()] == ["p0", "t1"]


@pytest.mark.parametrize("change", [
    {"pending_tokens": "x"}, {"address": 5}, {"address": ""}, {"role": None}, {"kv_used_tokens": -1},
    {"active_requests": True}, {"heartbeat_at": float("nan")}, {"kv_capacity_tokens": 1.5}, {"worker_id": "t9"},
], ids=lambda change: ",".join(f"{k}={v!r}" for k, v in change.items()))
async def test_a_signed_entry_with_a_field_of_the_wrong_type_or_range_is_skipped(registry, change):
    await registry.announce(worker("p0", "prompt"))
    await registry.client.set(KEY_PREFIX + "t1", signed({**asdict(worker("t1", "token")), **change}))
    assert [w.worker_id for w in await registry.workers()] == ["p0"]


async def test_a_signed_entry_missing_a_field_without_a_default_is_skipped(registry):
    fields = asdict(worker("t1", "token"))
    del fields["model_fingerprint"]
    await registry.client.set(KEY_PREFIX + "t1", signed(fields))
    await registry.client.set(KEY_PREFIX + "t2", signed({"worker_id": "t2"}))
    await registry.client.set(KEY_PREFIX + "t3", b'["a list"]')
    assert await registry.workers() == []


async def test_an_unsigned_entry_or_one_signed_with_another_key_is_not_listed(registry):
    await registry.announce(worker("p0", "prompt"))
    fake = asdict(worker("t1", "token"))
    await registry.client.set(KEY_PREFIX + "t1", json.dumps(fake))
    await registry.client.set(KEY_PREFIX + "t2", signed({**fake, "worker_id": "t2"}, key=b"another cluster's key"))
    tampered = json.loads(signed({**fake, "worker_id": "t3"}))
    tampered["worker"]["address"] = "attacker:1"
    await registry.client.set(KEY_PREFIX + "t3", json.dumps(tampered))
    assert [w.worker_id for w in await registry.workers()] == ["p0"]


async def test_an_entry_listed_before_is_verified_again_once_its_bytes_change(registry, monkeypatch):
    from splitwise.cluster import registry as registry_module

    verified = []
    real_verify = registry_module.verify
    monkeypatch.setattr(registry_module, "verify", lambda *args: verified.append(1) or real_verify(*args))
    fake = asdict(worker("t1", "token"))
    await registry.client.set(KEY_PREFIX + "t1", signed(fake))
    for _ in range(3):
        assert [w.address for w in await registry.workers()] == ["t1:1"]
    assert len(verified) == 1  # the same bytes: read again, not verified again
    tampered = json.loads(await registry.client.get(KEY_PREFIX + "t1"))
    tampered["worker"]["address"] = "attacker:1"
    await registry.client.set(KEY_PREFIX + "t1", json.dumps(tampered))
    assert await registry.workers() == []
    await registry.client.set(KEY_PREFIX + "t1", signed({**fake, "address": "t1:2"}))
    assert [w.address for w in await registry.workers()] == ["t1:2"]


async def test_an_entry_listed_before_drops_out_once_its_signed_expiry_passes(registry):
    await registry.client.set(KEY_PREFIX + "t1", signed(asdict(worker("t1", "token")),
                                                        expires_in_s=0.3 - MAX_CLOCK_SKEW_S))
    assert [w.worker_id for w in await registry.workers()] == ["t1"]
    await asyncio.sleep(0.5)  # the same bytes, now past their expiry
    assert await registry.workers() == []


async def test_a_copy_of_an_old_entry_written_again_is_not_listed(registry):
    await registry.client.set(KEY_PREFIX + "t1", signed(asdict(worker("t1", "token")),
                                                        expires_in_s=-MAX_CLOCK_SKEW_S - 1))
    await registry.client.set(KEY_PREFIX + "t2", signed(asdict(worker("t2", "token")), expires_in_s=1))
    assert [w.worker_id for w in await registry.workers()] == ["t2"]


async def test_after_redis_restarts_empty_a_reader_lists_the_workers_it_saw_until_they_announce_or_one_ttl_passes():
    port = free_port()
    server = start_redis(port)
    client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    registry = WorkerRegistry(client, CLUSTER_KEY, ttl_s=1.0)
    try:
        for info in (worker("p0", "prompt"), worker("t0", "token"), worker("t1", "token")):
            await registry.announce(info)
        before = {w.worker_id: w for w in await registry.workers()}
        server.kill()
        server.wait()
        with pytest.raises(redis.ConnectionError):
            await registry.workers()
        server = start_redis(port)
        restarted = time.monotonic()
        assert await registry.workers() == list(before.values())  # the new Redis is empty
        await registry.announce(worker("t0", "token"))
        await registry.announce(worker("t1", "token"))
        assert [w.worker_id for w in await registry.workers()] == ["p0", "t0", "t1"]
        await registry.remove("t1")  # announced again, then deregistered: gone at once
        (p0, t0) = await registry.workers()
        assert p0 == before["p0"] and t0.heartbeat_at > before["t0"].heartbeat_at
        while "p0" in {w.worker_id for w in await registry.workers()}:  # never announced again: gone one TTL later
            assert time.monotonic() - restarted < 5, "p0 is still listed"
            await asyncio.sleep(0.05)
        assert time.monotonic() - restarted >= 1.0
    finally:
        server.kill()
        await client.aclose()


async def test_a_redis_that_hangs_fails_registry_calls_after_the_timeout_instead_of_holding_them():
    port = free_port()
    server = start_redis(port)
    registry = WorkerRegistry(connect(f"redis://127.0.0.1:{port}/0"), CLUSTER_KEY)
    try:
        await registry.announce(worker("p0", "prompt"))
        os.kill(server.pid, signal.SIGSTOP)  # connections stay open; nothing answers
        for call in (registry.workers(), registry.announce(worker("p0", "prompt"))):
            start = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                await asyncio.wait_for(call, 3 * REDIS_TIMEOUT_S)
            assert time.monotonic() - start < 1.5 * REDIS_TIMEOUT_S
    finally:
        server.kill()
        await registry.client.aclose()


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


async def test_a_bad_entry_is_logged_with_what_is_wrong_once_however_often_it_is_read(registry, caplog):
    await registry.client.set(KEY_PREFIX + "t1", signed({**asdict(worker("t1", "token")), "pending_tokens": "x"}))
    for _ in range(5):
        assert await registry.workers() == []
    (line,) = [r.getMessage() for r in caplog.records if "splitwise:worker:t1" in r.getMessage()]
    assert "pending_tokens is 'x', not an integer >= 0" in line
