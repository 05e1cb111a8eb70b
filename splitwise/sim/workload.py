"""Simulated workloads: an Azure trace as recorded, or Poisson arrivals at a chosen rate with the trace's lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass

from splitwise.replay import load_trace


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def from_trace(trace: str, *, rate_scale: float = 1.0, start_s: float = 0.0, duration_s: float | None = None,
               max_requests: int | None = None) -> list[SimRequest]:
    """The trace's requests (`conv`, `code`, or a CSV path) in a window, arrivals divided by rate_scale."""
    return [SimRequest(f"r{r.index}", r.arrival_s, r.prompt_tokens, r.output_tokens)
            for r in load_trace(trace, rate_scale=rate_scale, start_s=start_s, duration_s=duration_s,
                                max_requests=max_requests)]


def trace_lengths(trace: str) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of every request of a trace."""
    return [(r.prompt_tokens, r.output_tokens) for r in load_trace(trace)]


def poisson(rate_per_s: float, duration_s: float, lengths: list[tuple[int, int]], seed: int = 0) -> list[SimRequest]:
    """Poisson arrivals at rate_per_s for duration_s, each request's lengths drawn from `lengths` (as the paper's
    simulator makes its traces at a given rate from the Azure length distributions)."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError(f"a Poisson workload needs a positive rate and duration, got {rate_per_s}/s for {duration_s}s")
    if not lengths:
        raise ValueError("a Poisson workload needs request lengths to draw from")
    rng = random.Random(seed)
    requests, t = [], rng.expovariate(rate_per_s)
    while t < duration_s:
        prompt, output = lengths[rng.randrange(len(lengths))]
        requests.append(SimRequest(f"r{len(requests)}", t, prompt, output))
        t += rng.expovariate(rate_per_s)
    return requests
