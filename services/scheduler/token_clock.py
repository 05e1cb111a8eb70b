"""Time to first token and time between tokens of one request, as its client sees them."""

from __future__ import annotations

import time

from splitwise.telemetry import metrics


class TokenClock:
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
