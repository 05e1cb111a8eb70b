"""One simulated machine: the engine's own BatchScheduler and BlockManager on a virtual clock, steps timed by a
performance model.

A request's sequence passes through the same states as on a live worker: a prompt machine prefills it (prompt
only) and keeps its KV until the transfer ends; a token machine reserves blocks for its prompt at admission, takes
it into the running batch when the KV has arrived, and decodes it; a mixed machine (or a colocated request) does
both, with prompts first as the live scheduler orders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.sampling import SampledToken, SamplingParams
from splitwise.engine.scheduler import BatchScheduler, ScheduledBatch
from splitwise.engine.sequence import FinishReason, Sequence, Status
from splitwise.cluster.registry import WorkerInfo
from splitwise.sim.machines import MachineProfile

class PromptOfLength:
    """Stands for a prompt's token ids where only their number matters (the simulator's sequences)."""

    __slots__ = ("length",)

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length


SAMPLED = SampledToken(0, 0.0)  # the simulator samples no real token; one shared instance for every position
NO_EOS: frozenset[int] = frozenset()


@dataclass(frozen=True)
class EngineLimits:
    """The engine configuration the live workers run with (their config defaults)."""

    block_size: int = 16
    max_batch_tokens: int = 2048
    max_decode_batch: int = 256
    decode_age_bound_s: float = 0.05
    max_context: int = 1 << 30


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
    blocks: BlockManager = field(init=False)
    scheduler: BatchScheduler = field(init=False)
    busy: bool = False
    stats: MachineStats = field(default_factory=MachineStats)

    def __post_init__(self):
        capacity = self.profile.kv_capacity_tokens
        self.blocks = BlockManager(max(capacity // self.limits.block_size, 1), self.limits.block_size)
        self.scheduler = BatchScheduler(self.blocks, self.limits.max_batch_tokens, self.limits.max_decode_batch,
                                        self.limits.decode_age_bound_s, clock=self.clock)

    # -- what the scheduler's registry view sees (a worker's heartbeat) --------------------------------

    def info(self) -> WorkerInfo:
        queued = sum(s.num_tokens - s.num_cached for s in self.scheduler.waiting)
        used = self.blocks.num_used * self.blocks.block_size
        return WorkerInfo(self.worker_id, self.role, self.worker_id, self.model, "", pending_tokens=queued + used,
                          kv_capacity_tokens=self.blocks.capacity_tokens, kv_used_tokens=used)

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
        return True

    def start_decoding(self, seq: Sequence) -> FinishReason | None:
        """The reserved sequence's KV has arrived, with its first token: it joins the running batch, unless that
        token was its last."""
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

    def next_step(self) -> tuple[ScheduledBatch, float] | None:
        """The batch the engine computes next and how long the step takes, or None when there is nothing to do."""
        batch = self.scheduler.schedule()
        if batch is None:
            return None
        if batch.prefill:
            tokens = sum(end - start for start, end in batch.spans)
            seconds = self.profile.perf.step_s(tokens, 0)
            self.stats.prefill_s += seconds
            self.stats.prompt_tokens += tokens
        else:
            seconds = self.profile.perf.step_s(0, len(batch.seqs))
            self.stats.decode_s += seconds
            self.stats.decode_tokens += len(batch.seqs)
        self.stats.steps += 1
        self.busy = True
        return batch, seconds

    def finish_step(self, batch: ScheduledBatch) -> list[tuple[Sequence, FinishReason | None]]:
        """The engine's bookkeeping after a step: each sequence that sampled a token, and why it ends, if it does.
        A prompt-only sequence ends PREFILLED holding its blocks (the caller releases them once its KV is sent)."""
        self.busy = False
        self.scheduler.step_finished(batch)
        sampled = []
        for seq, (_, end), samples in zip(batch.seqs, batch.spans, batch.samples):
            if seq.status is not Status.WAITING and seq.status is not Status.RUNNING:
                continue  # preempted within the step's scheduling
            seq.num_cached = end
            if not samples:
                continue  # a chunk of a longer prompt
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
