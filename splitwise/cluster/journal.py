"""The request journal in Redis: each request's scheduler replica, assigned workers, attempts and tokens
emitted so far, so that the cluster's state is not only in one scheduler process.

Writes never hold a request up: they go out in the background, in order, at most once per `flush_s`: the updates of
all requests made meanwhile in one pipeline (one round trip), one HSET per request. A short request's open,
assignment and end made within one window are one write, and it never enters the open set: the journal costs a
request a fraction of a round trip, not three. A Redis outage only costs journal entries (logged once per outage). An open request is also in a set with its expiry time as score, so `open_requests` counts every
replica's requests without scanning keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import redis.asyncio as redis

log = logging.getLogger(__name__)

KEY_PREFIX = "splitwise:request:"
OPEN_KEY = "splitwise:requests:open"  # sorted set: request id -> unix time its entry expires
PROGRESS_EVERY_TOKENS = 16  # tokens emitted between two progress writes
CLOSED_TTL_S = 300.0  # how long a finished request's entry stays, for inspection
# Updates wait this long to go out together. A replica that dies loses at most this much of its journal; what reads
# the journal (a continuation's kept-copy lookup, the open count) takes an entry that lags by it.
FLUSH_S = 0.05


@dataclass
class _Merged:
    """One request's updates of a batch, as one write."""
    rid: str
    fields: dict = field(default_factory=dict)
    opening: bool = False
    closing: bool = False


class RequestJournal:
    def __init__(self, client: redis.Redis, scheduler: str, ttl_s: float, flush_s: float = FLUSH_S):
        self.client = client
        self.flush_s = flush_s
        self.scheduler = scheduler
        self.ttl_s = ttl_s  # an open entry outlives its request's deadline
        self._pending: list[tuple[str, dict, bool, bool]] = []  # (request id, fields, opening, closing), in order
        self._writer: asyncio.Task | None = None
        self._written_tokens: dict[str, int] = defaultdict(int)
        self._failing = False

    def opened(self, rid: str, prompt_tokens: int, max_tokens: int) -> None:
        self._write(rid, {"scheduler": self.scheduler, "state": "routing", "prompt_tokens": prompt_tokens,
                          "max_tokens": max_tokens, "tokens_emitted": 0, "opened_at": time.time()}, opening=True)

    def assigned(self, rid: str, attempt_id: str, kind: str, prompt_worker: str, token_worker: str) -> None:
        self._write(rid, {"state": kind, "attempt": attempt_id, "prompt_worker": prompt_worker,
                          "token_worker": token_worker})

    def progress(self, rid: str, tokens_emitted: int) -> None:
        if tokens_emitted - self._written_tokens[rid] >= PROGRESS_EVERY_TOKENS:
            self._written_tokens[rid] = tokens_emitted
            self._write(rid, {"tokens_emitted": tokens_emitted})

    def closed(self, rid: str, outcome: str, tokens_emitted: int) -> None:
        self._written_tokens.pop(rid, None)
        self._write(rid, {"state": "done", "outcome": outcome, "tokens_emitted": tokens_emitted,
                          "closed_at": time.time()}, closing=True)

    async def entry(self, rid: str) -> dict[str, str]:
        raw = await self.client.hgetall(KEY_PREFIX + rid)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def open_requests(self) -> int:
        """Requests open on any scheduler replica (entries of a replica that died drop out at their expiry)."""
        await self.client.zremrangebyscore(OPEN_KEY, 0, time.time())
        return await self.client.zcard(OPEN_KEY)

    def _write(self, rid: str, fields: dict, opening: bool = False, closing: bool = False) -> None:
        self._pending.append((rid, fields, opening, closing))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        """Writes the pending updates in order, those made within `flush_s` in one pipeline (one round trip), until
        none is left. A request's updates in one batch are one HSET: a short request opened, assigned and closed
        within a window is written once, with its closed entry's expiry, and never enters the open set."""
        while self._pending:
            await asyncio.sleep(self.flush_s)
            batch, self._pending = self._pending, []
            merged: list[_Merged] = []  # in order
            latest: dict[str, _Merged] = {}  # request id -> its entry in `merged` that is not closed yet
            for rid, fields, opening, closing in batch:
                entry = latest.get(rid)
                if entry is None:  # (an id used again after its request closed starts an entry of its own)
                    entry = latest[rid] = _Merged(rid)
                    merged.append(entry)
                entry.fields.update(fields)
                entry.opening |= opening
                if closing:
                    entry.closing = True
                    del latest[rid]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for m in merged:
                        key = KEY_PREFIX + m.rid
                        pipe.hset(key, mapping=m.fields)
                        if m.closing:
                            pipe.expire(key, int(CLOSED_TTL_S))
                            if not m.opening:  # (opened in this batch: it was never added)
                                pipe.zrem(OPEN_KEY, m.rid)
                        elif m.opening:
                            pipe.expire(key, int(self.ttl_s) + 1)
                            pipe.zadd(OPEN_KEY, {m.rid: time.time() + self.ttl_s})
                    await pipe.execute()
                if self._failing:
                    log.info("request journal: Redis is back")
                    self._failing = False
            except (redis.RedisError, OSError) as e:
                if not self._failing:
                    log.warning("request journal: cannot write to Redis (%s); requests go on unjournaled", e)
                    self._failing = True


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
