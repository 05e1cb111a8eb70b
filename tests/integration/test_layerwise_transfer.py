"""The KV cache crosses to the token worker layer by layer while prefill is still running."""

import time

import pytest

from splitwise.client import SplitwiseClient
from tests.integration.cluster import local_cluster


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    async with local_cluster(redis_url, "tiny-llama", cache_dir) as c:
        yield c


async def test_layer_kv_reaches_the_token_worker_before_the_next_layer_is_computed(cluster):
    runner = cluster.prompt_worker.servicer.engine.runner
    receivers = cluster.token_worker.servicer.receivers
    layers_received_at = {}  # layer computed -> layers the token worker held at that moment
    original = runner.model

    def model(token_ids, batch, cache_keys, cache_values, on_layer_kv=None):
        def after_layer(layer, keys, values):
            on_layer_kv(layer, keys, values)
            # Hold the compute thread until this layer has landed on the token worker (or 5 s pass).
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                landed = set().union(*(r.layers_received for r in list(receivers.values())))
                if layer in landed:
                    break
                time.sleep(0.001)
            layers_received_at[layer] = landed

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
