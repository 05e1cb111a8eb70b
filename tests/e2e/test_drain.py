"""Graceful drain: SIGTERM on a worker stops admissions, lets the requests in flight finish, deregisters, and
exits 0."""

import asyncio
import signal

import grpc
import pytest

from splitwise.client import SplitwiseClient
from tests.e2e.launched_cluster import launched_cluster

pytestmark = pytest.mark.e2e

MAX_TOKENS = 600  # long enough that the SIGTERM lands mid-stream


@pytest.fixture
def cluster(tmp_path, cache_dir):
    with launched_cluster(tmp_path, cache_dir, {"SPLITWISE_DRAIN_GRACE_S": "60"}) as processes:
        yield processes


@pytest.mark.parametrize("role", ["token_worker", "prompt_worker"])
async def test_sigterm_lets_requests_in_flight_finish_then_the_worker_leaves_and_exits_0(cluster, role):
    worker = next(c for c in cluster.children if c.name == f"{role}-0")
    async with SplitwiseClient(cluster.children[-1].address) as client:
        tokens = []
        stream = client.stream(token_ids=list(range(30, 60)), max_tokens=MAX_TOKENS, ignore_eos=True, timeout=120)
        async for chunk in stream:
            tokens += chunk.token_ids
            if len(tokens) == 5:
                worker.proc.send_signal(signal.SIGTERM)
            last = chunk
        assert len(tokens) == MAX_TOKENS and last.finish_reason == "length"  # the request in flight finished
        assert await asyncio.to_thread(worker.proc.wait, 30) == 0
        status = await client.cluster_status()
        assert worker.name not in {w.worker_id for w in status.workers}
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # no worker of that role left: a clear refusal
            await client.generate(token_ids=[5, 6, 7], max_tokens=2, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
