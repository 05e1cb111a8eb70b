"""An async Python client for the scheduler's public API, failing over between scheduler replicas."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import grpc

from splitwise.rpc.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from splitwise.security.keys import ADMIN_KEY_FILE, API_KEY_FILE, configured_key
from splitwise.security.peers import bearer_metadata
from splitwise.rpc.options import DEFAULT_KEEPALIVE_S, channel_options
from splitwise.telemetry.tracing import client_interceptors

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:50051"
T = TypeVar("T")


@dataclass
class Chunk:
    """One streamed piece of a completion."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop", "length", ... on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    # Per token_ids entry, when top_logprobs was asked: its position's most likely (token_id, logprob), best first.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0


def _finish_reason_name(value: int) -> str | None:
    if value == common_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def build_request(
    prompt: str | None = None,
    messages: Sequence[dict] | None = None,
    token_ids: Sequence[int] | None = None,
    *,
    model: str = "",
    request_id: str = "",
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    max_tokens_fit_context: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> scheduler_pb2.GenerateRequest:
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=list(stop),
        ignore_eos=ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
    )
    if seed is not None:
        sampling.seed = seed
    request = scheduler_pb2.GenerateRequest(model=model, request_id=request_id, sampling=sampling,
                                            max_tokens_fit_context=max_tokens_fit_context)
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.chat.messages.extend(scheduler_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        request.token_ids.ids.extend(token_ids)
    return request


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """"a:1,b:2" or ["a:1", "b:2"] -> ["a:1", "b:2"]."""
    parts = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    found = [a.strip() for a in parts if a.strip()]
    if not found:
        raise ValueError(f"no scheduler address in {addresses!r}")
    return found


class SplitwiseClient:
    """Talks to one scheduler replica at a time, in the order given, and moves to the next one when a call fails
    with UNAVAILABLE (replica gone, connection refused, no worker there). A stream that breaks that way after
    yielding chunks is continued on the next replica, which is told the tokens received so far
    (`continue_after_token_ids`, with the resume token of the stream's first chunk) and streams only what follows;
    with `continue_streams=False` its error is raised instead. Each replica is tried at most once per call. A
    replica that stops answering keepalive pings for `keepalive_s` (a host gone without closing its connections)
    counts as gone.

    Keys: `api_key` for Generate, `admin_key` for ClusterStatus; by default SPLITWISE_API_KEY and
    SPLITWISE_ADMIN_KEY, else the files a local `splitwise up` wrote in .splitwise/. `tls_ca` (a PEM file, by default
    SPLITWISE_TLS_CA) makes the channels TLS, verifying the scheduler's certificate against that CA."""

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, continue_streams: bool = True,
                 keepalive_s: float = DEFAULT_KEEPALIVE_S, api_key: str | None = None, admin_key: str | None = None,
                 tls_ca: str | None = None):
        self.addresses = parse_addresses(address)
        self.continue_streams = continue_streams
        api_key = configured_key("SPLITWISE_API_KEY", API_KEY_FILE) if api_key is None else api_key
        admin_key = configured_key("SPLITWISE_ADMIN_KEY", ADMIN_KEY_FILE) if admin_key is None else admin_key
        self.api_metadata = bearer_metadata(api_key or admin_key)
        self.admin_metadata = bearer_metadata(admin_key)
        tls_ca = os.environ.get("SPLITWISE_TLS_CA", "") if tls_ca is None else tls_ca
        # With a tracer provider set up in the caller's process, each call is a CLIENT span, parent of the cluster's.
        options = channel_options(keepalive_s)
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channels = [grpc.aio.secure_channel(a, credentials, options=options,
                                                     interceptors=client_interceptors()) for a in self.addresses]
        else:
            self.channels = [grpc.aio.insecure_channel(a, options=options, interceptors=client_interceptors())
                             for a in self.addresses]
        self.stubs = [scheduler_pb2_grpc.SchedulerStub(c) for c in self.channels]
        self.current = 0  # the replica calls go to first

    async def __aenter__(self) -> "SplitwiseClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    def _replicas(self) -> list[int]:
        """Every replica once, the current one first."""
        n = len(self.stubs)
        return [(self.current + i) % n for i in range(n)]

    def _moved_on(self, index: int, error: grpc.aio.AioRpcError) -> bool:
        """After an UNAVAILABLE from a replica, later calls start at the next one; True when that was the error."""
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        if len(self.stubs) > 1:
            log.warning("scheduler %s is unavailable: %s", self.addresses[index], error.details())
        if self.current == index:
            self.current = (index + 1) % len(self.stubs)
        return True

    async def stream(self, *args, timeout: float | None = None, **kwargs) -> AsyncIterator[Chunk]:
        """Streams a completion; arguments as build_request. Raises grpc.aio.AioRpcError on failure.

        timeout bounds the whole call, failovers included. Leaving the loop early cancels the request on every worker.
        """
        request = build_request(*args, **kwargs)
        deadline = None if timeout is None else time.monotonic() + timeout
        replicas = self._replicas()
        received: list[int] = []  # output tokens so far, over every replica
        for index in replicas:
            call = self.stubs[index].Generate(request, timeout=_remaining(deadline), metadata=self.api_metadata)
            try:
                async for r in call:
                    received += r.token_ids
                    request.request_id = r.request_id  # the scheduler's, when the caller gave none
                    if r.resume_token:  # the first chunk's: it proves a continuation of this stream is ours
                        request.resume_token = r.resume_token
                    yield Chunk(r.request_id, list(r.token_ids), r.text, _finish_reason_name(r.finish_reason),
                                r.usage.prompt_tokens, r.usage.completion_tokens, list(r.logprobs),
                                [list(zip(top.token_ids, top.logprobs)) for top in r.top_logprobs])
                return
            except grpc.aio.AioRpcError as e:
                broken = bool(received)
                if not self._moved_on(index, e) or index == replicas[-1] or (broken and not self.continue_streams):
                    raise
                if broken:
                    log.warning("request %s: stream broken after %d tokens; continuing it on scheduler %s",
                                request.request_id, len(received), self.addresses[replicas[replicas.index(index) + 1]])
                    request.continue_after_token_ids[:] = received
            finally:
                call.cancel()

    async def generate(self, *args, timeout: float | None = None, **kwargs) -> Completion:
        """The whole completion at once."""
        out = Completion()
        start = time.perf_counter()
        async for chunk in self.stream(*args, timeout=timeout, **kwargs):
            if not out.token_ids and chunk.token_ids:
                out.time_to_first_token_s = time.perf_counter() - start
            out.request_id = chunk.request_id
            out.text += chunk.text
            out.token_ids += chunk.token_ids
            out.logprobs += chunk.logprobs
            out.top_logprobs += chunk.top_logprobs
            if chunk.finish_reason:
                out.finish_reason = chunk.finish_reason
                out.prompt_tokens, out.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        out.total_s = time.perf_counter() - start
        return out

    async def cluster_status(self, timeout: float = 10.0) -> scheduler_pb2.ClusterStatusResponse:
        """The cluster as the first replica that answers sees it."""
        return await self._unary(lambda stub, t: stub.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=t,
                                                                    metadata=self.admin_metadata), timeout)

    async def _unary(self, call: Callable[[scheduler_pb2_grpc.SchedulerStub, float | None], Awaitable[T]],
                     timeout: float | None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        replicas = self._replicas()
        for index in replicas:
            try:
                return await call(self.stubs[index], _remaining(deadline))
            except grpc.aio.AioRpcError as e:
                if not self._moved_on(index, e) or index == replicas[-1]:
                    raise


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
