"""The KVStore servicer: relays KV transfers by request id and kv_hash, keeps each for a TTL, lists it in the KV index."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, TypeVar

import grpc
import redis.asyncio as redis

from splitwise.cluster.kv_index import KVIndex
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc
from splitwise.telemetry.tracing import record_error, rpc_span

log = logging.getLogger(__name__)
T = TypeVar("T")


# A header holds a request id, a layout, a hash and a transport name: far less than this. A bigger one is refused
# before it is stored (it would be held, and counted, as long as its KV).
MAX_HEADER_BYTES = 16 << 10


class TransferRefused(Exception):
    """A Put the kv_store stops: `code` is the status its sender gets."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class StoredTransfer:
    request_id: str
    kv_hash: str  # what the KV is of (KVHeader.kv_hash): a Get for other tokens is never served it
    expires_at: float  # monotonic; from the Put's start, then from its commit
    messages: list[common_pb2.KVTransferMessage] = field(default_factory=list)
    held_bytes: int = 0  # every byte stored for it (messages serialized, headers included): counted against max_bytes
    num_bytes: int = 0  # of KV (chunks' keys and values)
    num_chunks: int = 0
    complete: bool = False
    failed: str | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def finished(self) -> bool:
        return self.complete or self.failed is not None

    def drop_data(self, reason: str) -> None:
        """Fails the transfer and lets its messages go; what is left (a tombstone until it expires, so that a Get
        learns of the failure at once) holds only its request id."""
        self.failed = reason
        self.messages = []
        self.held_bytes = len(self.request_id.encode())


class KVStoreServicer(kv_store_pb2_grpc.KVStoreServicer):
    """`address` (set once the server is bound) is how the KV index names this kv_store as a holder.

    Limits are checked before what they bound: a header over MAX_HEADER_BYTES and any message that would take the
    bytes held past max_bytes are refused before they are stored; a Put that sends nothing for progress_timeout_s,
    or has not committed within ttl_s, is dropped, its bytes released, and the Gets waiting on it fail."""

    def __init__(self, ttl_s: float, max_bytes: int, get_wait_s: float, index: KVIndex, address: str = "", *,
                 progress_timeout_s: float):
        if ttl_s <= 0:
            raise ValueError(f"kv_store ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.get_wait_s = get_wait_s
        self.progress_timeout_s = progress_timeout_s
        self.index = index
        self.address = address
        self.expiry_interval_s = min(1.0, ttl_s / 4)
        self.transfers: dict[str, StoredTransfer] = {}
        self._redis_run_id: str | None = None  # of the Redis holding the index, to notice that it restarted
        self._arrived = asyncio.Condition()

    @property
    def bytes_held(self) -> int:
        return sum(t.held_bytes for t in self.transfers.values())

    async def _notify(self, transfer: StoredTransfer) -> None:
        async with transfer.changed:
            transfer.changed.notify_all()

    def _check_room(self, size: int) -> None:
        if self.bytes_held + size > self.max_bytes:
            raise TransferRefused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"kv_store is full: {self.bytes_held} of {self.max_bytes} bytes held, "
                                  f"{size} more do not fit (SPLITWISE_KV_STORE_MAX_BYTES)")

    async def _admit(self, first: common_pb2.KVTransferMessage | None) -> StoredTransfer:
        """The transfer a header starts, stored once it is known to fit; TransferRefused otherwise."""
        if first is None or first.WhichOneof("kind") != "header":
            raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT, "a KV transfer starts with its header")
        header, size = first.header, first.ByteSize()
        if size > MAX_HEADER_BYTES:
            raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"a KV header of {size} bytes: at most {MAX_HEADER_BYTES} are taken")
        if not header.request_id or not header.kv_hash:
            raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                  "a KV header names its request_id and what its KV is of (kv_hash)")
        if header.transport not in ("", "grpc"):
            raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT, "kv_store takes KV over the gRPC stream only")
        rid = header.request_id
        existing = self.transfers.get(rid)
        if existing is not None and not existing.failed:
            if existing.kv_hash == header.kv_hash:
                raise TransferRefused(grpc.StatusCode.ALREADY_EXISTS, f"KV of request {rid!r} is already stored")
            # The id is used again, for other tokens: the KV held under it is an earlier request's, never this one's.
            log.info("request id %s is used again for other tokens: dropping the KV held under it", rid)
            await self._forget([rid])
        self._check_room(size)
        transfer = self.transfers[rid] = StoredTransfer(rid, header.kv_hash, time.monotonic() + self.ttl_s, [first],
                                                        held_bytes=size)
        async with self._arrived:
            self._arrived.notify_all()
        return transfer

    async def _receive(self, request_iterator, transfer: StoredTransfer) -> None:
        """Stores the rest of the transfer, message by message, each within the limits before it is kept."""
        messages = aiter(request_iterator)
        while not transfer.complete:
            left_s = transfer.expires_at - time.monotonic()
            try:
                async with asyncio.timeout(min(self.progress_timeout_s, max(left_s, 0))):
                    msg = await anext(messages, None)
            except TimeoutError:
                if left_s <= self.progress_timeout_s:
                    problem = f"the KV transfer did not commit within the kv_store's TTL ({self.ttl_s}s)"
                else:
                    problem = f"the KV transfer stalled: nothing arrived for {self.progress_timeout_s}s"
                raise TransferRefused(grpc.StatusCode.DEADLINE_EXCEEDED, problem) from None
            if msg is None:
                raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT, "the KV stream ended before its commit")
            if self.transfers.get(transfer.request_id) is not transfer:
                raise TransferRefused(grpc.StatusCode.ABORTED, "the KV transfer was deleted or replaced meanwhile")
            kind = msg.WhichOneof("kind")
            if kind == "abort":
                raise TransferRefused(convert.status_code(msg.abort.code), f"the sender gave up: {msg.abort.reason}")
            if kind not in ("chunk", "commit"):
                raise TransferRefused(grpc.StatusCode.INVALID_ARGUMENT, "a KV transfer has one header, at its start")
            size = msg.ByteSize()
            self._check_room(size)
            transfer.held_bytes += size
            if kind == "chunk":
                transfer.num_bytes += len(msg.chunk.key) + len(msg.chunk.value)
                transfer.num_chunks += 1
            transfer.messages.append(msg)
            transfer.complete = kind == "commit"
            await self._notify(transfer)

    async def Put(self, request_iterator, context: grpc.aio.ServicerContext) -> kv_store_pb2.PutReply:
        span = rpc_span()
        try:
            try:
                async with asyncio.timeout(self.progress_timeout_s):
                    first = await anext(aiter(request_iterator), None)
            except TimeoutError:
                raise TransferRefused(grpc.StatusCode.DEADLINE_EXCEEDED,
                                      f"no KV header within {self.progress_timeout_s}s") from None
            transfer = await self._admit(first)
        except TransferRefused as e:
            record_error(span, e)
            await context.abort(e.code, str(e))
        rid = transfer.request_id
        span.set_attribute("splitwise.request_id", rid)
        try:
            await self._receive(request_iterator, transfer)
        except BaseException as e:
            transfer.drop_data(str(e) or type(e).__name__)
            await self._notify(transfer)
            record_error(span, transfer.failed)
            if isinstance(e, TransferRefused):
                await context.abort(e.code, str(e))
            raise
        transfer.expires_at = time.monotonic() + self.ttl_s
        if self.transfers.get(rid) is transfer:  # not deleted while it streamed
            await self._index_put(transfer)
        span.set_attributes({"kv.bytes": transfer.num_bytes, "kv.chunks": transfer.num_chunks})
        return kv_store_pb2.PutReply(request_id=rid, num_bytes=transfer.num_bytes, num_chunks=transfer.num_chunks)

    def _stored(self, rid: str, kv_hash: str) -> StoredTransfer | None:
        transfer = self.transfers.get(rid)
        return transfer if transfer is not None and transfer.kv_hash == kv_hash else None

    async def _wait_for(self, rid: str, kv_hash: str, wait_s: float) -> StoredTransfer | None:
        # asyncio.timeout, not wait_for: before Python 3.12, wait_for can swallow the cancellation of a Get whose
        # client leaves just as the transfer arrives (CPython gh-86296).
        try:
            async with asyncio.timeout(wait_s), self._arrived:
                await self._arrived.wait_for(lambda: self._stored(rid, kv_hash) is not None)
        except TimeoutError:
            return None
        return self._stored(rid, kv_hash)

    async def Get(self, request: kv_store_pb2.GetRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id
        if not rid or not request.kv_hash:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "request_id and kv_hash (what the wanted KV is of) are required")
        wait_s = request.wait_s if request.wait_s > 0 else self.get_wait_s
        span = rpc_span()
        span.set_attribute("splitwise.request_id", rid)
        if rid not in self.transfers:
            holder = await self._holder_elsewhere(rid, request.kv_hash)
            if holder:
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"KV of request {rid!r} is held by the kv_store at {holder}")
        # KV held under this id but of other tokens is another request's: waited past, as if absent.
        transfer = await self._wait_for(rid, request.kv_hash, wait_s)
        if transfer is None:
            other = " (it holds KV of other tokens under that id)" if rid in self.transfers else ""
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV for request {rid!r} within {wait_s}s{other}")
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
        """Drops these transfers from memory at once (the Gets of one still arriving fail), then their index entries;
        returns how many were held."""
        dropped = [t for t in (self.transfers.pop(rid, None) for rid in rids) if t is not None]
        for transfer in dropped:
            if not transfer.finished:
                transfer.drop_data("deleted")
                await self._notify(transfer)
        await asyncio.gather(*(self._index_remove(t.request_id) for t in dropped if t.complete))
        return len(dropped)

    # The index is advisory: the KV is still served from here when Redis is away, so its errors are only logged.
    async def _index_put(self, transfer: StoredTransfer) -> None:
        ttl_s = max(transfer.expires_at - time.monotonic(), 0.001)
        put = self.index.put(transfer.request_id, self.address, transfer.kv_hash, transfer.num_bytes, ttl_s)
        await self._index_call(put, "put", transfer.request_id)

    async def _index_remove(self, rid: str) -> None:
        await self._index_call(self.index.remove(rid, self.address), "remove", rid)

    async def _holder_elsewhere(self, rid: str, kv_hash: str) -> str | None:
        entry = await self._index_call(self.index.lookup(rid), "lookup", rid)
        elsewhere = entry is not None and entry.holder != self.address and entry.kv_hash == kv_hash
        return entry.holder if elsewhere else None

    @staticmethod
    async def _index_call(call: Awaitable[T], action: str, rid: str) -> T | None:
        try:
            return await call
        except (redis.RedisError, OSError) as e:
            log.warning("KV index %s of request %s failed: %s", action, rid, e)
            return None
