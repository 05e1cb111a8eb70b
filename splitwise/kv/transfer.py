"""One request's KV transfer: the sender on the prompt worker and the receiver on the token worker.

Control plane: the PushKV (or kv_store Put) gRPC stream, header / chunks layer by layer / commit. The
chunks' bytes travel inline (grpc) or are written into the receiver's staging buffer by a StagedWriter
(shm, mooncake) just before their chunk message, which then carries only where they are and their
checksum. Deadlines measure progress, not waiting in line: a sender waiting for its prefill to compute
is not stalled; a peer that stops taking or sending data for `progress_timeout_s` is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

import grpc
import torch

from splitwise.engine.sampling import SampledToken
from splitwise.kv.binding import KVBindingMismatch, kv_hash
from splitwise.kv.chunks import KVChunk, KVIntegrityError, check_chunk_bounds, decode_chunk, split_layer
from splitwise.kv.layout import KVLayout, KVLayoutMismatch
from splitwise.kv.staging import StagedLayout, byte_view, region_checksum, stage_layer
from splitwise.kv.transport import GRPC, TransferState
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2, kv_store_pb2_grpc, worker_pb2, worker_pb2_grpc
from splitwise.telemetry import metrics
from splitwise.telemetry.tracing import record_cancelled, record_error, tracer

_DONE = object()


class KVTransferError(Exception):
    """A KV transfer that could not complete; the message says why, `code` how the receiver refused it."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        super().__init__(message)
        self.code = code


@dataclass
class TransferStats:
    num_bytes: int = 0
    num_chunks: int = 0
    num_layers: int = 0
    seconds: float = 0.0

    def attributes(self) -> dict:
        return {"kv.bytes": self.num_bytes, "kv.layers": self.num_layers, "kv.chunks": self.num_chunks,
                "kv.seconds": self.seconds, "kv.bandwidth_mbps": self.num_bytes * 8 / 1e6 / max(self.seconds, 1e-9)}


class StagedWriter(Protocol):
    """Sender side of a staged transport: stage_layer writes into `buffer`, flush makes ranges land remotely."""

    transport: str
    buffer: torch.Tensor
    remote: bool  # whether staged bytes still have to be sent (flush) before the receiver can read them

    def flush(self, ranges: list[tuple[int, int]]) -> None: ...

    def close(self) -> None: ...


class Staging(Protocol):
    """Receiver side of a staged transport: the request's staging buffer, readable as `tensor`."""

    transport: str
    tensor: torch.Tensor

    def close(self) -> None: ...


def record_transfer(direction: str, transport: str, stats: TransferStats, outcome: str) -> None:
    attributes = {"direction": direction, "transport": transport}
    metrics.kv_transferred.add(stats.num_bytes, attributes)
    metrics.kv_transfers.add(1, {**attributes, "outcome": outcome})
    if outcome == "ok":
        metrics.kv_transfer_duration.record(stats.seconds, attributes)


@dataclass
class _Encoded:
    layer: int
    chunks: list[KVChunk]
    ranges: list[tuple[int, int]]  # staged bytes to flush before the chunks are announced


@dataclass
class _Commit:  # serialized mode: the first token, queued after the last encoded layer
    first: SampledToken


@dataclass
class _Raw:  # serialized mode: a layer kept until the prefill ends
    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    token_start: int


class KVSender:
    """Streams one request's KV to a token worker (PushKV) or to the kv_store relay (Put).

    The compute thread calls on_layer_kv as each layer's KV is ready. Layer-wise, the layer is encoded
    (staged) at once and `send`, on the event loop, ships it while later layers compute; serialized, the
    layers wait for the commit and go after the prefill.
    """

    def __init__(self, channel: grpc.aio.Channel, target_kind: int, request_id: str, layout: KVLayout,
                 token_ids: list[int], max_chunk_bytes: int, progress_timeout_s: float,
                 writer: StagedWriter | None = None, layerwise: bool = True, span_name: str = "kv_transfer.send"):
        self.target = "kv_store" if target_kind == worker_pb2.KVTarget.KIND_KV_STORE else "token_worker"
        if target_kind == worker_pb2.KVTarget.KIND_KV_STORE:
            self._call = kv_store_pb2_grpc.KVStoreStub(channel).Put
        else:
            self._call = worker_pb2_grpc.TokenWorkerStub(channel).PushKV
        self.request_id = request_id
        self.layout = layout
        self.num_tokens = len(token_ids)
        self.kv_hash = kv_hash(layout, token_ids)  # what the KV is of, for whoever reuses it
        self.max_chunk_bytes = max_chunk_bytes
        self.progress_timeout_s = progress_timeout_s
        self.writer = writer
        self.transport = writer.transport if writer else GRPC
        self.staged = StagedLayout(layout, self.num_tokens)
        self.layerwise = layerwise
        self.span_name = span_name
        self.state = TransferState.WAITING
        self.stats = TransferStats()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._waiting_for_compute = True
        self._last_progress = self._loop.time()
        self._stalled = False
        self._aborted = False
        self._transfer_started: float | None = None  # the first layer's bytes started moving
        self._error: KVTransferError | None = None  # a staged write that failed; the stream stops short

    def on_layer_kv(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_start: int) -> None:
        """Compute thread: copy the layer out (compute goes on) and hand it to the loop."""
        if self._aborted:  # the request ended: a step still finishing its layers writes nothing more
            return
        if self.layerwise:
            item = self._encode(layer, keys, values, token_start)
        else:
            item = _Raw(layer, keys.clone(), values.clone(), token_start)
        if item is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_start: int) -> _Encoded | None:
        if self.writer is None:
            return _Encoded(layer, list(split_layer(layer, keys, values, token_start, self.layout,
                                                    self.max_chunk_bytes)), [])
        buffer = self.writer.buffer  # a reference keeps the mapping alive even if the writer closes meanwhile
        if buffer is None:
            return None
        crc = stage_layer(buffer, self.staged, layer, token_start, keys, values)
        count = keys.shape[1]
        return _Encoded(layer, [KVChunk(layer, token_start, count, b"", b"", crc, staged=True)],
                        list(self.staged.ranges(layer, token_start, count)))

    def commit(self, first: SampledToken) -> None:
        self._queue.put_nowait(first)

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        self._aborted = True
        self._queue.put_nowait(_DONE)

    def _progress(self) -> None:
        self._last_progress = self._loop.time()

    async def _next_item(self):
        self._waiting_for_compute = True
        try:
            return await self._queue.get()
        finally:
            self._waiting_for_compute = False
            self._progress()

    def _start_transfer(self) -> None:
        if self.state is TransferState.WAITING:
            self.state = TransferState.TRANSFERRING
            self._transfer_started = time.perf_counter()

    async def _chunk_messages(self, batch: list[_Encoded], span) -> AsyncIterator[common_pb2.KVTransferMessage]:
        """The chunk messages of some encoded layers, after their staged bytes reached the receiver."""
        self._start_transfer()
        ranges = [r for encoded in batch for r in encoded.ranges]
        if ranges and self.writer is not None and self.writer.remote:
            try:
                await asyncio.to_thread(self.writer.flush, ranges)
            except (ConnectionError, OSError) as e:
                self._error = KVTransferError(f"KV transfer failed: {self.transport} write: {e}")
                return
            if self._aborted:
                return
            self._progress()
        for encoded in batch:
            layer_bytes = 0
            for chunk in encoded.chunks:
                yield convert.chunk_to_pb(chunk)
                self._progress()
                layer_bytes += chunk.token_count * self.layout.bytes_per_token_per_layer
                self.stats.num_chunks += 1
            self.stats.num_bytes += layer_bytes
            self.stats.num_layers += 1
            span.add_event("kv.layer_sent", {"kv.layer": encoded.layer, "kv.bytes": layer_bytes})

    async def _messages(self, span) -> AsyncIterator[common_pb2.KVTransferMessage]:
        yield common_pb2.KVTransferMessage(header=common_pb2.KVHeader(
            request_id=self.request_id, layout=convert.layout_to_pb(self.layout), num_tokens=self.num_tokens,
            transport=self.transport, kv_hash=self.kv_hash,
        ))
        held: list[_Raw] = []
        while True:
            item = await self._next_item()
            if item is _DONE:
                return
            if isinstance(item, _Raw):
                held.append(item)
            elif isinstance(item, _Encoded):
                async for msg in self._chunk_messages([item], span):
                    yield msg
                if self._error:  # the stream ends without a commit: the receiver fails the transfer too
                    return
            elif held:  # serialized, and the prefill is over: encode the layers now, in order, then commit
                self._start_transfer()
                asyncio.get_running_loop().run_in_executor(None, self._encode_held, held, _Commit(item))
                held = []
            else:  # the first token, after every layer
                first = item.first if isinstance(item, _Commit) else item
                commit = common_pb2.KVCommit(
                    first_token_id=first.token_id, first_token_logprob=first.logprob,
                    num_chunks=self.stats.num_chunks, num_bytes=self.stats.num_bytes,
                )
                if first.top_logprobs:
                    commit.first_token_top_logprobs.CopyFrom(convert.top_logprobs_to_pb(first.top_logprobs))
                yield common_pb2.KVTransferMessage(commit=commit)
                self._progress()  # from here, the acknowledgement has progress_timeout_s to come
                return

    def _encode_held(self, held: list[_Raw], commit: "_Commit") -> None:
        """A worker thread: the serialized layers, each handed to the loop as soon as it is encoded."""
        for raw in held:
            encoded = self._encode(raw.layer, raw.keys, raw.values, raw.token_start)
            if encoded is None:  # aborted meanwhile
                return
            self._loop.call_soon_threadsafe(self._queue.put_nowait, encoded)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, commit)

    async def _watch(self, call) -> None:
        """Cancels the transfer when it stalls outside of waiting for compute."""
        while True:
            await asyncio.sleep(min(1.0, self.progress_timeout_s / 4))
            if not self._waiting_for_compute and self._loop.time() - self._last_progress > self.progress_timeout_s:
                self._stalled = True
                call.cancel()
                return

    async def send(self) -> TransferStats:
        with tracer().start_as_current_span(self.span_name) as span:
            span.set_attributes({"splitwise.request_id": self.request_id, "kv.transport": self.transport,
                                 "kv.target": self.target, "kv.layerwise": self.layerwise})
            outcome = "failed"
            call = self._call(self._messages(span))  # no overall timeout: progress is watched instead
            watchdog = asyncio.create_task(self._watch(call))
            try:
                await call
                outcome = "ok"
                self.state = TransferState.DONE
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.INTERNAL and "Internal error from Core" in (e.details() or ""):
                    # grpcio's asyncio client says so when a stream write fails as the peer goes away
                    # (grpc/grpc#36066): for the scheduler that is an unreachable receiver.
                    code = grpc.StatusCode.UNAVAILABLE
                error = self._error or KVTransferError(f"KV transfer failed: {code.name}: {e.details()}", code)
                record_error(span, error)
                raise error from e
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._stalled and not (task and task.cancelling()):
                    error = KVTransferError(f"KV transfer stalled: no progress for {self.progress_timeout_s}s",
                                            grpc.StatusCode.DEADLINE_EXCEEDED)
                    record_error(span, error)
                    raise error from None
                outcome = "cancelled"
                record_cancelled(span, "request ended")
                raise
            finally:
                watchdog.cancel()
                if outcome != "ok":
                    self.state = TransferState.FAILED
                # Transfer time: from the first layer's bytes to the acknowledgement (the wait for the prefill
                # to produce that layer is not the transport's).
                if self._transfer_started is not None:
                    self.stats.seconds = time.perf_counter() - self._transfer_started
                span.set_attributes(self.stats.attributes())
                record_transfer("send", self.transport, self.stats, outcome)
            return self.stats


# Where received KV goes: (layer, first position, keys, values), keys/values [tokens, kv_heads, head_dim].
KVSink = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class KVReceiver:
    """Writes one reserved request's incoming transfer through `sink` and resolves with the commit. Only KV of
    exactly `token_ids` (its header's kv_hash) is taken: any other is refused before a byte is written."""

    def __init__(self, sink: KVSink, layout: KVLayout, token_ids: list[int], owner: object = None,
                 staging: Staging | None = None):
        self.sink = sink
        self.owner = owner  # what the receiver belongs to, so cleanup can tell requests with one id apart
        self.layout = layout
        self.num_tokens = len(token_ids)
        self.kv_hash = kv_hash(layout, token_ids)
        self.staging = staging
        self.staged = StagedLayout(layout, self.num_tokens)
        self.transport = GRPC
        self.state = TransferState.WAITING
        self.stats = TransferStats()
        loop = asyncio.get_running_loop()
        self.committed: asyncio.Future[SampledToken] = loop.create_future()
        self.committed.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure nobody awaits is fine
        self.last_progress = loop.time()
        self._layers_seen: set[int] = set()

    @property
    def layers_received(self) -> frozenset[int]:
        return frozenset(self._layers_seen)

    def fail(self, error: Exception) -> None:
        if not self.committed.done():
            self.state = TransferState.FAILED
            self.committed.set_exception(error)

    def close(self) -> None:
        """Frees the staging buffer (a sender writing late finds it gone: shm unlinked, Mooncake unregistered)."""
        if self.staging is not None:
            self.staging.close()
            self.staging = None

    async def consume(self, messages: AsyncIterator[common_pb2.KVTransferMessage]) -> TransferStats:
        """Applies a whole transfer; raises KVIntegrityError / KVTransferError (and fails the waiter)."""
        start = None  # the first chunk: waiting for the sender's prefill is not transfer time
        outcome = "failed"
        loop = asyncio.get_running_loop()
        try:
            async for msg in self._until_failed(messages):
                self.last_progress = loop.time()
                kind = msg.WhichOneof("kind")
                if kind == "header":
                    self._check_header(msg.header)
                    self.state = TransferState.TRANSFERRING
                elif kind == "chunk":
                    if self.state is TransferState.WAITING:  # the header says what the KV is of: it comes first
                        raise KVIntegrityError("a KV chunk before the transfer's header")
                    start = start or time.perf_counter()
                    chunk = convert.chunk_from_pb(msg.chunk)
                    keys, values = self._chunk_tensors(chunk)
                    self.sink(chunk.layer, chunk.token_start, keys, values)
                    self._layers_seen.add(chunk.layer)
                    self.stats.num_chunks += 1
                    self.stats.num_bytes += chunk.token_count * self.layout.bytes_per_token_per_layer
                elif kind == "commit":
                    self._check_commit(msg.commit)
                    self.stats.num_layers = len(self._layers_seen)
                    self.stats.seconds = time.perf_counter() - (start or time.perf_counter())
                    if not self.committed.done():
                        self.state = TransferState.DONE
                        self.committed.set_result(
                            SampledToken(msg.commit.first_token_id, msg.commit.first_token_logprob,
                                         convert.top_logprobs_from_pb(msg.commit.first_token_top_logprobs))
                        )
                    outcome = "ok"
                    return self.stats
            raise KVTransferError("KV stream ended before its commit")
        except Exception as e:
            self.fail(e)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            record_transfer("receive", self.transport, self.stats, outcome)

    async def _until_failed(self, messages: AsyncIterator[common_pb2.KVTransferMessage]):
        """The messages, until the receiver fails (timed out, or its request ended): then the stream is refused,
        and nothing more is written into blocks that may already belong to another request."""
        iterator = aiter(messages)
        while True:
            if self.committed.done():
                raise KVTransferError("the reservation ended: its request was cancelled, timed out or failed",
                                      grpc.StatusCode.ABORTED)
            message = asyncio.ensure_future(anext(iterator))
            # Its outcome may go unread (the stream's end as this RPC is cancelled): that is fine.
            message.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                await asyncio.wait({message, self.committed}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                message.cancel()
                raise
            if not message.done() or self.committed.done():  # (a message and the end can come in one wake-up)
                message.cancel()
                await asyncio.gather(message, return_exceptions=True)
                continue  # the check above refuses the stream
            try:
                yield message.result()
            except StopAsyncIteration:
                return

    def _chunk_tensors(self, chunk: KVChunk) -> tuple[torch.Tensor, torch.Tensor]:
        if not chunk.staged:
            return decode_chunk(chunk, self.layout, self.num_tokens)
        if self.staging is None or self.transport == GRPC:
            raise KVIntegrityError("a staged chunk, but this transfer has no staging buffer")
        check_chunk_bounds(chunk, self.layout, self.num_tokens)
        (k_off, length), (v_off, _) = self.staged.ranges(chunk.layer, chunk.token_start, chunk.token_count)
        buffer = self.staging.tensor
        if region_checksum(buffer, k_off, v_off, length) != chunk.crc32:
            end = chunk.token_start + chunk.token_count
            raise KVIntegrityError(f"checksum mismatch in layer {chunk.layer} tokens [{chunk.token_start}, {end})")
        return byte_view(buffer, k_off, length, self.layout), byte_view(buffer, v_off, length, self.layout)

    def _check_header(self, header: common_pb2.KVHeader) -> None:
        problem = self.layout.mismatch(convert.layout_from_pb(header.layout))
        if problem:
            raise KVLayoutMismatch(problem)
        if header.num_tokens != self.num_tokens:
            raise KVIntegrityError(f"sender has {header.num_tokens} prompt tokens, receiver expects {self.num_tokens}")
        if header.kv_hash != self.kv_hash:
            raise KVBindingMismatch(f"the KV offered for request {header.request_id!r} was computed from other tokens "
                                    f"than this request's prompt (kv_hash {header.kv_hash[:12] or 'none'}, "
                                    f"expected {self.kv_hash[:12]})")
        transport = header.transport or GRPC
        if transport != GRPC and (self.staging is None or self.staging.transport != transport):
            raise KVTransferError(f"the sender chose transport {transport!r}, which this reservation did not offer",
                                  grpc.StatusCode.FAILED_PRECONDITION)
        self.transport = transport

    def _check_commit(self, commit: common_pb2.KVCommit) -> None:
        if len(self._layers_seen) != self.layout.num_layers:
            raise KVIntegrityError(f"commit after {len(self._layers_seen)} of {self.layout.num_layers} layers")
        expected = self.layout.num_layers * self.num_tokens * self.layout.bytes_per_token_per_layer
        if self.stats.num_bytes != expected:
            raise KVIntegrityError(f"received {self.stats.num_bytes} bytes of KV, expected {expected}")
        if commit.num_chunks != self.stats.num_chunks or commit.num_bytes != self.stats.num_bytes:
            raise KVIntegrityError(
                f"commit counts {commit.num_chunks} chunks / {commit.num_bytes} bytes, "
                f"received {self.stats.num_chunks} / {self.stats.num_bytes}"
            )
