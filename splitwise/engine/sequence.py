"""A request's token state inside the engine."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitwise.engine.detokenizer import StopCondition
from splitwise.engine.sampling import SampledToken, SamplingParams

_arrival = itertools.count()

# Per-request KV export: (layer, keys, values, first position), keys/values [num_kv_heads, tokens, head_dim].
SequenceKVCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]


class Status(enum.Enum):
    RESERVED = "reserved"  # holds blocks, waiting for its KV from a prompt worker
    WAITING = "waiting"  # needs prefill compute (a new prompt, or recompute after preemption)
    RUNNING = "running"  # decoding
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence token, or a stop string
    LENGTH = "length"  # max_tokens or the context window
    PREFILLED = "prefilled"  # prompt-only: the prompt phase is done, the first token sampled
    ABORTED = "aborted"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefill_only: bool = False
    on_layer_kv: SequenceKVCallback | None = None
    stop: StopCondition | None = None  # the request's stop strings, where it has any
    output: list[SampledToken] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # positions whose KV is in the cache
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))
    num_preemptions: int = 0
    first_scheduled_ns: int | None = None  # wall clock when its first batch started (queueing ends)
    first_token_ns: int | None = None  # wall clock when its first token here was sampled

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + [t.token_id for t in self.output]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish_reason_now(self, eos_token_ids: frozenset[int], max_context: int) -> FinishReason | None:
        """Why the sequence ends after its last sampled token, if it does: the one rule the engine and the
        simulator share."""
        if self.output[-1].token_id in eos_token_ids and not self.params.ignore_eos:
            return FinishReason.STOP
        if self.stop is not None and self.stop.met(self.output):  # (before LENGTH: the text ends at the stop string)
            return FinishReason.STOP
        if len(self.output) >= self.params.max_tokens or self.num_tokens >= max_context:
            return FinishReason.LENGTH
        return None
