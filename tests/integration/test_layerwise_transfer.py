"""Layer-wise, the KV cache crosses to the token worker layer by layer while prefill is still running;
serialized (short prompts), it crosses after the prefill."""

import time

import pytest

from splitwise.client import SplitwiseClient
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
    # Layer-wise from 100 prompt tokens on: the test prompts are 300 long, the serialized one 50.
    async with local_cluster(redis_url, "tiny-llama", cache_dir,
                             scheduler_overrides={"kv_layerwise_min_tokens": 100}) as c:
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
