"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, and samples."""

from __future__ import annotations

import torch

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.sampling import SampledToken, sample
from splitwise.engine.scheduler import ScheduledBatch
from splitwise.model.attention import BatchLayout
from splitwise.model.weights import LoadedModel


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
        """Imports received KV: keys/values [tokens, num_kv_heads, head_dim] for positions start onwards."""
        slots = self.context_slots(block_table, start + keys.shape[0])[start:]
        self.cache_keys[layer].index_copy_(1, slots, keys.to(self.device, self.dtype).transpose(0, 1))
        self.cache_values[layer].index_copy_(1, slots, values.to(self.device, self.dtype).transpose(0, 1))

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
