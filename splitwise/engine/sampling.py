"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seed, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_LIMIT = 1 << 20
# Below this temperature sampling is greedy (as in vLLM): dividing by it would overflow the logits.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs
# The engine matches every stop string against each new token's text: their number and length bound that work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class NonFiniteLogits(ValueError):
    """The model's logits for a request hold NaN or infinity: nothing can be sampled from them."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # the most likely tokens returned at each position beside the chosen one; needs logprobs

    def validate(self) -> None:
        """Raises ValueError with a message a user can act on."""
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.max_tokens > MAX_TOKENS_LIMIT:
            raise ValueError(f"max_tokens must be <= {MAX_TOKENS_LIMIT}, got {self.max_tokens}")
        if not self.temperature >= 0:  # also catches NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(self.stop)}")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs: set logprobs to true")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    # The params.top_logprobs most likely (token_id, logprob) at this position, most likely first; () unless asked.
    top_logprobs: tuple[tuple[int, float], ...] = ()


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> SampledToken:
    """Picks the token after `logits` [vocab]; `step` is the output position (0 = first token).

    Raises NonFiniteLogits when the logits are not all finite. Any parameters that validate give a finite
    distribution: the logits are shifted so that their maximum is 0 before the temperature divides them, so the
    best token keeps weight 1 whatever the temperature, and the top-k and top-p masks always keep it.

    A seeded request draws from a generator seeded by (seed, step), so the result does not depend on
    which worker samples which step.
    """
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("the model produced non-finite logits for this request (corrupt KV?)")
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        return _chosen(int(torch.argmax(logits)), logprobs, params)
    shifted = (logits - logits.max()).clamp_(min=torch.finfo(torch.float32).min)  # finite, even over a range of 6e38
    scaled = shifted / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p  # never the first
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed((params.seed * 1_000_003 + step) % (1 << 63))
    return _chosen(int(torch.multinomial(probs, 1, generator=generator)), logprobs, params)


def _chosen(token: int, logprobs: torch.Tensor, params: SamplingParams) -> SampledToken:
    """The token with its log-probability and, when asked, the most likely tokens of the same log-softmax."""
    if not params.top_logprobs:
        return SampledToken(token, float(logprobs[token]))
    top = torch.topk(logprobs, min(params.top_logprobs, logprobs.shape[-1]))
    return SampledToken(token, float(logprobs[token]), tuple(zip(top.indices.tolist(), top.values.tolist())))
