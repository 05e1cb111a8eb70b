"""Each KV transport moves a real KV cache from a prompt worker process to a token worker process, layer-wise
and serialized, and generation continues exactly as transformers generates."""

import os

import pytest

from splitwise.client import SplitwiseClient
from splitwise.model.weights import resolve_model
from tests.e2e.launched_cluster import launched_cluster
from tests.prerequisites import needs_mooncake
from tests.reference import hf_greedy
from tests.traces import wait_for_whole_trace

pytestmark = pytest.mark.e2e

TRANSPORTS = ["grpc", "shm", pytest.param("mooncake", marks=needs_mooncake())]
LAYERWISE_MIN_TOKENS = 100
PROMPTS = {"serialized": [7 + i % 90 for i in range(60)], "layerwise": [11 + (i * 7) % 200 for i in range(400)]}
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=TRANSPORTS)
def cluster(request, tmp_path_factory, cache_dir):
    transport = request.param
    run_dir = tmp_path_factory.mktemp(f"kv-{transport}")
    env = {"SPLITWISE_KV_TRANSPORTS": transport, "SPLITWISE_KV_LAYERWISE_MIN_TOKENS": str(LAYERWISE_MIN_TOKENS)}
    with launched_cluster(run_dir, cache_dir, env) as processes:
        yield transport, processes, run_dir
        ours = {str(c.proc.pid) for c in processes.children}
    assert not staging_segments(ours), "a staging segment outlived the worker that pooled it"


def staging_segments(pids: set[str]) -> list[str]:
    return [p for p in os.listdir("/dev/shm") if p.startswith("splitwise-kv-") and p.split("-")[2] in pids]


@pytest.mark.parametrize("mode", ["serialized", "layerwise"])
async def test_kv_crosses_processes_by_each_transport_and_generation_equals_transformers(cluster, cache_dir, mode):
    transport, processes, run_dir = cluster
    ids = PROMPTS[mode]
    async with SplitwiseClient(processes.children[-1].address) as client:
        out = await client.generate(token_ids=ids, max_tokens=MAX_TOKENS, timeout=60)
    assert out.token_ids == hf_greedy(resolve_model("tiny-llama", cache_dir)[1], ids, MAX_TOKENS)
    spans = await wait_for_whole_trace(sorted((run_dir / "traces").glob("*.jsonl")), out.request_id)
    (send,) = [s for s in spans if s["name"] == "kv_transfer.send"]
    (receive,) = [s for s in spans if s["name"] == "kv_transfer.receive"]
    assert send["attributes"]["kv.transport"] == receive["attributes"]["kv.transport"] == transport
    assert send["attributes"]["kv.layerwise"] == (mode == "layerwise")
    assert send["attributes"]["kv.bytes"] == receive["attributes"]["kv.bytes"] > 0
    assert send["service"] == "prompt_worker" and receive["service"] == "token_worker"
    # One request at a time, each KV under 1 MiB: the token worker pools one staging segment and reuses it.
    ours = {str(c.proc.pid) for c in processes.children}
    assert len(staging_segments(ours)) <= 1, "a staging segment was not reused for the next request"
