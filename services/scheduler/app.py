"""Scheduler process: tokenizer and registry view -> gRPC front door."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import redis

from grpc_health.v1 import health_pb2

from services.scheduler.cluster_view import ClusterView
from services.scheduler.dispatch import Dispatcher, KVSettings
from services.scheduler.server import SchedulerServicer
from services.scheduler.validation import MAX_MESSAGE_BYTES, ModelInfo, longest_token_bytes
from splitwise.channels import ChannelPool
from splitwise.cluster.journal import RequestJournal
from splitwise.cluster.kv_index import KVIndex
from splitwise.cluster.pools import PoolPolicy, PoolStore
from splitwise.cluster.registry import WorkerRegistry, connect
from splitwise.cluster.routing import ConditionalDisaggregation
from splitwise.config import SchedulerConfig, cache_dir_of, parse_config
from splitwise.model.mock import MOCK_CONTEXT_TOKENS, is_mock, mock_tokenizer, served_model_name
from splitwise.model.weights import eos_token_ids, load_tokenizer, read_hf_config, resolve_model
from splitwise.rpc.v1 import scheduler_pb2, scheduler_pb2_grpc
from splitwise.security.keys import load_cluster_key
from splitwise.security.peers import ApiKeyInterceptor, check_public_key
from splitwise.security.tls import cluster_tls
from splitwise.server import GrpcService, bound_address, run_service, start_server, wait_for_termination
from splitwise.telemetry.logs import setup_logging
from splitwise.telemetry.metrics import setup_metrics
from splitwise.telemetry.tracing import setup_tracing

SERVICE = "scheduler"
log = logging.getLogger(__name__)
# An open journal entry outlives its request's deadline by this much (then a dead replica's entries expire).
JOURNAL_SLACK_S = 60.0


@dataclass
class Scheduler:
    service: GrpcService
    servicer: SchedulerServicer
    refresher: asyncio.Task
    channels: ChannelPool
    address: str

    async def stop(self, grace_s: float = 5.0) -> None:
        self.refresher.cancel()
        # Bounded: on Python 3.11 a cancellation landing as a Redis call completes can be lost in redis-py.
        await asyncio.wait({self.refresher}, timeout=2.0)
        await self.service.stop(grace_s)
        await self.channels.close()


def load_model_info(config: SchedulerConfig) -> ModelInfo:
    name = served_model_name(config)
    if is_mock(name):
        tokenizer = mock_tokenizer()
        return ModelInfo(name, tokenizer, MOCK_CONTEXT_TOKENS, len(tokenizer), frozenset([tokenizer.eos_token_id]),
                         longest_token_bytes(tokenizer))
    name, folder = resolve_model(config.model, cache_dir_of(config))
    hf = read_hf_config(folder)
    tokenizer = load_tokenizer(folder)
    return ModelInfo(name, tokenizer, hf["max_position_embeddings"], hf["vocab_size"],
                     frozenset(eos_token_ids(hf, folder)), longest_token_bytes(tokenizer))


def check_public_access(config: SchedulerConfig) -> None:
    if config.public_tls and not config.tls_dir:
        raise ValueError("--public-tls serves the scheduler's cluster certificate: it needs --tls-dir")
    check_public_key("scheduler", config.listen, config.api_key, config.insecure)


async def start(config: SchedulerConfig) -> Scheduler:
    tls = cluster_tls(config.tls_dir, config.insecure, "scheduler")
    check_public_access(config)
    model = await asyncio.to_thread(load_model_info, config)
    client = connect(config.redis_url)
    registry = WorkerRegistry(client, load_cluster_key(config.tls_dir))  # lists only entries signed with it
    channels = ChannelPool(config.grpc_keepalive_s, tls, traced=False)  # the dispatcher traces its calls itself
    replica = f"scheduler-{socket.gethostname()}-{os.getpid()}"
    journal = RequestJournal(client, replica, config.request_timeout_s + JOURNAL_SLACK_S)
    view = ClusterView(model.name, registry, config.routing_policy,
                       ConditionalDisaggregation(config.conditional_prefill_max_tokens, config.prompt_pool_busy_tokens),
                       PoolStore(client, replica),
                       PoolPolicy(config.pool_borrow_prompt_tokens, config.pool_borrow_kv_fraction,
                                  config.pool_cooldown_s))
    kv = KVSettings(config.kv_transfer, config.kv_store_address, config.kv_keep, config.kv_layerwise_min_tokens)
    dispatcher = Dispatcher(view, channels, kv, journal, KVIndex(client), config.worker_calls)
    servicer = SchedulerServicer(model, view, dispatcher, config.request_timeout_s, config.max_requests_in_flight,
                                 journal, cluster_key=load_cluster_key(config.tls_dir))
    try:
        await view.refresh()
    except (redis.ResponseError, ValueError, TypeError) as e:  # bad state in Redis; an unreachable Redis fails start
        log.error("the first read of the registry and pools failed (%s); starting with an empty view, which the "
                  "refresher retries", e)
    name = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
    service = await start_server(
        config.listen,
        [(scheduler_pb2_grpc.add_SchedulerServicer_to_server, servicer)],
        [name],
        config.metrics_listen, view.gauges,
        max_message_bytes=MAX_MESSAGE_BYTES,
        credentials=tls.server_credentials(require_client_auth=False) if tls and config.public_tls else None,
        interceptors=[ApiKeyInterceptor(config.api_key, config.admin_key, open_admin=config.insecure)],
    )

    async def report_staleness(stale: bool) -> None:
        # The Scheduler service says NOT_SERVING while this replica's view of the workers is stale: a load balancer
        # checking it sends clients to a replica that sees the cluster. The process itself ("") stays SERVING.
        await service.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING if stale
                                 else health_pb2.HealthCheckResponse.SERVING)

    refresher = asyncio.create_task(view.refresh_forever(config.registry_refresh_s, report_staleness))
    return Scheduler(service, servicer, refresher, channels, bound_address(config.listen, service.port))


async def serve(config: SchedulerConfig) -> None:
    scheduler = await start(config)
    print(f"{SERVICE} serving on {scheduler.address}", flush=True)
    await wait_for_termination()
    await scheduler.stop()


def main(argv=None) -> None:
    config = parse_config(SchedulerConfig, argv)
    setup_logging(SERVICE, config.log_level, config.log_format)
    setup_tracing(SERVICE, config.trace_file or None)
    setup_metrics(SERVICE)
    run_service(SERVICE, lambda: serve(config))
