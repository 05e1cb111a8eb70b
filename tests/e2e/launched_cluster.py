"""A `splitwise up` cluster of real processes on free ports, running the tiny model on CPU, for end-to-end tests."""

from __future__ import annotations

import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitwise.launcher import Cluster, UpOptions, free_port_ranges
from splitwise.model.weights import resolve_model

HEARTBEAT_S = 0.2


@contextmanager
def launched_cluster(run_dir: Path, cache_dir: Path, env: dict | None = None, **options) -> Iterator[Cluster]:
    """Started and healthy on entry (the test fails with the services' logs otherwise), stopped on exit."""
    resolve_model("tiny-llama", cache_dir)
    schedulers = options.get("schedulers", 1)
    scheduler_port, prompt_port, token_port, kv_store_port, redis_port = free_port_ranges(
        schedulers, options.get("prompt_workers", 1), options.get("token_workers", 1), 1, 1)
    cluster = Cluster(UpOptions(
        model="tiny-llama", device="cpu", run_dir=run_dir, scheduler_port=scheduler_port,
        prompt_port=prompt_port, token_port=token_port, kv_store_port=kv_store_port, redis_port=redis_port,
        metrics_port=0, startup_timeout_s=120,
        extra_env={"SPLITWISE_CACHE_DIR": str(cache_dir), "SPLITWISE_NUM_THREADS": "1",
                   "SPLITWISE_HEARTBEAT_S": str(HEARTBEAT_S), **(env or {})},
        **options))
    try:
        cluster.start()
        cluster.wait_healthy()
    except (RuntimeError, TimeoutError, grpc.RpcError) as e:
        cluster.stop()
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (run_dir / "logs").glob("*.log"))
        pytest.fail(f"the cluster did not start: {e}\n{logs}")
    try:
        yield cluster
    finally:
        cluster.stop()


def recoveries(metrics_address: str) -> dict[tuple[str, str], float]:
    """A scheduler's splitwise_request_recoveries_total by (kind, kv), from its /metrics."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return {(s.labels["kind"], s.labels["kv"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "splitwise_request_recoveries_total"}
