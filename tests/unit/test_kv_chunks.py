"""KV chunks: bounded, checksummed, refused when corrupt or from another model."""

import dataclasses

import pytest
import torch

from splitwise.kv.chunks import KVIntegrityError, decode_chunk, split_layer
from splitwise.kv.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", model_fingerprint="abc")


def test_chunks_are_bounded_and_reassemble_exactly():
    keys, values = torch.randn(2, 37, 8), torch.randn(2, 37, 8)
    chunks = list(split_layer(1, keys, values, 0, LAYOUT, max_chunk_bytes=512))
    assert len(chunks) > 1 and all(len(c.key) + len(c.value) <= 512 for c in chunks)
    got_keys, got_values = torch.zeros(37, 2, 8), torch.zeros(37, 2, 8)
    for chunk in chunks:
        k, v = decode_chunk(chunk, LAYOUT, 37)
        got_keys[chunk.token_start : chunk.token_start + chunk.token_count] = k
        got_values[chunk.token_start : chunk.token_start + chunk.token_count] = v
    assert torch.equal(got_keys.transpose(0, 1), keys) and torch.equal(got_values.transpose(0, 1), values)


def test_bfloat16_chunks_round_trip():
    layout = dataclasses.replace(LAYOUT, dtype="bfloat16")
    keys = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    (chunk,) = split_layer(0, keys, keys, 0, layout, 1 << 20)
    k, _ = decode_chunk(chunk, layout, 5)
    assert k.dtype == torch.bfloat16 and torch.equal(k.transpose(0, 1), keys)


def test_corrupt_chunk_is_refused():
    chunk = next(split_layer(0, torch.randn(2, 4, 8), torch.randn(2, 4, 8), 0, LAYOUT, 1 << 20))
    key = bytes(chunk.key)  # (a chunk's bytes are a buffer of their own: bytes, or an array)
    flipped = bytes([key[0] ^ 1]) + key[1:]
    with pytest.raises(KVIntegrityError, match="checksum"):
        decode_chunk(dataclasses.replace(chunk, key=flipped), LAYOUT, 4)


def test_chunk_outside_the_transfer_is_refused():
    chunk = next(split_layer(0, torch.randn(2, 8, 8), torch.randn(2, 8, 8), 0, LAYOUT, 1 << 20))
    with pytest.raises(KVIntegrityError, match="outside"):
        decode_chunk(chunk, LAYOUT, 4)


def test_layout_of_another_model_is_a_mismatch():
    other = dataclasses.replace(LAYOUT, model_fingerprint="xyz")
    assert "model mismatch" in LAYOUT.mismatch(other)
    assert "layout mismatch" in LAYOUT.mismatch(dataclasses.replace(LAYOUT, dtype="bfloat16"))
    assert LAYOUT.mismatch(dataclasses.replace(LAYOUT)) is None
