"""kv_store process: the KV relay and store, listing what it holds in the KV index in Redis."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as redis

from services.kv_store.server import KVStoreServicer
from splitwise.cluster.kv_index import KVIndex
from splitwise.config import KVStoreConfig, parse_config
from splitwise.rpc.v1 import kv_store_pb2, kv_store_pb2_grpc
from splitwise.security.tls import cluster_tls, internal_server_security
from splitwise.server import GrpcService, bound_address, run_service, start_server, wait_for_termination
from splitwise.telemetry.logs import setup_logging
from splitwise.telemetry.metrics import setup_metrics
from splitwise.telemetry.tracing import setup_tracing

SERVICE = "kv_store"
INDEX_TIMEOUT_S = 1.0  # a slow Redis must not hold up a KV transfer for long: the index is advisory


@dataclass
class KVStore:
    service: GrpcService
    servicer: KVStoreServicer
    expiry: asyncio.Task
    redis_client: redis.Redis
    address: str

    async def stop(self, grace_s: float = 5.0) -> None:
        self.expiry.cancel()
        await asyncio.gather(self.expiry, return_exceptions=True)
        await self.service.stop(grace_s)
        await self.servicer.forget_all()
        await self.redis_client.aclose()


async def start(config: KVStoreConfig) -> KVStore:
    tls = cluster_tls(config.tls_dir, config.insecure, "kv_store")
    client = redis.Redis.from_url(config.redis_url, socket_timeout=INDEX_TIMEOUT_S,
                                  socket_connect_timeout=INDEX_TIMEOUT_S)
    servicer = KVStoreServicer(config.ttl_s, config.max_bytes, config.get_wait_s, KVIndex(client),
                               progress_timeout_s=config.kv_progress_timeout_s)
    service = await start_server(
        config.listen,
        [(kv_store_pb2_grpc.add_KVStoreServicer_to_server, servicer)],
        [kv_store_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name],
        config.metrics_listen, servicer.gauges, **internal_server_security(tls),
    )
    servicer.address = config.advertise or bound_address(config.listen, service.port)
    expiry = asyncio.create_task(servicer.expire_forever())
    return KVStore(service, servicer, expiry, client, servicer.address)


async def serve(config: KVStoreConfig) -> None:
    store = await start(config)
    print(f"{SERVICE} serving on {store.address}", flush=True)
    await wait_for_termination()
    await store.stop()


def main(argv=None) -> None:
    config = parse_config(KVStoreConfig, argv)
    setup_logging(SERVICE, config.log_level, config.log_format)
    setup_tracing(SERVICE, config.trace_file or None)
    setup_metrics(SERVICE)
    run_service(SERVICE, lambda: serve(config))
