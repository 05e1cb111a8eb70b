"""Shared fixtures: a real Redis server, and the tiny model's cache."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from splitwise.cluster.redis_server import start_redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def listen_ports() -> range:
    """Ports outside the kernel's ephemeral range: while a launched cluster starts, its services' outgoing
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
