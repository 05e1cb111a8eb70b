"""Splits a layer's KV into bounded, checksummed chunks and writes received chunks into a RequestKV."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator

import torch

from splitwise.engine.kv_cache import RequestKV
from splitwise.kv.layout import KVLayout

DEFAULT_MAX_CHUNK_BYTES = 1 << 20


class KVIntegrityError(Exception):
    """A chunk that does not belong where it says, or whose bytes do not match their checksum."""


@dataclass(frozen=True)
class KVChunk:
    layer: int
    token_start: int
    token_count: int
    key: bytes
    value: bytes
    crc32: int

    @property
    def num_bytes(self) -> int:
        return len(self.key) + len(self.value)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def checksum(key: bytes, value: bytes) -> int:
    return zlib.crc32(value, zlib.crc32(key))


def split_layer(
    layer: int, keys: torch.Tensor, values: torch.Tensor, token_start: int, layout: KVLayout, max_chunk_bytes: int
) -> Iterator[KVChunk]:
    """keys/values: [num_kv_heads, tokens, head_dim] for positions token_start onwards."""
    tokens = keys.shape[1]
    per_chunk = max(1, max_chunk_bytes // layout.bytes_per_token_per_layer)
    for begin in range(0, tokens, per_chunk):
        end = min(tokens, begin + per_chunk)
        k = _tensor_bytes(keys[:, begin:end])
        v = _tensor_bytes(values[:, begin:end])
        yield KVChunk(layer, token_start + begin, end - begin, k, v, checksum(k, v))


def write_chunk(kv: RequestKV, chunk: KVChunk, layout: KVLayout) -> None:
    """Verifies a chunk and copies it into its place in kv; raises KVIntegrityError when it cannot."""
    if not 0 <= chunk.layer < layout.num_layers:
        raise KVIntegrityError(f"chunk for layer {chunk.layer} but the model has {layout.num_layers}")
    end = chunk.token_start + chunk.token_count
    if chunk.token_start < 0 or chunk.token_count <= 0 or end > kv.capacity:
        raise KVIntegrityError(f"chunk tokens [{chunk.token_start}, {end}) outside the reserved {kv.capacity}")
    expected = chunk.token_count * layout.bytes_per_token_per_layer // 2
    if len(chunk.key) != expected or len(chunk.value) != expected:
        raise KVIntegrityError(f"chunk carries {len(chunk.key)}+{len(chunk.value)} bytes, expected {expected} each")
    if checksum(chunk.key, chunk.value) != chunk.crc32:
        raise KVIntegrityError(f"checksum mismatch in layer {chunk.layer} tokens [{chunk.token_start}, {end})")
    shape = (layout.num_kv_heads, chunk.token_count, layout.head_dim)
    for src, dst in ((chunk.key, kv.keys), (chunk.value, kv.values)):
        t = torch.frombuffer(bytearray(src), dtype=torch.uint8).view(layout.torch_dtype).view(shape)
        dst[chunk.layer, :, chunk.token_start : end].copy_(t)
