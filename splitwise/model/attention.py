"""What one forward pass computes (BatchLayout) and attention over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Segment:
    """One sequence's new tokens in a flattened batch: rows [start, start + length)."""

    start: int
    length: int
    context_slots: torch.Tensor  # cache slots of every position 0 .. end-1, the new tokens included

    @property
    def context_len(self) -> int:
        return self.context_slots.shape[0]


@dataclass
class BatchLayout:
    positions: torch.Tensor  # [N] position of each new token
    slot_mapping: torch.Tensor  # [N] cache slot where each new token's K and V go
    segments: list[Segment]
    logits_rows: torch.Tensor  # rows whose logits are wanted (the last token of sequences that sample)
    block_size: int = 1
    decode_blocks: torch.Tensor | None = None  # [S, max_blocks] cache blocks, when every segment is one token
    decode_padding: torch.Tensor | None = None  # [S, 1, max_blocks * block_size], True past a sequence's end

    @classmethod
    def build(cls, segments: list[tuple[int, int, torch.Tensor]], sample: list[bool],
              block_size: int = 1) -> "BatchLayout":
        """segments: per sequence (first new position, number of new tokens, slots of positions 0..end-1).

        Slots are block * block_size + offset, each block's slots consecutive (what BlockManager hands out).
        """
        device = segments[0][2].device
        positions, segs, rows = [], [], []
        row = 0
        for (first, n, context_slots), wants_logits in zip(segments, sample, strict=True):
            positions.append(torch.arange(first, first + n, device=device))
            segs.append(Segment(row, n, context_slots))
            if wants_logits:
                rows.append(row + n - 1)
            row += n
        layout = cls(
            torch.cat(positions),
            torch.cat([s.context_slots[s.context_len - s.length :] for s in segs]),
            segs,
            torch.tensor(rows, dtype=torch.long, device=device),
            block_size,
        )
        if all(s.length == 1 for s in segs):
            lengths = torch.tensor([s.context_len for s in segs], device=device)
            tables = [s.context_slots[::block_size] // block_size for s in segs]
            layout.decode_blocks = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
            width = layout.decode_blocks.shape[1] * block_size
            layout.decode_padding = (torch.arange(width, device=device)[None, :] >= lengths[:, None])[:, None, :]
        return layout


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_keys: torch.Tensor,
    cache_values: torch.Tensor,
    batch: BatchLayout,
) -> torch.Tensor:
    """q: [N, heads, D]; k, v: [N, kv_heads, D]; cache_*: [kv_heads, slots, D]. Returns [N, heads, D].

    Writes the new K and V into their slots, then attends each token to its sequence's context. The
    cache is head-major so that gathering a context yields the [kv_heads, tokens, D] attention reads,
    with no further copy.
    """
    cache_keys.index_copy_(1, batch.slot_mapping, k.transpose(0, 1))
    cache_values.index_copy_(1, batch.slot_mapping, v.transpose(0, 1))
    kv_heads = k.shape[1]
    if batch.decode_blocks is not None:
        return _decode_attention(q, cache_keys, cache_values, batch)
    gqa = q.shape[1] != kv_heads
    outs = []
    for seg in batch.segments:
        rows = slice(seg.start, seg.start + seg.length)
        qs = q[rows].transpose(0, 1)[None]
        if seg.context_len == seg.length:  # a whole prompt: its own K and V, causal
            keys, values, mask = k[rows].transpose(0, 1), v[rows].transpose(0, 1), None
        else:  # a later chunk: earlier context comes from the cache
            keys, values = cache_keys[:, seg.context_slots], cache_values[:, seg.context_slots]
            past = seg.context_len - seg.length
            positions = torch.arange(seg.context_len, device=q.device)
            mask = positions[None, :] <= positions[past:, None]
        out = F.scaled_dot_product_attention(qs, keys[None], values[None], attn_mask=mask,
                                             is_causal=mask is None and seg.length > 1, enable_gqa=gqa)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _decode_attention(q: torch.Tensor, cache_keys: torch.Tensor, cache_values: torch.Tensor,
                      batch: BatchLayout) -> torch.Tensor:
    """One new token per sequence. The query heads sharing a KV head become that head's query rows, so
    no KV head is repeated, and sequences play the role of attention heads.

    Contexts are gathered whole blocks at a time (block_size * D contiguous values per index, much
    cheaper than slot by slot); padding past a sequence's end is masked out. Scaling q rather than K
    and passing K transposed to the matmul keeps it to one pass over the gathered context.
    """
    kv_heads, _, d = cache_keys.shape
    s, heads, _ = q.shape
    blocks = batch.decode_blocks.flatten()
    rows = (kv_heads, -1, batch.block_size * d)
    keys = cache_keys.view(rows).index_select(1, blocks).view(kv_heads, s, -1, d)  # [kv_heads, S, context, D]
    values = cache_values.view(rows).index_select(1, blocks).view(kv_heads, s, -1, d)
    # Padding gets weight 0, but 0 * NaN is NaN: whatever another request left there (corrupt KV) must not leak in.
    values.masked_fill_(batch.decode_padding.view(1, s, -1, 1), 0.0)
    grouped = (q * d**-0.5).view(s, kv_heads, heads // kv_heads, d).transpose(0, 1)  # [kv_heads, S, group, D]
    scores = torch.matmul(grouped, keys.transpose(-1, -2))  # [kv_heads, S, group, context]
    scores.masked_fill_(batch.decode_padding, float("-inf"))
    out = torch.matmul(scores.softmax(-1), values)  # [kv_heads, S, group, D]
    return out.transpose(0, 1).reshape(s, heads, d)
