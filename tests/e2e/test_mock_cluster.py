"""A `splitwise up --engine mock` cluster: real worker processes (registry, batching, blocks, KV transports) whose
model compute is a machine profile's modelled time. It serves concurrent streams of exactly max_tokens, the same
request twice gives the same tokens, a long prompt's first token comes after its modelled prefill, and streams
whose token worker dies resume elsewhere with the same output."""

import random
import time

import pytest

from splitwise.client import SplitwiseClient
from splitwise.model.mock import MOCK_VOCAB_SIZE, load_mock_model
from tests.e2e.launched_cluster import launched_cluster, recoveries, run_streams

pytestmark = pytest.mark.e2e

PROFILE = "llama2-70b@dgx-a100"
TIME_FACTOR = 2.0
KV_SCALE = 256.0
SHORT_PROMPT, LONG_PROMPT = 16, 2000  # one prefill step each (SPLITWISE_MAX_BATCH_TOKENS 2048)


async def first_token_s(client: SplitwiseClient, prompt: list[int]) -> float:
    sent = time.monotonic()
    async for chunk in client.stream(token_ids=prompt, max_tokens=2, ignore_eos=True, timeout=60):
        if chunk.token_ids:
            return time.monotonic() - sent
    raise AssertionError("the stream ended without a token")


async def test_mock_cluster_serves_deterministic_streams_with_modelled_prefill_times(tmp_path, cache_dir):
    rng = random.Random(7)
    prompts = [[rng.randrange(3, MOCK_VOCAB_SIZE) for _ in range(rng.randrange(8, 600))] for _ in range(8)]
    with launched_cluster(tmp_path, cache_dir, engine="mock", mock_profile=PROFILE, mock_time_factor=TIME_FACTOR,
                          mock_kv_scale=KV_SCALE, prompt_workers=2, token_workers=2) as cluster:
        async with SplitwiseClient(cluster.address) as client:
            assert (await client.cluster_status()).model == f"mock:{PROFILE}"
        first = await run_streams(cluster.address, prompts, max_tokens=24)
        again = await run_streams(cluster.address, prompts[:3], max_tokens=24)
        async with SplitwiseClient(cluster.address) as client:
            short = [await first_token_s(client, [5] * SHORT_PROMPT) for _ in range(3)]
            long = [await first_token_s(client, [6] * LONG_PROMPT) for _ in range(3)]
    assert all(len(out) == 24 for out in first)
    assert again == first[:3]
    perf = load_mock_model(PROFILE).profile.perf
    assert min(long) >= TIME_FACTOR * perf.prefill_s(LONG_PROMPT)  # a sleep is never shorter than asked
    assert sorted(long)[1] > sorted(short)[1]


async def test_mock_token_worker_death_resumes_streams_with_identical_output(tmp_path, cache_dir):
    rng = random.Random(11)
    prompts = [[rng.randrange(3, MOCK_VOCAB_SIZE) for _ in range(rng.randrange(8, 300))] for _ in range(8)]
    with launched_cluster(tmp_path, cache_dir, engine="mock", mock_profile=PROFILE, mock_time_factor=TIME_FACTOR,
                          mock_kv_scale=KV_SCALE, prompt_workers=1, token_workers=2) as cluster:
        expected = await run_streams(cluster.address, prompts, max_tokens=64)
        victim = next(c for c in cluster.children if c.name == "token_worker-0")
        resumed = await run_streams(cluster.address, prompts, max_tokens=64, kill=victim.proc.kill)
        recovered = recoveries(cluster.schedulers[0].metrics_address)
    assert resumed == expected
    # The dead worker held some of the streams: they resumed from the prompt KV it kept in the kv_store.
    assert recovered.get(("resume", "kv_store"), 0) >= 1, recovered
