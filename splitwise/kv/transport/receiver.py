"""The receiver's end of one request's KV transfer, on the token worker (or a resumed request's pull from the
kv_store).

Interface: constructed when the request's blocks are reserved, with its staging buffer when the transport
writes into one; `offer` says where the sender writes; `consume` applies the control stream's messages;
`poll` for the state; `fail` when the request ends or a deadline passes; `close` lets the staging go.

What it takes is checked before it is written anywhere: the header's layout and kv_hash (only KV of exactly
these tokens), each chunk's bounds and checksum, and the commit's counts against what arrived.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import time
from typing import AsyncIterator, Callable

import grpc
import torch

from splitwise.engine.sampling import SampledToken
from splitwise.kv.binding import KVBindingMismatch, kv_hash
from splitwise.kv.chunks import KVChunk, KVIntegrityError, check_chunk_bounds, decode_chunk, layers_named
from splitwise.kv.layout import KVLayout, KVLayoutMismatch
from splitwise.kv.transport.base import (Fault, KVTransferError, StagingBuffer, TransferState, TransferStats,
                                         TransportOffer, record_transfer)
from splitwise.kv.transport.registry import GRPC
from splitwise.kv.transport.staged import StagedLayout, ranges_checksum, run_ranges, run_views
from splitwise.rpc import convert
from splitwise.rpc.kv_wire import ChunkMessage
from splitwise.rpc.v1 import common_pb2

# Where received KV goes: (layer, first position, keys, values), keys/values [tokens, kv_heads, head_dim]; or, for
# a staged run of layers, [layers, tokens, kv_heads, head_dim] of the layers from `layer` on, in one call.
KVSink = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class KVReceiver:
    """Writes one reserved request's incoming transfer through `sink` and resolves with the commit. Only KV of
    exactly `token_ids` (its header's kv_hash) is taken: any other is refused before a byte is written."""

    def __init__(self, sink: KVSink, layout: KVLayout, token_ids: list[int], owner: object = None,
                 staging: StagingBuffer | None = None):
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
        self._consuming = False
        self._expired = False
        self._reader: asyncio.Task | None = None  # the task awaiting the stream's next message, while it waits
        self._interrupted = False  # fail() cancelled that wait

    @property
    def layers_received(self) -> frozenset[int]:
        return frozenset(self._layers_seen)

    def fail(self, error: Exception) -> None:
        if not self.committed.done():
            self.state = TransferState.FAILED
            self.committed.set_exception(error)
            reader = self._reader
            if reader is not None and reader is not asyncio.current_task():  # the stream is refused at once
                self._interrupted = True
                reader.cancel()

    def expire(self, problem: str) -> None:
        """The reservation's lease ran out (the KV did not start arriving, or stalled, in time): the transfer
        fails with DEADLINE_EXCEEDED, and nothing more is written into its blocks."""
        if self.committed.done():
            return
        self._expired = True
        if not self._consuming:  # no stream ever came: count it here, as a consuming stream does when it ends
            record_transfer("receive", self.transport, self.stats, "expired")
        self.fail(KVTransferError(problem, grpc.StatusCode.DEADLINE_EXCEEDED))

    def offer(self) -> TransportOffer:
        """Where the sender writes this transfer's bytes (nowhere but the stream, for gRPC). Every offer takes runs
        of layers: one chunk for several layers, staged or in the message."""
        if self.staging is None:
            return TransportOffer(layer_runs=True)
        return dataclasses.replace(self.staging.offer(), layer_runs=True)

    def poll(self) -> TransferState:
        return self.state

    def close(self) -> None:
        """Lets the staging buffer go. After a commit the sender has provably stopped writing (it writes a
        layer before announcing it, nothing after its commit), so the buffer may serve another request;
        after any other end it is destroyed, and a sender writing late finds it gone (shm unlinked,
        Mooncake unregistered)."""
        if self.staging is not None:
            self.staging.close(clean=self.state is TransferState.DONE)
            self.staging = None

    async def consume(self, messages: AsyncIterator[common_pb2.KVTransferMessage]) -> TransferStats:
        """Applies a whole transfer; raises KVIntegrityError / KVTransferError (and fails the waiter)."""
        if self._consuming or self.state in (TransferState.TRANSFERRING, TransferState.DONE):
            # One stream per reservation: a second sender (a stale retry) must not mix its layers in.
            raise KVTransferError("this reservation's KV is being received, or was, from another stream",
                                  grpc.StatusCode.ALREADY_EXISTS)
        self._consuming = True
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
                    # (a sender in this process hands its chunk over as it is)
                    chunk = msg.kv_chunk if isinstance(msg, ChunkMessage) else convert.chunk_from_pb(msg.chunk)
                    cpu = time.thread_time()
                    keys, values = self._chunk_kv(chunk)
                    self.sink(chunk.layer, chunk.token_start, keys, values)
                    self._layers_seen.update(range(chunk.layer, chunk.layer + chunk.num_layers))
                    self.stats.cpu_seconds += time.thread_time() - cpu
                    self.stats.num_chunks += 1
                    layers_bytes = chunk.num_layers * self.layout.bytes_per_token_per_layer
                    self.stats.num_bytes += chunk.token_count * layers_bytes
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
                elif kind == "abort":
                    raise KVTransferError(f"the sender gave up: {msg.abort.reason or 'no reason given'}",
                                          convert.status_code(msg.abort.code), Fault.SENDER)
            raise KVTransferError("KV stream ended before its commit", fault=Fault.SENDER)
        except Exception as e:
            self.fail(e)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            record_transfer("receive", self.transport, self.stats, "expired" if self._expired else outcome)

    async def _until_failed(self, messages: AsyncIterator[common_pb2.KVTransferMessage]):
        """The messages, until the receiver fails (timed out, or its request ended): then the stream is refused,
        and nothing more is written into blocks that may already belong to another request."""
        # No task or wait per message (a layer-wise transfer is a message per layer, on the decode core): the
        # read is awaited directly, and fail() cancels it.
        iterator = aiter(messages)
        task = asyncio.current_task()
        while True:
            if self.committed.done():
                raise KVTransferError("the reservation ended: its request was cancelled, timed out or failed",
                                      grpc.StatusCode.ABORTED)
            self._reader = task
            try:
                message = await anext(iterator)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not self._interrupted or task.uncancel() > 0:  # (a cancellation of the call itself stays one)
                    raise
                continue  # the check above refuses the stream
            finally:
                self._reader = None
                self._interrupted = False
            yield message

    def _chunk_kv(self, chunk: KVChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's keys and values, verified: [tokens, kv_heads, head_dim] of one layer, or [layers, ...] of a
        run (in the message, or staged)."""
        if not chunk.staged:
            return decode_chunk(chunk, self.layout, self.num_tokens)
        if self.staging is None or self.transport == GRPC:
            raise KVIntegrityError("a staged chunk, but this transfer has no staging buffer")
        check_chunk_bounds(chunk, self.layout, self.num_tokens)
        try:
            buffer = self.staging.tensor
        except OSError as e:  # its allocation failed (this end's), or the sender announced bytes before it could write
            fault = Fault.SENDER if e.errno == errno.ETIMEDOUT else Fault.RECEIVER
            raise KVTransferError(f"the staging buffer cannot be read: {e}", grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  fault) from e
        ranges = run_ranges(self.staged, chunk.layer, chunk.num_layers, chunk.token_start, chunk.token_count)
        if ranges_checksum(buffer, ranges) != chunk.xxh3:
            end = chunk.token_start + chunk.token_count
            raise KVIntegrityError(f"checksum mismatch in {layers_named(chunk)} tokens [{chunk.token_start}, {end})")
        keys, values = run_views(buffer, self.staged, chunk.layer, chunk.num_layers, chunk.token_start,
                                 chunk.token_count)
        return (keys[0], values[0]) if chunk.num_layers == 1 else (keys, values)

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
                                  grpc.StatusCode.FAILED_PRECONDITION, Fault.SENDER)
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
