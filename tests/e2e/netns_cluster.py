"""A Splitwise cluster on three hosts of a virtual LAN (tests/e2e/netns.py): scheduler, prompt worker and token
worker each a process in its own network namespace, Redis in the root namespace on the LAN's gateway, and the
prompt host's link rate-limited so the KV cache it ships takes about a second to cross. Needs root."""

from __future__ import annotations

import secrets
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from splitwise.cluster.redis_server import start_redis
from splitwise.launcher import serving
from splitwise.model.weights import resolve_model
from splitwise.rpc.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests import security
from tests.conftest import free_port
from tests.e2e.netns import Host, Lan, NetnsError, unavailable_reason

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
PORTS = {"scheduler": 50051, "prompt_worker": 50061, "token_worker": 50071}  # one host each: no clashes
HOSTS = {"scheduler": "scheduler", "prompt_worker": "prompt", "token_worker": "token"}
WORKER_ROLES = {"prompt_worker": "prompt", "token_worker": "token"}
LINK_RATE_BYTES_PER_S = 1_000_000  # 8 Mbit/s: the tiny model's ~1 MB of KV takes about a second
LINK_BURST_BYTES = 4096
PROMPT_TOKEN_IDS = [3 + (i * 31) % 256 for i in range(960)]  # tiny-llama's bytes; 960 + 16 fits its 1024 context
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

    @property
    def worker_id(self) -> str:
        return f"{self.name}-0"

    def signal(self, sig: signal.Signals) -> None:
        """Sends `sig` to the service's whole process group."""
        os.killpg(self.proc.pid, sig)

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


@contextmanager
def three_host_lan(tag: str, subnet: str) -> Iterator[Lan]:
    """The scheduler, prompt and token hosts, the prompt host's egress shaped; skips the test where namespaces
    cannot be built. Every namespace is gone afterwards, whatever happened."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lan = Lan(tag, subnet)
    try:
        try:
            lan.create()
            for name in HOSTS.values():
                lan.add_host(name)
            lan.hosts["prompt"].shape_egress(LINK_RATE_BYTES_PER_S, LINK_BURST_BYTES)
        except NetnsError as e:
            pytest.skip(f"cannot build network namespaces here: {e}")
        yield lan
    finally:
        lan.destroy()


def spawn(name: str, host: Host, env: dict, run_dir: Path) -> Service:
    log, trace_file = run_dir / f"{name}.log", run_dir / f"{name}.jsonl"
    command = ("services.worker", "--role", WORKER_ROLES[name]) if name in WORKER_ROLES else (f"services.{name}",)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            host.argv(sys.executable, "-m", *command),
            env={**os.environ, **env, "SPLITWISE_TRACE_FILE": str(trace_file)},
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return Service(name, host, proc, log, trace_file)


def stop(services: list[Service], grace_s: float = 10.0) -> None:
    """SIGTERM (and SIGCONT, for a stopped one) to every service's process group, SIGKILL to what is left after
    grace_s."""
    for service in services:
        if service.proc.poll() is None:
            service.signal(signal.SIGTERM)
            service.signal(signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    for service in services:
        try:
            service.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service.signal(signal.SIGKILL)
            service.proc.wait()


def registered_workers(scheduler_address: str) -> int:
    try:
        with grpc.insecure_channel(scheduler_address) as channel:
            status = scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(scheduler_pb2.ClusterStatusRequest(),
                                                                             timeout=2, metadata=security.bearer(security.ADMIN_KEY))
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
        pending = [s for s in pending
                   if not serving(s.address, None if s.name == "scheduler" else security.identity("admin"))]
        time.sleep(0.2)


@contextmanager
def running_cluster(lan: Lan, run_dir: Path, cache_dir: Path, env: dict[str, str]) -> Iterator[NetnsCluster]:
    """Redis, then the workers and the scheduler on their hosts with `env` on top of the common settings; all
    stopped afterwards."""
    resolve_model(MODEL, cache_dir)  # build it once here, not three times in parallel
    redis_port = free_port()
    password = secrets.token_hex(8)
    redis = start_redis(redis_port, lan.gateway, password=password)
    common = {"SPLITWISE_MODEL": MODEL, "SPLITWISE_CACHE_DIR": str(cache_dir), "SPLITWISE_DEVICE": "cpu",
              "SPLITWISE_NUM_THREADS": "1", "SPLITWISE_REDIS_URL": f"redis://:{password}@{lan.gateway}:{redis_port}/0",
              "SPLITWISE_TLS_DIR": str(security.tls_dir()),
              "SPLITWISE_KV_KEEP": "false",  # no kv_store runs on this LAN
              **env}
    services: list[Service] = []
    try:
        for name in ("token_worker", "prompt_worker"):
            host = lan.hosts[HOSTS[name]]
            services.append(spawn(name, host, {
                **common, f"SPLITWISE_{name.upper()}_LISTEN": f"0.0.0.0:{PORTS[name]}",
                "SPLITWISE_WORKER_ID": f"{name}-0", "SPLITWISE_ADVERTISE": f"{host.address}:{PORTS[name]}"}, run_dir))
        services.append(spawn("scheduler", lan.hosts[HOSTS["scheduler"]], {
            **common, "SPLITWISE_SCHEDULER_LISTEN": f"0.0.0.0:{PORTS['scheduler']}"}, run_dir))
        cluster = NetnsCluster({s.name: s for s in services})
        wait_until_ready(cluster)
        yield cluster
    finally:
        stop(services)
        redis.terminate()
        redis.wait(10)
