"""Starts the four services inside the test process, each on its own loopback port."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from services.kv_store import app as kv_store_app
from services.prompt_worker import app as prompt_app
from services.scheduler import app as scheduler_app
from services.token_worker import app as token_app
from splitwise.config import KVStoreConfig, PromptWorkerConfig, SchedulerConfig, TokenWorkerConfig


@dataclass
class LocalCluster:
    scheduler: object
    prompt_worker: object
    token_worker: object
    kv_store: object

    @property
    def address(self) -> str:
        return self.scheduler.address


@asynccontextmanager
async def local_cluster(redis_url: str, model: str, cache_dir: Path, kv_transfer: str = "direct", **token_overrides):
    common = dict(model=model, cache_dir=str(cache_dir), redis_url=redis_url)
    kv_store = await kv_store_app.start(KVStoreConfig(listen="127.0.0.1:0"))
    prompt = await prompt_app.start(PromptWorkerConfig(listen="127.0.0.1:0", device="cpu", **common))
    token = await token_app.start(TokenWorkerConfig(listen="127.0.0.1:0", device="cpu", **common, **token_overrides))
    scheduler = await scheduler_app.start(
        SchedulerConfig(listen="127.0.0.1:0", kv_transfer=kv_transfer, kv_store_address=kv_store.address, **common)
    )
    try:
        yield LocalCluster(scheduler, prompt, token, kv_store)
    finally:
        for service in (scheduler, prompt, token, kv_store):
            await service.stop(grace_s=1.0)
