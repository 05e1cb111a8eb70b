"""The worker registry in Redis: each worker keeps a key with a TTL alive by heartbeats; a dead worker's key expires."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import redis.asyncio as redis

log = logging.getLogger(__name__)

KEY_PREFIX = "splitwise:worker:"


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str  # "prompt" or "token"
    address: str
    model: str
    model_fingerprint: str
    pending_tokens: int = 0
    active_requests: int = 0
    kv_capacity_tokens: int = 0
    kv_used_tokens: int = 0
    heartbeat_at: float = 0.0  # unix seconds
    kv_transports: str = "grpc"  # comma-separated, as WorkerTransports offers them
    host_id: str = ""  # workers with one host id can share memory


class WorkerRegistry:
    def __init__(self, client: redis.Redis, ttl_s: float = 3.0):
        self.client = client
        self.ttl_s = ttl_s

    async def announce(self, info: WorkerInfo) -> None:
        info = replace(info, heartbeat_at=time.time())
        await self.client.set(KEY_PREFIX + info.worker_id, json.dumps(asdict(info)), px=int(self.ttl_s * 1000))

    async def remove(self, worker_id: str) -> None:
        await self.client.delete(KEY_PREFIX + worker_id)

    async def workers(self, role: str | None = None) -> list[WorkerInfo]:
        keys = [key async for key in self.client.scan_iter(match=KEY_PREFIX + "*", count=500)]
        if not keys:
            return []
        found = [WorkerInfo(**json.loads(raw)) for raw in await self.client.mget(keys) if raw is not None]
        return sorted((w for w in found if role is None or w.role == role), key=lambda w: w.worker_id)


class Heartbeat:
    """Announces a worker every interval with fresh load numbers until stopped; survives Redis outages."""

    def __init__(self, registry: WorkerRegistry, describe: Callable[[], WorkerInfo], interval_s: float = 1.0):
        self.registry = registry
        self.describe = describe
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        try:  # fail fast, and clearly, if Redis is unreachable at start
            await self.registry.announce(self.describe())
        except (redis.RedisError, OSError) as e:
            raise ConnectionError(f"cannot register in Redis: {e}") from e
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.registry.announce(self.describe())
            except (redis.RedisError, OSError) as e:
                log.warning("heartbeat to Redis failed: %s", e)

    async def stop(self, deregister: bool = True, timeout_s: float = 2.0) -> None:
        if self._task:
            self._task.cancel()
            # Bounded: on Python 3.11 a cancellation that lands as a Redis call completes can be lost inside
            # redis-py's wait_for, and the task would go on beating.
            await asyncio.wait({self._task}, timeout=timeout_s)
        if deregister:
            try:
                await asyncio.wait_for(self.registry.remove(self.describe().worker_id), timeout_s)
            except (redis.RedisError, OSError, asyncio.TimeoutError) as e:
                log.warning("could not deregister: %s", e or "timed out")
