"""The Scheduler servicer: validates, routes to a prompt worker and a token worker, and streams the output."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import grpc
import redis.asyncio as redis

from services.scheduler.output import OutputStream
from splitwise.channels import ChannelPool, end_stream
from splitwise.cluster.aio import keeps_cancellation
from splitwise.cluster.journal import RequestJournal
from splitwise.cluster.pools import PoolPolicy, PoolStore, Transition, plan, pool_of, with_pools
from splitwise.cluster.registry import WorkerInfo, WorkerRegistry
from splitwise.cluster.routing import (POLICIES, ConditionalDisaggregation, NoWorkerAvailable, Route, route,
                                      token_phase)
from splitwise.engine.sampling import SamplingParams
from splitwise.kv.transport import GRPC, choose_transport
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from splitwise.telemetry import metrics
from splitwise.telemetry.tracing import record_cancelled, record_error, rpc_span, tracer

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
# Attempts of a request whose worker is unreachable before anything was streamed to the client.
MAX_ATTEMPTS = 3
POOLS = ("prompt", "token", "mixed")
# The retry hint of a RESOURCE_EXHAUSTED answer, as gRPC's retry policy reads it (server pushback).
RETRY_PUSHBACK_MS = 1000
PUSHBACK = (("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),)
KEEP_TRANSITIONS_SHOWN = 20  # pool transitions ClusterStatus lists
# When one side of a KV transfer reports it broken, how long the other side's stream has to say why: a prompt
# worker that died, or a token worker that refused the KV (a checksum, a layout) or went away.
SENDER_FAILURE_GRACE_S = 1.0
# How long the scheduler waits for a token worker's own end of a stream it already has every token of.
WORKER_END_GRACE_S = 0.5


class InvalidRequest(ValueError):
    pass


class WorkerFailed(Exception):
    """A worker call failed; `code` is the status the client gets."""

    def __init__(self, worker: WorkerInfo, code: grpc.StatusCode, details: str):
        super().__init__(f"{worker.role} worker {worker.worker_id}: {details}")
        self.worker = worker
        self.code = code
        # The worker is up, but could not pull the request's KV from the kv_store (token workers say so).
        self.kv_store_failed = "kv_store relay" in (details or "")
        # The worker is up and answered, but its KV transfer broke: the receiving end knows why (prompt workers).
        self.kv_transfer_failed = (details or "").startswith("KV transfer")


@dataclass
class Progress:
    """What one attempt leaves the next: where the kv_store keeps the prompt's KV (the id it is stored by)."""

    kv_kept_as: str | None = None


class TokenClock:
    """Time to first token and time between tokens of one request, as its client sees them."""

    def __init__(self, received: float):
        self.received = received
        self.last: float | None = None
        self.first_s: float | None = None
        self.gaps: list[float] = []
        self.count = 0

    def tokens(self, count: int) -> None:
        if count == 0:
            return
        self.count += count
        now = time.perf_counter()
        if self.last is None:
            self.first_s = now - self.received
            metrics.time_to_first_token.record(self.first_s)
            count -= 1
        elif count:
            gap = (now - self.last) / count
            self.gaps += [gap] * count
            for _ in range(count):
                metrics.time_per_output_token.record(gap)
        self.last = now

    def attributes(self) -> dict:
        attributes = {"output.tokens": self.count}
        if self.first_s is not None:
            attributes["time_to_first_token_ms"] = self.first_s * 1e3
        if self.gaps:
            attributes["time_between_tokens_mean_ms"] = sum(self.gaps) / len(self.gaps) * 1e3
            attributes["time_between_tokens_max_ms"] = max(self.gaps) * 1e3
        return attributes


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer: object
    max_context_tokens: int
    vocab_size: int
    eos_token_ids: frozenset[int]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        model: ModelInfo,
        registry: WorkerRegistry,
        channels: ChannelPool,
        kv_transfer: str,
        kv_store_address: str,
        request_timeout_s: float,
        kv_layerwise_min_tokens: int = 512,
        routing_policy: str = "cls",
        conditional: ConditionalDisaggregation = ConditionalDisaggregation(),
        max_requests_in_flight: int = 1024,
        kv_keep: bool = True,
        pools: PoolStore | None = None,
        pool_policy: PoolPolicy = PoolPolicy(),
        journal: RequestJournal | None = None,
    ):
        if kv_transfer not in ("direct", "relay"):
            raise ValueError(f"kv_transfer must be 'direct' or 'relay', got {kv_transfer!r}")
        self.model = model
        self.registry = registry
        self.channels = channels
        self.kv_transfer = kv_transfer
        self.kv_store_address = kv_store_address
        self.kv_keep = kv_keep
        self.request_timeout_s = request_timeout_s
        self.kv_layerwise_min_tokens = kv_layerwise_min_tokens
        if routing_policy not in POLICIES:
            raise ValueError(f"unknown routing policy {routing_policy!r}; choose from {', '.join(POLICIES)}")
        self.routing_policy = routing_policy
        self.max_requests_in_flight = max_requests_in_flight
        self.conditional = conditional
        self.routed = 0  # requests routed so far: round-robin's turn, random's seed
        self.pools = pools
        self.journal = journal
        self._journal_unreadable = False
        self.pool_policy = pool_policy
        self.declared: list[WorkerInfo] = []  # as registered, with the role each declared
        self.membership: dict[str, str] = {}  # borrowed workers -> their pool now
        self.transitions: list[Transition] = []
        self.workers: list[WorkerInfo] = []  # as routing sees them: each in its current pool
        self.in_flight_tokens: dict[str, int] = {}
        self.requests_in_flight = 0

    @keeps_cancellation
    async def refresh_workers(self) -> None:
        """Reads the registry and the pools, and moves a worker between pools if the load calls for it."""
        declared = await self.registry.workers()
        membership = await self.pools.membership() if self.pools else {}
        if self.pools and self.pool_policy.enabled:
            transitions = await self.pools.transitions(KEEP_TRANSITIONS_SHOWN)
            self.transitions = transitions
            last_change = transitions[0].at if transitions else 0.0
            change = plan(declared, membership, self.pool_policy, self.in_flight_tokens, time.time(), last_change)
            if change is not None and await self.pools.apply(change, self.pool_policy.cooldown_s):
                self._record_transition(change)
                membership = await self.pools.membership()
                self.transitions = [change, *transitions][:KEEP_TRANSITIONS_SHOWN]
            gone = list(set(membership) - {w.worker_id for w in declared})
            if gone:
                await self.pools.forget(gone)
        self.declared, self.membership = declared, membership
        self.workers = with_pools(declared, membership)

    def _record_transition(self, change: Transition) -> None:
        with tracer().start_as_current_span("scheduler.pool_transition") as span:
            span.set_attributes({"pool.worker": change.worker_id, "pool.from": change.from_pool,
                                 "pool.to": change.to_pool, "pool.reason": change.reason})
        metrics.pool_transitions.add(1, {"from": change.from_pool, "to": change.to_pool})
        log.info("pools: %s moves from the %s pool to the %s pool (%s)", change.worker_id, change.from_pool,
                 change.to_pool, change.reason)

    async def refresh_workers_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.refresh_workers()
            except (redis.RedisError, OSError) as e:
                log.warning("cannot read the worker registry: %s", e)
            await asyncio.sleep(interval_s)

    # -- validation -------------------------------------------------------------------------------

    def _prompt_ids(self, request: scheduler_pb2.GenerateRequest) -> list[int]:
        tokenizer = self.model.tokenizer
        kind = request.WhichOneof("input")
        if kind == "prompt":
            if not request.prompt:
                raise InvalidRequest("prompt is empty")
            ids = tokenizer.encode(request.prompt, add_special_tokens=False)
        elif kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                raise InvalidRequest("chat has no messages")
            if any(m["role"] not in ("system", "user", "assistant") for m in messages):
                raise InvalidRequest("chat message roles must be system, user or assistant")
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        elif kind == "token_ids":
            ids = list(request.token_ids.ids)
            if ids and (min(ids) < 0 or max(ids) >= self.model.vocab_size):
                raise InvalidRequest(f"token ids must be in [0, {self.model.vocab_size})")
        else:
            raise InvalidRequest("set one input: prompt, chat or token_ids")
        if not ids:
            raise InvalidRequest("the prompt has no tokens")
        return ids

    def _validate(self, request: scheduler_pb2.GenerateRequest) -> tuple[list[int], SamplingParams]:
        if len(request.request_id) > MAX_REQUEST_ID_CHARS or not request.request_id.isprintable():
            raise InvalidRequest(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters")
        if request.model and request.model != self.model.name:
            raise InvalidRequest(f"unknown model {request.model!r}; this cluster serves {self.model.name!r}")
        params = convert.sampling_from_pb(request.sampling)
        try:
            params.validate()
        except ValueError as e:
            raise InvalidRequest(str(e)) from e
        ids = self._prompt_ids(request)
        limit = self.model.max_context_tokens
        if len(ids) + params.max_tokens > limit:
            raise InvalidRequest(
                f"this model's context window is {limit} tokens, but the request needs {len(ids) + params.max_tokens} "
                f"({len(ids)} prompt + {params.max_tokens} max_tokens); shorten the prompt or lower max_tokens"
            )
        return ids, params

    # -- Generate ---------------------------------------------------------------------------------

    async def Generate(self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        received = time.perf_counter()
        rid = request.request_id or uuid.uuid4().hex
        span = rpc_span()  # the server interceptor's span: the root of the request's trace
        span.set_attribute("splitwise.request_id", rid)
        outcome = "failed"
        try:
            with tracer().start_as_current_span("scheduler.admission") as admission:
                try:
                    ids, params = self._validate(request)
                except InvalidRequest as e:
                    outcome = "invalid"
                    record_error(admission, e)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                admission.set_attributes({"prompt.tokens": len(ids), "sampling.max_tokens": params.max_tokens,
                                          "requests_in_flight": self.requests_in_flight})
                if self.requests_in_flight >= self.max_requests_in_flight:
                    outcome = "rejected"
                    problem = (f"the cluster is full: {self.requests_in_flight} requests in flight "
                               f"(SPLITWISE_MAX_REQUESTS_IN_FLIGHT); retry in {RETRY_PUSHBACK_MS} ms")
                    record_error(admission, problem)
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem, PUSHBACK)
            span.set_attributes({"prompt.tokens": len(ids), "sampling.max_tokens": params.max_tokens})
            remaining = context.time_remaining()
            timeout_s = min(remaining, self.request_timeout_s) if remaining is not None else self.request_timeout_s
            clock = TokenClock(received)
            self.requests_in_flight += 1
            if self.journal:
                self.journal.opened(rid, len(ids), params.max_tokens)
            try:
                async with contextlib.aclosing(self._run(rid, ids, params, timeout_s, span)) as run_:
                    async for response in run_:
                        clock.tokens(len(response.token_ids))
                        if self.journal:
                            self.journal.progress(rid, clock.count)
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
            except (asyncio.CancelledError, GeneratorExit):
                expired = context.time_remaining() is not None and context.time_remaining() <= 0
                outcome = "deadline" if expired else "cancelled"
                record_cancelled(span, "deadline" if expired else "client")
                raise
            finally:
                self.requests_in_flight -= 1
                span.set_attributes(clock.attributes())
                if self.journal:
                    self.journal.closed(rid, outcome, clock.count)
        finally:
            metrics.request_duration.record(time.perf_counter() - received, {"outcome": outcome})
            metrics.requests.add(1, {"outcome": outcome})

    async def _run(self, rid: str, ids: list[int], params: SamplingParams, timeout_s: float, span):
        """Runs the request, trying again on other workers when one becomes unreachable.

        Before anything was streamed, the request starts over on freshly routed workers. After, it resumes on
        another token worker: from the prompt's KV kept in kv_store when there is one, else recomputing the
        prompt there, and in both cases recomputing the tokens already streamed; the client's stream goes on.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        output = OutputStream(rid, self.model.tokenizer, params, len(ids), self.model.eos_token_ids)
        progress = Progress()
        unreachable: set[str] = set()
        last_failure: WorkerFailed | None = None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            # Workers know each attempt by its own id, so one attempt's cleanup never touches the next.
            worker_rid = rid if attempt == 1 else f"{rid}/attempt-{attempt}"
            resuming = output.completion_tokens > 0
            kept_as = progress.kv_kept_as if resuming else None
            try:
                if resuming:
                    run = self._resume(rid, worker_rid, ids, params, deadline - loop.time(), span, unreachable,
                                       output, kept_as)
                else:
                    run = self._attempt(rid, worker_rid, ids, params, deadline - loop.time(), span, unreachable,
                                        output, progress)
                async with contextlib.aclosing(run):
                    async for response in run:
                        yield response
                return
            except NoWorkerAvailable:
                if last_failure is not None:  # the workers left were all unreachable: say what happened
                    raise last_failure
                raise
            except WorkerFailed as e:
                kept_kv_missing = kept_as is not None and e.worker.role != "prompt" and e.kv_store_failed
                if attempt == MAX_ATTEMPTS or not (e.code == grpc.StatusCode.UNAVAILABLE or kept_kv_missing):
                    raise
                last_failure = e
                if kept_kv_missing:  # the worker is fine, the kept KV is not: recompute the prompt instead
                    progress.kv_kept_as = None
                else:
                    unreachable.add(e.worker.worker_id)
                kind = "resume" if output.completion_tokens else "retry"
                kv = "kv_store" if kind == "resume" and progress.kv_kept_as else "recompute"
                span.add_event(kind, {"worker": e.worker.worker_id, "error": str(e), "attempt": attempt,
                                      "output.tokens": output.completion_tokens, "kv": kv})
                metrics.recoveries.add(1, {"kind": kind, "kv": kv})
                log.warning("request %s: %s; %s", rid, e,
                            f"resuming after {output.completion_tokens} tokens ({kv})" if kind == "resume"
                            else "routing again")

    def _route(self, num_prompt_tokens: int, params: SamplingParams, unreachable: set[str]) -> Route:
        with tracer().start_as_current_span("scheduler.route") as span:
            candidates = [w for w in self.workers if w.worker_id not in unreachable]
            span.set_attributes({f"route.pool.{pool}.workers": sum(w.role == pool for w in candidates) for pool in POOLS})
            self.routed += 1
            chosen = route(candidates, self.model.name, num_prompt_tokens + params.max_tokens, self.in_flight_tokens,
                           self.routing_policy, num_prompt_tokens, self.routed, self.conditional)
            prompt_w, token_w = chosen.prompt_worker, chosen.token_worker
            span.set_attributes({
                "route.prompt_worker": prompt_w.worker_id,
                "route.prompt_worker.pool": prompt_w.role,
                "route.prompt_worker.pending_tokens": prompt_w.pending_tokens,
                "route.prompt_worker.in_flight_tokens": self.in_flight_tokens.get(prompt_w.worker_id, 0),
                "route.token_worker": token_w.worker_id,
                "route.token_worker.pool": token_w.role,
                "route.token_worker.pending_tokens": token_w.pending_tokens,
                "route.token_worker.in_flight_tokens": self.in_flight_tokens.get(token_w.worker_id, 0),
                "route.policy": self.routing_policy,
                "route.colocated": chosen.colocated,
                "route.unreachable_workers": len(unreachable),
            })
            return chosen

    async def _attempt(self, rid: str, worker_rid: str, ids: list[int], params: SamplingParams, timeout_s: float,
                       span, unreachable: set[str], output: OutputStream, progress: "Progress"):
        chosen = self._route(len(ids), params, unreachable)
        prompt_w, token_w = chosen.prompt_worker, chosen.token_worker
        if self.journal:
            self.journal.assigned(rid, worker_rid, "colocated" if chosen.colocated else "split", prompt_w.worker_id,
                                  token_w.worker_id)
        loads = {prompt_w.worker_id: len(ids), token_w.worker_id: len(ids) + params.max_tokens}
        for worker_id, tokens in loads.items():
            self.in_flight_tokens[worker_id] = self.in_flight_tokens.get(worker_id, 0) + tokens
        sampling = convert.sampling_to_pb(params)
        if self.kv_transfer == "relay":
            target = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_KV_STORE, address=self.kv_store_address)
            transport = GRPC
        else:
            target = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_TOKEN_WORKER, address=token_w.address)
            transport = choose_transport(prompt_w.kv_transports.split(","), prompt_w.host_id,
                                         token_w.kv_transports.split(","), token_w.host_id)
        target.layerwise = len(ids) >= self.kv_layerwise_min_tokens
        colocated = prompt_w.worker_id == token_w.worker_id  # a mixed worker runs both phases
        span.set_attributes({"kv.transport": transport, "kv.layerwise": target.layerwise})
        keep = None
        if self.kv_transfer == "direct" and self.kv_keep and self.kv_store_address and not colocated:
            keep = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_KV_STORE, address=self.kv_store_address)
        decode = worker_pb2_grpc.TokenWorkerStub(self.channels.get(token_w.address)).Decode(
            worker_pb2.DecodeRequest(request_id=worker_rid, num_prompt_tokens=len(ids), sampling=sampling, kv_source=target,
                                     prompt_token_ids=ids, prefill_here=colocated, kv_transport=transport),
            timeout=timeout_s,
        )
        prefill = None
        decode_ended = None
        ending: set = set()  # the calls whose worker has sent everything: their streams end by themselves
        try:
            reserved = await self._expect(decode, token_w, "reserved")
            # The handshake: the prompt worker refuses a receiver whose KV layout is not its own.
            target.layout.CopyFrom(reserved.layout)
            if reserved.HasField("offer"):
                target.offer.CopyFrom(reserved.offer)
            if not colocated:
                prefill = worker_pb2_grpc.PromptWorkerStub(self.channels.get(prompt_w.address)).Prefill(
                    worker_pb2.PrefillRequest(request_id=worker_rid, prompt_token_ids=ids, sampling=sampling,
                                              kv_target=target, kv_keep=keep),
                    timeout=timeout_s,
                )
                # The token worker can fail the transfer first (its KV stopped arriving): watch both streams.
                decode_ended = asyncio.ensure_future(decode.code())
                first = await self._expect_unless(prefill, prompt_w, "first_token", decode, token_w, decode_ended)
                span.add_event("first_token")
                if keep is not None or self.kv_transfer == "relay":  # the kv_store has (or is getting) the prompt KV
                    progress.kv_kept_as = worker_rid
                yield output.add([first.token_id], None, [first.logprob])
                if output.finished:
                    return
                transfer = await self._expect_unless(prefill, prompt_w, "transfer", decode, token_w, decode_ended)
                await end_stream(prefill, cancel=False)  # the prompt worker's part is over
                ending.add(prefill)
                span.set_attributes({"kv.bytes": transfer.num_bytes, "kv.layers": transfer.num_layers,
                                     "kv.transfer_s": transfer.seconds})
            async for response in self._relay_tokens(decode, token_w, output, span, ending):
                yield response
        finally:
            if decode_ended is not None:
                decode_ended.cancel()
            for worker_id, tokens in loads.items():
                self.in_flight_tokens[worker_id] -= tokens
            for call in (decode, prefill):  # both at once: waiting on one below may be cut short by a cancellation
                if call is not None and call not in ending:
                    call.cancel()
            for call in (decode, prefill):
                if call is not None:
                    await end_stream(call, cancel=call not in ending)

    async def _relay_tokens(self, decode, token_w: WorkerInfo, output: OutputStream, span, ending: set):
        """The client's messages from a token worker's stream, up to the finish."""
        while not output.finished:
            tokens = await self._expect(decode, token_w, "tokens")
            if output.completion_tokens == 0 and tokens.token_ids:
                span.add_event("first_token")
            if tokens.finish_reason:
                ending.add(decode)
            response = output.add(list(tokens.token_ids), tokens.finish_reason or None, list(tokens.logprobs))
            if response.token_ids or response.text or output.finished:
                yield response
        if decode not in ending and output.finish_reason == common_pb2.FINISH_REASON_LENGTH:
            # The worker stops at max_tokens too: its last message is on its way. Reading it lets the stream end
            # by itself rather than be cancelled.
            try:
                last = await asyncio.wait_for(decode.read(), WORKER_END_GRACE_S)
                if last is not grpc.aio.EOF and last.WhichOneof("kind") == "tokens" and last.tokens.finish_reason:
                    ending.add(decode)
            except (asyncio.TimeoutError, grpc.aio.AioRpcError):
                pass
        span.set_attributes({"completion.tokens": output.completion_tokens,
                             "finish_reason": common_pb2.FinishReason.Name(output.finish_reason)})

    async def _resume(self, rid: str, worker_rid: str, ids: list[int], params: SamplingParams, timeout_s: float,
                      span, unreachable: set[str], output: OutputStream, kept_as: str | None):
        """Goes on with a request whose worker died after streaming some tokens, on another token worker."""
        with tracer().start_as_current_span("scheduler.route") as route_span:
            candidates = [w for w in self.workers if w.worker_id not in unreachable]
            self.routed += 1
            token_w = token_phase(candidates, self.model.name, len(ids) + params.max_tokens, self.in_flight_tokens,
                                  self.routing_policy, self.routed)
            route_span.set_attributes({
                "route.resume": True,
                "route.resume.output_tokens": output.completion_tokens,
                "route.resume.kv": "kv_store" if kept_as else "recompute",
                "route.token_worker": token_w.worker_id,
                "route.token_worker.pool": token_w.role,
                "route.token_worker.pending_tokens": token_w.pending_tokens,
                "route.policy": self.routing_policy,
                "route.unreachable_workers": len(unreachable),
            })
        if self.journal:
            self.journal.assigned(rid, worker_rid, "resumed", "", token_w.worker_id)
        load = len(ids) + params.max_tokens
        self.in_flight_tokens[token_w.worker_id] = self.in_flight_tokens.get(token_w.worker_id, 0) + load
        source = None
        if kept_as is not None:
            source = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_KV_STORE, address=self.kv_store_address,
                                         request_id=kept_as)
        decode = worker_pb2_grpc.TokenWorkerStub(self.channels.get(token_w.address)).Decode(
            worker_pb2.DecodeRequest(request_id=worker_rid, num_prompt_tokens=len(ids),
                                     sampling=convert.sampling_to_pb(params), kv_source=source,
                                     prompt_token_ids=ids, prefill_here=source is None, kv_transport=GRPC,
                                     output_token_ids=output.token_ids),
            timeout=timeout_s,
        )
        ending: set = set()
        try:
            await self._expect(decode, token_w, "reserved")
            async for response in self._relay_tokens(decode, token_w, output, span, ending):
                yield response
        finally:
            self.in_flight_tokens[token_w.worker_id] -= load
            await end_stream(decode, cancel=decode not in ending)

    async def _expect_unless(self, call, who: WorkerInfo, kind: str, other, other_worker: WorkerInfo,
                             other_ended: asyncio.Future):
        """Like _expect on `call`, but fails as soon as the `other` stream ends with an error meanwhile."""
        read = asyncio.ensure_future(self._expect(call, who, kind))
        try:
            await asyncio.wait({read, other_ended}, return_when=asyncio.FIRST_COMPLETED)
            if read.done():
                failed = read.exception()
                if not (isinstance(failed, WorkerFailed) and failed.kv_transfer_failed):
                    return read.result()
                # The sender is up and says its transfer broke, often only as "the peer went away" (grpcio hides
                # the receiver's status when a write races its abort): the receiver's own stream says why, a
                # corrupt chunk (DATA_LOSS) or its death, and that is the failure to act on.
                await asyncio.wait({other_ended}, timeout=SENDER_FAILURE_GRACE_S)
                if not other_ended.done() or other_ended.result() == grpc.StatusCode.OK:
                    raise failed
            else:
                # The receiver saw the KV stream break; if its sender died, the sender's own stream says so at
                # once, and that is the failure to act on (the request goes to another prompt worker, not
                # another token worker).
                await asyncio.wait({read}, timeout=SENDER_FAILURE_GRACE_S)
        except asyncio.CancelledError:  # the request ended: no read of the stream may outlive it
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
            raise
        if read.done() and isinstance(read.exception(), WorkerFailed) and not read.exception().kv_transfer_failed:
            raise read.exception()
        read.cancel()
        await asyncio.gather(read, return_exceptions=True)  # the stream's reader must be idle before its end is read
        code = other_ended.result()
        details = await other.details()
        if code == grpc.StatusCode.OK:
            code, details = grpc.StatusCode.INTERNAL, "the decode stream ended before the KV arrived"
        raise WorkerFailed(other_worker, code, details)

    @staticmethod
    async def _expect(call, who: WorkerInfo, kind: str):
        """Reads the next event of a worker stream, which must be of `kind`; returns its payload."""
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as e:
            raise WorkerFailed(who, e.code(), e.details()) from e
        if msg is grpc.aio.EOF or msg.WhichOneof("kind") != kind:
            got = "the end of the stream" if msg is grpc.aio.EOF else msg.WhichOneof("kind")
            raise WorkerFailed(who, grpc.StatusCode.INTERNAL, f"expected {kind}, got {got}")
        return getattr(msg, kind)

    def gauges(self):
        """Pool sizes and queued tokens as this scheduler sees the registry, for the metrics endpoint."""
        workers = self.workers
        for pool in POOLS:
            members = [w for w in workers if w.role == pool]
            yield "splitwise.pool.workers", len(members), {"splitwise.pool": pool}
            yield "splitwise.pool.pending_tokens", sum(w.pending_tokens for w in members), {"splitwise.pool": pool}

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
        return scheduler_pb2.ClusterStatusResponse(
            cluster_requests_in_flight=everywhere,
            model=self.model.name,
            workers=[convert.worker_to_pb(w, now, pool_of(w, self.membership)) for w in self.declared],
            pool_transitions=[scheduler_pb2.PoolTransition(worker_id=t.worker_id, from_pool=t.from_pool,
                                                           to_pool=t.to_pool, reason=t.reason, at_unix_s=t.at)
                              for t in self.transitions],
            requests_in_flight=self.requests_in_flight,
            kv_transfer_mode=self.kv_transfer,
        )
