"""The worker registry in Redis: each worker keeps a key with a TTL alive by heartbeats; a dead worker's key expires.

A Redis that restarts empty loses nothing for good: the heartbeats fill it again within an interval, and a
reader meanwhile goes on listing the workers it saw before, so that routing never sees an empty cluster.

Redis is not trusted: every entry is signed with the cluster key over all its fields and its expiry time, and a
reader lists only entries that verify, have not expired and hold fields of the right types. Anyone who can write
to Redis without the key can hide workers, but never add one that receives prompts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Callable

import redis.asyncio as redis

from splitwise.cluster.aio import keeps_cancellation
from splitwise.security.keys import sign, verify

log = logging.getLogger(__name__)

KEY_PREFIX = "splitwise:worker:"
REDIS_TIMEOUT_S = 2.0  # a Redis that does not answer within this long counts as down
SIGNED_AS = "splitwise.registry.worker.v1"  # what a signature is of: an entry of this kind cannot pass for another
# A reader takes an entry until its expiry time plus this much, for the clocks of its host and the worker's. A copy
# of a real entry written again (a replay) is refused once it is this much past the expiry it was signed with.
MAX_CLOCK_SKEW_S = 5.0
LOG_SKIPPED_EVERY_S = 60.0  # a bad entry's key is logged once a minute, not at every read
MAX_SKIPPED_REMEMBERED = 10_000


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
    worker_calls: int = 0  # 1: serves WorkerCalls (the scheduler's calls on one stream); 0: an RPC per call


class WorkerRegistry:
    """Workers announce themselves here; the scheduler lists them. ttl_s: how long an announcement lasts, and how
    long a reader goes on listing the workers it saw before Redis restarted, while they announce again."""

    def __init__(self, client: redis.Redis, cluster_key: bytes, ttl_s: float = 3.0):
        self.client = client
        self.cluster_key = cluster_key
        self.ttl_s = ttl_s
        self._skipped_logged_at: dict[bytes, float] = {}  # key -> monotonic seconds
        self._redis_run_id = ""  # which Redis process answered the last read
        self._listed: list[WorkerInfo] = []
        self._bridged: dict[str, WorkerInfo] = {}  # listed before a Redis restart, not announced since
        self._bridged_until = 0.0  # monotonic seconds
        # key -> (the entry's bytes, its worker, its expiry): an entry is verified again only when its bytes change
        # (a worker's heartbeat rewrites it every second; the scheduler reads it several times a second)
        self._verified: dict[bytes, tuple[bytes, WorkerInfo, float]] = {}

    @keeps_cancellation
    async def announce(self, info: WorkerInfo) -> None:
        info = replace(info, heartbeat_at=time.time())
        entry = signed_entry(self.cluster_key, asdict(info), info.heartbeat_at + self.ttl_s)
        await self.client.set(KEY_PREFIX + info.worker_id, entry, px=int(self.ttl_s * 1000))

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
            self._verified.clear()
            return []
        now = time.time()
        listed = []
        verified = {}
        for key, raw in zip(keys, await self.client.mget(keys)):
            if raw is None:  # expired since the scan
                continue
            known = self._verified.get(key)
            try:
                if known is not None and known[0] == raw:
                    info, expires_at = known[1], known[2]
                    check_current(expires_at, now)
                else:
                    info, expires_at = parse_verified_entry(self.cluster_key, key, raw, now)
            except BadEntry as e:
                self._log_skipped(key, str(e))
                continue
            verified[key] = (raw, info, expires_at)
            listed.append(info)
        self._verified = verified
        return listed

    def _log_skipped(self, key: bytes | str, why: str) -> None:
        key = key.encode() if isinstance(key, str) else key
        now = time.monotonic()
        if len(self._skipped_logged_at) > MAX_SKIPPED_REMEMBERED:
            self._skipped_logged_at.clear()
        if now - self._skipped_logged_at.get(key, -math.inf) >= LOG_SKIPPED_EVERY_S:
            self._skipped_logged_at[key] = now
            log.warning("registry entry %s skipped: %s", key.decode(errors="replace"), why)


class BadEntry(ValueError):
    """A registry entry that is not a signed, current, well-formed worker entry."""


def _canonical(worker: dict, expires_at: float) -> bytes:
    return json.dumps({"worker": worker, "expires_at": expires_at}, sort_keys=True, separators=(",", ":")).encode()


def signed_entry(cluster_key: bytes, worker: dict, expires_at: float) -> bytes:
    """A registry entry: the worker's fields and the entry's expiry (unix seconds), signed with the cluster key."""
    signature = sign(cluster_key, SIGNED_AS, _canonical(worker, expires_at))
    return json.dumps({"worker": worker, "expires_at": expires_at, "signature": signature}).encode()


_TYPES = {"str": ((str,), "a string"), "int": ((int,), "an integer >= 0"), "float": ((int, float), "a number >= 0")}
WORKER_FIELDS = {f.name: (*_TYPES[f.type], f.default is MISSING) for f in fields(WorkerInfo)}


def parse_entry(cluster_key: bytes, key: bytes | str, raw: bytes, now: float) -> WorkerInfo:
    """The entry stored at `key` as a WorkerInfo, leaving out fields this version does not know; BadEntry saying why
    it is none: one bad entry must not keep the reader from the others, nor reach routing."""
    return parse_verified_entry(cluster_key, key, raw, now)[0]


def check_current(expires_at: float, now: float) -> None:
    if expires_at + MAX_CLOCK_SKEW_S < now:
        raise BadEntry(f"expired {now - expires_at:.1f}s ago (an old entry written again)")


def parse_verified_entry(cluster_key: bytes, key: bytes | str, raw: bytes, now: float) -> tuple[WorkerInfo, float]:
    """parse_entry's WorkerInfo and the expiry time the entry is signed with."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadEntry(f"not JSON ({e})") from e
    if not isinstance(entry, dict) or not isinstance(entry.get("worker"), dict):
        raise BadEntry("not a worker entry")
    worker, expires_at = entry["worker"], entry.get("expires_at")
    if not _is_number(expires_at) or not verify(cluster_key, entry.get("signature"), SIGNED_AS,
                                                _canonical(worker, expires_at)):
        raise BadEntry("unsigned, or not signed with this cluster's key")
    check_current(expires_at, now)
    values = {}
    for name, (types, kind, required) in WORKER_FIELDS.items():
        if name not in worker:
            if required:
                raise BadEntry(f"no {name}")
            continue
        value = worker[name]
        if not isinstance(value, types) or isinstance(value, bool) or (_is_number(value) and not 0 <= value < math.inf):
            raise BadEntry(f"{name} is {value!r}, not {kind}")
        values[name] = float(value) if float in types else value
    info = WorkerInfo(**values)
    key = key.decode(errors="replace") if isinstance(key, bytes) else key
    if key != KEY_PREFIX + info.worker_id:
        raise BadEntry(f"the entry of worker {info.worker_id!r}, under another worker's key")
    if not info.address:
        raise BadEntry("no address")
    return info, expires_at


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
