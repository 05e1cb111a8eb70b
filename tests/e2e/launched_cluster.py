"""A `splitwise up` cluster of real processes on free ports, running the tiny model on CPU, for end-to-end tests."""

from __future__ import annotations

import asyncio
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitwise.client import SplitwiseClient
from splitwise.launcher import Cluster, ClusterDidNotStart, UpOptions, on_free_ports, start_healthy
from splitwise.model.weights import resolve_model

HEARTBEAT_S = 0.2


@contextmanager
def launched_cluster(run_dir: Path, cache_dir: Path, env: dict | None = None, **options) -> Iterator[Cluster]:
    """`splitwise.launcher.running_cluster` of the tiny model on CPU, on free ports, one compute thread a service:
    started and healthy on entry (the test fails with the services' logs otherwise), stopped on exit. `options`:
    UpOptions fields; `env`: the services' environment on top of the tests'."""
    resolve_model("tiny-llama", cache_dir)
    test_env = {"SPLITWISE_CACHE_DIR": str(cache_dir), "SPLITWISE_NUM_THREADS": "1",
                "SPLITWISE_HEARTBEAT_S": str(HEARTBEAT_S)}
    options = on_free_ports(UpOptions(**{"model": "tiny-llama", "device": "cpu", "run_dir": run_dir,
                                         "startup_timeout_s": 120, **options}, extra_env={**test_env, **(env or {})}))
    try:
        cluster = start_healthy(options)
    except ClusterDidNotStart as e:
        pytest.fail(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


def recoveries(metrics_address: str) -> dict[tuple[str, str], float]:
    """A scheduler's splitwise_request_recoveries_total by (kind, kv), from its /metrics."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return {(s.labels["kind"], s.labels["kv"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "splitwise_request_recoveries_total"}


async def run_streams(address: str, prompts: list[list[int]], max_tokens: int, kill=None,
                      **client_options) -> list[list[int]]:
    """Streams every prompt at once (greedy, ignoring EOS); with `kill`, calls it once every prompt phase is over
    (each stream has its first token). No stream may fail: each must end at max_tokens."""
    outputs: list[list[int]] = [[] for _ in prompts]
    finished: list[str | None] = [None] * len(prompts)
    all_started = asyncio.Event()

    async def run(i: int, client: SplitwiseClient) -> None:
        async for chunk in client.stream(token_ids=prompts[i], max_tokens=max_tokens, ignore_eos=True, timeout=120):
            outputs[i] += chunk.token_ids
            finished[i] = chunk.finish_reason
            if all(outputs):
                all_started.set()

    async with SplitwiseClient(address, **client_options) as client:
        streams = asyncio.gather(*(run(i, client) for i in range(len(prompts))))
        if kill is not None:
            await asyncio.wait_for(all_started.wait(), 60)
            # On a loaded machine the first streams may be far along (even done): half must still be running.
            running = sum(f is None for f in finished)
            assert running >= len(prompts) // 2, f"only {running} of {len(prompts)} streams ran at the kill"
            kill()
        await asyncio.wait_for(streams, 120)  # no stream raises: a failure never reaches the client
    assert finished == ["length"] * len(prompts)
    return outputs
