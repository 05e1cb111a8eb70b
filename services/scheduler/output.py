"""Builds a request's GenerateResponse stream: detokenized text (cut before a stop string), finish reason and usage.

Whether a request ends is the worker's engine's word, stop strings included (the engine matches them with the same
Detokenizer): here the text is only cut where the engine's stop string begins. The one exception is tokens a client
sends to continue its stream, which no worker has seen: they are judged here, by the engine's rules.
"""

from __future__ import annotations

from typing import Sequence

from splitwise.engine.detokenizer import Detokenizer
from splitwise.engine.sampling import SamplingParams
from splitwise.rpc.v1 import common_pb2, scheduler_pb2


class OutputStream:
    def __init__(self, request_id: str, tokenizer, params: SamplingParams, prompt_tokens: int,
                 eos_token_ids: frozenset[int]):
        self.request_id = request_id
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.eos_token_ids = eos_token_ids
        self.detokenizer = Detokenizer(tokenizer, params.stop)
        self.token_ids: list[int] = []  # streamed so far: what a resumed request recomputes
        self.finish_reason = common_pb2.FINISH_REASON_UNSPECIFIED

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED

    def _continued_finish_reason(self, token_ids: Sequence[int]) -> int:
        """Whether output tokens a client sends to continue its stream (no worker has judged them) end it already."""
        if token_ids and token_ids[-1] in self.eos_token_ids and not self.params.ignore_eos:
            return common_pb2.FINISH_REASON_STOP
        if self.completion_tokens >= self.params.max_tokens:
            return common_pb2.FINISH_REASON_LENGTH
        return common_pb2.FINISH_REASON_UNSPECIFIED

    def add(self, token_ids: Sequence[int], worker_finish_reason: int | None = None,
            logprobs: Sequence[float] = (), top_logprobs: Sequence[common_pb2.TopLogprobs] = (),
            continued: bool = False) -> scheduler_pb2.GenerateResponse:
        """Takes new tokens and returns the message to send, which carries every one of them (and their logprobs,
        when asked): only text is held back, never tokens. Whether the request ends is the worker's engine's word
        (`worker_finish_reason`, with the token that ends it); `continued`: tokens the client had already, judged
        here by the engine's rules (end of sequence, a stop string, max_tokens) as no worker has seen them."""
        self.token_ids += token_ids
        reason = worker_finish_reason or (self._continued_finish_reason(token_ids) if continued else 0)
        delta = self.detokenizer.add(token_ids, final=bool(reason))
        if continued and delta.stopped:
            reason = common_pb2.FINISH_REASON_STOP
        self.finish_reason = reason or common_pb2.FINISH_REASON_UNSPECIFIED
        response = scheduler_pb2.GenerateResponse(request_id=self.request_id, token_ids=token_ids, text=delta.text)
        if self.params.logprobs:
            response.logprobs.extend(logprobs)
        if self.params.top_logprobs:
            response.top_logprobs.extend(top_logprobs)
        if self.finished:
            response.finish_reason = self.finish_reason
            response.usage.prompt_tokens = self.prompt_tokens
            response.usage.completion_tokens = self.completion_tokens
        return response
