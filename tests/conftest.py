"""Shared fixtures (a real Redis server, the tiny model's cache), and the run's last lines: the tests skipped for
what this machine lacks, by reason."""

from __future__ import annotations

import os
import secrets
import socket
from collections import Counter
from pathlib import Path

import pytest

from splitwise.cluster.redis_server import start_redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    """With a password, as `splitwise up` runs it."""
    port = free_port()
    password = secrets.token_hex(8)
    proc = start_redis(port, password=password)
    yield f"redis://:{password}@127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ.get("SPLITWISE_CACHE_DIR", Path.home() / ".cache" / "splitwise"))


@pytest.fixture(scope="session")
def tiny_folder(cache_dir) -> Path:
    """The tiny random Llama's converted folder (tokenizer, config, weights)."""
    from splitwise.model.weights import resolve_model

    return resolve_model("tiny-llama", cache_dir)[1]


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


def pytest_terminal_summary(terminalreporter):
    """Last, one line per reason tests were skipped, with the fix where the reason names one: a fresh machine that
    lacks a system library sees which tests it did not run and the command that runs them."""
    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reasons[report.longrepr[2].removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped, by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count} test{'s' if count > 1 else ''} skipped: {reason}")


@pytest.fixture(scope="session", autouse=True)
def api_keys():
    """Every client in the tests (SplitwiseClient reads these) and every launched cluster use the session's keys."""
    from tests import security

    saved = {k: os.environ.get(k) for k in ("SPLITWISE_API_KEY", "SPLITWISE_ADMIN_KEY")}
    os.environ["SPLITWISE_API_KEY"], os.environ["SPLITWISE_ADMIN_KEY"] = security.API_KEY, security.ADMIN_KEY
    yield security
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
