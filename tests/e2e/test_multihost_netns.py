"""Multi-host without Docker: scheduler, prompt worker and token worker on separate network namespaces.

Each service runs as its own process in its own namespace with a private address on a virtual LAN; the
prompt worker's link is rate-limited with tbf, so the KV cache it pushes to the token worker crosses a
slow network link. Redis runs in the root namespace, on the LAN's gateway address. Needs root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc
import pytest

from splitwise.client import Completion, SplitwiseClient
from tests.e2e.netns_cluster import (LINK_BURST_BYTES, LINK_RATE_BYTES_PER_S, PROMPT_TOKEN_IDS, running_cluster,
                                     three_host_lan)
from tests.prerequisites import mooncake_loads
from tests.traces import SCHEDULER_GENERATE, tops, wait_for_whole_trace

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16
KV_TRANSPORTS = "mooncake,grpc"


@pytest.fixture(scope="module")
def lan():
    with three_host_lan(tag=str(os.getpid()), subnet=f"10.213.{os.getpid() % 256}") as lan:
        yield lan


@pytest.fixture(scope="module")
def cluster(lan, tmp_path_factory, cache_dir):
    # Namespaces share /dev/shm, which would let the KV bypass the link: the hosts use the network.
    with running_cluster(lan, tmp_path_factory.mktemp("netns"), cache_dir,
                         {"SPLITWISE_KV_TRANSPORTS": KV_TRANSPORTS}) as cluster:
        yield cluster


@dataclass
class ShapedGeneration:
    """One request sent across the LAN, what crossed the shaped link meanwhile, and the spans it left."""

    completion: Completion
    shaped_link_bytes: int  # what the prompt host's token bucket let out during the request
    token_host_received_bytes: int
    spans: list[dict]  # every service's exported spans in the request's trace(s)

    @property
    def kv_bytes(self) -> set[int]:
        return {s["attributes"]["kv.bytes"] for s in self.spans if "kv.bytes" in s["attributes"]}


@pytest.fixture(scope="module")
async def generation(cluster) -> ShapedGeneration:
    prompt_host, token_host = cluster.host("prompt_worker"), cluster.host("token_worker")
    shaped_before, received_before = prompt_host.shaped_bytes(), token_host.interface_bytes("rx")
    async with SplitwiseClient(cluster.address) as client:
        try:
            out = await client.generate(token_ids=PROMPT_TOKEN_IDS, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=120)
        except grpc.aio.AioRpcError as e:
            pytest.fail(f"request failed: {e.code().name}: {e.details()}\n{cluster.logs()}")
    shaped = prompt_host.shaped_bytes() - shaped_before
    received = token_host.interface_bytes("rx") - received_before
    spans = await wait_for_whole_trace([s.trace_file for s in cluster.services.values()], out.request_id)
    return ShapedGeneration(out, shaped, received, spans)


def test_greedy_request_completes_across_three_network_namespaces(generation):
    out = generation.completion
    assert out.prompt_tokens == len(PROMPT_TOKEN_IDS)
    assert out.completion_tokens == MAX_TOKENS and len(out.token_ids) == MAX_TOKENS
    assert out.finish_reason == "length"


def test_kv_cache_crosses_the_rate_limited_prompt_to_token_link(generation):
    kv_bytes = generation.kv_bytes
    assert len(kv_bytes) == 1 and min(kv_bytes) > 0, f"spans disagree on the KV size or report none: {kv_bytes}"
    kv = kv_bytes.pop()
    assert generation.shaped_link_bytes >= kv, "the KV did not leave the prompt host through its shaped link"
    transports = {s["attributes"]["kv.transport"] for s in generation.spans if "kv.transport" in s["attributes"]}
    # The RDMA-capable engine where it loads (over TCP here), the gRPC stream otherwise (the workers leave out a
    # Mooncake that is installed but lacks libibverbs1).
    assert transports == ({"mooncake"} if mooncake_loads() else {"grpc"}), transports
    assert generation.token_host_received_bytes >= kv, "the KV did not reach the token host over the LAN"


def test_kv_transfer_lasts_at_least_its_size_over_the_link_rate(generation):
    senders = [s for s in generation.spans if s["service"] == "prompt_worker" and "kv.bytes" in s["attributes"]]
    assert senders, "the prompt worker exported no span with kv.bytes"
    sender = senders[0]
    # A lower bound only (physics): the bucket's initial burst goes out at once, the rest at the rate.
    # 10% margin for the token bucket's clock granularity.
    floor_s = 0.9 * (sender["attributes"]["kv.bytes"] - LINK_BURST_BYTES) / LINK_RATE_BYTES_PER_S
    assert sender["duration_ms"] / 1e3 >= floor_s


def test_trace_is_one_whole_tree_across_the_three_namespaces(generation):
    request_id = generation.completion.request_id
    spans = generation.spans
    for service in ("scheduler", "prompt_worker", "token_worker"):
        assert any(s["service"] == service and s["attributes"].get("splitwise.request_id") == request_id
                   for s in spans), f"{service} exported no span of request {request_id}"
    assert len({s["trace_id"] for s in spans}) == 1, "the request's spans are in more than one trace"
    # One top span: the scheduler's (its parent, if any, is the client's span in this test process).
    assert [(s["name"], s["kind"], s["service"]) for s in tops(spans)] == [(*SCHEDULER_GENERATE, "scheduler")]
