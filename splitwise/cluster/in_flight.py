"""What a scheduler sent each worker that the worker's last heartbeat does not report yet.

A worker's heartbeat reports its load (pending tokens, KV in use, requests held). Between two heartbeats the
scheduler adds what it sent since to that load, so that a burst does not pile onto the worker that looked idle at
its last heartbeat. Once a heartbeat written after a send is read, that heartbeat reports the request itself,
and counting it too would count it twice: the send leaves the ledger then, or when its request ends, whichever
is first. The live scheduler and the simulator keep the same ledger; `tokens` is what routing reads.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterable, Mapping

from splitwise.cluster.registry import WorkerInfo

# A heartbeat written this long after a send reports it: by then the request has reached the worker's engine
# (a LAN's round trip is well under it), and hosts' clocks kept by NTP agree to within it.
REPORTED_AFTER_S = 0.05


class InFlightLedger:
    def __init__(self, reported_after_s: float = REPORTED_AFTER_S):
        self.reported_after_s = reported_after_s
        self.tokens: dict[str, int] = {}  # worker id -> tokens sent that its last heartbeat does not report
        self._sends: dict[int, list[list]] = {}  # send id -> [[worker id, tokens, sent at (unix s)], ...]
        self._ids = itertools.count()

    def add(self, tokens_by_worker: Mapping[str, int], at: float) -> int:
        """Records tokens sent to workers at `at`; returns the send's id, for `end`."""
        send = next(self._ids)
        self._sends[send] = [[worker_id, tokens, at] for worker_id, tokens in tokens_by_worker.items()]
        for worker_id, tokens in tokens_by_worker.items():
            self.tokens[worker_id] = self.tokens.get(worker_id, 0) + tokens
        return send

    def end(self, send: int) -> None:
        """The send's request ended (finished, failed, or moved): what no heartbeat has reported yet leaves the
        ledger, as no heartbeat will report it now."""
        for worker_id, tokens, _ in self._sends.pop(send, ()):
            self._take(worker_id, tokens)

    def reported(self, workers: Iterable[WorkerInfo]) -> None:
        """The workers' heartbeats as just read: each send to a worker that its heartbeat was written after leaves
        the ledger (the heartbeat counts it now)."""
        beats = {w.worker_id: w.heartbeat_at for w in workers}
        for send, parts in list(self._sends.items()):
            kept = []
            for part in parts:
                worker_id, tokens, at = part
                if beats.get(worker_id, float("-inf")) >= at + self.reported_after_s:
                    self._take(worker_id, tokens)
                else:
                    kept.append(part)
            if kept:
                self._sends[send] = kept
            else:
                del self._sends[send]

    @contextlib.contextmanager
    def sent(self, tokens_by_worker: Mapping[str, int], at: float):
        """Counts the tokens from `at` until a heartbeat reports them or the block ends."""
        send = self.add(tokens_by_worker, at)
        try:
            yield
        finally:
            self.end(send)

    def _take(self, worker_id: str, tokens: int) -> None:
        left = self.tokens.get(worker_id, 0) - tokens
        if left:
            self.tokens[worker_id] = left
        else:
            self.tokens.pop(worker_id, None)
