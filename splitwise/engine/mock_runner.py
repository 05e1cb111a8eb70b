"""The mock model runner: the ModelRunner interface with compute replaced by the profile's modelled step time.

Each step sleeps until its modelled end (perf.step_s of its prompt tokens and decode sequences, times the time
factor, from the step's start, so the runner's own work is absorbed), samples tokens that are a function of the
token prefix only (a request resumed or recomputed on another worker goes on identically), and exports each layer's
KV, of the scaled size, at that layer's share of the step. There is no KV cache: received KV is checked and dropped.
A mock token is certain: its logprob is 0, and asked for top_logprobs, it is the only token listed.
"""

from __future__ import annotations

import struct
import time
import zlib

import torch

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.sampling import SampledToken
from splitwise.engine.scheduler import ScheduledBatch, batch_work
from splitwise.engine.sequence import Sequence
from splitwise.kv.layout import DTYPES
from splitwise.model.mock import FIRST_WORD_TOKEN_ID, MockModel

# A sampled token depends on this many tokens before it and on its position.
CONTEXT_WINDOW_TOKENS = 8
MOCK_LOGPROB = 0.0


def mock_token(last_tokens: list[int], position: int, vocab_size: int) -> int:
    """The token the mock samples at `position` after `last_tokens` (the prefix's end)."""
    digest = zlib.crc32(struct.pack(f"<{len(last_tokens) + 1}q", position, *last_tokens))
    return FIRST_WORD_TOKEN_ID + digest % (vocab_size - FIRST_WORD_TOKEN_ID)


def _prefix_end(seq: Sequence, end: int) -> list[int]:
    """The last CONTEXT_WINDOW_TOKENS of seq.tokens[:end], without building the whole list."""
    start = max(0, end - CONTEXT_WINDOW_TOKENS)
    prompt = len(seq.prompt_ids)
    head = seq.prompt_ids[start:min(end, prompt)]
    tail = [t.token_id for t in seq.output[max(0, start - prompt):max(0, end - prompt)]]
    return head + tail


def _mock_sampled(token: int, seq: Sequence) -> SampledToken:
    top = ((token, MOCK_LOGPROB),) if seq.params.top_logprobs else ()
    return SampledToken(token, MOCK_LOGPROB, top)


class MockModelRunner:
    def __init__(self, loaded: MockModel, device: str, blocks: BlockManager):
        self.loaded = loaded
        self.device = "cpu"  # nothing is computed
        self.dtype = DTYPES[loaded.dtype]
        self.blocks = blocks
        self.perf = loaded.profile.perf
        self.time_factor = loaded.time_factor
        c = loaded.config
        self.kv_shape = (c.num_kv_heads, c.head_dim)
        self._zeros = torch.zeros(0, dtype=self.dtype)

    @staticmethod
    def num_blocks(loaded: MockModel, kv_memory_bytes: int, block_size: int) -> int:
        """The profile's KV capacity, whatever memory budget the worker was given (it holds no KV)."""
        return loaded.kv_capacity_tokens // block_size

    def step_seconds(self, batch: ScheduledBatch) -> float:
        """The modelled time of the step, times the time factor."""
        prompt_tokens, decodes = batch_work(batch)
        return self.perf.step_s(prompt_tokens, decodes) * self.time_factor

    def write_kv(self, block_table: list[int], layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Checks received KV ([tokens, kv_heads, head_dim], or [layers, ...] of a run from `layer` on) against the
        layout and the reservation, and drops it."""
        layers = keys.shape[0] if keys.dim() == 4 else 1
        if keys.dim() == 4:
            if values.shape != keys.shape:
                raise ValueError(f"mock KV run from layer {layer}: keys {tuple(keys.shape)}, values {tuple(values.shape)}")
            keys, values = keys[0], values[0]
        expected = (keys.shape[0], *self.kv_shape)
        if tuple(keys.shape) != expected or tuple(values.shape) != expected or keys.dtype != self.dtype:
            raise ValueError(f"mock KV of layer {layer}: got {tuple(keys.shape)} {keys.dtype}, expected {expected} "
                             f"{self.dtype}")
        last = layer + layers - 1
        if not 0 <= layer <= last < self.loaded.config.num_layers or start + keys.shape[0] > len(block_table) * self.blocks.block_size:
            raise ValueError(f"mock KV of layer {layer} at {start}+{keys.shape[0]} is outside the reservation")

    def _layer_kv(self, tokens: int) -> torch.Tensor:
        """[kv_heads, tokens, head_dim] of zeros: one buffer, read-only to the senders (they copy it)."""
        heads, width = self.kv_shape
        if self._zeros.numel() < heads * tokens * width:
            self._zeros = torch.zeros(heads * tokens * width, dtype=self.dtype)
        return self._zeros[:heads * tokens * width].view(heads, tokens, width)

    def run(self, batch: ScheduledBatch) -> list[SampledToken | Exception | None]:
        started = time.perf_counter()
        end_at = started + self.step_seconds(batch)
        exporters = [(seq, start, end) for seq, (start, end) in zip(batch.seqs, batch.spans, strict=True)
                     if seq.on_layer_kv is not None]
        if exporters:
            num_layers = self.loaded.config.num_layers
            for layer in range(num_layers):
                self._sleep_until(started + (end_at - started) * (layer + 1) / num_layers)
                for seq, start, end in exporters:
                    kv = self._layer_kv(end - start)
                    seq.on_layer_kv(layer, kv, kv, start)
        vocab = self.loaded.config.vocab_size
        results: list[SampledToken | Exception | None] = []
        for seq, (_, end), wants in zip(batch.seqs, batch.spans, batch.samples, strict=True):
            results.append(_mock_sampled(mock_token(_prefix_end(seq, end), end, vocab), seq) if wants else None)
        self._sleep_until(end_at)
        return results

    @staticmethod
    def _sleep_until(deadline: float) -> None:
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
