"""Two scheduler replicas over one Redis both serve; when one is killed, a client given both addresses goes on
being served by the other, which still sees every worker, and its stream cut by the kill goes on there."""

import asyncio
import time

import pytest

from splitwise.client import SplitwiseClient
from tests.e2e.launched_cluster import launched_cluster, recoveries

pytestmark = pytest.mark.e2e

PROMPT = [5, 6, 7, 8, 9]
MAX_TOKENS = 8
LONG_MAX_TOKENS = 600  # long enough that the kill lands mid-stream
WORKERS = {"prompt_worker-0", "token_worker-0"}


@pytest.fixture
def cluster(tmp_path, cache_dir):
    with launched_cluster(tmp_path, cache_dir, schedulers=2) as cluster:
        yield cluster


async def wait_until_idle(client: SplitwiseClient, timeout_s: float = 15.0):
    """The cluster status once every worker reports no request (its heartbeats carry the count)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.cluster_status()
        if all(w.active_requests == 0 for w in status.workers) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


async def test_a_killed_scheduler_replica_leaves_clients_of_both_served_by_the_other(cluster):
    survivor, victim = cluster.schedulers
    outputs = []
    for replica in (survivor, victim):  # both replicas serve
        async with SplitwiseClient(replica.address) as client:
            out = await client.generate(token_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=30)
            outputs.append(out.token_ids)
    assert len(outputs[0]) == MAX_TOKENS and outputs[0] == outputs[1]

    async with SplitwiseClient(survivor.address) as client:
        unbroken = await client.generate(token_ids=PROMPT, max_tokens=LONG_MAX_TOKENS, ignore_eos=True, timeout=60)
    assert len(unbroken.token_ids) == LONG_MAX_TOKENS

    async with SplitwiseClient([victim.address, survivor.address]) as client:  # calls go to the victim first
        tokens, text, last = [], "", None
        async for chunk in client.stream(token_ids=PROMPT, max_tokens=LONG_MAX_TOKENS, ignore_eos=True, timeout=60):
            tokens += chunk.token_ids
            text += chunk.text
            last = chunk
            if len(tokens) >= 5 and victim.proc.poll() is None:
                victim.proc.kill()
                cut_after = len(tokens)
        assert victim.proc.wait(10) is not None
        # The stream cut by the kill went on on the other replica, as if unbroken.
        assert cut_after < LONG_MAX_TOKENS
        assert tokens == unbroken.token_ids and text == unbroken.text
        assert last.finish_reason == "length" and last.completion_tokens == LONG_MAX_TOKENS
        # From the prompt KV the victim's stream kept in the kv_store, or recomputed if the kill beat that copy.
        continued = {kv: n for (kind, kv), n in recoveries(survivor.metrics_address).items() if kind == "continue"}
        assert sum(continued.values()) == 1, continued

        out = await client.generate(token_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=30)
        assert out.token_ids == outputs[0]

    async with SplitwiseClient([victim.address, survivor.address]) as client:  # the dead one refuses connections
        for _ in range(3):
            out = await client.generate(token_ids=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=30)
            assert out.token_ids == outputs[0]
        status = await client.cluster_status()
        assert {w.worker_id for w in status.workers} == WORKERS

    async with SplitwiseClient(survivor.address) as client:
        status = await wait_until_idle(client)  # the killed replica's stream was cancelled on the workers too
    assert {w.worker_id for w in status.workers} == WORKERS
    assert [w.active_requests for w in status.workers] == [0, 0]
    assert cluster.why_nothing_serves({victim.name}) is None  # `splitwise up` would go on serving without it
