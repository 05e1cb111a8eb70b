"""The sender's end of one request's KV transfer, on the prompt worker.

Interface (as SGLang's KVSender, vLLM's connector): constructed for the receiver's offer, then
`send_layer` per layer from the compute thread, `commit` with the first token, `poll` for the state,
`abort` when the request ends; `send` runs the control stream on the event loop.

The control stream is one stream of messages: a header, a chunk per layer (or bounded run of a layer), a
commit. Its bytes ride in the chunk messages (grpc), or a StagedWriter puts them straight into the receiver's
staging buffer first and the chunk only says where they are and their checksum. The stream itself is opened
by the caller (`open_stream`, from `splitwise.rpc.kv_stream`): this module builds no gRPC stub.

Deadlines measure progress, not waiting in line: a sender waiting for its prefill to compute is not stalled;
a peer that stops taking data, or a staged write that does not return, for `progress_timeout_s` is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import grpc
import torch
import xxhash

from splitwise.engine.sampling import SampledToken
from splitwise.kv.binding import kv_hash
from splitwise.kv.chunks import KVChunk, run_chunk, split_layer
from splitwise.kv.layout import KVLayout
from splitwise.kv.transport.base import (Fault, KVTransferError, StagedWriter, TransferState, TransferStats,
                                         record_transfer)
from splitwise.kv.transport.registry import GRPC
from splitwise.kv.transport.staged import StagedLayout, copy_layer, run_ranges, stage_layer
from splitwise.rpc import convert
from splitwise.rpc.kv_wire import ChunkMessage
from splitwise.rpc.v1 import common_pb2
from splitwise.telemetry.tracing import record_cancelled, record_error, tracer

# Opens the control stream to the receiver and resolves when the receiver acknowledged the commit; raises
# KVTransferError (with the receiver's status) when the receiver refused or is unreachable.
OpenStream = Callable[[AsyncIterator[common_pb2.KVTransferMessage]], Awaitable[object]]

_DONE = object()
# The most bytes one staged run of layers announces: a small transfer goes as one message, a large one in runs of
# about this size, so that the receiver verifies and copies one run while the next is announced (or written, remote).
MAX_RUN_BYTES = 8 << 20


@dataclass
class _Encoded:
    layer: int
    chunks: list[KVChunk]
    ranges: list[tuple[int, int]]  # staged bytes to flush before the chunks are announced
    num_layers: int = 1  # a run of layers [layer, layer + num_layers), staged, in one chunk


@dataclass
class _Commit:  # serialized mode: the first token, queued after the last encoded layer
    first: SampledToken


@dataclass
class _StagedRun:
    """Serialized mode with a staged writer: consecutive layers of one token range, staged (and checksummed) on the
    compute thread while the prefill runs, announced as one chunk after it."""

    layer: int
    token_start: int
    token_count: int
    digest: "xxhash.xxh3_64"
    num_layers: int = 0

    def encoded(self, staged: StagedLayout) -> _Encoded:
        chunk = KVChunk(self.layer, self.token_start, self.token_count, b"", b"", self.digest.intdigest(),
                        staged=True, num_layers=self.num_layers)
        return _Encoded(self.layer, [chunk], run_ranges(staged, self.layer, self.num_layers, self.token_start,
                                                        self.token_count), self.num_layers)


@dataclass
class _Held:  # serialized mode over gRPC: a layer kept until the prefill ends
    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    token_start: int


class KVSender:
    """Streams one request's KV to its receiver (a token worker, or the kv_store relay), named by `target`.

    Layer-wise, each layer is encoded (staged) on the compute thread as soon as it is ready and `send`, on
    the event loop, ships it while later layers compute. Serialized, the layers are announced after the prefill:
    to a receiver that takes layer runs (`layer_runs`, from its offer), the layers of one token range (the whole
    prompt, or each chunk of a chunked prefill) go as one run, one message and one checksum for them all, so a
    transfer's fixed cost is paid once rather than per layer. With a staged writer (shm, Mooncake) each layer is
    still staged on the compute thread as it is ready, the run's checksum taken as it grows, so what is left after
    the prefill is the announcement (and a remote writer's flush), not a copy; over gRPC the layers are copied
    during the prefill and encoded into messages of their bytes (up to max_chunk_bytes) after it.
    """

    def __init__(self, open_stream: OpenStream, target: str, request_id: str, layout: KVLayout,
                 token_ids: list[int], max_chunk_bytes: int, progress_timeout_s: float,
                 writer: StagedWriter | None = None, layerwise: bool = True, span_name: str = "kv_transfer.send",
                 layer_runs: bool = False):
        self._open_stream = open_stream
        self.target = target
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
        self.layer_runs = layer_runs
        self.span_name = span_name
        self.state = TransferState.WAITING
        self.stats = TransferStats()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._waiting_for_compute = True
        self._last_progress = self._loop.time()
        self._stalled = False
        self._stall = asyncio.Event()  # set by the watchdog when a staged write does not return in time
        self._flushing = False
        self._aborted = False
        self._transfer_started: float | None = None  # the first layer's bytes started moving
        self._error: KVTransferError | None = None  # a staged write that failed; the stream stops short
        # Serialized with a staged writer: the runs staged so far (compute thread), announced at the commit.
        self._staged_runs: list[_StagedRun] | None = [] if writer is not None and not layerwise else None

    def poll(self) -> TransferState:
        return self.state

    def on_layer_kv(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_start: int) -> None:
        """Compute thread: keys/values [kv_heads, tokens, head_dim] of positions token_start onwards. They are
        copied out at once (compute goes on and may overwrite them) and handed to the loop."""
        if self._aborted:  # the request ended: a step still finishing its layers writes nothing more
            return
        if self.layerwise:
            item = self._encode(layer, keys, values, token_start)
        elif self._staged_runs is not None:
            self._stage_into_run(layer, keys, values, token_start)
            return
        else:
            item = _Held(layer, keys.clone(), values.clone(), token_start)
        if item is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    send_layer = on_layer_kv

    def _encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_start: int) -> _Encoded | None:
        cpu = time.thread_time()
        try:
            if self.writer is None:
                return _Encoded(layer, list(split_layer(layer, keys, values, token_start, self.layout,
                                                        self.max_chunk_bytes)), [])
            buffer = self._staging_buffer()
            if buffer is None:
                return None if self._error is None else _Encoded(layer, [], [])  # (the stream tells the receiver)
            digest = stage_layer(buffer, self.staged, layer, token_start, keys, values)
            count = keys.shape[1]
            return _Encoded(layer, [KVChunk(layer, token_start, count, b"", b"", digest, staged=True)],
                            list(self.staged.ranges(layer, token_start, count)))
        finally:
            self.stats.cpu_seconds += time.thread_time() - cpu  # one writer at a time: layers come in order

    def _stage_into_run(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_start: int) -> None:
        """Compute thread, serialized with a staged writer: the layer goes into the receiver's buffer now, and into
        the open run's checksum (a run's digest is over its merged ranges in order, as the receiver takes it)."""
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            buffer = self._staging_buffer()
            if buffer is None:  # gone, or unusable: `_error` says why, and the stream tells the receiver
                return
            ranges = copy_layer(buffer, self.staged, layer, token_start, keys, values)
            count = keys.shape[1]
            run = self._staged_runs[-1] if self._staged_runs else None
            if not (self.layer_runs and run and layer == run.layer + run.num_layers and token_start == run.token_start
                    and count == run.token_count
                    and (run.num_layers + 1) * count * self.layout.bytes_per_token_per_layer <= MAX_RUN_BYTES):
                run = _StagedRun(layer, token_start, count, xxhash.xxh3_64())
                self._staged_runs.append(run)
            data = buffer.numpy()
            for offset, length in ranges:
                run.digest.update(data[offset:offset + length])
            run.num_layers += 1
        finally:
            self.stats.cpu_seconds += time.thread_time() - cpu
            self.stats.staging_seconds += time.perf_counter() - wall

    def _staging_buffer(self) -> torch.Tensor | None:
        """The writer's buffer (a reference keeps the mapping alive even if the writer closes meanwhile), or None when
        it is gone or cannot be written (then `_error` says why: a receiver that could not allocate its buffer)."""
        if self._error is not None:
            return None
        try:
            return self.writer.buffer
        except OSError as e:
            self._error = KVTransferError(f"KV transfer failed: the receiver's {self.transport} buffer cannot be "
                                          f"written: {e}", grpc.StatusCode.RESOURCE_EXHAUSTED, Fault.RECEIVER)
            return None

    def commit(self, first: SampledToken) -> None:
        """The prefill is over: `first` goes to the receiver after the last layer."""
        self._queue.put_nowait(first)

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """The request ended: nothing more is staged or sent, and the stream ends without a commit."""
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

    async def _chunk_messages(self, encoded: _Encoded, span) -> AsyncIterator[common_pb2.KVTransferMessage]:
        """The chunk messages of an encoded layer, after its staged bytes reached the receiver."""
        self._start_transfer()
        if encoded.ranges and self.writer is not None and self.writer.remote:
            await self._flush(encoded)
            if self._error or self._aborted:
                return
            self._progress()
        layer_bytes = 0
        for chunk in encoded.chunks:
            yield ChunkMessage(chunk)  # (its bytes are copied once, onto the wire)
            self._progress()
            layer_bytes += chunk.token_count * chunk.num_layers * self.layout.bytes_per_token_per_layer
            self.stats.num_chunks += 1
        self.stats.num_bytes += layer_bytes
        self.stats.num_layers += encoded.num_layers
        event = {"kv.layer": encoded.layer, "kv.bytes": layer_bytes}
        if encoded.num_layers > 1:
            event["kv.layers"] = encoded.num_layers
        span.add_event("kv.layer_sent", event)

    async def _flush(self, encoded: _Encoded) -> None:
        """The staged write of a layer, off the loop; a failure or a stall is kept in `_error`, for the stream
        to tell the receiver before it ends."""
        flush = asyncio.ensure_future(asyncio.to_thread(self.writer.flush, encoded.ranges))
        flush.add_done_callback(lambda f: f.cancelled() or f.exception())  # a write left behind may fail late
        stall = asyncio.ensure_future(self._stall.wait())
        self._flushing = True
        try:
            await asyncio.wait({flush, stall}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._flushing = False
            stall.cancel()
        if not flush.done():
            self._error = KVTransferError(f"KV transfer stalled: the {self.transport} write of layer {encoded.layer} "
                                          f"did not return within {self.progress_timeout_s}s",
                                          grpc.StatusCode.DEADLINE_EXCEEDED, Fault.SENDER)
        elif flush.exception() is not None:  # whatever the backend raised, this layer did not land
            self._error = KVTransferError(f"KV transfer failed: {self.transport} write of layer "
                                          f"{encoded.layer}: {flush.exception()}", fault=Fault.SENDER)

    def _abort_message(self) -> common_pb2.KVTransferMessage:
        return common_pb2.KVTransferMessage(abort=common_pb2.KVAbort(reason=str(self._error),
                                                                     code=self._error.code.value[0]))

    def _commit_message(self, first: SampledToken) -> common_pb2.KVTransferMessage:
        commit = common_pb2.KVCommit(
            first_token_id=first.token_id, first_token_logprob=first.logprob,
            num_chunks=self.stats.num_chunks, num_bytes=self.stats.num_bytes,
        )
        if first.top_logprobs:
            commit.first_token_top_logprobs.CopyFrom(convert.top_logprobs_to_pb(first.top_logprobs))
        return common_pb2.KVTransferMessage(commit=commit)

    async def _messages(self, span) -> AsyncIterator[common_pb2.KVTransferMessage]:
        yield common_pb2.KVTransferMessage(header=common_pb2.KVHeader(
            request_id=self.request_id, layout=convert.layout_to_pb(self.layout), num_tokens=self.num_tokens,
            transport=self.transport, kv_hash=self.kv_hash,
        ))
        held: list[_Held] = []
        while True:
            item = await self._next_item()
            if item is _DONE or self._aborted:  # (what was queued before the abort goes unsent)
                return
            if isinstance(item, _Held):
                held.append(item)
            elif isinstance(item, _Encoded):
                async for msg in self._chunk_messages(item, span):
                    yield msg
                if self._error:  # the receiver fails the transfer too, for the cause named here
                    yield self._abort_message()
                    return
            elif self._staged_runs is not None and not isinstance(item, _Commit):
                # Serialized, staged during the prefill, which is over: announce the runs (flushing each first where
                # the writer is remote), then commit.
                self._start_transfer()
                for run in [] if self._error else self._staged_runs:
                    async for msg in self._chunk_messages(run.encoded(self.staged), span):
                        yield msg
                    if self._error or self._aborted:
                        break
                if self._aborted:
                    return
                if self._error:
                    yield self._abort_message()
                    return
                yield self._commit_message(item)
                self._progress()
                return
            elif held:  # serialized, and the prefill is over: encode the layers now, in order, then commit
                self._start_transfer()
                self._loop.run_in_executor(None, self._encode_held, held, _Commit(item))
                held = []
            else:  # the first token, after every layer
                yield self._commit_message(item.first if isinstance(item, _Commit) else item)
                self._progress()  # from here, the acknowledgement has progress_timeout_s to come
                return

    def _encode_held(self, held: list[_Held], commit: _Commit) -> None:
        """A worker thread: the serialized layers, each layer or run of layers handed to the loop as soon as it is
        encoded."""
        for run in self._runs(held):
            if len(run) == 1:
                encoded = self._encode(run[0].layer, run[0].keys, run[0].values, run[0].token_start)
            else:
                encoded = self._encode_run(run)
            if encoded is None:  # aborted meanwhile
                return
            self._loop.call_soon_threadsafe(self._queue.put_nowait, encoded)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, commit)

    def _runs(self, held: list[_Held]) -> list[list[_Held]]:
        """The held layers as runs: consecutive layers of one token range, where the receiver takes runs, at most
        max_chunk_bytes in a message (a layer bigger than that goes alone, in chunks of tokens)."""
        bound = self.max_chunk_bytes
        runs: list[list[_Held]] = []
        for raw in held:
            run = runs[-1] if runs else None
            tokens = raw.keys.shape[1]
            if (self.layer_runs and run and raw.layer == run[-1].layer + 1 and raw.token_start == run[-1].token_start
                    and tokens == run[-1].keys.shape[1]
                    and (len(run) + 1) * tokens * self.layout.bytes_per_token_per_layer <= bound):
                run.append(raw)
            else:
                runs.append([raw])
        return runs

    def _encode_run(self, run: list[_Held]) -> _Encoded | None:
        """Copies a run of layers into one message's bytes, with one checksum over them all (in layer order, keys
        then values)."""
        if self._aborted:
            return None
        cpu = time.thread_time()
        try:
            chunk = run_chunk(run[0].layer, [raw.keys for raw in run], [raw.values for raw in run],
                              run[0].token_start)
            return _Encoded(run[0].layer, [chunk], [], len(run))
        finally:
            self.stats.cpu_seconds += time.thread_time() - cpu

    async def _watch(self, stream: asyncio.Future) -> None:
        """Cancels the stream when the transfer stalls outside of waiting for compute."""
        while True:
            await asyncio.sleep(min(1.0, self.progress_timeout_s / 4))
            if not self._waiting_for_compute and self._loop.time() - self._last_progress > self.progress_timeout_s:
                self._stalled = True
                if self._flushing and not self._stall.is_set():
                    # A staged write hangs, the stream does not: it tells the receiver why, then ends.
                    self._stall.set()
                    self._progress()
                    continue
                stream.cancel()
                return

    async def send(self) -> TransferStats:
        """Runs the transfer to its acknowledged commit; raises KVTransferError when it cannot complete."""
        with tracer().start_as_current_span(self.span_name) as span:
            span.set_attributes({"splitwise.request_id": self.request_id, "kv.transport": self.transport,
                                 "kv.target": self.target, "kv.layerwise": self.layerwise})
            outcome = "failed"
            # No overall timeout: progress is watched instead.
            stream = asyncio.ensure_future(self._open_stream(self._messages(span)))
            watchdog = asyncio.create_task(self._watch(stream))
            try:
                await stream
                outcome = "ok"
                self.state = TransferState.DONE
            except KVTransferError as e:
                error = self._error or e  # a failed staged write ended the stream: it is the cause
                record_error(span, error)
                if error is e:
                    raise
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
