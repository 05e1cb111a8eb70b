"""The TokenWorker servicer: reserves KV for a request, receives it layer by layer, and runs the token phase."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc
from opentelemetry.trace import SpanKind

from splitwise.channels import ChannelPool
from splitwise.engine.kv_cache import KVCapacityError, KVPool
from splitwise.engine.runner import ModelRunner
from splitwise.engine.sampling import SampledToken, SamplingParams
from splitwise.kv.chunks import KVIntegrityError
from splitwise.kv.grpc_stream import KVReceiver, KVTransferError
from splitwise.kv.layout import KVLayout, KVLayoutMismatch
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc, worker_pb2, worker_pb2_grpc
from splitwise.telemetry.tracing import incoming_context, outgoing_metadata, record_error, tracer

log = logging.getLogger(__name__)

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH


def transfer_status(error: Exception) -> grpc.StatusCode:
    if isinstance(error, KVLayoutMismatch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, KVIntegrityError):
        return grpc.StatusCode.DATA_LOSS
    return grpc.StatusCode.UNAVAILABLE


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


class TokenWorkerServicer(worker_pb2_grpc.TokenWorkerServicer):
    def __init__(
        self,
        runner: ModelRunner,
        pool: KVPool,
        layout: KVLayout,
        eos_token_ids: tuple[int, ...],
        channels: ChannelPool,
        kv_wait_timeout_s: float,
    ):
        self.runner = runner
        self.pool = pool
        self.layout = layout
        self.eos_token_ids = frozenset(eos_token_ids)
        self.channels = channels
        self.kv_wait_timeout_s = kv_wait_timeout_s
        self.receivers: dict[str, KVReceiver] = {}
        self.draining = False

    @property
    def pending_tokens(self) -> int:
        return self.pool.used_tokens

    def _finish_reason(self, token: SampledToken, generated: int, params: SamplingParams) -> int | None:
        if token.token_id in self.eos_token_ids and not params.ignore_eos:
            return STOP
        if generated >= params.max_tokens:
            return LENGTH
        return None

    async def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "token worker is draining")
        params = convert.sampling_from_pb(request.sampling)
        try:
            params.validate()
            if not request.request_id or request.num_prompt_tokens <= 0:
                raise ValueError("request_id and num_prompt_tokens > 0 are required")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id
        with incoming_context(context.invocation_metadata()), tracer().start_as_current_span(
            "token_worker.decode_request", kind=SpanKind.SERVER
        ) as span:
            span.set_attributes({"splitwise.request_id": rid, "prompt.tokens": request.num_prompt_tokens})
            needed = request.num_prompt_tokens + params.max_tokens
            try:
                kv = self.pool.reserve(rid, needed)
            except KVCapacityError as e:
                record_error(span, e)
                code = grpc.StatusCode.INVALID_ARGUMENT if e.ever else grpc.StatusCode.RESOURCE_EXHAUSTED
                await context.abort(code, str(e))
            except ValueError as e:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
            receiver = self.receivers[rid] = KVReceiver(kv, self.layout, request.num_prompt_tokens)
            pull = None
            try:
                yield worker_pb2.DecodeEvent(
                    reserved=worker_pb2.Reserved(layout=convert.layout_to_pb(self.layout), reserved_tokens=needed)
                )
                if request.kv_source.kind == worker_pb2.KVTarget.KIND_KV_STORE:
                    pull = asyncio.create_task(self._pull_from_store(receiver, rid, request.kv_source.address))
                first = await self._wait_for_kv(receiver, context)
                async for event in self._decode(kv, first, params):
                    yield event
            finally:
                if pull is not None:
                    pull.cancel()
                    await asyncio.gather(pull, return_exceptions=True)
                self.receivers.pop(rid, None)
                self.pool.free(rid)

    async def _wait_for_kv(self, receiver: KVReceiver, context) -> SampledToken:
        with tracer().start_as_current_span("kv_transfer.receive") as span:
            try:
                first = await asyncio.wait_for(asyncio.shield(receiver.committed), self.kv_wait_timeout_s)
            except asyncio.TimeoutError:
                record_error(span, "timeout")
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"KV cache did not arrive within {self.kv_wait_timeout_s}s"
                )
            except (KVIntegrityError, KVLayoutMismatch, KVTransferError) as e:
                record_error(span, e)
                await context.abort(transfer_status(e), f"KV transfer failed: {e}")
            span.set_attributes({"kv.bytes": receiver.stats.num_bytes, "kv.layers": receiver.stats.num_layers,
                                 "kv.chunks": receiver.stats.num_chunks})
            return first

    async def _decode(self, kv, first: SampledToken, params: SamplingParams) -> AsyncIterator[worker_pb2.DecodeEvent]:
        generated = 1
        reason = self._finish_reason(first, generated, params)
        if reason is not None:
            yield worker_pb2.DecodeEvent(tokens=worker_pb2.Tokens(finish_reason=reason))
            return
        with tracer().start_as_current_span("token_worker.decode") as span:
            last = first.token_id
            while reason is None:
                token = await self.runner.run(self.runner.decode_step, last, kv, params, generated)
                generated += 1
                if generated == 2:
                    span.add_event("first_decoded_token")
                reason = self._finish_reason(token, generated, params)
                last = token.token_id
                yield worker_pb2.DecodeEvent(
                    tokens=worker_pb2.Tokens(token_ids=[token.token_id], logprobs=[token.logprob],
                                             finish_reason=reason or 0)
                )
            span.set_attributes({"decode.tokens": generated - 1, "finish_reason": common_pb2.FinishReason.Name(reason)})

    async def _pull_from_store(self, receiver: KVReceiver, rid: str, address: str) -> None:
        stub = kv_store_pb2_grpc.KVStoreStub(self.channels.get(address))
        call = stub.Get(
            kv_store_pb2.GetRequest(request_id=rid, wait_s=self.kv_wait_timeout_s),
            timeout=self.kv_wait_timeout_s,
            metadata=outgoing_metadata(),
        )
        async def messages():
            try:
                async for msg in call:
                    yield msg
            except grpc.aio.AioRpcError as e:
                raise KVTransferError(f"kv_store relay: {e.code().name}: {e.details()}") from e

        try:
            await receiver.consume(messages())
        except Exception as e:  # the receiver holds the error; Decode reports it to the scheduler
            log.warning("pull of %s from kv_store failed: %s", rid, e)

    async def PushKV(self, request_iterator, context: grpc.aio.ServicerContext) -> worker_pb2.KVAck:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a KV transfer starts with its header")
        rid = first.header.request_id
        receiver = self.receivers.get(rid)
        if receiver is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV reservation for request {rid!r} (cancelled or expired)")
        with incoming_context(context.invocation_metadata()), tracer().start_as_current_span(
            "token_worker.push_kv", kind=SpanKind.SERVER
        ) as span:
            span.set_attribute("splitwise.request_id", rid)
            try:
                stats = await receiver.consume(_chain(first, request_iterator))
            except (KVIntegrityError, KVLayoutMismatch, KVTransferError) as e:
                record_error(span, e)
                await context.abort(transfer_status(e), str(e))
            except BaseException:
                receiver.fail(KVTransferError("the KV sender went away mid-transfer"))
                raise
            span.set_attributes({"kv.bytes": stats.num_bytes, "kv.layers": stats.num_layers})
            return worker_pb2.KVAck(request_id=rid, num_bytes=stats.num_bytes, num_chunks=stats.num_chunks)
