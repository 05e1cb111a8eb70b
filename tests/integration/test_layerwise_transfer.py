"""Layer-wise, the KV cache crosses to the token worker layer by layer while prefill is still running;
serialized (short prompts), it crosses after the prefill."""

import asyncio
import time

import pytest

from splitwise.client import SplitwiseClient
from splitwise.telemetry.jsonl_exporter import read_spans
from splitwise.telemetry.tracing import tracer
from tests.integration.cluster import local_cluster

# How long a layer sent layer-wise may take to land on the token worker (the compute thread waits for it).
LAYER_LANDS_WITHIN_S = 5.0


def landed_layers(receivers) -> set[int]:
    return set().union(*(r.layers_received for r in list(receivers.values())))


def wait_for_a_layer(receivers, layer: int) -> set[int]:
    """Holds the compute thread until `layer` has landed on the token worker, or LAYER_LANDS_WITHIN_S pass."""
    deadline = time.monotonic() + LAYER_LANDS_WITHIN_S
    while time.monotonic() < deadline:
        if layer in (landed := landed_layers(receivers)):
            return landed
        time.sleep(0.001)
    return landed_layers(receivers)


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    # Layer-wise from 100 prompt tokens on: the test prompts are 300 long, the serialized one 50. Each request's KV
    # is kept in the kv_store too (after its transfer: the layer-wise tests do not see it).
    async with local_cluster(redis_url, "tiny-llama", cache_dir,
                             scheduler_overrides={"kv_layerwise_min_tokens": 100, "kv_keep": True}) as c:
        yield c


async def test_layer_kv_reaches_the_token_worker_before_the_next_layer_is_computed(cluster):
    runner = cluster.prompt_worker.servicer.engine.runner
    receivers = cluster.token_worker.servicer.receivers
    layers_received_at = {}  # layer computed -> layers the token worker held at that moment
    original = runner.model

    def model(token_ids, batch, cache_keys, cache_values, on_layer_kv=None):
        def after_layer(layer, keys, values):
            on_layer_kv(layer, keys, values)
            layers_received_at[layer] = wait_for_a_layer(receivers, layer)

        return original(token_ids, batch, cache_keys, cache_values, after_layer if on_layer_kv else None)

    runner.model = model
    try:
        async with SplitwiseClient(cluster.address) as client:
            out = await client.generate(prompt="layer by layer " * 20, max_tokens=4, timeout=60)
    finally:
        runner.model = original
    assert out.completion_tokens == 4
    num_layers = cluster.prompt_worker.servicer.layout.num_layers
    assert sorted(layers_received_at) == list(range(num_layers))
    for layer, landed in layers_received_at.items():
        # Layer L is on the token worker while layers after L have not been computed yet.
        assert landed == set(range(layer + 1)), (layer, landed)


async def test_a_prompt_below_the_layerwise_threshold_ships_its_kv_after_the_prefill(cluster, tokenizer_free_ids):
    runner = cluster.prompt_worker.servicer.engine.runner
    num_layers = cluster.prompt_worker.servicer.layout.num_layers
    receivers = cluster.token_worker.servicer.receivers
    layers_received_at = {}
    original = runner.model

    def model(token_ids, batch, cache_keys, cache_values, on_layer_kv=None):
        def after_layer(layer, keys, values):
            on_layer_kv(layer, keys, values)
            # At the last layer, hold the prefill as long as a layer sent layer-wise takes to land (what the test
            # above allows): had any layer been sent during the prefill, it would be on the token worker by then.
            if layer == num_layers - 1:
                wait_for_a_layer(receivers, 0)
            layers_received_at[layer] = landed_layers(receivers)

        return original(token_ids, batch, cache_keys, cache_values, after_layer if on_layer_kv else None)

    runner.model = model
    try:
        async with SplitwiseClient(cluster.address) as client:
            out = await client.generate(token_ids=tokenizer_free_ids, max_tokens=4, ignore_eos=True, timeout=60)
    finally:
        runner.model = original
    assert out.completion_tokens == 4
    assert sorted(layers_received_at) == list(range(cluster.prompt_worker.servicer.layout.num_layers))
    assert all(landed == set() for landed in layers_received_at.values()), layers_received_at


@pytest.fixture
def tokenizer_free_ids():
    return [5 + i % 200 for i in range(50)]


async def test_a_serialized_transfer_and_the_kept_copy_go_as_one_run_of_every_layer(cluster, trace_file):
    """Each sends its layers in one chunk (KVChunk.num_layers): the transfer to the token worker, staged or over
    gRPC, and the kept copy, over gRPC into the kv_store, which hands the same messages to a resuming worker."""
    ids = [7 + i % 150 for i in range(40)]
    with tracer().start_as_current_span("test.request") as span:  # the request's trace, as the client's CLIENT span
        async with SplitwiseClient(cluster.address) as client:
            await client.generate(token_ids=ids, max_tokens=2, ignore_eos=True, timeout=60)
    trace_id = f"{span.get_span_context().trace_id:032x}"
    num_layers = cluster.prompt_worker.servicer.layout.num_layers
    deadline = time.monotonic() + 10
    spans = []
    while {"kv_transfer.send", "kv_transfer.keep"} - {s["name"] for s in spans}:
        assert time.monotonic() < deadline, [s["name"] for s in spans]
        await asyncio.sleep(0.05)
        spans = [s for s in read_spans(trace_file) if s["trace_id"] == trace_id]
    for name in ("kv_transfer.send", "kv_transfer.keep"):
        attributes = next(s["attributes"] for s in spans if s["name"] == name)
        assert (attributes["kv.chunks"], attributes["kv.layers"]) == (1, num_layers), (name, attributes)
    kept = cluster.kv_store.servicer.transfers[attributes["splitwise.request_id"]]
    assert kept.complete and [m.WhichOneof("kind") for m in kept.messages] == ["header", "chunk", "commit"]
    assert kept.messages[1].chunk.num_layers == num_layers
