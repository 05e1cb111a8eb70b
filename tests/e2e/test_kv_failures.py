"""A KV transfer interrupted mid-flight between hosts ends cleanly: the client gets a clear status within a
bounded time (or, when the prompt worker died after its first token, the request resumes on the token worker),
and both workers free every block the request held.

Each test builds its own three-host LAN (tests/e2e/netns_cluster.py): the prompt host's link runs at 8 Mbit/s, so
the ~1 MB KV cache of a 960-token prompt takes about a second to cross while the prompt worker's first token
reaches the client at once. At that first token, a worker is killed (SIGKILL) or frozen (SIGSTOP). Freed blocks
are read from the scheduler's ClusterStatus: the worker's own numbers as of a heartbeat sent after the failure.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import grpc
import pytest
import torch

from splitwise.client import SplitwiseClient
from splitwise.kv.layout import KVLayout
from splitwise.model.llama import LlamaConfig
from splitwise.model.weights import read_hf_config, resolve_model
from tests.e2e.netns import unavailable_reason
from tests.e2e.netns_cluster import MODEL, PROMPT_TOKEN_IDS, NetnsCluster, Service, running_cluster, three_host_lan
from tests.prerequisites import needs_mooncake
from tests.reference import hf_greedy
from tests.traces import SCHEDULER_GENERATE, request_trace

pytestmark = pytest.mark.e2e

MOONCAKE = pytest.param("mooncake", marks=needs_mooncake())
# Namespaces share /dev/shm, which would let the KV bypass the link: shm is never offered.
KV_TRANSPORTS = {"grpc": "grpc", "mooncake": "mooncake,grpc"}
MAX_TOKENS = 16
HEARTBEAT_S = 0.2
PROGRESS_TIMEOUT_S = 2.0  # the stall tests' SPLITWISE_KV_PROGRESS_TIMEOUT_S; the kill tests keep the default 30 s
KILL_FAILS_WITHIN_S = 5.0  # far below the default progress timeout: the death itself is noticed
STALL_FAILS_WITHIN_S = PROGRESS_TIMEOUT_S + 4.0
IDLE_WITHIN_S = 5.0
CLIENT_TIMEOUT_S = 60.0  # a backstop only: every wait above is shorter
ERROR_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
_lans = itertools.count()


class RequestHangs(AssertionError):
    """The request neither failed nor completed within its bound after the interruption."""


class UnclearStatus(AssertionError):
    """The client's status is not one of those expected, or says nothing."""


class UncleanFailure(AssertionError):
    """A service logged an error (an unhandled exception) while the request failed."""


@pytest.fixture
def start_cluster(transport, tmp_path, cache_dir):
    """Starts a fresh cluster using `transport` for the KV, with extra environment; stops it and deletes its
    namespaces after the test, failed or not."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid()}f{next(_lans)}"
    lans = []
    with ExitStack() as stack:
        def start(**env: str) -> NetnsCluster:
            lans.append(stack.enter_context(three_host_lan(tag, subnet=f"10.214.{os.getpid() % 256}")))
            # No kv_store runs on the LAN (no kept KV copy): recovery recomputes.
            common = {"SPLITWISE_KV_TRANSPORTS": KV_TRANSPORTS[transport], "SPLITWISE_HEARTBEAT_S": str(HEARTBEAT_S)}
            return stack.enter_context(running_cluster(lans[0], tmp_path, cache_dir, {**common, **env}))

        yield start
    if lans:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        left = [name for name in listed if name.endswith(f"-{tag}")]
        assert not left, f"network namespaces left behind: {left}"


@pytest.fixture
def kv_cache_bytes(cache_dir) -> int:
    """What the prompt's KV cache weighs on the wire (the services' default float32)."""
    config = LlamaConfig.from_hf(read_hf_config(resolve_model(MODEL, cache_dir)[1]))
    return KVLayout.of(config, torch.float32, "").bytes_per_token_per_layer * config.num_layers * len(PROMPT_TOKEN_IDS)


@dataclass
class Interrupted:
    """A request interrupted at its first token, and how it ended."""

    request_id: str
    tokens: list[int]
    error: grpc.aio.AioRpcError
    seconds_to_error: float  # from the interruption
    failed_at: float  # unix time the client saw the error
    token_host_rx_bytes: int  # what reached the token host during the request, up to the error

    @property
    def status(self) -> str:
        return f"{self.error.code().name} after {self.seconds_to_error:.2f}s: {self.error.details()!r}"


async def interrupt_at_first_token(cluster: NetnsCluster, client: SplitwiseClient, interrupt: Callable[[], None],
                                   fail_within_s: float) -> Interrupted:
    """Streams the long prompt, calls `interrupt` as its first token arrives, and reads the stream to its error."""
    token_host = cluster.host("token_worker")
    rx_before = token_host.interface_bytes("rx")
    stream = client.stream(token_ids=PROMPT_TOKEN_IDS, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=CLIENT_TIMEOUT_S)
    tokens: list[int] = []
    request_id, interrupted = "", None
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S) as deadline:
            async for chunk in stream:
                request_id = chunk.request_id
                if chunk.token_ids and interrupted is None:
                    interrupt()
                    interrupted = time.monotonic()
                    deadline.reschedule(asyncio.get_running_loop().time() + fail_within_s)
                tokens += chunk.token_ids
    except grpc.aio.AioRpcError as e:
        if interrupted is None:
            pytest.fail(f"the request failed before its first token: {e.code().name}: {e.details()}\n{cluster.logs()}")
        return Interrupted(request_id, tokens, e, time.monotonic() - interrupted, time.time(),
                           token_host.interface_bytes("rx") - rx_before)
    except TimeoutError:
        raise RequestHangs(f"no error within {fail_within_s}s of the interruption ({len(tokens)} tokens so far)\n"
                           f"{cluster.logs()}") from None
    finally:
        await stream.aclose()
    pytest.fail(f"the request completed ({len(tokens)} tokens) despite the interruption\n{cluster.logs()}")


def assert_status(out: Interrupted, codes: set[grpc.StatusCode], cluster: NetnsCluster, says: str = "") -> None:
    details = out.error.details() or ""
    if out.error.code() not in codes or not details or says not in details:
        raise UnclearStatus(f"{out.status}; expected {sorted(c.name for c in codes)} saying {says!r}\n{cluster.logs()}")


def assert_kv_was_crossing_the_link(out: Interrupted, kv_cache_bytes: int, cluster: NetnsCluster) -> None:
    # Decode starts only once the whole KV has landed: the first token is the prompt worker's, the only one.
    assert len(out.tokens) == 1, f"{len(out.tokens)} tokens before the error\n{cluster.logs()}"
    assert out.token_host_rx_bytes < kv_cache_bytes, (
        f"the token host had received {out.token_host_rx_bytes} bytes, the whole KV ({kv_cache_bytes}): "
        f"the interruption came too late\n{cluster.logs()}")


async def assert_transport_was(transport: str, cluster: NetnsCluster, request_id: str) -> None:
    """The KV transport every service's spans of the request name, the scheduler's choice at least."""
    paths = [s.trace_file for s in cluster.services.values()]
    deadline = time.monotonic() + 10
    while True:
        spans = request_trace(paths, request_id)
        scheduler = [s for s in spans if (s["name"], s["kind"]) == SCHEDULER_GENERATE]
        if scheduler or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert scheduler, f"the scheduler exported no span of request {request_id}\n{cluster.logs()}"
    assert scheduler[0]["attributes"].get("kv.transport") == transport, scheduler[0]["attributes"]
    used = {s["attributes"]["kv.transport"] for s in spans
            if "kv.transport" in s["attributes"] and s["name"] != "kv_transfer.keep"}
    assert used == {transport}, f"spans name KV transports {used}\n{cluster.logs()}"


async def wait_until_idle(client: SplitwiseClient, cluster: NetnsCluster, worker: Service, since: float) -> None:
    """Until a heartbeat `worker` sent after `since` (unix time) reports no KV block used and no request."""
    deadline = time.monotonic() + IDLE_WITHIN_S
    last = None
    while True:
        try:
            status = await client.cluster_status(timeout=2)
            seen = [w for w in status.workers if w.worker_id == worker.worker_id]
        except grpc.aio.AioRpcError:
            seen = []
        if seen:
            last = seen[0]
            fresh = time.time() - last.heartbeat_age_s > since
            if fresh and last.kv_used_tokens == 0 and last.active_requests == 0:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{worker.name} did not report 0 KV tokens used and 0 requests within {IDLE_WITHIN_S}s; "
                        f"last seen: {last}\n{cluster.logs()}")
        await asyncio.sleep(0.1)


async def wait_for_quiet_link(cluster: NetnsCluster, within_s: float = 10.0) -> None:
    """Until the prompt host sends no more than heartbeats (at most `within_s`): late KV bytes still queued have
    been delivered."""
    host = cluster.host("prompt_worker")
    deadline = time.monotonic() + within_s
    sent = host.shaped_bytes()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        sent, before = host.shaped_bytes(), sent
        if sent - before < 20_000:  # the link carries 500 kB in that time when busy
            return


def assert_no_service_logged_an_error(cluster: NetnsCluster) -> None:
    errors = []
    for service in cluster.services.values():
        for line in service.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # native libraries' own logging (Mooncake's glog)
                continue
            if record.get("severity") in ("ERROR", "CRITICAL"):
                errors.append(f"{service.name}: {record.get('message')}\n{record.get('exception', '')}")
    if errors:
        raise UncleanFailure("\n".join(errors))


@pytest.mark.parametrize("transport", ["grpc", MOONCAKE])
async def test_killed_prompt_worker_mid_transfer_resumes_the_request_on_the_token_worker_by_recomputation(
        transport, start_cluster, kv_cache_bytes, cache_dir):
    """The first token has reached the client, the KV has not reached the token worker: the token worker frees
    the broken transfer's blocks, recomputes prompt and first token itself, and the stream goes on."""
    cluster = start_cluster()
    prompt_worker, token_worker = cluster.services["prompt_worker"], cluster.services["token_worker"]
    token_host = cluster.host("token_worker")
    rx_before = token_host.interface_bytes("rx")
    tokens: list[int] = []
    rx_at_kill = None
    async with SplitwiseClient(cluster.address) as client:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            async for chunk in client.stream(token_ids=PROMPT_TOKEN_IDS, max_tokens=MAX_TOKENS, ignore_eos=True,
                                             timeout=CLIENT_TIMEOUT_S):
                if chunk.token_ids and rx_at_kill is None:
                    prompt_worker.signal(signal.SIGKILL)
                    rx_at_kill = token_host.interface_bytes("rx") - rx_before
                tokens += chunk.token_ids
                request_id = chunk.request_id
        assert rx_at_kill < kv_cache_bytes, f"the KV had crossed ({rx_at_kill} bytes): the kill came too late"
        await wait_until_idle(client, cluster, token_worker, since=time.time())
    reference = hf_greedy(resolve_model(MODEL, cache_dir)[1], PROMPT_TOKEN_IDS, MAX_TOKENS)
    assert len(tokens) == MAX_TOKENS and tokens[: len(reference)] == reference
    spans = request_trace([s.trace_file for s in cluster.services.values()], request_id)
    (root,) = [s for s in spans if (s["name"], s["kind"]) == SCHEDULER_GENERATE]
    resumes = [e for e in root["events"] if e["name"] == "resume"]
    assert [e["attributes"]["kv"] for e in resumes] == ["recompute"], root["events"]
    assert_no_service_logged_an_error(cluster)


@pytest.mark.parametrize("transport", ["grpc", MOONCAKE])
async def test_killed_token_worker_mid_transfer_fails_the_request_and_frees_the_prompt_workers_blocks(
        transport, start_cluster, kv_cache_bytes):
    cluster = start_cluster()
    prompt_worker, token_worker = cluster.services["prompt_worker"], cluster.services["token_worker"]
    async with SplitwiseClient(cluster.address) as client:
        out = await interrupt_at_first_token(cluster, client, lambda: token_worker.signal(signal.SIGKILL),
                                             KILL_FAILS_WITHIN_S)
        print(f"[{transport}] {out.status}")
        assert_kv_was_crossing_the_link(out, kv_cache_bytes, cluster)
        await wait_until_idle(client, cluster, prompt_worker, since=out.failed_at)
    await assert_transport_was(transport, cluster, out.request_id)
    assert_status(out, ERROR_CODES, cluster)
    assert_no_service_logged_an_error(cluster)


@pytest.mark.parametrize("transport", ["grpc", MOONCAKE])
async def test_stalled_token_worker_fails_the_request_at_the_progress_deadline_and_frees_both_workers_blocks(
        transport, start_cluster, kv_cache_bytes):
    cluster = start_cluster(SPLITWISE_KV_PROGRESS_TIMEOUT_S=str(PROGRESS_TIMEOUT_S))
    prompt_worker, token_worker = cluster.services["prompt_worker"], cluster.services["token_worker"]
    async with SplitwiseClient(cluster.address) as client:
        try:
            out = await interrupt_at_first_token(cluster, client, lambda: token_worker.signal(signal.SIGSTOP),
                                                 STALL_FAILS_WITHIN_S)
            print(f"[{transport}] {out.status}")
            assert_kv_was_crossing_the_link(out, kv_cache_bytes, cluster)
            await wait_until_idle(client, cluster, prompt_worker, since=out.failed_at)
        finally:
            continued_at = time.time()
            token_worker.signal(signal.SIGCONT)
        # The scheduler cancelled its Decode call: the token worker frees the reservation once it runs again.
        await wait_until_idle(client, cluster, token_worker, since=continued_at)
    await assert_transport_was(transport, cluster, out.request_id)
    assert_status(out, {grpc.StatusCode.DEADLINE_EXCEEDED}, cluster, says="stalled")
    await wait_for_quiet_link(cluster)
    assert_no_service_logged_an_error(cluster)


@pytest.mark.parametrize("transport", ["grpc", MOONCAKE])
async def test_stalled_prompt_worker_fails_the_request_at_the_progress_deadline_and_frees_both_workers_blocks(
        transport, start_cluster, kv_cache_bytes):
    cluster = start_cluster(SPLITWISE_KV_PROGRESS_TIMEOUT_S=str(PROGRESS_TIMEOUT_S))
    prompt_worker, token_worker = cluster.services["prompt_worker"], cluster.services["token_worker"]
    async with SplitwiseClient(cluster.address) as client:
        try:
            out = await interrupt_at_first_token(cluster, client, lambda: prompt_worker.signal(signal.SIGSTOP),
                                                 STALL_FAILS_WITHIN_S)
            print(f"[{transport}] {out.status}")
            assert_kv_was_crossing_the_link(out, kv_cache_bytes, cluster)
            await wait_until_idle(client, cluster, token_worker, since=out.failed_at)
        finally:
            continued_at = time.time()
            prompt_worker.signal(signal.SIGCONT)
        await wait_until_idle(client, cluster, prompt_worker, since=continued_at)
    await assert_transport_was(transport, cluster, out.request_id)
    assert_status(out, {grpc.StatusCode.DEADLINE_EXCEEDED}, cluster, says="stalled")
    await wait_for_quiet_link(cluster)
    assert_no_service_logged_an_error(cluster)
