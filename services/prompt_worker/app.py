"""Prompt worker process: config -> engine -> gRPC server, registered in Redis."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.prompt_worker.server import PromptWorkerServicer
from services.token_worker.server import TokenWorkerServicer
from splitwise.channels import ChannelPool
from splitwise.cluster.known_peers import KnownPeers
from splitwise.cluster.registry import Heartbeat
from splitwise.config import PromptWorkerConfig, parse_config
from splitwise.rpc.v1 import worker_pb2, worker_pb2_grpc
from splitwise.security.tls import cluster_tls, internal_server_security
from splitwise.server import GrpcService, bound_address, run_service, start_server, wait_for_termination
from splitwise.telemetry.logs import setup_logging
from splitwise.telemetry.metrics import setup_metrics
from splitwise.telemetry.tracing import setup_tracing
from splitwise.worker import drain, engine_gauges, load_engine, start_heartbeat, start_kv_transports, worker_id_of

SERVICE = "prompt_worker"


@dataclass
class PromptWorker:
    service: GrpcService
    servicer: PromptWorkerServicer
    heartbeat: Heartbeat
    channels: ChannelPool
    address: str
    token_servicer: TokenWorkerServicer  # decodes too while the scheduler has lent it to the mixed pool

    async def stop(self, grace_s: float = 5.0) -> None:
        """Graceful: refuse new prompts, leave the registry, let those in flight finish (KV shipped), then stop."""
        self.servicer.draining = self.token_servicer.draining = True
        await self.service.health.enter_graceful_shutdown()  # health checks say NOT_SERVING from now on
        await self.heartbeat.stop()
        await drain(self.servicer.engine, grace_s, self.token_servicer.receivers)
        await self.service.stop(1.0)
        await self.channels.close()
        self.servicer.transports.close()  # pooled staging segments go
        self.servicer.engine.stop()


async def start(config: PromptWorkerConfig) -> PromptWorker:
    loaded = await asyncio.to_thread(load_engine, config)
    tls = cluster_tls(config.tls_dir, config.insecure, "prompt_worker")
    channels = ChannelPool(config.grpc_keepalive_s, tls)
    servicer = PromptWorkerServicer(loaded.engine, loaded.layout, channels, config.kv_chunk_bytes,
                                    config.kv_progress_timeout_s)
    # The same engine can run the token phase: the scheduler routes decodes here only while it has borrowed
    # this worker into the mixed pool.
    token_servicer = TokenWorkerServicer(loaded.engine, loaded.layout, channels, config.kv_wait_timeout_s,
                                         config.kv_progress_timeout_s)
    worker_id = worker_id_of(config, "prompt")
    service = await start_server(
        config.listen,
        [(worker_pb2_grpc.add_PromptWorkerServicer_to_server, servicer),
         (worker_pb2_grpc.add_TokenWorkerServicer_to_server, token_servicer)],
        [worker_pb2.DESCRIPTOR.services_by_name[name].full_name for name in ("PromptWorker", "TokenWorker")],
        config.metrics_listen, engine_gauges(loaded.engine, worker_id, "prompt"), **internal_server_security(tls),
    )
    address = config.advertise or bound_address(config.listen, service.port)
    transports = await asyncio.to_thread(start_kv_transports, config, address)
    servicer.transports = token_servicer.transports = transports
    heartbeat = start_heartbeat(config, worker_id, "prompt", address, loaded.engine, transports)
    try:
        await heartbeat.start()
    except ConnectionError:
        await service.stop(0)
        raise
    servicer.known_peers = KnownPeers(heartbeat.registry)
    return PromptWorker(service, servicer, heartbeat, channels, address, token_servicer)


async def serve(config: PromptWorkerConfig) -> None:
    worker = await start(config)
    print(f"{SERVICE} {worker.heartbeat.describe().worker_id} serving on {worker.address}", flush=True)
    await wait_for_termination()
    await worker.stop(config.drain_grace_s)


def main(argv=None) -> None:
    config = parse_config(PromptWorkerConfig, argv)
    setup_logging(SERVICE, config.log_level, config.log_format)
    setup_tracing(SERVICE, config.trace_file or None)
    setup_metrics(SERVICE)
    run_service(SERVICE, lambda: serve(config))
