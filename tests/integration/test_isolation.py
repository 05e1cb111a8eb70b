"""A request fails alone: hostile sampling parameters and corrupt KV never touch the requests batched beside it."""

import asyncio

import grpc
import pytest
import torch

from splitwise.client import SplitwiseClient
from splitwise.engine.request_handle import RequestHandle
from splitwise.kv.transport.sender import KVSender
from tests.integration.cluster import assert_no_kv_held, local_cluster, wait_for_workers
from tests.reference import hf_greedy

ORDINARY = [[3 + (7 * i + j) % 250 for j in range(12 + 5 * i)] for i in range(8)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference(tiny_folder):
    return [hf_greedy(tiny_folder, ids, MAX_TOKENS) for ids in ORDINARY]


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir):
    async with local_cluster(redis_url, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c


async def ordinary_requests(client: SplitwiseClient) -> list[list[int]]:
    outs = await asyncio.gather(*(client.generate(token_ids=ids, max_tokens=MAX_TOKENS, timeout=60) for ids in ORDINARY))
    return [out.token_ids for out in outs]


EXTREMES = [
    dict(temperature=1e-40),
    dict(temperature=1e-40, seed=5),
    dict(temperature=1e-30, top_p=1e-30),
    dict(temperature=1e-30, top_k=1),
    dict(temperature=1.0, top_k=1),
    dict(temperature=3.4e38),
    dict(temperature=3.4e38, top_p=1e-30, top_k=2**31 - 1),
    dict(temperature=1e-4, top_k=2, seed=-(2**63)),
]


async def test_extreme_sampling_parameters_succeed_beside_ordinary_requests_that_are_unaffected(cluster, reference):
    prompt = [5, 6, 7, 8, 9, 10]
    async with SplitwiseClient(cluster.address) as client:
        extremes = [client.generate(token_ids=prompt, max_tokens=8, ignore_eos=True, timeout=60, **params)
                    for params in [{}, *EXTREMES]]
        greedy, *outs, ordinary = await asyncio.gather(*extremes, ordinary_requests(client))
    assert ordinary == reference
    for params, out in zip(EXTREMES, outs):
        assert out.completion_tokens == 8 and out.finish_reason == "length", params
        if params["temperature"] < 1e-5 or params.get("top_k") == 1:  # sampled greedily
            assert out.token_ids == greedy.token_ids, params
    await assert_no_kv_held(cluster)


POISONED = "poisoned"


def nan_kv_for(request_id: str, on_layer_kv):
    """Wraps KVSender.on_layer_kv, where the prefill hands over each layer's KV, whichever way it is then encoded:
    the prompt worker pushes KV full of NaN (checksummed as sent) for one request."""

    def poisoning(self, layer, keys, values, token_start):
        if self.request_id == request_id:
            keys, values = torch.full_like(keys, float("nan")), torch.full_like(values, float("nan"))
        return on_layer_kv(self, layer, keys, values, token_start)

    return poisoning


async def test_a_request_whose_kv_holds_nan_fails_alone_with_data_loss_and_frees_its_kv(cluster, reference,
                                                                                          monkeypatch):
    monkeypatch.setattr(KVSender, "on_layer_kv", nan_kv_for(POISONED, KVSender.on_layer_kv))
    async with SplitwiseClient(cluster.address) as client:
        async def poisoned():
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.generate(token_ids=list(range(10, 90)), request_id=POISONED, max_tokens=MAX_TOKENS,
                                      ignore_eos=True, timeout=60)
            return error.value

        failed, ordinary = await asyncio.gather(poisoned(), ordinary_requests(client))
    assert failed.code() == grpc.StatusCode.DATA_LOSS, failed.details()
    assert "the model produced non-finite logits for this request (corrupt KV?)" in failed.details()
    assert ordinary == reference
    await assert_no_kv_held(cluster)


def failing_for(request_id: str, run):
    """Wraps an engine's ModelRunner.run: a step computing `request_id` raises, as a bug in the engine would."""

    def maybe_failing(batch):
        if any(seq.request_id == request_id for seq in batch.seqs):
            raise IndexError("index 7 is out of bounds for dimension 0 with size 3")
        return run(batch)

    return maybe_failing


def assert_plain_internal_error(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.INTERNAL, error.details()
    assert "<class" not in error.details() and "Error" not in error.details(), error.details()


async def test_an_engine_failure_reaches_the_client_as_internal_with_a_plain_message(cluster, reference, monkeypatch):
    engine = cluster.token_worker.servicer.engine
    monkeypatch.setattr(engine.runner, "run", failing_for("doomed", engine.runner.run))
    async with SplitwiseClient(cluster.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.generate(token_ids=[5, 6, 7, 8], request_id="doomed", max_tokens=8, timeout=60)
        assert_plain_internal_error(error.value)
        assert "the engine failed while computing this request" in error.value.details()
        assert await ordinary_requests(client) == reference
    await assert_no_kv_held(cluster)


async def test_an_exception_a_worker_does_not_map_reaches_the_client_as_internal_without_its_class(cluster,
                                                                                                    monkeypatch):
    next_event = RequestHandle.next_event

    async def failing(self):
        if self.seq.request_id == "unmapped":
            raise KeyError("layer 3")
        return await next_event(self)

    monkeypatch.setattr(RequestHandle, "next_event", failing)
    async with SplitwiseClient(cluster.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.generate(token_ids=[5, 6, 7, 8], request_id="unmapped", max_tokens=8, timeout=60)
    assert_plain_internal_error(error.value)
    assert "failed unexpectedly" in error.value.details()
    await assert_no_kv_held(cluster)
