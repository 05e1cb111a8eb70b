"""Where a request's KV sits in a staging buffer, and the checksum both sides take of it.

Layout: for each layer, its keys as [num_tokens, num_kv_heads, head_dim], then its values, so that any token
range of a layer is two contiguous byte ranges (one descriptor each, never one per block), and what the receiver
reads is already shaped the way its cache takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from splitwise.kv.layout import KVLayout


@dataclass(frozen=True)
class StagedLayout:
    layout: KVLayout
    num_tokens: int

    @property
    def row_bytes(self) -> int:
        """Keys (or values) of one token in one layer."""
        return self.layout.bytes_per_token_per_layer // 2

    @property
    def layer_bytes(self) -> int:
        return 2 * self.num_tokens * self.row_bytes

    @property
    def total_bytes(self) -> int:
        return self.layout.num_layers * self.layer_bytes

    def ranges(self, layer: int, token_start: int, token_count: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(offset, length) of the keys and of the values of tokens [token_start, +token_count) of `layer`."""
        length = token_count * self.row_bytes
        keys = layer * self.layer_bytes + token_start * self.row_bytes
        return (keys, length), (keys + self.num_tokens * self.row_bytes, length)


def byte_view(buffer: torch.Tensor, offset: int, length: int, layout: KVLayout) -> torch.Tensor:
    """[tokens, kv_heads, head_dim] over `length` bytes of a uint8 buffer, without a copy."""
    return buffer[offset:offset + length].view(layout.torch_dtype).view(-1, layout.num_kv_heads, layout.head_dim)


def copy_layer(buffer: torch.Tensor, staged: StagedLayout, layer: int, token_start: int,
               keys: torch.Tensor, values: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """Copies keys/values ([kv_heads, tokens, head_dim]) into their place in `buffer`; returns their ranges."""
    (k_off, length), (v_off, _) = ranges = staged.ranges(layer, token_start, keys.shape[1])
    byte_view(buffer, k_off, length, staged.layout).copy_(keys.transpose(0, 1))
    byte_view(buffer, v_off, length, staged.layout).copy_(values.transpose(0, 1))
    return ranges


def run_views(buffer: torch.Tensor, staged: StagedLayout, first_layer: int, num_layers: int, token_start: int,
              token_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [num_layers, tokens, kv_heads, head_dim] of a run of layers' token range in `buffer`, without
    a copy: each layer's keys are a layer's bytes apart, its values num_tokens rows after its keys."""
    layout = staged.layout
    item = layout.torch_dtype.itemsize
    usable = buffer.numel() // item * item
    elements = buffer[:usable].view(layout.torch_dtype)
    row = staged.row_bytes // item
    shape = (num_layers, token_count, layout.num_kv_heads, layout.head_dim)
    strides = (staged.layer_bytes // item, row, layout.head_dim, 1)
    (k_off, _), (v_off, _) = staged.ranges(first_layer, token_start, token_count)
    base = elements.storage_offset()
    return (elements.as_strided(shape, strides, base + k_off // item),
            elements.as_strided(shape, strides, base + v_off // item))


def stage_layer(buffer: torch.Tensor, staged: StagedLayout, layer: int, token_start: int,
                keys: torch.Tensor, values: torch.Tensor) -> int:
    """Copies keys/values ([kv_heads, tokens, head_dim]) into their place in `buffer`; returns their checksum."""
    return ranges_checksum(buffer, copy_layer(buffer, staged, layer, token_start, keys, values))


def run_ranges(staged: StagedLayout, first_layer: int, num_layers: int, token_start: int,
               token_count: int) -> list[tuple[int, int]]:
    """The byte ranges of a run of layers' token range, in layer order (keys, values, next layer...), adjacent
    ones merged: one range for the whole prompt, so one write descriptor and one pass of the checksum."""
    merged: list[tuple[int, int]] = []
    for layer in range(first_layer, first_layer + num_layers):
        for offset, length in staged.ranges(layer, token_start, token_count):
            if merged and merged[-1][0] + merged[-1][1] == offset:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((offset, length))
    return merged


def checksum(*parts) -> int:
    """XXH3-64 over the parts' bytes in order (bytes, or numpy arrays / memoryviews of them): ~8-20 GB/s on one
    core, where zlib's CRC-32 ran at ~2-4 and was most of a transfer's CPU."""
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return digest.intdigest()


def ranges_checksum(buffer: torch.Tensor, ranges) -> int:
    """The checksum of staged byte ranges, in order: a token range's keys then its values (as an inline chunk's),
    or a run of layers (the same digest however its adjacent ranges are merged)."""
    data = buffer.numpy()
    return checksum(*(data[offset:offset + length] for offset, length in ranges))


def region_checksum(buffer: torch.Tensor, k_off: int, v_off: int, length: int) -> int:
    """The checksum of a staged token range: its keys' bytes, then its values' (as an inline chunk's)."""
    return ranges_checksum(buffer, ((k_off, length), (v_off, length)))
