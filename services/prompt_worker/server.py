"""The PromptWorker servicer: runs the prompt phase and ships the KV cache layer by layer while it runs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
from opentelemetry.trace import SpanKind

from splitwise.channels import ChannelPool
from splitwise.engine.kv_cache import KVCapacityError, KVPool
from splitwise.engine.runner import Cancelled, ModelRunner
from splitwise.kv.grpc_stream import KVSender, KVTransferError
from splitwise.kv.layout import KVLayout
from splitwise.rpc import convert
from splitwise.rpc.v1 import worker_pb2, worker_pb2_grpc
from splitwise.telemetry.tracing import incoming_context, outgoing_metadata, record_error, tracer

log = logging.getLogger(__name__)


class PromptWorkerServicer(worker_pb2_grpc.PromptWorkerServicer):
    def __init__(
        self,
        runner: ModelRunner,
        pool: KVPool,
        layout: KVLayout,
        channels: ChannelPool,
        kv_chunk_bytes: int,
        kv_transfer_timeout_s: float,
    ):
        self.runner = runner
        self.pool = pool
        self.layout = layout
        self.channels = channels
        self.kv_chunk_bytes = kv_chunk_bytes
        self.kv_transfer_timeout_s = kv_transfer_timeout_s
        self.pending_tokens = 0
        self.active_requests = 0
        self.draining = False

    def _validate(self, request: worker_pb2.PrefillRequest):
        ids = list(request.prompt_token_ids)
        vocab = self.runner.loaded.config.vocab_size
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
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prompt worker is draining")
        parsed, problem = self._validate(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        ids, params = parsed
        with incoming_context(context.invocation_metadata()), tracer().start_as_current_span(
            "prompt_worker.prefill_request", kind=SpanKind.SERVER
        ) as span:
            span.set_attributes({"splitwise.request_id": request.request_id, "prompt.tokens": len(ids),
                                 "kv.target": request.kv_target.address})
            try:
                kv = self.pool.reserve(request.request_id, len(ids))
            except KVCapacityError as e:
                record_error(span, e)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except ValueError as e:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
            self.pending_tokens += len(ids)
            self.active_requests += 1
            cancelled = threading.Event()
            sender = KVSender(
                self.channels.get(request.kv_target.address),
                request.kv_target.kind,
                request.request_id,
                self.layout,
                len(ids),
                self.kv_chunk_bytes,
                self.kv_transfer_timeout_s,
                outgoing_metadata(),
            )
            send_task = asyncio.create_task(sender.send())
            # A transfer that fails stops the compute at the next layer: its KV has nowhere to go.
            send_task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or cancelled.set())
            try:
                submitted_ns = time.time_ns()
                result = await self.runner.run(
                    self.runner.prefill, ids, params, kv, sender.on_layer_kv, cancelled.is_set
                )
                self._record_compute_spans(submitted_ns, result)
                sender.commit(result.first)
                yield worker_pb2.PrefillEvent(
                    first_token=worker_pb2.FirstToken(
                        token_id=result.first.token_id, logprob=result.first.logprob, prefill_ms=result.prefill_s * 1e3
                    )
                )
                stats = await send_task
                yield worker_pb2.PrefillEvent(
                    transfer=worker_pb2.KVTransferSummary(
                        num_bytes=stats.num_bytes, num_layers=stats.num_layers, num_chunks=stats.num_chunks,
                        seconds=stats.seconds,
                    )
                )
            except KVTransferError as e:
                record_error(span, e)
                await context.abort(e.code, str(e))
            except Cancelled:
                failed = send_task.done() and not send_task.cancelled() and send_task.exception()
                record_error(span, failed or "cancelled")
                if failed:
                    code = failed.code if isinstance(failed, KVTransferError) else grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, str(failed))
            finally:
                cancelled.set()
                sender.abort()
                if not send_task.done():
                    send_task.cancel()
                await asyncio.gather(send_task, return_exceptions=True)
                self.pool.free(request.request_id)
                self.pending_tokens -= len(ids)
                self.active_requests -= 1

    def _record_compute_spans(self, submitted_ns: int, result) -> None:
        """Queue and prefill spans with the times the compute thread measured."""
        started_ns = result.started_ns
        queue = tracer().start_span("prompt_worker.queue", start_time=submitted_ns)
        queue.end(end_time=max(submitted_ns, started_ns))
        prefill = tracer().start_span("prompt_worker.prefill", start_time=started_ns)
        prefill.set_attributes({"prefill.ms": result.prefill_s * 1e3, "first_token.id": result.first.token_id})
        prefill.end(end_time=started_ns + int(result.prefill_s * 1e9))
