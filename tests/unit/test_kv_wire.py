"""A chunk message written from its buffers is byte for byte the KVTransferMessage protobuf would write, and reads
back as the same chunk; a ChunkMessage answers as the message it stands for."""

import pytest
import torch
from hypothesis import given, strategies as st

from splitwise.kv.chunks import KVChunk, decode_chunk, run_chunk, split_layer
from splitwise.kv.layout import KVLayout
from splitwise.rpc import convert
from splitwise.rpc.kv_wire import ChunkMessage, chunk_message_bytes, serialize
from splitwise.rpc.v1 import common_pb2

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32", model_fingerprint="m")
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@given(layer=INT32, token_start=INT32, token_count=INT32, key=st.binary(max_size=300), value=st.binary(max_size=300),
       xxh3=st.integers(min_value=0, max_value=2**64 - 1), staged=st.booleans(), num_layers=INT32)
def test_the_bytes_are_what_protobuf_writes_for_any_chunk(layer, token_start, token_count, key, value, xxh3, staged,
                                                          num_layers):
    chunk = KVChunk(layer, token_start, token_count, key, value, xxh3, staged, num_layers)
    expected = convert.chunk_to_pb(chunk).SerializeToString()
    assert chunk_message_bytes(chunk) == expected
    parsed = common_pb2.KVTransferMessage.FromString(expected)
    assert parsed.WhichOneof("kind") == "chunk"
    assert convert.chunk_from_pb(parsed.chunk) == KVChunk(layer, token_start, token_count, key, value, xxh3, staged,
                                                          num_layers or 1)


@pytest.mark.parametrize("runs", [False, True])
def test_a_chunk_of_tensor_buffers_goes_on_the_wire_and_decodes_to_the_same_kv(runs):
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(5, 2, 8, generator=g).transpose(0, 1), torch.randn(5, 2, 8, generator=g).transpose(0, 1))
          for _ in range(LAYOUT.num_layers)]
    if runs:
        chunks = [run_chunk(0, [k for k, _ in kv], [v for _, v in kv], 0)]
    else:
        chunks = [c for layer, (k, v) in enumerate(kv) for c in split_layer(layer, k, v, 0, LAYOUT, 1 << 20)]
    for chunk in chunks:
        message = ChunkMessage(chunk)
        assert message.WhichOneof("kind") == "chunk"
        wire = serialize(message)
        assert wire == convert.chunk_to_pb(chunk).SerializeToString() and message.ByteSize() == len(wire)
        received = convert.chunk_from_pb(common_pb2.KVTransferMessage.FromString(wire).chunk)
        keys, values = decode_chunk(received, LAYOUT, 5)
        if runs:
            assert torch.equal(keys, torch.stack([k.transpose(0, 1) for k, _ in kv]))
            assert torch.equal(values, torch.stack([v.transpose(0, 1) for _, v in kv]))
        else:
            assert torch.equal(keys, kv[chunk.layer][0].transpose(0, 1))
        assert message.chunk.num_layers == (LAYOUT.num_layers if runs else 0)


def test_a_chunks_bytes_are_its_own_copy_not_a_view_of_the_tensor_it_was_cut_from():
    keys = torch.zeros(2, 5, 8)
    chunk = next(split_layer(0, keys, keys, 0, LAYOUT, 1 << 20))
    keys.fill_(1.0)  # the compute thread goes on and overwrites its buffers
    assert not any(memoryview(chunk.key).tobytes())
