"""Transport faults, injected by the fake backend (no root, no network namespace): a write that fails, a write
that stalls, a layer corrupted after its checksum, a receiver that cannot stage. Each fails its own request with
a status that says why (or falls back to gRPC), and no KV stays held anywhere."""

import asyncio

import grpc
import pytest

from services.prompt_worker import app as prompt_app
from splitwise.client import SplitwiseClient
from splitwise.config import PromptWorkerConfig
from splitwise.kv.transport.fake import Faults
from tests import security
from tests.integration.cluster import (METRICS_LISTEN, STEADY_REGISTRY_TTL_S, assert_no_kv_held, local_cluster,
                                       wait_for_workers)
from tests.integration.test_contract import scrape

PROMPT = list(range(10, 60))
STALL_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, meter_provider):
    fake = {"kv_transports": "fake"}
    async with local_cluster(redis_url, "tiny-llama", cache_dir,
                             prompt_overrides={**fake, "kv_progress_timeout_s": STALL_TIMEOUT_S},
                             scheduler_overrides={"kv_layerwise_min_tokens": 0}, **fake) as c:
        yield c


def faults(worker) -> Faults:
    return worker.servicer.transports.backends["fake"].faults


@pytest.fixture
def sender_faults(cluster):
    yield faults(cluster.prompt_worker)
    cluster.prompt_worker.servicer.transports.backends["fake"].faults = Faults()


@pytest.fixture
def receiver_faults(cluster):
    yield faults(cluster.token_worker)
    cluster.token_worker.servicer.transports.backends["fake"].faults = Faults()


async def generate(c, **kw):
    async with SplitwiseClient(c.address) as client:
        return await client.generate(token_ids=PROMPT, max_tokens=6, ignore_eos=True, timeout=60, **kw)


async def failed_generate(c) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generate(c)
    return error.value


def failures(c) -> float:
    samples = scrape(c.prompt_worker.service.metrics.address)
    return samples.get("splitwise_kv_transport_failures_total{direction=send,transport=fake}", 0)


async def test_the_fake_transport_serves_a_request_as_the_real_ones_do(cluster):
    result = await generate(cluster)
    assert len(result.token_ids) == 6
    await assert_no_kv_held(cluster)


async def test_a_write_that_fails_mid_transfer_fails_the_request_with_the_cause_and_frees_kv(cluster, sender_faults):
    before = await asyncio.to_thread(failures, cluster)
    sender_faults.fail_at_layer = 1
    error = await failed_generate(cluster)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert "fake write of layer 1" in error.details() and "injected" in error.details()
    await assert_no_kv_held(cluster, within_s=5.0)
    assert await asyncio.to_thread(failures, cluster) > before


async def test_a_write_that_stalls_fails_after_the_progress_timeout_not_the_request_deadline(cluster, sender_faults):
    sender_faults.stall_at_layer = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    error = await failed_generate(cluster)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert "stalled" in error.details()
    assert loop.time() - started < 30  # the client's own deadline is 60 s; the stall is noticed well before
    await assert_no_kv_held(cluster, within_s=5.0)


async def test_a_layer_corrupted_after_its_checksum_fails_with_data_loss(cluster, sender_faults):
    sender_faults.corrupt_layer = 0
    error = await failed_generate(cluster)
    assert error.code() == grpc.StatusCode.DATA_LOSS, error.details()
    assert "checksum mismatch in layer 0" in error.details()
    await assert_no_kv_held(cluster, within_s=5.0)


async def test_a_receiver_that_cannot_stage_takes_the_kv_over_the_grpc_stream(cluster, receiver_faults):
    receiver_faults.refuse_staging = True
    first = await generate(cluster)
    receiver_faults.refuse_staging = False
    second = await generate(cluster)
    assert first.token_ids == second.token_ids  # same greedy output, whichever way the KV came
    samples = await asyncio.to_thread(scrape, cluster.prompt_worker.service.metrics.address)
    assert samples["splitwise_kv_transfers_total{direction=send,outcome=ok,transport=grpc}"] >= 1
    await assert_no_kv_held(cluster)


async def test_a_sender_whose_writes_fail_is_avoided_and_the_token_worker_is_kept(cluster, sender_faults, redis_url,
                                                                                cache_dir):
    """The failure names its cause in a structured status detail (the sender's fault), so the scheduler routes the
    request again to another prompt worker and keeps the one token worker, which only saw its sender fail."""
    expected = (await generate(cluster)).token_ids
    failing_id = cluster.prompt_worker.heartbeat.describe().worker_id
    second = await prompt_app.start(PromptWorkerConfig(
        worker_id=f"{failing_id}-second",  # sorts after it: idle alike, the failing worker is routed to first
        listen="127.0.0.1:0", device="cpu", model="tiny-llama", cache_dir=str(cache_dir), redis_url=redis_url,
        metrics_listen=METRICS_LISTEN, tls_dir=str(security.tls_dir()), registry_ttl_s=STEADY_REGISTRY_TTL_S,
        kv_transports="fake", kv_progress_timeout_s=STALL_TIMEOUT_S))
    try:
        await wait_for_workers(cluster, count=3, idle=True)  # idle alike: the tie-break picks the failing one
        before = await asyncio.to_thread(failures, cluster)
        sender_faults.fail_at_layer = 1  # every transfer of the module's prompt worker fails
        for _ in range(3):
            result = await generate(cluster)
            assert result.token_ids == expected
        assert await asyncio.to_thread(failures, cluster) > before  # the failing worker was tried first
    finally:
        await second.stop(grace_s=1.0)
    await assert_no_kv_held(cluster, within_s=5.0)


async def test_after_every_fault_the_next_request_is_served(cluster):
    result = await generate(cluster)
    assert len(result.token_ids) == 6
    await assert_no_kv_held(cluster)
