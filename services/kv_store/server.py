"""The KVStore servicer: relays KV transfers by request id, keeps each for a TTL and lists it in the KV index."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, TypeVar

import grpc
import redis.asyncio as redis

from splitwise.cluster.kv_index import KVIndex
from splitwise.rpc.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc
from splitwise.telemetry.tracing import record_error, rpc_span

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StoredTransfer:
    request_id: str
    expires_at: float
    messages: list[common_pb2.KVTransferMessage] = field(default_factory=list)
    num_bytes: int = 0
    num_chunks: int = 0
    complete: bool = False
    failed: str | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def finished(self) -> bool:
        return self.complete or self.failed is not None


class KVStoreServicer(kv_store_pb2_grpc.KVStoreServicer):
    """`address` (set once the server is bound) is how the KV index names this kv_store as a holder."""

    def __init__(self, ttl_s: float, max_bytes: int, get_wait_s: float, index: KVIndex, address: str = ""):
        if ttl_s <= 0:
            raise ValueError(f"kv_store ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.get_wait_s = get_wait_s
        self.index = index
        self.address = address
        self.expiry_interval_s = min(1.0, ttl_s / 4)
        self.transfers: dict[str, StoredTransfer] = {}
        self._redis_run_id: str | None = None  # of the Redis holding the index, to notice that it restarted
        self._arrived = asyncio.Condition()

    @property
    def bytes_held(self) -> int:
        return sum(t.num_bytes for t in self.transfers.values())

    async def _notify(self, transfer: StoredTransfer) -> None:
        async with transfer.changed:
            transfer.changed.notify_all()

    async def Put(self, request_iterator, context: grpc.aio.ServicerContext) -> kv_store_pb2.PutReply:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a KV transfer starts with its header")
        rid = first.header.request_id
        if first.header.transport not in ("", "grpc"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kv_store takes KV over the gRPC stream only")
        existing = self.transfers.get(rid)
        if existing is not None and not existing.failed:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"KV of request {rid!r} is already stored")
        span = rpc_span()
        span.set_attribute("splitwise.request_id", rid)
        transfer = self.transfers[rid] = StoredTransfer(rid, time.monotonic() + self.ttl_s, [first])
        async with self._arrived:
            self._arrived.notify_all()
        try:
            async for msg in request_iterator:
                if msg.WhichOneof("kind") == "chunk":
                    size = len(msg.chunk.key) + len(msg.chunk.value)
                    if self.bytes_held + size > self.max_bytes:
                        raise MemoryError(f"kv_store is full ({self.max_bytes} bytes)")
                    transfer.num_bytes += size
                    transfer.num_chunks += 1
                transfer.messages.append(msg)
                transfer.complete = msg.WhichOneof("kind") == "commit"
                await self._notify(transfer)
            if not transfer.complete:
                raise ConnectionError("the KV stream ended before its commit")
        except BaseException as e:
            transfer.failed = str(e) or type(e).__name__
            await self._notify(transfer)
            record_error(span, transfer.failed)
            if isinstance(e, MemoryError):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            if isinstance(e, ConnectionError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        transfer.expires_at = time.monotonic() + self.ttl_s
        if self.transfers.get(rid) is transfer:  # not deleted while it streamed
            await self._index_put(transfer)
        span.set_attributes({"kv.bytes": transfer.num_bytes, "kv.chunks": transfer.num_chunks})
        return kv_store_pb2.PutReply(request_id=rid, num_bytes=transfer.num_bytes, num_chunks=transfer.num_chunks)

    async def _wait_for(self, rid: str, wait_s: float) -> StoredTransfer | None:
        # asyncio.timeout, not wait_for: before Python 3.12, wait_for can swallow the cancellation of a Get whose
        # client leaves just as the transfer arrives (CPython gh-86296).
        try:
            async with asyncio.timeout(wait_s), self._arrived:
                await self._arrived.wait_for(lambda: rid in self.transfers)
        except TimeoutError:
            return None
        return self.transfers[rid]

    async def Get(self, request: kv_store_pb2.GetRequest, context: grpc.aio.ServicerContext):
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        wait_s = request.wait_s if request.wait_s > 0 else self.get_wait_s
        span = rpc_span()
        span.set_attribute("splitwise.request_id", request.request_id)
        if request.request_id not in self.transfers:
            holder = await self._holder_elsewhere(request.request_id)
            if holder:
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"KV of request {request.request_id!r} is held by the kv_store at {holder}")
        transfer = await self._wait_for(request.request_id, wait_s)
        if transfer is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV for request {request.request_id!r} within {wait_s}s")
        sent = 0
        while True:
            while sent < len(transfer.messages):
                yield transfer.messages[sent]
                sent += 1
            deadline = time.monotonic() + wait_s  # a stall is judged by progress, not by total time
            if transfer.failed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed upstream: {transfer.failed}")
            if transfer.complete:
                span.set_attributes({"kv.bytes": transfer.num_bytes, "kv.chunks": transfer.num_chunks})
                return
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)), transfer.changed:
                    await transfer.changed.wait_for(
                        lambda seen=sent: len(transfer.messages) > seen or transfer.finished)
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "KV transfer stalled")

    async def Delete(self, request: kv_store_pb2.DeleteRequest, context) -> kv_store_pb2.DeleteReply:
        deleted = await self._forget([request.request_id])
        return kv_store_pb2.DeleteReply(deleted=deleted > 0)

    def gauges(self):
        yield "splitwise.kv_store.stored", self.bytes_held, {}

    async def expire_forever(self) -> None:
        while True:
            await asyncio.sleep(self.expiry_interval_s)
            now = time.monotonic()
            await self._forget([r for r, t in self.transfers.items() if t.expires_at <= now and t.finished])
            await self.reindex_if_redis_restarted()

    async def reindex_if_redis_restarted(self) -> None:
        """A Redis that restarted (a new run id) lost the index: this kv_store lists what it holds there again."""
        run_id = await self._index_call(self.index.redis_run_id(), "run id", "-")
        if run_id is None:
            return
        restarted = self._redis_run_id is not None and run_id != self._redis_run_id
        self._redis_run_id = run_id
        if restarted:
            held = [t for t in self.transfers.values() if t.complete]
            log.info("Redis restarted: indexing the %d transfers this kv_store holds again", len(held))
            await asyncio.gather(*(self._index_put(t) for t in held))

    async def forget_all(self) -> None:
        """Drops every transfer, as a stopping kv_store must, so that the index sends no client here."""
        await self._forget(list(self.transfers))

    async def _forget(self, rids: list[str]) -> int:
        """Drops these transfers from memory at once, then their index entries; returns how many were held."""
        dropped = [t for t in (self.transfers.pop(rid, None) for rid in rids) if t is not None]
        await asyncio.gather(*(self._index_remove(t.request_id) for t in dropped if t.complete))
        return len(dropped)

    # The index is advisory: the KV is still served from here when Redis is away, so its errors are only logged.
    async def _index_put(self, transfer: StoredTransfer) -> None:
        ttl_s = max(transfer.expires_at - time.monotonic(), 0.001)
        put = self.index.put(transfer.request_id, self.address, transfer.num_bytes, ttl_s)
        await self._index_call(put, "put", transfer.request_id)

    async def _index_remove(self, rid: str) -> None:
        await self._index_call(self.index.remove(rid, self.address), "remove", rid)

    async def _holder_elsewhere(self, rid: str) -> str | None:
        entry = await self._index_call(self.index.lookup(rid), "lookup", rid)
        return entry.holder if entry is not None and entry.holder != self.address else None

    @staticmethod
    async def _index_call(call: Awaitable[T], action: str, rid: str) -> T | None:
        try:
            return await call
        except (redis.RedisError, OSError) as e:
            log.warning("KV index %s of request %s failed: %s", action, rid, e)
            return None
