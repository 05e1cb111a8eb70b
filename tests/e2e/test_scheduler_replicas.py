"""Two scheduler replicas over one Redis both serve; when one is killed, a client given both addresses goes on
being served by the other, which still sees every worker."""

import asyncio
import time

import grpc
import pytest

from splitwise.client import SplitwiseClient
from tests.e2e.launched_cluster import launched_cluster

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

    async with SplitwiseClient([victim.address, survivor.address]) as client:  # calls go to the victim first
        tokens = []
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async for chunk in client.stream(token_ids=PROMPT, max_tokens=LONG_MAX_TOKENS, ignore_eos=True, timeout=60):
                tokens += chunk.token_ids
                if len(tokens) >= 5 and victim.proc.poll() is None:
                    victim.proc.kill()
        # A stream that had yielded tokens is not replayed on the other replica: its caller sees the cut.
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert 5 <= len(tokens) < LONG_MAX_TOKENS
        assert victim.proc.wait(10) is not None

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
    assert cluster.lost_service() is None  # `splitwise up` would go on running
