"""Shared fixtures: a real Redis server, and the tiny model's cache."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from splitwise.cluster.redis_server import start_redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    port = free_port()
    proc = start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ.get("SPLITWISE_CACHE_DIR", Path.home() / ".cache" / "splitwise"))


@pytest.fixture(scope="session")
def trace_file(tmp_path_factory) -> Path:
    """Every in-process service of this test session exports its spans here."""
    from splitwise.telemetry.tracing import setup_tracing

    path = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    setup_tracing("splitwise-tests", path)
    return path


@pytest.fixture(scope="session")
def meter_provider():
    """Metrics of every in-process service go to this process's Prometheus registry."""
    from splitwise.telemetry.metrics import setup_metrics

    return setup_metrics("splitwise-tests")
