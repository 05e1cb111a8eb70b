"""What a newcomer relies on: the README's configuration table and a valid docker-compose.yml."""

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from splitwise.config import (GatewayConfig, KVStoreConfig, PromptWorkerConfig, SchedulerConfig, TokenWorkerConfig,
                              parse_config)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = (SchedulerConfig, PromptWorkerConfig, TokenWorkerConfig, KVStoreConfig, GatewayConfig)


def test_readme_documents_every_configuration_variable():
    readme = (ROOT / "README.md").read_text()
    missing = [f.metadata["env"] for cls in CONFIGS for f in dataclasses.fields(cls) if f.metadata["env"] not in readme]
    assert not missing, f"README.md lacks {missing}; regenerate the table with splitwise.config.config_table"


def test_flags_override_environment_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("SPLITWISE_KV_MEMORY_BYTES", "1234")
    monkeypatch.setenv("SPLITWISE_DEVICE", "cuda")
    config = parse_config(TokenWorkerConfig, ["--device", "cpu"])
    assert (config.kv_memory_bytes, config.device, config.dtype) == (1234, "cpu", "float32")


def test_docker_compose_file_is_valid():
    if not shutil.which("docker-compose"):
        if os.environ.get("CI"):
            pytest.fail("CI must validate docker-compose.yml: install Debian's docker-compose")
        pytest.skip("docker-compose is not installed")
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_services_report_health_by_grpc_and_prometheus_scrapes_every_one():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    splitwise = {name for name, s in services.items() if "command" in s and s["command"][:2] == ["python", "-m"]}
    assert splitwise == {"scheduler", "kv_store", "prompt_worker", "token_worker", "gateway"}
    grpc_services = splitwise - {"gateway"}
    assert {"redis", "jaeger", "prometheus"} <= set(services)
    env = compose["x-splitwise"]["environment"]
    assert env["SPLITWISE_METRICS_LISTEN"] == "0.0.0.0:9464"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    for name in grpc_services:
        port = services[name]["environment"][f"SPLITWISE_{name.upper()}_LISTEN"].rsplit(":", 1)[1]
        assert services[name]["healthcheck"]["test"] == ["CMD", "splitwise", "health", f"127.0.0.1:{port}"], name
    # The gateway: OpenAI's API on 8000, healthy by its /health, talking TLS to the scheduler's public port.
    gateway = services["gateway"]
    assert gateway["environment"]["SPLITWISE_GATEWAY_LISTEN"] == "0.0.0.0:8000" and "8000:8000" in gateway["ports"]
    assert gateway["environment"]["SPLITWISE_GATEWAY_SCHEDULERS"] == "scheduler:50051"
    assert services["scheduler"]["environment"]["SPLITWISE_PUBLIC_TLS"] == "1"
    assert gateway["environment"]["SPLITWISE_TLS_CA"] == "/secrets/tls/ca.pem"
    assert "http://127.0.0.1:8000/health" in " ".join(gateway["healthcheck"]["test"])
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: d for job in prometheus["scrape_configs"] for d in job["dns_sd_configs"]}
    assert set(jobs["splitwise"]["names"]) == grpc_services and jobs["splitwise"]["port"] == 9464
    assert jobs["gateway"]["names"] == ["gateway"] and jobs["gateway"]["port"] == 8000
