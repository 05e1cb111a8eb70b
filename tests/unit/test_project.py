"""What a newcomer relies on: the README's configuration table and a valid docker-compose.yml."""

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from splitwise.config import KVStoreConfig, PromptWorkerConfig, SchedulerConfig, TokenWorkerConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = (SchedulerConfig, PromptWorkerConfig, TokenWorkerConfig, KVStoreConfig)


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
