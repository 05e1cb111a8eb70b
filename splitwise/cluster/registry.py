"""The worker registry in Redis: each worker keeps a key with a TTL alive by heartbeats; a dead worker's key expires.

A Redis that restarts empty loses nothing for good: the heartbeats fill it again within an interval, and a
reader meanwhile goes on listing the workers it saw before, so that routing never sees an empty cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import redis.asyncio as redis

from splitwise.cluster.aio import keeps_cancellation

log = logging.getLogger(__name__)

KEY_PREFIX = "splitwise:worker:"
REDIS_TIMEOUT_S = 2.0  # a Redis that does not answer within this long counts as down


def connect(redis_url: str) -> redis.Redis:
    """A client for the registry whose calls fail after REDIS_TIMEOUT_S: a Redis whose host vanished without a
    connection reset would otherwise hold a heartbeat or a registry read until TCP gives up, many minutes later."""
    return redis.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)


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
    """Workers announce themselves here; the scheduler lists them. ttl_s: how long an announcement lasts, and how
    long a reader goes on listing the workers it saw before Redis restarted, while they announce again."""

    def __init__(self, client: redis.Redis, ttl_s: float = 3.0):
        self.client = client
        self.ttl_s = ttl_s
        self._redis_run_id = ""  # which Redis process answered the last read
        self._listed: list[WorkerInfo] = []
        self._bridged: dict[str, WorkerInfo] = {}  # listed before a Redis restart, not announced since
        self._bridged_until = 0.0  # monotonic seconds

    @keeps_cancellation
    async def announce(self, info: WorkerInfo) -> None:
        info = replace(info, heartbeat_at=time.time())
        await self.client.set(KEY_PREFIX + info.worker_id, json.dumps(asdict(info)), px=int(self.ttl_s * 1000))

    async def remove(self, worker_id: str) -> None:
        await self.client.delete(KEY_PREFIX + worker_id)

    async def workers(self, role: str | None = None) -> list[WorkerInfo]:
        found = await self._read()
        run_id = (await self.client.info("server")).get("run_id", "")
        now = time.monotonic()
        if self._redis_run_id and run_id != self._redis_run_id:
            log.warning("Redis restarted: listing the %d workers seen before for %.1fs while they register again",
                        len(self._listed), self.ttl_s)
            self._bridged = {w.worker_id: w for w in self._listed}
            self._bridged_until = now + self.ttl_s
        self._redis_run_id = run_id
        for w in found:
            self._bridged.pop(w.worker_id, None)
        if now < self._bridged_until:
            found += self._bridged.values()
        self._listed = found
        return sorted((w for w in found if role is None or w.role == role), key=lambda w: w.worker_id)

    async def _read(self) -> list[WorkerInfo]:
        keys = [key async for key in self.client.scan_iter(match=KEY_PREFIX + "*", count=500)]
        if not keys:
            return []
        entries = (_parse(key, raw) for key, raw in zip(keys, await self.client.mget(keys)) if raw is not None)
        return [info for info in entries if info is not None]


WORKER_FIELDS = frozenset(f.name for f in fields(WorkerInfo))


def _parse(key: bytes, raw: bytes) -> WorkerInfo | None:
    """The entry as a WorkerInfo, leaving out fields this version does not know; None, logged, if it is not one:
    one bad entry must not keep the scheduler from reading the others."""
    try:
        entry = json.loads(raw)
        return WorkerInfo(**{name: value for name, value in entry.items() if name in WORKER_FIELDS})
    except (ValueError, TypeError, AttributeError) as e:
        log.warning("registry entry %r is not a worker: %s", key, e)
        return None


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
            except Exception:  # a heartbeat that stops silently would drop a live worker from the registry
                log.exception("heartbeat failed")

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
