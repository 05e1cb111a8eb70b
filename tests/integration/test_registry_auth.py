"""Registry authentication: the scheduler routes only to workers whose registry entry is signed with the cluster key,
so one write to Redis cannot add a worker that receives real clients' prompts."""

import asyncio
import json
import time
from dataclasses import asdict, replace

import pytest

from splitwise.client import SplitwiseClient
from splitwise.cluster.registry import KEY_PREFIX, MAX_CLOCK_SKEW_S, signed_entry
from splitwise.security.keys import load_cluster_key
from tests import security
from tests.integration.cluster import local_cluster, wait_for_workers

PROMPTS = [f"request number {i} asks" for i in range(8)]


@pytest.fixture(scope="module")
def isolated_redis_url(redis_url):
    return redis_url.rsplit("/", 1)[0] + "/12"  # a registry of its own: the tests write forged entries


@pytest.fixture(scope="module")
async def cluster(isolated_redis_url, cache_dir, trace_file):
    async with local_cluster(isolated_redis_url, "tiny-llama", cache_dir) as c:
        await wait_for_workers(c)
        yield c


@pytest.fixture
async def listener():
    """A server where forged entries point: it counts the connections it is offered."""
    connections = []

    async def accepted(reader, writer):
        connections.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    server.connections = connections
    server.address = "127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    yield server
    server.close()
    await server.wait_closed()


def forged_entries(cluster, address: str) -> dict[str, bytes]:
    """Entries for fake prompt and token workers, idle and roomy, so that routing would prefer them: unsigned as
    entries were before signing, without a signature, signed with another key, and a real signature long expired."""
    entries = {}
    for real in (cluster.prompt_worker, cluster.token_worker):
        fake = replace(real.heartbeat.describe(), address=address, pending_tokens=0, active_requests=0,
                       kv_used_tokens=0, kv_capacity_tokens=1 << 30, heartbeat_at=time.time())
        role = fake.role
        fields = {name: asdict(replace(fake, worker_id=f"aaa-fake-{name}-{role}"))
                  for name in ("flat", "unsigned", "forged", "expired")}
        entries[f"aaa-fake-flat-{role}"] = json.dumps(fields["flat"]).encode()
        entries[f"aaa-fake-unsigned-{role}"] = json.dumps({"worker": fields["unsigned"],
                                                           "expires_at": time.time() + 60}).encode()
        entries[f"aaa-fake-forged-{role}"] = signed_entry(b"not the cluster key", fields["forged"], time.time() + 60)
        cluster_key = load_cluster_key(str(security.tls_dir()))
        entries[f"aaa-fake-expired-{role}"] = signed_entry(cluster_key, fields["expired"],
                                                           time.time() - MAX_CLOCK_SKEW_S - 60)
    return entries


async def test_forged_worker_entries_are_never_routed_to_and_every_real_request_succeeds(cluster, store, listener):
    entries = forged_entries(cluster, listener.address)
    for worker_id, entry in entries.items():
        await store.set(KEY_PREFIX + worker_id, entry, ex=60)
    try:
        await cluster.scheduler.servicer.view.refresh()  # the scheduler has read them
        async with SplitwiseClient(cluster.address, continue_streams=False) as client:
            outs = await asyncio.gather(*(client.generate(prompt=p, max_tokens=4, ignore_eos=True, timeout=60)
                                          for p in PROMPTS))
            listed = {w.worker_id for w in (await client.cluster_status()).workers}
        assert [out.completion_tokens for out in outs] == [4] * len(PROMPTS)
        assert listed == {cluster.prompt_worker.heartbeat.describe().worker_id,
                          cluster.token_worker.heartbeat.describe().worker_id}
        assert listener.connections == []
    finally:
        await store.delete(*(KEY_PREFIX + worker_id for worker_id in entries))
