"""The PromptWorker servicer: runs the prompt phase in batches and ships each request's KV layer by layer."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from splitwise.cluster.known_peers import KnownPeers
from splitwise.channels import ChannelPool
from splitwise.engine.block_manager import KVCapacityError
from splitwise.engine.llm_engine import Engine
from splitwise.engine.request_handle import Finished, RequestFailed, RequestHandle
from splitwise.engine.sequence import Sequence
from splitwise.kv.transport.base import KVTransferError
from splitwise.kv.transport.registry import WorkerTransports
from splitwise.kv.transport.sender import KVSender
from splitwise.kv.transport.staged import StagedLayout
from splitwise.kv.layout import KVLayout
from splitwise.rpc import convert
from splitwise.rpc.errors import abort_transfer, capacity_status, engine_status
from splitwise.rpc.kv_stream import kv_stream
from splitwise.rpc.v1 import worker_pb2, worker_pb2_grpc
from splitwise.telemetry.tracing import record_cancelled, record_error, rpc_span, tracer

log = logging.getLogger(__name__)


def _both(first, second):
    def on_layer_kv(*args) -> None:
        first(*args)
        second(*args)

    return on_layer_kv


class PromptWorkerServicer(worker_pb2_grpc.PromptWorkerServicer):
    def __init__(self, engine: Engine, layout: KVLayout, channels: ChannelPool, kv_chunk_bytes: int,
                 kv_progress_timeout_s: float):
        self.engine = engine
        self.layout = layout
        self.channels = channels
        self.kv_chunk_bytes = kv_chunk_bytes
        self.kv_progress_timeout_s = kv_progress_timeout_s
        self.transports = WorkerTransports()  # until the worker knows its address: gRPC only
        self.draining = False
        self.keeping: set[asyncio.Task] = set()  # KV copies on their way to the kv_store
        self.known_peers: KnownPeers | None = None  # set once registered: KV goes only to registered workers

    def _validate(self, request: worker_pb2.PrefillRequest):
        ids = list(request.prompt_token_ids)
        vocab = self.engine.loaded.config.vocab_size
        if not request.request_id:
            return None, "request_id is required"
        if not ids:
            return None, "prompt_token_ids is empty"
        if min(ids) < 0 or max(ids) >= vocab:
            return None, f"token ids must be in [0, {vocab})"
        if not request.kv_target.address:
            return None, "kv_target.address is required"
        params = convert.sampling_from_pb(request.sampling)
        try:
            params.validate()
        except ValueError as e:
            return None, str(e)
        return (ids, params), None

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        """A request's prompt phase: checked (and its KV target with it), its KV senders opened, its prompt
        submitted to the engine; then its first token, once every layer is on its way, and the transfer's summary
        once the receiver has it all."""
        ids, params = await self._check(request, context)
        rid = request.request_id
        span = rpc_span()
        span.set_attributes({"splitwise.request_id": rid, "prompt.tokens": len(ids),
                             "kv.target": request.kv_target.address})
        sender, keeper = self._senders(request, ids)
        on_layer_kv = sender.on_layer_kv if keeper is None else _both(sender.on_layer_kv, keeper.on_layer_kv)
        submitted_ns = time.time_ns()
        try:
            handle = self.engine.submit(rid, ids, params, prefill_only=True, on_layer_kv=on_layer_kv)
        except KVCapacityError as e:
            record_error(span, e)
            await context.abort(capacity_status(e), str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        send_task = asyncio.create_task(sender.send())
        if keeper is not None:
            self._keep(keeper, send_task)
        # Cleanup runs when the RPC ends however it ends (a cancelled stream may be finalised late).
        context.add_done_callback(lambda _: self._release(handle, sender, send_task))
        # A transfer that fails aborts the prefill: its KV has nowhere to go.
        send_task.add_done_callback(
            lambda t: t.cancelled() or t.exception() is None or self.engine.abort(rid, handle))
        try:
            event = await self._first_token(handle, send_task, context, span)
            sender.commit(event)  # (first: the token worker waits for it; the spans below do not)
            if keeper is not None:
                keeper.commit(event)
                keeper = None  # it has every layer: it goes on alone, whatever happens to this call
            self._record_compute_spans(submitted_ns, handle.seq)
            first = self._first_token_pb(event, handle.seq)
            first.finish_reason = convert.finish_reason_to_pb(self.engine.request_ends(handle.seq))
            yield worker_pb2.PrefillEvent(first_token=first)
            stats = await send_task
            yield worker_pb2.PrefillEvent(transfer=worker_pb2.KVTransferSummary(
                num_bytes=stats.num_bytes, num_layers=stats.num_layers, num_chunks=stats.num_chunks,
                seconds=stats.seconds,
            ))
        except KVTransferError as e:
            record_error(span, e)
            await abort_transfer(context, e)
        except asyncio.CancelledError:
            record_cancelled(span, "scheduler")
            raise
        finally:
            if keeper is not None:  # the prefill never finished: there is nothing to keep
                keeper.abort()
            self._release(handle, sender, send_task)

    async def _check(self, request: worker_pb2.PrefillRequest, context) -> tuple[list[int], object]:
        """The prompt and its sampling, once the request, the receiver's KV layout (the handshake) and its KV target
        (a registered worker, or the kv_store) are known to be good; the call is aborted otherwise."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prompt worker is draining")
        parsed, problem = self._validate(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        target = request.kv_target
        if target.HasField("layout"):  # the handshake: the receiver's KV must be ours
            problem = self.layout.mismatch(convert.layout_from_pb(target.layout))
            if problem:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"the KV receiver cannot take this worker's KV: {problem}")
        if (target.kind != worker_pb2.KVTarget.KIND_KV_STORE and self.known_peers is not None
                and not await self.known_peers.knows(target.address)):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"kv_target {target.address} is not a registered worker: KV goes to none other")
        return parsed

    def _senders(self, request: worker_pb2.PrefillRequest, ids: list[int]) -> tuple[KVSender, KVSender | None]:
        """The sender to the request's KV target (writing into the receiver's staging buffer where its offer can
        be used from here), and the kept copy's to the kv_store, when asked for."""
        target, rid = request.kv_target, request.request_id
        writer = None
        if target.kind != worker_pb2.KVTarget.KIND_KV_STORE and target.HasField("offer"):
            writer = self.transports.writer(convert.offer_from_pb(target.offer),
                                            StagedLayout(self.layout, len(ids)).total_bytes)
        sender = KVSender(*kv_stream(self.channels.get(target.address), target.kind), rid, self.layout, ids,
                          self.kv_chunk_bytes, self.kv_progress_timeout_s, writer,
                          layerwise=target.layerwise,
                          # (the token worker's offer, also where the kv_store relays to it)
                          layer_runs=target.offer.layer_runs)
        keeper = None
        if request.HasField("kv_keep") and request.kv_keep.address:
            # Serialized: the layers are only copied during the prefill and encoded after it, off its path. In runs
            # of layers: whoever pulls it back is a token worker resuming the request (one that takes no runs
            # recomputes the prompt instead).
            keeper = KVSender(*kv_stream(self.channels.get(request.kv_keep.address), worker_pb2.KVTarget.KIND_KV_STORE),
                              rid, self.layout, ids, self.kv_chunk_bytes, self.kv_progress_timeout_s, layerwise=False,
                              span_name="kv_transfer.keep", layer_runs=True)
        return sender, keeper

    async def _first_token(self, handle: RequestHandle, send_task: asyncio.Task, context, span):
        """The prefill's first token; the call is aborted with the cause when the request failed or was aborted
        before it (its transfer's failure, when that was the cause)."""
        try:
            event = await handle.next_event()
        except RequestFailed as e:
            record_error(span, e)
            await context.abort(engine_status(e), str(e))
        if isinstance(event, Finished):  # aborted before its first token
            failed = send_task.done() and not send_task.cancelled() and send_task.exception()
            record_error(span, failed or "aborted")
            if isinstance(failed, KVTransferError):
                await abort_transfer(context, failed)
            await context.abort(grpc.StatusCode.ABORTED, str(failed or "prefill aborted"))
        return event

    @staticmethod
    def _first_token_pb(event, seq: Sequence) -> worker_pb2.FirstToken:
        first = worker_pb2.FirstToken(token_id=event.token_id, logprob=event.logprob,
                                      prefill_ms=(seq.first_token_ns - seq.first_scheduled_ns) / 1e6)
        if event.top_logprobs:
            first.top_logprobs.CopyFrom(convert.top_logprobs_to_pb(event.top_logprobs))
        return first

    def _keep(self, keeper: KVSender, transfer: asyncio.Task) -> None:
        """Ships a copy of a request's KV to the kv_store in the background, once the transfer to the token worker
        has ended (its messages would share this event loop and core with the transfer the decode waits for); a
        failure loses only the copy."""

        async def after_transfer():
            await asyncio.wait({transfer})
            return await keeper.send()

        task = asyncio.create_task(after_transfer())
        self.keeping.add(task)

        def done(t: asyncio.Task) -> None:
            self.keeping.discard(t)
            if not t.cancelled() and t.exception() is not None and not keeper.aborted:
                log.warning("KV of %s not kept in the kv_store: %s", keeper.request_id, t.exception())

        task.add_done_callback(done)

    def _release(self, handle: RequestHandle, sender: KVSender, send_task: asyncio.Task) -> None:
        self.engine.abort(handle.seq.request_id, handle)
        sender.abort()
        send_task.cancel()
        if sender.writer is not None:
            send_task.add_done_callback(lambda _: sender.writer.close())

    @staticmethod
    def _record_compute_spans(submitted_ns: int, seq: Sequence) -> None:
        """Queue and prefill spans with the times the engine measured."""
        started_ns = max(submitted_ns, seq.first_scheduled_ns)
        queue = tracer().start_span("prompt_worker.queue", start_time=submitted_ns)
        queue.end(end_time=started_ns)
        prefill = tracer().start_span("prompt_worker.prefill", start_time=started_ns)
        prefill.set_attributes({"prompt.tokens": len(seq.prompt_ids), "first_token.id": seq.output[0].token_id,
                                "preemptions": seq.num_preemptions})
        prefill.add_event("first_token", {"token.id": seq.output[0].token_id}, timestamp=max(started_ns, seq.first_token_ns))
        prefill.end(end_time=max(started_ns, seq.first_token_ns))
