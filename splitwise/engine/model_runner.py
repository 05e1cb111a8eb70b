"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, and samples."""

from __future__ import annotations

import torch

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.sampling import SampledToken, sample
from splitwise.engine.scheduler import ScheduledBatch
from splitwise.model.attention import BatchLayout
from splitwise.model.weights import LoadedModel


# Above this many stretches of consecutive slots, one index copy beats a slice copy per stretch.
MAX_SLICED_STRETCHES = 8


def slot_stretches(block_table: list[int], block_size: int, start: int, count: int) -> list[tuple[int, int]]:
    """(first slot, length) of each stretch of consecutive cache slots holding positions [start, start + count)."""
    stretches: list[list[int]] = []
    position, end = start, start + count
    while position < end:
        offset = position % block_size
        length = min(block_size - offset, end - position)
        slot = block_table[position // block_size] * block_size + offset
        if stretches and stretches[-1][0] + stretches[-1][1] == slot:
            stretches[-1][1] += length
        else:
            stretches.append([slot, length])
        position += length
    return [(slot, length) for slot, length in stretches]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, device: str, blocks: BlockManager):
        self.loaded = loaded
        self.model = loaded.model
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.blocks = blocks
        c = loaded.config
        shape = (c.num_layers, c.num_kv_heads, blocks.num_blocks * blocks.block_size, c.head_dim)
        self.cache_keys = torch.zeros(shape, dtype=self.dtype, device=device)
        self.cache_values = torch.zeros(shape, dtype=self.dtype, device=device)
        self._block_offsets = torch.arange(blocks.block_size, device=device)

    @staticmethod
    def num_blocks(loaded: LoadedModel, kv_memory_bytes: int, block_size: int) -> int:
        """How many blocks of the cache fit in the memory budget."""
        dtype = next(loaded.model.parameters()).dtype
        return kv_memory_bytes // (ModelRunner.bytes_per_token(loaded, dtype) * block_size)

    @staticmethod
    def bytes_per_token(loaded: LoadedModel, dtype: torch.dtype) -> int:
        c = loaded.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()

    def context_slots(self, block_table: list[int], end: int) -> torch.Tensor:
        """Cache slots of positions 0 .. end-1."""
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return (table[:, None] * self.blocks.block_size + self._block_offsets).flatten()[:end]

    def write_kv(self, block_table: list[int], layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Imports received KV for positions start onwards: keys/values [tokens, num_kv_heads, head_dim] of `layer`,
        or [layers, tokens, num_kv_heads, head_dim] of that many layers from `layer` on (a run, in one copy).

        Where the blocks hold consecutive slots (a fresh reservation's mostly do) each stretch is one slice copy
        for every layer and head at once; a table scattered into many stretches is written by an index copy."""
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        layers = slice(layer, layer + keys.shape[0])
        keys = keys.to(self.device, self.dtype).transpose(1, 2)  # [layers, kv_heads, tokens, head_dim]
        values = values.to(self.device, self.dtype).transpose(1, 2)
        stretches = slot_stretches(block_table, self.blocks.block_size, start, keys.shape[2])
        if len(stretches) > MAX_SLICED_STRETCHES:
            slots = self.context_slots(block_table, start + keys.shape[2])[start:]
            self.cache_keys[layers].index_copy_(2, slots, keys)
            self.cache_values[layers].index_copy_(2, slots, values)
            return
        done = 0
        for slot, count in stretches:
            self.cache_keys[layers, :, slot:slot + count].copy_(keys[:, :, done:done + count])
            self.cache_values[layers, :, slot:slot + count].copy_(values[:, :, done:done + count])
            done += count

    def run(self, batch: ScheduledBatch) -> list[SampledToken | Exception | None]:
        """Per sequence: its sampled token, None when it does not sample this step, or the exception that
        sampling it raised (its logits were not finite, say), which fails that sequence only."""
        token_ids, segments = [], []
        for seq, (start, end) in zip(batch.seqs, batch.spans, strict=True):
            token_ids.extend(seq.tokens[start:end])
            segments.append((start, end - start, self.context_slots(seq.block_table, end)))
        layout = BatchLayout.build(segments, batch.samples, self.blocks.block_size)
        exporters = [(seg, seq, start) for seg, seq, (start, _) in zip(layout.segments, batch.seqs, batch.spans)
                     if seq.on_layer_kv is not None]

        def export(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            for seg, seq, start in exporters:
                rows = slice(seg.start, seg.start + seg.length)
                seq.on_layer_kv(layer, keys[rows].transpose(0, 1), values[rows].transpose(0, 1), start)

        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        logits = self.model(ids, layout, self.cache_keys, self.cache_values, export if exporters else None)
        results: list[SampledToken | Exception | None] = []
        row = 0
        for seq, wants in zip(batch.seqs, batch.samples, strict=True):
            if wants:
                try:
                    results.append(sample(logits[row], seq.params, step=len(seq.output)))
                except Exception as e:  # one sequence's failure is its own
                    results.append(e)
                row += 1
            else:
                results.append(None)
        return results
