"""The addresses a worker may send KV to: those of workers registered (with a signed entry) in the registry."""

from __future__ import annotations

import asyncio
import logging
import time

import redis

from splitwise.cluster.registry import WorkerRegistry

log = logging.getLogger(__name__)
MAX_AGE_S = 1.0  # a worker that registered this recently may be missing from the cached list: read again


class KnownPeers:
    def __init__(self, registry: WorkerRegistry, max_age_s: float = MAX_AGE_S):
        self.registry = registry
        self.max_age_s = max_age_s
        self._addresses: set[str] = set()
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        try:
            workers = await self.registry.workers()
        except (redis.RedisError, OSError) as e:  # Redis away: go on with the workers read last
            log.warning("cannot read the registry to check a KV target: %s", e)
            return
        self._addresses = {w.address for w in workers}
        self._read_at = time.monotonic()

    async def knows(self, address: str) -> bool:
        """Whether address is a registered worker's, reading the registry again when the list is stale or lacks it."""
        if address in self._addresses and time.monotonic() - self._read_at < self.max_age_s * 10:
            return True
        async with self._lock:
            if time.monotonic() - self._read_at >= self.max_age_s or address not in self._addresses:
                await self._refresh()
        return address in self._addresses
