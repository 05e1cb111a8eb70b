"""Conditional disaggregation on a live cluster: when the prompt pool is busy, a short prompt is prefilled by its
token worker, with the same output as the split path."""

import pytest

from splitwise.client import SplitwiseClient
from splitwise.model.weights import resolve_model
from tests.integration.cluster import assert_no_kv_held, local_cluster
from tests.reference import hf_greedy
from tests.traces import wait_for_whole_trace

# Busy from 0 pending tokens: the prompt pool always counts as busy, so only the length decides.
ALWAYS_BUSY = {"conditional_prefill_max_tokens": 64, "prompt_pool_busy_tokens": 0}


@pytest.fixture(scope="module")
async def cluster(redis_url, cache_dir, trace_file):
    async with local_cluster(redis_url, "tiny-llama", cache_dir, scheduler_overrides=ALWAYS_BUSY) as c:
        yield c


@pytest.mark.parametrize("prompt_tokens, colocated", [(40, True), (100, False)])
async def test_short_prompts_run_on_the_token_worker_when_the_prompt_pool_is_busy(cluster, cache_dir, trace_file,
                                                                                  prompt_tokens, colocated):
    ids = [20 + i % 150 for i in range(prompt_tokens)]
    async with SplitwiseClient(cluster.address) as client:
        out = await client.generate(token_ids=ids, max_tokens=10, timeout=30)
    assert out.token_ids == hf_greedy(resolve_model("tiny-llama", cache_dir)[1], ids, 10)
    spans = await wait_for_whole_trace([trace_file], out.request_id)
    (routed,) = [s for s in spans if s["name"] == "scheduler.route"]
    assert routed["attributes"]["route.colocated"] is colocated
    assert any(s["name"] == "prompt_worker.prefill" for s in spans) is not colocated
    await assert_no_kv_held(cluster)
