"""Runs a grpc.aio server with standard health checking and reflection, and stops it gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from splitwise.rpc.options import MAX_MESSAGE_BYTES, server_options
from splitwise.telemetry.metrics import GaugeSource, MetricsEndpoint, add_gauge_source, serve_metrics
from splitwise.telemetry.tracing import server_interceptors

log = logging.getLogger(__name__)

class GrpcService:
    """A started server: its bound port, its health servicer, its metrics endpoint, and a way to stop them."""

    def __init__(self, server: grpc.aio.Server, health: HealthServicer, port: int, service_names: list[str],
                 metrics: MetricsEndpoint | None = None, remove_gauges: Callable[[], None] | None = None):
        self.server = server
        self.health = health
        self.port = port
        self.service_names = service_names
        self.metrics = metrics
        self.remove_gauges = remove_gauges

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        if self.remove_gauges:
            self.remove_gauges()
        if self.metrics:
            self.metrics.close()


async def start_server(
    listen: str,
    servicers: Iterable[tuple[Callable, object]],
    service_names: Iterable[str],
    metrics_listen: str = "off",
    gauges: GaugeSource | None = None,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> GrpcService:
    """Starts serving `servicers` ((add_to_server, servicer) pairs) on `listen`; port 0 picks a free one.
    Also serves Prometheus metrics on `metrics_listen`, where `gauges` reports this service's state.
    With `credentials` the port serves TLS; `interceptors` (authentication) run before the tracing one, so a
    refused call makes no span. A message bigger than max_message_bytes is refused by gRPC (RESOURCE_EXHAUSTED)."""
    server = grpc.aio.server(options=server_options(max_message_bytes),
                             interceptors=[*interceptors, *server_interceptors()])
    for add_to_server, servicer in servicers:
        add_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = list(service_names)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*names, health_name, reflection.SERVICE_NAME], server)
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    try:
        metrics = serve_metrics(metrics_listen)
    except OSError:
        await server.stop(0)
        raise
    for name in ["", *names]:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcService(server, health, port, names, metrics, add_gauge_source(gauges) if gauges else None)


def bound_address(listen: str, port: int) -> str:
    """The address peers use to reach a server listening on `listen` (on all interfaces: this host's IP)."""
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"{host}:{port}"


async def wait_for_termination() -> None:
    """Returns when the process receives SIGTERM or SIGINT."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("termination signal received: draining")


def run_service(name: str, serve: Callable[[], Awaitable[None]]) -> None:
    """Runs a service's main coroutine; a startup failure is one clear log line and exit code 1."""
    from splitwise.launcher import die_with_launcher

    die_with_launcher()
    try:
        asyncio.run(serve())
    except (ConnectionError, OSError, ValueError) as e:
        log.error("%s cannot start: %s", name, e)
        sys.exit(1)
