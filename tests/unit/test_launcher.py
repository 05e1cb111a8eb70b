"""The launcher of `splitwise up`: worker pinning (each worker process its own share of the cores, set before the
service starts), the ports of each kind of service, and restarting a service as it was."""

import os
import subprocess

import pytest

from splitwise.launcher import (Child, Cluster, ClusterDidNotStart, UpOptions, on_free_ports, port_is_free,
                                start_healthy, worker_cores)


def test_workers_get_disjoint_equal_shares_while_there_are_enough_cores():
    cores = list(range(8))
    shares = [worker_cores(i, 4, cores) for i in range(4)]
    assert shares == [{0, 1}, {2, 3}, {4, 5}, {6, 7}]
    assert [worker_cores(i, 3, cores) for i in range(3)] == [{0, 1}, {2, 3}, {4, 5}]


def test_more_workers_than_cores_take_one_core_each_in_turn():
    assert [worker_cores(i, 3, [4, 5]) for i in range(3)] == [{4}, {5}, {4}]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_pinned_service_runs_on_its_cores_only(tmp_path):
    core = sorted(os.sched_getaffinity(0))[-1]
    cluster = Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, metrics_port=0))
    cluster._spawn("probe-0", "tests.affinity_probe", {}, None, {core})
    cluster._spawn("probe-1", "tests.affinity_probe", {}, None)
    assert [c.proc.wait(30) for c in cluster.children] == [0, 0]
    logs = {c.name: (tmp_path / "logs" / f"{c.name}.log").read_text().strip().splitlines()[-1] for c in cluster.children}
    assert logs["probe-0"] == str([core])
    assert logs["probe-1"] == str(sorted(os.sched_getaffinity(0)))


def test_up_serves_each_kind_on_the_ports_its_service_defaults_to():
    """What the README's configuration table says of each service alone holds for `splitwise up` too."""
    from splitwise.config import KVStoreConfig, PromptWorkerConfig, SchedulerConfig, TokenWorkerConfig

    cluster = Cluster(UpOptions(model="tiny-llama"))
    for kind, config in (("scheduler", SchedulerConfig()), ("prompt_worker", PromptWorkerConfig()),
                         ("token_worker", TokenWorkerConfig()), ("kv_store", KVStoreConfig())):
        assert (cluster.listen_address(kind), cluster.metrics_address(kind)) == (config.listen, config.metrics_listen)


def test_replicas_and_workers_of_a_kind_take_consecutive_ports_from_its_first():
    cluster = Cluster(UpOptions(model="tiny-llama", schedulers=2, token_workers=3, mixed_workers=2))
    assert [cluster.listen_address("token_worker", i) for i in range(3)] == [
        "127.0.0.1:50071", "127.0.0.1:50072", "127.0.0.1:50073"]
    assert [cluster.metrics_address("token_worker", i) for i in range(3)] == [
        "127.0.0.1:9471", "127.0.0.1:9472", "127.0.0.1:9473"]
    assert cluster.metrics_address("scheduler", 1) == "127.0.0.1:9452"
    assert [cluster.listen_address("mixed_worker", i) for i in range(2)] == ["127.0.0.1:50091", "127.0.0.1:50092"]
    assert cluster.metrics_address("mixed_worker", 1) == "127.0.0.1:9492"


def test_ports_that_two_services_would_share_are_refused_before_anything_starts(tmp_path):
    cluster = Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, token_workers=11))
    with pytest.raises(ValueError, match="port 50081 would be both token_worker's and kv_store's"):
        cluster.start()
    assert cluster.children == [] and cluster.redis is None


@pytest.mark.parametrize("workers", [dict(prompt_workers=0), dict(token_workers=0),
                                     dict(prompt_workers=0, token_workers=0)])
def test_a_cluster_without_a_worker_for_each_phase_is_refused(tmp_path, workers):
    with pytest.raises(ValueError, match="each phase needs a worker"):
        Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, **workers)).start()


def test_a_restarted_service_comes_back_with_its_address_environment_metrics_and_log(tmp_path):
    cluster = Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, metrics_port=0))
    cluster._spawn("probe-0", "tests.affinity_probe", {"SPLITWISE_WORKER_ID": "probe-0"}, "127.0.0.1:1")
    probe = cluster.children[0]
    first, metrics, env = probe.proc, probe.metrics_address, dict(probe.env)
    assert first.wait(30) == 0
    cluster.restart(probe)
    assert probe.proc is not first and probe.proc.wait(30) == 0
    assert (probe.address, probe.metrics_address, probe.env) == ("127.0.0.1:1", metrics, env)
    log = (tmp_path / "logs" / "probe-0.log").read_text().splitlines()
    assert log[1:] == ["--- exited with code 0; restarted by splitwise up", log[0]]


def test_a_running_service_is_not_restarted(tmp_path):
    cluster = Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, metrics_port=0))
    sleeper = Child("sleeper", None, subprocess.Popen(["sleep", "60"]), module="tests.affinity_probe")
    try:
        with pytest.raises(RuntimeError, match="still running"):
            cluster.restart(sleeper)
    finally:
        sleeper.proc.kill()
        sleeper.proc.wait()


@pytest.mark.parametrize("given_up, reason", [
    ({"scheduler-0"}, None), ({"token_worker-1", "kv_store"}, None), ({"prompt_worker-0"}, None),
    ({"redis"}, "its Redis is gone"), ({"scheduler-0", "scheduler-1"}, "no scheduler replica is left"),
    ({"token_worker-0", "token_worker-1", "mixed_worker-0"}, "no worker is left for the token phase"),
    ({"prompt_worker-0", "mixed_worker-0"}, "no worker is left for the prompt phase"),
])
def test_the_cluster_serves_on_while_each_phase_keeps_a_worker_and_a_scheduler_is_left(given_up, reason):
    cluster = Cluster(UpOptions(model="tiny-llama"))
    cluster.children = [Child(name, None, None) for name in (
        "kv_store", "prompt_worker-0", "token_worker-0", "token_worker-1", "mixed_worker-0", "scheduler-0",
        "scheduler-1")]
    why = cluster.why_nothing_serves(given_up)
    assert (why if why is None else why.split(": ", 1)[1]) == reason
    if why:
        assert why.startswith(f"{', '.join(sorted(given_up))} kept exiting")


def test_relay_mode_cannot_serve_without_its_kv_store():
    cluster = Cluster(UpOptions(model="tiny-llama", kv_transfer="relay"))
    cluster.children = [Child(name, None, None) for name in ("kv_store", "prompt_worker-0", "token_worker-0",
                                                             "scheduler")]
    assert cluster.why_nothing_serves({"kv_store"}).endswith("relay mode needs the kv_store")


def test_the_gateway_starts_after_the_schedulers_and_is_told_every_replica(tmp_path, monkeypatch):
    from splitwise.launcher import free_port_ranges

    (http_port,) = free_port_ranges(1)
    cluster = Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, schedulers=2, http_port=http_port,
                                metrics_port=0))
    monkeypatch.setattr(cluster, "_launch", lambda child: None)  # nothing runs: the plan is checked
    monkeypatch.setattr(cluster, "start_redis", lambda: None)
    cluster.start()
    gateway = cluster.children[-1]
    assert gateway.name == "gateway" and gateway.module == "services.gateway"
    assert gateway.env["SPLITWISE_GATEWAY_SCHEDULERS"] == cluster.address == "127.0.0.1:50051,127.0.0.1:50052"
    assert gateway.env["SPLITWISE_GATEWAY_LISTEN"] == cluster.http_address == f"127.0.0.1:{http_port}"
    assert gateway.env["SPLITWISE_API_KEY"] == cluster.credentials.api_key
    assert gateway.metrics_address == cluster.http_address  # /metrics on its own port


def test_every_worker_runs_the_worker_service_in_its_kinds_role_on_its_address(tmp_path, monkeypatch):
    cluster = Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, mixed_workers=1, metrics_port=0, insecure=True))
    monkeypatch.setattr(cluster, "_launch", lambda child: None)  # nothing runs: the plan is checked
    monkeypatch.setattr(cluster, "start_redis", lambda: None)
    cluster.start()
    workers = {c.name: (c.module, c.args) for c in cluster.children if "worker" in c.name}
    assert workers == {
        "prompt_worker-0": ("services.worker", ("--role", "prompt", "--listen", "127.0.0.1:50061")),
        "token_worker-0": ("services.worker", ("--role", "token", "--listen", "127.0.0.1:50071")),
        "mixed_worker-0": ("services.worker", ("--role", "mixed", "--listen", "127.0.0.1:50091")),
    }


def test_a_gateway_port_in_use_is_refused_at_once_and_a_gateway_that_cannot_run_stops_up(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} is in use: the HTTP gateway needs another"):
            Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, http_port=port)).start()
    cluster = Cluster(UpOptions(model="tiny-llama", http_port=8000))
    cluster.children = [Child(name, None, None) for name in ("kv_store", "prompt_worker-0", "token_worker-0",
                                                             "scheduler", "gateway")]
    assert cluster.why_nothing_serves({"gateway"}).endswith("the HTTP gateway (--http-port 8000) cannot run")


def test_free_metrics_ports_are_outside_the_ephemeral_range_and_distinct(tmp_path):
    """A port the kernel hands out for outgoing connections could be taken by one before the service binds it."""
    from splitwise.launcher import listen_ports

    cluster = Cluster(UpOptions(model="tiny-llama", run_dir=tmp_path, metrics_port=0))
    ports = [int(cluster.metrics_address("token_worker", i).rsplit(":", 1)[1]) for i in range(50)]
    assert len(set(ports)) == 50 and all(p in listen_ports() for p in ports)
    assert not set(ports) & {50051, 50061, 50071, 50081, 6379}


def test_a_cluster_on_free_ports_gives_each_service_its_own_free_port():
    options = on_free_ports(UpOptions(model="tiny-llama", schedulers=2, prompt_workers=3, token_workers=11,
                                      mixed_workers=2, http_port=1))
    cluster = Cluster(options)
    cluster._check_options()  # no two services share a port (11 token workers would reach the default kv_store's)
    grpc = {first + i for first, count in cluster.first_ports().values() for i in range(count)}
    assert len(grpc) == 2 + 3 + 11 + 1 + 2 and not grpc & {options.redis_port, options.http_port}
    assert all(port_is_free(p) for p in grpc | {options.redis_port, options.http_port})
    assert options.metrics_port == 0 and on_free_ports(UpOptions(model="tiny-llama")).http_port == 0


def test_a_cluster_that_does_not_start_is_stopped_and_says_why_with_its_logs(tmp_path):
    options = on_free_ports(UpOptions(model="no-such-model", device="cpu", run_dir=tmp_path, startup_timeout_s=60,
                                      extra_env={"SPLITWISE_CACHE_DIR": str(tmp_path / "cache")}))
    made = []
    with pytest.raises(ClusterDidNotStart, match="exited with code") as failure:
        start_healthy(options, lambda o: made.append(Cluster(o)) or made[0])
    assert "--- " in str(failure.value) and "no-such-model" in str(failure.value)  # a service's log, saying why
    assert made[0].children and all(c.proc.poll() is not None for c in made[0].children)
    assert made[0].redis is None or made[0].redis.poll() is not None
