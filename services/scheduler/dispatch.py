"""Runs one request on workers: routes it, drives the prompt and token workers' streams, and recovers from failures.

Before anything was streamed, a request whose worker is gone (or full) starts over on freshly routed workers. After,
it resumes on another token worker: from the prompt's KV kept in kv_store when there is one, else recomputing the
prompt there, and in both cases recomputing the tokens already streamed; the client's stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from dataclasses import dataclass

import grpc
import redis.asyncio as redis

from services.scheduler.cluster_view import ClusterView
from services.scheduler.output import OutputStream
from services.scheduler.worker_calls import WorkerFailed, expect, expect_unless, finish_reason_of
from splitwise.channels import ChannelPool, TracedStream, end_stream
from splitwise.cluster.journal import RequestJournal
from splitwise.cluster.kv_index import KVIndex
from splitwise.cluster.registry import WorkerInfo
from splitwise.cluster.routing import NoWorkerAvailable
from splitwise.engine.sampling import SamplingParams
from splitwise.kv.transport.registry import GRPC, choose_transport
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from splitwise.telemetry import metrics

log = logging.getLogger(__name__)

# Attempts of a request whose worker is gone or full (or died after streaming, for a resume).
MAX_ATTEMPTS = 3
# A worker that answers so is avoided for the rest of the request: it is gone (UNAVAILABLE), or it cannot take the
# request now (RESOURCE_EXHAUSTED: its prompt queue or KV memory is full). When no other worker is left, the client
# gets that status (with a retry hint when the cluster is full).
MOVE_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# How long a continued request looks in Redis for the prompt KV its broken stream kept, before recomputing it.
KEPT_COPY_LOOKUP_S = 1.0


@dataclass(frozen=True)
class KVSettings:
    transfer: str  # "direct": prompt worker -> token worker; "relay": through the kv_store
    kv_store_address: str
    keep: bool  # in direct mode, the prompt worker also keeps a copy in the kv_store (for resumes)
    layerwise_min_tokens: int

    def __post_init__(self):
        if self.transfer not in ("direct", "relay"):
            raise ValueError(f"kv_transfer must be 'direct' or 'relay', got {self.transfer!r}")


@dataclass
class Progress:
    """What one attempt leaves the next: where the kv_store keeps the prompt's KV (the id it is stored by)."""

    kv_kept_as: str | None = None


def decode_mode(kv_source: worker_pb2.KVTarget | None, resumed: bool) -> int:
    """How the token worker gets the prompt KV (worker.proto DecodeMode): computed there when no source is named;
    else pushed by the prompt worker, relayed through the kv_store, or, for a resumed request, its kept copy."""
    from_store = kv_source is not None and kv_source.kind == worker_pb2.KVTarget.KIND_KV_STORE
    return convert.decode_mode_of(kv_source is None, from_store, resumed)


class Dispatcher:
    def __init__(self, view: ClusterView, channels: ChannelPool, kv: KVSettings, journal: RequestJournal | None = None,
                 kv_index: KVIndex | None = None, worker_calls: str = "rpc"):
        if worker_calls not in ("stream", "rpc"):
            raise ValueError(f"worker_calls must be 'stream' or 'rpc', got {worker_calls!r}")
        self.worker_calls = worker_calls
        self.view = view
        self.channels = channels
        self.kv = kv
        self.journal = journal
        self.kv_index = kv_index

    async def kept_copy(self, rid: str) -> str | None:
        """The id the kv_store keeps the request's prompt KV by, when an earlier stream of it (on a scheduler
        replica that died) left a copy there: its last attempt's, as journaled, or its first's."""
        if self.kv_index is None or not self.kv.kv_store_address:
            return None
        try:
            async with asyncio.timeout(KEPT_COPY_LOOKUP_S):
                entry = await self.journal.entry(rid) if self.journal else {}
                for key in dict.fromkeys([entry.get("attempt") or rid, rid]):
                    if await self.kv_index.lookup(key) is not None:
                        return key
        except (redis.RedisError, OSError, TimeoutError) as e:
            log.warning("request %s: cannot look up its kept KV (%s); recomputing the prompt", rid, e or "timed out")
        return None

    @staticmethod
    def continued(rid: str, span, output_tokens: int, kept_as: str | None) -> None:
        """Records a request that continues a broken stream (its scheduler replica died) after `output_tokens`."""
        kv = "kv_store" if kept_as else "recompute"
        span.add_event("continue", {"output.tokens": output_tokens, "kv": kv})
        log.info("request %s: continues a broken stream after %d tokens (%s)", rid, output_tokens, kv)

    async def run(self, rid: str, ids: list[int], params: SamplingParams, timeout_s: float, span,
                  output: OutputStream, progress: Progress):
        """The request's responses, trying again on other workers when one is gone or full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        avoided: set[str] = set()
        last_failure: WorkerFailed | None = None
        # Workers know each attempt by its own id, so one attempt's cleanup never touches the next; a continued
        # stream's too (the broken stream's workers may not have let go of theirs yet).
        base = rid if output.completion_tokens == 0 else f"{rid}/continued-{uuid.uuid4().hex[:8]}"
        for attempt in range(1, MAX_ATTEMPTS + 1):
            worker_rid = base if attempt == 1 else f"{base}/attempt-{attempt}"
            resuming = output.completion_tokens > 0
            kept_as = progress.kv_kept_as if resuming else None
            try:
                if resuming:
                    run = self._resume(rid, worker_rid, ids, params, deadline - loop.time(), span, avoided,
                                       output, kept_as, "continue" if attempt == 1 else "resume")
                else:
                    run = self._attempt(rid, worker_rid, ids, params, deadline - loop.time(), span, avoided,
                                        output, progress)
                async with contextlib.aclosing(run):
                    async for response in run:
                        yield response
                return
            except NoWorkerAvailable:
                if last_failure is not None:  # every worker left was gone or full: say what happened
                    raise last_failure
                raise
            except WorkerFailed as e:
                kept_kv_missing = kept_as is not None and e.worker.role != "prompt" and e.kv_store_failed
                if attempt == MAX_ATTEMPTS or not (e.code in MOVE_ON or kept_kv_missing):
                    raise
                last_failure = e
                if kept_kv_missing:  # the worker is fine, the kept KV is not: recompute the prompt instead
                    progress.kv_kept_as = None
                else:  # gone, or full for now, or at fault for a failed transfer: this request goes elsewhere
                    avoided.add(e.culprit.worker_id)
                kind = "resume" if output.completion_tokens else "retry"
                kv = "kv_store" if kind == "resume" and progress.kv_kept_as else "recompute"
                span.add_event(kind, {"worker": e.worker.worker_id, "avoided": e.culprit.worker_id, "error": str(e),
                                      "attempt": attempt, "output.tokens": output.completion_tokens, "kv": kv})
                if kind == "retry":  # (a resume is counted once the token worker says where its KV comes from)
                    metrics.recoveries.add(1, {"kind": kind, "kv": kv})
                log.warning("request %s: %s; %s", rid, e,
                            f"resuming after {output.completion_tokens} tokens ({kv})" if kind == "resume"
                            else "routing again")

    def _stream(self, worker: WorkerInfo, service: str, method: str, request, timeout_s: float):
        """Starts a worker's server stream: traced by TracedStream on the scheduler's untraced channels, as a call
        on the worker's WorkerCalls stream (worker_calls="stream", a worker that serves it) or an RPC of its own."""
        address = worker.address
        full_name = worker_pb2.DESCRIPTOR.services_by_name[service].full_name
        if self.worker_calls == "stream" and worker.worker_calls >= 1 and not self.channels.traced:
            start = functools.partial(self.channels.calls(address).start, method.lower())
            return TracedStream(start, f"/{full_name}/{method}", request, timeout_s)
        stub = getattr(worker_pb2_grpc, f"{service}Stub")(self.channels.get(address))
        if self.channels.traced:
            return getattr(stub, method)(request, timeout=timeout_s)
        return TracedStream(getattr(stub, method), f"/{full_name}/{method}", request, timeout_s)

    def _kv_target(self, prompt_w: WorkerInfo, token_w: WorkerInfo, num_prompt_tokens: int):
        if self.kv.transfer == "relay":
            target = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_KV_STORE, address=self.kv.kv_store_address)
            transport = GRPC
        else:
            target = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_TOKEN_WORKER, address=token_w.address)
            transport = choose_transport(prompt_w.kv_transports.split(","), prompt_w.host_id,
                                         token_w.kv_transports.split(","), token_w.host_id)
        target.layerwise = num_prompt_tokens >= self.kv.layerwise_min_tokens
        return target, transport

    async def _attempt(self, rid: str, worker_rid: str, ids: list[int], params: SamplingParams, timeout_s: float,
                       span, avoided: set[str], output: OutputStream, progress: Progress):
        chosen = self.view.route(len(ids), params.max_tokens, avoided)
        prompt_w, token_w = chosen.prompt_worker, chosen.token_worker
        colocated = chosen.colocated  # a mixed worker (or a token worker, for a short prompt) runs both phases
        if self.journal:
            self.journal.assigned(rid, worker_rid, "colocated" if colocated else "split", prompt_w.worker_id,
                                  token_w.worker_id)
        sampling = convert.sampling_to_pb(params)
        target, transport = self._kv_target(prompt_w, token_w, len(ids))
        if not colocated:  # (a colocated request's KV never leaves its worker)
            span.set_attributes({"kv.transport": transport, "kv.layerwise": target.layerwise})
        keep = None
        if self.kv.transfer == "direct" and self.kv.keep and self.kv.kv_store_address and not colocated:
            keep = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_KV_STORE, address=self.kv.kv_store_address)
        decode = self._stream(token_w, "TokenWorker", "Decode", worker_pb2.DecodeRequest(
            request_id=worker_rid, num_prompt_tokens=len(ids), sampling=sampling, kv_source=target,
            prompt_token_ids=ids, prefill_here=colocated, kv_transport=transport,
            mode=decode_mode(None if colocated else target, resumed=False)), timeout_s)
        prefill = None
        decode_ended = None
        ending: set = set()  # the calls whose worker has sent everything: their streams end by themselves
        try:
            with self.view.loaded({prompt_w.worker_id: len(ids), token_w.worker_id: len(ids) + params.max_tokens}):
                reserved = await expect(decode, token_w, "reserved")
                # The handshake: the prompt worker refuses a receiver whose KV layout is not its own.
                target.layout.CopyFrom(reserved.layout)
                if reserved.HasField("offer"):
                    target.offer.CopyFrom(reserved.offer)
                if not colocated:
                    prefill = self._stream(prompt_w, "PromptWorker", "Prefill", worker_pb2.PrefillRequest(
                        request_id=worker_rid, prompt_token_ids=ids, sampling=sampling, kv_target=target,
                        kv_keep=keep), timeout_s)
                    # The token worker can fail the transfer first (its KV stopped arriving): watch both streams.
                    decode_ended = asyncio.ensure_future(decode.code())
                    first = await expect_unless(prefill, prompt_w, "first_token", decode, token_w, decode_ended)
                    span.add_event("first_token")
                    if keep is not None or self.kv.transfer == "relay":  # the kv_store has (or gets) the prompt KV
                        progress.kv_kept_as = worker_rid
                    # The prompt worker's engine says whether the request ends at its first token.
                    yield output.add([first.token_id], finish_reason_of(first.finish_reason, prompt_w),
                                     [first.logprob], [first.top_logprobs])
                    if output.finished:
                        return
                    transfer = await expect_unless(prefill, prompt_w, "transfer", decode, token_w, decode_ended)
                    await end_stream(prefill, cancel=False)  # the prompt worker's part is over
                    ending.add(prefill)
                    span.set_attributes({"kv.bytes": transfer.num_bytes, "kv.layers": transfer.num_layers,
                                         "kv.transfer_s": transfer.seconds})
                async for response in self._relay_tokens(decode, token_w, output, span, ending):
                    yield response
        finally:
            if decode_ended is not None:
                decode_ended.cancel()
            for call in (decode, prefill):  # both at once: waiting on one below may be cut short by a cancellation
                if call is not None and call not in ending:
                    call.cancel()
            for call in (decode, prefill):
                if call is not None:
                    await end_stream(call, cancel=call not in ending)

    async def _relay_tokens(self, decode, token_w: WorkerInfo, output: OutputStream, span, ending: set,
                            first: worker_pb2.Tokens | None = None):
        """The client's messages from a token worker's stream (starting with `first`, already read), to the finish."""
        while not output.finished:
            tokens = first if first is not None else await expect(decode, token_w, "tokens")
            first = None
            if output.completion_tokens == 0 and tokens.token_ids:
                span.add_event("first_token")
            reason = finish_reason_of(tokens.finish_reason, token_w)
            if reason:
                ending.add(decode)
            response = output.add(list(tokens.token_ids), reason, list(tokens.logprobs), tokens.top_logprobs)
            if response.token_ids or response.text or output.finished:
                yield response
        span.set_attributes({"completion.tokens": output.completion_tokens,
                             "finish_reason": common_pb2.FinishReason.Name(output.finish_reason)})

    async def _resume(self, rid: str, worker_rid: str, ids: list[int], params: SamplingParams, timeout_s: float,
                      span, avoided: set[str], output: OutputStream, kept_as: str | None, recovery: str):
        """Goes on with a request that has streamed some tokens already, on a token worker of its own: a resume
        after a worker failed, or the continuation of a stream broken with its scheduler replica."""
        token_w = self.view.route_resume(len(ids), params.max_tokens, output.completion_tokens,
                                         "kv_store" if kept_as else "recompute", avoided)
        if self.journal:
            self.journal.assigned(rid, worker_rid, "resumed", "", token_w.worker_id)
        source = None
        if kept_as is not None:
            source = worker_pb2.KVTarget(kind=worker_pb2.KVTarget.KIND_KV_STORE, address=self.kv.kv_store_address,
                                         request_id=kept_as)
        decode = self._stream(token_w, "TokenWorker", "Decode", worker_pb2.DecodeRequest(
            request_id=worker_rid, num_prompt_tokens=len(ids), sampling=convert.sampling_to_pb(params),
            kv_source=source, prompt_token_ids=ids, prefill_here=source is None, kv_transport=GRPC,
            output_token_ids=output.token_ids, mode=decode_mode(source, resumed=True)), timeout_s)
        ending: set = set()
        try:
            with self.view.loaded({token_w.worker_id: len(ids) + params.max_tokens}):
                await expect(decode, token_w, "reserved")
                first = await expect(decode, token_w, ("tokens", "kv_fallback"))
                kv = "kv_store" if kept_as else "recompute"
                if isinstance(first, worker_pb2.KVFallback):  # the kept KV was not to be had: recomputed there
                    span.add_event("kv_fallback", {"worker": token_w.worker_id, "reason": first.reason})
                    kv, first = "recompute", None
                metrics.recoveries.add(1, {"kind": recovery, "kv": kv})
                async for response in self._relay_tokens(decode, token_w, output, span, ending, first):
                    yield response
        finally:
            await end_stream(decode, cancel=decode not in ending)
