"""Clients that give up at random points leave nothing behind: no KV block, receiver, staging segment, request or
RPC handler on any service, nothing in the kv_store or its KV index past the TTL; and the scheduler counts each
outcome.

1,000 seeded requests, half with their KV pushed from the prompt worker to the token worker (direct, a copy kept
in the kv_store), half relayed through the kv_store (relay). Each client cancels its call a random time after
sending it, or after a random number of tokens, or lets a short deadline end it; a few complete. Prompts are
short (KV shipped after the prefill) or long enough for their KV to go layer by layer during it.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
import redis.asyncio as redis

from splitwise.client import SplitwiseClient, build_request
from splitwise.cluster.kv_index import KVIndex
from splitwise.kv.transport.shm import SHM_DIR
from splitwise.model.weights import resolve_model
from splitwise.rpc.v1 import scheduler_pb2_grpc
from tests.security import public_channel
from tests.integration.cluster import local_cluster, wait_for_workers
from tests.integration.test_contract import scrape
from tests.reference import hf_greedy

SEED = 20_240_611
NUM_REQUESTS = 1000  # in all, split evenly between the KV transfer modes
MODES = ("direct", "relay")
CONCURRENCY = 48
LAYERWISE_MIN_TOKENS = 128
KV_STORE_TTL_S = 3.0  # long enough that a relayed transfer commits within it on a loaded 2-core machine
HEARTBEAT_S = 0.2
IDLE_WITHIN_S = 5.0  # for everything to be released after the last request ended
VOCAB = range(3, 259)  # the tiny model's byte tokens, without its special ones
CLIENT_BACKSTOP_S = 60.0  # the deadline of calls not meant to end at one: a hang fails them
CLIENT_ENDINGS = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
SCHEDULER_OUTCOMES = {"cancelled", "deadline", "length", "stop"}


@dataclass(frozen=True)
class Plan:
    """One request, and how its client ends it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    how: str  # "cancel_after_delay", "cancel_after_tokens", "deadline" or "complete"
    delay_s: float = 0.0  # cancel_after_delay: from sending the call; deadline: the call's timeout
    after_tokens: int = 0


def plan_request(rng: random.Random, request_id: str) -> Plan:
    if rng.random() < 0.3:
        length = rng.randint(LAYERWISE_MIN_TOKENS, 640)
    else:
        length = rng.randint(1, LAYERWISE_MIN_TOKENS - 1)
    prompt = tuple(rng.choice(VOCAB) for _ in range(length))
    max_tokens = rng.randint(1, 200)
    how = rng.choices(["cancel_after_delay", "cancel_after_tokens", "deadline", "complete"], [30, 35, 30, 5])[0]
    if how == "cancel_after_delay":
        return Plan(request_id, prompt, max_tokens, how, delay_s=rng.uniform(0, 0.05))
    if how == "cancel_after_tokens":
        return Plan(request_id, prompt, max_tokens, how, after_tokens=rng.randint(1, max_tokens))
    if how == "deadline":
        return Plan(request_id, prompt, max_tokens, how, delay_s=rng.uniform(0.005, 0.4))
    return Plan(request_id, prompt, max_tokens, how)


def plan_requests() -> dict[str, list[Plan]]:
    rng = random.Random(SEED)
    plans = [plan_request(rng, f"cancellation-{i:04d}") for i in range(NUM_REQUESTS)]
    return {mode: plans[i::len(MODES)] for i, mode in enumerate(MODES)}


PLANS = plan_requests()


@dataclass
class Ended:
    """How a request ended, as its client saw it."""

    plan: Plan
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    responses: int = 0
    completion_tokens: int = 0


async def run_and_end(stub: scheduler_pb2_grpc.SchedulerStub, plan: Plan) -> Ended:
    request = build_request(token_ids=plan.prompt_ids, request_id=plan.request_id, max_tokens=plan.max_tokens,
                            ignore_eos=True)
    call = stub.Generate(request, timeout=plan.delay_s if plan.how == "deadline" else CLIENT_BACKSTOP_S)
    ended = Ended(plan)
    try:
        if plan.how == "cancel_after_delay":
            await asyncio.sleep(plan.delay_s)
            call.cancel()
        async for response in call:
            ended.responses += 1
            ended.completion_tokens += len(response.token_ids)
            if plan.how == "cancel_after_tokens" and ended.completion_tokens >= plan.after_tokens:
                call.cancel()
                break
    except grpc.aio.AioRpcError as e:
        ended.code, ended.details = e.code(), e.details() or ""
        return ended
    except asyncio.CancelledError:
        if not call.cancelled():  # not the read of a call cancelled here, but this task being cancelled
            raise
    ended.code = await call.code()
    return ended


async def run_all(address: str, plans: list[Plan]) -> list[Ended]:
    """Every plan, CONCURRENCY requests at a time, over real gRPC."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(stub, plan: Plan) -> Ended:
        async with slots:
            return await run_and_end(stub, plan)

    async with public_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        return await asyncio.gather(*(one(stub, plan) for plan in plans))


async def scheduler_outcomes(cluster) -> Counter:
    """splitwise.requests by outcome, from the scheduler's /metrics."""
    samples = await asyncio.to_thread(scrape, cluster.scheduler.service.metrics.address)
    prefix = "splitwise_requests_total{outcome="
    return Counter({name[len(prefix):-1]: int(value) for name, value in samples.items() if name.startswith(prefix)})


def staging_segments(cluster) -> list[str]:
    """This process's KV staging segments in /dev/shm (every service of the test runs in it) that a request
    holds: not those the workers' pools keep for their next request."""
    workers = [w for w in (cluster.prompt_worker, cluster.token_worker) if w is not None]
    pooled = {name for worker in workers for backend in worker.servicer.transports.backends.values()
              if hasattr(backend, "pool") for name in backend.pool.free_names}
    return sorted(p.name for p in SHM_DIR.glob(f"splitwise-kv-{os.getpid()}-*") if p.name not in pooled)


def rpc_handlers_running() -> Counter:
    """The gRPC methods whose server handlers still run in this process (grpc.aio names each handler's task), and
    the calls still open on WorkerCalls streams (each a task named after its method); the long-lived WorkerCalls
    stream itself belongs to no request."""
    names = [task.get_name() for task in asyncio.all_tasks()]
    return Counter(name.removeprefix(prefix).rstrip("]") for name in names
                   for prefix in ("HandleExceptions[", "WorkerCall[")
                   if name.startswith(prefix) and name != "HandleExceptions[/splitwise.v1.WorkerCalls/Calls]")


def held_by_services(cluster) -> list[str]:
    """What the workers and the scheduler still hold or serve (every service of the test runs in this process)."""
    prompt, token, scheduler = cluster.prompt_worker.servicer, cluster.token_worker.servicer, cluster.scheduler.servicer
    held = []
    for name, engine in (("prompt worker", prompt.engine), ("token worker", token.engine)):
        if engine.blocks.num_used or engine.num_requests:
            held.append(f"{name}: {engine.blocks.num_used} KV blocks, {engine.num_requests} requests")
    if token.receivers:
        held.append(f"token worker: {len(token.receivers)} KV receivers, e.g. {sorted(token.receivers)[:3]}")
    if prompt.keeping:
        held.append(f"prompt worker: {len(prompt.keeping)} KV copies still on their way to the kv_store")
    if segments := staging_segments(cluster):
        held.append(f"{len(segments)} staging segments in {SHM_DIR}, e.g. {segments[:3]}")
    if scheduler.requests_in_flight:
        held.append(f"scheduler: {scheduler.requests_in_flight} requests in flight")
    if any(scheduler.view.in_flight_tokens.values()):
        held.append(f"scheduler: tokens in flight on workers {scheduler.view.in_flight_tokens}")
    if handlers := rpc_handlers_running():
        held.append(f"RPC handlers still running: {dict(handlers)}")
    return held


async def held_in_registry(cluster, client: SplitwiseClient, since: float) -> list[str]:
    """What the workers' heartbeats sent after `since` (unix time) report, as the scheduler serves them."""
    status = await client.cluster_status(timeout=5)
    held = [f"ClusterStatus: {status.requests_in_flight} requests in flight"] if status.requests_in_flight else []
    ours = {cluster.prompt_worker.address, cluster.token_worker.address}
    seen = [w for w in status.workers if w.address in ours]
    if len(seen) != len(ours):
        return held + [f"ClusterStatus lists {len(seen)} of the cluster's {len(ours)} workers"]
    for worker in seen:
        if worker.heartbeat_age_s > time.time() - since:
            held.append(f"{worker.role} worker: no heartbeat since the workers went idle")
        elif worker.kv_used_tokens or worker.active_requests:
            held.append(f"{worker.role} worker reports {worker.kv_used_tokens} KV tokens used and "
                        f"{worker.active_requests} requests")
    return held


async def held_in_kv_store(cluster, index: KVIndex) -> list[str]:
    """The kv_store's transfers, and the KV index entries naming it as their holder."""
    store = cluster.kv_store.servicer
    held = []
    if store.transfers:
        transfers = store.transfers.values()
        states = Counter("complete" if t.complete else "failed" if t.failed else "open" for t in transfers)
        held.append(f"kv_store: {len(store.transfers)} transfers {dict(states)} of {store.bytes_held} bytes, "
                    f"e.g. {sorted(store.transfers)[:3]}")
    indexed = [e.key for e in await index.entries() if e.holder == cluster.kv_store.address]
    if indexed:
        held.append(f"KV index: {len(indexed)} entries held by this kv_store, e.g. {indexed[:3]}")
    return held


async def wait_until_nothing_held(check, within_s: float) -> None:
    """Polls `check` (returning, or awaitable of, what is still held) until it returns nothing, or fails."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while held := await _value(check()):
        if loop.time() > deadline:
            pytest.fail(f"still held after {within_s}s:\n" + "\n".join(held))
        await asyncio.sleep(0.05)


async def _value(result):
    return await result if asyncio.iscoroutine(result) else result


@pytest.fixture
async def kv_index(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield KVIndex(client)
    await client.aclose()


@pytest.mark.parametrize("kv_transfer", MODES)
async def test_randomly_cancelled_requests_leave_no_kv_on_workers_and_none_in_kv_store_past_its_ttl(
        kv_transfer, redis_url, cache_dir, trace_file, meter_provider, kv_index):
    plans = PLANS[kv_transfer]
    folder = resolve_model("tiny-llama", cache_dir)[1]
    async with local_cluster(redis_url, "tiny-llama", cache_dir, kv_transfer=kv_transfer,
                             scheduler_overrides={"kv_layerwise_min_tokens": LAYERWISE_MIN_TOKENS, "kv_keep": True},
                             prompt_overrides={"heartbeat_s": HEARTBEAT_S},
                             kv_store_overrides={"ttl_s": KV_STORE_TTL_S},
                             heartbeat_s=HEARTBEAT_S) as cluster:
        await wait_for_workers(cluster)
        outcomes_before = await scheduler_outcomes(cluster)
        started = time.monotonic()
        ended = await run_all(cluster.address, plans)
        print(f"[{kv_transfer}] {len(plans)} requests in {time.monotonic() - started:.1f}s: "
              f"{dict(Counter(e.code.name for e in ended))}")

        unexpected = [e for e in ended if e.code not in CLIENT_ENDINGS]
        assert not unexpected, "requests ended otherwise than their clients chose:\n" + "\n".join(
            f"{e.plan}: {e.code.name}: {e.details}" for e in unexpected[:5])
        completed = [e for e in ended if e.code == grpc.StatusCode.OK and e.plan.how != "cancel_after_tokens"]
        short = [e for e in completed if e.completion_tokens != e.plan.max_tokens]
        assert not short, f"completed requests fell short: {short[:5]}"

        await wait_until_nothing_held(lambda: held_by_services(cluster), IDLE_WITHIN_S)
        idle_since = time.time()
        async with SplitwiseClient(cluster.address) as client:
            await wait_until_nothing_held(lambda: held_in_registry(cluster, client, idle_since), IDLE_WITHIN_S)
            outcomes = await scheduler_outcomes(cluster) - outcomes_before

            # The cluster still serves, correctly, a short prompt and one whose KV goes layer by layer.
            prompts = [plans[0].prompt_ids[:20], tuple(VOCAB[i % 200] for i in range(LAYERWISE_MIN_TOKENS + 5))]
            served = [f"served-after-{kv_transfer}-{i}" for i in range(len(prompts))]
            outs = [await client.generate(token_ids=prompt, max_tokens=12, request_id=rid, timeout=30)
                    for rid, prompt in zip(served, prompts)]
        await wait_until_nothing_held(lambda: held_by_services(cluster), IDLE_WITHIN_S)
        # Their KV is kept (a complete transfer each) and indexed for the TTL; after it, nothing is, of any request.
        store = cluster.kv_store.servicer
        assert all(rid in store.transfers and store.transfers[rid].complete for rid in served), \
            f"the served requests' KV is not kept: {sorted(store.transfers)[:5]}"
        indexed = {e.key for e in await kv_index.entries() if e.holder == cluster.kv_store.address}
        assert set(served) <= indexed, f"the served requests' KV is not indexed: {sorted(indexed)[:5]}"
        for prompt, out in zip(prompts, outs):
            assert out.token_ids == hf_greedy(folder, list(prompt), 12)
        await wait_until_nothing_held(lambda: held_in_kv_store(cluster, kv_index), KV_STORE_TTL_S + 1.0)

    # Every request that reached the scheduler was counted once, as its client ended it; requests cancelled before
    # the scheduler started on them are not counted.
    reached = sum(e.responses > 0 for e in ended)
    assert reached <= sum(outcomes.values()) <= len(plans), f"the scheduler counted {dict(outcomes)}"
    assert set(outcomes) <= SCHEDULER_OUTCOMES, f"the scheduler counted {dict(outcomes)}"
    assert outcomes["length"] + outcomes["stop"] >= len(completed), f"the scheduler counted {dict(outcomes)}"
