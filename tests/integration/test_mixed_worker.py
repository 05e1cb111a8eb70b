"""A mixed worker runs both phases of a request itself (the paper's mixed pool, and the colocated baseline)."""

import asyncio

import pytest

from splitwise.client import SplitwiseClient
from splitwise.model.weights import load_tokenizer, resolve_model
from tests.integration.cluster import assert_no_kv_held, local_cluster
from tests.reference import assert_top_logprobs_match_transformers, hf_greedy


@pytest.fixture(scope="module")
async def mixed_only(redis_url, cache_dir, trace_file):
    isolated = redis_url.rsplit("/", 1)[0] + "/7"  # a registry of its own: only this cluster's workers
    async with local_cluster(isolated, "tiny-llama", cache_dir, prompt_worker=False, role="mixed") as c:
        async with SplitwiseClient(c.address) as client:
            for _ in range(100):
                if (await client.cluster_status()).workers:
                    break
                await asyncio.sleep(0.05)
        yield c


async def test_a_mixed_worker_alone_serves_requests_colocated_with_identical_output(mixed_only, cache_dir):
    folder = resolve_model("tiny-llama", cache_dir)[1]
    tokenizer = load_tokenizer(folder)
    prompts = ["colocated", "both phases here", "no KV transfer at all"]
    async with SplitwiseClient(mixed_only.address) as client:
        status = await client.cluster_status()
        assert [w.role for w in status.workers] == ["mixed"]
        outs = await asyncio.gather(*(client.generate(prompt=p, max_tokens=20, timeout=60) for p in prompts))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(folder, tokenizer.encode(prompt, add_special_tokens=False), 20)
    await assert_no_kv_held(mixed_only)


async def test_logprobs_of_the_chosen_tokens_on_request(mixed_only):
    async with SplitwiseClient(mixed_only.address) as client:
        plain = await client.generate(prompt="probabilities", max_tokens=6, ignore_eos=True, timeout=60)
        out = await client.generate(prompt="probabilities", max_tokens=6, ignore_eos=True, logprobs=True, timeout=60)
    assert plain.logprobs == []
    assert len(out.logprobs) == 6 and all(lp <= 0 for lp in out.logprobs)


async def test_top_logprobs_of_a_colocated_request_match_transformers(mixed_only, cache_dir):
    folder = resolve_model("tiny-llama", cache_dir)[1]
    ids = load_tokenizer(folder).encode("both phases, one worker", add_special_tokens=False)
    async with SplitwiseClient(mixed_only.address) as client:
        out = await client.generate(token_ids=ids, max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=3,
                                    timeout=60)
    assert_top_logprobs_match_transformers(folder, ids, out.token_ids, out.top_logprobs, 3)
