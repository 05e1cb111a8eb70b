"""A prompt worker's queue is bounded (SPLITWISE_MAX_QUEUED_PROMPT_TOKENS): a prompt beyond it is refused with
RESOURCE_EXHAUSTED; the scheduler then tries another prompt worker, and only when none can take it does the client
get RESOURCE_EXHAUSTED, with a retry hint. Nothing is held afterwards."""

import asyncio
import threading

import grpc
import pytest

from services.prompt_worker import app as prompt_app
from splitwise.client import SplitwiseClient
from splitwise.config import PromptWorkerConfig
from splitwise.model.weights import resolve_model
from tests.security import tls_dir
from tests.integration.cluster import METRICS_LISTEN, assert_no_kv_held, local_cluster
from tests.reference import hf_greedy
from tests.traces import SCHEDULER_GENERATE, request_trace

QUEUE_LIMIT = 200  # prompt tokens waiting for or in a prefill
PROMPT_TOKENS = 80  # one prompt in its prefill and one waiting fit; a third would pass the limit
QUEUE = {"max_queued_prompt_tokens": QUEUE_LIMIT, "heartbeat_s": 0.1}


def prompt(i: int) -> list[int]:
    return [(13 * i + j) % 200 + 3 for j in range(PROMPT_TOKENS)]


@pytest.fixture
async def cluster(redis_url, cache_dir, trace_file):
    isolated = redis_url.rsplit("/", 1)[0] + "/11"  # a registry of its own
    scheduler = {"routing_policy": "round_robin", "registry_refresh_s": 0.05}
    async with local_cluster(isolated, "tiny-llama", cache_dir, scheduler_overrides=scheduler,
                             prompt_overrides={**QUEUE, "worker_id": "prompt-a"}) as c:
        yield c, isolated


class Gate:
    """Holds a worker engine's compute thread at its next forward pass until opened."""

    def __init__(self, engine):
        self.engine, self.runner, self.original = engine, engine.runner, engine.runner.model
        self.entered, self.opened = threading.Event(), threading.Event()

        def model(*args, **kwargs):
            self.entered.set()
            self.opened.wait(30)
            return self.original(*args, **kwargs)

        self.runner.model = model

    def open(self):
        self.opened.set()
        self.runner.model = self.original


async def fill_queue(client: SplitwiseClient, gate: Gate) -> list[asyncio.Task]:
    """One request in its prefill (held at the gate), one waiting: 2 * PROMPT_TOKENS queued on the worker."""
    first = asyncio.create_task(client.generate(token_ids=prompt(0), max_tokens=4, ignore_eos=True, timeout=60))
    await asyncio.to_thread(gate.entered.wait, 10)
    second = asyncio.create_task(client.generate(token_ids=prompt(1), max_tokens=4, ignore_eos=True, timeout=60))
    for _ in range(500):  # until the second waits in the worker's queue too
        if len(gate.engine.scheduler.waiting) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(gate.engine.scheduler.waiting) == 2
    return [first, second]


async def test_a_full_prompt_queue_refuses_with_a_retry_hint_when_no_other_worker_can_take_it(cluster, cache_dir):
    c, _ = cluster
    folder = resolve_model("tiny-llama", cache_dir)[1]
    gate = Gate(c.prompt_worker.servicer.engine)
    try:
        async with SplitwiseClient(c.address) as client:
            admitted = await fill_queue(client, gate)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.generate(token_ids=prompt(2), max_tokens=4, ignore_eos=True, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "SPLITWISE_MAX_QUEUED_PROMPT_TOKENS" in refused.value.details()
            assert dict(refused.value.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
            gate.open()
            outputs = await asyncio.gather(*admitted)
            assert [o.token_ids for o in outputs] == [hf_greedy(folder, prompt(i), 4) for i in range(2)]
            again = await client.generate(token_ids=prompt(2), max_tokens=4, ignore_eos=True, timeout=30)
            assert again.token_ids == hf_greedy(folder, prompt(2), 4)
    finally:
        gate.open()
    await assert_no_kv_held(c)


async def test_a_prompt_refused_by_a_full_worker_is_prefilled_by_another(cluster, cache_dir, trace_file):
    c, redis_url = cluster
    folder = resolve_model("tiny-llama", cache_dir)[1]
    gate = Gate(c.prompt_worker.servicer.engine)
    other = None
    try:
        async with SplitwiseClient(c.address) as client:
            admitted = await fill_queue(client, gate)  # both on prompt-a: the only prompt worker yet
            other = await prompt_app.start(PromptWorkerConfig(
                listen="127.0.0.1:0", device="cpu", model="tiny-llama", cache_dir=str(cache_dir), redis_url=redis_url,
                metrics_listen=METRICS_LISTEN, worker_id="prompt-b", tls_dir=str(tls_dir()), **QUEUE))
            for _ in range(100):
                if len((await client.cluster_status()).workers) == 3:
                    break
                await asyncio.sleep(0.05)
            # Round-robin's next turn is prompt-a's (the first of the two by id): it is full, so prompt-b prefills.
            c.scheduler.servicer.view.routed = 1
            out = await client.generate(token_ids=prompt(2), max_tokens=4, ignore_eos=True, timeout=30,
                                        request_id="moved-on")
            assert out.token_ids == hf_greedy(folder, prompt(2), 4)
            gate.open()
            await asyncio.gather(*admitted)
        await asyncio.sleep(0.2)  # the root span is exported as its call ends
        (root,) = [s for s in request_trace([trace_file], "moved-on") if (s["name"], s["kind"]) == SCHEDULER_GENERATE]
        (retry,) = [e["attributes"] for e in root["events"] if e["name"] == "retry"]
        assert retry["worker"] == "prompt-a" and "SPLITWISE_MAX_QUEUED_PROMPT_TOKENS" in retry["error"], retry
        assert other.servicer.engine.blocks.num_used == 0
    finally:
        gate.open()
        if other is not None:
            await other.stop(grace_s=1.0)
    await assert_no_kv_held(c)
