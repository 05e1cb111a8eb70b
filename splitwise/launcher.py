"""`splitwise up`: runs Redis and the four services (the scheduler in one or more replicas) as subprocesses, waits
until healthy, keeps them running (a dead one is restarted: splitwise/supervision.py), and stops them all."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitwise.cluster.redis_server import start_redis
from splitwise.model import DEFAULT_MOCK_PROFILE
from splitwise.rpc.v1 import scheduler_pb2, scheduler_pb2_grpc
from splitwise.security.local import LocalCredentials, local_credentials, scheduler_env, service_env
from splitwise.security.peers import bearer_metadata
from splitwise.security.tls import ClusterTLS, sync_channel
from splitwise.supervision import RestartPolicy, Supervised, Supervisor

PR_SET_PDEATHSIG = 1
PARENT_PID_ENV = "SPLITWISE_LAUNCHER_PID"
# Each kind's first Prometheus port, from --metrics-port: with the default 9451, the services' own defaults (9451
# scheduler, 9461 prompt worker, 9471 token worker, 9481 kv_store), as the gRPC ports go 50051, 50061, ...
METRICS_OFFSETS = {"scheduler": 0, "prompt_worker": 10, "token_worker": 20, "kv_store": 30, "mixed_worker": 40}


def die_with_launcher() -> None:
    """In a service started by `splitwise up`: receive SIGTERM when the launcher dies, even by SIGKILL (Linux).

    Set by the service itself after exec, not in a preexec_fn: forking a process whose gRPC threads are live
    runs gRPC's fork handlers in the child, which sometimes aborted it before it could exec.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != int(parent):  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def port_is_free(port: int, host: str = "127.0.0.1", reuse_address: bool = False) -> bool:
    """reuse_address: as a server that sets SO_REUSEADDR binds (aiohttp, gRPC), for which connections of the last
    run still in TIME_WAIT do not hold the port."""
    with socket.socket() as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def listen_ports() -> range:
    """Ports outside the kernel's ephemeral range: while a cluster starts, its services' outgoing
    connections take ephemeral ports, and one of them took a port chosen for a later service (EADDRINUSE)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(10000, low) if low > 12000 else range(high + 1, 65000)


def free_port_ranges(*counts: int) -> list[int]:
    """First ports of ranges of `counts` consecutive free ports, none overlapping another: a launcher puts worker i
    of a kind on its first port + i."""
    taken: set[int] = set()
    firsts = []
    candidates = listen_ports()
    for count in counts:
        while True:
            first = random.randrange(candidates.start, candidates.stop - count)
            ports = set(range(first, first + count))
            if not ports & taken and all(port_is_free(p) for p in ports):
                break
        taken |= ports
        firsts.append(first)
    return firsts


@dataclass
class UpOptions:
    model: str
    host: str = "127.0.0.1"
    scheduler_port: int = 50051  # replica i of the scheduler listens on scheduler_port + i
    prompt_port: int = 50061
    token_port: int = 50071
    kv_store_port: int = 50081
    mixed_port: int = 50091
    # The OpenAI-compatible HTTP gateway's port (`splitwise up` defaults to 8000); 0: no gateway.
    http_port: int = 0
    redis_port: int = 6379
    metrics_port: int = 9451  # each kind's Prometheus endpoints from here + METRICS_OFFSETS[kind] (+ i); 0: free ports
    redis_url: str = ""  # use this Redis instead of starting one
    schedulers: int = 1  # replicas, all reading the same Redis and all serving clients
    prompt_workers: int = 1
    token_workers: int = 1
    mixed_workers: int = 0  # workers of role mixed: both phases, colocated (the paper's baseline)
    kv_transfer: str = "direct"
    run_dir: Path = Path(".splitwise")
    device: str = "auto"
    startup_timeout_s: float = 600.0
    extra_env: dict = field(default_factory=dict)
    # Each worker process on its own share of the machine's cores (as separate machines would be); the other
    # services are not pinned.
    pin_workers: bool = False
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)  # how `up` restarts a dead service
    # No TLS between services, no API or admin key, no Redis password: anyone who reaches a port is trusted.
    insecure: bool = False
    # The workers' engine: "real" (the model), or "mock": mock_profile's modelled step times, times
    # mock_time_factor, with KV of the modelled size divided by mock_kv_scale (splitwise/engine/mock_runner.py).
    engine: str = "real"
    mock_profile: str = DEFAULT_MOCK_PROFILE
    mock_time_factor: float = 1.0
    mock_kv_scale: float = 1.0


def worker_cores(index: int, workers: int, cores: list[int]) -> set[int]:
    """The cores of worker `index` of `workers`: disjoint equal shares while there are enough, else one each, in
    turn."""
    share = max(1, len(cores) // workers)
    return {cores[(index * share + k) % len(cores)] for k in range(share)}


@dataclass
class Child:
    name: str
    address: str | None
    proc: subprocess.Popen
    metrics_address: str = ""
    cores: set[int] | None = None  # pinned to these
    module: str = ""
    env: dict = field(default_factory=dict)  # the service's own on top of the launcher's: a restart reuses it
    args: tuple[str, ...] = ()  # after `python -m module`; a restart reuses them too


class Cluster:
    def __init__(self, options: UpOptions):
        self.o = options
        self.children: list[Child] = []
        self.redis: subprocess.Popen | None = None
        self.credentials: LocalCredentials | None = None  # made by start() unless insecure
        self.http_address = ""  # the gateway's host:port, when it runs
        self._metrics_ports: set[int] = set()  # picked for services' /metrics (metrics_port 0)

    def first_ports(self) -> dict[str, tuple[int, int]]:
        """Each kind of service: (its first gRPC port, how many); instance i listens on the first + i."""
        o = self.o
        return {"scheduler": (o.scheduler_port, o.schedulers), "prompt_worker": (o.prompt_port, o.prompt_workers),
                "token_worker": (o.token_port, o.token_workers), "kv_store": (o.kv_store_port, 1),
                "mixed_worker": (o.mixed_port, o.mixed_workers)}

    def listen_address(self, kind: str, index: int = 0) -> str:
        return f"{self.o.host}:{self.first_ports()[kind][0] + index}"

    def metrics_address(self, kind: str, index: int = 0) -> str:
        """Where instance `index` of `kind` serves /metrics: a free port with metrics_port 0 (or for another kind)."""
        if self.o.metrics_port == 0 or kind not in METRICS_OFFSETS:
            # Outside the kernel's ephemeral range: a port picked by binding port 0 is one that an outgoing
            # connection may take before the service binds it, and hold through all its restarts.
            o = self.o
            taken = {o.redis_port, o.http_port, *self._metrics_ports}
            taken |= {first + i for first, count in self.first_ports().values() for i in range(count)}
            candidates = listen_ports()
            while True:
                port = random.randrange(candidates.start, candidates.stop)
                if port not in taken and port_is_free(port, o.host):
                    self._metrics_ports.add(port)
                    return f"{o.host}:{port}"
        return f"{self.o.host}:{self.o.metrics_port + METRICS_OFFSETS[kind] + index}"

    def _spawn(self, name: str, module: str, env: dict, address: str | None, cores: set[int] | None = None,
               args: tuple[str, ...] = ()) -> None:
        """Starts service `name` (KIND or KIND-INDEX) as `python -m module args` with env on top of the launcher's."""
        kind, _, index = name.partition("-")
        metrics = self.metrics_address(kind, int(index or 0))
        env = {**env, "SPLITWISE_METRICS_LISTEN": metrics, "OTEL_SERVICE_NAME": kind}
        child = Child(name, address, None, metrics, cores, module, env, args)
        child.proc = self._launch(child)
        self.children.append(child)

    def _launch(self, child: Child) -> subprocess.Popen:
        log_dir = self.o.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        cores = child.cores
        with open(log_dir / f"{child.name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", child.module, *child.args],
                env={**os.environ, **self.o.extra_env, **child.env, PARENT_PID_ENV: str(os.getpid())},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                # Before exec, so every thread the service starts inherits the cores.
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
            )

    def restart(self, child: Child) -> None:
        """Starts a dead child again as it was: same address, worker id, metrics endpoint, log and trace files."""
        if child.proc.poll() is None:
            raise RuntimeError(f"{child.name} is still running (pid {child.proc.pid})")
        with open(self.o.run_dir / "logs" / f"{child.name}.log", "ab") as log:
            log.write(f"--- exited with code {child.proc.returncode}; restarted by splitwise up\n".encode())
        child.proc = self._launch(child)

    @property
    def schedulers(self) -> list[Child]:
        return [c for c in self.children if c.name.split("-")[0] == "scheduler"]

    @property
    def address(self) -> str:
        """Every scheduler replica's address, comma-separated, as SplitwiseClient and `--address` take them."""
        return ",".join(c.address for c in self.schedulers)

    def start_redis(self) -> None:
        """Starts the cluster's own Redis on redis_port: at start, or again (empty) after kill_redis."""
        password = self.credentials.redis_password if self.credentials else ""
        self.redis = start_redis(self.o.redis_port, self.o.host, password=password)

    def kill_redis(self) -> None:
        """SIGKILL to the cluster's own Redis, as a crash would; everything it held is gone."""
        if self.redis is None:
            raise RuntimeError("this cluster uses an external Redis (redis_url)")
        self.redis.kill()
        self.redis.wait()

    def _check_options(self) -> None:
        o = self.o
        if o.schedulers < 1:
            raise ValueError(f"schedulers must be at least 1, got {o.schedulers}")
        if min(o.prompt_workers, o.token_workers, o.mixed_workers) < 0:
            raise ValueError("worker counts cannot be negative")
        if o.prompt_workers + o.mixed_workers < 1 or o.token_workers + o.mixed_workers < 1:
            raise ValueError("each phase needs a worker: a prompt and a token worker, or a mixed one")
        owners: dict[int, str] = {} if o.redis_url else {o.redis_port: "redis"}
        if o.http_port:
            owners[o.http_port] = "gateway"
            if not port_is_free(o.http_port, o.host, reuse_address=True):
                raise ValueError(f"port {o.http_port} is in use: the HTTP gateway needs another (--http-port N, or 0 "
                                 "for no gateway)")
        for kind, (port, count) in self.first_ports().items():
            ports = [port + i for i in range(count)]
            if o.metrics_port:
                ports += [o.metrics_port + METRICS_OFFSETS[kind] + i for i in range(count)]
            for p in ports:
                if p in owners:
                    raise ValueError(f"port {p} would be both {owners[p]}'s and {kind}'s: choose other first ports "
                                     "(--port, --prompt-port, --token-port, --http-port, ...; --metrics-port 0 picks "
                                     "free ones)")
                owners[p] = kind

    def start(self) -> None:
        o = self.o
        self._check_options()
        if not o.insecure:
            self.credentials = local_credentials(o.run_dir, o.host)
        redis_url = o.redis_url
        if not redis_url:
            self.start_redis()
            auth = f":{self.credentials.redis_password}@" if self.credentials else ""
            redis_url = f"redis://{auth}{o.host}:{o.redis_port}/0"
        traces = (o.run_dir / "traces").resolve()
        common = {"SPLITWISE_MODEL": o.model, "SPLITWISE_REDIS_URL": redis_url, "SPLITWISE_DEVICE": o.device,
                  "SPLITWISE_ENGINE": o.engine, "SPLITWISE_MOCK_PROFILE": o.mock_profile,
                  "SPLITWISE_MOCK_TIME_FACTOR": str(o.mock_time_factor), "SPLITWISE_MOCK_KV_SCALE": str(o.mock_kv_scale),
                  **service_env(self.credentials)}
        kv_store = self.listen_address("kv_store")
        self._spawn("kv_store", "services.kv_store", {
            **common, "SPLITWISE_KV_STORE_LISTEN": kv_store,
            "SPLITWISE_TRACE_FILE": str(traces / "kv_store.jsonl")}, kv_store)
        cores = sorted(os.sched_getaffinity(0))
        workers = o.prompt_workers + o.token_workers + o.mixed_workers
        first = 0
        for kind, role in (("prompt_worker", "prompt"), ("token_worker", "token"), ("mixed_worker", "mixed")):
            count = self.first_ports()[kind][1]
            for i in range(count):
                address = self.listen_address(kind, i)
                name = f"{kind}-{i}"
                self._spawn(name, "services.worker", {
                    **common, "SPLITWISE_WORKER_ID": name, "SPLITWISE_TRACE_FILE": str(traces / f"{name}.jsonl")},
                    address, worker_cores(first + i, workers, cores) if o.pin_workers else None,
                    ("--role", role, "--listen", address))
            first += count
        for i in range(o.schedulers):
            scheduler = self.listen_address("scheduler", i)
            name = "scheduler" if o.schedulers == 1 else f"scheduler-{i}"
            self._spawn(name, "services.scheduler", {
                **common, **scheduler_env(self.credentials), "SPLITWISE_SCHEDULER_LISTEN": scheduler,
                "SPLITWISE_KV_TRANSFER": o.kv_transfer,
                "SPLITWISE_KV_STORE_ADDRESS": kv_store, "SPLITWISE_TRACE_FILE": str(traces / f"{name}.jsonl")},
                scheduler)
        if o.http_port:
            gateway = f"{o.host}:{o.http_port}"
            self._spawn("gateway", "services.gateway", {
                **common, **scheduler_env(self.credentials), "SPLITWISE_GATEWAY_LISTEN": gateway,
                "SPLITWISE_GATEWAY_SCHEDULERS": self.address, "SPLITWISE_TLS_CA": "",
                "SPLITWISE_TRACE_FILE": str(traces / "gateway.jsonl")}, None)
            self.children[-1].metrics_address = gateway  # it serves /metrics on its own port
            self.http_address = gateway

    @property
    def operator_identity(self) -> ClusterTLS | None:
        """The launcher's own cluster identity (health checks of internal services)."""
        return self.credentials.admin_identity() if self.credentials else None

    def supervisor(self) -> Supervisor:
        """What `up` keeps running: every child, and the cluster's own Redis."""
        services = [Supervised(c.name, c.address or "", lambda c=c: c.proc, lambda c=c: self.restart(c))
                    for c in self.children]
        if self.redis is not None:
            services.insert(0, Supervised("redis", f"{self.o.host}:{self.o.redis_port}", lambda: self.redis,
                                          self.start_redis))
        return Supervisor(services, self.o.restart_policy, self.o.run_dir, self.why_nothing_serves)

    def why_nothing_serves(self, given_up: set[str]) -> str | None:
        """Why the cluster cannot serve without the services given up on, or None while it can."""
        def left(*kinds: str) -> list[Child]:
            return [c for c in self.children if c.name.split("-")[0] in kinds and c.name not in given_up]

        reason = ("its Redis is gone" if "redis" in given_up else
                  "no scheduler replica is left" if not left("scheduler") else
                  "no worker is left for the prompt phase" if not left("prompt_worker", "mixed_worker") else
                  "no worker is left for the token phase" if not left("token_worker", "mixed_worker") else
                  "relay mode needs the kv_store" if "kv_store" in given_up and self.o.kv_transfer == "relay" else
                  f"the HTTP gateway (--http-port {self.o.http_port}) cannot run" if "gateway" in given_up else
                  None)
        if reason is None:
            return None
        return f"{', '.join(sorted(given_up))} kept exiting (see {self.o.run_dir}/logs): {reason}"

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def wait_healthy(self, supervisor: Supervisor | None = None) -> None:
        """Waits for every service's gRPC health check, then for every scheduler replica to see all workers; fails
        when a service dies, or with a supervisor, when it gives up on a service the cluster needs."""
        deadline = time.monotonic() + self.o.startup_timeout_s
        pending = [c for c in self.children if c.address]
        while pending:
            self._check_alive(deadline, supervisor)
            pending = [c for c in pending
                       if not serving(c.address, None if c in self.schedulers else self.operator_identity)]
            time.sleep(0.2)
        expected = self.o.prompt_workers + self.o.token_workers + self.o.mixed_workers
        admin_key = self.credentials.admin_key if self.credentials else ""
        pending = [c.address for c in self.schedulers]
        while pending:
            self._check_alive(deadline, supervisor)
            pending = [address for address in pending if num_workers_seen(address, deadline, admin_key) < expected]
            time.sleep(0.2)
        while self.http_address and not http_healthy(self.http_address):
            self._check_alive(deadline, supervisor)
            time.sleep(0.2)

    def _check_alive(self, deadline: float, supervisor: Supervisor | None = None) -> None:
        if supervisor is not None:
            supervisor.check()
        elif dead := self.dead_child():
            raise RuntimeError(f"{dead.name} exited with code {dead.proc.returncode}; see {self.o.run_dir}/logs/{dead.name}.log")
        if time.monotonic() > deadline:
            raise TimeoutError(f"services not healthy within {self.o.startup_timeout_s}s; see {self.o.run_dir}/logs")

    def stop(self, grace_s: float = 40.0) -> None:
        """SIGTERM to every child (scheduler first), then SIGKILL to what is left after grace_s (workers drain
        their requests in flight for SPLITWISE_DRAIN_GRACE_S, 30 s by default)."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        if self.redis is not None:
            self.redis.terminate()
            try:
                self.redis.wait(5)
            except subprocess.TimeoutExpired:
                self.redis.kill()


def on_free_ports(options: UpOptions) -> UpOptions:
    """`options` with each kind of service on a range of free ports of this host, and /metrics on free ports (several
    clusters on one host: tests, benchmarks). A gateway stays off unless `options` asked for one."""
    o = options
    scheduler, prompt, token, kv_store, mixed, redis, http = free_port_ranges(
        o.schedulers, max(o.prompt_workers, 1), max(o.token_workers, 1), 1, max(o.mixed_workers, 1), 1, 1)
    return replace(o, scheduler_port=scheduler, prompt_port=prompt, token_port=token, kv_store_port=kv_store,
                   mixed_port=mixed, redis_port=redis, http_port=http if o.http_port else 0, metrics_port=0)


class ClusterDidNotStart(RuntimeError):
    """A cluster that did not become healthy (it has been stopped): why, and the end of each service's log."""


def start_healthy(options: UpOptions, make: Callable[[UpOptions], Cluster] = Cluster,
                  log_tail_chars: int = 2000) -> Cluster:
    """A cluster (`make(options)`: Cluster, or a subclass) started and healthy, or ClusterDidNotStart with everything
    it started stopped. Whoever gets the cluster stops it: how tests and benchmarks launch one."""
    cluster = make(options)
    try:
        cluster.start()
        cluster.wait_healthy()
    except (RuntimeError, TimeoutError, ValueError, OSError, grpc.RpcError) as e:
        cluster.stop()
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-log_tail_chars:]}"
                         for p in sorted((options.run_dir / "logs").glob("*.log")))
        raise ClusterDidNotStart(f"the cluster did not start: {e}\n{logs}") from e
    return cluster


def num_workers_seen(scheduler: str, deadline: float, admin_key: str = "") -> int:
    """How many workers the scheduler at this address lists; 0 while it does not answer, until the deadline."""
    try:
        with grpc.insecure_channel(scheduler) as channel:
            status = scheduler_pb2_grpc.SchedulerStub(channel).ClusterStatus(
                scheduler_pb2.ClusterStatusRequest(), timeout=5, metadata=bearer_metadata(admin_key))
        return len(status.workers)
    except grpc.RpcError as e:  # a busy machine: ask again until the deadline
        if time.monotonic() > deadline:
            raise TimeoutError(f"the scheduler at {scheduler} does not answer ClusterStatus: {e.code().name}") from e
        return 0


def http_healthy(address: str) -> bool:
    """True when the gateway at address answers GET /health with 200 (a scheduler it reaches sees the workers)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serving(address: str, tls: ClusterTLS | None = None) -> bool:
    """True when the gRPC server at address answers the standard health check with SERVING (as the cluster
    identity tls, for an internal service)."""
    try:
        with sync_channel(address, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def cluster_model_name(options: UpOptions) -> str:
    """The model id clients name (what /v1/models lists)."""
    from splitwise.model.mock import mock_model_name
    from splitwise.model.weights import resolve_model

    return mock_model_name(options.mock_profile) if options.engine == "mock" else resolve_model(options.model)[0]


def up(options: UpOptions) -> int:
    """Runs the cluster in the foreground until Ctrl-C / SIGTERM, restarting a service that dies; stops when one
    the cluster needs keeps exiting (splitwise/supervision.py)."""
    if options.engine == "mock":
        from splitwise.model.mock import load_mock_model

        print(f"mock engine: {load_mock_model(options.mock_profile, options.mock_time_factor, options.mock_kv_scale).describe()}",
              flush=True)
    else:
        from splitwise.model.weights import resolve_model

        print(f"preparing model {options.model} (the first run converts the GGUF, ~30 s)...", flush=True)
        resolve_model(options.model)
    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.append(True))
    cluster = Cluster(options)
    code = 0
    try:
        cluster.start()
        supervisor = cluster.supervisor()
        started = time.monotonic()
        print("starting redis, kv_store, workers and scheduler...", flush=True)
        while not stop_requested:
            try:
                cluster.wait_healthy(supervisor)
                break
            except grpc.RpcError:
                time.sleep(0.2)
        if not stop_requested:
            print(f"cluster healthy in {time.monotonic() - started:.1f}s", flush=True)
            if cluster.redis is not None:
                print(f"  {'redis':<16} {options.host + ':' + str(options.redis_port):<22} pid {cluster.redis.pid}")
            for child in cluster.children:
                address = child.address or (cluster.http_address if child.name == "gateway" else "")
                print(f"  {child.name:<16} {address:<22} pid {child.proc.pid:<8} metrics http://{child.metrics_address}/metrics"
                      + (f"  cores {','.join(map(str, sorted(child.cores)))}" if child.cores else ""))
            print(f"  logs and traces in {options.run_dir.resolve()}; a service that exits is restarted "
                  f"(splitwise status --run-dir {options.run_dir} shows restarts)")
            if cluster.credentials:
                print(f"  mTLS between services (cluster CA and certificates in {cluster.credentials.tls_dir}); "
                      f"API and admin keys in {options.run_dir}/api-key and admin-key (SPLITWISE_API_KEY, "
                      "SPLITWISE_ADMIN_KEY); Redis takes a password")
            else:
                print("  INSECURE: no TLS, no API key, no Redis password: anyone who reaches a port is trusted")
            print(f"try: splitwise generate --address {cluster.address} \"What is the capital of France?\"")
            if cluster.http_address:
                key = f"$(cat {options.run_dir}/api-key)" if cluster.credentials else "none"
                print(f"  or OpenAI's API: curl http://{cluster.http_address}/v1/chat/completions -H \"Authorization: "
                      f"Bearer {key}\" -H 'Content-Type: application/json' -d '{{\"model\": \"{cluster_model_name(options)}\", "
                      f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hi!\"}}]}}'")
            print("Ctrl-C stops everything.", flush=True)
        while not stop_requested:
            supervisor.check()
            time.sleep(0.2)
    except (RuntimeError, TimeoutError, ValueError) as e:  # ServiceLost is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        code = 1
    finally:
        print("stopping...", flush=True)
        cluster.stop()
    return code
