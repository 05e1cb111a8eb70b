"""Multi-host without Docker: scheduler, prompt worker and token worker on separate network namespaces.

Each service runs as its own process in its own namespace with a private address on a virtual LAN; the
prompt worker's link is rate-limited with tbf, so the KV cache it pushes to the token worker crosses a
slow network link. Redis runs in the root namespace, on the LAN's gateway address. Needs root.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from splitwise.client import Completion, SplitwiseClient
from splitwise.cluster.redis_server import start_redis
from splitwise.launcher import serving
from splitwise.model.weights import resolve_model
from splitwise.rpc.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.conftest import free_port
from tests.e2e.netns import Host, Lan, NetnsError, unavailable_reason
from tests.traces import SCHEDULER_GENERATE, tops, wait_for_whole_trace

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
PORTS = {"scheduler": 50051, "prompt_worker": 50061, "token_worker": 50071}  # one host each: no clashes
LINK_RATE_BYTES_PER_S = 1_000_000  # 8 Mbit/s: the tiny model's ~1 MB of KV takes about a second
LINK_BURST_BYTES = 4096
PROMPT_TOKEN_IDS = [3 + (i * 31) % 256 for i in range(960)]  # tiny-llama's bytes; 960 + 16 fits its 1024 context
MAX_TOKENS = 16
KV_TRANSPORTS = "mooncake,grpc"
STARTUP_TIMEOUT_S = 180.0


@dataclass
class Service:
    name: str
    host: Host
    proc: subprocess.Popen
    log: Path
    trace_file: Path

    @property
    def address(self) -> str:
        return f"{self.host.address}:{PORTS[self.name]}"

    def log_tail(self, num_chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.host.namespace}, exit code {self.proc.poll()})\n{text[-num_chars:]}"


@dataclass
class NetnsCluster:
    services: dict[str, Service]

    @property
    def address(self) -> str:
        return self.services["scheduler"].address

    def host(self, service: str) -> Host:
        return self.services[service].host

    def logs(self) -> str:
        return "\n".join(s.log_tail() for s in self.services.values())


@pytest.fixture(scope="module")
def lan():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lan = Lan(tag=str(os.getpid()), subnet=f"10.213.{os.getpid() % 256}")
    try:
        lan.create()
        for name in ("scheduler", "prompt", "token"):
            lan.add_host(name)
        lan.hosts["prompt"].shape_egress(LINK_RATE_BYTES_PER_S, LINK_BURST_BYTES)
    except NetnsError as e:
        lan.destroy()
        pytest.skip(f"cannot build network namespaces here: {e}")
    yield lan
    lan.destroy()


def spawn(name: str, host: Host, env: dict, run_dir: Path) -> Service:
    log, trace_file = run_dir / f"{name}.log", run_dir / f"{name}.jsonl"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            host.argv(sys.executable, "-m", f"services.{name}"),
            env={**os.environ, **env, "SPLITWISE_TRACE_FILE": str(trace_file)},
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return Service(name, host, proc, log, trace_file)


def stop(services: list[Service], grace_s: float = 10.0) -> None:
    """SIGTERM to every service's process group, SIGKILL to what is left after grace_s."""
    for service in services:
        if service.proc.poll() is None:
            os.killpg(service.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for service in services:
        try:
            service.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(service.proc.pid, signal.SIGKILL)
            service.proc.wait()


def registered_workers(scheduler_address: str) -> int:
    try:
        with grpc.insecure_channel(scheduler_address) as channel:
            status = scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(scheduler_pb2.ClusterStatusRequest(),
                                                                             timeout=2)
        return len(status.workers)
    except grpc.RpcError:
        return 0


def wait_until_ready(cluster: NetnsCluster) -> None:
    """Every service answers its health check across the LAN, and both workers are in the scheduler's view."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    pending = list(cluster.services.values())
    while pending or registered_workers(cluster.address) < 2:
        dead = [s for s in cluster.services.values() if s.proc.poll() is not None]
        if dead:
            pytest.fail(f"{dead[0].name} exited during startup:\n{cluster.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"cluster not ready within {STARTUP_TIMEOUT_S:.0f}s:\n{cluster.logs()}")
        pending = [s for s in pending if not serving(s.address)]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(lan, tmp_path_factory, cache_dir):
    resolve_model(MODEL, cache_dir)  # build it once here, not three times in parallel
    redis_port = free_port()
    redis = start_redis(redis_port, lan.gateway)
    run_dir = tmp_path_factory.mktemp("netns")
    common = {"SPLITWISE_MODEL": MODEL, "SPLITWISE_CACHE_DIR": str(cache_dir), "SPLITWISE_DEVICE": "cpu",
              "SPLITWISE_NUM_THREADS": "1", "SPLITWISE_REDIS_URL": f"redis://{lan.gateway}:{redis_port}/0",
              # Namespaces share /dev/shm, which would let the KV bypass the link: the hosts use the network.
              "SPLITWISE_KV_TRANSPORTS": KV_TRANSPORTS}
    services: list[Service] = []
    try:
        for name, host in (("token_worker", lan.hosts["token"]), ("prompt_worker", lan.hosts["prompt"])):
            listen = f"0.0.0.0:{PORTS[name]}"
            services.append(spawn(name, host, {
                **common, f"SPLITWISE_{name.upper()}_LISTEN": listen, "SPLITWISE_WORKER_ID": f"{name}-0",
                "SPLITWISE_ADVERTISE": f"{host.address}:{PORTS[name]}"}, run_dir))
        services.append(spawn("scheduler", lan.hosts["scheduler"], {
            **common, "SPLITWISE_SCHEDULER_LISTEN": f"0.0.0.0:{PORTS['scheduler']}"}, run_dir))
        cluster = NetnsCluster({s.name: s for s in services})
        wait_until_ready(cluster)
        yield cluster
    finally:
        stop(services)
        redis.terminate()
        redis.wait(10)


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
    # The RDMA-capable engine when it is installed (over TCP here), the gRPC stream otherwise.
    assert transports == ({"mooncake"} if importlib.util.find_spec("mooncake") else {"grpc"}), transports
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
