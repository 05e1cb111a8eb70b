"""Worker process: config -> engine -> one gRPC server with both phases' servicers, registered in Redis."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.worker.prompt_servicer import PromptWorkerServicer
from services.worker.token_servicer import TokenWorkerServicer
from splitwise.channels import ChannelPool
from splitwise.cluster.known_peers import KnownPeers
from splitwise.cluster.registry import Heartbeat
from splitwise.config import WorkerConfig, parse_worker_config
from splitwise.rpc.calls import serve_calls
from splitwise.rpc.v1 import worker_pb2, worker_pb2_grpc
from splitwise.security.tls import cluster_tls, internal_server_security
from splitwise.server import GrpcService, bound_address, run_service, start_server, wait_for_termination
from splitwise.telemetry.logs import setup_logging
from splitwise.telemetry.metrics import setup_metrics
from splitwise.telemetry.tracing import setup_tracing
from splitwise.worker import drain, engine_gauges, load_engine, start_heartbeat, start_kv_transports, worker_id_of

# Each role's service name in logs, traces and metrics, and the cluster certificate it presents (`splitwise certs`
# makes one per name): a mixed worker is a token worker that runs its own prompts too.
SERVICE_NAMES = {"prompt": "prompt_worker", "token": "token_worker", "mixed": "token_worker"}


class WorkerCallsServicer(worker_pb2_grpc.WorkerCallsServicer):
    """The scheduler's Prefill and Decode calls as frames of one stream (splitwise/rpc/calls.py), served by the
    same servicer methods as the RPCs."""

    def __init__(self, prompt: PromptWorkerServicer, token: TokenWorkerServicer):
        self.handlers = {"prefill": prompt.Prefill, "decode": token.Decode}

    async def Calls(self, request_iterator, context):
        async for message in serve_calls(request_iterator, context, self.handlers):
            yield message


@dataclass
class Worker:
    role: str
    service: GrpcService
    prompt: PromptWorkerServicer
    token: TokenWorkerServicer
    heartbeat: Heartbeat
    channels: ChannelPool
    address: str

    @property
    def servicer(self) -> PromptWorkerServicer | TokenWorkerServicer:
        """The servicer of the role's phase (a mixed worker's: the token phase's, which receives KV)."""
        return self.prompt if self.role == "prompt" else self.token

    async def stop(self, grace_s: float = 5.0) -> None:
        """Graceful: refuse new requests, leave the registry, let those in flight finish (their KV shipped or
        received), then stop."""
        self.prompt.draining = self.token.draining = True
        await self.service.health.enter_graceful_shutdown()  # health checks say NOT_SERVING from now on
        await self.heartbeat.stop()
        await drain(self.token.engine, grace_s, self.token.receivers)
        await self.service.stop(1.0)
        await self.channels.close()
        self.token.transports.close()  # pooled staging segments go
        self.token.engine.stop()


async def start(config: WorkerConfig) -> Worker:
    loaded = await asyncio.to_thread(load_engine, config)
    tls = cluster_tls(config.tls_dir, config.insecure, SERVICE_NAMES[config.role])
    channels = ChannelPool(config.grpc_keepalive_s, tls)
    # Every role serves both phases on its one engine: a mixed worker always, a prompt or token worker while the
    # scheduler has lent it to the mixed pool.
    prompt = PromptWorkerServicer(loaded.engine, loaded.layout, channels, config.kv_chunk_bytes,
                                  config.kv_progress_timeout_s)
    token = TokenWorkerServicer(loaded.engine, loaded.layout, channels, config.kv_wait_timeout_s,
                                config.kv_progress_timeout_s)
    worker_id = worker_id_of(config, config.role)
    service = await start_server(
        config.listen,
        [(worker_pb2_grpc.add_PromptWorkerServicer_to_server, prompt),
         (worker_pb2_grpc.add_TokenWorkerServicer_to_server, token),
         (worker_pb2_grpc.add_WorkerCallsServicer_to_server, WorkerCallsServicer(prompt, token))],
        [worker_pb2.DESCRIPTOR.services_by_name[name].full_name
         for name in ("PromptWorker", "TokenWorker", "WorkerCalls")],
        config.metrics_listen, engine_gauges(loaded.engine, worker_id, config.role), **internal_server_security(tls),
    )
    address = config.advertise or bound_address(config.listen, service.port)
    transports = await asyncio.to_thread(start_kv_transports, config, address)
    prompt.transports = token.transports = transports
    heartbeat = start_heartbeat(config, worker_id, config.role, address, loaded.engine, transports)
    try:
        await heartbeat.start()
    except ConnectionError:
        await service.stop(0)
        raise
    prompt.known_peers = KnownPeers(heartbeat.registry)
    return Worker(config.role, service, prompt, token, heartbeat, channels, address)


async def serve(config: WorkerConfig) -> None:
    worker = await start(config)
    name = SERVICE_NAMES[config.role]
    print(f"{name} {worker.heartbeat.describe().worker_id} serving on {worker.address}", flush=True)
    await wait_for_termination()
    await worker.stop(config.drain_grace_s)


def main(argv=None) -> None:
    config = parse_worker_config(argv)
    name = SERVICE_NAMES[config.role]
    setup_logging(name, config.log_level, config.log_format)
    setup_tracing(name, config.trace_file or None)
    setup_metrics(name)
    run_service(name, lambda: serve(config))
