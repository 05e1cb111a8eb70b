"""The Scheduler servicer: admits a request, has it dispatched to workers, and streams the output to the client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

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
from splitwise.engine.sampling import SamplingParams
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from splitwise.security.resume import resume_token, valid_resume_token
from splitwise.telemetry import metrics
from splitwise.telemetry.tracing import record_cancelled, record_error, rpc_span, tracer

log = logging.getLogger(__name__)

# The retry hint of a RESOURCE_EXHAUSTED answer, as gRPC's retry policy reads it (server pushback).
RETRY_PUSHBACK_MS = 1000
PUSHBACK = (("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),)


class _Refused(Exception):
    """A request refused at admission: the status its caller gets, and the outcome it is counted as."""

    def __init__(self, code: grpc.StatusCode, message: str, outcome: str, metadata: tuple = ()):
        super().__init__(message)
        self.code, self.outcome, self.metadata = code, outcome, metadata


@dataclass
class _Admitted:
    rid: str
    ids: list[int]
    params: SamplingParams
    output: OutputStream
    continued: list[int]  # output tokens the client has already (a continued stream)
    resume_token: str  # goes with the first response


@dataclass
class _Ending:
    outcome: str = "failed"  # how the request ended, for the metrics and the journal


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
        """A request's life here: admitted (or refused with why), dispatched to workers (tried again on others when
        one fails), its output streamed; its outcome goes to the metrics and the journal however it ends."""
        received = time.perf_counter()
        rid = request.request_id or uuid.uuid4().hex
        span = rpc_span()  # the server interceptor's span: the root of the request's trace
        span.set_attribute("splitwise.request_id", rid)
        ending = _Ending()
        try:
            try:
                admitted = await self._admit(request, rid)
            except _Refused as e:
                ending.outcome = e.outcome
                await context.abort(e.code, str(e), e.metadata)
            span.set_attributes({"prompt.tokens": len(admitted.ids), "sampling.max_tokens": admitted.params.max_tokens})
            # Closed with this call however it ends: a client that leaves ends the request there and then.
            async with contextlib.aclosing(self._serve(admitted, context, span, TokenClock(received), ending)) as run:
                async for response in run:
                    yield response
        finally:
            metrics.request_duration.record(time.perf_counter() - received, {"outcome": ending.outcome})
            metrics.requests.add(1, {"outcome": ending.outcome})

    async def _admit(self, request: scheduler_pb2.GenerateRequest, rid: str) -> _Admitted:
        """The request as it will run, or _Refused: invalid, not the caller's to continue, already finished, over the
        cluster's limit of requests in flight, or an id in flight here already."""
        with tracer().start_as_current_span("scheduler.admission") as admission:
            try:
                ids, params = await validate(request, self.model)
            except InvalidRequest as e:
                record_error(admission, e)
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid") from None
            output = OutputStream(rid, self.model.tokenizer, params, len(ids), self.model.eos_token_ids)
            continued = list(request.continue_after_token_ids)
            refusal = self._refusal(request, rid, ids, continued, output)
            admission.set_attributes({"prompt.tokens": len(ids), "sampling.max_tokens": params.max_tokens,
                                      "continued.output_tokens": len(continued),
                                      "requests_in_flight": self.requests_in_flight})
            if refusal is not None:
                record_error(admission, str(refusal))
                raise refusal
        return _Admitted(rid, ids, params, output, continued, resume_token(self.cluster_key, rid, ids))

    def _refusal(self, request: scheduler_pb2.GenerateRequest, rid: str, ids: list[int], continued: list[int],
                 output: OutputStream) -> _Refused | None:
        # PERMISSION_DENIED, not INVALID_ARGUMENT: the request is well formed, but its caller has not shown that the
        # stream (and the KV its prompt left) is its own. Only the first response's token does.
        if continued and not valid_resume_token(self.cluster_key, request.resume_token, rid, ids):
            return _Refused(grpc.StatusCode.PERMISSION_DENIED,
                            "continue_after_token_ids needs the resume_token of the stream it continues (its first "
                            "response's), issued for this request_id and exactly this prompt", "invalid")
        if continued:
            output.add(continued, continued=True)  # what the client has: the text it got of them is held back too
            if output.finished:
                return _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                "continue_after_token_ids already ends the output "
                                f"({common_pb2.FinishReason.Name(output.finish_reason)}): nothing is left to generate",
                                "invalid")
        if self.requests_in_flight >= self.max_requests_in_flight:
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the cluster is full: {self.requests_in_flight} requests in flight "
                            f"(SPLITWISE_MAX_REQUESTS_IN_FLIGHT); retry in {RETRY_PUSHBACK_MS} ms", "rejected",
                            PUSHBACK)
        if rid in self.ids_in_flight:
            return _Refused(grpc.StatusCode.ALREADY_EXISTS,
                            f"request_id {rid!r} names a request in flight here: give each request its own id "
                            "(or none, and the scheduler makes one)", "invalid")
        return None

    async def _serve(self, admitted: _Admitted, context, span, clock: TokenClock, ending: _Ending):
        """Dispatches an admitted request and streams its responses; a failure ends the call with its status."""
        rid, output = admitted.rid, admitted.output
        remaining = context.time_remaining()
        timeout_s = min(remaining, self.request_timeout_s) if remaining is not None else self.request_timeout_s
        self.requests_in_flight += 1
        self.ids_in_flight.add(rid)
        if self.journal:
            self.journal.opened(rid, len(admitted.ids), admitted.params.max_tokens)
        try:
            progress = Progress()
            if admitted.continued:  # the prompt's KV may still be in the kv_store, kept by the broken stream's attempt
                progress.kv_kept_as = await self.dispatcher.kept_copy(rid)
                self.dispatcher.continued(rid, span, len(admitted.continued), progress.kv_kept_as)
            token = admitted.resume_token
            run = self.dispatcher.run(rid, admitted.ids, admitted.params, timeout_s, span, output, progress)
            async with contextlib.aclosing(run):
                async for response in run:
                    if token:  # the first response: what the client sends to continue the stream
                        response.resume_token, token = token, ""
                    clock.tokens(len(response.token_ids))
                    if self.journal:
                        self.journal.progress(rid, output.completion_tokens)
                    yield response
                    if response.finish_reason:
                        name = common_pb2.FinishReason.Name(response.finish_reason)
                        ending.outcome = name.removeprefix("FINISH_REASON_").lower()
        except grpc.aio.AbortError:
            raise
        except (asyncio.CancelledError, GeneratorExit):
            expired = context.time_remaining() is not None and context.time_remaining() <= 0
            ending.outcome = "deadline" if expired else "cancelled"
            record_cancelled(span, "deadline" if expired else "client")
            raise
        except Exception as e:
            code, message, ending.outcome, metadata = self._failure(rid, e)
            record_error(span, e)
            await context.abort(code, message, metadata)
        finally:
            self.requests_in_flight -= 1
            self.ids_in_flight.discard(rid)
            span.set_attributes(clock.attributes())
            if self.journal:
                self.journal.closed(rid, ending.outcome, output.completion_tokens)

    @staticmethod
    def _failure(rid: str, e: Exception) -> tuple[grpc.StatusCode, str, str, tuple]:
        """(code, message, outcome, trailing metadata) of a request that failed after its admission."""
        if isinstance(e, WorkerFailed):
            outcome = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
                       grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected"}.get(e.code, "failed")
            # A worker that cannot take the request now: the client may retry after a pause.
            return e.code, str(e), outcome, PUSHBACK if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED else ()
        if isinstance(e, NoWorkerAvailable):
            return grpc.StatusCode.UNAVAILABLE, str(e), "unavailable", ()
        # A bug of ours: the client gets INTERNAL, not UNKNOWN with a Python class name.
        log.error("request %s failed in the scheduler", rid, exc_info=e)
        return grpc.StatusCode.INTERNAL, "the scheduler failed on this request (its log has the details)", "failed", ()

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
