"""Splits a layer's KV into bounded, checksummed chunks, and verifies and decodes received ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import warnings

import torch

from splitwise.kv.layout import KVLayout
from splitwise.kv.transport.staged import checksum

DEFAULT_MAX_CHUNK_BYTES = 1 << 20
# A received chunk's keys and values are read-only views of its message's bytes (no copy before the one into the
# KV blocks); torch warns about every such view.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class KVIntegrityError(Exception):
    """A chunk that does not belong where it says, or whose bytes do not match their checksum."""


@dataclass(frozen=True)
class KVChunk:
    layer: int
    token_start: int
    token_count: int
    key: bytes
    value: bytes
    xxh3: int  # transport.staged.checksum of key then value
    staged: bool = False  # the bytes are in the receiver's staging buffer, not in key and value
    num_layers: int = 1  # staged only: layers [layer, layer + num_layers) of the token range, one checksum


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes in C order, in one copy (numpy reads a strided view in order; the tensor may be reused)."""
    t = t.detach().cpu()
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.view(torch.uint8).numpy().tobytes()


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


def run_chunk(layer: int, keys: list[torch.Tensor], values: list[torch.Tensor], token_start: int) -> KVChunk:
    """Consecutive layers' KV of one token range as one chunk (layers [layer, layer + len(keys))): its key holds
    each layer's keys [num_kv_heads, tokens, head_dim] in layer order, its value the values, and one checksum runs
    over key then value, so a run costs one message, one copy and one checksum however many layers it holds."""
    k = _tensor_bytes(torch.stack(keys))
    v = _tensor_bytes(torch.stack(values))
    return KVChunk(layer, token_start, keys[0].shape[1], k, v, checksum(k, v), num_layers=len(keys))


def layers_named(chunk: KVChunk) -> str:
    if chunk.num_layers == 1:
        return f"layer {chunk.layer}"
    return f"layers [{chunk.layer}, {chunk.layer + chunk.num_layers})"


def check_chunk_bounds(chunk: KVChunk, layout: KVLayout, num_tokens: int) -> None:
    if not 0 <= chunk.layer < layout.num_layers:
        raise KVIntegrityError(f"chunk for layer {chunk.layer} but the model has {layout.num_layers}")
    if chunk.num_layers < 1 or chunk.layer + chunk.num_layers > layout.num_layers:
        raise KVIntegrityError(f"chunk for layers [{chunk.layer}, {chunk.layer + chunk.num_layers}) but the model "
                               f"has {layout.num_layers}")
    end = chunk.token_start + chunk.token_count
    if chunk.token_start < 0 or chunk.token_count <= 0 or end > num_tokens:
        raise KVIntegrityError(f"chunk tokens [{chunk.token_start}, {end}) outside the {num_tokens} transferred")


def decode_chunk(chunk: KVChunk, layout: KVLayout, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Verifies a chunk of a num_tokens-token transfer; returns its keys and values [tokens, kv_heads, head_dim]
    (or [layers, tokens, kv_heads, head_dim] for a run of layers, `run_chunk`).

    Raises KVIntegrityError when the chunk does not belong where it says or its bytes are corrupt.
    """
    check_chunk_bounds(chunk, layout, num_tokens)
    end = chunk.token_start + chunk.token_count
    expected = chunk.num_layers * chunk.token_count * layout.bytes_per_token_per_layer // 2
    if len(chunk.key) != expected or len(chunk.value) != expected:
        raise KVIntegrityError(f"chunk of {layers_named(chunk)} carries {len(chunk.key)}+{len(chunk.value)} bytes, "
                               f"expected {expected} each")
    if checksum(chunk.key, chunk.value) != chunk.xxh3:
        raise KVIntegrityError(f"checksum mismatch in {layers_named(chunk)} tokens [{chunk.token_start}, {end})")
    shape = (chunk.num_layers, layout.num_kv_heads, chunk.token_count, layout.head_dim)
    keys, values = (  # views of the message's bytes, read only: their reader copies them into its KV blocks
        torch.frombuffer(raw, dtype=torch.uint8).view(layout.torch_dtype).view(shape).transpose(1, 2)
        for raw in (chunk.key, chunk.value)
    )
    return (keys[0], values[0]) if chunk.num_layers == 1 else (keys, values)
