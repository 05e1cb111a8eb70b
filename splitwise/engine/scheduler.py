"""Decides what each engine step computes: a prefill batch within a token budget, or a decode batch."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    prefill: bool
    seqs: list[Sequence]
    # Positions each sequence computes this step: [start, end).
    spans: list[tuple[int, int]]
    # Whether each sequence samples a token at the end of this step.
    samples: list[bool]
    # Of a prefill batch, how many of its last sequences decode (a mixed batch: prompt chunks, then decodes).
    decodes: int = 0


def batch_work(batch: ScheduledBatch) -> tuple[int, int]:
    """(prompt tokens computed, sequences decoding) in a step: what a performance model times."""
    if not batch.prefill:
        return 0, len(batch.seqs)
    prompts = len(batch.seqs) - batch.decodes
    return sum(end - start for start, end in batch.spans[:prompts]), batch.decodes


class BatchScheduler:
    """FCFS prefill batches of up to max_batch_tokens (longer prompts are chunked), and continuous decode
    batches. Prefill goes first, but never holds back running decodes longer than decode_age_bound_s.
    With mixed_batches, a step that prefills also decodes every running sequence (one token each, within the
    token budget; the prompts fill the rest): decodes are never held back, as vLLM's chunked prefill does.
    When decode runs out of blocks, the newest running sequence is preempted and later recomputed."""

    def __init__(
        self,
        blocks: BlockManager,
        max_batch_tokens: int = 2048,
        max_decode_batch: int = 256,
        decode_age_bound_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        mixed_batches: bool = False,
    ):
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_decode_batch = max_decode_batch
        self.decode_age_bound_s = decode_age_bound_s
        self.clock = clock
        self.mixed_batches = mixed_batches
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._last_decode = clock()

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def start_decoding(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of the queues and frees its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.block_table)

    def schedule(self) -> ScheduledBatch | None:
        if self.mixed_batches and self.waiting and self.running:
            return self._mixed_batch()
        # Running requests have waited since the last decode step ended; past the bound they go first.
        decode_due = bool(self.running) and self.clock() - self._last_decode >= self.decode_age_bound_s
        if self.waiting and not decode_due:
            batch = self._prefill_batch()
            if batch is not None:
                return batch
        if self.running:
            return self._decode_batch()
        return None

    def step_finished(self, batch: ScheduledBatch) -> None:
        if not batch.prefill or batch.decodes:
            self._last_decode = self.clock()

    def _mixed_batch(self) -> ScheduledBatch | None:
        """The running sequences' next tokens first, then prompt chunks in what is left of the token budget."""
        decode = self._decode_batch(limit=min(self.max_decode_batch, self.max_batch_tokens))
        prefill = self._prefill_batch(self.max_batch_tokens - (len(decode.seqs) if decode else 0))
        if prefill is None or decode is None:
            return prefill or decode
        return ScheduledBatch(True, prefill.seqs + decode.seqs, prefill.spans + decode.spans,
                              prefill.samples + decode.samples, decodes=len(decode.seqs))

    def _prefill_batch(self, budget: int | None = None) -> ScheduledBatch | None:
        seqs, spans, samples = [], [], []
        budget = self.max_batch_tokens if budget is None else budget
        for seq in self.waiting:
            start, total = seq.num_cached, seq.num_tokens
            take = min(total - start, budget)
            if take <= 0 or not self.blocks.can_grow(seq.block_table, start + take):
                break
            self.blocks.grow(seq.block_table, start + take)
            seqs.append(seq)
            spans.append((start, start + take))
            samples.append(start + take == total)
            budget -= take
            if start + take < total:
                break  # chunked: the rest of this prompt goes first next step
        return ScheduledBatch(True, seqs, spans, samples) if seqs else None

    def _decode_batch(self, limit: int | None = None) -> ScheduledBatch | None:
        batch: list[Sequence] = []
        limit = self.max_decode_batch if limit is None else limit
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if len(batch) == limit:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted in this loop
            while not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                victim = max((s for s in self.running if s not in batch), key=lambda s: s.arrival)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq.block_table, seq.num_tokens)
                batch.append(seq)
        if not batch:
            return None
        return ScheduledBatch(False, batch, [(s.num_tokens - 1, s.num_tokens) for s in batch], [True] * len(batch))

    def preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's blocks; it waits at the front to be recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_cached = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
