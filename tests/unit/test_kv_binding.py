"""A KV hash names exactly what KV is of, and a receiver takes no KV of other tokens."""

import dataclasses

import pytest
import torch

from splitwise.kv.binding import KVBindingMismatch, kv_hash
from splitwise.kv.chunks import KVIntegrityError, split_layer
from splitwise.kv.layout import KVLayout
from splitwise.kv.transport.receiver import KVReceiver
from splitwise.rpc import convert
from splitwise.rpc.v1 import common_pb2

LAYOUT = KVLayout(num_layers=1, num_kv_heads=2, head_dim=4, dtype="float32", model_fingerprint="abc")
PROMPT = [3, 1, 4, 1, 5]


def test_the_kv_hash_changes_with_any_token_and_any_part_of_the_layout():
    hashes = {kv_hash(LAYOUT, PROMPT), kv_hash(LAYOUT, [3, 1, 4, 1, 6]), kv_hash(LAYOUT, [1, 3, 4, 1, 5]),
              kv_hash(LAYOUT, PROMPT[:-1]), kv_hash(LAYOUT, [3, 1, 4, 15])}
    for field, value in (("num_layers", 2), ("num_kv_heads", 1), ("head_dim", 8), ("dtype", "bfloat16"),
                         ("model_fingerprint", "abd")):
        hashes.add(kv_hash(dataclasses.replace(LAYOUT, **{field: value}), PROMPT))
    assert len(hashes) == 10
    assert kv_hash(KVLayout(**dataclasses.asdict(LAYOUT)), tuple(PROMPT)) == kv_hash(LAYOUT, PROMPT)


def transfer(header_hash: str) -> list[common_pb2.KVTransferMessage]:
    keys = torch.randn(2, len(PROMPT), 4)
    chunks = [convert.chunk_to_pb(c) for c in split_layer(0, keys, keys, 0, LAYOUT, 1 << 20)]
    header = common_pb2.KVHeader(request_id="r", layout=convert.layout_to_pb(LAYOUT), num_tokens=len(PROMPT),
                                 transport="grpc", kv_hash=header_hash)
    return [common_pb2.KVTransferMessage(header=header), *chunks]


async def _messages(messages):
    for message in messages:
        yield message


async def test_a_receiver_refuses_kv_of_other_tokens_before_writing_any():
    written = []
    receiver = KVReceiver(lambda *kv: written.append(kv), LAYOUT, PROMPT)
    with pytest.raises(KVBindingMismatch, match="other tokens"):
        await receiver.consume(_messages(transfer(kv_hash(LAYOUT, [2, 7, 1, 8, 2]))))
    assert written == [] and receiver.committed.done()


async def test_a_receiver_refuses_chunks_before_the_header():
    receiver = KVReceiver(lambda *kv: None, LAYOUT, PROMPT)
    with pytest.raises(KVIntegrityError, match="before the transfer's header"):
        await receiver.consume(_messages(transfer(kv_hash(LAYOUT, PROMPT))[1:]))
