"""One simulated machine: the engine's own BatchScheduler and BlockManager on a virtual clock, steps timed by a
performance model.

A request's sequence passes through the same states as on a live worker: a prompt machine prefills it (prompt
only) and keeps its KV until the transfer ends; a token machine reserves blocks for its prompt at admission, takes
it into the running batch when the KV has arrived, and decodes it; a mixed machine (or a colocated request) does
both, as the engine's BatchScheduler orders it (prompts first, or mixed batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.sampling import SampledToken, SamplingParams
from splitwise.engine.scheduler import BatchScheduler, ScheduledBatch, batch_work
from splitwise.engine.sequence import FinishReason, Sequence, Status
from splitwise.cluster.registry import WorkerInfo
from splitwise.sim.machines import MachineProfile

SAMPLED = SampledToken(0, 0.0)  # the simulator samples no real token; one shared instance for every position
CONTEXT_AWARE_RUN_STEPS = 32  # with step times that grow with the context, runs this long at most
NO_EOS: frozenset[int] = frozenset()


def steps_begun(now: float, start: float, seconds: float) -> int:
    """Steps of a run begun by `now` (at least its first): one that would begin exactly at `now` has not, as new
    work arriving then is scheduled before it."""
    return max(math.ceil((now - start) / seconds - 1e-9), 1)


class PromptOfLength:
    """Stands for a prompt's token ids where only their number matters (the simulator's sequences)."""

    __slots__ = ("length",)

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length



@dataclass(frozen=True)
class EngineLimits:
    """The engine configuration the live workers run with (their config defaults)."""

    block_size: int = 16
    max_batch_tokens: int = 2048
    max_decode_batch: int = 256
    decode_age_bound_s: float = 0.05
    max_context: int = 1 << 30
    mixed_batches: bool = False


@dataclass
class MachineStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    prompt_tokens: int = 0
    decode_tokens: int = 0


@dataclass(eq=False)
class SimMachine:
    worker_id: str
    role: str  # declared pool: prompt, token or mixed
    profile: MachineProfile
    limits: EngineLimits
    clock: Callable[[], float]
    model: str = "sim"
    decode_runs: bool = True  # compute runs of identical decode steps at once (False: step by step, for checking)
    step_overhead_s: float = 0.0  # added to every step: the engine's own work beside the model's compute
    blocks: BlockManager = field(init=False)
    scheduler: BatchScheduler = field(init=False)
    reserved: int = 0  # sequences holding blocks for KV still on its way (the engine's reserved handles)
    busy: bool = False
    run: list | None = None  # the step in progress: [batch, seconds per step, steps, start], set by the simulator
    stats: MachineStats = field(default_factory=MachineStats)

    def __post_init__(self):
        capacity = self.profile.kv_capacity_tokens
        self.blocks = BlockManager(max(capacity // self.limits.block_size, 1), self.limits.block_size)
        self.scheduler = BatchScheduler(self.blocks, self.limits.max_batch_tokens, self.limits.max_decode_batch,
                                        self.limits.decode_age_bound_s, clock=self.clock,
                                        mixed_batches=self.limits.mixed_batches)

    # -- what the scheduler's registry view sees (a worker's heartbeat) --------------------------------

    def info(self, now: float) -> WorkerInfo:
        queued = sum(s.num_tokens - s.num_cached for s in self.scheduler.waiting)
        used = (self.blocks.num_used + self._run_blocks(now)) * self.blocks.block_size
        active = len(self.scheduler.waiting) + len(self.scheduler.running) + self.reserved
        return WorkerInfo(self.worker_id, self.role, self.worker_id, self.model, "", pending_tokens=queued + used,
                          active_requests=active, heartbeat_at=now, kv_capacity_tokens=self.blocks.capacity_tokens, kv_used_tokens=used)

    def _run_blocks(self, now: float) -> int:
        """Blocks that the steps of a decode run begun by `now` hold in the engine, not yet in the block tables
        (the run grows them when it ends or is cut)."""
        if self.run is None or self.run[2] == 1:
            return 0
        batch, seconds, steps, start = self.run
        extra = min(steps_begun(now, start, seconds), steps) - 1
        if extra <= 0:
            return 0
        size = self.blocks.block_size
        return sum(max(-(-(s.num_tokens + extra) // size) - len(s.block_table), 0) for s in batch.seqs)

    # -- admission --------------------------------------------------------------------------------------

    @staticmethod
    def sequence(request_id: str, prompt_tokens: int, output_tokens: int, prefill_only: bool = False) -> Sequence:
        return Sequence(request_id, PromptOfLength(prompt_tokens), SamplingParams(max_tokens=output_tokens, ignore_eos=True),
                        prefill_only=prefill_only)

    def submit(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def reserve(self, seq: Sequence) -> bool:
        """Blocks for a prompt whose KV another machine will send; False when they are not free now."""
        if not self.blocks.can_grow(seq.block_table, len(seq.prompt_ids)):
            return False
        self.blocks.grow(seq.block_table, len(seq.prompt_ids))
        seq.status = Status.RESERVED
        self.reserved += 1
        return True

    def start_decoding(self, seq: Sequence) -> FinishReason | None:
        """The reserved sequence's KV has arrived, with its first token: it joins the running batch, unless that
        token was its last."""
        self.reserved -= 1
        seq.num_cached = len(seq.prompt_ids)
        seq.output.append(SAMPLED)
        reason = seq.finish_reason_now(NO_EOS, self.limits.max_context)
        if reason is None:
            self.scheduler.start_decoding(seq)
        else:
            self.release(seq)
        return reason

    def release(self, seq: Sequence) -> None:
        """Frees the sequence's blocks (its KV was sent, or it finished)."""
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED

    # -- steps --------------------------------------------------------------------------------------------

    def next_step(self) -> tuple[ScheduledBatch, float, int] | None:
        """The batch the engine computes next, how long one step of it takes, and how many such steps follow as
        they are (1, or a run of decode steps), or None when there is nothing to do.

        A decode batch with no sequence waiting and free blocks for the run stays the batch the BatchScheduler
        picks, step after step, until its first sequence ends: that run is computed at once (the caller cuts it
        short at a step boundary when the machine gets new work, see `cut`)."""
        batch = self.scheduler.schedule()
        if batch is None:
            return None
        perf = self.profile.perf
        steps = 1
        if not batch.prefill and self.decode_runs and not self.scheduler.waiting:
            steps = self._decode_run(batch.seqs)
            if perf.context_aware:  # the context grows a token a step: a short run, timed at its middle
                steps = min(steps, CONTEXT_AWARE_RUN_STEPS)
        context = None
        if perf.context_aware:
            decoding = batch.seqs[len(batch.seqs) - batch.decodes:] if batch.prefill else batch.seqs
            if decoding:
                context = sum(s.num_tokens for s in decoding) / len(decoding) + (steps - 1) / 2
        seconds = perf.step_s(*batch_work(batch), context) + self.step_overhead_s
        self.busy = True
        return batch, seconds, steps

    def _decode_run(self, seqs: list[Sequence]) -> int:
        steps = min(s.params.max_tokens - len(s.output) for s in seqs)
        max_context = self.limits.max_context
        steps = max(min(steps, min(max_context - s.num_tokens for s in seqs)), 1)
        size = self.blocks.block_size
        # The batch already holds blocks for its first step; the rest of the run must fit in the free ones.
        more = sum(-(-(s.num_tokens + steps - 1) // size) - len(s.block_table) for s in seqs)
        while steps > 1 and more > self.blocks.num_free:
            steps //= 2
            more = sum(-(-(s.num_tokens + steps - 1) // size) - len(s.block_table) for s in seqs)
        return steps

    def finish_step(self, batch: ScheduledBatch, seconds: float, steps: int = 1) -> list[tuple[Sequence, FinishReason | None]]:
        """The engine's bookkeeping after a step (or a run of `steps` decode steps of one batch): each sequence
        that sampled, and why it ends, if it does. A prompt-only sequence ends PREFILLED holding its blocks (the
        caller releases them once its KV is sent)."""
        self.busy = False
        self.scheduler.step_finished(batch)
        stats = self.stats
        stats.steps += steps
        if batch.prefill:  # a mixed step counts as prefill time (its power is the prompt phase's)
            prompt_tokens, decodes = batch_work(batch)
            stats.prefill_s += seconds
            stats.prompt_tokens += prompt_tokens
            stats.decode_tokens += decodes
        else:
            stats.decode_s += seconds * steps
            stats.decode_tokens += len(batch.seqs) * steps
        sampled = []
        for seq, (_, end), samples in zip(batch.seqs, batch.spans, batch.samples):
            if seq.status is not Status.WAITING and seq.status is not Status.RUNNING:
                continue  # preempted within the step's scheduling
            seq.num_cached = end + steps - 1
            if not samples:
                continue  # a chunk of a longer prompt
            if steps > 1:
                self.blocks.grow(seq.block_table, seq.num_tokens + steps - 1)
                seq.output.extend([SAMPLED] * steps)
            else:
                seq.output.append(SAMPLED)
            if seq.prefill_only:
                self.scheduler.waiting.remove(seq)
                seq.status = Status.FINISHED
                sampled.append((seq, FinishReason.PREFILLED))
                continue
            reason = seq.finish_reason_now(NO_EOS, self.limits.max_context)
            if reason is not None:
                self.release(seq)
            elif seq.status is Status.WAITING:
                self.scheduler.waiting.remove(seq)
                self.scheduler.start_decoding(seq)
            sampled.append((seq, reason))
        return sampled

    def free_blocks_of(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
