"""One configuration dataclass per service, composed of shared option parts, filled from command-line flags, then
environment variables, then defaults."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, TypeVar

from splitwise.model import DEFAULT_MOCK_PROFILE

T = TypeVar("T")


def option(default, env: str, help: str, old_env: str = ""):
    """A config field readable from flag --name and from environment variable `env` (or, where `env` is unset, from
    `old_env`: the variable's name before it was renamed, still read)."""
    return field(default=default, metadata={"env": env, "help": help, "old_env": old_env})


def _environment_value(f: dataclasses.Field) -> str | None:
    """The field's variable as set, or its old name's; None when neither is."""
    for name in (f.metadata["env"], f.metadata.get("old_env")):
        if name and name in os.environ:
            return os.environ[name]
    return None


def _convert(value: str, kind):
    if kind in (bool, "bool"):
        return value.lower() in ("1", "true", "yes", "on")
    if kind in (int, "int"):
        return int(value)
    if kind in (float, "float"):
        return float(value)
    return value


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    add_config_arguments(parser, cls)
    return cls(**vars(parser.parse_args(argv)))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, names: Sequence[str] | None = None,
                         strict: bool = True) -> None:
    """Flags for the fields of `cls` (only `names`, where given), defaulting to their environment variables.

    strict: a variable that is not of its field's type raises now (a service stops at start). Otherwise the parser
    reports it if and when it parses (a subcommand of a CLI whose other commands must not fail on it)."""
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        env = f.metadata["env"]
        value = _environment_value(f)
        try:
            default = _convert(value, f.type) if value is not None else f.default
        except ValueError:
            if strict:
                raise
            default = value  # argparse converts a string default by the option's type, at parse time
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"{f.metadata['help']} [{env}]")
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, type=kind, default=default, help=f"{f.metadata['help']} [{env}] (default: {default})")


def config_table(*classes: type) -> str:
    """The README's table of configuration variables, one row per variable with the services that read it."""
    rows: dict[str, list] = {}
    for cls in classes:
        service = cls.__name__.removesuffix("Config")
        for f in dataclasses.fields(cls):
            env = f.metadata["env"]
            if env in rows:
                rows[env][1].append(service)
                rows[env][2].append(f.default)
            else:
                rows[env] = [f"--{f.name.replace('_', '-')}", [service], [f.default], f.metadata["help"]]
    lines = ["| variable | flag | services | default | meaning |", "|---|---|---|---|---|"]
    for env, (flag, services, defaults, help) in rows.items():
        if len(set(defaults)) == 1:
            default = f"`{defaults[0]}`"
        else:
            default = ", ".join(f"`{d}` ({s})" for s, d in zip(services, defaults))
        lines.append(f"| `{env}` | `{flag}` | {', '.join(services)} | {default} | {help} |")
    return "\n".join(lines)


def default_worker_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


MODEL_HELP = "model: smollm2-135m-instruct (default), tiny-llama, or a local Hugging Face Llama-family folder"
ENGINE_HELP = ("real: the model computes; mock: its compute is replaced by the mock profile's modelled step times "
               "(no weights, no KV cache; the real scheduler, batching, blocks and KV transports), and the cluster "
               "serves model mock:PROFILE")
MOCK_PROFILE_HELP = ("mock engine: the machine profile it models, MODEL@MACHINE from the paper's profiles "
                     "(llama2-70b@dgx-a100, bloom-176b@dgx-h100, ...) or a profile CSV")
MOCK_TIME_FACTOR_HELP = ("mock engine: every modelled step time is multiplied by this (above 1 slows the whole mock "
                         "cluster down where one machine cannot keep up)")
MOCK_KV_SCALE_HELP = "mock engine: the KV bytes a worker sends are the modelled size divided by this"
MIXED_BATCHES_HELP = ("a step that prefills also decodes every running sequence (prompt chunks fill the rest of "
                      "the token budget), as vLLM's chunked prefill; off: prefill and decode steps alternate, "
                      "prompts first but decodes never held back past 50 ms")
REDIS_URL = "redis://127.0.0.1:6379/0"
METRICS_LISTEN_HELP = "host:port of the Prometheus /metrics endpoint ('off': none)"
ROLE_HELP = ("prompt, token, or mixed (both phases: the mixed pool): the pool the worker registers in, and the "
             "defaults of its listen address, metrics endpoint and KV memory (SPLITWISE_TOKEN_WORKER_ROLE, its "
             "old name, is still read when this is unset)")
WORKER_ROLES = ("prompt", "token", "mixed")


# The parts several services share. A dataclass takes its bases' fields from the last base to the first, so a
# config lists its parts last first.

@dataclass
class ModelOptions:
    """Which model a service serves (the scheduler and the gateway too: its tokenizer and name)."""

    model: str = option("smollm2-135m-instruct", "SPLITWISE_MODEL", MODEL_HELP)
    cache_dir: str = option("", "SPLITWISE_CACHE_DIR", "where converted models are cached (default ~/.cache/splitwise)")
    engine: str = option("real", "SPLITWISE_ENGINE", ENGINE_HELP)
    mock_profile: str = option(DEFAULT_MOCK_PROFILE, "SPLITWISE_MOCK_PROFILE", MOCK_PROFILE_HELP)


@dataclass
class EngineOptions:
    """How a worker's engine computes and batches (its KV memory depends on the role: see WorkerConfig)."""

    mock_time_factor: float = option(1.0, "SPLITWISE_MOCK_TIME_FACTOR", MOCK_TIME_FACTOR_HELP)
    mock_kv_scale: float = option(1.0, "SPLITWISE_MOCK_KV_SCALE", MOCK_KV_SCALE_HELP)
    device: str = option("auto", "SPLITWISE_DEVICE", "cpu, cuda, cuda:N, or auto (cuda when torch sees one)")
    dtype: str = option("float32", "SPLITWISE_DTYPE", "float32, bfloat16 or float16")
    num_threads: int = option(0, "SPLITWISE_NUM_THREADS", "torch compute threads (0: torch's default)")
    block_size: int = option(16, "SPLITWISE_BLOCK_SIZE", "tokens per KV cache block")
    max_batch_tokens: int = option(2048, "SPLITWISE_MAX_BATCH_TOKENS", "prefill batch budget; longer prompts are chunked")
    mixed_batches: bool = option(False, "SPLITWISE_MIXED_BATCHES", MIXED_BATCHES_HELP)
    max_queued_prompt_tokens: int = option(65536, "SPLITWISE_MAX_QUEUED_PROMPT_TOKENS", "prompt tokens waiting for (or in) a prefill beyond which a new prompt is refused with RESOURCE_EXHAUSTED (the scheduler tries another worker); 0: no limit")
    max_decode_batch: int = option(256, "SPLITWISE_MAX_DECODE_BATCH", "most sequences decoded in one step")


@dataclass
class KVProgressOptions:
    kv_progress_timeout_s: float = option(30.0, "SPLITWISE_KV_PROGRESS_TIMEOUT_S", "a KV transfer that makes no "
                                          "progress this long fails (waiting for compute does not count)")


@dataclass
class KVOptions(KVProgressOptions):
    """How a worker sends and receives KV caches."""

    kv_chunk_bytes: int = option(1 << 20, "SPLITWISE_KV_CHUNK_BYTES", "largest KV chunk on the wire (grpc transport)")
    kv_transports: str = option("shm,grpc", "SPLITWISE_KV_TRANSPORTS", "KV transports this worker offers: shm (same host), mooncake (RDMA or TCP; opt in: its engine listens on every interface and authenticates no peer, see README Security), grpc (always; mTLS), fake (tests only: in-process, faults on demand)")
    kv_mooncake_protocol: str = option("tcp", "SPLITWISE_KV_MOONCAKE_PROTOCOL", "Mooncake Transfer Engine protocol: tcp, or rdma where the machine has it")
    kv_wait_timeout_s: float = option(600.0, "SPLITWISE_KV_WAIT_TIMEOUT_S", "how long a reservation waits for its KV to start arriving (the sender's queue included)")


@dataclass
class RedisOptions:
    """The cluster's Redis."""

    redis_url: str = option(REDIS_URL, "SPLITWISE_REDIS_URL", "Redis holding the worker registry, the pools, the "
                            "request journal and the kv_store's KV index")


@dataclass
class PeerOptions:
    """How a service that calls its peers finds out that one hangs."""

    grpc_keepalive_s: float = option(5.0, "SPLITWISE_GRPC_KEEPALIVE_S", (
        "while calls to a peer are open, ping it every this many seconds; one that does not answer within as long (a "
        "hung process, a host gone without closing its connections) fails them with UNAVAILABLE; 0: no pings"))


@dataclass
class RegistryOptions(PeerOptions, RedisOptions):
    """How a worker keeps its registry entry alive and talks to its peers."""

    heartbeat_s: float = option(1.0, "SPLITWISE_HEARTBEAT_S", "registry heartbeat interval")
    registry_ttl_s: float = option(3.0, "SPLITWISE_REGISTRY_TTL_S", "a worker silent this long leaves the registry")


@dataclass
class AdvertiseOptions:
    """Where other services reach a service that is found through Redis (a worker, the kv_store)."""

    advertise: str = option("", "SPLITWISE_ADVERTISE", "address other services use to reach this service (default: "
                            "its listen address)")


@dataclass
class InsecureOptions:
    insecure: bool = option(False, "SPLITWISE_INSECURE", "run without TLS and cluster authentication (anyone who "
                            "reaches a port is trusted): for debugging only")


@dataclass
class SecurityOptions(InsecureOptions):
    """A cluster service's identity: its certificate and the cluster key, or none at all."""

    tls_dir: str = option("", "SPLITWISE_TLS_DIR", "folder of the cluster CA, this service's certificate and key, and the cluster key (made by `splitwise certs`): mTLS between services; required unless --insecure")


@dataclass
class PublicApiOptions:
    """What the public API asks of its clients (the scheduler's gRPC API and the gateway's HTTP one)."""

    api_key: str = option("", "SPLITWISE_API_KEY", "the public API's key: clients send 'authorization: Bearer KEY' metadata, a missing or wrong key gets UNAUTHENTICATED (empty: no key, allowed on a loopback address only unless --insecure)")
    admin_key: str = option("", "SPLITWISE_ADMIN_KEY", "the key ClusterStatus takes (it lists every worker and its address); it also works as an API key (empty: ClusterStatus is closed unless --insecure)")
    request_timeout_s: float = option(600.0, "SPLITWISE_REQUEST_TIMEOUT_S", "deadline of a request whose client set none")


@dataclass
class TelemetryOptions:
    """Where a service's spans and logs go (each service has its own metrics endpoint default)."""

    trace_file: str = option("", "SPLITWISE_TRACE_FILE", "append finished spans as JSON lines to this file")
    log_level: str = option("INFO", "SPLITWISE_LOG_LEVEL", "logging level")
    log_format: str = option("json", "SPLITWISE_LOG_FORMAT", "json (one object per line, with trace and span ids) or text")


@dataclass
class SchedulerConfig(TelemetryOptions, PublicApiOptions, SecurityOptions, PeerOptions, RedisOptions, ModelOptions):
    """The scheduler: the cluster's front door."""

    listen: str = option("127.0.0.1:50051", "SPLITWISE_SCHEDULER_LISTEN", "host:port the scheduler serves on")
    kv_transfer: str = option("direct", "SPLITWISE_KV_TRANSFER", "direct: prompt worker pushes KV to the token worker; relay: through kv_store")
    kv_store_address: str = option("127.0.0.1:50081", "SPLITWISE_KV_STORE_ADDRESS", "kv_store host:port (relay mode, and where KV is kept)")
    kv_keep: bool = option(True, "SPLITWISE_KV_KEEP", "direct mode: prompt workers also keep each prompt's KV in kv_store for its TTL, so a request whose token worker dies resumes elsewhere without a new prompt phase (relay mode always keeps it)")
    max_requests_in_flight: int = option(1024, "SPLITWISE_MAX_REQUESTS_IN_FLIGHT", "more requests at once are refused with RESOURCE_EXHAUSTED and a retry hint (grpc-retry-pushback-ms)")
    routing_policy: str = option("cls", "SPLITWISE_ROUTING_POLICY", "cls (JSQ on prompt tokens, least KV in use for tokens; the paper's), jsq, round_robin or random")
    conditional_prefill_max_tokens: int = option(256, "SPLITWISE_CONDITIONAL_PREFILL_MAX_TOKENS", "prompts this short are prefilled on their token worker when the prompt pool is busy (0: never)")
    prompt_pool_busy_tokens: int = option(4096, "SPLITWISE_PROMPT_POOL_BUSY_TOKENS", "the prompt pool is busy when every prompt worker has this many tokens pending")
    pool_borrow_prompt_tokens: int = option(8192, "SPLITWISE_POOL_BORROW_PROMPT_TOKENS", "mixed pool: when every prompt-pool worker has this many tokens pending, a token worker is borrowed into the mixed pool, and given back below half of it (0: no borrowing)")
    pool_borrow_kv_fraction: float = option(0.9, "SPLITWISE_POOL_BORROW_KV_FRACTION", "mixed pool: when every token-pool worker has this fraction of its KV memory in use, a prompt worker is borrowed, and given back below half of it")
    pool_cooldown_s: float = option(2.0, "SPLITWISE_POOL_COOLDOWN_S", "least time between two pool changes")
    kv_layerwise_min_tokens: int = option(512, "SPLITWISE_KV_LAYERWISE_MIN_TOKENS", "prompts this long or longer ship KV layer by layer during prefill; shorter ones after it (serialized)")
    registry_refresh_s: float = option(0.25, "SPLITWISE_REGISTRY_REFRESH_S", "how often the scheduler re-reads the registry")
    worker_calls: str = option("stream", "SPLITWISE_WORKER_CALLS", "stream: the Prefill and Decode calls to a worker go as frames of one long-lived WorkerCalls stream per worker (cheaper for the scheduler); rpc: one RPC each, as a worker whose registry entry does not offer WorkerCalls (an older one) always gets")
    public_tls: bool = option(False, "SPLITWISE_PUBLIC_TLS", "serve the public API over TLS with the scheduler's cluster certificate (clients verify it with the cluster CA, ca.pem in the TLS dir)")
    metrics_listen: str = option("127.0.0.1:9451", "SPLITWISE_METRICS_LISTEN", METRICS_LISTEN_HELP)


# Three worker options have a variable and a default of their role's: listen, kv_memory_bytes and metrics_listen.
# WorkerConfig has the token and mixed roles' (TokenWorkerConfig), PromptWorkerConfig the prompt role's; a
# config's class is its role's (WorkerConfig.for_role), and parse_worker_config reads the role before the rest.

@dataclass
class WorkerConfig(TelemetryOptions, SecurityOptions, AdvertiseOptions, RegistryOptions, KVOptions, EngineOptions,
                   ModelOptions):
    """A worker: runs the prompt phase (--role prompt), the token phase (token) or both (mixed) on one engine."""

    role: str = option("token", "SPLITWISE_WORKER_ROLE", ROLE_HELP, old_env="SPLITWISE_TOKEN_WORKER_ROLE")
    listen: str = option("127.0.0.1:50071", "SPLITWISE_TOKEN_WORKER_LISTEN", "host:port the token worker serves on")
    worker_id: str = option("", "SPLITWISE_WORKER_ID", "unique worker id (default: role-host-random)")
    kv_memory_bytes: int = option(1 << 30, "SPLITWISE_KV_MEMORY_BYTES", "KV cache budget of the token worker")
    metrics_listen: str = option("127.0.0.1:9471", "SPLITWISE_METRICS_LISTEN", METRICS_LISTEN_HELP)
    drain_grace_s: float = option(30.0, "SPLITWISE_DRAIN_GRACE_S", "on SIGTERM: stop taking requests, deregister, and give those in flight this long to finish")

    def __post_init__(self) -> None:
        # Refused rather than served: a prompt worker with a token worker's port and KV budget starts without a word.
        if (WorkerConfig.for_role(self.role) is PromptWorkerConfig) != isinstance(self, PromptWorkerConfig):
            raise ValueError(f"a {self.role} worker's config is WorkerConfig.for_role({self.role!r}), not "
                             f"{type(self).__name__}: its role decides the defaults of its listen address, metrics "
                             "endpoint and KV memory")

    @staticmethod
    def for_role(role: str) -> type[WorkerConfig]:
        """The config class of a role, whose defaults are that role's."""
        if role not in WORKER_ROLES:
            raise ValueError(f"worker role must be one of {', '.join(WORKER_ROLES)}, got {role!r}")
        return PromptWorkerConfig if role == "prompt" else TokenWorkerConfig


@dataclass
class PromptWorkerConfig(WorkerConfig):
    """A prompt worker: runs the prompt phase and ships the KV cache layer by layer."""

    role: str = option("prompt", "SPLITWISE_WORKER_ROLE", ROLE_HELP, old_env="SPLITWISE_TOKEN_WORKER_ROLE")
    listen: str = option("127.0.0.1:50061", "SPLITWISE_PROMPT_WORKER_LISTEN", "host:port the prompt worker serves on")
    kv_memory_bytes: int = option(512 << 20, "SPLITWISE_PROMPT_KV_MEMORY_BYTES", "KV cache budget of the prompt worker")
    metrics_listen: str = option("127.0.0.1:9461", "SPLITWISE_METRICS_LISTEN", METRICS_LISTEN_HELP)


@dataclass
class TokenWorkerConfig(WorkerConfig):
    """A token worker: receives a request's KV cache and runs the token phase (a mixed one runs both phases)."""


def parse_worker_config(argv: Sequence[str] | None = None) -> WorkerConfig:
    """The role first (--role, else its variable, else token), then the rest with the defaults of the role's class."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_arguments(parser, WorkerConfig, ["role"])
    role = parser.parse_known_args(argv)[0].role
    return parse_config(WorkerConfig.for_role(role), argv)


@dataclass
class KVStoreConfig(TelemetryOptions, SecurityOptions, AdvertiseOptions, KVProgressOptions, RedisOptions):
    """The kv_store: relays and keeps KV transfers by request id, listed in a KV index in Redis."""

    listen: str = option("127.0.0.1:50081", "SPLITWISE_KV_STORE_LISTEN", "host:port the kv_store serves on")
    ttl_s: float = option(300.0, "SPLITWISE_KV_STORE_TTL_S", "how long a stored transfer is kept")
    max_bytes: int = option(4 << 30, "SPLITWISE_KV_STORE_MAX_BYTES", "refuse new transfers beyond this many bytes held")
    get_wait_s: float = option(30.0, "SPLITWISE_KV_STORE_GET_WAIT_S", "default wait for a transfer that has not arrived")
    metrics_listen: str = option("127.0.0.1:9481", "SPLITWISE_METRICS_LISTEN", METRICS_LISTEN_HELP)


@dataclass
class GatewayConfig(TelemetryOptions, PublicApiOptions, InsecureOptions, ModelOptions):
    """The OpenAI-compatible HTTP gateway: /v1/chat/completions, /v1/completions and /v1/models in front of the
    scheduler's gRPC API."""

    listen: str = option("127.0.0.1:8000", "SPLITWISE_GATEWAY_LISTEN", "host:port the HTTP gateway serves on")
    schedulers: str = option("127.0.0.1:50051", "SPLITWISE_GATEWAY_SCHEDULERS", "the scheduler replicas' host:port, comma-separated: the gateway fails over between them")
    tls_ca: str = option("", "SPLITWISE_TLS_CA", "gateway: the CA (PEM) of schedulers that serve the public API over TLS (--public-tls); empty: plaintext")
    chat_max_tokens: int = option(2048, "SPLITWISE_GATEWAY_CHAT_MAX_TOKENS", "a chat completion that sets no max_tokens generates up to this many, fewer where the context window ends first (a token worker reserves KV for them at admission); completions default to 16, as OpenAI's")
    max_body_bytes: int = option(8 << 20, "SPLITWISE_GATEWAY_MAX_BODY_BYTES", "a request body over this many bytes is refused with 413 before it is read")


def cache_dir_of(config) -> Path | None:
    return Path(config.cache_dir) if config.cache_dir else None


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


if __name__ == "__main__":  # prints the README's configuration table
    print(config_table(SchedulerConfig, PromptWorkerConfig, TokenWorkerConfig, KVStoreConfig, GatewayConfig))
