"""The TokenWorker servicer: reserves KV blocks for a request, receives its KV layer by layer, and decodes it
in the engine's continuous batch. A mixed worker also runs the prompt phase of colocated requests."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc

from splitwise.channels import ChannelPool, end_stream
from splitwise.engine.block_manager import KVCapacityError
from splitwise.engine.llm_engine import Engine
from splitwise.engine.request_handle import Finished, RequestFailed, RequestHandle
from splitwise.engine.sampling import SampledToken
from splitwise.kv.chunks import KVIntegrityError
from splitwise.kv.transport.base import Fault, KVTransferError, TransferState
from splitwise.kv.transport.receiver import KVReceiver
from splitwise.kv.transport.registry import WorkerTransports
from splitwise.kv.transport.staged import StagedLayout
from splitwise.kv.layout import KVLayout, KVLayoutMismatch
from splitwise.rpc import convert
from splitwise.rpc.errors import abort_transfer, capacity_status, engine_status
from splitwise.rpc.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc, worker_pb2, worker_pb2_grpc
from splitwise.telemetry.tracing import record_cancelled, record_error, rpc_span, tracer

log = logging.getLogger(__name__)

# How long a resumed request waits for its kept KV to start arriving from the kv_store (it was stored, or is
# being stored, when its first token was sampled); after that the token worker recomputes the prompt itself.
RESUME_KV_WAIT_S = 5.0
MODE_NAMES = {mode: worker_pb2.DecodeMode.Name(mode).removeprefix("DECODE_MODE_").lower()
              for mode in worker_pb2.DecodeMode.values()}


def decode_mode(request: worker_pb2.DecodeRequest) -> int:
    """The request's decode mode: as the scheduler named it, or (unnamed) as its fields imply. Raises ValueError when
    the fields contradict the named mode, or name none that exists."""
    from_store = request.kv_source.kind == worker_pb2.KVTarget.KIND_KV_STORE
    implied = convert.decode_mode_of(request.prefill_here, from_store, bool(request.output_token_ids))
    mode = request.mode
    if mode == worker_pb2.DECODE_MODE_UNSPECIFIED:
        return implied
    if mode not in MODE_NAMES:
        raise ValueError(f"unknown decode mode {mode}; the modes are {', '.join(n for m, n in MODE_NAMES.items() if m)}")
    if mode != implied:
        raise ValueError(f"decode mode {MODE_NAMES[mode]}, but the request's fields say {MODE_NAMES[implied]} "
                         f"(prefill_here={request.prefill_here}, kv_source from the kv_store: {from_store}, "
                         f"{len(request.output_token_ids)} output tokens streamed before)")
    return mode


class KeptKVUnavailable(Exception):
    """A resumed request's prompt KV, kept in the kv_store, cannot be had (gone, expired, incomplete, corrupt)."""


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


class TokenWorkerServicer(worker_pb2_grpc.TokenWorkerServicer):
    def __init__(self, engine: Engine, layout: KVLayout, channels: ChannelPool, kv_wait_timeout_s: float,
                 kv_progress_timeout_s: float = 30.0):
        self.engine = engine
        self.layout = layout
        self.channels = channels
        self.kv_wait_timeout_s = kv_wait_timeout_s
        self.kv_progress_timeout_s = kv_progress_timeout_s
        self.transports = WorkerTransports()  # until the worker knows its address: gRPC only
        self.receivers: dict[str, KVReceiver] = {}
        self.draining = False

    def _validate(self, request: worker_pb2.DecodeRequest):
        params = convert.sampling_from_pb(request.sampling)
        params.validate()
        ids = list(request.prompt_token_ids)
        vocab = self.engine.loaded.config.vocab_size
        if not request.request_id:
            raise ValueError("request_id is required")
        if not ids or len(ids) != request.num_prompt_tokens:
            raise ValueError("prompt_token_ids must hold the num_prompt_tokens > 0 prompt tokens")
        output = list(request.output_token_ids)
        if any(t < 0 or t >= vocab for t in ids + output):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if len(output) >= params.max_tokens:
            raise ValueError(f"a resumed request has {len(output)} output tokens already: no more than max_tokens - 1")
        return ids, output, params, decode_mode(request)

    async def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        """A request's life here: admitted (its KV blocks reserved, or its prompt queued to prefill here), Reserved
        sent, its prompt KV taken as its mode says (pushed, relayed, or a resumed request's kept copy), then decoded
        in the engine's batch until it finishes."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "token worker is draining")
        try:
            ids, output, params, mode = self._validate(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id
        span = rpc_span()
        span.set_attributes({"splitwise.request_id": rid, "prompt.tokens": len(ids),
                             "colocated": request.prefill_here, "resumed.output_tokens": len(output),
                             "decode.mode": MODE_NAMES[mode]})
        handle = await self._admit(mode, rid, ids, output, params, context, span)
        pull: list[asyncio.Task] = []
        # Cleanup runs when the RPC ends however it ends; a cancelled stream's generator may be
        # finalised much later.
        context.add_done_callback(lambda _: self._release(handle, pull))
        try:
            receiver = None if mode == worker_pb2.DECODE_MODE_PREFILL_HERE else self._receiver(request, handle, ids)
            offer = convert.offer_to_pb(receiver.offer()) if receiver is not None else None
            yield worker_pb2.DecodeEvent(reserved=worker_pb2.Reserved(
                layout=convert.layout_to_pb(self.layout), reserved_tokens=len(ids), offer=offer))
            if receiver is not None:
                fallback = await self._take_kv(mode, request, receiver, handle, output, pull, context, span)
                if fallback is not None:
                    yield fallback
            async for event in self._stream(handle, context):
                yield event
        except asyncio.CancelledError:
            record_cancelled(span, "scheduler")
            raise
        finally:
            self._release(handle, pull)

    async def _admit(self, mode: int, rid: str, ids: list[int], output: list[int], params, context,
                     span) -> RequestHandle:
        """Blocks reserved for the KV to come, or (prefilled here) the prompt queued in the engine."""
        with tracer().start_as_current_span("token_worker.admission") as admission:
            try:
                if mode == worker_pb2.DECODE_MODE_PREFILL_HERE:
                    handle = self.engine.submit(rid, ids, params, output_ids=output)
                else:
                    handle = self.engine.reserve(rid, ids, params)
            except KVCapacityError as e:
                record_error(admission, e)
                record_error(span, e)
                await context.abort(capacity_status(e), str(e))
            except ValueError as e:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
            blocks = self.engine.blocks
            admission.set_attributes({"kv.blocks_reserved": len(handle.seq.block_table),
                                      "kv.blocks_free": blocks.num_free, "kv.blocks_total": blocks.num_blocks})
        return handle

    def _receiver(self, request: worker_pb2.DecodeRequest, handle: RequestHandle, ids: list[int]) -> KVReceiver:
        """The reservation's receiver (and its staging buffer, if the transport writes into one). It exists before
        the scheduler learns of the reservation, so the sender always finds it."""
        staging = None
        if request.kv_source.kind != worker_pb2.KVTarget.KIND_KV_STORE:
            staging = self.transports.staging(request.kv_transport, StagedLayout(self.layout, len(ids)).total_bytes)
        receiver = self.receivers[request.request_id] = KVReceiver(
            lambda layer, start, k, v: self.engine.write_kv(handle, layer, start, k, v),
            self.layout, ids, owner=handle, staging=staging)
        return receiver

    async def _take_kv(self, mode: int, request: worker_pb2.DecodeRequest, receiver: KVReceiver,
                       handle: RequestHandle, output: list[int], pull: list[asyncio.Task], context,
                       span) -> worker_pb2.DecodeEvent | None:
        """Waits for the prompt KV (pulling it from the kv_store when relayed or kept) and starts decoding on it.
        A resumed request whose kept copy cannot be had is recomputed here instead: the KVFallback event to send."""
        rid = request.request_id
        if mode in (worker_pb2.DECODE_MODE_RELAYED, worker_pb2.DECODE_MODE_RESUME_KEPT):
            stored_as = request.kv_source.request_id or rid
            # A resumed request's KV is in the kv_store already, or on its way: no long wait for it.
            resumed = mode == worker_pb2.DECODE_MODE_RESUME_KEPT
            wait_s = min(RESUME_KV_WAIT_S, self.kv_wait_timeout_s) if resumed else self.kv_wait_timeout_s
            pull.append(asyncio.create_task(
                self._pull_from_store(receiver, stored_as, request.kv_source.address, wait_s)))
        try:
            # A resumed request's prompt KV is a kept copy: if it cannot be had, the prompt is recomputed.
            first = await self._wait_for_kv(receiver, context, fallible=mode == worker_pb2.DECODE_MODE_RESUME_KEPT)
        except KeptKVUnavailable as e:
            for task in pull:
                task.cancel()
            await asyncio.gather(*pull, return_exceptions=True)  # nothing more is written into the blocks
            self._drop_receiver(handle)
            span.add_event("kv_fallback", {"reason": str(e)})
            log.warning("request %s: its kept KV cannot be had (%s); recomputing its prompt here", rid, e)
            self.engine.resume_decoding(handle, output, prompt_kv_arrived=False)
            return worker_pb2.DecodeEvent(kv_fallback=worker_pb2.KVFallback(reason=str(e)))
        receiver.close()  # the KV is in its blocks now: the staging buffer goes back at once
        if output:  # resumed: recompute the tokens streamed before, then go on
            self.engine.resume_decoding(handle, output)
        else:
            self.engine.start_decoding(handle, first)
        return None

    def _release(self, handle: RequestHandle, pull: list[asyncio.Task]) -> None:
        """Frees what this request holds here (and nothing of a later request with the same id)."""
        for task in pull:
            task.cancel()
        self._drop_receiver(handle)
        self.engine.abort(handle.seq.request_id, handle)

    def _drop_receiver(self, handle: RequestHandle) -> None:
        rid = handle.seq.request_id
        receiver = self.receivers.get(rid)
        if receiver is not None and receiver.owner is handle:
            del self.receivers[rid]
            receiver.fail(KVTransferError("the request ended before its KV arrived"))
            receiver.close()

    async def _wait_for_kv(self, receiver: KVReceiver, context, fallible: bool = False) -> SampledToken:
        """The first token once the KV has arrived; deadlines count the wait for its start and pauses within it.

        A failed transfer ends the call with its status, or with `fallible` raises KeptKVUnavailable.
        """
        loop = asyncio.get_running_loop()
        waiting_since = loop.time()
        with tracer().start_as_current_span("kv_transfer.receive") as span:
            while True:
                try:
                    first = await asyncio.wait_for(asyncio.shield(receiver.committed), 0.25)
                    break
                except asyncio.TimeoutError:
                    now = loop.time()
                    if receiver.state is TransferState.WAITING and now - waiting_since > self.kv_wait_timeout_s:
                        problem = f"KV cache did not start arriving within {self.kv_wait_timeout_s}s"
                    elif (receiver.state is TransferState.TRANSFERRING
                          and now - receiver.last_progress > self.kv_progress_timeout_s):
                        problem = f"KV transfer stalled: nothing arrived for {self.kv_progress_timeout_s}s"
                    else:
                        continue
                    receiver.expire(problem)
                    if fallible:
                        span.set_attribute("kv.unavailable", problem)
                        raise KeptKVUnavailable(problem)
                    record_error(span, problem)
                    await abort_transfer(context, KVTransferError(problem, grpc.StatusCode.DEADLINE_EXCEEDED))
                except (KVIntegrityError, KVLayoutMismatch, KVTransferError) as e:
                    if fallible:
                        span.set_attribute("kv.unavailable", str(e))
                        raise KeptKVUnavailable(str(e)) from e
                    record_error(span, e)
                    await abort_transfer(context, e, f"KV transfer failed: {e}")
            span.set_attributes({"kv.transport": receiver.transport, **receiver.stats.attributes()})
            return first

    async def _stream(self, handle: RequestHandle, context) -> AsyncIterator[worker_pb2.DecodeEvent]:
        """Relays the tokens the engine samples here, then the finish reason."""
        with tracer().start_as_current_span("token_worker.decode") as span:
            produced = 0
            start = last = time.perf_counter()
            gaps: list[float] = []
            try:
                while True:
                    try:
                        event = await handle.next_event()
                    except RequestFailed as e:
                        record_error(span, e)
                        await context.abort(engine_status(e), str(e))
                    if isinstance(event, Finished):  # (after a token that did not end it: an abort)
                        ended, tokens = event, worker_pb2.Tokens()
                        break
                    produced += 1
                    now = time.perf_counter()
                    if produced == 1:
                        span.add_event("first_token")
                        span.set_attribute("time_to_first_token_ms", (now - start) * 1e3)
                    else:
                        gaps.append(now - last)
                    last = now
                    tokens = worker_pb2.Tokens(token_ids=[event.token_id], logprobs=[event.logprob])
                    if event.top_logprobs:
                        tokens.top_logprobs.append(convert.top_logprobs_to_pb(event.top_logprobs))
                    ended = handle.ended()
                    if ended is not None:  # the last token: it goes with the reason, in one message
                        break
                    yield worker_pb2.DecodeEvent(tokens=tokens)
            finally:  # also when the scheduler ends the stream first (it had what it needed, or was cancelled)
                if gaps:
                    span.set_attributes({"time_between_tokens_mean_ms": sum(gaps) / len(gaps) * 1e3,
                                         "time_between_tokens_max_ms": max(gaps) * 1e3})
                span.set_attributes({"output.tokens": produced, "preemptions": handle.seq.num_preemptions})
            span.set_attribute("finish_reason", ended.reason.value)
            tokens.finish_reason = convert.FINISH_REASONS.get(ended.reason, common_pb2.FINISH_REASON_UNSPECIFIED)
            if not tokens.finish_reason:  # (aborted, or failed: not a way a request ends for its client)
                if tokens.token_ids:
                    yield worker_pb2.DecodeEvent(tokens=tokens)
                record_error(span, ended.reason.value)
                await context.abort(grpc.StatusCode.ABORTED, f"request {ended.reason.value} on the token worker")
            yield worker_pb2.DecodeEvent(tokens=tokens)

    async def _pull_from_store(self, receiver: KVReceiver, rid: str, address: str, wait_s: float) -> None:
        stub = kv_store_pb2_grpc.KVStoreStub(self.channels.get(address))
        # The kv_store judges a stall by progress after the start: the call's own deadline is generous.
        # Only KV of exactly this request's prompt (its kv_hash): the kv_store never serves another's under this id.
        call = stub.Get(kv_store_pb2.GetRequest(request_id=rid, wait_s=wait_s, kv_hash=receiver.kv_hash),
                        timeout=self.kv_wait_timeout_s)

        async def messages():
            try:
                async for msg in call:
                    yield msg
            except grpc.aio.AioRpcError as e:
                # NOT_FOUND stays so: the scheduler tells a KV that is not there from a worker that is gone.
                code = grpc.StatusCode.NOT_FOUND if e.code() == grpc.StatusCode.NOT_FOUND else grpc.StatusCode.UNAVAILABLE
                raise KVTransferError(f"kv_store relay: {e.code().name}: {e.details()}", code,
                                      Fault.KV_STORE) from e

        try:
            await receiver.consume(messages())
        except Exception as e:  # the receiver holds the error; Decode reports it to the scheduler
            log.warning("pull of %s from kv_store failed: %s", rid, e)
        finally:
            committed = receiver.committed
            ok = committed.done() and not committed.cancelled() and committed.exception() is None
            await end_stream(call, cancel=not ok)

    async def PushKV(self, request_iterator, context: grpc.aio.ServicerContext) -> worker_pb2.KVAck:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a KV transfer starts with its header")
        rid = first.header.request_id
        receiver = self.receivers.get(rid)
        if receiver is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV reservation for request {rid!r} (cancelled or expired)")
        span = rpc_span()
        span.set_attribute("splitwise.request_id", rid)
        try:
            stats = await receiver.consume(_chain(first, request_iterator))
        except (KVIntegrityError, KVLayoutMismatch, KVTransferError) as e:
            record_error(span, e)
            await abort_transfer(context, e)
        except BaseException:
            receiver.fail(KVTransferError("the KV sender went away mid-transfer", fault=Fault.SENDER))
            raise
        span.set_attributes({"kv.transport": receiver.transport, **stats.attributes()})
        return worker_pb2.KVAck(request_id=rid, num_bytes=stats.num_bytes, num_chunks=stats.num_chunks)
