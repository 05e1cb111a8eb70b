"""An async Python client for the scheduler's public API."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import grpc

from splitwise.rpc.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from splitwise.server import CHANNEL_OPTIONS
from splitwise.telemetry.tracing import client_interceptors

DEFAULT_ADDRESS = "127.0.0.1:50051"


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


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
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
    logprobs: bool = False,
) -> scheduler_pb2.GenerateRequest:
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=list(stop),
        ignore_eos=ignore_eos, logprobs=logprobs,
    )
    if seed is not None:
        sampling.seed = seed
    request = scheduler_pb2.GenerateRequest(model=model, request_id=request_id, sampling=sampling)
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.chat.messages.extend(scheduler_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        request.token_ids.ids.extend(token_ids)
    return request


class SplitwiseClient:
    def __init__(self, address: str = DEFAULT_ADDRESS):
        # With a tracer provider set up in the caller's process, each call is a CLIENT span, parent of the cluster's.
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=client_interceptors())
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    async def __aenter__(self) -> "SplitwiseClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, *args, timeout: float | None = None, **kwargs) -> AsyncIterator[Chunk]:
        """Streams a completion; arguments as build_request. Raises grpc.aio.AioRpcError on failure.

        Leaving the loop early cancels the request on every worker.
        """
        call = self.stub.Generate(build_request(*args, **kwargs), timeout=timeout)
        try:
            async for r in call:
                yield Chunk(r.request_id, list(r.token_ids), r.text, _finish_reason_name(r.finish_reason),
                            r.usage.prompt_tokens, r.usage.completion_tokens, list(r.logprobs))
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
            if chunk.finish_reason:
                out.finish_reason = chunk.finish_reason
                out.prompt_tokens, out.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        out.total_s = time.perf_counter() - start
        return out

    async def cluster_status(self, timeout: float = 10.0) -> scheduler_pb2.ClusterStatusResponse:
        return await self.stub.ClusterStatus(scheduler_pb2.ClusterStatusRequest(), timeout=timeout)
