"""The worker's configuration: one WorkerConfig composed of shared option parts, whose role (prompt, token or
mixed) decides the defaults of its listen address, metrics endpoint and KV memory."""

import dataclasses

import pytest

from splitwise.config import (AdvertiseOptions, EngineOptions, GatewayConfig, InsecureOptions, KVOptions,
                              KVProgressOptions, KVStoreConfig, ModelOptions, PeerOptions, PromptWorkerConfig,
                              PublicApiOptions, RedisOptions, RegistryOptions, SchedulerConfig, SecurityOptions,
                              TelemetryOptions, TokenWorkerConfig, WorkerConfig, parse_worker_config)

PARTS = (ModelOptions, EngineOptions, KVProgressOptions, KVOptions, RedisOptions, PeerOptions, RegistryOptions,
         AdvertiseOptions, InsecureOptions, SecurityOptions, PublicApiOptions, TelemetryOptions)
CONFIGS = (SchedulerConfig, PromptWorkerConfig, TokenWorkerConfig, KVStoreConfig, GatewayConfig)
ROLE_VARIABLES = ("SPLITWISE_WORKER_ROLE", "SPLITWISE_TOKEN_WORKER_ROLE", "SPLITWISE_PROMPT_WORKER_LISTEN", "SPLITWISE_TOKEN_WORKER_LISTEN",
                  "SPLITWISE_METRICS_LISTEN", "SPLITWISE_PROMPT_KV_MEMORY_BYTES", "SPLITWISE_KV_MEMORY_BYTES")


@pytest.fixture(autouse=True)
def no_worker_variables(monkeypatch):
    for name in ROLE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("role, listen, metrics, kv_memory_bytes", [
    ("prompt", "127.0.0.1:50061", "127.0.0.1:9461", 512 << 20),
    ("token", "127.0.0.1:50071", "127.0.0.1:9471", 1 << 30),
    ("mixed", "127.0.0.1:50071", "127.0.0.1:9471", 1 << 30),
])
def test_each_role_has_its_own_listen_address_metrics_endpoint_and_kv_memory(role, listen, metrics, kv_memory_bytes):
    for config in (parse_worker_config(["--role", role]), WorkerConfig.for_role(role)(role=role)):
        assert (config.role, config.listen, config.metrics_listen, config.kv_memory_bytes) == (
            role, listen, metrics, kv_memory_bytes)


def test_the_role_comes_from_the_flag_then_the_variable_the_launcher_set_then_token(monkeypatch):
    assert parse_worker_config([]).role == "token"
    monkeypatch.setenv("SPLITWISE_WORKER_ROLE", "mixed")
    assert parse_worker_config([]).role == "mixed"
    assert parse_worker_config(["--role", "token"]).role == "token"


def test_the_role_variables_old_name_is_read_where_the_new_one_is_unset(monkeypatch):
    monkeypatch.setenv("SPLITWISE_TOKEN_WORKER_ROLE", "mixed")
    assert parse_worker_config([]).role == "mixed"
    monkeypatch.setenv("SPLITWISE_WORKER_ROLE", "prompt")
    assert parse_worker_config([]).role == "prompt"
    prompt = parse_worker_config(["--role", "prompt"])
    assert type(prompt) is PromptWorkerConfig and prompt.listen == "127.0.0.1:50061"


def test_only_a_prompt_worker_reads_the_prompt_variables(monkeypatch):
    monkeypatch.setenv("SPLITWISE_PROMPT_KV_MEMORY_BYTES", "1234")
    monkeypatch.setenv("SPLITWISE_KV_MEMORY_BYTES", "5678")
    monkeypatch.setenv("SPLITWISE_PROMPT_WORKER_LISTEN", "0.0.0.0:1")
    monkeypatch.setenv("SPLITWISE_TOKEN_WORKER_LISTEN", "0.0.0.0:2")
    monkeypatch.setenv("SPLITWISE_METRICS_LISTEN", "0.0.0.0:3")
    configs = {role: parse_worker_config(["--role", role]) for role in ("prompt", "token", "mixed")}
    assert {role: (c.kv_memory_bytes, c.listen, c.metrics_listen) for role, c in configs.items()} == {
        "prompt": (1234, "0.0.0.0:1", "0.0.0.0:3"), "token": (5678, "0.0.0.0:2", "0.0.0.0:3"),
        "mixed": (5678, "0.0.0.0:2", "0.0.0.0:3")}
    assert parse_worker_config(["--role", "prompt", "--kv-memory-bytes", "99"]).kv_memory_bytes == 99


def test_an_unknown_role_is_refused_with_the_roles_there_are(monkeypatch):
    expected = "worker role must be one of prompt, token, mixed, got 'decode'"
    with pytest.raises(ValueError, match=expected):
        TokenWorkerConfig(role="decode")
    with pytest.raises(ValueError, match=expected):
        parse_worker_config(["--role", "decode"])
    monkeypatch.setenv("SPLITWISE_WORKER_ROLE", "decode")
    with pytest.raises(ValueError, match=expected):
        parse_worker_config([])


def test_a_role_in_the_config_class_of_another_role_is_refused():
    """A prompt worker with the token role's defaults would serve on the token worker's port, without a word."""
    with pytest.raises(ValueError, match=r"a prompt worker's config is WorkerConfig.for_role\('prompt'\)"):
        WorkerConfig(role="prompt")
    with pytest.raises(ValueError, match="a mixed worker's config"):
        dataclasses.replace(PromptWorkerConfig(), role="mixed")


def test_every_option_is_defined_once():
    """In one part or one service's config, wherever it is read; only a service's own metrics endpoint and the prompt
    role's defaults are defined again."""
    defined_in: dict[str, list[str]] = {}
    for cls in {*PARTS, *CONFIGS, WorkerConfig}:
        own = vars(cls).get("__annotations__", {})
        for f in dataclasses.fields(cls):
            if f.name in own:
                defined_in.setdefault(f.metadata["env"], []).append(cls.__name__)
    assert {env: sorted(where) for env, where in defined_in.items() if len(where) > 1} == {
        "SPLITWISE_METRICS_LISTEN": ["KVStoreConfig", "PromptWorkerConfig", "SchedulerConfig", "WorkerConfig"],
        "SPLITWISE_WORKER_ROLE": ["PromptWorkerConfig", "WorkerConfig"]}
    assert all(issubclass(WorkerConfig, part) for part in PARTS if part is not PublicApiOptions)
    # The roles share every option but the three whose default is their own, and the role itself.
    assert set(vars(PromptWorkerConfig)["__annotations__"]) == {"role", "listen", "kv_memory_bytes", "metrics_listen"}
    assert not vars(TokenWorkerConfig).get("__annotations__")


def test_a_variable_has_one_default_wherever_it_is_read_except_a_services_own_port_and_role():
    defaults: dict[str, set] = {}
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            defaults.setdefault(f.metadata["env"], set()).add(f.default)
    assert {env for env, values in defaults.items() if len(values) > 1} == {"SPLITWISE_METRICS_LISTEN",
                                                                            "SPLITWISE_WORKER_ROLE"}


def test_the_old_config_names_construct_as_before(tmp_path):
    common = dict(device="cpu", model="tiny-llama", cache_dir=str(tmp_path), redis_url="redis://127.0.0.1:1/0",
                  metrics_listen="127.0.0.1:0", tls_dir=str(tmp_path), registry_ttl_s=15.0, kv_transports="fake")
    prompt = PromptWorkerConfig(listen="127.0.0.1:0", **common)
    mixed = TokenWorkerConfig(listen="127.0.0.1:0", role="mixed", **common)
    assert isinstance(prompt, WorkerConfig) and isinstance(mixed, WorkerConfig)
    assert (prompt.role, prompt.kv_memory_bytes, prompt.kv_transports) == ("prompt", 512 << 20, "fake")
    assert (mixed.role, mixed.kv_memory_bytes, mixed.max_decode_batch) == ("mixed", 1 << 30, 256)
    assert dataclasses.asdict(TokenWorkerConfig()) == dataclasses.asdict(WorkerConfig())  # the token role's defaults


def test_the_old_modules_run_the_worker_service_in_their_role(monkeypatch):
    from services.prompt_worker import app as prompt_app, server as prompt_server
    from services.token_worker import app as token_app, server as token_server
    from services.worker import app as worker_app, prompt_servicer, token_servicer

    assert (prompt_app.start, prompt_app.serve) == (worker_app.start, worker_app.serve)
    assert token_app.main is worker_app.main  # its role: SPLITWISE_WORKER_ROLE, else token
    assert prompt_server.PromptWorkerServicer is prompt_servicer.PromptWorkerServicer
    assert token_server.TokenWorkerServicer is token_servicer.TokenWorkerServicer
    ran = []
    monkeypatch.setattr(worker_app, "main", ran.append)
    monkeypatch.setenv("SPLITWISE_WORKER_ROLE", "mixed")
    prompt_app.main(["--role", "token", "--device", "cpu"])
    assert parse_worker_config(ran[0]).role == "prompt"
