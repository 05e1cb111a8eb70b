"""The mixed pool on a live cluster: a burst of long prompts makes the scheduler borrow a token worker into the
mixed pool, where it prefills too; once the burst has drained it goes back. ClusterStatus, the metrics and the
traces show it, and the outputs stay exact."""

import asyncio

import pytest

from services.token_worker import app as token_app
from splitwise.cli import print_status
from splitwise.client import SplitwiseClient
from splitwise.config import TokenWorkerConfig
from splitwise.model.weights import resolve_model
from tests.security import tls_dir
from tests.integration.cluster import METRICS_LISTEN, assert_no_kv_held, local_cluster
from tests.reference import hf_greedy
from tests.traces import wait_for_whole_trace

BORROW_AT = 400  # pending prompt tokens per prompt worker
FAST = {"heartbeat_s": 0.1}


@pytest.fixture
async def cluster(redis_url, cache_dir, trace_file):
    isolated = redis_url.rsplit("/", 1)[0] + "/9"  # a registry and pools of their own
    scheduler = {"pool_borrow_prompt_tokens": BORROW_AT, "pool_cooldown_s": 0.3, "registry_refresh_s": 0.05,
                 "conditional_prefill_max_tokens": 0}
    async with local_cluster(isolated, "tiny-llama", cache_dir, scheduler_overrides=scheduler, prompt_overrides=FAST,
                             worker_id="token-a", **FAST) as c:
        second = await token_app.start(TokenWorkerConfig(
            listen="127.0.0.1:0", device="cpu", model="tiny-llama", cache_dir=str(cache_dir), redis_url=isolated,
            metrics_listen=METRICS_LISTEN, worker_id="token-b", tls_dir=str(tls_dir()), **FAST))
        try:
            async with SplitwiseClient(c.address) as client:
                for _ in range(100):
                    if len((await client.cluster_status()).workers) == 3:
                        break
                    await asyncio.sleep(0.05)
            yield c, second
        finally:
            await second.stop(grace_s=1.0)


async def pools(client: SplitwiseClient) -> dict[str, str]:
    return {w.worker_id: w.pool for w in (await client.cluster_status()).workers}


async def test_a_burst_of_long_prompts_borrows_a_token_worker_into_the_mixed_pool_and_gives_it_back(
        cluster, cache_dir, trace_file, capsys):
    c, second = cluster
    folder = resolve_model("tiny-llama", cache_dir)[1]
    prompts = [[(7 * i + j) % 200 + 3 for j in range(240)] for i in range(24)]
    async with SplitwiseClient(c.address) as client:
        before = await pools(client)
        assert sorted(before.values()) == ["prompt", "token", "token"]
        seen: list[dict[str, str]] = []

        async def watch():
            while True:
                seen.append(await pools(client))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        outs = await asyncio.gather(*(client.generate(token_ids=p, max_tokens=6, ignore_eos=True, timeout=120)
                                      for p in prompts))
        assert any("mixed" in p.values() for p in seen), "no worker was borrowed during the burst"
        # After the burst: back home within a few refreshes.
        for _ in range(100):
            if await pools(client) == before:
                break
            await asyncio.sleep(0.1)
        watcher.cancel()
        assert await pools(client) == before
        status = await client.cluster_status()
    moves = [(t.from_pool, t.to_pool) for t in reversed(status.pool_transitions)]
    assert ("token", "mixed") in moves and ("mixed", "token") in moves
    lent = next(t for t in status.pool_transitions if t.to_pool == "mixed")
    assert lent.worker_id in ("token-a", "token-b") and "prompt pool busy" in lent.reason
    print_status(status)  # what `splitwise status` shows
    shown = capsys.readouterr().out
    assert f"{lent.worker_id}: token -> mixed" in shown and f"{lent.worker_id}: mixed -> token" in shown
    assert "pools: prompt 1 workers" in shown and "token 2 workers" in shown

    # Some requests were prefilled in the mixed pool, with output as exact as the split ones'.
    routes = []
    for out in outs:
        spans = await wait_for_whole_trace([trace_file], out.request_id)
        (route,) = [s for s in spans if s["name"] == "scheduler.route"]
        routes.append(route["attributes"]["route.prompt_worker.pool"])
    assert "mixed" in routes and "prompt" in routes
    for prompt, out in list(zip(prompts, outs))[:4]:
        reference = hf_greedy(folder, prompt, 6)  # transformers stops at end-of-sequence
        assert len(out.token_ids) == 6 and out.token_ids[: len(reference)] == reference
    await assert_no_kv_held(c)
    assert second.servicer.engine.blocks.num_used == 0
