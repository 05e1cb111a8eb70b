"""The KV index in Redis: which kv_store holds a request's prompt KV, what it is of, how many bytes, and until when."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as redis

from splitwise.cluster.aio import keeps_cancellation

KEY_PREFIX = "splitwise:kv:"

# Atomic, so that a holder never removes the entry another kv_store wrote after it.
REMOVE_IF_HOLDER = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class KVIndexEntry:
    key: str  # a request id
    holder: str  # address of the kv_store that holds the KV
    kv_hash: str  # what the KV is of (splitwise.kv.binding.kv_hash): model, layout and exact prompt tokens
    num_bytes: int
    expires_at: float  # unix seconds


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class KVIndex:
    """One Redis hash per key (holder, kv_hash, num_bytes, expires_at) whose Redis TTL is the KV's, so Redis itself
    drops expired entries. Keys are request ids; whoever reuses the KV checks its kv_hash, since a request id says
    only whose KV it was meant to be."""

    def __init__(self, client: redis.Redis, prefix: str = KEY_PREFIX):
        self.client = client
        self.prefix = prefix
        self._remove_if_holder = client.register_script(REMOVE_IF_HOLDER)

    @keeps_cancellation
    async def put(self, key: str, holder: str, kv_hash: str, num_bytes: int, ttl_s: float) -> None:
        name = self.prefix + key
        fields = {"holder": holder, "kv_hash": kv_hash, "num_bytes": num_bytes, "expires_at": time.time() + ttl_s}
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(name)
            pipe.hset(name, mapping=fields)
            pipe.pexpire(name, max(1, round(ttl_s * 1000)))
            await pipe.execute()

    @keeps_cancellation
    async def lookup(self, key: str) -> KVIndexEntry | None:
        return self._entry(key, await self.client.hgetall(self.prefix + key))

    @keeps_cancellation
    async def remove(self, key: str, holder: str) -> bool:
        """Removes the entry of `key` if `holder` still holds it; True if it did."""
        return bool(await self._remove_if_holder(keys=[self.prefix + key], args=[holder]))

    @keeps_cancellation
    async def entries(self) -> list[KVIndexEntry]:
        names = [_text(name) async for name in self.client.scan_iter(match=self.prefix + "*", count=500)]
        if not names:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            found = await pipe.execute()
        entries = (self._entry(name.removeprefix(self.prefix), fields) for name, fields in zip(names, found))
        return sorted((e for e in entries if e is not None), key=lambda e: e.key)

    @keeps_cancellation
    async def redis_run_id(self) -> str:
        """Which Redis process answers: a new one after a restart (with an empty index, without persistence)."""
        return _text((await self.client.info("server")).get("run_id", ""))

    @staticmethod
    def _entry(key: str, fields: dict) -> KVIndexEntry | None:
        if not fields:  # absent, or expired since the scan
            return None
        fields = {_text(k): _text(v) for k, v in fields.items()}
        # An entry without a kv_hash (an older writer's) matches no KV.
        return KVIndexEntry(key, fields["holder"], fields.get("kv_hash", ""), int(fields["num_bytes"]),
                            float(fields["expires_at"]))
