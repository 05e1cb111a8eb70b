"""The addresses a worker may send KV to: those of workers registered (with a signed entry) in the registry."""

from __future__ import annotations

import asyncio
import logging
import time

import redis

from splitwise.cluster.registry import WorkerRegistry

log = logging.getLogger(__name__)
# A listed address is taken without reading the registry again for this long; one not listed (a worker that just
# registered) makes the next check read it at once.
REREAD_AFTER_S = 10.0


class KnownPeers:
    def __init__(self, registry: WorkerRegistry, reread_after_s: float = REREAD_AFTER_S):
        self.registry = registry
        self.reread_after_s = reread_after_s
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

    def _listed(self, address: str) -> bool:
        return address in self._addresses and time.monotonic() - self._read_at < self.reread_after_s

    async def knows(self, address: str) -> bool:
        """Whether address is a registered worker's, reading the registry again when the list is old or lacks it."""
        if self._listed(address):
            return True
        async with self._lock:
            if not self._listed(address):  # (another check may have read it meanwhile)
                await self._refresh()
        return address in self._addresses
