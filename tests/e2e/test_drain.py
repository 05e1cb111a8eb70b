"""Graceful drain: SIGTERM on a worker stops admissions, lets the requests in flight finish, deregisters, and
exits 0."""

import asyncio
import signal

import grpc
import pytest

from splitwise.client import SplitwiseClient
from splitwise.launcher import Cluster, UpOptions, free_port_ranges
from splitwise.model.weights import resolve_model

pytestmark = pytest.mark.e2e

MAX_TOKENS = 600  # long enough that the SIGTERM lands mid-stream


@pytest.fixture
def cluster(tmp_path, cache_dir):
    resolve_model("tiny-llama", cache_dir)
    scheduler_port, prompt_port, token_port, kv_store_port, redis_port = free_port_ranges(1, 1, 1, 1, 1)
    options = UpOptions(model="tiny-llama", device="cpu", run_dir=tmp_path, scheduler_port=scheduler_port,
                        prompt_port=prompt_port, token_port=token_port, kv_store_port=kv_store_port,
                        redis_port=redis_port, metrics_port=0, startup_timeout_s=120,
                        extra_env={"SPLITWISE_CACHE_DIR": str(cache_dir), "SPLITWISE_NUM_THREADS": "1",
                                   "SPLITWISE_HEARTBEAT_S": "0.2", "SPLITWISE_DRAIN_GRACE_S": "60"})
    processes = Cluster(options)
    processes.start()
    try:
        try:
            processes.wait_healthy()
        except (RuntimeError, TimeoutError, grpc.RpcError) as e:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (tmp_path / "logs").glob("*.log"))
            pytest.fail(f"the cluster did not start: {e}\n{logs}")
        yield processes
    finally:
        processes.stop()


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
