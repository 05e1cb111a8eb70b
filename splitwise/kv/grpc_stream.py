"""The gRPC-stream KV transport: header, bounded checksummed chunks layer by layer, commit."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import grpc
import torch

from splitwise.engine.sampling import SampledToken
from splitwise.kv.chunks import KVIntegrityError, decode_chunk, split_layer
from splitwise.kv.layout import KVLayout, KVLayoutMismatch
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2, kv_store_pb2_grpc, worker_pb2, worker_pb2_grpc
from splitwise.telemetry import metrics
from splitwise.telemetry.tracing import record_cancelled, record_error, tracer

TRANSPORT = "grpc_stream"

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


class KVSender:
    """Streams one request's KV to a token worker (PushKV) or to the kv_store relay (Put).

    The compute thread calls on_layer_kv as each layer's KV is ready; `send` (a coroutine on the event
    loop) forwards the chunks while later layers still compute.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        target_kind: int,
        request_id: str,
        layout: KVLayout,
        num_tokens: int,
        max_chunk_bytes: int,
        timeout_s: float,
    ):
        self.target = "kv_store" if target_kind == worker_pb2.KVTarget.KIND_KV_STORE else "token_worker"
        if target_kind == worker_pb2.KVTarget.KIND_KV_STORE:
            self._call = kv_store_pb2_grpc.KVStoreStub(channel).Put
        else:
            self._call = worker_pb2_grpc.TokenWorkerStub(channel).PushKV
        self.request_id = request_id
        self.layout = layout
        self.num_tokens = num_tokens
        self.max_chunk_bytes = max_chunk_bytes
        self.timeout_s = timeout_s
        self.stats = TransferStats()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def on_layer_kv(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_start: int) -> None:
        """Compute thread: serialise the layer (a copy, so compute may go on) and hand it to the loop."""
        chunks = list(split_layer(layer, keys, values, token_start, self.layout, self.max_chunk_bytes))
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (layer, chunks))

    def commit(self, first: SampledToken) -> None:
        self._queue.put_nowait(first)

    def abort(self) -> None:
        self._queue.put_nowait(_DONE)

    async def _messages(self, span) -> AsyncIterator[common_pb2.KVTransferMessage]:
        yield common_pb2.KVTransferMessage(
            header=common_pb2.KVHeader(
                request_id=self.request_id, layout=convert.layout_to_pb(self.layout), num_tokens=self.num_tokens
            )
        )
        while True:
            item = await self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, SampledToken):
                yield common_pb2.KVTransferMessage(
                    commit=common_pb2.KVCommit(
                        first_token_id=item.token_id,
                        first_token_logprob=item.logprob,
                        num_chunks=self.stats.num_chunks,
                        num_bytes=self.stats.num_bytes,
                    )
                )
                return
            layer, chunks = item
            layer_bytes = 0
            for chunk in chunks:
                yield convert.chunk_to_pb(chunk)
                layer_bytes += chunk.num_bytes
                self.stats.num_chunks += 1
            self.stats.num_bytes += layer_bytes
            self.stats.num_layers += 1
            span.add_event("kv.layer_sent", {"kv.layer": layer, "kv.bytes": layer_bytes})

    async def send(self) -> TransferStats:
        with tracer().start_as_current_span("kv_transfer.send") as span:
            span.set_attributes({"splitwise.request_id": self.request_id, "kv.transport": TRANSPORT,
                                 "kv.target": self.target})
            start = time.perf_counter()
            outcome = "failed"
            try:
                await self._call(self._messages(span), timeout=self.timeout_s)
                outcome = "ok"
            except grpc.aio.AioRpcError as e:
                error = KVTransferError(f"KV transfer failed: {e.code().name}: {e.details()}", e.code())
                record_error(span, error)
                raise error from e
            except asyncio.CancelledError:
                outcome = "cancelled"
                record_cancelled(span, "request ended")
                raise
            finally:
                self.stats.seconds = time.perf_counter() - start
                span.set_attributes(self.stats.attributes())
                record_transfer("send", self.stats, outcome)
            return self.stats


def record_transfer(direction: str, stats: TransferStats, outcome: str) -> None:
    attributes = {"direction": direction, "transport": TRANSPORT}
    metrics.kv_transferred.add(stats.num_bytes, attributes)
    metrics.kv_transfers.add(1, {**attributes, "outcome": outcome})
    if outcome == "ok":
        metrics.kv_transfer_duration.record(stats.seconds, attributes)


# Where received KV goes: (layer, first position, keys, values), keys/values [tokens, kv_heads, head_dim].
KVSink = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class KVReceiver:
    """Writes one reserved request's incoming transfer through `sink` and resolves with the commit."""

    def __init__(self, sink: KVSink, layout: KVLayout, num_tokens: int, owner: object = None):
        self.sink = sink
        self.owner = owner  # what the receiver belongs to, so cleanup can tell requests with one id apart
        self.layout = layout
        self.num_tokens = num_tokens
        self.stats = TransferStats()
        self.committed: asyncio.Future[SampledToken] = asyncio.get_running_loop().create_future()
        self._layers_seen: set[int] = set()

    @property
    def layers_received(self) -> frozenset[int]:
        return frozenset(self._layers_seen)

    def fail(self, error: Exception) -> None:
        if not self.committed.done():
            self.committed.set_exception(error)

    async def consume(self, messages: AsyncIterator[common_pb2.KVTransferMessage]) -> TransferStats:
        """Applies a whole transfer; raises KVIntegrityError / KVTransferError (and fails the waiter)."""
        start = time.perf_counter()
        outcome = "failed"
        try:
            async for msg in messages:
                kind = msg.WhichOneof("kind")
                if kind == "header":
                    self._check_header(msg.header)
                elif kind == "chunk":
                    chunk = convert.chunk_from_pb(msg.chunk)
                    keys, values = decode_chunk(chunk, self.layout, self.num_tokens)
                    self.sink(chunk.layer, chunk.token_start, keys, values)
                    self._layers_seen.add(chunk.layer)
                    self.stats.num_chunks += 1
                    self.stats.num_bytes += chunk.num_bytes
                elif kind == "commit":
                    self._check_commit(msg.commit)
                    self.stats.num_layers = len(self._layers_seen)
                    self.stats.seconds = time.perf_counter() - start
                    if not self.committed.done():
                        self.committed.set_result(
                            SampledToken(msg.commit.first_token_id, msg.commit.first_token_logprob)
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
            record_transfer("receive", self.stats, outcome)

    def _check_header(self, header: common_pb2.KVHeader) -> None:
        problem = self.layout.mismatch(convert.layout_from_pb(header.layout))
        if problem:
            raise KVLayoutMismatch(problem)
        if header.num_tokens != self.num_tokens:
            raise KVIntegrityError(f"sender has {header.num_tokens} prompt tokens, receiver expects {self.num_tokens}")

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
