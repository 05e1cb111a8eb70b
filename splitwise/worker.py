"""What both worker roles share: loading the engine and keeping the worker's registry entry alive."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import redis.asyncio as redis

from splitwise.cluster.registry import Heartbeat, WorkerInfo, WorkerRegistry
from splitwise.config import cache_dir_of, default_worker_id, resolve_device
from splitwise.engine.runner import ModelRunner
from splitwise.kv.layout import KVLayout
from splitwise.model.weights import load_model

log = logging.getLogger(__name__)


@dataclass
class Engine:
    runner: ModelRunner
    layout: KVLayout


def load_engine(config) -> Engine:
    device = resolve_device(config.device)
    start = time.perf_counter()
    loaded = load_model(config.model, device=device, dtype=config.dtype, cache_dir=cache_dir_of(config))
    log.info("loaded %s on %s (%s) in %.1fs", loaded.name, device, config.dtype, time.perf_counter() - start)
    runner = ModelRunner(loaded, device, config.num_threads or None)
    return Engine(runner, KVLayout.of(loaded.config, runner.dtype, loaded.fingerprint))


def start_heartbeat(config, role: str, address: str, engine: Engine, load: Callable[[], dict]) -> Heartbeat:
    """A heartbeat announcing this worker with its current load (a dict of WorkerInfo's load fields)."""
    worker_id = config.worker_id or default_worker_id(role)
    registry = WorkerRegistry(redis.Redis.from_url(config.redis_url), ttl_s=config.registry_ttl_s)
    loaded = engine.runner.loaded

    def describe() -> WorkerInfo:
        return WorkerInfo(worker_id, role, address, loaded.name, loaded.fingerprint, **load())

    return Heartbeat(registry, describe, config.heartbeat_s)
