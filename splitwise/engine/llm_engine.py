"""The engine: a compute thread stepping the batch scheduler, and the asyncio-side API to submit requests."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from contextlib import contextmanager
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from splitwise.engine.block_manager import BlockManager, KVCapacityError
from splitwise.engine.detokenizer import StopCondition
from splitwise.engine.mock_runner import MockModelRunner
from splitwise.engine.model_runner import ModelRunner
from splitwise.engine.request_handle import Finished, RequestHandle, failure_of
from splitwise.engine.sampling import NonFiniteLogits, SampledToken, SamplingParams
from splitwise.engine.scheduler import BatchScheduler, ScheduledBatch
from splitwise.engine.sequence import FinishReason, Sequence, SequenceKVCallback, Status
from splitwise.model.mock import MockModel
from splitwise.model.weights import LoadedModel

log = logging.getLogger(__name__)


def _recomputed(output_ids: Iterable[int]) -> list[SampledToken]:
    """Tokens sampled by an earlier attempt: their log-probabilities were reported then (NaN here)."""
    return [SampledToken(int(t), float("nan")) for t in output_ids]


@dataclass(frozen=True)
class StepRecord:
    prefill: bool
    num_seqs: int
    num_tokens: int
    seconds: float


@dataclass
class EngineConfig:
    kv_memory_bytes: int = 1 << 30
    block_size: int = 16
    max_batch_tokens: int = 2048
    max_decode_batch: int = 256
    decode_age_bound_s: float = 0.05
    max_queued_prompt_tokens: int = 0  # prompt tokens waiting for (or in) a prefill beyond which submit refuses; 0: none
    mixed_batches: bool = False  # prefill steps also decode the running sequences
    num_threads: int = 0


class QueueFull(KVCapacityError):
    """Too many prompt tokens wait for a prefill here: the request does not fit now (try later or elsewhere)."""

    def __init__(self, message: str):
        super().__init__(message, ever=False)


class Engine:
    def __init__(self, loaded: LoadedModel | MockModel, device: str, config: EngineConfig,
                 runner_type: type[ModelRunner] | type[MockModelRunner] = ModelRunner, tokenizer=None):
        """`runner_type` computes the steps: the model's forward (ModelRunner), or modelled time (MockModelRunner,
        with a MockModel). `tokenizer`: the model's, for requests with stop strings (an engine without one refuses
        them)."""
        self.loaded = loaded
        self.tokenizer = tokenizer
        self.config = config
        self.blocks = BlockManager(runner_type.num_blocks(loaded, config.kv_memory_bytes, config.block_size),
                                   config.block_size)
        self.runner = runner_type(loaded, device, self.blocks)
        self.scheduler = BatchScheduler(self.blocks, config.max_batch_tokens, config.max_decode_batch,
                                        config.decode_age_bound_s, mixed_batches=config.mixed_batches)
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.max_context = loaded.config.max_position_embeddings
        self._handles: dict[str, RequestHandle] = {}
        self._in_flight: set[Sequence] = set()
        self._abort_requested: set[Sequence] = set()
        self._cond = threading.Condition()
        self._stopped = False
        self.steps: deque[StepRecord] = deque(maxlen=10_000)  # recent steps, for benchmarks and metrics
        self.on_step: Callable[[StepRecord], None] | None = None  # called on the engine thread after each step
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- asyncio side ------------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        with self._cond:
            return len(self._handles)

    @property
    def queue_depths(self) -> tuple[int, int]:
        """(sequences waiting for a prefill step, sequences in the running decode batch)."""
        with self._cond:
            return len(self.scheduler.waiting), len(self.scheduler.running)

    @property
    def pending_tokens(self) -> int:
        """Tokens still to compute or hold: prompts not yet prefilled, plus KV held."""
        with self._cond:
            queued = sum(s.num_tokens - s.num_cached for s in self.scheduler.waiting)
        return queued + self.blocks.num_used * self.blocks.block_size

    def _stop_condition(self, params: SamplingParams) -> StopCondition | None:
        if not params.stop:
            return None
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer to match stop strings with")
        return StopCondition(self.tokenizer, params.stop)

    def _check_fits(self, seq: Sequence) -> None:
        # A resumed request's output so far counts within its max_tokens.
        needed = len(seq.prompt_ids) + (0 if seq.prefill_only else seq.params.max_tokens)
        if needed > self.blocks.capacity_tokens:
            raise KVCapacityError(
                f"request needs KV for {needed} tokens but this worker holds at most {self.blocks.capacity_tokens}",
                ever=True,
            )
        if seq.request_id in self._handles:
            raise ValueError(f"request {seq.request_id!r} is already here")

    def _check_queue(self, seq: Sequence) -> None:
        limit = self.config.max_queued_prompt_tokens
        queued = sum(s.num_tokens - s.num_cached for s in self.scheduler.waiting)
        if limit and queued and queued + seq.num_tokens > limit:  # (alone in the queue, any prompt is taken)
            raise QueueFull(f"{queued} prompt tokens are waiting for or in a prefill here; {seq.num_tokens} more would pass "
                            f"the limit of {limit} (SPLITWISE_MAX_QUEUED_PROMPT_TOKENS)")

    @contextmanager
    def step_together(self):
        """Requests submitted or started in this block join the same next step: the engine starts none meanwhile
        (the one computing goes on). For profiling a batch of known size."""
        with self._cond:
            yield

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, prefill_only: bool = False,
               on_layer_kv: SequenceKVCallback | None = None, output_ids: Iterable[int] = ()) -> RequestHandle:
        """Queues a prompt; prefill_only stops after the first token (the prompt worker's job).

        `output_ids`: a resumed request's tokens already sampled elsewhere; they are recomputed with the prompt
        and sampling goes on after them (the handle delivers only new tokens).
        """
        seq = Sequence(request_id, list(prompt_ids), params, prefill_only, on_layer_kv, self._stop_condition(params),
                       output=_recomputed(output_ids))
        handle = RequestHandle(seq, asyncio.get_running_loop())
        with self._cond:
            self._check_fits(seq)
            self._check_queue(seq)
            self._handles[request_id] = handle
            self.scheduler.add(seq)
            self._cond.notify()
        return handle

    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Allocates blocks for a prompt's KV that another worker will send (the token worker's admission)."""
        seq = Sequence(request_id, list(prompt_ids), params, stop=self._stop_condition(params), status=Status.RESERVED)
        handle = RequestHandle(seq, asyncio.get_running_loop())
        with self._cond:
            self._check_fits(seq)
            self.blocks.grow(seq.block_table, len(prompt_ids))
            self._handles[request_id] = handle
        return handle

    def write_kv(self, handle: RequestHandle, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Writes received KV into the reserved blocks: [tokens, kv_heads, head_dim] of `layer`, or
        [layers, tokens, kv_heads, head_dim] of a run of layers from `layer` on."""
        self.runner.write_kv(handle.seq.block_table, layer, start, keys, values)

    def start_decoding(self, handle: RequestHandle, first: SampledToken) -> None:
        """A reserved request's KV has arrived: it joins the running batch after its first token."""
        seq = handle.seq
        with self._cond:
            if seq.finished:
                return
            seq.num_cached = len(seq.prompt_ids)
            seq.output.append(first)
            if self._finish_reason(seq) is None:
                self.scheduler.start_decoding(seq)
                self._cond.notify()
            else:
                self._finish(seq, self._finish_reason(seq))

    def resume_decoding(self, handle: RequestHandle, output_ids: list[int], prompt_kv_arrived: bool = True) -> None:
        """A reserved request's prompt KV has arrived, and it had already sampled `output_ids` elsewhere: one
        prefill step recomputes their KV on top of the prompt's and samples the next token; it decodes on.

        With prompt_kv_arrived=False (the prompt's KV could not be had), the prompt is recomputed too, in the
        blocks reserved for it.
        """
        if not output_ids:
            raise ValueError("resuming needs the tokens already sampled")
        seq = handle.seq
        with self._cond:
            if seq.finished:
                return
            seq.num_cached = len(seq.prompt_ids) if prompt_kv_arrived else 0
            seq.output = _recomputed(output_ids)
            self.scheduler.add(seq)
            self._cond.notify()

    def abort(self, request_id: str, handle: RequestHandle | None = None) -> None:
        """Ends a request wherever it is and frees its blocks (at the end of the step it is computing).

        With `handle`, only that incarnation of the request id is aborted.
        """
        with self._cond:
            current = self._handles.get(request_id)
            if current is None or (handle is not None and current is not handle):
                return
            handle = current
            if handle.seq in self._in_flight:
                self._abort_requested.add(handle.seq)
            else:
                self._finish(handle.seq, FinishReason.ABORTED)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- engine thread -----------------------------------------------------------------------------

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        return seq.finish_reason_now(self.eos_token_ids, self.max_context)

    def request_ends(self, seq: Sequence) -> FinishReason | None:
        """Whether a request ends with the token it sampled last, and why (STOP, LENGTH): for a prompt-only
        sequence, whether its whole request ends at its first token (the engine's rule, wherever it runs)."""
        return self._finish_reason(seq) if seq.output else None

    def _finish(self, seq: Sequence, reason: FinishReason, last: SampledToken | None = None) -> None:
        """Caller holds the lock. `last`: the token that ends it, delivered with its Finished in one go."""
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        handle = self._handles.pop(seq.request_id, None)
        if handle is not None:
            handle._deliver(*((last,) if last is not None else ()), Finished(reason))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """Ends one request with its failure and frees its blocks; caller holds the lock."""
        self.scheduler.remove(seq)
        self._abort_requested.discard(seq)
        seq.status, seq.finish_reason = Status.FINISHED, FinishReason.ABORTED
        handle = self._handles.get(seq.request_id)
        if handle is not None and handle.seq is seq:
            del self._handles[seq.request_id]
            handle._deliver(failure_of(error))

    def _loop(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        while True:
            with self._cond:
                batch = self.scheduler.schedule() if not self._stopped else None
                while batch is None and not self._stopped:
                    self._cond.wait(timeout=0.05)
                    batch = self.scheduler.schedule()
                if self._stopped:
                    return
                self._in_flight = set(batch.seqs)
                now_ns = time.time_ns()
                for seq in batch.seqs:
                    if seq.first_scheduled_ns is None:
                        seq.first_scheduled_ns = now_ns
            try:
                started = time.perf_counter()
                results = self.runner.run(batch)
                record = StepRecord(batch.prefill, len(batch.seqs), sum(e - s for s, e in batch.spans),
                                    time.perf_counter() - started)
                self.steps.append(record)
            except Exception as e:  # a failing batch fails its requests, not the engine
                log.exception("engine step failed")
                with self._cond:
                    for seq in batch.seqs:
                        self._fail(seq, e)
                    self._in_flight = set()
                continue
            if self.on_step is not None:
                try:
                    self.on_step(record)
                except Exception:  # telemetry never stops the engine
                    log.exception("engine step observer failed")
            with self._cond:
                self.scheduler.step_finished(batch)
                try:
                    self._postprocess(batch, results)
                except Exception as e:  # the engine thread must live on: every other request waits on it
                    log.exception("engine step bookkeeping failed")
                    for seq in batch.seqs:
                        if not seq.finished:
                            self._fail(seq, e)
                self._in_flight = set()

    def _postprocess(self, batch: ScheduledBatch, results: list[SampledToken | Exception | None]) -> None:
        for seq, (_, end), token in zip(batch.seqs, batch.spans, results, strict=True):
            if seq in self._abort_requested:
                self._abort_requested.discard(seq)
                self._finish(seq, FinishReason.ABORTED)
                continue
            if seq.status is not Status.WAITING and seq.status is not Status.RUNNING:
                continue
            if isinstance(token, Exception):  # this sequence alone fails; the rest of the batch goes on
                corrupt = isinstance(token, NonFiniteLogits)
                log.log(logging.WARNING if corrupt else logging.ERROR, "request %s failed: %s", seq.request_id, token,
                        exc_info=None if corrupt else token)
                self._fail(seq, token)
                continue
            seq.num_cached = end
            if token is None:
                continue  # a chunk of a longer prompt
            seq.output.append(token)
            if seq.first_token_ns is None:
                seq.first_token_ns = time.time_ns()
            reason = FinishReason.PREFILLED if seq.prefill_only else self._finish_reason(seq)
            if reason is not None:
                self._finish(seq, reason, last=token)
                continue
            handle = self._handles.get(seq.request_id)
            if handle is not None:
                handle._deliver(token)
            if seq.status is Status.WAITING:
                self.scheduler.waiting.remove(seq)
                self.scheduler.start_decoding(seq)
