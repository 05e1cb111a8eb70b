"""The Scheduler servicer: admits a request, has it dispatched to workers, and streams the output to the client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc
import redis.asyncio as redis

from services.scheduler.cluster_view import ClusterView
from services.scheduler.dispatch import Dispatcher, Progress
from services.scheduler.output import OutputStream
from services.scheduler.token_clock import TokenClock
from services.scheduler.validation import InvalidRequest, ModelInfo, validate
from services.scheduler.worker_calls import WorkerFailed
from splitwise.cluster.journal import RequestJournal
from splitwise.cluster.pools import pool_of
from splitwise.cluster.routing import NoWorkerAvailable
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from splitwise.security.resume import resume_token, valid_resume_token
from splitwise.telemetry import metrics
from splitwise.telemetry.tracing import record_cancelled, record_error, rpc_span, tracer

log = logging.getLogger(__name__)

# The retry hint of a RESOURCE_EXHAUSTED answer, as gRPC's retry policy reads it (server pushback).
RETRY_PUSHBACK_MS = 1000
PUSHBACK = (("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, model: ModelInfo, view: ClusterView, dispatcher: Dispatcher, request_timeout_s: float,
                 max_requests_in_flight: int = 1024, journal: RequestJournal | None = None, *, cluster_key: bytes):
        self.model = model
        self.cluster_key = cluster_key  # signs resume tokens; every replica has it, so any can check another's
        self.view = view
        self.dispatcher = dispatcher
        self.request_timeout_s = request_timeout_s
        self.max_requests_in_flight = max_requests_in_flight
        self.journal = journal
        self._journal_unreadable = False
        self.requests_in_flight = 0
        self.ids_in_flight: set[str] = set()  # a request id names one stream at a time

    async def Generate(self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        received = time.perf_counter()
        rid = request.request_id or uuid.uuid4().hex
        span = rpc_span()  # the server interceptor's span: the root of the request's trace
        span.set_attribute("splitwise.request_id", rid)
        outcome = "failed"
        try:
            with tracer().start_as_current_span("scheduler.admission") as admission:
                try:
                    ids, params = await validate(request, self.model)
                except InvalidRequest as e:
                    outcome = "invalid"
                    record_error(admission, e)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                output = OutputStream(rid, self.model.tokenizer, params, len(ids), self.model.eos_token_ids)
                continued = list(request.continue_after_token_ids)
                token = resume_token(self.cluster_key, rid, ids)
                # PERMISSION_DENIED, not INVALID_ARGUMENT: the request is well formed, but its caller has not shown
                # that the stream (and the KV its prompt left) is its own. Only the first response's token does.
                if continued and not valid_resume_token(self.cluster_key, request.resume_token, rid, ids):
                    outcome = "invalid"
                    problem = ("continue_after_token_ids needs the resume_token of the stream it continues (its first "
                               "response's), issued for this request_id and exactly this prompt")
                    record_error(admission, problem)
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
                if continued:
                    output.add(continued)  # what the client has: the text it got of them is held back here too
                    if output.finished:
                        outcome = "invalid"
                        problem = ("continue_after_token_ids already ends the output "
                                   f"({common_pb2.FinishReason.Name(output.finish_reason)}): nothing is left to generate")
                        record_error(admission, problem)
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                admission.set_attributes({"prompt.tokens": len(ids), "sampling.max_tokens": params.max_tokens,
                                          "continued.output_tokens": len(continued),
                                          "requests_in_flight": self.requests_in_flight})
                if self.requests_in_flight >= self.max_requests_in_flight:
                    outcome = "rejected"
                    problem = (f"the cluster is full: {self.requests_in_flight} requests in flight "
                               f"(SPLITWISE_MAX_REQUESTS_IN_FLIGHT); retry in {RETRY_PUSHBACK_MS} ms")
                    record_error(admission, problem)
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem, PUSHBACK)
                if rid in self.ids_in_flight:
                    outcome = "invalid"
                    problem = (f"request_id {rid!r} names a request in flight here: give each request its own id "
                               "(or none, and the scheduler makes one)")
                    record_error(admission, problem)
                    await context.abort(grpc.StatusCode.ALREADY_EXISTS, problem)
            span.set_attributes({"prompt.tokens": len(ids), "sampling.max_tokens": params.max_tokens})
            remaining = context.time_remaining()
            timeout_s = min(remaining, self.request_timeout_s) if remaining is not None else self.request_timeout_s
            clock = TokenClock(received)
            self.requests_in_flight += 1
            self.ids_in_flight.add(rid)
            if self.journal:
                self.journal.opened(rid, len(ids), params.max_tokens)
            try:
                progress = Progress()
                if continued:  # the prompt's KV may still be in the kv_store, kept by the broken stream's attempt
                    progress.kv_kept_as = await self.dispatcher.kept_copy(rid)
                    self.dispatcher.continued(rid, span, len(continued), progress.kv_kept_as)
                run = self.dispatcher.run(rid, ids, params, timeout_s, span, output, progress)
                async with contextlib.aclosing(run):
                    async for response in run:
                        if token:  # the first response: what the client sends to continue the stream
                            response.resume_token, token = token, ""
                        clock.tokens(len(response.token_ids))
                        if self.journal:
                            self.journal.progress(rid, output.completion_tokens)
                        yield response
                        if response.finish_reason:
                            outcome = common_pb2.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_")
                            outcome = outcome.lower()
            except WorkerFailed as e:
                outcome = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
                           grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected"}.get(e.code, "failed")
                record_error(span, e)
                # A worker that cannot take the request now: the client may retry after a pause.
                await context.abort(e.code, str(e), PUSHBACK if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED else ())
            except NoWorkerAvailable as e:
                outcome = "unavailable"
                record_error(span, e)
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # a bug of ours: the client gets INTERNAL, not UNKNOWN with a Python class name
                log.exception("request %s failed in the scheduler", rid)
                record_error(span, e)
                await context.abort(grpc.StatusCode.INTERNAL, "the scheduler failed on this request (its log has the "
                                    "details)")
            except (asyncio.CancelledError, GeneratorExit):
                expired = context.time_remaining() is not None and context.time_remaining() <= 0
                outcome = "deadline" if expired else "cancelled"
                record_cancelled(span, "deadline" if expired else "client")
                raise
            finally:
                self.requests_in_flight -= 1
                self.ids_in_flight.discard(rid)
                span.set_attributes(clock.attributes())
                if self.journal:
                    self.journal.closed(rid, outcome, output.completion_tokens)
        finally:
            metrics.request_duration.record(time.perf_counter() - received, {"outcome": outcome})
            metrics.requests.add(1, {"outcome": outcome})

    async def ClusterStatus(self, request, context) -> scheduler_pb2.ClusterStatusResponse:
        now = time.time()
        everywhere = self.requests_in_flight
        if self.journal:
            try:
                everywhere = await asyncio.wait_for(self.journal.open_requests(), 1.0)
                self._journal_unreadable = False
            except (redis.RedisError, OSError, asyncio.TimeoutError) as e:
                if not self._journal_unreadable:  # once per outage
                    log.warning("cannot count the cluster's requests in the journal: %s", e or "timed out")
                    self._journal_unreadable = True
        view = self.view
        return scheduler_pb2.ClusterStatusResponse(
            cluster_requests_in_flight=everywhere,
            model=self.model.name,
            workers=[convert.worker_to_pb(w, now, pool_of(w, view.membership)) for w in view.declared],
            pool_transitions=[scheduler_pb2.PoolTransition(worker_id=t.worker_id, from_pool=t.from_pool,
                                                           to_pool=t.to_pool, reason=t.reason, at_unix_s=t.at)
                              for t in view.transitions],
            requests_in_flight=self.requests_in_flight,
            kv_transfer_mode=self.dispatcher.kv.transfer,
        )
