"""KV chunks: bounded, checksummed, refused when corrupt or from another model."""

import dataclasses

import pytest
import torch

from splitwise.engine.kv_cache import RequestKV
from splitwise.kv.chunks import KVIntegrityError, split_layer, write_chunk
from splitwise.kv.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", model_fingerprint="abc")


def empty_kv(tokens: int) -> RequestKV:
    shape = (LAYOUT.num_layers, LAYOUT.num_kv_heads, tokens, LAYOUT.head_dim)
    return RequestKV("r", torch.zeros(shape), torch.zeros(shape))


def test_chunks_are_bounded_and_reassemble_exactly():
    keys, values = torch.randn(2, 37, 8), torch.randn(2, 37, 8)
    chunks = list(split_layer(1, keys, values, 0, LAYOUT, max_chunk_bytes=512))
    assert len(chunks) > 1 and all(c.num_bytes <= 512 for c in chunks)
    kv = empty_kv(40)
    for chunk in chunks:
        write_chunk(kv, chunk, LAYOUT)
    assert torch.equal(kv.keys[1, :, :37], keys) and torch.equal(kv.values[1, :, :37], values)


def test_bfloat16_chunks_round_trip():
    layout = dataclasses.replace(LAYOUT, dtype="bfloat16")
    keys = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    shape = (2, 2, 5, 8)
    kv = RequestKV("r", torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
    for chunk in split_layer(0, keys, keys, 0, layout, 1 << 20):
        write_chunk(kv, chunk, layout)
    assert torch.equal(kv.keys[0], keys)


def test_corrupt_chunk_is_refused():
    chunk = next(split_layer(0, torch.randn(2, 4, 8), torch.randn(2, 4, 8), 0, LAYOUT, 1 << 20))
    flipped = bytes([chunk.key[0] ^ 1]) + chunk.key[1:]
    with pytest.raises(KVIntegrityError, match="checksum"):
        write_chunk(empty_kv(4), dataclasses.replace(chunk, key=flipped), LAYOUT)


def test_chunk_outside_the_reservation_is_refused():
    chunk = next(split_layer(0, torch.randn(2, 8, 8), torch.randn(2, 8, 8), 0, LAYOUT, 1 << 20))
    with pytest.raises(KVIntegrityError, match="outside"):
        write_chunk(empty_kv(4), chunk, LAYOUT)


def test_layout_of_another_model_is_a_mismatch():
    other = dataclasses.replace(LAYOUT, model_fingerprint="xyz")
    assert "model mismatch" in LAYOUT.mismatch(other)
    assert "layout mismatch" in LAYOUT.mismatch(dataclasses.replace(LAYOUT, dtype="bfloat16"))
    assert LAYOUT.mismatch(dataclasses.replace(LAYOUT)) is None
