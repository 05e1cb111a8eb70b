"""Starts the four services inside the test process, each on its own loopback port."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from services.kv_store import app as kv_store_app
from services.scheduler import app as scheduler_app
from services.worker import app as worker_app
from splitwise.client import SplitwiseClient
from splitwise.config import KVStoreConfig, PromptWorkerConfig, SchedulerConfig, TokenWorkerConfig
from tests import security


METRICS_LISTEN = "127.0.0.1:0"  # every service serves /metrics on a free port


@dataclass
class LocalCluster:
    scheduler: object
    prompt_worker: object
    token_worker: object
    kv_store: object

    @property
    def address(self) -> str:
        return self.scheduler.address


STEADY_REGISTRY_TTL_S = 15.0


@asynccontextmanager
async def local_cluster(redis_url: str, model: str, cache_dir: Path, kv_transfer: str = "direct",
                        prompt_worker: bool = True, scheduler_overrides: dict | None = None,
                        prompt_overrides: dict | None = None, kv_store_overrides: dict | None = None,
                        **token_overrides):
    """prompt_worker=False with role="mixed" in token_overrides: one mixed worker runs both phases."""
    tls = str(security.tls_dir())
    common = dict(model=model, cache_dir=str(cache_dir), redis_url=redis_url, metrics_listen=METRICS_LISTEN,
                  tls_dir=tls)
    # Every service shares the test's process and event loop: on a loaded machine a heartbeat can be seconds late,
    # and a worker dropped from the registry fails requests that have nothing to do with it.
    steady = {"registry_ttl_s": STEADY_REGISTRY_TTL_S}
    prompt_overrides = {**steady, **(prompt_overrides or {})}
    token_overrides = {**steady, **token_overrides}
    kv_store = await kv_store_app.start(KVStoreConfig(**{"listen": "127.0.0.1:0", "metrics_listen": METRICS_LISTEN,
                                                         "redis_url": redis_url, "tls_dir": tls,
                                                         **(kv_store_overrides or {})}))
    prompt = None
    if prompt_worker:
        prompt = await worker_app.start(PromptWorkerConfig(listen="127.0.0.1:0", device="cpu", **common,
                                                           **(prompt_overrides or {})))
    token = await worker_app.start(TokenWorkerConfig(listen="127.0.0.1:0", device="cpu", **common, **token_overrides))
    scheduler = await scheduler_app.start(
        SchedulerConfig(listen="127.0.0.1:0", kv_transfer=kv_transfer, kv_store_address=kv_store.address, **common,
                        **{"api_key": security.API_KEY, "admin_key": security.ADMIN_KEY, **(scheduler_overrides or {})})
    )
    try:
        yield LocalCluster(scheduler, prompt, token, kv_store)
    finally:
        for service in (scheduler, prompt, token, kv_store):
            if service is not None:
                await service.stop(grace_s=1.0)


def assert_all_blocks_free(engine) -> None:
    assert engine.blocks.num_free == engine.blocks.num_blocks, f"{engine.blocks.num_used} KV blocks still held"
    assert engine.num_requests == 0


async def assert_no_kv_held(cluster, within_s: float = 1.0) -> None:
    """Every worker's KV blocks are free again (within a second: cancellation crosses processes)."""
    engines = [w.servicer.engine for w in (cluster.prompt_worker, cluster.token_worker) if w is not None]
    receivers = cluster.token_worker.servicer.receivers
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while any(e.blocks.num_used or e.num_requests for e in engines) or receivers:
        if loop.time() > deadline:
            for engine in engines:
                assert_all_blocks_free(engine)
            assert not receivers, f"{len(receivers)} KV receivers still open"
        await asyncio.sleep(0.02)


async def wait_for_workers(cluster, count: int = 2, idle: bool = False) -> None:
    """Until the scheduler sees `count` registered workers (at most 5 s); with idle, until their heartbeats as the
    scheduler last read them also report no work (a heartbeat written mid-request makes a worker look busy for up
    to an interval, and a test that counts on the routing policy's tie-break would route elsewhere)."""
    async with SplitwiseClient(cluster.address) as c:
        for _ in range(100):
            workers = (await c.cluster_status()).workers
            if len(workers) >= count and not (idle and any(w.pending_tokens or w.active_requests for w in workers)):
                return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{count} {'idle ' if idle else ''}workers did not register")
